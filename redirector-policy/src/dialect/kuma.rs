//! Kuma: kuma-dp's transparent proxy (kuma's iptables builder, nat table)
//! and the `traffic.kuma.io/*` pod annotations. Port lists accept ranges.
use anyhow::Result;

use super::{LoopbackMode, PresetDefaults, WorkloadAnnotations};
use crate::values::{flatten_ranges, parse_cidr, parse_list};

/// Kuma's pod annotations (traffic.kuma.io/*).
pub mod annotations {
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.kuma.io/exclude-outbound-ports";
    pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.kuma.io/exclude-inbound-ports";
    pub const EXCLUDE_OUTBOUND_IPS: &str = "traffic.kuma.io/exclude-outbound-ips";
    pub const EXCLUDE_INBOUND_IPS: &str = "traffic.kuma.io/exclude-inbound-ips";
    pub const ALL: [&str; 4] =
        [EXCLUDE_OUTBOUND_PORTS, EXCLUDE_INBOUND_PORTS, EXCLUDE_OUTBOUND_IPS, EXCLUDE_INBOUND_IPS];
}

/// UID 5678, outbound 15001, inbound 15006, the 127.0.0.6 passthrough,
/// only kuma-dp's loopback connections to the inbound listener; no inbound
/// ports reserved on Kubernetes.
pub const DEFAULTS: PresetDefaults = PresetDefaults {
    proxy_uid: 5678,
    proxy_gid: None,
    outbound_port: 15001,
    inbound_port: 15006,
    reserved_inbound_ports: &[],
    loopback: LoopbackMode::ProxyToInbound,
    port_exclusions: &[],
};

/// The sidecar container Kuma's injector adds.
pub const PROXY_CONTAINER: &str = "kuma-sidecar";

/// Reads one annotation into `out`; keys of other vocabularies are ignored.
pub(super) fn parse_annotation(k: &str, value: &str, out: &mut WorkloadAnnotations) -> Result<()> {
    use annotations::*;
    match k {
        EXCLUDE_OUTBOUND_PORTS => out.outbound_port_exclusion = flatten_ranges(value)?,
        EXCLUDE_INBOUND_PORTS => out.inbound_port_exclusion = flatten_ranges(value)?,
        EXCLUDE_OUTBOUND_IPS => out.outbound_ip_range_exclusion = parse_list(value, parse_cidr)?,
        // `-A KUMA_MESH_INBOUND -s <address> -j RETURN`.
        EXCLUDE_INBOUND_IPS => out.inbound_source_exclusion = parse_list(value, parse_cidr)?,
        _ => {}
    }
    Ok(())
}
