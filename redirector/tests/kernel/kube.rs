//! Kubernetes mode against a fake API server (`redirector_testkit::fakeapi`), with
//! real namespaces, real programs and a real agent process: pods on the
//! node, their annotations, the ConfigMap and OSM's MeshConfig drive the
//! maps; the init-container gate; watch disconnects and 410 Gone; an agent
//! restart; Events; status endpoints; and RBAC covering exactly the calls.
use std::{
    ffi::{CString, OsString},
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use redirector::{dataplane::Maps, sys::netns::netns_cookie};
use redirector_testkit::{
    self as testkit,
    fakeapi::{FakeApi, Resource, Served},
    AgentProcess, PinDir, Proto, Server, TestCgroup, Topology,
};
use serde_json::{json, Value};

use super::{bin, poll_until, require_kernel, tmpdir};

const NODE: &str = "node-1";
const PORTS: &str = "openservicemesh.io/outbound-port-exclusion-list";
const RBAC: &str = include_str!("../../../deploy/rbac.yaml");

/// A pod's cgroup as the kubelet lays it out (cgroupfs driver), under the
/// test cgroup; its processes are killed and the groups removed on drop.
struct PodCgroup {
    /// Containers' groups first, then the pod's and its parents.
    dirs: Vec<PathBuf>,
    pod: PathBuf,
    procs: PathBuf,
}

impl PodCgroup {
    fn new(parent: &Path, uid: &str) -> Self {
        let pod = parent.join("kubepods").join("burstable").join(format!("pod{uid}"));
        let ctr = pod.join("ctr");
        std::fs::create_dir_all(&ctr).unwrap();
        let dirs = vec![ctr.clone(), pod.clone(), parent.join("kubepods/burstable"), parent.join("kubepods")];
        Self { dirs, pod, procs: ctr.join("cgroup.procs") }
    }

    /// A container's cgroup under the pod (cgroupfs driver: named by its
    /// ID), removed with the pod's.
    fn add_container(&mut self, id: &str) -> PathBuf {
        let dir = self.pod.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        self.dirs.insert(0, dir.clone());
        dir
    }

    fn adopt(&self, pid: u32) {
        std::fs::write(&self.procs, pid.to_string()).unwrap();
    }

    /// A command that joins this cgroup between fork and exec (so the
    /// process is in the pod from its first instruction).
    fn command(&self, program: &str) -> Command {
        let path = CString::new(self.procs.as_os_str().as_encoded_bytes()).unwrap();
        let mut c = Command::new(program);
        // SAFETY: only async-signal-safe calls (open, write, close) on a
        // path allocated before the fork.
        unsafe {
            c.pre_exec(move || {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
        c
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for d in self.dirs.iter().filter(|d| d.parent() == Some(&self.pod)) {
            let _ = std::fs::write(d.join("cgroup.kill"), "1");
        }
        for d in &self.dirs {
            for _ in 0..50 {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    // Shared parents of other pods stay.
                    Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

/// A meshed pod: its namespaces (the pod and a peer with servers), the
/// proxy on 127.0.0.1:15001, its cgroup and, for a pod that "was
/// running", a process in both.
struct Pod {
    topo: Topology,
    uid: String,
    name: String,
    _proxy: Server,
    sleeper: Option<Child>,
    cg: PodCgroup,
}

impl Pod {
    fn create(api: &FakeApi, cg_parent: &Path, tag: &str, name: &str, phase: &str, annotations: Value) -> Pod {
        Self::create_from(api, cg_parent, tag, pod_object(name, phase, annotations))
    }

    fn create_from(api: &FakeApi, cg_parent: &Path, tag: &str, obj: Value) -> Pod {
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let topo = Topology::new(tag).unwrap();
        let proxy = Server::proxy(&topo.app.path(), "127.0.0.1:15001".parse().unwrap()).unwrap();
        let obj = api.put(&Resource::pods(), obj);
        let uid = obj["metadata"]["uid"].as_str().unwrap().to_string();
        let cg = PodCgroup::new(cg_parent, &uid);
        Pod { topo, uid, name, _proxy: proxy, sleeper: None, cg }
    }

    /// Starts a process in the pod (as its containers are), as if the pod
    /// was running before the agent.
    fn run_process(&mut self) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.topo.app.name, "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.cg.adopt(child.id());
        self.sleeper = Some(child);
    }

    fn cookie(&self) -> u64 {
        netns_cookie(&self.topo.app.path()).unwrap()
    }

    fn probe(&self, dst: &str) -> String {
        testkit::probe(&self.topo.app.path(), 1000, Proto::Tcp, dst.parse().unwrap()).unwrap()
    }

    fn probe_until(&self, dst: &str, pred: impl Fn(&str) -> bool) -> String {
        poll_until(|| self.probe(dst), |g| pred(g))
    }

    /// The init container: `wait-ready --agent-socket` inside the pod's
    /// network namespace and cgroup.
    fn init_container(&self, socket: &Path) -> std::process::Output {
        self.cg
            .command("ip")
            .args(["netns", "exec", &self.topo.app.name])
            .arg(bin())
            .args(["wait-ready", "--timeout", "60s", "--agent-socket"])
            .arg(socket)
            .env("POD_UID", &self.uid)
            .output()
            .unwrap()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(c) = self.sleeper.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn pod_object(name: &str, phase: &str, annotations: Value) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "shop", "labels": {"osm-proxy-uuid": format!("{name}-proxy")},
                     "annotations": annotations},
        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app"}, {"name": "envoy", "image": "envoy"}]},
        "status": {"phase": phase}
    })
}

fn set_annotation(api: &FakeApi, pod: &Pod, value: &str) {
    let mut obj = api.get(&Resource::pods(), "shop", &pod.name).unwrap();
    obj["metadata"]["annotations"][PORTS] = json!(value);
    api.put(&Resource::pods(), obj);
}

fn configmap(mesh_yaml: &str) -> Value {
    json!({"metadata": {"name": "redirector-config", "namespace": "redirector-system"}, "data": {"mesh.yaml": mesh_yaml}})
}

fn meshconfig(exclusions: &[&str]) -> Value {
    json!({"metadata": {"name": "osm-mesh-config", "namespace": "osm-system"},
           "spec": {"traffic": {"outboundIPRangeExclusionList": exclusions, "enableEgress": true}}})
}

/// A scratch directory, removed on drop (also when the test fails).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `redirector run --kube` process against the fake server.
struct KubeAgent {
    proc: AgentProcess,
    socket: PathBuf,
    status: SocketAddr,
}

impl KubeAgent {
    fn start(api: &FakeApi, cgroup: &Path, pins: &Path, dir: &Path, log: &str) -> KubeAgent {
        Self::start_with(api, cgroup, pins, dir, log, &[])
    }

    fn start_with(api: &FakeApi, cgroup: &Path, pins: &Path, dir: &Path, log: &str, extra: &[&str]) -> KubeAgent {
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        let socket = dir.join("agent.sock");
        let status = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let mut args: Vec<OsString> =
            ["run", "--kube", "--node-name", NODE, "--resync", "300ms"].map(OsString::from).to_vec();
        args.extend(["--cgroup".into(), cgroup.into(), "--pin-dir".into(), pins.into()]);
        args.extend([
            "--agent-socket".into(),
            socket.clone().into(),
            "--metrics-addr".into(),
            status.to_string().into(),
        ]);
        args.extend(extra.iter().map(OsString::from));
        let proc =
            AgentProcess::spawn(bin(), &args, &[("KUBECONFIG", kubeconfig.as_os_str())], &dir.join(log)).unwrap();
        let agent = KubeAgent { proc, socket, status };
        let ready = poll_until(|| agent.get("/readyz"), |(code, _)| *code == 200);
        assert_eq!(ready.0, 200, "agent not ready: {}\nlog:\n{}", ready.1, agent.proc.log_text());
        agent
    }

    /// GET on the status endpoint: (status code, body).
    fn get(&self, path: &str) -> (u16, String) {
        let Ok(mut s) = TcpStream::connect(self.status) else { return (0, "not listening".into()) };
        let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (code, body)
    }
}

fn events_for<'a>(events: &'a [Value], name: &str, reason: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["regarding"]["name"] == name && e["reason"] == reason).collect()
}

fn programmed(pins: &Path, cookie: u64) -> bool {
    Maps::open(pins).and_then(|m| m.workload(cookie)).map(|w| w.is_some()).unwrap_or(false)
}

/// Whether an RBAC rule allows a request (groups, resources, verbs,
/// resourceNames).
fn rule_allows(rule: &PolicyRule, r: &Served) -> bool {
    let has = |list: &Option<Vec<String>>, v: &str| list.as_ref().is_some_and(|l| l.iter().any(|x| x == v || x == "*"));
    has(&rule.api_groups, &r.group)
        && has(&rule.resources, &r.resource)
        && rule.verbs.iter().any(|v| v == &r.verb || v == "*")
        && rule
            .resource_names
            .as_ref()
            .is_none_or(|names| names.is_empty() || r.name.as_ref().is_some_and(|n| names.contains(n)))
}

/// deploy/rbac.yaml's rules: (namespace of a Role or None, rule).
fn rbac_rules() -> Vec<(Option<String>, PolicyRule)> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(RBAC) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        match v["kind"].as_str() {
            Some("ClusterRole") => {
                let r: ClusterRole = serde_yaml::from_value(v).unwrap();
                out.extend(r.rules.unwrap_or_default().into_iter().map(|x| (None, x)));
            }
            Some("Role") => {
                let r: Role = serde_yaml::from_value(v).unwrap();
                let ns = r.metadata.namespace.clone();
                out.extend(r.rules.unwrap_or_default().into_iter().map(|x| (ns.clone(), x)));
            }
            _ => {}
        }
    }
    out
}

use serde::Deserialize as _;

/// Every request the agent made is allowed by deploy/rbac.yaml, and (with
/// `all_needed`) every rule there was needed by some request.
fn check_rbac(served: &[Served], all_needed: bool) {
    let rules = rbac_rules();
    let mut used = vec![false; rules.len()];
    let mut denied = Vec::new();
    for r in served {
        let hit = rules.iter().position(|(ns, rule)| {
            ns.as_ref().is_none_or(|ns| r.namespace.as_ref() == Some(ns)) && rule_allows(rule, r)
        });
        match hit {
            Some(i) => used[i] = true,
            None => denied.push(format!("{} {} ({} {:?})", r.method, r.path, r.verb, r.name)),
        }
    }
    assert!(denied.is_empty(), "requests deploy/rbac.yaml does not allow:\n{}", denied.join("\n"));
    let unused: Vec<String> = rules
        .iter()
        .zip(&used)
        .filter(|(_, u)| !**u)
        .map(|((ns, r), _)| format!("{ns:?} {:?} {:?} {:?}", r.api_groups, r.resources, r.verbs))
        .collect();
    assert!(!all_needed || unused.is_empty(), "rules in deploy/rbac.yaml no request needed:\n{}", unused.join("\n"));
}

#[test]
fn kube_agent_end_to_end() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let scratch = Scratch(tmpdir("kube"));
    let dir = scratch.0.clone();
    let api = FakeApi::start(&[Resource::pods(), Resource::configmaps(), Resource::meshconfigs()]).unwrap();
    api.put(&Resource::configmaps(), configmap("preset: osm\nproxyUID: 1500\n"));
    api.put(&Resource::meshconfigs(), meshconfig(&[]));
    // A pod of another node: never touched.
    api.put(&Resource::pods(), {
        let mut o = pod_object("elsewhere", "Running", json!({}));
        o["spec"]["nodeName"] = json!("node-2");
        o
    });

    // Pod A runs before the agent starts.
    let mut a = Pod::create(&api, &cgroup.path, "ka", "a", "Running", json!({}));
    a.run_process();
    let mut agent = KubeAgent::start(&api, &cgroup.path, &pins.path, &dir, "agent1.log");
    let log = |agent: &KubeAgent| agent.proc.log_text();
    let got = a.probe_until("192.0.2.10:80", |g| g.starts_with("proxy"));
    assert!(got.starts_with("proxy 192.0.2.10:80"), "pod started before the agent not redirected\n{}", log(&agent));

    // Pod B is new: its init container gates on the agent. Once it exits 0
    // the redirection is in force, with no polling.
    let b = Pod::create(&api, &cgroup.path, "kb", "b", "Pending", json!({PORTS: "6379"}));
    let out = b.init_container(&agent.socket);
    assert!(
        out.status.success(),
        "init container failed: {}{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        log(&agent)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("shop/b is programmed"));
    assert!(b.probe("192.0.2.10:80").starts_with("proxy 192.0.2.10:80"), "ready before redirection was in force");
    assert!(b.probe("192.0.2.10:6379").starts_with("direct"), "pod annotation not applied");
    let mut running = api.get(&Resource::pods(), "shop", "b").unwrap();
    running["status"]["phase"] = json!("Running");
    api.put(&Resource::pods(), running);

    // A live annotation change, no restart.
    set_annotation(&api, &b, "80");
    let got = b.probe_until("192.0.2.10:80", |g| g.starts_with("direct"));
    assert!(got.starts_with("direct"), "annotation change not applied: {got}\n{}", log(&agent));
    assert!(a.probe("192.0.2.10:80").starts_with("proxy 192.0.2.10:80"), "another pod was affected");

    // A bad annotation: an Event naming it; the last good policy stays.
    set_annotation(&api, &b, "80,99999");
    let events = poll_until(|| api.events(), |e| !events_for(e, "b", "InvalidAnnotation").is_empty());
    let ev = events_for(&events, "b", "InvalidAnnotation");
    assert_eq!(ev.len(), 1, "{events:#?}\nagent log:\n{}", log(&agent));
    let note = ev[0]["note"].as_str().unwrap_or_default();
    assert!(note.contains(PORTS) && note.contains("99999") && note.contains("last good"), "{note}");
    assert_eq!(ev[0]["type"], "Warning");
    assert!(b.probe("192.0.2.10:80").starts_with("direct"), "last good policy lost");
    // A second, different problem: reported too, with its own message.
    set_annotation(&api, &b, "eighty");
    let events = poll_until(
        || api.events(),
        |e| events_for(e, "b", "InvalidAnnotation").iter().any(|x| x["note"].as_str().unwrap_or("").contains("eighty")),
    );
    assert!(
        events_for(&events, "b", "InvalidAnnotation")
            .iter()
            .any(|x| x["note"].as_str().unwrap_or("").contains("eighty")),
        "{events:#?}"
    );

    // Mesh-wide: the MeshConfig's exclusions apply live to every pod.
    api.put(&Resource::meshconfigs(), meshconfig(&["192.0.2.0/24"]));
    for p in [&a, &b] {
        let got = p.probe_until("192.0.2.10:7070", |g| g.starts_with("direct"));
        assert!(got.starts_with("direct"), "MeshConfig change not applied to {}: {got}\n{}", p.name, log(&agent));
    }
    // Bad mesh settings: an Event on the ConfigMap; nothing changes.
    api.put(&Resource::configmaps(), configmap("proxyUID: -5\n"));
    let events = poll_until(|| api.events(), |e| !events_for(e, "redirector-config", "InvalidMeshConfig").is_empty());
    let ev = events_for(&events, "redirector-config", "InvalidMeshConfig");
    assert!(!ev.is_empty() && ev[0]["note"].as_str().unwrap().contains("proxyUID"), "{events:#?}");
    assert!(a.probe("192.0.2.10:7070").starts_with("direct"), "last good mesh settings lost");
    api.put(&Resource::configmaps(), configmap("preset: osm\n"));
    api.put(&Resource::meshconfigs(), meshconfig(&[]));
    let got = a.probe_until("192.0.2.10:7070", |g| g.starts_with("proxy"));
    assert!(got.starts_with("proxy 192.0.2.10:7070"), "{}", log(&agent));

    // Watches dropped: the agent resumes and sees the next change.
    api.drop_watches();
    set_annotation(&api, &b, "");
    let got = b.probe_until("192.0.2.10:80", |g| g.starts_with("proxy"));
    assert!(got.starts_with("proxy 192.0.2.10:80"), "change after a watch disconnect lost\n{}", log(&agent));

    // 410 Gone: pod A is deleted while the agent must relist; its entries go.
    let a_cookie = a.cookie();
    api.expire_watches();
    api.delete(&Resource::pods(), "shop", "a");
    let gone = poll_until(|| programmed(&pins.path, a_cookie), |p| !*p);
    assert!(!gone, "deleted pod still programmed after a 410 relist\n{}", log(&agent));
    assert!(!a.probe("192.0.2.10:80").starts_with("proxy"), "deleted pod still redirected");
    assert!(programmed(&pins.path, b.cookie()), "relist lost pod b");

    // Status endpoints.
    let (code, metrics) = agent.get("/metrics");
    assert_eq!(code, 200);
    for line in [
        "redirector_ready 1",
        "redirector_pods_programmed 1",
        "redirector_registrations_total 1",
        "redirector_errors_total{reason=\"invalid_annotation\"}",
        "redirector_map_entries{map=\"RDR_WORKLOADS\"} 1",
        "redirector_sync_duration_seconds_count",
        "redirector_datapath_events_total{event=",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in /metrics:\n{metrics}");
    }
    assert_eq!(agent.get("/healthz").0, 200);

    // Restart: while no agent runs, B is deleted and C starts; the new
    // agent adopts the pinned state, removes B, programs C, and B's old
    // entries do not linger.
    agent.proc.stop();
    let b_cookie = b.cookie();
    api.delete(&Resource::pods(), "shop", "b");
    let mut c = Pod::create(&api, &cgroup.path, "kc", "c", "Running", json!({}));
    c.run_process();
    assert!(programmed(&pins.path, b_cookie), "stopping the agent removed redirection");
    assert!(b.probe("192.0.2.10:80").starts_with("proxy 192.0.2.10:80"), "redirection stopped with the agent");
    let agent2 = KubeAgent::start(&api, &cgroup.path, &pins.path, &dir, "agent2.log");
    let got = c.probe_until("192.0.2.10:80", |g| g.starts_with("proxy"));
    assert!(got.starts_with("proxy 192.0.2.10:80"), "{}", log(&agent2));
    let stale = poll_until(|| programmed(&pins.path, b_cookie), |p| !*p);
    assert!(!stale, "a pod deleted while the agent was down is still programmed\n{}", log(&agent2));
    let workloads = Maps::open(&pins.path).unwrap().workloads().unwrap();
    assert_eq!(workloads.keys().copied().collect::<Vec<_>>(), vec![c.cookie()], "stale entries after restart");

    let served = api.served();
    assert!(served.iter().any(|r| r.verb == "watch" && r.resource == "pods"));
    assert!(!served.iter().any(|r| r.resource == "pods" && r.verb == "list" && r.name.is_some()));
    check_rbac(&served, true);
    drop(agent2);
    drop(agent);
}

/// Without the MeshConfig CRD, the ConfigMap alone is the mesh config; and
/// an init container of a pod that is not meshed is refused with why.
#[test]
fn kube_agent_without_meshconfig_crd() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let scratch = Scratch(tmpdir("kube2"));
    let dir = scratch.0.clone();
    let api = FakeApi::start(&[Resource::pods(), Resource::configmaps()]).unwrap();
    api.put(&Resource::configmaps(), configmap("preset: osm\noutboundPortExclusionList: [7070]\n"));
    let mut a = Pod::create(&api, &cgroup.path, "kd", "d", "Running", json!({}));
    a.run_process();
    let agent = KubeAgent::start_with(&api, &cgroup.path, &pins.path, &dir, "agent.log", &["--log-format", "json"]);
    let got = a.probe_until("192.0.2.10:80", |g| g.starts_with("proxy"));
    assert!(got.starts_with("proxy 192.0.2.10:80"), "{}", agent.proc.log_text());
    assert!(a.probe("192.0.2.10:7070").starts_with("direct"), "ConfigMap exclusion not applied");
    // Structured logs: one JSON object per line, with level and message.
    let log = agent.proc.log_text();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().all(|l| l["level"].is_string() && l["timestamp"].is_string()), "{log}");
    assert!(lines.iter().any(|l| l["message"].as_str().is_some_and(|m| m.contains("CRD not installed"))), "{log}");

    let mut obj = pod_object("plain", "Pending", json!({}));
    obj["metadata"]["labels"] = json!({});
    obj["spec"]["containers"] = json!([{"name": "app", "image": "app"}]);
    let plain = Pod::create_from(&api, &cgroup.path, "ke", obj);
    let out = plain.init_container(&agent.socket);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not meshed"), "status {}, stderr: {err}", out.status);
    assert!(!programmed(&pins.path, plain.cookie()));
    check_rbac(&api.served(), false);
    drop(agent);
}

/// Runs `f` with this whole (single-threaded test) process moved into
/// `cgroup`, as a container's processes are; moved back to `home` after,
/// also if `f` panics.
fn in_cgroup<T>(cgroup: &Path, home: &Path, f: impl FnOnce() -> T) -> T {
    struct Back<'a>(&'a Path);
    impl Drop for Back<'_> {
        fn drop(&mut self) {
            let _ = std::fs::write(self.0.join("cgroup.procs"), std::process::id().to_string());
        }
    }
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string()).unwrap();
    let _back = Back(home);
    f()
}

/// `--proxy-identity cgroup`: the proxy is the pod's `envoy` container,
/// found from `status.containerStatuses` and the pod's cgroup. Until it
/// runs (the init gate comes first) and after it stops, the UID; while it
/// runs, only its cgroup goes direct, so an application process running
/// as UID 1500 is redirected (no UID spoof).
#[test]
fn kube_proxy_identified_by_its_container_cgroup() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let scratch = Scratch(tmpdir("kube3"));
    let dir = scratch.0.clone();
    let api = FakeApi::start(&[Resource::pods(), Resource::configmaps()]).unwrap();
    api.put(&Resource::configmaps(), configmap("preset: osm\nproxyUID: 1500\n"));
    // Running, the proxy container not started yet.
    let mut a = Pod::create(&api, &cgroup.path, "kf", "f", "Running", json!({}));
    a.run_process();
    let app_cg = a.cg.dirs[0].clone();
    let envoy_cg = a.cg.add_container("e0a1b2c3");
    let agent =
        KubeAgent::start_with(&api, &cgroup.path, &pins.path, &dir, "agent.log", &["--proxy-identity", "cgroup"]);
    let dst = "192.0.2.10:80";
    let probe = |cg: &Path, uid: u32| {
        in_cgroup(cg, &cgroup.path, || {
            testkit::probe(&a.topo.app.path(), uid, Proto::Tcp, dst.parse().unwrap()).unwrap()
        })
    };
    let got = a.probe_until(dst, |g| g.starts_with("proxy"));
    assert!(got.starts_with("proxy 192.0.2.10:80"), "{}", agent.proc.log_text());
    let uid_only = |what: &str| {
        let w = Maps::open(&pins.path).unwrap().workload(a.cookie()).unwrap().unwrap();
        assert_eq!(w.flags & redirector_common::flags::MATCH_PROXY_CGROUP, 0, "{what}: proxy identified by cgroup");
        assert!(probe(&app_cg, 1500).starts_with("direct"), "{what}: the proxy's UID is not let by");
    };
    uid_only("before the proxy container runs");

    // The proxy container runs: its cgroup, and only it, goes direct.
    let set_status = |envoy: Value| {
        let mut obj = api.get(&Resource::pods(), "shop", "f").unwrap();
        obj["status"]["containerStatuses"] = json!([
            {"name": "app", "image": "app", "imageID": "", "ready": true, "restartCount": 0,
             "containerID": "containerd://ctr", "state": {"running": {}}},
            {"name": "envoy", "image": "envoy", "imageID": "", "ready": true, "restartCount": 0,
             "containerID": "containerd://e0a1b2c3", "state": envoy}
        ]);
        api.put(&Resource::pods(), obj);
    };
    set_status(json!({"running": {}}));
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&envoy_cg).unwrap());
    let w = poll_until(
        || Maps::open(&pins.path).unwrap().workload(a.cookie()).unwrap().unwrap(),
        |w| w.flags & redirector_common::flags::MATCH_PROXY_CGROUP != 0,
    );
    assert!(
        w.flags & redirector_common::flags::MATCH_PROXY_CGROUP != 0,
        "proxy cgroup never programmed\n{}",
        agent.proc.log_text()
    );
    assert_eq!(w.proxy_cgroup_id, ino, "not the envoy container's cgroup");
    let spoof = probe(&app_cg, 1500);
    assert!(spoof.starts_with("proxy 192.0.2.10:80"), "an app process running as UID 1500 went direct: {spoof}");
    assert!(probe(&envoy_cg, 1500).starts_with("direct"), "the proxy container was redirected");
    assert!(probe(&envoy_cg, 1000).starts_with("direct"), "the proxy container is its cgroup, whatever the UID");
    assert!(probe(&app_cg, 1000).starts_with("proxy"), "the application not redirected");
    let log = agent.proc.log_text();
    assert!(log.contains("proxy container `envoy` (e0a1b2c3) identified by its cgroup"), "{log}");

    // The proxy container stops (restarting): back to its UID until the
    // next one runs.
    set_status(json!({"terminated": {"exitCode": 1}}));
    let w = poll_until(
        || Maps::open(&pins.path).unwrap().workload(a.cookie()).unwrap().unwrap(),
        |w| w.flags & redirector_common::flags::MATCH_PROXY_CGROUP == 0,
    );
    assert_eq!(w.flags & redirector_common::flags::MATCH_PROXY_CGROUP, 0, "{}", agent.proc.log_text());
    uid_only("after the proxy container stopped");
    drop(agent);
}

/// The gate checks that the registering pod is inside the cgroup the agent
/// attaches to: a pod outside it (its processes would not be redirected)
/// is refused with the reason, one inside is programmed. Then `cleanup
/// --force` under the running agent: it names the pin directory gone and
/// exits non-zero, not "redirection stays in force".
#[test]
fn kube_gate_checks_the_attach_cgroup_and_removed_pins_stop_the_agent() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let attach = cgroup.path.join("attach");
    std::fs::create_dir_all(&attach).unwrap();
    // Removed after the pods' groups (dropped in reverse order).
    struct Rmdir(PathBuf);
    impl Drop for Rmdir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _attach_dir = Rmdir(attach.clone());
    let pins = PinDir::new().unwrap();
    let scratch = Scratch(tmpdir("kube3"));
    let dir = scratch.0.clone();
    let api = FakeApi::start(&[Resource::pods(), Resource::configmaps()]).unwrap();
    api.put(&Resource::configmaps(), configmap("preset: osm\n"));
    let inside = Pod::create(&api, &attach, "kg", "g", "Pending", json!({}));
    let outside = Pod::create(&api, &cgroup.path, "kh", "h", "Pending", json!({}));
    let mut agent = KubeAgent::start(&api, &attach, &pins.path, &dir, "agent.log");

    let out = outside.init_container(&agent.socket);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the gate opened for a pod outside the attach cgroup: {err}");
    assert!(
        err.contains(&format!("pod UID {}: the connecting process", outside.uid))
            && err.contains(&format!(
                "/kubepods/burstable/pod{}/ctr) is outside the cgroup the agent attaches its programs to ({})",
                outside.uid,
                attach.display()
            )),
        "{err}\nagent log:\n{}",
        agent.proc.log_text()
    );
    assert!(!programmed(&pins.path, outside.cookie()), "a pod outside the attach cgroup was programmed");

    let out = inside.init_container(&agent.socket);
    assert!(
        out.status.success(),
        "{}{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        agent.proc.log_text()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("shop/g is programmed"));
    assert!(programmed(&pins.path, inside.cookie()));

    let out = Command::new(bin()).args(["cleanup", "--force", "--pin-dir"]).arg(&pins.path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = poll_until(|| agent.proc.child.try_wait().unwrap(), |s| s.is_some());
    let log = agent.proc.log_text();
    assert!(status.is_some_and(|s| !s.success()), "agent did not exit with an error ({status:?}):\n{log}");
    assert!(
        log.contains(&format!("ERROR redirector::k8s::agent: pin directory {} is gone", pins.path.display())),
        "{log}"
    );
    assert!(!log.contains("redirection stays in force"), "{log}");
    drop(agent);
}
