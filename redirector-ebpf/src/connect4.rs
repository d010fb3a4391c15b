//! `cgroup/connect4`: send a meshed workload's outbound TCP connects to the
//! proxy's outbound listener, unless a rule of the osm-init chain
//! PROXY_OUTPUT would RETURN it.
use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_uid_gid, generated::bpf_get_netns_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_ebpf::maps::lpm_trie::Key;
use redirector_common::{
    cidr_kind, counter, flags, orig_flags, port_kind, Cidr4Data, OrigDst, PortKey, AF_INET,
    CIDR_KEY_PREFIX_BITS,
};

use crate::maps::{
    count, sock_orig, IPPROTO_TCP, LOCALHOST4, RDR_CIDRS4, RDR_PORTS, RDR_WORKLOADS,
};

#[cgroup_sock_addr(connect4)]
pub fn rdr_connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx);
    // Never refuse a connect: a policy decision only rewrites the address.
    1
}

#[inline(always)]
fn cidr_hit(policy_id: u32, kind: u8, addr: u32) -> bool {
    let key = Key::new(
        CIDR_KEY_PREFIX_BITS + 32,
        Cidr4Data {
            policy_id_be: policy_id.to_be_bytes(),
            kind,
            addr: addr.to_ne_bytes(),
            _pad: [0; 3],
        },
    );
    RDR_CIDRS4.get(&key).is_some()
}

#[inline(always)]
fn try_connect4(ctx: &SockAddrContext) {
    let sa = unsafe { &mut *ctx.sock_addr };
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
    let uid_gid = bpf_get_current_uid_gid();
    let uid = uid_gid as u32;
    let gid = (uid_gid >> 32) as u32;
    if uid == policy.proxy_uid
        || (policy.flags & flags::MATCH_PROXY_GID != 0 && gid == policy.proxy_gid)
    {
        count(counter::BYPASS_PROXY_UID);
        return;
    }
    let dst = sa.user_ip4;
    if dst == LOCALHOST4 {
        count(counter::BYPASS_LOCALHOST);
        return;
    }
    let dport = u16::from_be(sa.user_port as u16);
    let port_key = PortKey {
        policy_id: policy.policy_id,
        port: dport,
        kind: port_kind::OUTBOUND_EXCLUDE,
        _pad: 0,
    };
    if unsafe { RDR_PORTS.get(&port_key) }.is_some() {
        count(counter::BYPASS_PORT);
        return;
    }
    if cidr_hit(policy.policy_id, cidr_kind::OUTBOUND_EXCLUDE, dst) {
        count(counter::BYPASS_CIDR);
        return;
    }
    if policy.flags & flags::OUT_INCLUSION_SET != 0
        && !cidr_hit(policy.policy_id, cidr_kind::OUTBOUND_INCLUDE, dst)
    {
        count(counter::BYPASS_NOT_INCLUDED);
        return;
    }
    let mut orig = OrigDst {
        family: AF_INET,
        port_be: sa.user_port as u16,
        flags: orig_flags::APP_SIDE,
        addr: [0; 16],
    };
    let d = dst.to_ne_bytes();
    orig.addr[0] = d[0];
    orig.addr[1] = d[1];
    orig.addr[2] = d[2];
    orig.addr[3] = d[3];
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let slot = unsafe { sock_orig(sk, Some(&mut orig)) };
    if slot.is_null() {
        // Without a record the proxy could not learn the destination:
        // leave the connection alone rather than redirect it blind.
        count(counter::SK_STORAGE_FAILED);
        return;
    }
    // A socket that connects again (after AF_UNSPEC) gets the new target.
    unsafe { *slot = orig };
    sa.user_ip4 = policy.redirect_ip4;
    sa.user_port = u32::from(policy.outbound_port.to_be());
    count(counter::REDIRECTED);
}
