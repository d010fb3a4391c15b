//! `cgroup/getpeername4`: an application whose connect was redirected sees
//! the peer it dialed, not the proxy's listener.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use redirector_common::{counter, orig_flags, AF_INET};

use crate::maps::{count, sock_orig};

#[cgroup_sock_addr(getpeername4)]
pub fn rdr_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let orig = unsafe { sock_orig(sk, None) };
    if orig.is_null() {
        return 1;
    }
    let orig = unsafe { *orig };
    if orig.family != AF_INET || orig.flags & orig_flags::APP_SIDE == 0 {
        return 1;
    }
    sa.user_ip4 = u32::from_ne_bytes([orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]]);
    sa.user_port = u32::from(orig.port_be);
    count(counter::PEERNAME_REWRITTEN);
    1
}
