//! The eBPF object: the one built into this binary or the file named by
//! `REDIRECTOR_EBPF_OBJECT`, the loader that adopts the pinned maps, and
//! the cgroup programs in attach order.
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use aya::EbpfLoader;
use redirector_common::{map_names, prog_names};

use crate::sys::bpf::AttachType;

/// The eBPF object built by build.rs (empty with AYA_BUILD_SKIP=1).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector-ebpf"));

/// Environment variable naming an eBPF object file to load instead of the
/// embedded one (another build of the programs with the same map layout).
pub const EBPF_OBJECT_ENV: &str = "REDIRECTOR_EBPF_OBJECT";

/// The object to load: the file named by `REDIRECTOR_EBPF_OBJECT` (read
/// once per process: every sk_lookup attachment loads the object again),
/// else the one built into this binary.
pub(super) fn ebpf_object() -> Result<&'static [u8]> {
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

/// A loader that adopts the maps pinned in `pin_dir` (and pins there the
/// ones it creates).
pub(super) fn loader<'a>(pin_dir: &Path) -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
    for name in map_names::PINNED {
        loader.map_pin_path(name, pin_dir.join(name));
    }
    loader
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

/// DNS capture's programs: attached to the cgroup only while a workload
/// asks for it (with DNS capture off, nothing of it is attached), each
/// through a pinned link like the others.
pub const DNS_PROGRAMS: [(&str, AttachType); 6] = [
    (prog_names::RECVMSG4, AttachType::Udp4Recvmsg),
    (prog_names::RECVMSG6, AttachType::Udp6Recvmsg),
    (prog_names::DNS_CONNECT4, AttachType::Inet4Connect),
    (prog_names::DNS_CONNECT6, AttachType::Inet6Connect),
    (prog_names::SENDMSG4, AttachType::Udp4Sendmsg),
    (prog_names::SENDMSG6, AttachType::Udp6Sendmsg),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_programs_attach_last() {
        let names: Vec<&str> = PROGRAMS.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                prog_names::SOCKOPS,
                prog_names::GETSOCKOPT,
                prog_names::GETPEERNAME4,
                prog_names::GETPEERNAME6,
                prog_names::CONNECT4,
                prog_names::CONNECT6
            ]
        );
    }
}
