//! `cgroup/getsockopt`: answer `getsockopt(SOL_IP, SO_ORIGINAL_DST)` and
//! `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` the way conntrack does under
//! iptables REDIRECT, from what connect4/6, sockops and sk_lookup kept, and
//! for a proxy's connection nothing redirected, with its own address.
use aya_ebpf::{
    bindings::bpf_sock, helpers::generated::bpf_get_netns_cookie, macros::cgroup_sockopt, programs::SockoptContext,
    EbpfContext as _,
};
use redirector_common::{counter, is_v4_mapped, orig_flags, v4_mapped, OrigDst, TupleKey, AF_INET, AF_INET6};

use crate::maps::{count, sock_orig, words_to_bytes, IPPROTO_TCP, RDR_ORIG_TUPLE, RDR_WORKLOADS};

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

/// What the program answers with, and the counter that says so.
struct Answer {
    orig: OrigDst,
    counter: u32,
}

/// What becomes of the kernel's answer.
enum Outcome {
    /// Overwritten with this.
    Answer(Answer),
    /// Left as it is (conntrack NATed the connection), counted so.
    Kernel(u32),
    /// Left as it is: nothing known (`orig_dst_miss`).
    Miss,
}

#[inline(always)]
fn lookup(ctx: &SockoptContext, kernel_retval: i32) -> Outcome {
    let so = unsafe { &*ctx.sockopt };
    let sk = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return Outcome::Miss;
    }
    let stored = unsafe { sock_orig(sk, None) };
    if !stored.is_null() {
        let orig = unsafe { *stored };
        // An inbound record is the accepted socket's local address; if
        // conntrack answered, something NATed the connection before the
        // socket lookup (the mesh's iptables REDIRECT, still in the pod
        // while it migrates) and its answer is the original destination.
        if orig.flags & orig_flags::INBOUND != 0 && kernel_retval == 0 {
            return Outcome::Kernel(counter::ORIG_DST_CONNTRACK);
        }
        return Outcome::Answer(Answer { orig, counter: counter::ORIG_DST_SERVED });
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
        return Outcome::Miss;
    }
    if let Some(orig) = unsafe { RDR_ORIG_TUPLE.get(&key) } {
        return Outcome::Answer(Answer { orig: *orig, counter: counter::ORIG_DST_SERVED });
    }
    own_address(s, &key, kernel_retval).map_or(Outcome::Miss, Outcome::Answer)
}

/// No record: conntrack's answer. `getorigdst` (net/netfilter/
/// nf_conntrack_proto.c) looks the socket's tuple up and answers the
/// destination of the connection's original direction; for a connection
/// nothing NATed, accepted by the proxy, that is the accepted socket's own
/// local address (a process of the pod dialing 127.0.0.1:15001 or the
/// inbound port, a redirected connection whose record did not fit; a
/// peer's connection to podIP:15003 has sockops' inbound record).
/// Proxies rely on it: squid in intercept mode answers such a connection
/// "403 forwarding loop" and goes on serving, while a failed lookup makes
/// squid 5 stop accepting on that port.
///
/// Only for TCP sockets of a workload, connected (a listening socket has
/// no remote port, and no conntrack entry) and accepted on one of
/// its proxy's ports: the program cannot tell an accepted socket from one
/// that connected out (conntrack answers the remote address for those),
/// and the proxy's ports are where only accepted sockets live. Every other
/// socket keeps the kernel's answer (ENOENT without a conntrack entry),
/// as does a socket the kernel already answered for (conntrack in use).
#[inline(always)]
fn own_address(s: &bpf_sock, key: &TupleKey, kernel_retval: i32) -> Option<Answer> {
    if kernel_retval == 0 || s.protocol != IPPROTO_TCP || key.client_port == 0 {
        return None;
    }
    let policy = unsafe { RDR_WORKLOADS.get(&key.netns_cookie) }?;
    if key.proxy_port != policy.outbound_port && key.proxy_port != policy.inbound_port {
        return None;
    }
    Some(Answer {
        orig: OrigDst { family: key.family, port_be: key.proxy_port.to_be(), flags: 0, addr: key.proxy_addr },
        counter: counter::ORIG_DST_OWN_ADDRESS,
    })
}

#[inline(always)]
fn try_getsockopt(ctx: &SockoptContext) {
    let so = unsafe { &mut *ctx.sockopt };
    if so.optname != SO_ORIGINAL_DST || (so.level != SOL_IP && so.level != SOL_IPV6) {
        return;
    }
    let kernel_retval = so.retval;
    let Answer { orig, counter: served } = match lookup(ctx, kernel_retval) {
        Outcome::Answer(a) => a,
        Outcome::Kernel(c) => {
            count(c);
            return;
        }
        Outcome::Miss => {
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
    count(served);
}
