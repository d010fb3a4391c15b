//! `cgroup/connect6` for DNS capture: the same for AF_INET6 UDP sockets
//! (IPv6 nameservers, and IPv4-mapped ones decided as IPv4).
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::connect6::V6;

#[cgroup_sock_addr(connect6)]
pub fn rdr_dns_connect6(ctx: SockAddrContext) -> i32 {
    crate::dns::capture::<V6>(&ctx);
    1
}
