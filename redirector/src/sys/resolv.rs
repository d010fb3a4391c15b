//! A workload's nameservers, for DNS capture: the `nameserver` lines of
//! the resolv.conf its processes see, as istio-iptables reads
//! `/etc/resolv.conf` inside the pod (`HandleDNSUDP`'s server lists) and
//! kumactl its `resolvConfigPath`.
//!
//! Where that file is, from the agent's side:
//! - a process (`pid: N`, or `netns: /proc/N/ns/net`): its own
//!   `/etc/resolv.conf`, through `/proc/N/root`;
//! - a named namespace (`/run/netns/NAME`): `/etc/netns/NAME/resolv.conf`,
//!   which `ip netns exec NAME` bind-mounts over `/etc/resolv.conf` (only
//!   if it exists: the host's own resolv.conf says nothing of the
//!   workload's, so it is never taken instead).
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use redirector_policy::NetnsRef;

/// The resolv.conf of the workload at `netns`.
pub fn resolv_conf_of(netns: &NetnsRef) -> Result<PathBuf> {
    let path = match netns {
        NetnsRef::Pid(pid) => return Ok(PathBuf::from(format!("/proc/{pid}/root/etc/resolv.conf"))),
        NetnsRef::Path(p) => p,
    };
    let parts: Vec<&str> = path.iter().filter_map(|c| c.to_str()).collect();
    match parts.as_slice() {
        ["/", "proc", pid, "ns", "net"] if pid.parse::<u32>().is_ok() => {
            Ok(PathBuf::from(format!("/proc/{pid}/root/etc/resolv.conf")))
        }
        [.., "netns", name] => {
            let conf = Path::new("/etc/netns").join(name).join("resolv.conf");
            if !conf.exists() {
                bail!(
                    "{} does not exist (`ip netns exec {name}` shows it as /etc/resolv.conf): DNS capture cannot \
                     tell this workload's nameservers; write it, or list them in `mesh.dnsServers`",
                    conf.display()
                );
            }
            Ok(conf)
        }
        _ => bail!(
            "no resolv.conf is known for network namespace {}: DNS capture cannot tell this workload's \
             nameservers; name the workload by `pid:`, or list them in `mesh.dnsServers`",
            path.display()
        ),
    }
}

/// The `nameserver` addresses of a resolv.conf text, in order (glibc's
/// reading: the first word of a line, then the address; a scope suffix
/// `%eth0` is dropped; lines that do not parse are skipped, as glibc does).
pub fn nameservers(text: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else { continue };
        let addr = addr.split('%').next().unwrap_or(addr);
        if let Ok(ip) = addr.parse::<IpAddr>() {
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

/// The nameservers of the workload at `netns`; an error names the file and
/// why (no file, or no nameserver in it: capture would take nothing).
pub fn nameservers_of(netns: &NetnsRef) -> Result<Vec<IpAddr>> {
    let conf = resolv_conf_of(netns)?;
    let text = std::fs::read_to_string(&conf).with_context(|| format!("reading {}", conf.display()))?;
    let found = nameservers(&text);
    if found.is_empty() {
        bail!("{} lists no nameserver: DNS capture would take nothing", conf.display());
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nameserver_lines_as_glibc() {
        let text = "# generated\nsearch default.svc.cluster.local svc.cluster.local\nnameserver 192.0.2.53\n\
                    nameserver  2001:db8::53%eth0\nnameserver not-an-address\nnameserver 192.0.2.53\n\
                    options ndots:5\n  nameserver 198.51.100.53\n";
        let want: Vec<IpAddr> =
            ["192.0.2.53", "2001:db8::53", "198.51.100.53"].iter().map(|a| a.parse().unwrap()).collect();
        assert_eq!(nameservers(text), want);
        assert!(nameservers("search x\n").is_empty());
    }

    #[test]
    fn finds_the_file_a_workload_sees() {
        assert_eq!(resolv_conf_of(&NetnsRef::Pid(42)).unwrap(), Path::new("/proc/42/root/etc/resolv.conf"));
        let by_path = NetnsRef::Path("/proc/42/ns/net".into());
        assert_eq!(resolv_conf_of(&by_path).unwrap(), Path::new("/proc/42/root/etc/resolv.conf"));
        let e = resolv_conf_of(&NetnsRef::Path("/run/netns/redirector-no-such-ns".into())).unwrap_err().to_string();
        assert!(e.contains("/etc/netns/redirector-no-such-ns/resolv.conf does not exist"), "{e}");
        let e = resolv_conf_of(&NetnsRef::Path("/proc/self/fd/7".into())).unwrap_err().to_string();
        assert!(e.contains("no resolv.conf is known") && e.contains("dnsServers"), "{e}");
    }
}
