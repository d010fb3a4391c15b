//! The node's own network namespace, which the data plane never programs,
//! whoever asks: a config entry naming it (`netns: /proc/1/ns/net`,
//! `pid: 1`), or a Kubernetes pod whose namespace was taken from a
//! process that lives in the node's namespace (CRI-O's conmon runs in the
//! pod's cgroup but in the host network namespace). Programming it would
//! send the node's own connections (kubelet, sshd) to a proxy port where
//! nothing listens, and drop inbound connections to it.
//!
//! The node's namespace is PID 1's: the agent runs in the host PID
//! namespace (standalone on the node, or the DaemonSet's `hostPID: true`),
//! or it is named (`run --node-netns`); see [`NodeNetns`] for what happens
//! where PID 1's cannot be read.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};

use super::Desired;

/// Where the node's network namespace is: PID 1's.
pub const NODE_NETNS: &str = "/proc/1/ns/net";

/// Which network namespace is the node's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeNetns {
    /// PID 1's ([`NODE_NETNS`]); where that cannot be read (the agent runs
    /// in a PID namespace of its own, or PID 1 may not be inspected), the
    /// agent's own, with a warning. The standalone agent's default.
    Pid1OrOwn,
    /// PID 1's, or the data plane does not start. The Kubernetes agent's
    /// default: the DaemonSet runs in the host PID namespace, while its own
    /// network namespace is a pod's.
    Pid1,
    /// This one (`run --node-netns PATH`).
    Path(PathBuf),
}

/// The node's network namespace, as found: its cookie and how it is named
/// in messages.
pub fn resolve(node: &NodeNetns) -> Result<(u64, String)> {
    let read = |path: &Path| {
        crate::sys::netns::netns_cookie(path)
            .with_context(|| format!("reading the node's network namespace {}", path.display()))
    };
    match node {
        NodeNetns::Path(p) => Ok((read(p)?, p.display().to_string())),
        NodeNetns::Pid1 => {
            let c = read(Path::new(NODE_NETNS)).context(
                "the agent must run in the host PID namespace (hostPID: true), or name the node's namespace \
                 with --node-netns: the data plane does not start without knowing which namespace it must never \
                 redirect",
            )?;
            Ok((c, format!("{NODE_NETNS}, PID 1's")))
        }
        NodeNetns::Pid1OrOwn => match read(Path::new(NODE_NETNS)) {
            Ok(c) => Ok((c, format!("{NODE_NETNS}, PID 1's"))),
            Err(e) => {
                let own = crate::sys::netns::current_netns_cookie()
                    .context("reading the agent's own network namespace, for the node's")?;
                log::warn!(
                    "{e:#}; taking the agent's own network namespace (cookie {own}) for the node's, which is never \
                     redirected (name it with --node-netns)"
                );
                Ok((own, format!("the agent's own, cookie {own}: {NODE_NETNS} could not be read")))
            }
        },
    }
}

/// `desired` without the workloads whose namespace is the node's, each
/// of those with the error that refuses it.
pub fn refuse_node_namespace(
    desired: &[Desired],
    node_cookie: u64,
    node_netns: &str,
) -> (Vec<Desired>, Vec<(Desired, anyhow::Error)>) {
    let (refused, ok): (Vec<Desired>, Vec<Desired>) = desired.iter().cloned().partition(|d| d.cookie == node_cookie);
    let refused = refused
        .into_iter()
        .map(|d| {
            let e = anyhow!(
                "workload `{}`: network namespace {} (cookie {node_cookie}) is the node's own ({node_netns}): \
                 redirecting it would send the node's connections to a proxy; refused, nothing written",
                d.name,
                d.netns.display(),
            );
            (d, e)
        })
        .collect();
    (ok, refused)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use redirector_policy::{compile, MeshSettings, WorkloadAnnotations};

    use super::*;

    fn desired(name: &str, cookie: u64) -> Desired {
        Desired {
            name: name.into(),
            cookie,
            netns: PathBuf::from(format!("/proc/self/fd/{cookie}")),
            policy: compile(&MeshSettings::default(), &WorkloadAnnotations::default()),
        }
    }

    #[test]
    fn only_the_node_namespace_is_refused_with_its_names() {
        let want = [desired("a", 1), desired("shop/conmon-picked", 7), desired("b", 2)];
        let (ok, refused) = refuse_node_namespace(&want, 7, "/proc/1/ns/net, PID 1's");
        assert_eq!(ok.iter().map(|d| d.cookie).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0.name, "shop/conmon-picked");
        assert_eq!(
            refused[0].1.to_string(),
            "workload `shop/conmon-picked`: network namespace /proc/self/fd/7 (cookie 7) is the node's own \
             (/proc/1/ns/net, PID 1's): redirecting it would send the node's connections to a proxy; refused, \
             nothing written"
        );
        let (ok, refused) = refuse_node_namespace(&want, 99, NODE_NETNS);
        assert_eq!((ok.len(), refused.len()), (3, 0));
    }
}
