//! The few bpf(2) commands we issue ourselves: creating cgroup links (aya
//! 0.14 cannot turn every cgroup link into a pinnable `FdLink`), pinning
//! them, reading a link's attach information, and attaching the `sk_msg`
//! program to its sockhash (aya's attachment would detach it again when
//! the agent exits).
use std::{
    ffi::CString,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result};

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;

/// Kernel attach types we use (enum bpf_attach_type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum AttachType {
    SockOps = 3,
    /// Target is a sockmap or sockhash fd.
    SkMsgVerdict = 7,
    Inet4Connect = 10,
    Inet6Connect = 11,
    GetSockopt = 21,
    Inet4Getpeername = 29,
    Inet6Getpeername = 30,
    /// Target is a network namespace fd, not a cgroup.
    SkLookup = 36,
}

const ATTR_SIZE: usize = 128;

fn bpf(cmd: libc::c_long, attr: &mut [u8; ATTR_SIZE]) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a zero-padded bpf_attr of ATTR_SIZE bytes.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), ATTR_SIZE as u32) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn put_u32(attr: &mut [u8; ATTR_SIZE], offset: usize, v: u32) {
    attr[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; ATTR_SIZE], offset: usize, v: u64) {
    attr[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
}

/// `BPF_LINK_CREATE` for a cgroup attach type (or, for `SkLookup`, a
/// network namespace).
pub fn link_create(prog: BorrowedFd<'_>, target: BorrowedFd<'_>, ty: AttachType) -> Result<OwnedFd> {
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 4, target.as_raw_fd() as u32);
    put_u32(&mut attr, 8, ty as u32);
    // cgroup links always coexist with other programs (multi-attach); flags must be 0.
    let fd = bpf(BPF_LINK_CREATE, &mut attr).with_context(|| format!("BPF_LINK_CREATE {ty:?}"))?;
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_PIN`: pins `fd` at `path` on a bpffs.
pub fn obj_pin(fd: impl AsFd, path: &Path) -> Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u8; ATTR_SIZE];
    put_u64(&mut attr, 0, c.as_ptr() as u64);
    put_u32(&mut attr, 8, fd.as_fd().as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).with_context(|| format!("pinning at {}", path.display()))?;
    Ok(())
}

/// `BPF_OBJ_GET`: opens a pinned object.
pub fn obj_get(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u8; ATTR_SIZE];
    put_u64(&mut attr, 0, c.as_ptr() as u64);
    let fd = bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("opening pin {}", path.display()))?;
    // SAFETY: new fd owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether the map pinned at `path` has no entry (`BPF_MAP_GET_NEXT_KEY`
/// from no key: ENOENT means empty), whatever its key and value types: a
/// retired layout's maps are read without knowing their types.
pub fn pinned_map_is_empty(path: &Path) -> Result<bool> {
    let key_size = aya::maps::MapInfo::from_pin(path)
        .with_context(|| format!("reading the pinned map {}", path.display()))?
        .key_size() as usize;
    let map = obj_get(path)?;
    let mut key = vec![0u8; key_size.max(1)];
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, map.as_raw_fd() as u32);
    put_u64(&mut attr, 8, 0);
    put_u64(&mut attr, 16, key.as_mut_ptr() as u64);
    match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
        Ok(_) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(true),
        Err(e) => Err(e).with_context(|| format!("BPF_MAP_GET_NEXT_KEY on {}", path.display())),
    }
}

/// `BPF_PROG_QUERY`: how many programs of attach type `ty` are attached to
/// `target` (a cgroup directory, or a network namespace for `SkLookup`).
pub fn attached_count(target: BorrowedFd<'_>, ty: AttachType) -> Result<u32> {
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, target.as_raw_fd() as u32);
    put_u32(&mut attr, 4, ty as u32);
    // prog_ids = NULL: the kernel only writes the count back (prog_cnt).
    bpf(BPF_PROG_QUERY, &mut attr).with_context(|| format!("BPF_PROG_QUERY {ty:?}"))?;
    Ok(u32::from_ne_bytes(attr[24..28].try_into().expect("4 bytes")))
}

/// `BPF_PROG_ATTACH` of `prog` to a sockmap or sockhash. The map holds one
/// program per attach type: this replaces the one attached before, if any,
/// and the program stays attached as long as the map lives (a pinned map
/// outlives the agent), not as long as this process.
pub fn map_prog_attach(prog: BorrowedFd<'_>, map: BorrowedFd<'_>, ty: AttachType) -> Result<()> {
    map_prog_cmd(BPF_PROG_ATTACH, "BPF_PROG_ATTACH", prog, map, ty)
}

/// `BPF_PROG_DETACH` of `prog` from a sockmap or sockhash.
pub fn map_prog_detach(prog: BorrowedFd<'_>, map: BorrowedFd<'_>, ty: AttachType) -> Result<()> {
    map_prog_cmd(BPF_PROG_DETACH, "BPF_PROG_DETACH", prog, map, ty)
}

/// Both commands take the same attributes: target map, program, type.
fn map_prog_cmd(
    cmd: libc::c_long,
    name: &str,
    prog: BorrowedFd<'_>,
    map: BorrowedFd<'_>,
    ty: AttachType,
) -> Result<()> {
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, map.as_raw_fd() as u32);
    put_u32(&mut attr, 4, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 8, ty as u32);
    bpf(cmd, &mut attr).with_context(|| format!("{name} {ty:?}"))?;
    Ok(())
}

/// `BPF_PROG_QUERY` with room for ids: the ids of the programs of type
/// `ty` attached to `target` (for a sockmap: Linux 5.19+).
pub fn attached_ids(target: BorrowedFd<'_>, ty: AttachType) -> Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, target.as_raw_fd() as u32);
    put_u32(&mut attr, 4, ty as u32);
    put_u64(&mut attr, 16, ids.as_mut_ptr() as u64);
    put_u32(&mut attr, 24, ids.len() as u32);
    bpf(BPF_PROG_QUERY, &mut attr).with_context(|| format!("BPF_PROG_QUERY {ty:?}"))?;
    let n = u32::from_ne_bytes(attr[24..28].try_into().expect("4 bytes")) as usize;
    Ok(ids[..n.min(ids.len())].to_vec())
}

/// `BPF_PROG_GET_FD_BY_ID`: the program with that id, if it still exists.
pub fn prog_by_id(id: u32) -> Result<OwnedFd> {
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, id);
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).with_context(|| format!("BPF_PROG_GET_FD_BY_ID {id}"))?;
    // SAFETY: new fd owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
