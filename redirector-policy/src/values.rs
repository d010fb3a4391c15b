//! Values: ports, port ranges, CIDRs and the comma-separated lists the
//! meshes' annotations use. Every error names the value and the reason.
use std::net::IpAddr;

use anyhow::{anyhow, bail, Context as _, Result};
use ipnet::{IpNet, Ipv4Net};

/// A pod-level include setting that replaces the mesh's (Istio `*`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Inclusion<T> {
    All,
    Only(Vec<T>),
}

pub(crate) fn port_from_i64(v: i64) -> Result<u16> {
    match u16::try_from(v) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(anyhow!("value {v} is not a port (1-65535)")),
    }
}

/// One port number, as OSM accepts it in its lists.
pub fn parse_port(s: &str) -> Result<u16> {
    let t = s.trim();
    let v: i64 = t.parse().map_err(|_| anyhow!("value {s:?} is not a port number (1-65535)"))?;
    port_from_i64(v).map_err(|_| anyhow!("value {s:?} is not a port (1-65535)"))
}

/// One address range, IPv4 or IPv6: `a.b.c.d/len`, `2001:db8::/32`, or a
/// bare address meaning a host route (as `iptables -d` takes it). Host bits
/// are cleared, as iptables does. An IPv4-mapped IPv6 range
/// (`::ffff:192.0.2.0/120`) is the IPv4 range it denotes. The address is
/// read by the same (std) parser with or without a prefix: it refuses
/// octets with leading zeros (`010` is 8 to inet_aton, 10 to others), as
/// Go's `net.ParseCIDR` does for the meshes' own tools.
pub fn parse_cidr(s: &str) -> Result<IpNet> {
    let t = s.trim();
    if t.is_empty() {
        bail!("value {s:?} is empty, expected a CIDR such as 192.0.2.0/24 or 2001:db8::/32");
    }
    let (addr, len) = match t.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (t, None),
    };
    let Ok(addr) = addr.parse::<IpAddr>() else {
        bail!("value {s:?} is not a CIDR (expected e.g. 192.0.2.0/24 or 2001:db8::/32)");
    };
    let net = match len {
        None => IpNet::from(addr),
        Some(len) => {
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix = Some(len)
                .filter(|l| !l.is_empty() && l.len() <= 3 && l.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|l| l.parse::<u8>().ok())
                .filter(|l| *l <= max);
            let Some(prefix) = prefix else {
                bail!("value {s:?} has an invalid prefix length {len:?} (0-{max})");
            };
            IpNet::new(addr, prefix).expect("prefix checked")
        }
    };
    Ok(canonical_net(net))
}

/// Host bits cleared; IPv4-mapped IPv6 ranges as IPv4.
pub fn canonical_net(net: IpNet) -> IpNet {
    match net.trunc() {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.network().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::new(v4, n.prefix_len() - 96).expect("<= 32")),
            None => IpNet::V6(n),
        },
        n => n,
    }
}

/// One port or, where the dialect allows it, a range `a-b` (Linkerd),
/// as first and last port.
pub(crate) fn parse_port_or_range(s: &str) -> Result<(u16, u16)> {
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (parse_port(a)?, parse_port(b)?);
            if a > b {
                bail!("value {s:?} is not a port range (first port above the last)");
            }
            Ok((a, b))
        }
        None => parse_port(s).map(|p| (p, p)),
    }
}

/// A comma-separated list, as in OSM's annotations. An empty or blank
/// value is an empty list; an empty item between commas is an error.
pub(crate) fn split_list(value: &str) -> Vec<&str> {
    if value.trim().is_empty() {
        return Vec::new();
    }
    value.split(',').map(str::trim).collect()
}

/// Errors name the value; the caller names the annotation.
pub(crate) fn parse_list<T>(value: &str, item: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    split_list(value)
        .into_iter()
        .map(|s| if s.is_empty() { Err(anyhow!("empty item between commas")) } else { item(s) })
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("value {value:?}"))
}

/// An Istio include value: `*` for everything, else a list.
pub(crate) fn parse_inclusion<T>(value: &str, item: impl Fn(&str) -> Result<T>) -> Result<Inclusion<T>> {
    if value.trim() == "*" {
        return Ok(Inclusion::All);
    }
    Ok(Inclusion::Only(parse_list(value, item)?))
}

/// The ports of a list of ports and ranges, ascending, each once. The
/// ranges are sorted and merged before anything is expanded, so the work
/// and memory are bounded by the 65,535 ports, not by how often a value
/// within the annotation size limit repeats `1-65535`.
pub(crate) fn flatten_ranges(value: &str) -> Result<Vec<u16>> {
    let mut ranges = parse_list(value, parse_port_or_range)?;
    ranges.sort_unstable();
    let mut merged: Vec<(u16, u16)> = Vec::new();
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    Ok(merged.into_iter().flat_map(|(a, b)| a..=b).collect())
}
