//! Kernel integration tests: real sockets, real programs, real iptables.
//! Run as root with `--test-threads=1` (they move the test process into a
//! test cgroup): `cargo xtask test` does. As any other user every test
//! skips, printing a `SKIP` line, so a plain `cargo test --workspace` is
//! green without privileges. Each test uses its own namespaces, cgroup and
//! pin dir and removes them on the way out, also when it fails.
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

mod full_maps;
mod kube;
mod sockmap;

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
        std::fs::write(&self.config, text).unwrap();
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

impl IptablesWorkload {
    fn start(tag: &str, config_template: &str) -> Self {
        let topo = Topology::new(tag).unwrap();
        let cfg = parse_config(&render(config_template, &topo.app.path())).unwrap();
        assert!(cfg.rejected.is_empty(), "{:?}", cfg.rejected);
        let policy = compile(&cfg.mesh, &cfg.workloads[0].annotations);
        topo.app.shell(&osm_init_script(&policy)).expect("osm-init rules");
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
    if !require_kernel() {
        return;
    }
    let ipt = IptablesWorkload::start("i", config);
    let bpf = Managed::start("b", config);
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

#[test]
fn differential_exclusions_match_osm_init() {
    differential(
        EXCLUSIONS,
        &[
            case("default (uid 1000)", 1000, "192.0.2.10:80", "proxy 192.0.2.10:80"),
            case("other uid (root)", 0, "192.0.2.10:8080", "proxy 192.0.2.10:8080"),
            case("proxy uid 1500", 1500, "192.0.2.10:80", "direct 192.0.2.10:80"),
            case("mesh excluded CIDR", 1000, "198.51.100.10:80", "direct 198.51.100.10:80"),
            case("annotation excluded CIDR", 1000, "203.0.113.10:80", "direct 203.0.113.10:80"),
            case("outside annotation CIDR", 1000, "203.0.113.200:80", "proxy 203.0.113.200:80"),
            case("mesh excluded port", 1000, "192.0.2.10:6379", "direct 192.0.2.10:6379"),
            case("annotation excluded port", 1000, "198.51.100.10:7070", "direct"),
            case("annotation excluded port (2)", 1000, "203.0.113.200:7070", "direct 203.0.113.200:7070"),
            case("admin port 15000 still redirected", 1000, "192.0.2.10:15000", "proxy 192.0.2.10:15000"),
            case("127.0.0.1", 1000, "127.0.0.1:8080", "direct 127.0.0.1:8080"),
            case("127.0.0.2 (only /32 exempt)", 1000, "127.0.0.2:8080", "proxy 127.0.0.2:8080"),
            case("own pod IP", 1000, "198.18.0.1:8080", "proxy 198.18.0.1:8080"),
            Case { proto: Proto::Udp, ..case("UDP untouched", 1000, "192.0.2.10:5353", "direct udp") },
            Case { from_workload: false, ..case("unlisted netns", 1000, "192.0.2.10:80", "direct 192.0.2.10:80") },
        ],
    );
}

#[test]
fn differential_inclusion_list_matches_osm_init() {
    differential(
        r#"
mesh:
  outboundIPRangeInclusionList: ["192.0.2.0/24", "203.0.113.128/25"]
workloads:
  - name: app
    netns: {netns}
    annotations:
      openservicemesh.io/outbound-ip-range-exclusion-list: "203.0.113.200"
"#,
        &[
            case("included", 1000, "192.0.2.10:80", "proxy 192.0.2.10:80"),
            case("not included", 1000, "198.51.100.10:80", "direct 198.51.100.10:80"),
            case("not included (2)", 1000, "203.0.113.10:80", "direct 203.0.113.10:80"),
            case("included but excluded: exclusion wins", 1000, "203.0.113.200:80", "direct 203.0.113.200:80"),
            case("proxy uid", 1500, "192.0.2.10:80", "direct 192.0.2.10:80"),
        ],
    );
}

#[test]
fn live_annotation_change_and_bad_input_keep_last_good_state() {
    if !require_kernel() {
        return;
    }
    let m = Managed::start("l", EXCLUSIONS);
    assert!(m.probe(1000, "192.0.2.10:80").starts_with("proxy 192.0.2.10:80"));

    // A workload whose namespace does not exist is rejected by name; the
    // others are unaffected.
    m.write_config(&format!("{EXCLUSIONS}  - name: ghost\n    netns: /run/netns/redirector-no-such-ns\n"));
    m.wait_for_log("workload `ghost`", "missing netns");
    let log = m.agent.log_text();
    assert!(log.contains("key `netns`: value /run/netns/redirector-no-such-ns"), "{log}");
    assert!(m.probe(1000, "192.0.2.10:80").starts_with("proxy 192.0.2.10:80"));

    // Exclude port 80 by annotation: the next connection follows, no restart.
    m.write_config(&EXCLUSIONS.replace("\"7070\"", "\"7070,80\""));
    let got = m.probe_until(1000, "192.0.2.10:80", |g| g.starts_with("direct"));
    assert!(got.starts_with("direct 192.0.2.10:80"), "{got}\n{}", m.agent.log_text());

    // A bad annotation value: named in the log, the last good policy stays.
    m.write_config(&EXCLUSIONS.replace("\"7070\"", "\"7070,http\""));
    m.wait_for_log("\"7070,http\"", "bad value");
    let log = m.agent.log_text();
    assert!(log.contains("workload `app`") && log.contains("outbound-port-exclusion-list"), "{log}");
    assert!(m.probe(1000, "192.0.2.10:80").starts_with("direct"), "last good policy lost");
    let got = m.probe(1000, "192.0.2.10:8080");
    assert!(got.starts_with("proxy"), "last good policy lost: {got}\n{}", m.agent.log_text());

    // Broken YAML: rejected as a whole, state untouched.
    m.write_config("mesh: [not, a, map");
    m.wait_for_log("keeping the last good configuration", "bad YAML");
    assert!(m.probe(1000, "192.0.2.10:8080").starts_with("proxy"));

    // Fixed again: back to the original policy.
    m.write_config(EXCLUSIONS);
    let got = m.probe_until(1000, "192.0.2.10:80", |g| g.starts_with("proxy"));
    assert!(got.starts_with("proxy 192.0.2.10:80"), "{got}");

    // Workload removed from the config: no longer redirected.
    m.write_config("mesh: {}\nworkloads: []\n");
    let got = m.probe_until(1000, "192.0.2.10:80", |g| g.starts_with("direct"));
    assert!(got.starts_with("direct"), "{got}");
    let maps = Maps::open(&m.pins.path).unwrap();
    assert!(maps.workloads().unwrap().is_empty());
    // The pass that removed the workload deletes its entries right after.
    let stale = settled_stale_entries(&maps, None);
    assert!(stale.is_empty(), "stale entries left: {stale:?}\n{}", m.agent.log_text());
}

#[test]
fn restart_keeps_redirecting_and_cleanup_removes_everything() {
    if !require_kernel() {
        return;
    }
    let mut m = Managed::start("r", EXCLUSIONS);
    assert!(m.probe(1000, "192.0.2.10:80").starts_with("proxy"));

    // SIGKILL: pinned links keep the programs attached and the maps alive.
    m.agent.child.kill().unwrap();
    m.agent.child.wait().unwrap();
    assert!(m.probe(1000, "192.0.2.10:80").starts_with("proxy 192.0.2.10:80"));
    assert!(m.probe(1000, "192.0.2.10:6379").starts_with("direct"));

    // A new agent adopts the pinned maps and replaces the links.
    let mut agent2 =
        AgentProcess::start(bin(), &m.config, &m._cgroup.path, &m.pins.path, &m.dir.join("agent2.log")).unwrap();
    agent2.wait_ready(bin(), &m.pins.path, &m.topo.app.path()).unwrap();
    assert!(m.probe(1000, "192.0.2.10:80").starts_with("proxy 192.0.2.10:80"));
    agent2.stop();

    // `inspect` reads the state back.
    let out =
        std::process::Command::new(bin()).args(["inspect", "--json", "--pin-dir"]).arg(&m.pins.path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["workloads"].as_array().unwrap().len(), 1);
    assert_eq!(v["workloads"][0]["outbound_port_exclusions"], serde_json::json!([6379, 7070]));
    assert!(v["counters"]["redirected"].as_u64().unwrap() >= 3);

    // Attached while pinned (the check below is not vacuous).
    use redirector::sys::bpf::{attached_count, AttachType};
    use std::os::fd::AsFd as _;
    let cg = std::fs::File::open(&m._cgroup.path).unwrap();
    let ns = std::fs::File::open(m.topo.app.path()).unwrap();
    for (name, ty) in redirector::dataplane::PROGRAMS {
        assert!(attached_count(cg.as_fd(), ty).unwrap() >= 1, "{name} not attached");
    }
    assert!(attached_count(ns.as_fd(), AttachType::SkLookup).unwrap() >= 1, "sk_lookup not attached");

    // Cleanup as the uninstall DaemonSet runs it (`cleanup --wait`, done
    // when it says so, exits 0 on SIGTERM): nothing redirected, nothing
    // left pinned.
    let mut cleanup = std::process::Command::new(bin())
        .args(["cleanup", "--wait", "--pin-dir"])
        .arg(&m.pins.path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    let mut out = std::io::BufReader::new(cleanup.stdout.take().unwrap());
    while std::io::BufRead::read_line(&mut out, &mut said).unwrap() > 0 && !said.contains("waiting for SIGTERM") {}
    assert!(said.contains("cleanup done"), "{said}");
    assert!(cleanup.try_wait().unwrap().is_none(), "cleanup --wait did not wait");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(cleanup.id() as i32, libc::SIGTERM) };
    assert!(cleanup.wait().unwrap().success());
    assert!(!m.pins.path.exists(), "pin directory left behind");
    // (The kernel may free the last link reference a moment later.)
    let got = m.probe_until(1000, "192.0.2.10:80", |a| a.starts_with("direct"));
    assert!(got.starts_with("direct 192.0.2.10:80"), "{got}");
    // Nothing attached to the cgroup or to the workload's namespace.
    for (name, ty) in redirector::dataplane::PROGRAMS {
        assert_eq!(attached_count(cg.as_fd(), ty).unwrap(), 0, "{name} still attached to the cgroup");
    }
    assert_eq!(attached_count(ns.as_fd(), AttachType::SkLookup).unwrap(), 0, "sk_lookup still attached");
}

/// Outcome counts of a connection load.
#[derive(Debug, Default)]
struct LoadCounts {
    proxied: u64,
    direct: u64,
    failed: u64,
    errors: Vec<String>,
}

/// Connects from `netns` as `uid` to `dst` in a loop until `stop`, each
/// connection reading the one-line answer (about 1 ms apart: a few hundred
/// connections per second, bounded by `stop`).
fn connection_load(
    netns: &Path,
    uid: u32,
    dst: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<LoadCounts> {
    let file = std::fs::File::open(netns).unwrap();
    std::thread::spawn(move || {
        use std::io::Read as _;
        redirector::sys::netns::enter_netns(&file).unwrap();
        // SAFETY: raw syscalls change only this thread's credentials.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setresgid, uid, uid, uid), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
        }
        let mut c = LoadCounts::default();
        let want = format!("proxy {dst}");
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let r = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2)).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut text = String::new();
                s.read_to_string(&mut text)?;
                Ok(text)
            });
            match r {
                Ok(t) if t.starts_with(&want) => c.proxied += 1,
                Ok(t) if t.starts_with("direct") => c.direct += 1,
                Ok(t) => {
                    c.failed += 1;
                    c.errors.push(format!("answer {t:?}"));
                }
                Err(e) => {
                    c.failed += 1;
                    c.errors.push(e.to_string());
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        c
    })
}

/// The agent killed (SIGKILL, also right after it started, i.e. in the
/// middle of loading and programming), stopped (SIGTERM) and restarted,
/// over and over, under a steady connection load: not one connection
/// fails and not one reaches its destination around the proxy.
#[test]
fn restarts_under_load_lose_no_connection() {
    if !require_kernel() {
        return;
    }
    let mut m = Managed::start("u", EXCLUSIONS);
    // The changed build: the same programs with connect4/6 also counting
    // `upgrade_test_build` (redirector-ebpf's `upgrade-test` feature).
    let upgrade_object = m.dir.join("redirector-ebpf-upgrade-test");
    std::fs::write(&upgrade_object, testkit::UPGRADE_TEST_OBJECT).unwrap();
    let upgrade_env = [(redirector::dataplane::EBPF_OBJECT_ENV, upgrade_object.as_os_str())];
    use redirector_common::counter::{REDIRECTED, UPGRADE_TEST_BUILD};
    let upgrade_count = |m: &Managed| Maps::open(&m.pins.path).unwrap().counter(UPGRADE_TEST_BUILD).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = connection_load(&m.topo.app.path(), 1000, "192.0.2.10:80".parse().unwrap(), stop.clone());
    let started = Instant::now();
    let mut restarts = Vec::new();
    let mut round = 0;
    // At least 10 s and eight restarts (a slow emulated kernel needs longer
    // for eight); never more than 120 s. Round 4 upgrades to the changed
    // build, round 5 goes back to this one.
    while (started.elapsed() < Duration::from_secs(10) || restarts.len() < 8)
        && started.elapsed() < Duration::from_secs(120)
    {
        std::thread::sleep(Duration::from_millis(700));
        round += 1;
        let how = match round {
            4 => "SIGTERM, upgrade to changed programs",
            5 => "SIGTERM, back to this build",
            _ => match round % 3 {
                0 => "SIGTERM",
                1 => "SIGKILL",
                _ => "SIGKILL mid-start",
            },
        };
        if how.starts_with("SIGTERM") {
            m.agent.stop();
        } else {
            m.agent.child.kill().unwrap();
            m.agent.child.wait().unwrap();
        }
        let log = m.dir.join(format!("agent-{round}.log"));
        let env: &[(&str, &std::ffi::OsStr)] = if round == 4 { &upgrade_env } else { &[] };
        let start = |log: &Path| {
            AgentProcess::start_with_env(bin(), &m.config, &m._cgroup.path, &m.pins.path, log, "100ms", env).unwrap()
        };
        let before = upgrade_count(&m);
        m.agent = start(&log);
        if how == "SIGKILL mid-start" {
            std::thread::sleep(Duration::from_millis(30));
            m.agent.child.kill().unwrap();
            m.agent.child.wait().unwrap();
            m.agent = start(&log);
        }
        m.agent.wait_ready(bin(), &m.pins.path, &m.topo.app.path()).unwrap();
        match round {
            // The changed programs are the ones now running...
            4 => {
                let now = poll_until(|| upgrade_count(&m), |n| *n > before);
                assert!(now > before, "the upgraded connect programs never ran\n{}", m.agent.log_text());
                assert!(m.agent.log_text().contains(redirector::dataplane::EBPF_OBJECT_ENV), "{}", m.agent.log_text());
            }
            // ...until this build replaces them again: the count stops.
            5 => {
                let sample = || {
                    let maps = Maps::open(&m.pins.path).unwrap();
                    (maps.counter(UPGRADE_TEST_BUILD).unwrap(), maps.counter(REDIRECTED).unwrap())
                };
                let (stopped, redirecting) = poll_until(
                    || {
                        let a = sample();
                        std::thread::sleep(Duration::from_millis(300));
                        let b = sample();
                        (a.0 == b.0, b.1 > a.1)
                    },
                    |(stopped, redirecting)| *stopped && *redirecting,
                );
                assert!(
                    stopped && redirecting,
                    "the changed programs still run after going back (stopped {stopped}, redirecting {redirecting})"
                );
            }
            _ => {}
        }
        restarts.push(how);
    }
    assert!(upgrade_count(&m) > 0);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let c = load.join().unwrap();
    println!(
        "restarts under load: {} restarts ({:?}), {} connections proxied, {} direct, {} failed in {:?}",
        restarts.len(),
        restarts,
        c.proxied,
        c.direct,
        c.failed,
        started.elapsed()
    );
    assert!(restarts.len() >= 8, "{restarts:?}");
    assert!(c.proxied > 0);
    assert_eq!(
        (c.failed, c.direct),
        (0, 0),
        "errors: {:?}\nagent log:\n{}",
        &c.errors[..c.errors.len().min(10)],
        m.agent.log_text()
    );
    // Nothing accumulated: the tracked-connection map is back to empty.
    let left = poll_until(|| Maps::open(&m.pins.path).unwrap().tracked_connections().unwrap().len(), |n| *n == 0);
    assert_eq!(left, 0, "original-destination entries outlived their sockets");
}

/// Reads the one-line answer from a connected raw socket.
fn read_answer(fd: libc::c_int) -> String {
    let mut buf = [0u8; 256];
    let mut out = Vec::new();
    loop {
        // SAFETY: reading into a local buffer from a socket we own.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        out.extend_from_slice(&buf[..n as usize]);
        if out.ends_with(b"\n") {
            break;
        }
    }
    String::from_utf8_lossy(&out).trim().to_string()
}

fn sockaddr4(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

/// Original-destination entries live exactly as long as their sockets:
/// after hundreds of thousands of redirected connections (opened, answered,
/// closed, from two threads), the tracking map is back to its baseline.
/// `REDIRECTOR_CHURN_CONNECTIONS` sets the count (default 200,000; the
/// kernel-VM runner, under emulation, uses fewer).
#[test]
fn connection_churn_leaves_no_tracking_entries() {
    if !require_kernel() {
        return;
    }
    let total: u64 = std::env::var("REDIRECTOR_CHURN_CONNECTIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let m = Managed::start("h", EXCLUSIONS);
    let tracked = || Maps::open(&m.pins.path).unwrap().tracked_connections().unwrap().len();
    let baseline = tracked();
    let started = Instant::now();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let file = std::fs::File::open(m.topo.app.path()).unwrap();
            std::thread::spawn(move || {
                use std::io::Read as _;
                redirector::sys::netns::enter_netns(&file).unwrap();
                // SAFETY: raw syscalls change only this thread's credentials.
                unsafe {
                    assert_eq!(libc::syscall(libc::SYS_setresgid, 1000, 1000, 1000), 0);
                    assert_eq!(libc::syscall(libc::SYS_setresuid, 1000, 1000, 1000), 0);
                }
                let dst: std::net::SocketAddr = "192.0.2.10:80".parse().unwrap();
                let (mut proxied, mut other) = (0u64, Vec::new());
                for _ in 0..total / 2 {
                    let r = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2)).and_then(|mut s| {
                        let mut t = String::new();
                        s.read_to_string(&mut t)?;
                        Ok(t)
                    });
                    match r {
                        Ok(t) if t.starts_with("proxy 192.0.2.10:80") => proxied += 1,
                        Ok(t) => other.push(t),
                        Err(e) => other.push(e.to_string()),
                    }
                }
                (proxied, other)
            })
        })
        .collect();
    let (mut proxied, mut other) = (0, Vec::new());
    for w in workers {
        let (p, o) = w.join().unwrap();
        proxied += p;
        other.extend(o);
    }
    let elapsed = started.elapsed();
    let left = poll_until(tracked, |n| *n == baseline);
    println!("connection churn: {proxied} of {total} proxied in {elapsed:?}; tracking entries {baseline} before, {left} after");
    assert!(other.is_empty(), "{} connections not proxied, e.g. {:?}", other.len(), &other[..other.len().min(5)]);
    assert_eq!(proxied, total / 2 * 2);
    assert_eq!(left, baseline, "original-destination entries outlived their sockets");
}

/// A full map refuses the change cleanly: the agent names the map and its
/// capacity, the workload keeps its previous policy (connections behave
/// as before), the partly written generation is swept, and `inspect`
/// shows the fill level.
#[test]
fn full_port_map_refuses_the_change_and_keeps_the_policy() {
    if !require_kernel() {
        return;
    }
    // Every port included, every port but one excluded, both directions:
    // 2 x 65,535 + 2 x 65,534 = 262,138 entries, within the 262,144
    // capacity; a changed policy needs a second generation of that size.
    let all_but =
        |skip: u16| (1..=65535u16).filter(|p| *p != skip).map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    let config = |skip: u16| {
        format!(
            "mesh:\n  outboundPortExclusionList: [{0}]\n  inboundPortExclusionList: [{0}]\n  outboundPortInclusionList: [{1}]\n  inboundPortInclusionList: [{1}]\nworkloads:\n  - name: app\n    netns: {{netns}}\n",
            all_but(skip),
            all_but(0)
        )
    };
    let m = Managed::start("f", &config(80));
    let ports = || Maps::open(&m.pins.path).unwrap().port_keys().unwrap().len();
    let before = ports();
    assert!(before > 260_000, "{before}");
    // Port 80 is the one port not excluded: redirected.
    assert!(m.probe(1000, "192.0.2.10:80").starts_with("proxy 192.0.2.10:80"));
    assert!(m.probe(1000, "192.0.2.10:8080").starts_with("direct"));
    m.write_config(&config(8080));
    m.wait_for_log("RDR_PORTS is full (capacity 262144)", "the full port map");
    // The previous policy stays in force, whole; the failed generation is gone.
    assert!(m.probe(1000, "192.0.2.10:80").starts_with("proxy 192.0.2.10:80"));
    assert!(m.probe(1000, "192.0.2.10:8080").starts_with("direct"));
    let after = poll_until(ports, |n| *n == before);
    assert_eq!(after, before, "the partly written generation was not swept");
    let out =
        std::process::Command::new(bin()).args(["inspect", "--json", "--pin-dir"]).arg(&m.pins.path).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fill = v["maps"].as_array().unwrap().iter().find(|f| f["name"] == "RDR_PORTS").unwrap().clone();
    assert_eq!((fill["entries"].as_u64(), fill["capacity"].as_u64()), (Some(before as u64), Some(262_144)), "{fill}");
}

/// Socket-API paths into connect(): non-blocking connect, a socket that
/// connects, disconnects (AF_UNSPEC) and connects again elsewhere, and TCP
/// Fast Open (`sendto(MSG_FASTOPEN)`, no connect() call at all). Each must
/// reach the proxy with its own original destination.
#[test]
fn nonblocking_reconnect_and_fastopen_are_redirected() {
    if !require_kernel() {
        return;
    }
    let m = Managed::start("s", EXCLUSIONS);
    let results = testkit::in_netns_as(&m.topo.app.path(), 1000, || {
        let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let first = sockaddr4("192.0.2.10:80".parse().unwrap());
        let second = sockaddr4("192.0.2.10:8080".parse().unwrap());
        let mut out = Vec::new();
        // SAFETY: plain socket syscalls on sockets this closure owns.
        unsafe {
            // Non-blocking connect: EINPROGRESS, then writable.
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
            let rc = libc::connect(fd, (&first as *const libc::sockaddr_in).cast(), len);
            let errno = std::io::Error::last_os_error().raw_os_error();
            let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
            libc::poll(&mut pfd, 1, 2000);
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
            out.push((
                "non-blocking connect",
                format!("rc {rc} errno {errno:?}: {}", read_answer(fd)),
                "proxy 192.0.2.10:80",
            ));
            libc::close(fd);

            // connect, AF_UNSPEC disconnect, connect to another destination.
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            libc::connect(fd, (&first as *const libc::sockaddr_in).cast(), len);
            let a1 = read_answer(fd);
            let unspec = libc::sockaddr { sa_family: libc::AF_UNSPEC as libc::sa_family_t, sa_data: [0; 14] };
            let rc = libc::connect(fd, &unspec, size_of::<libc::sockaddr>() as libc::socklen_t);
            let rc2 = libc::connect(fd, (&second as *const libc::sockaddr_in).cast(), len);
            let err2 = std::io::Error::last_os_error();
            let a2 = if rc2 == 0 { read_answer(fd) } else { format!("second connect failed: {err2}") };
            out.push(("connect #1", a1, "proxy 192.0.2.10:80"));
            out.push(("disconnect + connect #2", format!("unspec rc {rc}; {a2}"), "proxy 192.0.2.10:8080"));
            libc::close(fd);

            // TCP Fast Open: the destination comes with the first data.
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            let msg = b"hello";
            let rc = libc::sendto(
                fd,
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_FASTOPEN,
                (&first as *const libc::sockaddr_in).cast(),
                len,
            );
            let err = std::io::Error::last_os_error();
            let a = if rc >= 0 { read_answer(fd) } else { format!("sendto failed: {err}") };
            out.push(("sendto(MSG_FASTOPEN)", a, "proxy 192.0.2.10:80"));
            libc::close(fd);
        }
        out
    })
    .unwrap();
    let mut bad = Vec::new();
    for (what, got, want) in &results {
        println!("{what:<26} {got}");
        if !got.contains(want) {
            bad.push(format!("{what}: {got} (expected {want})"));
        }
    }
    assert!(bad.is_empty(), "{}\nagent log:\n{}", bad.join("\n"), m.agent.log_text());
}

/// The map contents of one workload without its policy id: what the
/// policy says, whatever generation it was written under.
fn entries_fingerprint(
    w: redirector_common::WorkloadPolicy,
    ports: &[redirector_common::PortKey],
    cidrs: &[(u32, redirector_common::CidrData)],
) -> String {
    let mut w = w;
    w.policy_id = 0;
    // Sorted and de-duplicated: walking a hash map while the agent writes
    // it restarts the walk when the current key is deleted, so a key can be
    // seen twice (never skipped).
    let mut p: Vec<(u16, u8)> = ports.iter().map(|k| (k.port, k.kind)).collect();
    p.sort_unstable();
    p.dedup();
    let mut c: Vec<(u32, u8, [u8; 16])> = cidrs.iter().map(|(len, d)| (*len, d.kind, d.addr)).collect();
    c.sort_unstable();
    c.dedup();
    format!("{w:?} {p:?} {c:?}")
}

/// The workload's entries as pinned now, read consistently (retried if a
/// new generation was switched in while the lists were read).
fn pinned_fingerprint(pins: &Path, cookie: u64) -> Option<String> {
    let maps = Maps::open(pins).ok()?;
    for _ in 0..20 {
        let w = maps.workload(cookie).ok()??;
        let ports: Vec<_> = maps.port_keys().ok()?.into_iter().filter(|k| k.policy_id == w.policy_id).collect();
        let cidrs: Vec<_> = maps
            .cidr_keys()
            .ok()?
            .into_iter()
            .filter(|(_, d)| u32::from_be_bytes(d.policy_id_be) == w.policy_id)
            .collect();
        if maps.workload(cookie).ok()?.map(|x| x.policy_id) == Some(w.policy_id) {
            return Some(entries_fingerprint(w, &ports, &cidrs));
        }
    }
    None
}

/// A config for the workload with random lists, sometimes invalid (bad
/// ports or CIDRs in the mesh or in an annotation, or broken YAML).
fn random_config(rng: &mut u64, netns: &Path) -> String {
    let mut next = |n: u64| {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng % n
    };
    const PORTS: [&str; 9] = ["80", "443", "6379", "7070", "8080", "9090", "15000", "99999", "http"];
    const CIDRS: [&str; 6] =
        ["198.51.100.0/24", "203.0.113.0/25", "192.0.2.128/25", "2001:db8::/48", "10.0.0.0/33", "nope"];
    let mut pick = |pool: &[&str], bad_from: usize| -> Vec<String> {
        let n = next(4);
        (0..n)
            .map(|_| {
                // Invalid items are rarer than valid ones.
                let i = next(pool.len() as u64 * 4) as usize % pool.len();
                let i = if i >= bad_from && next(3) != 0 { i - bad_from } else { i };
                pool[i].to_string()
            })
            .collect()
    };
    let mesh_ports = pick(&PORTS, 7);
    let mesh_cidrs = pick(&CIDRS, 4);
    let ann_ports = pick(&PORTS, 7);
    let ann_cidrs = pick(&CIDRS, 4);
    let quote = |v: &[String]| v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(", ");
    if next(50) == 0 {
        return "mesh: [\n".into();
    }
    format!(
        "mesh:\n  outboundPortExclusionList: [{}]\n  outboundIPRangeExclusionList: [{}]\nworkloads:\n  - name: app\n    netns: {}\n    annotations:\n      openservicemesh.io/outbound-port-exclusion-list: {:?}\n      openservicemesh.io/outbound-ip-range-exclusion-list: {:?}\n",
        quote(&mesh_ports),
        quote(&mesh_cidrs),
        netns.display(),
        ann_ports.join(","),
        ann_cidrs.join(",")
    )
}

/// Thousands of random config changes, valid and invalid, as fast as the
/// file can be rewritten, with SIGHUPs: the agent never dies, the pinned
/// state always equals some configuration that was given (never half of
/// one), and it ends equal to the last one.
#[test]
fn random_change_stream_ends_with_exactly_the_final_state() {
    if !require_kernel() {
        return;
    }
    let mut m = Managed::start("z", EXCLUSIONS);
    let app = m.topo.app.path();
    let cookie = redirector::sys::netns::netns_cookie(&app).unwrap();
    let fingerprint_of = |text: &str| -> Option<String> {
        let cfg = parse_config(text).ok()?;
        let w = cfg.workloads.first()?;
        let e = redirector_policy::map_entries(&compile(&cfg.mesh, &w.annotations), 0);
        Some(entries_fingerprint(e.workload, &e.ports, &e.cidrs))
    };
    let mut given: std::collections::BTreeSet<String> = fingerprint_of(&render(EXCLUSIONS, &app)).into_iter().collect();
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let (mut valid, mut invalid, mut samples) = (0, 0, 0);
    let mut last_valid = String::new();
    for i in 0..3000 {
        let text = random_config(&mut rng, &app);
        match fingerprint_of(&text) {
            Some(f) => {
                given.insert(f);
                valid += 1;
                last_valid = text.clone();
            }
            None => invalid += 1,
        }
        std::fs::write(&m.config, &text).unwrap();
        if i % 3 == 0 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(m.agent.child.id() as i32, libc::SIGHUP) };
        }
        if i % 100 == 0 {
            // Whatever is pinned is one whole configuration that was given.
            if let Some(f) = pinned_fingerprint(&m.pins.path, cookie) {
                samples += 1;
                assert!(given.contains(&f), "pinned state matches no given configuration: {f}\n{}", m.agent.log_text());
            }
        }
    }
    assert!(m.agent.child.try_wait().unwrap().is_none(), "agent died:\n{}", m.agent.log_text());
    std::fs::write(&m.config, &last_valid).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(m.agent.child.id() as i32, libc::SIGHUP) };
    let want = fingerprint_of(&last_valid).unwrap();
    let got = poll_until(|| pinned_fingerprint(&m.pins.path, cookie), |f| f.as_deref() == Some(want.as_str()));
    println!(
        "random change stream: {valid} valid and {invalid} invalid configs, {samples} mid-stream samples all whole"
    );
    assert_eq!(got.as_deref(), Some(want.as_str()), "final state differs\n{}", m.agent.log_text());
    assert!(m.agent.child.try_wait().unwrap().is_none(), "agent died");
    // Nothing of earlier generations is left (the pass that switched the
    // workload deletes the replaced entries right after the switch, so the
    // check waits for that pass to finish).
    let maps = Maps::open(&m.pins.path).unwrap();
    let id = maps.workload(cookie).unwrap().unwrap().policy_id;
    let stale = settled_stale_entries(&maps, Some(id));
    assert!(stale.is_empty(), "stale entries of earlier generations: {stale:?}\n{}", m.agent.log_text());
}

const PROXY_BY_CGROUP: &str = r#"
mesh:
  proxyUID: 1500
workloads:
  - name: app
    netns: {netns}
    proxyCgroup: {proxy_cgroup}
"#;

/// The proxy identified by its cgroup: an application process that runs as
/// the proxy's UID 1500 is still redirected (no UID-spoof bypass), and the
/// proxy's own connections go direct whatever their UID. The UID mode (the
/// iptables behaviour) is shown for contrast.
#[test]
fn proxy_identified_by_cgroup_cannot_be_spoofed_by_uid() {
    if !require_kernel() {
        return;
    }
    let m = Managed::start("g", PROXY_BY_CGROUP);
    let dst = "192.0.2.10:80";
    let app_as_proxy_uid = m.probe(1500, dst);
    let app = m.probe(1000, dst);
    let (proxy, proxy_other_uid) = m.in_proxy_cgroup(|| (m.probe(1500, dst), m.probe(1000, dst)));
    println!("app uid 1500: {app_as_proxy_uid}\napp uid 1000: {app}\nproxy cgroup uid 1500: {proxy}\nproxy cgroup uid 1000: {proxy_other_uid}");
    assert!(app_as_proxy_uid.starts_with("proxy 192.0.2.10:80"), "UID spoof bypassed the proxy: {app_as_proxy_uid}");
    assert!(app.starts_with("proxy 192.0.2.10:80"), "{app}");
    assert!(proxy.starts_with("direct"), "the proxy's own connection was redirected: {proxy}");
    assert!(proxy_other_uid.starts_with("direct"), "{proxy_other_uid}");
    let v: serde_json::Value = serde_json::from_slice(
        &std::process::Command::new(bin())
            .args(["inspect", "--json", "--pin-dir"])
            .arg(&m.pins.path)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(v["workloads"][0]["proxy_cgroup_id"].as_u64().unwrap() > 0, "{v}");

    // UID mode (iptables' --uid-owner): the same process is trusted.
    m.write_config("mesh:\n  proxyUID: 1500\nworkloads:\n  - name: app\n    netns: {netns}\n");
    let got = m.probe_until(1500, dst, |g| g.starts_with("direct"));
    assert!(got.starts_with("direct"), "{got}");
    // A proxyCgroup that is not a cgroup: that workload is rejected with
    // the reason, its last good policy stays.
    m.write_config("mesh:\n  proxyUID: 1500\nworkloads:\n  - name: app\n    netns: {netns}\n    proxyCgroup: /proc\n");
    m.wait_for_log("not on a cgroup-v2 file system", "a proxyCgroup outside cgroup2");
    assert!(m.probe(1500, dst).starts_with("direct"));
}

#[test]
fn wait_ready_fails_closed_with_a_clear_message() {
    if !require_kernel() {
        return;
    }
    let m = Managed::start("w", EXCLUSIONS);
    // The peer namespace is not a workload: the gate must not open.
    let out = std::process::Command::new(bin())
        .args(["wait-ready", "--timeout", "1s", "--netns"])
        .arg(m.topo.peer.path())
        .arg("--pin-dir")
        .arg(&m.pins.path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not programmed after"), "{err}");
    // No agent state at all (wrong pin dir): also a clear failure.
    let out = std::process::Command::new(bin())
        .args(["wait-ready", "--timeout", "300ms", "--pin-dir", "/sys/fs/bpf/redirector-nonexistent"])
        .arg("--netns")
        .arg(m.topo.app.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is the agent running"), "{err}");
}

#[test]
fn workload_given_by_pid_is_redirected() {
    if !require_kernel() {
        return;
    }
    let topo = Topology::new("p").unwrap();
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let _proxy = Server::proxy(&topo.app.path(), "127.0.0.1:15001".parse().unwrap()).unwrap();
    // A process living in the workload namespace (like a pod's pause container).
    let mut holder =
        std::process::Command::new("ip").args(["netns", "exec", &topo.app.name, "sleep", "60"]).spawn().unwrap();
    let dir = tmpdir("p");
    let config = dir.join("config.yaml");
    std::fs::write(&config, format!("workloads:\n  - name: by-pid\n    pid: {}\n", holder.id())).unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let agent = AgentProcess::start(bin(), &config, &cgroup.path, &pins.path, &dir.join("agent.log")).unwrap();
        agent.wait_ready(bin(), &pins.path, &topo.app.path()).unwrap();
        let got = testkit::probe(&topo.app.path(), 1000, Proto::Tcp, "192.0.2.10:80".parse().unwrap()).unwrap();
        assert!(got.starts_with("proxy 192.0.2.10:80"), "{got}\n{}", agent.log_text());
    }));
    let _ = holder.kill();
    let _ = holder.wait();
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn sighup_reapplies_the_config() {
    if !require_kernel() {
        return;
    }
    let topo = Topology::new("h").unwrap();
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let _proxy = Server::proxy(&topo.app.path(), "127.0.0.1:15001".parse().unwrap()).unwrap();
    let dir = tmpdir("h");
    let config = dir.join("config.yaml");
    std::fs::write(&config, render(EXCLUSIONS, &topo.app.path())).unwrap();
    // File polling effectively off: only SIGHUP can make the agent re-read.
    let mut agent =
        AgentProcess::start_polling(bin(), &config, &cgroup.path, &pins.path, &dir.join("agent.log"), "60m").unwrap();
    agent.wait_ready(bin(), &pins.path, &topo.app.path()).unwrap();
    let probe = || testkit::probe(&topo.app.path(), 1000, Proto::Tcp, "192.0.2.10:80".parse().unwrap()).unwrap();
    assert!(probe().starts_with("proxy"));
    std::fs::write(&config, render(&EXCLUSIONS.replace("\"7070\"", "\"80\""), &topo.app.path())).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGHUP) };
    let got = poll_until(probe, |g| g.starts_with("direct"));
    assert!(got.starts_with("direct 192.0.2.10:80"), "{got}\n{}", agent.log_text());
    assert!(agent.log_text().contains("SIGHUP"));
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

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

#[test]
fn differential_inbound_matches_osm_init() {
    if !require_kernel() {
        return;
    }
    // Reference: osm-init's PREROUTING rules in one namespace...
    let reference = IptablesWorkload::start("ri", INBOUND);
    let _ref_in = Server::proxy(&reference.topo.app.path(), "0.0.0.0:15003".parse().unwrap()).unwrap();
    let _ref_apps = app_servers(&reference.topo);
    // ...redirector in another, the inbound proxy listening before the
    // agent starts (found in /proc, not by sockops).
    let m = Managed::start_with(Topology::new("mi").unwrap(), INBOUND, |t| {
        let mut v = app_servers(t);
        v.push(Server::proxy(&t.app.path(), "0.0.0.0:15003".parse().unwrap()).unwrap());
        v
    });
    let pod = testkit::addrs::POD_IP;
    let cases: &[(&str, u16, bool)] = &[
        ("application port, from the peer", 8080, true),
        ("mesh inboundPortExclusionList", 9090, true),
        ("pod annotation inbound-port-exclusion-list", 7070, true),
        ("reserved 15010", 15010, true),
        ("reserved 15903", 15903, true),
        ("the inbound port itself", 15003, true),
        ("nothing listening", 4444, true),
    ];
    let mut failures = Vec::new();
    for (name, port, _) in cases {
        let dst: std::net::SocketAddr = format!("{pod}:{port}").parse().unwrap();
        let want = testkit::probe(&reference.topo.peer.path(), 0, Proto::Tcp, dst).unwrap();
        let got = testkit::probe(&m.topo.peer.path(), 0, Proto::Tcp, dst).unwrap();
        // Peers differ only in the client port; compare the reply.
        let reply = |s: &str| s.split(" | ").next().unwrap_or("").to_string();
        if reply(&want) != reply(&got) {
            failures.push(format!("{name}: iptables {want:?}, redirector {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}\n{}", m.agent.log_text());
    // The headline case explicitly: the proxy saw the pod address and port.
    let got = testkit::probe(&m.topo.peer.path(), 0, Proto::Tcp, format!("{pod}:8080").parse().unwrap()).unwrap();
    assert!(got.starts_with(&format!("proxy {pod}:8080")), "{got}");
    // The proxy forwarding to the application (proxy UID, own pod IP) is
    // neither outbound- nor inbound-redirected: no loop.
    let got = m.probe(1500, &format!("{pod}:8080"));
    assert!(got.starts_with(&format!("direct {pod}:8080")), "{got}");
    let maps = Maps::open(&m.pins.path).unwrap();
    assert_eq!(maps.listener_keys().unwrap().len(), 1, "pre-existing listener not captured");
    let snap = redirector::inspect::snapshot(&m.pins.path).unwrap();
    let w = &snap.workloads[0];
    assert!(w.inbound_enabled && w.sk_lookup_attached, "inspect: inbound capture not shown as attached");
    assert_eq!(w.inbound_listeners, vec!["IPv4"]);
    let fill = snap.maps.iter().find(|f| f.name == "RDR_LISTENERS").unwrap();
    assert_eq!(fill.entries, 1, "inspect counts listeners");
    assert_eq!(w.inbound_port_exclusions, vec![7070, 9090, 15010, 15901, 15902, 15903, 15904]);
}

const DUAL_STACK: &str = r#"
mesh:
  outboundIPRangeExclusionList: ["2001:db8:2::/64", "203.0.113.0/25"]
workloads:
  - name: app
    netns: {netns}
"#;

#[test]
fn ipv6_and_v4_mapped_are_redirected_without_bypass() {
    if !require_kernel() {
        return;
    }
    let topo = Topology::new("v6").unwrap();
    // IPv6 on the veth (no DAD wait), remotes on the peer's lo.
    let (link, plink) = (topo.app_link.clone(), topo.peer_link.clone());
    topo.app.exec(&["ip", "addr", "add", "2001:db8::1/64", "dev", link.trim(), "nodad"]).unwrap();
    topo.app.exec(&["ip", "-6", "route", "add", "default", "via", "2001:db8::2"]).unwrap();
    topo.peer.exec(&["ip", "addr", "add", "2001:db8::2/64", "dev", plink.trim(), "nodad"]).unwrap();
    for a in ["2001:db8:1::10/128", "2001:db8:2::10/128"] {
        topo.peer.exec(&["ip", "addr", "add", a, "dev", "lo"]).unwrap();
    }
    let ap = topo.app.path();
    let _remote = Server::tcp(&topo.peer.path(), "[::]:9443".parse().unwrap()).unwrap();
    let m = Managed::start_with(topo, DUAL_STACK, |t| {
        vec![
            Server::tcp(&t.app.path(), "[::1]:8081".parse().unwrap()).unwrap(),
            Server::proxy(&t.app.path(), "[::1]:15001".parse().unwrap()).unwrap(),
        ]
    });
    // The inbound proxy starts after the agent: sockops registers it.
    let _in6 = Server::proxy(&ap, "[::]:15003".parse().unwrap()).unwrap();

    let got = m.probe(1000, "[2001:db8:1::10]:9443");
    assert!(got.starts_with("proxy [2001:db8:1::10]:9443 | peer [2001:db8:1::10]:9443"), "IPv6 outbound: {got}");
    let got = m.probe(1000, "[2001:db8:2::10]:9443");
    assert!(got.starts_with("direct [2001:db8:2::10]:9443"), "IPv6 CIDR exclusion: {got}");
    // IPv4-mapped: decided as the IPv4 address, sent to ::ffff:127.0.0.1,
    // the proxy asks SOL_IP; the application still sees what it dialed.
    let got = m.probe(1000, "[::ffff:192.0.2.10]:80");
    assert!(got.starts_with("proxy 192.0.2.10:80 | peer [::ffff:192.0.2.10]:80"), "v4-mapped: {got}");
    let got = m.probe(1000, "[::ffff:203.0.113.10]:80");
    assert!(got.starts_with("direct"), "v4-mapped must not bypass... nor be redirected when excluded: {got}");
    let got = m.probe(1000, "[::ffff:127.0.0.1]:8080");
    assert!(got.starts_with("direct"), "v4-mapped 127.0.0.1 is 127.0.0.1: {got}");
    let got = m.probe(1000, "[::1]:8081");
    assert!(got.starts_with("direct [::1]:8081"), "::1 is like 127.0.0.1: {got}");
    let got = m.probe(1500, "[2001:db8:1::10]:9443");
    assert!(got.starts_with("direct"), "proxy UID over IPv6: {got}");
    // Inbound over IPv6 and (dual-stack listener) IPv4.
    let got = poll_until(
        || testkit::probe(&m.topo.peer.path(), 0, Proto::Tcp, "[2001:db8::1]:8080".parse().unwrap()).unwrap(),
        |g| g.starts_with("proxy"),
    );
    assert!(got.starts_with("proxy [2001:db8::1]:8080"), "IPv6 inbound: {got}\n{}", m.agent.log_text());
    let pod = testkit::addrs::POD_IP;
    let got = testkit::probe(&m.topo.peer.path(), 0, Proto::Tcp, format!("{pod}:8080").parse().unwrap()).unwrap();
    assert!(got.starts_with(&format!("proxy {pod}:8080")), "IPv4 inbound to a [::] proxy: {got}");

    // An IPv6 inclusion list, applied live: only 2001:db8:1::/64 goes to
    // the proxy, in either family nothing else does.
    m.write_config(DUAL_STACK_INCLUSION);
    // (192.0.2.10 was redirected under the previous config: wait for it.)
    let got = m.probe_until(1000, "192.0.2.10:80", |g| g.starts_with("direct"));
    assert!(got.starts_with("direct"), "IPv4 outside an IPv6-only inclusion list: {got}");
    let got = m.probe(1000, "[2001:db8:2::10]:9443");
    assert!(got.starts_with("direct"), "outside the IPv6 inclusion list: {got}");
    let got = m.probe(1000, "[2001:db8:1::10]:9443");
    assert!(got.starts_with("proxy [2001:db8:1::10]:9443"), "inside the IPv6 inclusion list: {got}");
    let got = m.probe(1000, "[::ffff:192.0.2.10]:80");
    assert!(got.starts_with("direct"), "v4-mapped outside the inclusion list: {got}");
}

const DUAL_STACK_INCLUSION: &str = r#"
mesh:
  outboundIPRangeInclusionList: ["2001:db8:1::/64"]
workloads:
  - name: app
    netns: {netns}
"#;

/// The pod's service address in the dialect suites (a ClusterIP stand-in).
const SERVICE: &str = "192.0.2.50:80";

/// A sidecar pod: application servers, the pilot-agent (15020) and ssh
/// ports, the proxy's admin port on loopback, and the proxy's two listeners
/// as Envoy-like forwarders running as `proxy_uid` (outbound resolves
/// SERVICE to this pod). The peer gets a control-plane server on 15012.
fn sidecar_pod(t: &Topology, proxy_uid: u32, outbound: u16, inbound: u16) -> Vec<Server> {
    use testkit::Hop;
    let app = t.app.path();
    let pod = testkit::addrs::POD_IP;
    let any = |p: u16| std::net::SocketAddr::from(([0, 0, 0, 0], p));
    let mut v: Vec<Server> = [15020u16, 22, 7070].into_iter().map(|p| Server::tcp(&app, any(p)).unwrap()).collect();
    v.push(Server::tcp(&app, "127.0.0.1:15000".parse().unwrap()).unwrap());
    let services = vec![(SERVICE.parse().unwrap(), format!("{pod}:8080").parse().unwrap())];
    v.push(Server::forwarder(&app, any(outbound), proxy_uid, Hop::Outbound, services).unwrap());
    v.push(Server::forwarder(&app, any(inbound), proxy_uid, Hop::Inbound, Vec::new()).unwrap());
    v.push(Server::tcp(&t.peer.path(), any(15012)).unwrap());
    v
}

/// The mesh's own init-container rules (generated for the same config) in
/// one namespace, the agent with the same config in another, the same pod
/// in both; every case must get the same answer from both.
fn dialect_differential(config: &str, cases: &[Case]) {
    if !require_kernel() {
        return;
    }
    let cfg = parse_config(&render(config, Path::new("/unused"))).unwrap();
    assert!(cfg.rejected.is_empty(), "{:?}", cfg.rejected);
    let policy = compile(&cfg.mesh, &cfg.workloads[0].annotations);
    let rules = oracle_commands(cfg.mesh.preset, &policy);
    let (uid, out, inb) = (cfg.mesh.proxy_uid, cfg.mesh.outbound_port, cfg.mesh.inbound_port);
    let reference = Topology::new("di").unwrap();
    reference.app.shell(&rules.join(" && ")).expect("the mesh's iptables rules");
    let _ref_servers = sidecar_pod(&reference, uid, out, inb);
    let m = Managed::start_full(Topology::new("db").unwrap(), config, |t| sidecar_pod(t, uid, out, inb), false);
    let mut failures = Vec::new();
    for c in cases {
        let dst: std::net::SocketAddr = c.dst.parse().unwrap();
        let run = |topo: &Topology| {
            let ns = if c.from_workload { topo.app.path() } else { topo.peer.path() };
            poll_until(|| testkit::probe_from(&ns, c.uid, c.src, c.proto, dst).unwrap(), |g| !g.starts_with("error"))
        };
        let want = run(&reference);
        let got = run(&m.topo);
        let line = format!("{:<40} iptables: {want:<70} redirector: {got}", c.name);
        println!("{line}");
        if want != got || !got.starts_with(&c.expect) {
            failures.push(format!("{line}   (expected to start with {:?})", c.expect));
        }
    }
    assert!(
        failures.is_empty(),
        "redirector differs from the {} rules:\n{}\nagent log:\n{}",
        cfg.mesh.preset.name(),
        failures.join("\n"),
        m.agent.log_text()
    );
}

fn peer_case(name: &'static str, dst: String, expect: impl Into<String>) -> Case {
    Case { from_workload: false, ..case(name, 0, dst, expect) }
}

const ISTIO: &str = r#"
mesh:
  preset: istio
workloads:
  - name: app
    netns: {netns}
    annotations:
      traffic.sidecar.istio.io/excludeOutboundPorts: "6379"
      traffic.sidecar.istio.io/excludeOutboundIPRanges: "203.0.113.0/25"
      traffic.sidecar.istio.io/excludeInboundPorts: "7070"
"#;

/// Istio differential suite: the exact istio-iptables rule set of seed 001
/// (REDIRECT mode) vs `preset: istio`, with Envoy-like forwarders as UID
/// 1337 and the six traffic types of seed 002 walked end to end.
#[test]
fn differential_istio_six_traffic_types() {
    let pod = testkit::addrs::POD_IP;
    let to_app = format!("inbound {pod}:8080 > direct {pod}:8080");
    dialect_differential(
        ISTIO,
        &[
            peer_case("1 remote pod -> local pod", format!("{pod}:8080"), &to_app),
            case("2 local pod -> remote pod", 1000, "192.0.2.10:80", "outbound 192.0.2.10:80 > direct 192.0.2.10:80"),
            peer_case("3 prometheus -> pilot-agent 15020", format!("{pod}:15020"), "direct"),
            peer_case("3' ssh 22 (built into istio-iptables)", format!("{pod}:22"), "direct"),
            case("4 local pod -> own service", 1000, SERVICE, format!("outbound {SERVICE} > {to_app}")),
            case("4' local pod -> own pod IP", 1000, format!("{pod}:8080"), &to_app),
            case("5 envoy -> envoy on localhost", 1337, "127.0.0.1:15000", "direct 127.0.0.1:15000"),
            case("6 sidecar -> istiod", 1337, "192.0.2.10:15012", "direct 192.0.2.10:15012"),
            case("app -> localhost", 1000, "127.0.0.1:8080", "direct 127.0.0.1:8080"),
            case("excludeOutboundPorts", 1000, "192.0.2.10:6379", "direct"),
            case("excludeOutboundIPRanges", 1000, "203.0.113.10:80", "direct"),
            case("outside the excluded range", 1000, "203.0.113.200:80", "outbound"),
            peer_case("excludeInboundPorts", format!("{pod}:7070"), "direct"),
        ],
    );
}

const KUMA: &str = r#"
mesh:
  preset: kuma
workloads:
  - name: app
    netns: {netns}
    annotations:
      traffic.kuma.io/exclude-outbound-ports: "6379"
      traffic.kuma.io/exclude-outbound-ips: "203.0.113.0/25"
      traffic.kuma.io/exclude-inbound-ports: "7070"
      traffic.kuma.io/exclude-inbound-ips: "192.0.2.10"
"#;

/// Kuma differential suite: kuma's transparent-proxy nat rules vs
/// `preset: kuma` (kuma-dp UID 5678). Differs from seed 001 where Kuma
/// differs: an application's call to its own pod IP is not sent through
/// the inbound listener, only kuma-dp's are; inbound sources can be excluded.
#[test]
fn differential_kuma() {
    let pod = testkit::addrs::POD_IP;
    let to_app = format!("inbound {pod}:8080 > direct {pod}:8080");
    let from_excluded = Case {
        src: Some("192.0.2.10:0".parse().unwrap()),
        ..peer_case("exclude-inbound-ips source", format!("{pod}:8080"), "direct")
    };
    dialect_differential(
        KUMA,
        &[
            peer_case("remote -> pod", format!("{pod}:8080"), &to_app),
            from_excluded,
            peer_case("exclude-inbound-ports", format!("{pod}:7070"), "direct"),
            case("app -> remote", 1000, "192.0.2.10:80", "outbound 192.0.2.10:80 > direct 192.0.2.10:80"),
            case(
                "app -> own service (kuma-dp loops to inbound)",
                1000,
                SERVICE,
                format!("outbound {SERVICE} > {to_app}"),
            ),
            case("app -> own pod IP (not redirected)", 1000, format!("{pod}:8080"), "direct"),
            case("app -> localhost", 1000, "127.0.0.1:8080", "direct 127.0.0.1:8080"),
            case("kuma-dp -> localhost", 5678, "127.0.0.1:15000", "direct 127.0.0.1:15000"),
            case("kuma-dp -> control plane", 5678, "192.0.2.10:15012", "direct 192.0.2.10:15012"),
            case("exclude-outbound-ports", 1000, "192.0.2.10:6379", "direct"),
            case("exclude-outbound-ips", 1000, "203.0.113.10:80", "direct"),
            case("outside the excluded range", 1000, "203.0.113.200:80", "outbound"),
        ],
    );
}

const LINKERD: &str = r#"
mesh:
  preset: linkerd
workloads:
  - name: app
    netns: {netns}
    annotations:
      config.linkerd.io/skip-outbound-ports: "6379,7060-7080"
      config.linkerd.io/skip-inbound-ports: "7070"
      config.linkerd.io/skip-subnets: "192.0.2.0/24"
"#;

/// Linkerd differential suite: linkerd2-proxy-init's rules vs `preset:
/// linkerd` (proxy UID 2102, 4140/4143, every loopback route returned).
#[test]
fn differential_linkerd() {
    let pod = testkit::addrs::POD_IP;
    let from_skipped = Case {
        src: Some("192.0.2.10:0".parse().unwrap()),
        ..peer_case("skip-subnets source", format!("{pod}:8080"), "direct")
    };
    dialect_differential(
        LINKERD,
        &[
            peer_case("remote -> pod", format!("{pod}:8080"), format!("inbound {pod}:8080 > direct {pod}:8080")),
            from_skipped,
            peer_case("skip-inbound-ports", format!("{pod}:7070"), "direct"),
            case("app -> remote", 1000, "192.0.2.10:80", "outbound 192.0.2.10:80 > direct 192.0.2.10:80"),
            case("app -> own pod IP (-o lo RETURN)", 1000, format!("{pod}:8080"), "direct"),
            case("app -> localhost", 1000, "127.0.0.1:8080", "direct 127.0.0.1:8080"),
            case("proxy -> remote", 2102, "192.0.2.10:15012", "direct 192.0.2.10:15012"),
            case("skip-outbound-ports", 1000, "192.0.2.10:6379", "direct"),
            case("skip-outbound-ports range", 1000, "203.0.113.10:7070", "direct"),
            case("app -> other port", 1000, "203.0.113.10:80", "outbound"),
        ],
    );
}

/// `redirector probe` lists every feature; on a kernel that lacks a
/// required one, `redirector run` refuses before touching anything and
/// names the feature and the kernel that has it.
#[test]
fn unsupported_kernel_is_refused_clearly() {
    if !privileged() {
        return;
    }
    testkit::ensure_bpffs().expect("bpffs");
    let probe = std::process::Command::new(bin()).arg("probe").output().unwrap();
    let table = String::from_utf8_lossy(&probe.stdout).to_string();
    println!("{table}");
    let missing = missing_features();
    if missing.is_empty() {
        assert!(probe.status.success(), "{table}{}", String::from_utf8_lossy(&probe.stderr));
        assert!(!table.contains("MISSING"), "{table}");
        return;
    }
    assert!(!probe.status.success(), "probe must fail when a required feature is missing:\n{table}");
    let dir = tmpdir("refuse");
    let cfg = dir.join("config.yaml");
    std::fs::write(&cfg, "mesh: {}\nworkloads: []\n").unwrap();
    let pins = PinDir::new().unwrap();
    let cgroup = TestCgroup::new().unwrap();
    let mut agent = AgentProcess::start(bin(), &cfg, &cgroup.path, &pins.path, &dir.join("agent.log")).unwrap();
    let status = poll_until(|| agent.child.try_wait().unwrap(), Option::is_some);
    let err = agent.log_text();
    drop(agent);
    drop(cgroup);
    let _ = std::fs::remove_dir_all(&dir);
    println!("redirector run on this kernel:\n{err}");
    assert!(status.is_some_and(|s| !s.success()), "the agent must refuse this kernel: {status:?}");
    assert!(err.contains("refusing to start") && err.contains("needs Linux"), "{err}");
    for m in &missing {
        let name = m.split(" (Linux").next().unwrap();
        assert!(err.contains(name), "the refusal names {name}: {err}");
    }
    let left: Vec<_> =
        std::fs::read_dir(&pins.path).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "nothing may be pinned after a refusal: {left:?}");
}

/// `BPF_MAP_CREATE` of a bare map (no BTF), as an older agent's would be.
fn raw_map(map_type: u32, key_size: u32, value_size: u32, max_entries: u32, name: &str) -> std::os::fd::OwnedFd {
    let mut attr = [0u8; 128];
    for (i, v) in [map_type, key_size, value_size, max_entries].into_iter().enumerate() {
        attr[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    attr[28..28 + name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: a zero-padded bpf_attr; the kernel returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, 0 /* BPF_MAP_CREATE */, attr.as_mut_ptr(), attr.len() as u32)
    };
    assert!(fd >= 0, "BPF_MAP_CREATE {name}: {}", std::io::Error::last_os_error());
    // SAFETY: a new fd that nothing else owns.
    unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) }
}

/// Pinned maps of another layout (an older agent's) are refused, never
/// adopted: by the version stamped in RDR_META, and by their capacity
/// where no version was stamped (an agent that died while starting).
#[test]
fn pinned_maps_of_another_layout_are_refused() {
    use std::os::fd::AsRawFd as _;
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    // Layout 2's META, stamped with version 2.
    let old = PinDir::new().unwrap();
    std::fs::create_dir_all(&old.path).unwrap();
    let meta = raw_map(2 /* BPF_MAP_TYPE_ARRAY */, 4, 8, 1, "RDR_META");
    let (key, value) = (0u32, [2u8, 0, 0, 0, 0, 0, 0, 0]);
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(meta.as_raw_fd() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(&key as *const u32 as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(value.as_ptr() as u64).to_ne_bytes());
    // SAFETY: key and value outlive the call; a zero-padded bpf_attr.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, 2 /* BPF_MAP_UPDATE_ELEM */, attr.as_mut_ptr(), attr.len() as u32)
    };
    assert_eq!(rc, 0, "BPF_MAP_UPDATE_ELEM: {}", std::io::Error::last_os_error());
    redirector::sys::bpf::obj_pin(&meta, &old.path.join("RDR_META")).unwrap();
    let err = format!(
        "{:#}",
        redirector::dataplane::Dataplane::load(&old.path, &cgroup.path).err().expect("version 2 adopted")
    );
    assert!(err.contains("layout version 2") && err.contains("redirector cleanup"), "{err}");
    // No version stamped, but layout 2's 4,096 workloads.
    let unstamped = PinDir::new().unwrap();
    std::fs::create_dir_all(&unstamped.path).unwrap();
    let workloads = raw_map(1 /* BPF_MAP_TYPE_HASH */, 8, 40, 4096, "RDR_WORKLOADS");
    redirector::sys::bpf::obj_pin(&workloads, &unstamped.path.join("RDR_WORKLOADS")).unwrap();
    let err = format!(
        "{:#}",
        redirector::dataplane::Dataplane::load(&unstamped.path, &cgroup.path).err().expect("capacity 4096 adopted")
    );
    assert!(err.contains("RDR_WORKLOADS") && err.contains("capacity 4096") && err.contains("16384"), "{err}");
    for p in [&old.path, &unstamped.path] {
        assert!(std::fs::read_dir(p.join("links")).map_or(true, |mut d| d.next().is_none()), "nothing attached");
    }
}
