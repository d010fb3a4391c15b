//! `cgroup/recvmsg6`: the same for AF_INET6 sockets; the listener of an
//! IPv4-mapped nameserver's queries is `::ffff:127.0.0.1`.
use aya_ebpf::{bindings::bpf_sock_addr, macros::cgroup_sock_addr, programs::SockAddrContext};
use redirector_common::{v4_mapped, WorkloadPolicy};

use crate::{dns::ReplyFamily, getpeername6::V6, maps::words_to_bytes};

#[cgroup_sock_addr(recvmsg6)]
pub fn rdr_recvmsg6(ctx: SockAddrContext) -> i32 {
    crate::dns::restore_reply::<V6>(&ctx)
}

impl ReplyFamily for V6 {
    #[inline(always)]
    fn from_listener(sa: &bpf_sock_addr, policy: &WorkloadPolicy) -> bool {
        let src = words_to_bytes(sa.user_ip6);
        src == policy.redirect_ip6 || src == v4_mapped(policy.redirect_ip4.to_ne_bytes())
    }
}
