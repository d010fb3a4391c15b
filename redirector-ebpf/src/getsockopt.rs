//! `cgroup/getsockopt`: answer `getsockopt(SOL_IP, SO_ORIGINAL_DST)` the way
//! conntrack does under iptables REDIRECT, from what connect4/sockops kept.
use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::bpf_get_netns_cookie,
    macros::cgroup_sockopt,
    programs::SockoptContext,
};
use redirector_common::{counter, OrigDst, TupleKey, AF_INET};

use crate::maps::{count, sock_orig, RDR_ORIG_TUPLE};

const SOL_IP: i32 = 0;
const SO_ORIGINAL_DST: i32 = 80;
const SOCKADDR_IN_LEN: usize = 16;

#[cgroup_sockopt(getsockopt)]
pub fn rdr_getsockopt(ctx: SockoptContext) -> i32 {
    try_getsockopt(&ctx);
    1
}

#[inline(always)]
fn lookup(ctx: &SockoptContext) -> Option<OrigDst> {
    let so = unsafe { &*ctx.sockopt };
    let sk = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return None;
    }
    let stored = unsafe { sock_orig(sk, None) };
    if !stored.is_null() {
        return Some(unsafe { *stored });
    }
    // Not handed over at accept time (e.g. the proxy runs in another
    // cgroup): look the connection up by its 4-tuple.
    let s = unsafe { &*sk };
    if s.family != u32::from(AF_INET) {
        return None;
    }
    let key = TupleKey::v4(
        unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        s.dst_ip4,
        u16::from_be(s.dst_port),
        s.src_ip4,
        s.src_port as u16,
    );
    unsafe { RDR_ORIG_TUPLE.get(&key) }.copied()
}

#[inline(always)]
fn try_getsockopt(ctx: &SockoptContext) {
    let so = unsafe { &mut *ctx.sockopt };
    if so.level != SOL_IP || so.optname != SO_ORIGINAL_DST {
        return;
    }
    let orig = match lookup(ctx) {
        Some(o) if o.family == AF_INET => o,
        _ => {
            count(counter::ORIG_DST_MISS);
            return;
        }
    };
    let optval = unsafe { so.__bindgen_anon_2.optval } as *mut u8;
    let end = unsafe { so.__bindgen_anon_3.optval_end } as *mut u8;
    if optval.is_null() || unsafe { optval.add(SOCKADDR_IN_LEN) } > end {
        return;
    }
    // struct sockaddr_in { sa_family_t; in_port_t (be); in_addr (be); zero[8] }
    let mut buf = [0u8; SOCKADDR_IN_LEN];
    buf[..2].copy_from_slice(&AF_INET.to_ne_bytes());
    buf[2..4].copy_from_slice(&orig.port_be.to_ne_bytes());
    buf[4..8].copy_from_slice(&orig.addr[..4]);
    unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), optval, SOCKADDR_IN_LEN) };
    // Two separate 4-byte stores: the verifier rejects the 8-byte store the
    // compiler would merge them into.
    unsafe {
        core::ptr::write_volatile(&raw mut so.optlen, SOCKADDR_IN_LEN as i32);
        core::ptr::write_volatile(&raw mut so.retval, 0);
    }
    count(counter::ORIG_DST_SERVED);
}
