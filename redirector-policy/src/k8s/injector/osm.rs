//! osm-init, as osm-injector writes it: `/bin/sh -c "iptables-restore
//! --noflush <<EOF … EOF"` with the nat rules of
//! openservicemesh/osm `pkg/injector/iptables.go`
//! (`generateIptablesCommands`): static inbound and outbound rules, then
//! the MeshConfig's and the pod's exclusion and inclusion lists. Each
//! line is recognised as one of the rules that generator writes, in its
//! order; any other line is refused (a hand-written or newer rule set may
//! mean something redirector would not do).
use anyhow::{anyhow, bail, Result};

use super::{program_name, Reading, Refusal};
use crate::{
    dialect::{LoopbackMode, Preset},
    mesh::MeshSettings,
    values::{parse_cidr, parse_port, Inclusion},
    WorkloadAnnotations,
};

/// The script of `sh -c SCRIPT` when it runs iptables-restore.
pub(super) fn tool_args(argv: &[String]) -> Option<&str> {
    match argv {
        [sh, c, script] if matches!(program_name(sh), "sh" | "bash") && c == "-c" => {
            script.trim_start().starts_with("iptables-restore").then_some(script.as_str())
        }
        _ => None,
    }
}

pub(super) fn read(script: &str) -> Result<Reading> {
    let mut lines = script.lines().map(str::trim).filter(|l| !l.is_empty());
    match lines.next() {
        Some("iptables-restore --noflush <<EOF") => {}
        Some(other) => bail!("line {other:?}: expected `iptables-restore --noflush <<EOF`"),
        None => bail!("empty script"),
    }
    let mut mesh = MeshSettings::for_preset(Preset::Osm);
    mesh.reserved_inbound_ports = Vec::new();
    mesh.inbound_port_exclusion = Vec::new();
    mesh.outbound_port_exclusion = Vec::new();
    mesh.loopback = LoopbackMode::ProxyToInbound;
    let mut a = WorkloadAnnotations::default();
    let mut refused = Vec::new();
    let (mut inbound_port, mut outbound_port, mut uid) = (None, None, None::<u32>);
    let mut inclusions = Vec::new();
    let mut ended = None::<&str>;
    let mut committed = false;
    let mut seen_eof = false;
    let set_uid = |uid: &mut Option<u32>, v: &str| -> Result<()> {
        let u: u32 = v.parse().map_err(|_| anyhow!("--uid-owner {v:?}: not a numeric UID"))?;
        match *uid {
            Some(prev) if prev != u => bail!("--uid-owner {u} after --uid-owner {prev}: one proxy UID expected"),
            _ => *uid = Some(u),
        }
        Ok(())
    };
    for line in lines {
        if seen_eof {
            bail!("line {line:?} after EOF");
        }
        if ended.is_some() && line.starts_with("-A OSM_PROXY_OUTBOUND") {
            bail!("rule {line:?} after the final {:?}: never reached", ended.unwrap_or_default());
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["#", ..] | ["*nat"] => {}
            [chain, "-", "[0:0]"] if chain.starts_with(':') => {
                let name = &chain[1..];
                if !["OSM_PROXY_INBOUND", "OSM_PROXY_IN_REDIRECT", "OSM_PROXY_OUTBOUND", "OSM_PROXY_OUT_REDIRECT"]
                    .contains(&name)
                {
                    bail!("chain {name}: not one osm-init declares");
                }
            }
            ["COMMIT"] => committed = true,
            ["EOF"] => seen_eof = true,
            ["-A", "OSM_PROXY_IN_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-port", p] => {
                inbound_port = Some(parse_port(p)?)
            }
            ["-A", "OSM_PROXY_OUT_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-port", p] => {
                outbound_port = Some(parse_port(p)?)
            }
            // After the REDIRECT above: never reached (seed 004 has it too).
            ["-A", "OSM_PROXY_OUT_REDIRECT", "-p", "tcp", "--dport", _, "-j", "ACCEPT"] => {}
            ["-A", "PREROUTING", "-p", "tcp", "-j", "OSM_PROXY_INBOUND"]
            | ["-A", "OUTPUT", "-p", "tcp", "-j", "OSM_PROXY_OUTBOUND"]
            | ["-A", "OSM_PROXY_INBOUND", "-p", "tcp", "-j", "OSM_PROXY_IN_REDIRECT"]
            | ["-A", "OSM_PROXY_OUTBOUND", "-d", "127.0.0.1/32", "-j", "RETURN"] => {}
            ["-A", "OSM_PROXY_INBOUND", "-p", "tcp", "--dport", p, "-j", "RETURN"] => {
                mesh.reserved_inbound_ports.push(parse_port(p)?)
            }
            ["-I", "OSM_PROXY_INBOUND", "-p", "tcp", "--match", "multiport", "--dports", list, "-j", "RETURN"] => {
                for p in list.split(',') {
                    mesh.inbound_port_exclusion.push(parse_port(p)?);
                }
            }
            ["-A", "OSM_PROXY_OUTBOUND", "-p", "tcp", "--match", "multiport", "--dports", list, "-j", "RETURN"] => {
                for p in list.split(',') {
                    mesh.outbound_port_exclusion.push(parse_port(p)?);
                }
            }
            ["-A", "OSM_PROXY_OUTBOUND", "-o", "lo", "!", "-d", "127.0.0.1/32", "-m", "owner", "--uid-owner", u, "-j", "OSM_PROXY_IN_REDIRECT"]
            | ["-A", "OSM_PROXY_OUTBOUND", "-o", "lo", "-m", "owner", "!", "--uid-owner", u, "-j", "RETURN"]
            | ["-A", "OSM_PROXY_OUTBOUND", "-m", "owner", "--uid-owner", u, "-j", "RETURN"] => set_uid(&mut uid, u)?,
            ["-A", "OSM_PROXY_OUTBOUND", "-d", cidr, "-j", "RETURN"] => {
                if !inclusions.is_empty() {
                    bail!("rule {line:?} after an inclusion rule: osm-injector writes exclusions first");
                }
                mesh.outbound_ip_range_exclusion.push(parse_cidr(cidr)?)
            }
            ["-A", "OSM_PROXY_OUTBOUND", "-d", cidr, "-j", "OSM_PROXY_OUT_REDIRECT"] => {
                inclusions.push(parse_cidr(cidr)?)
            }
            ["-A", "OSM_PROXY_OUTBOUND", "-j", "RETURN"] if !inclusions.is_empty() => ended = Some(line),
            ["-A", "OSM_PROXY_OUTBOUND", "-j", "OSM_PROXY_OUT_REDIRECT"] if inclusions.is_empty() => ended = Some(line),
            ["-I", "OSM_PROXY_INBOUND", "-i", iface, "-j", "RETURN"]
            | ["-A", "OSM_PROXY_OUTBOUND", "-o", iface, "-j", "RETURN"] => {
                let setting = format!("networkInterfaceExclusionList ({iface})");
                if !refused.iter().any(|r: &Refusal| r.setting == setting) {
                    refused.push(Refusal { setting, why: "excluding network interfaces is not implemented".into() });
                }
            }
            ["-I", "OUTPUT", "-p", "tcp", "-o", "lo", "-d", "127.0.0.1/32", "-m", "owner", "--uid-owner", _, "-j", "DNAT", "--to-destination", _] => {
                refused.push(Refusal {
                    setting: "localProxyMode: PodIP".into(),
                    why: "the proxy reaching the application at the pod's IP (a DNAT of its loopback connections) \
                          is not implemented"
                        .into(),
                })
            }
            _ => bail!("rule {line:?}: not one osm-injector writes"),
        }
    }
    if !committed || !seen_eof {
        bail!("the rule set does not end with COMMIT and EOF");
    }
    mesh.inbound_port = inbound_port.ok_or_else(|| anyhow!("no inbound REDIRECT rule"))?;
    mesh.outbound_port = outbound_port.ok_or_else(|| anyhow!("no outbound REDIRECT rule"))?;
    mesh.proxy_uid = uid.ok_or_else(|| anyhow!("no --uid-owner rule: the proxy's own connections would loop"))?;
    if ended.is_none() {
        bail!("no final OSM_PROXY_OUTBOUND rule (RETURN after inclusions, or the catch-all redirect)");
    }
    if !inclusions.is_empty() {
        a.outbound_ip_range_inclusion_override = Some(Inclusion::Only(inclusions));
    }
    // osm-init writes no ip6tables rules: IPv6 is left alone.
    let all6 = parse_cidr("::/0").expect("a CIDR");
    mesh.outbound_ip_range_exclusion.push(all6);
    mesh.inbound_source_exclusion.push(all6);
    Ok(Reading { preset: Preset::Osm, mesh, annotations: a, refused, notes: Vec::new() })
}
