//! Real nodes' runtimes. Here: the node's own network namespace is never
//! programmed, whoever asks for it.
//!
//! The node's namespace here is one the test creates (`--node-netns`), so
//! that an agent that got it wrong would redirect a throwaway namespace,
//! never the machine's own.
use std::{
    collections::BTreeSet,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use redirector::{dataplane::Maps, sys::netns::netns_cookie};
use redirector_testkit::{AgentProcess, Netns, PinDir, TestCgroup, Topology};

use super::{bin, poll_until, require_kernel, tmpdir};

/// A scratch directory, removed on drop (also when the test fails).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `sleep` in network namespace `netns` (and this test's cgroup).
fn sleeper(netns: &Path) -> Child {
    let name = netns.file_name().unwrap().to_str().unwrap();
    Command::new("ip").args(["netns", "exec", name, "sleep", "600"]).stdin(Stdio::null()).spawn().unwrap()
}

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
    let mut in_node = sleeper(&node.path());
    let config = scratch.0.join("config.yaml");
    let write = |with_pid: bool| {
        let mut text = format!(
            "mesh:\n  preset: osm\nworkloads:\n  - name: app\n    netns: {}\n  - name: node-by-path\n    netns: {}\n",
            topo.app.path().display(),
            node.path().display()
        );
        if with_pid {
            text.push_str(&format!("  - name: node-by-pid\n    pid: {}\n", in_node.id()));
        }
        std::fs::write(&config, text).unwrap();
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

    write(true);
    let agent = run("agent.log", Some(&node.path()));
    let log =
        poll_until(|| agent.log_text(), |l| l.contains("workload `node-by-pid`") && !maps_has(&pins, node_cookie));
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
    let _ = in_node.kill();
    let _ = in_node.wait();
    drop(agent);
}

fn maps_has(pins: &PinDir, cookie: u64) -> bool {
    Maps::open(&pins.path).and_then(|m| m.workload(cookie)).map(|w| w.is_some()).unwrap_or(true)
}
