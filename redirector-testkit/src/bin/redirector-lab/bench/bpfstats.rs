//! Per-program cost from the kernel's BPF run-time statistics
//! (`run_time_ns` / `run_cnt` of each program, what `bpftool prog show`
//! prints once `kernel.bpf_stats_enabled` is on).
//!
//! The statistics are switched on with `BPF_ENABLE_STATS` (aya's
//! `enable_stats`) rather than by writing the sysctl: the kernel counts
//! while the returned fd is open and stops by itself when it closes, also
//! if this process dies, so there is no previous value to restore. They
//! are on only in rounds of their own, as they cost something themselves:
//! with them on, `__bpf_prog_run` (include/linux/filter.h) reads
//! `sched_clock()` before and after every run and updates per-CPU
//! counters. Part of that falls inside the run time it reports, part
//! outside; [`floor`] measures the inside part (the run time of a program
//! that does nothing), and the new-connection scenarios the whole (the
//! connection time with the statistics on against off).
use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result};
use aya::{programs::loaded_programs, sys::Stats as BpfStats};
use redirector::{
    dataplane::{link_pin_path, PROGRAMS},
    sys::bpf::{self, AttachType},
};
use redirector_common::{map_names, prog_names};
use serde::Serialize;

use super::sys;

#[derive(Serialize, Clone, Debug)]
pub struct ProgCost {
    pub program: String,
    pub runs: u64,
    pub run_time_ns: u64,
    pub ns_per_run: f64,
    /// Runs per connection (new-connection scenarios) or per transaction
    /// (request/response).
    pub runs_per_op: f64,
}

/// The agent's programs under `pin_dir`: name and kernel program id, read
/// from their pinned links (`prog_id` in the link's fdinfo).
fn programs(pin_dir: &Path) -> Result<Vec<(String, u32)>> {
    let id = |path: &Path| -> Result<u32> {
        let fd = bpf::obj_get(path)?;
        let v = sys::proc_field(&format!("/proc/self/fdinfo/{}", std::os::fd::AsRawFd::as_raw_fd(&fd)), "prog_id")
            .with_context(|| format!("the program of link {}", path.display()))?;
        Ok(v as u32)
    };
    let mut out = Vec::new();
    for (name, _) in PROGRAMS {
        out.push((name.to_string(), id(&link_pin_path(pin_dir, name))?));
    }
    if let Ok(dir) = std::fs::read_dir(pin_dir.join("netns")) {
        for e in dir.flatten() {
            out.push((prog_names::SK_LOOKUP.to_string(), id(&e.path())?));
        }
    }
    // sk_msg hangs on its sockhash, not on a link: ask the map (5.19+).
    if let Ok(map) = bpf::obj_get(&pin_dir.join(map_names::ACCEL_SOCKETS)) {
        let attached = bpf::attached_ids(map.as_fd(), AttachType::SkMsgVerdict);
        for id in attached.unwrap_or_default() {
            out.push((prog_names::SK_MSG.to_string(), id));
        }
    }
    Ok(out)
}

/// (run time ns, run count) by program id.
pub type Counts = BTreeMap<u32, (u64, u64)>;

/// [`Counts`] of the programs `ids`, now.
fn snapshot(ids: &[u32]) -> Result<Counts> {
    let mut out = BTreeMap::new();
    for info in loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        if ids.contains(&info.id()) {
            out.insert(info.id(), (info.run_time().as_nanos() as u64, info.run_count()));
        }
    }
    Ok(out)
}

/// Runs `f` with the statistics on and returns what it returned and
/// (run time ns, run count) of each of `ids` over it.
pub fn counted<T>(ids: &[u32], f: impl FnOnce() -> Result<T>) -> Result<(T, Counts)> {
    let on =
        aya::sys::enable_stats(BpfStats::RunTime).context("turning BPF run-time statistics on (BPF_ENABLE_STATS)")?;
    let before = snapshot(ids)?;
    let out = f()?;
    let after = snapshot(ids)?;
    drop(on);
    let delta = ids
        .iter()
        .map(|id| {
            let (t0, n0) = before.get(id).copied().unwrap_or_default();
            let (t1, n1) = after.get(id).copied().unwrap_or_default();
            (*id, (t1.saturating_sub(t0), n1.saturating_sub(n0)))
        })
        .collect();
    Ok((out, delta))
}

/// Statistics switched on and off by turns, adding up the programs' run
/// time and count over the spans they were on.
pub struct Switch {
    ids: Vec<u32>,
    on: Option<(OwnedFd, Counts)>,
    pub totals: Counts,
}

impl Switch {
    pub fn new(ids: Vec<u32>) -> Self {
        Self { ids, on: None, totals: Counts::new() }
    }

    /// Statistics on (if off), then a snapshot.
    pub fn on(&mut self) -> Result<()> {
        if self.on.is_none() {
            let fd = aya::sys::enable_stats(BpfStats::RunTime)
                .context("turning BPF run-time statistics on (BPF_ENABLE_STATS)")?;
            self.on = Some((fd, snapshot(&self.ids)?));
        }
        Ok(())
    }

    /// A snapshot, then statistics off (if on); adds the span.
    pub fn off(&mut self) -> Result<()> {
        if let Some((fd, before)) = self.on.take() {
            let after = snapshot(&self.ids)?;
            drop(fd);
            for id in &self.ids {
                let (t0, n0) = before.get(id).copied().unwrap_or_default();
                let (t1, n1) = after.get(id).copied().unwrap_or_default();
                let e = self.totals.entry(*id).or_default();
                e.0 += t1.saturating_sub(t0);
                e.1 += n1.saturating_sub(n0);
            }
        }
        Ok(())
    }
}

/// The agent's programs' run time and count over several rounds with the
/// statistics on, and the operations those rounds did.
pub struct Tally {
    progs: Vec<(String, u32)>,
    totals: Counts,
    ops: usize,
}

impl Tally {
    pub fn new(pin_dir: &Path) -> Result<Self> {
        Ok(Self { progs: programs(pin_dir)?, totals: BTreeMap::new(), ops: 0 })
    }

    /// The programs' ids (for [`counted`]).
    pub fn ids(&self) -> Vec<u32> {
        self.progs.iter().map(|(_, id)| *id).collect()
    }

    /// Adds what the programs did over `ops` operations.
    pub fn add(&mut self, delta: &Counts, ops: usize) {
        self.ops += ops;
        for (id, (t, n)) in delta {
            let e = self.totals.entry(*id).or_default();
            e.0 += t;
            e.1 += n;
        }
    }

    /// Runs `f` (which returns how many operations it did, and a value)
    /// with the statistics on, adding what the programs did meanwhile.
    pub fn round<T>(&mut self, f: impl FnOnce() -> Result<(usize, T)>) -> Result<T> {
        let ((ops, out), delta) = counted(&self.ids(), f)?;
        self.add(&delta, ops);
        Ok(out)
    }

    /// Each program's cost over the rounds so far.
    pub fn costs(&self) -> Vec<ProgCost> {
        self.progs
            .iter()
            .map(|(program, id)| {
                let (run_time_ns, runs) = self.totals.get(id).copied().unwrap_or_default();
                ProgCost {
                    program: program.clone(),
                    runs,
                    run_time_ns,
                    ns_per_run: if runs > 0 { run_time_ns as f64 / runs as f64 } else { 0.0 },
                    runs_per_op: if self.ops > 0 { runs as f64 / self.ops as f64 } else { 0.0 },
                }
            })
            .collect()
    }
}

/// Runs `f` (which returns how many operations it did) with statistics on
/// and returns each program's cost over it.
pub fn measure(pin_dir: &Path, f: impl FnOnce() -> Result<usize>) -> Result<Vec<ProgCost>> {
    let mut t = Tally::new(pin_dir)?;
    t.round(|| f().map(|n| (n, ())))?;
    Ok(t.costs())
}

/// What the statistics count for a program that does nothing: the part of
/// their own cost that falls inside the run time they report.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Floor {
    pub runs: u64,
    pub ns_per_run: f64,
}

/// `BPF_PROG_LOAD` (uapi linux/bpf.h) and `BPF_PROG_TYPE_SOCK_OPS`.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;

/// Loads a sock_ops program that only returns 1 (`r0 = 1; exit`), named
/// `bench_floor`.
fn load_empty_sockops() -> Result<OwnedFd> {
    // struct bpf_insn: code, dst_reg:4 | src_reg:4, off (i16), imm (i32).
    // BPF_ALU64 | BPF_MOV | BPF_K = 0xb7; BPF_JMP | BPF_EXIT = 0x95.
    let insns: [u64; 2] = [0xb7 | (1u64 << 32), 0x95];
    let license = c"GPL";
    // union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns,
    // license, log_level, log_size, log_buf, kern_version, prog_flags,
    // prog_name[16] (offset 48).
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SOCK_OPS.to_ne_bytes());
    attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[48..59].copy_from_slice(b"bench_floor");
    // SAFETY: attr is a zero-padded bpf_attr; insns and license outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_mut_ptr(), attr.len() as u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_PROG_LOAD of an empty sock_ops program");
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The statistics' floor: an empty sock_ops program attached to `cgroup`
/// beside the agent's for the length of `f` (one round of connections),
/// its run time per run with the statistics on. It then runs as often as
/// the agent's sockops program and does nothing, so its time per run is
/// what the statistics add to every run's reported time: the clock read
/// around the call, the call and its return.
pub fn floor(cgroup: &Path, f: impl FnOnce() -> Result<usize>) -> Result<Floor> {
    let prog = load_empty_sockops()?;
    let id = sys::proc_field(&format!("/proc/self/fdinfo/{}", prog.as_raw_fd()), "prog_id")
        .context("the empty program's id")? as u32;
    let dir = std::fs::File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
    // Detached when the link's fd closes, at the end of this function.
    let _link = bpf::link_create(prog.as_fd(), dir.as_fd(), AttachType::SockOps)
        .with_context(|| format!("attaching the empty sock_ops program to {}", cgroup.display()))?;
    let (_, delta) = counted(&[id], f)?;
    let (t, n) = delta.get(&id).copied().unwrap_or_default();
    Ok(Floor { runs: n, ns_per_run: if n > 0 { t as f64 / n as f64 } else { 0.0 } })
}
