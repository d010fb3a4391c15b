//! The setups a scenario runs under, each in namespaces of its own: the
//! workload topology of [`testkit::Topology`], a proxy stand-in on the
//! outbound and inbound ports and, for `iptables`, osm-init's rule set or,
//! for `redirector` and `sockmap`, a running agent (the latter with
//! `mesh.acceleration: sockmap`, in the established-traffic scenario).
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _, Result};
use redirector::sys::bpf::{self, AttachType};
use redirector_policy::{compile, oracle::osm_init_commands, parse_config, Policy};
use redirector_testkit::{self as testkit, AgentProcess, PinDir, Topology};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The client dials the proxy's port itself.
    None,
    /// osm-init's rule set in the workload namespace.
    Iptables,
    /// The agent.
    Redirector,
    /// The agent with `mesh.acceleration: sockmap`.
    Sockmap,
}

pub const KINDS: [Kind; 3] = [Kind::None, Kind::Iptables, Kind::Redirector];
/// Established traffic also compares the sockmap acceleration.
pub const ESTABLISHED_KINDS: [Kind; 4] = [Kind::None, Kind::Iptables, Kind::Redirector, Kind::Sockmap];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::None => "none",
            Kind::Iptables => "iptables",
            Kind::Redirector => "redirector",
            Kind::Sockmap => "sockmap",
        }
    }

    /// Whether a redirector agent runs this setup.
    pub fn has_agent(self) -> bool {
        matches!(self, Kind::Redirector | Kind::Sockmap)
    }
}

/// The outbound exclusions of a scenario's policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exclusions {
    pub cidrs: usize,
    pub ports: usize,
    /// Also exclude [`PROBE_PORT`]: the control-plane scenario flips this.
    pub probe_port: bool,
}

/// A port the peer namespace answers on with a blocking accept loop
/// ([`ProxyMode::Direct`]), for the control-plane probes.
pub const PROBE_PORT: u16 = 9080;

/// What the proxy stand-in does with an accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// Writes `proxy <original destination>` and closes (new connections).
    Answer,
    /// Writes the same line, then serves the connection on a thread of its
    /// own: the client's first byte chooses `E` (echo everything back) or
    /// `S` (read to EOF, then answer the byte count as a u64, big-endian).
    Stream,
    /// A remote server: writes `direct <local address>` and closes.
    Direct,
}

/// The workload's config for the agent (and, compiled, for osm-init).
pub fn config(netns: &Path, excl: Exclusions) -> String {
    config_with(netns, excl, false)
}

/// [`config`], with `mesh.acceleration: sockmap` if `accel`.
pub fn config_with(netns: &Path, excl: Exclusions, accel: bool) -> String {
    let quote = |v: Vec<String>| v.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ");
    let mut ports: Vec<String> = excluded_ports(excl.ports).iter().map(u16::to_string).collect();
    if excl.probe_port {
        ports.push(PROBE_PORT.to_string());
    }
    format!(
        "mesh:\n{}  outboundIPRangeExclusionList: [{}]\n  outboundPortExclusionList: [{}]\nworkloads:\n  - name: bench\n    netns: {}\n",
        if accel { "  acceleration: sockmap\n" } else { "" },
        quote(excluded_cidrs(excl.cidrs)),
        ports.join(", "),
        netns.display()
    )
}

/// The policy the agent derives from [`config`] (what osm-init is given).
pub fn policy(excl: Exclusions) -> Result<Policy> {
    let cfg = parse_config(&config(Path::new("/run/netns/bench"), excl)).context("the bench's own config")?;
    Ok(compile(&cfg.mesh, &cfg.workloads[0].annotations))
}

/// `n` distinct /32s in 198.18.128.0/17, none of them a destination we dial.
pub fn excluded_cidrs(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("198.18.{}.{}/32", 128 + (i / 250) % 128, 1 + i % 250)).collect()
}

/// `n` distinct ports from 20000 up (none of the ports we dial or listen on).
pub fn excluded_ports(n: usize) -> Vec<u16> {
    (0..n).map(|i| 20000 + i as u16).collect()
}

/// `iptables-restore` input for osm-init's commands (thousands of rules
/// one command at a time would take minutes: each rewrites the table).
pub fn restore_input(commands: &[String]) -> String {
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

/// Rules osm-init's set has in `PROXY_OUTPUT` for the exclusions (one per
/// CIDR, one `multiport` rule per 15 ports).
pub fn outbound_exclusion_rules(policy: &Policy) -> usize {
    osm_init_commands(policy).iter().filter(|c| c.contains("-I PROXY_OUTPUT")).count()
}

/// A proxy stand-in with a blocking accept loop (the test servers poll
/// every 2 ms, which would be all a latency figure measured); answers as
/// the test proxy does ([`testkit::proxy_answer`]).
pub struct BenchProxy {
    stop: Arc<AtomicBool>,
    wake: SocketAddr,
    netns: PathBuf,
    /// The accept loop's thread id, for pinning it to a CPU.
    pub tid: i32,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BenchProxy {
    pub fn start(netns: &Path, addr: SocketAddr, mode: ProxyMode) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let file = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let l = redirector::sys::netns::enter_netns(&file)
                .and_then(|()| std::net::TcpListener::bind(addr).with_context(|| format!("bind {addr}")));
            let l = match l {
                Ok(l) => {
                    // SAFETY: gettid has no preconditions.
                    let _ = tx.send(Ok(unsafe { libc::gettid() }));
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
                let line = match mode {
                    ProxyMode::Direct => {
                        format!("direct {}\n", s.local_addr().map(|a| a.to_string()).unwrap_or_default())
                    }
                    _ => testkit::proxy_answer(&s),
                };
                let answered = s.write_all(line.as_bytes());
                if mode == ProxyMode::Stream && answered.is_ok() {
                    std::thread::spawn(move || serve_stream(s));
                }
            }
        });
        let tid = rx.recv().map_err(|_| anyhow!("proxy thread for {addr} died before binding"))??;
        let wake = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port());
        Ok(Self { stop, wake, netns: netns.to_owned(), tid, thread: Some(thread) })
    }
}

/// [`ProxyMode::Stream`]: echo or sink, until the client closes.
fn serve_stream(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut mode = [0u8; 1];
    if s.read_exact(&mut mode).is_err() {
        return;
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        total += n as u64;
        if mode[0] == b'E' && s.write_all(&buf[..n]).is_err() {
            return;
        }
    }
    if mode[0] == b'S' {
        let _ = s.write_all(&total.to_be_bytes());
    }
}

impl Drop for BenchProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let wake = self.wake;
        // As root: never redirected (the proxy UID check is for 1500, but
        // 127.0.0.1 always passes), so this reaches the loop and ends it.
        let woke =
            testkit::in_netns_as(&self.netns, 0, move || TcpStream::connect_timeout(&wake, Duration::from_secs(1)));
        if let (Ok(Ok(_)), Some(t)) = (woke, self.thread.take()) {
            let _ = t.join();
        }
    }
}

/// A directory under the temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(testkit::unique(prefix));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running agent of a `redirector` setup.
pub struct Agent {
    // Dropped in this order: the agent stops before its files go.
    pub process: AgentProcess,
    pub pins: PinDir,
    pub config: PathBuf,
    _dir: TempDir,
}

/// How a setup is built.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub excl: Exclusions,
    pub proxy: ProxyMode,
    /// The agent's `--poll-interval` (the control-plane scenario makes it
    /// long so that only its SIGHUP applies a change).
    pub agent_poll: &'static str,
}

impl Spec {
    pub fn new(excl: Exclusions) -> Self {
        Self { excl, proxy: ProxyMode::Answer, agent_poll: "100ms" }
    }
}

/// Where a setup's sockets are made: the agents' attach cgroup, and a
/// clean one for the setups without an agent.
#[derive(Clone, Copy, Debug)]
pub struct Cgroups<'a> {
    pub attach: &'a Path,
    pub clean: &'a Path,
}

/// One setup's namespaces, servers and (for redirector) agent.
pub struct Setup {
    pub kind: Kind,
    // Dropped in this order: the agent stops first, the proxies end while
    // their namespace exists.
    pub agent: Option<Agent>,
    servers: Vec<BenchProxy>,
    pub topo: Topology,
    /// The cgroup its proxy stand-in and its clients make their sockets
    /// in: the agent's attach cgroup (agent setups) or the clean one.
    pub cgroup: PathBuf,
}

impl Setup {
    pub fn start(kind: Kind, tag: &str, spec: Spec, cgroups: Cgroups<'_>) -> Result<Self> {
        super::interrupted()?;
        let t = Instant::now();
        let r = Self::start_inner(kind, tag, spec, cgroups)
            .with_context(|| format!("starting the {} setup ({:?})", kind.name(), spec.excl));
        eprintln!("bench: {} ready in {:.1}s", kind.name(), t.elapsed().as_secs_f64());
        r
    }

    fn start_inner(kind: Kind, tag: &str, spec: Spec, cgroups: Cgroups<'_>) -> Result<Self> {
        let topo = Topology::new(tag)?;
        let app = topo.app.path();
        // The redirector workload's proxy lives in the agent's cgroup, as a
        // pod's does: its sockets' hooks (sockops, getsockopt) run there. A
        // socket keeps the cgroup it was made in, and accepted sockets
        // inherit their listener's (`sk_clone_lock` → `cgroup_sk_clone`),
        // so the listener made in there is enough. The other setups' proxy
        // and clients are in a clean cgroup: none of the agent's programs
        // run for them, and none of whatever the bench was started from.
        let cgroup = if kind.has_agent() { cgroups.attach } else { cgroups.clean };
        let mut servers = in_cgroup(cgroup, || -> Result<Vec<BenchProxy>> {
            Ok(vec![
                BenchProxy::start(&app, "127.0.0.1:15001".parse()?, spec.proxy)?,
                BenchProxy::start(&app, "0.0.0.0:15003".parse()?, spec.proxy)?,
            ])
        })??;
        let probe = SocketAddr::from(([0, 0, 0, 0], PROBE_PORT));
        servers.push(BenchProxy::start(&topo.peer.path(), probe, ProxyMode::Direct)?);
        let mut agent = None;
        match kind {
            Kind::None => {}
            Kind::Iptables => load_osm_init(&topo, spec.excl)?,
            Kind::Redirector | Kind::Sockmap => {
                let pins = PinDir::new()?;
                let dir = TempDir::new("redirector-bench-")?;
                let cfg = dir.0.join("config.yaml");
                std::fs::write(&cfg, config_with(&app, spec.excl, kind == Kind::Sockmap))
                    .with_context(|| format!("writing {}", cfg.display()))?;
                let bin = testkit::agent_binary()?;
                let a = AgentProcess::start_polling(
                    &bin,
                    &cfg,
                    cgroups.attach,
                    &pins.path,
                    &dir.0.join("agent.log"),
                    spec.agent_poll,
                )?;
                // From outside the agent's cgroup (the bench process joins it
                // only for the redirector rounds).
                a.wait_programmed(&bin, &pins.path, &app)?;
                agent = Some(Agent { process: a, pins, config: cfg, _dir: dir });
            }
        }
        Ok(Self { kind, topo, servers, agent, cgroup: cgroup.to_owned() })
    }

    /// The threads of its proxy stand-ins (to pin them to a CPU).
    pub fn proxy_tids(&self) -> Vec<i32> {
        self.servers.iter().map(|s| s.tid).collect()
    }

    /// The agent's resident memory (VmRSS), for redirector setups.
    pub fn agent_rss_kib(&self) -> Option<u64> {
        let a = self.agent.as_ref()?;
        super::sys::proc_field(&format!("/proc/{}/status", a.process.child.id()), "VmRSS").ok()
    }
}

/// Loads osm-init's rules for `excl` into the workload namespace.
pub fn load_osm_init(topo: &Topology, excl: Exclusions) -> Result<()> {
    let file = std::env::temp_dir().join(testkit::unique("redirector-bench-rules-"));
    std::fs::write(&file, restore_input(&osm_init_commands(&policy(excl)?)))
        .with_context(|| format!("writing {}", file.display()))?;
    let r = topo.app.exec(&["iptables-restore", &file.display().to_string()]);
    let _ = std::fs::remove_file(&file);
    r.context("loading osm-init's rules with iptables-restore")?;
    Ok(())
}

/// A cgroup-v2 directory directly below the root, removed on drop: the
/// agents attach to one, the setups without an agent use another (the
/// process joins each only while it makes sockets for it, see
/// [`in_cgroup`]). As siblings they inherit the same programs from the
/// root, so the two differ by the agent's programs alone.
pub struct BenchCgroup {
    pub path: PathBuf,
}

impl BenchCgroup {
    pub fn new(prefix: &str) -> Result<Self> {
        let path = redirector::sys::mounts::cgroup2_root()?.join(testkit::unique(prefix));
        std::fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        // Busy until its last socket is gone.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("bench: could not remove cgroup {}", self.path.display());
    }
}

/// Runs `f` with the process in `cg` (the whole process: cgroup v2 moves
/// all its threads), then moves it back. Sockets made meanwhile stay in
/// `cg` for good.
pub fn in_cgroup<T>(cg: &Path, f: impl FnOnce() -> T) -> Result<T> {
    let root = redirector::sys::mounts::cgroup2_root()?;
    let here = std::fs::read_to_string("/proc/self/cgroup")?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(|p| root.join(p.trim_start_matches('/'))))
        .unwrap_or_else(|| root.clone());
    let pid = std::process::id().to_string();
    std::fs::write(cg.join("cgroup.procs"), &pid)
        .with_context(|| format!("joining the bench cgroup {}", cg.display()))?;
    let r = f();
    if std::fs::write(here.join("cgroup.procs"), &pid).is_err() {
        std::fs::write(root.join("cgroup.procs"), &pid).context("leaving the bench cgroup")?;
    }
    Ok(r)
}

/// The hooks the agent attaches to a cgroup.
const AGENT_HOOKS: [AttachType; 6] = [
    AttachType::Inet4Connect,
    AttachType::Inet6Connect,
    AttachType::SockOps,
    AttachType::GetSockopt,
    AttachType::Inet4Getpeername,
    AttachType::Inet6Getpeername,
];

/// The programs that run, on the agent's hooks, for a socket made in
/// `cgroup` (attached there or above: `BPF_F_QUERY_EFFECTIVE`), as
/// `hook: name (id)` lines; empty for a clean cgroup.
pub fn effective_programs(cgroup: &Path) -> Result<Vec<String>> {
    let dir = std::fs::File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
    let mut out = Vec::new();
    for hook in AGENT_HOOKS {
        for id in bpf::effective_ids(dir.as_fd(), hook)? {
            let name = bpf::prog_by_id(id).and_then(|p| bpf::prog_name(p.as_fd())).unwrap_or_default();
            out.push(format!("{hook:?}: {name} ({id})"));
        }
    }
    Ok(out)
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
        let v = excluded_cidrs(10000);
        let set: std::collections::BTreeSet<_> = v.iter().collect();
        assert_eq!(set.len(), 10000);
        assert!(v.iter().all(|c| c.starts_with("198.18.") && !c.starts_with("198.18.0.")));
    }

    #[test]
    fn excluded_ports_avoid_the_ports_in_use() {
        let v = excluded_ports(1000);
        let set: std::collections::BTreeSet<_> = v.iter().collect();
        assert_eq!(set.len(), 1000);
        for used in [80, 8080, 15000, 15001, 15003, 7070, 6379, PROBE_PORT] {
            assert!(!set.contains(&used));
        }
    }

    #[test]
    fn the_policy_carries_every_exclusion_and_osm_init_one_rule_per_cidr() {
        let p = policy(Exclusions { cidrs: 100, ports: 1000, probe_port: true }).unwrap();
        assert_eq!(p.outbound_ip_range_exclusion.len(), 100);
        assert_eq!(p.outbound_port_exclusion.len(), 1001);
        assert!(p.outbound_port_exclusion.contains(&PROBE_PORT));
        // 100 CIDR rules + ceil(1001 / 15) multiport rules.
        assert_eq!(outbound_exclusion_rules(&p), 100 + 67);
    }
}
