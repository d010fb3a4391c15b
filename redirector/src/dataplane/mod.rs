//! Applying: the only code that loads programs and writes maps.
//!
//! Layout under the pin directory:
//! `<pin>/RDR_*` — the maps (BTF-typed, `bpftool map dump pinned …`),
//! `<pin>/links/<program>` — the cgroup links; while a link's pin exists
//! the program stays attached, with or without a running agent.
//! `<pin>/netns/<cookie>` — one `sk_lookup` link per workload network
//! namespace (inbound redirection).
//! The `sk_msg` program (sockmap acceleration) has no pin of its own: it is
//! attached to the pinned `RDR_ACCEL_SOCKS` map and lives as long as that
//! map; each agent's attach replaces the previous agent's program.
//!
//! - `object`: the eBPF object (embedded or `REDIRECTOR_EBPF_OBJECT`), the
//!   loader, the cgroup programs in attach order;
//! - `attach`: cgroup links, per-namespace `sk_lookup` links, `sk_msg`;
//! - `maps`: typed reads and the generational writes of the maps;
//! - `pins`: the pin layout, capacities, readiness, cleanup;
//! - `fullmap`: full maps the data path ran into (its counters);
//! - here: [`Dataplane`], one apply pass over all of them.
mod attach;
mod fullmap;
mod maps;
mod object;
mod pins;

use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::{
    maps::{Array, MapData},
    Ebpf,
};
use redirector_common::{map_names, ListenerKey, Meta, LAYOUT_VERSION};
pub use redirector_policy::{diff, Desired, Ops};
use redirector_policy::{map_entries, MapEntries, Policy};

pub use self::{
    attach::refuse_unavailable_acceleration,
    fullmap::FullMapWatch,
    maps::Maps,
    object::{EBPF_OBJECT_ENV, PROGRAMS},
    pins::{cleanup, link_pin_path, links_pinned, netns_link_pin_path, wait_ready, CAPACITIES},
};
use self::{
    attach::{attach_cgroup_programs, attach_sk_msg, ensure_inbound},
    maps::open_pinned,
    object::{ebpf_object, loader},
    pins::check_pinned_capacities,
};
pub use crate::error::MapFull;
use crate::{error::PinnedLayout, sys::mounts};

/// What one apply pass did, for logs and tests.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub programmed: Vec<String>,
    pub unchanged: Vec<String>,
    pub removed: usize,
    pub swept: usize,
    pub removed_links: usize,
    pub errors: Vec<(String, anyhow::Error)>,
}

/// The agent's data plane: the loaded object, the maps, and what it last
/// programmed (so unchanged workloads are left alone).
pub struct Dataplane {
    pub pin_dir: PathBuf,
    pub maps: Maps,
    /// Why `mesh.acceleration: sockmap` cannot be honoured here (the
    /// `sk_msg` program did not load or attach); None when it can.
    pub accel_unavailable: Option<String>,
    programmed: StdHashMap<u64, Policy>,
    /// The names this agent recorded in `NAMES` (written again only when
    /// they change).
    names: StdHashMap<u64, String>,
    /// When the list maps were last swept whole (None: not yet). Between
    /// whole sweeps a pass deletes exactly the entries of the policies it
    /// replaced or removed, which it knows from `programmed`.
    last_full_sweep: Option<Instant>,
    _ebpf: Ebpf,
}

/// How often a pass that could retire entries exactly sweeps the list maps
/// whole anyway (entries another writer left, e.g. two agents overlapping
/// in a rolling update).
const FULL_SWEEP_EVERY: Duration = Duration::from_secs(60);

impl Dataplane {
    /// Loads the object, adopting maps already pinned in `pin_dir` (same
    /// layout version only), attaches every program to `cgroup` through
    /// pinned links, and replaces links left by a previous agent only after
    /// the new ones are attached (never a moment with nothing attached).
    pub fn load(pin_dir: &Path, cgroup: &Path) -> Result<Self> {
        let object = ebpf_object()?;
        mounts::prepare_pin_dir(pin_dir)?;
        if pin_dir.join(map_names::META).exists() {
            // Refuse before anything is changed if the pinned layout differs
            // (0 means a previous agent died before it stamped the maps).
            let meta: Array<MapData, Meta> = Array::try_from(open_pinned(pin_dir, map_names::META)?)?;
            let version = meta.get(&0, 0)?.layout_version;
            if version != 0 && version != LAYOUT_VERSION {
                return Err(PinnedLayout::VersionIn {
                    pin_dir: pin_dir.to_owned(),
                    found: version,
                    expected: LAYOUT_VERSION,
                }
                .into());
            }
        }
        // aya reuses a pinned map whatever its size: a map pinned by an
        // agent with other capacities (one that died before it stamped its
        // version) must be refused here, not adopted.
        check_pinned_capacities(pin_dir)?;
        let mut ebpf = loader(pin_dir).load(object).context("loading the eBPF object")?;
        // sk_msg goes on its map before sockops can put a socket there.
        let accel_unavailable = attach_sk_msg(&mut ebpf).err().map(|e| format!("{e:#}"));
        if let Some(why) = &accel_unavailable {
            log::warn!("sockmap acceleration unavailable (workloads asking for it are refused): {why}");
        }
        attach_cgroup_programs(&mut ebpf, pin_dir, cgroup)?;
        let mut maps = Maps::take(&mut ebpf)?;
        let meta = maps.meta()?;
        if meta.layout_version == 0 {
            maps.meta.set(0, Meta { layout_version: LAYOUT_VERSION, last_policy_id: meta.last_policy_id }, 0)?;
        }
        maps.check_layout()?;
        Ok(Self {
            pin_dir: pin_dir.to_owned(),
            maps,
            accel_unavailable,
            programmed: StdHashMap::new(),
            names: StdHashMap::new(),
            last_full_sweep: None,
            _ebpf: ebpf,
        })
    }

    /// Makes the maps hold exactly `desired` (plus the workloads in `keep`,
    /// whose last good policy stays while their new input is bad).
    pub fn apply(&mut self, desired: &[Desired], keep: &BTreeSet<u64>) -> ApplyReport {
        let mut report = ApplyReport::default();
        // A workload asking for an acceleration this kernel cannot do is
        // refused (its last good policy stays), never silently slowed.
        let (desired, refused) = refuse_unavailable_acceleration(desired, self.accel_unavailable.as_deref());
        let mut keep = keep.clone();
        for (d, e) in refused {
            keep.insert(d.cookie);
            report.errors.push((d.name.clone(), e));
        }
        let (desired, keep) = (&desired[..], &keep);
        let current = match self.maps.workloads() {
            Ok(c) => c,
            Err(e) => {
                report.errors.push(("maps".into(), e));
                return report;
            }
        };
        // One read of the listener map per pass, not one per workload.
        let registered: BTreeSet<u64> = match self.maps.listener_keys() {
            Ok(keys) => keys.into_iter().map(|k| k.netns_cookie).collect(),
            Err(e) => {
                report.errors.push(("maps".into(), e));
                return report;
            }
        };
        // Only workloads with nothing registered: catches a proxy that was
        // listening before sockops could see it, without rescanning /proc
        // for a family the proxy never uses. One walk of /proc for all.
        let unregistered: Vec<&Desired> =
            desired.iter().filter(|d| d.policy.inbound && !registered.contains(&d.cookie)).collect();
        if !unregistered.is_empty() {
            let wanted: Vec<(&Path, u16)> =
                unregistered.iter().map(|d| (d.netns.as_path(), d.policy.inbound_port)).collect();
            match crate::sys::listeners::find_listeners(&wanted) {
                Ok(found) => {
                    for (d, fds) in unregistered.into_iter().zip(found) {
                        if let Err(e) = fds.and_then(|fds| self.register_listeners(d.cookie, fds)) {
                            report.errors.push((d.name.clone(), e.context("finding the proxy's inbound listener")));
                        }
                    }
                }
                Err(e) => report.errors.push(("/proc".into(), e.context("finding proxies' inbound listeners"))),
            }
        }
        let pinned: BTreeSet<u64> = current.keys().copied().collect();
        let ops = diff(&pinned, &self.programmed, &self.inbound_links(), desired, keep);
        report.unchanged = ops.unchanged.iter().map(|i| desired[*i].name.clone()).collect();
        // The entries a policy put in the list maps follow from the policy
        // and its id, so a policy this agent wrote (in `programmed`) is
        // retired exactly; any other (adopted from an earlier agent, or a
        // failed write) makes the pass sweep the maps whole.
        let mut whole = self.last_full_sweep.is_none_or(|t| t.elapsed() >= FULL_SWEEP_EVERY);
        // The entries of the policy pinned for `cookie`, if any; a policy
        // this agent did not write means a whole sweep.
        let old_entries = |cookie: u64, programmed: &StdHashMap<u64, Policy>, whole: &mut bool| -> Option<MapEntries> {
            let id = current.get(&cookie)?.policy_id;
            let p = programmed.get(&cookie);
            *whole |= p.is_none();
            Some(map_entries(p?, id))
        };
        let mut retired = Vec::new();
        for cookie in ops.remove {
            let old = old_entries(cookie, &self.programmed, &mut whole);
            match self.maps.remove_workload(cookie) {
                Ok(()) => {
                    self.programmed.remove(&cookie);
                    self.names.remove(&cookie);
                    retired.extend(old);
                    report.removed += 1;
                }
                Err(e) => report.errors.push((format!("netns cookie {cookie}"), e)),
            }
        }
        // Removed workloads go first, with their list entries: a full map
        // must not refuse a new workload for the space of departed ones.
        if report.removed > 0 {
            self.clear_retired(&std::mem::take(&mut retired), whole, &mut report);
        }
        for d in ops.program.iter().map(|i| &desired[*i]) {
            let old = old_entries(d.cookie, &self.programmed, &mut whole);
            match self.maps.program_workload(d.cookie, &d.policy) {
                Ok(_) => {
                    // Switched: the old entries are out of force.
                    retired.extend(old);
                    if let Err(e) = ensure_inbound(&self.pin_dir, d) {
                        report.errors.push((
                            d.name.clone(),
                            e.context(format!("workload `{}`: inbound redirection not attached", d.name)),
                        ));
                    }
                    self.programmed.insert(d.cookie, d.policy.clone());
                    report.programmed.push(d.name.clone());
                }
                Err(e) => {
                    // The old policy stays in force; whatever the failed
                    // write left is found by a whole sweep.
                    whole = true;
                    report.errors.push((
                        d.name.clone(),
                        e.context(format!("workload `{}`: policy not applied, previous policy kept", d.name)),
                    ))
                }
            }
        }
        self.clear_retired(&retired, whole, &mut report);
        // The names `inspect` shows, for every workload in force with this
        // pass's input (a rename alone changes no policy).
        for d in desired.iter().filter(|d| self.programmed.contains_key(&d.cookie)) {
            if self.names.get(&d.cookie) == Some(&d.name) {
                continue;
            }
            match self.maps.set_name(d.cookie, &d.name) {
                Ok(()) => {
                    self.names.insert(d.cookie, d.name.clone());
                }
                Err(e) => report
                    .errors
                    .push((d.name.clone(), e.context(format!("workload `{}`: recording its name", d.name)))),
            }
        }
        // sk_lookup links of workloads that are gone (or no longer inbound).
        let inbound: BTreeSet<u64> =
            desired.iter().filter(|d| d.policy.inbound).map(|d| d.cookie).chain(keep.iter().copied()).collect();
        if let Ok(dir) = std::fs::read_dir(self.pin_dir.join("netns")) {
            for e in dir.flatten() {
                let stale =
                    e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()).is_none_or(|c| !inbound.contains(&c));
                if stale {
                    match std::fs::remove_file(e.path()) {
                        Ok(()) => report.removed_links += 1,
                        Err(err) => report.errors.push((e.path().display().to_string(), err.into())),
                    }
                }
            }
        }
        report
    }

    /// Deletes the entries of retired policies: exactly `retired`, or,
    /// with `whole`, every entry of an id no workload refers to.
    fn clear_retired(&mut self, retired: &[MapEntries], whole: bool, report: &mut ApplyReport) {
        let mut record = |r: Result<usize>| match r {
            Ok(n) => report.swept += n,
            Err(e) => report.errors.push(("sweep".into(), e)),
        };
        if whole {
            let r = self.maps.sweep();
            if r.is_ok() {
                self.last_full_sweep = Some(Instant::now());
            }
            record(r);
        } else {
            for e in retired {
                record(self.maps.retire(e));
            }
        }
    }

    /// Cookies whose namespace has a pinned sk_lookup link.
    fn inbound_links(&self) -> BTreeSet<u64> {
        std::fs::read_dir(self.pin_dir.join("netns"))
            .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Registers a proxy inbound listener that already existed when the
    /// workload was programmed (sockops sees only new `listen()` calls).
    fn register_listeners(&mut self, cookie: u64, fds: crate::sys::listeners::Listeners) -> Result<()> {
        for (family, fd) in fds {
            let key = ListenerKey { netns_cookie: cookie, family: u32::from(family), _pad: 0 };
            self.maps.register_listener(key, &fd)?;
        }
        Ok(())
    }
}
