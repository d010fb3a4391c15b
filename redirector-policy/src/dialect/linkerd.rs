//! Linkerd: linkerd2-proxy-init's rules (docs "IPTables Reference") and the
//! `config.linkerd.io/*` pod annotations. Port lists accept ranges
//! (`4000-4100`) as Linkerd's do.
use anyhow::Result;

use super::{LoopbackMode, PresetDefaults, WorkloadAnnotations};
use crate::values::{flatten_ranges, parse_cidr, parse_list};

/// Linkerd's pod annotations (config.linkerd.io/*).
pub mod annotations {
    pub const SKIP_OUTBOUND_PORTS: &str = "config.linkerd.io/skip-outbound-ports";
    pub const SKIP_INBOUND_PORTS: &str = "config.linkerd.io/skip-inbound-ports";
    pub const SKIP_SUBNETS: &str = "config.linkerd.io/skip-subnets";
    pub const ALL: [&str; 3] = [SKIP_OUTBOUND_PORTS, SKIP_INBOUND_PORTS, SKIP_SUBNETS];
}

/// linkerd2-proxy-init: proxy UID 2102, outbound 4140, inbound 4143,
/// `-o lo -j RETURN`; the injector always skips the proxy's control (4190)
/// and admin (4191) ports inbound, and the chart's proxyInit
/// ignoreInboundPorts/ignoreOutboundPorts default to 4567,4568.
pub const DEFAULTS: PresetDefaults = PresetDefaults {
    proxy_uid: 2102,
    proxy_gid: None,
    outbound_port: 4140,
    inbound_port: 4143,
    reserved_inbound_ports: &[4190, 4191],
    loopback: LoopbackMode::Bypass,
    port_exclusions: &[4567, 4568],
};

/// The sidecar container Linkerd's injector adds.
pub const PROXY_CONTAINER: &str = "linkerd-proxy";

/// Reads one annotation into `out`; keys of other vocabularies are ignored.
pub(super) fn parse_annotation(k: &str, value: &str, out: &mut WorkloadAnnotations) -> Result<()> {
    use annotations::*;
    match k {
        SKIP_OUTBOUND_PORTS => out.outbound_port_exclusion = flatten_ranges(value)?,
        SKIP_INBOUND_PORTS => out.inbound_port_exclusion = flatten_ranges(value)?,
        // proxy-init's --subnets-to-ignore: `-A PROXY_INIT_REDIRECT -s <subnet> -j RETURN`.
        SKIP_SUBNETS => out.inbound_source_exclusion = parse_list(value, parse_cidr)?,
        _ => {}
    }
    Ok(())
}
