//! What the agent refuses: a kernel without the data path's features, and
//! pinned maps of another layout.
use super::*;

/// `redirector probe` lists every feature; on a kernel that lacks a
/// required one, `redirector run` refuses before touching anything and
/// names the feature and the kernel that has it.
#[test]
fn unsupported_kernel_is_refused_clearly() {
    if !privileged() {
        return;
    }
    testkit::ensure_bpffs().expect("bpffs");
    let probe = std::process::Command::new(bin()).arg("probe").output().unwrap();
    let table = String::from_utf8_lossy(&probe.stdout).to_string();
    println!("{table}");
    let missing = missing_features();
    if missing.is_empty() {
        assert!(probe.status.success(), "{table}{}", String::from_utf8_lossy(&probe.stderr));
        assert!(!table.contains("MISSING"), "{table}");
        return;
    }
    assert!(!probe.status.success(), "probe must fail when a required feature is missing:\n{table}");
    let dir = tmpdir("refuse");
    let cfg = dir.join("config.yaml");
    std::fs::write(&cfg, "mesh: {}\nworkloads: []\n").unwrap();
    let pins = PinDir::new().unwrap();
    let cgroup = TestCgroup::new().unwrap();
    let mut agent = AgentProcess::start(bin(), &cfg, &cgroup.path, &pins.path, &dir.join("agent.log")).unwrap();
    let status = poll_until(|| agent.child.try_wait().unwrap(), Option::is_some);
    let err = agent.log_text();
    drop(agent);
    drop(cgroup);
    let _ = std::fs::remove_dir_all(&dir);
    println!("redirector run on this kernel:\n{err}");
    assert!(status.is_some_and(|s| !s.success()), "the agent must refuse this kernel: {status:?}");
    assert!(err.contains("refusing to start") && err.contains("needs Linux"), "{err}");
    for m in &missing {
        let name = m.split(" (Linux").next().unwrap();
        assert!(err.contains(name), "the refusal names {name}: {err}");
    }
    let left: Vec<_> =
        std::fs::read_dir(&pins.path).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "nothing may be pinned after a refusal: {left:?}");
}

/// `BPF_MAP_CREATE` of a bare map (no BTF), as an older agent's would be.
fn raw_map(map_type: u32, key_size: u32, value_size: u32, max_entries: u32, name: &str) -> std::os::fd::OwnedFd {
    let mut attr = [0u8; 128];
    for (i, v) in [map_type, key_size, value_size, max_entries].into_iter().enumerate() {
        attr[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    attr[28..28 + name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: a zero-padded bpf_attr; the kernel returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, 0 /* BPF_MAP_CREATE */, attr.as_mut_ptr(), attr.len() as u32)
    };
    assert!(fd >= 0, "BPF_MAP_CREATE {name}: {}", std::io::Error::last_os_error());
    // SAFETY: a new fd that nothing else owns.
    unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) }
}

/// Pinned maps of a newer layout are refused, never adopted, and nothing
/// is changed; an older layout's are moved aside to be migrated (see the
/// `upgrade` tests for the whole migration); maps of other capacities with
/// no version stamped (an agent that died while starting) are refused.
#[test]
fn pinned_maps_of_another_layout_are_refused() {
    use std::os::fd::AsRawFd as _;
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let stamped = |version: u32| {
        let dir = PinDir::new().unwrap();
        std::fs::create_dir_all(&dir.path).unwrap();
        let meta = raw_map(2 /* BPF_MAP_TYPE_ARRAY */, 4, 8, 1, "RDR_META");
        let mut value = [0u8; 8];
        value[..4].copy_from_slice(&version.to_ne_bytes());
        let key = 0u32;
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&(meta.as_raw_fd() as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(&key as *const u32 as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(value.as_ptr() as u64).to_ne_bytes());
        // SAFETY: key and value outlive the call; a zero-padded bpf_attr.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, 2 /* BPF_MAP_UPDATE_ELEM */, attr.as_mut_ptr(), attr.len() as u32)
        };
        assert_eq!(rc, 0, "BPF_MAP_UPDATE_ELEM: {}", std::io::Error::last_os_error());
        redirector::sys::bpf::obj_pin(&meta, &dir.path.join("RDR_META")).unwrap();
        dir
    };
    let newer_version = redirector_common::LAYOUT_VERSION + 1;
    let newer = stamped(newer_version);
    let err = format!(
        "{:#}",
        redirector::dataplane::Dataplane::load(&newer.path, &cgroup.path).err().expect("a newer layout adopted")
    );
    assert!(
        err.contains(&format!("layout version {newer_version}, newer than this agent's"))
            && err.contains("changed nothing"),
        "{err}"
    );
    assert!(newer.path.join("RDR_META").exists(), "the newer layout's stamp was touched");
    // An older one (layout 2) is moved aside, to drain, and this layout's
    // maps take its place.
    let older = stamped(2);
    let dp = redirector::dataplane::Dataplane::load(&older.path, &cgroup.path).expect("layout 2 migrated");
    assert!(older.path.join("retired-v2/RDR_META").exists(), "layout 2's stamp moved aside");
    assert_eq!(dp.maps.meta().unwrap().layout_version, redirector_common::LAYOUT_VERSION);
    drop(dp);
    // No version stamped, but layout 2's 4,096 workloads.
    let unstamped = PinDir::new().unwrap();
    std::fs::create_dir_all(&unstamped.path).unwrap();
    let workloads = raw_map(1 /* BPF_MAP_TYPE_HASH */, 8, 40, 4096, "RDR_WORKLOADS");
    redirector::sys::bpf::obj_pin(&workloads, &unstamped.path.join("RDR_WORKLOADS")).unwrap();
    let err = format!(
        "{:#}",
        redirector::dataplane::Dataplane::load(&unstamped.path, &cgroup.path).err().expect("capacity 4096 adopted")
    );
    assert!(err.contains("RDR_WORKLOADS") && err.contains("capacity 4096") && err.contains("16384"), "{err}");
    for p in [&newer.path, &unstamped.path] {
        assert!(std::fs::read_dir(p.join("links")).map_or(true, |mut d| d.next().is_none()), "nothing attached");
    }
}
