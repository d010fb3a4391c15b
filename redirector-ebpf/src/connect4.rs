//! `cgroup/connect4`: send a meshed workload's outbound TCP connects to the
//! proxy, unless a rule of the osm-init chain PROXY_OUTPUT (or Istio's
//! ISTIO_OUTPUT) would RETURN it.
use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirector_common::{decide::Dst, v4_in16, v4_mapped, OrigDst, WorkloadPolicy, AF_INET};

use crate::connect::{connect, Family};

const PASSTHROUGH4: u32 = u32::from_ne_bytes([127, 0, 0, 6]);

#[cgroup_sock_addr(connect4)]
pub fn rdr_connect4(ctx: SockAddrContext) -> i32 {
    connect::<V4>(&ctx);
    // Never refuse a connect: a policy decision only rewrites the address.
    1
}

pub struct V4;

impl Family for V4 {
    #[inline(always)]
    fn read(sa: &bpf_sock_addr, sk: *mut bpf_sock) -> (Dst, OrigDst) {
        let bound = unsafe { (*sk).src_ip4 };
        let v4 = sa.user_ip4.to_ne_bytes();
        let dst = Dst {
            addr: v4_mapped(v4),
            is_v4: true,
            port: u16::from_be(sa.user_port as u16),
            from_passthrough: bound == PASSTHROUGH4,
        };
        let orig = OrigDst { family: AF_INET, port_be: sa.user_port as u16, flags: 0, addr: v4_in16(v4) };
        (dst, orig)
    }

    #[inline(always)]
    fn redirect(sa: &mut bpf_sock_addr, policy: &WorkloadPolicy, _dst: &Dst) {
        sa.user_ip4 = policy.redirect_ip4;
    }
}
