//! The pin directory and the attach cgroup, as a user gets them wrong: a
//! second agent or a cleanup on a running agent's pin directory, pins
//! removed under an agent, a second pin directory on the same cgroup, a
//! plain directory as `--cgroup`, `wait-ready` under `ip netns exec` and
//! from outside the attach cgroup.
use std::process::{Command, Output};

use super::*;

/// `redirector ARGS…`, waited for.
fn redirector(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Waits (up to 60 s) for the agent to exit by itself; its status.
fn exit_status(agent: &mut AgentProcess) -> Option<std::process::ExitStatus> {
    poll_until(|| agent.child.try_wait().unwrap(), |s| s.is_some())
}

/// A second `run` on a running agent's pin directory is refused, naming
/// that agent's pid, and changes nothing; `cleanup` is refused too unless
/// `--force`, and an agent whose pins are removed under it (one link by
/// hand, then everything by `cleanup --force`) says which pin is gone and
/// exits non-zero instead of claiming the redirection stays in force.
#[test]
fn one_agent_per_pin_dir_and_pins_removed_under_an_agent() {
    if !require_kernel() {
        return;
    }
    let mut m = Managed::start("o", EXCLUSIONS);
    let pid = m.agent.child.id();
    let cookie = redirector::sys::netns::netns_cookie(&m.topo.app.path()).unwrap();
    let policy = || Maps::open(&m.pins.path).unwrap().workload(cookie).unwrap().map(|w| w.policy_id);
    let before = policy();
    assert!(before.is_some());

    // A second agent on the same pin directory (with a config that lists
    // nothing: it would unprogram the first one's workload).
    let empty = m.dir.join("empty.yaml");
    std::fs::write(&empty, "workloads: []\n").unwrap();
    let (cg, pins) = (m._cgroup.path.clone(), m.pins.path.clone());
    let out = redirector(&[
        "run".as_ref(),
        "--config".as_ref(),
        empty.as_os_str(),
        "--cgroup".as_ref(),
        cg.as_os_str(),
        "--pin-dir".as_ref(),
        pins.as_os_str(),
    ]);
    let said = text(&out);
    assert!(!out.status.success(), "second agent ran: {said}");
    assert!(
        said.contains(&format!(
            "pin directory {} is in use by another agent, `redirector run` (pid {pid}, attached to cgroup {}",
            pins.display(),
            cg.display()
        )),
        "{said}"
    );
    assert!(said.contains("give this one its own --pin-dir"), "{said}");
    assert_eq!(policy(), before, "the refused agent changed the maps");
    assert!(m.probe(1000, "192.0.2.10:80").starts_with("proxy 192.0.2.10:80"));

    // `cleanup` while the agent runs: refused, nothing removed.
    let out = redirector(&["cleanup".as_ref(), "--pin-dir".as_ref(), pins.as_os_str()]);
    let said = text(&out);
    assert!(!out.status.success(), "cleanup ran under a live agent: {said}");
    assert!(said.contains(&format!("is in use by the running agent, `redirector run` (pid {pid}")), "{said}");
    assert!(said.contains("pass --force"), "{said}");
    assert!(m.probe(1000, "192.0.2.10:80").starts_with("proxy 192.0.2.10:80"), "cleanup removed something");
    assert!(m.agent.child.try_wait().unwrap().is_none(), "the agent exited:\n{}", m.agent.log_text());

    // One link pin removed by hand: the agent names it and exits non-zero.
    let link = redirector::dataplane::link_pin_path(&pins, redirector_common::prog_names::CONNECT4);
    std::fs::remove_file(&link).unwrap();
    let status = exit_status(&mut m.agent);
    let log = m.agent.log_text();
    assert!(status.is_some_and(|s| !s.success()), "agent did not exit with an error ({status:?}):\n{log}");
    assert!(log.contains(&format!("ERROR redirector::agent: pin {} is gone", link.display())), "{log}");
    assert!(log.contains("redirection is OFF for every workload"), "{log}");
    assert!(!log.contains("redirection stays in force"), "{log}");

    // A restarted agent attaches and programs everything again.
    m.agent = AgentProcess::start(bin(), &m.config, &cg, &pins, &m.dir.join("agent2.log")).unwrap();
    m.agent.wait_ready(bin(), &pins, &m.topo.app.path()).unwrap();
    assert!(m.probe(1000, "192.0.2.10:80").starts_with("proxy 192.0.2.10:80"));
    // wait-ready may answer from pins the first agent left while this one
    // still attaches its last programs: let it finish its start first.
    let started = poll_until(|| m.agent.log_text(), |l| l.contains("applied:"));
    assert!(started.contains("applied:"), "{started}");

    // `cleanup --force` under the running agent: done, and the agent
    // reports the pin directory gone and exits non-zero.
    let out = redirector(&["cleanup".as_ref(), "--force".as_ref(), "--pin-dir".as_ref(), pins.as_os_str()]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("removed ") && said.contains("(programs detached)"), "{said}");
    assert!(said.contains("removing its pins anyway (--force)"), "{said}");
    let status = exit_status(&mut m.agent);
    let log = m.agent.log_text();
    assert!(status.is_some_and(|s| !s.success()), "agent did not exit with an error ({status:?}):\n{log}");
    // The agent may look while cleanup is half done: then it names the
    // pins already gone rather than the directory (seen on a slow VM).
    assert!(
        log.contains(&format!("ERROR redirector::agent: pin directory {} is gone", pins.display()))
            || (log.contains(&format!("ERROR redirector::agent: pins {}/", pins.display()))
                && log.contains("redirection is OFF for every workload")),
        "{log}"
    );
    assert!(!log.contains("redirection stays in force"), "{log}");
    let got = m.probe_until(1000, "192.0.2.10:80", |g| g.starts_with("direct"));
    assert!(got.starts_with("direct 192.0.2.10:80"), "{got}");

    // Nothing there any more: said so, exit 0.
    let out = redirector(&["cleanup".as_ref(), "--pin-dir".as_ref(), pins.as_os_str()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("nothing to clean up: pin directory {} does not exist", pins.display())
    );
}

/// A second pin directory on the same cgroup: the second agent warns,
/// naming the first one's pin directory (its programs would stack).
#[test]
fn a_second_pin_dir_on_the_same_cgroup_is_named() {
    if !require_kernel() {
        return;
    }
    let m = Managed::start("s", EXCLUSIONS);
    let other = PinDir::new().unwrap();
    let empty = m.dir.join("empty.yaml");
    std::fs::write(&empty, "workloads: []\n").unwrap();
    let mut second =
        AgentProcess::start(bin(), &empty, &m._cgroup.path, &other.path, &m.dir.join("second.log")).unwrap();
    let warned = format!("already run for its processes through the links pinned in {}", m.pins.path.display());
    let log = poll_until(|| second.log_text(), |l| l.contains("attached to cgroup"));
    assert!(log.contains("WARN") && log.contains(&warned), "no warning naming {}:\n{log}", m.pins.path.display());
    assert!(log.contains("(attached to this cgroup; its owner record: `redirector run` (pid "), "{log}");
    assert!(log.contains(&format!("`redirector cleanup --pin-dir {}`", m.pins.path.display())), "{log}");
    second.stop();
    drop(other);
    // The first agent's own restart does not count its own links.
    let mut m = m;
    m.agent.stop();
    m.agent = AgentProcess::start(bin(), &m.config, &m._cgroup.path, &m.pins.path, &m.dir.join("again.log")).unwrap();
    m.agent.wait_ready(bin(), &m.pins.path, &m.topo.app.path()).unwrap();
    let log = m.agent.log_text();
    assert!(!log.contains("already run for its processes"), "{log}");
}

/// `--cgroup` naming a plain directory is refused before anything is
/// pinned; `cleanup --cgroup` is refused with the reason.
#[test]
fn a_plain_directory_as_cgroup_is_refused_before_pinning() {
    if !require_kernel() {
        return;
    }
    let dir = tmpdir("c");
    let config = dir.join("config.yaml");
    std::fs::write(&config, "workloads: []\n").unwrap();
    let pins = PinDir::new().unwrap();
    let out = redirector(&[
        "run".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--cgroup".as_ref(),
        dir.as_os_str(),
        "--pin-dir".as_ref(),
        pins.path.as_os_str(),
    ]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(&format!("option --cgroup: value {}: not a cgroup-v2 directory (it is on ", dir.display())),
        "{said}"
    );
    assert!(said.contains("nothing was loaded or pinned"), "{said}");
    assert!(!said.contains("Bad file descriptor"), "{said}");
    assert!(pins.path.symlink_metadata().is_err(), "pins left behind in {}", pins.path.display());

    let out = redirector(&[
        "cleanup".as_ref(),
        "--cgroup".as_ref(),
        dir.as_os_str(),
        "--pin-dir".as_ref(),
        pins.path.as_os_str(),
    ]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("option --cgroup") && said.contains("cleanup takes no cgroup"), "{said}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ip netns exec` mounts a new sysfs on /sys, without the bpf file
/// system: `wait-ready` there says so at once (and how to run it
/// instead); `nsenter --net`, which leaves the mounts alone, works.
#[test]
fn wait_ready_under_ip_netns_exec_names_the_missing_bpffs() {
    if !require_kernel() {
        return;
    }
    let m = Managed::start("n", EXCLUSIONS);
    let started = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", &m.topo.app.name])
        .arg(bin())
        .args(["wait-ready", "--timeout", "20s", "--pin-dir"])
        .arg(&m.pins.path)
        .output()
        .unwrap();
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(started.elapsed() < Duration::from_secs(10), "waited for the timeout: {said}");
    assert!(said.contains("/sys/fs/bpf is on sysfs (f_type 0x62656572), not on a bpf file system"), "{said}");
    assert!(said.contains("ip netns exec") && said.contains("nsenter --net="), "{said}");

    let out = Command::new("nsenter")
        .arg(format!("--net={}", m.topo.app.path().display()))
        .arg(bin())
        .args(["wait-ready", "--timeout", "20s", "--pin-dir"])
        .arg(&m.pins.path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("is programmed with policy"), "{}", text(&out));
}

/// Only processes inside the attach cgroup are redirected: a process of
/// the workload's namespace outside it goes direct. `wait-ready` from
/// outside fails saying so (the workload it gates would start there);
/// from inside it passes.
#[test]
fn wait_ready_outside_the_attach_cgroup_fails() {
    if !require_kernel() {
        return;
    }
    let topo = Topology::new("q").unwrap();
    let cgroup = TestCgroup::new().unwrap();
    let attach = cgroup.path.join("attach");
    std::fs::create_dir_all(&attach).unwrap();
    let _attach_dir = Rmdir(attach.clone());
    let pins = PinDir::new().unwrap();
    // A socket belongs to the cgroup of the process that created it: the
    // proxy's listener is made inside the attach cgroup, as a pod's is.
    let _proxy = in_cgroup(&attach, &cgroup.path, || {
        Server::proxy(&topo.app.path(), "127.0.0.1:15001".parse().unwrap()).unwrap()
    });
    let dir = tmpdir("q");
    let config = dir.join("config.yaml");
    std::fs::write(&config, render(EXCLUSIONS, &topo.app.path())).unwrap();
    let mut agent = AgentProcess::start(bin(), &config, &attach, &pins.path, &dir.join("agent.log")).unwrap();
    // This process (and what it starts) is in the test cgroup, the attach
    // cgroup's parent: outside it.
    let gate = || {
        Command::new(bin())
            .args(["wait-ready", "--timeout", "60s", "--netns"])
            .arg(topo.app.path())
            .arg("--pin-dir")
            .arg(&pins.path)
            .output()
            .unwrap()
    };
    let out = gate();
    let said = text(&out);
    assert!(!out.status.success(), "the gate opened outside the attach cgroup: {said}\n{}", agent.log_text());
    let id = {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(&attach).unwrap().ino()
    };
    assert!(
        said.contains(&format!(
            "is outside the cgroup the agent attached its programs to, {} (cgroup id {id})",
            attach.display()
        )),
        "{said}"
    );
    assert!(said.contains("only processes in that cgroup or below it are redirected"), "{said}");
    // Asked on behalf of a workload started elsewhere: programmed.
    let out = Command::new(bin())
        .args(["wait-ready", "--no-cgroup-check", "--timeout", "60s", "--netns"])
        .arg(topo.app.path())
        .arg("--pin-dir")
        .arg(&pins.path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // And that is so: from here, the workload's namespace goes direct.
    let probe = || testkit::probe(&topo.app.path(), 1000, Proto::Tcp, "192.0.2.10:80".parse().unwrap()).unwrap();
    let outside = probe();
    assert!(outside.starts_with("direct 192.0.2.10:80"), "{outside}");

    // Inside the attach cgroup (as the workload a gate starts would be):
    // the gate opens, and the same connection goes to the proxy.
    let (out, inside) = in_cgroup(&attach, &cgroup.path, || (gate(), probe()));
    assert!(out.status.success(), "{}\n{}", text(&out), agent.log_text());
    assert!(inside.starts_with("proxy 192.0.2.10:80"), "{inside}");
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Removes a test's cgroup directory on drop.
struct Rmdir(PathBuf);

impl Drop for Rmdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Runs `f` with this whole (single-threaded test) process moved into
/// `cgroup`; moved back to `home` after, also if `f` panics.
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
