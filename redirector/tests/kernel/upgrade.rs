//! Upgrades across a map-layout change: the running node is carried from
//! this build's layout to the next (`redirector` built with the
//! `layout-next` feature: LAYOUT_VERSION + 1, twice the workload capacity;
//! `cargo xtask test` and `cargo xtask vm-test` build it and name it in
//! `REDIRECTOR_LAYOUT_NEXT_BIN`), and an agent of the older layout refuses
//! the newer state without touching it.
use std::io::Read as _;

use super::{
    lifecycle::{connection_load, LoadCounts},
    *,
};

fn layout_next_bin() -> PathBuf {
    let p = std::env::var_os("REDIRECTOR_LAYOUT_NEXT_BIN").map(PathBuf::from).expect(
        "REDIRECTOR_LAYOUT_NEXT_BIN names the next-layout agent (`cargo xtask test` builds it: `cargo build --release \
         -p redirector --features layout-next`)",
    );
    assert!(p.is_file(), "REDIRECTOR_LAYOUT_NEXT_BIN={}: no such file", p.display());
    p
}

/// Under a steady connection load, with one redirected connection held
/// open across the whole upgrade: this build's agent is replaced by the
/// next layout's. Not one connection fails or goes direct; the held
/// connection still sees the peer it dialed, and the old layout's programs
/// stay (draining) until it closes, then are removed. Then this build's
/// agent is started on the upgraded node: it refuses, names both layouts,
/// and the node keeps redirecting.
#[test]
fn layout_upgrade_under_load_and_downgrade_refusal() {
    if !require_kernel() {
        return;
    }
    let next = layout_next_bin();
    let mut m = Managed::start("lu", EXCLUSIONS);
    let dst: std::net::SocketAddr = "192.0.2.10:80".parse().unwrap();
    // Held open by the application across the upgrade (the proxy has
    // answered and closed its side; the socket stays until dropped).
    let held = testkit::in_netns_as(&m.topo.app.path(), 1000, move || {
        let mut s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2)).unwrap();
        let mut line = [0u8; 64];
        let n = s.read(&mut line).unwrap();
        (s, String::from_utf8_lossy(&line[..n]).to_string())
    })
    .unwrap();
    assert!(held.1.starts_with(&format!("proxy {dst}")), "{}", held.1);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = connection_load(&m.topo.app.path(), 1000, dst, stop.clone());
    std::thread::sleep(Duration::from_millis(500));

    m.agent.stop();
    let log = m.dir.join("agent-next.log");
    m.agent = AgentProcess::start(&next, &m.config, &m._cgroup.path, &m.pins.path, &log).unwrap();
    let text = poll_until(|| m.agent.log_text(), |l| l.contains("new connections take this agent's programs"));
    let (this, next_layout) = (redirector_common::LAYOUT_VERSION, redirector_common::LAYOUT_VERSION + 1);
    assert!(text.contains(&format!("have the older layout {this}: migrating to layout {next_layout}")), "{text}");
    assert!(text.contains("new connections take this agent's programs"), "{text}");
    std::thread::sleep(Duration::from_millis(700));
    let retired = m.pins.path.join(format!("retired-v{this}"));
    assert!(retired.is_dir(), "the old layout drains while a connection it redirected is open");
    assert_eq!(held.0.peer_addr().unwrap(), dst, "getpeername of the held connection after the upgrade");
    drop(held);
    let gone = format!("layout {this} retired");
    let text = poll_until(|| m.agent.log_text(), |l| l.contains(&gone));
    assert!(text.contains(&gone), "{text}");
    assert!(!retired.exists());
    std::thread::sleep(Duration::from_millis(500));

    // The downgrade, as a rolling update does it (the newer agent stopped
    // first): refused, nothing changed, still redirecting.
    m.agent.stop();
    let out = std::process::Command::new(bin())
        .args(["run", "--config"])
        .arg(&m.config)
        .arg("--cgroup")
        .arg(&m._cgroup.path)
        .arg("--pin-dir")
        .arg(&m.pins.path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the older agent started on a newer layout:\n{err}");
    let refusal = format!("have layout version {next_layout}, newer than this agent's {this}");
    assert!(err.contains(&refusal) && err.contains("changed nothing"), "{err}");
    std::thread::sleep(Duration::from_millis(500));

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let c: LoadCounts = load.join().unwrap();
    println!("layout upgrade under load: {} connections proxied, {} direct, {} failed", c.proxied, c.direct, c.failed);
    assert!(c.proxied > 0);
    assert_eq!(
        (c.failed, c.direct),
        (0, 0),
        "errors: {:?}\nagent log:\n{}",
        &c.errors[..c.errors.len().min(10)],
        m.agent.log_text()
    );
    // The next layout's pinned state still serves the workload.
    assert_eq!(m.probe(1000, "192.0.2.10:80").trim(), "proxy 192.0.2.10:80 | peer 192.0.2.10:80");
}
