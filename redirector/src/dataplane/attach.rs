//! Attaching and detaching: the cgroup programs through pinned links, one
//! `sk_lookup` link per workload network namespace, and `sk_msg` on the
//! `ACCEL_SOCKETS` sockhash.
use std::{fs::File, os::fd::AsFd as _, path::Path};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::Map,
    programs::{CgroupSockAddr, CgroupSockopt, SkLookup, SkMsg, SockOps},
    Ebpf,
};
use redirector_common::{map_names, prog_names};

use super::{
    object::{ebpf_object, loader, DNS_PROGRAMS, PROGRAMS},
    pins::{link_pin_path, netns_link_pin_path},
    Desired,
};
use crate::sys::bpf::{self, AttachType};

/// Attaches every program of `PROGRAMS` to `cgroup` through a pinned link,
/// each replacing the link a previous agent pinned for it only once the
/// new one is attached (never a moment with nothing attached).
pub(super) fn attach_cgroup_programs(ebpf: &mut Ebpf, pin_dir: &Path, cgroup: &Path) -> Result<()> {
    attach_programs(ebpf, pin_dir, cgroup, &PROGRAMS)
}

/// Attaches DNS capture's programs (`DNS_PROGRAMS`) as
/// [`attach_cgroup_programs`] does the others, replacing what a previous
/// agent pinned. Loaded once per agent (aya keeps the loaded program).
pub(super) fn attach_dns_programs(ebpf: &mut Ebpf, pin_dir: &Path, cgroup: &Path) -> Result<()> {
    attach_programs(ebpf, pin_dir, cgroup, &DNS_PROGRAMS)
}

/// Whether DNS capture's links are pinned (all of them).
pub(super) fn dns_programs_pinned(pin_dir: &Path) -> bool {
    DNS_PROGRAMS.iter().all(|(name, _)| link_pin_path(pin_dir, name).symlink_metadata().is_ok())
}

/// Unpins DNS capture's links, which detaches them (no workload asks for
/// it any more). Missing pins are no error.
pub(super) fn detach_dns_programs(pin_dir: &Path) -> Result<()> {
    for (name, _) in DNS_PROGRAMS {
        let pin = link_pin_path(pin_dir, name);
        match std::fs::remove_file(&pin) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", pin.display()))
            }
            _ => {}
        }
    }
    Ok(())
}

fn attach_programs(ebpf: &mut Ebpf, pin_dir: &Path, cgroup: &Path, programs: &[(&str, AttachType)]) -> Result<()> {
    let cgroup_file = File::open(cgroup).with_context(|| format!("opening cgroup directory {}", cgroup.display()))?;
    for &(name, ty) in programs {
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
            | AttachType::Inet6Getpeername
            | AttachType::Udp4Sendmsg
            | AttachType::Udp6Sendmsg
            | AttachType::Udp4Recvmsg
            | AttachType::Udp6Recvmsg => {
                let p: &mut CgroupSockAddr = prog.try_into()?;
                if p.fd().is_err() {
                    p.load().with_context(|| format!("loading program {name}"))?;
                }
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
    Ok(())
}

/// Attaches an `sk_lookup` instance bound to this workload's netns
/// cookie to its network namespace, unless one is pinned already.
pub(super) fn ensure_inbound(pin_dir: &Path, d: &Desired) -> Result<()> {
    let pin = netns_link_pin_path(pin_dir, d.cookie);
    if !d.policy.inbound || bpf::obj_get(&pin).is_ok() {
        return Ok(());
    }
    let mut loader = loader(pin_dir);
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
    std::fs::create_dir_all(pin_dir.join("netns"))?;
    bpf::obj_pin(&link, &pin)?;
    Ok(())
}

/// Loads `sk_msg` and attaches it to the `ACCEL_SOCKETS` sockhash,
/// replacing the program a previous agent attached there (one slot per map
/// and attach type: never two). Attached with `BPF_PROG_ATTACH`, not a
/// link: the map keeps it, so it outlives this agent like the pinned links.
pub(super) fn attach_sk_msg(ebpf: &mut Ebpf) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use redirector_policy::{compile, Acceleration, MeshSettings, WorkloadAnnotations};

    use super::*;

    fn desired(name: &str, cookie: u64, acceleration: Acceleration) -> Desired {
        let policy = compile(&MeshSettings::default(), &WorkloadAnnotations::default());
        let policy = redirector_policy::Policy { acceleration, ..policy };
        Desired { name: name.into(), cookie, netns: format!("/proc/self/fd/{cookie}").into(), policy }
    }

    #[test]
    fn with_acceleration_available_nothing_is_refused() {
        let want = [desired("a", 1, Acceleration::Sockmap), desired("b", 2, Acceleration::None)];
        let (ok, refused) = refuse_unavailable_acceleration(&want, None);
        assert_eq!(ok.iter().map(|d| d.cookie).collect::<Vec<_>>(), [1, 2]);
        assert!(refused.is_empty());
    }

    #[test]
    fn without_acceleration_only_the_workloads_asking_for_it_are_refused() {
        let want = [desired("a", 1, Acceleration::Sockmap), desired("b", 2, Acceleration::None)];
        let (ok, refused) = refuse_unavailable_acceleration(&want, Some("sk_msg did not load"));
        assert_eq!(ok.iter().map(|d| d.cookie).collect::<Vec<_>>(), [2]);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0.cookie, 1);
        assert_eq!(
            refused[0].1.to_string(),
            "workload `a`: `mesh.acceleration: sockmap` is not available on this kernel (sk_msg did not load); \
             policy not applied, previous policy kept (set `mesh.acceleration: none`)"
        );
    }
}
