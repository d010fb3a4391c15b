//! Map keys and values shared by the eBPF programs and the agent, and (in
//! [`decide`]) the decision chain both of them run.
//!
//! Every map type here is `#[repr(C)]`, has explicit padding and contains no
//! `bool`, enum or `Option`, so the kernel, the BTF that describes it and
//! the agent all agree on its layout. Addresses are kept in network byte
//! order (as the kernel hands them to the programs); ports are in host byte
//! order unless a field says otherwise.
#![no_std]

pub mod decide;

/// Version of the map layout below. The agent stores it in the `META` map;
/// it migrates pinned state of an older layout (see the agent's
/// `dataplane::migrate`) and refuses a newer one.
#[cfg(not(feature = "layout-next"))]
pub const LAYOUT_VERSION: u32 = RELEASED_LAYOUT_VERSION;
/// The layout-upgrade test's "next layout" (feature `layout-next`).
#[cfg(feature = "layout-next")]
pub const LAYOUT_VERSION: u32 = RELEASED_LAYOUT_VERSION + 1;
/// The layout this source ships (bump it when the layout changes).
/// (Layout 6 grew `COUNTERS` from 24 to 32 slots, so that a new counter
/// can take a spare slot without another layout change, and added `NAMES`.
/// Layout 7 gave `WorkloadPolicy` a `local_id`: the list entries of one
/// `policy_id` are shared by every workload whose lists are the same, and a
/// workload's own addresses are keyed by an id of its own. DNS capture
/// kept layout 7: `dns_port` took the half of `WorkloadPolicy`'s padding
/// that every earlier agent wrote as 0, which with no `flags::DNS_CAPTURE`
/// means no capture, and its servers are a new `cidr_kind` in `CIDRS`.)
const RELEASED_LAYOUT_VERSION: u32 = 7;

/// Capacities. The agent reports fill levels against these and refuses an
/// entry that does not fit instead of letting the kernel evict anything.
/// (Layout 3 raised workloads from 4,096 and the list maps from 65,536, so
/// that 10,000 workloads with a few port and CIDR rules each fit; the list
/// maps are not preallocated, so an unused capacity costs little.)
#[cfg(not(feature = "layout-next"))]
pub const MAX_WORKLOADS: u32 = 16_384;
#[cfg(feature = "layout-next")]
pub const MAX_WORKLOADS: u32 = 32_768;
/// 16 per workload at full capacity (an OSM workload has 5 reserved
/// inbound ports before any of its own).
pub const MAX_PORT_RULES: u32 = 262_144;
pub const MAX_CIDR_RULES: u32 = 262_144;
pub const MAX_TRACKED_CONNECTIONS: u32 = 262_144;
/// Proxy inbound listeners: one per workload and address family.
pub const MAX_LISTENERS: u32 = 2 * MAX_WORKLOADS;
/// Sockets of accelerated app ↔ proxy connections (two per connection).
/// (Layout 5 added this map.)
pub const MAX_ACCEL_SOCKETS: u32 = 65_536;

/// Names of the maps, as pinned under the pin directory.
pub mod map_names {
    pub const META: &str = "RDR_META";
    pub const WORKLOADS: &str = "RDR_WORKLOADS";
    pub const PORTS: &str = "RDR_PORTS";
    pub const CIDRS: &str = "RDR_CIDRS";
    pub const ORIG_BY_TUPLE: &str = "RDR_ORIG_TUPLE";
    pub const SOCK_ORIG: &str = "RDR_SOCK_ORIG";
    pub const COUNTERS: &str = "RDR_COUNTERS";
    pub const LISTENERS: &str = "RDR_LISTENERS";
    /// Both ends of accelerated app ↔ proxy connections (`mesh.acceleration:
    /// sockmap`); the `sk_msg` program is attached to this map.
    pub const ACCEL_SOCKETS: &str = "RDR_ACCEL_SOCKS";
    /// Workload names (the config's or `namespace/pod`), for `inspect`;
    /// written by the agent, read by no program.
    pub const NAMES: &str = "RDR_NAMES";
    /// Every map the agent pins, in a stable order. All of them: a map
    /// that a new agent re-created instead of adopting would split the
    /// connections in flight during a restart between two copies (the
    /// socket storage was once left out, and connections made while old
    /// and new programs overlapped lost their original destination).
    pub const PINNED: [&str; 10] =
        [META, WORKLOADS, PORTS, CIDRS, ORIG_BY_TUPLE, SOCK_ORIG, COUNTERS, LISTENERS, ACCEL_SOCKETS, NAMES];
}

/// Names of the programs (ELF symbol names).
pub mod prog_names {
    pub const CONNECT4: &str = "rdr_connect4";
    pub const CONNECT6: &str = "rdr_connect6";
    pub const GETPEERNAME4: &str = "rdr_getpeername4";
    pub const GETPEERNAME6: &str = "rdr_getpeername6";
    /// Attached to each workload's network namespace (not to the cgroup).
    pub const SK_LOOKUP: &str = "rdr_sk_lookup";
    pub const SOCKOPS: &str = "rdr_sockops";
    /// DNS capture (connected UDP): attached only while a workload asks
    /// for it, beside `CONNECT4`/`CONNECT6`.
    pub const DNS_CONNECT4: &str = "rdr_dns_connect4";
    pub const DNS_CONNECT6: &str = "rdr_dns_connect6";
    /// DNS capture (unconnected UDP), likewise.
    pub const SENDMSG4: &str = "rdr_sendmsg4";
    pub const SENDMSG6: &str = "rdr_sendmsg6";
    /// DNS capture: the reply shows the nameserver the application asked.
    pub const RECVMSG4: &str = "rdr_recvmsg4";
    pub const RECVMSG6: &str = "rdr_recvmsg6";
    pub const GETSOCKOPT: &str = "rdr_getsockopt";
    /// Attached to the `ACCEL_SOCKETS` sockhash (not to the cgroup).
    pub const SK_MSG: &str = "rdr_sk_msg";
}

/// `WorkloadPolicy::flags` bits.
pub mod flags {
    /// The outbound inclusion list is non-empty: only destinations in it are
    /// redirected (after the exclusions).
    pub const OUT_INCLUSION_SET: u32 = 1 << 0;
    /// Redirect outbound traffic at all (a workload can be listed but paused).
    pub const OUT_ENABLED: u32 = 1 << 1;
    /// Also bypass when the socket's GID is `proxy_gid` (Istio's `-g`).
    pub const MATCH_PROXY_GID: u32 = 1 << 2;
    /// Deliver inbound TCP to the proxy's inbound listener.
    pub const IN_ENABLED: u32 = 1 << 3;
    /// Only the inbound ports listed as `INBOUND_INCLUDE` are redirected
    /// (Istio's `-b` with a list instead of `*`).
    pub const IN_PORT_INCLUSION_SET: u32 = 1 << 4;
    /// Only the outbound ports listed as `OUTBOUND_INCLUDE` are redirected
    /// (Istio's `-q` / includeOutboundPorts).
    pub const OUT_PORT_INCLUSION_SET: u32 = 1 << 5;
    /// Istio's `-o lo ! -d 127.0.0.1/32 -j ISTIO_IN_REDIRECT`: a connection
    /// to one of the workload's own addresses (other than 127.0.0.1), from
    /// any user, goes to the inbound listener; `-s 127.0.0.6 -o lo` returns.
    pub const LOCAL_TO_INBOUND: u32 = 1 << 6;
    /// Linkerd's `-o lo -j RETURN`: connections routed through loopback
    /// (127/8, ::1, the workload's own addresses) are never redirected.
    pub const LOCAL_BYPASS: u32 = 1 << 7;
    /// With `LOCAL_TO_INBOUND`: only the proxy's own loopback connections
    /// go to the inbound listener; everyone else's return (Kuma's
    /// `-o lo -m owner --uid-owner 5678` / `! --uid-owner 5678 RETURN`,
    /// also Istio from 1.10). The outbound CIDR exclusions, which Kuma
    /// places in OUTPUT ahead of its chain, are checked first.
    pub const LOCAL_PROXY_ONLY: u32 = 1 << 8;
    /// The workload has `INBOUND_SOURCE_EXCLUDE` CIDRs (else sk_lookup
    /// skips that trie lookup).
    pub const IN_SOURCE_EXCLUSION_SET: u32 = 1 << 9;
    /// The proxy is the process in cgroup `proxy_cgroup_id`, whatever its
    /// UID: a process of the application that runs as the proxy's UID is
    /// still redirected.
    pub const MATCH_PROXY_CGROUP: u32 = 1 << 10;
    /// `mesh.acceleration: sockmap`: both ends of the workload's app ↔
    /// proxy connections go into `ACCEL_SOCKETS`, and `sk_msg` moves their
    /// bytes from one socket to the other without the loopback TCP stack.
    pub const ACCEL_SOCKMAP: u32 = 1 << 11;
    /// DNS capture (istio-iptables' `--redirect-dns`, Kuma's
    /// `--redirect-dns`): UDP (and with `DNS_ISTIO_ORDER` TCP) to port 53
    /// of one of the workload's nameservers (`cidr_kind::DNS_SERVER`) go
    /// to the proxy's DNS listener, `dns_port`, unless the proxy sends them.
    pub const DNS_CAPTURE: u32 = 1 << 12;
    /// With `DNS_CAPTURE`: DNS is decided where istio-iptables puts its
    /// `ISTIO_OUTPUT_DNS` chain, after the `-o lo -s 127.0.0.6 -j RETURN`
    /// that every protocol passes through, TCP port 53 included (its
    /// loopback rules skip TCP port 53: `! --dport 53`, `! --dports
    /// 53,15008`, so such a connection through lo goes on to the DNS
    /// rules). Without it, kumactl's order: UDP port 53 is decided first in
    /// OUTPUT, and TCP port 53 is not captured: everyone's but the proxy's
    /// goes out untouched (`-A OUTPUT -p tcp --dport 53 -m owner !
    /// --uid-owner UID -j RETURN`).
    pub const DNS_ISTIO_ORDER: u32 = 1 << 13;
}

/// Value of the `WORKLOADS` map, keyed by the workload's network namespace
/// cookie (`u64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadPolicy {
    /// Id of the port and CIDR lists in the list maps (every kind but
    /// `cidr_kind::LOCAL_ADDRESS`). Content-addressed: workloads whose
    /// lists are the same share one id and one set of entries. A change
    /// writes the new lists under a fresh id (or finds them already
    /// written), then switches this value in one update, so a connection
    /// never sees half a list.
    pub policy_id: u32,
    pub flags: u32,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    /// Outbound listener port of the proxy (host order).
    pub outbound_port: u16,
    /// Inbound listener port of the proxy (host order).
    pub inbound_port: u16,
    /// Address IPv4 connections are sent to (network order), 127.0.0.1.
    pub redirect_ip4: u32,
    /// Address IPv6 connections are sent to (network order), ::1.
    pub redirect_ip6: [u8; 16],
    /// cgroup-v2 id of the proxy's cgroup (with `MATCH_PROXY_CGROUP`).
    pub proxy_cgroup_id: u64,
    /// Id of this workload's own addresses (`cidr_kind::LOCAL_ADDRESS`
    /// entries), never shared; 0 when it has none in the maps.
    pub local_id: u32,
    /// The proxy's DNS listener port (host order), with `DNS_CAPTURE`.
    pub dns_port: u16,
    pub _pad: u16,
}

/// Kinds of port rules in the `PORTS` map.
pub mod port_kind {
    pub const OUTBOUND_EXCLUDE: u8 = 1;
    pub const INBOUND_EXCLUDE: u8 = 2;
    pub const OUTBOUND_INCLUDE: u8 = 3;
    pub const INBOUND_INCLUDE: u8 = 4;
}

/// Key of the `PORTS` hash map (value: `u8`, always 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub policy_id: u32,
    pub port: u16,
    pub kind: u8,
    pub _pad: u8,
}

/// Kinds of entries in the `CIDRS` trie.
pub mod cidr_kind {
    pub const OUTBOUND_EXCLUDE: u8 = 1;
    pub const OUTBOUND_INCLUDE: u8 = 2;
    /// An address of the workload itself (host route: "-o lo").
    pub const LOCAL_ADDRESS: u8 = 3;
    /// Inbound connections *from* these sources are not redirected
    /// (Linkerd's `--subnets-to-ignore`, Kuma's `exclude-inbound-ips`).
    pub const INBOUND_SOURCE_EXCLUDE: u8 = 4;
    /// A nameserver of the workload (its resolv.conf's `nameserver`
    /// lines), or a range of them (`0.0.0.0/0` for `--capture-all-dns`):
    /// DNS to it is captured (`flags::DNS_CAPTURE`).
    pub const DNS_SERVER: u8 = 5;
}

/// Data part of the CIDR LPM trie key, for both families. IPv4 addresses and
/// prefixes are stored IPv4-mapped (`::ffff:a.b.c.d`, prefix 96 + n), so an
/// IPv4-mapped IPv6 destination matches exactly the rules of the IPv4
/// address it carries. The trie matches `32 + 8 + prefix` leading bits:
/// policy id and kind exactly, then the address prefix. The policy id is
/// stored big-endian so the bit order in the trie is well defined.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CidrData {
    pub policy_id_be: [u8; 4],
    pub kind: u8,
    pub addr: [u8; 16],
    pub _pad: [u8; 3],
}

/// Number of key bits before the address in the CIDR trie.
pub const CIDR_KEY_PREFIX_BITS: u32 = 40;

/// Prefix bits of an IPv4 address inside the mapped form.
pub const V4_MAPPED_PREFIX_BITS: u32 = 96;

/// `::ffff:a.b.c.d` for an IPv4 address in network order.
#[inline(always)]
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]]
}

/// An IPv4 address in the 16-byte fields of `OrigDst` and `TupleKey`
/// (first four bytes, rest zero).
#[inline(always)]
pub const fn v4_in16(v4: [u8; 4]) -> [u8; 16] {
    [v4[0], v4[1], v4[2], v4[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// Key of the `LISTENERS` sockhash: the proxy's inbound listening socket of
/// one workload for one address family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    pub family: u32,
    pub _pad: u32,
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// `OrigDst::flags` bits.
pub mod orig_flags {
    /// Stored on the application's socket at connect time.
    pub const APP_SIDE: u32 = 1;
    /// Copied onto the proxy's accepted socket when the handshake completes.
    pub const PROXY_SIDE: u32 = 2;
    /// An inbound connection delivered to the proxy by `sk_lookup`: the
    /// original destination is the accepted socket's own local address.
    pub const INBOUND: u32 = 4;
    /// The workload asked for sockmap acceleration when the application
    /// connected (copied from `flags::ACCEL_SOCKMAP` by connect4/6, so both
    /// ends of one connection agree whatever the policy does meanwhile).
    pub const ACCEL: u32 = 8;
    /// Set by `sk_msg` on a socket one of whose messages went through TCP
    /// (its peer was not in `ACCEL_SOCKETS` yet): that direction stays on
    /// TCP for the rest of the connection, or bytes could be reordered
    /// (the receiver reads redirected bytes before queued TCP ones).
    pub const MSG_VIA_TCP: u32 = 16;
    /// A UDP socket whose datagrams to a nameserver went to the proxy's
    /// DNS listener: recvmsg shows the listener's replies as coming from
    /// this record's address, the nameserver the application asked. The
    /// record is in the socket's own family (an IPv4-mapped nameserver on
    /// an AF_INET6 socket stays mapped).
    pub const DNS: u32 = 32;
}

/// The destination an application dialed before it was redirected.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Port, network byte order (as in `sockaddr_in`).
    pub port_be: u16,
    /// `orig_flags` bits: which end of the connection this socket is.
    pub flags: u32,
    /// Address, network order; IPv4 uses the first four bytes.
    pub addr: [u8; 16],
}

/// Key of the `ORIG_BY_TUPLE` map: one established redirected connection,
/// as seen from the application's end. The proxy's accepted socket sees the
/// same four values the other way round.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TupleKey {
    pub netns_cookie: u64,
    pub family: u16,
    /// Application (client) port, host order.
    pub client_port: u16,
    /// Proxy listener port, host order.
    pub proxy_port: u16,
    pub _pad: u16,
    pub client_addr: [u8; 16],
    pub proxy_addr: [u8; 16],
}

/// Key of the `ACCEL_SOCKETS` sockhash: one end of an accelerated
/// connection, as seen from that socket (IPv4, also IPv4-mapped on an
/// AF_INET6 socket, in the first four bytes of the addresses). Its peer is
/// under the same key with local and remote swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockKey {
    pub netns_cookie: u64,
    pub family: u16,
    /// Host order.
    pub local_port: u16,
    /// Host order.
    pub remote_port: u16,
    pub _pad: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}

/// Whether 16 address bytes are `::ffff:a.b.c.d`.
#[inline(always)]
pub fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9] == 0 && a[10] == 0xff && a[11] == 0xff
}

/// Bytes of a workload name `NAMES` keeps: a Kubernetes `namespace/pod`
/// (63 + 1 + 253 bytes) fits whole.
pub const MAX_NAME_BYTES: usize = 320;

/// Value of the `NAMES` hash map, keyed by the workload's netns cookie: the
/// name the agent knows it by, UTF-8, cut at `MAX_NAME_BYTES` on a
/// character boundary.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadName {
    /// Bytes of `bytes` in use.
    pub len: u32,
    /// Length of the whole name (more than `len` when it was cut).
    pub full_len: u32,
    pub bytes: [u8; MAX_NAME_BYTES],
}

/// Value of the `META` array (index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Meta {
    pub layout_version: u32,
    /// Last policy id handed out (the agent allocates ids above it).
    pub last_policy_id: u32,
}

/// Indexes of the per-CPU `COUNTERS` array.
pub mod counter {
    pub const REDIRECTED: u32 = 0;
    pub const BYPASS_PROXY_UID: u32 = 1;
    pub const BYPASS_LOCALHOST: u32 = 2;
    pub const BYPASS_PORT: u32 = 3;
    pub const BYPASS_CIDR: u32 = 4;
    pub const BYPASS_NOT_INCLUDED: u32 = 5;
    pub const ORIG_DST_SERVED: u32 = 6;
    pub const ORIG_DST_MISS: u32 = 7;
    pub const TUPLE_INSERT_FAILED: u32 = 8;
    pub const SK_STORAGE_FAILED: u32 = 9;
    pub const PEERNAME_REWRITTEN: u32 = 10;
    pub const TUPLE_RELEASED: u32 = 11;
    pub const INBOUND_REDIRECTED: u32 = 12;
    pub const INBOUND_BYPASS_PORT: u32 = 13;
    pub const INBOUND_NO_LISTENER: u32 = 14;
    pub const LISTENER_REGISTERED: u32 = 15;
    pub const LOCAL_TO_INBOUND: u32 = 16;
    pub const INBOUND_BYPASS_SOURCE: u32 = 17;
    /// A socket went into `ACCEL_SOCKETS` (two per accelerated connection).
    pub const ACCEL_SOCKET_ADDED: u32 = 18;
    pub const ACCEL_SOCKET_ADD_FAILED: u32 = 19;
    /// `sk_msg`: a message handed to the peer socket's receive queue.
    pub const ACCEL_MSG_REDIRECTED: u32 = 20;
    /// `sk_msg`: a message sent through TCP (peer not in the map, or the
    /// direction already on TCP).
    pub const ACCEL_MSG_VIA_TCP: u32 = 21;
    /// The proxy's inbound listener could not be registered (RDR_LISTENERS
    /// full): inbound connections to that workload are dropped, not let by.
    pub const LISTENER_INSERT_FAILED: u32 = 22;
    /// `SO_ORIGINAL_DST` on a connection of a workload that has no record
    /// (it reached the proxy's port without being redirected, or its
    /// record could not be kept), answered as conntrack does for a
    /// connection it did not NAT: with the socket's own local address.
    pub const ORIG_DST_OWN_ADDRESS: u32 = 23;
    /// `SO_ORIGINAL_DST` on an inbound connection the kernel answered
    /// itself: conntrack NATed it (the mesh's own iptables rules in the
    /// same namespace, before the init container is switched), so its
    /// answer, not the socket's local address, is the original one.
    pub const ORIG_DST_CONNTRACK: u32 = 24;
    /// DNS capture: a UDP datagram, connected UDP socket or TCP connection
    /// to port 53 sent to the proxy's DNS listener.
    pub const DNS_REDIRECTED: u32 = 25;
    /// DNS capture: a reply from the proxy's DNS listener shown to the
    /// application as coming from the nameserver it asked.
    pub const DNS_REPLY_RESTORED: u32 = 26;
    /// Counted only by the `upgrade-test` build of connect4/6, the changed
    /// programs the restart test upgrades to (never by a release build).
    /// The last slot: counters added later take the spare slots between
    /// the named ones and this one, which keeps the layout.
    pub const UPGRADE_TEST_BUILD: u32 = COUNT - 1;
    pub const COUNT: u32 = 32;
    /// Names for `redirector inspect`, indexed like the constants above.
    pub const NAMES: [&str; 27] = [
        "redirected",
        "bypass_proxy_uid",
        "bypass_localhost",
        "bypass_port",
        "bypass_cidr",
        "bypass_not_included",
        "orig_dst_served",
        "orig_dst_miss",
        "tuple_insert_failed",
        "sk_storage_failed",
        "peername_rewritten",
        "tuple_released",
        "inbound_redirected",
        "inbound_bypass_port",
        "inbound_dropped_no_listener",
        "listener_registered",
        "local_to_inbound",
        "inbound_bypass_source",
        "accel_socket_added",
        "accel_socket_add_failed",
        "accel_msg_redirected",
        "accel_msg_via_tcp",
        "listener_insert_failed",
        "orig_dst_own_address",
        "orig_dst_conntrack",
        "dns_redirected",
        "dns_reply_restored",
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and have no padding that is
    // not an explicit field, so any bit pattern is valid.
    unsafe impl aya::Pod for WorkloadPolicy {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for CidrData {}
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for TupleKey {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for Meta {}
    unsafe impl aya::Pod for WorkloadName {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<WorkloadPolicy>(), 56);
        assert_eq!(size_of::<ListenerKey>(), 16);
        assert_eq!(size_of::<PortKey>(), 8);
        assert_eq!(size_of::<CidrData>(), 24);
        assert_eq!(size_of::<OrigDst>(), 24);
        assert_eq!(size_of::<TupleKey>(), 48);
        assert_eq!(size_of::<SockKey>(), 48);
        assert_eq!(size_of::<Meta>(), 8);
        assert_eq!(size_of::<WorkloadName>(), 8 + MAX_NAME_BYTES);
        // Named counters, then spare slots, then the test build's.
        assert!(counter::NAMES.len() as u32 <= counter::UPGRADE_TEST_BUILD);
    }
}
