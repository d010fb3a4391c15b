//! The cgroup the pinned programs serve, from the kernel's own records
//! (`BPF_PROG_QUERY` on the cgroup, `BPF_OBJ_GET_INFO_BY_FD` on the pinned
//! links): other sets of redirector programs that already run for the
//! same processes (a second pin directory on the cgroup).
//!
//! cgroup programs run for the sockets of processes in the cgroup they are
//! attached to and in its descendants: a process of a workload's network
//! namespace outside that subtree is not redirected at all.
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fs::File,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use super::{lock::read_owner, object::PROGRAMS, pins::link_pin_path};
use crate::sys::{bpf, mounts};

/// The name the kernel keeps for a program (`BPF_OBJ_NAME_LEN` is 16,
/// NUL included: `rdr_getpeername4` is `rdr_getpeername`).
fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(15)]
}

/// The most bpffs directories searched for other pin directories.
const MAX_SEARCHED: usize = 10_000;

/// Pin directories (other than `own`) under the bpf file systems this
/// process sees, up to 4 levels down: directories with a `links`
/// subdirectory holding a link pinned under one of the cgroup programs'
/// names. Each with the links found: (program name, link info).
fn other_pin_dirs(own: &Path) -> BTreeMap<PathBuf, Vec<(&'static str, bpf::LinkInfo)>> {
    let own_id = std::fs::metadata(own).ok().map(|m| (m.dev(), m.ino()));
    let mut found = BTreeMap::new();
    let mut queue: VecDeque<(PathBuf, usize)> =
        mounts::mounts_of("bpf").unwrap_or_default().into_iter().map(|m| (m, 0)).collect();
    let mut searched = 0;
    while let Some((dir, depth)) = queue.pop_front() {
        searched += 1;
        if searched > MAX_SEARCHED {
            break;
        }
        let Ok(meta) = std::fs::metadata(&dir) else { continue };
        if Some((meta.dev(), meta.ino())) != own_id {
            let links: Vec<_> = PROGRAMS
                .iter()
                .filter_map(|(name, _)| {
                    let fd = bpf::obj_get(&link_pin_path(&dir, name)).ok()?;
                    Some((*name, bpf::link_info(fd.as_fd()).ok()?))
                })
                .collect();
            if !links.is_empty() {
                found.insert(dir.clone(), links);
                continue;
            }
        }
        if depth >= 4 {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back((e.path(), depth + 1));
            }
        }
    }
    found
}

/// Warnings about redirector programs that already run for the processes
/// of `cgroup` (attached to it or to an ancestor) through links other than
/// those pinned in `pin_dir`: a second set stacks on them. Each names the
/// other pin directory where one is found. Called before this agent
/// attaches; what cannot be read is not reported.
pub fn other_program_sets(cgroup: &Path, pin_dir: &Path) -> Vec<String> {
    let Ok(cg) = File::open(cgroup) else { return Vec::new() };
    let cgroup_id = cg.metadata().map(|m| m.ino()).unwrap_or_default();
    let ours: BTreeSet<u32> = PROGRAMS
        .iter()
        .filter_map(|(name, _)| {
            let fd = bpf::obj_get(&link_pin_path(pin_dir, name)).ok()?;
            Some(bpf::link_info(fd.as_fd()).ok()?.prog_id)
        })
        .collect();
    let names: BTreeSet<&str> = PROGRAMS.iter().map(|(n, _)| kernel_name(n)).collect();
    let mut foreign: BTreeMap<u32, String> = BTreeMap::new();
    for (_, ty) in PROGRAMS {
        for id in bpf::effective_ids(cg.as_fd(), ty).unwrap_or_default() {
            if ours.contains(&id) || foreign.contains_key(&id) {
                continue;
            }
            let Ok(prog) = bpf::prog_by_id(id) else { continue };
            if let Ok(name) = bpf::prog_name(prog.as_fd()) {
                if names.contains(name.as_str()) {
                    foreign.insert(id, name);
                }
            }
        }
    }
    if foreign.is_empty() {
        return Vec::new();
    }
    let shown = cgroup.display();
    let mut warnings = Vec::new();
    let mut explained = BTreeSet::new();
    for (dir, links) in other_pin_dirs(pin_dir) {
        let stacked: Vec<&(&str, bpf::LinkInfo)> =
            links.iter().filter(|(_, l)| foreign.contains_key(&l.prog_id)).collect();
        let Some((_, first)) = stacked.first() else { continue };
        explained.extend(stacked.iter().map(|(_, l)| l.prog_id));
        let at = match first.cgroup {
            Some((id, _)) if id == cgroup_id => "this cgroup".to_string(),
            Some((id, _)) => format!("its ancestor cgroup id {id}"),
            None => "a cgroup".to_string(),
        };
        let by = read_owner(&dir).map(|o| format!("; its owner record: {}", o.describe())).unwrap_or_default();
        warnings.push(format!(
            "cgroup {shown}: redirector's programs ({}) already run for its processes through the links pinned in {} \
             (attached to {at}{by}); this agent's programs stack on them, so each connection there passes through \
             both sets (two policies, two records of its original destination) and the outcome depends on their \
             order: run one agent per cgroup (`redirector cleanup --pin-dir {}` removes the other set)",
            stacked.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
            dir.display(),
            dir.display()
        ));
    }
    let unexplained: Vec<String> =
        foreign.iter().filter(|(id, _)| !explained.contains(*id)).map(|(id, n)| format!("{n} #{id}")).collect();
    if !unexplained.is_empty() {
        let mounts = mounts::mounts_of("bpf").unwrap_or_default();
        warnings.push(format!(
            "cgroup {shown}: programs named like redirector's ({}) already run for its processes, through no link \
             pinned under the bpf file systems this process sees ({}): another agent's, in another mount namespace \
             or holding its links open; this agent's programs stack on them",
            unexplained.join(", "),
            mounts.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ));
    }
    warnings
}

#[cfg(test)]
mod tests {
    use redirector_common::prog_names;

    use super::*;

    #[test]
    fn kernel_names_are_cut_to_15_bytes() {
        assert_eq!(kernel_name(prog_names::GETPEERNAME4), "rdr_getpeername");
        assert_eq!(kernel_name(prog_names::CONNECT4), "rdr_connect4");
        // The cut names still tell the cgroup programs apart from
        // everything but each other's IPv4/IPv6 twin.
        let cut: BTreeSet<&str> = PROGRAMS.iter().map(|(n, _)| kernel_name(n)).collect();
        assert_eq!(cut.len(), PROGRAMS.len() - 1, "{cut:?}");
    }
}
