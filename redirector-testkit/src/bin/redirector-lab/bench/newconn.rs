//! New connections: connect, read the proxy's one-line answer, close;
//! outbound (app → 192.0.2.10:80 → proxy on 127.0.0.1:15001) and inbound
//! (peer namespace → pod:8080 over the veth → proxy on 15003), as the
//! number of excluded CIDRs or ports grows.
use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use redirector_testkit::{self as testkit, addrs::POD_IP};
use serde::Serialize;

use super::{
    bpfstats::{self, ProgCost},
    setup::{in_cgroup, outbound_exclusion_rules, policy, Exclusions, Kind, Setup, Spec, KINDS},
    stats::{ratio, Stats},
    Plan,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

#[derive(Serialize)]
pub struct Scenario {
    pub name: String,
    pub direction: Direction,
    /// Excluded CIDRs in the policy (iptables: one rule each).
    pub excluded_cidrs: usize,
    /// Excluded outbound ports (iptables: one `multiport` rule per 15).
    pub excluded_ports: usize,
    /// Exclusion rules osm-init's set puts in `PROXY_OUTPUT`.
    pub iptables_exclusion_rules: usize,
    /// none, iptables, redirector.
    pub setups: Vec<(String, Stats)>,
    /// redirector/none and redirector/iptables for the connection rate.
    pub ratio_vs_none: f64,
    pub ratio_vs_iptables: f64,
    /// The agent's VmRSS with this policy.
    pub agent_rss_kib: Option<u64>,
    /// Per-program cost, measured in an extra redirector round with
    /// kernel BPF statistics on (not during the rounds above).
    pub bpf_programs: Vec<ProgCost>,
}

/// The scenarios of one policy size: the three setups are started once,
/// then each direction runs `plan.rounds` rounds alternating them.
pub fn run_size(plan: &Plan, excl: Exclusions, directions: &[Direction], cgroup: &Path) -> Result<Vec<Scenario>> {
    eprintln!("bench: {} excluded CIDRs, {} excluded ports: starting the three setups", excl.cidrs, excl.ports);
    let setups: Vec<Setup> = KINDS
        .iter()
        .enumerate()
        .map(|(i, kind)| Setup::start(*kind, &format!("b{i}"), Spec::new(excl), cgroup))
        .collect::<Result<_>>()?;
    let rules = outbound_exclusion_rules(&policy(excl)?);
    let mut out = Vec::new();
    for &dir in directions {
        let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); KINDS.len()];
        for _ in 0..plan.rounds {
            super::interrupted()?;
            for (i, s) in setups.iter().enumerate() {
                samples[i].extend(hammer_setup(s, dir, plan.secs, cgroup)?);
            }
        }
        let total = plan.secs * plan.rounds as f64;
        let st: Vec<Stats> = samples.iter_mut().map(|s| Stats::from_samples(s, total)).collect();
        let redirector = &setups[2];
        let bpf_programs = match &redirector.agent {
            Some(a) => {
                bpfstats::measure(&a.pins.path, || hammer_setup(redirector, dir, plan.secs, cgroup).map(|v| v.len()))?
            }
            None => Vec::new(),
        };
        let what = match (excl.cidrs, excl.ports) {
            (0, 0) => "no exclusions".to_string(),
            (c, 0) => format!("{c} excluded CIDRs"),
            (0, p) => format!("{p} excluded ports"),
            (c, p) => format!("{c} excluded CIDRs, {p} excluded ports"),
        };
        let sc = Scenario {
            name: format!("{} new connections, {what}", dir_name(dir)),
            direction: dir,
            excluded_cidrs: excl.cidrs,
            excluded_ports: excl.ports,
            iptables_exclusion_rules: rules,
            ratio_vs_none: ratio(st[2].rate_per_s, st[0].rate_per_s),
            ratio_vs_iptables: ratio(st[2].rate_per_s, st[1].rate_per_s),
            setups: KINDS.iter().map(|k| k.name().to_string()).zip(st).collect(),
            agent_rss_kib: redirector.agent_rss_kib(),
            bpf_programs,
        };
        println!("{}", newconn_row(&sc));
        out.push(sc);
    }
    Ok(out)
}

pub fn dir_name(d: Direction) -> &'static str {
    match d {
        Direction::Outbound => "outbound",
        Direction::Inbound => "inbound",
    }
}

/// One round of [`hammer`] against one setup, from the right namespace
/// (and, for redirector, from inside the agent's cgroup).
fn hammer_setup(s: &Setup, dir: Direction, secs: f64, cgroup: &Path) -> Result<Vec<Duration>> {
    let (ns, dst): (PathBuf, SocketAddr) = match (dir, s.kind) {
        (Direction::Outbound, Kind::None) => (s.topo.app.path(), "127.0.0.1:15001".parse()?),
        (Direction::Outbound, _) => (s.topo.app.path(), "192.0.2.10:80".parse()?),
        (Direction::Inbound, Kind::None) => (s.topo.peer.path(), format!("{POD_IP}:15003").parse()?),
        (Direction::Inbound, _) => (s.topo.peer.path(), format!("{POD_IP}:8080").parse()?),
    };
    let cg = s.kind.has_agent().then_some(cgroup);
    in_cgroup(cg, || hammer(&ns, dst, secs, s.kind != Kind::None))?
}

/// Connect, read the proxy's one-line answer, close; for `secs` seconds.
/// `redirected`: the proxy must also have read an original destination
/// (with no redirection it has none to read).
fn hammer(netns: &Path, dst: SocketAddr, secs: f64, redirected: bool) -> Result<Vec<Duration>> {
    let lat = testkit::in_netns_as(netns, 1000, move || {
        let mut v = Vec::new();
        let mut errors = 0usize;
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let mut buf = [0u8; 128];
        while Instant::now() < end && errors < 100 {
            let t = Instant::now();
            let ok = (|| -> std::io::Result<()> {
                let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(1))?;
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                let n = s.read(&mut buf)?;
                // "proxy <original destination>": the proxy read it back.
                if n == 0 || !buf.starts_with(b"proxy ") || (redirected && buf[..n].windows(3).any(|w| w == b"no-")) {
                    return Err(std::io::Error::other("not answered by the proxy"));
                }
                Ok(())
            })();
            match ok {
                Ok(()) => v.push(t.elapsed()),
                Err(_) => errors += 1,
            }
        }
        (v, errors)
    })?;
    if lat.1 > 0 {
        bail!("{} connection(s) to {dst} failed", lat.1);
    }
    Ok(lat.0)
}

fn rate_cell(st: &Stats) -> String {
    format!("{:.0} ({:.0}/{:.0})", st.rate_per_s, st.p50_us, st.p99_us)
}

/// One results row, as printed while running and in `results.md`.
pub fn newconn_row(s: &Scenario) -> String {
    format!(
        "| {} | {} | {} | {} | {} | {:.2} | {:.2} |",
        s.name,
        s.iptables_exclusion_rules,
        rate_cell(&s.setups[0].1),
        rate_cell(&s.setups[1].1),
        rate_cell(&s.setups[2].1),
        s.ratio_vs_none,
        s.ratio_vs_iptables
    )
}
