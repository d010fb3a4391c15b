//! `cgroup/getsockopt`: answer `getsockopt(SOL_IP, SO_ORIGINAL_DST)` and
//! `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` the way conntrack does under
//! iptables REDIRECT, from what connect4/6, sockops and sk_lookup kept.
use aya_ebpf::{
    helpers::generated::bpf_get_netns_cookie, macros::cgroup_sockopt, programs::SockoptContext, EbpfContext as _,
};
use redirector_common::{counter, is_v4_mapped, v4_mapped, OrigDst, TupleKey, AF_INET, AF_INET6};

use crate::maps::{count, sock_orig, words_to_bytes, RDR_ORIG_TUPLE};

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// SO_ORIGINAL_DST and IP6T_SO_ORIGINAL_DST share the number.
const SO_ORIGINAL_DST: i32 = 80;
const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

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
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let mut key = TupleKey {
        netns_cookie: cookie,
        family: AF_INET,
        client_port: u16::from_be(s.dst_port),
        proxy_port: s.src_port as u16,
        ..TupleKey::default()
    };
    if s.family == u32::from(AF_INET) {
        key.client_addr[..4].copy_from_slice(&s.dst_ip4.to_ne_bytes());
        key.proxy_addr[..4].copy_from_slice(&s.src_ip4.to_ne_bytes());
    } else if s.family == u32::from(AF_INET6) {
        let client = words_to_bytes(s.dst_ip6);
        let proxy = words_to_bytes(s.src_ip6);
        if is_v4_mapped(&client) && is_v4_mapped(&proxy) {
            key.client_addr[..4].copy_from_slice(&client[12..]);
            key.proxy_addr[..4].copy_from_slice(&proxy[12..]);
        } else {
            key.family = AF_INET6;
            key.client_addr = client;
            key.proxy_addr = proxy;
        }
    } else {
        return None;
    }
    unsafe { RDR_ORIG_TUPLE.get(&key) }.copied()
}

#[inline(always)]
fn try_getsockopt(ctx: &SockoptContext) {
    let so = unsafe { &mut *ctx.sockopt };
    if so.optname != SO_ORIGINAL_DST || (so.level != SOL_IP && so.level != SOL_IPV6) {
        return;
    }
    let orig = match lookup(ctx) {
        Some(o) => o,
        None => {
            count(counter::ORIG_DST_MISS);
            return;
        }
    };
    let optval = unsafe { so.__bindgen_anon_2.optval } as *mut u8;
    let end = unsafe { so.__bindgen_anon_3.optval_end } as *mut u8;
    if optval.is_null() {
        return;
    }
    let len = if so.level == SOL_IP {
        // struct sockaddr_in { sa_family_t; in_port_t (be); in_addr (be); zero[8] }
        if orig.family != AF_INET {
            count(counter::ORIG_DST_MISS);
            return;
        }
        if unsafe { optval.add(SOCKADDR_IN_LEN) } > end {
            return;
        }
        let mut buf = [0u8; SOCKADDR_IN_LEN];
        buf[..2].copy_from_slice(&AF_INET.to_ne_bytes());
        buf[2..4].copy_from_slice(&orig.port_be.to_ne_bytes());
        buf[4..8].copy_from_slice(&orig.addr[..4]);
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), optval, SOCKADDR_IN_LEN) };
        SOCKADDR_IN_LEN
    } else {
        // struct sockaddr_in6 { family; port (be); flowinfo; addr[16]; scope_id }
        if unsafe { optval.add(SOCKADDR_IN6_LEN) } > end {
            return;
        }
        let addr = if orig.family == AF_INET6 {
            orig.addr
        } else {
            v4_mapped([orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]])
        };
        let mut buf = [0u8; SOCKADDR_IN6_LEN];
        buf[..2].copy_from_slice(&AF_INET6.to_ne_bytes());
        buf[2..4].copy_from_slice(&orig.port_be.to_ne_bytes());
        buf[8..24].copy_from_slice(&addr);
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), optval, SOCKADDR_IN6_LEN) };
        SOCKADDR_IN6_LEN
    };
    // Two separate 4-byte stores: the verifier rejects the 8-byte store the
    // compiler would merge them into.
    unsafe {
        core::ptr::write_volatile(&raw mut so.optlen, len as i32);
        core::ptr::write_volatile(&raw mut so.retval, 0);
    }
    count(counter::ORIG_DST_SERVED);
}
