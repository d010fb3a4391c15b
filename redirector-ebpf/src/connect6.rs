//! `cgroup/connect6`: the same decision for AF_INET6 sockets. A pure IPv6
//! destination goes to the proxy at `redirect_ip6` (::1); an IPv4-mapped
//! destination is decided as the IPv4 address it carries and goes to
//! `::ffff:127.0.0.1`, so writing an address differently bypasses nothing.
use aya_ebpf::{
    helpers::generated::bpf_get_netns_cookie, macros::cgroup_sock_addr, programs::SockAddrContext, EbpfContext as _,
};
use redirector_common::{counter, flags, is_v4_mapped, orig_flags, v4_in16, v4_mapped, OrigDst, AF_INET, AF_INET6};

use crate::{
    decide::{decide, Action, Dst},
    maps::{bytes_to_words, count, sock_orig, words_to_bytes, IPPROTO_TCP, RDR_WORKLOADS},
};

const PASSTHROUGH_MAPPED: [u8; 16] = v4_mapped([127, 0, 0, 6]);

#[cgroup_sock_addr(connect6)]
pub fn rdr_connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx);
    1
}

#[inline(always)]
fn try_connect6(ctx: &SockAddrContext) {
    #[cfg(feature = "upgrade-test")]
    count(counter::UPGRADE_TEST_BUILD);
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let policy = match unsafe { RDR_WORKLOADS.get(&netns) } {
        Some(p) => *p,
        None => return,
    };
    if policy.flags & flags::OUT_ENABLED == 0 {
        return;
    }
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    let bound = words_to_bytes(unsafe { (*sk).src_ip6 });
    let addr = words_to_bytes(sa.user_ip6);
    let is_v4 = is_v4_mapped(&addr);
    let dst =
        Dst { addr, is_v4, port: u16::from_be(sa.user_port as u16), from_passthrough: bound == PASSTHROUGH_MAPPED };
    let port = match decide(&policy, &dst) {
        Action::Pass => return,
        Action::Outbound => policy.outbound_port,
        Action::Inbound => policy.inbound_port,
    };
    // The record holds the destination in its own family: the proxy of an
    // IPv4-mapped connection accepts an IPv4 connection and asks SOL_IP.
    let mut orig = OrigDst {
        family: AF_INET6,
        port_be: sa.user_port as u16,
        flags: orig_flags::APP_SIDE | crate::decide::orig_accel_flag(&policy),
        addr,
    };
    if is_v4 {
        orig.family = AF_INET;
        orig.addr = v4_in16([addr[12], addr[13], addr[14], addr[15]]);
    }
    let slot = unsafe { sock_orig(sk, Some(&mut orig)) };
    if slot.is_null() {
        count(counter::SK_STORAGE_FAILED);
        return;
    }
    unsafe { *slot = orig };
    let target = if is_v4 { v4_mapped(policy.redirect_ip4.to_ne_bytes()) } else { policy.redirect_ip6 };
    sa.user_ip6 = bytes_to_words(&target);
    sa.user_port = u32::from(port.to_be());
    count(counter::REDIRECTED);
}
