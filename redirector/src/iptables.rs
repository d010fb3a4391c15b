//! The oracle: the osm-init iptables command line for a policy (the exact
//! form of seed 004, plus the dynamic rules osm-injector appends) and a
//! small interpreter of the nat table it builds. The differential kernel
//! test runs these commands for real; the property tests run them through
//! the interpreter against [`crate::policy::evaluate`].
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{anyhow, bail, Context as _, Result};
use ipnet::Ipv4Net;

use crate::policy::{OutboundConn, Policy, Protocol};

/// Inbound ports osm-init never redirects (Prometheus, probe ports).
pub const OSM_INBOUND_RESERVED: [u16; 4] = [15010, 15901, 15902, 15903];
/// Envoy's admin port (the seed's dead ACCEPT rule after REDIRECT).
pub const OSM_ADMIN_PORT: u16 = 15000;
/// `-m multiport` takes at most 15 ports per rule.
const MULTIPORT_MAX: usize = 15;

/// The commands osm-init runs for `policy`, one `iptables …` per element.
pub fn osm_init_commands(policy: &Policy) -> Vec<String> {
    let ipt = |rule: String| format!("iptables -t nat {rule}");
    let mut c: Vec<String> = ["PROXY_INBOUND", "PROXY_IN_REDIRECT", "PROXY_OUTPUT", "PROXY_REDIRECT"]
        .iter()
        .map(|chain| ipt(format!("-N {chain}")))
        .collect();
    c.push(ipt(format!(
        "-A PROXY_REDIRECT -p tcp -j REDIRECT --to-port {}",
        policy.outbound_port
    )));
    c.push(ipt(format!("-A PROXY_REDIRECT -p tcp --dport {OSM_ADMIN_PORT} -j ACCEPT")));
    c.push(ipt("-A OUTPUT -p tcp -j PROXY_OUTPUT".into()));
    c.push(ipt(format!("-A PROXY_OUTPUT -m owner --uid-owner {} -j RETURN", policy.proxy_uid)));
    if let Some(gid) = policy.proxy_gid {
        c.push(ipt(format!("-A PROXY_OUTPUT -m owner --gid-owner {gid} -j RETURN")));
    }
    c.push(ipt("-A PROXY_OUTPUT -d 127.0.0.1/32 -j RETURN".into()));
    if policy.outbound_ip_range_inclusion.is_empty() {
        c.push(ipt("-A PROXY_OUTPUT -j PROXY_REDIRECT".into()));
    } else {
        for net in &policy.outbound_ip_range_inclusion {
            c.push(ipt(format!("-A PROXY_OUTPUT -d {net} -j PROXY_REDIRECT")));
        }
    }
    c.push(ipt(format!(
        "-A PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-port {}",
        policy.inbound_port
    )));
    c.push(ipt("-A PREROUTING -p tcp -j PROXY_INBOUND".into()));
    for port in OSM_INBOUND_RESERVED {
        c.push(ipt(format!("-A PROXY_INBOUND -p tcp --dport {port} -j RETURN")));
    }
    c.push(ipt("-A PROXY_INBOUND -p tcp -j PROXY_IN_REDIRECT".into()));
    for net in &policy.outbound_ip_range_exclusion {
        c.push(ipt(format!("-I PROXY_OUTPUT -d {net} -j RETURN")));
    }
    let ports: Vec<u16> = policy.outbound_port_exclusion.iter().copied().collect();
    for chunk in ports.chunks(MULTIPORT_MAX) {
        c.push(ipt(format!(
            "-I PROXY_OUTPUT -p tcp --match multiport --dports {} -j RETURN",
            join(chunk)
        )));
    }
    let ports: Vec<u16> = policy.inbound_port_exclusion.iter().copied().collect();
    for chunk in ports.chunks(MULTIPORT_MAX) {
        c.push(ipt(format!(
            "-I PROXY_INBOUND -p tcp --match multiport --dports {} -j RETURN",
            join(chunk)
        )));
    }
    c
}

fn join(ports: &[u16]) -> String {
    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

/// The single shell line osm-init's container runs (`sh -c …`).
pub fn osm_init_script(policy: &Policy) -> String {
    osm_init_commands(policy).join(" && ")
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Jump(String),
    Return,
    Accept,
    Redirect(u16),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Rule {
    tcp_only: bool,
    dst: Option<Ipv4Net>,
    dports: Option<Vec<u16>>,
    uid_owner: Option<u32>,
    gid_owner: Option<u32>,
    target: Option<Target>,
}

/// The nat table built by a list of `iptables -t nat …` commands.
#[derive(Debug, Default)]
pub struct NatTable {
    chains: HashMap<String, Vec<Rule>>,
}

/// Outcome for a locally generated packet through nat OUTPUT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatOutcome {
    Redirect(SocketAddrV4),
    Unchanged,
}

impl NatTable {
    pub fn from_commands(commands: &[String]) -> Result<Self> {
        let mut t = NatTable::default();
        for name in ["PREROUTING", "OUTPUT", "INPUT", "POSTROUTING"] {
            t.chains.insert(name.into(), Vec::new());
        }
        for cmd in commands {
            t.apply(cmd).with_context(|| format!("iptables command {cmd:?}"))?;
        }
        Ok(t)
    }

    fn apply(&mut self, cmd: &str) -> Result<()> {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let rest = match words.as_slice() {
            ["iptables", "-t", "nat", rest @ ..] => rest,
            _ => bail!("not an `iptables -t nat` command"),
        };
        let (op, chain, args) = match rest {
            [op, chain, args @ ..] => (*op, chain.to_string(), args),
            _ => bail!("missing operation or chain"),
        };
        match op {
            "-N" => {
                if self.chains.insert(chain.clone(), Vec::new()).is_some() {
                    bail!("chain {chain} already exists");
                }
                Ok(())
            }
            "-A" | "-I" => {
                let rule = parse_rule(args)?;
                if let Some(Target::Jump(to)) = &rule.target {
                    if !self.chains.contains_key(to) {
                        bail!("jump to unknown chain {to}");
                    }
                }
                let rules = self.chains.get_mut(&chain).ok_or_else(|| anyhow!("no chain {chain}"))?;
                if op == "-A" {
                    rules.push(rule);
                } else {
                    rules.insert(0, rule);
                }
                Ok(())
            }
            other => bail!("unsupported operation {other}"),
        }
    }

    /// Walks nat OUTPUT for a connection's first packet.
    pub fn output(&self, conn: &OutboundConn) -> NatOutcome {
        match self.walk("OUTPUT", conn, 0) {
            Some(Walk::Redirect(port)) => {
                NatOutcome::Redirect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
            }
            _ => NatOutcome::Unchanged,
        }
    }

    fn walk(&self, chain: &str, conn: &OutboundConn, depth: usize) -> Option<Walk> {
        assert!(depth < 16, "jump loop");
        for rule in self.chains.get(chain)? {
            if !matches(rule, conn) {
                continue;
            }
            match &rule.target {
                None => continue,
                Some(Target::Return) => return None,
                Some(Target::Accept) => return Some(Walk::Accept),
                Some(Target::Redirect(p)) => return Some(Walk::Redirect(*p)),
                Some(Target::Jump(to)) => {
                    if let Some(w) = self.walk(to, conn, depth + 1) {
                        return Some(w);
                    }
                }
            }
        }
        None
    }
}

enum Walk {
    Accept,
    Redirect(u16),
}

fn matches(rule: &Rule, conn: &OutboundConn) -> bool {
    if rule.tcp_only && conn.protocol != Protocol::Tcp {
        return false;
    }
    if let Some(net) = rule.dst {
        if !net.contains(conn.dst.ip()) {
            return false;
        }
    }
    if let Some(ports) = &rule.dports {
        if !ports.contains(&conn.dst.port()) {
            return false;
        }
    }
    if let Some(uid) = rule.uid_owner {
        if conn.uid != uid {
            return false;
        }
    }
    if let Some(gid) = rule.gid_owner {
        if conn.gid != gid {
            return false;
        }
    }
    true
}

fn parse_rule(args: &[&str]) -> Result<Rule> {
    let mut r = Rule::default();
    let mut i = 0;
    let next = |i: &mut usize| -> Result<&str> {
        *i += 1;
        args.get(*i).copied().ok_or_else(|| anyhow!("missing value after {}", args[*i - 1]))
    };
    while i < args.len() {
        match args[i] {
            "-p" => match next(&mut i)? {
                "tcp" => r.tcp_only = true,
                p => bail!("protocol {p} not modelled"),
            },
            "-d" => r.dst = Some(next(&mut i)?.parse().context("-d")?),
            "--dport" => r.dports = Some(vec![next(&mut i)?.parse().context("--dport")?]),
            "--dports" => {
                r.dports = Some(
                    next(&mut i)?
                        .split(',')
                        .map(|p| p.parse().context("--dports"))
                        .collect::<Result<_>>()?,
                )
            }
            "-m" | "--match" => match next(&mut i)? {
                "owner" | "multiport" => {}
                m => bail!("match {m} not modelled"),
            },
            "--uid-owner" => r.uid_owner = Some(next(&mut i)?.parse().context("--uid-owner")?),
            "--gid-owner" => r.gid_owner = Some(next(&mut i)?.parse().context("--gid-owner")?),
            "-j" => {
                r.target = Some(match next(&mut i)? {
                    "RETURN" => Target::Return,
                    "ACCEPT" => Target::Accept,
                    "REDIRECT" => Target::Redirect(0),
                    chain => Target::Jump(chain.to_string()),
                })
            }
            "--to-port" | "--to-ports" => {
                let p = next(&mut i)?.parse().context("--to-port")?;
                r.target = Some(Target::Redirect(p));
            }
            other => bail!("option {other} not modelled"),
        }
        i += 1;
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::{parse_config, MeshConfig, WorkloadAnnotations},
        policy::{compile, evaluate, Verdict},
    };

    /// The osm-init argument line of seed 004 (OSM v1.0 demo `curl` pod),
    /// verbatim; its one dynamic rule excludes 54.91.118.50/32.
    const SEED_004: &str = include_str!("../tests/fixtures/osm-init-seed-004.txt");

    #[test]
    fn reproduces_the_seed_command_line_exactly() {
        let mesh = MeshConfig {
            outbound_ip_range_exclusion: vec!["54.91.118.50/32".parse().unwrap()],
            ..MeshConfig::default()
        };
        let p = compile(&mesh, &WorkloadAnnotations::default());
        assert_eq!(osm_init_script(&p), SEED_004.trim());
    }

    #[test]
    fn interpreter_runs_the_seed_rules() {
        let cmds: Vec<String> = SEED_004.trim().split(" && ").map(str::to_owned).collect();
        let t = NatTable::from_commands(&cmds).unwrap();
        let c = |uid, dst: &str| OutboundConn {
            protocol: Protocol::Tcp,
            uid,
            gid: uid,
            dst: dst.parse().unwrap(),
        };
        let proxy = NatOutcome::Redirect("127.0.0.1:15001".parse().unwrap());
        assert_eq!(t.output(&c(0, "192.0.2.1:80")), proxy);
        assert_eq!(t.output(&c(0, "192.0.2.1:15000")), proxy);
        assert_eq!(t.output(&c(1500, "192.0.2.1:80")), NatOutcome::Unchanged);
        assert_eq!(t.output(&c(0, "127.0.0.1:80")), NatOutcome::Unchanged);
        assert_eq!(t.output(&c(0, "54.91.118.50:443")), NatOutcome::Unchanged);
        let udp = OutboundConn { protocol: Protocol::Udp, ..c(0, "192.0.2.1:53") };
        assert_eq!(t.output(&udp), NatOutcome::Unchanged);
    }

    #[test]
    fn multiport_rules_are_chunked() {
        let mesh = MeshConfig {
            outbound_port_exclusion: (1000..1040).collect(),
            ..MeshConfig::default()
        };
        let p = compile(&mesh, &WorkloadAnnotations::default());
        let cmds = osm_init_commands(&p);
        assert_eq!(cmds.iter().filter(|c| c.contains("--dports")).count(), 3);
    }

    #[test]
    fn inclusion_rules_replace_the_catch_all() {
        let c = parse_config(
            "mesh:\n  outboundIPRangeInclusionList: [\"192.0.2.0/24\"]\nworkloads:\n  - name: a\n    netns: /x\n",
        )
        .unwrap();
        let p = compile(&c.mesh, &c.workloads[0].annotations);
        let s = osm_init_script(&p);
        assert!(s.contains("-A PROXY_OUTPUT -d 192.0.2.0/24 -j PROXY_REDIRECT"));
        assert!(!s.contains("-A PROXY_OUTPUT -j PROXY_REDIRECT"));
        let t = NatTable::from_commands(&osm_init_commands(&p)).unwrap();
        let conn = |dst: &str| OutboundConn {
            protocol: Protocol::Tcp,
            uid: 0,
            gid: 0,
            dst: dst.parse().unwrap(),
        };
        assert!(matches!(t.output(&conn("192.0.2.9:80")), NatOutcome::Redirect(_)));
        assert_eq!(t.output(&conn("198.51.100.9:80")), NatOutcome::Unchanged);
        assert!(matches!(evaluate(&p, &conn("192.0.2.9:80")), Verdict::Redirect(_)));
    }
}

/// Property tests: for random policies and connections, the osm-init rule
/// set (run through the nat interpreter), the policy evaluator and the map
/// encoding all agree.
#[cfg(test)]
mod properties {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::{
        config::{osm_annotations, parse_annotations, MeshConfig, WorkloadAnnotations},
        policy::{compile, evaluate, evaluate_entries, map_entries, Verdict},
    };

    const BASES: [[u8; 4]; 5] = [[192, 0, 2, 0], [198, 51, 100, 0], [203, 0, 113, 0], [198, 18, 0, 0], [127, 0, 0, 0]];
    const PORTS: [u16; 8] = [22, 80, 443, 6379, 7070, 15000, 15001, 65535];

    fn addr() -> impl Strategy<Value = Ipv4Addr> {
        (0..BASES.len(), any::<u8>()).prop_map(|(b, low)| {
            let o = BASES[b];
            Ipv4Addr::new(o[0], o[1], o[2], low)
        })
    }

    fn net() -> impl Strategy<Value = Ipv4Net> {
        (addr(), 0u8..=32).prop_map(|(a, len)| Ipv4Net::new(a, len).unwrap().trunc())
    }

    fn ports() -> impl Strategy<Value = Vec<u16>> {
        prop::collection::vec(prop::sample::select(PORTS.to_vec()), 0..4)
    }

    fn lists() -> impl Strategy<Value = WorkloadAnnotations> {
        (ports(), prop::collection::vec(net(), 0..3), prop::collection::vec(net(), 0..3), ports()).prop_map(
            |(op, ex, inc, ip)| WorkloadAnnotations {
                outbound_port_exclusion: op,
                outbound_ip_range_exclusion: ex,
                outbound_ip_range_inclusion: inc,
                inbound_port_exclusion: ip,
            },
        )
    }

    fn policy() -> impl Strategy<Value = Policy> {
        (lists(), lists(), prop::sample::select(vec![1500u32, 1337]), prop::option::of(Just(1337u32)))
            .prop_map(|(mesh, pod, uid, gid)| {
                let mesh = MeshConfig {
                    proxy_uid: uid,
                    proxy_gid: gid,
                    outbound_ip_range_exclusion: mesh.outbound_ip_range_exclusion,
                    outbound_ip_range_inclusion: mesh.outbound_ip_range_inclusion,
                    outbound_port_exclusion: mesh.outbound_port_exclusion,
                    inbound_port_exclusion: mesh.inbound_port_exclusion,
                    ..MeshConfig::default()
                };
                compile(&mesh, &pod)
            })
    }

    fn conn() -> impl Strategy<Value = OutboundConn> {
        (
            prop::bool::weighted(0.9),
            prop::sample::select(vec![0u32, 1000, 1337, 1500]),
            prop::sample::select(vec![0u32, 1000, 1337]),
            prop_oneof![addr(), Just(Ipv4Addr::LOCALHOST)],
            prop::sample::select(PORTS.to_vec()),
        )
            .prop_map(|(tcp, uid, gid, ip, port)| OutboundConn {
                protocol: if tcp { Protocol::Tcp } else { Protocol::Udp },
                uid,
                gid,
                dst: SocketAddrV4::new(ip, port),
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn osm_init_rules_policy_and_maps_agree(p in policy(), c in conn(), id in 1u32..u32::MAX) {
            let table = NatTable::from_commands(&osm_init_commands(&p)).unwrap();
            let oracle = table.output(&c);
            let verdict = evaluate(&p, &c);
            match (oracle, verdict) {
                (NatOutcome::Redirect(a), Verdict::Redirect(b)) => prop_assert_eq!(a, b),
                (NatOutcome::Unchanged, Verdict::Pass(_)) => {}
                (o, v) => prop_assert!(false, "iptables {:?} but policy {:?}", o, v),
            }
            prop_assert_eq!(evaluate_entries(&map_entries(&p, id), &c), verdict);
        }

        #[test]
        fn annotation_parser_never_panics(s in ".{0,40}") {
            let mut a = BTreeMap::new();
            for k in osm_annotations::ALL {
                a.insert(k.to_string(), s.clone());
            }
            let _ = parse_annotations(&a);
        }

        #[test]
        fn port_lists_round_trip(ps in prop::collection::vec(1u16..=65535, 0..20)) {
            let mut a = BTreeMap::new();
            let text = ps.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
            a.insert(osm_annotations::OUTBOUND_PORT_EXCLUSION.to_string(), text);
            prop_assert_eq!(parse_annotations(&a).unwrap().outbound_port_exclusion, ps);
        }
    }
}
