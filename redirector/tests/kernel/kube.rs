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

pub(super) const NODE: &str = "node-1";
const PORTS: &str = "openservicemesh.io/outbound-port-exclusion-list";
const RBAC: &str = include_str!("../../../deploy/agent/rbac.yaml");

/// How the runtime of a node lays a pod's containers out in cgroup v2 (the
/// test builds it under its test cgroup). From the upstream sources:
/// - kubelet (kubernetes/kubernetes `pkg/kubelet/cm`): the pod's cgroup is
///   `pod<UID>` (`GetPodCgroupNameSuffix`) under its QoS class's,
///   `kubepods/burstable/pod<UID>` with the cgroupfs driver; the systemd
///   driver writes each `-` of a name as `_` and joins the path into
///   slices (`ConvertCgroupNameToSystemd`):
///   `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<UID_>.slice`;
/// - containerd (`getCgroupsPath`): the container's cgroup is the pod's
///   joined with its ID (cgroupfs), or runc's `<slice>:cri-containerd:<ID>`,
///   the scope `cri-containerd-<ID>.scope` (systemd);
/// - CRI-O (`internal/config/cgmgr`): `crio-<ID>` (cgroupfs) or
///   `crio-<ID>.scope` (systemd); with `conmon_cgroup = "pod"` its conmon
///   is moved into the pod's cgroup, `crio-conmon-<ID>` (cgroupfs,
///   `MoveConmonToCgroup`) or `crio-conmon-<ID>.scope` (systemd), while it
///   stays in the node's network namespace; crun puts a container's
///   processes one level down, in `crio-<ID>.scope/container`
///   (`crunContainerCgroupManager`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Layout {
    ContainerdCgroupfs,
    ContainerdSystemd,
    CrioCgroupfs,
    CrioSystemd,
    /// CRI-O with crun and the systemd driver.
    CrioSystemdCrun,
}

impl Layout {
    pub(super) const ALL: [Layout; 5] = [
        Layout::ContainerdCgroupfs,
        Layout::ContainerdSystemd,
        Layout::CrioCgroupfs,
        Layout::CrioSystemd,
        Layout::CrioSystemdCrun,
    ];

    fn systemd(self) -> bool {
        !matches!(self, Layout::ContainerdCgroupfs | Layout::CrioCgroupfs)
    }

    pub(super) fn is_crio(self) -> bool {
        matches!(self, Layout::CrioCgroupfs | Layout::CrioSystemd | Layout::CrioSystemdCrun)
    }

    /// The scheme of `status.containerStatuses[].containerID`.
    pub(super) fn scheme(self) -> &'static str {
        if self.is_crio() {
            "cri-o"
        } else {
            "containerd"
        }
    }

    /// The pod's cgroup, relative to the kubelet's root.
    fn pod_dir(self, uid: &str) -> PathBuf {
        if self.systemd() {
            let u = uid.replace('-', "_");
            PathBuf::from(format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"))
        } else {
            PathBuf::from(format!("kubepods/burstable/pod{uid}"))
        }
    }

    /// Container `id`'s cgroup under the pod's, and where its processes
    /// are (a child of it with crun).
    fn container_dirs(self, id: &str) -> (String, Option<&'static str>) {
        match self {
            Layout::ContainerdCgroupfs => (id.to_string(), None),
            Layout::ContainerdSystemd => (format!("cri-containerd-{id}.scope"), None),
            Layout::CrioCgroupfs => (format!("crio-{id}"), None),
            Layout::CrioSystemd => (format!("crio-{id}.scope"), None),
            Layout::CrioSystemdCrun => (format!("crio-{id}.scope"), Some("container")),
        }
    }

    /// The cgroup of container `id`'s conmon (CRI-O only).
    fn conmon_dir(self, id: &str) -> Option<String> {
        match self {
            Layout::CrioCgroupfs => Some(format!("crio-conmon-{id}")),
            Layout::CrioSystemd | Layout::CrioSystemdCrun => Some(format!("crio-conmon-{id}.scope")),
            Layout::ContainerdCgroupfs | Layout::ContainerdSystemd => None,
        }
    }
}

/// A container ID as the runtimes write them (64 hex digits), stable for
/// a pod UID and container name.
pub(super) fn container_id(pod_uid: &str, name: &str) -> String {
    use std::hash::{Hash as _, Hasher as _};
    (0..4u8)
        .map(|i| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (pod_uid, name, i).hash(&mut h);
            format!("{:016x}", h.finish())
        })
        .collect()
}

/// A pod's cgroups in a runtime's [`Layout`], under the test cgroup; its
/// processes are killed and the groups removed on drop.
pub(super) struct PodCgroup {
    /// Every directory created (shared parents of other pods included:
    /// they are only removed once empty).
    dirs: Vec<PathBuf>,
    pod: PathBuf,
    layout: Layout,
    /// Where the init container's processes are.
    init_procs: PathBuf,
}

impl PodCgroup {
    fn new(parent: &Path, uid: &str, layout: Layout) -> Self {
        let rel = layout.pod_dir(uid);
        let mut dirs = Vec::new();
        let mut at = parent.to_path_buf();
        for c in rel.components() {
            at.push(c);
            dirs.push(at.clone());
        }
        std::fs::create_dir_all(&at).unwrap();
        let mut cg = Self { dirs, pod: at, layout, init_procs: PathBuf::new() };
        cg.init_procs = cg.container(&container_id(uid, "redirector-init")).join("cgroup.procs");
        cg
    }

    pub(super) fn layout(&self) -> Layout {
        self.layout
    }

    /// The pod's own cgroup.
    pub(super) fn pod_dir(&self) -> PathBuf {
        self.pod.clone()
    }

    /// The cgroup container `id`'s processes are in (created).
    pub(super) fn container(&mut self, id: &str) -> PathBuf {
        let (dir, leaf) = self.layout.container_dirs(id);
        let mut at = self.pod.join(dir);
        self.dirs.push(at.clone());
        if let Some(leaf) = leaf {
            at.push(leaf);
            self.dirs.push(at.clone());
        }
        std::fs::create_dir_all(&at).unwrap();
        at
    }

    /// The cgroup of container `id`'s conmon (created; CRI-O layouts).
    pub(super) fn conmon(&mut self, id: &str) -> PathBuf {
        let dir = self.pod.join(self.layout.conmon_dir(id).expect("conmon is CRI-O's"));
        std::fs::create_dir_all(&dir).unwrap();
        self.dirs.push(dir.clone());
        dir
    }

    /// A command that joins the init container's cgroup between fork and
    /// exec (so the process is in the pod from its first instruction).
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        join_cgroup_before_exec(&mut c, &self.init_procs, None);
        c
    }
}

/// Makes `c`'s process join the cgroup whose `cgroup.procs` is `procs`,
/// and the network namespace `netns` if given, between fork and exec.
pub(super) fn join_cgroup_before_exec(c: &mut Command, procs: &Path, netns: Option<std::fs::File>) {
    enter_before_exec(c, procs, netns, false);
}

/// [`join_cgroup_before_exec`], then, with `new_userns`, a new user
/// namespace (its maps are written by the parent, as a runtime does).
fn enter_before_exec(c: &mut Command, procs: &Path, netns: Option<std::fs::File>, new_userns: bool) {
    let path = CString::new(procs.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: only async-signal-safe calls (open, write, close, setns) on
    // a path and a file opened before the fork.
    unsafe {
        c.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            if let Some(ns) = &netns {
                if libc::setns(std::os::fd::AsRawFd::as_raw_fd(ns), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if new_userns && libc::unshare(libc::CLONE_NEWUSER) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A `sleep` in `cgroup` and network namespace `netns`, as a container's
/// (or conmon's) process is.
pub(super) fn sleeper(cgroup: &Path, netns: &Path) -> Child {
    let mut c = Command::new("sleep");
    c.arg("600").stdin(Stdio::null());
    join_cgroup_before_exec(&mut c, &cgroup.join("cgroup.procs"), Some(std::fs::File::open(netns).unwrap()));
    c.spawn().unwrap()
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        // cgroup.kill kills every process of the pod's subtree.
        let _ = std::fs::write(self.pod.join("cgroup.kill"), "1");
        let mut dirs = self.dirs.clone();
        dirs.sort_by(|a, b| b.components().count().cmp(&a.components().count()).then(a.cmp(b)));
        dirs.dedup();
        for d in &dirs {
            for _ in 0..50 {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    // Shared parents of other pods stay.
                    Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) && !d.starts_with(&self.pod) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

/// A meshed pod: its namespaces (the pod and a peer with servers), the
/// proxy on 127.0.0.1:15001, its cgroups and, for a pod that "was
/// running", processes in them.
pub(super) struct Pod {
    pub(super) topo: Topology,
    pub(super) uid: String,
    pub(super) name: String,
    _proxy: Server,
    procs: Vec<Child>,
    pub(super) cg: PodCgroup,
}

impl Pod {
    pub(super) fn create(
        api: &FakeApi,
        cg_parent: &Path,
        tag: &str,
        name: &str,
        phase: &str,
        annotations: Value,
    ) -> Pod {
        Self::create_from(api, cg_parent, tag, pod_object(name, phase, annotations))
    }

    pub(super) fn create_from(api: &FakeApi, cg_parent: &Path, tag: &str, obj: Value) -> Pod {
        Self::create_with(api, cg_parent, tag, obj, Layout::ContainerdCgroupfs)
    }

    /// A pod whose runtime lays its cgroups out as `layout`. A Running pod
    /// whose object lists no container status gets one for its `app`
    /// container, running (as the kubelet reports it).
    pub(super) fn create_with(api: &FakeApi, cg_parent: &Path, tag: &str, obj: Value, layout: Layout) -> Pod {
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let topo = Topology::new(tag).unwrap();
        let proxy = Server::proxy(&topo.app.path(), "127.0.0.1:15001".parse().unwrap()).unwrap();
        let mut obj = api.put(&Resource::pods(), obj);
        let uid = obj["metadata"]["uid"].as_str().unwrap().to_string();
        let cg = PodCgroup::new(cg_parent, &uid, layout);
        let pod = Pod { topo, uid, name, _proxy: proxy, procs: Vec::new(), cg };
        if obj["status"]["phase"] == "Running" && obj["status"]["containerStatuses"].is_null() {
            obj["status"]["containerStatuses"] = json!([pod.status("app", json!({"running": {}}))]);
            api.put(&Resource::pods(), obj);
        }
        pod
    }

    /// Container `name`'s ID.
    pub(super) fn id(&self, name: &str) -> String {
        container_id(&self.uid, name)
    }

    /// A `containerStatuses` entry of container `name` in `state`.
    pub(super) fn status(&self, name: &str, state: Value) -> Value {
        json!({"name": name, "image": name, "imageID": "", "ready": true, "restartCount": 0,
               "containerID": format!("{}://{}", self.cg.layout.scheme(), self.id(name)), "state": state})
    }

    /// Starts a process in the pod's `app` container (its cgroup and the
    /// pod's network namespace), as if the pod was running before the
    /// agent; returns its PID.
    pub(super) fn run_process(&mut self) -> u32 {
        let cgroup = self.cg.container(&self.id("app"));
        self.run_in(&cgroup, &self.topo.app.path())
    }

    /// Starts a process in `cgroup` and network namespace `netns`, in a
    /// user namespace of its own whose uid_map and gid_map are `map`, as
    /// the runtime starts a `hostUsers: false` pod's containers (the
    /// kubelet gives each such pod one map `0 <multiple of 65536> 65536`
    /// for UIDs and GIDs, kubernetes/kubernetes
    /// `pkg/kubelet/userns/userns_manager.go`); returns its PID.
    pub(super) fn run_in_user_namespace(&mut self, cgroup: &Path, netns: &Path, map: &str) -> u32 {
        let mut c = Command::new("sleep");
        c.arg("600").stdin(Stdio::null());
        enter_before_exec(&mut c, &cgroup.join("cgroup.procs"), Some(std::fs::File::open(netns).unwrap()), true);
        let child = c.spawn().unwrap();
        let pid = child.id();
        self.procs.push(child);
        for file in ["uid_map", "gid_map"] {
            std::fs::write(format!("/proc/{pid}/{file}"), format!("{map}\n")).unwrap();
        }
        pid
    }

    /// Starts a process in `cgroup` and network namespace `netns`, killed
    /// with the pod; returns its PID.
    pub(super) fn run_in(&mut self, cgroup: &Path, netns: &Path) -> u32 {
        let child = sleeper(cgroup, netns);
        let pid = child.id();
        self.procs.push(child);
        pid
    }

    pub(super) fn cookie(&self) -> u64 {
        netns_cookie(&self.topo.app.path()).unwrap()
    }

    pub(super) fn probe(&self, dst: &str) -> String {
        testkit::probe(&self.topo.app.path(), 1000, Proto::Tcp, dst.parse().unwrap()).unwrap()
    }

    pub(super) fn probe_until(&self, dst: &str, pred: impl Fn(&str) -> bool) -> String {
        poll_until(|| self.probe(dst), |g| pred(g))
    }

    /// The init container: `wait-ready --agent-socket` inside the pod's
    /// network namespace and cgroup.
    pub(super) fn init_container(&self, socket: &Path) -> std::process::Output {
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
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(super) fn pod_object(name: &str, phase: &str, annotations: Value) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "shop", "labels": {"osm-proxy-uuid": format!("{name}-proxy")},
                     "annotations": annotations},
        "spec": {"nodeName": NODE, "initContainers": [gate_container()],
                 "containers": [{"name": "app", "image": "app"}, {"name": "envoy", "image": "envoy"}]},
        "status": {"phase": phase}
    })
}

/// The redirector gate as `deploy/init-container.yaml` has it: what makes
/// a pod a sidecar workload once its mesh's init container is swapped.
pub(super) fn gate_container() -> Value {
    json!({"name": "redirector-init", "image": "redirector",
           "command": ["redirector", "wait-ready", "--agent-socket=/var/run/redirector/agent.sock", "--timeout=60s"]})
}

fn set_annotation(api: &FakeApi, pod: &Pod, value: &str) {
    let mut obj = api.get(&Resource::pods(), "shop", &pod.name).unwrap();
    obj["metadata"]["annotations"][PORTS] = json!(value);
    api.put(&Resource::pods(), obj);
}

pub(super) fn configmap(mesh_yaml: &str) -> Value {
    json!({"metadata": {"name": "redirector-config", "namespace": "redirector-system"}, "data": {"mesh.yaml": mesh_yaml}})
}

fn meshconfig(exclusions: &[&str]) -> Value {
    json!({"metadata": {"name": "osm-mesh-config", "namespace": "osm-system"},
           "spec": {"traffic": {"outboundIPRangeExclusionList": exclusions, "enableEgress": true}}})
}

/// A scratch directory, removed on drop (also when the test fails).
pub(super) struct Scratch(pub(super) PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `redirector run --kube` process against the fake server.
pub(super) struct KubeAgent {
    pub(super) proc: AgentProcess,
    pub(super) socket: PathBuf,
    status: SocketAddr,
}

impl KubeAgent {
    pub(super) fn start(api: &FakeApi, cgroup: &Path, pins: &Path, dir: &Path, log: &str) -> KubeAgent {
        Self::start_with(api, cgroup, pins, dir, log, &[])
    }

    pub(super) fn start_with(
        api: &FakeApi,
        cgroup: &Path,
        pins: &Path,
        dir: &Path,
        log: &str,
        extra: &[&str],
    ) -> KubeAgent {
        let agent = Self::spawn(api, cgroup, pins, dir, log, extra);
        let ready = poll_until(|| agent.get("/readyz"), |(code, _)| *code == 200);
        assert_eq!(ready.0, 200, "agent not ready: {}\nlog:\n{}", ready.1, agent.proc.log_text());
        agent
    }

    /// Starts the agent without waiting for it to be ready.
    pub(super) fn spawn(api: &FakeApi, cgroup: &Path, pins: &Path, dir: &Path, log: &str, extra: &[&str]) -> KubeAgent {
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
        // The node's namespace is this test's (the machine's own); PID 1
        // may be a supervisor's that cannot be inspected.
        if !extra.contains(&"--node-netns") {
            args.extend(["--node-netns".into(), format!("/proc/{}/ns/net", std::process::id()).into()]);
        }
        args.extend(extra.iter().map(OsString::from));
        let proc =
            AgentProcess::spawn(bin(), &args, &[("KUBECONFIG", kubeconfig.as_os_str())], &dir.join(log)).unwrap();
        KubeAgent { proc, socket, status }
    }

    /// GET on the status endpoint: (status code, body).
    pub(super) fn get(&self, path: &str) -> (u16, String) {
        let Ok(mut s) = TcpStream::connect(self.status) else { return (0, "not listening".into()) };
        let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (code, body)
    }
}

pub(super) fn events_for<'a>(events: &'a [Value], name: &str, reason: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["regarding"]["name"] == name && e["reason"] == reason).collect()
}

pub(super) fn programmed(pins: &Path, cookie: u64) -> bool {
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

/// deploy/agent/rbac.yaml's rules: (namespace of a Role or None, rule).
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

/// Every request the agent made is allowed by deploy/agent/rbac.yaml, and (with
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
    assert!(denied.is_empty(), "requests deploy/agent/rbac.yaml does not allow:\n{}", denied.join("\n"));
    // The mesh's own ConfigMaps are read with presets istio and linkerd
    // only: `kube_agent_applies_the_meshs_own_settings_live` needs them.
    let mesh_wide = |r: &PolicyRule| r.resource_names.as_ref().is_some_and(|n| n.iter().any(|n| n == "linkerd-config"));
    let unused: Vec<String> = rules
        .iter()
        .zip(&used)
        .filter(|((_, r), u)| !**u && !mesh_wide(r))
        .map(|((ns, r), _)| format!("{ns:?} {:?} {:?} {:?}", r.api_groups, r.resources, r.verbs))
        .collect();
    assert!(
        !all_needed || unused.is_empty(),
        "rules in deploy/agent/rbac.yaml no request needed:\n{}",
        unused.join("\n")
    );
}

/// Every list (first lists and relists) is served from the watch cache:
/// `resourceVersion=0&resourceVersionMatch=NotOlderThan`, not a quorum
/// read.
fn check_lists_use_the_watch_cache(served: &[Served]) {
    let lists: Vec<&Served> = served.iter().filter(|r| r.verb == "list").collect();
    assert!(!lists.is_empty());
    for r in lists {
        assert_eq!(
            (r.resource_version.as_deref(), r.resource_version_match.as_deref()),
            (Some("0"), Some("NotOlderThan")),
            "a quorum list: {r:?}"
        );
    }
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

    // The node carries the start-up taint (and another one).
    let other_taint = json!({"key": "example.com/maintenance", "value": "x", "effect": "NoSchedule"});
    api.put(
        &Resource::nodes(),
        json!({"metadata": {"name": NODE}, "spec": {"taints": [
            {"key": "redirector.dev/agent-not-ready", "effect": "NoSchedule"}, other_taint.clone()]}}),
    );

    // Pod A runs before the agent starts.
    let mut a = Pod::create(&api, &cgroup.path, "ka", "a", "Running", json!({}));
    a.run_process();
    let mut agent =
        KubeAgent::start_with(&api, &cgroup.path, &pins.path, &dir, "agent1.log", &["--event-refresh", "2s"]);
    let log = |agent: &KubeAgent| agent.proc.log_text();
    // Ready: the start-up taint goes, the other stays.
    let taints = poll_until(
        || api.get(&Resource::nodes(), "", NODE).unwrap()["spec"]["taints"].clone(),
        |t| t.as_array().is_some_and(|t| t.len() == 1),
    );
    assert_eq!(taints, json!([other_taint]), "{}", log(&agent));
    assert!(
        api.served().iter().any(|r| r.resource == "nodes"
            && r.verb == "patch"
            && r.status == 200
            && r.content_type.as_deref() == Some("application/json-patch+json")),
        "{:#?}",
        api.served()
    );
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
    // While it lasts, its Event is refreshed (--event-refresh 2s): a
    // series update the strict server accepts.
    let eighty = |e: &Value| e["note"].as_str().unwrap_or("").contains("eighty");
    let events =
        poll_until(|| api.events(), |e| e.iter().any(|x| eighty(x) && x["series"]["count"].as_i64().unwrap_or(0) >= 2));
    let ev = events.iter().find(|x| eighty(x)).unwrap();
    assert!(ev["series"]["count"].as_i64().unwrap_or(0) >= 2, "not refreshed: {ev:#}\n{}", log(&agent));
    assert!(ev["series"]["lastObservedTime"].is_string(), "{ev:#}");
    assert_eq!(ev["regarding"]["uid"], json!(b.uid), "kubectl describe finds Events by the object's UID");
    // The API server's --event-ttl expires it while the problem lasts: the
    // next refresh finds it gone (404) and publishes it again, new name.
    let expired = ev["metadata"]["name"].as_str().unwrap().to_string();
    api.delete(&Resource::events(), ev["metadata"]["namespace"].as_str().unwrap(), &expired);
    let events = poll_until(
        || api.events(),
        |e| e.iter().any(|x| eighty(x) && x["metadata"]["name"].as_str() != Some(expired.as_str())),
    );
    let renewed = events
        .iter()
        .find(|x| eighty(x) && x["metadata"]["name"].as_str() != Some(expired.as_str()))
        .unwrap_or_else(|| panic!("an expired Event was not published again: {events:#?}\n{}", log(&agent)));
    assert_eq!(renewed["regarding"]["uid"], json!(b.uid), "{renewed:#}");
    assert_eq!(renewed["reason"], "InvalidAnnotation", "{renewed:#}");
    assert!(log(&agent).contains("expired while its problem lasts"), "{}", log(&agent));
    // A note past 1024 bytes of 2-byte characters: cut on a character
    // boundary, and accepted by the server (which refuses 1025 bytes).
    let wide = "é".repeat(700);
    set_annotation(&api, &b, &wide);
    let events = poll_until(
        || api.events(),
        |e| events_for(e, "b", "InvalidAnnotation").iter().any(|x| x["note"].as_str().unwrap_or("").contains("éé")),
    );
    let ev = events_for(&events, "b", "InvalidAnnotation")
        .into_iter()
        .find(|x| x["note"].as_str().unwrap_or("").contains("éé"))
        .unwrap_or_else(|| panic!("no Event for a long note: {events:#?}\n{}", log(&agent)));
    let note = ev["note"].as_str().unwrap();
    assert!(note.len() <= 1024 && note.len() > 1020, "note of {} bytes", note.len());
    assert!(
        !api.served().iter().any(|r| r.resource == "events" && r.status == 422),
        "the server refused an Event: {:#?}",
        api.served().iter().filter(|r| r.status >= 400).collect::<Vec<_>>()
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
    let cm_uid =
        api.get(&Resource::configmaps(), "redirector-system", "redirector-config").unwrap()["metadata"]["uid"].clone();
    assert_eq!(ev[0]["regarding"]["uid"], cm_uid, "{events:#?}");
    assert!(a.probe("192.0.2.10:7070").starts_with("direct"), "last good mesh settings lost");
    api.put(&Resource::configmaps(), configmap("preset: osm\n"));
    // A bad MeshConfig: the Event is regarding the MeshConfig, by its UID
    // and API version; the last good settings stay.
    let mc = api.put(&Resource::meshconfigs(), meshconfig(&["192.0.2.0/33"]));
    let events = poll_until(|| api.events(), |e| !events_for(e, "osm-mesh-config", "InvalidMeshConfig").is_empty());
    let ev = events_for(&events, "osm-mesh-config", "InvalidMeshConfig");
    assert!(!ev.is_empty() && ev[0]["note"].as_str().unwrap().contains("192.0.2.0/33"), "{events:#?}");
    assert_eq!(ev[0]["regarding"]["uid"], mc["metadata"]["uid"], "{:#}", ev[0]);
    assert_eq!(ev[0]["regarding"]["kind"], "MeshConfig", "{:#}", ev[0]);
    assert_eq!(ev[0]["regarding"]["apiVersion"], "config.openservicemesh.io/v1alpha2", "{:#}", ev[0]);
    assert!(a.probe("192.0.2.10:7070").starts_with("direct"), "a bad MeshConfig dropped the last good settings");
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
    check_lists_use_the_watch_cache(&served);
    for e in api.events() {
        assert_eq!(e["reportingController"], "redirector.dev/agent", "{e:#}");
        assert!(e["regarding"]["uid"].is_string(), "{e:#}");
    }
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
    obj["spec"]["initContainers"] = json!([]);
    let plain = Pod::create_from(&api, &cgroup.path, "ke", obj);
    let out = plain.init_container(&agent.socket);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not a sidecar workload"), "status {}, stderr: {err}", out.status);
    assert!(!programmed(&pins.path, plain.cookie()));
    check_rbac(&api.served(), false);
    drop(agent);
}

/// Runs `f` with this whole (single-threaded test) process moved into
/// `cgroup`, as a container's processes are; moved back to `home` after,
/// also if `f` panics.
pub(super) fn in_cgroup<T>(cgroup: &Path, home: &Path, f: impl FnOnce() -> T) -> T {
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
    proxy_identified_by_its_cgroup(Layout::ContainerdCgroupfs, "kf", false);
}

/// The body of the `--proxy-identity cgroup` tests, on a runtime's
/// `layout`. With CRI-O the proxy container's conmon is in the pod's
/// cgroup too (in `crio-conmon-<ID>`, named by the same ID): it is never
/// taken for the proxy. With `native`, the proxy is a native sidecar (in
/// `initContainers` with `restartPolicy: Always`, its status in
/// `initContainerStatuses`, as Istio, Linkerd and Kuma inject it now) and
/// the pod is meshed only by the rule `container:envoy`.
pub(super) fn proxy_identified_by_its_cgroup(layout: Layout, tag: &str, native: bool) {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let scratch = Scratch(tmpdir(tag));
    let dir = scratch.0.clone();
    let api = FakeApi::start(&[Resource::pods(), Resource::configmaps()]).unwrap();
    api.put(&Resource::configmaps(), configmap("preset: osm\nproxyUID: 1500\n"));
    // Running, the proxy container not started yet.
    let mut obj = pod_object("f", "Running", json!({}));
    if native {
        obj["metadata"]["labels"] = json!({});
        obj["spec"]["containers"] = json!([{"name": "app", "image": "app"}]);
        obj["spec"]["initContainers"] = json!([
            gate_container(),
            {"name": "envoy", "image": "envoy", "restartPolicy": "Always"}
        ]);
    }
    let mut a = Pod::create_with(&api, &cgroup.path, tag, obj, layout);
    a.run_process();
    let app_cg = a.cg.container(&a.id("app"));
    let envoy_id = a.id("envoy");
    if layout.is_crio() {
        a.cg.conmon(&envoy_id);
    }
    let envoy_cg = a.cg.container(&envoy_id);
    let mut flags = vec!["--proxy-identity", "cgroup"];
    if native {
        flags.extend(["--meshed-when", "container:envoy"]);
    }
    let agent = KubeAgent::start_with(&api, &cgroup.path, &pins.path, &dir, "agent.log", &flags);
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
        obj["status"]["containerStatuses"] = json!([a.status("app", json!({"running": {}})), a.status("envoy", envoy)]);
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
    assert_eq!(
        w.proxy_cgroup_id,
        ino,
        "not the cgroup the envoy container's processes are in ({})\n{}",
        envoy_cg.display(),
        agent.proc.log_text()
    );
    let spoof = probe(&app_cg, 1500);
    assert!(spoof.starts_with("proxy 192.0.2.10:80"), "an app process running as UID 1500 went direct: {spoof}");
    assert!(probe(&envoy_cg, 1500).starts_with("direct"), "the proxy container was redirected");
    assert!(probe(&envoy_cg, 1000).starts_with("direct"), "the proxy container is its cgroup, whatever the UID");
    assert!(probe(&app_cg, 1000).starts_with("proxy"), "the application not redirected");
    let log = agent.proc.log_text();
    assert!(log.contains(&format!("proxy container `envoy` ({envoy_id}) identified by its cgroup")), "{log}");

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

/// OSM's MeshConfig CRD is not installed, and the API server starts with
/// a burst of 503s (the first error is not the 404): the agent is ready
/// anyway. A CRD installed later is seen; one deleted is let go.
#[test]
fn kube_meshconfig_crd_missing_then_installed_then_removed() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let scratch = Scratch(tmpdir("kube-crd"));
    let dir = scratch.0.clone();
    let api = FakeApi::start(&[Resource::pods(), Resource::configmaps()]).unwrap();
    api.put(&Resource::configmaps(), configmap("preset: osm\n"));
    let mut a = Pod::create(&api, &cgroup.path, "kg", "g", "Running", json!({}));
    a.run_process();
    api.fail_next(6, 503);
    let agent =
        KubeAgent::start_with(&api, &cgroup.path, &pins.path, &dir, "agent.log", &["--meshconfig-recheck", "1s"]);
    let log = || agent.proc.log_text();
    let got = a.probe_until("192.0.2.10:7070", |g| g.starts_with("proxy"));
    assert!(got.starts_with("proxy 192.0.2.10:7070"), "{}", log());
    let not_found = |s: &[Served]| {
        s.iter().filter(|r| r.resource == "meshconfigs" && (r.verb == "list" || r.verb == "watch")).count()
    };
    assert!(not_found(&api.served()) >= 1, "the MeshConfig was never looked for");

    // Installed later: its lists apply within --meshconfig-recheck.
    api.install(&Resource::meshconfigs());
    api.put(&Resource::meshconfigs(), meshconfig(&["192.0.2.0/24"]));
    let got = a.probe_until("192.0.2.10:7070", |g| g.starts_with("direct"));
    assert!(got.starts_with("direct"), "a MeshConfig CRD installed later not seen: {got}\n{}", log());
    assert!(log().contains("served now"), "{}", log());

    // Deleted: its objects go, then it is not served; the ConfigMap alone
    // is the mesh settings again, and the agent stays ready.
    api.uninstall(&Resource::meshconfigs());
    let got = a.probe_until("192.0.2.10:7070", |g| g.starts_with("proxy"));
    assert!(got.starts_with("proxy 192.0.2.10:7070"), "a deleted MeshConfig still applies: {got}\n{}", log());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(agent.get("/readyz").0, 200, "{}", log());
    let before = not_found(&api.served());
    std::thread::sleep(Duration::from_secs(3));
    assert!(not_found(&api.served()) > before, "a removed CRD is not looked for again");
    check_lists_use_the_watch_cache(&api.served());
    check_rbac(&api.served(), false);
    drop(agent);
}

/// With another preset than osm the MeshConfig is never read, and a
/// `--meshconfig` given anyway is warned about; the ConfigMap switching to
/// osm starts reading it.
#[test]
fn kube_meshconfig_only_with_preset_osm() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let scratch = Scratch(tmpdir("kube-preset"));
    let dir = scratch.0.clone();
    let api = FakeApi::start(&[Resource::pods(), Resource::configmaps(), Resource::meshconfigs()]).unwrap();
    api.put(&Resource::configmaps(), configmap("preset: istio\n"));
    api.put(&Resource::meshconfigs(), meshconfig(&["192.0.2.0/24"]));
    let agent = KubeAgent::start_with(
        &api,
        &cgroup.path,
        &pins.path,
        &dir,
        "agent.log",
        &["--meshconfig", "osm-system/osm-mesh-config"],
    );
    let reads = |api: &FakeApi| api.served().iter().filter(|r| r.resource == "meshconfigs").count();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(reads(&api), 0, "the MeshConfig was read with preset istio");
    let log = agent.proc.log_text();
    assert!(log.contains("option --meshconfig") && log.contains("the preset is istio"), "{log}");
    api.put(&Resource::configmaps(), configmap("preset: osm\n"));
    let n = poll_until(|| reads(&api), |n| *n > 0);
    assert!(n > 0, "preset osm: the MeshConfig is not read\n{}", agent.proc.log_text());
    drop(agent);
}

/// The ConfigMap deleted, its `mesh.yaml` removed, or its preset dropped:
/// the last good settings stay (never OSM's defaults), with an Event on
/// the ConfigMap saying which settings are kept.
#[test]
fn kube_configmap_deleted_keeps_the_last_good_settings() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let scratch = Scratch(tmpdir("kube-cm"));
    let dir = scratch.0.clone();
    let api = FakeApi::start(&[Resource::pods(), Resource::configmaps()]).unwrap();
    let cm = api.put(&Resource::configmaps(), configmap("preset: osm\noutboundPortExclusionList: [7070]\n"));
    let cm_uid = cm["metadata"]["uid"].clone();
    let mut a = Pod::create(&api, &cgroup.path, "kh", "h", "Running", json!({}));
    a.run_process();
    let agent = KubeAgent::start(&api, &cgroup.path, &pins.path, &dir, "agent.log");
    let log = || agent.proc.log_text();
    let got = a.probe_until("192.0.2.10:7070", |g| g.starts_with("direct"));
    assert!(got.starts_with("direct"), "{}", log());

    let mesh_events = |want: &str| {
        let events = poll_until(
            || api.events(),
            |e| {
                events_for(e, "redirector-config", "InvalidMeshConfig")
                    .iter()
                    .any(|x| x["note"].as_str().unwrap_or("").contains(want))
            },
        );
        events_for(&events, "redirector-config", "InvalidMeshConfig")
            .into_iter()
            .find(|x| x["note"].as_str().unwrap_or("").contains(want))
            .cloned()
            .unwrap_or_else(|| panic!("no InvalidMeshConfig Event with {want:?}: {events:#?}\n{}", log()))
    };
    api.delete(&Resource::configmaps(), "redirector-system", "redirector-config");
    let ev = mesh_events("does not exist");
    let note = ev["note"].as_str().unwrap();
    assert!(note.contains("keeping the last good mesh settings (preset osm"), "{note}");
    assert_eq!(ev["regarding"]["uid"], cm_uid, "the Event names the deleted ConfigMap by its UID");
    assert_eq!(ev["type"], "Warning");
    assert!(a.probe("192.0.2.10:7070").starts_with("direct"), "the last good settings were dropped");
    assert!(log().contains("does not exist"), "{}", log());

    api.put(
        &Resource::configmaps(),
        json!({"metadata": {"name": "redirector-config", "namespace": "redirector-system"},
                                              "data": {"other": "x"}}),
    );
    mesh_events("key `mesh.yaml` is missing");
    api.put(&Resource::configmaps(), configmap("outboundPortExclusionList: []\n"));
    mesh_events("key `preset` is missing");
    assert!(a.probe("192.0.2.10:7070").starts_with("direct"), "a mesh.yaml without a preset applied");
    assert_eq!(agent.get("/readyz").0, 200, "the last good settings are in force: ready");

    api.put(&Resource::configmaps(), configmap("preset: osm\n"));
    let got = a.probe_until("192.0.2.10:7070", |g| g.starts_with("proxy"));
    assert!(got.starts_with("proxy 192.0.2.10:7070"), "{}", log());
    drop(agent);
}

/// RBAC not there yet (403), then granted: the agent becomes ready and
/// programs the node's pods. A burst of 5xx: it recovers and applies the
/// next change. The pod watch failing: not ready until it works again.
#[test]
fn kube_agent_recovers_from_403_and_5xx() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let scratch = Scratch(tmpdir("kube-rbac"));
    let dir = scratch.0.clone();
    let api = FakeApi::start(&[Resource::pods(), Resource::configmaps()]).unwrap();
    api.put(&Resource::configmaps(), configmap("preset: osm\n"));
    let mut a = Pod::create(&api, &cgroup.path, "ki", "i", "Running", json!({}));
    a.run_process();
    api.forbid(&[Resource::pods(), Resource::configmaps(), Resource::events(), Resource::nodes()]);
    let agent = KubeAgent::spawn(&api, &cgroup.path, &pins.path, &dir, "agent.log", &[]);
    let log = || agent.proc.log_text();
    std::thread::sleep(Duration::from_secs(3));
    let (code, body) = agent.get("/readyz");
    assert_eq!(code, 503, "ready without access to the pods: {body}\n{}", log());
    assert!(!programmed(&pins.path, a.cookie()));
    assert!(api.served().iter().any(|r| r.status == 403), "the server never refused");

    api.forbid(&[]);
    let ready = poll_until(|| agent.get("/readyz"), |(c, _)| *c == 200);
    assert_eq!(ready.0, 200, "not ready once RBAC is granted: {}\n{}", ready.1, log());
    let got = a.probe_until("192.0.2.10:80", |g| g.starts_with("proxy"));
    assert!(got.starts_with("proxy 192.0.2.10:80"), "{}", log());

    // A burst of 500s with every watch dropped: the next change applies.
    api.fail_next(8, 500);
    api.drop_watches();
    set_annotation(&api, &a, "80");
    let got = a.probe_until("192.0.2.10:80", |g| g.starts_with("direct"));
    assert!(got.starts_with("direct"), "a change after a 5xx burst not applied: {got}\n{}", log());
    assert!(api.served().iter().any(|r| r.status == 500));

    // The pod watch keeps failing: not ready, saying why.
    api.forbid(&[Resource::pods()]);
    api.drop_watches();
    let (code, body) = poll_until(|| agent.get("/readyz"), |(c, _)| *c == 503);
    assert_eq!(code, 503, "ready while the pod watch fails\n{}", log());
    assert!(body.contains("watch of pods") && body.contains("errors in a row"), "{body}");
    // Access again: the next pod event makes it ready.
    api.forbid(&[]);
    set_annotation(&api, &a, "");
    let ready = poll_until(|| agent.get("/readyz"), |(c, _)| *c == 200);
    assert_eq!(ready.0, 200, "not ready again after the pod watch recovered: {}\n{}", ready.1, log());
    let got = a.probe_until("192.0.2.10:80", |g| g.starts_with("proxy"));
    assert!(got.starts_with("proxy 192.0.2.10:80"), "{}", log());
    drop(agent);
}

/// On a kernel the agent refuses, `run --kube` leaves a
/// `KernelNotSupported` Event on its node, naming what is missing, then
/// exits non-zero (checked in the kernel-VM matrix's 5.10 run; on a
/// supported kernel there is nothing to refuse).
#[test]
fn kube_refused_kernel_leaves_an_event_on_the_node() {
    if !super::privileged() {
        return;
    }
    testkit::ensure_bpffs().expect("bpffs");
    let missing = super::missing_features();
    if missing.is_empty() {
        println!("kernel {} is supported: nothing to refuse", redirector::sys::features::kernel_release());
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let scratch = Scratch(tmpdir("kube-refuse"));
    let dir = scratch.0.clone();
    let api = FakeApi::start(&[Resource::pods(), Resource::configmaps()]).unwrap();
    let node = api.put(&Resource::nodes(), json!({"metadata": {"name": NODE}}));
    let mut agent = KubeAgent::spawn(&api, &cgroup.path, &pins.path, &dir, "agent.log", &[]);
    let status = poll_until(|| agent.proc.child.try_wait().unwrap(), Option::is_some);
    assert!(status.is_some_and(|s| !s.success()), "the agent must refuse this kernel: {status:?}");
    let events = api.events();
    let ev = events
        .iter()
        .find(|e| e["reason"] == "KernelNotSupported")
        .unwrap_or_else(|| panic!("no KernelNotSupported Event: {events:#?}\n{}", agent.proc.log_text()));
    assert_eq!(ev["regarding"]["kind"], "Node");
    assert_eq!(ev["regarding"]["uid"], node["metadata"]["uid"]);
    assert_eq!(ev["metadata"]["namespace"], "default");
    for m in &missing {
        let name = m.split(" (Linux").next().unwrap();
        assert!(ev["note"].as_str().unwrap_or("").contains(name), "the Event names {name}: {ev:#}");
    }
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
                "/kubepods/burstable/pod{}/{}) is outside the cgroup the agent attaches its programs to ({})",
                outside.uid,
                container_id(&outside.uid, "redirector-init"),
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
    // Named as the directory, or as its pins when seen half removed.
    assert!(
        log.contains(&format!("ERROR redirector::k8s::agent: pin directory {} is gone", pins.path.display()))
            || log.contains(&format!("ERROR redirector::k8s::agent: pins {}/", pins.path.display())),
        "{log}"
    );
    assert!(!log.contains("redirection stays in force"), "{log}");
    drop(agent);
}

/// A pod as its mesh's injector wrote it: the init container's command
/// line, not the agent's mesh settings, is the policy (istio-iptables'
/// `-u` and `-o` here, under an agent whose ConfigMap says OSM); a pod
/// whose init container asks for TPROXY is left to it, with an Event
/// naming the setting; a gateway (a proxy, no init container) is not a
/// sidecar workload.
#[test]
fn kube_agent_reads_the_meshes_init_containers() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let scratch = Scratch(tmpdir("kinit"));
    let dir = scratch.0.clone();
    let api = FakeApi::start(&[Resource::pods(), Resource::configmaps()]).unwrap();
    api.put(&Resource::configmaps(), configmap("preset: osm\n"));
    let istio = |name: &str, extra: &[&str]| {
        let mut obj = pod_object(name, "Running", json!({}));
        obj["metadata"]["labels"] = json!({});
        let mut args: Vec<&str> = vec![
            "istio-iptables",
            "-p",
            "15001",
            "-z",
            "15006",
            "-i",
            "*",
            "-x",
            "",
            "-b",
            "*",
            "-d",
            "15090,15021,15020",
        ];
        args.extend(extra);
        obj["spec"]["initContainers"] = json!([{"name": "istio-init", "image": "proxyv2", "args": args}]);
        obj["spec"]["containers"] =
            json!([{"name": "app", "image": "app"}, {"name": "istio-proxy", "image": "proxyv2"}]);
        obj
    };
    let mut a = Pod::create_from(&api, &cgroup.path, "kia", istio("a", &["-u", "1337", "-o", "7070"]));
    a.run_process();
    // The probes run as UID 1000: this pod's proxy.
    let mut b = Pod::create_from(&api, &cgroup.path, "kib", istio("b", &["-u", "1000"]));
    b.run_process();
    let mut t = Pod::create_from(&api, &cgroup.path, "kit", istio("t", &["-u", "1337", "-m", "TPROXY"]));
    t.run_process();
    let mut gw_obj = istio("gw", &[]);
    gw_obj["spec"]["initContainers"] = json!([]);
    let mut gw = Pod::create_from(&api, &cgroup.path, "kig", gw_obj);
    gw.run_process();
    let agent = KubeAgent::start(&api, &cgroup.path, &pins.path, &dir, "agent.log");
    let got = a.probe_until("192.0.2.10:80", |g| g.starts_with("proxy"));
    assert!(got.starts_with("proxy 192.0.2.10:80"), "{got}: {}", agent.proc.log_text());
    assert!(a.probe("192.0.2.10:7070").starts_with("direct"), "-o 7070 not applied");
    poll_until(|| programmed(&pins.path, b.cookie()), |p| *p);
    assert!(b.probe("192.0.2.10:80").starts_with("direct"), "-u 1000: the proxy's own connection was redirected");
    let events = poll_until(|| api.events(), |e| !events_for(e, "t", "InjectorSettingRefused").is_empty());
    let refused = events_for(&events, "t", "InjectorSettingRefused");
    let note = refused.first().map(|e| e["note"].as_str().unwrap_or_default().to_string()).unwrap_or_default();
    assert!(note.contains("-m \"TPROXY\"") && note.contains("istio-init"), "{note}");
    assert!(!programmed(&pins.path, t.cookie()), "a TPROXY pod was programmed");
    assert!(t.probe("192.0.2.10:80").starts_with("direct"));
    assert!(!programmed(&pins.path, gw.cookie()), "a gateway was programmed");
    assert!(events_for(&events, "gw", "InjectorSettingRefused").is_empty());
    drop(agent);
}

/// A pod as `redirector webhook` switched it (the webhook's own answer,
/// applied as the API server applies it): its gate opens, and it is
/// programmed with the policy of the init container it recorded
/// (istio-iptables' `-u 1337 -o 7070`, under an agent whose ConfigMap
/// says OSM). The same pod with its recorded policy edited is refused at
/// the gate, with a `RecordedPolicyRefused` Event naming both sides, and
/// not programmed.
#[test]
fn kube_agent_programs_a_switched_pod_from_its_checked_record() {
    use redirector_policy::k8s::{
        admission::{review, Settings},
        injector::gated::POLICY,
    };
    use redirector_testkit::admission::{apply_response, pod_create_review};
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let scratch = Scratch(tmpdir("kswitch"));
    let dir = scratch.0.clone();
    let api = FakeApi::start(&[Resource::pods(), Resource::configmaps()]).unwrap();
    api.put(&Resource::configmaps(), configmap("preset: osm\n"));
    let switched = |name: &str| {
        let mut obj = pod_object(name, "Pending", json!({}));
        obj["metadata"]["labels"] = json!({});
        obj["spec"]["initContainers"] = json!([{"name": "istio-init", "image": "proxyv2", "args": [
            "istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-i", "*", "-x", "", "-b", "*",
            "-d", "15090,15021,15020", "-o", "7070"]}]);
        obj["spec"]["containers"] =
            json!([{"name": "app", "image": "app"}, {"name": "istio-proxy", "image": "proxyv2"}]);
        let settings = Settings {
            preset: None,
            rules: Vec::new(),
            gate_image: "redirector".into(),
            socket_dir: "/var/run/redirector".into(),
        };
        let body = serde_json::to_vec(&pod_create_review("review-1", "shop", &obj)).unwrap();
        let (resp, _) = review(&body, &settings).unwrap();
        let applied = apply_response("review-1", &obj, resp.to_string().as_bytes()).unwrap();
        assert!(applied.patched, "{resp}");
        applied.object
    };
    let mut w = Pod::create_from(&api, &cgroup.path, "ksw", switched("w"));
    let mut forged_obj = switched("f");
    let policy = forged_obj["metadata"]["annotations"][POLICY].as_str().unwrap().replace("7070", "7071");
    forged_obj["metadata"]["annotations"][POLICY] = policy.into();
    let f = Pod::create_from(&api, &cgroup.path, "ksf", forged_obj);
    let agent = KubeAgent::start(&api, &cgroup.path, &pins.path, &dir, "agent.log");

    let out = w.init_container(&agent.socket);
    assert!(
        out.status.success(),
        "{}{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        agent.proc.log_text()
    );
    w.run_process();
    assert!(w.probe("192.0.2.10:80").starts_with("proxy 192.0.2.10:80"), "{}", agent.proc.log_text());
    assert!(w.probe("192.0.2.10:7070").starts_with("direct"), "the recorded -o 7070 not applied");

    let out = f.init_container(&agent.socket);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("outbound_port_exclusions: recorded [7071], derived [7070]"),
        "{err}"
    );
    let events = poll_until(|| api.events(), |e| !events_for(e, "f", "RecordedPolicyRefused").is_empty());
    let note = events_for(&events, "f", "RecordedPolicyRefused")[0]["note"].as_str().unwrap_or_default().to_string();
    assert!(note.contains("istio-init") && note.contains(POLICY) && note.contains("recorded [7071]"), "{note}");
    assert!(!programmed(&pins.path, f.cookie()), "a pod with a forged policy was programmed");
    drop(agent);
}

/// The meshes' validators, which expect redirection in place when they
/// run, pass with the gate before them. Istio CNI's `istio-validation`
/// (istio/istio `tools/istio-iptables/pkg/validation/validator.go`): as
/// the proxy's UID (1337 in `hello.yaml.cni.injected`) it connects to
/// 127.0.0.6:15002 and passes once a listener on 127.0.0.1:15001 or
/// :15006 reads back original port 15002. Linkerd's
/// `linkerd-network-validator` (linkerd2-proxy-init `validator/`): as
/// 65534 it connects to `--connect-addr` (1.1.1.1:20001 in the golden;
/// a documentation address here) and passes once its own listener on
/// `--listen-addr 0.0.0.0:4140`, the outbound port, gets the connection.
#[test]
fn kube_mesh_validators_pass_after_the_gate() {
    if !require_kernel() {
        return;
    }
    for (preset, validator, probe_uid, listens, dst) in [
        (
            "istio",
            json!({"name": "istio-validation", "image": "proxyv2", "args": [
                "istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
                "-b", "*", "-d", "15090,15021,15020", "--run-validation", "--skip-rule-apply"]}),
            1337,
            "127.0.0.1:15006",
            "127.0.0.6:15002",
        ),
        (
            "linkerd",
            json!({"name": "linkerd-network-validator", "image": "proxy-init",
                   "command": ["/usr/lib/linkerd/linkerd2-network-validator"],
                   "args": ["--connect-addr", "192.0.2.1:20001", "--listen-addr", "0.0.0.0:4140", "--timeout", "10s"]}),
            65534,
            "0.0.0.0:4140",
            "192.0.2.1:20001",
        ),
    ] {
        let cgroup = TestCgroup::new().unwrap();
        let pins = PinDir::new().unwrap();
        let scratch = Scratch(tmpdir(&format!("kval{preset}")));
        let api = FakeApi::start(&[Resource::pods(), Resource::configmaps()]).unwrap();
        api.put(&Resource::configmaps(), configmap(&format!("preset: {preset}\n")));
        let mut obj = pod_object("v", "Running", json!({}));
        obj["metadata"]["labels"] = json!({});
        obj["spec"]["initContainers"] = json!([gate_container(), validator]);
        let mut p = Pod::create_from(&api, &cgroup.path, &format!("kv{}", &preset[..1]), obj);
        p.run_process();
        let _listener = Server::proxy(&p.topo.app.path(), listens.parse().unwrap()).unwrap();
        let agent = KubeAgent::start(&api, &cgroup.path, &pins.path, &scratch.0, "agent.log");
        // The gate returns once the pod is programmed; then the validator.
        let out = p.init_container(&agent.socket);
        assert!(out.status.success(), "{preset}: gate: {}", String::from_utf8_lossy(&out.stderr));
        let got = testkit::probe(&p.topo.app.path(), probe_uid, Proto::Tcp, dst.parse().unwrap()).unwrap();
        assert!(got.starts_with(&format!("proxy {dst}")), "{preset} validator: {got}: {}", agent.proc.log_text());
        drop(agent);
    }
}

/// The drop-in gate: the redirector binary run with the mesh's own init
/// command line (the image swapped through the mesh's knob, the command
/// kept) exits 1 while the pod is not redirected and 0 once the agent has
/// programmed it, checking it as Istio's validator does; it needs neither
/// the agent socket nor a capability beyond switching its probe thread
/// to the proxy's UID.
#[test]
fn kube_drop_in_gate_takes_the_meshes_command_lines() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let scratch = Scratch(tmpdir("kdrop"));
    let api = FakeApi::start(&[Resource::pods(), Resource::configmaps()]).unwrap();
    api.put(&Resource::configmaps(), configmap("preset: istio\n"));
    let istio_args = [
        "istio-iptables",
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-m",
        "REDIRECT",
        "-i",
        "*",
        "-x",
        "",
        "-b",
        "*",
        "-d",
        "15090,15021,15020",
    ];
    let linkerd_cmd = ["/usr/lib/linkerd/linkerd2-proxy-init"];
    let linkerd_args = [
        "--incoming-proxy-port",
        "4143",
        "--outgoing-proxy-port",
        "4140",
        "--proxy-uid",
        "2102",
        "--inbound-ports-to-ignore",
        "4190,4191",
    ];
    let pod = |name: &str, init: Value| {
        let mut obj = pod_object(name, "Running", json!({}));
        obj["metadata"]["labels"] = json!({});
        obj["spec"]["initContainers"] = json!([init]);
        obj
    };
    let mut i = Pod::create_from(
        &api,
        &cgroup.path,
        "kdi",
        pod("i", json!({"name": "istio-init", "image": "redirector", "args": istio_args})),
    );
    i.run_process();
    let mut l = Pod::create_from(
        &api,
        &cgroup.path,
        "kdl",
        pod("l", json!({"name": "linkerd-init", "image": "redirector", "command": linkerd_cmd, "args": linkerd_args})),
    );
    l.run_process();
    // The image's entrypoint is redirector: Istio's args follow it; Linkerd's
    // command is a link to it named as proxy-init's binary.
    let link = scratch.0.join("linkerd2-proxy-init");
    std::os::unix::fs::symlink(bin(), &link).unwrap();
    let gate = |p: &Pod, argv: Vec<String>, timeout: &str| {
        p.cg.command("ip")
            .args(["netns", "exec", &p.topo.app.name])
            .args(&argv)
            .env("REDIRECTOR_GATE_TIMEOUT", timeout)
            .output()
            .unwrap()
    };
    let istio_argv = || {
        std::iter::once(bin().display().to_string()).chain(istio_args.iter().map(|s| s.to_string())).collect::<Vec<_>>()
    };
    let linkerd_argv = || {
        std::iter::once(link.display().to_string())
            .chain(linkerd_args.iter().map(|s| s.to_string()))
            .collect::<Vec<_>>()
    };
    let before = gate(&i, istio_argv(), "2");
    assert!(!before.status.success(), "ready before any agent: {}", String::from_utf8_lossy(&before.stdout));
    assert!(
        String::from_utf8_lossy(&before.stderr).contains("not in force"),
        "{}",
        String::from_utf8_lossy(&before.stderr)
    );
    let agent = KubeAgent::start(&api, &cgroup.path, &pins.path, &scratch.0, "agent.log");
    poll_until(|| programmed(&pins.path, i.cookie()) && programmed(&pins.path, l.cookie()), |p| *p);
    for (p, argv) in [(&i, istio_argv()), (&l, linkerd_argv())] {
        let out = gate(p, argv, "20");
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ready"),
            "{}: {}{}\n{}",
            p.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            agent.proc.log_text()
        );
    }
    // What the agent refuses, the drop-in refuses at once.
    let mut tproxy = istio_argv();
    tproxy.extend(["-m".to_string(), "TPROXY".to_string()]);
    let out = gate(&i, tproxy, "20");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("TPROXY"));
    drop(agent);
}

/// A gated pod whose init container carries no settings, under preset
/// istio: the policy is what Istio's injector values say (read from
/// `istio-system/istio-sidecar-injector`), a change of them is in force
/// at once, bad values keep the last good ones with an Event on that
/// ConfigMap, and every request is allowed by deploy/agent/rbac.yaml.
#[test]
fn kube_agent_applies_the_meshs_own_settings_live() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let scratch = Scratch(tmpdir("kwide"));
    let dir = scratch.0.clone();
    let api = FakeApi::start(&[Resource::pods(), Resource::configmaps()]).unwrap();
    api.put(&Resource::configmaps(), configmap("preset: istio\n"));
    let values = |excluded: &str| {
        json!({"metadata": {"name": "istio-sidecar-injector", "namespace": "istio-system"},
               "data": {"values": json!({"global": {"proxy": {"includeIPRanges": "*", "excludeIPRanges": "",
                   "includeInboundPorts": "*", "excludeInboundPorts": "", "excludeOutboundPorts": excluded,
                   "statusPort": 15020}}, "revision": ""}).to_string(),
                        "config": "templates: {}"}})
    };
    api.put(&Resource::configmaps(), values("7070"));
    let mut obj = pod_object("g", "Running", json!({}));
    obj["metadata"]["labels"] = json!({});
    obj["spec"]["initContainers"] = json!([{"name": "redirector-init", "image": "redirector",
        "command": ["redirector", "wait-ready", "--agent-socket", "/var/run/redirector/agent.sock"]}]);
    obj["spec"]["containers"] = json!([{"name": "app", "image": "app"}, {"name": "istio-proxy", "image": "proxyv2"}]);
    let mut g = Pod::create_from(&api, &cgroup.path, "kwg", obj);
    g.run_process();
    let agent = KubeAgent::start(&api, &cgroup.path, &pins.path, &dir, "agent.log");
    let log = || agent.proc.log_text();
    let got = g.probe_until("192.0.2.10:80", |x| x.starts_with("proxy"));
    assert!(got.starts_with("proxy 192.0.2.10:80"), "{got}\n{}", log());
    assert!(g.probe("192.0.2.10:7070").starts_with("direct"), "the values' excludeOutboundPorts: {}", log());
    assert!(log().contains("istio-system/istio-sidecar-injector"), "{}", log());

    // Changed: in force without restarting the pod.
    api.put(&Resource::configmaps(), values("80"));
    let got = g.probe_until("192.0.2.10:80", |x| x.starts_with("direct"));
    assert!(got.starts_with("direct"), "a change of the values was not applied live: {got}\n{}", log());
    assert!(g.probe("192.0.2.10:7070").starts_with("proxy 192.0.2.10:7070"));

    // Bad values: an Event on that ConfigMap, the last good ones stay.
    let mut bad = values("80");
    bad["data"]["values"] = json!("{\"global\": {\"proxy\": {\"excludeOutboundPorts\": \"99999\"}}}");
    let uid = api.put(&Resource::configmaps(), bad)["metadata"]["uid"].clone();
    let events =
        poll_until(|| api.events(), |e| !events_for(e, "istio-sidecar-injector", "InvalidMeshConfig").is_empty());
    let ev = events_for(&events, "istio-sidecar-injector", "InvalidMeshConfig");
    let note =
        ev.first().and_then(|e| e["note"].as_str()).unwrap_or_else(|| panic!("{events:#?}\n{}", log())).to_string();
    assert!(note.contains("99999") && note.contains("keeping the last good"), "{note}");
    assert_eq!(ev[0]["regarding"]["uid"], uid, "{:#}", ev[0]);
    assert!(g.probe("192.0.2.10:80").starts_with("direct"), "bad values dropped the last good ones");
    check_rbac(&api.served(), false);
    assert!(
        api.served().iter().any(|r| r.resource == "configmaps" && r.name.as_deref() == Some("istio-sidecar-injector")),
        "the injector values were not read through the API"
    );
    drop(agent);
}
