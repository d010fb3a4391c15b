//! Kernel feature probing: before loading anything, ask the kernel for each
//! hook and helper the data path needs by loading a two-instruction
//! program of that type (libbpf's approach), and refuse to start with a
//! message that names every missing feature and the kernel that added it.
use std::{ffi::CString, os::fd::FromRawFd as _};

use anyhow::{bail, Result};

/// One thing the data path relies on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Feature {
    pub name: &'static str,
    /// The first mainline kernel that has it.
    pub since: &'static str,
    /// Without it the agent refuses to start; otherwise it warns.
    pub required: bool,
    pub supported: bool,
    /// Why the probe said no (the verifier's words or the errno).
    pub detail: String,
}

// enum bpf_prog_type
const SOCK_OPS: u32 = 13;
const CGROUP_SOCK_ADDR: u32 = 18;
const CGROUP_SOCKOPT: u32 = 25;
const SK_LOOKUP: u32 = 30;
const SK_MSG: u32 = 16;
// enum bpf_attach_type
const INET4_CONNECT: u32 = 10;
const INET6_CONNECT: u32 = 11;
const GETSOCKOPT: u32 = 21;
const INET4_GETPEERNAME: u32 = 29;
const INET6_GETPEERNAME: u32 = 30;
const UDP4_SENDMSG: u32 = 14;
const UDP6_SENDMSG: u32 = 15;
const UDP4_RECVMSG: u32 = 19;
const UDP6_RECVMSG: u32 = 20;
const ATTACH_SK_LOOKUP: u32 = 36;
// helper ids
const GET_NETNS_COOKIE: i32 = 122;
/// `BPF_FUNC_get_current_cgroup_id` (proxy identity by cgroup).
const GET_CURRENT_CGROUP_ID: i32 = 80;
const SK_STORAGE_GET: i32 = 107;
const SOCK_HASH_UPDATE: i32 = 70;
const MSG_REDIRECT_HASH: i32 = 71;
/// expected_attach_type of an sk_msg program.
const SK_MSG_VERDICT: u32 = 7;

/// Names of the optional features `mesh.acceleration: sockmap` needs.
pub const SOCKMAP_FEATURES: [&str; 5] = [
    "sk_msg programs (mesh.acceleration: sockmap)",
    "bpf_sock_hash_update in sockops programs",
    "bpf_msg_redirect_hash in sk_msg programs",
    "bpf_get_netns_cookie in sk_msg programs",
    "socket storage (bpf_sk_storage_get) in sk_msg programs",
];

/// `r0 = 1; exit`, optionally preceded by a call (r1 still holds the
/// context, which is what the helpers probed here take first).
fn program(call: Option<i32>) -> Vec<u64> {
    let insn = |code: u8, imm: i32| u64::from(code) | (u64::from(imm as u32) << 32);
    let mut v = Vec::new();
    if let Some(helper) = call {
        v.push(insn(0x85, helper)); // BPF_JMP | BPF_CALL
    }
    v.push(insn(0xb7, 1)); // BPF_ALU64 | BPF_MOV | BPF_K, r0 = 1
    v.push(insn(0x95, 0)); // BPF_JMP | BPF_EXIT
    v
}

/// Loads a probe program; Ok(()) if the kernel accepts the type and (if
/// given) the helper, Err(reason) otherwise.
fn try_load(prog_type: u32, attach: u32, call: Option<i32>) -> std::result::Result<(), String> {
    let insns = program(call);
    let license = CString::new("GPL").expect("no NUL");
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = [0u8; 128];
    let put32 = |a: &mut [u8; 128], off: usize, v: u32| a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    let put64 = |a: &mut [u8; 128], off: usize, v: u64| a[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    put32(&mut attr, 0, prog_type);
    put32(&mut attr, 4, insns.len() as u32);
    put64(&mut attr, 8, insns.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    put32(&mut attr, 24, 1); // log_level
    put32(&mut attr, 28, log.len() as u32);
    put64(&mut attr, 32, log.as_mut_ptr() as u64);
    put32(&mut attr, 68, attach); // expected_attach_type
                                  // SAFETY: attr is a zeroed bpf_attr for BPF_PROG_LOAD whose pointers
                                  // (insns, license, log) outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 5 as libc::c_long, attr.as_mut_ptr(), attr.len() as u32) };
    if rc >= 0 {
        // SAFETY: a new program fd we own; dropping it unloads the probe.
        drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(rc as i32) });
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    let text = String::from_utf8_lossy(&log[..log.iter().position(|b| *b == 0).unwrap_or(0)]).into_owned();
    if call.is_some() {
        // Any complaint other than "no such helper here" means the helper
        // exists for this program type (libbpf's rule).
        let missing = ["unknown func", "invalid func", "program of this type cannot use helper"];
        if let Some(line) = text.lines().find(|l| missing.iter().any(|m| l.contains(m))) {
            return Err(line.trim().to_string());
        }
        if err.raw_os_error() == Some(libc::EINVAL) && text.is_empty() {
            return Err(format!("program type refused ({err})"));
        }
        return Ok(());
    }
    Err(match text.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(l) => format!("{err}: {}", l.trim()),
        None => err.to_string(),
    })
}

fn so_netns_cookie() -> std::result::Result<(), String> {
    crate::sys::netns::current_netns_cookie().map(|_| ()).map_err(|e| format!("{e:#}"))
}

fn feature(name: &'static str, since: &'static str, required: bool, r: std::result::Result<(), String>) -> Feature {
    Feature { name, since, required, supported: r.is_ok(), detail: r.err().unwrap_or_default() }
}

/// Probes every feature (needs CAP_BPF/CAP_SYS_ADMIN, as the agent does).
pub fn probe() -> Vec<Feature> {
    let both = |a: std::result::Result<(), String>, b: std::result::Result<(), String>| a.and(b);
    vec![
        feature(
            "cgroup/connect4 and connect6 programs",
            "4.17",
            true,
            both(try_load(CGROUP_SOCK_ADDR, INET4_CONNECT, None), try_load(CGROUP_SOCK_ADDR, INET6_CONNECT, None)),
        ),
        feature("sockops programs", "4.13", true, try_load(SOCK_OPS, 0, None)),
        feature("cgroup/getsockopt programs", "5.3", true, try_load(CGROUP_SOCKOPT, GETSOCKOPT, None)),
        feature(
            "cgroup/getpeername4 and getpeername6 programs",
            "5.8",
            true,
            both(
                try_load(CGROUP_SOCK_ADDR, INET4_GETPEERNAME, None),
                try_load(CGROUP_SOCK_ADDR, INET6_GETPEERNAME, None),
            ),
        ),
        feature("sk_lookup programs (inbound capture)", "5.9", true, try_load(SK_LOOKUP, ATTACH_SK_LOOKUP, None)),
        feature(
            "bpf_get_netns_cookie in cgroup/connect programs",
            "5.7",
            true,
            try_load(CGROUP_SOCK_ADDR, INET4_CONNECT, Some(GET_NETNS_COOKIE)),
        ),
        feature(
            "bpf_get_current_cgroup_id in cgroup/connect programs",
            "5.7",
            true,
            try_load(CGROUP_SOCK_ADDR, INET4_CONNECT, Some(GET_CURRENT_CGROUP_ID)),
        ),
        feature(
            "bpf_get_netns_cookie in sockops programs",
            "5.15",
            true,
            try_load(SOCK_OPS, 0, Some(GET_NETNS_COOKIE)),
        ),
        feature(
            "bpf_get_netns_cookie in cgroup/getsockopt programs",
            "5.15",
            true,
            try_load(CGROUP_SOCKOPT, GETSOCKOPT, Some(GET_NETNS_COOKIE)),
        ),
        feature(
            "socket storage (bpf_sk_storage_get) in sockops programs",
            "5.3",
            true,
            try_load(SOCK_OPS, 0, Some(SK_STORAGE_GET)),
        ),
        feature(
            "socket storage (bpf_sk_storage_get) in cgroup/getsockopt programs",
            "5.3",
            true,
            try_load(CGROUP_SOCKOPT, GETSOCKOPT, Some(SK_STORAGE_GET)),
        ),
        feature("SO_NETNS_COOKIE socket option (agent side)", "5.14", true, so_netns_cookie()),
        // Optional: only `mesh.acceleration: sockmap` needs these.
        feature(SOCKMAP_FEATURES[0], "4.17", false, try_load(SK_MSG, SK_MSG_VERDICT, None)),
        feature(SOCKMAP_FEATURES[1], "4.18", false, try_load(SOCK_OPS, 0, Some(SOCK_HASH_UPDATE))),
        feature(SOCKMAP_FEATURES[2], "4.18", false, try_load(SK_MSG, SK_MSG_VERDICT, Some(MSG_REDIRECT_HASH))),
        feature(SOCKMAP_FEATURES[3], "5.15", false, try_load(SK_MSG, SK_MSG_VERDICT, Some(GET_NETNS_COOKIE))),
        // In 5.15 at the latest (its netns-cookie selftest uses both).
        feature(SOCKMAP_FEATURES[4], "5.15", false, try_load(SK_MSG, SK_MSG_VERDICT, Some(SK_STORAGE_GET))),
        // Optional: only DNS capture (`mesh.dnsCapture`) needs these; the
        // programs are attached only while a workload asks for it.
        feature(
            "cgroup/sendmsg4 and sendmsg6 programs with bpf_get_netns_cookie (DNS capture)",
            "5.7",
            false,
            both(
                try_load(CGROUP_SOCK_ADDR, UDP4_SENDMSG, Some(GET_NETNS_COOKIE)),
                try_load(CGROUP_SOCK_ADDR, UDP6_SENDMSG, Some(GET_NETNS_COOKIE)),
            ),
        ),
        feature(
            "cgroup/recvmsg4 and recvmsg6 programs with bpf_get_netns_cookie (DNS capture)",
            "5.7",
            false,
            both(
                try_load(CGROUP_SOCK_ADDR, UDP4_RECVMSG, Some(GET_NETNS_COOKIE)),
                try_load(CGROUP_SOCK_ADDR, UDP6_RECVMSG, Some(GET_NETNS_COOKIE)),
            ),
        ),
        feature(
            "kernel BTF (/sys/kernel/btf/vmlinux)",
            "5.4",
            false,
            if std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
                Ok(())
            } else {
                Err("absent: `bpftool` cannot show kernel types; redirector itself does not need it".into())
            },
        ),
    ]
}

/// Fails naming every missing required feature; logs optional ones.
pub fn require(features: &[Feature]) -> Result<()> {
    let release = kernel_release();
    for f in features.iter().filter(|f| !f.required && !f.supported) {
        log::warn!("kernel {release}: {} (Linux {}+) is missing: {}", f.name, f.since, f.detail);
    }
    let missing: Vec<String> = features
        .iter()
        .filter(|f| f.required && !f.supported)
        .map(|f| format!("  - {} (needs Linux {}): {}", f.name, f.since, f.detail))
        .collect();
    if !missing.is_empty() {
        bail!(
            "kernel {release} lacks what redirector needs; refusing to start rather than redirect partially:\n{}",
            missing.join("\n")
        );
    }
    Ok(())
}

/// Refuses `mesh.acceleration: sockmap` on a kernel that lacks what it
/// needs, naming the setting and each missing feature.
pub fn require_acceleration(features: &[Feature]) -> Result<()> {
    let missing: Vec<String> = features
        .iter()
        .filter(|f| SOCKMAP_FEATURES.contains(&f.name) && !f.supported)
        .map(|f| format!("  - {} (needs Linux {}): {}", f.name, f.since, f.detail))
        .collect();
    if !missing.is_empty() {
        bail!(
            "`mesh.acceleration: sockmap`: kernel {} cannot do it; set `mesh.acceleration: none` (the default). Missing:\n{}",
            kernel_release(),
            missing.join("\n")
        );
    }
    Ok(())
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into())
}

/// The `redirector probe` table.
pub fn render(features: &[Feature]) -> String {
    let mut o = format!("kernel {}\n", kernel_release());
    for f in features {
        let state = match (f.supported, f.required) {
            (true, _) => "ok",
            (false, true) => "MISSING",
            (false, false) => "missing (optional)",
        };
        o.push_str(&format!("  {state:<20} {:<62} Linux {:<5} {}\n", f.name, f.since, f.detail));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_programs_encode_call_mov_exit() {
        let p = program(Some(GET_NETNS_COOKIE));
        assert_eq!(p.len(), 3);
        assert_eq!(p[0] & 0xff, 0x85);
        assert_eq!(p[0] >> 32, 122);
        assert_eq!(p[1], 0xb7 | (1 << 32));
        assert_eq!(p[2], 0x95);
    }

    /// The probe must tell "helper not allowed here" from "allowed but
    /// misused": bpf_redirect (23) is never available to sockops, while
    /// bpf_sk_storage_get with a context instead of a map is only misused.
    #[test]
    fn helper_probe_tells_missing_from_misused() {
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } != 0 {
            eprintln!("SKIP helper_probe_tells_missing_from_misused: needs root");
            return;
        }
        let e = try_load(SOCK_OPS, 0, Some(23)).unwrap_err();
        assert!(e.contains("func") || e.contains("helper"), "{e}");
        assert_eq!(try_load(SOCK_OPS, 0, Some(SK_STORAGE_GET)), Ok(()));
        assert_eq!(try_load(SOCK_OPS, 0, None), Ok(()));
        assert!(try_load(9999, 0, None).is_err(), "an unknown program type is refused");
    }

    #[test]
    fn acceleration_refusal_names_the_setting_and_what_is_missing() {
        let f = |name, supported| Feature {
            name,
            since: "5.15",
            required: false,
            supported,
            detail: if supported { String::new() } else { "unknown func bpf_get_netns_cookie#122".into() },
        };
        let mut fs: Vec<Feature> = SOCKMAP_FEATURES.iter().map(|n| f(n, true)).collect();
        fs.push(f("kernel BTF", false));
        assert!(require_acceleration(&fs).is_ok(), "unrelated optional features do not refuse it");
        fs[3].supported = false;
        fs[3].detail = "unknown func bpf_get_netns_cookie#122".into();
        let t = format!("{:#}", require_acceleration(&fs).unwrap_err());
        assert!(t.contains("`mesh.acceleration: sockmap`") && t.contains("mesh.acceleration: none"), "{t}");
        assert!(
            t.contains("bpf_get_netns_cookie in sk_msg programs (needs Linux 5.15)") && t.contains("unknown func"),
            "{t}"
        );
        assert!(!t.contains("kernel BTF"), "{t}");
        // This machine's kernel: the probe answers for every feature.
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } == 0 {
            let real = probe();
            for name in SOCKMAP_FEATURES {
                assert!(real.iter().any(|f| f.name == name), "{name} is probed");
            }
        }
    }

    #[test]
    fn require_names_each_missing_feature_and_its_kernel() {
        let f = |name, since, required, supported| Feature {
            name,
            since,
            required,
            supported,
            detail: if supported { String::new() } else { "unknown func bpf_get_netns_cookie#122".into() },
        };
        let fs = [
            f("a", "4.17", true, true),
            f("netns cookie in sockops", "5.15", true, false),
            f("btf", "5.4", false, false),
        ];
        let t = format!("{:#}", require(&fs).unwrap_err());
        assert!(t.contains("netns cookie in sockops (needs Linux 5.15)") && t.contains("unknown func"), "{t}");
        assert!(!t.contains("btf"), "optional features do not refuse: {t}");
        assert!(require(&fs[..1]).is_ok());
    }
}
