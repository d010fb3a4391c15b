//! `cgroup/recvmsg4`: a reply of the proxy's DNS listener to a captured
//! AF_INET socket comes from the nameserver the application asked (what
//! conntrack's reverse NAT does for the REDIRECT rule).
use aya_ebpf::{bindings::bpf_sock_addr, macros::cgroup_sock_addr, programs::SockAddrContext};
use redirector_common::WorkloadPolicy;

use crate::{dns::ReplyFamily, getpeername4::V4};

#[cgroup_sock_addr(recvmsg4)]
pub fn rdr_recvmsg4(ctx: SockAddrContext) -> i32 {
    crate::dns::restore_reply::<V4>(&ctx)
}

impl ReplyFamily for V4 {
    #[inline(always)]
    fn from_listener(sa: &bpf_sock_addr, policy: &WorkloadPolicy) -> bool {
        sa.user_ip4 == policy.redirect_ip4
    }
}
