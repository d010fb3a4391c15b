//! The cgroup the pinned programs serve, from the kernel's own records:
//! which cgroup a pin directory's links attach to (`BPF_OBJ_GET_INFO_BY_FD`
//! on the pinned link), whether the calling process is inside it (the
//! standalone gate), and other sets of redirector programs that already
//! run for the same processes (a second pin directory on the cgroup).
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

use anyhow::{bail, Context as _, Result};
use redirector_common::prog_names;

use super::{lock::read_owner, object::PROGRAMS, pins::link_pin_path};
use crate::sys::{
    bpf::{self, AttachType},
    cgroup::{ancestry_contains, own_cgroup_dir, ROOT_CGROUP_ID},
    mounts,
};

/// Where the connect4 link pinned in a pin directory attaches its program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttachedTo {
    pub cgroup_id: u64,
    pub prog_id: u32,
}

/// The cgroup of the connect4 link pinned in `pin_dir` (the program that
/// redirects), and its program.
pub fn attached_to(pin_dir: &Path) -> Result<AttachedTo> {
    let pin = link_pin_path(pin_dir, prog_names::CONNECT4);
    let link = bpf::obj_get(&pin)?;
    let info = bpf::link_info(link.as_fd()).with_context(|| format!("reading link {}", pin.display()))?;
    match info.cgroup {
        Some((cgroup_id, _)) => Ok(AttachedTo { cgroup_id, prog_id: info.prog_id }),
        None => bail!("{}: not a cgroup link", pin.display()),
    }
}

/// The attach cgroup for messages: the agent's own name for it (from the
/// owner record, when that names this very cgroup) and its id.
fn name_of(pin_dir: &Path, cgroup_id: u64) -> String {
    match read_owner(pin_dir).filter(|o| o.cgroup_id == Some(cgroup_id)).and_then(|o| o.cgroup) {
        Some(path) => format!("{} (cgroup id {cgroup_id})", path.display()),
        None => format!("cgroup id {cgroup_id}"),
    }
}

/// Fails unless this process is in the cgroup the programs pinned in
/// `pin_dir` are attached to, or below it. Asked of the kernel where it
/// can be (the programs in effect for this process's cgroup, ancestors'
/// included: `BPF_PROG_QUERY` with `BPF_F_QUERY_EFFECTIVE`, which needs
/// `CAP_NET_ADMIN`), else by walking up from this process's cgroup
/// directory.
pub fn check_caller_inside(pin_dir: &Path) -> Result<()> {
    let first = attached_to(pin_dir)?;
    if first.cgroup_id == ROOT_CGROUP_ID {
        return Ok(()); // every process is below the root
    }
    let attach = name_of(pin_dir, first.cgroup_id);
    let (rel, dir) =
        own_cgroup_dir().with_context(|| format!("checking that this process is inside the attach cgroup {attach}"))?;
    // The kernel's answer: is connect4 among the programs in effect for
    // this cgroup. An agent restarting meanwhile replaces the link and
    // its program, so a "no" is asked again with the link read anew.
    let mut inside = None;
    if let Ok(f) = File::open(&dir) {
        let mut at = first;
        for _ in 0..3 {
            inside = bpf::effective_ids(f.as_fd(), AttachType::Inet4Connect).ok().map(|ids| ids.contains(&at.prog_id));
            if inside != Some(false) {
                break;
            }
            let now = attached_to(pin_dir)?;
            if now == at {
                break;
            }
            at = now;
        }
    }
    let inside = match inside {
        Some(b) => b,
        None => match ancestry_contains(&dir, first.cgroup_id)? {
            Some(b) => b,
            None => bail!(
                "cannot tell whether this process (cgroup {rel}) is inside the attach cgroup {attach}: the \
                 programs in effect for its cgroup cannot be listed here (needs CAP_NET_ADMIN) and the attach \
                 cgroup is above the cgroup2 mount this process sees"
            ),
        },
    };
    if !inside {
        bail!(
            "this process (pid {}, cgroup {rel}) is outside the cgroup the agent attached its programs to, {attach}: \
             only processes in that cgroup or below it are redirected, so what starts from here would reach the \
             network around the proxy; run the gate and the workload inside that cgroup, or run the agent with a \
             --cgroup that contains them (`--no-cgroup-check` waits for a workload started elsewhere)",
            std::process::id()
        );
    }
    Ok(())
}

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
    // This pin directory's links, and those of an older layout it is
    // migrating from (`<pin>/retired-v<N>/`: draining, not a second set).
    let own_dirs: Vec<PathBuf> = std::iter::once(pin_dir.to_owned())
        .chain(super::migrate::retired_sets(pin_dir).into_iter().map(|(_, d)| d))
        .collect();
    let ours: BTreeSet<u32> = own_dirs
        .iter()
        .flat_map(|dir| PROGRAMS.iter().map(move |(name, _)| link_pin_path(dir, name)))
        .filter_map(|path| {
            let fd = bpf::obj_get(&path).ok()?;
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
