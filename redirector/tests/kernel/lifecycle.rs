//! Changes over time: live config changes and bad input, SIGHUP, restarts
//! and upgrades under load, a random stream of changes, the standalone
//! gate, workloads named by pid.
use super::*;

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
    assert_eq!(v["workloads"][0]["name"], "app", "the name, recorded again by the new agent");
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

fn inspect_json(pins: &Path) -> serde_json::Value {
    let out = std::process::Command::new(bin()).args(["inspect", "--json", "--pin-dir"]).arg(pins).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

const ISTIO_INCLUDE: &str = r#"
mesh:
  preset: istio
workloads:
  - name: shop/web
    netns: {netns}
    annotations:
      traffic.sidecar.istio.io/includeOutboundIPRanges: "INCLUDE"
"#;

/// `inspect` says what each workload redirects, under its name: Istio's
/// `includeOutboundIPRanges: ""` (nothing) and `"*"` (everything) read
/// differently, and so do the connections; `::/0` reads as written, not
/// as the 96 trie entries it takes; a rename alone shows up.
#[test]
fn inspect_shows_names_and_what_each_workload_redirects() {
    if !require_kernel() {
        return;
    }
    let m = Managed::start("n", &ISTIO_INCLUDE.replace("INCLUDE", ""));
    let w = |v: &serde_json::Value| v["workloads"][0].clone();
    let v = w(&inspect_json(&m.pins.path));
    assert_eq!(v["name"], "shop/web");
    assert_eq!(
        (v["outbound_redirects"].as_str(), v["outbound"].as_str()),
        (Some("nothing"), Some("redirect nothing (the IP range inclusion list is empty)")),
        "{v}"
    );
    assert!(m.probe(1000, "192.0.2.10:80").starts_with("direct"));

    m.write_config(&ISTIO_INCLUDE.replace("INCLUDE", "*"));
    let got = m.probe_until(1000, "192.0.2.10:80", |g| g.starts_with("proxy"));
    assert!(got.starts_with("proxy 192.0.2.10:80"), "{got}");
    let v = w(&inspect_json(&m.pins.path));
    assert_eq!(
        (v["outbound_redirects"].as_str(), v["outbound"].as_str()),
        (Some("everything"), Some("redirect everything")),
        "{v}"
    );
    assert_eq!(v["outbound_ip_range_inclusions"], serde_json::Value::Null);

    // Both families, renamed: as written, under the new name.
    m.write_config(&ISTIO_INCLUDE.replace("INCLUDE", "0.0.0.0/0,::/0").replace("shop/web", "shop/web-v2"));
    let v = poll_until(|| w(&inspect_json(&m.pins.path)), |v| v["name"] == "shop/web-v2");
    assert_eq!(v["name"], "shop/web-v2", "{v}");
    assert_eq!(v["outbound_ip_range_inclusions"], serde_json::json!(["0.0.0.0/0", "::/0"]));
    assert_eq!(v["outbound"], "redirect only IP ranges 0.0.0.0/0, ::/0");
    let cidrs = Maps::open(&m.pins.path).unwrap().cidr_keys().unwrap();
    assert!(cidrs.len() > 96, "::/0 is stored as its pieces ({} entries)", cidrs.len());
    let text = std::process::Command::new(bin()).args(["inspect", "--pin-dir"]).arg(&m.pins.path).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("workload `shop/web-v2`")
            && text.contains("outbound:        redirect only IP ranges 0.0.0.0/0, ::/0"),
        "{text}"
    );
}

/// Outcome counts of a connection load.
#[derive(Debug, Default)]
pub(super) struct LoadCounts {
    pub(super) proxied: u64,
    pub(super) direct: u64,
    pub(super) failed: u64,
    pub(super) errors: Vec<String>,
}

/// Connects from `netns` as `uid` to `dst` in a loop until `stop`, each
/// connection reading the one-line answer (about 1 ms apart: a few hundred
/// connections per second, bounded by `stop`).
pub(super) fn connection_load(
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
        write_atomically(&m.config, &text);
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
    write_atomically(&m.config, &last_valid);
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

/// GET on an agent's status endpoint: (status code, body).
fn status_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return (0, "not listening".into()) };
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// The value of a metric line `name value` in a Prometheus text.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Truncating the config file (`: > cfg`, or a non-atomic editor write
/// caught half way) removed every workload within one poll, at INFO, and
/// traffic went around the proxy while `/readyz` said 200. Now the empty
/// file, one with only comments, and one with `workloads:` and no value
/// are refused at WARN and counted, the last good configuration stays in
/// force (traffic still redirected), and the recovery is logged. A bad
/// workload entry keeps its last good policy, counted apart from the
/// programmed ones, and is logged once, not on every retry.
#[test]
fn truncated_config_keeps_the_last_good_one_in_force() {
    if !require_kernel() {
        return;
    }
    let topo = Topology::new("t").unwrap();
    let cgroup = TestCgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let _proxy = Server::proxy(&topo.app.path(), "127.0.0.1:15001".parse().unwrap()).unwrap();
    let dir = tmpdir("t");
    let config = dir.join("config.yaml");
    std::fs::write(&config, render(EXCLUSIONS, &topo.app.path())).unwrap();
    let status = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut args: Vec<std::ffi::OsString> = vec!["run".into(), "--config".into(), config.clone().into()];
    args.extend(["--cgroup".into(), cgroup.path.clone().into(), "--pin-dir".into(), pins.path.clone().into()]);
    args.extend(["--poll-interval".into(), "100ms".into(), "--metrics-addr".into(), status.to_string().into()]);
    let agent = AgentProcess::spawn(bin(), &args, &[], &dir.join("agent.log")).unwrap();
    agent.wait_ready(bin(), &pins.path, &topo.app.path()).unwrap();
    let probe = |dst: &str| testkit::probe(&topo.app.path(), 1000, Proto::Tcp, dst.parse().unwrap()).unwrap();
    let log_until = |needle: &str, count: usize| {
        let log = poll_until(|| agent.log_text(), |l| l.matches(needle).count() >= count);
        assert!(log.matches(needle).count() >= count, "{needle:?} not logged {count} time(s):\n{log}");
        log
    };
    let metrics = || status_get(status, "/metrics").1;
    assert!(probe("192.0.2.10:80").starts_with("proxy 192.0.2.10:80"));
    let m = metrics();
    assert_eq!(metric(&m, "redirector_config_valid"), Some(1));
    // The workload's namespace is held between passes, with room to spare.
    assert_eq!(
        (metric(&m, "redirector_namespaces_held"), metric(&m, "redirector_namespaces_unheld")),
        (Some(1), Some(0)),
        "{m}"
    );

    // `: > cfg`: truncated in place.
    std::fs::File::create(&config).unwrap();
    let log = log_until("keeping the last good configuration (1 workloads)", 1);
    let line = log.lines().find(|l| l.contains("keeping the last good configuration")).unwrap();
    assert!(line.contains("WARN") && line.contains("the config is empty"), "{line}");
    // Several polls later the workload is still redirected.
    std::thread::sleep(Duration::from_millis(500));
    assert!(probe("192.0.2.10:80").starts_with("proxy 192.0.2.10:80"), "{}", agent.log_text());
    assert!(probe("192.0.2.10:6379").starts_with("direct"), "the last good policy is whole");
    let m = metrics();
    assert_eq!(metric(&m, "redirector_config_valid"), Some(0), "{m}");
    assert_eq!(metric(&m, "redirector_errors_total{reason=\"invalid_config\"}"), Some(1), "{m}");
    assert_eq!(metric(&m, "redirector_workloads_programmed"), Some(1), "{m}");
    assert_eq!(status_get(status, "/readyz").0, 200, "the last good configuration is in force");
    assert!(!log.contains(" 1 removed"), "the workload was removed:\n{log}");

    // Only comments, then `mesh:` with `workloads:` and no value: refused too.
    write_atomically(&config, "# being edited\n");
    log_until("keeping the last good configuration", 2);
    write_atomically(&config, "mesh:\n  preset: osm\nworkloads:\n");
    let log = log_until("keeping the last good configuration", 3);
    assert!(log.contains("key `workloads` has no value"), "{log}");
    assert!(probe("192.0.2.10:80").starts_with("proxy 192.0.2.10:80"));
    assert_eq!(metric(&metrics(), "redirector_errors_total{reason=\"invalid_config\"}"), Some(3));

    // Fixed: the recovery is said, the file is in force again.
    std::fs::write(&config, render(EXCLUSIONS, &topo.app.path())).unwrap();
    log_until("valid again: 1 of 1 workloads applied", 1);
    assert_eq!(metric(&metrics(), "redirector_config_valid"), Some(1));

    // A bad entry (a type error, named with its line): its last good
    // policy stays, counted as such, and the error is logged once (a
    // refused entry is not retried: only a change of the file fixes it).
    write_atomically(&config, &render(EXCLUSIONS, &topo.app.path()).replace("netns: ", "pid: \"x\"\n    netns: "));
    let log = log_until("workloads[0].pid at line", 1);
    assert!(log.contains("value \"x\" is a string, expected an integer"), "{log}");
    let m = poll_until(metrics, |m| metric(m, "redirector_workloads_last_good") == Some(1));
    assert_eq!(metric(&m, "redirector_workloads_last_good"), Some(1), "{m}");
    assert_eq!(metric(&m, "redirector_workloads_programmed"), Some(0), "{m}");
    assert!(probe("192.0.2.10:80").starts_with("proxy 192.0.2.10:80"));
    // A retry would run a pass within 1 s (then 2 s): none runs.
    let passes = metric(&m, "redirector_sync_duration_seconds_count").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let m = metrics();
    assert_eq!(metric(&m, "redirector_sync_duration_seconds_count"), Some(passes), "retried:\n{}", agent.log_text());
    let log = agent.log_text();
    assert_eq!(log.matches("workloads[0].pid at line").count(), 1, "logged again without a change:\n{log}");
    std::fs::write(&config, render(EXCLUSIONS, &topo.app.path())).unwrap();
    log_until("error cleared, its policy is applied", 1);

    // `workloads: []` unprograms on purpose.
    write_atomically(&config, "workloads: []\n");
    let got = poll_until(|| probe("192.0.2.10:80"), |g| g.starts_with("direct"));
    assert!(got.starts_with("direct 192.0.2.10:80"), "{got}\n{}", agent.log_text());
    // And no longer holds its namespace.
    let m = poll_until(metrics, |m| metric(m, "redirector_namespaces_held") == Some(0));
    assert_eq!(metric(&m, "redirector_namespaces_held"), Some(0), "{m}");
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}
