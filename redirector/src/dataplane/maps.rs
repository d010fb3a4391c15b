//! Typed handles on the maps: the reads `inspect`, `wait-ready` and the
//! tests use, and the generational writes (a policy's list entries go in
//! under a fresh id, then its workload switches to it; retired ids are
//! deleted exactly or swept).
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, SockHash},
    Ebpf,
};
use redirector_common::{
    counter, map_names, CidrData, ListenerKey, Meta, OrigDst, PortKey, SockKey, TupleKey, WorkloadName, WorkloadPolicy,
    LAYOUT_VERSION, MAX_CIDR_RULES, MAX_LISTENERS, MAX_NAME_BYTES, MAX_PORT_RULES, MAX_WORKLOADS,
};
use redirector_policy::{map_entries_with, MapEntries, Policy};

use crate::error::{MapFull, PinnedLayout};

/// Typed handles on the pinned maps.
pub struct Maps {
    pub(super) meta: Array<MapData, Meta>,
    workloads: HashMap<MapData, u64, WorkloadPolicy>,
    ports: HashMap<MapData, PortKey, u8>,
    cidrs: LpmTrie<MapData, CidrData, u8>,
    tuples: HashMap<MapData, TupleKey, OrigDst>,
    counters: PerCpuArray<MapData, u64>,
    listeners: SockHash<MapData, ListenerKey>,
    accel: SockHash<MapData, SockKey>,
    names: HashMap<MapData, u64, WorkloadName>,
}

pub(super) fn open_pinned(pin_dir: &Path, name: &str) -> Result<Map> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!("opening pinned map {} (is the agent running, with this --pin-dir?)", path.display())
    })?;
    Map::from_map_data(data).with_context(|| format!("map {}", path.display()))
}

impl Maps {
    /// Opens the maps an agent pinned (for `inspect`, `wait-ready`, tests).
    /// A pin directory that is not on bpffs here (e.g. under `ip netns
    /// exec`, which hides /sys/fs/bpf) is refused saying so.
    pub fn open(pin_dir: &Path) -> Result<Self> {
        crate::sys::mounts::require_bpffs(pin_dir, crate::sys::mounts::PinUse::Existing)?;
        let maps = Self::from_source(|name| open_pinned(pin_dir, name))?;
        maps.check_layout()?;
        Ok(maps)
    }

    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self> {
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
            names: HashMap::try_from(get(map_names::NAMES)?)?,
        })
    }

    pub fn meta(&self) -> Result<Meta> {
        Ok(self.meta.get(&0, 0)?)
    }

    pub(super) fn check_layout(&self) -> Result<()> {
        let meta = self.meta()?;
        if meta.layout_version != LAYOUT_VERSION {
            return Err(PinnedLayout::Version { found: meta.layout_version, expected: LAYOUT_VERSION }.into());
        }
        Ok(())
    }

    /// Every pinned workload entry, read in batches (one pass reads them
    /// all: at 10,000 workloads, 20,000 calls one entry at a time).
    pub fn workloads(&self) -> Result<BTreeMap<u64, WorkloadPolicy>> {
        use aya::maps::IterableMap as _;
        use std::os::fd::AsFd as _;
        let fd = self.workloads.map().fd().as_fd();
        let entries = crate::sys::bpf::lookup_batch::<u64, WorkloadPolicy>(fd)
            .with_context(|| format!("reading {}", map_names::WORKLOADS))?;
        Ok(entries.into_iter().collect())
    }

    pub fn workload(&self, cookie: u64) -> Result<Option<WorkloadPolicy>> {
        match self.workloads.get(&cookie, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Workload names by netns cookie (`…` marks a name cut to fit).
    pub fn names(&self) -> Result<BTreeMap<u64, String>> {
        let mut out = BTreeMap::new();
        for item in self.names.iter() {
            let (cookie, n) = item?;
            out.insert(cookie, decode_name(&n));
        }
        Ok(out)
    }

    /// Records the name of a programmed workload (what `inspect` shows).
    pub fn set_name(&mut self, cookie: u64, name: &str) -> Result<()> {
        self.names.insert(cookie, encode_name(name), 0).map_err(|e| full_or(e, map_names::NAMES, MAX_WORKLOADS, 1))
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

    /// Hands out `n` fresh ids (one write of `META`); the first.
    fn alloc_ids(&mut self, n: u32) -> Result<u32> {
        let mut meta = self.meta()?;
        let mut first = meta.last_policy_id.wrapping_add(1).max(1);
        if first.checked_add(n - 1).is_none() {
            first = 1;
        }
        meta.last_policy_id = first + (n - 1);
        self.meta.set(0, meta, 0).context("writing RDR_META")?;
        Ok(first)
    }

    fn insert_entries(&mut self, e: &Entries) -> Result<()> {
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
    /// mid-update), and the names of namespaces that are no workload.
    pub(super) fn sweep(&mut self) -> Result<usize> {
        let workloads = self.workloads()?;
        let live = live_ids(&workloads);
        let mut removed = 0;
        let named = self.names.keys().collect::<Result<Vec<u64>, _>>()?;
        for cookie in named.into_iter().filter(|c| !workloads.contains_key(c)) {
            self.names.remove(&cookie).or_else(ignore_missing)?;
        }
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

    /// Deletes exactly these entries (of an id no workload names any
    /// more); entries already gone are fine. The count deleted.
    pub(super) fn retire(&mut self, e: &Entries) -> Result<usize> {
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

    /// Programs one workload's policy make-before-break: its lists under
    /// `lists` (an id already holding exactly these lists) or, with None,
    /// under a fresh id they are written to; its own addresses likewise
    /// under `local`; then its `WORKLOADS` entry switches to those ids in
    /// one update. On any failure what went in under fresh ids is removed
    /// and the old policy stays in force.
    pub fn program_workload(
        &mut self,
        cookie: u64,
        policy: &Policy,
        lists: Option<u32>,
        local: Option<u32>,
    ) -> Result<Written> {
        let needs_local = !policy.own_addresses().is_empty();
        let fresh = u32::from(lists.is_none()) + u32::from(needs_local && local.is_none());
        let first = if fresh > 0 { self.alloc_ids(fresh)? } else { 0 };
        let lists_id = lists.unwrap_or(first);
        let local_id = match (needs_local, local) {
            (false, _) => 0,
            (true, Some(id)) => id,
            (true, None) => first + u32::from(lists.is_none()),
        };
        let e = map_entries_with(policy, lists_id, local_id);
        let mut new = Entries::default();
        if lists.is_none() {
            new.extend(&Entries::lists(&e));
        }
        if local.is_none() {
            new.extend(&Entries::local(&e));
        }
        let result = self.insert_entries(&new).and_then(|()| {
            self.workloads
                .insert(cookie, e.workload, 0)
                .map_err(|err| full_or(err, map_names::WORKLOADS, MAX_WORKLOADS, 1))
        });
        if let Err(err) = result {
            // Roll back whatever went in under the fresh ids.
            let _ = self.retire(&new);
            return Err(err);
        }
        Ok(Written { lists_id, local_id, written: new.ports.len() + new.cidrs.len() })
    }

    pub fn remove_workload(&mut self, cookie: u64) -> Result<()> {
        self.workloads.remove(&cookie).or_else(ignore_missing)?;
        self.names.remove(&cookie).or_else(ignore_missing)?;
        for family in [redirector_common::AF_INET, redirector_common::AF_INET6] {
            let key = ListenerKey { netns_cookie: cookie, family: u32::from(family), _pad: 0 };
            self.listeners.remove(&key).or_else(ignore_missing)?;
        }
        Ok(())
    }
}

/// The ids pinned workloads name: their lists' and their own addresses'.
pub(super) fn live_ids(workloads: &BTreeMap<u64, WorkloadPolicy>) -> BTreeSet<u32> {
    workloads.values().flat_map(|w| [w.policy_id, w.local_id]).filter(|id| *id != 0).collect()
}

/// What [`Maps::program_workload`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    pub lists_id: u32,
    /// 0: the policy has no own addresses in the maps.
    pub local_id: u32,
    /// List-map entries written.
    pub written: usize,
}

/// Entries of the list maps, as written or retired together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entries {
    pub ports: Vec<PortKey>,
    pub cidrs: Vec<(u32, CidrData)>,
}

impl Entries {
    /// A policy's list entries (under its `policy_id`), shared.
    pub fn lists(e: &MapEntries) -> Self {
        Self { ports: e.ports.clone(), cidrs: e.list_cidrs().copied().collect() }
    }

    /// A policy's own addresses (under its `local_id`).
    pub fn local(e: &MapEntries) -> Self {
        Self { ports: Vec::new(), cidrs: e.local_cidrs().copied().collect() }
    }

    fn extend(&mut self, other: &Self) {
        self.ports.extend_from_slice(&other.ports);
        self.cidrs.extend_from_slice(&other.cidrs);
    }
}

/// A name as `NAMES` keeps it: cut on a character boundary to fit.
fn encode_name(name: &str) -> WorkloadName {
    let mut len = name.len().min(MAX_NAME_BYTES);
    while !name.is_char_boundary(len) {
        len -= 1;
    }
    let mut bytes = [0u8; MAX_NAME_BYTES];
    bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
    WorkloadName { len: len as u32, full_len: name.len().min(u32::MAX as usize) as u32, bytes }
}

fn decode_name(n: &WorkloadName) -> String {
    let len = (n.len as usize).min(MAX_NAME_BYTES);
    let mut s = String::from_utf8_lossy(&n.bytes[..len]).into_owned();
    if n.full_len > n.len {
        s.push('…');
    }
    s
}

fn ignore_missing(e: MapError) -> Result<(), MapError> {
    match e {
        MapError::KeyNotFound => Ok(()),
        MapError::SyscallError(ref s) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        e => Err(e),
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

#[cfg(test)]
mod tests {
    use aya::sys::SyscallError;

    use super::*;

    fn syscall(errno: i32) -> MapError {
        MapError::SyscallError(SyscallError {
            call: "bpf_map_update_elem",
            io_error: std::io::Error::from_raw_os_error(errno),
        })
    }

    #[test]
    fn e2big_enospc_and_enomem_mean_the_map_is_full() {
        for errno in [libc::E2BIG, libc::ENOSPC, libc::ENOMEM] {
            let e = full_or(syscall(errno), map_names::PORTS, MAX_PORT_RULES, 5);
            let full = e.downcast_ref::<MapFull>().unwrap_or_else(|| panic!("errno {errno}: {e:#}"));
            assert_eq!((full.map.as_str(), full.capacity, full.still_needed), (map_names::PORTS, MAX_PORT_RULES, 5));
            assert!(MapFull::is_policy_map_full(&e));
            assert_eq!(
                e.to_string(),
                "map RDR_PORTS is full (capacity 262144); 5 more entries did not fit, nothing was evicted"
            );
        }
    }

    #[test]
    fn a_full_listener_map_is_full_but_not_a_policy_map() {
        let e = full_or(syscall(libc::E2BIG), map_names::LISTENERS, MAX_LISTENERS, 1);
        assert!(e.downcast_ref::<MapFull>().is_some());
        assert!(!MapFull::is_policy_map_full(&e));
    }

    #[test]
    fn other_write_failures_name_the_map_and_are_not_full() {
        for err in [syscall(libc::EPERM), syscall(libc::EINVAL), MapError::KeyNotFound] {
            let e = full_or(err, map_names::WORKLOADS, MAX_WORKLOADS, 1);
            assert!(e.downcast_ref::<MapFull>().is_none(), "{e:#}");
            assert!(!MapFull::is_policy_map_full(&e));
            assert_eq!(e.to_string(), "writing map RDR_WORKLOADS");
            assert!(e.chain().nth(1).is_some_and(|c| c.downcast_ref::<MapError>().is_some()), "{e:#}");
        }
    }

    #[test]
    fn names_are_kept_whole_or_cut_on_a_character_boundary() {
        for name in ["app", "shop/web-7d9f8c6b5-x2x9q", ""] {
            assert_eq!(decode_name(&encode_name(name)), name);
        }
        let longest = format!("{}/{}", "n".repeat(63), "p".repeat(253));
        assert_eq!(decode_name(&encode_name(&longest)), longest);
        // 319 ASCII bytes, then a 2-byte character that does not fit.
        let cut = format!("{}é and more", "a".repeat(MAX_NAME_BYTES - 1));
        let n = encode_name(&cut);
        assert_eq!((n.len as usize, n.full_len as usize), (MAX_NAME_BYTES - 1, cut.len()));
        assert_eq!(decode_name(&n), format!("{}…", "a".repeat(MAX_NAME_BYTES - 1)));
    }

    #[test]
    fn missing_keys_are_ignored_and_other_errors_kept() {
        assert!(ignore_missing(MapError::KeyNotFound).is_ok());
        assert!(ignore_missing(syscall(libc::ENOENT)).is_ok());
        assert!(matches!(ignore_missing(syscall(libc::EPERM)), Err(MapError::SyscallError(_))));
        assert!(matches!(ignore_missing(syscall(libc::E2BIG)), Err(MapError::SyscallError(_))));
    }
}
