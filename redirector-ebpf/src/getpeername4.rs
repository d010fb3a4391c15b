//! `cgroup/getpeername4`: an application whose connect was redirected sees
//! the peer it dialed, not the proxy's listener.
use aya_ebpf::{bindings::bpf_sock_addr, macros::cgroup_sock_addr, programs::SockAddrContext};
use redirector_common::{OrigDst, AF_INET};

use crate::getpeername::{getpeername, PeerFamily};

#[cgroup_sock_addr(getpeername4)]
pub fn rdr_getpeername4(ctx: SockAddrContext) -> i32 {
    getpeername::<V4>(&ctx)
}

pub struct V4;

impl PeerFamily for V4 {
    #[inline(always)]
    fn shows(family: u16) -> bool {
        family == AF_INET
    }

    #[inline(always)]
    fn write_addr(sa: &mut bpf_sock_addr, orig: &OrigDst) {
        sa.user_ip4 = u32::from_ne_bytes([orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]]);
    }
}
