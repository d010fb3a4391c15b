//! `cgroup/connect6`: the same decision for AF_INET6 sockets. A pure IPv6
//! destination goes to the proxy at `redirect_ip6` (::1); an IPv4-mapped
//! destination is decided as the IPv4 address it carries and goes to
//! `::ffff:127.0.0.1`, so writing an address differently bypasses nothing.
use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirector_common::{decide::Dst, is_v4_mapped, v4_in16, v4_mapped, OrigDst, WorkloadPolicy, AF_INET, AF_INET6};

use crate::{
    connect::{connect, Family},
    maps::{bytes_to_words, words_to_bytes},
};

const PASSTHROUGH_MAPPED: [u8; 16] = v4_mapped([127, 0, 0, 6]);

#[cgroup_sock_addr(connect6)]
pub fn rdr_connect6(ctx: SockAddrContext) -> i32 {
    connect::<V6>(&ctx);
    1
}

pub struct V6;

impl Family for V6 {
    #[inline(always)]
    fn read(sa: &bpf_sock_addr, sk: *mut bpf_sock) -> (Dst, OrigDst) {
        let bound = words_to_bytes(unsafe { (*sk).src_ip6 });
        let addr = words_to_bytes(sa.user_ip6);
        let is_v4 = is_v4_mapped(&addr);
        let dst =
            Dst { addr, is_v4, port: u16::from_be(sa.user_port as u16), from_passthrough: bound == PASSTHROUGH_MAPPED };
        // The record holds the destination in its own family: the proxy of
        // an IPv4-mapped connection accepts an IPv4 connection and asks SOL_IP.
        let mut orig = OrigDst { family: AF_INET6, port_be: sa.user_port as u16, flags: 0, addr };
        if is_v4 {
            orig.family = AF_INET;
            orig.addr = v4_in16([addr[12], addr[13], addr[14], addr[15]]);
        }
        (dst, orig)
    }

    #[inline(always)]
    fn redirect(sa: &mut bpf_sock_addr, policy: &WorkloadPolicy, dst: &Dst) {
        let target = if dst.is_v4 { v4_mapped(policy.redirect_ip4.to_ne_bytes()) } else { policy.redirect_ip6 };
        sa.user_ip6 = bytes_to_words(&target);
    }
}
