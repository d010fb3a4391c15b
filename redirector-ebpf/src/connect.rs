//! What connect4 and connect6 share: the workload's policy, the decision,
//! the `OrigDst` record on the socket and the counters. A [`Family`] reads
//! the destination and writes the proxy's address. A UDP socket's connect
//! is DNS capture's (`dns_connect4/6`, attached only while asked for).
use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::generated::bpf_get_netns_cookie,
    programs::SockAddrContext,
    EbpfContext as _,
};
use redirector_common::{
    counter,
    decide::{decide, orig_accel_flag, Action, Dst},
    flags, orig_flags, OrigDst, WorkloadPolicy,
};

use crate::{
    lookups::Maps,
    maps::{count, sock_orig, IPPROTO_TCP, RDR_WORKLOADS},
};

/// The address-family half of a connect hook.
pub trait Family {
    /// The destination as the chain decides on it, and its record for the
    /// proxy (`flags` left to the core). `sk` is not null.
    fn read(sa: &bpf_sock_addr, sk: *mut bpf_sock) -> (Dst, OrigDst);
    /// Points the connect at the proxy's address (the port is the core's).
    fn redirect(sa: &mut bpf_sock_addr, policy: &WorkloadPolicy, dst: &Dst);
}

#[inline(always)]
pub fn connect<F: Family>(ctx: &SockAddrContext) {
    #[cfg(feature = "upgrade-test")]
    count(counter::UPGRADE_TEST_BUILD);
    let sa = unsafe { &mut *ctx.sock_addr };
    // UDP (DNS capture) has programs of its own, `dns_connect4/6`: its
    // stack would not fit beside this path's in one frame (the verifier's
    // 512 bytes for a call chain).
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
    let (dst, mut orig) = F::read(sa, sk);
    let action = decide(&Maps, &policy, &dst);
    if let Some(index) = action.counter() {
        count(index);
    }
    let port = match action {
        Action::Pass(_) => return,
        Action::Outbound => policy.outbound_port,
        Action::Inbound => policy.inbound_port,
        Action::Dns => policy.dns_port,
    };
    orig.flags = orig_flags::APP_SIDE | orig_accel_flag(&policy);
    let slot = unsafe { sock_orig(sk, Some(&mut orig)) };
    if slot.is_null() {
        // Without a record the proxy could not learn the destination:
        // leave the connection alone rather than redirect it blind.
        count(counter::SK_STORAGE_FAILED);
        return;
    }
    // A socket that connects again (after AF_UNSPEC) gets the new target.
    unsafe { *slot = orig };
    F::redirect(sa, &policy, &dst);
    sa.user_port = u32::from(port.to_be());
    count(if action == Action::Dns { counter::DNS_REDIRECTED } else { counter::REDIRECTED });
}
