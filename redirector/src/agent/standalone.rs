//! The standalone agent: load the data plane, program the workloads of the
//! config file, and re-apply on SIGHUP or when the file changes.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use log::{error, info};

use redirector_policy::{compile, load_config, Config};

use super::{
    reconcile::{log_report, reconcile, AgentState, Wanted},
    runtime::{Retry, Runtime, Signal, Signals},
};
use crate::dataplane::Dataplane;

/// The log target of these records: the module path they had before the
/// agents moved under `agent/`, so `RUST_LOG` filters and log readers keep
/// working.
const LOG: &str = "redirector::agent";

pub struct RunOptions {
    pub config: PathBuf,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub poll_interval: Duration,
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Runs until SIGTERM/SIGINT. Programs stay attached after exit (their
/// links are pinned); `redirector cleanup` removes them.
///
/// Where it differs from the Kubernetes agent (`docs/architecture.md`,
/// "Standalone and Kubernetes agents: what differs"): SIGHUP re-reads the
/// config file; `mesh.acceleration: sockmap` on a kernel without it is
/// refused at the start (the settings are known then); a failed pass is
/// retried with [`Retry`]'s backoff; the node is ready after the first
/// pass; `redirector_sync_duration_seconds` times the pass alone.
pub async fn run(opts: RunOptions) -> Result<()> {
    let mut signals = Signals::install()?;
    let cfg = load_config(&opts.config)?;
    let mut last_text = std::fs::read_to_string(&opts.config).unwrap_or_default();
    let features = crate::sys::features::probe();
    crate::sys::features::require(&features)?;
    if cfg.mesh.acceleration == redirector_policy::Acceleration::Sockmap {
        // Refused at the start, before anything is loaded; a later change
        // to sockmap on such a kernel is refused per workload by `apply`.
        crate::sys::features::require_acceleration(&features)
            .with_context(|| format!("config file {}", opts.config.display()))?;
    }
    let mut rt = Runtime::start(LOG, opts.pin_dir.clone(), opts.metrics_addr).await?;
    let mut dp = Dataplane::load(&opts.pin_dir, &opts.cgroup)?;
    info!(
        target: LOG,
        "attached to cgroup {}, maps and links pinned in {}",
        opts.cgroup.display(),
        opts.pin_dir.display()
    );
    let metrics = rt.metrics.clone();
    let mut state = AgentState::default();
    let pass = |dp: &mut Dataplane, cfg: &Config, state: &mut AgentState| {
        let started = std::time::Instant::now();
        let wanted =
            Wanted { mesh: &cfg.mesh, workloads: &cfg.workloads, rejected: &cfg.rejected, keep: &BTreeSet::new() };
        let report = reconcile(dp, &wanted, state).report;
        log_report(&report);
        metrics.observe_sync(started.elapsed());
        for _ in &report.errors {
            metrics.error("apply");
        }
        metrics.set_gauge(
            "workloads_programmed",
            "Workloads whose policy is in the maps.",
            (report.programmed.len() + report.unchanged.len()) as u64,
        );
        metrics.set_gauge("workloads_rejected", "Workloads whose config entry is invalid.", cfg.rejected.len() as u64);
        metrics.set_ready(None);
        // Worth retrying: anything but a policy map refusing the input (a
        // namespace not there yet, a listener map without room).
        report.errors.iter().any(|(_, e)| !crate::dataplane::MapFull::is_policy_map_full(e))
    };
    // A pass with errors that may clear by themselves (a namespace not
    // there yet, a full listener map) is retried, backing off from 1 s to
    // 60 s; a good pass or a config change resets that. A full policy map
    // is not: only a config change makes room there.
    let mut retry = Retry::default();
    let mut current = cfg;
    retry.after(pass(&mut dp, &current, &mut state));

    let mut tick = tokio::time::interval(opts.poll_interval);
    // No burst of catch-up ticks after a pass longer than the interval.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        rt.metrics.heartbeat();
        let forced = tokio::select! {
            sig = signals.next() => match sig {
                Signal::Hangup => { info!(target: LOG, "SIGHUP: re-reading {}", opts.config.display()); true }
                Signal::Stop => break,
            },
            _ = tick.tick() => false,
        };
        if rt.check_full_maps(&dp.maps) && !retry.due() {
            // A listener the data path could not register is registered
            // by a pass (from /proc) once there is room: keep retrying.
            retry.after(true);
        }
        if retry.due() {
            info!(target: LOG, "retrying the workloads that failed");
            retry.after(pass(&mut dp, &current, &mut state));
        }
        let text = match std::fs::read_to_string(&opts.config) {
            Ok(t) => t,
            Err(e) => {
                if forced {
                    error!(target: LOG, "reading {}: {e}; keeping the current configuration", opts.config.display());
                }
                continue;
            }
        };
        if !forced && text == last_text {
            continue;
        }
        if !forced {
            info!(target: LOG, "{} changed: re-applying", opts.config.display());
        }
        last_text = text;
        match redirector_policy::parse_config(&last_text) {
            Ok(cfg) => {
                current = cfg;
                retry = Retry::default();
                retry.after(pass(&mut dp, &current, &mut state));
            }
            Err(e) => {
                metrics.error("invalid_config");
                error!(target: LOG, "config file {}: {e:#}; keeping the last good configuration", opts.config.display())
            }
        }
    }
    rt.exit_notice();
    Ok(())
}

/// `redirector check`: parses and compiles a config file without touching
/// the kernel, printing each workload's list sizes; an error for each
/// rejected workload.
pub fn check(config: &Path) -> Result<()> {
    let cfg = load_config(config)?;
    for w in &cfg.workloads {
        let p = compile(&cfg.mesh, &w.annotations);
        println!(
            "workload `{}` ({}): {} outbound port exclusions, {} outbound IP range exclusions, {} inclusions, {} inbound port exclusions",
            w.name,
            w.netns,
            p.outbound_port_exclusion.len(),
            p.outbound_ip_range_exclusion.len(),
            p.outbound_ip_range_inclusion.as_ref().map_or(0, |s| s.len()),
            p.inbound_port_exclusion.len()
        );
    }
    if !cfg.rejected.is_empty() {
        for (_, e) in &cfg.rejected {
            eprintln!("error: {e:#}");
        }
        anyhow::bail!("{} workload(s) rejected", cfg.rejected.len());
    }
    println!("config {} is valid", config.display());
    Ok(())
}
