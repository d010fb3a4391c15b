//! `redirector`: the agent and its CLI ([`cli`]); each command is a call
//! into the library.
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use clap::{CommandFactory as _, FromArgMatches as _};
use redirector::{
    agent::{k8s::ProxyIdentity, standalone},
    dataplane, inspect,
    sys::mounts,
};

mod cli;

use cli::{Cli, Cmd, ProxyIdentityArg};

fn main() {
    // The image run with a mesh's own init command line (the mesh's knob
    // swapped only the image): the drop-in gate.
    let args: Vec<String> = std::env::args().collect();
    if let Some(argv) = redirector::dropin::mesh_argv(&args) {
        redirector::logging::init(false);
        if let Err(e) = redirector::dropin::run(&argv) {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let matches = Cli::command().get_matches();
    if let Err(e) = cli::refuse_unread(&matches) {
        Cli::command().error(clap::error::ErrorKind::ArgumentConflict, e).exit();
    }
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let json = cli.log_format == "json";
    redirector::logging::init(json);
    if let Err(e) = real_main(cli) {
        if json {
            // One JSON object, as the logs are.
            eprintln!("{}", serde_json::json!({ "level": "ERROR", "message": format!("{e:#}") }));
        } else {
            eprintln!("error: {e:#}");
        }
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    let json = cli.log_format == "json";
    match cli.command {
        Cmd::Run { config, cgroup, pin_dir, poll_interval, metrics_addr, node_netns, kube } => {
            let cgroup = match cgroup {
                Some(c) => c,
                None => mounts::cgroup2_root()?,
            };
            // Two workers: a reconcile pass is synchronous (block_in_place),
            // and the watch connections, the registry socket and the status
            // endpoints keep being served on the other one meanwhile.
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            // Each workload's namespace held between passes is a file
            // descriptor (redirector::sys::nscache).
            match redirector::sys::nscache::raise_nofile_limit() {
                Ok(n) => log::debug!("RLIMIT_NOFILE soft limit {n}"),
                Err(e) => log::warn!("{e:#}: fewer workloads' namespaces can be held between passes"),
            }
            match config {
                Some(config) => rt.block_on(standalone::run(standalone::RunOptions {
                    config,
                    cgroup,
                    pin_dir,
                    poll_interval,
                    metrics_addr,
                    node_netns: cli::node_netns(false, node_netns),
                })),
                None => rt.block_on(redirector::agent::k8s::run(redirector::agent::k8s::KubeOptions {
                    node_name: kube.node_name.unwrap_or_default(),
                    attach_cgroup: match kube.attach_cgroup {
                        Some(p) if p.as_os_str() == "kubepods" => redirector::sys::kubepods::find(&cgroup)?,
                        Some(p) => p,
                        None => cgroup.clone(),
                    },
                    cgroup,
                    pin_dir,
                    socket: kube.agent_socket,
                    metrics_addr,
                    configmap: kube.configmap.0,
                    meshconfig_explicit: kube.meshconfig.is_some(),
                    meshconfig: match kube.meshconfig {
                        Some(given) => given.0,
                        None => Some((cli::DEFAULT_MESHCONFIG.0.into(), cli::DEFAULT_MESHCONFIG.1.into())),
                    },
                    meshconfig_version: kube.meshconfig_version,
                    meshconfig_recheck: kube.meshconfig_recheck,
                    mesh_namespace: kube.mesh_namespace,
                    istio_revision: kube.istio_revision,
                    event_refresh: kube.event_refresh,
                    startup_taint: kube.startup_taint.0,
                    meshed_when: kube.meshed_when,
                    proc_root: PathBuf::from("/proc"),
                    node_netns: cli::node_netns(true, node_netns),
                    resync: kube.resync,
                    unresolved_grace: kube.unresolved_grace,
                    instance: kube.pod_name,
                    proxy_identity: match (kube.proxy_identity, kube.proxy_container) {
                        (ProxyIdentityArg::Cgroup, container) => ProxyIdentity::Cgroup { container },
                        (ProxyIdentityArg::Uid, None) => ProxyIdentity::Uid,
                        (ProxyIdentityArg::Uid, Some(c)) => bail!(
                            "option --proxy-container: value {c:?}: only used with --proxy-identity=cgroup (the proxy is identified by UID)"
                        ),
                    },
                })),
            }
        }
        Cmd::Check { pod: Some(file), preset, meshed_when, mesh_settings, json: j, live, .. } => {
            if live {
                bail!("option --live: checks a config file's workloads on this machine; --pod reads manifests only");
            }
            let wide = match &mesh_settings {
                Some(f) => Some(
                    redirector::check_pod::mesh_settings_file(f, preset)
                        .with_context(|| format!("option --mesh-settings: value {}", f.display()))?,
                ),
                None => None,
            };
            redirector::check_pod::check_pod(&file, preset, &meshed_when, wide.as_ref(), json || j)
        }
        Cmd::Check { config: Some(config), live, json: j, .. } => {
            standalone::check(&standalone::CheckOptions { config, live, json: json || j })
        }
        Cmd::Check { .. } => bail!("check needs --config FILE or --pod FILE"),
        Cmd::WaitReady { agent_socket: Some(socket), pod_uid, timeout, .. } => {
            let uid = pod_uid
                .ok_or_else(|| anyhow::anyhow!("--agent-socket needs --pod-uid (or POD_UID from the downward API)"))?;
            let msg = redirector::agent::k8s::registry::wait_ready(&socket, &uid, timeout)?;
            println!("ready: {msg}");
            Ok(())
        }
        Cmd::WaitReady { netns: ns, pin_dir, timeout, no_cgroup_check, .. } => {
            println!("{}", dataplane::wait_ready(ns.as_deref(), &pin_dir, timeout, !no_cgroup_check)?);
            Ok(())
        }
        Cmd::Webhook { listen, tls_cert_file, tls_key_file, preset, meshed_when, gate_image, agent_socket_dir } => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            // Each workload's namespace held between passes is a file
            // descriptor (redirector::sys::nscache).
            match redirector::sys::nscache::raise_nofile_limit() {
                Ok(n) => log::debug!("RLIMIT_NOFILE soft limit {n}"),
                Err(e) => log::warn!("{e:#}: fewer workloads' namespaces can be held between passes"),
            }
            rt.block_on(redirector::webhook::run(redirector::webhook::WebhookOptions {
                listen,
                cert_file: tls_cert_file,
                key_file: tls_key_file,
                settings: redirector_policy::k8s::admission::Settings {
                    preset,
                    rules: meshed_when,
                    gate_image,
                    socket_dir: agent_socket_dir,
                },
            }))
        }
        Cmd::Inspect { json, pin_dir } => {
            let s = inspect::snapshot(&pin_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", inspect::render_text(&s));
            }
            Ok(())
        }
        Cmd::Cleanup { pin_dir, cgroup, force, wait } => {
            if let Some(cg) = cgroup {
                bail!(
                    "option --cgroup: value {}: cleanup takes no cgroup: it detaches the programs through the links \
                     pinned in --pin-dir ({}), whatever cgroup they are attached to; give the --pin-dir of the agent \
                     to remove",
                    cg.display(),
                    pin_dir.display()
                );
            }
            if pin_dir.symlink_metadata().is_err() {
                // Not there, or not visible from here (no bpffs): say which.
                mounts::require_bpffs(&pin_dir, mounts::PinUse::Existing)?;
                println!("nothing to clean up: pin directory {} does not exist", pin_dir.display());
            } else {
                mounts::require_bpffs(&pin_dir, mounts::PinUse::Existing)?;
                let removed = if force { dataplane::cleanup_force(&pin_dir)? } else { dataplane::cleanup(&pin_dir)? };
                println!("removed {} pins under {} (programs detached)", removed.len(), pin_dir.display());
            }
            if wait {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async {
                    use std::io::Write as _;
                    use tokio::signal::unix::{signal, SignalKind};
                    // Handlers before the "done" line: a SIGTERM right after
                    // it must end the wait cleanly, not kill the process.
                    let mut term = signal(SignalKind::terminate())?;
                    let mut int = signal(SignalKind::interrupt())?;
                    println!("cleanup done; waiting for SIGTERM");
                    std::io::stdout().flush()?;
                    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
                    anyhow::Ok(())
                })?;
            }
            Ok(())
        }
        Cmd::Probe { json } => {
            let features = redirector::sys::features::probe();
            if json {
                println!("{}", serde_json::to_string_pretty(&features)?);
            } else {
                print!("{}", redirector::sys::features::render(&features));
            }
            redirector::sys::features::require(&features)
        }
    }
}
