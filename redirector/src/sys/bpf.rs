//! The few bpf(2) commands we issue ourselves: creating cgroup links (aya
//! 0.14 cannot turn every cgroup link into a pinnable `FdLink`), pinning
//! them, reading a link's attach information (aya's `LinkInfo` does not
//! expose the cgroup), the programs attached to a cgroup and their names,
//! attaching the `sk_msg` program to its sockhash (aya's attachment
//! would detach it again when the agent exits), and reading a whole hash
//! map in a few calls (aya 0.14 has no batch operations).
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
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
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
    Udp4Sendmsg = 14,
    Udp6Sendmsg = 15,
    Udp4Recvmsg = 19,
    Udp6Recvmsg = 20,
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

/// Every entry of the hash map `map` (keys `K`, values `V`, plain old
/// data of the map's own sizes), with `BPF_MAP_LOOKUP_BATCH` (Linux 5.6):
/// a few calls instead of two per entry. The kernel walks the map bucket
/// by bucket, and a bucket is never split across calls (a batch too small
/// for one is `ENOSPC`, and is retried larger).
pub fn lookup_batch<K: aya::Pod, V: aya::Pod>(map: BorrowedFd<'_>) -> Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut chunk: usize = 1024;
    // The kernel's position between calls (a bucket index for a hash map).
    let mut token = [0u64; 1];
    let mut next = [0u64; 1];
    let mut first = true;
    loop {
        // SAFETY: K and V are Pod: any bytes are valid values.
        let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; chunk];
        let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; chunk];
        let mut attr = [0u8; ATTR_SIZE];
        put_u64(&mut attr, 0, if first { 0 } else { token.as_ptr() as u64 });
        put_u64(&mut attr, 8, next.as_mut_ptr() as u64);
        put_u64(&mut attr, 16, keys.as_mut_ptr() as u64);
        put_u64(&mut attr, 24, values.as_mut_ptr() as u64);
        put_u32(&mut attr, 32, chunk as u32);
        put_u32(&mut attr, 36, map.as_raw_fd() as u32);
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let count = u32::from_ne_bytes(attr[32..36].try_into().expect("4 bytes")) as usize;
        match r {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                out.extend(keys.into_iter().zip(values).take(count));
                return Ok(out);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && chunk < (1 << 20) => {
                chunk *= 2;
                continue;
            }
            Err(e) => return Err(e).context("BPF_MAP_LOOKUP_BATCH"),
        }
        out.extend(keys.into_iter().zip(values).take(count));
        token = next;
        first = false;
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
    query_ids(target, ty, 0)
}

/// `BPF_F_QUERY_EFFECTIVE` (uapi `linux/bpf.h`).
const BPF_F_QUERY_EFFECTIVE: u32 = 1;

/// `BPF_PROG_QUERY` with `BPF_F_QUERY_EFFECTIVE` on a cgroup: the ids of
/// the programs of type `ty` that run for a socket of a process in
/// `cgroup`, those attached to its ancestors included (the kernel's own
/// answer to "does this program see my sockets"). Needs `CAP_NET_ADMIN`.
pub fn effective_ids(cgroup: BorrowedFd<'_>, ty: AttachType) -> Result<Vec<u32>> {
    query_ids(cgroup, ty, BPF_F_QUERY_EFFECTIVE)
}

fn query_ids(target: BorrowedFd<'_>, ty: AttachType, flags: u32) -> Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, target.as_raw_fd() as u32);
    put_u32(&mut attr, 4, ty as u32);
    put_u32(&mut attr, 8, flags);
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

/// `BPF_OBJ_GET_INFO_BY_FD` into `info` (zeroed, `info.len()` bytes: the
/// kernel fills at most that much of its info struct).
fn obj_info(fd: BorrowedFd<'_>, info: &mut [u8]) -> Result<()> {
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, fd.as_raw_fd() as u32);
    put_u32(&mut attr, 4, info.len() as u32);
    put_u64(&mut attr, 8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
    Ok(())
}

/// `BPF_LINK_TYPE_CGROUP` (enum bpf_link_type).
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// What a link is attached to (`struct bpf_link_info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
    /// For a cgroup link: the id of its cgroup (the cgroup directory's
    /// inode number on cgroup2) and the attach type. None for other links.
    pub cgroup: Option<(u64, u32)>,
}

/// The attach information of a link (a pinned link opened with
/// [`obj_get`]).
pub fn link_info(link: BorrowedFd<'_>) -> Result<LinkInfo> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then a union
    // aligned to 8 whose `cgroup` member is { u64 cgroup_id; u32
    // attach_type } (uapi linux/bpf.h; aya-obj's generated
    // bpf_link_info__bindgen_ty_1__bindgen_ty_3).
    let mut info = [0u8; 64];
    obj_info(link, &mut info)?;
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().expect("4 bytes"));
    let cgroup = (u32_at(0) == BPF_LINK_TYPE_CGROUP)
        .then(|| (u64::from_ne_bytes(info[16..24].try_into().expect("8 bytes")), u32_at(24)));
    Ok(LinkInfo { id: u32_at(4), prog_id: u32_at(8), cgroup })
}

/// The name a program was loaded with (`struct bpf_prog_info`'s `name`,
/// at most 15 bytes).
pub fn prog_name(prog: BorrowedFd<'_>) -> Result<String> {
    // struct bpf_prog_info: type, id, tag[8], jited_prog_len,
    // xlated_prog_len, jited_prog_insns, xlated_prog_insns, load_time,
    // created_by_uid, nr_map_ids, map_ids, then name[16] at offset 64.
    let mut info = [0u8; 128];
    obj_info(prog, &mut info)?;
    let name = &info[64..80];
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}
