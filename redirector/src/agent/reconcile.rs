//! The reconcile core both agents call: from the workloads a source wants
//! (and what it must keep) to the maps, through [`Dataplane::apply`].
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use anyhow::Context as _;
use log::error;

use redirector_policy::{compile, MeshSettings, WorkloadSpec};

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

/// One reconcile pass: programs `wanted.workloads`, keeps `wanted.keep` and
/// the last good policy of each workload that failed, removes the rest.
/// Every failure is in the report's `errors`, named by workload.
pub fn reconcile(dp: &mut Dataplane, wanted: &Wanted, state: &mut AgentState) -> ApplyReport {
    let mut keep = wanted.keep.clone();
    let mut failed: Vec<(String, anyhow::Error)> = Vec::new();
    for (name, err) in wanted.rejected {
        if let Some(c) = state.cookies.get(name) {
            keep.insert(*c);
        }
        failed.push((name.clone(), anyhow::anyhow!("{err:#}")));
    }
    let mut desired = Vec::new();
    // The workload's own addresses matter only where connections routed
    // through loopback are treated specially (Istio, Kuma, Linkerd); they
    // are re-read on every pass, with the cookies, on one thread.
    let policies: Vec<_> = wanted.workloads.iter().map(|w| compile(wanted.mesh, &w.annotations)).collect();
    let namespaces: Vec<(PathBuf, bool)> = wanted
        .workloads
        .iter()
        .zip(&policies)
        .map(|(w, p)| (w.netns.path(), p.loopback != redirector_policy::LoopbackMode::Osm))
        .collect();
    let facts = crate::sys::netns::survey(&namespaces);
    for (((w, policy), fact), (path, _)) in wanted.workloads.iter().zip(policies).zip(facts).zip(namespaces) {
        let key = match w.netns {
            redirector_policy::NetnsRef::Path(_) => "netns",
            redirector_policy::NetnsRef::Pid(_) => "pid",
        };
        let mut fail = |e: anyhow::Error, failed: &mut Vec<(String, anyhow::Error)>| {
            if let Some(c) = state.cookies.get(&w.name) {
                keep.insert(*c);
            }
            failed.push((w.name.clone(), e));
        };
        let found = fact.and_then(|fact| {
            let mut policy = policy;
            if let Some(addresses) = fact.addresses {
                policy = policy.with_local_addresses(addresses);
            }
            if let Some(cg) = &w.proxy_cgroup {
                policy = policy
                    .with_proxy_cgroup(crate::sys::mounts::cgroup_id(cg).with_context(|| {
                        format!("workload `{}`: key `proxyCgroup`: value {}", w.name, cg.display())
                    })?);
            }
            Ok((fact.cookie, policy))
        });
        let (cookie, policy) = match found {
            Ok(f) => f,
            Err(e) => {
                let e = e.context(format!(
                    "workload `{}`: key `{key}`: value {}: network namespace not usable",
                    w.name,
                    path.display()
                ));
                fail(e, &mut failed);
                continue;
            }
        };
        // The proxy's IDs as the data path sees them: translated through
        // the workload's user namespace, if it has one of its own.
        let translated = user_namespace(w).and_then(|maps| match maps {
            Some(m) => policy.in_user_namespace(&m),
            None => Ok(policy),
        });
        match translated {
            Ok(policy) => desired.push(Desired { name: w.name.clone(), cookie, netns: path.clone(), policy }),
            Err(e) => fail(
                e.context(format!("workload `{}`: user namespace of {}: policy not applied", w.name, w.netns)),
                &mut failed,
            ),
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
    report
}

/// The ID maps of a workload's user namespace when it is not the agent's:
/// those its source knows (Kubernetes), or those of its `pid:` process; a
/// `netns:` workload's namespace must belong to the agent's own.
fn user_namespace(w: &WorkloadSpec) -> anyhow::Result<Option<redirector_policy::IdMaps>> {
    match (&w.id_maps, &w.netns) {
        (Some(m), _) => Ok(Some(m.clone())),
        (None, redirector_policy::NetnsRef::Pid(pid)) => {
            crate::sys::userns::id_maps_of_pid(std::path::Path::new("/proc"), *pid)
        }
        (None, redirector_policy::NetnsRef::Path(p)) => {
            crate::sys::userns::require_netns_in_own_user_ns(p).map(|()| None)
        }
    }
}

/// Logs a pass: each error, then one summary line (at debug level when the
/// pass changed nothing).
pub fn log_report(report: &ApplyReport) {
    for (name, e) in &report.errors {
        error!(target: LOG, "{name}: {e:#}");
    }
    let quiet = report.programmed.is_empty() && report.removed == 0 && report.swept == 0 && report.errors.is_empty();
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
