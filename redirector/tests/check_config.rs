//! `redirector check --config`: every error at once with its key path and
//! line, what each workload redirects (inclusions: all, none, only), the
//! JSON form (`--json` and `--log-format json` alike), and `--live`, which
//! refuses what `run` would refuse on this machine.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use serde_json::Value;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("check-config-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `redirector [pre…] check --config FILE [args…]`: success, stdout
/// as JSON (Null if it is not), and all of stdout and stderr.
fn check(pre: &[&str], file: &Path, args: &[&str]) -> (bool, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_redirector"))
        .args(pre)
        .arg("check")
        .arg("--config")
        .arg(file)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let v = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.success(), v, format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn every_error_at_once_with_its_key_and_line() {
    let d = Dir::new("errors");
    let mesh = d.file("mesh.yaml", "mesh:\n  preset: istio\n  proxyUID: abc\n  outboundPort: 70000\nworkloads: []\n");
    let (ok, _, out) = check(&[], &mesh, &[]);
    assert!(!ok, "{out}");
    assert!(out.contains("mesh.proxyUID") && out.contains("line 3") && out.contains("abc"), "{out}");
    assert!(out.contains("mesh.outboundPort") && out.contains("line 4") && out.contains("70000"), "{out}");
    assert!(out.contains("2 error(s)"), "{out}");

    let workloads = d.file(
        "workloads.yaml",
        "mesh:\n  preset: istio\nworkloads:\n  - name: a\n    netns: /run/netns/a\n    annotations:\n      \
         traffic.sidecar.istio.io/excludeOutboundPorts: \"99999\"\n  - name: b\n    pid: -4\n  - name: c\n    \
         netns: /run/netns/c\n  - name: c\n    netns: /run/netns/d\n",
    );
    let (ok, v, out) = check(&[], &workloads, &["--json"]);
    assert!(!ok, "{out}");
    assert_eq!(v["valid"], false, "{out}");
    let errors = v["errors"].as_array().unwrap_or_else(|| panic!("{out}"));
    let of = |w: &str| errors.iter().filter(|e| e["workload"] == w).count();
    assert!(of("a") >= 1 && of("b") >= 1 && of("c") >= 1, "one error per bad workload: {errors:#?}");
    let text = v["errors"].to_string();
    assert!(text.contains("99999") && text.contains("-4") && text.contains("listed twice"), "{text}");
    // `--log-format json` gives the same single object.
    let (ok2, v2, out2) = check(&["--log-format", "json"], &workloads, &[]);
    assert!(!ok2, "{out2}");
    assert_eq!(v2["errors"], v["errors"], "{out2}");
}

#[test]
fn what_each_workload_redirects_is_shown() {
    let d = Dir::new("inclusions");
    let cfg = d.file(
        "cfg.yaml",
        "mesh:\n  preset: istio\n  outboundPortInclusionList: []\nworkloads:\n  - name: nothing\n    netns: /run/netns/a\n    annotations:\n      \
         traffic.sidecar.istio.io/includeOutboundIPRanges: \"\"\n      traffic.sidecar.istio.io/includeInboundPorts: \
         \"\"\n  - name: everything\n    netns: /run/netns/b\n    annotations:\n      \
         traffic.sidecar.istio.io/includeOutboundIPRanges: \"*\"\n  - name: some\n    netns: /run/netns/c\n    \
         annotations:\n      traffic.sidecar.istio.io/includeOutboundPorts: \"443,80\"\n      \
         traffic.sidecar.istio.io/includeOutboundIPRanges: \"198.51.100.0/24\"\n",
    );
    let (ok, v, out) = check(&[], &cfg, &["--json"]);
    assert!(ok, "{out}");
    let w = |name: &str| {
        v["workloads"].as_array().unwrap().iter().find(|w| w["name"] == name).unwrap_or_else(|| panic!("{out}")).clone()
    };
    assert_eq!(w("nothing")["outbound_ip_range_inclusion"], serde_json::json!([]), "{out}");
    assert_eq!(w("nothing")["inbound_port_inclusion"], serde_json::json!([]), "{out}");
    assert_eq!(w("everything")["outbound_ip_range_inclusion"], Value::Null, "{out}");
    assert_eq!(w("everything")["inbound_port_inclusion"], Value::Null, "{out}");
    assert_eq!(w("everything")["outbound_port_inclusion"], Value::Null, "an empty list restricts nothing: {out}");
    assert_eq!(w("some")["outbound_port_inclusion"], serde_json::json!([80, 443]), "{out}");
    assert_eq!(w("some")["outbound_ip_range_inclusion"], serde_json::json!(["198.51.100.0/24"]), "{out}");

    let (ok, _, out) = check(&[], &cfg, &[]);
    assert!(ok, "{out}");
    let line =
        |name: &str| out.lines().find(|l| l.starts_with(&format!("workload `{name}`"))).unwrap_or("").to_string();
    assert!(line("nothing").contains("IP ranges included: none (nothing is redirected)"), "{out}");
    assert!(line("everything").contains("IP ranges included: all"), "{out}");
    assert!(line("some").contains("ports included: only 80, 443"), "{out}");
    assert!(out.contains("(document only; --live also checks this machine)"), "{out}");
}

/// A process in a network namespace of its own, killed when dropped.
struct InNetns(Child);

impl InNetns {
    fn start() -> Self {
        let child = Command::new("unshare").args(["--net", "sleep", "120"]).spawn().expect("unshare");
        let pid = child.id();
        let own = std::fs::read_link("/proc/self/ns/net").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{pid}/ns/net")).ok().as_ref() == Some(&own) {
            assert!(Instant::now() < deadline, "unshare --net did not take effect");
            std::thread::sleep(Duration::from_millis(10));
        }
        InNetns(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for InNetns {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `--live` refuses what `run` would refuse here: a file that is no
/// namespace, a process that is not running, a missing proxy cgroup, one
/// namespace listed twice, and the node's own namespace; each named by
/// its workload, all in one run.
#[test]
fn live_check_refuses_what_run_would_refuse() {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP live_check_refuses_what_run_would_refuse: resolving namespaces needs root");
        return;
    }
    let (a, b) = (InNetns::start(), InNetns::start());
    let d = Dir::new("live");
    let cfg = d.file(
        "cfg.yaml",
        &format!(
            "mesh:\n  preset: osm\nworkloads:\n  - name: ok\n    pid: {a}\n  - name: twice\n    netns: \
             /proc/{a}/ns/net\n  - name: passwd\n    netns: /etc/passwd\n  - name: gone\n    pid: 4194305\n  - name: \
             cg\n    pid: {b}\n    proxyCgroup: /sys/fs/cgroup/redirector-no-such-cgroup\n  - name: node\n    netns: \
             /proc/{me}/ns/net\n",
            a = a.pid(),
            b = b.pid(),
            // The node's: this test runs in it (PID 1's where that can be
            // read, else the checking process's own, as `run` takes it).
            me = std::process::id(),
        ),
    );
    // Document only: all valid.
    let (ok, _, out) = check(&[], &cfg, &[]);
    assert!(ok, "{out}");
    let (ok, v, out) = check(&[], &cfg, &["--live", "--json"]);
    assert!(!ok, "{out}");
    assert_eq!(v["live"], true);
    let errors = v["errors"].as_array().unwrap_or_else(|| panic!("{out}"));
    let of = |w: &str| {
        errors.iter().filter(|e| e["workload"] == w).map(|e| e["message"].as_str().unwrap_or("")).collect::<String>()
    };
    assert!(of("ok").is_empty(), "{errors:#?}");
    assert!(of("twice").contains("the same network namespace") && of("twice").contains("workload `ok`"), "{out}");
    assert!(of("passwd").contains("is not a network namespace"), "{out}");
    assert!(of("gone").contains("no process 4194305 is running"), "{out}");
    assert!(of("cg").contains("proxyCgroup") && of("cg").contains("redirector-no-such-cgroup"), "{out}");
    assert!(of("node").contains("the node's own"), "{out}");
    assert_eq!(v["workloads"].as_array().map(Vec::len), Some(1), "only `ok` passes: {out}");
}
