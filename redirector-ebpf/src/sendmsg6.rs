//! `cgroup/sendmsg6`: DNS capture for unconnected AF_INET6 UDP sockets,
//! IPv6 nameservers and IPv4-mapped ones (decided as the IPv4 address).
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::connect6::V6;

#[cgroup_sock_addr(sendmsg6)]
pub fn rdr_sendmsg6(ctx: SockAddrContext) -> i32 {
    crate::dns::capture::<V6>(&ctx);
    1
}
