//! `cgroup/getpeername6`: an AF_INET6 application socket whose connect was
//! redirected sees the peer it dialed (IPv4-mapped if it dialed one).
use aya_ebpf::{bindings::bpf_sock_addr, macros::cgroup_sock_addr, programs::SockAddrContext};
use redirector_common::{v4_mapped, OrigDst, AF_INET, AF_INET6};

use crate::{
    getpeername::{getpeername, PeerFamily},
    maps::bytes_to_words,
};

#[cgroup_sock_addr(getpeername6)]
pub fn rdr_getpeername6(ctx: SockAddrContext) -> i32 {
    getpeername::<V6>(&ctx)
}

pub struct V6;

impl PeerFamily for V6 {
    #[inline(always)]
    fn shows(family: u16) -> bool {
        family == AF_INET6 || family == AF_INET
    }

    #[inline(always)]
    fn write_addr(sa: &mut bpf_sock_addr, orig: &OrigDst) {
        let addr = if orig.family == AF_INET6 {
            orig.addr
        } else {
            v4_mapped([orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]])
        };
        sa.user_ip6 = bytes_to_words(&addr);
    }
}
