//! `redirector-lab demo` (`cargo xtask demo`): a live redirect in throwaway namespaces, scoped to a
//! demo cgroup, cleaned up at the end (also on failure).
use std::{net::SocketAddrV4, path::Path, time::Duration};

use anyhow::{bail, Context as _, Result};
use redirector_testkit::{self as testkit, AgentProcess, PinDir, Proto, Server, TestCgroup, Topology};

fn config(netns: &Path, extra_port_exclusions: &str) -> String {
    format!(
        r#"mesh:
  proxyUID: 1500
  outboundPort: 15001
  inboundPort: 15003
  outboundIPRangeExclusionList: ["198.51.100.0/24"]
  outboundPortExclusionList: [6379]
workloads:
  - name: demo-app
    netns: {}
    annotations:
      openservicemesh.io/outbound-port-exclusion-list: "7070{extra_port_exclusions}"
"#,
        netns.display()
    )
}

struct Case {
    what: &'static str,
    uid: u32,
    dst: &'static str,
    expect_proxy: bool,
}

fn run_cases(netns: &Path, cases: &[Case]) -> Result<()> {
    let mut failed = 0;
    for c in cases {
        let dst: SocketAddrV4 = c.dst.parse()?;
        let got = testkit::probe(netns, c.uid, Proto::Tcp, dst.into())?;
        let via_proxy = got.starts_with("proxy ");
        let ok = via_proxy == c.expect_proxy && !got.starts_with("error");
        if !ok {
            failed += 1;
        }
        println!("  {:<4} {:<44} uid {:<5} -> {:<20} {}", if ok { "ok" } else { "FAIL" }, c.what, c.uid, c.dst, got);
    }
    if failed > 0 {
        bail!("{failed} demo connection(s) did not behave as expected");
    }
    Ok(())
}

/// Polls `done` every 100 ms for up to 10 s; the error carries the agent log.
fn wait_for(agent: &AgentProcess, done: impl Fn() -> Result<bool>) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done()? {
        if std::time::Instant::now() > deadline {
            bail!("the change did not take effect within 10s; agent log:\n{}", agent.log_text());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

pub fn run() -> Result<()> {
    let bin = redirector_testkit::agent_binary()?;
    println!("== redirector demo: workload netns + peer netns (documentation addresses only)");
    let topo = Topology::new("demo").context("creating demo namespaces (are you root?)")?;
    let cgroup = TestCgroup::new().context("creating the demo cgroup")?;
    let pins = PinDir::new()?;
    let _proxy = Server::proxy(&topo.app.path(), "127.0.0.1:15001".parse()?)?;
    let dir = std::env::temp_dir().join(testkit::unique("redirector-demo-"));
    std::fs::create_dir_all(&dir)?;
    let cfg_path = dir.join("config.yaml");
    std::fs::write(&cfg_path, config(&topo.app.path(), ""))?;
    println!("-- config ({}):\n{}", cfg_path.display(), config(&topo.app.path(), ""));
    let result = (|| -> Result<()> {
        let mut agent = AgentProcess::start(&bin, &cfg_path, &cgroup.path, &pins.path, &dir.join("agent.log"))?;
        agent.wait_ready(&bin, &pins.path, &topo.app.path())?;
        println!("-- agent attached to demo cgroup {}; connections from the workload:", cgroup.path.display());
        run_cases(
            &topo.app.path(),
            &[
                Case {
                    what: "app -> remote service (redirected)",
                    uid: 1000,
                    dst: "192.0.2.10:80",
                    expect_proxy: true,
                },
                Case {
                    what: "proxy UID 1500 -> remote (bypass)",
                    uid: 1500,
                    dst: "192.0.2.10:80",
                    expect_proxy: false,
                },
                Case { what: "excluded CIDR 198.51.100.0/24", uid: 1000, dst: "198.51.100.10:80", expect_proxy: false },
                Case { what: "excluded port 6379 (mesh)", uid: 1000, dst: "192.0.2.10:6379", expect_proxy: false },
                Case {
                    what: "excluded port 7070 (annotation)",
                    uid: 1000,
                    dst: "203.0.113.10:7070",
                    expect_proxy: false,
                },
                Case { what: "127.0.0.1 (never redirected)", uid: 1000, dst: "127.0.0.1:8080", expect_proxy: false },
            ],
        )?;
        println!("-- inbound: the proxy listens on 0.0.0.0:15003 (sockops registers it); connections from the peer netns over the veth:");
        let _inbound = Server::proxy(&topo.app.path(), "0.0.0.0:15003".parse()?)?;
        let _reserved = Server::tcp(&topo.app.path(), "0.0.0.0:15010".parse()?)?;
        wait_for(&agent, || {
            Ok(testkit::probe(&topo.peer.path(), 0, Proto::Tcp, "198.18.0.1:8080".parse()?)?.starts_with("proxy"))
        })?;
        run_cases(
            &topo.peer.path(),
            &[
                Case {
                    what: "peer -> pod :8080 (to the inbound proxy)",
                    uid: 0,
                    dst: "198.18.0.1:8080",
                    expect_proxy: true,
                },
                Case {
                    what: "peer -> pod :15010 (reserved, not redirected)",
                    uid: 0,
                    dst: "198.18.0.1:15010",
                    expect_proxy: false,
                },
            ],
        )?;
        println!("-- live change: annotation now also excludes port 80 (no restart)");
        std::fs::write(&cfg_path, config(&topo.app.path(), ",80"))?;
        wait_for(&agent, || {
            Ok(testkit::probe(&topo.app.path(), 1000, Proto::Tcp, "192.0.2.10:80".parse()?)?.starts_with("direct"))
        })?;
        run_cases(
            &topo.app.path(),
            &[
                Case { what: "app -> remote :80 (now excluded)", uid: 1000, dst: "192.0.2.10:80", expect_proxy: false },
                Case {
                    what: "app -> remote :8080 (still redirected)",
                    uid: 1000,
                    dst: "192.0.2.10:8080",
                    expect_proxy: true,
                },
            ],
        )?;
        println!("-- bpftool map dump pinned {}/RDR_WORKLOADS", pins.path.display());
        match testkit::sh("bpftool", &["map", "dump", "pinned", &pins.path.join("RDR_WORKLOADS").display().to_string()])
        {
            Ok(out) => print!("{out}"),
            Err(e) => println!("   (bpftool not available: {e:#})"),
        }
        println!("-- redirector inspect --pin-dir {}", pins.path.display());
        let snap = redirector::inspect::snapshot(&pins.path)?;
        print!("{}", redirector::inspect::render_text(&snap));
        agent.stop();
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    drop(pins);
    drop(cgroup);
    drop(topo);
    println!("-- cleaned up: agent stopped, links detached, pins, cgroup and namespaces removed");
    result?;
    println!("== demo passed");
    Ok(())
}
