//! Differential tests: the same connections through the mesh's own iptables
//! rules (osm-init, istio-iptables, Kuma, Linkerd) in one namespace and
//! through redirector in another give the same endpoints, original
//! destinations and peers.
use super::*;

#[test]
fn differential_exclusions_match_osm_init() {
    differential(EXCLUSIONS, &exclusion_cases());
}

/// osm-init's rules and redirector in one namespace (the migration path)
/// answer as osm-init's alone, outbound and inbound.
#[test]
fn coexisting_with_osm_init() {
    differential_with(EXCLUSIONS, &exclusion_cases(), true);
    inbound_vs_osm_init(true);
}

/// The cases of [`differential_exclusions_match_osm_init`].
fn exclusion_cases() -> Vec<Case> {
    vec![
        case("default (uid 1000)", 1000, "192.0.2.10:80", "proxy 192.0.2.10:80"),
        case("other uid (root)", 0, "192.0.2.10:8080", "proxy 192.0.2.10:8080"),
        case("proxy uid 1500", 1500, "192.0.2.10:80", "direct 192.0.2.10:80"),
        case("mesh excluded CIDR", 1000, "198.51.100.10:80", "direct 198.51.100.10:80"),
        case("annotation excluded CIDR", 1000, "203.0.113.10:80", "direct 203.0.113.10:80"),
        case("outside annotation CIDR", 1000, "203.0.113.200:80", "proxy 203.0.113.200:80"),
        case("mesh excluded port", 1000, "192.0.2.10:6379", "direct 192.0.2.10:6379"),
        case("annotation excluded port", 1000, "198.51.100.10:7070", "direct"),
        case("annotation excluded port (2)", 1000, "203.0.113.200:7070", "direct 203.0.113.200:7070"),
        case("admin port 15000 still redirected", 1000, "192.0.2.10:15000", "proxy 192.0.2.10:15000"),
        case("127.0.0.1", 1000, "127.0.0.1:8080", "direct 127.0.0.1:8080"),
        case("127.0.0.2 (only /32 exempt)", 1000, "127.0.0.2:8080", "proxy 127.0.0.2:8080"),
        case("own pod IP", 1000, "198.18.0.1:8080", "proxy 198.18.0.1:8080"),
        // Not redirected (127.0.0.1): conntrack answers the connection's
        // own destination, so must redirector.
        case("the proxy's port itself", 1000, "127.0.0.1:15001", "proxy 127.0.0.1:15001"),
        Case { proto: Proto::Udp, ..case("UDP untouched", 1000, "192.0.2.10:5353", "direct udp") },
        Case { from_workload: false, ..case("unlisted netns", 1000, "192.0.2.10:80", "direct 192.0.2.10:80") },
    ]
}

#[test]
fn differential_inclusion_list_matches_osm_init() {
    differential(
        r#"
mesh:
  outboundIPRangeInclusionList: ["192.0.2.0/24", "203.0.113.128/25"]
workloads:
  - name: app
    netns: {netns}
    annotations:
      openservicemesh.io/outbound-ip-range-exclusion-list: "203.0.113.200"
"#,
        &[
            case("included", 1000, "192.0.2.10:80", "proxy 192.0.2.10:80"),
            case("not included", 1000, "198.51.100.10:80", "direct 198.51.100.10:80"),
            case("not included (2)", 1000, "203.0.113.10:80", "direct 203.0.113.10:80"),
            case("included but excluded: exclusion wins", 1000, "203.0.113.200:80", "direct 203.0.113.200:80"),
            case("proxy uid", 1500, "192.0.2.10:80", "direct 192.0.2.10:80"),
        ],
    );
}

#[test]
fn differential_inbound_matches_osm_init() {
    inbound_vs_osm_init(false);
}

fn inbound_vs_osm_init(coexisting: bool) {
    if !require_kernel() {
        return;
    }
    // Reference: osm-init's PREROUTING rules in one namespace...
    let reference = IptablesWorkload::start("ri", INBOUND);
    let _ref_in = Server::proxy(&reference.topo.app.path(), "0.0.0.0:15003".parse().unwrap()).unwrap();
    let _ref_apps = app_servers(&reference.topo);
    // ...redirector in another, the inbound proxy listening before the
    // agent starts (found in /proc, not by sockops).
    let m = Managed::start_with(Topology::new("mi").unwrap(), INBOUND, |t| {
        let mut v = app_servers(t);
        v.push(Server::proxy(&t.app.path(), "0.0.0.0:15003".parse().unwrap()).unwrap());
        v
    });
    if coexisting {
        osm_init_in(&m.topo, INBOUND);
    }
    let pod = testkit::addrs::POD_IP;
    let cases: &[(&str, u16, bool)] = &[
        ("application port, from the peer", 8080, true),
        ("mesh inboundPortExclusionList", 9090, true),
        ("pod annotation inbound-port-exclusion-list", 7070, true),
        ("reserved 15010", 15010, true),
        ("reserved 15903", 15903, true),
        ("the inbound port itself", 15003, true),
        ("the outbound port, from the peer", 15001, true),
        ("nothing listening", 4444, true),
    ];
    let mut failures = Vec::new();
    for (name, port, _) in cases {
        let dst: std::net::SocketAddr = format!("{pod}:{port}").parse().unwrap();
        let want = testkit::probe(&reference.topo.peer.path(), 0, Proto::Tcp, dst).unwrap();
        let got = testkit::probe(&m.topo.peer.path(), 0, Proto::Tcp, dst).unwrap();
        // Peers differ only in the client port; compare the reply.
        let reply = |s: &str| s.split(" | ").next().unwrap_or("").to_string();
        if reply(&want) != reply(&got) {
            failures.push(format!("{name}: iptables {want:?}, redirector {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}\n{}", m.agent.log_text());
    // The headline case explicitly: the proxy saw the pod address and port.
    let got = testkit::probe(&m.topo.peer.path(), 0, Proto::Tcp, format!("{pod}:8080").parse().unwrap()).unwrap();
    assert!(got.starts_with(&format!("proxy {pod}:8080")), "{got}");
    // The proxy forwarding to the application (proxy UID, own pod IP) is
    // neither outbound- nor inbound-redirected: no loop.
    let got = m.probe(1500, &format!("{pod}:8080"));
    assert!(got.starts_with(&format!("direct {pod}:8080")), "{got}");
    let maps = Maps::open(&m.pins.path).unwrap();
    assert_eq!(maps.listener_keys().unwrap().len(), 1, "pre-existing listener not captured");
    let snap = redirector::inspect::snapshot(&m.pins.path).unwrap();
    let w = &snap.workloads[0];
    assert!(w.inbound_enabled && w.sk_lookup_attached, "inspect: inbound capture not shown as attached");
    assert_eq!(w.inbound_listeners, vec!["IPv4"]);
    let fill = snap.maps.iter().find(|f| f.name == "RDR_LISTENERS").unwrap();
    assert_eq!(fill.entries, 1, "inspect counts listeners");
    assert_eq!(w.inbound_port_exclusions, vec![7070, 9090, 15010, 15901, 15902, 15903, 15904]);
}

/// The pod's service address in the dialect suites (a ClusterIP stand-in).
const SERVICE: &str = "192.0.2.50:80";

/// A sidecar pod: application servers, the pilot-agent (15020) and ssh
/// ports, the proxy's admin port on loopback, and the proxy's two listeners
/// as Envoy-like forwarders running as `proxy_uid` (outbound resolves
/// SERVICE to this pod). The peer gets a control-plane server on 15012.
fn sidecar_pod(t: &Topology, proxy_uid: u32, outbound: u16, inbound: u16) -> Vec<Server> {
    use testkit::Hop;
    let app = t.app.path();
    let pod = testkit::addrs::POD_IP;
    let any = |p: u16| std::net::SocketAddr::from(([0, 0, 0, 0], p));
    let mut v: Vec<Server> = [15020u16, 22, 7070].into_iter().map(|p| Server::tcp(&app, any(p)).unwrap()).collect();
    v.push(Server::tcp(&app, "127.0.0.1:15000".parse().unwrap()).unwrap());
    let services = vec![(SERVICE.parse().unwrap(), format!("{pod}:8080").parse().unwrap())];
    v.push(Server::forwarder(&app, any(outbound), proxy_uid, Hop::Outbound, services).unwrap());
    v.push(Server::forwarder(&app, any(inbound), proxy_uid, Hop::Inbound, Vec::new()).unwrap());
    v.push(Server::tcp(&t.peer.path(), any(15012)).unwrap());
    v
}

/// The mesh's own init-container rules (generated for the same config) in
/// one namespace, the agent with the same config in another, the same pod
/// in both; every case must get the same answer from both.
fn dialect_differential(config: &str, cases: &[Case]) {
    dialect_differential_with(config, cases, false)
}

/// With `coexisting`, the agent's namespace also has the mesh's rules: a
/// pod injected with the iptables init container that redirector programs
/// as well (the migration path: install redirector, switch the init
/// container later) must behave as with the rules alone.
fn dialect_differential_with(config: &str, cases: &[Case], coexisting: bool) {
    if !require_kernel() {
        return;
    }
    let cfg = parse_config(&render(config, Path::new("/unused"))).unwrap();
    assert!(cfg.rejected.is_empty(), "{:?}", cfg.rejected);
    let policy = compile(&cfg.mesh, &cfg.workloads[0].annotations);
    let rules = oracle_commands(cfg.mesh.preset, &policy);
    let (uid, out, inb) = (cfg.mesh.proxy_uid, cfg.mesh.outbound_port, cfg.mesh.inbound_port);
    let reference = Topology::new("di").unwrap();
    reference.app.shell(&rules.join(" && ")).expect("the mesh's iptables rules");
    let _ref_servers = sidecar_pod(&reference, uid, out, inb);
    let m = Managed::start_full(Topology::new("db").unwrap(), config, |t| sidecar_pod(t, uid, out, inb), false);
    if coexisting {
        m.topo.app.shell(&rules.join(" && ")).expect("the mesh's iptables rules beside redirector");
    }
    let mut failures = Vec::new();
    for c in cases {
        let dst: std::net::SocketAddr = c.dst.parse().unwrap();
        let run = |topo: &Topology| {
            let ns = if c.from_workload { topo.app.path() } else { topo.peer.path() };
            poll_until(|| testkit::probe_from(&ns, c.uid, c.src, c.proto, dst).unwrap(), |g| !g.starts_with("error"))
        };
        let want = run(&reference);
        let got = run(&m.topo);
        let line = format!("{:<40} iptables: {want:<70} redirector: {got}", c.name);
        println!("{line}");
        if want != got || !got.starts_with(&c.expect) {
            failures.push(format!("{line}   (expected to start with {:?})", c.expect));
        }
    }
    assert!(
        failures.is_empty(),
        "redirector{} differs from the {} rules:\n{}\nagent log:\n{}",
        if coexisting { " beside them" } else { "" },
        cfg.mesh.preset.name(),
        failures.join("\n"),
        m.agent.log_text()
    );
}

fn peer_case(name: &'static str, dst: String, expect: impl Into<String>) -> Case {
    Case { from_workload: false, ..case(name, 0, dst, expect) }
}

const ISTIO: &str = r#"
mesh:
  preset: istio
workloads:
  - name: app
    netns: {netns}
    annotations:
      traffic.sidecar.istio.io/excludeOutboundPorts: "6379"
      traffic.sidecar.istio.io/excludeOutboundIPRanges: "203.0.113.0/25"
      traffic.sidecar.istio.io/excludeInboundPorts: "7070"
"#;

/// Istio differential suite: the exact istio-iptables rule set of seed 001
/// (REDIRECT mode) vs `preset: istio`, with Envoy-like forwarders as UID
/// 1337 and the six traffic types of seed 002 walked end to end.
#[test]
fn differential_istio_six_traffic_types() {
    dialect_differential(ISTIO, &differential_istio_six_traffic_types_cases());
}

/// The cases of [`differential_istio_six_traffic_types`].
fn differential_istio_six_traffic_types_cases() -> Vec<Case> {
    let pod = testkit::addrs::POD_IP;
    let to_app = format!("inbound {pod}:8080 > direct {pod}:8080");
    vec![
        peer_case("1 remote pod -> local pod", format!("{pod}:8080"), &to_app),
        case("2 local pod -> remote pod", 1000, "192.0.2.10:80", "outbound 192.0.2.10:80 > direct 192.0.2.10:80"),
        peer_case("3 prometheus -> pilot-agent 15020", format!("{pod}:15020"), "direct"),
        peer_case("3' ssh 22 (built into istio-iptables)", format!("{pod}:22"), "direct"),
        case("4 local pod -> own service", 1000, SERVICE, format!("outbound {SERVICE} > {to_app}")),
        case("4' local pod -> own pod IP", 1000, format!("{pod}:8080"), &to_app),
        case("5 envoy -> envoy on localhost", 1337, "127.0.0.1:15000", "direct 127.0.0.1:15000"),
        case("6 sidecar -> istiod", 1337, "192.0.2.10:15012", "direct 192.0.2.10:15012"),
        case("app -> localhost", 1000, "127.0.0.1:8080", "direct 127.0.0.1:8080"),
        case("excludeOutboundPorts", 1000, "192.0.2.10:6379", "direct"),
        case("excludeOutboundIPRanges", 1000, "203.0.113.10:80", "direct"),
        case("outside the excluded range", 1000, "203.0.113.200:80", "outbound"),
        peer_case("excludeInboundPorts", format!("{pod}:7070"), "direct"),
    ]
}

const KUMA: &str = r#"
mesh:
  preset: kuma
workloads:
  - name: app
    netns: {netns}
    annotations:
      traffic.kuma.io/exclude-outbound-ports: "6379"
      traffic.kuma.io/exclude-outbound-ips: "203.0.113.0/25"
      traffic.kuma.io/exclude-inbound-ports: "7070"
      traffic.kuma.io/exclude-inbound-ips: "192.0.2.10"
"#;

/// Kuma differential suite: kuma's transparent-proxy nat rules vs
/// `preset: kuma` (kuma-dp UID 5678). Differs from seed 001 where Kuma
/// differs: an application's call to its own pod IP is not sent through
/// the inbound listener, only kuma-dp's are; inbound sources can be excluded.
#[test]
fn differential_kuma() {
    dialect_differential(KUMA, &differential_kuma_cases());
}

/// The cases of [`differential_kuma`].
fn differential_kuma_cases() -> Vec<Case> {
    let pod = testkit::addrs::POD_IP;
    let to_app = format!("inbound {pod}:8080 > direct {pod}:8080");
    let from_excluded = Case {
        src: Some("192.0.2.10:0".parse().unwrap()),
        ..peer_case("exclude-inbound-ips source", format!("{pod}:8080"), "direct")
    };
    vec![
        peer_case("remote -> pod", format!("{pod}:8080"), &to_app),
        from_excluded,
        peer_case("exclude-inbound-ports", format!("{pod}:7070"), "direct"),
        case("app -> remote", 1000, "192.0.2.10:80", "outbound 192.0.2.10:80 > direct 192.0.2.10:80"),
        case("app -> own service (kuma-dp loops to inbound)", 1000, SERVICE, format!("outbound {SERVICE} > {to_app}")),
        case("app -> own pod IP (not redirected)", 1000, format!("{pod}:8080"), "direct"),
        case("app -> localhost", 1000, "127.0.0.1:8080", "direct 127.0.0.1:8080"),
        case("kuma-dp -> localhost", 5678, "127.0.0.1:15000", "direct 127.0.0.1:15000"),
        case("kuma-dp -> control plane", 5678, "192.0.2.10:15012", "direct 192.0.2.10:15012"),
        case("exclude-outbound-ports", 1000, "192.0.2.10:6379", "direct"),
        case("exclude-outbound-ips", 1000, "203.0.113.10:80", "direct"),
        case("outside the excluded range", 1000, "203.0.113.200:80", "outbound"),
    ]
}

const LINKERD: &str = r#"
mesh:
  preset: linkerd
workloads:
  - name: app
    netns: {netns}
    annotations:
      config.linkerd.io/skip-outbound-ports: "6379,7060-7080"
      config.linkerd.io/skip-inbound-ports: "7070"
      config.linkerd.io/skip-subnets: "192.0.2.0/24"
"#;

/// Linkerd differential suite: linkerd2-proxy-init's rules vs `preset:
/// linkerd` (proxy UID 2102, 4140/4143, every loopback route returned).
#[test]
fn differential_linkerd() {
    dialect_differential(LINKERD, &differential_linkerd_cases());
}

/// The cases of [`differential_linkerd`].
fn differential_linkerd_cases() -> Vec<Case> {
    let pod = testkit::addrs::POD_IP;
    let from_skipped = Case {
        src: Some("192.0.2.10:0".parse().unwrap()),
        ..peer_case("skip-subnets source", format!("{pod}:8080"), "direct")
    };
    vec![
        peer_case("remote -> pod", format!("{pod}:8080"), format!("inbound {pod}:8080 > direct {pod}:8080")),
        from_skipped,
        peer_case("skip-inbound-ports", format!("{pod}:7070"), "direct"),
        case("app -> remote", 1000, "192.0.2.10:80", "outbound 192.0.2.10:80 > direct 192.0.2.10:80"),
        case("app -> own pod IP (-o lo RETURN)", 1000, format!("{pod}:8080"), "direct"),
        case("app -> localhost", 1000, "127.0.0.1:8080", "direct 127.0.0.1:8080"),
        case("proxy -> remote", 2102, "192.0.2.10:15012", "direct 192.0.2.10:15012"),
        case("skip-outbound-ports", 1000, "192.0.2.10:6379", "direct"),
        case("skip-outbound-ports range", 1000, "203.0.113.10:7070", "direct"),
        case("app -> other port", 1000, "203.0.113.10:80", "outbound"),
    ]
}

/// Istio, Kuma and Linkerd pods injected with their iptables init container
/// and programmed by redirector too (the migration path): every traffic
/// type of the differential suites answers as with the rules alone.
#[test]
fn coexisting_with_istio_iptables() {
    dialect_differential_with(ISTIO, &differential_istio_six_traffic_types_cases(), true);
}

#[test]
fn coexisting_with_kuma_rules() {
    dialect_differential_with(KUMA, &differential_kuma_cases(), true);
}

#[test]
fn coexisting_with_linkerd_proxy_init() {
    dialect_differential_with(LINKERD, &differential_linkerd_cases(), true);
}
