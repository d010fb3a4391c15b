//! A small interpreter of the nat table that `iptables -t nat …` commands
//! build: enough of iptables' matches and targets to run the meshes' rule
//! sets against a connection.
use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
};

use anyhow::{anyhow, bail, Context as _, Result};
use ipnet::Ipv4Net;

use crate::evaluate::{OutboundConn, Protocol};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Jump(String),
    Return,
    Accept,
    Redirect(u16),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Rule {
    /// `-p tcp` / `-p udp`
    protocol: Option<Protocol>,
    dst: Option<Ipv4Net>,
    /// `! -d`
    dst_negated: bool,
    src: Option<Ipv4Net>,
    /// `-o lo`
    out_lo: bool,
    dports: Option<Vec<u16>>,
    /// `! --dport`
    dports_negated: bool,
    uid_owner: Option<u32>,
    /// `! --uid-owner`
    uid_negated: bool,
    gid_owner: Option<u32>,
    /// `! --gid-owner`
    gid_negated: bool,
    target: Option<Target>,
}

/// The nat table built by a list of `iptables -t nat …` commands.
#[derive(Debug, Default)]
pub struct NatTable {
    chains: HashMap<String, Vec<Rule>>,
}

/// Outcome for a locally generated packet through nat OUTPUT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatOutcome {
    Redirect(SocketAddrV4),
    Unchanged,
}

impl NatTable {
    pub fn from_commands(commands: &[String]) -> Result<Self> {
        let mut t = NatTable::default();
        for name in ["PREROUTING", "OUTPUT", "INPUT", "POSTROUTING"] {
            t.chains.insert(name.into(), Vec::new());
        }
        for cmd in commands {
            t.apply(cmd).with_context(|| format!("iptables command {cmd:?}"))?;
        }
        Ok(t)
    }

    fn apply(&mut self, cmd: &str) -> Result<()> {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let rest = match words.as_slice() {
            ["iptables", "-t", "nat", rest @ ..] => rest,
            _ => bail!("not an `iptables -t nat` command"),
        };
        let (op, chain, args) = match rest {
            [op, chain, args @ ..] => (*op, chain.to_string(), args),
            _ => bail!("missing operation or chain"),
        };
        match op {
            "-N" => {
                if self.chains.insert(chain.clone(), Vec::new()).is_some() {
                    bail!("chain {chain} already exists");
                }
                Ok(())
            }
            "-A" | "-I" => {
                // `-I CHAIN N …`: before the Nth rule (1: the front, as
                // `-I CHAIN …`); iptables refuses a position past the end + 1.
                let (position, args) = match args {
                    [n, rest @ ..] if op == "-I" && n.parse::<usize>().is_ok() => (n.parse::<usize>()?, rest),
                    a => (1, a),
                };
                let rule = parse_rule(args)?;
                if let Some(Target::Jump(to)) = &rule.target {
                    if !self.chains.contains_key(to) {
                        bail!("jump to unknown chain {to}");
                    }
                }
                let rules = self.chains.get_mut(&chain).ok_or_else(|| anyhow!("no chain {chain}"))?;
                if op == "-A" {
                    rules.push(rule);
                } else if position == 0 || position > rules.len() + 1 {
                    bail!("index of insertion too big (chain {chain} has {} rules)", rules.len());
                } else {
                    rules.insert(position - 1, rule);
                }
                Ok(())
            }
            other => bail!("unsupported operation {other}"),
        }
    }

    /// Walks nat OUTPUT for a connection's first packet. `local` are the
    /// workload's own addresses (a route through `lo`).
    pub fn output(&self, conn: &OutboundConn, local: &BTreeSet<IpAddr>) -> NatOutcome {
        match self.walk("OUTPUT", conn, local, 0) {
            Some(Walk::Redirect(port)) => NatOutcome::Redirect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
            _ => NatOutcome::Unchanged,
        }
    }

    /// Walks nat PREROUTING for an inbound connection's first packet
    /// (REDIRECT keeps the address and changes the port).
    pub fn prerouting(&self, src: Ipv4Addr, dst: SocketAddrV4) -> NatOutcome {
        let conn = OutboundConn { src: Some(IpAddr::V4(src)), ..OutboundConn::tcp(u32::MAX, SocketAddr::V4(dst)) };
        match self.walk("PREROUTING", &conn, &BTreeSet::new(), 0) {
            Some(Walk::Redirect(port)) => NatOutcome::Redirect(SocketAddrV4::new(*dst.ip(), port)),
            _ => NatOutcome::Unchanged,
        }
    }

    fn walk(&self, chain: &str, conn: &OutboundConn, local: &BTreeSet<IpAddr>, depth: usize) -> Option<Walk> {
        assert!(depth < 16, "jump loop");
        for rule in self.chains.get(chain)? {
            if !matches(rule, conn, local) {
                continue;
            }
            match &rule.target {
                None => continue,
                Some(Target::Return) => return None,
                Some(Target::Accept) => return Some(Walk::Accept),
                Some(Target::Redirect(p)) => return Some(Walk::Redirect(*p)),
                Some(Target::Jump(to)) => {
                    if let Some(w) = self.walk(to, conn, local, depth + 1) {
                        return Some(w);
                    }
                }
            }
        }
        None
    }
}

enum Walk {
    Accept,
    Redirect(u16),
}

fn matches(rule: &Rule, conn: &OutboundConn, local: &BTreeSet<IpAddr>) -> bool {
    if rule.protocol.is_some_and(|p| p != conn.protocol) {
        return false;
    }
    let dst = match conn.dst.ip() {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4,
            // The IPv4 table never sees IPv6 packets.
            None => return false,
        },
    };
    if let Some(net) = rule.dst {
        if net.contains(&dst) == rule.dst_negated {
            return false;
        }
    }
    if let Some(net) = rule.src {
        let src = match conn.src {
            Some(IpAddr::V4(v4)) => v4,
            // A dual-stack socket bound to ::ffff:a.b.c.d sends IPv4
            // packets from a.b.c.d.
            Some(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => v6.to_ipv4_mapped().expect("mapped"),
            // Unbound: the kernel picks the source; for a local route that
            // is the route's preferred source (127.0.0.1 for 127/8) or the
            // destination itself.
            _ if dst.is_loopback() => Ipv4Addr::LOCALHOST,
            _ => dst,
        };
        if !net.contains(&src) {
            return false;
        }
    }
    if rule.out_lo && !(dst.is_loopback() || local.contains(&IpAddr::V4(dst))) {
        return false;
    }
    if let Some(ports) = &rule.dports {
        if ports.contains(&conn.dst.port()) == rule.dports_negated {
            return false;
        }
    }
    if let Some(uid) = rule.uid_owner {
        if (conn.uid == uid) == rule.uid_negated {
            return false;
        }
    }
    if let Some(gid) = rule.gid_owner {
        if (conn.gid == gid) == rule.gid_negated {
            return false;
        }
    }
    true
}

fn parse_rule(args: &[&str]) -> Result<Rule> {
    let mut r = Rule::default();
    let mut i = 0;
    let next = |i: &mut usize| -> Result<&str> {
        *i += 1;
        args.get(*i).copied().ok_or_else(|| anyhow!("missing value after {}", args[*i - 1]))
    };
    while i < args.len() {
        match args[i] {
            "-p" => match next(&mut i)? {
                "tcp" => r.protocol = Some(Protocol::Tcp),
                "udp" => r.protocol = Some(Protocol::Udp),
                p => bail!("protocol {p} not modelled"),
            },
            "!" => match next(&mut i)? {
                "-d" => {
                    r.dst = Some(next(&mut i)?.parse().context("! -d")?);
                    r.dst_negated = true;
                }
                "--uid-owner" => {
                    r.uid_owner = Some(next(&mut i)?.parse().context("! --uid-owner")?);
                    r.uid_negated = true;
                }
                "--gid-owner" => {
                    r.gid_owner = Some(next(&mut i)?.parse().context("! --gid-owner")?);
                    r.gid_negated = true;
                }
                "--dport" => {
                    r.dports = Some(vec![next(&mut i)?.parse().context("! --dport")?]);
                    r.dports_negated = true;
                }
                "--dports" => {
                    r.dports =
                        Some(next(&mut i)?.split(',').map(|p| p.parse().context("! --dports")).collect::<Result<_>>()?);
                    r.dports_negated = true;
                }
                o => bail!("negation of {o} not modelled"),
            },
            "-d" => r.dst = Some(next(&mut i)?.parse().context("-d")?),
            "-s" => r.src = Some(next(&mut i)?.parse().context("-s")?),
            "-o" => match next(&mut i)? {
                "lo" => r.out_lo = true,
                o => bail!("output interface {o} not modelled"),
            },
            "--dport" => r.dports = Some(vec![next(&mut i)?.parse().context("--dport")?]),
            "--dports" => {
                r.dports = Some(next(&mut i)?.split(',').map(|p| p.parse().context("--dports")).collect::<Result<_>>()?)
            }
            "-m" | "--match" => match next(&mut i)? {
                "owner" | "multiport" | "tcp" => {}
                m => bail!("match {m} not modelled"),
            },
            "--uid-owner" => r.uid_owner = Some(next(&mut i)?.parse().context("--uid-owner")?),
            "--gid-owner" => r.gid_owner = Some(next(&mut i)?.parse().context("--gid-owner")?),
            "-j" => {
                r.target = Some(match next(&mut i)? {
                    "RETURN" => Target::Return,
                    "ACCEPT" => Target::Accept,
                    "REDIRECT" => Target::Redirect(0),
                    chain => Target::Jump(chain.to_string()),
                })
            }
            "--to-port" | "--to-ports" => {
                let p = next(&mut i)?.parse().context("--to-port")?;
                r.target = Some(Target::Redirect(p));
            }
            other => bail!("option {other} not modelled"),
        }
        i += 1;
    }
    Ok(r)
}
