//! Content-addressed lists: workloads whose port and IP-range lists are
//! the same share one list id and one set of entries in the pinned maps;
//! each workload's own addresses stay under an id of its own. A mesh-wide
//! change writes the new lists once and switches every workload to them;
//! an id's entries go with its last workload, never before.
use std::{collections::BTreeSet, net::IpAddr};

use redirector::dataplane::{Dataplane, Desired, Maps};
use redirector_common::cidr_kind;
use redirector_policy::{compile, map_entries_with, parse_annotations, parse_config, Policy};
use redirector_testkit::{PinDir, TestCgroup};

use super::require_kernel;

type Ports = Vec<(u32, u16, u8)>;
type Cidrs = Vec<(u32, [u8; 4], u8, [u8; 16])>;

fn actual(maps: &Maps) -> (Ports, Cidrs) {
    let mut ports: Ports = maps.port_keys().unwrap().into_iter().map(|k| (k.policy_id, k.port, k.kind)).collect();
    let mut cidrs: Cidrs =
        maps.cidr_keys().unwrap().into_iter().map(|(b, d)| (b, d.policy_id_be, d.kind, d.addr)).collect();
    ports.sort();
    cidrs.sort();
    (ports, cidrs)
}

/// Exactly the entries the pinned workloads' ids call for, each once.
fn expected(maps: &Maps, policies: &[(u64, &Policy)]) -> (Ports, Cidrs) {
    let pinned = maps.workloads().unwrap();
    let (mut ports, mut cidrs) = (BTreeSet::new(), BTreeSet::new());
    for (c, p) in policies {
        let e = map_entries_with(p, pinned[c].policy_id, pinned[c].local_id);
        ports.extend(e.ports.into_iter().map(|k| (k.policy_id, k.port, k.kind)));
        cidrs.extend(e.cidrs.into_iter().map(|(b, d)| (b, d.policy_id_be, d.kind, d.addr)));
    }
    (ports.into_iter().collect(), cidrs.into_iter().collect())
}

/// Entries a policy's lists and own addresses take.
fn sizes(p: &Policy) -> (usize, usize) {
    let e = map_entries_with(p, 1, 2);
    (e.ports.len() + e.list_cidrs().count(), e.local_cidrs().count())
}

fn all<'a>(w: &[u64], p: &'a [Policy]) -> Vec<(u64, &'a Policy)> {
    w.iter().copied().zip(p.iter()).collect()
}

fn desired(cookie: u64, p: &Policy) -> Desired {
    Desired { name: format!("w{}", cookie & 0xff), cookie, netns: "/nonexistent".into(), policy: p.clone() }
}

#[test]
fn workloads_with_the_same_lists_share_their_entries() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let mut dp = Dataplane::load(&pins.path, &cgroup.path).unwrap();
    // Istio's loopback rule looks up the pod's own address: one per pod.
    let policy = |mesh_ports: &str, pod_ports: &str, own: u8| {
        let cfg = parse_config(&format!(
            "mesh:\n  preset: istio\n  outboundPortExclusionList: [{mesh_ports}]\n  outboundIPRangeExclusionList: \
             [\"198.51.100.0/24\", \"2001:db8:1::/48\"]\nworkloads: []\n"
        ))
        .unwrap();
        let mut a = std::collections::BTreeMap::new();
        if !pod_ports.is_empty() {
            a.insert("traffic.sidecar.istio.io/excludeOutboundPorts".to_string(), pod_ports.to_string());
        }
        let mut p = compile(&cfg.mesh, &parse_annotations(cfg.mesh.preset, &a).unwrap())
            .with_local_addresses([IpAddr::from([192, 0, 2, own])]);
        p.inbound = false;
        p
    };
    let w: [u64; 3] = [(1 << 60) + 1, (1 << 60) + 2, (1 << 60) + 3];
    let ids = |dp: &Dataplane| {
        let pinned = dp.maps.workloads().unwrap();
        w.map(|c| (pinned[&c].policy_id, pinned[&c].local_id))
    };

    // Three pods, one set of lists.
    let p: Vec<Policy> = (0..3).map(|i| policy("6379", "", 10 + i)).collect();
    let (lists, own) = sizes(&p[0]);
    assert_eq!(own, 1);
    let r = dp.apply(&[desired(w[0], &p[0]), desired(w[1], &p[1]), desired(w[2], &p[2])], &BTreeSet::new());
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let first = ids(&dp);
    assert!(first.iter().all(|(l, _)| *l == first[0].0), "one list id for all: {first:?}");
    let locals: BTreeSet<u32> = first.iter().map(|(_, o)| *o).collect();
    assert!(locals.len() == 3 && !locals.contains(&0) && !locals.contains(&first[0].0), "{first:?}");
    assert_eq!(r.written, lists + 3 * own, "the lists written once, each pod's own address once");
    assert_eq!(actual(&dp.maps), expected(&dp.maps, &all(&w, &p)));
    assert_eq!(actual(&dp.maps).0.len() + actual(&dp.maps).1.len(), lists + 3 * own);

    // A mesh-wide change: the new lists once, every pod switched, the old
    // lists gone once; the own addresses are neither rewritten nor moved.
    let q: Vec<Policy> = (0..3).map(|i| policy("6379, 6380", "", 10 + i)).collect();
    let (new_lists, _) = sizes(&q[0]);
    let r = dp.apply(&[desired(w[0], &q[0]), desired(w[1], &q[1]), desired(w[2], &q[2])], &BTreeSet::new());
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.programmed.len(), 3);
    let second = ids(&dp);
    assert!(second.iter().all(|(l, _)| *l == second[0].0 && *l != first[0].0), "{second:?}");
    assert_eq!(second.map(|(_, o)| o), first.map(|(_, o)| o), "own addresses keep their ids");
    assert_eq!((r.written, r.swept), (new_lists, lists));
    assert_eq!(actual(&dp.maps), expected(&dp.maps, &all(&w, &q)));

    // One pod's annotation: that pod alone gets lists of its own; the
    // shared ones stay for the other two.
    let mut q2 = q.clone();
    q2[1] = policy("6379, 6380", "7070", 11);
    let (own_lists, _) = sizes(&q2[1]);
    let r = dp.apply(&[desired(w[0], &q2[0]), desired(w[1], &q2[1]), desired(w[2], &q2[2])], &BTreeSet::new());
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!((r.programmed.clone(), r.unchanged.len()), (vec!["w2".to_string()], 2));
    assert_eq!((r.written, r.swept), (own_lists, 0));
    let third = ids(&dp);
    assert_eq!((third[0], third[2]), (second[0], second[2]));
    assert_ne!(third[1].0, second[1].0);
    assert_eq!(actual(&dp.maps), expected(&dp.maps, &all(&w, &q2)));

    // A pod leaves: its own address goes, the lists another pod uses stay.
    let r = dp.apply(&[desired(w[1], &q2[1]), desired(w[2], &q2[2])], &BTreeSet::new());
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!((r.removed, r.swept), (1, own));
    assert_eq!(actual(&dp.maps), expected(&dp.maps, &[(w[1], &q2[1]), (w[2], &q2[2])]));

    // Another writer removes every user of the shared id: the id is not
    // reused (a sweep may have taken its entries); its lists are written
    // again under a fresh one.
    let shared = third[2].0;
    dp.maps.remove_workload(w[2]).unwrap();
    let r = dp.apply(&[desired(w[1], &q2[1]), desired(w[2], &q2[2])], &BTreeSet::new());
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let pinned = dp.maps.workloads().unwrap();
    assert_ne!(pinned[&w[2]].policy_id, shared);
    assert_eq!(actual(&dp.maps), expected(&dp.maps, &[(w[1], &q2[1]), (w[2], &q2[2])]));
    let (ports, cidrs) = actual(&dp.maps);
    assert!(!ports.iter().any(|(id, ..)| *id == shared), "the old id's entries are swept");
    assert!(cidrs
        .iter()
        .any(|(_, id, k, _)| *id == pinned[&w[2]].local_id.to_be_bytes() && *k == cidr_kind::LOCAL_ADDRESS));

    // Everything leaves: nothing is left in the list maps.
    let r = dp.apply(&[], &BTreeSet::new());
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(actual(&dp.maps), (vec![], vec![]));
}
