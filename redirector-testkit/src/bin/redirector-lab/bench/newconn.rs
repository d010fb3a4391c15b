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
//! redirector rounds of their own that switch the kernel's statistics on
//! and off every [`STATS_BLOCK`] connections: the blocks with them on give
//! the count, and against the blocks with them off, what the statistics
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
    /// The connections of those rounds' blocks with the statistics on,
    /// and of the blocks with them off (in turn, [`STATS_BLOCK`] each).
    pub stats_on: Stats,
    pub stats_off: Stats,
    /// p50 on − p50 off: the statistics' whole cost per connection, inside
    /// and outside the counted time, and per program run.
    pub stats_overhead_per_connection_ns: f64,
    pub stats_overhead_per_run_ns: f64,
    /// Blocks meant to run with the statistics off during which
    /// `kernel.bpf_stats_enabled` was on (another process held them on);
    /// left out of `stats_off`.
    pub stats_on_elsewhere_blocks: usize,
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

/// Connections per block of a statistics round: about 20 ms pinned, short
/// enough that drift hits both kinds of block alike.
pub const STATS_BLOCK: usize = 1000;

/// The scenarios of one policy size: the three setups are started once,
/// then each direction runs `plan.rounds` rounds, each of them every setup
/// idle, every setup pinned, and the redirector pinned with the kernel's
/// BPF statistics switched on and off by turns; then one pinned redirector
/// round with an empty program beside the agent's (the statistics' floor).
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
        let mut stats = StatsRound::default();
        let mut tally = Tally::new(&agent.pins.path)?;
        let pin = Some(cpus);
        for _ in 0..plan.rounds {
            super::interrupted()?;
            for (i, s) in setups.iter().enumerate() {
                idle[i].extend(hammer_setup(s, dir, plan.secs, None)?);
            }
            for (i, s) in setups.iter().enumerate() {
                pinned[i].extend(hammer_setup(s, dir, plan.secs, pin)?);
            }
            let r = stats_round(redirector, dir, plan.secs, cpus, tally.ids())?;
            tally.add(&r.counts, r.on.len());
            stats.on.extend(r.on);
            stats.off.extend(r.off);
            stats.elsewhere += r.elsewhere;
        }
        let floor =
            bpfstats::floor(&redirector.cgroup, || hammer_setup(redirector, dir, plan.secs, pin).map(|v| v.len()))?;
        let total = plan.secs * plan.rounds as f64;
        let idle = Regime::new(&mut idle, total);
        let pinned = Regime::new(&mut pinned, total);
        let stats_on = Stats::from_samples(&mut stats.on, 0.0);
        let stats_off = Stats::from_samples(&mut stats.off, 0.0);
        let programs = tally.costs();
        let runs_per_connection: f64 = programs.iter().map(|p| p.runs_per_op).sum();
        let ns_per_connection: f64 = programs.iter().map(|p| p.ns_per_run * p.runs_per_op).sum();
        let overhead_ns = (stats_on.p50_us - stats_off.p50_us) * 1e3;
        let bpf = BpfCost {
            ns_per_connection_less_floor: ns_per_connection - floor.ns_per_run * runs_per_connection,
            stats_overhead_per_connection_ns: overhead_ns,
            stats_overhead_per_run_ns: if runs_per_connection > 0.0 { overhead_ns / runs_per_connection } else { 0.0 },
            programs,
            runs_per_connection,
            ns_per_connection,
            floor,
            stats_on,
            stats_off,
            stats_on_elsewhere_blocks: stats.elsewhere,
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
        println!("{}", stats_row(&sc));
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

/// A setup's client: its namespace and destination for `dir`.
fn target(s: &Setup, dir: Direction) -> Result<(PathBuf, SocketAddr)> {
    Ok(match (dir, s.kind) {
        (Direction::Outbound, Kind::None) => (s.topo.app.path(), "127.0.0.1:15001".parse()?),
        (Direction::Outbound, _) => (s.topo.app.path(), "192.0.2.10:80".parse()?),
        (Direction::Inbound, Kind::None) => (s.topo.peer.path(), format!("{POD_IP}:15003").parse()?),
        (Direction::Inbound, _) => (s.topo.peer.path(), format!("{POD_IP}:8080").parse()?),
    })
}

/// Runs `f` as a setup's client: on a thread in the client's namespace
/// as UID 1000, in the setup's cgroup and, with `cpus`, with that thread
/// and the setup's proxy stand-ins on one CPU (let go again after).
fn as_client<T: Send + 'static>(
    s: &Setup,
    netns: &Path,
    cpus: Option<&Cpus>,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let cpu = cpus.map(|c| c.pinned);
    if let Some(c) = cpu {
        for tid in s.proxy_tids() {
            sys::set_affinity(tid, &[c])?;
        }
    }
    let r = in_cgroup(&s.cgroup, || {
        testkit::in_netns_as(netns, 1000, move || -> Result<T> {
            if let Some(c) = cpu {
                sys::set_affinity(0, &[c])?;
            }
            f()
        })
    });
    if let Some(c) = cpus {
        for tid in s.proxy_tids() {
            sys::set_affinity(tid, &c.all)?;
        }
    }
    r??
}

/// Connect, read the proxy's one-line answer, close; back to back until
/// `end` or `max` connections, each one's time; stops at 100 errors.
/// `redirected`: the proxy must also have read an original destination
/// (with no redirection it has none to read).
fn burst(dst: SocketAddr, redirected: bool, end: Instant, max: usize, errors: &mut usize) -> Vec<Duration> {
    let mut v = Vec::new();
    let mut buf = [0u8; 128];
    while v.len() < max && Instant::now() < end && *errors < 100 {
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
            Err(_) => *errors += 1,
        }
    }
    v
}

/// One round of connections against one setup for `secs` seconds, idle or
/// (with `cpus`) pinned.
fn hammer_setup(s: &Setup, dir: Direction, secs: f64, cpus: Option<&Cpus>) -> Result<Vec<Duration>> {
    let (ns, dst) = target(s, dir)?;
    let redirected = s.kind != Kind::None;
    as_client(s, &ns, cpus, move || {
        let mut errors = 0;
        let v = burst(dst, redirected, Instant::now() + Duration::from_secs_f64(secs), usize::MAX, &mut errors);
        if errors > 0 {
            bail!("{errors} connection(s) to {dst} failed");
        }
        Ok(v)
    })
}

/// What a [`stats_round`] measured.
#[derive(Default)]
struct StatsRound {
    /// Connection times in blocks with the statistics on, and off.
    on: Vec<Duration>,
    off: Vec<Duration>,
    /// The programs' run time and count over the blocks with them on.
    counts: bpfstats::Counts,
    /// Blocks to run with them off that found them on (someone else's).
    elsewhere: usize,
}

/// A pinned round against the redirector setup whose blocks of
/// [`STATS_BLOCK`] connections run with the kernel's BPF statistics off
/// and on by turns, counting the programs `ids` over the blocks with them
/// on. Switching between blocks (about every 20 ms) pairs the two kinds of
/// block closely in time, so that what the machine's load does to one it
/// does to the other. `BPF_ENABLE_STATS` needs root, which the client
/// thread (UID 1000) is not: a thread of the bench's switches for it, told
/// over a channel, and the client waits for each switch.
fn stats_round(s: &Setup, dir: Direction, secs: f64, cpus: &Cpus, ids: Vec<u32>) -> Result<StatsRound> {
    let (ns, dst) = target(s, dir)?;
    // The client asks for the statistics on (true) or off (false) and
    // waits for the answer; it hangs up at the end.
    let (ask, asked) = std::sync::mpsc::channel::<bool>();
    let (answer, answered) = std::sync::mpsc::channel::<Result<()>>();
    let switcher = std::thread::spawn(move || -> Result<bpfstats::Counts> {
        let mut switch = bpfstats::Switch::new(ids);
        while let Ok(on) = asked.recv() {
            let r = if on { switch.on() } else { switch.off() };
            let failed = r.is_err();
            let _ = answer.send(r);
            if failed {
                break;
            }
        }
        switch.off()?;
        Ok(switch.totals)
    });
    let client = as_client(s, &ns, Some(cpus), move || {
        let switch = |on: bool| -> Result<()> {
            ask.send(on).map_err(|_| anyhow::anyhow!("the statistics switcher is gone"))?;
            answered.recv().map_err(|_| anyhow::anyhow!("the statistics switcher is gone"))?
        };
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let (mut on, mut off, mut elsewhere) = (Vec::new(), Vec::new(), 0);
        let mut errors = 0;
        let mut now_on = false;
        while Instant::now() < end && errors == 0 {
            if now_on {
                switch(true)?;
                on.extend(burst(dst, true, end, STATS_BLOCK, &mut errors));
                switch(false)?;
            } else if sys::bpf_stats_enabled() == Some(true) {
                elsewhere += 1;
                burst(dst, true, end, STATS_BLOCK, &mut errors);
            } else {
                off.extend(burst(dst, true, end, STATS_BLOCK, &mut errors));
            }
            now_on = !now_on;
        }
        if errors > 0 {
            bail!("{errors} connection(s) to {dst} failed");
        }
        Ok((on, off, elsewhere))
    });
    // The client has hung up (its closure is gone): the switcher ends.
    let counts = switcher.join().map_err(|_| anyhow::anyhow!("the statistics switcher panicked"))??;
    let (on, off, elsewhere) = client?;
    Ok(StatsRound { on, off, counts, elsewhere })
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
        b.stats_off.p50_us,
        b.stats_on.p50_us,
        b.stats_overhead_per_connection_ns,
        b.stats_overhead_per_run_ns,
        if b.stats_on_elsewhere_blocks > 0 {
            format!(" (statistics on elsewhere in {} blocks meant to be off, left out)", b.stats_on_elsewhere_blocks)
        } else {
            String::new()
        }
    )
}
