//! istio-iptables, as istio-injector writes it into `istio-init` (and, in
//! CNI mode, into `istio-validation` with `--run-validation
//! --skip-rule-apply`: the same flags, which the CNI plugin applies from
//! the annotations it was given). Follows istio/istio
//! `tools/istio-iptables/pkg/cmd/root.go` (flags, and the environment
//! variables `pkg/flag.BindEnv` reads first: the flag's name upper-cased
//! with `-` → `_`, so the injector's `proxyMetadata` env reaches them),
//! `tools/common/config/config.go` (defaults: 15001, 15006, tunnel 15008,
//! UID 1337 = ENVOY_USER's, GID = UID) and `tools/istio-iptables/pkg/
//! capture/run.go` (what each list does).
use std::net::IpAddr;

use anyhow::{anyhow, bail, Result};

use super::{
    argv::{self, boolean, value, Flag},
    program_name, InitContainer, Reading, Refusal,
};
use crate::{
    dialect::{LoopbackMode, Preset},
    mesh::{DnsSettings, MeshSettings, DEFAULT_DNS_PORT},
    values::{parse_cidr, parse_port, Inclusion},
    WorkloadAnnotations,
};

const FLAGS: [Flag; 34] = [
    value("envoy-port", Some('p')),
    value("inbound-capture-port", Some('z')),
    value("inbound-tunnel-port", Some('e')),
    value("proxy-uid", Some('u')),
    value("proxy-gid", Some('g')),
    value("istio-inbound-interception-mode", Some('m')),
    value("istio-inbound-ports", Some('b')),
    value("istio-local-exclude-ports", Some('d')),
    value("istio-exclude-interfaces", Some('c')),
    value("istio-service-cidr", Some('i')),
    value("istio-service-exclude-cidr", Some('x')),
    value("istio-outbound-ports", Some('q')),
    value("istio-local-outbound-ports-exclude", Some('o')),
    value("kube-virt-interfaces", Some('k')),
    value("istio-inbound-tproxy-mark", Some('t')),
    value("istio-inbound-tproxy-route-table", Some('r')),
    boolean("dry-run", Some('n')),
    value("iptables-probe-port", None),
    value("probe-timeout", None),
    boolean("skip-rule-apply", None),
    boolean("run-validation", None),
    boolean("redirect-dns", None),
    boolean("drop-invalid", None),
    boolean("dual-stack", None),
    boolean("capture-all-dns", None),
    value("network-namespace", None),
    boolean("cni-mode", None),
    boolean("reconcile", None),
    boolean("cleanup-only", None),
    boolean("force-apply", None),
    boolean("native-nftables", None),
    value("force-iptables-binary", None),
    boolean("iptables-trace-logging", None),
    boolean("help", Some('h')),
];

/// Flags `Bind` (not `BindEnv`) declares: no environment variable.
const NO_ENV: [&str; 1] = ["envoy-port"];

/// Variables read besides the flags' own (`flag.AdditionalEnv`).
const ADDITIONAL_ENV: [(&str, &str); 3] =
    [("ISTIO_META_DNS_CAPTURE", "redirect-dns"), ("ISTIO_DUAL_STACK", "dual-stack"), ("INVALID_DROP", "drop-invalid")];

/// Whether `argv` (command + args) runs istio-iptables: the binary itself,
/// or pilot-agent's `istio-iptables` subcommand (the proxyv2 image's
/// entrypoint is pilot-agent, so `args: [istio-iptables, …]` alone is
/// that).
pub(super) fn tool_args(argv: &[String]) -> Option<&[String]> {
    match argv {
        [first, rest @ ..] if program_name(first) == "istio-iptables" => Some(rest),
        [first, sub, rest @ ..] if program_name(first) == "pilot-agent" && sub == "istio-iptables" => Some(rest),
        _ => None,
    }
}

pub(super) fn read(c: &InitContainer, args: &[String], pod_ips: &[IpAddr]) -> Result<Reading> {
    // The environment first, then the command line over it (BindEnv sets
    // the flag from the variable when it binds, before cobra parses).
    let mut given = argv::parse(args, &FLAGS, &["log_"])?;
    let mut refused = Vec::new();
    for f in FLAGS.iter().filter(|f| !NO_ENV.contains(&f.long)) {
        let var = f.long.to_uppercase().replace('-', "_");
        env_into(c, &var, f, &mut given, &mut refused)?;
    }
    for (var, long) in ADDITIONAL_ENV {
        let f = FLAGS.iter().find(|f| f.long == long).expect("a flag");
        env_into(c, var, f, &mut given, &mut refused)?;
    }
    if let Some(extra) = given.positional.iter().find(|p| !p.starts_with("--log_")) {
        bail!("unexpected argument {extra:?} (istio-iptables takes flags only)");
    }
    let get = |long: &str| given.get(long);
    let is_true = |long: &str| get(long).is_some_and(|v| v == "true");
    let port = |long: &str, default: u16| -> Result<u16> {
        match get(long) {
            None => Ok(default),
            Some(v) => parse_port(v).map_err(|e| anyhow!("{}: {e}", given.written(long))),
        }
    };
    let ports = |long: &str| -> Result<Vec<u16>> {
        split(get(long).unwrap_or(""))
            .map(|p| parse_port(p).map_err(|e| anyhow!("{}: {e}", given.written(long))))
            .collect()
    };
    let id = |long: &str| -> Result<Option<Vec<u32>>> {
        get(long)
            .filter(|v| !v.is_empty())
            .map(|v| {
                split(v)
                    .map(|u| {
                        u.parse::<u32>().map_err(|_| anyhow!("{}: {u:?} is not a numeric ID", given.written(long)))
                    })
                    .collect()
            })
            .transpose()
    };

    let mut refuse = |setting: String, why: &str| refused.push(Refusal { setting, why: why.to_string() });
    let mode = get("istio-inbound-interception-mode").unwrap_or("");
    match mode {
        "" | "REDIRECT" => {}
        "TPROXY" => refuse(
            given.written("istio-inbound-interception-mode"),
            "TPROXY interception (the application sees the client's address) is not implemented yet",
        ),
        other => {
            bail!("{}: mode {other:?} is neither REDIRECT nor TPROXY", given.written("istio-inbound-interception-mode"))
        }
    }
    for (long, why) in [
        ("kube-virt-interfaces", "rerouting a virtual machine's interfaces (KubeVirt) is not implemented"),
        ("istio-exclude-interfaces", "excluding network interfaces is not implemented"),
    ] {
        if !get(long).unwrap_or("").is_empty() {
            refuse(given.written(long), why);
        }
    }
    if is_true("native-nftables") || is_true("cleanup-only") || is_true("dry-run") {
        for long in ["native-nftables", "cleanup-only", "dry-run"].into_iter().filter(|l| is_true(l)) {
            refuse(given.written(long), "the init container is not asked to program redirection as usual");
        }
    }
    if is_true("drop-invalid") {
        refuse(given.written("drop-invalid"), "dropping packets conntrack sees as INVALID needs iptables");
    }
    // Environment-only settings (`env.Register`).
    match c.env.get("ISTIO_OUTBOUND_OWNER_GROUPS") {
        None => {}
        Some(Some(v)) if v == "*" => {}
        Some(v) => refuse(
            format!("env ISTIO_OUTBOUND_OWNER_GROUPS={}", v.as_deref().unwrap_or("(valueFrom)")),
            "redirecting only some groups' connections is not implemented",
        ),
    }
    match c.env.get("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE") {
        None => {}
        Some(Some(v)) if v.is_empty() => {}
        Some(v) => refuse(
            format!("env ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE={}", v.as_deref().unwrap_or("(valueFrom)")),
            "exempting groups' connections is not implemented",
        ),
    }
    match c.env.get("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR") {
        None => {}
        Some(Some(v)) if v == "127.0.0.1/32" => {}
        Some(v) => refuse(
            format!("env ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR={}", v.as_deref().unwrap_or("(valueFrom)")),
            "only 127.0.0.1/32 passes as the application's own loopback",
        ),
    }

    let mut mesh = MeshSettings::for_preset(Preset::Istio);
    let mut notes = Vec::new();
    let uids = id("proxy-uid")?.unwrap_or_else(|| vec![1337]);
    let gids = id("proxy-gid")?.unwrap_or_else(|| uids.clone());
    if uids.len() > 1 || gids.len() > 1 {
        refused.push(Refusal {
            setting: format!("{} {}", given.written("proxy-uid"), given.written("proxy-gid")),
            why: "more than one proxy UID or GID is not implemented".into(),
        });
    }
    mesh.proxy_uid = uids[0];
    mesh.proxy_gid = Some(gids[0]);
    mesh.outbound_port = port("envoy-port", 15001)?;
    mesh.inbound_port = port("inbound-capture-port", 15006)?;
    // ISTIO_INBOUND: the tunnel port's RETURN comes first, whatever -b.
    mesh.reserved_inbound_ports = vec![port("inbound-tunnel-port", 15008)?];
    mesh.outbound_port_exclusion = ports("istio-local-outbound-ports-exclude")?;
    mesh.inbound_port_exclusion = Vec::new();
    let mut a = WorkloadAnnotations::default();
    // -b: "*" every port but -d; "" no inbound rule at all; a list: only
    // those (-d is not read then).
    match get("istio-inbound-ports").unwrap_or("") {
        "" => mesh.inbound = false,
        "*" => mesh.inbound_port_exclusion = ports("istio-local-exclude-ports")?,
        _ => a.inbound_port_inclusion = Some(Inclusion::Only(ports("istio-inbound-ports")?)),
    }
    // -i / -x: entries that do not parse are skipped by istio-iptables
    // ("Ignoring error for bug compatibility"), so here too, said.
    let mut cidrs = |long: &str| {
        let mut v = Vec::new();
        for s in split(get(long).unwrap_or("")) {
            match parse_cidr(s) {
                Ok(n) if s.contains('/') => v.push(n),
                _ => notes.push(format!(
                    "{}: {s:?} is not a CIDR; istio-iptables skips it, so does redirector",
                    given.written(long)
                )),
            }
        }
        v
    };
    let include = get("istio-service-cidr").unwrap_or("");
    let include_nets = if include == "*" { Vec::new() } else { cidrs("istio-service-cidr") };
    // Since Istio 1.10 only the proxy's connections through `lo` go to
    // the inbound listener and everyone else's return, unless an -i range
    // holds a loopback address (`HasLoopBackIP`): then they meet the
    // ranges like any destination, a mode of its own.
    mesh.loopback = LoopbackMode::ProxyToInbound;
    if let Some(n) = include_nets.iter().find(|n| {
        n.contains(&IpAddr::from([127, 0, 0, 1]))
            || n.contains(&IpAddr::from(std::net::Ipv6Addr::LOCALHOST))
            || matches!(n.addr(), IpAddr::V4(a) if a.is_loopback())
    }) {
        refused.push(Refusal {
            setting: format!("{} (holds the loopback range {n})", given.written("istio-service-cidr")),
            why: "an -i range with a loopback address changes how connections through lo are treated, a mode \
                  redirector does not implement"
                .into(),
        });
    }
    mesh.outbound_ip_range_exclusion = cidrs("istio-service-exclude-cidr");
    let q = ports("istio-outbound-ports")?;
    // Outbound capture: exclusions, then the -q ports, then the -i ranges
    // (or everything for "*").
    match (include, q.is_empty()) {
        ("*", _) => a.outbound_ip_range_inclusion_override = Some(Inclusion::All),
        (_, true) => a.outbound_ip_range_inclusion_override = Some(Inclusion::Only(include_nets)),
        (_, false) if include_nets.is_empty() => {
            a.outbound_ip_range_inclusion_override = Some(Inclusion::All);
            a.outbound_port_inclusion = Some(Inclusion::Only(q));
        }
        (_, false) => refused.push(Refusal {
            setting: format!("{} with {}", given.written("istio-outbound-ports"), given.written("istio-service-cidr")),
            why: "redirecting the listed ports to any destination AND the listed ranges on any port is not one policy"
                .into(),
        }),
    }
    // ip6tables is programmed only for dual-stack or an IPv6 pod
    // (`getLocalIP`): otherwise IPv6 is left alone.
    let v6 = is_true("dual-stack") || pod_ips.first().is_some_and(|ip| ip.is_ipv6());
    // --redirect-dns (env ISTIO_META_DNS_CAPTURE): UDP and TCP port 53 to
    // the nameservers of the pod's resolv.conf (istio-iptables reads
    // them there, `HandleDNSUDP`), or to any address with
    // --capture-all-dns, go to pilot-agent's DNS proxy on 15053
    // (`DNSCapturePort`); --capture-all-dns alone does nothing.
    if is_true("redirect-dns") {
        mesh.dns = Some(DnsSettings {
            capture_all: is_true("capture-all-dns"),
            ipv6: v6,
            ..DnsSettings::resolv_conf(DEFAULT_DNS_PORT)
        });
    } else if is_true("capture-all-dns") {
        notes.push(format!(
            "{} without {}: istio-iptables captures no DNS, neither does redirector",
            given.written("capture-all-dns"),
            given.written("redirect-dns")
        ));
    }
    if !v6 {
        let all6 = parse_cidr("::/0").expect("a CIDR");
        mesh.outbound_ip_range_exclusion.push(all6);
        mesh.inbound_source_exclusion.push(all6);
    }
    Ok(Reading { preset: Preset::Istio, mesh, annotations: a, refused, notes })
}

/// A variable of the container's `env` into the flag it sets, unless the
/// command line sets the flag too. A `valueFrom` variable's value is not
/// in the spec: refused if it matters.
fn env_into(c: &InitContainer, var: &str, f: &Flag, given: &mut argv::Given, refused: &mut Vec<Refusal>) -> Result<()> {
    let Some(v) = c.env.get(var) else { return Ok(()) };
    if given.values.contains_key(f.long) {
        return Ok(());
    }
    let Some(v) = v else {
        refused.push(Refusal {
            setting: format!("env {var} (valueFrom)"),
            why: "its value is only known inside the container".into(),
        });
        return Ok(());
    };
    let v = if f.boolean { argv::parse_bool(v).map_err(|e| anyhow!("env {var}: {e}"))?.to_string() } else { v.clone() };
    given.values.insert(f.long, (v.clone(), format!("env {var}={v}")));
    Ok(())
}

/// istio's `config.Split`: "" is no item.
fn split(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').filter(|_| !s.is_empty())
}
