//! `cgroup/connect4`: send a meshed workload's outbound TCP connects to the
//! proxy, unless a rule of the osm-init chain PROXY_OUTPUT (or Istio's
//! ISTIO_OUTPUT) would RETURN it.
use aya_ebpf::{
    helpers::generated::bpf_get_netns_cookie, macros::cgroup_sock_addr, programs::SockAddrContext, EbpfContext as _,
};
use redirector_common::{counter, flags, orig_flags, v4_in16, v4_mapped, OrigDst, AF_INET};

use crate::{
    decide::{decide, Action, Dst},
    maps::{count, sock_orig, IPPROTO_TCP, RDR_WORKLOADS},
};

const PASSTHROUGH4: u32 = u32::from_ne_bytes([127, 0, 0, 6]);

#[cgroup_sock_addr(connect4)]
pub fn rdr_connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx);
    // Never refuse a connect: a policy decision only rewrites the address.
    1
}

#[inline(always)]
fn try_connect4(ctx: &SockAddrContext) {
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
    let bound = unsafe { (*sk).src_ip4 };
    let v4 = sa.user_ip4.to_ne_bytes();
    let dst = Dst {
        addr: v4_mapped(v4),
        is_v4: true,
        port: u16::from_be(sa.user_port as u16),
        from_passthrough: bound == PASSTHROUGH4,
    };
    let port = match decide(&policy, &dst) {
        Action::Pass => return,
        Action::Outbound => policy.outbound_port,
        Action::Inbound => policy.inbound_port,
    };
    let mut orig = OrigDst {
        family: AF_INET,
        port_be: sa.user_port as u16,
        flags: orig_flags::APP_SIDE | crate::decide::orig_accel_flag(&policy),
        addr: v4_in16([v4[0], v4[1], v4[2], v4[3]]),
    };
    let slot = unsafe { sock_orig(sk, Some(&mut orig)) };
    if slot.is_null() {
        // Without a record the proxy could not learn the destination:
        // leave the connection alone rather than redirect it blind.
        count(counter::SK_STORAGE_FAILED);
        return;
    }
    // A socket that connects again (after AF_UNSPEC) gets the new target.
    unsafe { *slot = orig };
    sa.user_ip4 = policy.redirect_ip4;
    sa.user_port = u32::from(port.to_be());
    count(counter::REDIRECTED);
}
