//! `redirector`: the agent and its CLI ([`cli`]); each command is a call
//! into the library.
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser as _;
use redirector::{
    agent::{k8s::ProxyIdentity, standalone},
    dataplane, inspect,
    sys::mounts,
};

mod cli;

use cli::{Cli, Cmd, ProxyIdentityArg};

fn main() {
    let cli = Cli::parse();
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
        Cmd::Run { config, cgroup, pin_dir, poll_interval, metrics_addr, kube } => {
            let cgroup = match cgroup {
                Some(c) => c,
                None => mounts::cgroup2_root()?,
            };
            // Two workers: a reconcile pass is synchronous (block_in_place),
            // and the watch connections, the registry socket and the status
            // endpoints keep being served on the other one meanwhile.
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            match config {
                Some(config) => {
                    rt.block_on(standalone::run(standalone::RunOptions { config, cgroup, pin_dir, poll_interval, metrics_addr }))
                }
                None => rt.block_on(redirector::agent::k8s::run(redirector::agent::k8s::KubeOptions {
                    node_name: kube.node_name.unwrap_or_default(),
                    cgroup,
                    pin_dir,
                    socket: kube.agent_socket,
                    metrics_addr,
                    configmap: kube.configmap.0,
                    meshconfig: kube.meshconfig.0,
                    meshconfig_version: kube.meshconfig_version,
                    meshed_when: kube.meshed_when,
                    proc_root: PathBuf::from("/proc"),
                    resync: kube.resync,
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
        Cmd::Check { config, live } => standalone::check(&standalone::CheckOptions { config, live, json }),
        Cmd::WaitReady { agent_socket: Some(socket), pod_uid, timeout, .. } => {
            let uid = pod_uid
                .ok_or_else(|| anyhow::anyhow!("--agent-socket needs --pod-uid (or POD_UID from the downward API)"))?;
            let msg = redirector::agent::k8s::registry::wait_ready(&socket, &uid, timeout)?;
            println!("ready: {msg}");
            Ok(())
        }
        Cmd::WaitReady { netns: ns, pin_dir, timeout, .. } => {
            println!("{}", dataplane::wait_ready(ns.as_deref(), &pin_dir, timeout)?);
            Ok(())
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
        Cmd::Cleanup { pin_dir, cgroup: _, wait } => {
            let removed = dataplane::cleanup(&pin_dir)?;
            println!("removed {} pins under {} (programs detached)", removed.len(), pin_dir.display());
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
