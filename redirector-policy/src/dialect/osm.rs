//! Open Service Mesh: osm-init's iptables rules (seed 004) and the pod
//! annotations osm-injector reads (pod-scoped lists, merged with the
//! MeshConfig's).
use anyhow::Result;

use super::{LoopbackMode, PresetDefaults, WorkloadAnnotations};
use crate::values::{parse_cidr, parse_list, parse_port};

/// OSM's annotation keys (pod scoped lists, merged with the mesh lists).
pub mod annotations {
    pub const OUTBOUND_PORT_EXCLUSION: &str = "openservicemesh.io/outbound-port-exclusion-list";
    pub const OUTBOUND_IP_RANGE_EXCLUSION: &str = "openservicemesh.io/outbound-ip-range-exclusion-list";
    pub const OUTBOUND_IP_RANGE_INCLUSION: &str = "openservicemesh.io/outbound-ip-range-inclusion-list";
    pub const INBOUND_PORT_EXCLUSION: &str = "openservicemesh.io/inbound-port-exclusion-list";
    pub const ALL: [&str; 4] =
        [OUTBOUND_PORT_EXCLUSION, OUTBOUND_IP_RANGE_EXCLUSION, OUTBOUND_IP_RANGE_INCLUSION, INBOUND_PORT_EXCLUSION];
}

/// seed 004 (osm-init) and seed 000 (15904: osm-healthcheck).
pub const DEFAULTS: PresetDefaults = PresetDefaults {
    proxy_uid: 1500,
    proxy_gid: None,
    outbound_port: 15001,
    inbound_port: 15003,
    reserved_inbound_ports: &[15010, 15901, 15902, 15903, 15904],
    loopback: LoopbackMode::Osm,
    port_exclusions: &[],
};

/// The sidecar container osm-injector adds.
pub const PROXY_CONTAINER: &str = "envoy";

/// Reads one annotation into `out`; keys of other vocabularies are ignored.
pub(super) fn parse_annotation(k: &str, value: &str, out: &mut WorkloadAnnotations) -> Result<()> {
    use annotations::*;
    match k {
        OUTBOUND_PORT_EXCLUSION => out.outbound_port_exclusion = parse_list(value, parse_port)?,
        INBOUND_PORT_EXCLUSION => out.inbound_port_exclusion = parse_list(value, parse_port)?,
        OUTBOUND_IP_RANGE_EXCLUSION => out.outbound_ip_range_exclusion = parse_list(value, parse_cidr)?,
        OUTBOUND_IP_RANGE_INCLUSION => out.outbound_ip_range_inclusion = parse_list(value, parse_cidr)?,
        _ => {}
    }
    Ok(())
}
