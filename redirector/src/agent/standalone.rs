//! The standalone agent: load the data plane, program the workloads of the
//! config file, and re-apply on SIGHUP or when the file changes.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use log::{debug, error, info, warn};

use redirector_policy::{load_config, Config};

use super::{
    reconcile::{log_summary, reconcile, AgentState, Reconciled, Wanted},
    runtime::{Retry, Runtime, Signal, Signals},
};
use crate::dataplane::{ApplyReport, Dataplane};

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
    /// The node's own network namespace: never programmed.
    pub node_netns: crate::dataplane::NodeNetns,
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
    let mut dp = Dataplane::load_on_node(&opts.pin_dir, &opts.cgroup, &opts.node_netns)?;
    info!(
        target: LOG,
        "attached to cgroup {}, maps and links pinned in {}",
        opts.cgroup.display(),
        opts.pin_dir.display()
    );
    let metrics = rt.metrics.clone();
    let mut state = AgentState::default();
    let mut log = PassLog::default();
    let config_valid = |valid: bool| {
        metrics.set_gauge(
            "config_valid",
            "1 when the config file on disk is the configuration in force; 0 while it is refused and the last good one stays.",
            u64::from(valid),
        )
    };
    config_valid(true);
    log_warnings(&opts.config, &cfg);
    let pass = |dp: &mut Dataplane, cfg: &Config, state: &mut AgentState, log: &mut PassLog| {
        let started = std::time::Instant::now();
        let wanted =
            Wanted { mesh: &cfg.mesh, workloads: &cfg.workloads, rejected: &cfg.rejected, keep: &BTreeSet::new() };
        let Reconciled { report, kept_last_good } = reconcile(dp, &wanted, state);
        metrics.observe_sync(started.elapsed());
        state.publish_namespaces(&metrics);
        let new_errors = log.pass(&report);
        for _ in 0..new_errors {
            metrics.error("apply");
        }
        let applied = report.programmed.len() + report.unchanged.len();
        metrics.set_gauge("workloads_programmed", "Workloads whose current policy is in the maps.", applied as u64);
        metrics.set_gauge(
            "workloads_last_good",
            "Workloads whose current entry is refused or cannot be applied, whose last good policy stays in force.",
            kept_last_good.len() as u64,
        );
        metrics.set_gauge("workloads_rejected", "Workloads whose config entry is invalid.", cfg.rejected.len() as u64);
        metrics.set_ready(None);
        // Worth retrying: what may clear by itself (a namespace not there
        // yet, a listener map without room). Not an entry of the file
        // that is refused (only a change of the file can fix it), nor a
        // policy map refusing the input (only a change makes room).
        let retry = report.errors.iter().any(|(name, e)| {
            !cfg.rejected.iter().any(|(r, _)| r == name) && !crate::dataplane::MapFull::is_policy_map_full(e)
        });
        (retry, applied)
    };
    // A pass with errors that may clear by themselves is retried, backing
    // off from 1 s to 60 s; a good pass or a config change resets that.
    let mut retry = Retry::default();
    let mut current = cfg;
    retry.after(pass(&mut dp, &current, &mut state, &mut log).0);
    // The file's problem while it is refused (the last good configuration
    // stays in force), so it is logged once, and its recovery too.
    let mut refused: Option<String> = None;

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
        // Every tick: pins removed under the agent (`cleanup --force`)
        // make it exit non-zero instead of writing maps nothing uses.
        if let Err(e) = dp.check_pins() {
            return Err(rt.pins_gone(e));
        }
        dp.drain_retired();
        if state.release_gone_namespaces() > 0 {
            state.publish_namespaces(&rt.metrics);
        }
        if rt.check_full_maps(&dp.maps) && !retry.due() {
            // A listener the data path could not register is registered
            // by a pass (from /proc) once there is room: keep retrying.
            retry.after(true);
        }
        if retry.due() {
            debug!(target: LOG, "retrying the workloads that failed");
            retry.after(pass(&mut dp, &current, &mut state, &mut log).0);
        }
        // Only a change of the file (or SIGHUP) re-reads it: a refused
        // file cannot become valid by itself.
        let text = match std::fs::read_to_string(&opts.config) {
            Ok(t) => t,
            Err(e) => {
                let why = format!("reading {}: {e}", opts.config.display());
                if forced || refused.as_deref() != Some(why.as_str()) {
                    metrics.error("invalid_config");
                    config_valid(false);
                    warn!(
                        target: LOG,
                        "{why}; keeping the last good configuration ({} workloads)",
                        current.workloads.len()
                    );
                    refused = Some(why);
                }
                // Read again once it is back, even if unchanged.
                last_text.clear();
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
                log_warnings(&opts.config, &cfg);
                current = cfg;
                retry = Retry::default();
                let (failed, applied) = pass(&mut dp, &current, &mut state, &mut log);
                retry.after(failed);
                config_valid(true);
                if refused.take().is_some() {
                    info!(
                        target: LOG,
                        "config file {} valid again: {applied} of {} workloads applied",
                        opts.config.display(),
                        current.workloads.len()
                    );
                }
            }
            Err(e) => {
                let why = format!("config file {}: {e:#}", opts.config.display());
                metrics.error("invalid_config");
                config_valid(false);
                warn!(
                    target: LOG,
                    "{why}; keeping the last good configuration ({} workloads)",
                    current.workloads.len()
                );
                refused = Some(why);
            }
        }
    }
    rt.exit_notice();
    Ok(())
}

/// Each warning of a parsed config (a misspelt annotation key), at WARN.
fn log_warnings(path: &Path, cfg: &Config) {
    for (name, w) in &cfg.warnings {
        warn!(target: LOG, "config file {}: workload `{name}`: {w}", path.display());
    }
}

/// What the standalone agent has logged of its passes: an error is logged
/// when it appears or changes, not again on every retry, and its
/// recovery is logged once.
#[derive(Default)]
struct PassLog {
    /// Workload → its error as last logged.
    errors: BTreeMap<String, String>,
}

impl PassLog {
    /// Logs `report`; returns how many errors are new.
    fn pass(&mut self, report: &ApplyReport) -> usize {
        let mut now: BTreeMap<String, String> = BTreeMap::new();
        for (name, e) in &report.errors {
            now.entry(name.clone()).or_default().push_str(&format!("{e:#}"));
        }
        let mut new = 0;
        for (name, text) in &now {
            if self.errors.get(name) != Some(text) {
                new += 1;
                error!(target: LOG, "{name}: {text}");
            }
        }
        let fixed: Vec<&String> = self.errors.keys().filter(|n| !now.contains_key(*n)).collect();
        let in_force: BTreeSet<&String> = report.programmed.iter().chain(&report.unchanged).collect();
        for name in fixed {
            if in_force.contains(name) {
                info!(target: LOG, "workload `{name}`: error cleared, its policy is applied");
            } else {
                info!(target: LOG, "workload `{name}`: error cleared (no longer listed)");
            }
        }
        let quiet = report.programmed.is_empty() && report.removed == 0 && report.swept == 0 && new == 0;
        log_summary(report, quiet);
        self.errors = now;
        new
    }
}

/// `redirector check`: what it checks and how it answers.
pub struct CheckOptions {
    pub config: PathBuf,
    /// Also check the workloads against this machine, as `run` would
    /// (namespaces, processes, cgroups, one namespace per workload, the
    /// kernel's features); otherwise only the document.
    pub live: bool,
    /// One JSON object on stdout instead of text.
    pub json: bool,
}

/// One finding of `check`.
#[derive(serde::Serialize)]
struct Finding {
    /// The workload it is about (none: the document).
    #[serde(skip_serializing_if = "Option::is_none")]
    workload: Option<String>,
    #[serde(flatten)]
    problem: redirector_policy::Problem,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.workload {
            Some(w) => write!(f, "workload `{w}`: {}", self.problem),
            None => write!(f, "{}", self.problem),
        }
    }
}

/// What `check` found about one accepted workload.
#[derive(serde::Serialize)]
struct Checked {
    name: String,
    netns: String,
    outbound_port_exclusions: usize,
    outbound_ip_range_exclusions: usize,
    /// None: every destination; an empty list: none.
    outbound_ip_range_inclusion: Option<Vec<String>>,
    /// None: every port.
    outbound_port_inclusion: Option<Vec<u16>>,
    inbound_port_exclusions: usize,
    /// None: every port.
    inbound_port_inclusion: Option<Vec<u16>>,
}

fn inclusion<T: ToString>(what: &str, v: &Option<Vec<T>>) -> String {
    match v {
        None => format!("{what}: all"),
        Some(v) if v.is_empty() => format!("{what}: none (nothing is redirected)"),
        Some(v) => format!("{what}: only {}", v.iter().map(T::to_string).collect::<Vec<_>>().join(", ")),
    }
}

/// `redirector check`: parses and compiles a config file without touching
/// the kernel (with `--live`, also resolves each workload on this machine
/// as `run` does, still writing nothing), and reports every problem: of
/// the document, of each workload, and each warning. Errors make it fail.
pub fn check(opts: &CheckOptions) -> Result<()> {
    let mut errors: Vec<Finding> = Vec::new();
    let mut warnings: Vec<Finding> = Vec::new();
    let mut checked: Vec<Checked> = Vec::new();
    let doc = |message: String| Finding {
        workload: None,
        problem: redirector_policy::Problem { path: String::new(), line: None, column: None, message },
    };
    match std::fs::read_to_string(&opts.config) {
        Err(e) => errors.push(doc(format!("reading config file {}: {e}", opts.config.display()))),
        Ok(text) => match redirector_policy::parse_config(&text) {
            Err(e) => errors.extend(
                redirector_policy::problems_of(&e).into_iter().map(|problem| Finding { workload: None, problem }),
            ),
            Ok(cfg) => {
                for (name, e) in &cfg.rejected {
                    for problem in redirector_policy::problems_of(e) {
                        errors.push(Finding { workload: Some(name.clone()), problem });
                    }
                }
                for (name, w) in &cfg.warnings {
                    warnings.push(Finding { workload: Some(name.clone()), problem: w.clone() });
                }
                if opts.live {
                    let features = crate::sys::features::probe();
                    if let Err(e) = crate::sys::features::require(&features) {
                        errors.push(doc(format!("{e:#}")));
                    }
                    if cfg.mesh.acceleration == redirector_policy::Acceleration::Sockmap {
                        if let Err(e) = crate::sys::features::require_acceleration(&features) {
                            errors.push(doc(format!("mesh.acceleration: {e:#}")));
                        }
                    }
                }
                let live = if opts.live {
                    // The node's own namespace, which `run` refuses to program.
                    let node = crate::dataplane::resolve_node_netns(&crate::dataplane::NodeNetns::Pid1OrOwn);
                    if let Err(e) = &node {
                        errors.push(doc(format!("{e:#}")));
                    }
                    super::reconcile::resolve(&cfg.mesh, &cfg.workloads, &mut Default::default())
                        .into_iter()
                        .map(|found| {
                            Some(found.and_then(|r| match &node {
                                Ok((cookie, named)) if r.cookie == *cookie => Err(anyhow::anyhow!(
                                    "network namespace {} (cookie {cookie}) is the node's own ({named}): `run` \
                                     refuses to redirect it (the node's connections would go to a proxy)",
                                    r.netns.display()
                                )),
                                _ => Ok(r),
                            }))
                        })
                        .collect()
                } else {
                    (0..cfg.workloads.len()).map(|_| None).collect::<Vec<_>>()
                };
                for (w, found) in cfg.workloads.iter().zip(live) {
                    if let Some(Err(e)) = found {
                        let text = format!("{e:#}");
                        let prefix = format!("workload `{}`: ", w.name);
                        let message = text.strip_prefix(&prefix).map_or(text.clone(), str::to_owned);
                        errors.push(Finding { workload: Some(w.name.clone()), problem: doc(message).problem });
                        continue;
                    }
                    let p = w.policy(&cfg.mesh);
                    let sorted = |s: &Option<BTreeSet<u16>>| s.as_ref().map(|s| s.iter().copied().collect::<Vec<_>>());
                    checked.push(Checked {
                        name: w.name.clone(),
                        netns: w.netns.to_string(),
                        outbound_port_exclusions: p.outbound_port_exclusion.len(),
                        outbound_ip_range_exclusions: p.outbound_ip_range_exclusion.len(),
                        outbound_ip_range_inclusion: p
                            .outbound_ip_range_inclusion
                            .as_ref()
                            .map(|s| s.iter().map(ToString::to_string).collect()),
                        outbound_port_inclusion: sorted(&p.outbound_port_inclusion),
                        inbound_port_exclusions: p.inbound_port_exclusion.len(),
                        inbound_port_inclusion: sorted(&p.inbound_port_inclusion),
                    });
                }
            }
        },
    }
    let valid = errors.is_empty();
    if opts.json {
        let out = serde_json::json!({
            "config": opts.config.display().to_string(),
            "live": opts.live,
            "valid": valid,
            "workloads": checked,
            "errors": errors,
            "warnings": warnings,
        });
        println!("{out}");
    } else {
        for c in &checked {
            println!(
                "workload `{}` ({}): outbound: {} port exclusions, {} IP range exclusions, {}, {}; inbound: {} port exclusions, {}",
                c.name,
                c.netns,
                c.outbound_port_exclusions,
                c.outbound_ip_range_exclusions,
                inclusion("IP ranges included", &c.outbound_ip_range_inclusion),
                inclusion("ports included", &c.outbound_port_inclusion),
                c.inbound_port_exclusions,
                inclusion("ports included", &c.inbound_port_inclusion),
            );
        }
        for w in &warnings {
            eprintln!("warning: {w}");
        }
        for e in &errors {
            eprintln!("error: {e}");
        }
    }
    if !valid {
        anyhow::bail!("config {} is not valid: {} error(s)", opts.config.display(), errors.len());
    }
    if !opts.json {
        let scope = if opts.live {
            " and its workloads resolve on this machine"
        } else {
            " (document only; --live also checks this machine)"
        };
        println!("config {} is valid{scope}", opts.config.display());
    }
    Ok(())
}
