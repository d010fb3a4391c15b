//! Every map has a fixed capacity. Filled to it, each one refuses the next
//! entry cleanly: the agent (or the data path, through its counters) says
//! which map is full, nothing already in it is evicted, the policy in force
//! stays whole, and the agent recovers on its own once there is room.
//! (RDR_PORTS has its own test in kernel.rs.)
use std::{collections::BTreeSet, path::Path};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use redirector::dataplane::{Dataplane, Desired, Maps};
use redirector_common::{
    map_names, ListenerKey, OrigDst, TupleKey, AF_INET, AF_INET6, MAX_LISTENERS, MAX_TRACKED_CONNECTIONS, MAX_WORKLOADS,
};
use redirector_policy::{compile, parse_config};
use redirector_testkit::{self as testkit, PinDir, Proto, Server, TestCgroup};

use super::{bin, poll_until, require_kernel, Managed, EXCLUSIONS};

/// `n` distinct IPv6 host routes inside 2001:db8::/32 (documentation).
fn v6_hosts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("2001:db8::{:x}:{:x}/128", i >> 16, i & 0xffff)).collect()
}

fn inspect(pins: &Path) -> serde_json::Value {
    let out = std::process::Command::new(bin()).args(["inspect", "--json", "--pin-dir"]).arg(pins).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

fn fill(v: &serde_json::Value, map: &str) -> (u64, u64) {
    let f = v["maps"].as_array().unwrap().iter().find(|f| f["name"] == map).unwrap();
    (f["entries"].as_u64().unwrap(), f["capacity"].as_u64().unwrap())
}

/// RDR_CIDRS (an LPM trie of 262,144): a policy of 131,100 IP ranges fits
/// once; a change needs a second generation of that size beside it, which
/// does not fit. The change is refused naming the map, the old policy
/// keeps working, the partial generation is swept, and a later change
/// that fits is applied.
#[test]
fn full_cidr_map_refuses_the_change_and_keeps_the_policy() {
    if !require_kernel() {
        return;
    }
    let ranges = v6_hosts(131_100);
    let config = |extra: &str, ranges: &[String]| {
        format!(
            "mesh:\n  outboundIPRangeExclusionList: [\"198.51.100.0/24\"{extra}, {}]\nworkloads:\n  - name: app\n    netns: {{netns}}\n",
            ranges.iter().map(|r| format!("\"{r}\"")).collect::<Vec<_>>().join(", ")
        )
    };
    let m = Managed::start("c", &config("", &ranges));
    let cidrs = || Maps::open(&m.pins.path).unwrap().cidr_keys().unwrap().len();
    let before = cidrs();
    assert!(before > 131_000, "{before}");
    assert!(m.probe(1000, "192.0.2.10:80").starts_with("proxy 192.0.2.10:80"));
    // The refused change would have excluded 192.0.2.10.
    m.write_config(&config(", \"192.0.2.10/32\"", &ranges));
    m.wait_for_log("RDR_CIDRS is full (capacity 262144)", "the full CIDR map");
    assert!(m.probe(1000, "192.0.2.10:80").starts_with("proxy 192.0.2.10:80"), "the old policy is not whole");
    assert!(m.probe(1000, "198.51.100.10:80").starts_with("direct"));
    let after = poll_until(cidrs, |n| *n == before);
    assert_eq!(after, before, "the partly written generation was not swept");
    assert_eq!(fill(&inspect(&m.pins.path), map_names::CIDRS), (before as u64, 262_144));
    // A change that fits goes in.
    m.write_config(&config(", \"192.0.2.10/32\"", &ranges[..1000]));
    let got = m.probe_until(1000, "192.0.2.10:80", |a| a.starts_with("direct"));
    assert!(got.starts_with("direct"), "{got}\n{}", m.agent.log_text());
    let left = poll_until(cidrs, |n| *n < 2000);
    assert!(left < 2000, "{left}");
}

fn open_tuples(pins: &Path) -> BpfHashMap<MapData, TupleKey, OrigDst> {
    let data = MapData::from_pin(pins.join(map_names::ORIG_BY_TUPLE)).unwrap();
    BpfHashMap::try_from(Map::HashMap(data)).unwrap()
}

fn fake_tuple(i: u32) -> TupleKey {
    // Netns cookie 0 is never a real namespace's.
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
    a[12..].copy_from_slice(&i.to_be_bytes());
    TupleKey {
        netns_cookie: 0,
        family: AF_INET6,
        client_port: 1,
        proxy_port: 15001,
        _pad: 0,
        client_addr: a,
        proxy_addr: a,
    }
}

/// RDR_ORIG_TUPLE (a hash of 262,144, written by the programs): full, a
/// new redirected connection still reaches the proxy, whose
/// `SO_ORIGINAL_DST` is then its own address, as conntrack answers for a
/// connection it has no NAT record of (it fails closed: a proxy sees a
/// loop, and the connection is never let by); the data path counts it,
/// the agent logs which map is full, and not one existing entry is
/// evicted. With room again, connections work.
#[test]
fn full_tracking_map_fails_closed_and_is_reported() {
    if !require_kernel() {
        return;
    }
    let m = Managed::start("t", EXCLUSIONS);
    let mut tuples = open_tuples(&m.pins.path);
    let baseline = tuples.keys().count() as u32;
    for i in 0..MAX_TRACKED_CONNECTIONS - baseline {
        tuples
            .insert(fake_tuple(i), OrigDst { family: AF_INET6, port_be: 80u16.to_be(), flags: 0, addr: [0; 16] }, 0)
            .unwrap();
    }
    let answer = m.probe(1000, "192.0.2.10:80");
    assert!(answer.starts_with("proxy 127.0.0.1:15001 | peer 192.0.2.10:80"), "{answer}");
    m.wait_for_log("RDR_ORIG_TUPLE is full (capacity 262144)", "the full tracking map");
    let v = inspect(&m.pins.path);
    assert!(v["counters"]["tuple_insert_failed"].as_u64().unwrap() >= 1, "{}", v["counters"]);
    assert!(v["counters"]["orig_dst_own_address"].as_u64().unwrap() >= 1, "{}", v["counters"]);
    let evicted = (0..MAX_TRACKED_CONNECTIONS - baseline).filter(|i| tuples.get(&fake_tuple(*i), 0).is_err()).count();
    assert_eq!(evicted, 0, "entries were evicted");
    for i in 0..1000 {
        tuples.remove(&fake_tuple(i)).unwrap();
    }
    assert!(m.probe(1000, "192.0.2.10:80").starts_with("proxy 192.0.2.10:80"));
    for i in 1000..MAX_TRACKED_CONNECTIONS - baseline {
        tuples.remove(&fake_tuple(i)).unwrap();
    }
    let left = poll_until(|| open_tuples(&m.pins.path).keys().count() as u32, |n| *n <= baseline);
    assert!(left <= baseline, "{left}");
}

/// RDR_WORKLOADS (16,384 namespaces), through the apply layer the agents
/// use: with 16,383 programmed, the first new workload fits, the second is
/// refused naming the map while every existing one stays; once workloads
/// are removed, the same pass makes room first and programs it.
#[test]
fn full_workload_map_refuses_the_new_workload_and_keeps_the_others() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let mut dp = Dataplane::load(&pins.path, &cgroup.path).unwrap();
    let cfg = parse_config("mesh:\n  outboundPortExclusionList: [6379]\nworkloads: []\n").unwrap();
    let mut policy = compile(&cfg.mesh, &Default::default());
    // Fake cookies have no namespace to attach sk_lookup to.
    policy.inbound = false;
    let desired = |cookies: &[u64]| -> Vec<Desired> {
        cookies
            .iter()
            .map(|c| Desired {
                name: format!("w{c}"),
                cookie: *c,
                netns: "/nonexistent".into(),
                policy: policy.clone(),
            })
            .collect()
    };
    // Cookies of namespaces that do not exist: 1 << 60 upwards.
    let existing: Vec<u64> = (0..u64::from(MAX_WORKLOADS) - 1).map(|i| (1 << 60) + i).collect();
    let report = dp.apply(&desired(&existing), &BTreeSet::new());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.programmed.len(), existing.len());
    let (a, b) = ((1 << 61) + 1, (1 << 61) + 2);
    let mut all = existing.clone();
    all.extend([a, b]);
    let report = dp.apply(&desired(&all), &BTreeSet::new());
    assert_eq!(report.programmed, vec![format!("w{a}")]);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    let (who, e) = &report.errors[0];
    assert_eq!(who, &format!("w{b}"));
    let msg = format!("{e:#}");
    assert!(msg.contains("RDR_WORKLOADS is full (capacity 16384)") && msg.contains("previous policy kept"), "{msg}");
    let pinned = dp.maps.workloads().unwrap();
    assert_eq!(pinned.len(), MAX_WORKLOADS as usize);
    assert!(all[..all.len() - 1].iter().all(|c| pinned.contains_key(c)), "an existing workload was evicted");
    assert_eq!(fill(&inspect(&pins.path), map_names::WORKLOADS), (16_384, 16_384));
    // Ten workloads leave; in the same pass the refused one goes in.
    let report = dp.apply(&desired(&all[10..]), &BTreeSet::new());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.removed, 10);
    assert!(report.programmed.contains(&format!("w{b}")), "{:?}", report.programmed);
    assert_eq!(dp.maps.workloads().unwrap().len(), MAX_WORKLOADS as usize - 9);
    // The policy lists are intact: every workload has the same lists, so
    // all name one generation, held once.
    let pinned = dp.maps.workloads().unwrap();
    let id = pinned[&a].policy_id;
    assert!(pinned.values().all(|w| w.policy_id == id), "the workloads name more than one list id");
    let want = redirector_policy::map_entries(&policy, id).ports.len();
    assert!(want > 0);
    assert_eq!(dp.maps.port_keys().unwrap().len(), want);
    assert!(dp.maps.port_keys().unwrap().iter().all(|k| k.policy_id == id));
    drop(dp);
    redirector::dataplane::cleanup(&pins.path).unwrap();
}

/// RDR_LISTENERS (a SOCKHASH of 32,768, two per workload): filled with
/// other listening sockets, the inbound proxy that starts listening cannot
/// be registered. Inbound connections are then dropped, never let by to the
/// application; the data path counts it, the agent logs which map is full
/// and retries; once sockets close and make room, it registers the proxy
/// (from /proc) on its own and inbound connections reach it.
#[test]
fn full_listener_map_drops_inbound_and_recovers() {
    if !require_kernel() {
        return;
    }
    let m = Managed::start_with(super::Topology::new("l").unwrap(), super::INBOUND, super::app_servers);
    let existing = Maps::open(&m.pins.path).unwrap().listener_keys().unwrap().len() as u32;
    let free = MAX_LISTENERS - existing;
    // Holders, each this test binary in `listener_map_filler` mode, keep
    // the sockets open, as many per process as the descriptor limit allows
    // (a container without CAP_SYS_RESOURCE cannot raise it); the last
    // holder has 100.
    let per_holder = descriptor_limit().saturating_sub(200).clamp(100, free - 100);
    let mut holders = Vec::new();
    let mut next = 0;
    while next < free - 100 {
        let size = per_holder.min(free - 100 - next);
        holders.push(ListenerHolder::start(&m.pins.path, &m.topo.app.path(), next, size));
        next += size;
    }
    holders.push(ListenerHolder::start(&m.pins.path, &m.topo.app.path(), next, 100));
    let _inbound_proxy = Server::proxy(&m.topo.app.path(), "0.0.0.0:15003".parse().unwrap()).unwrap();
    m.wait_for_log("RDR_LISTENERS is full (capacity 32768)", "the full listener map");
    let pod = testkit::addrs::POD_IP;
    let dst: std::net::SocketAddr = format!("{pod}:8080").parse().unwrap();
    let got = testkit::probe(&m.topo.peer.path(), 0, Proto::Tcp, dst).unwrap();
    assert!(!got.starts_with("direct") && !got.starts_with("proxy"), "inbound went {got:?} with no registered proxy");
    let v = inspect(&m.pins.path);
    assert!(v["counters"]["listener_insert_failed"].as_u64().unwrap() >= 1, "{}", v["counters"]);
    assert!(v["counters"]["inbound_dropped_no_listener"].as_u64().unwrap() >= 1, "{}", v["counters"]);
    assert_eq!(fill(&v, map_names::LISTENERS), (u64::from(MAX_LISTENERS), u64::from(MAX_LISTENERS)));
    // Closing sockets removes their entries; the agent's retry registers
    // the proxy.
    drop(holders.pop());
    let got =
        poll_until(|| testkit::probe(&m.topo.peer.path(), 0, Proto::Tcp, dst).unwrap(), |g| g.starts_with("proxy"));
    assert!(got.starts_with(&format!("proxy {pod}:8080")), "{got}\n{}", m.agent.log_text());
    drop(holders);
    let left = poll_until(|| Maps::open(&m.pins.path).unwrap().listener_keys().unwrap().len(), |n| *n == 1);
    assert_eq!(left, 1, "closed sockets left entries");
}

/// Raises this process's descriptor limit as far as it may (children
/// inherit it) and returns the soft limit now in force.
fn descriptor_limit() -> u32 {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on this process.
    unsafe {
        let want = libc::rlimit { rlim_cur: 65_536, rlim_max: 65_536 };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
    }
    l.rlim_cur.min(65_536) as u32
}

/// A child process holding `count` listening sockets, registered in
/// RDR_LISTENERS under fake netns cookies, until it is dropped.
struct ListenerHolder(std::process::Child, std::io::BufReader<std::process::ChildStdout>);

const FILLER_ENV: &str = "REDIRECTOR_TEST_LISTENER_FILLER";

impl ListenerHolder {
    fn start(pins: &Path, netns: &Path, first: u32, count: u32) -> Self {
        use std::io::BufRead as _;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "full_maps::listener_map_filler", "--nocapture", "--test-threads=1"])
            .env(FILLER_ENV, format!("{}|{}|{first}|{count}", pins.display(), netns.display()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        while out.read_line(&mut line).unwrap() > 0 && !line.contains("filled") {}
        assert!(line.contains(&format!("filled {count}")), "listener holder: {line:?}");
        Self(child, out)
    }
}

impl Drop for ListenerHolder {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        // Drain the harness's last lines so it does not die on a broken pipe.
        let _ = std::io::Read::read_to_end(&mut self.1, &mut Vec::new());
        let _ = self.0.wait();
    }
}

/// Not a test: the holder process of
/// `full_listener_map_drops_inbound_and_recovers`, run with `--ignored`.
#[test]
#[ignore = "the holder process of full_listener_map_drops_inbound_and_recovers"]
fn listener_map_filler() {
    let spec = std::env::var(FILLER_ENV).expect("run by full_listener_map_drops_inbound_and_recovers");
    let parts: Vec<&str> = spec.split('|').collect();
    let (pins, netns) = (Path::new(parts[0]), Path::new(parts[1]));
    let (first, count): (u32, u32) = (parts[2].parse().unwrap(), parts[3].parse().unwrap());
    let sockets = testkit::in_netns_as(netns, 0, move || {
        (first..first + count)
            .map(|i| std::net::TcpListener::bind(("127.0.0.1", 20_000 + i as u16)).unwrap())
            .collect::<Vec<_>>()
    })
    .unwrap();
    let mut maps = Maps::open(pins).unwrap();
    for (i, l) in (first..).zip(&sockets) {
        let key = ListenerKey { netns_cookie: (1 << 60) + u64::from(i), family: u32::from(AF_INET), _pad: 0 };
        maps.register_listener(key, l).unwrap();
    }
    println!("filled {count}");
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut rest);
}

/// The apply pass retires exactly the list entries of the policies it
/// replaced or removed (it wrote them, so it knows them) instead of walking
/// every list map; entries it does not know (left by an earlier agent) are
/// swept whole by the next agent's first pass.
#[test]
fn apply_retires_exactly_what_it_replaced() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let mut dp = Dataplane::load(&pins.path, &cgroup.path).unwrap();
    let cfg = parse_config("mesh:\n  preset: osm\nworkloads: []\n").unwrap();
    let policy = |ports: &str, cidrs: &str| {
        let mut a: std::collections::BTreeMap<String, String> = Default::default();
        a.insert("openservicemesh.io/outbound-port-exclusion-list".into(), ports.into());
        a.insert("openservicemesh.io/outbound-ip-range-exclusion-list".into(), cidrs.into());
        let mut p = compile(&cfg.mesh, &redirector_policy::parse_annotations(cfg.mesh.preset, &a).unwrap());
        p.inbound = false;
        p
    };
    let d = |c: u64, p: &redirector_policy::Policy| Desired {
        name: format!("w{c}"),
        cookie: c,
        netns: "/nonexistent".into(),
        policy: p.clone(),
    };
    let (w1, w2, w3) = ((1u64 << 60) + 1, (1 << 60) + 2, (1 << 60) + 3);
    let (p1, p2, p3) =
        (policy("6379,7070", "192.0.2.0/24"), policy("80,81,82", "198.51.100.0/24,2001:db8::/32"), policy("", ""));
    // Exactly the entries of the policies in force, by their ids.
    let expected = |dp: &Dataplane, policies: &[(u64, &redirector_policy::Policy)]| {
        let pinned = dp.maps.workloads().unwrap();
        let (mut ports, mut cidrs) = (Vec::new(), Vec::new());
        for (c, p) in policies {
            let e = redirector_policy::map_entries_with(p, pinned[c].policy_id, pinned[c].local_id);
            ports.extend(e.ports.into_iter().map(|k| (k.policy_id, k.port, k.kind)));
            cidrs.extend(e.cidrs.into_iter().map(|(b, d)| (b, d.policy_id_be, d.kind, d.addr)));
        }
        // (workloads with the same lists share their entries)
        ports.sort();
        ports.dedup();
        cidrs.sort();
        cidrs.dedup();
        (ports, cidrs)
    };
    let actual = |dp: &Dataplane| {
        let mut ports: Vec<_> =
            dp.maps.port_keys().unwrap().into_iter().map(|k| (k.policy_id, k.port, k.kind)).collect();
        let mut cidrs: Vec<_> =
            dp.maps.cidr_keys().unwrap().into_iter().map(|(b, d)| (b, d.policy_id_be, d.kind, d.addr)).collect();
        ports.sort();
        cidrs.sort();
        (ports, cidrs)
    };
    let r = dp.apply(&[d(w1, &p1), d(w2, &p2), d(w3, &p3)], &BTreeSet::new());
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(actual(&dp), expected(&dp, &[(w1, &p1), (w2, &p2), (w3, &p3)]));
    let before = actual(&dp);

    // Leftovers of an earlier writer: a generation no workload refers to.
    let orphan = (1u64 << 60) + 9;
    dp.maps.program_workload(orphan, &p2, None, None).unwrap();
    dp.maps.remove_workload(orphan).unwrap();
    let with_orphan = actual(&dp);
    assert!(with_orphan.0.len() > before.0.len() && with_orphan.1.len() > before.1.len());

    // w1 changes, w2 leaves: exactly their old entries go (not the orphan's:
    // this pass does not walk the maps).
    let p1b = policy("6379", "203.0.113.0/24");
    let r = dp.apply(&[d(w1, &p1b), d(w3, &p3)], &BTreeSet::new());
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!((r.removed, r.programmed.clone()), (1, vec![format!("w{w1}")]));
    let e1 = redirector_policy::map_entries(&p1, 0);
    let e2 = redirector_policy::map_entries(&p2, 0);
    assert_eq!(
        r.swept,
        e1.ports.len() + e1.cidrs.len() + e2.ports.len() + e2.cidrs.len(),
        "retired a different number of entries"
    );
    // Now: the policies in force plus the orphan's entries, nothing else.
    let now = actual(&dp);
    let (mut want_ports, mut want_cidrs) = expected(&dp, &[(w1, &p1b), (w3, &p3)]);
    want_ports.extend(with_orphan.0.iter().filter(|k| !before.0.contains(k)));
    want_cidrs.extend(with_orphan.1.iter().filter(|k| !before.1.contains(k)));
    want_ports.sort();
    want_cidrs.sort();
    assert_eq!(now, (want_ports, want_cidrs), "not exactly the entries in force plus the orphan's");
    // An unchanged pass touches nothing.
    let r = dp.apply(&[d(w1, &p1b), d(w3, &p3)], &BTreeSet::new());
    assert_eq!((r.swept, r.programmed.len(), r.unchanged.len()), (0, 0, 2));
    drop(dp);

    // The next agent does not know who wrote what: its first pass sweeps
    // the maps whole, and the orphan goes.
    let mut dp = Dataplane::load(&pins.path, &cgroup.path).unwrap();
    let r = dp.apply(&[d(w1, &p1b), d(w3, &p3)], &BTreeSet::new());
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(actual(&dp), expected(&dp, &[(w1, &p1b), (w3, &p3)]));
    drop(dp);
    redirector::dataplane::cleanup(&pins.path).unwrap();
}

/// A full map refuses the change cleanly: the agent names the map and its
/// capacity, the workload keeps its previous policy (connections behave
/// as before), the partly written generation is swept, and `inspect`
/// shows the fill level.
#[test]
fn full_port_map_refuses_the_change_and_keeps_the_policy() {
    if !require_kernel() {
        return;
    }
    // Every port included, every port but one excluded, both directions:
    // 2 x 65,535 + 2 x 65,534 = 262,138 entries, within the 262,144
    // capacity; a changed policy needs a second generation of that size.
    let all_but =
        |skip: u16| (1..=65535u16).filter(|p| *p != skip).map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    let config = |skip: u16| {
        format!(
            "mesh:\n  outboundPortExclusionList: [{0}]\n  inboundPortExclusionList: [{0}]\n  outboundPortInclusionList: [{1}]\n  inboundPortInclusionList: [{1}]\nworkloads:\n  - name: app\n    netns: {{netns}}\n",
            all_but(skip),
            all_but(0)
        )
    };
    let m = Managed::start("f", &config(80));
    let ports = || Maps::open(&m.pins.path).unwrap().port_keys().unwrap().len();
    let before = ports();
    assert!(before > 260_000, "{before}");
    // Port 80 is the one port not excluded: redirected.
    assert!(m.probe(1000, "192.0.2.10:80").starts_with("proxy 192.0.2.10:80"));
    assert!(m.probe(1000, "192.0.2.10:8080").starts_with("direct"));
    m.write_config(&config(8080));
    m.wait_for_log("RDR_PORTS is full (capacity 262144)", "the full port map");
    // The previous policy stays in force, whole; the failed generation is gone.
    assert!(m.probe(1000, "192.0.2.10:80").starts_with("proxy 192.0.2.10:80"));
    assert!(m.probe(1000, "192.0.2.10:8080").starts_with("direct"));
    let after = poll_until(ports, |n| *n == before);
    assert_eq!(after, before, "the partly written generation was not swept");
    let out =
        std::process::Command::new(bin()).args(["inspect", "--json", "--pin-dir"]).arg(&m.pins.path).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fill = v["maps"].as_array().unwrap().iter().find(|f| f["name"] == "RDR_PORTS").unwrap().clone();
    assert_eq!((fill["entries"].as_u64(), fill["capacity"].as_u64()), (Some(before as u64), Some(262_144)), "{fill}");
}
