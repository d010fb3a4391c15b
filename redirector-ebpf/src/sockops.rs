//! `sockops`: publish the original destination of a redirected connection
//! under its 4-tuple when the handshake completes, hand it to the proxy's
//! accepted socket, and drop it when the application's socket closes.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::generated::bpf_get_netns_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use redirector_common::{counter, orig_flags, TupleKey, AF_INET};

use crate::maps::{count, sock_orig, RDR_ORIG_TUPLE};

const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn rdr_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.family() == u32::from(AF_INET) {
        match ctx.op() {
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => active_established(&ctx),
            BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => passive_established(&ctx),
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

#[inline(always)]
fn remote_port(ctx: &SockOpsContext) -> u16 {
    // Network order in the upper half of the field on little-endian hosts;
    // ntohl yields the port.
    u32::from_be(ctx.remote_port()) as u16
}

/// Key as seen from the application's socket (local = application).
#[inline(always)]
fn app_side_key(ctx: &SockOpsContext) -> TupleKey {
    TupleKey::v4(
        unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        ctx.local_ip4(),
        ctx.local_port() as u16,
        ctx.remote_ip4(),
        remote_port(ctx),
    )
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
}

#[inline(always)]
fn passive_established(ctx: &SockOpsContext) {
    // On the proxy's accepted socket local = proxy, remote = application.
    let key = TupleKey::v4(
        unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        ctx.remote_ip4(),
        remote_port(ctx),
        ctx.local_ip4(),
        ctx.local_port() as u16,
    );
    let mut orig = match unsafe { RDR_ORIG_TUPLE.get(&key) } {
        Some(o) => *o,
        None => return,
    };
    orig.flags = orig_flags::PROXY_SIDE;
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    let slot = unsafe { sock_orig(sk, Some(&mut orig)) };
    if slot.is_null() {
        count(counter::SK_STORAGE_FAILED);
    }
}

#[inline(always)]
fn released(ctx: &SockOpsContext) {
    let key = app_side_key(ctx);
    if RDR_ORIG_TUPLE.remove(&key).is_ok() {
        count(counter::TUPLE_RELEASED);
    }
}
