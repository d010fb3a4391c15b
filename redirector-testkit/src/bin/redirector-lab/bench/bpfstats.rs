//! Per-program cost from the kernel's BPF run-time statistics
//! (`run_time_ns` / `run_cnt` of each program, what `bpftool prog show`
//! prints once `kernel.bpf_stats_enabled` is on).
//!
//! The statistics are switched on with `BPF_ENABLE_STATS` (aya's
//! `enable_stats`) rather than by writing the sysctl: the kernel counts
//! while the returned fd is open and stops by itself when it closes, also
//! if this process dies, so there is no previous value to restore. They
//! are on only for an extra redirector round after the measured ones, as
//! they add a clock read to every run.
use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, Result};
use aya::{programs::loaded_programs, sys::Stats as BpfStats};
use redirector::{
    dataplane::{link_pin_path, PROGRAMS},
    sys::bpf,
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
        let attached = bpf::attached_ids(std::os::fd::AsFd::as_fd(&map), bpf::AttachType::SkMsgVerdict);
        for id in attached.unwrap_or_default() {
            out.push((prog_names::SK_MSG.to_string(), id));
        }
    }
    Ok(out)
}

/// (run time ns, run count) of each program id.
fn snapshot(ids: &[u32]) -> Result<BTreeMap<u32, (u64, u64)>> {
    let mut out = BTreeMap::new();
    for info in loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        if ids.contains(&info.id()) {
            out.insert(info.id(), (info.run_time().as_nanos() as u64, info.run_count()));
        }
    }
    Ok(out)
}

/// Runs `f` (which returns how many operations it did) with statistics on
/// and returns each program's cost over it.
pub fn measure(pin_dir: &Path, f: impl FnOnce() -> Result<usize>) -> Result<Vec<ProgCost>> {
    let progs = programs(pin_dir)?;
    let ids: Vec<u32> = progs.iter().map(|(_, id)| *id).collect();
    let on =
        aya::sys::enable_stats(BpfStats::RunTime).context("turning BPF run-time statistics on (BPF_ENABLE_STATS)")?;
    let before = snapshot(&ids)?;
    let ops = f()?;
    let after = snapshot(&ids)?;
    drop(on);
    Ok(progs
        .into_iter()
        .map(|(program, id)| {
            let (t0, n0) = before.get(&id).copied().unwrap_or_default();
            let (t1, n1) = after.get(&id).copied().unwrap_or_default();
            let (runs, run_time_ns) = (n1.saturating_sub(n0), t1.saturating_sub(t0));
            ProgCost {
                program,
                runs,
                run_time_ns,
                ns_per_run: if runs > 0 { run_time_ns as f64 / runs as f64 } else { 0.0 },
                runs_per_op: if ops > 0 { runs as f64 / ops as f64 } else { 0.0 },
            }
        })
        .collect())
}
