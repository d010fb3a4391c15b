//! The reconcile core both agents call: from the workloads a source wants
//! (and what it must keep) to the maps, through [`Dataplane::apply`].
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use anyhow::Context as _;
use log::error;

use redirector_policy::{MeshSettings, NetnsRef, WorkloadSpec};

use crate::dataplane::{ApplyReport, Dataplane, Desired};

/// The log target of [`log_report`]: the module path it had before the
/// agents moved under `agent/`, so `RUST_LOG` filters and log readers keep
/// working.
const LOG: &str = "redirector::agent";

/// What the agent remembers between passes: the netns cookie of each
/// workload it has programmed, so a workload whose new input is bad keeps
/// its last good policy.
#[derive(Default)]
pub struct AgentState {
    cookies: BTreeMap<String, u64>,
    /// The workloads' namespaces held between passes: a pass answers a
    /// namespace whose path still names it from here.
    namespaces: crate::sys::nscache::NsCache,
    /// How many namespaces the last pass had no room to hold (logged when
    /// it changes).
    overflow: usize,
}

impl AgentState {
    /// Lets go of the held namespaces whose path no longer names them (on
    /// each tick of the agent: a deleted namespace is not kept alive).
    pub fn release_gone_namespaces(&mut self) -> usize {
        self.namespaces.release_gone()
    }

    /// Publishes how many namespaces are held, and how many of the last
    /// pass's could not be for want of file descriptors.
    pub fn publish_namespaces(&self, metrics: &crate::metrics::Metrics) {
        metrics.set_gauge(
            "namespaces_held",
            "Workloads' network namespaces the agent holds between passes (one file descriptor each).",
            self.namespaces.len() as u64,
        );
        metrics.set_gauge(
            "namespaces_unheld",
            "Workloads' network namespaces of the last pass that RLIMIT_NOFILE left no room to hold: entered again \
             on every pass.",
            self.overflow as u64,
        );
    }
}

/// What one pass is asked for, by either source.
pub struct Wanted<'a> {
    pub mesh: &'a MeshSettings,
    /// The workloads to program.
    pub workloads: &'a [WorkloadSpec],
    /// Entries refused before the pass (a bad config entry): reported, and
    /// their last good policy stays.
    pub rejected: &'a [(String, anyhow::Error)],
    /// Pinned workloads kept whatever the pass finds (the Kubernetes plan's
    /// pods whose input is bad or whose namespace is not found yet).
    pub keep: &'a BTreeSet<u64>,
}

/// A workload found on this machine: its namespace's cookie and path, and
/// its policy with what only this machine knows (the namespace's
/// addresses, the proxy's cgroup id).
pub struct Resolved {
    pub cookie: u64,
    pub netns: PathBuf,
    pub policy: redirector_policy::Policy,
}

/// What `run` checks of each workload on this machine before programming
/// it, and what `check --live` checks without programming: the namespace
/// exists and is a network namespace (a `pid:` names a live process), the
/// proxy's cgroup is a cgroup-v2 directory, and no other workload listed
/// before it is in the same namespace (compared by netns cookie: a
/// `netns:` path and the `pid:` of a process in it, or two paths to one
/// namespace, are one namespace, and one policy would silently replace the
/// other's). One answer per workload, in order; each error names the
/// workload, the key and the value.
pub fn resolve(
    mesh: &MeshSettings,
    workloads: &[WorkloadSpec],
    cache: &mut crate::sys::nscache::NsCache,
) -> Vec<anyhow::Result<Resolved>> {
    // The workload's own addresses matter only where connections routed
    // through loopback are treated specially (Istio, Kuma, Linkerd); they
    // are read with the cookies, and again when they change (`cache`).
    let policies = redirector_policy::policies(mesh, workloads);
    let namespaces: Vec<(PathBuf, bool)> = workloads
        .iter()
        .zip(&policies)
        .map(|(w, p)| (w.netns.path(), p.loopback != redirector_policy::LoopbackMode::Osm))
        .collect();
    let facts = cache.survey(&namespaces);
    // Cookie → the first workload found in that namespace.
    let mut taken: BTreeMap<u64, (&str, &NetnsRef)> = BTreeMap::new();
    let mut out = Vec::with_capacity(workloads.len());
    for (((w, policy), fact), (path, _)) in workloads.iter().zip(policies).zip(facts).zip(namespaces) {
        let key = match w.netns {
            NetnsRef::Path(_) => "netns",
            NetnsRef::Pid(_) => "pid",
        };
        // Formatted only for an error.
        let value = || match &w.netns {
            NetnsRef::Path(p) => p.display().to_string(),
            NetnsRef::Pid(pid) => pid.to_string(),
        };
        let found = fact
            .map_err(|e| {
                let why = match &w.netns {
                    NetnsRef::Pid(pid) if !std::path::Path::new(&format!("/proc/{pid}")).exists() => {
                        anyhow::anyhow!("no process {pid} is running")
                    }
                    NetnsRef::Path(p) if p.exists() && !crate::sys::mounts::is_nsfs(p) => anyhow::anyhow!(
                        "{} is not a network namespace (expected /run/netns/NAME or /proc/PID/ns/net)",
                        p.display()
                    ),
                    _ => e,
                };
                why.context(format!(
                    "workload `{}`: key `{key}`: value {}: network namespace not usable",
                    w.name,
                    value()
                ))
            })
            .and_then(|mut fact| {
                if let Some((other, where_)) = taken.get(&fact.cookie) {
                    anyhow::bail!(
                        "workload `{}`: key `{key}`: value {value}: the same network namespace (netns cookie {}) as \
                         workload `{other}` ({where_}); a namespace has one policy: list it once",
                        w.name,
                        fact.cookie,
                        value = value()
                    );
                }
                taken.insert(fact.cookie, (w.name.as_str(), &w.netns));
                let mut policy = policy;
                if let Some(addresses) = fact.addresses.take() {
                    policy = policy.with_local_addresses(addresses);
                }
                if policy.needs_resolv_conf() {
                    let servers = crate::sys::resolv::nameservers_of(&w.netns)
                        .with_context(|| format!("workload `{}`: DNS capture: the workload's nameservers", w.name))?;
                    policy = policy.with_nameservers(servers);
                }
                if let Some(cg) = &w.proxy_cgroup {
                    policy = policy.with_proxy_cgroup(crate::sys::mounts::cgroup_id(cg).with_context(|| {
                        format!("workload `{}`: key `proxyCgroup`: value {}", w.name, cg.display())
                    })?);
                }
                // The proxy's IDs as the data path sees them: translated
                // through the workload's user namespace, if it has its own.
                let policy = user_namespace(w, &path, &fact, cache)
                    .and_then(|maps| match maps {
                        Some(m) => policy.in_user_namespace(&m),
                        None => Ok(policy),
                    })
                    .with_context(|| {
                        format!("workload `{}`: user namespace of {}: policy not applied", w.name, w.netns)
                    })?;
                Ok(Resolved { cookie: fact.cookie, netns: path.clone(), policy })
            });
        out.push(found);
    }
    out
}

/// The ID maps of a workload's user namespace when it is not the agent's:
/// those its source knows (Kubernetes), or those of its `pid:` process; a
/// `netns:` workload's namespace must belong to the agent's own.
fn user_namespace(
    w: &WorkloadSpec,
    path: &std::path::Path,
    netns: &crate::sys::nscache::NetnsFacts,
    cache: &mut crate::sys::nscache::NsCache,
) -> anyhow::Result<Option<redirector_policy::IdMaps>> {
    match (&w.id_maps, &w.netns) {
        (Some(m), _) => Ok(Some(m.clone())),
        (None, NetnsRef::Pid(pid)) => cache.id_maps_of_pid(std::path::Path::new("/proc"), *pid, path, netns),
        (None, NetnsRef::Path(p)) => crate::sys::userns::require_owner_is_own(p, &netns.owner).map(|()| None),
    }
}

/// A pass's report, and which workloads that failed keep their last good
/// policy in force.
pub struct Reconciled {
    pub report: ApplyReport,
    /// Failed this pass (bad entry, namespace not usable, write refused)
    /// but programmed by an earlier pass: that policy stays in force.
    pub kept_last_good: BTreeSet<String>,
}

/// One reconcile pass: programs `wanted.workloads`, keeps `wanted.keep` and
/// the last good policy of each workload that failed, removes the rest.
/// Every failure is in the report's `errors`, named by workload.
pub fn reconcile(dp: &mut Dataplane, wanted: &Wanted, state: &mut AgentState) -> Reconciled {
    let mut keep = wanted.keep.clone();
    let mut failed: Vec<(String, anyhow::Error)> = Vec::new();
    for (name, err) in wanted.rejected {
        if let Some(c) = state.cookies.get(name) {
            keep.insert(*c);
        }
        failed.push((name.clone(), anyhow::anyhow!("{err:#}")));
    }
    let mut desired = Vec::new();
    let found = resolve(wanted.mesh, wanted.workloads, &mut state.namespaces);
    let overflow = state.namespaces.overflow();
    if overflow != state.overflow {
        if overflow > 0 {
            log::warn!(
                target: LOG,
                "{overflow} workloads' network namespaces are entered again on every pass: RLIMIT_NOFILE leaves \
                 room to hold {} (raise the agent's hard limit for faster passes)",
                state.namespaces.room()
            );
        } else {
            log::info!(target: LOG, "every workload's network namespace is held between passes again");
        }
        state.overflow = overflow;
    }
    for (w, found) in wanted.workloads.iter().zip(found) {
        match found {
            Ok(r) => desired.push(Desired { name: w.name.clone(), cookie: r.cookie, netns: r.netns, policy: r.policy }),
            Err(e) => {
                if let Some(c) = state.cookies.get(&w.name) {
                    keep.insert(*c);
                }
                failed.push((w.name.clone(), e));
            }
        }
    }
    let mut report = dp.apply(&desired, &keep);
    let in_force: std::collections::HashSet<&String> = report.programmed.iter().chain(&report.unchanged).collect();
    for d in &desired {
        if in_force.contains(&d.name) {
            state.cookies.insert(d.name.clone(), d.cookie);
        }
    }
    let listed: BTreeSet<&String> =
        wanted.workloads.iter().map(|w| &w.name).chain(wanted.rejected.iter().map(|(n, _)| n)).collect();
    state.cookies.retain(|name, _| listed.contains(name));
    failed.append(&mut report.errors);
    report.errors = failed;
    let kept_last_good = report
        .errors
        .iter()
        .map(|(n, _)| n)
        .filter(|n| !in_force.contains(n) && state.cookies.contains_key(*n))
        .cloned()
        .collect();
    Reconciled { report, kept_last_good }
}

/// Logs a pass: each error, then one summary line (at debug level when the
/// pass changed nothing).
pub fn log_report(report: &ApplyReport) {
    for (name, e) in &report.errors {
        error!(target: LOG, "{name}: {e:#}");
    }
    let quiet = report.programmed.is_empty() && report.removed == 0 && report.swept == 0 && report.errors.is_empty();
    log_summary(report, quiet);
}

/// The summary line of a pass, at debug level when `quiet`.
pub fn log_summary(report: &ApplyReport, quiet: bool) {
    log::log!(
        target: LOG,
        if quiet { log::Level::Debug } else { log::Level::Info },
        "applied: {} programmed {:?}, {} unchanged, {} removed, {} stale entries swept, {} errors",
        report.programmed.len(),
        report.programmed,
        report.unchanged.len(),
        report.removed,
        report.swept,
        report.errors.len()
    );
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use redirector_policy::{MeshSettings, NetnsRef, WorkloadAnnotations, WorkloadSpec};

    use super::resolve;

    fn workload(name: &str, netns: NetnsRef) -> WorkloadSpec {
        WorkloadSpec {
            name: name.into(),
            netns,
            proxy_cgroup: None,
            id_maps: None,
            nameservers: None,
            annotations: WorkloadAnnotations::default(),
            mesh: None,
        }
    }

    /// What `run` refuses, found before anything is written (and by
    /// `check --live`): a namespace listed twice under two names (a path
    /// and the pid of a process in it, or two paths) is refused naming
    /// both workloads; a path that is not a namespace, a pid that does not
    /// run and a missing cgroup are refused naming the key and the value.
    #[test]
    fn resolve_refuses_one_namespace_listed_twice_and_what_run_cannot_use() {
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP resolve_refuses_one_namespace_listed_twice_and_what_run_cannot_use: setns needs root");
            return;
        }
        let mut cg = workload("cg", NetnsRef::Path("/proc/thread-self/ns/net".into()));
        cg.proxy_cgroup = Some(PathBuf::from("/sys/fs/cgroup/redirector-no-such-cgroup"));
        let list = [
            workload("first", NetnsRef::Path("/proc/self/ns/net".into())),
            workload("by-pid", NetnsRef::Pid(std::process::id())),
            workload("passwd", NetnsRef::Path("/etc/passwd".into())),
            // Above the largest pid_max (2^22): never a running process.
            workload("gone", NetnsRef::Pid(4_194_305)),
            workload("missing", NetnsRef::Path("/run/netns/redirector-no-such-ns".into())),
            cg,
        ];
        let mut cache = crate::sys::nscache::NsCache::default();
        let got: Vec<Result<u64, String>> = resolve(&MeshSettings::default(), &list, &mut cache)
            .into_iter()
            .map(|r| r.map(|r| r.cookie).map_err(|e| format!("{e:#}")))
            .collect();
        assert_eq!(got[0].as_ref().ok(), Some(&crate::sys::netns::current_netns_cookie().unwrap()));
        let e = got[1].as_ref().unwrap_err();
        assert!(
            e.starts_with(&format!("workload `by-pid`: key `pid`: value {}:", std::process::id()))
                && e.contains("the same network namespace")
                && e.contains("workload `first` (netns /proc/self/ns/net)"),
            "{e}"
        );
        let e = got[2].as_ref().unwrap_err();
        assert!(
            e.contains("workload `passwd`: key `netns`: value /etc/passwd") && e.contains("is not a network namespace"),
            "{e}"
        );
        let e = got[3].as_ref().unwrap_err();
        assert!(
            e.contains("workload `gone`: key `pid`: value 4194305") && e.contains("no process 4194305 is running"),
            "{e}"
        );
        let e = got[4].as_ref().unwrap_err();
        assert!(e.contains("key `netns`: value /run/netns/redirector-no-such-ns") && e.contains("No such file"), "{e}");
        // The same namespace again, but refused first for being listed twice.
        let e = got[5].as_ref().unwrap_err();
        assert!(e.contains("workload `cg`") && e.contains("the same network namespace"), "{e}");
        let alone = resolve(&MeshSettings::default(), &list[5..], &mut cache);
        let e = format!("{:#}", alone[0].as_ref().err().unwrap());
        assert!(e.contains("key `proxyCgroup`: value /sys/fs/cgroup/redirector-no-such-cgroup"), "{e}");
    }
}
