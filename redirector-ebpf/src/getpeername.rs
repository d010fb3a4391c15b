//! What getpeername4 and getpeername6 share: the socket's `OrigDst`
//! record, the application-side test, the port and the counter. A
//! [`PeerFamily`] writes the address.
use aya_ebpf::{bindings::bpf_sock_addr, programs::SockAddrContext};
use redirector_common::{counter, orig_flags, OrigDst};

use crate::maps::{count, sock_orig};

/// The address-family half of a getpeername hook.
pub trait PeerFamily {
    /// Whether a record of this `OrigDst::family` can be shown on the
    /// socket (else its peer is left alone).
    fn shows(family: u16) -> bool;
    /// Writes the dialed address of `orig` (of a family it `shows`) into `sa`.
    fn write_addr(sa: &mut bpf_sock_addr, orig: &OrigDst);
}

/// Always 1: getpeername is never refused.
#[inline(always)]
pub fn getpeername<F: PeerFamily>(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let orig = unsafe { sock_orig(sk, None) };
    if orig.is_null() {
        return 1;
    }
    let orig = unsafe { *orig };
    if !F::shows(orig.family) || orig.flags & orig_flags::APP_SIDE == 0 {
        return 1;
    }
    F::write_addr(sa, &orig);
    sa.user_port = u32::from(orig.port_be);
    count(counter::PEERNAME_REWRITTEN);
    1
}
