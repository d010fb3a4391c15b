//! The command line: clap types only (parsed once in `main`). Every flag,
//! default and environment variable of the shipped CLI is declared here.
use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use redirector::sys::mounts;

#[derive(Parser)]
#[command(
    name = "redirector",
    version,
    about = "eBPF transparent redirection for service-mesh sidecars (replaces osm-init/istio-init iptables rules)"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Cmd,
    /// Log format: text, or json (one object per line).
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub(crate) log_format: String,
}

/// `run --kube`: Kubernetes as the source of desired state.
#[derive(clap::Args)]
pub(crate) struct KubeArgs {
    /// Watch this node's pods and the mesh settings in the Kubernetes API
    /// (in-cluster service account, or KUBECONFIG).
    #[arg(long)]
    pub(crate) kube: bool,
    /// Where the programs attach: `kubepods` (the kubelet's pods cgroup,
    /// found under --cgroup: below programs attached at the root, such as
    /// Cilium's socket load balancer, and never the node's own services),
    /// or a cgroup-v2 directory (default: --cgroup itself).
    #[arg(long, requires = "kube")]
    pub(crate) attach_cgroup: Option<PathBuf>,
    /// This node's name (downward API `spec.nodeName`).
    #[arg(long, env = "NODE_NAME", required_if_eq("kube", "true"))]
    pub(crate) node_name: Option<String>,
    /// Unix socket for the init containers' `wait-ready --agent-socket`.
    #[arg(long, default_value = "/var/run/redirector/agent.sock")]
    pub(crate) agent_socket: PathBuf,
    /// NAMESPACE/NAME of the ConfigMap whose `mesh.yaml` holds the mesh
    /// settings; it must exist and name the preset ("" for none: OSM's
    /// preset defaults).
    #[arg(long, default_value = "redirector-system/redirector-config", value_parser = parse_object_name)]
    pub(crate) configmap: ObjectName,
    /// NAMESPACE/NAME of OSM's MeshConfig, read with preset osm while its
    /// CRD is installed ("" for none) [default: osm-system/osm-mesh-config;
    /// given with another preset, it is warned about]
    #[arg(long, value_parser = parse_object_name)]
    pub(crate) meshconfig: Option<ObjectName>,
    /// Namespace of the mesh's own settings, read for pods whose init
    /// container carries none (the gate alone, --meshed-when): with preset
    /// istio its `istio-sidecar-injector` (`values`) and `istio` (`mesh`)
    /// ConfigMaps, with preset linkerd its `linkerd-config` (`values`); a
    /// change reaches such pods at once ("" for none) [default:
    /// istio-system, linkerd]
    #[arg(long, value_parser = parse_namespace)]
    pub(crate) mesh_namespace: Option<String>,
    /// The Istio revision whose settings are read
    /// (`istio-sidecar-injector-REV`, `istio-REV`; "" the default
    /// revision); pods injected by another revision are refused.
    #[arg(long, default_value = "", value_parser = parse_revision)]
    pub(crate) istio_revision: String,
    /// API version of the MeshConfig CRD.
    #[arg(long, default_value = "v1alpha2")]
    pub(crate) meshconfig_version: String,
    /// How often a MeshConfig CRD that is not served is looked for again.
    #[arg(long, default_value = "60s", value_parser = parse_positive_duration)]
    pub(crate) meshconfig_recheck: Duration,
    /// How often the Event of a problem that lasts is refreshed (keep it
    /// below the API server's --event-ttl, 1h by default).
    #[arg(long, default_value = "30m", value_parser = parse_positive_duration)]
    pub(crate) event_refresh: Duration,
    /// The node taint removed once the agent is ready ("" for none); put
    /// it on nodes at registration (kubelet --register-with-taints).
    #[arg(long, default_value = "redirector.dev/agent-not-ready", value_parser = parse_taint_key)]
    pub(crate) startup_taint: TaintKey,
    /// Also program pods that match a rule, as sidecar workloads whose
    /// policy comes from the mesh settings and annotations:
    /// label:KEY[=VALUE], annotation:KEY[=VALUE] or container:NAME
    /// (repeatable; an explicit opt-in: pods with their mesh's init
    /// container or the gate are found without).
    #[arg(long = "meshed-when")]
    pub(crate) meshed_when: Vec<redirector_policy::k8s::pods::MeshedWhen>,
    /// How often running pods whose namespace is unknown are looked for in
    /// /proc.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub(crate) resync: Duration,
    /// How long a running meshed pod whose network namespace is not found
    /// holds back the removal of stale entries; then it is reported (a
    /// Warning Event, once) and no longer does (pods of sandboxed runtimes,
    /// Kata Containers or gVisor, are never found).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub(crate) unresolved_grace: Duration,
    /// This agent's pod name, as the reporting instance of its Events.
    #[arg(long, env = "POD_NAME", default_value = "redirector")]
    pub(crate) pod_name: String,
    /// How a pod's proxy is told from its application: `uid` (its UID and
    /// GID, as the meshes' iptables rules) or `cgroup` (the cgroup of the
    /// pod's proxy container, so an application process running as the
    /// proxy's UID is still redirected; by UID until the container runs).
    #[arg(long, value_enum, default_value = "uid")]
    pub(crate) proxy_identity: ProxyIdentityArg,
    /// The proxy container's name, for --proxy-identity=cgroup (default:
    /// the preset's sidecar: envoy, istio-proxy, linkerd-proxy,
    /// kuma-sidecar).
    #[arg(long)]
    pub(crate) proxy_container: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ProxyIdentityArg {
    Uid,
    Cgroup,
}

#[derive(Clone, Debug)]
pub(crate) struct ObjectName(pub(crate) Option<(String, String)>);

pub(crate) fn parse_object_name(s: &str) -> Result<ObjectName, String> {
    if s.is_empty() {
        return Ok(ObjectName(None));
    }
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(ObjectName(Some((ns.to_string(), name.to_string()))))
        }
        _ => Err(format!("{s:?} is not NAMESPACE/NAME (or \"\" for none)")),
    }
}

/// A namespace name (a DNS label), or "".
pub(crate) fn parse_namespace(s: &str) -> Result<String, String> {
    let label = s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if s.is_empty() || label {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a namespace name (lower-case letters, digits and '-', at most 63)"))
    }
}

/// An Istio revision: a DNS label, or "" for the default revision.
pub(crate) fn parse_revision(s: &str) -> Result<String, String> {
    if s == "default" {
        return Ok(String::new());
    }
    parse_namespace(s).map_err(|_| format!("{s:?} is not an Istio revision name (a DNS label)"))
}

/// The default `--meshconfig`.
pub(crate) const DEFAULT_MESHCONFIG: (&str, &str) = ("osm-system", "osm-mesh-config");

#[derive(Clone, Debug)]
pub(crate) struct TaintKey(pub(crate) Option<String>);

/// A taint key is a qualified name: `[prefix/]name`, the prefix a DNS
/// subdomain, the name at most 63 characters of `[A-Za-z0-9._-]` starting
/// and ending alphanumeric (the API server's `IsQualifiedName`).
pub(crate) fn parse_taint_key(s: &str) -> Result<TaintKey, String> {
    if s.is_empty() {
        return Ok(TaintKey(None));
    }
    let bad = |why: &str| format!("{s:?} is not a taint key: {why}");
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(p) = prefix {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if p.len() > 253 || !p.split('.').all(label_ok) {
            return Err(bad("its prefix must be a DNS subdomain"));
        }
    }
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty()
        || name.len() > 63
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || !edge_ok(name.chars().next())
        || !edge_ok(name.chars().last())
    {
        return Err(bad("its name must be 1-63 characters of [A-Za-z0-9._-], alphanumeric at both ends"));
    }
    Ok(TaintKey(Some(s.to_string())))
}

/// A duration above zero.
pub(crate) fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("{s:?}: must be more than 0"));
    }
    Ok(d)
}

// Parsed once; the size of `run`'s arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Load and attach the programs and keep the workloads programmed: those
    /// of a config file (SIGHUP or a change of the file re-applies it), or,
    /// with --kube, the meshed pods of this node.
    Run {
        /// YAML config file (see docs/configuration.md, "Config file").
        #[arg(long, required_unless_present = "kube", conflicts_with = "kube")]
        config: Option<PathBuf>,
        /// cgroup-v2 directory to attach to (default: the cgroup2 mount).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long, default_value = mounts::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// How often the config file is checked for changes.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        poll_interval: Duration,
        /// Serve /healthz, /readyz and /metrics on this address.
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// The node's own network namespace, which is never redirected: a
        /// workload or pod found in it is refused (default: PID 1's,
        /// /proc/1/ns/net; with --config, the agent's own if PID 1's cannot
        /// be read, with a warning).
        #[arg(long)]
        node_netns: Option<PathBuf>,
        #[command(flatten)]
        kube: KubeArgs,
    },
    /// Validate a config file without touching the kernel, reporting every
    /// error (--log-format json: one JSON object); or, with --pod, show
    /// what the Kubernetes agent would do with pods as their mesh's
    /// injector wrote them.
    Check {
        #[arg(long, required_unless_present = "pod", conflicts_with = "pod")]
        config: Option<PathBuf>,
        /// A Pod or workload manifest as injected (YAML or JSON, one or many
        /// documents, or `kubectl get pods -o yaml`; `-` for stdin): per
        /// pod, whether it is a sidecar workload and why, the policy the
        /// agent would program, and the settings it refuses.
        #[arg(long)]
        pod: Option<PathBuf>,
        /// With --pod: the agent's `mesh.yaml` preset, for pods whose
        /// policy comes from the mesh settings and annotations (the
        /// redirector gate, an opt-in rule, Linkerd CNI, osm-init).
        #[arg(long, requires = "pod", value_parser = parse_preset)]
        preset: Option<redirector_policy::Preset>,
        /// With --pod: the agent's --meshed-when rules.
        #[arg(long = "meshed-when", requires = "pod")]
        meshed_when: Vec<redirector_policy::k8s::pods::MeshedWhen>,
        /// With --pod and --preset istio or linkerd: the mesh's own
        /// settings as the agent reads them, a file of ConfigMaps (`kubectl
        /// -n istio-system get cm istio-sidecar-injector istio -o yaml`, or
        /// `linkerd-config`), for pods whose init container carries none.
        #[arg(long, requires = "preset")]
        mesh_settings: Option<PathBuf>,
        /// One JSON object on stdout (as --log-format json).
        #[arg(long)]
        json: bool,
        /// Also resolve each workload on this machine as `run` does (its
        /// namespace or process, its proxy cgroup, one namespace per
        /// workload, the kernel's features); writes nothing. Needs root.
        #[arg(long)]
        live: bool,
    },
    /// Exit 0 once the workload in this network namespace is programmed
    /// (the init-container gate); non-zero on timeout, so it fails closed.
    WaitReady {
        /// Network namespace path (/run/netns/NAME or /proc/PID/ns/net);
        /// default: this process's own.
        #[arg(long, conflicts_with = "agent_socket")]
        netns: Option<PathBuf>,
        #[arg(long, default_value = mounts::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
        /// Do not require this process to be inside the cgroup the agent
        /// attached its programs to (only processes there are redirected):
        /// for waiting on a workload that is started elsewhere, inside it.
        #[arg(long, conflicts_with = "agent_socket")]
        no_cgroup_check: bool,
        /// Kubernetes mode: ask the node agent over this unix socket (it
        /// takes the namespace from this process) instead of reading the
        /// pinned maps.
        #[arg(long)]
        agent_socket: Option<PathBuf>,
        /// This pod's UID (downward API `metadata.uid`), with --agent-socket.
        #[arg(long, env = "POD_UID")]
        pod_uid: Option<String>,
    },
    /// Show the programmed state: programs, workloads, lists, map fill, counters.
    Inspect {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = mounts::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Detach every program and remove every pin this agent owns.
    Cleanup {
        #[arg(long, default_value = mounts::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Refused with the reason: cleanup finds the programs through the
        /// links pinned in --pin-dir, whatever cgroup they attach to.
        #[arg(long, hide = true)]
        cgroup: Option<PathBuf>,
        /// Remove the pins even while an agent holds the pin directory (it
        /// then finds them gone and exits with an error).
        #[arg(long)]
        force: bool,
        /// After cleaning up, stay running until SIGTERM (the uninstall
        /// DaemonSet's container, so `kubectl rollout status` reports every
        /// node done); a failed cleanup still exits non-zero at once.
        #[arg(long)]
        wait: bool,
    },
    /// Serve the mutating admission webhook over HTTPS (POST /mutate,
    /// GET /healthz): a meshed pod's iptables init container is replaced by
    /// the redirector gate, and the policy read from it recorded on the
    /// pod; every other pod is allowed unchanged. Never denies a pod.
    Webhook {
        /// Address to serve on (`[::]` is dual-stack).
        #[arg(long, default_value = "[::]:9443")]
        listen: std::net::SocketAddr,
        /// The serving certificate (PEM, the chain from the leaf); read
        /// again when the file changes.
        #[arg(long)]
        tls_cert_file: PathBuf,
        /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1); read again when
        /// the file changes.
        #[arg(long)]
        tls_key_file: PathBuf,
        /// Switch only pods whose init container is this mesh's (default:
        /// every mesh's); the others are allowed unchanged with a warning.
        #[arg(long, value_parser = parse_preset)]
        preset: Option<redirector_policy::Preset>,
        /// The agent's --meshed-when rules: a pod they match that has no
        /// mesh init container gets the gate added.
        #[arg(long = "meshed-when")]
        meshed_when: Vec<redirector_policy::k8s::pods::MeshedWhen>,
        /// The image of the gate container (this redirector's image).
        #[arg(long, value_parser = parse_image)]
        gate_image: String,
        /// The node directory of the agent's socket (the DaemonSet's
        /// --agent-socket without `/agent.sock`), mounted into the gate.
        #[arg(long, default_value = "/var/run/redirector", value_parser = parse_socket_dir)]
        agent_socket_dir: String,
    },
    /// Probe the kernel for every hook and helper the data path needs;
    /// exits non-zero if a required one is missing.
    Probe {
        #[arg(long)]
        json: bool,
    },
}

/// Flags that the chosen form of a command would not read, given on the
/// command line: refused, naming the flag, instead of being ignored
/// (`run --config` takes no Kubernetes flag; `wait-ready --pod-uid` is
/// only sent to an agent over `--agent-socket`). Values from the
/// environment (`NODE_NAME`, `POD_NAME`, `POD_UID`, set by the downward
/// API in every pod of the DaemonSet or the gate) are not refused.
pub(crate) fn refuse_unread(m: &clap::ArgMatches) -> Result<(), String> {
    use clap::{parser::ValueSource, Args as _};
    let given = |m: &clap::ArgMatches, id: &str| {
        m.try_get_raw(id).ok().flatten().is_some() && m.value_source(id) == Some(ValueSource::CommandLine)
    };
    let flag = |id: &str| format!("--{}", id.replace('_', "-"));
    match m.subcommand() {
        Some(("run", m)) if m.contains_id("config") && m.value_source("config").is_some() => {
            let kube = KubeArgs::augment_args(clap::Command::new("run"));
            let kube_ids: Vec<String> =
                kube.get_arguments().map(|a| a.get_id().as_str().to_string()).filter(|id| id != "kube").collect();
            if let Some(id) = kube_ids.into_iter().find(|id| given(m, id)) {
                return Err(format!(
                    "option {}: only read with --kube; `run --config` takes its settings from the config file",
                    flag(&id)
                ));
            }
        }
        Some(("wait-ready", m)) if m.value_source("agent_socket").is_none() && given(m, "pod_uid") => {
            return Err("option --pod-uid: only sent to the node agent with --agent-socket; without it,                         wait-ready reads the pinned maps for this network namespace"
                .into());
        }
        _ => {}
    }
    Ok(())
}

/// Which namespace is the node's, never redirected: `--node-netns`, or
/// PID 1's. The Kubernetes agent requires PID 1's (the DaemonSet has
/// `hostPID: true`; its own namespace is a pod's, never the node's); the
/// standalone agent takes its own where PID 1's cannot be read.
pub(crate) fn node_netns(kube: bool, given: Option<PathBuf>) -> redirector::dataplane::NodeNetns {
    use redirector::dataplane::NodeNetns;
    match (given, kube) {
        (Some(p), _) => NodeNetns::Path(p),
        (None, true) => NodeNetns::Pid1,
        (None, false) => NodeNetns::Pid1OrOwn,
    }
}

/// The longest duration any flag takes (`--poll-interval`, `--resync`,
/// `--timeout`): one day. Longer values are refused when the command line
/// is parsed: beyond it a timer or a deadline (`Instant + d`) can
/// overflow and panic, and no sensible poll, resync or gate waits longer.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// The shortest: a shorter poll or resync period would only spin.
pub(crate) const MIN_DURATION: Duration = Duration::from_millis(1);

/// `30s`, `500ms`, `2m`, `1h`, or plain seconds; from [`MIN_DURATION`] to
/// [`MAX_DURATION`] (clap puts the flag and the value in front of the
/// message).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = t.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((t, "s"), |i| (&t[..i], &t[i..]));
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    // Compared as seconds before any Duration is made: a value too large
    // for a Duration is refused here, not a panic.
    if secs > MAX_DURATION.as_secs_f64() {
        return Err(format!("{s:?} is longer than the limit of 24h (one day)"));
    }
    let d = Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 500ms, 2m)"))?;
    if d.is_zero() {
        return Err(format!("{s:?} is zero; give a duration above zero (e.g. 1s, 500ms)"));
    }
    if d < MIN_DURATION {
        return Err(format!("{s:?} is shorter than the minimum of 1ms"));
    }
    Ok(d)
}

/// A container image reference: not empty, no whitespace.
fn parse_image(s: &str) -> Result<String, String> {
    if s.is_empty() || s.chars().any(char::is_whitespace) {
        return Err(format!("{s:?} is not an image reference (e.g. registry.example/redirector:1.0)"));
    }
    Ok(s.to_string())
}

/// An absolute directory path, as a hostPath and a mountPath take it.
fn parse_socket_dir(s: &str) -> Result<String, String> {
    if !s.starts_with('/') || s.contains(':') || s.split('/').any(|c| c == "..") {
        return Err(format!("{s:?} is not an absolute directory path without \"..\" or \":\""));
    }
    Ok(if s.len() > 1 { s.trim_end_matches('/').to_string() } else { s.to_string() })
}

fn parse_preset(s: &str) -> Result<redirector_policy::Preset, String> {
    redirector_policy::Preset::parse(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("24h").unwrap(), MAX_DURATION);
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("abc").is_err());
    }

    /// Zero, a value above one day and one too large for a `Duration` are
    /// refused when the command line is parsed (`run --poll-interval 0s`
    /// panicked with "period must be non-zero" after attaching, and huge
    /// values panicked in `run` and `wait-ready`), naming the flag and the
    /// value.
    #[test]
    fn durations_outside_the_bounds_are_refused_naming_flag_and_value() {
        for bad in ["0", "0s", "0ms", "0.0m"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("zero") && e.contains(bad), "{bad}: {e}");
        }
        let e = parse_duration("0.5ms").unwrap_err();
        assert!(e.contains("minimum of 1ms") && e.contains("0.5ms"), "{e}");
        assert_eq!(parse_duration("1ms").unwrap(), MIN_DURATION);
        for bad in ["86401", "24.01h", "1441m", "99999999999999999999999s", "1e400", "18446744073709551616"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
        for (args, flag, value) in [
            (vec!["run", "--config", "c.yaml", "--poll-interval", "0s"], "--poll-interval", "0s"),
            (
                vec!["run", "--config", "c.yaml", "--poll-interval", "99999999999999999999999s"],
                "--poll-interval",
                "99999999999999999999999s",
            ),
            (vec!["run", "--kube", "--node-name", "n", "--resync", "0"], "--resync", "0"),
            (vec!["wait-ready", "--timeout", "0s"], "--timeout", "0s"),
            (vec!["wait-ready", "--timeout", "400000000000000000000h"], "--timeout", "400000000000000000000h"),
        ] {
            let e = Cli::try_parse_from(std::iter::once("redirector").chain(args.iter().copied()))
                .err()
                .unwrap_or_else(|| panic!("{args:?} accepted"))
                .to_string();
            assert!(e.contains(flag) && e.contains(value), "{args:?}: {e}");
        }
    }

    /// The command lines in deploy/ are accepted by this CLI.
    #[test]
    fn deploy_command_lines_parse() {
        let ds: serde_yaml::Value = serde_yaml::from_str(include_str!("../../deploy/agent/daemonset.yaml")).unwrap();
        let args: Vec<String> =
            serde_yaml::from_value(ds["spec"]["template"]["spec"]["containers"][0]["args"].clone()).unwrap();
        // NODE_NAME comes from the downward API at run time.
        let with_node = args.iter().cloned().chain(["--node-name".to_string(), "node-1".to_string()]);
        let cli = Cli::try_parse_from(std::iter::once("redirector".to_string()).chain(with_node))
            .unwrap_or_else(|e| panic!("daemonset args {args:?}: {e}"));
        match cli.command {
            Cmd::Run { config: None, kube, metrics_addr: Some(_), .. } => {
                assert!(kube.kube);
                assert_eq!(kube.configmap.0, Some(("redirector-system".into(), "redirector-config".into())));
            }
            _ => panic!("daemonset does not run `run --kube` with a status address"),
        }
        let init: serde_yaml::Value = serde_yaml::from_str(include_str!("../../deploy/init-container.yaml")).unwrap();
        let cmd: Vec<String> = serde_yaml::from_value(init["initContainers"][0]["command"].clone()).unwrap();
        let cli = Cli::try_parse_from(cmd.clone()).unwrap_or_else(|e| panic!("init container {cmd:?}: {e}"));
        assert!(matches!(cli.command, Cmd::WaitReady { agent_socket: Some(_), .. }));
        let ds: serde_yaml::Value =
            serde_yaml::from_str(include_str!("../../deploy/uninstall/cleanup-daemonset.yaml")).unwrap();
        let c = &ds["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<String> = serde_yaml::from_value(c["args"].clone()).unwrap();
        let cli = Cli::try_parse_from(std::iter::once("redirector".to_string()).chain(args.iter().cloned()))
            .unwrap_or_else(|e| panic!("cleanup daemonset args {args:?}: {e}"));
        match cli.command {
            Cmd::Cleanup { pin_dir, wait: true, .. } => assert_eq!(pin_dir, PathBuf::from("/sys/fs/bpf/redirector")),
            _ => panic!("the cleanup DaemonSet does not run `cleanup --wait`"),
        }
        let dep: serde_yaml::Value =
            serde_yaml::from_str(include_str!("../../deploy/webhook/deployment.yaml")).unwrap();
        let args: Vec<String> =
            serde_yaml::from_value(dep["spec"]["template"]["spec"]["containers"][0]["args"].clone()).unwrap();
        let cli = Cli::try_parse_from(std::iter::once("redirector".to_string()).chain(args.iter().cloned()))
            .unwrap_or_else(|e| panic!("webhook deployment args {args:?}: {e}"));
        assert!(matches!(cli.command, Cmd::Webhook { .. }), "the webhook Deployment does not run `webhook`");
    }

    #[test]
    fn kube_flags() {
        assert!(Cli::try_parse_from(["redirector", "run"]).is_err(), "--config or --kube is required");
        assert!(Cli::try_parse_from(["redirector", "run", "--config", "c.yaml", "--kube"]).is_err());
        assert!(parse_object_name("a/b/c").is_err());
        assert!(parse_object_name("").unwrap().0.is_none());
        let e = Cli::try_parse_from(["redirector", "run", "--kube", "--node-name", "n", "--meshed-when", "pod:x"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("pod:x"), "{e}");
        let run = |extra: &[&str]| {
            let base = ["redirector", "run", "--kube", "--node-name", "n"];
            Cli::try_parse_from(base.iter().chain(extra)).map(|c| match c.command {
                Cmd::Run { kube, .. } => kube,
                _ => unreachable!(),
            })
        };
        let k = run(&[]).unwrap();
        assert!(k.meshconfig.is_none(), "not given: the default, read only with preset osm");
        assert_eq!(k.startup_taint.0.as_deref(), Some("redirector.dev/agent-not-ready"));
        assert_eq!(k.event_refresh, Duration::from_secs(1800));
        let k = run(&["--meshconfig", "", "--startup-taint", ""]).unwrap();
        assert!(k.meshconfig.unwrap().0.is_none() && k.startup_taint.0.is_none());
        for bad in [
            &["--startup-taint", "Bad_Domain/x"][..],
            &["--startup-taint", "a/-x"],
            &["--startup-taint", "a/b/c"],
            &["--event-refresh", "0s"],
            &["--meshconfig-recheck", "0"],
            &["--mesh-namespace", "Istio_System"],
            &["--istio-revision", "a/b"],
        ] {
            assert!(run(bad).is_err(), "{bad:?} accepted");
        }
        assert!(run(&["--startup-taint", "example.com/agent_not.ready-1"]).is_ok());
        let k = run(&["--mesh-namespace", "", "--istio-revision", "default"]).unwrap();
        assert_eq!(
            (k.mesh_namespace.as_deref(), k.istio_revision.as_str()),
            (Some(""), ""),
            "\"default\" is the default revision"
        );
        assert_eq!(run(&["--istio-revision", "canary"]).unwrap().istio_revision, "canary");
    }

    #[test]
    fn webhook_flags() {
        let base = ["redirector", "webhook", "--tls-cert-file", "c", "--tls-key-file", "k", "--gate-image", "r:1"];
        let parse = |extra: &[&str]| Cli::try_parse_from(base.iter().chain(extra)).map(|c| c.command);
        match parse(&[]).unwrap() {
            Cmd::Webhook { listen, preset: None, meshed_when, agent_socket_dir, .. } => {
                assert_eq!(listen, "[::]:9443".parse().unwrap());
                assert!(meshed_when.is_empty());
                assert_eq!(agent_socket_dir, "/var/run/redirector");
            }
            _ => unreachable!(),
        }
        match parse(&["--agent-socket-dir", "/run/r/", "--preset", "istio", "--meshed-when", "label:a"]).unwrap() {
            Cmd::Webhook { preset: Some(p), agent_socket_dir, meshed_when, .. } => {
                assert_eq!(
                    (p, agent_socket_dir.as_str(), meshed_when.len()),
                    (redirector_policy::Preset::Istio, "/run/r", 1)
                );
            }
            _ => unreachable!(),
        }
        for (bad, flag) in [
            (&["--agent-socket-dir", "run/r"][..], "--agent-socket-dir"),
            (&["--agent-socket-dir", "/a/../b"], "--agent-socket-dir"),
            (&["--preset", "nginx"], "--preset"),
            (&["--gate-image", ""], "--gate-image"),
            (&["--listen", "9443"], "--listen"),
        ] {
            let e = parse(bad).err().unwrap_or_else(|| panic!("{bad:?} accepted")).to_string();
            assert!(e.contains(flag), "{bad:?}: {e}");
        }
        assert!(Cli::try_parse_from(["redirector", "webhook", "--gate-image", "r"]).is_err(), "certificate required");
    }

    /// A flag the chosen form of the command does not read is refused,
    /// naming it; the same flags are accepted where they are read.
    #[test]
    fn flags_that_would_be_ignored_are_refused() {
        use clap::CommandFactory;
        let check = |args: &[&str]| {
            let m = Cli::command().try_get_matches_from(std::iter::once("redirector").chain(args.iter().copied()));
            refuse_unread(&m.unwrap_or_else(|e| panic!("{args:?}: {e}")))
        };
        for (args, flag) in [
            (&["run", "--config", "c.yaml", "--proxy-identity", "cgroup"][..], "--proxy-identity"),
            (&["run", "--config", "c.yaml", "--proxy-container", "envoy"], "--proxy-container"),
            (&["run", "--config", "c.yaml", "--meshed-when", "label:a"], "--meshed-when"),
            (&["run", "--config", "c.yaml", "--configmap", "a/b"], "--configmap"),
            (&["run", "--config", "c.yaml", "--resync", "2s"], "--resync"),
            (&["run", "--config", "c.yaml", "--node-name", "n"], "--node-name"),
            (&["run", "--config", "c.yaml", "--agent-socket", "/x"], "--agent-socket"),
            (&["run", "--config", "c.yaml", "--startup-taint", ""], "--startup-taint"),
            (&["wait-ready", "--pod-uid", "u"], "--pod-uid"),
        ] {
            let e = check(args).err().unwrap_or_else(|| panic!("{args:?} accepted"));
            assert!(e.contains(flag), "{args:?}: {e}");
        }
        for ok in [
            &["run", "--config", "c.yaml", "--poll-interval", "2s"][..],
            &["run", "--kube", "--node-name", "n", "--proxy-identity", "cgroup", "--resync", "2s"],
            &["wait-ready", "--agent-socket", "/s", "--pod-uid", "u"],
            &["wait-ready", "--timeout", "5s"],
        ] {
            assert_eq!(check(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn the_node_namespace_is_pid_1s_and_required_in_kubernetes_mode() {
        use redirector::dataplane::NodeNetns;
        assert_eq!(node_netns(true, None), NodeNetns::Pid1, "never the agent's own (a pod's) namespace");
        assert_eq!(node_netns(false, None), NodeNetns::Pid1OrOwn);
        for kube in [true, false] {
            assert_eq!(node_netns(kube, Some("/run/netns/n".into())), NodeNetns::Path("/run/netns/n".into()));
        }
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
