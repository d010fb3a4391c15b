//! Ports, port ranges, CIDRs and the comma-separated lists of them. The
//! whole input is tried as one port, one CIDR, and as each dialect's port,
//! port-range and CIDR list. Checks: errors are errors and quote the
//! value; a port is accepted exactly when the trimmed text is an integer
//! in 1-65535; a CIDR prints back to itself, is canonical and contains the
//! address that was written; a list has one entry per item (a range `a-b`
//! b-a+1); each parsed net, written into the trie alone, matches exactly
//! its own addresses.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use redirector_common::cidr_kind;
use redirector_fuzz::{check_nets, fixed_addresses, in_nets, probes, trie_hit};
use redirector_policy::{
    cidr_entries, linkerd_annotations, osm_annotations, parse_annotations, parse_cidr, parse_port, Preset,
};

fn one(preset: Preset, key: &str, value: &str) -> anyhow::Result<redirector_policy::WorkloadAnnotations> {
    parse_annotations(preset, &BTreeMap::from([(key.to_string(), value.to_string())]))
}

fn items(value: &str) -> Vec<&str> {
    if value.trim().is_empty() {
        Vec::new()
    } else {
        value.split(',').map(str::trim).collect()
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };

    // One port.
    let want = s.trim().parse::<i64>().ok().filter(|v| (1..=65535).contains(v));
    match parse_port(s) {
        Ok(p) => {
            assert_eq!(Some(i64::from(p)), want, "{s:?} accepted as {p}");
            assert_eq!(parse_port(&p.to_string()).unwrap(), p);
        }
        Err(e) => {
            assert_eq!(want, None, "{s:?} refused: {e:#}");
            assert!(format!("{e:#}").contains(&format!("{s:?}")), "the error does not quote the value: {e:#}");
        }
    }

    // One CIDR.
    match parse_cidr(s) {
        Ok(n) => {
            check_nets("parse_cidr", &[n]);
            assert_eq!(parse_cidr(&n.to_string()).unwrap(), n);
            let t = s.trim();
            let written = t.split_once('/').map_or(t, |(a, _)| a);
            let ip: IpAddr = written.parse().unwrap_or_else(|_| panic!("{s:?} accepted without an address"));
            // An IPv4 range holds the address (also written IPv4-mapped); an
            // IPv6 range holds it as an IPv6 address (a range like `::/32`
            // covers the mapped block but never matches IPv4, see
            // `policy::cidr_entries`).
            let holds = match (n, ip) {
                (IpNet::V6(n6), IpAddr::V6(a)) => n6.contains(&a),
                (IpNet::V6(_), IpAddr::V4(_)) => false,
                (IpNet::V4(_), _) => in_nets(&BTreeSet::from([n]), ip),
            };
            assert!(holds, "{s:?} parsed as {n}, which does not hold {ip}");
            // The net alone in the trie matches exactly its addresses.
            let e = cidr_entries(3, cidr_kind::OUTBOUND_EXCLUDE, &n);
            for a in probes(&n).into_iter().chain(fixed_addresses()).chain([ip]) {
                assert_eq!(
                    trie_hit(&e, 3, cidr_kind::OUTBOUND_EXCLUDE, a),
                    in_nets(&BTreeSet::from([n]), a),
                    "{n}: address {a} in the trie"
                );
            }
        }
        Err(e) => assert!(format!("{e:#}").contains(&format!("{s:?}")), "the error does not quote the value: {e:#}"),
    }

    // Lists, with an error for the first bad item.
    let its = items(s);
    match one(Preset::Osm, osm_annotations::OUTBOUND_PORT_EXCLUSION, s) {
        Ok(a) => {
            assert_eq!(a.outbound_port_exclusion.len(), its.len());
            for (p, it) in a.outbound_port_exclusion.iter().zip(&its) {
                assert_eq!(parse_port(it).unwrap(), *p);
            }
        }
        Err(_) => assert!(its.iter().any(|it| parse_port(it).is_err())),
    }
    match one(Preset::Osm, osm_annotations::OUTBOUND_IP_RANGE_EXCLUSION, s) {
        Ok(a) => {
            let nets: Vec<IpNet> = its.iter().map(|it| parse_cidr(it).unwrap()).collect();
            assert_eq!(a.outbound_ip_range_exclusion, nets);
        }
        Err(_) => assert!(its.iter().any(|it| parse_cidr(it).is_err())),
    }
    match one(Preset::Linkerd, linkerd_annotations::SKIP_INBOUND_PORTS, s) {
        Ok(a) => {
            let mut want = Vec::new();
            for it in &its {
                match it.split_once('-') {
                    Some((x, y)) => want.extend(parse_port(x).unwrap()..=parse_port(y).unwrap()),
                    None => want.push(parse_port(it).unwrap()),
                }
            }
            let set: BTreeSet<u16> = want.iter().copied().collect();
            let got: BTreeSet<u16> = a.inbound_port_exclusion.iter().copied().collect();
            assert_eq!(got, set, "ranges {s:?}");
        }
        Err(e) => {
            let t = format!("{e:#}");
            assert!(t.contains(linkerd_annotations::SKIP_INBOUND_PORTS), "{t}");
        }
    }
});
