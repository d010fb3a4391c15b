//! Kernel integration tests: real sockets, real programs, real iptables.
//! Run as root with `--test-threads=1` (they move the test process into a
//! test cgroup): `cargo xtask test` does. As any other user every test
//! skips, printing a `SKIP` line, so a plain `cargo test --workspace` is
//! green without privileges. Each test uses its own namespaces, cgroup and
//! pin dir and removes them on the way out, also when it fails.
//!
//! One module per topic; this file holds what they share (the managed
//! agent, the iptables workload, the differential driver, waiting):
//! [`differential`] (against the meshes' iptables rules), [`dual_stack`],
//! [`lifecycle`] (changes, restarts, upgrades, the gate), [`pin_dir`] (one
//! agent per pin directory, pins removed under an agent, the attach
//! cgroup, bpffs), [`connections`],
//! [`coexistence`] (a socket load balancer on a parent cgroup),
//! [`identity`] (proxy by cgroup), [`original_dst`] (conntrack's answers
//! for connections nothing redirected, and for a proxy that accepts late),
//! [`full_maps`], [`sockmap`], [`kube`]
//! (the Kubernetes agent against a fake API server), [`runtimes`] (the
//! node's namespace, real runtimes' cgroup layouts), [`kernel_support`],
//! [`upgrade`] (across a map-layout change).
use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use redirector::dataplane::Maps;
use redirector_policy::{
    compile,
    oracle::{oracle_commands, osm_init_script},
    parse_config,
};
use redirector_testkit::{self as testkit, AgentProcess, PinDir, Proto, Server, TestCgroup, Topology};

mod coexistence;
mod connections;
mod differential;
mod dns;
mod dual_stack;
mod full_maps;
mod identity;
mod kernel_support;
mod kube;
mod lifecycle;
mod original_dst;
mod pin_dir;
mod runtimes;
mod shared_lists;
mod sockmap;
mod upgrade;

const BIN: &str = env!("CARGO_BIN_EXE_redirector");

/// The agent binary: cargo's, or `REDIRECTOR_BIN` where the tests run
/// away from the build tree (the kernel-VM guest).
fn bin() -> &'static Path {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| std::env::var_os("REDIRECTOR_BIN").map_or_else(|| PathBuf::from(BIN), PathBuf::from))
}

/// Root and bpffs are required; a kernel without the data path's
/// features makes the caller skip (false), with a `SKIP` line that the
/// kernel-VM runner counts. `unsupported_kernel_is_refused_clearly`
/// checks what the agent says on such a kernel.
#[must_use]
fn require_kernel() -> bool {
    if !privileged() {
        return false;
    }
    testkit::ensure_bpffs().expect("bpffs");
    let missing = missing_features();
    if !missing.is_empty() {
        let name = std::thread::current().name().unwrap_or("?").to_string();
        // Straight to the stream, past libtest's capture, for the VM runner.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIP {name}: kernel {} lacks {}",
            redirector::sys::features::kernel_release(),
            missing.join(", ")
        );
    }
    missing.is_empty()
}

/// Whether this process may run kernel tests (root); otherwise the caller
/// skips, with a `SKIP` line naming the test and the way to run it.
fn privileged() -> bool {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        return true;
    }
    let name = std::thread::current().name().unwrap_or("?").to_string();
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "SKIP {name}: kernel tests attach eBPF programs and need root (run `cargo xtask test`)"
    );
    false
}

fn missing_features() -> Vec<String> {
    static MISSING: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    MISSING
        .get_or_init(|| {
            redirector::sys::features::probe()
                .into_iter()
                .filter(|f| f.required && !f.supported)
                .map(|f| format!("{} (Linux {})", f.name, f.since))
                .collect()
        })
        .clone()
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(testkit::unique(&format!("redirector-{tag}-")));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A workload managed by a running agent.
struct Managed {
    topo: Topology,
    agent: AgentProcess,
    pins: PinDir,
    config: PathBuf,
    _proxy: Option<Server>,
    _early: Vec<Server>,
    _cgroup: TestCgroup,
    dir: PathBuf,
    /// `<test cgroup>/proxy`, for configs naming `{proxy_cgroup}`.
    proxy_cg: PathBuf,
}

impl Managed {
    fn start(tag: &str, config_template: &str) -> Managed {
        Self::start_on(Topology::new(tag).unwrap(), config_template)
    }

    fn start_on(topo: Topology, config_template: &str) -> Managed {
        Self::start_with(topo, config_template, |_| Vec::new())
    }

    /// `before_agent` starts servers inside the workload's cgroup (as a
    /// pod's processes are) but before the agent runs.
    fn start_with(
        topo: Topology,
        config_template: &str,
        before_agent: impl FnOnce(&Topology) -> Vec<Server>,
    ) -> Managed {
        Self::start_full(topo, config_template, before_agent, true)
    }

    /// `default_proxy`: start the answering proxy on 127.0.0.1:15001
    /// (tests with their own proxies pass false).
    fn start_full(
        topo: Topology,
        config_template: &str,
        before_agent: impl FnOnce(&Topology) -> Vec<Server>,
        default_proxy: bool,
    ) -> Managed {
        let tag = topo.app.name.clone();
        let tag = tag.as_str();
        let cgroup = TestCgroup::new().unwrap();
        let early = before_agent(&topo);
        let pins = PinDir::new().unwrap();
        let proxy = default_proxy.then(|| Server::proxy(&topo.app.path(), "127.0.0.1:15001".parse().unwrap()).unwrap());
        let dir = tmpdir(tag);
        let config = dir.join("config.yaml");
        let proxy_cg = cgroup.path.join("proxy");
        std::fs::create_dir_all(&proxy_cg).unwrap();
        std::fs::write(
            &config,
            render(config_template, &topo.app.path()).replace("{proxy_cgroup}", &proxy_cg.display().to_string()),
        )
        .unwrap();
        let agent = AgentProcess::start(bin(), &config, &cgroup.path, &pins.path, &dir.join("agent.log")).unwrap();
        agent.wait_ready(bin(), &pins.path, &topo.app.path()).unwrap();
        Managed { topo, agent, pins, config, _proxy: proxy, _early: early, _cgroup: cgroup, dir, proxy_cg }
    }

    fn write_config(&self, template: &str) {
        let text =
            render(template, &self.topo.app.path()).replace("{proxy_cgroup}", &self.proxy_cg.display().to_string());
        write_atomically(&self.config, &text);
    }

    /// Runs `f` with this whole (single-threaded test) process moved into
    /// `<test cgroup>/proxy`, as the proxy container's processes are.
    fn in_proxy_cgroup<T>(&self, f: impl FnOnce() -> T) -> T {
        std::fs::write(self.proxy_cg.join("cgroup.procs"), std::process::id().to_string()).unwrap();
        let out = f();
        std::fs::write(self._cgroup.path.join("cgroup.procs"), std::process::id().to_string()).unwrap();
        out
    }

    fn probe(&self, uid: u32, dst: &str) -> String {
        testkit::probe(&self.topo.app.path(), uid, Proto::Tcp, dst.parse().unwrap()).unwrap()
    }

    /// Probes until `pred` holds (the agent polls its file every 100 ms).
    fn probe_until(&self, uid: u32, dst: &str, pred: impl Fn(&str) -> bool) -> String {
        poll_until(|| self.probe(uid, dst), |g| pred(g))
    }

    /// Waits until the agent's log mentions `needle`; fails with the log.
    fn wait_for_log(&self, needle: &str, what: &str) {
        let log = poll_until(|| self.agent.log_text(), |l| l.contains(needle));
        assert!(log.contains(needle), "{what} not reported:\n{log}");
    }
}

/// Calls `f` every 50 ms until `done` holds or 60 s pass (an emulated
/// kernel-VM guest is slow); returns the last value.
/// Replaces a config file the way an atomic editor or a ConfigMap update
/// does (write beside it, rename over it), so the agent's poll never reads
/// a half-written file: `fs::write` truncates first, and a poll between
/// the truncation and the write saw an empty config (no workloads) and
/// unprogrammed the workload (seen once on the 7.3 VM).
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn poll_until<T>(mut f: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = f();
        if done(&v) || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// List entries of any policy id other than `live` (ids, as `port N` and
/// `cidr /bits` descriptions), polled until there are none or the poll
/// deadline passes: an agent deletes replaced entries in the same pass
/// as the switch, just after it, so a reader can see them for a moment.
fn settled_stale_entries(maps: &Maps, live: Option<u32>) -> Vec<String> {
    poll_until(
        || {
            let ports = maps.port_keys().unwrap().into_iter().filter(|k| Some(k.policy_id) != live);
            let cidrs =
                maps.cidr_keys().unwrap().into_iter().filter(|(_, d)| Some(u32::from_be_bytes(d.policy_id_be)) != live);
            ports
                .map(|k| format!("policy {} port {}", k.policy_id, k.port))
                .chain(cidrs.map(|(bits, d)| format!("policy {} cidr /{bits}", u32::from_be_bytes(d.policy_id_be))))
                .collect::<Vec<_>>()
        },
        |stale| stale.is_empty(),
    )
}

impl Drop for Managed {
    fn drop(&mut self) {
        self.agent.stop();
        let _ = std::fs::remove_dir(&self.proxy_cg);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn render(template: &str, netns: &Path) -> String {
    template.replace("{netns}", &netns.display().to_string())
}

/// A namespace programmed with the osm-init command line for the same
/// config (the seed's behaviour), with the same servers and proxy.
struct IptablesWorkload {
    topo: Topology,
    _proxy: Server,
}

/// osm-init's rules for `config` in `topo`'s workload namespace.
fn osm_init_in(topo: &Topology, config_template: &str) {
    let cfg = parse_config(&render(config_template, &topo.app.path())).unwrap();
    assert!(cfg.rejected.is_empty(), "{:?}", cfg.rejected);
    let policy = compile(&cfg.mesh, &cfg.workloads[0].annotations);
    topo.app.shell(&osm_init_script(&policy)).expect("osm-init rules");
}

impl IptablesWorkload {
    fn start(tag: &str, config_template: &str) -> Self {
        let topo = Topology::new(tag).unwrap();
        osm_init_in(&topo, config_template);
        let proxy = Server::proxy(&topo.app.path(), "127.0.0.1:15001".parse().unwrap()).unwrap();
        Self { topo, _proxy: proxy }
    }
}

struct Case {
    name: &'static str,
    /// Run from the workload (true) or from the unmanaged peer namespace.
    from_workload: bool,
    uid: u32,
    proto: Proto,
    dst: String,
    /// Expected start of the answer: "proxy <dst>" or "direct …".
    expect: String,
    /// Bind the client to this source address first.
    src: Option<std::net::SocketAddr>,
}

fn case(name: &'static str, uid: u32, dst: impl Into<String>, expect: impl Into<String>) -> Case {
    Case { name, from_workload: true, uid, proto: Proto::Tcp, dst: dst.into(), expect: expect.into(), src: None }
}

fn differential(config: &str, cases: &[Case]) {
    differential_with(config, cases, false)
}

/// With `coexisting`, osm-init's rules are in redirector's namespace too
/// (a pod injected before the switch, programmed by the agent as well).
fn differential_with(config: &str, cases: &[Case], coexisting: bool) {
    if !require_kernel() {
        return;
    }
    let ipt = IptablesWorkload::start("i", config);
    let bpf = Managed::start("b", config);
    if coexisting {
        osm_init_in(&bpf.topo, config);
    }
    let mut failures = Vec::new();
    for c in cases {
        let dst: SocketAddrV4 = c.dst.parse().unwrap();
        let run = |topo: &Topology| {
            let ns = if c.from_workload { topo.app.path() } else { topo.peer.path() };
            testkit::probe(&ns, c.uid, c.proto, dst.into()).unwrap()
        };
        let want = run(&ipt.topo);
        let got = run(&bpf.topo);
        let line = format!("{:<34} iptables: {want:<52} redirector: {got}", c.name);
        println!("{line}");
        if want != got || !got.starts_with(&c.expect) {
            failures.push(format!("{line}   (expected to start with {:?})", c.expect));
        }
    }
    assert!(
        failures.is_empty(),
        "redirector differs from the osm-init rules:\n{}\nagent log:\n{}",
        failures.join("\n"),
        bpf.agent.log_text()
    );
    // Every redirected connection has closed: no original-destination
    // entry may be left behind.
    let left = poll_until(|| Maps::open(&bpf.pins.path).unwrap().tracked_connections().unwrap().len(), |n| *n == 0);
    assert_eq!(left, 0, "original-destination entries outlived their sockets");
}

const EXCLUSIONS: &str = r#"
mesh:
  proxyUID: 1500
  outboundPort: 15001
  inboundPort: 15003
  outboundIPRangeExclusionList: ["198.51.100.0/24"]
  outboundPortExclusionList: [6379]
  inboundPortExclusionList: [9090]
workloads:
  - name: app
    netns: {netns}
    annotations:
      openservicemesh.io/outbound-port-exclusion-list: "7070"
      openservicemesh.io/outbound-ip-range-exclusion-list: "203.0.113.0/25"
      openservicemesh.io/outbound-ip-range-inclusion-list: ""
      openservicemesh.io/inbound-port-exclusion-list: ""
"#;

const INBOUND: &str = r#"
mesh:
  inboundPortExclusionList: [9090]
workloads:
  - name: app
    netns: {netns}
    annotations:
      openservicemesh.io/inbound-port-exclusion-list: "7070"
"#;

/// Extra servers in the workload for the inbound cases: the application's
/// own ports (which the proxy must stand in front of, or not).
fn app_servers(topo: &Topology) -> Vec<Server> {
    [7070u16, 9090, 15010, 15903]
        .into_iter()
        .map(|p| Server::tcp(&topo.app.path(), std::net::SocketAddr::from(([0, 0, 0, 0], p))).unwrap())
        .collect()
}
