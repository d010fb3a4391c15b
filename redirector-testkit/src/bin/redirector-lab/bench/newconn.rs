//! New connections: connect, read the proxy's one-line answer, close;
//! outbound (app → 192.0.2.10:80 → proxy on 127.0.0.1:15001) and inbound
//! (peer namespace → pod:8080 over the veth → proxy on 15003), as the
//! number of excluded CIDRs or ports grows.
//!
//! Two regimes, alternated round by round with the three setups: **idle**
//! (client and proxy stand-in wherever the scheduler puts them; on an idle
//! machine each connection then pays cross-CPU wake-ups, which dwarf the
//! setups' differences) and **pinned** (client and proxy stand-in on one
//! CPU, as `taskset` does: a connection is then one CPU's work from
//! connect to close, softirq processing of loopback and veth included, so
//! its time is its CPU cost, and a setup's time over `none` is what it
//! costs per connection). The per-program eBPF cost is counted in pinned
//! rounds of their own with the kernel's statistics on, next to which the
//! pinned redirector rounds (statistics off) give what the statistics
//! themselves cost.
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
    bpfstats::{self, Floor, ProgCost, Tally},
    setup::{in_cgroup, outbound_exclusion_rules, policy, Cgroups, Exclusions, Kind, Setup, Spec, KINDS},
    stats::{ratio, Stats},
    sys, Cpus, Plan,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

/// The three setups' results in one regime.
#[derive(Serialize, Clone, Default)]
pub struct Regime {
    /// none, iptables, redirector.
    pub setups: Vec<(String, Stats)>,
    /// redirector/none and redirector/iptables for the connection rate.
    pub ratio_vs_none: f64,
    pub ratio_vs_iptables: f64,
    /// iptables and redirector: p50 connection time over none's, µs (in
    /// the pinned regime, CPU time per connection over none's).
    pub cost_over_none_us: Vec<(String, f64)>,
}

impl Regime {
    fn new(samples: &mut [Vec<Duration>], seconds: f64) -> Self {
        let st: Vec<Stats> = samples.iter_mut().map(|s| Stats::from_samples(s, seconds)).collect();
        let over = |i: usize| st[i].p50_us - st[0].p50_us;
        Self {
            ratio_vs_none: ratio(st[2].rate_per_s, st[0].rate_per_s),
            ratio_vs_iptables: ratio(st[2].rate_per_s, st[1].rate_per_s),
            cost_over_none_us: vec![(KINDS[1].name().to_string(), over(1)), (KINDS[2].name().to_string(), over(2))],
            setups: KINDS.iter().map(|k| k.name().to_string()).zip(st).collect(),
        }
    }

    /// A setup's figure over none's, µs.
    pub fn over_none(&self, setup: &str) -> f64 {
        self.cost_over_none_us.iter().find(|(n, _)| n == setup).map_or(0.0, |(_, v)| *v)
    }
}

/// The redirector's eBPF cost per connection, with and without what the
/// kernel's statistics add to it.
#[derive(Serialize, Clone, Default)]
pub struct BpfCost {
    /// Each program, as the statistics count it (pinned rounds).
    pub programs: Vec<ProgCost>,
    pub runs_per_connection: f64,
    /// Σ run time / connections, as counted.
    pub ns_per_connection: f64,
    /// The same less the floor for every run: the programs' own time.
    pub ns_per_connection_less_floor: f64,
    /// An empty program's time per run with the statistics on (this
    /// scenario, pinned): the part of their cost inside the counted time.
    pub floor: Floor,
    /// The pinned redirector rounds with the statistics on.
    pub stats_on: Stats,
    /// Their p50 connection time over the pinned redirector rounds' with
    /// the statistics off (alternated with them): the statistics' whole
    /// cost per connection, inside and outside the counted time, and per
    /// program run.
    pub stats_overhead_per_connection_ns: f64,
    pub stats_overhead_per_run_ns: f64,
    /// Pinned redirector rounds during which `kernel.bpf_stats_enabled`
    /// was on although this bench had the statistics off (another process
    /// held them on): the overhead above is then understated.
    pub stats_on_elsewhere_rounds: usize,
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
    pub idle: Regime,
    /// Client and proxy stand-in on one CPU.
    pub pinned: Regime,
    /// The agent's VmRSS with this policy.
    pub agent_rss_kib: Option<u64>,
    pub bpf: BpfCost,
}

/// The scenarios of one policy size: the three setups are started once,
/// then each direction runs `plan.rounds` rounds, each of them every setup
/// idle, every setup pinned, and the redirector pinned with the kernel's
/// BPF statistics on; then one pinned redirector round with an empty
/// program beside the agent's (the statistics' floor).
pub fn run_size(
    plan: &Plan,
    excl: Exclusions,
    directions: &[Direction],
    cgroups: Cgroups<'_>,
    cpus: &Cpus,
) -> Result<Vec<Scenario>> {
    eprintln!("bench: {} excluded CIDRs, {} excluded ports: starting the three setups", excl.cidrs, excl.ports);
    let setups: Vec<Setup> = KINDS
        .iter()
        .enumerate()
        .map(|(i, kind)| Setup::start(*kind, &format!("b{i}"), Spec::new(excl), cgroups))
        .collect::<Result<_>>()?;
    let rules = outbound_exclusion_rules(&policy(excl)?);
    let redirector = &setups[2];
    let Some(agent) = &redirector.agent else { bail!("the redirector setup has no agent") };
    let mut out = Vec::new();
    for &dir in directions {
        let mut idle: Vec<Vec<Duration>> = vec![Vec::new(); KINDS.len()];
        let mut pinned: Vec<Vec<Duration>> = vec![Vec::new(); KINDS.len()];
        let mut stats_on = Vec::new();
        let mut stats_on_elsewhere_rounds = 0;
        let mut tally = Tally::new(&agent.pins.path)?;
        let pin = Some(cpus);
        for _ in 0..plan.rounds {
            super::interrupted()?;
            for (i, s) in setups.iter().enumerate() {
                idle[i].extend(hammer_setup(s, dir, plan.secs, None)?);
            }
            for (i, s) in setups.iter().enumerate() {
                if s.kind == Kind::Redirector && sys::bpf_stats_enabled() == Some(true) {
                    stats_on_elsewhere_rounds += 1;
                }
                pinned[i].extend(hammer_setup(s, dir, plan.secs, pin)?);
            }
            let v = tally.round(|| hammer_setup(redirector, dir, plan.secs, pin).map(|v| (v.len(), v)))?;
            stats_on.extend(v);
        }
        let floor =
            bpfstats::floor(&redirector.cgroup, || hammer_setup(redirector, dir, plan.secs, pin).map(|v| v.len()))?;
        let total = plan.secs * plan.rounds as f64;
        let idle = Regime::new(&mut idle, total);
        let pinned = Regime::new(&mut pinned, total);
        let stats_on = Stats::from_samples(&mut stats_on, total);
        let programs = tally.costs();
        let runs_per_connection: f64 = programs.iter().map(|p| p.runs_per_op).sum();
        let ns_per_connection: f64 = programs.iter().map(|p| p.ns_per_run * p.runs_per_op).sum();
        let overhead_ns = (stats_on.p50_us - pinned.setups[2].1.p50_us) * 1e3;
        let bpf = BpfCost {
            ns_per_connection_less_floor: ns_per_connection - floor.ns_per_run * runs_per_connection,
            stats_overhead_per_connection_ns: overhead_ns,
            stats_overhead_per_run_ns: if runs_per_connection > 0.0 { overhead_ns / runs_per_connection } else { 0.0 },
            programs,
            runs_per_connection,
            ns_per_connection,
            floor,
            stats_on,
            stats_on_elsewhere_rounds,
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
            idle,
            pinned,
            agent_rss_kib: redirector.agent_rss_kib(),
            bpf,
        };
        println!("{}", newconn_row(&sc, &sc.idle));
        println!("{} (pinned)", newconn_row(&sc, &sc.pinned));
        println!("{}", cost_row(&sc));
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
/// and inside the setup's cgroup; `cpus`: pinned (client and the setup's
/// proxy stand-ins on one CPU for the round) or not.
fn hammer_setup(s: &Setup, dir: Direction, secs: f64, cpus: Option<&Cpus>) -> Result<Vec<Duration>> {
    let (ns, dst): (PathBuf, SocketAddr) = match (dir, s.kind) {
        (Direction::Outbound, Kind::None) => (s.topo.app.path(), "127.0.0.1:15001".parse()?),
        (Direction::Outbound, _) => (s.topo.app.path(), "192.0.2.10:80".parse()?),
        (Direction::Inbound, Kind::None) => (s.topo.peer.path(), format!("{POD_IP}:15003").parse()?),
        (Direction::Inbound, _) => (s.topo.peer.path(), format!("{POD_IP}:8080").parse()?),
    };
    let cpu = cpus.map(|c| c.pinned);
    if let Some(c) = cpu {
        for tid in s.proxy_tids() {
            sys::set_affinity(tid, &[c])?;
        }
    }
    let r = in_cgroup(&s.cgroup, || hammer(&ns, dst, secs, s.kind != Kind::None, cpu));
    if let Some(c) = cpus {
        for tid in s.proxy_tids() {
            sys::set_affinity(tid, &c.all)?;
        }
    }
    r?
}

/// Connect, read the proxy's one-line answer, close; for `secs` seconds,
/// on CPU `cpu` if given. `redirected`: the proxy must also have read an
/// original destination (with no redirection it has none to read).
fn hammer(netns: &Path, dst: SocketAddr, secs: f64, redirected: bool, cpu: Option<usize>) -> Result<Vec<Duration>> {
    let lat = testkit::in_netns_as(netns, 1000, move || -> Result<(Vec<Duration>, usize)> {
        if let Some(c) = cpu {
            sys::set_affinity(0, &[c])?;
        }
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
        Ok((v, errors))
    })??;
    if lat.1 > 0 {
        bail!("{} connection(s) to {dst} failed", lat.1);
    }
    Ok(lat.0)
}

fn rate_cell(st: &Stats) -> String {
    format!("{:.0} ({:.1}/{:.0})", st.rate_per_s, st.p50_us, st.p99_us)
}

/// One results row of a regime, as printed while running and in
/// `results.md`.
pub fn newconn_row(s: &Scenario, r: &Regime) -> String {
    format!(
        "| {} | {} | {} | {} | {} | {:.2} | {:.2} |",
        s.name,
        s.iptables_exclusion_rules,
        rate_cell(&r.setups[0].1),
        rate_cell(&r.setups[1].1),
        rate_cell(&r.setups[2].1),
        r.ratio_vs_none,
        r.ratio_vs_iptables
    )
}

/// Per connection over none, both regimes, and the redirector's eBPF time.
pub fn cost_row(s: &Scenario) -> String {
    let b = &s.bpf;
    format!(
        "| {} | {:.1} | {:+.1} | {:+.1} | {:.1} | {:+.1} | {:+.1} | {:.2} / {:.2} |",
        s.name,
        s.idle.setups[0].1.p50_us,
        s.idle.over_none("iptables"),
        s.idle.over_none("redirector"),
        s.pinned.setups[0].1.p50_us,
        s.pinned.over_none("iptables"),
        s.pinned.over_none("redirector"),
        b.ns_per_connection / 1e3,
        b.ns_per_connection_less_floor / 1e3,
    )
}

/// What the statistics cost: runs, the floor, connection time on and off.
pub fn stats_row(s: &Scenario) -> String {
    let b = &s.bpf;
    format!(
        "| {} | {:.1} | {:.0} | {:.1} | {:.1} | {:.0} | {:.0} |{}",
        s.name,
        b.runs_per_connection,
        b.floor.ns_per_run,
        s.pinned.setups[2].1.p50_us,
        b.stats_on.p50_us,
        b.stats_overhead_per_connection_ns,
        b.stats_overhead_per_run_ns,
        if b.stats_on_elsewhere_rounds > 0 {
            format!(" (statistics on elsewhere in {} of the off rounds)", b.stats_on_elsewhere_rounds)
        } else {
            String::new()
        }
    )
}
