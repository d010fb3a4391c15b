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
use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    fs::File,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, SockHash},
    programs::{CgroupSockAddr, CgroupSockopt, SkLookup, SkMsg, SockOps},
    Ebpf, EbpfLoader,
};
use redirector_common::{
    counter, map_names, prog_names, CidrData, ListenerKey, Meta, OrigDst, PortKey, SockKey, TupleKey, WorkloadPolicy,
    LAYOUT_VERSION, MAX_ACCEL_SOCKETS, MAX_CIDR_RULES, MAX_LISTENERS, MAX_PORT_RULES, MAX_TRACKED_CONNECTIONS,
    MAX_WORKLOADS,
};

pub use redirector_policy::{diff, Desired, Ops};
use redirector_policy::{map_entries, MapEntries, Policy};

use crate::sys::{
    bpf::{self, AttachType},
    mounts,
};

/// The eBPF object built by build.rs (empty with AYA_BUILD_SKIP=1).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector-ebpf"));

/// Environment variable naming an eBPF object file to load instead of the
/// embedded one (another build of the programs with the same map layout).
pub const EBPF_OBJECT_ENV: &str = "REDIRECTOR_EBPF_OBJECT";

/// The object to load: the file named by `REDIRECTOR_EBPF_OBJECT` (read
/// once per process: every sk_lookup attachment loads the object again),
/// else the one built into this binary.
fn ebpf_object() -> Result<&'static [u8]> {
    static FROM_ENV: std::sync::OnceLock<std::result::Result<Vec<u8>, String>> = std::sync::OnceLock::new();
    let Some(path) = std::env::var_os(EBPF_OBJECT_ENV).filter(|p| !p.is_empty()) else {
        if EBPF_OBJECT.is_empty() {
            bail!("this build has no eBPF object (built with AYA_BUILD_SKIP=1); rebuild with `cargo xtask build`");
        }
        return Ok(EBPF_OBJECT);
    };
    let loaded = FROM_ENV.get_or_init(|| {
        let shown = path.to_string_lossy();
        let bytes =
            std::fs::read(&path).map_err(|e| format!("{EBPF_OBJECT_ENV}={shown}: reading the eBPF object: {e}"))?;
        if !bytes.starts_with(b"\x7fELF") {
            return Err(format!("{EBPF_OBJECT_ENV}={shown}: not an ELF object"));
        }
        tracing::info!("loading the eBPF programs from {EBPF_OBJECT_ENV}={shown}");
        Ok(bytes)
    });
    loaded.as_deref().map_err(|e| anyhow!("{e}"))
}

/// Programs in attach order: the data path's helpers first, connect4 (which
/// starts redirecting) last, so a redirected connection always finds them.
pub const PROGRAMS: [(&str, AttachType); 6] = [
    (prog_names::SOCKOPS, AttachType::SockOps),
    (prog_names::GETSOCKOPT, AttachType::GetSockopt),
    (prog_names::GETPEERNAME4, AttachType::Inet4Getpeername),
    (prog_names::GETPEERNAME6, AttachType::Inet6Getpeername),
    (prog_names::CONNECT4, AttachType::Inet4Connect),
    (prog_names::CONNECT6, AttachType::Inet6Connect),
];

/// Pin of the `sk_lookup` link of the workload with netns `cookie`.
pub fn netns_link_pin_path(pin_dir: &Path, cookie: u64) -> PathBuf {
    pin_dir.join("netns").join(cookie.to_string())
}

pub fn link_pin_path(pin_dir: &Path, prog: &str) -> PathBuf {
    pin_dir.join("links").join(prog)
}

/// Typed handles on the pinned maps.
pub struct Maps {
    meta: Array<MapData, Meta>,
    workloads: HashMap<MapData, u64, WorkloadPolicy>,
    ports: HashMap<MapData, PortKey, u8>,
    cidrs: LpmTrie<MapData, CidrData, u8>,
    tuples: HashMap<MapData, TupleKey, OrigDst>,
    counters: PerCpuArray<MapData, u64>,
    listeners: SockHash<MapData, ListenerKey>,
    accel: SockHash<MapData, SockKey>,
}

fn open_pinned(pin_dir: &Path, name: &str) -> Result<Map> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!("opening pinned map {} (is the agent running, with this --pin-dir?)", path.display())
    })?;
    Map::from_map_data(data).with_context(|| format!("map {}", path.display()))
}

impl Maps {
    /// Opens the maps an agent pinned (for `inspect`, `wait-ready`, tests).
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let maps = Self::from_source(|name| open_pinned(pin_dir, name))?;
        maps.check_layout()?;
        Ok(maps)
    }

    fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Self::from_source(|name| ebpf.take_map(name).ok_or_else(|| anyhow!("eBPF object has no map {name}")))
    }

    fn from_source(mut get: impl FnMut(&str) -> Result<Map>) -> Result<Self> {
        Ok(Self {
            meta: Array::try_from(get(map_names::META)?)?,
            workloads: HashMap::try_from(get(map_names::WORKLOADS)?)?,
            ports: HashMap::try_from(get(map_names::PORTS)?)?,
            cidrs: LpmTrie::try_from(get(map_names::CIDRS)?)?,
            tuples: HashMap::try_from(get(map_names::ORIG_BY_TUPLE)?)?,
            counters: PerCpuArray::try_from(get(map_names::COUNTERS)?)?,
            listeners: SockHash::try_from(get(map_names::LISTENERS)?)?,
            accel: SockHash::try_from(get(map_names::ACCEL_SOCKETS)?)?,
        })
    }

    pub fn meta(&self) -> Result<Meta> {
        Ok(self.meta.get(&0, 0)?)
    }

    fn check_layout(&self) -> Result<()> {
        let meta = self.meta()?;
        if meta.layout_version != LAYOUT_VERSION {
            bail!(
                "pinned maps have layout version {} but this agent uses version {}; \
                 run `redirector cleanup` with the old agent's version (or remove the pin directory) first",
                meta.layout_version,
                LAYOUT_VERSION
            );
        }
        Ok(())
    }

    pub fn workloads(&self) -> Result<BTreeMap<u64, WorkloadPolicy>> {
        let mut out = BTreeMap::new();
        for item in self.workloads.iter() {
            let (k, v) = item?;
            out.insert(k, v);
        }
        Ok(out)
    }

    pub fn workload(&self, cookie: u64) -> Result<Option<WorkloadPolicy>> {
        match self.workloads.get(&cookie, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn port_keys(&self) -> Result<Vec<PortKey>> {
        Ok(self.ports.keys().collect::<Result<Vec<_>, _>>()?)
    }

    /// Registered inbound listeners (netns cookie, family).
    pub fn listener_keys(&self) -> Result<Vec<ListenerKey>> {
        Ok(self.listeners.keys().collect::<Result<Vec<_>, _>>()?)
    }

    /// Keys of the sockets in `ACCEL_SOCKETS` (both ends of every
    /// accelerated connection open now).
    pub fn accel_socket_keys(&self) -> Result<Vec<SockKey>> {
        Ok(self.accel.keys().collect::<Result<Vec<_>, _>>()?)
    }

    /// Puts a listening socket (an fd we hold) into `LISTENERS`.
    pub fn register_listener(&mut self, key: ListenerKey, fd: &impl std::os::fd::AsRawFd) -> Result<()> {
        self.listeners.insert(key, fd.as_raw_fd(), 0).map_err(|e| full_or(e, map_names::LISTENERS, MAX_LISTENERS, 1))
    }

    pub fn cidr_keys(&self) -> Result<Vec<(u32, CidrData)>> {
        let mut out = Vec::new();
        for k in self.cidrs.keys() {
            let k = k?;
            out.push((k.prefix_len(), k.data()));
        }
        Ok(out)
    }

    pub fn tracked_connections(&self) -> Result<Vec<(TupleKey, OrigDst)>> {
        Ok(self.tuples.iter().collect::<Result<Vec<_>, _>>()?)
    }

    /// Sum over CPUs of each counter, by name.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        counter::NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let v = self.counters.get(&(i as u32), 0)?;
                Ok((*name, v.iter().sum()))
            })
            .collect()
    }

    /// Sum over CPUs of one counter (an index of `counter`).
    pub fn counter(&self, index: u32) -> Result<u64> {
        Ok(self.counters.get(&index, 0)?.iter().sum())
    }

    fn alloc_policy_id(&mut self) -> Result<u32> {
        let mut meta = self.meta()?;
        meta.last_policy_id = meta.last_policy_id.wrapping_add(1).max(1);
        self.meta.set(0, meta, 0).context("writing RDR_META")?;
        Ok(meta.last_policy_id)
    }

    fn insert_entries(&mut self, e: &MapEntries) -> Result<()> {
        for (n, key) in e.ports.iter().enumerate() {
            self.ports
                .insert(key, 1, 0)
                .map_err(|err| full_or(err, map_names::PORTS, MAX_PORT_RULES, e.ports.len() - n))?;
        }
        for (n, (bits, data)) in e.cidrs.iter().enumerate() {
            self.cidrs
                .insert(&Key::new(*bits, *data), 1, 0)
                .map_err(|err| full_or(err, map_names::CIDRS, MAX_CIDR_RULES, e.cidrs.len() - n))?;
        }
        Ok(())
    }

    /// Deletes list entries whose policy id no workload refers to (entries
    /// of replaced policies, of removed workloads, or of an agent that died
    /// mid-update).
    fn sweep(&mut self) -> Result<usize> {
        let live: BTreeSet<u32> = self.workloads()?.values().map(|w| w.policy_id).collect();
        let mut removed = 0;
        for key in self.port_keys()? {
            if !live.contains(&key.policy_id) {
                self.ports.remove(&key).or_else(ignore_missing)?;
                removed += 1;
            }
        }
        for (bits, data) in self.cidr_keys()? {
            if !live.contains(&u32::from_be_bytes(data.policy_id_be)) {
                self.cidrs.remove(&Key::new(bits, data)).or_else(ignore_missing)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Deletes exactly the list entries of a policy that is no longer in
    /// force (its id switched away or its workload removed); entries
    /// already gone are fine. The count of entries deleted.
    fn retire(&mut self, e: &MapEntries) -> Result<usize> {
        let gone = |r: Result<(), MapError>| -> Result<usize> {
            match r {
                Ok(()) => Ok(1),
                Err(e) => ignore_missing(e).map(|()| 0).map_err(Into::into),
            }
        };
        let mut removed = 0;
        for key in &e.ports {
            removed += gone(self.ports.remove(key))?;
        }
        for (bits, data) in &e.cidrs {
            removed += gone(self.cidrs.remove(&Key::new(*bits, *data)))?;
        }
        Ok(removed)
    }

    /// Programs one workload's policy make-before-break: its lists go in
    /// under a fresh policy id, then its `WORKLOADS` entry switches to that
    /// id in one update. On any failure the new entries are removed and the
    /// old policy stays in force.
    pub fn program_workload(&mut self, cookie: u64, policy: &Policy) -> Result<u32> {
        let id = self.alloc_policy_id()?;
        let entries = map_entries(policy, id);
        let result = self.insert_entries(&entries).and_then(|()| {
            self.workloads
                .insert(cookie, entries.workload, 0)
                .map_err(|e| full_or(e, map_names::WORKLOADS, MAX_WORKLOADS, 1))
        });
        if let Err(e) = result {
            // Roll back whatever went in under the new id.
            for key in &entries.ports {
                let _ = self.ports.remove(key);
            }
            for (bits, data) in &entries.cidrs {
                let _ = self.cidrs.remove(&Key::new(*bits, *data));
            }
            return Err(e);
        }
        Ok(id)
    }

    pub fn remove_workload(&mut self, cookie: u64) -> Result<()> {
        self.workloads.remove(&cookie).or_else(ignore_missing)?;
        for family in [redirector_common::AF_INET, redirector_common::AF_INET6] {
            let key = ListenerKey { netns_cookie: cookie, family: u32::from(family), _pad: 0 };
            self.listeners.remove(&key).or_else(ignore_missing)?;
        }
        Ok(())
    }
}

fn ignore_missing(e: MapError) -> Result<(), MapError> {
    match e {
        MapError::KeyNotFound => Ok(()),
        MapError::SyscallError(ref s) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        e => Err(e),
    }
}

/// A map refused an entry because it is full (nothing was evicted).
#[derive(Debug)]
pub struct MapFull {
    pub map: String,
    pub capacity: u32,
    pub still_needed: usize,
}

impl std::fmt::Display for MapFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "map {} is full (capacity {}); {} more entries did not fit, nothing was evicted",
            self.map, self.capacity, self.still_needed
        )
    }
}

impl std::error::Error for MapFull {}

impl MapFull {
    /// Whether `e` is a policy map (workloads, ports, CIDRs) refusing a
    /// change: only another input change can make room there, so retrying
    /// the same input would only rewrite and roll back the same entries.
    pub fn is_policy_map_full(e: &anyhow::Error) -> bool {
        e.chain().any(|c| c.downcast_ref::<MapFull>().is_some_and(|f| f.map != map_names::LISTENERS))
    }
}

fn full_or(err: MapError, map: &str, capacity: u32, still_needed: usize) -> anyhow::Error {
    let full = matches!(
        &err,
        MapError::SyscallError(s)
            if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG) | Some(libc::ENOSPC) | Some(libc::ENOMEM))
    );
    if full {
        anyhow::Error::new(MapFull { map: map.to_owned(), capacity, still_needed })
    } else {
        anyhow::Error::new(err).context(format!("writing map {map}"))
    }
}

/// Data-path insertions that failed because a map was full, found by the
/// eBPF counters: the programs cannot log, so the agent checks these on
/// every tick and reports each increase (error log and metric).
#[derive(Debug, Default)]
pub struct FullMapWatch {
    seen: Option<[u64; 4]>,
}

impl FullMapWatch {
    const WATCHED: [(u32, &'static str, u32, &'static str); 4] = [
        (
            counter::TUPLE_INSERT_FAILED,
            map_names::ORIG_BY_TUPLE,
            MAX_TRACKED_CONNECTIONS,
            "redirected connections could not record their original destination (their proxy cannot learn it)",
        ),
        (
            counter::LISTENER_INSERT_FAILED,
            map_names::LISTENERS,
            MAX_LISTENERS,
            "proxy inbound listeners could not be registered (inbound connections to them are dropped, not let by)",
        ),
        (
            counter::SK_STORAGE_FAILED,
            map_names::SOCK_ORIG,
            0,
            "accepted proxy sockets could not store their original destination",
        ),
        (
            counter::ACCEL_SOCKET_ADD_FAILED,
            map_names::ACCEL_SOCKETS,
            MAX_ACCEL_SOCKETS,
            "sockets of accelerated connections stayed on TCP (they work, without acceleration)",
        ),
    ];

    /// One message per counter that grew since the last call (the first
    /// call reports what earlier agents left counted, once).
    pub fn check(&mut self, maps: &Maps) -> Vec<String> {
        let mut now = [0u64; 4];
        for (i, (index, ..)) in Self::WATCHED.iter().enumerate() {
            now[i] = maps.counter(*index).unwrap_or(0);
        }
        let before = self.seen.unwrap_or_default();
        self.seen = Some(now);
        Self::WATCHED
            .iter()
            .enumerate()
            .filter(|(i, _)| now[*i] > before[*i])
            .map(|(i, (_, map, capacity, what))| {
                let size = if *capacity > 0 {
                    format!("map {map} is full (capacity {capacity})")
                } else {
                    format!("map {map} could not grow")
                };
                format!("{size}: {} {what}; nothing was evicted", now[i] - before[i])
            })
            .collect()
    }
}

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
                bail!(
                    "pinned maps in {} have layout version {version} but this agent uses version {LAYOUT_VERSION}; \
                     run `redirector cleanup` with the agent that created them (or remove the pin directory) first",
                    pin_dir.display()
                );
            }
        }
        // aya reuses a pinned map whatever its size: a map pinned by an
        // agent with other capacities (one that died before it stamped its
        // version) must be refused here, not adopted.
        check_pinned_capacities(pin_dir)?;
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> = map_names::PINNED.iter().map(|n| (*n, pin_dir.join(n))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object).context("loading the eBPF object")?;
        // sk_msg goes on its map before sockops can put a socket there.
        let accel_unavailable = attach_sk_msg(&mut ebpf).err().map(|e| format!("{e:#}"));
        if let Some(why) = &accel_unavailable {
            log::warn!("sockmap acceleration unavailable (workloads asking for it are refused): {why}");
        }
        let cgroup_file =
            File::open(cgroup).with_context(|| format!("opening cgroup directory {}", cgroup.display()))?;
        for (name, ty) in PROGRAMS {
            let prog = ebpf.program_mut(name).ok_or_else(|| anyhow!("eBPF object has no program {name}"))?;
            let fd = match ty {
                AttachType::SockOps => {
                    let p: &mut SockOps = prog.try_into()?;
                    p.load().with_context(|| format!("loading program {name}"))?;
                    p.fd()?.as_fd().try_clone_to_owned()?
                }
                AttachType::GetSockopt => {
                    let p: &mut CgroupSockopt = prog.try_into()?;
                    p.load().with_context(|| format!("loading program {name}"))?;
                    p.fd()?.as_fd().try_clone_to_owned()?
                }
                AttachType::Inet4Connect
                | AttachType::Inet4Getpeername
                | AttachType::Inet6Connect
                | AttachType::Inet6Getpeername => {
                    let p: &mut CgroupSockAddr = prog.try_into()?;
                    p.load().with_context(|| format!("loading program {name}"))?;
                    p.fd()?.as_fd().try_clone_to_owned()?
                }
                AttachType::SkLookup => bail!("{name} is attached per network namespace"),
                AttachType::SkMsgVerdict => bail!("{name} is attached to its sockhash"),
            };
            let link = bpf::link_create(fd.as_fd(), cgroup_file.as_fd(), ty)
                .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
            let final_path = link_pin_path(pin_dir, name);
            // bpffs rejects names with dots.
            let tmp_path = pin_dir.join("links").join(format!("{name}-next"));
            let _ = std::fs::remove_file(&tmp_path);
            bpf::obj_pin(&link, &tmp_path)?;
            // Atomically replaces the previous agent's link pin; the old
            // link detaches once nothing refers to it.
            std::fs::rename(&tmp_path, &final_path)
                .with_context(|| format!("renaming {} to {}", tmp_path.display(), final_path.display()))?;
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
            programmed: StdHashMap::new(),
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
                    if let Err(e) = self.ensure_inbound(d) {
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

    /// Attaches an `sk_lookup` instance bound to this workload's netns
    /// cookie to its network namespace, unless one is pinned already.
    fn ensure_inbound(&mut self, d: &Desired) -> Result<()> {
        let pin = netns_link_pin_path(&self.pin_dir, d.cookie);
        if !d.policy.inbound || bpf::obj_get(&pin).is_ok() {
            return Ok(());
        }
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> = map_names::PINNED.iter().map(|n| (*n, self.pin_dir.join(n))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader.override_global("RDR_SELF_NETNS", &d.cookie, true);
        let object = ebpf_object()?;
        let mut ebpf = loader.load(object).context("loading the eBPF object for sk_lookup")?;
        let prog: &mut SkLookup = ebpf
            .program_mut(prog_names::SK_LOOKUP)
            .ok_or_else(|| anyhow!("eBPF object has no program {}", prog_names::SK_LOOKUP))?
            .try_into()?;
        prog.load().with_context(|| format!("loading program {}", prog_names::SK_LOOKUP))?;
        let netns = File::open(&d.netns).with_context(|| format!("opening network namespace {}", d.netns.display()))?;
        let link = bpf::link_create(prog.fd()?.as_fd(), netns.as_fd(), AttachType::SkLookup)
            .with_context(|| format!("attaching {} to {}", prog_names::SK_LOOKUP, d.netns.display()))?;
        std::fs::create_dir_all(self.pin_dir.join("netns"))?;
        bpf::obj_pin(&link, &pin)?;
        Ok(())
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

/// Loads `sk_msg` and attaches it to the `ACCEL_SOCKETS` sockhash,
/// replacing the program a previous agent attached there (one slot per map
/// and attach type: never two). Attached with `BPF_PROG_ATTACH`, not a
/// link: the map keeps it, so it outlives this agent like the pinned links.
fn attach_sk_msg(ebpf: &mut Ebpf) -> Result<()> {
    let name = prog_names::SK_MSG;
    let prog: &mut SkMsg =
        ebpf.program_mut(name).ok_or_else(|| anyhow!("eBPF object has no program {name}"))?.try_into()?;
    prog.load().with_context(|| format!("loading program {name}"))?;
    let prog_fd = prog.fd()?.as_fd().try_clone_to_owned()?;
    let map = match ebpf.map(map_names::ACCEL_SOCKETS) {
        Some(Map::SockHash(m)) => m,
        _ => bail!("eBPF object has no sockhash {}", map_names::ACCEL_SOCKETS),
    };
    bpf::map_prog_attach(prog_fd.as_fd(), map.fd().as_fd(), AttachType::SkMsgVerdict)
        .with_context(|| format!("attaching {name} to map {}", map_names::ACCEL_SOCKETS))
}

/// Splits off the workloads that ask for sockmap acceleration when it is
/// `unavailable` (with the reason), each with an error naming the setting.
pub fn refuse_unavailable_acceleration(
    desired: &[Desired],
    unavailable: Option<&str>,
) -> (Vec<Desired>, Vec<(Desired, anyhow::Error)>) {
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for d in desired {
        match unavailable {
            Some(why) if d.policy.acceleration == redirector_policy::Acceleration::Sockmap => refused.push((
                d.clone(),
                anyhow!(
                    "workload `{}`: `mesh.acceleration: sockmap` is not available on this kernel ({why}); \
                     policy not applied, previous policy kept (set `mesh.acceleration: none`)",
                    d.name
                ),
            )),
            _ => ok.push(d.clone()),
        }
    }
    (ok, refused)
}

/// Detaches the `sk_msg` program from the pinned `ACCEL_SOCKETS` map (the
/// map's removal would detach it too, but only once no process holds the
/// map open). Kernels before 5.19 cannot list a map's programs: then the
/// removal of the pin does it.
fn detach_sk_msg(pin_dir: &Path) -> Result<usize> {
    let path = pin_dir.join(map_names::ACCEL_SOCKETS);
    let Ok(map) = bpf::obj_get(&path) else { return Ok(0) };
    let Ok(ids) = bpf::attached_ids(map.as_fd(), AttachType::SkMsgVerdict) else { return Ok(0) };
    let mut n = 0;
    for id in ids {
        if let Ok(prog) = bpf::prog_by_id(id) {
            bpf::map_prog_detach(prog.as_fd(), map.as_fd(), AttachType::SkMsgVerdict)
                .with_context(|| format!("detaching program {id} from {}", path.display()))?;
            n += 1;
        }
    }
    Ok(n)
}

/// Refuses pinned maps whose capacity is not this build's.
fn check_pinned_capacities(pin_dir: &Path) -> Result<()> {
    let expected = CAPACITIES.iter().copied().chain([(map_names::META, 1), (map_names::COUNTERS, counter::COUNT)]);
    for (name, capacity) in expected {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let pinned = aya::maps::MapInfo::from_pin(&path)
            .with_context(|| format!("reading the pinned map {}", path.display()))?
            .max_entries();
        if pinned != capacity {
            bail!(
                "pinned map {} has capacity {pinned} but this agent's {name} has {capacity} (another map layout); \
                 run `redirector cleanup` with the agent that created it (or remove the pin directory) first",
                path.display()
            );
        }
    }
    Ok(())
}

/// Detaches and unpins everything under `pin_dir`. Returns what it removed.
pub fn cleanup(pin_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !pin_dir.exists() {
        return Ok(removed);
    }
    detach_sk_msg(pin_dir)?;
    for sub in ["links", "netns"] {
        let links = pin_dir.join(sub);
        if links.exists() {
            for e in std::fs::read_dir(&links)? {
                let p = e?.path();
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
                removed.push(p);
            }
            std::fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
        }
    }
    for e in std::fs::read_dir(pin_dir)? {
        let p = e?.path();
        if p.is_dir() {
            bail!("unexpected directory {} in the pin directory; not removing it", p.display());
        }
        std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        removed.push(p);
    }
    std::fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    Ok(removed)
}

/// Whether every program's link is pinned (i.e. attached).
pub fn links_pinned(pin_dir: &Path) -> Vec<(&'static str, bool)> {
    PROGRAMS.iter().map(|(name, _)| (*name, bpf::obj_get(&link_pin_path(pin_dir, name)).is_ok())).collect()
}

pub const CAPACITIES: [(&str, u32); 6] = [
    (map_names::WORKLOADS, MAX_WORKLOADS),
    (map_names::PORTS, MAX_PORT_RULES),
    (map_names::CIDRS, MAX_CIDR_RULES),
    (map_names::ORIG_BY_TUPLE, MAX_TRACKED_CONNECTIONS),
    (map_names::LISTENERS, MAX_LISTENERS),
    (map_names::ACCEL_SOCKETS, MAX_ACCEL_SOCKETS),
];

/// The init-container gate of the standalone agent (`redirector wait-ready`):
/// waits until the workload in namespace `ns` (default: this process's) is
/// programmed, its programs attached and, if it has inbound redirection, its
/// sk_lookup link pinned; returns the line to print. Fails closed on
/// timeout, naming what is missing.
pub fn wait_ready(ns: Option<&Path>, pin_dir: &Path, timeout: Duration) -> Result<String> {
    let (cookie, shown) = match &ns {
        Some(p) => (crate::sys::netns::netns_cookie(p)?, p.display().to_string()),
        None => (crate::sys::netns::current_netns_cookie()?, "this process's network namespace".to_string()),
    };
    let deadline = Instant::now() + timeout;
    loop {
        let last_err: String = match Maps::open(pin_dir).and_then(|m| m.workload(cookie)) {
            Ok(Some(w)) => {
                let missing: Vec<&str> =
                    links_pinned(pin_dir).into_iter().filter(|(_, ok)| !ok).map(|(n, _)| n).collect();
                // Inbound capture is part of "programmed": without it a
                // connection could reach the application around the proxy.
                let inbound_missing = w.flags & redirector_common::flags::IN_ENABLED != 0
                    && !netns_link_pin_path(pin_dir, cookie).exists();
                if missing.is_empty() && !inbound_missing {
                    return Ok(format!(
                        "ready: {shown} (netns cookie {cookie}) is programmed with policy #{}",
                        w.policy_id
                    ));
                }
                if missing.is_empty() {
                    "inbound capture (sk_lookup) not attached to the namespace yet".to_string()
                } else {
                    format!("programs not attached: {}", missing.join(", "))
                }
            }
            Ok(None) => "the agent has no policy for this namespace yet".into(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "{shown} (netns cookie {cookie}) not programmed after {timeout:?}: {last_err}; \
                 is the agent running with --pin-dir {} and is this workload in its config?",
                pin_dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
