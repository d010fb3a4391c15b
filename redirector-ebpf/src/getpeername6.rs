//! `cgroup/getpeername6`: an AF_INET6 application socket whose connect was
//! redirected sees the peer it dialed (IPv4-mapped if it dialed one).
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use redirector_common::{counter, orig_flags, v4_mapped, AF_INET, AF_INET6};

use crate::maps::{bytes_to_words, count, sock_orig};

#[cgroup_sock_addr(getpeername6)]
pub fn rdr_getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let orig = unsafe { sock_orig(sk, None) };
    if orig.is_null() {
        return 1;
    }
    let orig = unsafe { *orig };
    if orig.flags & orig_flags::APP_SIDE == 0 {
        return 1;
    }
    let addr = if orig.family == AF_INET6 {
        orig.addr
    } else if orig.family == AF_INET {
        v4_mapped([orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]])
    } else {
        return 1;
    };
    sa.user_ip6 = bytes_to_words(&addr);
    sa.user_port = u32::from(orig.port_be);
    count(counter::PEERNAME_REWRITTEN);
    1
}
