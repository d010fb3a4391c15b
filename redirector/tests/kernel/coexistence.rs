//! Other programs on the node's cgroups. Cilium's socket load balancer
//! attaches cgroup connect4/getpeername4 at the cgroup root and rewrites a
//! Service address to a backend; if it ran first, the proxy would see the
//! backend, not the Service (istio#27619, merbridge#357). The kernel runs a
//! socket's effective cgroup programs from its own cgroup up to the root
//! (kernel/bpf/cgroup.c, `compute_effective_progs`), so the agent attaches
//! below it (`--attach-cgroup=kubepods`). A stand-in for the load balancer
//! (`redirector-ebpf/src/standin_socklb.rs`, Cilium's `cil_sock4_connect`
//! and `cil_sock4_getpeername`) checks the order both ways.
use std::{fs::File, net::SocketAddr};

use aya::{
    maps::HashMap,
    programs::{links::CgroupAttachMode, CgroupSockAddr},
    Ebpf,
};
use redirector_testkit::Hop;

use super::*;

const VIP: &str = "198.51.100.100:80";
const BACKEND: &str = "192.0.2.10:80";

const CONFIG: &str = r#"
mesh:
  proxyUID: 1500
  outboundPort: 15001
  inboundPort: 15003
workloads:
  - name: app
    netns: {netns}
"#;

/// `bpf_sock_addr`'s view of an IPv4 endpoint, as the stand-in keys it.
fn endpoint(a: &str) -> u64 {
    let SocketAddr::V4(a) = a.parse().unwrap() else { panic!("{a}: IPv4") };
    ((u32::from_ne_bytes(a.ip().octets()) as u64) << 32) | a.port().to_be() as u64
}

/// A cgroup below the test's own (the "kubepods" of this test), joined by
/// the test process; left (back to the parent) and removed on drop.
struct ChildCgroup {
    path: PathBuf,
    parent: PathBuf,
}

impl ChildCgroup {
    fn new(parent: &Path) -> Self {
        let path = parent.join("kubepods");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("cgroup.procs"), std::process::id().to_string()).unwrap();
        Self { path, parent: parent.to_owned() }
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.parent.join("cgroup.procs"), std::process::id().to_string());
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The stand-in load balancer, VIP → BACKEND, attached at `cgroup`;
/// detached when dropped.
fn socket_lb(cgroup: &Path) -> Ebpf {
    let mut lb = Ebpf::load(testkit::SOCKLB_STANDIN_OBJECT).expect("the stand-in's object");
    let mut services: HashMap<_, u64, u64> = HashMap::try_from(lb.map_mut("STANDIN_LB4_SERVICES").unwrap()).unwrap();
    services.insert(endpoint(VIP), endpoint(BACKEND), 0).unwrap();
    for name in ["standin_sock4_connect", "standin_sock4_getpeername"] {
        let p: &mut CgroupSockAddr = lb.program_mut(name).unwrap().try_into().unwrap();
        p.load().unwrap();
        // A bpf_link (aya uses one on 5.7+), as Cilium's socketlb attaches:
        // links are multi-attach by nature, so the flags must be 0 (Single).
        p.attach(File::open(cgroup).unwrap(), CgroupAttachMode::Single).unwrap();
    }
    lb
}

/// (proxy's answer to the application, the application's getpeername,
/// the proxy user's own connect: its answer and getpeername).
fn observe(netns: &Path) -> (String, String, String, String) {
    let through_proxy = testkit::probe(netns, 1000, Proto::Tcp, VIP.parse().unwrap()).unwrap();
    let peer = |uid| {
        testkit::in_netns_as(netns, uid, || {
            use std::io::Read as _;
            let mut s = std::net::TcpStream::connect_timeout(&VIP.parse().unwrap(), Duration::from_secs(2))?;
            let peer = s.peer_addr()?.to_string();
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            std::io::Result::Ok((peer, answer.trim().to_string()))
        })
        .unwrap()
        .unwrap_or_else(|e| (format!("error: {e}"), String::new()))
    };
    let (app_peer, _) = peer(1000);
    let (proxy_peer, proxy_answer) = peer(1500);
    (through_proxy.trim().to_string(), app_peer, proxy_answer, proxy_peer)
}

/// Agent at the child cgroup, load balancer at the parent (the order
/// `--attach-cgroup=kubepods` gives under Cilium): the proxy sees the
/// Service address, its own connect to the Service reaches a backend
/// through the load balancer, getpeername shows the Service on both sides,
/// and the order survives an agent restart. Reversed (the agent at the
/// parent), the proxy sees the backend: the check tells the orders apart.
#[test]
fn agent_runs_before_a_socket_load_balancer_above_it() {
    if !require_kernel() {
        return;
    }
    let topo = Topology::new("co").unwrap();
    let parent = TestCgroup::new().unwrap();
    let kubepods = ChildCgroup::new(&parent.path);
    // The proxy (as Envoy: onwards to the original destination as its own
    // user) and the application both run in the child cgroup.
    let _proxy =
        Server::forwarder(&topo.app.path(), "0.0.0.0:15001".parse().unwrap(), 1500, Hop::Outbound, Vec::new()).unwrap();
    let dir = tmpdir("coexist");
    let config = dir.join("config.yaml");
    std::fs::write(&config, render(CONFIG, &topo.app.path())).unwrap();
    let pins = PinDir::new().unwrap();
    let expected = (
        format!("outbound {VIP} > direct {BACKEND} | peer {VIP}"),
        VIP.to_string(),
        format!("direct {BACKEND}"),
        VIP.to_string(),
    );

    let lb = socket_lb(&parent.path);
    let mut agent = AgentProcess::start(bin(), &config, &kubepods.path, &pins.path, &dir.join("agent.log")).unwrap();
    agent.wait_ready(bin(), &pins.path, &topo.app.path()).unwrap();
    assert_eq!(observe(&topo.app.path()), expected, "agent below the load balancer\n{}", agent.log_text());
    agent.stop();
    let mut agent = AgentProcess::start(bin(), &config, &kubepods.path, &pins.path, &dir.join("agent2.log")).unwrap();
    agent.wait_ready(bin(), &pins.path, &topo.app.path()).unwrap();
    assert_eq!(observe(&topo.app.path()), expected, "after an agent restart\n{}", agent.log_text());
    agent.stop();
    redirector::dataplane::cleanup(&pins.path).unwrap();
    drop(lb);

    // The other order: what a root-attached agent under Cilium gets.
    let _lb = socket_lb(&kubepods.path);
    let agent = AgentProcess::start(bin(), &config, &parent.path, &pins.path, &dir.join("agent3.log")).unwrap();
    agent.wait_ready(bin(), &pins.path, &topo.app.path()).unwrap();
    let (through_proxy, ..) = observe(&topo.app.path());
    assert!(
        through_proxy.starts_with(&format!("outbound {BACKEND} > direct {BACKEND}")),
        "load balancer first: {through_proxy}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
