//! Real nodes' runtimes: the node's own network namespace is never
//! programmed (both agents); a pod's namespace is taken only from its
//! containers, in the cgroup layouts of containerd and CRI-O (cgroupfs and
//! systemd drivers, CRI-O's conmon in the pod's cgroup but the node's
//! namespace, crun's `container` sub-cgroup); the proxy's cgroup in those
//! layouts, also as a native sidecar; pods of sandboxed runtimes; user
//! namespaces (`hostUsers: false`, and standalone `pid:` workloads). The layouts and where they come from: [`super::kube::Layout`].
//!
//! The node's namespace here is one the test creates (`--node-netns`), so
//! that an agent that got it wrong would redirect a throwaway namespace,
//! never the machine's own.
use std::{
    collections::BTreeSet,
    ffi::OsString,
    path::{Path, PathBuf},
};

use redirector::{dataplane::Maps, sys::netns::netns_cookie};
use redirector_testkit::{
    self as testkit,
    fakeapi::{FakeApi, Resource},
    AgentProcess, Netns, PinDir, Proto, Server, TestCgroup, Topology,
};
use serde_json::json;

use super::{
    bin,
    kube::{
        configmap, events_for, pod_object, programmed, proxy_identified_by_its_cgroup, sleeper, KubeAgent, Layout, Pod,
        Scratch,
    },
    poll_until, require_kernel, tmpdir,
};

/// Standalone: a workload naming the node's network namespace (by path or
/// by a process in it) is refused with an error naming it and nothing is
/// written for it; the other workloads are programmed. An entry an earlier
/// agent wrote for that namespace is removed.
#[test]
fn node_namespace_is_never_programmed() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let scratch = Scratch(tmpdir("node"));
    let topo = Topology::new("nd").unwrap();
    let node = Netns::new("rdrnode").unwrap();
    let node_cookie = netns_cookie(&node.path()).unwrap();
    let in_node = Killed(sleeper(&cgroup.path, &node.path()));
    let config = scratch.0.join("config.yaml");
    // The node's namespace by path, or (`by_pid`) by a process in it: one
    // at a time, as both at once are one namespace listed twice (refused
    // as such before the node check).
    let write = |by_pid: bool| {
        let mut text =
            format!("mesh:\n  preset: osm\nworkloads:\n  - name: app\n    netns: {}\n", topo.app.path().display());
        if by_pid {
            text.push_str(&format!("  - name: node-by-pid\n    pid: {}\n", in_node.0.id()));
        } else {
            text.push_str(&format!("  - name: node-by-path\n    netns: {}\n", node.path().display()));
        }
        let tmp = config.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &config).unwrap();
    };
    write(false);
    let run = |log: &str, node_netns: Option<&Path>| {
        let mut args: Vec<OsString> = ["run", "--config"].map(OsString::from).to_vec();
        args.extend([config.clone().into(), "--cgroup".into(), cgroup.path.clone().into()]);
        args.extend(["--pin-dir".into(), pins.path.clone().into(), "--poll-interval".into(), "100ms".into()]);
        if let Some(n) = node_netns {
            args.extend(["--node-netns".into(), n.into()]);
        }
        let agent = AgentProcess::spawn(bin(), &args, &[], &scratch.0.join(log)).unwrap();
        agent.wait_ready(bin(), &pins.path, &topo.app.path()).unwrap();
        agent
    };

    // An agent that takes PID 1's namespace for the node's (the default)
    // programs the test's stand-in like any namespace: the state an agent
    // without the check leaves behind.
    let mut before = run("before.log", None);
    let maps = Maps::open(&pins.path).unwrap();
    assert!(
        poll_until(|| maps.workload(node_cookie).unwrap().is_some(), |p| *p),
        "the stand-in was not programmed while it was not the node's\n{}",
        before.log_text()
    );
    before.stop();

    let agent = run("agent.log", Some(&node.path()));
    let log =
        poll_until(|| agent.log_text(), |l| l.contains("workload `node-by-path`") && !maps_has(&pins, node_cookie));
    assert!(log.contains("workload `node-by-path`: network namespace"), "{log}");
    write(true);
    let log = poll_until(|| agent.log_text(), |l| l.contains("workload `node-by-pid`"));
    for name in ["node-by-path", "node-by-pid"] {
        assert!(
            log.contains(&format!("workload `{name}`: network namespace"))
                && log.contains(&format!("(cookie {node_cookie}) is the node's own ({})", node.path().display())),
            "{name} not refused by name:\n{log}"
        );
    }
    assert!(!maps_has(&pins, node_cookie), "the node's namespace is still programmed\n{log}");
    assert!(!pins.path.join("netns").join(node_cookie.to_string()).exists(), "inbound capture left on the node");
    let app = netns_cookie(&topo.app.path()).unwrap();
    let keys: BTreeSet<u64> = Maps::open(&pins.path).unwrap().workloads().unwrap().keys().copied().collect();
    assert_eq!(keys, BTreeSet::from([app]), "{log}");
    drop(agent);
}

/// A process killed on drop, also when the test fails (a process left in
/// the test cgroup keeps it from being removed).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn maps_has(pins: &PinDir, cookie: u64) -> bool {
    Maps::open(&pins.path).and_then(|m| m.workload(cookie)).map(|w| w.is_some()).unwrap_or(true)
}

/// Kubernetes: pods running before the agent, one per runtime layout, each
/// with its container's process in the pod's network namespace; for
/// CRI-O, the container's conmon in the pod's cgroup, started first (the
/// lowest PID of the pod) and in the node's namespace, as with
/// `conmon_cgroup = "pod"`. Every pod is programmed with its own
/// namespace, found through its container's process; the node's never.
#[test]
fn kube_pod_namespace_is_taken_from_its_containers_only() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let scratch = Scratch(tmpdir("kube-rt"));
    let node = Netns::new("rdrnode").unwrap();
    let node_cookie = netns_cookie(&node.path()).unwrap();
    let api = FakeApi::start(&[Resource::pods(), Resource::configmaps()]).unwrap();
    api.put(&Resource::configmaps(), configmap("preset: osm\n"));
    let mut pods = Vec::new();
    let mut container_pids = Vec::new();
    for (i, layout) in Layout::ALL.into_iter().enumerate() {
        let mut p = Pod::create_with(
            &api,
            &cgroup.path,
            &format!("rt{i}"),
            pod_object(&format!("p{i}"), "Running", json!({})),
            layout,
        );
        let id = p.id("app");
        let conmon = layout.is_crio().then(|| {
            let cg = p.cg.conmon(&id);
            p.run_in(&cg, &node.path())
        });
        // A process in the pod's own cgroup, outside every container, in
        // the node's namespace: not a container of the pod either.
        let pod_level = p.cg.pod_dir();
        let stray = p.run_in(&pod_level, &node.path());
        let pid = p.run_process();
        if let Some(c) = conmon {
            assert!(c < pid, "conmon-like process {c} started first but has a higher PID than {pid}");
        }
        assert!(stray < pid);
        container_pids.push(pid);
        pods.push(p);
    }
    let agent = KubeAgent::start_with(
        &api,
        &cgroup.path,
        &pins.path,
        &scratch.0,
        "agent.log",
        &["--node-netns", &node.path().display().to_string()],
    );
    for (p, pid) in pods.iter().zip(&container_pids) {
        let got = p.probe_until("192.0.2.10:80", |g| g.starts_with("proxy"));
        assert!(
            got.starts_with("proxy 192.0.2.10:80"),
            "{:?} pod not redirected\n{}",
            p.cg.layout(),
            agent.proc.log_text()
        );
        let log = agent.proc.log_text();
        assert!(
            log.contains(&format!("pod shop/{}: network namespace found through /proc/{pid}/ns/net", p.name)),
            "{:?}: not found through its container's process {pid}\n{log}",
            p.cg.layout()
        );
    }
    let keys: BTreeSet<u64> = Maps::open(&pins.path).unwrap().workloads().unwrap().keys().copied().collect();
    let want: BTreeSet<u64> = pods.iter().map(Pod::cookie).collect();
    assert_eq!(keys, want, "programmed namespaces\n{}", agent.proc.log_text());
    assert!(!keys.contains(&node_cookie));
    let log = agent.proc.log_text();
    assert!(!log.contains("is the node's own"), "a pod's namespace was taken from the node's:\n{log}");
    drop(agent);
}

/// `--proxy-identity cgroup` on CRI-O with crun and the systemd driver:
/// the proxy's processes are in `crio-<ID>.scope/container`, and its
/// conmon in `crio-conmon-<ID>.scope`; the map holds the cgroup its
/// processes are in.
#[test]
fn kube_proxy_cgroup_on_crio_with_crun() {
    proxy_identified_by_its_cgroup(Layout::CrioSystemdCrun, "kcr", false);
}

/// The same on CRI-O with runc (the container's own scope, conmon beside
/// it) and on containerd with the systemd driver.
#[test]
fn kube_proxy_cgroup_on_crio_and_containerd_systemd() {
    proxy_identified_by_its_cgroup(Layout::CrioSystemd, "kcs", false);
    proxy_identified_by_its_cgroup(Layout::ContainerdSystemd, "kds", false);
}

/// A native sidecar proxy (`initContainers`, `restartPolicy: Always`,
/// status in `initContainerStatuses`): the pod is meshed by
/// `container:envoy`, and the proxy is identified by its cgroup, on
/// containerd and on CRI-O with crun.
#[test]
fn kube_native_sidecar_proxy() {
    proxy_identified_by_its_cgroup(Layout::ContainerdCgroupfs, "kns", true);
    proxy_identified_by_its_cgroup(Layout::CrioSystemdCrun, "knc", true);
}

/// A pod of a sandboxed runtime (Kata Containers, gVisor: its processes
/// run in a VM or a user-space kernel, never in the node's /proc) holds
/// back the sweep of stale entries for `--unresolved-grace` only: then it
/// is reported once (Warning Event `NetworkNamespaceNotFound`, gauge
/// `pods_not_found`) and a pod deleted while no agent ran loses its
/// entries.
#[test]
fn kube_sandboxed_pod_does_not_block_the_sweep() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let scratch = Scratch(tmpdir("kube-sb"));
    let api = FakeApi::start(&[Resource::pods(), Resource::configmaps()]).unwrap();
    api.put(&Resource::configmaps(), configmap("preset: osm\n"));
    let mut gone = Pod::create(&api, &cgroup.path, "sbg", "gone", "Running", json!({}));
    gone.run_process();
    let mut web = Pod::create(&api, &cgroup.path, "sbw", "web", "Running", json!({}));
    web.run_process();
    let mut first = KubeAgent::start(&api, &cgroup.path, &pins.path, &scratch.0, "agent1.log");
    let got = gone.probe_until("192.0.2.10:80", |g| g.starts_with("proxy"));
    assert!(got.starts_with("proxy"), "{}", first.proc.log_text());
    first.proc.stop();

    // While no agent runs: `gone` is deleted, a Kata pod starts (its status
    // names its containers, no process of them is on the node).
    let gone_cookie = gone.cookie();
    api.delete(&Resource::pods(), "shop", "gone");
    let mut obj = pod_object("kata", "Running", json!({}));
    obj["spec"]["runtimeClassName"] = json!("kata-qemu");
    let kata = Pod::create_from(&api, &cgroup.path, "sbk", obj);
    let grace = std::time::Duration::from_secs(5);
    let agent =
        KubeAgent::start_with(&api, &cgroup.path, &pins.path, &scratch.0, "agent2.log", &["--unresolved-grace", "5s"]);
    let ready = std::time::Instant::now();
    let held = programmed(&pins.path, gone_cookie);
    if ready.elapsed() < grace {
        assert!(held, "swept before the grace period\n{}", agent.proc.log_text());
    }
    let swept = poll_until(|| programmed(&pins.path, gone_cookie), |p| !*p);
    assert!(!swept, "the sandboxed pod holds the sweep back forever\n{}", agent.proc.log_text());
    // The grace runs from the agent's first pass, just before it is
    // ready (slack for a slow emulated guest).
    assert!(
        ready.elapsed() >= grace - std::time::Duration::from_secs(2),
        "swept {:?} after the agent was ready, before the grace",
        ready.elapsed()
    );
    let events = poll_until(|| api.events(), |e| !events_for(e, "kata", "NetworkNamespaceNotFound").is_empty());
    let ev = events_for(&events, "kata", "NetworkNamespaceNotFound");
    assert_eq!(ev.len(), 1, "{events:#?}");
    let note = ev[0]["note"].as_str().unwrap_or_default();
    assert!(note.contains("runtimeClassName kata-qemu") && note.contains("not redirected"), "{note}");
    assert_eq!(ev[0]["type"], "Warning");
    assert!(web.probe("192.0.2.10:80").starts_with("proxy"), "another pod lost its redirection");
    assert!(!programmed(&pins.path, kata.cookie()));
    // Reported once, while it lasts.
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(events_for(&api.events(), "kata", "NetworkNamespaceNotFound").len(), 1);
    let (_, metrics) = agent.get("/metrics");
    assert!(metrics.contains("redirector_pods_not_found 1"), "{metrics}");
    assert!(agent.proc.log_text().contains("NetworkNamespaceNotFound"));
    drop(agent);
}

/// A pod with `hostUsers: false`: its containers run in a user namespace
/// of their own (`0 524288 65536`), its proxy as UID 1337 inside, which the
/// kernel reports as 525625. The proxy's own connections go direct (the
/// UID written is the translated one); the application's, and those of a
/// process of the initial namespace running as UID 1337, are redirected.
/// A pod whose map does not map the proxy's UID is refused with an Event
/// naming `proxyUID`.
#[test]
fn kube_user_namespace_pod() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let scratch = Scratch(tmpdir("kube-us"));
    let api = FakeApi::start(&[Resource::pods(), Resource::configmaps()]).unwrap();
    api.put(&Resource::configmaps(), configmap("preset: osm\nproxyUID: 1337\n"));
    let mut u = Pod::create(&api, &cgroup.path, "usr", "u", "Running", json!({}));
    let app_cg = u.cg.container(&u.id("app"));
    let envoy_cg = u.cg.container(&u.id("envoy"));
    let app_pid = u.run_in_user_namespace(&app_cg, &u.topo.app.path(), "0 524288 65536");
    let mut obj = api.get(&Resource::pods(), "shop", "u").unwrap();
    obj["spec"]["hostUsers"] = json!(false);
    obj["status"]["containerStatuses"] =
        json!([u.status("app", json!({"running": {}})), u.status("envoy", json!({"running": {}}))]);
    api.put(&Resource::pods(), obj);
    // A second pod whose map is too small for UID 1337.
    let mut v = Pod::create(&api, &cgroup.path, "usv", "v", "Running", json!({}));
    let v_cg = v.cg.container(&v.id("app"));
    v.run_in_user_namespace(&v_cg, &v.topo.app.path(), "0 589824 1000");

    let agent = KubeAgent::start(&api, &cgroup.path, &pins.path, &scratch.0, "agent.log");
    let got = u.probe_until("192.0.2.10:80", |g| g.starts_with("proxy"));
    assert!(got.starts_with("proxy 192.0.2.10:80"), "pod not redirected\n{}", agent.proc.log_text());
    let log = agent.proc.log_text();
    assert!(
        log.contains(&format!("found through /proc/{app_pid}/ns/net"))
            && log.contains("in a user namespace of its own (uid_map 0 524288 65536, gid_map 0 524288 65536)"),
        "{log}"
    );
    let userns = PathBuf::from(format!("/proc/{app_pid}/ns/user"));
    let dst = "192.0.2.10:80".parse().unwrap();
    let in_pod = |uid: u32| {
        testkit::probe_in_user_namespace(&u.topo.app.path(), &userns, &envoy_cg.join("cgroup.procs"), uid, dst).unwrap()
    };
    let proxy = in_pod(1337);
    assert!(proxy.starts_with("direct 192.0.2.10:80"), "the proxy (UID 1337 in the pod) was redirected: {proxy}");
    let app = in_pod(1000);
    assert!(app.starts_with("proxy 192.0.2.10:80"), "the pod's application was not redirected: {app}");
    let outsider = testkit::probe(&u.topo.app.path(), 1337, Proto::Tcp, dst.into()).unwrap();
    assert!(outsider.starts_with("proxy"), "UID 1337 of the initial namespace went direct: {outsider}");
    let w = Maps::open(&pins.path).unwrap().workload(u.cookie()).unwrap().unwrap();
    assert_eq!(w.proxy_uid, 524288 + 1337, "the proxy's UID as the kernel reports it");

    let events = poll_until(|| api.events(), |e| !events_for(e, "v", "RedirectionFailed").is_empty());
    let ev = events_for(&events, "v", "RedirectionFailed");
    assert!(!ev.is_empty(), "{events:#?}\n{}", agent.proc.log_text());
    let note = ev[0]["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("key `proxyUID`: value 1337 is not mapped") && note.contains("uid_map: 0 589824 1000"),
        "{note}"
    );
    assert!(!programmed(&pins.path, v.cookie()), "a pod whose proxy UID is not mapped was programmed");
    drop(agent);
}

/// Standalone: a `pid:` workload whose process is in a user namespace of
/// its own has its proxy's UID translated through that process's maps; a
/// `netns:` workload whose namespace belongs to another user namespace is
/// refused (nothing there says how its IDs map), naming `pid:` instead.
#[test]
fn user_namespace_workloads_standalone() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let scratch = Scratch(tmpdir("us-sa"));
    let topo = Topology::new("uss").unwrap();
    let _proxy = Server::proxy(&topo.app.path(), "127.0.0.1:15001".parse().unwrap()).unwrap();
    // The workload's process: in the topology's namespace, in a user
    // namespace of its own.
    let mut procs = Vec::new();
    let spawn = |flags: libc::c_int, netns: Option<&Path>| {
        use std::os::unix::process::CommandExt as _;
        let net = netns.map(|p| std::fs::File::open(p).unwrap());
        let mut c = std::process::Command::new("sleep");
        c.arg("600");
        // SAFETY: setns and unshare are async-signal-safe.
        unsafe {
            c.pre_exec(move || {
                if let Some(n) = &net {
                    if libc::setns(std::os::fd::AsRawFd::as_raw_fd(n), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::unshare(flags) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = c.spawn().unwrap();
        for file in ["uid_map", "gid_map"] {
            std::fs::write(format!("/proc/{}/{file}", child.id()), "0 524288 65536\n").unwrap();
        }
        child
    };
    procs.push(Killed(spawn(libc::CLONE_NEWUSER, Some(&topo.app.path()))));
    // A network namespace created inside a user namespace (owned by it).
    procs.push(Killed(spawn(libc::CLONE_NEWUSER | libc::CLONE_NEWNET, None)));
    let (pid, owned) = (procs[0].0.id(), procs[1].0.id());
    let config = scratch.0.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "mesh:\n  preset: osm\n  proxyUID: 1337\nworkloads:\n  - name: app\n    pid: {pid}\n  - name: owned\n    \
             netns: /proc/{owned}/ns/net\n"
        ),
    )
    .unwrap();
    let mut args: Vec<OsString> = ["run", "--config"].map(OsString::from).to_vec();
    args.extend([config.into(), "--cgroup".into(), cgroup.path.clone().into()]);
    args.extend(["--pin-dir".into(), pins.path.clone().into(), "--poll-interval".into(), "100ms".into()]);
    let agent = AgentProcess::spawn(bin(), &args, &[], &scratch.0.join("agent.log")).unwrap();
    agent.wait_ready(bin(), &pins.path, &topo.app.path()).unwrap();
    let cookie = netns_cookie(&topo.app.path()).unwrap();
    let w = Maps::open(&pins.path).unwrap().workload(cookie).unwrap().unwrap();
    assert_eq!(w.proxy_uid, 524288 + 1337);
    let userns = PathBuf::from(format!("/proc/{pid}/ns/user"));
    let dst = "192.0.2.10:80".parse().unwrap();
    let as_uid = |uid| {
        testkit::probe_in_user_namespace(&topo.app.path(), &userns, &cgroup.path.join("cgroup.procs"), uid, dst)
            .unwrap()
    };
    assert!(as_uid(1337).starts_with("direct"), "the proxy in the user namespace was redirected");
    assert!(as_uid(1000).starts_with("proxy"), "the application in the user namespace went direct");
    let log = poll_until(|| agent.log_text(), |l| l.contains("workload `owned`"));
    assert!(
        log.contains("workload `owned`: user namespace of netns /proc/")
            && log.contains("belongs to a user namespace other than the agent's")
            && log.contains("give `pid:`"),
        "{log}"
    );
    let owned_cookie = netns_cookie(&PathBuf::from(format!("/proc/{owned}/ns/net"))).unwrap();
    assert!(!programmed(&pins.path, owned_cookie));
    drop(agent);
}
