//! linkerd2-proxy-init, as Linkerd's injector writes it into
//! `linkerd-init` (`command: [/usr/lib/linkerd/linkerd2-proxy-init]` with
//! the flags in `args`; older charts: the image's entrypoint and `args`
//! only). Follows linkerd/linkerd2-proxy-init `proxy-init/cmd/root.go`
//! (flags, `BuildFirewallConfiguration`'s checks, IPv6 on by default) and
//! `pkg/iptables/iptables.go` (ignored ports first in both directions,
//! `--ports-to-redirect` restricts inbound only, `--subnets-to-ignore` as
//! inbound sources, `-o lo -j RETURN`).
use anyhow::{anyhow, bail, Result};

use super::{
    argv::{self, boolean, value, Flag},
    program_name, InitContainer, Reading, Refusal,
};
use crate::{
    dialect::{LoopbackMode, Preset},
    mesh::MeshSettings,
    values::{flatten_ranges, parse_cidr, parse_port, Inclusion},
    WorkloadAnnotations,
};

const FLAGS: [Flag; 18] = [
    value("incoming-proxy-port", Some('p')),
    value("outgoing-proxy-port", Some('o')),
    value("proxy-uid", Some('u')),
    value("proxy-gid", Some('g')),
    value("ports-to-redirect", Some('r')),
    value("inbound-ports-to-ignore", None),
    value("outbound-ports-to-ignore", None),
    value("subnets-to-ignore", None),
    boolean("simulate", None),
    value("netns", None),
    boolean("use-wait-flag", Some('w')),
    value("timeout-close-wait-secs", None),
    value("log-format", None),
    value("log-level", None),
    value("iptables-mode", None),
    boolean("ipv6", None),
    value("firewall-bin-path", None),
    value("firewall-save-bin-path", None),
];

/// The binary's name; a `linkerd-init` container without a command runs
/// the proxy-init image's entrypoint, which is it.
pub(super) fn tool_args<'a>(c: &'a InitContainer, argv: &'a [String]) -> Option<&'a [String]> {
    match argv {
        [first, rest @ ..] if program_name(first) == "linkerd2-proxy-init" || program_name(first) == "proxy-init" => {
            Some(rest)
        }
        _ if c.command.is_empty() && c.name == "linkerd-init" => Some(argv),
        _ => None,
    }
}

pub(super) fn read(args: &[String]) -> Result<Reading> {
    let given = argv::parse(args, &FLAGS, &[])?;
    if let Some(extra) = given.positional.first() {
        bail!("unexpected argument {extra:?} (linkerd2-proxy-init takes flags only)");
    }
    let get = |long: &str| given.get(long);
    // A slice flag: every value, each comma-separated.
    let items = |long: &str| -> Vec<String> {
        given
            .every
            .get(long)
            .into_iter()
            .flatten()
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let port = |long: &str| -> Result<u16> {
        let v = get(long).ok_or_else(|| anyhow!("--{long} is not given (proxy-init refuses to run without it)"))?;
        parse_port(v).map_err(|e| anyhow!("{}: {e}", given.written(long)))
    };
    let ranges = |long: &str| -> Result<Vec<u16>> {
        flatten_ranges(&items(long).join(",")).map_err(|e| anyhow!("--{long}: {e}"))
    };
    let mut refused = Vec::new();
    if get("simulate") == Some("true") {
        refused.push(Refusal { setting: "--simulate".into(), why: "the init container programs nothing".into() });
    }
    if let Some(v) = get("iptables-mode") {
        if !["legacy", "nft", "plain"].contains(&v) {
            bail!("--iptables-mode {v:?}: valid values are only \"legacy\", \"nft\" and \"plain\"");
        }
    }
    let mut mesh = MeshSettings::for_preset(Preset::Linkerd);
    mesh.loopback = LoopbackMode::Bypass;
    mesh.inbound_port = port("incoming-proxy-port")?;
    mesh.outbound_port = port("outgoing-proxy-port")?;
    mesh.proxy_uid = match get("proxy-uid") {
        Some(v) => v.parse().map_err(|_| anyhow!("{}: not a numeric UID", given.written("proxy-uid")))?,
        None => bail!("--proxy-uid is not given: the proxy's own connections would be redirected back to it"),
    };
    mesh.proxy_gid = match get("proxy-gid") {
        Some("-1") | None => None,
        Some(v) => Some(v.parse().map_err(|_| anyhow!("{}: not a numeric GID", given.written("proxy-gid")))?),
    };
    // What the command line says is all of it: the injector writes the
    // control and admin ports into --inbound-ports-to-ignore itself.
    mesh.reserved_inbound_ports = Vec::new();
    mesh.inbound_port_exclusion = ranges("inbound-ports-to-ignore")?;
    mesh.outbound_port_exclusion = ranges("outbound-ports-to-ignore")?;
    mesh.inbound_source_exclusion = items("subnets-to-ignore")
        .iter()
        .map(|s| parse_cidr(s).map_err(|_| anyhow!("--subnets-to-ignore: {s} is not a valid CIDR address")))
        .collect::<Result<_>>()?;
    let mut a = WorkloadAnnotations::default();
    let redirect = items("ports-to-redirect");
    if !redirect.is_empty() {
        a.inbound_port_inclusion = Some(Inclusion::Only(
            redirect
                .iter()
                .map(|p| parse_port(p).map_err(|e| anyhow!("--ports-to-redirect: {e}")))
                .collect::<Result<_>>()?,
        ));
    }
    // `--ipv6=false`: only iptables is programmed; IPv6 is left alone.
    if get("ipv6") == Some("false") {
        let all6 = parse_cidr("::/0").expect("a CIDR");
        mesh.outbound_ip_range_exclusion.push(all6);
        mesh.inbound_source_exclusion.push(all6);
    }
    Ok(Reading { preset: Preset::Linkerd, mesh, annotations: a, refused, notes: Vec::new() })
}
