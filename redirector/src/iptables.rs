//! The oracle: the osm-init iptables command line for a policy (the exact
//! form of seed 004, plus the dynamic rules osm-injector appends) and a
//! small interpreter of the nat table it builds. The differential kernel
//! test runs these commands for real; the property tests run them through
//! the interpreter against [`crate::policy::evaluate`].
use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
};

use anyhow::{anyhow, bail, Context as _, Result};
use ipnet::{IpNet, Ipv4Net};

use crate::policy::{OutboundConn, Policy, Protocol};

/// osm-init programs IPv4 only (no ip6tables).
fn v4_nets<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> Vec<Ipv4Net> {
    nets.into_iter()
        .filter_map(|n| match n {
            IpNet::V4(v4) => Some(*v4),
            IpNet::V6(_) => None,
        })
        .collect()
}

/// osm-healthcheck's port (seed 000), reserved by our OSM preset but not
/// part of seed 004's static rules.
pub const OSM_HEALTHCHECK_PORT: u16 = 15904;

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
    c.push(ipt(format!("-A PROXY_REDIRECT -p tcp -j REDIRECT --to-port {}", policy.outbound_port)));
    c.push(ipt(format!("-A PROXY_REDIRECT -p tcp --dport {OSM_ADMIN_PORT} -j ACCEPT")));
    c.push(ipt("-A OUTPUT -p tcp -j PROXY_OUTPUT".into()));
    c.push(ipt(format!("-A PROXY_OUTPUT -m owner --uid-owner {} -j RETURN", policy.proxy_uid)));
    if let Some(gid) = policy.proxy_gid {
        c.push(ipt(format!("-A PROXY_OUTPUT -m owner --gid-owner {gid} -j RETURN")));
    }
    c.push(ipt("-A PROXY_OUTPUT -d 127.0.0.1/32 -j RETURN".into()));
    match &policy.outbound_ip_range_inclusion {
        None => c.push(ipt("-A PROXY_OUTPUT -j PROXY_REDIRECT".into())),
        Some(nets) => {
            for net in v4_nets(nets) {
                c.push(ipt(format!("-A PROXY_OUTPUT -d {net} -j PROXY_REDIRECT")));
            }
        }
    }
    c.push(ipt(format!("-A PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-port {}", policy.inbound_port)));
    c.push(ipt("-A PREROUTING -p tcp -j PROXY_INBOUND".into()));
    for port in OSM_INBOUND_RESERVED {
        c.push(ipt(format!("-A PROXY_INBOUND -p tcp --dport {port} -j RETURN")));
    }
    c.push(ipt("-A PROXY_INBOUND -p tcp -j PROXY_IN_REDIRECT".into()));
    for net in v4_nets(&policy.outbound_ip_range_exclusion) {
        c.push(ipt(format!("-I PROXY_OUTPUT -d {net} -j RETURN")));
    }
    let ports: Vec<u16> = policy.outbound_port_exclusion.iter().copied().collect();
    for chunk in ports.chunks(MULTIPORT_MAX) {
        c.push(ipt(format!("-I PROXY_OUTPUT -p tcp --match multiport --dports {} -j RETURN", join(chunk))));
    }
    // The reserved ports are static rules above (15904 is ours, not seed 004's).
    let ports: Vec<u16> = policy
        .inbound_port_exclusion
        .iter()
        .copied()
        .filter(|p| !OSM_INBOUND_RESERVED.contains(p) && *p != OSM_HEALTHCHECK_PORT)
        .collect();
    for chunk in ports.chunks(MULTIPORT_MAX) {
        c.push(ipt(format!("-I PROXY_INBOUND -p tcp --match multiport --dports {} -j RETURN", join(chunk))));
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

/// The options of istio-iptables (seed 001) that shape the nat table in
/// REDIRECT mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IstioOptions {
    /// -p
    pub proxy_port: u16,
    /// -z
    pub inbound_capture_port: u16,
    /// -u
    pub proxy_uid: u32,
    /// -g (defaults to the uid)
    pub proxy_gid: u32,
    /// -b: None is `*`.
    pub inbound_ports_include: Option<Vec<u16>>,
    /// -d
    pub inbound_ports_exclude: Vec<u16>,
    /// -o
    pub outbound_ports_exclude: Vec<u16>,
    /// -i: None is `*`.
    pub ipv4_ranges_include: Option<Vec<Ipv4Net>>,
    /// -x
    pub ipv4_ranges_exclude: Vec<Ipv4Net>,
}

impl IstioOptions {
    /// The command line istio-injector would write for `policy` (the
    /// istio preset: 22 is built into istio-iptables, the rest is `-d`).
    pub fn from_policy(policy: &Policy) -> Self {
        Self {
            proxy_port: policy.outbound_port,
            inbound_capture_port: policy.inbound_port,
            proxy_uid: policy.proxy_uid,
            proxy_gid: policy.proxy_gid.unwrap_or(policy.proxy_uid),
            inbound_ports_include: policy.inbound_port_inclusion.as_ref().map(|s| s.iter().copied().collect()),
            inbound_ports_exclude: policy.inbound_port_exclusion.iter().copied().filter(|p| *p != 22).collect(),
            outbound_ports_exclude: policy.outbound_port_exclusion.iter().copied().collect(),
            ipv4_ranges_include: policy.outbound_ip_range_inclusion.as_ref().map(v4_nets),
            ipv4_ranges_exclude: v4_nets(&policy.outbound_ip_range_exclusion),
        }
    }
}

/// The nat table istio-iptables builds, as `iptables -t nat -S` lists it
/// (the form seed 001 shows).
pub fn istio_nat_listing(o: &IstioOptions) -> Vec<String> {
    let mut l: Vec<String> =
        ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"].iter().map(|c| format!("-P {c} ACCEPT")).collect();
    for c in ["ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT"] {
        l.push(format!("-N {c}"));
    }
    l.push("-A PREROUTING -p tcp -j ISTIO_INBOUND".into());
    l.push("-A OUTPUT -p tcp -j ISTIO_OUTPUT".into());
    match &o.inbound_ports_include {
        None => {
            l.push("-A ISTIO_INBOUND -p tcp -m tcp --dport 22 -j RETURN".into());
            for p in &o.inbound_ports_exclude {
                l.push(format!("-A ISTIO_INBOUND -p tcp -m tcp --dport {p} -j RETURN"));
            }
            l.push("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT".into());
        }
        Some(ports) => {
            for p in ports {
                l.push(format!("-A ISTIO_INBOUND -p tcp -m tcp --dport {p} -j ISTIO_IN_REDIRECT"));
            }
        }
    }
    // (seed 001 sends a listed-ports inbound capture to -p; modern
    // istio-iptables and redirector use -z in both modes)
    l.push(format!("-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}", o.inbound_capture_port));
    for p in &o.outbound_ports_exclude {
        l.push(format!("-A ISTIO_OUTPUT -p tcp -m tcp --dport {p} -j RETURN"));
    }
    l.push("-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN".into());
    l.push("-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ISTIO_IN_REDIRECT".into());
    l.push(format!("-A ISTIO_OUTPUT -m owner --uid-owner {} -j RETURN", o.proxy_uid));
    l.push(format!("-A ISTIO_OUTPUT -m owner --gid-owner {} -j RETURN", o.proxy_gid));
    l.push("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN".into());
    for net in &o.ipv4_ranges_exclude {
        l.push(format!("-A ISTIO_OUTPUT -d {net} -j RETURN"));
    }
    match &o.ipv4_ranges_include {
        None => l.push("-A ISTIO_OUTPUT -j ISTIO_REDIRECT".into()),
        Some(nets) => {
            for net in nets {
                l.push(format!("-A ISTIO_OUTPUT -d {net} -j ISTIO_REDIRECT"));
            }
        }
    }
    l.push(format!("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {}", o.proxy_port));
    l
}

/// linkerd2-proxy-init's nat rules for `p` (its "IPTables Reference" and
/// `FirewallConfiguration`: ignored ports in multiport chunks of 15,
/// `--subnets-to-ignore` as `-s` RETURNs, proxy UID, `-o lo` RETURN), as
/// `iptables -t nat` commands. Linkerd has no outbound IP lists and no
/// inclusion lists; those fields of `p` must be empty.
pub fn linkerd_commands(p: &Policy) -> Vec<String> {
    let mut v = vec!["-N PROXY_INIT_REDIRECT".to_string()];
    for chunk in p.inbound_port_exclusion.iter().copied().collect::<Vec<_>>().chunks(15) {
        v.push(format!("-A PROXY_INIT_REDIRECT -p tcp --match multiport --dports {} -j RETURN", join(chunk)));
    }
    for net in v4_nets(&p.inbound_source_exclusion) {
        v.push(format!("-A PROXY_INIT_REDIRECT -j RETURN -s {net}"));
    }
    v.push(format!("-A PROXY_INIT_REDIRECT -p tcp -j REDIRECT --to-port {}", p.inbound_port));
    v.push("-A PREROUTING -j PROXY_INIT_REDIRECT".into());
    v.push("-N PROXY_INIT_OUTPUT".into());
    v.push(format!("-A PROXY_INIT_OUTPUT -m owner --uid-owner {} -j RETURN", p.proxy_uid));
    v.push("-A PROXY_INIT_OUTPUT -o lo -j RETURN".into());
    for chunk in p.outbound_port_exclusion.iter().copied().collect::<Vec<_>>().chunks(15) {
        v.push(format!("-A PROXY_INIT_OUTPUT -p tcp --match multiport --dports {} -j RETURN", join(chunk)));
    }
    v.push(format!("-A PROXY_INIT_OUTPUT -p tcp -j REDIRECT --to-port {}", p.outbound_port));
    v.push("-A OUTPUT -j PROXY_INIT_OUTPUT".into());
    v.into_iter().map(|r| format!("iptables -t nat {r}")).collect()
}

/// Kuma's transparent-proxy nat rules for `p` (kuma's iptables builder,
/// IPv4, DNS redirection off): outbound IP exclusions in OUTPUT, the
/// 127.0.0.6 passthrough, only kuma-dp's loopback connections to the
/// inbound chain, everyone else's loopback returned. Kuma has no outbound
/// inclusion lists; those fields of `p` must be empty.
pub fn kuma_commands(p: &Policy) -> Vec<String> {
    let uid = p.proxy_uid;
    let mut v: Vec<String> =
        ["KUMA_MESH_INBOUND", "KUMA_MESH_OUTBOUND", "KUMA_MESH_INBOUND_REDIRECT", "KUMA_MESH_OUTBOUND_REDIRECT"]
            .iter()
            .map(|c| format!("-N {c}"))
            .collect();
    for net in v4_nets(&p.outbound_ip_range_exclusion) {
        v.push(format!("-A OUTPUT -d {net} -j RETURN"));
    }
    v.push("-A OUTPUT -p tcp -j KUMA_MESH_OUTBOUND".into());
    v.push("-A PREROUTING -p tcp -j KUMA_MESH_INBOUND".into());
    for net in v4_nets(&p.inbound_source_exclusion) {
        v.push(format!("-A KUMA_MESH_INBOUND -s {net} -j RETURN"));
    }
    for port in &p.inbound_port_exclusion {
        v.push(format!("-A KUMA_MESH_INBOUND -p tcp --dport {port} -j RETURN"));
    }
    v.push("-A KUMA_MESH_INBOUND -p tcp -j KUMA_MESH_INBOUND_REDIRECT".into());
    for port in &p.outbound_port_exclusion {
        v.push(format!("-A KUMA_MESH_OUTBOUND -p tcp --dport {port} -j RETURN"));
    }
    v.push("-A KUMA_MESH_OUTBOUND -s 127.0.0.6/32 -o lo -j RETURN".into());
    v.push(format!(
        "-A KUMA_MESH_OUTBOUND -p tcp -o lo ! -d 127.0.0.1/32 -m owner --uid-owner {uid} -j KUMA_MESH_INBOUND_REDIRECT"
    ));
    v.push(format!("-A KUMA_MESH_OUTBOUND -p tcp -o lo -m owner ! --uid-owner {uid} -j RETURN"));
    v.push(format!("-A KUMA_MESH_OUTBOUND -m owner --uid-owner {uid} -j RETURN"));
    v.push("-A KUMA_MESH_OUTBOUND -d 127.0.0.1/32 -j RETURN".into());
    v.push("-A KUMA_MESH_OUTBOUND -j KUMA_MESH_OUTBOUND_REDIRECT".into());
    v.push(format!("-A KUMA_MESH_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports {}", p.inbound_port));
    v.push(format!("-A KUMA_MESH_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports {}", p.outbound_port));
    v.into_iter().map(|r| format!("iptables -t nat {r}")).collect()
}

/// The rule set the mesh's own init container would program for `p`.
pub fn oracle_commands(preset: crate::config::Preset, p: &Policy) -> Vec<String> {
    use crate::config::Preset;
    match preset {
        Preset::Osm => osm_init_commands(p),
        Preset::Istio => listing_to_commands(&istio_nat_listing(&IstioOptions::from_policy(p))),
        Preset::Linkerd => linkerd_commands(p),
        Preset::Kuma => kuma_commands(p),
    }
}

/// `iptables -t nat …` commands that build `listing` (policies skipped).
pub fn listing_to_commands(listing: &[String]) -> Vec<String> {
    listing.iter().filter(|r| !r.starts_with("-P ")).map(|r| format!("iptables -t nat {r}")).collect()
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
    /// `! -d`
    dst_negated: bool,
    src: Option<Ipv4Net>,
    /// `-o lo`
    out_lo: bool,
    dports: Option<Vec<u16>>,
    uid_owner: Option<u32>,
    /// `! --uid-owner`
    uid_negated: bool,
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

    /// Walks nat OUTPUT for a connection's first packet. `local` are the
    /// workload's own addresses (a route through `lo`).
    pub fn output(&self, conn: &OutboundConn, local: &BTreeSet<IpAddr>) -> NatOutcome {
        match self.walk("OUTPUT", conn, local, 0) {
            Some(Walk::Redirect(port)) => NatOutcome::Redirect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
            _ => NatOutcome::Unchanged,
        }
    }

    /// Walks nat PREROUTING for an inbound connection's first packet
    /// (REDIRECT keeps the address and changes the port).
    pub fn prerouting(&self, src: Ipv4Addr, dst: SocketAddrV4) -> NatOutcome {
        let conn = OutboundConn { src: Some(IpAddr::V4(src)), ..OutboundConn::tcp(u32::MAX, SocketAddr::V4(dst)) };
        match self.walk("PREROUTING", &conn, &BTreeSet::new(), 0) {
            Some(Walk::Redirect(port)) => NatOutcome::Redirect(SocketAddrV4::new(*dst.ip(), port)),
            _ => NatOutcome::Unchanged,
        }
    }

    fn walk(&self, chain: &str, conn: &OutboundConn, local: &BTreeSet<IpAddr>, depth: usize) -> Option<Walk> {
        assert!(depth < 16, "jump loop");
        for rule in self.chains.get(chain)? {
            if !matches(rule, conn, local) {
                continue;
            }
            match &rule.target {
                None => continue,
                Some(Target::Return) => return None,
                Some(Target::Accept) => return Some(Walk::Accept),
                Some(Target::Redirect(p)) => return Some(Walk::Redirect(*p)),
                Some(Target::Jump(to)) => {
                    if let Some(w) = self.walk(to, conn, local, depth + 1) {
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

fn matches(rule: &Rule, conn: &OutboundConn, local: &BTreeSet<IpAddr>) -> bool {
    if rule.tcp_only && conn.protocol != Protocol::Tcp {
        return false;
    }
    let dst = match conn.dst.ip() {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4,
            // The IPv4 table never sees IPv6 packets.
            None => return false,
        },
    };
    if let Some(net) = rule.dst {
        if net.contains(&dst) == rule.dst_negated {
            return false;
        }
    }
    if let Some(net) = rule.src {
        let src = match conn.src {
            Some(IpAddr::V4(v4)) => v4,
            // A dual-stack socket bound to ::ffff:a.b.c.d sends IPv4
            // packets from a.b.c.d.
            Some(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => v6.to_ipv4_mapped().expect("mapped"),
            // Unbound: the kernel picks the source; for a local route that
            // is the route's preferred source (127.0.0.1 for 127/8) or the
            // destination itself.
            _ if dst.is_loopback() => Ipv4Addr::LOCALHOST,
            _ => dst,
        };
        if !net.contains(&src) {
            return false;
        }
    }
    if rule.out_lo && !(dst.is_loopback() || local.contains(&IpAddr::V4(dst))) {
        return false;
    }
    if let Some(ports) = &rule.dports {
        if !ports.contains(&conn.dst.port()) {
            return false;
        }
    }
    if let Some(uid) = rule.uid_owner {
        if (conn.uid == uid) == rule.uid_negated {
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
            "!" => match next(&mut i)? {
                "-d" => {
                    r.dst = Some(next(&mut i)?.parse().context("! -d")?);
                    r.dst_negated = true;
                }
                "--uid-owner" => {
                    r.uid_owner = Some(next(&mut i)?.parse().context("! --uid-owner")?);
                    r.uid_negated = true;
                }
                o => bail!("negation of {o} not modelled"),
            },
            "-d" => r.dst = Some(next(&mut i)?.parse().context("-d")?),
            "-s" => r.src = Some(next(&mut i)?.parse().context("-s")?),
            "-o" => match next(&mut i)? {
                "lo" => r.out_lo = true,
                o => bail!("output interface {o} not modelled"),
            },
            "--dport" => r.dports = Some(vec![next(&mut i)?.parse().context("--dport")?]),
            "--dports" => {
                r.dports = Some(next(&mut i)?.split(',').map(|p| p.parse().context("--dports")).collect::<Result<_>>()?)
            }
            "-m" | "--match" => match next(&mut i)? {
                "owner" | "multiport" | "tcp" => {}
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

    /// The client of the inbound cases (the peer namespace's address).
    const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
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
        let c = |uid, dst: &str| OutboundConn::tcp(uid, dst.parse().unwrap());
        let none = BTreeSet::new();
        let proxy = NatOutcome::Redirect("127.0.0.1:15001".parse().unwrap());
        assert_eq!(t.output(&c(0, "192.0.2.1:80"), &none), proxy);
        assert_eq!(t.output(&c(0, "192.0.2.1:15000"), &none), proxy);
        assert_eq!(t.output(&c(1500, "192.0.2.1:80"), &none), NatOutcome::Unchanged);
        assert_eq!(t.output(&c(0, "127.0.0.1:80"), &none), NatOutcome::Unchanged);
        assert_eq!(t.output(&c(0, "54.91.118.50:443"), &none), NatOutcome::Unchanged);
        let udp = OutboundConn { protocol: Protocol::Udp, ..c(0, "192.0.2.1:53") };
        assert_eq!(t.output(&udp, &none), NatOutcome::Unchanged);
        let inbound = |d: &str| t.prerouting(PEER, d.parse().unwrap());
        assert_eq!(inbound("198.18.0.1:8080"), NatOutcome::Redirect("198.18.0.1:15003".parse().unwrap()));
        for reserved in OSM_INBOUND_RESERVED {
            assert_eq!(inbound(&format!("198.18.0.1:{reserved}")), NatOutcome::Unchanged);
        }
    }

    /// seed 001's `iptables -t nat -S` after
    /// `istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i * -x "" -b * -d 15020`.
    const SEED_001: &str = include_str!("../tests/fixtures/istio-iptables-seed-001.txt");

    fn seed_001_options() -> IstioOptions {
        IstioOptions {
            proxy_port: 15001,
            inbound_capture_port: 15006,
            proxy_uid: 1337,
            proxy_gid: 1337,
            inbound_ports_include: None,
            inbound_ports_exclude: vec![15020],
            outbound_ports_exclude: vec![],
            ipv4_ranges_include: None,
            ipv4_ranges_exclude: vec![],
        }
    }

    #[test]
    fn reproduces_the_istio_seed_listing_exactly() {
        let want: Vec<String> = SEED_001.lines().map(str::to_owned).collect();
        assert_eq!(istio_nat_listing(&seed_001_options()), want);
    }

    #[test]
    fn istio_seed_traffic_types() {
        // The six traffic types of seed 002 under the seed 001 rules.
        let t = NatTable::from_commands(&listing_to_commands(&istio_nat_listing(&seed_001_options()))).unwrap();
        let pod: BTreeSet<IpAddr> = ["198.18.0.1".parse().unwrap()].into();
        let c = |uid, dst: &str| OutboundConn::tcp(uid, dst.parse().unwrap());
        let outbound = NatOutcome::Redirect("127.0.0.1:15001".parse().unwrap());
        let inbound = NatOutcome::Redirect("127.0.0.1:15006".parse().unwrap());
        // 1: remote pod -> local pod: PREROUTING to 15006; Envoy then
        //    reaches the app from 127.0.0.6 (RULE 1).
        assert_eq!(
            t.prerouting(PEER, "198.18.0.1:8080".parse().unwrap()),
            NatOutcome::Redirect("198.18.0.1:15006".parse().unwrap())
        );
        let from_passthrough = OutboundConn { src: Some("127.0.0.6".parse().unwrap()), ..c(1337, "198.18.0.1:8080") };
        assert_eq!(t.output(&from_passthrough, &pod), NatOutcome::Unchanged);
        // 2: local pod -> remote pod: app to 15001, Envoy out untouched.
        assert_eq!(t.output(&c(1000, "192.0.2.10:80"), &pod), outbound);
        assert_eq!(t.output(&c(1337, "192.0.2.10:80"), &pod), NatOutcome::Unchanged);
        // 3: Prometheus -> the excluded port.
        assert_eq!(t.prerouting(PEER, "198.18.0.1:15020".parse().unwrap()), NatOutcome::Unchanged);
        assert_eq!(t.prerouting(PEER, "198.18.0.1:22".parse().unwrap()), NatOutcome::Unchanged);
        // 4: local pod -> local pod through its service: app to 15001,
        //    Envoy's upstream (own pod IP) to 15006, then 127.0.0.6.
        assert_eq!(t.output(&c(1337, "198.18.0.1:8080"), &pod), inbound);
        // 5: Envoy's own loopback traffic.
        assert_eq!(t.output(&c(1337, "127.0.0.1:15000"), &pod), NatOutcome::Unchanged);
        // 6: sidecar -> istiod.
        assert_eq!(t.output(&c(1337, "192.0.2.20:15012"), &pod), NatOutcome::Unchanged);
    }

    /// Fuzz finding (policy_compiler, 2026-11-23): the interpreter took a
    /// socket bound to ::ffff:127.0.0.6 for an unbound one, so Istio's
    /// `-s 127.0.0.6/32 -o lo -j RETURN` missed it and the oracle sent the
    /// connection to the inbound listener, where the evaluator (and
    /// connect6, which compares the mapped form) let it pass.
    #[test]
    fn mapped_passthrough_source_matches_the_127_0_0_6_rule() {
        let t = NatTable::from_commands(&listing_to_commands(&istio_nat_listing(&seed_001_options()))).unwrap();
        let pod: BTreeSet<IpAddr> = ["198.18.0.1".parse().unwrap()].into();
        for src in ["127.0.0.6", "::ffff:127.0.0.6"] {
            let c = OutboundConn {
                src: Some(src.parse().unwrap()),
                ..OutboundConn::tcp(1000, "127.255.255.255:15001".parse().unwrap())
            };
            assert_eq!(t.output(&c, &pod), NatOutcome::Unchanged, "{src}");
        }
    }

    #[test]
    fn multiport_rules_are_chunked() {
        let mesh = MeshConfig { outbound_port_exclusion: (1000..1040).collect(), ..MeshConfig::default() };
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
        let conn = |dst: &str| OutboundConn::tcp(0, dst.parse().unwrap());
        let none = BTreeSet::new();
        assert!(matches!(t.output(&conn("192.0.2.9:80"), &none), NatOutcome::Redirect(_)));
        assert_eq!(t.output(&conn("198.51.100.9:80"), &none), NatOutcome::Unchanged);
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
        config::{osm_annotations, parse_annotations, MeshConfig, Preset, WorkloadAnnotations},
        policy::{compile, evaluate, evaluate_entries, evaluate_inbound, map_entries, InboundConn, Verdict},
    };

    const POD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

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

    /// Random lists, limited to what `preset`'s own init container can
    /// express (Linkerd: no outbound IP lists; Linkerd/Kuma: no inclusion
    /// lists; OSM/Istio: no inbound source exclusions).
    fn lists(preset: Preset) -> impl Strategy<Value = WorkloadAnnotations> {
        let nets = || prop::collection::vec(net(), 0..3);
        (ports(), nets(), nets(), ports(), nets()).prop_map(move |(op, ex, inc, ip, src)| {
            let v4 = |v: Vec<Ipv4Net>| v.into_iter().map(IpNet::V4).collect::<Vec<_>>();
            let (linkerd, kuma) = (preset == Preset::Linkerd, preset == Preset::Kuma);
            WorkloadAnnotations {
                outbound_port_exclusion: op,
                outbound_ip_range_exclusion: if linkerd { Vec::new() } else { v4(ex) },
                outbound_ip_range_inclusion: if linkerd || kuma { Vec::new() } else { v4(inc) },
                inbound_port_exclusion: ip,
                inbound_source_exclusion: if linkerd || kuma { v4(src) } else { Vec::new() },
                ..WorkloadAnnotations::default()
            }
        })
    }

    fn policy_for(preset: Preset) -> impl Strategy<Value = Policy> {
        (lists(preset), lists(preset), prop::sample::select(vec![1500u32, 1337]), prop::option::of(Just(1337u32)))
            .prop_map(move |(mesh, pod, uid, gid)| {
                let mesh = MeshConfig {
                    proxy_uid: uid,
                    proxy_gid: match preset {
                        // istio-iptables always has a GID rule (-g defaults to -u).
                        Preset::Istio => Some(uid),
                        Preset::Osm => gid,
                        // proxy-init and kuma match the user only.
                        Preset::Linkerd | Preset::Kuma => None,
                    },
                    outbound_ip_range_exclusion: mesh.outbound_ip_range_exclusion,
                    outbound_ip_range_inclusion: mesh.outbound_ip_range_inclusion,
                    outbound_port_exclusion: mesh.outbound_port_exclusion,
                    inbound_port_exclusion: mesh.inbound_port_exclusion,
                    inbound_source_exclusion: mesh.inbound_source_exclusion,
                    ..MeshConfig::for_preset(preset)
                };
                compile(&mesh, &pod).with_local_addresses([IpAddr::V4(POD_IP)])
            })
    }

    fn any_preset_policy() -> impl Strategy<Value = (Preset, Policy)> {
        prop::sample::select(Preset::ALL.to_vec())
            .prop_flat_map(|preset| policy_for(preset).prop_map(move |p| (preset, p)))
    }

    fn policy() -> impl Strategy<Value = Policy> {
        policy_for(Preset::Osm)
    }

    fn conn() -> impl Strategy<Value = OutboundConn> {
        (
            prop::bool::weighted(0.9),
            prop::sample::select(vec![0u32, 1000, 1337, 1500]),
            prop::sample::select(vec![0u32, 1000, 1337]),
            prop_oneof![addr(), Just(Ipv4Addr::LOCALHOST), Just(POD_IP), Just(Ipv4Addr::new(127, 0, 0, 6))],
            prop::sample::select(PORTS.to_vec()),
            prop::option::of(Just(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)))),
            any::<bool>(),
        )
            .prop_map(|(tcp, uid, gid, ip, port, src, mapped)| OutboundConn {
                // A dual-stack socket binds 127.0.0.6 as ::ffff:127.0.0.6.
                src: src.map(|s| match s {
                    IpAddr::V4(v4) if mapped => IpAddr::V6(v4.to_ipv6_mapped()),
                    s => s,
                }),
                protocol: if tcp { Protocol::Tcp } else { Protocol::Udp },
                uid,
                gid,
                // The same destination written IPv4-mapped on an AF_INET6
                // socket must be decided identically.
                dst: if mapped {
                    SocketAddr::new(ip.to_ipv6_mapped().into(), port)
                } else {
                    SocketAddr::V4(SocketAddrV4::new(ip, port))
                },
                cgroup: 0,
            })
    }

    /// Compares an iptables outcome with a verdict; the proxy address of an
    /// IPv4-mapped connection is ::ffff:127.0.0.1.
    fn same(oracle: NatOutcome, verdict: Verdict) -> Result<(), TestCaseError> {
        match (oracle, verdict) {
            (NatOutcome::Redirect(a), Verdict::Redirect(b)) => {
                let b_ip = match b.ip() {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(b.ip()),
                    v4 => v4,
                };
                prop_assert_eq!(IpAddr::V4(*a.ip()), b_ip);
                prop_assert_eq!(a.port(), b.port());
            }
            (NatOutcome::Unchanged, Verdict::Pass(_)) => {}
            (o, v) => prop_assert!(false, "iptables {:?} but policy {:?}", o, v),
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// With the proxy identified by its cgroup (any dialect), the
        /// evaluator and the map encoding agree, and a UID or GID decides
        /// nothing: a process outside the proxy's cgroup that runs as the
        /// proxy's UID is treated exactly like any application process.
        #[test]
        fn proxy_cgroup_identity_ignores_uids(
            p in prop::sample::select(Preset::ALL.to_vec()).prop_flat_map(policy_for),
            c in conn(),
            in_proxy in any::<bool>(),
            id in 1u32..u32::MAX,
        ) {
            let p = p.with_proxy_cgroup(4242);
            let c = OutboundConn { cgroup: if in_proxy { 4242 } else { 7 }, ..c };
            let verdict = evaluate(&p, &c);
            prop_assert_eq!(evaluate_entries(&map_entries(&p, id), &c), verdict);
            for (uid, gid) in [(p.proxy_uid, p.proxy_gid.unwrap_or(0)), (1000, 1000), (0, 0)] {
                prop_assert_eq!(evaluate(&p, &OutboundConn { uid, gid, ..c }), verdict);
            }
        }

        #[test]
        fn osm_init_rules_policy_and_maps_agree(p in policy(), c in conn(), id in 1u32..u32::MAX) {
            let table = NatTable::from_commands(&osm_init_commands(&p)).unwrap();
            let verdict = evaluate(&p, &c);
            same(table.output(&c, &p.local_addresses), verdict)?;
            prop_assert_eq!(evaluate_entries(&map_entries(&p, id), &c), verdict);
        }

        #[test]
        fn every_dialects_rules_policy_and_maps_agree((preset, p) in any_preset_policy(), c in conn(), id in 1u32..u32::MAX) {
            let table = NatTable::from_commands(&oracle_commands(preset, &p)).unwrap();
            let verdict = evaluate(&p, &c);
            same(table.output(&c, &p.local_addresses), verdict)?;
            prop_assert_eq!(evaluate_entries(&map_entries(&p, id), &c), verdict);
        }

        #[test]
        fn inbound_rules_and_policy_agree(
            (preset, policy) in any_preset_policy(),
            port in prop::sample::select(vec![22u16, 80, 4143, 4190, 4567, 8080, 9090, 15003, 15006, 15010, 15020, 15021, 15090, 15901, 15903, 6379]),
            src in addr(),
        ) {
            let dst = SocketAddrV4::new(POD_IP, port);
            let conn = InboundConn { dst: SocketAddr::V4(dst), local_client: false, src: IpAddr::V4(src) };
            {
                let table = NatTable::from_commands(&oracle_commands(preset, &policy)).unwrap();
                let oracle = table.prerouting(src, dst);
                let verdict = evaluate_inbound(&policy, &conn);
                match (oracle, verdict) {
                    // The proxy accepts on its inbound port and reads `dst` back.
                    (NatOutcome::Redirect(a), Verdict::Redirect(b)) => {
                        prop_assert_eq!(a.port(), policy.inbound_port);
                        prop_assert_eq!(b, SocketAddr::V4(dst));
                    }
                    (NatOutcome::Unchanged, Verdict::Pass(_)) => {}
                    // A connection to the inbound port itself reaches the proxy either way.
                    (NatOutcome::Redirect(a), Verdict::Pass(_)) if port == policy.inbound_port => prop_assert_eq!(a.port(), port),
                    (o, v) => prop_assert!(false, "iptables {:?} but policy {:?}", o, v),
                }
            }
        }

        #[test]
        fn annotation_parser_never_panics(s in ".{0,40}") {
            let mut a = BTreeMap::new();
            for k in osm_annotations::ALL {
                a.insert(k.to_string(), s.clone());
            }
            let _ = parse_annotations(Preset::Osm, &a);
        }

        #[test]
        fn port_lists_round_trip(ps in prop::collection::vec(1u16..=65535, 0..20)) {
            let mut a = BTreeMap::new();
            let text = ps.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
            a.insert(osm_annotations::OUTBOUND_PORT_EXCLUSION.to_string(), text);
            prop_assert_eq!(parse_annotations(Preset::Osm, &a).unwrap().outbound_port_exclusion, ps);
        }
    }
}
