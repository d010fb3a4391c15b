//! deploy/: every manifest parses into its Kubernetes type, and the pieces
//! fit together (names, namespaces, service account, ports, the ConfigMap's
//! mesh settings, the capabilities the agent needs). That the ClusterRole
//! and Role allow exactly the API calls the agent makes is checked by the
//! `kube_agent_end_to_end` kernel test against the requests it served.
use std::{collections::BTreeSet, path::PathBuf};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, Namespace, ResourceQuota, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use redirector_policy::k8s::mesh::{ConfigMapSource, MeshSources, CONFIGMAP_KEY};
use serde::Deserialize as _;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of every file listed in the agent's kustomization.yaml.
fn documents() -> Vec<(String, serde_yaml::Value)> {
    documents_in(&deploy_dir().join("agent"))
}

/// Every document of every file listed in `dir`'s kustomization.yaml.
fn documents_in(dir: &std::path::Path) -> Vec<(String, serde_yaml::Value)> {
    let k: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap()).unwrap();
    let mut out = Vec::new();
    for file in k["resources"].as_sequence().expect("kustomization lists resources") {
        let file = file.as_str().unwrap();
        let text = std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{file}: {e}"));
            if !v.is_null() {
                out.push((file.to_string(), v));
            }
        }
    }
    out
}

fn one<T: serde::de::DeserializeOwned>(kind: &str) -> Vec<T> {
    documents()
        .into_iter()
        .filter(|(_, v)| v["kind"].as_str() == Some(kind))
        .map(|(file, v)| serde_yaml::from_value(v).unwrap_or_else(|e| panic!("{file}: {kind}: {e}")))
        .collect()
}

const NS: &str = "redirector-system";

fn agent() -> (DaemonSet, Container) {
    let ds = one::<DaemonSet>("DaemonSet").pop().expect("a DaemonSet");
    let c = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0].clone();
    (ds, c)
}

fn arg<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.args.as_ref()?.iter().find_map(|a| a.strip_prefix(&format!("--{name}=")))
}

#[test]
fn every_manifest_parses_and_is_in_the_agent_namespace() {
    let docs = documents();
    let kinds: BTreeSet<&str> = docs.iter().filter_map(|(_, v)| v["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "Namespace",
            "ResourceQuota",
            "Role",
            "RoleBinding",
            "ServiceAccount"
        ]
        .into()
    );
    assert_eq!(one::<Namespace>("Namespace")[0].metadata.name.as_deref(), Some(NS));
    for kind in ["ConfigMap", "DaemonSet", "ResourceQuota", "Role", "RoleBinding", "ServiceAccount"] {
        for (file, v) in docs.iter().filter(|(_, v)| v["kind"].as_str() == Some(kind)) {
            assert_eq!(v["metadata"]["namespace"].as_str(), Some(NS), "{file}: {kind}");
        }
    }
}

#[test]
fn daemonset_has_what_the_agent_needs_and_no_more() {
    let (ds, c) = agent();
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.host_pid, Some(true), "hostPID: /proc of pods, SO_PEERCRED PIDs");
    assert_ne!(pod.host_network, Some(true), "the agent needs no host network");
    let sa = one::<ServiceAccount>("ServiceAccount")[0].metadata.name.clone();
    assert_eq!(pod.service_account_name, sa);

    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<&str> = caps.add.as_ref().unwrap().iter().map(String::as_str).collect();
    assert_eq!(added, ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"].into());

    let args = c.args.as_ref().unwrap();
    assert_eq!(&args[..2], ["run", "--kube"]);
    let env = c.env.as_ref().unwrap();
    let field = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
            .map(|f| f.field_path.clone())
    };
    assert_eq!(field("NODE_NAME").as_deref(), Some("spec.nodeName"));
    assert_eq!(field("POD_NAME").as_deref(), Some("metadata.name"));

    // Host paths behind the paths the agent is told to use.
    let host_path = |mount: &str| {
        let m = c.volume_mounts.as_ref().unwrap().iter().find(|m| mount.starts_with(&m.mount_path))?;
        let v = pod.volumes.as_ref()?.iter().find(|v| v.name == m.name)?;
        v.host_path.as_ref().map(|h| h.path.clone())
    };
    assert_eq!(host_path(arg(&c, "pin-dir").unwrap()).as_deref(), Some("/sys/fs/bpf"));
    assert_eq!(host_path(arg(&c, "cgroup").unwrap()).as_deref(), Some("/sys/fs/cgroup"));
    assert_eq!(host_path(arg(&c, "agent-socket").unwrap()).as_deref(), Some("/var/run/redirector"));

    // Probes on the status port.
    let port: i32 = arg(&c, "metrics-addr").unwrap().rsplit(':').next().unwrap().parse().unwrap();
    let ports = c.ports.as_ref().unwrap();
    assert_eq!(ports[0].container_port, port);
    for (probe, path) in [(&c.liveness_probe, "/healthz"), (&c.readiness_probe, "/readyz")] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            serde_json::to_value(&get.port).unwrap().as_str(),
            ports[0].name.as_deref(),
            "probe port is the named status port"
        );
    }
}

#[test]
fn configmap_and_rbac_match_the_agent_arguments() {
    let (_, c) = agent();
    let cm_name = arg(&c, "configmap").unwrap();
    let cm = one::<ConfigMap>("ConfigMap").pop().unwrap();
    assert_eq!(format!("{}/{}", cm.metadata.namespace.clone().unwrap(), cm.metadata.name.clone().unwrap()), cm_name);
    let text = cm.data.as_ref().unwrap().get(CONFIGMAP_KEY).cloned();
    assert!(text.is_some(), "the ConfigMap has no {CONFIGMAP_KEY}");
    let mesh =
        MeshSources { configmap: ConfigMapSource::Present(cm_name.to_string(), text), meshconfig: None }.resolve();
    assert!(mesh.is_ok(), "{:?}", mesh.err().map(|(_, e)| format!("{e:#}")));

    // resourceNames name exactly the objects the agent watches.
    let role = one::<Role>("Role").pop().unwrap();
    let rule = &role.rules.as_ref().unwrap()[0];
    assert_eq!(role.metadata.namespace.as_deref(), cm.metadata.namespace.as_deref());
    assert_eq!(rule.resource_names.as_deref(), Some(&[cm.metadata.name.clone().unwrap()][..]));
    // Not passed: the CLI's default (`DEFAULT_MESHCONFIG` in cli.rs), read
    // only while the ConfigMap names preset osm.
    let mc = arg(&c, "meshconfig").unwrap_or("osm-system/osm-mesh-config").split_once('/').unwrap().1;
    let cr = one::<ClusterRole>("ClusterRole").pop().unwrap();
    let mc_rule = cr
        .rules
        .as_ref()
        .unwrap()
        .iter()
        .find(|r| r.resources.as_deref() == Some(&["meshconfigs".to_string()][..]))
        .unwrap();
    assert_eq!(mc_rule.resource_names.as_deref(), Some(&[mc.to_string()][..]));
    for r in cr.rules.as_ref().unwrap().iter().chain(role.rules.as_ref().unwrap()) {
        assert!(!r.verbs.iter().any(|v| v == "*" || v == "delete" || v == "update"), "{r:?}");
    }

    // The bindings bind those roles to the agent's service account.
    let sa = one::<ServiceAccount>("ServiceAccount").pop().unwrap().metadata.name.unwrap();
    let crb = one::<ClusterRoleBinding>("ClusterRoleBinding").pop().unwrap();
    assert_eq!(crb.role_ref.name, cr.metadata.name.clone().unwrap());
    let rb = one::<RoleBinding>("RoleBinding").pop().unwrap();
    assert_eq!(rb.role_ref.name, role.metadata.name.clone().unwrap());
    for subjects in [crb.subjects.unwrap(), rb.subjects.unwrap()] {
        assert_eq!(subjects.len(), 1);
        assert_eq!((subjects[0].kind.as_str(), subjects[0].name.as_str()), ("ServiceAccount", sa.as_str()));
        assert_eq!(subjects[0].namespace.as_deref(), Some(NS));
    }
}

#[test]
fn init_container_snippet_is_a_pod_spec_fragment() {
    let text = std::fs::read_to_string(deploy_dir().join("init-container.yaml")).unwrap();
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Fragment {
        init_containers: Vec<Container>,
        volumes: Vec<k8s_openapi::api::core::v1::Volume>,
    }
    let f: Fragment = serde_yaml::from_str(&text).unwrap();
    let c = &f.init_containers[0];
    let cmd = c.command.as_ref().unwrap();
    assert_eq!(&cmd[..2], ["redirector", "wait-ready"]);
    let env = c.env.as_ref().unwrap();
    let uid = env.iter().find(|e| e.name == "POD_UID").and_then(|e| e.value_from.as_ref()?.field_ref.as_ref());
    assert_eq!(uid.map(|f| f.field_path.as_str()), Some("metadata.uid"));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true), "the gate needs no privileges");
    assert!(sc.capabilities.as_ref().unwrap().add.is_none());
    // The socket path the agent binds is the one the init container uses.
    let (_, agent) = agent();
    let sock = cmd.iter().find_map(|a| a.strip_prefix("--agent-socket=")).unwrap();
    assert_eq!(sock, arg(&agent, "agent-socket").unwrap());
    let mount = &c.volume_mounts.as_ref().unwrap()[0];
    assert!(sock.starts_with(&mount.mount_path));
    let vol = f.volumes.iter().find(|v| v.name == mount.name).unwrap();
    assert_eq!(vol.host_path.as_ref().unwrap().path, "/var/run/redirector");
}

/// deploy/uninstall/: a DaemonSet, separate from the agent's kustomization,
/// that runs `redirector cleanup --wait` on the pin directory the agent
/// uses, with the bpffs mount, the capabilities cleanup needs and no API
/// access.
#[test]
fn uninstall_daemonset_cleans_up_what_the_agent_pins() {
    let dir = deploy_dir().join("uninstall");
    let k: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap()).unwrap();
    let files: Vec<String> = serde_yaml::from_value(k["resources"].clone()).unwrap();
    assert_eq!(files, ["namespace.yaml", "resourcequota.yaml", "cleanup-daemonset.yaml"]);
    assert_eq!(
        std::fs::read_to_string(dir.join("resourcequota.yaml")).unwrap(),
        std::fs::read_to_string(deploy_dir().join("agent/resourcequota.yaml")).unwrap(),
        "the uninstall's quota is the install's (kustomize loads no file outside its directory)"
    );
    let ns: Namespace = serde_yaml::from_str(&std::fs::read_to_string(dir.join("namespace.yaml")).unwrap()).unwrap();
    assert_eq!(ns.metadata.name.as_deref(), Some(NS));
    let ds: DaemonSet =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("cleanup-daemonset.yaml")).unwrap()).unwrap();
    assert_eq!(ds.metadata.namespace.as_deref(), Some(NS));
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false));
    let c = &pod.containers[0];
    let (agent_ds, agent) = agent();
    assert_eq!(c.image, agent.image, "the cleanup runs the agent's image");
    let args = c.args.clone().unwrap();
    assert_eq!(args[0], "cleanup");
    assert!(args.contains(&"--wait".to_string()));
    assert_eq!(arg(c, "pin-dir"), arg(&agent, "pin-dir"), "cleanup must remove the pins the agent makes");
    let caps = c.security_context.as_ref().unwrap().capabilities.as_ref().unwrap();
    assert_eq!(caps.add.clone().unwrap(), ["BPF", "NET_ADMIN"]);
    let host_path = |spec: &k8s_openapi::api::core::v1::PodSpec, mount: &str, c: &Container| {
        let m = c.volume_mounts.as_ref().unwrap().iter().find(|m| m.mount_path == mount).unwrap();
        let v = spec.volumes.as_ref().unwrap().iter().find(|v| v.name == m.name).unwrap();
        v.host_path.as_ref().unwrap().path.clone()
    };
    let agent_pod = agent_ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(host_path(pod, "/sys/fs/bpf", c), host_path(agent_pod, "/sys/fs/bpf", &agent));
    // Not part of the agent's install.
    assert!(documents().iter().all(|(_, v)| v["metadata"]["name"] != "redirector-cleanup"));
}

/// What real clusters need of both DaemonSets (the agent's and the
/// uninstall's): each property below broke, or would break, a real node.
#[test]
fn daemonsets_survive_real_clusters() {
    let uninstall: DaemonSet =
        serde_yaml::from_str(&std::fs::read_to_string(deploy_dir().join("uninstall/cleanup-daemonset.yaml")).unwrap())
            .unwrap();
    let quota_text = std::fs::read_to_string(deploy_dir().join("agent/resourcequota.yaml")).unwrap();
    let quota: ResourceQuota = serde_yaml::from_str(&quota_text).unwrap();
    for ds in [agent().0, uninstall] {
        let name = ds.metadata.name.clone().unwrap();
        let template = &ds.spec.as_ref().unwrap().template;
        let pod = template.spec.as_ref().unwrap();
        // Mixed clusters: Linux nodes only.
        assert_eq!(
            pod.node_selector.as_ref().and_then(|s| s.get("kubernetes.io/os")).map(String::as_str),
            Some("linux"),
            "{name}: nodeSelector kubernetes.io/os=linux"
        );
        assert_ne!(pod.host_network, Some(true), "{name}");
        // Every taint of a Linux node is tolerated (a node without its
        // agent fails every gated pod there), so only the nodeSelector
        // keeps the agent off Windows nodes: no toleration without it,
        // and none naming a Windows taint.
        for t in pod.tolerations.iter().flatten() {
            let blanket = t.operator.as_deref() == Some("Exists") && t.key.is_none();
            assert!(!blanket || pod.node_selector.is_some(), "{name}: a blanket toleration needs the nodeSelector");
            assert!(
                !t.key.as_deref().unwrap_or("").contains("windows")
                    && !t.value.as_deref().unwrap_or("").to_ascii_lowercase().contains("windows"),
                "{name}: a toleration of a Windows taint: {t:?}"
            );
        }
        // GKE: system-node-critical outside kube-system needs a quota for
        // the class in the namespace (GKE's priority-class admission).
        let class = pod.priority_class_name.as_deref().unwrap();
        if ds.metadata.namespace.as_deref() != Some("kube-system") {
            assert_eq!(quota.metadata.namespace, ds.metadata.namespace, "{name}: the quota is in its namespace");
            let scope = quota.spec.as_ref().unwrap().scope_selector.as_ref().unwrap();
            assert!(
                scope.match_expressions.as_ref().unwrap().iter().any(|e| e.scope_name == "PriorityClass"
                    && e.operator == "In"
                    && e.values.as_ref().is_some_and(|v| v.iter().any(|v| v == class))),
                "{name}: a ResourceQuota scoped to PriorityClass {class}"
            );
        }
        let annotations = template.metadata.as_ref().and_then(|m| m.annotations.clone()).unwrap_or_default();
        for c in &pod.containers {
            let sc = c.security_context.as_ref().unwrap();
            // AppArmor: the field (1.30+) and the beta annotation (older
            // clusters), which the API server requires to agree.
            assert_eq!(
                sc.app_armor_profile.as_ref().map(|p| p.type_.as_str()),
                Some("Unconfined"),
                "{name}/{}: appArmorProfile",
                c.name
            );
            assert_eq!(
                annotations
                    .get(&format!("container.apparmor.security.beta.kubernetes.io/{}", c.name))
                    .map(String::as_str),
                Some("unconfined"),
                "{name}/{}: the AppArmor annotation names this container",
                c.name
            );
            assert_eq!(sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()), Some("Unconfined"), "{name}/{}", c.name);
            let selinux = sc.se_linux_options.as_ref().unwrap();
            assert_eq!(selinux.type_.as_deref(), Some("spc_t"), "{name}/{}: SELinux type", c.name);
            let bpffs = c.volume_mounts.as_ref().unwrap().iter().find(|m| m.mount_path == "/sys/fs/bpf").unwrap();
            assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"), "{name}/{}: bpffs", c.name);
        }
        // No stray annotation for a container that does not exist.
        for key in annotations.keys().filter_map(|k| k.strip_prefix("container.apparmor.security.beta.kubernetes.io/"))
        {
            assert!(
                pod.containers.iter().any(|c| c.name == key),
                "{name}: AppArmor annotation for unknown container {key}"
            );
        }
    }
    // IPv6-only clusters: kubelet probes the pod's IPv6 address.
    let (_, c) = agent();
    // Cilium's socket LB attaches at the cgroup root: the agent's programs
    // go below it, on the kubelet's pods cgroup, so they run first.
    assert_eq!(arg(&c, "attach-cgroup"), Some("kubepods"), "the agent attaches below programs at the root");
    // The shipped DaemonSet serves every preset: an explicit --meshconfig
    // would be warned about on all but OSM (the default is read only with
    // preset osm).
    assert_eq!(arg(&c, "meshconfig"), None, "no --meshconfig in the preset-neutral DaemonSet");
    let addr: std::net::SocketAddr = arg(&c, "metrics-addr").unwrap().parse().unwrap();
    assert!(addr.is_ipv6() && addr.ip().is_unspecified(), "--metrics-addr binds [::] (dual-stack): {addr}");
}

fn webhook_docs() -> Vec<(String, serde_yaml::Value)> {
    documents_in(&deploy_dir().join("webhook"))
}

fn webhook_one<T: serde::de::DeserializeOwned>(kind: &str) -> Vec<T> {
    webhook_docs()
        .into_iter()
        .filter(|(_, v)| v["kind"].as_str() == Some(kind))
        .map(|(file, v)| serde_yaml::from_value(v).unwrap_or_else(|e| panic!("webhook/{file}: {kind}: {e}")))
        .collect()
}

/// deploy/webhook/: the Deployment, its Service, the webhook configuration
/// and cert-manager's objects agree with each other, with the agent's
/// DaemonSet and with what the API server does with them (kubernetes'
/// `MutatingWebhook` fields, cert-manager's `Certificate`, `Issuer` and
/// CA-injector annotation).
#[test]
fn webhook_manifests_fit_together() {
    use k8s_openapi::api::{
        admissionregistration::v1::MutatingWebhookConfiguration, apps::v1::Deployment, core::v1::Service,
        policy::v1::PodDisruptionBudget,
    };
    let docs = webhook_docs();
    let kinds: BTreeSet<&str> = docs.iter().filter_map(|(_, v)| v["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "Certificate",
            "Deployment",
            "Issuer",
            "MutatingWebhookConfiguration",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount"
        ]
        .into()
    );
    for (file, v) in docs.iter().filter(|(_, v)| v["kind"] != "MutatingWebhookConfiguration") {
        assert_eq!(v["metadata"]["namespace"].as_str(), Some(NS), "webhook/{file}");
    }
    // Not part of the agent's install: switching is its own step.
    assert!(documents().iter().all(|(_, v)| v["metadata"]["name"] != "redirector-webhook"));

    let dep = webhook_one::<Deployment>("Deployment").pop().unwrap();
    let spec = dep.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.as_ref().unwrap();
    let labels = spec.template.metadata.as_ref().unwrap().labels.clone().unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false), "no API access");
    let sa: ServiceAccount = webhook_one("ServiceAccount").pop().unwrap();
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(pod.host_network, None);
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert!(sc.capabilities.as_ref().unwrap().add.is_none());
    assert_eq!((sc.read_only_root_filesystem, sc.allow_privilege_escalation), (Some(true), Some(false)));
    assert_eq!(pod.security_context.as_ref().unwrap().run_as_non_root, Some(true));
    let args = c.args.as_ref().unwrap();
    assert_eq!(args[0], "webhook");
    // The listen port is the container's, the Service's target, probed over HTTPS.
    let listen: std::net::SocketAddr = arg(c, "listen").unwrap().parse().unwrap();
    assert!(listen.ip().is_unspecified() && listen.is_ipv6(), "dual-stack: {listen}");
    let port = &c.ports.as_ref().unwrap()[0];
    assert_eq!(port.container_port, i32::from(listen.port()));
    for probe in [&c.readiness_probe, &c.liveness_probe] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!((get.path.as_deref(), get.scheme.as_deref()), (Some("/healthz"), Some("HTTPS")));
        assert_eq!(serde_json::to_value(&get.port).unwrap().as_str(), port.name.as_deref());
    }
    // The certificate files are the cert-manager Secret's.
    let cert = webhook_docs()
        .into_iter()
        .find(|(_, v)| v["kind"] == "Certificate" && v["metadata"]["name"] == "redirector-webhook")
        .unwrap()
        .1;
    let secret = cert["spec"]["secretName"].as_str().unwrap();
    for (flag, file) in [("tls-cert-file", "tls.crt"), ("tls-key-file", "tls.key")] {
        let path = arg(c, flag).unwrap();
        let m = c.volume_mounts.as_ref().unwrap().iter().find(|m| path == format!("{}/{file}", m.mount_path)).unwrap();
        let v = pod.volumes.as_ref().unwrap().iter().find(|v| v.name == m.name).unwrap();
        assert_eq!(v.secret.as_ref().unwrap().secret_name.as_deref(), Some(secret), "--{flag}");
    }
    // The gate: the agent's image and the directory of its socket.
    let (_, agent) = agent();
    assert_eq!(arg(c, "gate-image"), agent.image.as_deref());
    let sock = arg(&agent, "agent-socket").unwrap();
    assert_eq!(format!("{}/agent.sock", arg(c, "agent-socket-dir").unwrap()), sock);

    let svc: Service = webhook_one("Service").pop().unwrap();
    let svc_spec = svc.spec.as_ref().unwrap();
    assert_eq!(svc_spec.selector.as_ref().unwrap(), spec.selector.match_labels.as_ref().unwrap());
    let svc_port = &svc_spec.ports.as_ref().unwrap()[0];
    assert_eq!(serde_json::to_value(&svc_port.target_port).unwrap().as_str(), port.name.as_deref());
    let pdb: PodDisruptionBudget = webhook_one("PodDisruptionBudget").pop().unwrap();
    assert_eq!(pdb.spec.as_ref().unwrap().selector.as_ref().unwrap().match_labels, spec.selector.match_labels);

    let mwc: MutatingWebhookConfiguration = webhook_one("MutatingWebhookConfiguration").pop().unwrap();
    let hooks = mwc.webhooks.as_ref().unwrap();
    assert_eq!(hooks.len(), 1);
    let h = &hooks[0];
    assert_eq!(h.name.split('.').count(), 3, "a fully qualified name: {}", h.name);
    assert_eq!(h.admission_review_versions, ["v1"], "the only version the webhook answers");
    assert_eq!(h.failure_policy.as_deref(), Some("Ignore"), "down: pods keep their mesh's init container");
    assert_eq!(h.reinvocation_policy.as_deref(), Some("IfNeeded"), "after the mesh's injector");
    assert_eq!(h.side_effects, "None");
    assert_eq!(h.timeout_seconds, Some(5));
    assert_eq!(h.match_policy.as_deref(), Some("Equivalent"));
    let rules = h.rules.as_ref().unwrap();
    assert_eq!(rules.len(), 1);
    let r = &rules[0];
    assert_eq!(
        (r.operations.as_deref(), r.api_groups.as_deref(), r.resources.as_deref()),
        (Some(&["CREATE".to_string()][..]), Some(&["".to_string()][..]), Some(&["pods".to_string()][..]))
    );
    let to = h.client_config.service.as_ref().unwrap();
    assert_eq!((Some(to.name.as_str()), to.namespace.as_str()), (svc.metadata.name.as_deref(), NS));
    assert_eq!((to.path.as_deref(), to.port), (Some("/mutate"), Some(svc_port.port)));
    // Not the redirector's namespace, nor its own pods.
    let ns_sel = h.namespace_selector.as_ref().unwrap().match_expressions.as_ref().unwrap();
    assert!(ns_sel.iter().any(|e| e.key == "kubernetes.io/metadata.name"
        && e.operator == "NotIn"
        && e.values.as_ref().is_some_and(|v| v.iter().any(|v| v == NS))));
    let obj_sel = h.object_selector.as_ref().unwrap().match_expressions.as_ref().unwrap();
    let excluded =
        obj_sel.iter().find(|e| e.operator == "NotIn").map(|e| (e.key.clone(), e.values.clone().unwrap())).unwrap();
    assert!(labels.get(&excluded.0).is_some_and(|v| excluded.1.contains(v)), "the webhook's pods are excluded");
    // cert-manager: the CA injector reads the serving Certificate; it is
    // for the Service's name, signed by a CA Issuer made from a
    // self-signed one.
    let inject = mwc.metadata.annotations.as_ref().unwrap()["cert-manager.io/inject-ca-from"].clone();
    assert_eq!(inject, format!("{NS}/{}", cert["metadata"]["name"].as_str().unwrap()));
    let dns: Vec<&str> = cert["spec"]["dnsNames"].as_sequence().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
    assert!(dns.contains(&format!("{}.{NS}.svc", to.name).as_str()), "{dns:?}");
    let issuer = |name: &str| {
        webhook_docs().into_iter().find(|(_, v)| v["kind"] == "Issuer" && v["metadata"]["name"] == name).unwrap().1
    };
    let ca_issuer = issuer(cert["spec"]["issuerRef"]["name"].as_str().unwrap());
    let ca_secret = ca_issuer["spec"]["ca"]["secretName"].as_str().unwrap();
    let ca_cert = webhook_docs()
        .into_iter()
        .find(|(_, v)| v["kind"] == "Certificate" && v["spec"]["secretName"] == ca_secret)
        .unwrap()
        .1;
    assert_eq!(ca_cert["spec"]["isCA"], true);
    assert!(issuer(ca_cert["spec"]["issuerRef"]["name"].as_str().unwrap())["spec"]["selfSigned"].is_mapping());
}

/// The gate the webhook writes into a pod is deploy/init-container.yaml's
/// container (image and resources aside), for the Deployment's flags.
#[test]
fn the_webhooks_gate_is_the_init_container_snippet() {
    use redirector_policy::k8s::admission::{review, Settings};
    let dep: k8s_openapi::api::apps::v1::Deployment = webhook_one("Deployment").pop().unwrap();
    let c = &dep.spec.unwrap().template.spec.unwrap().containers[0];
    let settings = Settings {
        preset: None,
        rules: Vec::new(),
        gate_image: arg(c, "gate-image").unwrap().to_string(),
        socket_dir: arg(c, "agent-socket-dir").unwrap().to_string(),
    };
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "initContainers": [{"name": "istio-init", "image": "proxyv2", "args": ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337"]}],
            "containers": [{"name": "app", "image": "app"}, {"name": "istio-proxy", "image": "proxyv2"}],
        },
    });
    let body = serde_json::to_vec(&redirector_testkit::admission::pod_create_review("u", "shop", &pod)).unwrap();
    let (resp, _) = review(&body, &settings).unwrap();
    let applied = redirector_testkit::admission::apply_response("u", &pod, resp.to_string().as_bytes()).unwrap();
    let gate: Container = serde_json::from_value(applied.object["spec"]["initContainers"][0].clone()).unwrap();
    let volume: k8s_openapi::api::core::v1::Volume =
        serde_json::from_value(applied.object["spec"]["volumes"][0].clone()).unwrap();

    let text = std::fs::read_to_string(deploy_dir().join("init-container.yaml")).unwrap();
    let snippet: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut want: Container = serde_yaml::from_value(snippet["initContainers"][0].clone()).unwrap();
    let want_volume: k8s_openapi::api::core::v1::Volume =
        serde_yaml::from_value(snippet["volumes"][0].clone()).unwrap();
    want.image = Some(settings.gate_image.clone());
    assert_eq!(gate, want);
    assert_eq!(volume, want_volume);
}

/// Each preset's overlays, rendered by real kustomize (`cargo xtask test`
/// installs kubectl and names it in REDIRECTOR_KUBECTL): the agent's
/// ConfigMap names that preset and resolves, every other object is the
/// base's unchanged, and its webhook Deployment runs `--preset` of it.
#[test]
fn preset_overlays_name_their_mesh() {
    let Some(kubectl) = std::env::var_os("REDIRECTOR_KUBECTL") else {
        eprintln!("SKIP preset_overlays_name_their_mesh: REDIRECTOR_KUBECTL is not set (cargo xtask test sets it)");
        return;
    };
    let render = |dir: &str| -> Vec<serde_yaml::Value> {
        let out = std::process::Command::new(&kubectl).arg("kustomize").arg(deploy_dir().join(dir)).output().unwrap();
        assert!(out.status.success(), "kubectl kustomize {dir}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        serde_yaml::Deserializer::from_str(&text).map(|d| serde_yaml::Value::deserialize(d).unwrap()).collect()
    };
    let key = |v: &serde_yaml::Value| {
        format!("{}/{}", v["kind"].as_str().unwrap_or(""), v["metadata"]["name"].as_str().unwrap_or(""))
    };
    let base = render(".");
    let base_webhook = render("webhook");
    for preset in redirector_policy::Preset::ALL {
        let name = preset.name();
        let objects = render(&format!("presets/{name}"));
        assert_eq!(objects.len(), base.len(), "{name}: the same objects as deploy/");
        for o in &objects {
            let b =
                base.iter().find(|b| key(b) == key(o)).unwrap_or_else(|| panic!("{name}: {} not in the base", key(o)));
            if key(o) == "ConfigMap/redirector-config" {
                let text = o["data"][CONFIGMAP_KEY].as_str().map(str::to_string);
                let mesh = MeshSources {
                    configmap: ConfigMapSource::Present("redirector-system/redirector-config".into(), text),
                    meshconfig: None,
                }
                .resolve()
                .unwrap_or_else(|(_, e)| panic!("{name}: {e:#}"));
                assert_eq!(mesh.preset, preset, "{name}: mesh.yaml names another preset");
            } else {
                assert_eq!(o, b, "{name}: {} differs from the base", key(o));
            }
        }
        let webhook = render(&format!("presets/{name}/webhook"));
        assert_eq!(webhook.len(), base_webhook.len());
        let dep = webhook.iter().find(|o| key(o) == "Deployment/redirector-webhook").unwrap();
        let args: Vec<String> =
            serde_yaml::from_value(dep["spec"]["template"]["spec"]["containers"][0]["args"].clone()).unwrap();
        assert_eq!(
            args.iter().filter(|a| a.starts_with("--preset")).collect::<Vec<_>>(),
            vec![&format!("--preset={name}")]
        );
    }
}

/// The Kubernetes strategic merge patch of a pod spec, as far as the
/// template uses it (k8s.io/apimachinery `strategicpatch`, with the
/// `patchMergeKey`/`patchStrategy` tags of k8s.io/api core/v1 types):
/// `initContainers` and `containers` merge by `name`; maps merge key by
/// key; every other list (`capabilities.add`, `drop`, `args`) is replaced
/// whole; an unknown container name is appended.
fn strategic_merge(target: &mut serde_yaml::Value, patch: &serde_yaml::Value, path: &str) {
    use serde_yaml::Value;
    match (target, patch) {
        (Value::Mapping(t), Value::Mapping(p)) => {
            for (k, v) in p {
                let key = k.as_str().unwrap_or_default();
                let sub = format!("{path}/{key}");
                match t.get_mut(k) {
                    Some(existing) => strategic_merge(existing, v, &sub),
                    None => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Sequence(t), Value::Sequence(p))
            if path.ends_with("/initContainers") || path.ends_with("/containers") =>
        {
            for item in p {
                let name = &item["name"];
                assert!(name.is_string(), "{path}: a container without its merge key `name`");
                match t.iter_mut().find(|c| &c["name"] == name) {
                    Some(c) => strategic_merge(c, item, &format!("{path}[]")),
                    None => t.push(item.clone()),
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// deploy/istio/injection-template.yaml: overlaid on every upstream Istio
/// pod whose istio-init the agent reads without a refusal, istio-init keeps
/// its command line (the same policy), runs in redirector's image as the
/// drop-in gate (the image's entrypoint with those args is the drop-in, and
/// it accepts them), and has no capability left. The template's Go
/// condition is Istio's own functions on the pod (not run here: no Go);
/// the test checks that it names each case it promises to leave alone.
#[test]
fn istio_template_switches_istio_init_to_the_drop_in_gate() {
    use redirector_policy::k8s::{
        injector::{decide, Decision},
        pods::pods_from_manifests,
    };
    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(deploy_dir().join("istio/injection-template.yaml")).unwrap())
            .unwrap();
    let template =
        values["sidecarInjectorWebhook"]["templates"]["redirector"].as_str().expect("the template").to_string();
    let lines: Vec<&str> = template.lines().collect();
    let (first, last) = (lines[0], lines[lines.len() - 1]);
    assert!(first.starts_with("{{- if and ") && last == "{{- end }}", "{first} … {last}");
    for case in [
        "not .Values.pilot.cni.enabled",
        "`sidecar.istio.io/interceptionMode` .ProxyConfig.InterceptionMode) `REDIRECT`",
        "`ISTIO_META_DNS_CAPTURE`) `true`",
        "`traffic.sidecar.istio.io/kubevirtInterfaces`",
        "`istio.io/reroute-virtual-interfaces`",
        "`traffic.sidecar.istio.io/excludeInterfaces`",
    ] {
        assert!(first.contains(case), "the condition does not name {case}");
    }
    let body = lines[1..lines.len() - 1].join("\n");
    assert!(!body.contains("{{"), "only the condition is templated");
    let overlay: serde_yaml::Value = serde_yaml::from_str(&body).unwrap();
    let image = overlay["spec"]["initContainers"][0]["image"].as_str().unwrap().to_string();
    let entrypoint = "/usr/local/bin/redirector";
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains(&format!("ENTRYPOINT [\"{entrypoint}\"]")), "the image's entrypoint");

    let dir = deploy_dir().join("../redirector-policy/tests/fixtures/upstream/istio");
    let mut switched = 0;
    let mut files = Vec::new();
    let mut dirs = vec![dir];
    while let Some(d) = dirs.pop() {
        for p in std::fs::read_dir(&d).unwrap().flatten().map(|e| e.path()) {
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let mut v = serde_yaml::Value::deserialize(doc).unwrap();
            let before = serde_yaml::to_string(&v).unwrap();
            let Ok(pods) = pods_from_manifests(&before) else { continue };
            let Some((_, pod)) = pods.first() else { continue };
            let Decision::Injected { reading: want, container, .. } = decide(pod, &[]) else { continue };
            if container != "istio-init" {
                continue;
            }
            let is_pod = v["kind"] == "Pod";
            let spec = if is_pod { &mut v["spec"] } else { &mut v["spec"]["template"]["spec"] };
            strategic_merge(spec, &overlay["spec"], "/spec");
            let after = serde_yaml::to_string(&v).unwrap();
            let spec = if is_pod { &v["spec"] } else { &v["spec"]["template"]["spec"] };
            let pods = pods_from_manifests(&after).unwrap();
            let (_, merged) = &pods[0];
            let Decision::Injected { reading: got, .. } = decide(merged, &[]) else {
                panic!("{}: not read", f.display())
            };
            assert_eq!((got.mesh, got.annotations), (want.mesh, want.annotations), "{}", f.display());
            let init =
                spec["initContainers"].as_sequence().unwrap().iter().find(|c| c["name"] == "istio-init").unwrap();
            assert_eq!(init["image"].as_str(), Some(image.as_str()));
            assert_eq!(
                init["securityContext"]["capabilities"]["add"],
                serde_yaml::Value::Sequence(vec![]),
                "NET_ADMIN left"
            );
            let args: Vec<String> = serde_yaml::from_value(init["args"].clone()).unwrap();
            assert!(init.get("command").is_none(), "{}: istio-init sets a command", f.display());
            let argv: Vec<String> = std::iter::once(entrypoint.to_string()).chain(args).collect();
            let mesh_argv =
                redirector::dropin::mesh_argv(&argv).unwrap_or_else(|| panic!("{argv:?} is not the drop-in"));
            let env = merged.init_containers.iter().find(|c| c.name == "istio-init").unwrap().env.clone();
            redirector::dropin::policy_of(&mesh_argv, env)
                .unwrap_or_else(|e| panic!("{}: the drop-in refuses: {e:#}", f.display()));
            switched += 1;
        }
    }
    assert!(switched >= 9, "only {switched} upstream Istio pods switched");
}
