//! `redirector bench`: new-connection cost through the outbound and inbound
//! paths, measured side by side in one run under three setups, alternated
//! round by round so drift hits all three alike:
//!
//! - `none`: the client dials the proxy's port itself (no redirection);
//! - `iptables`: osm-init's rule set (seed 004) in the workload namespace;
//! - `redirector`: the agent.
//!
//! Each setup has its own namespaces with the same servers; clients are
//! single-threaded and bounded in time. Only loopback, veth and
//! documentation addresses inside our own namespaces are used.
use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use redirector::{
    config::parse_config,
    iptables::osm_init_commands,
    policy::compile,
    testkit::{self, AgentProcess, PinDir, Topology},
};
use serde::Serialize;

const SETUPS: [&str; 3] = ["none", "iptables", "redirector"];

#[derive(Serialize, Clone, Default)]
struct Stats {
    connections: usize,
    errors: usize,
    rate_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

#[derive(Serialize)]
struct Scenario {
    name: String,
    /// Excluded CIDRs in the policy (iptables: one rule each).
    excluded_cidrs: usize,
    setups: Vec<(String, Stats)>,
    /// redirector/none and redirector/iptables for the connection rate.
    ratio_vs_none: f64,
    ratio_vs_iptables: f64,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    kernel: String,
    rounds: usize,
    seconds_per_round: f64,
    scenarios: Vec<Scenario>,
}

/// A proxy stand-in with a blocking accept loop (the test servers poll
/// every 2 ms, which would be all a latency figure measured); answers as
/// the test proxy does ([`testkit::proxy_answer`]).
struct BenchProxy {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    wake: SocketAddr,
    netns: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BenchProxy {
    fn start(netns: &Path, addr: SocketAddr) -> Result<Self> {
        use std::{io::Write as _, sync::atomic::Ordering};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let file = std::fs::File::open(netns)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let l = redirector::netns::enter_netns(&file)
                .and_then(|()| std::net::TcpListener::bind(addr).with_context(|| format!("bind {addr}")));
            let l = match l {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            for s in l.incoming() {
                if s2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut s) = s else { continue };
                let _ = s.write_all(testkit::proxy_answer(&s).as_bytes());
            }
        });
        rx.recv().map_err(|_| anyhow::anyhow!("proxy thread died"))??;
        let wake = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port());
        Ok(Self { stop, wake, netns: netns.to_owned(), thread: Some(thread) })
    }
}

impl Drop for BenchProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let wake = self.wake;
        // As root: never redirected (the proxy UID check is for 1500, but
        // 127.0.0.1 always passes), so this reaches the loop and ends it.
        let woke = testkit::in_netns_as(&self.netns, 0, move || TcpStream::connect_timeout(&wake, Duration::from_secs(1)));
        if let (Ok(Ok(_)), Some(t)) = (woke, self.thread.take()) {
            let _ = t.join();
        }
    }
}

/// One setup's namespaces, servers and (for redirector) agent.
struct Setup {
    // Dropped in this order: the proxies end while their namespace exists.
    _servers: Vec<BenchProxy>,
    topo: Topology,
    agent: Option<(AgentProcess, PinDir, PathBuf)>,
}

fn config(netns: &Path, cidrs: usize) -> String {
    let list: Vec<String> = excluded(cidrs).iter().map(|c| format!("\"{c}\"")).collect();
    format!(
        "mesh:\n  outboundIPRangeExclusionList: [{}]\nworkloads:\n  - name: bench\n    netns: {}\n",
        list.join(", "),
        netns.display()
    )
}

/// `n` distinct /32s in 198.18.128.0/17, none of them a destination we dial.
fn excluded(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("198.18.{}.{}/32", 128 + (i / 250) % 128, 1 + i % 250)).collect()
}

/// `iptables-restore` input for osm-init's commands (thousands of rules
/// one command at a time would take minutes: each rewrites the table).
fn restore_input(commands: &[String]) -> String {
    let mut chains = Vec::new();
    let mut rules = Vec::new();
    for c in commands {
        let rule = c.strip_prefix("iptables -t nat ").unwrap_or(c);
        match rule.strip_prefix("-N ") {
            Some(chain) => chains.push(format!(":{chain} - [0:0]")),
            None => rules.push(rule.to_string()),
        }
    }
    format!("*nat\n{}\n{}\nCOMMIT\n", chains.join("\n"), rules.join("\n"))
}

impl Setup {
    fn start(kind: &str, tag: &str, cidrs: usize, cgroup: &Path) -> Result<Self> {
        let t = Instant::now();
        let r = Self::start_inner(kind, tag, cidrs, cgroup);
        eprintln!("bench: {kind} ready in {:.1}s", t.elapsed().as_secs_f64());
        r
    }

    fn start_inner(kind: &str, tag: &str, cidrs: usize, cgroup: &Path) -> Result<Self> {
        let topo = Topology::new(tag)?;
        let app = topo.app.path();
        // The redirector workload's proxy lives in the agent's cgroup, as a
        // pod's does: its sockets' hooks (sockops, getsockopt) run there.
        let cg = (kind == "redirector").then_some(cgroup);
        let servers = in_cgroup(cg, || -> Result<Vec<BenchProxy>> {
            Ok(vec![BenchProxy::start(&app, "127.0.0.1:15001".parse()?)?, BenchProxy::start(&app, "0.0.0.0:15003".parse()?)?])
        })??;
        let cfg_text = config(&app, cidrs);
        let mut agent = None;
        match kind {
            "none" => {}
            "iptables" => {
                let cfg = parse_config(&cfg_text)?;
                let policy = compile(&cfg.mesh, &cfg.workloads[0].annotations);
                let file = std::env::temp_dir().join(testkit::unique("redirector-bench-rules-"));
                std::fs::write(&file, restore_input(&osm_init_commands(&policy)))?;
                let r = topo.app.exec(&["iptables-restore", &file.display().to_string()]);
                let _ = std::fs::remove_file(&file);
                r.context("loading osm-init's rules with iptables-restore")?;
            }
            _ => {
                let pins = PinDir::new()?;
                let dir = std::env::temp_dir().join(testkit::unique("redirector-bench-"));
                std::fs::create_dir_all(&dir)?;
                let cfg = dir.join("config.yaml");
                std::fs::write(&cfg, &cfg_text)?;
                let bin = std::env::current_exe()?;
                let mut a = AgentProcess::start(&bin, &cfg, cgroup, &pins.path, &dir.join("agent.log"))?;
                a.wait_ready(&bin, &pins.path, &app)?;
                agent = Some((a, pins, dir));
            }
        }
        Ok(Self { topo, _servers: servers, agent })
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some((mut a, _pins, dir)) = self.agent.take() {
            a.stop();
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Connect, read the proxy's one-line answer, close; for `secs` seconds.
/// `redirected`: the proxy must also have read an original destination
/// (with no redirection it has none to read).
fn hammer(netns: &Path, dst: SocketAddr, secs: f64, redirected: bool) -> Result<Vec<Duration>> {
    let lat = testkit::in_netns_as(netns, 1000, move || {
        let mut v = Vec::new();
        let mut errors = 0usize;
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let mut buf = [0u8; 128];
        while Instant::now() < end && errors < 100 {
            let t = Instant::now();
            let ok = (|| -> std::io::Result<()> {
                let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(1))?;
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                let n = s.read(&mut buf)?;
                // "proxy <original destination>": the proxy read it back.
                if n == 0 || !buf.starts_with(b"proxy ") || (redirected && buf[..n].windows(3).any(|w| w == b"no-")) {
                    return Err(std::io::Error::other("not answered by the proxy"));
                }
                Ok(())
            })();
            match ok {
                Ok(()) => v.push(t.elapsed()),
                Err(_) => errors += 1,
            }
        }
        (v, errors)
    })?;
    if lat.1 > 0 {
        bail!("{} connection(s) to {dst} failed", lat.1);
    }
    Ok(lat.0)
}

fn stats(samples: &mut [Duration], seconds: f64) -> Stats {
    samples.sort();
    let q = |p: f64| samples.get(((samples.len() as f64 - 1.0) * p) as usize).map_or(0.0, |d| d.as_secs_f64() * 1e6);
    Stats {
        connections: samples.len(),
        errors: 0,
        rate_per_s: samples.len() as f64 / seconds,
        p50_us: q(0.5),
        p99_us: q(0.99),
    }
}

/// The process joins `cgroup` for the redirector rounds (the agent's
/// programs are attached there) and goes back for the others.
fn in_cgroup<T>(cgroup: Option<&Path>, f: impl FnOnce() -> T) -> Result<T> {
    let Some(cg) = cgroup else { return Ok(f()) };
    let root = redirector::sysfs::cgroup2_root()?;
    let here = std::fs::read_to_string("/proc/self/cgroup")?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(|p| root.join(p.trim_start_matches('/'))))
        .unwrap_or_else(|| root.clone());
    let pid = std::process::id().to_string();
    std::fs::write(cg.join("cgroup.procs"), &pid).context("joining the bench cgroup")?;
    let r = f();
    if std::fs::write(here.join("cgroup.procs"), &pid).is_err() {
        std::fs::write(root.join("cgroup.procs"), &pid).context("leaving the bench cgroup")?;
    }
    Ok(r)
}

pub fn run(quick: bool, out: &Path) -> Result<()> {
    let (rounds, secs) = if quick { (2, 0.5) } else { (5, 2.0) };
    let sizes: &[usize] = if quick { &[0, 1000] } else { &[0, 10, 100, 1000, 10000] };
    std::fs::create_dir_all(out)?;
    let root = redirector::sysfs::cgroup2_root()?;
    let cgroup = root.join(testkit::unique("redirector-bench-"));
    std::fs::create_dir(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    let result = (|| -> Result<Vec<Scenario>> {
        let mut scenarios = Vec::new();
        for &n in sizes {
            eprintln!("bench: {n} excluded CIDRs: starting the three setups");
            let setups: Vec<Setup> = SETUPS
                .iter()
                .enumerate()
                .map(|(i, kind)| Setup::start(kind, &format!("b{i}"), n, &cgroup))
                .collect::<Result<_>>()?;
            for path in ["outbound", "inbound"] {
                let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); 3];
                for _ in 0..rounds {
                    for (i, s) in setups.iter().enumerate() {
                        let pod = testkit::addrs::POD_IP;
                        let (ns, dst): (PathBuf, SocketAddr) = match (path, SETUPS[i]) {
                            ("outbound", "none") => (s.topo.app.path(), "127.0.0.1:15001".parse()?),
                            ("outbound", _) => (s.topo.app.path(), "192.0.2.10:80".parse()?),
                            (_, "none") => (s.topo.peer.path(), format!("{pod}:15003").parse()?),
                            _ => (s.topo.peer.path(), format!("{pod}:8080").parse()?),
                        };
                        let cg = (SETUPS[i] == "redirector").then_some(cgroup.as_path());
                        let lat = in_cgroup(cg, || hammer(&ns, dst, secs, SETUPS[i] != "none"))??;
                        samples[i].extend(lat);
                    }
                }
                let total = secs * rounds as f64;
                let st: Vec<Stats> = samples.iter_mut().map(|s| stats(s, total)).collect();
                let sc = Scenario {
                    name: format!("{path} new connections, {n} excluded CIDRs"),
                    excluded_cidrs: n,
                    ratio_vs_none: st[2].rate_per_s / st[0].rate_per_s,
                    ratio_vs_iptables: st[2].rate_per_s / st[1].rate_per_s,
                    setups: SETUPS.iter().map(|s| s.to_string()).zip(st).collect(),
                };
                println!("{}", row(&sc));
                scenarios.push(sc);
            }
        }
        Ok(scenarios)
    })();
    for _ in 0..50 {
        if std::fs::remove_dir(&cgroup).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let scenarios = result?;
    let report = Report {
        machine: format!("{} cores", std::thread::available_parallelism().map_or(0, |n| n.get())),
        kernel: redirector::probe::kernel_release(),
        rounds,
        seconds_per_round: secs,
        scenarios,
    };
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&report)?)?;
    let md = markdown(&report);
    std::fs::write(out.join("results.md"), &md)?;
    println!("\n{md}\nwritten: {}/results.json, results.md", out.display());
    Ok(())
}

/// One results row, as printed while running and in `results.md`.
fn row(s: &Scenario) -> String {
    let c = |st: &Stats| format!("{:.0} ({:.0}/{:.0})", st.rate_per_s, st.p50_us, st.p99_us);
    format!(
        "| {} | {} | {} | {} | {:.2} | {:.2} |",
        s.name,
        c(&s.setups[0].1),
        c(&s.setups[1].1),
        c(&s.setups[2].1),
        s.ratio_vs_none,
        s.ratio_vs_iptables
    )
}

fn markdown(r: &Report) -> String {
    let mut o = format!(
        "Kernel {}, {}; {} alternating rounds of {} s per setup; single-threaded client.\n\n",
        r.kernel, r.machine, r.rounds, r.seconds_per_round
    );
    o.push_str("| scenario | none conn/s (p50/p99 µs) | iptables conn/s (p50/p99 µs) | redirector conn/s (p50/p99 µs) | redirector/none | redirector/iptables |\n|---|---|---|---|---|---|\n");
    for s in &r.scenarios {
        o.push_str(&row(s));
        o.push('\n');
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_input_keeps_every_rule_and_declares_chains() {
        let cmds = vec![
            "iptables -t nat -N PROXY_OUTPUT".to_string(),
            "iptables -t nat -A OUTPUT -p tcp -j PROXY_OUTPUT".to_string(),
            "iptables -t nat -I PROXY_OUTPUT -d 198.18.128.1/32 -j RETURN".to_string(),
        ];
        let r = restore_input(&cmds);
        assert!(r.starts_with("*nat\n:PROXY_OUTPUT - [0:0]\n"), "{r}");
        assert!(r.contains("-I PROXY_OUTPUT -d 198.18.128.1/32 -j RETURN") && r.ends_with("COMMIT\n"), "{r}");
    }

    #[test]
    fn excluded_cidrs_are_distinct_and_avoid_the_destinations() {
        let v = excluded(10000);
        let set: std::collections::BTreeSet<_> = v.iter().collect();
        assert_eq!(set.len(), 10000);
        assert!(v.iter().all(|c| c.starts_with("198.18.") && !c.starts_with("198.18.0.")));
    }
}
