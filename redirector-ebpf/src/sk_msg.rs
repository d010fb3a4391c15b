//! `sk_msg` (attached to `RDR_ACCEL_SOCKS`): runs on every `sendmsg` of a
//! socket in that map, i.e. of either end of an accelerated app ↔ proxy
//! connection, and hands the message straight to the peer socket's receive
//! queue (`msg_redirect_hash` with `BPF_F_INGRESS`) instead of the loopback
//! TCP stack. The peer is the socket stored under the swapped tuple.
//!
//! Ordering: if the peer is not in the map (yet: the application may write
//! before the proxy's end completed its handshake; or no longer), the
//! message goes through TCP, and so does every later message of this
//! socket (`MSG_VIA_TCP` on the socket's storage). A receiving socket
//! reads redirected bytes before bytes queued by TCP, so mixing the two
//! paths in one direction could reorder the stream.
use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_INGRESS},
    helpers::generated::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
    EbpfContext as _,
};
use redirector_common::{counter, is_v4_mapped, orig_flags, v4_in16, SockKey, AF_INET, AF_INET6};

use crate::maps::{count, sock_orig, words_to_bytes, RDR_ACCEL_SOCKS};

#[sk_msg]
pub fn rdr_sk_msg(ctx: SkMsgContext) -> u32 {
    forward(&ctx);
    // SK_PASS with a redirect set delivers to the peer; without one, the
    // message takes the normal TCP path. Never drop.
    SK_PASS
}

/// One 4-byte context field, read on its own (the verifier refuses wider
/// loads of these fields, which the compiler could otherwise merge).
macro_rules! field {
    ($md:expr, $f:ident) => {
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$md).$f)) }
    };
    ($md:expr, $f:ident[$i:literal]) => {
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$md).$f[$i])) }
    };
}

#[inline(always)]
fn forward(ctx: &SkMsgContext) {
    let md = ctx.msg;
    let sk = unsafe { (*md).__bindgen_anon_3.sk };
    if sk.is_null() {
        return;
    }
    let own = unsafe { sock_orig(sk, None) };
    if own.is_null() {
        count(counter::ACCEL_MSG_VIA_TCP);
        return;
    }
    if unsafe { (*own).flags } & orig_flags::MSG_VIA_TCP != 0 {
        count(counter::ACCEL_MSG_VIA_TCP);
        return;
    }
    let Some(mut peer) = peer_key(ctx) else {
        unsafe { (*own).flags |= orig_flags::MSG_VIA_TCP };
        count(counter::ACCEL_MSG_VIA_TCP);
        return;
    };
    if RDR_ACCEL_SOCKS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        count(counter::ACCEL_MSG_REDIRECTED);
    } else {
        // No peer under that key: this direction stays on TCP from now on.
        unsafe { (*own).flags |= orig_flags::MSG_VIA_TCP };
        count(counter::ACCEL_MSG_VIA_TCP);
    }
}

/// The key the peer socket was stored under: this socket's tuple with
/// local and remote swapped (IPv4-mapped addresses as IPv4, as sockops
/// stores them).
#[inline(always)]
fn peer_key(ctx: &SkMsgContext) -> Option<SockKey> {
    let md = ctx.msg;
    let family = field!(md, family);
    // remote_port: network order in the upper half on little-endian hosts.
    let remote_port = u32::from_be(field!(md, remote_port)) as u16;
    let local_port = field!(md, local_port) as u16;
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let (family, local, remote) = if family == u32::from(AF_INET) {
        let l = field!(md, local_ip4).to_ne_bytes();
        let r = field!(md, remote_ip4).to_ne_bytes();
        (AF_INET, v4_in16(l), v4_in16(r))
    } else if family == u32::from(AF_INET6) {
        let l = words_to_bytes([
            field!(md, local_ip6[0]),
            field!(md, local_ip6[1]),
            field!(md, local_ip6[2]),
            field!(md, local_ip6[3]),
        ]);
        let r = words_to_bytes([
            field!(md, remote_ip6[0]),
            field!(md, remote_ip6[1]),
            field!(md, remote_ip6[2]),
            field!(md, remote_ip6[3]),
        ]);
        if is_v4_mapped(&l) && is_v4_mapped(&r) {
            (AF_INET, v4_in16([l[12], l[13], l[14], l[15]]), v4_in16([r[12], r[13], r[14], r[15]]))
        } else {
            (AF_INET6, l, r)
        }
    } else {
        return None;
    };
    Some(SockKey {
        netns_cookie,
        family,
        local_port: remote_port,
        remote_port: local_port,
        _pad: 0,
        local_addr: remote,
        remote_addr: local,
    })
}
