use super::*;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn istio_init(args: &[&str]) -> InitContainer {
    InitContainer { name: "istio-init".into(), args: s(args), ..Default::default() }
}

fn pod_with(c: InitContainer) -> PodInfo {
    PodInfo {
        uid: "u".into(),
        namespace: "ns".into(),
        name: "p".into(),
        init_containers: vec![c],
        ..Default::default()
    }
}

fn injected(d: Decision) -> Reading {
    match d {
        Decision::Injected { reading, .. } => *reading,
        other => panic!("not read: {other:?}"),
    }
}

#[test]
fn argv_forms_are_pflags() {
    // The module's own tests cover the forms; here, where a tool starts.
    assert!(istio::tool_args(&s(&["istio-iptables", "-p", "1"])).is_some());
    assert!(istio::tool_args(&s(&["/usr/local/bin/pilot-agent", "istio-iptables"])).is_some());
    assert!(istio::tool_args(&s(&["my", "custom", "args"])).is_none());
    assert!(is_gate(&s(&["redirector", "wait-ready", "--agent-socket=/x"])));
    assert!(!is_gate(&s(&["redirector", "run"])));
}

#[test]
fn istio_defaults_and_lists_as_istio_iptables_reads_them() {
    let r = injected(decide(
        &pod_with(istio_init(&[
            "istio-iptables",
            "-p",
            "15001",
            "-z",
            "15006",
            "-u",
            "1337",
            "-m",
            "REDIRECT",
            "-i",
            "*",
            "-x",
            "",
            "-b",
            "*",
            "-d",
            "15090,15021,15020",
            "--log_output_level=default:info",
        ])),
        &[],
    ));
    let p = crate::compile(&r.mesh, &r.annotations);
    assert_eq!((p.proxy_uid, p.proxy_gid, p.outbound_port, p.inbound_port), (1337, Some(1337), 15001, 15006));
    assert_eq!(p.inbound_port_exclusion, [15008, 15020, 15021, 15090].into(), "-d and the tunnel port");
    assert_eq!(p.outbound_ip_range_inclusion, None, "-i '*'");
    assert_eq!(p.inbound_port_inclusion, None, "-b '*'");
    assert_eq!(p.loopback, crate::LoopbackMode::ProxyToInbound);
    // An IPv4 pod without --dual-stack: ip6tables is not programmed.
    assert!(p.outbound_ip_range_exclusion.contains(&"::/0".parse().unwrap()));

    // Empty includes: nothing captured; -x kept; the env's dual-stack.
    let mut c = istio_init(&["istio-iptables", "-i", "", "-x", "192.0.2.0/24", "-b", "", "-d", "15020"]);
    c.env.insert("ISTIO_DUAL_STACK".into(), Some("true".into()));
    let r = injected(decide(&pod_with(c), &[]));
    let p = crate::compile(&r.mesh, &r.annotations);
    assert_eq!(p.outbound_ip_range_inclusion, Some(Default::default()), "-i \"\" redirects nothing");
    assert!(!p.inbound, "-b \"\" adds no inbound rule");
    assert_eq!(p.outbound_ip_range_exclusion, ["192.0.2.0/24".parse().unwrap()].into());

    // -q with -i "": only those ports; -q with an -i list: refused.
    let r = injected(decide(&pod_with(istio_init(&["istio-iptables", "-i", "", "-q", "80,443"])), &[]));
    let p = crate::compile(&r.mesh, &r.annotations);
    assert_eq!((p.outbound_ip_range_inclusion, p.outbound_port_inclusion), (None, Some([80, 443].into())));
    let d = decide(&pod_with(istio_init(&["istio-iptables", "-i", "198.51.100.0/24", "-q", "80"])), &[]);
    assert!(matches!(d, Decision::Refused { .. }), "{d:?}");
}

/// istio-iptables' DNS flags (and the env the injector's proxyMetadata
/// sets): capture of resolv.conf's nameservers on 15053, of every address
/// with --capture-all-dns, IPv6 only for a dual-stack (or IPv6) pod.
#[test]
fn istio_dns_capture_is_honoured() {
    use crate::{DnsCapture, DnsServers};
    let dns = |args: &[&str], env: Option<(&str, &str)>| {
        let mut c = istio_init(args);
        if let Some((k, v)) = env {
            c.env.insert(k.into(), Some(v.into()));
        }
        let r = injected(decide(&pod_with(c), &[]));
        crate::compile(&r.mesh, &r.annotations).dns
    };
    let listed = DnsCapture { port: 15053, servers: DnsServers::ResolvConf, istio_order: true, ipv6: false };
    assert_eq!(dns(&["istio-iptables", "--redirect-dns"], None), Some(listed.clone()));
    assert_eq!(dns(&["istio-iptables"], Some(("ISTIO_META_DNS_CAPTURE", "true"))), Some(listed.clone()));
    assert_eq!(dns(&["istio-iptables"], Some(("ISTIO_META_DNS_CAPTURE", "false"))), None);
    // The flag over the env.
    assert_eq!(dns(&["istio-iptables", "--redirect-dns=false"], Some(("ISTIO_META_DNS_CAPTURE", "true"))), None);
    assert_eq!(
        dns(&["istio-iptables", "--redirect-dns", "--capture-all-dns", "--dual-stack"], None),
        Some(DnsCapture { servers: DnsServers::All, ipv6: true, ..listed })
    );
    // --capture-all-dns alone captures nothing, as istio-iptables.
    let r = injected(decide(&pod_with(istio_init(&["istio-iptables", "--capture-all-dns"])), &[]));
    assert_eq!(r.mesh.dns, None);
    assert!(r.notes.iter().any(|n| n.contains("--capture-all-dns")), "{:?}", r.notes);
}

#[test]
fn what_istio_asks_that_redirector_refuses() {
    for (args, env, setting) in [
        (&["istio-iptables", "-m", "TPROXY"][..], None, "-m \"TPROXY\""),
        (&["istio-iptables", "-k", "net1"], None, "-k \"net1\""),
        (&["istio-iptables", "-u", "1,2"], None, "-u"),
        (&["istio-iptables"], Some(("ISTIO_OUTBOUND_OWNER_GROUPS", "java")), "ISTIO_OUTBOUND_OWNER_GROUPS"),
        (&["istio-iptables", "-i", "127.0.0.1/24"], None, "loopback"),
    ] {
        let mut c = istio_init(args);
        if let Some((k, v)) = env {
            c.env.insert(k.into(), Some(v.into()));
        }
        match decide(&pod_with(c), &[]) {
            Decision::Refused { problem: Problem::Settings(r), .. } => {
                assert!(r.iter().any(|r| r.setting.contains(setting)), "{args:?}: {r:?}")
            }
            other => panic!("{args:?}: {other:?}"),
        }
    }
    // A malformed command line is refused with istio-iptables' own words.
    match decide(&pod_with(istio_init(&["istio-iptables", "--nope"])), &[]) {
        Decision::Refused { problem: Problem::Unreadable(e), .. } => assert!(e.contains("unknown flag: --nope"), "{e}"),
        other => panic!("{other:?}"),
    }
    // A user's own istio-init (istio's proxy-override case) is not read.
    match decide(&pod_with(istio_init(&["my", "custom", "args"])), &[]) {
        Decision::Refused { problem: Problem::Unreadable(e), .. } => assert!(e.contains("\"my\""), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn linkerd_flags() {
    let c = InitContainer {
        name: "linkerd-init".into(),
        command: s(&["/usr/lib/linkerd/linkerd2-proxy-init"]),
        args: s(&[
            "--incoming-proxy-port",
            "4143",
            "--outgoing-proxy-port",
            "4140",
            "--proxy-uid",
            "2102",
            "--inbound-ports-to-ignore",
            "4190,4191,22,8100-8102",
            "--outbound-ports-to-ignore",
            "5432",
            "--ipv6=false",
            "--subnets-to-ignore",
            "192.0.2.0/24",
        ]),
        ..Default::default()
    };
    let r = injected(decide(&pod_with(c), &[]));
    let p = crate::compile(&r.mesh, &r.annotations);
    assert_eq!((p.proxy_uid, p.proxy_gid, p.outbound_port, p.inbound_port), (2102, None, 4140, 4143));
    assert_eq!(p.inbound_port_exclusion, [22, 4190, 4191, 8100, 8101, 8102].into());
    assert_eq!(p.outbound_port_exclusion, [5432].into());
    assert!(p.inbound_source_exclusion.contains(&"192.0.2.0/24".parse().unwrap()));
    assert!(p.outbound_ip_range_exclusion.contains(&"::/0".parse().unwrap()), "--ipv6=false");
    // No --proxy-uid: proxy-init's own refusal.
    let c = InitContainer {
        name: "linkerd-init".into(),
        args: s(&["--incoming-proxy-port", "4143"]),
        ..Default::default()
    };
    assert!(matches!(decide(&pod_with(c), &[]), Decision::Refused { problem: Problem::Unreadable(_), .. }));
}

#[test]
fn kuma_config_from_the_annotation_and_flags_over_it() {
    let mut c = InitContainer {
        name: "kuma-init".into(),
        command: s(&["/usr/bin/kumactl", "install", "transparent-proxy"]),
        args: s(&["--config=/tmp/tp/config.yaml", "--exclude-outbound-ports=1236"]),
        ..Default::default()
    };
    c.downward_files.insert(
        "/tmp/tp/config.yaml".into(),
        "metadata.annotations['traffic.kuma.io/transparent-proxy-config']".into(),
    );
    let mut pod = pod_with(c);
    pod.annotations.insert(
        "traffic.kuma.io/transparent-proxy-config".into(),
        "ipFamilyMode: ipv4\nkumaDPUser: \"5679\"\nredirect:\n  inbound:\n    enabled: true\n    excludePorts: [9000]\n    \
         port: 15006\n  outbound:\n    enabled: true\n    port: 15001\n    excludePortsForIPs: [\"203.0.113.1\"]\n  dns:\n    \
         enabled: false\n"
            .into(),
    );
    let r = injected(decide(&pod, &[]));
    let p = crate::compile(&r.mesh, &r.annotations);
    assert_eq!((p.proxy_uid, p.outbound_port, p.inbound_port), (5679, 15001, 15006));
    assert_eq!(p.inbound_port_exclusion, [9000].into());
    assert_eq!(p.outbound_port_exclusion, [1236].into(), "the flag over the file");
    assert!(p.outbound_ip_range_exclusion.contains(&"203.0.113.1/32".parse().unwrap()));
    assert!(p.outbound_ip_range_exclusion.contains(&"::/0".parse().unwrap()), "ipFamilyMode: ipv4");
    assert_eq!(p.dns, None, "Kuma's default: DNS off");
    // DNS on: every address (captureAll's default) on kuma-dp's 15053,
    // IPv4 only (ipFamilyMode: ipv4); captureAll false: resolv.conf's
    // nameservers; another resolv.conf: refused. An unknown key: refused
    // as unreadable.
    let cfg = "traffic.kuma.io/transparent-proxy-config";
    let dns_of = |pod: &PodInfo| {
        let r = injected(decide(pod, &[]));
        crate::compile(&r.mesh, &r.annotations).dns.expect("DNS capture")
    };
    pod.annotations.insert(cfg.into(), "ipFamilyMode: ipv4\nredirect:\n  dns:\n    enabled: true\n".into());
    let d = dns_of(&pod);
    assert_eq!((d.port, &d.servers, d.istio_order, d.ipv6), (15053, &crate::DnsServers::All, false, false));
    pod.annotations
        .insert(cfg.into(), "redirect:\n  dns:\n    enabled: true\n    captureAll: false\n    port: 25053\n".into());
    let d = dns_of(&pod);
    assert_eq!((d.port, &d.servers, d.ipv6), (25053, &crate::DnsServers::ResolvConf, true));
    pod.annotations.insert(cfg.into(), "redirect:\n  dns:\n    enabled: true\n    port: 0\n".into());
    assert!(matches!(decide(&pod, &[]), Decision::Refused { problem: Problem::Unreadable(_), .. }));
    pod.annotations
        .insert(cfg.into(), "redirect:\n  dns:\n    enabled: true\n    resolvConfigPath: /etc/other.conf\n".into());
    assert!(matches!(decide(&pod, &[]), Decision::Refused { problem: Problem::Settings(_), .. }));
    pod.annotations.insert(cfg.into(), "redirect:\n  inbound:\n    excludePortz: [1]\n".into());
    match decide(&pod, &[]) {
        Decision::Refused { problem: Problem::Unreadable(e), .. } => assert!(e.contains("excludePortz"), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn meshed_means_a_sidecar_workload() {
    let mut gw = PodInfo { containers: s(&["istio-proxy"]), ..Default::default() };
    assert!(matches!(decide(&gw, &[]), Decision::NotMeshed { .. }), "a gateway: a proxy, no init container");
    gw.labels.insert("redirector.dev/meshed".into(), "true".into());
    let rule: MeshedWhen = "label:redirector.dev/meshed=true".parse().unwrap();
    assert!(matches!(decide(&gw, &[rule]), Decision::Settings { .. }), "an explicit rule");
    let mut p = pod_with(istio_init(&["istio-iptables"]));
    p.annotations.insert("sidecar.istio.io/interceptionMode".into(), "NONE".into());
    assert!(matches!(decide(&p, &[]), Decision::NotMeshed { .. }));
    let mut p = pod_with(istio_init(&["istio-iptables"]));
    p.labels.insert("sidecar.istio.io/inject".into(), "false".into());
    assert!(matches!(decide(&p, &[]), Decision::NotMeshed { .. }));
    let gate = InitContainer {
        name: "redirector-init".into(),
        command: s(&["redirector", "wait-ready"]),
        ..Default::default()
    };
    assert!(matches!(decide(&pod_with(gate.clone()), &[]), Decision::Settings { .. }));
    // The gate before Istio CNI's validator: the validator's flags are
    // what the injector decided.
    let mut both = pod_with(gate);
    both.init_containers.push(InitContainer {
        name: "istio-validation".into(),
        args: s(&["istio-iptables", "-u", "1234", "--run-validation", "--skip-rule-apply"]),
        ..Default::default()
    });
    let r = injected(decide(&both, &[]));
    assert_eq!(r.mesh.proxy_uid, 1234);
}

/// Every injected pod of the meshes' own injector goldens
/// (`tests/fixtures/upstream`, copied unmodified from
/// `../shared/upstream`, provenance in its README) is classified, and
/// what each one's init container asks for is what the golden's case
/// says.
#[test]
#[cfg(feature = "k8s")]
fn the_meshes_own_injector_goldens() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upstream");
    let mut seen = 0;
    let mut outcomes = BTreeMap::new();
    for mesh in ["istio", "linkerd", "kuma"] {
        for f in walk(&dir.join(mesh)) {
            let name = f.strip_prefix(&dir).unwrap().display().to_string();
            let text = std::fs::read_to_string(&f).unwrap();
            let pods = crate::k8s::pods::pods_from_manifests(&text).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            for (i, (_, info)) in pods.iter().enumerate() {
                let d = decide(info, &[]);
                let what = match &d {
                    Decision::Injected { tool, .. } => format!("injected {tool}"),
                    Decision::Settings { why } => format!("settings: {why}"),
                    Decision::Refused { problem: Problem::Settings(r), .. } => {
                        format!("refused: {}", r.iter().map(|r| r.setting.clone()).collect::<Vec<_>>().join(", "))
                    }
                    Decision::Refused { problem: Problem::Unreadable(e), .. } => format!("unreadable: {e}"),
                    Decision::Refused { problem: Problem::Unverified(e), .. } => format!("unverified: {e}"),
                    Decision::NotMeshed { .. } => "not meshed".into(),
                };
                outcomes.insert(format!("{name}#{i}"), what);
                seen += 1;
            }
        }
    }
    assert!(seen > 60, "only {seen} pods in the corpus");
    if std::env::var_os("REDIRECTOR_PRINT_CORPUS").is_some() {
        for (k, v) in &outcomes {
            println!("{k}: {v}");
        }
    }
    let expect = |file_part: &str, want: &str| {
        let hits: Vec<_> = outcomes.iter().filter(|(k, _)| k.contains(file_part)).collect();
        assert!(!hits.is_empty(), "no pod of {file_part}");
        for (k, v) in hits {
            assert!(v.starts_with(want) || v.contains(want), "{k}: {v} (expected {want})");
        }
    };
    // Istio's cases (the README's table).
    expect("istio/pkg__kube__inject__testdata__inject__hello.yaml.injected", "injected istio-iptables");
    expect("hello.yaml.cni.injected", "injected istio-iptables");
    expect("istio/pkg__kube__inject__testdata__inject__hello-tproxy.yaml.injected", "-m \"TPROXY\"");
    expect("hello-openshift-tproxy.yaml.injected", "-m \"TPROXY\"");
    expect("kubevirtInterfaces.yaml.injected", "-k \"net1\"");
    expect("reroute-virtual-interfaces_list.yaml.injected", "-k \"net1ps5,net2qr9\"");
    expect("traffic-annotations.yaml.injected", "loopback range");
    expect("traffic-annotations-empty-includes.yaml.injected", "injected istio-iptables");
    expect("traffic-params.yaml.injected", "loopback range");
    expect("gateway.yaml.injected", "not meshed");
    expect("init-no-intercept-no-native-sidecar.yaml.injected", "not meshed");
    expect("hello-host-network.yaml.injected", "not meshed");
    expect("proxy-override.yaml.injected", "unreadable");
    expect("istio/pkg__kube__inject__testdata__inject__hello.yaml#", "not meshed");
    // Linkerd: proxy-init in both forms; CNI mode's validator.
    expect("inject_emojivoto_deployment.golden.yml", "injected linkerd2-proxy-init");
    expect("inject_emojivoto_pod_proxyignores.golden.yml", "injected linkerd2-proxy-init");
    expect("inject_tap_deployment.input.yml", "injected linkerd2-proxy-init");
    expect("inject_emojivoto_deployment_no_init_container.golden.yml", "settings: Linkerd CNI mode");
    expect("inject_emojivoto_deployment.input.yml", "not meshed");
    // Kuma: the annotation's config; DNS asked for (honoured); its own eBPF.
    expect("kuma/pkg__plugins__runtime__k8s__webhooks__injector__testdata__inject.01.golden.yaml", "injected kumactl");
    expect("kuma/pkg__plugins__runtime__k8s__webhooks__injector__testdata__inject.34.golden.yaml", "injected kumactl");
    expect(
        "kuma/tag-2.12.0/pkg__plugins__runtime__k8s__webhooks__injector__testdata__inject.01.golden.yaml",
        "injected kumactl",
    );
    expect(
        "kuma/tag-2.12.0/pkg__plugins__runtime__k8s__webhooks__injector__testdata__inject.23.golden.yaml",
        "injected kumactl",
    );
    expect(
        "kuma/tag-2.12.0/pkg__plugins__runtime__k8s__webhooks__injector__testdata__inject.30.golden.yaml",
        "refused: --ebpf-enabled",
    );
    expect(
        "kuma/pkg__plugins__runtime__k8s__webhooks__injector__testdata__inject.36.golden.yaml",
        "refused: dropInvalidPackets",
    );
    expect("kuma/pkg__plugins__runtime__k8s__webhooks__injector__testdata__inject.41.golden.yaml", "injected kuma-cni");
    // Istio 1.0's proxy_init ran its image's entrypoint with no args.
    expect("inject_emojivoto_istio.input.yml", "unreadable: it has neither command nor args");
    // Nothing else is unreadable than what is named above.
    let unexpected: Vec<_> = outcomes
        .iter()
        .filter(|(k, v)| v.starts_with("unreadable") && !k.contains("proxy-override") && !k.contains("emojivoto_istio"))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:#?}");
}

#[cfg(feature = "k8s")]
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "injected") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// osm-injector's script for these lists, as `generateIptablesCommands`
/// (openservicemesh/osm `pkg/injector/iptables.go`) writes it.
pub(crate) fn osm_script(
    inbound_excl: &str,
    out_excl_cidrs: &[&str],
    out_excl_ports: &str,
    incl: &[&str],
    extra: &[&str],
) -> String {
    let mut r = vec![
        "# OSM sidecar interception rules".to_string(),
        "*nat".into(),
        ":OSM_PROXY_INBOUND - [0:0]".into(),
        ":OSM_PROXY_IN_REDIRECT - [0:0]".into(),
        ":OSM_PROXY_OUTBOUND - [0:0]".into(),
        ":OSM_PROXY_OUT_REDIRECT - [0:0]".into(),
        "-A OSM_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-port 15003".into(),
        "-A PREROUTING -p tcp -j OSM_PROXY_INBOUND".into(),
    ];
    for p in [15010, 15901, 15902, 15903, 15904] {
        r.push(format!("-A OSM_PROXY_INBOUND -p tcp --dport {p} -j RETURN"));
    }
    r.push("-A OSM_PROXY_INBOUND -p tcp -j OSM_PROXY_IN_REDIRECT".into());
    if !inbound_excl.is_empty() {
        r.push(format!("-I OSM_PROXY_INBOUND -p tcp --match multiport --dports {inbound_excl} -j RETURN"));
    }
    r.extend([
        "-A OSM_PROXY_OUT_REDIRECT -p tcp -j REDIRECT --to-port 15001".to_string(),
        "-A OSM_PROXY_OUT_REDIRECT -p tcp --dport 15000 -j ACCEPT".into(),
        "-A OUTPUT -p tcp -j OSM_PROXY_OUTBOUND".into(),
        "-A OSM_PROXY_OUTBOUND -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1500 -j OSM_PROXY_IN_REDIRECT".into(),
        "-A OSM_PROXY_OUTBOUND -o lo -m owner ! --uid-owner 1500 -j RETURN".into(),
        "-A OSM_PROXY_OUTBOUND -m owner --uid-owner 1500 -j RETURN".into(),
        "-A OSM_PROXY_OUTBOUND -d 127.0.0.1/32 -j RETURN".into(),
    ]);
    r.extend(extra.iter().map(|s| s.to_string()));
    for c in out_excl_cidrs {
        r.push(format!("-A OSM_PROXY_OUTBOUND -d {c} -j RETURN"));
    }
    if !out_excl_ports.is_empty() {
        r.push(format!("-A OSM_PROXY_OUTBOUND -p tcp --match multiport --dports {out_excl_ports} -j RETURN"));
    }
    if incl.is_empty() {
        r.push("-A OSM_PROXY_OUTBOUND -j OSM_PROXY_OUT_REDIRECT".into());
    } else {
        for c in incl {
            r.push(format!("-A OSM_PROXY_OUTBOUND -d {c} -j OSM_PROXY_OUT_REDIRECT"));
        }
        r.push("-A OSM_PROXY_OUTBOUND -j RETURN".into());
    }
    format!("iptables-restore --noflush <<EOF\n{}\nCOMMIT\nEOF\n", r.join("\n"))
}

fn osm_init(script: String) -> InitContainer {
    InitContainer {
        name: "osm-init".into(),
        command: s(&["/bin/sh"]),
        args: vec!["-c".into(), script],
        ..Default::default()
    }
}

#[test]
fn osm_init_rule_sets() {
    let r = injected(decide(
        &pod_with(osm_init(osm_script("8080,8081", &["192.0.2.0/24"], "5432", &["198.51.100.0/24"], &[]))),
        &[],
    ));
    let p = crate::compile(&r.mesh, &r.annotations);
    assert_eq!((p.proxy_uid, p.outbound_port, p.inbound_port), (1500, 15001, 15003));
    assert_eq!(p.inbound_port_exclusion, [8080, 8081, 15010, 15901, 15902, 15903, 15904].into());
    assert_eq!(p.outbound_port_exclusion, [5432].into());
    assert!(p.outbound_ip_range_exclusion.contains(&"192.0.2.0/24".parse().unwrap()));
    assert!(p.outbound_ip_range_exclusion.contains(&"::/0".parse().unwrap()), "osm-init programs no ip6tables");
    assert_eq!(p.outbound_ip_range_inclusion, Some(["198.51.100.0/24".parse().unwrap()].into()));
    assert_eq!(p.loopback, crate::LoopbackMode::ProxyToInbound);
    // No lists: the catch-all.
    let r = injected(decide(&pod_with(osm_init(osm_script("", &[], "", &[], &[]))), &[]));
    assert_eq!(crate::compile(&r.mesh, &r.annotations).outbound_ip_range_inclusion, None);
    // What redirector cannot do: refused, named.
    for (extra, setting) in [
        ("-A OSM_PROXY_OUTBOUND -o eth1 -j RETURN", "networkInterfaceExclusionList (eth1)"),
        (
            "-I OUTPUT -p tcp -o lo -d 127.0.0.1/32 -m owner --uid-owner 1500 -j DNAT --to-destination $POD_IP",
            "localProxyMode: PodIP",
        ),
    ] {
        match decide(&pod_with(osm_init(osm_script("", &[], "", &[], &[extra]))), &[]) {
            Decision::Refused { problem: Problem::Settings(r), .. } => assert_eq!(r[0].setting, setting),
            other => panic!("{extra}: {other:?}"),
        }
    }
    // A rule osm-injector never writes: unreadable, the line named.
    let odd = osm_script("", &[], "", &[], &["-A OSM_PROXY_OUTBOUND -p udp -j RETURN"]);
    match decide(&pod_with(osm_init(odd)), &[]) {
        Decision::Refused { problem: Problem::Unreadable(e), .. } => assert!(e.contains("-p udp"), "{e}"),
        other => panic!("{other:?}"),
    }
}

mod osm_differential {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

    use proptest::prelude::*;

    use super::*;
    use crate::{
        evaluate,
        oracle::{NatOutcome, NatTable},
        OutboundConn, Protocol, Verdict,
    };

    const POD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const NETS: [&str; 6] =
        ["192.0.2.0/24", "192.0.2.128/25", "198.51.100.7/32", "203.0.113.0/24", "198.18.0.0/16", "127.0.0.0/8"];
    const PORTS: [u16; 6] = [22, 80, 443, 5432, 15000, 15001];

    /// The `iptables -t nat …` commands an iptables-restore script makes.
    fn commands(script: &str) -> Vec<String> {
        script
            .lines()
            .filter_map(|l| {
                if let Some(chain) = l.strip_prefix(':') {
                    Some(format!("iptables -t nat -N {}", chain.split_whitespace().next()?))
                } else if l.starts_with("-A ") || l.starts_with("-I ") {
                    Some(format!("iptables -t nat {l}"))
                } else {
                    None
                }
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1500))]

        /// For random lists, osm-injector's rule set (run through the nat
        /// interpreter) and the policy read from it decide every outbound
        /// connection alike, but where osm-init and the
        /// `proxy-to-inbound` loopback mode differ by design (the proxy's
        /// own connections through `lo` from 127.0.0.6, or to an excluded
        /// local address or port: see docs/dialects.md).
        #[test]
        fn osm_init_script_and_the_policy_read_from_it_agree(
            excl in prop::collection::vec(prop::sample::select(NETS.to_vec()), 0..3),
            incl in prop::collection::vec(prop::sample::select(NETS.to_vec()), 0..3),
            ports in prop::collection::btree_set(prop::sample::select(PORTS.to_vec()), 0..3),
            uid in prop::sample::select(vec![0u32, 1000, 1500]),
            dst in prop::sample::select(vec![[192, 0, 2, 1], [192, 0, 2, 200], [198, 51, 100, 7], [203, 0, 113, 9], [198, 18, 0, 1], [127, 0, 0, 1], [127, 0, 0, 5]]),
            port in prop::sample::select(PORTS.to_vec()),
            from_6 in any::<bool>(),
        ) {
            let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            let script = osm_script("", &excl, &ports.join(","), &incl, &[]);
            let r = injected(decide(&pod_with(osm_init(script.clone())), &[]));
            let p = crate::compile(&r.mesh, &r.annotations).with_local_addresses([IpAddr::V4(POD_IP)]);
            let table = NatTable::from_commands(&commands(&script)).unwrap();
            let dst = Ipv4Addr::from(dst);
            let c = OutboundConn {
                src: from_6.then_some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))),
                protocol: Protocol::Tcp,
                uid,
                gid: uid,
                dst: SocketAddr::V4(SocketAddrV4::new(dst, port)),
                cgroup: 0,
            };
            let through_lo = dst.is_loopback() || dst == POD_IP;
            let proxy_lo = uid == 1500 && through_lo && dst != Ipv4Addr::LOCALHOST;
            let excluded = excl.iter().any(|n| n.parse::<ipnet::Ipv4Net>().unwrap().contains(&dst));
            let port_excluded = ports.contains(&port.to_string());
            prop_assume!(!(proxy_lo && (from_6 || excluded || port_excluded)));
            let want = table.output(&c, &p.local_addresses);
            match (want, evaluate(&p, &c)) {
                (NatOutcome::Redirect(a), Verdict::Redirect(b)) => prop_assert_eq!(a.port(), b.port()),
                (NatOutcome::Unchanged, Verdict::Pass(_)) => {}
                (o, v) => prop_assert!(false, "{script}\n{c:?}: iptables {o:?} but policy {v:?}"),
            }
        }
    }
}

mod gated_pods {
    use super::*;
    use crate::k8s::injector::gated::{policy_json, record, INJECTED_INIT, POLICY};

    const ISTIO: [&str; 17] = [
        "istio-iptables",
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-m",
        "REDIRECT",
        "-i",
        "*",
        "-x",
        "",
        "-b",
        "*",
        "-d",
        "15090,15021,15020",
    ];

    fn gate() -> InitContainer {
        InitContainer {
            name: "redirector-init".into(),
            command: s(&["redirector", "wait-ready", "--agent-socket=/var/run/redirector/agent.sock"]),
            ..Default::default()
        }
    }

    /// What `redirector webhook` makes of a pod with `original`: the gate
    /// in its place and both annotations.
    fn switched(original: InitContainer) -> (PodInfo, serde_json::Value) {
        let before = pod_with(original.clone());
        let r = injected(decide(&before, &[]));
        let policy = policy_json(&crate::compile(&r.mesh, &r.annotations));
        let mut after = pod_with(gate());
        after.annotations.insert(POLICY.into(), policy.to_string());
        after.annotations.insert(INJECTED_INIT.into(), record(&original));
        (after, policy)
    }

    fn unverified(d: Decision) -> String {
        match d {
            Decision::Refused { container, problem: Problem::Unverified(e), .. } => {
                assert_eq!(container, "redirector-init");
                e
            }
            other => panic!("not refused as unverified: {other:?}"),
        }
    }

    #[test]
    fn a_recorded_init_container_that_checks_out_is_its_policy() {
        let (pod, policy) = switched(istio_init(&ISTIO));
        match decide(&pod, &[]) {
            Decision::Injected { container, tool, reading, gate } => {
                assert_eq!(
                    (container.as_str(), tool, gate.as_deref()),
                    ("istio-init", "istio-iptables", Some("redirector-init"))
                );
                assert_eq!(policy_json(&crate::compile(&reading.mesh, &reading.annotations)), policy);
            }
            other => panic!("{other:?}"),
        }
        // Without the annotations: the gate of deploy/init-container.yaml.
        assert!(matches!(decide(&pod_with(gate()), &[]), Decision::Settings { .. }));
    }

    #[test]
    fn a_record_that_does_not_check_out_is_refused_naming_both() {
        // The policy edited: proxy UID 0 would exempt root's traffic.
        let (mut pod, mut policy) = switched(istio_init(&ISTIO));
        policy["proxy_uid"] = 0.into();
        pod.annotations.insert(POLICY.into(), policy.to_string());
        let e = unverified(decide(&pod, &[]));
        assert!(e.contains("proxy_uid: recorded 0, derived 1337") && e.contains("istio-init"), "{e}");

        // The record edited, the policy left: refused likewise.
        let (mut pod, _) = switched(istio_init(&ISTIO));
        let mut other = istio_init(&ISTIO);
        other.args[6] = "0".into();
        pod.annotations.insert(INJECTED_INIT.into(), record(&other));
        let e = unverified(decide(&pod, &[]));
        assert!(e.contains("proxy_uid: recorded 1337, derived 0"), "{e}");

        // One annotation alone, a record of the gate, a record that does
        // not parse, a record the readers refuse.
        let (mut pod, _) = switched(istio_init(&ISTIO));
        pod.annotations.remove(INJECTED_INIT);
        assert!(unverified(decide(&pod, &[])).contains("without"));
        let (mut pod, _) = switched(istio_init(&ISTIO));
        pod.annotations.remove(POLICY);
        assert!(unverified(decide(&pod, &[])).contains("without"));
        let (mut pod, _) = switched(istio_init(&ISTIO));
        pod.annotations.insert(INJECTED_INIT.into(), record(&gate()));
        assert!(unverified(decide(&pod, &[])).contains("the redirector gate itself"));
        pod.annotations.insert(INJECTED_INIT.into(), "{\"name\":\"istio-init\",\"argz\":[]}".into());
        assert!(unverified(decide(&pod, &[])).contains("unknown field"));
        pod.annotations.insert(INJECTED_INIT.into(), record(&istio_init(&["istio-iptables", "-m", "TPROXY"])));
        let e = unverified(decide(&pod, &[]));
        assert!(e.contains("TPROXY"), "{e}");
    }

    /// The policy is checked as the webhook read it (no pod address yet)
    /// and programmed as istio-iptables reads the running pod: an IPv6
    /// pod's IPv6 is redirected though the record was read as IPv4.
    #[test]
    fn checked_as_admitted_programmed_with_the_pods_addresses() {
        let (mut pod, policy) = switched(istio_init(&ISTIO));
        assert!(policy["outbound_ip_range_exclusions"].to_string().contains("::/0"));
        pod.ips = vec!["2001:db8::5".parse().unwrap()];
        let r = injected(decide(&pod, &[]));
        let p = crate::compile(&r.mesh, &r.annotations);
        assert!(!p.outbound_ip_range_exclusion.contains(&"::/0".parse().unwrap()), "as istio-iptables on an IPv6 pod");
    }

    /// Kuma's config is read from the pod's annotation through the
    /// recorded downwardAPI file, as kumactl reads it.
    #[test]
    fn a_kuma_record_reads_the_config_annotation() {
        let mut c = InitContainer {
            name: "kuma-init".into(),
            command: s(&["/usr/bin/kumactl", "install", "transparent-proxy"]),
            args: s(&["--config=/tmp/tp/config.yaml"]),
            ..Default::default()
        };
        c.downward_files.insert(
            "/tmp/tp/config.yaml".into(),
            "metadata.annotations['traffic.kuma.io/transparent-proxy-config']".into(),
        );
        let cfg = "traffic.kuma.io/transparent-proxy-config";
        let yaml = "kumaDPUser: \"5678\"\nredirect:\n  inbound:\n    port: 15006\n  outbound:\n    port: 15001\n";
        let mut before = pod_with(c.clone());
        before.annotations.insert(cfg.into(), yaml.into());
        let r = injected(decide(&before, &[]));
        let mut after = pod_with(gate());
        after.annotations.insert(cfg.into(), yaml.into());
        after.annotations.insert(POLICY.into(), policy_json(&crate::compile(&r.mesh, &r.annotations)).to_string());
        after.annotations.insert(INJECTED_INIT.into(), record(&c));
        assert_eq!(crate::compile(&injected(decide(&after, &[])).mesh, &r.annotations).proxy_uid, 5678);
        // The config changed after admission: no longer what was recorded.
        after.annotations.insert(cfg.into(), yaml.replace("5678", "0"));
        assert!(unverified(decide(&after, &[])).contains("proxy_uid"));
    }
}

/// istio-iptables' own golden rule dumps (`tests/fixtures/upstream/
/// istio-iptables`, from istio/istio `tools/istio-iptables/pkg/capture/
/// testdata`; each case's settings are in that folder's README): the
/// policy read from the same flags decides every IPv4 connection as the
/// dump's nat table does, outbound and inbound; the cases whose settings
/// redirector refuses are refused.
mod istio_goldens {
    use std::{
        collections::BTreeSet,
        net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    };

    use super::*;
    use crate::{
        evaluate, evaluate_inbound,
        oracle::{NatOutcome, NatTable},
        InboundConn, OutboundConn, Protocol, Verdict,
    };

    const POD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    /// `TestIptables`' base configuration, as flags.
    const BASE: [&str; 11] =
        ["istio-iptables", "-p", "15001", "-z", "15006", "-e", "15008", "-u", "1337", "-g", "1337"];

    /// The IPv4 nat block of a dump's `iptables-restore` input, as
    /// `iptables -t nat …` commands.
    fn nat_commands(golden: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut in_nat = false;
        for l in golden.lines() {
            match l {
                "* nat" => in_nat = true,
                "COMMIT" if in_nat => return out,
                _ if l.starts_with("* ") => in_nat = false,
                _ if in_nat => out.push(format!("iptables -t nat {l}")),
                _ => {}
            }
        }
        panic!("no nat block");
    }

    fn golden(name: &str) -> String {
        let p =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upstream/istio-iptables").join(name);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn the_policy_decides_as_the_golden_rules() {
        for (file, extra) in [
            ("empty.golden", &[][..]),
            ("inbound-ports-include.golden", &["-b", "32000,31000"]),
            ("inbound-ports-wildcard.golden", &["-b", "*"]),
            ("ipnets.golden", &["-i", "10.0.0.0/8"]),
            ("outbound-ports-include.golden", &["-q", "32000,31000"]),
        ] {
            let mut args: Vec<&str> = BASE.to_vec();
            args.extend(extra);
            let r = injected(decide(&pod_with(istio_init(&args)), &[]));
            let p = crate::compile(&r.mesh, &r.annotations).with_local_addresses([IpAddr::V4(POD_IP)]);
            let table =
                NatTable::from_commands(&nat_commands(&golden(file))).unwrap_or_else(|e| panic!("{file}: {e:#}"));
            let local: BTreeSet<IpAddr> = p.local_addresses.clone();
            let mut checked = 0;
            for dst in [[10, 1, 2, 3], [192, 0, 2, 1], [127, 0, 0, 1], [127, 0, 0, 5], [198, 18, 0, 1]] {
                for port in [80u16, 15008, 31000, 32000, 15001] {
                    for id in [1000u32, 1337, 0] {
                        for src in [None, Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)))] {
                            let c = OutboundConn {
                                src,
                                protocol: Protocol::Tcp,
                                uid: id,
                                gid: id,
                                dst: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(dst), port)),
                                cgroup: 0,
                            };
                            let through_lo = c.dst.ip().is_loopback() || local.contains(&c.dst.ip());
                            // The proxy's own connection through lo to the
                            // tunnel port: istio-iptables skips it, redirector
                            // does not (docs/dialects.md).
                            if id == 1337 && through_lo && port == 15008 && c.dst.ip() != IpAddr::from([127, 0, 0, 1]) {
                                continue;
                            }
                            let want = table.output(&c, &local);
                            let ok = match (want, evaluate(&p, &c)) {
                                (NatOutcome::Redirect(a), Verdict::Redirect(b)) => a.port() == b.port(),
                                (NatOutcome::Unchanged, Verdict::Pass(_)) => true,
                                _ => false,
                            };
                            assert!(ok, "{file}: {c:?}: iptables {want:?}, policy {:?}", evaluate(&p, &c));
                            checked += 1;
                        }
                    }
                }
            }
            for port in [80u16, 15008, 31000, 32000, 15006] {
                let dst = SocketAddrV4::new(POD_IP, port);
                let src = Ipv4Addr::new(192, 0, 2, 9);
                let want = table.prerouting(src, dst);
                let got = evaluate_inbound(
                    &p,
                    &InboundConn { dst: SocketAddr::V4(dst), local_client: false, src: IpAddr::V4(src) },
                );
                let ok = match (want, got) {
                    (NatOutcome::Redirect(a), Verdict::Redirect(_)) => a.port() == p.inbound_port,
                    (NatOutcome::Unchanged, Verdict::Pass(_)) => true,
                    (NatOutcome::Redirect(a), Verdict::Pass(_)) => port == p.inbound_port && a.port() == port,
                    _ => false,
                };
                assert!(ok, "{file}: inbound to port {port}: iptables {want:?}, policy {got:?}");
            }
            assert!(checked > 120, "{file}: {checked}");
        }
    }

    /// The DNS goldens (`--redirect-dns`, nameserver 127.0.0.53; proxy
    /// UIDs 3,4 and GIDs 1,2, which redirector refuses as a list): the
    /// policy of `-u 3 -g 1` decides every connection of the application,
    /// of UID 3 and of GID 1, TCP and UDP, as the dump's nat table does.
    /// Left out, as documented: the proxy's own TCP through lo to 15008
    /// (above), and TCP through lo from a process with the proxy's GID but
    /// not its UID: istio-iptables returns it at the UID's loopback rule
    /// (`-o lo ! --uid-owner 3 -j RETURN`, ahead of every GID rule), and
    /// would send it to the inbound listener at port 53 if that were not
    /// so (its GID rule, unlike the UID one, does not skip 53); redirector
    /// takes the GID for the proxy's.
    #[test]
    fn the_policy_decides_dns_as_the_golden_rules() {
        for (file, extra, ipv6) in [
            ("dns-uid-gid.golden", &["--redirect-dns", "--dual-stack"][..], true),
            ("ip-range.golden", &["--redirect-dns", "-x", "1.1.0.0/16", "-i", "9.9.0.0/16"], false),
        ] {
            let mut args: Vec<&str> = BASE.iter().copied().filter(|a| !["1337"].contains(a)).collect();
            // BASE's -u 1337 -g 1337, as the golden's first IDs.
            let at = args.iter().position(|a| *a == "-u").unwrap();
            args.insert(at + 1, "3");
            let at = args.iter().position(|a| *a == "-g").unwrap();
            args.insert(at + 1, "1");
            args.extend(extra);
            let r = injected(decide(&pod_with(istio_init(&args)), &[]));
            let p = crate::compile(&r.mesh, &r.annotations)
                .with_local_addresses([IpAddr::V4(POD_IP)])
                .with_nameservers(["127.0.0.53".parse().unwrap(), "::127.0.0.53".parse().unwrap()]);
            let dns = p.dns.clone().expect("DNS capture");
            assert_eq!((dns.port, dns.istio_order, dns.ipv6), (15053, true, ipv6), "{file}");
            let table =
                NatTable::from_commands(&nat_commands(&golden(file))).unwrap_or_else(|e| panic!("{file}: {e:#}"));
            let local: BTreeSet<IpAddr> = p.local_addresses.clone();
            let (mut checked, mut to_dns) = (0, 0);
            for dst in [[127, 0, 0, 53], [127, 0, 0, 1], [127, 0, 0, 5], [198, 18, 0, 1], [1, 1, 2, 3], [9, 9, 0, 1]] {
                for port in [53u16, 80, 15008] {
                    for (uid, gid) in [(1000u32, 1000u32), (3, 3), (1000, 1), (0, 0)] {
                        for protocol in [Protocol::Tcp, Protocol::Udp] {
                            for src in [None, Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)))] {
                                let c = OutboundConn {
                                    src,
                                    protocol,
                                    uid,
                                    gid,
                                    dst: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(dst), port)),
                                    cgroup: 0,
                                };
                                let through_lo = c.dst.ip().is_loopback() || local.contains(&c.dst.ip());
                                let not_127_0_0_1 = c.dst.ip() != IpAddr::from([127, 0, 0, 1]);
                                let tcp_lo = protocol == Protocol::Tcp && through_lo && not_127_0_0_1;
                                if tcp_lo && port == 15008 && (uid == 3 || gid == 1) {
                                    continue;
                                }
                                if tcp_lo && uid != 3 && gid == 1 {
                                    continue;
                                }
                                let want = table.output(&c, &local);
                                let got = evaluate(&p, &c);
                                let ok = match (want, got) {
                                    (NatOutcome::Redirect(a), Verdict::Redirect(b)) => a.port() == b.port(),
                                    (NatOutcome::Unchanged, Verdict::Pass(_)) => true,
                                    _ => false,
                                };
                                assert!(ok, "{file}: {c:?}: iptables {want:?}, policy {got:?}");
                                // The encoded entries decide the same.
                                let e = crate::map_entries_with(&p, 7, 8);
                                assert_eq!(crate::evaluate_entries(&e, &c), got, "{file}: {c:?}: entries");
                                checked += 1;
                                to_dns += usize::from(matches!(got, Verdict::Redirect(a) if a.port() == 15053));
                            }
                        }
                    }
                }
            }
            assert!(checked > 250 && to_dns >= 4, "{file}: {checked} checked, {to_dns} to the DNS listener");
        }
    }

    #[test]
    fn the_golden_cases_redirector_refuses() {
        for (file, extra, env) in [
            ("tproxy.golden", &["-m", "TPROXY", "-b", "*"][..], None),
            ("kube-virt-interfaces.golden", &["-k", "eth1,eth2", "-b", "*"], None),
            ("basic-exclude-nic.golden", &["-c", "not-istio-nic"], None),
            ("drop-invalid.golden", &["--drop-invalid"], None),
            ("loopback-outbound-iprange.golden", &["-i", "127.1.2.3/32"], None),
            ("host-ipv4-loopback-cidr.golden", &[], Some(("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8"))),
            ("outbound-owner-groups.golden", &[], Some(("ISTIO_OUTBOUND_OWNER_GROUPS", "java,202"))),
            // (refused for its two UIDs and GIDs; its DNS rules are
            // checked above with one of each)
            ("dns-uid-gid.golden", &["--redirect-dns", "-u", "3,4", "-g", "1,2"], None),
        ] {
            assert!(!golden(file).is_empty());
            let mut args: Vec<&str> = BASE.to_vec();
            args.extend(extra);
            let mut c = istio_init(&args);
            if let Some((k, v)) = env {
                c.env.insert(k.into(), Some(v.into()));
            }
            let d = decide(&pod_with(c), &[]);
            assert!(matches!(d, Decision::Refused { problem: Problem::Settings(_), .. }), "{file}: {d:?}");
        }
    }
}

/// kumactl's own golden rule dumps (`tests/fixtures/upstream/
/// kuma-iptables`, from kumahq/kuma `app/kumactl/cmd/install/testdata`,
/// flags as that folder's README lists them; `ifPlaceholder` is the
/// loopback interface the test stubs out): the policy read from the same
/// kumactl flags decides as the dump's IPv4 nat table.
#[test]
fn kuma_reader_decides_as_kumactls_golden_rules() {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

    use crate::{
        evaluate, evaluate_inbound,
        oracle::{NatOutcome, NatTable},
        InboundConn, OutboundConn, Protocol, Verdict,
    };
    let pod_ip = Ipv4Addr::new(198, 18, 0, 1);
    for (file, flags) in [
        ("install-transparent-proxy.defaults.golden.txt", &["--kuma-dp-user", "root"][..]),
        (
            "install-transparent-proxy.overrides.golden.txt",
            &[
                "--kuma-dp-user",
                "root",
                "--redirect-outbound-port",
                "12345",
                "--redirect-inbound-port",
                "12346",
                "--exclude-outbound-ports",
                "2000,2001",
                "--exclude-inbound-ports",
                "1000,1001",
            ],
        ),
        (
            "install-transparent-proxy.dns.no-conntrack.golden.txt",
            &["--kuma-dp-user", "0", "--redirect-all-dns-traffic", "--redirect-dns-port", "12345"],
        ),
    ] {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upstream/kuma-iptables").join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut cmds = Vec::new();
        let mut in_nat = false;
        for l in text.lines() {
            match l {
                "* nat" => in_nat = true,
                "COMMIT" if in_nat => break,
                // The test's normalisations: `-o lo` for the interface,
                // and the proxy's own DNS query's jump target (RETURN:
                // the proxy's query goes out as it is).
                _ if in_nat && !l.is_empty() => cmds.push(format!(
                    "iptables -t nat {}",
                    l.replace("ifPlaceholder", "lo").replace("dnsJumpTargetPlaceholder", "RETURN")
                )),
                _ => {}
            }
        }
        let table = NatTable::from_commands(&cmds).unwrap_or_else(|e| panic!("{file}: {e:#}"));
        let mut argv = vec!["kumactl", "install", "transparent-proxy"];
        argv.extend(flags);
        let c = InitContainer { name: "kuma-init".into(), command: s(&argv), ..Default::default() };
        let r = injected(decide(&pod_with(c), &[]));
        let p = crate::compile(&r.mesh, &r.annotations).with_local_addresses([IpAddr::V4(pod_ip)]);
        let p = p.with_nameservers(["192.0.2.53".parse().unwrap()]);
        for dst in [[192, 0, 2, 1], [127, 0, 0, 1], [127, 0, 0, 5], [198, 18, 0, 1], [192, 0, 2, 53]] {
            for port in [80u16, 2000, 2001, 12345, 15001, 53] {
                for (id, protocol, src) in [1000u32, 0].into_iter().flat_map(|id| {
                    [Protocol::Tcp, Protocol::Udp].into_iter().flat_map(move |pr| {
                        [None, Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)))].map(move |src| (id, pr, src))
                    })
                }) {
                    {
                        let c = OutboundConn {
                            src,
                            protocol,
                            uid: id,
                            gid: id,
                            dst: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(dst), port)),
                            cgroup: 0,
                        };
                        let want = table.output(&c, &p.local_addresses);
                        let got = evaluate(&p, &c);
                        let ok = match (want, got) {
                            (NatOutcome::Redirect(a), Verdict::Redirect(b)) => a.port() == b.port(),
                            (NatOutcome::Unchanged, Verdict::Pass(_)) => true,
                            _ => false,
                        };
                        assert!(ok, "{file}: {c:?}: iptables {want:?}, policy {got:?}");
                    }
                }
            }
        }
        for port in [80u16, 1000, 1001, 15006, 12346] {
            let dst = SocketAddrV4::new(pod_ip, port);
            let src = Ipv4Addr::new(192, 0, 2, 9);
            let want = table.prerouting(src, dst);
            let got = evaluate_inbound(
                &p,
                &InboundConn { dst: SocketAddr::V4(dst), local_client: false, src: IpAddr::V4(src) },
            );
            let ok = match (want, got) {
                (NatOutcome::Redirect(a), Verdict::Redirect(_)) => a.port() == p.inbound_port,
                (NatOutcome::Unchanged, Verdict::Pass(_)) => true,
                (NatOutcome::Redirect(a), Verdict::Pass(_)) => port == p.inbound_port && a.port() == port,
                _ => false,
            };
            assert!(ok, "{file}: inbound to {port}: iptables {want:?}, policy {got:?}");
        }
    }
}

/// The pods of one mesh's upstream injector fixtures, named by file.
#[cfg(feature = "k8s")]
pub(crate) fn corpus_pods(mesh: &str) -> Vec<(String, PodInfo)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upstream");
    let mut out = Vec::new();
    for f in walk(&dir.join(mesh)) {
        let name = f.strip_prefix(&dir).unwrap().display().to_string();
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, (_, pod)) in crate::k8s::pods::pods_from_manifests(&text)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"))
            .into_iter()
            .enumerate()
        {
            out.push((format!("{name}#{i}"), pod));
        }
    }
    out
}
