//! `sockops`: publish the original destination of a redirected connection
//! under its 4-tuple when the handshake completes, hand it to the proxy's
//! accepted socket, drop it when the application's socket closes; register
//! the proxy's inbound listener; mark inbound connections that `sk_lookup`
//! delivered to the proxy; and, for workloads with sockmap acceleration,
//! put both ends of an app ↔ proxy connection into `RDR_ACCEL_SOCKS`.
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_LISTEN_CB,
    },
    helpers::generated::bpf_get_netns_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
    EbpfContext as _,
};
use redirector_common::{
    counter,
    decide::{inbound_redirected, is_local_peer},
    flags, is_v4_mapped, orig_flags, v4_in16, ListenerKey, OrigDst, SockKey, TupleKey, AF_INET, AF_INET6,
};

use crate::{
    lookups::Maps,
    maps::{count, sock_orig, words_to_bytes, RDR_ACCEL_SOCKS, RDR_LISTENERS, RDR_ORIG_TUPLE, RDR_WORKLOADS},
};

const BPF_NOEXIST: u64 = 1;

const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn rdr_sockops(ctx: SockOpsContext) -> u32 {
    let family = ctx.family();
    if family == u32::from(AF_INET) || family == u32::from(AF_INET6) {
        match ctx.op() {
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => active_established(&ctx),
            BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => passive_established(&ctx),
            BPF_SOCK_OPS_TCP_LISTEN_CB => listening(&ctx),
            BPF_SOCK_OPS_STATE_CB => {
                if ctx.arg(1) == TCP_CLOSE {
                    released(&ctx);
                }
            }
            _ => {}
        }
    }
    1
}

/// The connection's addresses, IPv4 (also IPv4-mapped on an AF_INET6
/// socket) in the first four bytes.
struct Ends {
    family: u16,
    local: [u8; 16],
    local_port: u16,
    remote: [u8; 16],
    remote_port: u16,
}

#[inline(always)]
fn ends(ctx: &SockOpsContext) -> Ends {
    // remote_port: network order in the upper half of the field on
    // little-endian hosts; ntohl yields the port. local_port: host order.
    let remote_port = u32::from_be(ctx.remote_port()) as u16;
    let local_port = ctx.local_port() as u16;
    if ctx.family() == u32::from(AF_INET) {
        let l = ctx.local_ip4().to_ne_bytes();
        let r = ctx.remote_ip4().to_ne_bytes();
        return Ends {
            family: AF_INET,
            local: v4_in16([l[0], l[1], l[2], l[3]]),
            local_port,
            remote: v4_in16([r[0], r[1], r[2], r[3]]),
            remote_port,
        };
    }
    let l = words_to_bytes(ctx.local_ip6());
    let r = words_to_bytes(ctx.remote_ip6());
    if is_v4_mapped(&l) && is_v4_mapped(&r) {
        return Ends {
            family: AF_INET,
            local: v4_in16([l[12], l[13], l[14], l[15]]),
            local_port,
            remote: v4_in16([r[12], r[13], r[14], r[15]]),
            remote_port,
        };
    }
    Ends { family: AF_INET6, local: l, local_port, remote: r, remote_port }
}

#[inline(always)]
fn netns(ctx: &SockOpsContext) -> u64 {
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// Key as seen from the application's socket (local = application).
#[inline(always)]
fn app_side_key(ctx: &SockOpsContext) -> TupleKey {
    let e = ends(ctx);
    TupleKey {
        netns_cookie: netns(ctx),
        family: e.family,
        client_port: e.local_port,
        proxy_port: e.remote_port,
        _pad: 0,
        client_addr: e.local,
        proxy_addr: e.remote,
    }
}

#[inline(always)]
fn active_established(ctx: &SockOpsContext) {
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    let orig = unsafe { sock_orig(sk, None) };
    if orig.is_null() {
        return;
    }
    let orig = unsafe { *orig };
    if orig.flags & orig_flags::APP_SIDE == 0 {
        return;
    }
    let key = app_side_key(ctx);
    if RDR_ORIG_TUPLE.insert(&key, &orig, 0).is_err() {
        count(counter::TUPLE_INSERT_FAILED);
        return;
    }
    // Ask for state changes on this socket so the entry goes with it.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    if orig.flags & orig_flags::ACCEL != 0 {
        accelerate(ctx, &key_of(&key));
    }
}

/// The application end's `RDR_ACCEL_SOCKS` key (local = application).
#[inline(always)]
fn key_of(t: &TupleKey) -> SockKey {
    SockKey {
        netns_cookie: t.netns_cookie,
        family: t.family,
        local_port: t.client_port,
        remote_port: t.proxy_port,
        _pad: 0,
        local_addr: t.client_addr,
        remote_addr: t.proxy_addr,
    }
}

/// Puts this socket into `RDR_ACCEL_SOCKS` (never over another entry:
/// a key in use means something is wrong, and TCP is always correct).
#[inline(always)]
fn accelerate(ctx: &SockOpsContext, key: &SockKey) {
    let mut key = *key;
    if RDR_ACCEL_SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, BPF_NOEXIST).is_ok() {
        count(counter::ACCEL_SOCKET_ADDED);
    } else {
        count(counter::ACCEL_SOCKET_ADD_FAILED);
    }
}

#[inline(always)]
fn passive_established(ctx: &SockOpsContext) {
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // Only a workload's namespace has anything to record: every other
    // accept on the node stops at this one 8-byte lookup, before the
    // 48-byte tuple probe. (The proxy shares its application's namespace.)
    let cookie = netns(ctx);
    let policy = match unsafe { RDR_WORKLOADS.get(&cookie) } {
        Some(p) => *p,
        None => return,
    };
    // On an accepted socket local = proxy (or server), remote = client.
    let e = ends(ctx);
    let key = TupleKey {
        netns_cookie: cookie,
        family: e.family,
        client_port: e.remote_port,
        proxy_port: e.local_port,
        _pad: 0,
        client_addr: e.remote,
        proxy_addr: e.local,
    };
    let mut orig = match unsafe { RDR_ORIG_TUPLE.get(&key) } {
        Some(o) => {
            let mut o = *o;
            o.flags = orig_flags::PROXY_SIDE | (o.flags & orig_flags::ACCEL);
            o
        }
        None => {
            // Not an outbound redirect: an inbound connection from outside
            // the workload that sk_lookup handed to the proxy keeps the
            // address the client dialed as its local address.
            // (a client dialing the inbound port itself reaches the proxy
            // directly; iptables would report that port, so do we.)
            if policy.flags & flags::IN_ENABLED == 0
                || !(e.local_port == policy.inbound_port || inbound_redirected(&Maps, &policy, e.local_port))
                || is_local_peer(e.family, &e.local, &e.remote)
            {
                return;
            }
            OrigDst {
                family: e.family,
                port_be: e.local_port.to_be(),
                flags: orig_flags::PROXY_SIDE | orig_flags::INBOUND,
                addr: e.local,
            }
        }
    };
    let slot = unsafe { sock_orig(sk, Some(&mut orig)) };
    if slot.is_null() {
        count(counter::SK_STORAGE_FAILED);
        return;
    }
    // Only the proxy's end of an accelerated outbound redirect (inbound
    // connections from outside the workload never carry ACCEL): its
    // application end went into the map at ACTIVE_ESTABLISHED already.
    if orig.flags & orig_flags::ACCEL != 0 {
        accelerate(
            ctx,
            &SockKey {
                netns_cookie: cookie,
                family: e.family,
                local_port: e.local_port,
                remote_port: e.remote_port,
                _pad: 0,
                local_addr: e.local,
                remote_addr: e.remote,
            },
        );
    }
}

#[inline(always)]
fn listening(ctx: &SockOpsContext) {
    let cookie = netns(ctx);
    let policy = match unsafe { RDR_WORKLOADS.get(&cookie) } {
        Some(p) => *p,
        None => return,
    };
    if ctx.local_port() as u16 != policy.inbound_port {
        return;
    }
    let key = ListenerKey { netns_cookie: cookie, family: ctx.family(), _pad: 0 };
    if RDR_LISTENERS.update(key, unsafe { &mut *ctx.ops }, 0).is_ok() {
        count(counter::LISTENER_REGISTERED);
    } else {
        count(counter::LISTENER_INSERT_FAILED);
    }
}

#[inline(always)]
fn released(ctx: &SockOpsContext) {
    let key = app_side_key(ctx);
    if RDR_ORIG_TUPLE.remove(&key).is_ok() {
        count(counter::TUPLE_RELEASED);
    }
}
