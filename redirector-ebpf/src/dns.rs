//! DNS capture for UDP, shared by sendmsg4/6 (unconnected sockets) and
//! connect4/6 (connected ones): a datagram to port 53 of one of the
//! workload's nameservers goes to the proxy's DNS listener, and the socket
//! keeps the nameserver it asked in its `OrigDst` record, so recvmsg4/6
//! show the listener's replies as coming from it (resolvers drop an answer
//! from an address they did not ask) and getpeername shows it as the
//! connected peer. The decision is `redirector_common::decide::decide_udp`.
use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::generated::bpf_get_netns_cookie, programs::SockAddrContext, EbpfContext as _,
};
use redirector_common::{
    counter,
    decide::{decide_udp, Action, Reason},
    flags, orig_flags, WorkloadPolicy,
};

use crate::{
    connect::Family,
    getpeername::PeerFamily,
    lookups::Maps,
    maps::{count, sock_orig, IPPROTO_UDP, RDR_WORKLOADS},
};

/// The workload policy of the context's network namespace, when it asks
/// for DNS capture. Read in place, not copied as connect4/6 copy it: the
/// copy's 64 bytes would take this path's stack past the verifier's 512
/// for a call chain on Linux 6.1 (an update that races with a query can
/// at worst decide that one datagram by the old and new entry both).
#[inline(always)]
fn dns_policy(ctx: &SockAddrContext) -> Option<&'static WorkloadPolicy> {
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let policy = unsafe { RDR_WORKLOADS.get(&netns) }?;
    let want = flags::OUT_ENABLED | flags::DNS_CAPTURE;
    (policy.flags & want == want).then_some(policy)
}

/// A UDP datagram's destination (sendmsg) or a UDP socket's peer
/// (connect): to the DNS listener if the workload captures it.
#[inline(always)]
pub fn capture<F: Family>(ctx: &SockAddrContext) {
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_UDP {
        return;
    }
    let Some(policy) = dns_policy(ctx) else { return };
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    let (dst, mut orig) = F::read(sa, sk);
    match decide_udp(&Maps, policy, &dst) {
        Action::Dns => {}
        Action::Pass(Reason::Proxy) => return count(counter::BYPASS_PROXY_UID),
        _ => return,
    }
    orig.flags = orig_flags::APP_SIDE | orig_flags::DNS;
    let slot = unsafe { sock_orig(sk, Some(&mut orig)) };
    if slot.is_null() {
        // Without the record the reply would come from the listener, which
        // the resolver would drop: let the query go to the nameserver.
        count(counter::SK_STORAGE_FAILED);
        return;
    }
    // The nameserver of this datagram: a socket that asks several keeps
    // the last (replies come from one listener either way).
    unsafe { *slot = orig };
    F::redirect(sa, policy, &dst);
    sa.user_port = u32::from(policy.dns_port.to_be());
    count(counter::DNS_REDIRECTED);
}

/// The source-address half of a recvmsg hook.
pub trait ReplyFamily: PeerFamily {
    /// `sa`'s source address is the proxy's DNS listener of `policy` (the
    /// address `capture` sent the socket's queries to).
    fn from_listener(sa: &bpf_sock_addr, policy: &WorkloadPolicy) -> bool;
}

/// recvmsg4/6: a datagram from the DNS listener to a socket whose queries
/// were captured is shown as coming from the nameserver it asked. Always 1
/// (a recvmsg hook cannot refuse).
#[inline(always)]
pub fn restore_reply<F: ReplyFamily>(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() {
        return 1;
    }
    let rec = unsafe { sock_orig(sk, None) };
    if rec.is_null() {
        return 1;
    }
    let rec = unsafe { *rec };
    if rec.flags & orig_flags::DNS == 0 || !F::shows(rec.family) {
        return 1;
    }
    let Some(policy) = dns_policy(ctx) else { return 1 };
    if u16::from_be(sa.user_port as u16) != policy.dns_port || !F::from_listener(sa, policy) {
        return 1;
    }
    F::write_addr(sa, &rec);
    sa.user_port = u32::from(rec.port_be);
    count(counter::DNS_REPLY_RESTORED);
    1
}
