//! `cgroup/connect4` for DNS capture: a connected AF_INET UDP socket to
//! port 53 of a nameserver is connected to the proxy's DNS listener
//! instead (as glibc's resolver connects). A program of its own beside
//! `rdr_connect4` (which takes TCP only), attached only while a workload
//! asks for DNS capture.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::connect4::V4;

#[cgroup_sock_addr(connect4)]
pub fn rdr_dns_connect4(ctx: SockAddrContext) -> i32 {
    crate::dns::capture::<V4>(&ctx);
    1
}
