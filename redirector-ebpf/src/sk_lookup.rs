//! `sk_lookup`, attached to one workload's network namespace: a TCP
//! connection arriving from outside the workload is handed to the proxy's
//! inbound listener (osm-init's PROXY_INBOUND → REDIRECT 15003, Istio's
//! ISTIO_INBOUND → 15006) instead of the socket it was addressed to. The
//! accepted socket keeps the address the client dialed as its local
//! address, which is what the proxy reads back as the original destination.
//!
//! sk_lookup programs cannot ask for their network namespace, so the agent
//! loads one instance per workload with `RDR_SELF_NETNS` set to its cookie.
use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use redirector_common::{
    cidr_kind, counter,
    decide::{inbound_redirected, is_local_peer, Lookups as _},
    flags, v4_in16, v4_mapped, ListenerKey, AF_INET, AF_INET6,
};

use crate::{
    lookups::Maps,
    maps::{count, words_to_bytes, IPPROTO_TCP, RDR_LISTENERS, RDR_WORKLOADS},
};

const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;

/// The netns cookie of the workload this instance is attached to (set by
/// the agent at load time).
#[unsafe(no_mangle)]
static RDR_SELF_NETNS: u64 = 0;

#[sk_lookup]
pub fn rdr_sk_lookup(ctx: SkLookupContext) -> u32 {
    try_sk_lookup(&ctx)
}

#[inline(always)]
fn try_sk_lookup(ctx: &SkLookupContext) -> u32 {
    let l = unsafe { &*ctx.lookup };
    if l.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let (family, local, remote) = if l.family == u32::from(AF_INET) {
        let a = l.local_ip4.to_ne_bytes();
        let b = l.remote_ip4.to_ne_bytes();
        (AF_INET, v4_in16([a[0], a[1], a[2], a[3]]), v4_in16([b[0], b[1], b[2], b[3]]))
    } else if l.family == u32::from(AF_INET6) {
        // One field load each: the verifier refuses a derived context pointer.
        let local = unsafe {
            [
                core::ptr::read_volatile(&raw const l.local_ip6[0]),
                core::ptr::read_volatile(&raw const l.local_ip6[1]),
                core::ptr::read_volatile(&raw const l.local_ip6[2]),
                core::ptr::read_volatile(&raw const l.local_ip6[3]),
            ]
        };
        let remote = unsafe {
            [
                core::ptr::read_volatile(&raw const l.remote_ip6[0]),
                core::ptr::read_volatile(&raw const l.remote_ip6[1]),
                core::ptr::read_volatile(&raw const l.remote_ip6[2]),
                core::ptr::read_volatile(&raw const l.remote_ip6[3]),
            ]
        };
        (AF_INET6, words_to_bytes(local), words_to_bytes(remote))
    } else {
        return SK_PASS;
    };
    // The cheap test first: a connection between two of the namespace's
    // own addresses needs no map lookup.
    if is_local_peer(family, &local, &remote) {
        return SK_PASS;
    }
    let cookie = unsafe { core::ptr::read_volatile(&raw const RDR_SELF_NETNS) };
    let policy = match unsafe { RDR_WORKLOADS.get(&cookie) } {
        Some(p) => *p,
        None => return SK_PASS,
    };
    if policy.flags & flags::IN_ENABLED == 0 {
        return SK_PASS;
    }
    if !inbound_redirected(&Maps, &policy, l.local_port as u16) {
        count(counter::INBOUND_BYPASS_PORT);
        return SK_PASS;
    }
    if policy.flags & flags::IN_SOURCE_EXCLUSION_SET != 0 {
        // Source exclusions live in the CIDR trie, IPv4 in mapped form.
        let remote_key =
            if family == AF_INET { v4_mapped([remote[0], remote[1], remote[2], remote[3]]) } else { remote };
        if Maps.cidr_hit(policy.policy_id, cidr_kind::INBOUND_SOURCE_EXCLUDE, &remote_key) {
            count(counter::INBOUND_BYPASS_SOURCE);
            return SK_PASS;
        }
    }
    let key = ListenerKey { netns_cookie: cookie, family: u32::from(family), _pad: 0 };
    if RDR_LISTENERS.redirect_sk_lookup(ctx, key, 0).is_ok() {
        count(counter::INBOUND_REDIRECTED);
        return SK_PASS;
    }
    if family == AF_INET {
        // A dual-stack listener ([::]:port) also takes IPv4.
        let key6 = ListenerKey { netns_cookie: cookie, family: u32::from(AF_INET6), _pad: 0 };
        if RDR_LISTENERS.redirect_sk_lookup(ctx, key6, 0).is_ok() {
            count(counter::INBOUND_REDIRECTED);
            return SK_PASS;
        }
    }
    // No proxy listening (yet): refuse rather than let the connection reach
    // the application around the proxy. The client's SYN is retried.
    count(counter::INBOUND_NO_LISTENER);
    SK_DROP
}
