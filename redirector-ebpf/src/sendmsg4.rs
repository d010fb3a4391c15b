//! `cgroup/sendmsg4`: DNS capture for unconnected AF_INET UDP sockets
//! (istio-iptables' `-p udp --dport 53 -d NAMESERVER -j REDIRECT
//! --to-port 15053`). Attached only while a workload asks for it.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::connect4::V4;

#[cgroup_sock_addr(sendmsg4)]
pub fn rdr_sendmsg4(ctx: SockAddrContext) -> i32 {
    crate::dns::capture::<V4>(&ctx);
    // Never refuse a datagram: capture only rewrites its destination.
    1
}
