//! The decision chain, once, for the eBPF programs and the agent: the
//! outbound chain of osm-init's PROXY_OUTPUT (or istio-iptables'
//! ISTIO_OUTPUT for workloads with `LOCAL_TO_INBOUND`) for one destination,
//! and the inbound port test of PROXY_INBOUND / ISTIO_INBOUND.
//!
//! The chain only reads; where the rules live is a [`Lookups`]: the kernel
//! maps in the eBPF programs, the compiled map entries in the agent's
//! reference evaluator, so both run the same code on the same encoding.
//! IPv4 destinations (also IPv4-mapped ones on IPv6 sockets) are looked up
//! in their mapped form, so an address is matched the same way however it
//! was written.
use crate::{cidr_kind, counter, flags, orig_flags, port_kind, WorkloadPolicy, AF_INET};

pub const LOCALHOST6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Where the chain finds a workload's rules and who is connecting.
pub trait Lookups {
    /// A `PORTS` entry (`port_kind`) of `policy_id` for `port` (host order).
    fn port_rule(&self, policy_id: u32, kind: u8, port: u16) -> bool;
    /// A `CIDRS` entry (`cidr_kind`) of `policy_id` covers `addr` (IPv4
    /// in mapped form).
    fn cidr_hit(&self, policy_id: u32, kind: u8, addr: &[u8; 16]) -> bool;
    /// The connecting task is the workload's proxy (see [`is_proxy_with`]).
    fn is_proxy(&self, policy: &WorkloadPolicy) -> bool;
}

/// The proxy test of a policy, given the caller's cgroup-v2 id and its
/// UID/GID packed as `bpf_get_current_uid_gid` returns them (GID in the
/// upper 32 bits). Each is asked for only when the policy needs it.
#[inline(always)]
pub fn is_proxy_with(policy: &WorkloadPolicy, cgroup_id: impl FnOnce() -> u64, uid_gid: impl FnOnce() -> u64) -> bool {
    if policy.flags & flags::MATCH_PROXY_CGROUP != 0 {
        return cgroup_id() == policy.proxy_cgroup_id;
    }
    let uid_gid = uid_gid();
    let uid = uid_gid as u32;
    let gid = (uid_gid >> 32) as u32;
    uid == policy.proxy_uid || (policy.flags & flags::MATCH_PROXY_GID != 0 && gid == policy.proxy_gid)
}

/// One outbound destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dst {
    /// 16 bytes; IPv4 in mapped form.
    pub addr: [u8; 16],
    pub is_v4: bool,
    /// Host order.
    pub port: u16,
    /// The socket is bound to 127.0.0.6 (Istio's inbound passthrough source).
    pub from_passthrough: bool,
}

/// Why a connection is left alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    ExcludedPort,
    ExcludedCidr,
    Localhost,
    Proxy,
    NotIncluded,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pass(Reason),
    /// To the proxy's outbound listener.
    Outbound,
    /// To the proxy's inbound listener (Istio: a call back to the pod itself).
    Inbound,
    /// To the proxy's DNS listener (`dns_port`): DNS capture.
    Dns,
}

impl Action {
    /// The `counter` index the eBPF side bumps for this outcome as soon as
    /// it is decided (`Outbound` is counted only once the connection has
    /// been redirected, as `REDIRECTED`).
    #[inline(always)]
    pub fn counter(self) -> Option<u32> {
        match self {
            Action::Pass(Reason::ExcludedPort) => Some(counter::BYPASS_PORT),
            Action::Pass(Reason::ExcludedCidr) => Some(counter::BYPASS_CIDR),
            Action::Pass(Reason::Localhost) => Some(counter::BYPASS_LOCALHOST),
            Action::Pass(Reason::Proxy) => Some(counter::BYPASS_PROXY_UID),
            Action::Pass(Reason::NotIncluded) => Some(counter::BYPASS_NOT_INCLUDED),
            Action::Inbound => Some(counter::LOCAL_TO_INBOUND),
            Action::Outbound | Action::Dns => None,
        }
    }
}

/// What connect4/connect6 do with a connection to `dst` from a workload
/// under `policy` (already known to have `OUT_ENABLED`).
#[inline(always)]
pub fn decide<L: Lookups>(l: &L, policy: &WorkloadPolicy, dst: &Dst) -> Action {
    let a = &dst.addr;
    let localhost = if dst.is_v4 { a[12] == 127 && a[13] == 0 && a[14] == 0 && a[15] == 1 } else { *a == LOCALHOST6 };
    let id = policy.policy_id;
    if l.port_rule(id, port_kind::OUTBOUND_EXCLUDE, dst.port) {
        return Action::Pass(Reason::ExcludedPort);
    }
    let dns = policy.flags & flags::DNS_CAPTURE != 0 && dst.port == DNS_PORT;
    let istio_dns = dns && policy.flags & flags::DNS_ISTIO_ORDER != 0;
    // kumactl: TCP port 53 is not captured, and only the proxy's goes on.
    if dns && !istio_dns && !l.is_proxy(policy) {
        return Action::Pass(Reason::NotIncluded);
    }
    // istio-iptables' loopback rules leave TCP port 53 to its DNS chain.
    let lo_skips_dns = istio_dns;
    // Kuma checks its IP exclusions before the loopback rules, Istio and
    // OSM after them; either way the trie is looked up once.
    let exclusions_first = policy.flags & flags::LOCAL_PROXY_ONLY != 0;
    if exclusions_first && l.cidr_hit(id, cidr_kind::OUTBOUND_EXCLUDE, a) {
        return Action::Pass(Reason::ExcludedCidr);
    }
    if policy.flags & (flags::LOCAL_TO_INBOUND | flags::LOCAL_BYPASS) != 0 {
        // "-o lo": the route goes through loopback (127/8, ::1 or one of
        // the workload's own addresses).
        let to_lo = through_lo(l, policy, dst);
        if to_lo && policy.flags & flags::LOCAL_BYPASS != 0 {
            return Action::Pass(Reason::Localhost);
        }
        if to_lo && dst.from_passthrough {
            return Action::Pass(Reason::Localhost);
        }
        if to_lo && !lo_skips_dns && policy.flags & flags::LOCAL_PROXY_ONLY != 0 && !l.is_proxy(policy) {
            return Action::Pass(Reason::Localhost);
        }
        if to_lo && !lo_skips_dns && !localhost {
            return Action::Inbound;
        }
    }
    if l.is_proxy(policy) {
        return Action::Pass(Reason::Proxy);
    }
    if istio_dns && is_dns_server(l, policy, dst) {
        return Action::Dns;
    }
    if localhost {
        return Action::Pass(Reason::Localhost);
    }
    if !exclusions_first && l.cidr_hit(id, cidr_kind::OUTBOUND_EXCLUDE, a) {
        return Action::Pass(Reason::ExcludedCidr);
    }
    if policy.flags & flags::OUT_PORT_INCLUSION_SET != 0 && !l.port_rule(id, port_kind::OUTBOUND_INCLUDE, dst.port) {
        return Action::Pass(Reason::NotIncluded);
    }
    if policy.flags & flags::OUT_INCLUSION_SET != 0 && !l.cidr_hit(id, cidr_kind::OUTBOUND_INCLUDE, a) {
        return Action::Pass(Reason::NotIncluded);
    }
    Action::Outbound
}

/// DNS's port.
pub const DNS_PORT: u16 = 53;

/// "-o lo": the route to `dst` goes through loopback (127/8, ::1 or one of
/// the workload's own addresses).
#[inline(always)]
fn through_lo<L: Lookups>(l: &L, policy: &WorkloadPolicy, dst: &Dst) -> bool {
    let a = &dst.addr;
    (dst.is_v4 && a[12] == 127) || *a == LOCALHOST6 || l.cidr_hit(policy.local_id, cidr_kind::LOCAL_ADDRESS, a)
}

/// DNS capture takes `dst` (port 53 known): it is one of the workload's
/// nameservers (capture-all is the range `0.0.0.0/0`, and `::/0`).
#[inline(always)]
fn is_dns_server<L: Lookups>(l: &L, policy: &WorkloadPolicy, dst: &Dst) -> bool {
    l.cidr_hit(policy.policy_id, cidr_kind::DNS_SERVER, &dst.addr)
}

/// What sendmsg4/6 and connect4/6 do with a UDP datagram (or connected UDP
/// socket) to `dst` under `policy`: `Action::Dns` or a pass. Nothing but
/// port 53 is ever touched. The proxy's own queries go out as they are;
/// with `DNS_ISTIO_ORDER` a socket bound to 127.0.0.6 sending through lo
/// returns first (istio-iptables' `-o lo -s 127.0.0.6/32 -j RETURN`
/// matches every protocol). No port or CIDR exclusion applies: in both
/// meshes' rules the DNS redirect comes before them (istio-iptables'
/// exclusions are `-p tcp` or after `ISTIO_OUTPUT_DNS`; Kuma inserts its
/// UDP rules at the head of OUTPUT).
#[inline(always)]
pub fn decide_udp<L: Lookups>(l: &L, policy: &WorkloadPolicy, dst: &Dst) -> Action {
    if policy.flags & flags::DNS_CAPTURE == 0 || dst.port != DNS_PORT {
        return Action::Pass(Reason::NotIncluded);
    }
    if policy.flags & flags::DNS_ISTIO_ORDER != 0 && dst.from_passthrough && through_lo(l, policy, dst) {
        return Action::Pass(Reason::Localhost);
    }
    if l.is_proxy(policy) {
        return Action::Pass(Reason::Proxy);
    }
    if !is_dns_server(l, policy, dst) {
        return Action::Pass(Reason::NotIncluded);
    }
    Action::Dns
}

/// Whether an inbound connection to `port` goes to the proxy (osm-init's
/// PROXY_INBOUND / Istio's ISTIO_INBOUND); connections to the inbound port
/// itself reach the proxy without help.
#[inline(always)]
pub fn inbound_redirected<L: Lookups>(l: &L, policy: &WorkloadPolicy, port: u16) -> bool {
    if port == policy.inbound_port || l.port_rule(policy.policy_id, port_kind::INBOUND_EXCLUDE, port) {
        return false;
    }
    if policy.flags & flags::IN_PORT_INCLUSION_SET != 0
        && !l.port_rule(policy.policy_id, port_kind::INBOUND_INCLUDE, port)
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
    if family == AF_INET {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v4_mapped;

    /// Rules as plain lists: ports exact, CIDRs as (kind, mapped address,
    /// prefix bits of the address). Every lookup must name the id its kind
    /// is kept under: the workload's own addresses `local_id`, the lists
    /// `policy_id` (see `policy`).
    struct Rules<'a> {
        ports: &'a [(u8, u16)],
        cidrs: &'a [(u8, [u8; 16], u32)],
        proxy: bool,
    }

    impl Lookups for Rules<'_> {
        fn port_rule(&self, id: u32, kind: u8, port: u16) -> bool {
            assert_eq!(id, LISTS_ID, "port lists are looked up under policy_id");
            self.ports.contains(&(kind, port))
        }
        fn cidr_hit(&self, id: u32, kind: u8, addr: &[u8; 16]) -> bool {
            let want = if kind == cidr_kind::LOCAL_ADDRESS { LOCAL_ID } else { LISTS_ID };
            assert_eq!(id, want, "CIDR kind {kind} looked up under the wrong id");
            let a = u128::from_be_bytes(*addr);
            self.cidrs.iter().any(|(k, net, bits)| {
                let mask = if *bits == 0 { 0 } else { u128::MAX << (128 - bits) };
                *k == kind && u128::from_be_bytes(*net) & mask == a & mask
            })
        }
        fn is_proxy(&self, _: &WorkloadPolicy) -> bool {
            self.proxy
        }
    }

    const LISTS_ID: u32 = 1;
    const LOCAL_ID: u32 = 2;

    fn policy(flags: u32) -> WorkloadPolicy {
        WorkloadPolicy {
            policy_id: LISTS_ID,
            local_id: LOCAL_ID,
            dns_port: 15053,
            _pad: 0,
            flags: flags::OUT_ENABLED | flags,
            proxy_uid: 1500,
            proxy_gid: 1500,
            outbound_port: 15001,
            inbound_port: 15003,
            redirect_ip4: u32::from_ne_bytes([127, 0, 0, 1]),
            redirect_ip6: LOCALHOST6,
            proxy_cgroup_id: 77,
        }
    }

    fn v4(a: [u8; 4], port: u16) -> Dst {
        Dst { addr: v4_mapped(a), is_v4: true, port, from_passthrough: false }
    }

    const NONE: Rules<'static> = Rules { ports: &[], cidrs: &[], proxy: false };

    #[test]
    fn osm_chain_order() {
        let p = policy(0);
        let excl = Rules {
            ports: &[(port_kind::OUTBOUND_EXCLUDE, 6379)],
            cidrs: &[(cidr_kind::OUTBOUND_EXCLUDE, v4_mapped([198, 51, 100, 0]), 96 + 24)],
            proxy: false,
        };
        assert_eq!(decide(&NONE, &p, &v4([192, 0, 2, 1], 80)), Action::Outbound);
        assert_eq!(decide(&excl, &p, &v4([192, 0, 2, 1], 6379)), Action::Pass(Reason::ExcludedPort));
        assert_eq!(decide(&excl, &p, &v4([198, 51, 100, 7], 80)), Action::Pass(Reason::ExcludedCidr));
        assert_eq!(decide(&NONE, &p, &v4([127, 0, 0, 1], 80)), Action::Pass(Reason::Localhost));
        // osm-init exempts 127.0.0.1 only.
        assert_eq!(decide(&NONE, &p, &v4([127, 0, 0, 2], 80)), Action::Outbound);
        let proxy = Rules { proxy: true, ..NONE };
        assert_eq!(decide(&proxy, &p, &v4([192, 0, 2, 1], 80)), Action::Pass(Reason::Proxy));
        // The port exclusion comes before the proxy test.
        let both = Rules { proxy: true, ..excl };
        assert_eq!(decide(&both, &p, &v4([192, 0, 2, 1], 6379)), Action::Pass(Reason::ExcludedPort));
    }

    #[test]
    fn inclusions() {
        let p = policy(flags::OUT_PORT_INCLUSION_SET | flags::OUT_INCLUSION_SET);
        let r = Rules {
            ports: &[(port_kind::OUTBOUND_INCLUDE, 80)],
            cidrs: &[(cidr_kind::OUTBOUND_INCLUDE, v4_mapped([192, 0, 2, 0]), 96 + 24)],
            proxy: false,
        };
        assert_eq!(decide(&r, &p, &v4([192, 0, 2, 1], 80)), Action::Outbound);
        assert_eq!(decide(&r, &p, &v4([192, 0, 2, 1], 81)), Action::Pass(Reason::NotIncluded));
        assert_eq!(decide(&r, &p, &v4([192, 0, 3, 1], 80)), Action::Pass(Reason::NotIncluded));
    }

    #[test]
    fn loopback_modes() {
        let own = [(cidr_kind::LOCAL_ADDRESS, v4_mapped([10, 0, 0, 5]), 128)];
        let r = Rules { ports: &[], cidrs: &own, proxy: false };
        let to_self = v4([10, 0, 0, 5], 8080);
        let istio = policy(flags::LOCAL_TO_INBOUND);
        assert_eq!(decide(&r, &istio, &to_self), Action::Inbound);
        assert_eq!(decide(&r, &istio, &Dst { from_passthrough: true, ..to_self }), Action::Pass(Reason::Localhost));
        assert_eq!(decide(&r, &istio, &v4([127, 0, 0, 1], 80)), Action::Pass(Reason::Localhost));
        let kuma = policy(flags::LOCAL_TO_INBOUND | flags::LOCAL_PROXY_ONLY);
        assert_eq!(decide(&r, &kuma, &to_self), Action::Pass(Reason::Localhost));
        assert_eq!(decide(&Rules { proxy: true, ..r }, &kuma, &to_self), Action::Inbound);
        let linkerd = policy(flags::LOCAL_BYPASS);
        assert_eq!(decide(&r, &linkerd, &to_self), Action::Pass(Reason::Localhost));
        assert_eq!(decide(&r, &linkerd, &v4([127, 0, 0, 2], 80)), Action::Pass(Reason::Localhost));
        assert_eq!(decide(&r, &linkerd, &v4([10, 0, 0, 6], 80)), Action::Outbound);
    }

    /// istio-iptables with `--redirect-dns` and nameserver 127.0.0.53
    /// (its `dns-uid-gid` golden), and Kuma's order.
    #[test]
    fn dns_capture() {
        let own = [
            (cidr_kind::LOCAL_ADDRESS, v4_mapped([10, 0, 0, 5]), 128),
            (cidr_kind::DNS_SERVER, v4_mapped([127, 0, 0, 53]), 128),
            (cidr_kind::DNS_SERVER, v4_mapped([198, 51, 100, 53]), 128),
            (cidr_kind::OUTBOUND_EXCLUDE, v4_mapped([198, 51, 100, 0]), 96 + 24),
        ];
        let app = Rules { ports: &[], cidrs: &own, proxy: false };
        let proxy = Rules { proxy: true, ..app };
        let base = flags::LOCAL_TO_INBOUND | flags::LOCAL_PROXY_ONLY;
        let istio = policy(base | flags::DNS_CAPTURE | flags::DNS_ISTIO_ORDER);
        // UDP: only port 53 of a nameserver, never the proxy's own, and
        // before the CIDR exclusions.
        assert_eq!(decide_udp(&app, &istio, &v4([198, 51, 100, 53], 53)), Action::Dns);
        assert_eq!(decide_udp(&app, &istio, &v4([127, 0, 0, 53], 53)), Action::Dns);
        assert_eq!(decide_udp(&app, &istio, &v4([198, 51, 100, 54], 53)), Action::Pass(Reason::NotIncluded));
        assert_eq!(decide_udp(&app, &istio, &v4([198, 51, 100, 53], 5353)), Action::Pass(Reason::NotIncluded));
        assert_eq!(decide_udp(&proxy, &istio, &v4([198, 51, 100, 53], 53)), Action::Pass(Reason::Proxy));
        let passthrough = Dst { from_passthrough: true, ..v4([127, 0, 0, 53], 53) };
        assert_eq!(decide_udp(&app, &istio, &passthrough), Action::Pass(Reason::Localhost));
        // TCP: the loopback rules skip port 53.
        assert_eq!(decide(&app, &istio, &v4([127, 0, 0, 53], 53)), Action::Dns);
        assert_eq!(decide(&app, &istio, &v4([127, 0, 0, 53], 80)), Action::Pass(Reason::Localhost));
        assert_eq!(decide(&app, &istio, &v4([127, 0, 0, 1], 53)), Action::Pass(Reason::Localhost));
        // ... so a loopback port 53 that is no nameserver goes to the
        // outbound listener, as ISTIO_REDIRECT takes it.
        assert_eq!(decide(&app, &istio, &v4([127, 0, 0, 5], 53)), Action::Outbound);
        assert_eq!(decide(&proxy, &istio, &v4([10, 0, 0, 5], 53)), Action::Pass(Reason::Proxy));
        assert_eq!(decide(&proxy, &istio, &v4([10, 0, 0, 5], 80)), Action::Inbound);
        // An excluded port comes first.
        let excl = [(port_kind::OUTBOUND_EXCLUDE, 53)];
        let r = Rules { ports: &excl, ..app };
        assert_eq!(decide(&r, &istio, &v4([198, 51, 100, 53], 53)), Action::Pass(Reason::ExcludedPort));
        // Capture-all: every IPv4 address.
        let any = [(cidr_kind::DNS_SERVER, v4_mapped([0, 0, 0, 0]), 96)];
        let r = Rules { cidrs: &any, ..app };
        assert_eq!(decide_udp(&r, &istio, &v4([203, 0, 113, 1], 53)), Action::Dns);
        assert_eq!(decide(&r, &istio, &v4([203, 0, 113, 1], 53)), Action::Dns);
        // Kuma: TCP port 53 is not captured, the application's goes out
        // as it is, the proxy's as any of its connections.
        let kuma = policy(base | flags::DNS_CAPTURE);
        assert_eq!(decide(&app, &kuma, &v4([127, 0, 0, 53], 53)), Action::Pass(Reason::NotIncluded));
        assert_eq!(decide(&app, &kuma, &v4([192, 0, 2, 53], 53)), Action::Pass(Reason::NotIncluded));
        assert_eq!(decide(&app, &kuma, &v4([192, 0, 2, 53], 80)), Action::Outbound);
        assert_eq!(decide(&proxy, &kuma, &v4([10, 0, 0, 5], 53)), Action::Inbound);
        assert_eq!(decide(&proxy, &kuma, &v4([192, 0, 2, 53], 53)), Action::Pass(Reason::Proxy));
        assert_eq!(decide_udp(&app, &kuma, &v4([198, 51, 100, 53], 53)), Action::Dns);
        assert_eq!(decide_udp(&app, &kuma, &passthrough), Action::Dns);
        // Off: nothing.
        assert_eq!(decide_udp(&app, &policy(base), &v4([198, 51, 100, 53], 53)), Action::Pass(Reason::NotIncluded));
        assert_eq!(decide(&app, &policy(base), &v4([192, 0, 2, 53], 53)), Action::Outbound);
    }

    #[test]
    fn counters_of_outcomes() {
        assert_eq!(Action::Outbound.counter(), None);
        assert_eq!(Action::Inbound.counter(), Some(counter::LOCAL_TO_INBOUND));
        assert_eq!(Action::Pass(Reason::Proxy).counter(), Some(counter::BYPASS_PROXY_UID));
    }

    #[test]
    fn proxy_identity() {
        let uid_gid = |uid: u32, gid: u32| move || (u64::from(gid) << 32) | u64::from(uid);
        let never = || -> u64 { panic!("not asked for") };
        let p = policy(0);
        assert!(is_proxy_with(&p, never, uid_gid(1500, 0)));
        assert!(!is_proxy_with(&p, never, uid_gid(0, 1500)));
        let p = policy(flags::MATCH_PROXY_GID);
        assert!(is_proxy_with(&p, never, uid_gid(0, 1500)));
        let p = policy(flags::MATCH_PROXY_CGROUP);
        assert!(is_proxy_with(&p, || 77, || -> u64 { panic!("not asked for") }));
        assert!(!is_proxy_with(&p, || 78, uid_gid(1500, 1500)));
    }

    #[test]
    fn inbound_ports_and_local_peers() {
        let p = policy(flags::IN_PORT_INCLUSION_SET);
        let r = Rules {
            ports: &[(port_kind::INBOUND_INCLUDE, 8080), (port_kind::INBOUND_EXCLUDE, 9090)],
            cidrs: &[],
            proxy: false,
        };
        assert!(inbound_redirected(&r, &p, 8080));
        assert!(!inbound_redirected(&r, &p, 8081));
        assert!(!inbound_redirected(&r, &p, 15003));
        assert!(!inbound_redirected(&r, &policy(0), 9090));
        assert!(inbound_redirected(&r, &policy(0), 9091));
        let (a, b) = (crate::v4_in16([10, 0, 0, 5]), crate::v4_in16([10, 0, 0, 6]));
        assert!(is_local_peer(AF_INET, &a, &a));
        assert!(!is_local_peer(AF_INET, &a, &b));
        assert!(is_local_peer(AF_INET, &a, &crate::v4_in16([127, 0, 0, 9])));
        assert!(is_local_peer(crate::AF_INET6, &b, &LOCALHOST6));
    }
}
