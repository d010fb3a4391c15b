//! Kuma's transparent proxy, as its injector writes it into `kuma-init`
//! (`kumactl install transparent-proxy --config=FILE`, FILE a downwardAPI
//! file holding the `traffic.kuma.io/transparent-proxy-config` annotation;
//! `kuma-validation` in CNI mode reads the same file through
//! `--transparent-proxy-config`) and the older flag form (`kumactl install
//! transparent-proxy --exclude-inbound-ports=9000 …`). Follows kumahq/kuma
//! `pkg/transparentproxy/config/config.go` (keys and `DefaultConfig`:
//! kuma-dp UID 5678, inbound 15006, outbound 15001, dual-stack) and
//! `app/kumactl/cmd/install/install_transparent_proxy.go` (flags, applied
//! over the config file).
use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context as _, Result};
use serde_yaml::Value;

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

const FLAGS: [Flag; 35] = [
    boolean("ebpf-enabled", None),
    value("ebpf-bpffs-path", None),
    value("ebpf-cgroup-path", None),
    value("ebpf-tc-attach-iface", None),
    value("ebpf-programs-source-path", None),
    value("ebpf-instance-ip", None),
    value("config", None),
    value("config-file", None),
    value("transparent-proxy-config", None),
    boolean("dry-run", None),
    boolean("verbose", None),
    value("ip-family-mode", None),
    value("redirect-outbound-port", None),
    boolean("redirect-inbound", None),
    value("redirect-inbound-port", None),
    value("exclude-inbound-ports", None),
    value("exclude-outbound-ports", None),
    value("kuma-dp-user", None),
    boolean("redirect-dns", None),
    boolean("redirect-all-dns-traffic", None),
    value("redirect-dns-port", None),
    boolean("store-firewalld", None),
    boolean("skip-dns-conntrack-zone-split", None),
    boolean("drop-invalid-packets", None),
    value("exclude-outbound-ports-for-uids", None),
    value("vnet", None),
    value("wait", None),
    value("wait-interval", None),
    value("max-retries", None),
    value("sleep-between-retries", None),
    boolean("iptables-logs", None),
    boolean("disable-comments", None),
    value("exclude-inbound-ips", None),
    value("exclude-outbound-ips", None),
    value("validation-server-port", None),
];

/// The kumactl subcommand run, and its arguments.
pub(super) fn tool_args(argv: &[String]) -> Option<(&str, &[String])> {
    match argv {
        [k, install, sub, rest @ ..]
            if program_name(k) == "kumactl"
                && install == "install"
                && (sub == "transparent-proxy" || sub == "transparent-proxy-validator") =>
        {
            Some((sub.as_str(), rest))
        }
        _ => None,
    }
}

/// What Kuma's config says, before it becomes mesh settings.
#[derive(Debug)]
struct Tp {
    user: String,
    inbound: bool,
    inbound_port: u16,
    outbound: bool,
    outbound_port: u16,
    inbound_exclude: Vec<u16>,
    outbound_exclude: Vec<u16>,
    inbound_include: Vec<u16>,
    outbound_include: Vec<u16>,
    inbound_ips: Vec<String>,
    outbound_ips: Vec<String>,
    ipv4_only: bool,
    /// `redirect.dns`: enabled, captureAll, port (`DefaultConfig`: off,
    /// capture all, 15053).
    dns: bool,
    dns_capture_all: bool,
    dns_port: u16,
}

impl Default for Tp {
    fn default() -> Self {
        Tp {
            user: "5678".into(),
            inbound: true,
            inbound_port: 15006,
            outbound: true,
            outbound_port: 15001,
            inbound_exclude: Vec::new(),
            outbound_exclude: Vec::new(),
            inbound_include: Vec::new(),
            outbound_include: Vec::new(),
            inbound_ips: Vec::new(),
            outbound_ips: Vec::new(),
            ipv4_only: false,
            dns: false,
            dns_capture_all: true,
            dns_port: crate::mesh::DEFAULT_DNS_PORT,
        }
    }
}

/// Kuma's CNI mode: no init container, the CNI plugin reads the
/// annotation itself.
pub(super) fn read_cni(config: &str) -> Result<Reading> {
    let mut refused = Vec::new();
    let mut refuse = |setting: String, why: &str| refused.push(Refusal { setting, why: why.into() });
    let mut tp = Tp::default();
    apply_config(config, &mut tp, &mut refuse).context("annotation traffic.kuma.io/transparent-proxy-config")?;
    finish(tp, refused)
}

pub(super) fn read(
    c: &InitContainer,
    sub: &str,
    args: &[String],
    annotations: &BTreeMap<String, String>,
) -> Result<Reading> {
    let given = argv::parse(args, &FLAGS, &[])?;
    if let Some(extra) = given.positional.first() {
        bail!("unexpected argument {extra:?}");
    }
    let mut refused = Vec::new();
    let mut refuse = |setting: String, why: &str| refused.push(Refusal { setting, why: why.into() });
    if c.env.keys().any(|k| k.starts_with("KUMA_TRANSPARENT_PROXY_")) {
        let keys: Vec<&str> =
            c.env.keys().filter(|k| k.starts_with("KUMA_TRANSPARENT_PROXY_")).map(String::as_str).collect();
        refuse(format!("env {}", keys.join(", ")), "transparent-proxy settings from the environment are not read");
    }
    let mut tp = Tp::default();
    // The config file, when the injector gave one (the annotation, through
    // a downwardAPI volume).
    let file_flag = if sub == "transparent-proxy-validator" { "transparent-proxy-config" } else { "config" };
    for path in given.every.get(file_flag).into_iter().flatten().flat_map(|v| v.split(',')) {
        let text = c
            .downward_files
            .get(path)
            .and_then(|field| field_annotation(field))
            .map(|key| {
                annotations.get(key).ok_or_else(|| {
                    anyhow!("--{file_flag}={path}: the file holds annotation {key}, which the pod has not")
                })
            })
            .transpose()?
            .ok_or_else(|| {
                anyhow!("--{file_flag}={path}: not a file of a downwardAPI volume holding one of the pod's annotations")
            })?;
        apply_config(text, &mut tp, &mut refuse).with_context(|| format!("--{file_flag}={path}"))?;
    }
    // The flags, over the file.
    let get = |long: &str| given.get(long);
    let port = |long: &str| get(long).map(|v| parse_port(v).map_err(|e| anyhow!("--{long}: {e}"))).transpose();
    if let Some(p) = port("redirect-inbound-port")? {
        tp.inbound_port = p;
    }
    if let Some(p) = port("redirect-outbound-port")? {
        tp.outbound_port = p;
    }
    if let Some(v) = get("redirect-inbound") {
        tp.inbound = v == "true";
    }
    if let Some(v) = get("kuma-dp-user") {
        tp.user = v.to_string();
    }
    if let Some(v) = get("exclude-inbound-ports") {
        tp.inbound_exclude = flatten_ranges(v).map_err(|e| anyhow!("--exclude-inbound-ports: {e}"))?;
    }
    if let Some(v) = get("exclude-outbound-ports") {
        tp.outbound_exclude = flatten_ranges(v).map_err(|e| anyhow!("--exclude-outbound-ports: {e}"))?;
    }
    let ips = |long: &str| -> Vec<String> {
        given.every.get(long).into_iter().flatten().flat_map(|v| v.split(',')).map(|s| s.trim().to_string()).collect()
    };
    tp.inbound_ips.extend(ips("exclude-inbound-ips"));
    tp.outbound_ips.extend(ips("exclude-outbound-ips"));
    match get("ip-family-mode") {
        None => {}
        Some("ipv4") => tp.ipv4_only = true,
        Some("dualstack") => tp.ipv4_only = false,
        Some(other) => bail!("--ip-family-mode {other:?}: valid values are dualstack and ipv4"),
    }
    // The legacy DNS flags: --redirect-dns only to resolv.conf's
    // nameservers, --redirect-all-dns-traffic to any address.
    if get("redirect-dns") == Some("true") {
        tp.dns = true;
        tp.dns_capture_all = false;
    }
    if get("redirect-all-dns-traffic") == Some("true") {
        tp.dns = true;
        tp.dns_capture_all = true;
    }
    if let Some(p) = port("redirect-dns-port")? {
        tp.dns_port = p;
    }
    for (long, why) in [
        ("drop-invalid-packets", "dropping packets conntrack sees as INVALID needs iptables"),
        ("dry-run", "the init container is not asked to program redirection"),
        ("store-firewalld", "storing rules in firewalld is an iptables matter"),
        ("ebpf-enabled", "Kuma's own eBPF redirection is in use"),
    ] {
        if get(long) == Some("true") {
            refuse(format!("--{long}"), why);
        }
    }
    for (long, why) in [
        ("exclude-outbound-ports-for-uids", "per-UID port exclusions are not implemented"),
        ("vnet", "virtual networks (vnet) are not implemented"),
    ] {
        if given.values.contains_key(long) {
            refuse(given.written(long), why);
        }
    }
    finish(tp, refused)
}

fn finish(tp: Tp, refused: Vec<Refusal>) -> Result<Reading> {
    let uid: u32 = match tp.user.as_str() {
        "kuma-dp" => 5678,
        // UID 0's name everywhere (the kumactl tests' own user).
        "root" => 0,
        u => u.parse().map_err(|_| {
            anyhow!("kumaDPUser {u:?}: a user name other than kuma-dp cannot be resolved outside the image")
        })?,
    };
    let cidrs = |v: &[String], what: &str| -> Result<Vec<ipnet::IpNet>> {
        v.iter().filter(|s| !s.is_empty()).map(|s| parse_cidr(s).map_err(|e| anyhow!("{what}: {e}"))).collect()
    };
    let mut mesh = MeshSettings::for_preset(Preset::Kuma);
    mesh.loopback = LoopbackMode::ProxyToInbound;
    mesh.proxy_uid = uid;
    mesh.inbound = tp.inbound;
    mesh.inbound_port = tp.inbound_port;
    mesh.outbound_port = tp.outbound_port;
    mesh.inbound_port_exclusion = tp.inbound_exclude;
    mesh.outbound_port_exclusion = tp.outbound_exclude;
    mesh.inbound_source_exclusion = cidrs(&tp.inbound_ips, "inbound excluded IPs")?;
    mesh.outbound_ip_range_exclusion = cidrs(&tp.outbound_ips, "outbound excluded IPs")?;
    if tp.ipv4_only {
        let all6 = parse_cidr("::/0").expect("a CIDR");
        mesh.outbound_ip_range_exclusion.push(all6);
        mesh.inbound_source_exclusion.push(all6);
    }
    if tp.dns {
        if tp.dns_port == 0 {
            bail!("redirect.dns.port: 0 with DNS redirection enabled: kuma-dp's DNS listener needs a port");
        }
        mesh.dns = Some(crate::mesh::DnsSettings {
            capture_all: tp.dns_capture_all,
            ipv6: !tp.ipv4_only,
            ..crate::mesh::DnsSettings::resolv_conf(tp.dns_port)
        });
    }
    let mut a = WorkloadAnnotations::default();
    if !tp.outbound {
        a.outbound_ip_range_inclusion_override = Some(Inclusion::Only(Vec::new()));
    }
    if !tp.inbound_include.is_empty() {
        a.inbound_port_inclusion = Some(Inclusion::Only(tp.inbound_include));
    }
    if !tp.outbound_include.is_empty() {
        a.outbound_port_inclusion = Some(Inclusion::Only(tp.outbound_include));
    }
    Ok(Reading { preset: Preset::Kuma, mesh, annotations: a, refused, notes: Vec::new() })
}

/// `metadata.annotations['KEY']` → KEY.
fn field_annotation(field: &str) -> Option<&str> {
    field.strip_prefix("metadata.annotations['")?.strip_suffix("']")
}

/// Lays a config document over `tp`. Unknown keys are errors (a key
/// redirector does not know may change what Kuma redirects).
fn apply_config(text: &str, tp: &mut Tp, refuse: &mut impl FnMut(String, &str)) -> Result<()> {
    let doc: Value = serde_yaml::from_str(text).context("not YAML")?;
    let Value::Mapping(top) = doc else { bail!("not a mapping") };
    let s = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let b = |k: &str, v: &Value| v.as_bool().ok_or_else(|| anyhow!("{k}: {v:?} is not a boolean"));
    let port = |k: &str, v: &Value| -> Result<u16> {
        s(v).ok_or_else(|| anyhow!("{k}: not a port")).and_then(|p| parse_port(&p).map_err(|e| anyhow!("{k}: {e}")))
    };
    let ports = |k: &str, v: &Value| -> Result<Vec<u16>> {
        match v {
            Value::Sequence(items) => {
                let text: Vec<String> = items
                    .iter()
                    .map(|i| s(i).ok_or_else(|| anyhow!("{k}: {i:?} is not a port")))
                    .collect::<Result<_>>()?;
                flatten_ranges(&text.join(",")).map_err(|e| anyhow!("{k}: {e}"))
            }
            Value::Null => Ok(Vec::new()),
            other => flatten_ranges(&s(other).unwrap_or_default()).map_err(|e| anyhow!("{k}: {e}")),
        }
    };
    let strings = |k: &str, v: &Value| -> Result<Vec<String>> {
        match v {
            Value::Sequence(items) => {
                items.iter().map(|i| s(i).ok_or_else(|| anyhow!("{k}: {i:?} is not a string"))).collect()
            }
            Value::Null => Ok(Vec::new()),
            other => {
                Ok(s(other).into_iter().flat_map(|x| x.split(',').map(str::to_string).collect::<Vec<_>>()).collect())
            }
        }
    };
    for (k, v) in &top {
        let k = k.as_str().ok_or_else(|| anyhow!("a key that is not a string"))?;
        match k {
            "kumaDPUser" => tp.user = s(v).ok_or_else(|| anyhow!("kumaDPUser: not a user"))?,
            "ipFamilyMode" => match s(v).as_deref() {
                Some("dualstack") => tp.ipv4_only = false,
                Some("ipv4") => tp.ipv4_only = true,
                _ => bail!("ipFamilyMode: {v:?}: valid values are dualstack and ipv4"),
            },
            "redirect" => {
                let Value::Mapping(r) = v else { bail!("redirect: not a mapping") };
                for (rk, rv) in r {
                    let rk = rk.as_str().unwrap_or_default();
                    let Value::Mapping(m) = rv else { bail!("redirect.{rk}: not a mapping") };
                    for (fk, fv) in m {
                        let fk = fk.as_str().unwrap_or_default();
                        let key = format!("redirect.{rk}.{fk}");
                        match (rk, fk) {
                            ("inbound", "enabled") => tp.inbound = b(&key, fv)?,
                            ("outbound", "enabled") => tp.outbound = b(&key, fv)?,
                            ("inbound", "port") => tp.inbound_port = port(&key, fv)?,
                            ("outbound", "port") => tp.outbound_port = port(&key, fv)?,
                            ("inbound", "excludePorts") => tp.inbound_exclude = ports(&key, fv)?,
                            ("outbound", "excludePorts") => tp.outbound_exclude = ports(&key, fv)?,
                            ("inbound", "includePorts") => tp.inbound_include = ports(&key, fv)?,
                            ("outbound", "includePorts") => tp.outbound_include = ports(&key, fv)?,
                            ("inbound", "excludePortsForIPs") => tp.inbound_ips = strings(&key, fv)?,
                            ("outbound", "excludePortsForIPs") => tp.outbound_ips = strings(&key, fv)?,
                            ("inbound" | "outbound", "excludePortsForUIDs") => {
                                if !strings(&key, fv)?.is_empty() {
                                    refuse(key, "per-UID port exclusions are not implemented");
                                }
                            }
                            // Where kumactl puts its jump rule: no rule here.
                            ("inbound" | "outbound", "insertRedirectInsteadOfAppend") => {}
                            ("dns", "enabled") => tp.dns = b(&key, fv)?,
                            ("dns", "captureAll") => tp.dns_capture_all = b(&key, fv)?,
                            // The injector writes 0 with DNS off.
                            ("dns", "port") if s(fv).as_deref() == Some("0") => tp.dns_port = 0,
                            ("dns", "port") => tp.dns_port = port(&key, fv)?,
                            ("dns", "resolvConfigPath") => {
                                if s(fv).as_deref() != Some("/etc/resolv.conf") {
                                    refuse(key, "only the pod's /etc/resolv.conf is read for its nameservers");
                                }
                            }
                            // Conntrack zones keep iptables' NAT of DNS
                            // apart; no NAT here, nothing to split.
                            ("dns", "skipConntrackZoneSplit") => {
                                b(&key, fv)?;
                            }
                            ("vnet", "networks") => {
                                if !strings(&key, fv)?.is_empty() {
                                    refuse(key, "virtual networks (vnet) are not implemented");
                                }
                            }
                            _ => bail!("{key}: not a key of Kuma's transparent-proxy config that redirector reads"),
                        }
                    }
                }
            }
            "ebpf" => {
                if let Value::Mapping(m) = v {
                    if m.get("enabled").and_then(Value::as_bool) == Some(true) {
                        refuse("ebpf.enabled".into(), "Kuma's own eBPF redirection is in use");
                    }
                }
            }
            "dropInvalidPackets" => {
                if b(k, v)? {
                    refuse(k.into(), "dropping packets conntrack sees as INVALID needs iptables");
                }
            }
            "dryRun" => {
                if b(k, v)? {
                    refuse(k.into(), "the init container is not asked to program redirection");
                }
            }
            "storeFirewalld" => {
                if b(k, v)? {
                    refuse(k.into(), "storing rules in firewalld is an iptables matter");
                }
            }
            // How kumactl runs, not what it redirects.
            "verbose" | "log" | "wait" | "waitInterval" | "retry" | "iptablesExecutables" | "comments" | "cniMode" => {}
            other => bail!("{other}: not a key of Kuma's transparent-proxy config that redirector reads"),
        }
    }
    Ok(())
}
