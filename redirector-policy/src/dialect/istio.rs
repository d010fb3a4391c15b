//! Istio: istio-iptables (seed 001, as the injector calls it) and the
//! `traffic.sidecar.istio.io/*` pod annotations; `include*` values replace
//! the mesh's, as istio-injector does.
use anyhow::Result;

use super::{LoopbackMode, PresetDefaults, WorkloadAnnotations};
use crate::values::{parse_cidr, parse_inclusion, parse_list, parse_port, Inclusion};

/// Istio's pod annotations (traffic.sidecar.istio.io/*).
pub mod annotations {
    pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
    pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
    pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
    pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
    pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
    pub const ALL: [&str; 6] = [
        INCLUDE_OUTBOUND_IP_RANGES,
        EXCLUDE_OUTBOUND_IP_RANGES,
        INCLUDE_INBOUND_PORTS,
        EXCLUDE_INBOUND_PORTS,
        INCLUDE_OUTBOUND_PORTS,
        EXCLUDE_OUTBOUND_PORTS,
    ];
}

/// seed 001 (istio-iptables -u 1337, gid = uid, ssh 22) and the
/// injector's -d 15090,15021,15020.
pub const DEFAULTS: PresetDefaults = PresetDefaults {
    proxy_uid: 1337,
    proxy_gid: Some(1337),
    outbound_port: 15001,
    inbound_port: 15006,
    reserved_inbound_ports: &[22, 15020, 15021, 15090],
    loopback: LoopbackMode::ToInbound,
    port_exclusions: &[],
};

/// The sidecar container istio-injector adds.
pub const PROXY_CONTAINER: &str = "istio-proxy";

/// Reads one annotation into `out`; keys of other vocabularies are ignored.
pub(super) fn parse_annotation(k: &str, value: &str, out: &mut WorkloadAnnotations) -> Result<()> {
    use annotations::*;
    match k {
        INCLUDE_OUTBOUND_IP_RANGES => {
            out.outbound_ip_range_inclusion_override = Some(parse_inclusion(value, parse_cidr)?)
        }
        EXCLUDE_OUTBOUND_IP_RANGES => out.outbound_ip_range_exclusion = parse_list(value, parse_cidr)?,
        INCLUDE_INBOUND_PORTS => out.inbound_port_inclusion = Some(parse_inclusion(value, parse_port)?),
        EXCLUDE_INBOUND_PORTS => out.inbound_port_exclusion = parse_list(value, parse_port)?,
        // istio-iptables' `-q` adds one redirect rule per port; `-q ""`
        // adds none and so restricts nothing (unlike `-b ""` and `-i ""`,
        // whose lists are the only capture rules: nothing is redirected).
        INCLUDE_OUTBOUND_PORTS => {
            out.outbound_port_inclusion = Some(match parse_inclusion(value, parse_port)? {
                Inclusion::Only(v) if v.is_empty() => Inclusion::All,
                i => i,
            })
        }
        EXCLUDE_OUTBOUND_PORTS => out.outbound_port_exclusion = parse_list(value, parse_port)?,
        _ => {}
    }
    Ok(())
}
