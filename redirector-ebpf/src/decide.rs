//! The outbound decision shared by connect4 and connect6: the chain of
//! osm-init's PROXY_OUTPUT (or istio-iptables' ISTIO_OUTPUT for workloads
//! with `LOCAL_TO_INBOUND`), for one destination. IPv4 destinations (also
//! IPv4-mapped ones on IPv6 sockets) are looked up in their mapped form, so
//! an address is matched the same way however it was written.
use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_uid_gid},
    maps::lpm_trie::Key,
};
use redirector_common::{
    cidr_kind, counter, flags, orig_flags, port_kind, CidrData, PortKey, WorkloadPolicy, CIDR_KEY_PREFIX_BITS,
};

use crate::maps::{count, LOCALHOST6, RDR_CIDRS, RDR_PORTS};

pub enum Action {
    Pass,
    /// To the proxy's outbound listener.
    Outbound,
    /// To the proxy's inbound listener (Istio: a call back to the pod itself).
    Inbound,
}

pub struct Dst {
    /// 16 bytes; IPv4 in mapped form.
    pub addr: [u8; 16],
    pub is_v4: bool,
    /// Host order.
    pub port: u16,
    /// The socket is bound to 127.0.0.6 (Istio's inbound passthrough source).
    pub from_passthrough: bool,
}

#[inline(always)]
pub fn cidr_hit(policy_id: u32, kind: u8, addr: &[u8; 16]) -> bool {
    let key = Key::new(
        CIDR_KEY_PREFIX_BITS + 128,
        CidrData { policy_id_be: policy_id.to_be_bytes(), kind, addr: *addr, _pad: [0; 3] },
    );
    RDR_CIDRS.get(&key).is_some()
}

#[inline(always)]
pub fn port_rule(policy_id: u32, kind: u8, port: u16) -> bool {
    let key = PortKey { policy_id, port, kind, _pad: 0 };
    unsafe { RDR_PORTS.get(&key) }.is_some()
}

#[inline(always)]
fn is_proxy(policy: &WorkloadPolicy) -> bool {
    if policy.flags & flags::MATCH_PROXY_CGROUP != 0 {
        // SAFETY: no arguments; the task's cgroup-v2 id.
        return unsafe { bpf_get_current_cgroup_id() } == policy.proxy_cgroup_id;
    }
    let uid_gid = bpf_get_current_uid_gid();
    let uid = uid_gid as u32;
    let gid = (uid_gid >> 32) as u32;
    uid == policy.proxy_uid || (policy.flags & flags::MATCH_PROXY_GID != 0 && gid == policy.proxy_gid)
}

#[inline(always)]
pub fn decide(policy: &WorkloadPolicy, dst: &Dst) -> Action {
    let a = &dst.addr;
    let localhost = if dst.is_v4 { a[12] == 127 && a[13] == 0 && a[14] == 0 && a[15] == 1 } else { *a == LOCALHOST6 };
    let id = policy.policy_id;
    if port_rule(id, port_kind::OUTBOUND_EXCLUDE, dst.port) {
        count(counter::BYPASS_PORT);
        return Action::Pass;
    }
    // Kuma checks its IP exclusions before the loopback rules, Istio and
    // OSM after them; either way the trie is looked up once.
    let exclusions_first = policy.flags & flags::LOCAL_PROXY_ONLY != 0;
    if exclusions_first && cidr_hit(id, cidr_kind::OUTBOUND_EXCLUDE, a) {
        count(counter::BYPASS_CIDR);
        return Action::Pass;
    }
    if policy.flags & (flags::LOCAL_TO_INBOUND | flags::LOCAL_BYPASS) != 0 {
        // "-o lo": the route goes through loopback (127/8, ::1 or one of
        // the workload's own addresses).
        let to_lo = (dst.is_v4 && a[12] == 127) || *a == LOCALHOST6 || cidr_hit(id, cidr_kind::LOCAL_ADDRESS, a);
        if to_lo && policy.flags & flags::LOCAL_BYPASS != 0 {
            count(counter::BYPASS_LOCALHOST);
            return Action::Pass;
        }
        if to_lo && dst.from_passthrough {
            count(counter::BYPASS_LOCALHOST);
            return Action::Pass;
        }
        if to_lo && policy.flags & flags::LOCAL_PROXY_ONLY != 0 && !is_proxy(policy) {
            count(counter::BYPASS_LOCALHOST);
            return Action::Pass;
        }
        if to_lo && !localhost {
            count(counter::LOCAL_TO_INBOUND);
            return Action::Inbound;
        }
    }
    if is_proxy(policy) {
        count(counter::BYPASS_PROXY_UID);
        return Action::Pass;
    }
    if localhost {
        count(counter::BYPASS_LOCALHOST);
        return Action::Pass;
    }
    if !exclusions_first && cidr_hit(id, cidr_kind::OUTBOUND_EXCLUDE, a) {
        count(counter::BYPASS_CIDR);
        return Action::Pass;
    }
    if policy.flags & flags::OUT_PORT_INCLUSION_SET != 0 && !port_rule(id, port_kind::OUTBOUND_INCLUDE, dst.port) {
        count(counter::BYPASS_NOT_INCLUDED);
        return Action::Pass;
    }
    if policy.flags & flags::OUT_INCLUSION_SET != 0 && !cidr_hit(id, cidr_kind::OUTBOUND_INCLUDE, a) {
        count(counter::BYPASS_NOT_INCLUDED);
        return Action::Pass;
    }
    Action::Outbound
}

/// Whether an inbound connection to `port` goes to the proxy (osm-init's
/// PROXY_INBOUND / Istio's ISTIO_INBOUND); connections to the inbound port
/// itself reach the proxy without help.
#[inline(always)]
pub fn inbound_redirected(policy: &WorkloadPolicy, port: u16) -> bool {
    if port == policy.inbound_port || port_rule(policy.policy_id, port_kind::INBOUND_EXCLUDE, port) {
        return false;
    }
    if policy.flags & flags::IN_PORT_INCLUSION_SET != 0
        && !port_rule(policy.policy_id, port_kind::INBOUND_INCLUDE, port)
    {
        return false;
    }
    true
}

/// A connection whose client is inside the workload itself (loopback or
/// the workload's own address): iptables' PREROUTING never sees those, so
/// they are never inbound-redirected (this is also what keeps the proxy's
/// own forwarding to the application from looping back into the proxy).
/// Addresses: IPv4 in the first four bytes when `family` is AF_INET.
#[inline(always)]
pub fn is_local_peer(family: u16, local: &[u8; 16], remote: &[u8; 16]) -> bool {
    if local == remote {
        return true;
    }
    if family == redirector_common::AF_INET {
        remote[0] == 127
    } else {
        *remote == LOCALHOST6
    }
}

/// The `OrigDst` flag a redirected connection carries when its workload
/// asks for sockmap acceleration (read again by sockops at both ends).
#[inline(always)]
pub fn orig_accel_flag(policy: &WorkloadPolicy) -> u32 {
    if policy.flags & flags::ACCEL_SOCKMAP != 0 {
        orig_flags::ACCEL
    } else {
        0
    }
}
