//! Test support only (feature `socklb-standin`, built by redirector-testkit
//! into its own object, never part of the agent's): a stand-in for Cilium's
//! socket-level load balancer, to test that redirector's programs run
//! before one attached at a parent cgroup.
//!
//! It does what Cilium's `cil_sock4_connect` / `cil_sock4_getpeername`
//! (bpf/bpf_sock.c: `__sock4_xlate_fwd`, `__sock4_xlate_rev`) do for a
//! ClusterIP: a connect to a service address (VIP:port) is rewritten to a
//! backend before the socket connects, the (cookie, backend) → VIP pair is
//! remembered (Cilium's `cilium_lb4_reverse_sk`), and getpeername on that
//! socket answers the VIP again. Anything else passes untouched.
use aya_ebpf::{
    btf_maps::HashMap, helpers::generated::bpf_get_socket_cookie, macros::btf_map, macros::cgroup_sock_addr,
    programs::SockAddrContext, EbpfContext as _,
};

use crate::maps::IPPROTO_TCP;

/// `addr_be << 32 | port_be`, both as the kernel stores them in
/// `bpf_sock_addr` (network order in a u32).
#[inline(always)]
fn endpoint(addr: u32, port: u32) -> u64 {
    ((addr as u64) << 32) | (port as u64 & 0xffff)
}

/// Service (VIP endpoint) → backend endpoint; written by the test.
#[btf_map]
static STANDIN_LB4_SERVICES: HashMap<u64, u64, 16> = HashMap::new();

/// Socket cookie → [backend, VIP] of each translated connect.
#[btf_map]
static STANDIN_LB4_REVERSE: HashMap<u64, [u64; 2], 1024> = HashMap::new();

#[cgroup_sock_addr(connect4)]
pub fn standin_sock4_connect(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return 1;
    }
    let vip = endpoint(sa.user_ip4, sa.user_port);
    let backend = match unsafe { STANDIN_LB4_SERVICES.get(&vip) } {
        Some(b) => *b,
        None => return 1,
    };
    sa.user_ip4 = (backend >> 32) as u32;
    sa.user_port = (backend & 0xffff) as u32;
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = STANDIN_LB4_REVERSE.insert(&cookie, &[backend, vip], 0);
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn standin_sock4_getpeername(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let [backend, vip] = match unsafe { STANDIN_LB4_REVERSE.get(&cookie) } {
        Some(r) => *r,
        None => return 1,
    };
    // Only the backend this socket was sent to is shown as the VIP.
    if endpoint(sa.user_ip4, sa.user_port) == backend {
        sa.user_ip4 = (vip >> 32) as u32;
        sa.user_port = (vip & 0xffff) as u32;
    }
    1
}
