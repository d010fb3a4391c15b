//! `redirector-lab bench` (`cargo xtask bench`): the cost of redirection, measured side by side in
//! one run under three setups, alternated round by round so drift hits all
//! three alike:
//!
//! - `none`: the client dials the proxy's port itself (no redirection);
//! - `iptables`: osm-init's rule set (seed 004) in the workload namespace;
//! - `redirector`: the agent.
//!
//! The agents attach to a cgroup of the bench's, where the redirector
//! setups' proxy stand-ins and clients make their sockets; `none` and
//! `iptables` make theirs in another, clean one (a sibling: the same
//! programs inherited from above, none of the agent's).
//!
//! Scenarios: new connections as the excluded CIDRs and ports grow, idle
//! and pinned to one CPU ([`newconn`]); the control plane: change-to-in-force latency, full sync
//! of many workloads and its memory ([`control`]); established traffic
//! app ↔ proxy ([`established`]); DNS capture's UDP queries per second
//! ([`dns`]); and each eBPF program's cost per run
//! ([`bpfstats`]). Each setup has its own namespaces with the same servers;
//! clients are single-threaded and bounded in time. Only loopback, veth and
//! documentation addresses inside our own namespaces are used.
use std::{
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{bail, Context as _, Result};

mod bpfstats;
mod control;
mod dns;
mod established;
mod newconn;
mod plot;
mod report;
mod setup;
mod stats;
mod sys;

pub use control::sync_child;
use newconn::Direction;
use setup::{BenchCgroup, Cgroups, Exclusions};

/// How much a run measures.
pub struct Plan {
    /// Alternating rounds per setup and their length.
    pub rounds: usize,
    pub secs: f64,
    /// Excluded-CIDR counts (outbound and inbound scenarios).
    pub cidr_sizes: Vec<usize>,
    /// Excluded-port counts (outbound only: they do not apply inbound). The
    /// 0 point is the 0-CIDR scenario, the same policy.
    pub port_sizes: Vec<usize>,
    /// Seconds per round and setup of each established-traffic pattern.
    pub established_secs: f64,
    /// Policy changes timed per setup.
    pub changes: usize,
    /// Other workloads the agent has while its changes are timed again,
    /// and how many changes at each of those sizes.
    pub change_scale: Vec<usize>,
    pub scale_changes: usize,
    /// Workload counts of the full-sync scenario, and up to how many pods
    /// osm-init's restores are run for real (beyond: extrapolated).
    pub sync_sizes: Vec<usize>,
    pub max_real_pods: usize,
    /// Workload counts a real agent is started with (RSS).
    pub agent_sizes: Vec<usize>,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                rounds: 2,
                secs: 0.5,
                cidr_sizes: vec![0, 1000],
                port_sizes: vec![1000],
                established_secs: 0.3,
                changes: 30,
                change_scale: vec![100],
                scale_changes: 10,
                sync_sizes: vec![100, 1000],
                max_real_pods: 100,
                agent_sizes: vec![1000],
            }
        } else {
            Self {
                rounds: 5,
                secs: 2.0,
                cidr_sizes: vec![0, 10, 100, 1000, 10000],
                port_sizes: vec![10, 100, 1000],
                established_secs: 1.0,
                changes: 200,
                change_scale: vec![1000, 10000],
                scale_changes: 50,
                sync_sizes: vec![100, 1000, 10000],
                max_real_pods: 1000,
                agent_sizes: vec![100, 1000],
            }
        }
    }
}

/// The pinned regime's CPU, and every CPU the bench may use (what a pinned
/// thread goes back to).
pub struct Cpus {
    pub pinned: usize,
    pub all: Vec<usize>,
}

impl Cpus {
    /// The last CPU the process may run on.
    fn new() -> Result<Self> {
        let all = sys::allowed_cpus()?;
        Ok(Self { pinned: *all.last().expect("allowed_cpus is never empty"), all })
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Fails once SIGINT or SIGTERM has arrived: the measuring loops check it
/// between rounds, so that an interrupted run still removes its
/// namespaces, pins, cgroups and agents on the way out.
pub fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted by a signal; cleaning up");
    }
    Ok(())
}

fn on_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Only the change-to-in-force scenario (redirector and iptables side by
/// side, then the agent at the plan's scales): `changes.json` and
/// `changes.md` in `out`.
pub fn run_changes(quick: bool, out: &Path) -> Result<()> {
    on_signals();
    let plan = Plan::new(quick);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let load_before = sys::loadavg();
    let cgroup = BenchCgroup::new("redirector-bench-")?;
    let clean = BenchCgroup::new("redirector-bench-clean-")?;
    let cgroups = Cgroups { attach: &cgroup.path, clean: &clean.path };
    let change = control::change_to_in_force(plan.changes, &plan.change_scale, plan.scale_changes, cgroups)?;
    let json = out.join("changes.json");
    std::fs::write(&json, serde_json::to_string_pretty(&change)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let md = out.join("changes.md");
    let text = format!(
        "# Change to in force (`redirector-lab bench --only changes`{})\n\nkernel {}, {} cores, load average {:.2} before, \
         {:.2} after.\n{}",
        if quick { " --quick" } else { "" },
        redirector::sys::features::kernel_release(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_before,
        sys::loadavg(),
        report::change_section(&change)
    );
    std::fs::write(&md, text).with_context(|| format!("writing {}", md.display()))?;
    eprintln!("bench: wrote {} and {}", json.display(), md.display());
    Ok(())
}

/// Only DNS capture's queries per second: dns.json and dns.md in `out`.
pub fn run_dns(quick: bool, out: &Path) -> Result<()> {
    on_signals();
    let plan = Plan::new(quick);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let load_before = sys::loadavg();
    let cgroup = BenchCgroup::new("redirector-bench-")?;
    let clean = BenchCgroup::new("redirector-bench-clean-")?;
    let rates = dns::run(&plan, Cgroups { attach: &cgroup.path, clean: &clean.path })?;
    let json = out.join("dns.json");
    std::fs::write(&json, serde_json::to_string_pretty(&rates)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let md = out.join("dns.md");
    let text = format!(
        "# DNS capture (`redirector-lab bench --only dns`{})\n\nkernel {}, {} cores, {} alternating rounds of {} s per setup, \
         load average {:.2} before, {:.2} after.\n{}",
        if quick { " --quick" } else { "" },
        redirector::sys::features::kernel_release(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        plan.rounds,
        plan.secs,
        load_before,
        sys::loadavg(),
        dns::section(&rates)
    );
    std::fs::write(&md, text).with_context(|| format!("writing {}", md.display()))?;
    eprintln!("bench: wrote {} and {}", json.display(), md.display());
    Ok(())
}

pub fn run(quick: bool, out: &Path) -> Result<()> {
    on_signals();
    let plan = Plan::new(quick);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let started = std::time::Instant::now();
    let load_before = sys::loadavg();
    let cpus = Cpus::new()?;
    let cgroup = BenchCgroup::new("redirector-bench-")?;
    let clean = BenchCgroup::new("redirector-bench-clean-")?;
    let cgroups = Cgroups { attach: &cgroup.path, clean: &clean.path };
    // Whatever runs for the clean cgroup's sockets (on the agent's hooks)
    // also runs for the attach cgroup's: it comes from above both.
    let inherited = setup::effective_programs(&clean.path)?;
    if !inherited.is_empty() {
        eprintln!(
            "bench: WARNING: programs attached above the bench's cgroups run for every setup alike: {}",
            inherited.join(", ")
        );
    }
    let mut scenarios = Vec::new();
    for &n in &plan.cidr_sizes {
        let excl = Exclusions { cidrs: n, ..Default::default() };
        scenarios.extend(newconn::run_size(&plan, excl, &[Direction::Outbound, Direction::Inbound], cgroups, &cpus)?);
    }
    for &n in &plan.port_sizes {
        let excl = Exclusions { ports: n, ..Default::default() };
        scenarios.extend(newconn::run_size(&plan, excl, &[Direction::Outbound], cgroups, &cpus)?);
    }
    let established = established::run(&plan, cgroups)?;
    let dns = dns::run(&plan, cgroups)?;
    let change = control::change_to_in_force(plan.changes, &plan.change_scale, plan.scale_changes, cgroups)?;
    drop(clean);
    drop(cgroup);
    let sync = control::syncs(&plan.sync_sizes, plan.max_real_pods)?;
    let agent = plan.agent_sizes.iter().map(|&n| control::agent_at_scale(n)).collect::<Result<Vec<_>>>()?;
    let control_plane = report::ControlPlane { change, sync, agent };
    let report = report::Report {
        machine: format!("{} cores", std::thread::available_parallelism().map_or(0, |n| n.get())),
        kernel: redirector::sys::features::kernel_release(),
        quick,
        loadavg_1min_before: load_before,
        loadavg_1min_after: sys::loadavg(),
        wall_seconds: started.elapsed().as_secs_f64(),
        rounds: plan.rounds,
        seconds_per_round: plan.secs,
        pinned_cpu: cpus.pinned,
        inherited_programs: inherited,
        targets: report::targets(&scenarios, &established, &control_plane),
        scenarios,
        established,
        dns,
        control_plane,
    };
    let plots = plot::write_all(&report, out)?;
    report.write(out, &plots.files, plots.with_text)
}
