//! Proxy identity by cgroup: an application process running as the
//! proxy's UID is still redirected.
use super::*;

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
