//! Applying: the only code that loads programs and writes maps.
//!
//! Layout under the pin directory:
//! `<pin>/RDR_*` — the maps (BTF-typed, `bpftool map dump pinned …`),
//! `<pin>/links/<program>` — the cgroup links; while a link's pin exists
//! the program stays attached, with or without a running agent.
//! `<pin>/netns/<cookie>` — one `sk_lookup` link per workload network
//! namespace (inbound redirection).
//! `<pin>/owner` — a symlink whose target is the owner record (JSON: the
//! agent's pid, its cgroup, its start); the agent holds an exclusive
//! `flock` on `<pin>` itself while it runs (one agent per pin directory).
//! The `sk_msg` program (sockmap acceleration) has no pin of its own: it is
//! attached to the pinned `RDR_ACCEL_SOCKS` map and lives as long as that
//! map; each agent's attach replaces the previous agent's program.
//!
//! - `object`: the eBPF object (embedded or `REDIRECTOR_EBPF_OBJECT`), the
//!   loader, the cgroup programs in attach order;
//! - `attach`: cgroup links, per-namespace `sk_lookup` links, `sk_msg`;
//! - `maps`: typed reads and the generational writes of the maps;
//! - `pins`: the pin layout, capacities, readiness, cleanup;
//! - `lock`: one agent per pin directory (the lock, the owner record);
//! - `cgroup`: the cgroup the links attach to, whether the caller is in
//!   it, other sets of programs on it;
//! - `fullmap`: full maps the data path ran into (its counters);
//! - `migrate`: carrying pinned state of an older map layout across an
//!   upgrade (`<pin>/retired-v<N>/` while it drains);
//! - `node`: the node's own network namespace, never programmed;
//! - here: [`Dataplane`], one apply pass over all of them.
mod attach;
mod cgroup;
mod fullmap;
mod lock;
mod maps;
mod migrate;
mod node;
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
use redirector_policy::{map_entries_with, Policy, SharedLists};

pub use self::{
    attach::refuse_unavailable_acceleration,
    cgroup::{attached_to, check_caller_inside, other_program_sets, AttachedTo},
    fullmap::FullMapWatch,
    lock::{read_owner, Owner, PinDirInUse, PinLock, Wanted, OWNER},
    maps::{Entries, Maps},
    migrate::retired_sets,
    node::{resolve as resolve_node_netns, NodeNetns, NODE_NETNS},
    object::{DNS_PROGRAMS, EBPF_OBJECT_ENV, PROGRAMS},
    pins::{cleanup, cleanup_force, link_pin_path, links_pinned, netns_link_pin_path, wait_ready, CAPACITIES},
};
use self::{
    attach::{
        attach_cgroup_programs, attach_dns_programs, attach_sk_msg, detach_dns_programs, dns_programs_pinned,
        ensure_inbound,
    },
    maps::open_pinned,
    node::refuse_node_namespace,
    object::{ebpf_object, loader},
    pins::{check_pinned_capacities, remove_pins},
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
    /// List-map entries written (a workload whose lists another one has
    /// in force writes none of them).
    pub written: usize,
    pub errors: Vec<(String, anyhow::Error)>,
}

/// A workload as this agent programmed it: its policy and the ids its
/// entry names.
struct InForce {
    policy: Policy,
    lists_id: u32,
    local_id: u32,
}

impl std::borrow::Borrow<Policy> for InForce {
    fn borrow(&self) -> &Policy {
        &self.policy
    }
}

/// The agent's data plane: the loaded object, the maps, and what it last
/// programmed (so unchanged workloads are left alone).
pub struct Dataplane {
    pub pin_dir: PathBuf,
    pub maps: Maps,
    /// Why `mesh.acceleration: sockmap` cannot be honoured here (the
    /// `sk_msg` program did not load or attach); None when it can.
    pub accel_unavailable: Option<String>,
    /// The cookie of the node's own network namespace (`node_netns`):
    /// never programmed, and removed if an earlier agent programmed it.
    pub node_cookie: u64,
    node_netns: String,
    /// What this agent wrote for each workload, under which ids.
    programmed: StdHashMap<u64, InForce>,
    /// The list ids in force and their users (shared by workloads whose
    /// lists are the same).
    shared: SharedLists,
    /// The names this agent recorded in `NAMES` (written again only when
    /// they change).
    names: StdHashMap<u64, String>,
    /// When the list maps were last swept whole (None: not yet). Between
    /// whole sweeps a pass deletes exactly the entries of the policies it
    /// replaced or removed, which it knows from `programmed`.
    last_full_sweep: Option<Instant>,
    /// A layout migration waiting for a workload was reported.
    migration_wait_reported: bool,
    /// This layout's maps hold every workload: older layouts may retire.
    older_layouts_may_retire: bool,
    /// The pin directory's lock, held as long as this data plane lives.
    lock: PinLock,
    /// The cgroup the programs are attached to (DNS capture's are attached
    /// there and detached as workloads ask for it).
    cgroup: PathBuf,
    ebpf: Ebpf,
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
    /// The node's network namespace, which it never programs, is PID 1's
    /// ([`NODE_NETNS`]), or the agent's own where PID 1's cannot be read.
    ///
    /// Refused before anything is pinned when `cgroup` is not a cgroup-v2
    /// directory, when the pin directory is not on bpffs, and when another
    /// agent holds the pin directory ([`PinDirInUse`]). The lock is held
    /// until the data plane is dropped. Warns about other sets of
    /// redirector programs already running for `cgroup`'s processes. A
    /// start that fails after pinning into a pin directory that held no
    /// maps removes what it pinned.
    pub fn load(pin_dir: &Path, cgroup: &Path) -> Result<Self> {
        Self::load_on_node(pin_dir, cgroup, &NodeNetns::Pid1OrOwn)
    }

    /// [`Dataplane::load`] with the node's network namespace named by
    /// `node` (`run --node-netns`).
    pub fn load_on_node(pin_dir: &Path, cgroup: &Path, node: &NodeNetns) -> Result<Self> {
        // Before anything is changed: without it the invariant cannot hold.
        let (node_cookie, node_netns) = resolve_node_netns(node)?;
        let object = ebpf_object()?;
        crate::sys::cgroup::require_cgroup2_dir(cgroup)?;
        mounts::prepare_pin_dir(pin_dir)?;
        let lock = PinLock::acquire(pin_dir, &Owner::agent(cgroup), Wanted::Run)?;
        for w in other_program_sets(cgroup, pin_dir) {
            log::warn!("{w}");
        }
        let fresh = !pin_dir.join(map_names::META).exists();
        match Self::load_locked(pin_dir, cgroup, object, lock, (node_cookie, node_netns)) {
            Ok(dp) => Ok(dp),
            Err(e) if fresh => match remove_pins(pin_dir) {
                Ok(removed) => Err(e.context(format!(
                    "nothing left behind: the {} pins this start made in {} are removed",
                    removed.len(),
                    pin_dir.display()
                ))),
                Err(r) => Err(e.context(format!("removing what this start pinned in {}: {r:#}", pin_dir.display()))),
            },
            Err(e) => Err(e),
        }
    }

    fn load_locked(
        pin_dir: &Path,
        cgroup: &Path,
        object: &[u8],
        lock: PinLock,
        (node_cookie, node_netns): (u64, String),
    ) -> Result<Self> {
        if pin_dir.join(map_names::META).exists() {
            // Refuse before anything is changed if the pinned layout differs
            // (0 means a previous agent died before it stamped the maps).
            let meta: Array<MapData, Meta> = Array::try_from(open_pinned(pin_dir, map_names::META)?)?;
            let version = meta.get(&0, 0)?.layout_version;
            drop(meta);
            if version > LAYOUT_VERSION {
                return Err(PinnedLayout::Newer {
                    pin_dir: pin_dir.to_owned(),
                    found: version,
                    expected: LAYOUT_VERSION,
                }
                .into());
            }
            if version != 0 && version < LAYOUT_VERSION {
                let dir = migrate::retire(pin_dir, version)?;
                // This layout's own links/ (the old one moved with the rest).
                mounts::prepare_pin_dir(pin_dir)?;
                log::warn!(
                    "pinned maps in {} have the older layout {version}: migrating to layout {LAYOUT_VERSION}; the \
                     old programs keep redirecting from {} until this agent has programmed every workload, then \
                     drain",
                    pin_dir.display(),
                    dir.display()
                );
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
        // DNS capture's links a previous agent left: this agent's programs
        // replace them (its first pass detaches them if no workload asks).
        if dns_programs_pinned(pin_dir) {
            attach_dns_programs(&mut ebpf, pin_dir, cgroup)?;
        }
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
            node_cookie,
            node_netns,
            programmed: StdHashMap::new(),
            shared: SharedLists::default(),
            names: StdHashMap::new(),
            last_full_sweep: None,
            migration_wait_reported: false,
            older_layouts_may_retire: false,
            lock,
            cgroup: cgroup.to_owned(),
            ebpf,
        })
    }

    /// Checks that this agent's pins are still there: the pin directory
    /// (the very one it locked), every map and every cgroup link. When one
    /// was removed while the agent runs (`redirector cleanup --force`, or
    /// by hand), its programs are detached and the maps it writes no
    /// longer in force: an error naming every missing pin. The agents exit
    /// on it (non-zero), rather than going on reporting workloads
    /// programmed; a restarted agent attaches and programs them anew.
    pub fn check_pins(&self) -> Result<()> {
        let gone = |what: String| {
            anyhow::anyhow!(
                "{what}: removed while this agent runs (by `redirector cleanup --force`, or by hand), so its \
                 programs are detached and redirection is OFF for every workload; exiting instead of reporting \
                 workloads programmed (start the agent again to attach and program them)"
            )
        };
        if let Err(e) = self.lock.still_held() {
            return Err(gone(format!("{e:#}")));
        }
        let missing: Vec<String> = map_names::PINNED
            .iter()
            .map(|m| self.pin_dir.join(m))
            .chain(PROGRAMS.iter().map(|(p, _)| link_pin_path(&self.pin_dir, p)))
            .filter(|p| p.symlink_metadata().is_err())
            .map(|p| p.display().to_string())
            .collect();
        match missing.as_slice() {
            [] => Ok(()),
            [one] => Err(gone(format!("pin {one} is gone"))),
            many => Err(gone(format!("pins {} are gone", many.join(", ")))),
        }
    }

    /// Makes the maps hold exactly `desired` (plus the workloads in `keep`,
    /// whose last good policy stays while their new input is bad). The
    /// node's own network namespace is never programmed: a workload naming
    /// it is refused with an error, and an entry for it (left by an agent
    /// without this check) is removed, whatever `keep` says.
    pub fn apply(&mut self, desired: &[Desired], keep: &BTreeSet<u64>) -> ApplyReport {
        let mut report = ApplyReport::default();
        let (desired, refused) = refuse_node_namespace(desired, self.node_cookie, &self.node_netns);
        for (d, e) in refused {
            report.errors.push((d.name.clone(), e));
        }
        let mut keep = keep.clone();
        keep.remove(&self.node_cookie);
        let (desired, keep) = (&desired[..], &keep);
        // A workload asking for an acceleration this kernel cannot do is
        // refused (its last good policy stays), never silently slowed.
        let (desired, refused) = refuse_unavailable_acceleration(desired, self.accel_unavailable.as_deref());
        let mut keep = keep.clone();
        for (d, e) in refused {
            keep.insert(d.cookie);
            report.errors.push((d.name.clone(), e));
        }
        let (desired, keep) = (&desired[..], &keep);
        // DNS capture's programs go on before a workload asking for it is
        // programmed; if they cannot, those workloads keep their last
        // good policy (never capture half-done: queries redirected with no
        // reply shown from the nameserver).
        let (desired, refused) = self.ensure_dns_attached(desired);
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
        // What this agent recorded holds only where the pinned entry still
        // names the ids it wrote; anything else (an entry removed or
        // rewritten by another writer) is forgotten and swept, and an id
        // no pinned entry names is never reused (its entries may be gone).
        let stale: Vec<u64> = self
            .programmed
            .iter()
            .filter(|(c, f)| current.get(c).is_none_or(|w| (w.policy_id, w.local_id) != (f.lists_id, f.local_id)))
            .map(|(c, _)| *c)
            .collect();
        let mut whole = !stale.is_empty() || self.last_full_sweep.is_none_or(|t| t.elapsed() >= FULL_SWEEP_EVERY);
        for c in stale {
            if let Some(f) = self.programmed.remove(&c) {
                self.shared.release(&f.policy, f.lists_id);
            }
        }
        self.shared.retain_live(&maps::live_ids(&current));
        let ops = diff(&pinned, &self.programmed, &self.inbound_links(), desired, keep);
        report.unchanged = ops.unchanged.iter().map(|i| desired[*i].name.clone()).collect();
        // The entries a policy put in the list maps follow from the policy
        // and its ids, so what this agent wrote (in `programmed`) is
        // retired exactly, a shared list once its last workload leaves it;
        // any other entry (adopted from an earlier agent, or a failed
        // write) makes the pass sweep the maps whole.
        let mut retired = Vec::new();
        for cookie in ops.remove {
            match self.maps.remove_workload(cookie) {
                Ok(()) => {
                    match self.programmed.remove(&cookie) {
                        Some(old) => retired.extend(self.release(old, 0)),
                        None => whole = true,
                    }
                    self.names.remove(&cookie);
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
            let old = self.programmed.get(&d.cookie);
            whole |= old.is_none() && pinned.contains(&d.cookie);
            // Lists another workload already has in force are not written
            // again; own addresses that did not change keep their id.
            let lists = self.shared.find(&d.policy);
            let local = old
                .filter(|f| f.local_id != 0 && f.policy.own_addresses() == d.policy.own_addresses())
                .map(|f| f.local_id);
            match self.maps.program_workload(d.cookie, &d.policy, lists, local) {
                Ok(w) => {
                    // Switched: the old entries are out of force.
                    self.shared.acquire(&d.policy, w.lists_id);
                    let now = InForce { policy: d.policy.clone(), lists_id: w.lists_id, local_id: w.local_id };
                    if let Some(old) = self.programmed.insert(d.cookie, now) {
                        retired.extend(self.release(old, w.local_id));
                    }
                    report.written += w.written;
                    if let Err(e) = ensure_inbound(&self.pin_dir, d) {
                        report.errors.push((
                            d.name.clone(),
                            e.context(format!("workload `{}`: inbound redirection not attached", d.name)),
                        ));
                    }
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
        self.retire_older_layouts(desired, keep, &report);
        // With no workload in force asking for DNS capture, nothing of it
        // stays attached.
        if !self.programmed.values().any(|f| f.policy.dns.is_some()) && dns_programs_pinned(&self.pin_dir) {
            match detach_dns_programs(&self.pin_dir) {
                Ok(()) => report.removed_links += DNS_PROGRAMS.len(),
                Err(e) => report.errors.push(("DNS capture".into(), e.context("detaching its programs"))),
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

    /// Attaches DNS capture's programs when a workload of `desired` asks
    /// for it and they are not attached; the workloads asking for it that
    /// cannot have it are returned refused, with the reason.
    fn ensure_dns_attached(&mut self, desired: &[Desired]) -> (Vec<Desired>, Vec<(Desired, anyhow::Error)>) {
        let wants = |d: &&Desired| d.policy.dns.is_some();
        if !desired.iter().any(|d| wants(&d)) || dns_programs_pinned(&self.pin_dir) {
            return (desired.to_vec(), Vec::new());
        }
        match attach_dns_programs(&mut self.ebpf, &self.pin_dir, &self.cgroup) {
            Ok(()) => (desired.to_vec(), Vec::new()),
            Err(e) => {
                let why = format!("{e:#}");
                // Whatever was attached goes again.
                let _ = detach_dns_programs(&self.pin_dir);
                let (asking, rest): (Vec<Desired>, Vec<Desired>) = desired.iter().cloned().partition(|d| wants(&d));
                let refused = asking
                    .into_iter()
                    .map(|d| {
                        let e = anyhow::anyhow!(
                            "workload `{}`: DNS capture's programs (cgroup connect4/6 for UDP, sendmsg4/6, recvmsg4/6) could not be                              attached: {why}; policy not applied, previous policy kept",
                            d.name
                        );
                        (d, e)
                    })
                    .collect();
                (rest, refused)
            }
        }
    }

    /// Moves a layout migration on (see `migrate`) once this layout's maps
    /// hold every desired and kept workload: until then the older layout's
    /// programs go on redirecting new connections.
    fn retire_older_layouts(&mut self, desired: &[Desired], keep: &BTreeSet<u64>, report: &ApplyReport) {
        if retired_sets(&self.pin_dir).is_empty() {
            return;
        }
        let programmed: BTreeSet<u64> = self.maps.workloads().map(|w| w.keys().copied().collect()).unwrap_or_default();
        let missing: Vec<String> = desired
            .iter()
            .filter(|d| !programmed.contains(&d.cookie))
            .map(|d| d.name.clone())
            .chain(keep.iter().filter(|c| !programmed.contains(c)).map(|c| format!("netns cookie {c}")))
            .collect();
        if !report.errors.is_empty() || !missing.is_empty() {
            if !self.migration_wait_reported {
                log::warn!(
                    "layout migration waits: the older layout's programs keep redirecting new connections until \
                     every workload is programmed in layout {LAYOUT_VERSION} (not yet: {})",
                    missing.iter().chain(report.errors.iter().map(|(n, _)| n)).cloned().collect::<Vec<_>>().join(", ")
                );
                self.migration_wait_reported = true;
            }
            self.older_layouts_may_retire = false;
            return;
        }
        self.older_layouts_may_retire = true;
        self.drain_retired();
    }

    /// Moves a layout migration on between passes (the agents call it on
    /// their periodic tick): a retired layout is removed once the last
    /// connection it redirected has closed.
    pub fn drain_retired(&mut self) {
        if !self.older_layouts_may_retire {
            return;
        }
        for step in migrate::progress(&self.pin_dir) {
            match step {
                Ok(line) => log::info!("{line}"),
                Err(e) => log::warn!("layout migration: {e:#}"),
            }
        }
        if retired_sets(&self.pin_dir).is_empty() {
            self.older_layouts_may_retire = false;
        }
    }

    /// A workload left the policy `old`: the entries to delete, namely its
    /// lists if it was their last user and its own addresses unless their
    /// id `local_kept` stays in force.
    fn release(&mut self, old: InForce, local_kept: u32) -> Vec<Entries> {
        let mut out = Vec::new();
        if self.shared.release(&old.policy, old.lists_id) {
            out.push(Entries::lists(&map_entries_with(&old.policy, old.lists_id, 0)));
        }
        if old.local_id != 0 && old.local_id != local_kept {
            out.push(Entries::local(&map_entries_with(&old.policy, 0, old.local_id)));
        }
        out
    }

    /// Deletes the entries of retired policies: exactly `retired`, or,
    /// with `whole`, every entry of an id no workload refers to.
    fn clear_retired(&mut self, retired: &[Entries], whole: bool, report: &mut ApplyReport) {
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
