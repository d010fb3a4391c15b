//! The init container's gate. `redirector wait-ready --agent-socket PATH
//! --pod-uid UID`, run by the pod's init container, connects to the node
//! agent over a unix socket on a hostPath and waits; the agent takes the
//! pod's network namespace from the connecting process (its PID from
//! SO_PEERCRED, checked to be in the cgroup of that very pod, and in the
//! cgroup the agent attaches its programs to, or below it: a pod outside
//! it would not be redirected), programs the pod, and answers `ready`
//! only once its policy is in force. Any
//! other outcome (a timeout, no agent, an error) makes the init container
//! fail, so no application container starts unredirected.
//!
//! Wire format: one JSON request line from the client,
//! `{"podUid": "…"}`; then JSON lines from the agent,
//! `{"state": "waiting"|"ready"|"error", "message": "…"}`, the last one
//! being `ready` or `error`.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    sync::mpsc,
};

use super::discover::{cgroup_of_pid, NetnsHandle, Place};

/// The log target of these records: the module path they had before the
/// agents moved under `agent/`, so `RUST_LOG` filters and log readers keep
/// working.
const LOG: &str = "redirector::k8s::registry";

#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub pod_uid: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Waiting,
    Ready,
    Error,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub state: State,
    pub message: String,
}

impl Reply {
    pub fn waiting(m: impl Into<String>) -> Self {
        Self { state: State::Waiting, message: m.into() }
    }
    pub fn ready(m: impl Into<String>) -> Self {
        Self { state: State::Ready, message: m.into() }
    }
    pub fn error(m: impl Into<String>) -> Self {
        Self { state: State::Error, message: m.into() }
    }
    pub fn is_final(&self) -> bool {
        self.state != State::Waiting
    }
}

/// A pod that registered itself: its namespace, and where to send replies.
pub struct Registration {
    pub uid: String,
    pub pid: u32,
    pub netns: NetnsHandle,
    pub reply: mpsc::UnboundedSender<Reply>,
}

/// Binds the socket, replacing a stale one left by a previous agent. Any
/// process that can reach it may connect (init containers need not run as
/// root): a client can only ever register the namespace of its own pod.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating socket directory {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale socket {}", path.display())),
    }
    let l = tokio::net::UnixListener::bind(path).with_context(|| format!("binding agent socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(l)
}

/// Accepts registrations until the listener fails.
/// `node_cookie`: the node's network namespace, which no pod registers
/// (a host-network pod, or a process that is not the pod's container).
/// `attach_cgroup`: where the agent attaches its programs.
pub async fn serve(
    listener: tokio::net::UnixListener,
    proc_root: PathBuf,
    node_cookie: u64,
    attach_cgroup: PathBuf,
    tx: mpsc::Sender<Registration>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                log::error!(target: LOG, "agent socket: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let tx = tx.clone();
        let proc_root = proc_root.clone();
        let attach_cgroup = attach_cgroup.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &proc_root, node_cookie, &attach_cgroup, tx).await {
                log::warn!(target: LOG, "agent socket: {e:#}");
            }
        });
    }
}

async fn handle(
    stream: tokio::net::UnixStream,
    proc_root: &Path,
    node_cookie: u64,
    attach_cgroup: &Path,
    tx: mpsc::Sender<Registration>,
) -> Result<()> {
    let cred = stream.peer_cred().context("reading the client's credentials (SO_PEERCRED)")?;
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let mut rd = tokio::io::BufReader::new(rd);
    tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut line))
        .await
        .map_err(|_| anyhow!("client sent no request within 5 s"))??;
    let send = |r: Reply| {
        let mut text = serde_json::to_string(&r).expect("reply serializes");
        text.push('\n');
        text
    };
    let registration = (|| -> Result<(Request, u32, NetnsHandle)> {
        let req: Request = serde_json::from_str(line.trim())
            .with_context(|| format!("request {:?}: not {{\"podUid\": \"…\"}}", line.trim()))?;
        let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).ok_or_else(|| {
            anyhow!("the client's PID is not visible to the agent (is the agent in the host PID namespace?)")
        })?;
        // The namespace is only taken from a process of that pod: another
        // pod cannot register its namespace under this pod's UID.
        match cgroup_of_pid(proc_root, pid) {
            Some(c) if c.pod_uid != req.pod_uid => {
                bail!("pod UID {}: the connecting process {pid} belongs to pod {}", req.pod_uid, c.pod_uid)
            }
            Some(c) if matches!(c.place, Place::Conmon(_)) => bail!(
                "pod UID {}: the connecting process {pid} is in CRI-O's conmon cgroup, not a container of the pod \
                 (see {}/{pid}/cgroup)",
                req.pod_uid,
                proc_root.display()
            ),
            Some(_) => {}
            None => bail!(
                "pod UID {}: the connecting process {pid} is in no pod's cgroup (see {}/{pid}/cgroup)",
                req.pod_uid,
                proc_root.display()
            ),
        }
        // Only processes in the attach cgroup's subtree are redirected: a
        // pod outside it would start with its traffic around the proxy.
        let inside = crate::sys::cgroup::pid_in_subtree(attach_cgroup, pid, proc_root).with_context(|| {
            format!(
                "pod UID {}: checking that the connecting process {pid} is inside the attach cgroup {}",
                req.pod_uid,
                attach_cgroup.display()
            )
        })?;
        if !inside {
            let rel = crate::sys::cgroup::cgroup_path_of(proc_root, pid).unwrap_or_else(|e| format!("{e:#}"));
            bail!(
                "pod UID {}: the connecting process {pid} (cgroup {rel}) is outside the cgroup the agent attaches \
                 its programs to ({}): the pod's processes would not be redirected; run the agent with a --cgroup \
                 that contains the pods (default: the cgroup2 mount)",
                req.pod_uid,
                attach_cgroup.display()
            );
        }
        let netns = NetnsHandle::open_pid(proc_root, pid)?;
        if netns.cookie == node_cookie {
            bail!(
                "pod UID {}: the connecting process {pid} is in the node's network namespace (cookie {node_cookie}); \
                 a pod using the node's network namespace is never redirected",
                req.pod_uid
            );
        }
        Ok((req, pid, netns))
    })();
    let (req, pid, netns) = match registration {
        Ok(r) => r,
        Err(e) => {
            let _ = wr.write_all(send(Reply::error(format!("{e:#}"))).as_bytes()).await;
            return Err(e);
        }
    };
    let (reply_tx, mut reply_rx) = mpsc::unbounded_channel();
    let userns = netns.id_maps.as_ref().map(|m| format!(", user namespace uid_map {}", m.uid)).unwrap_or_default();
    log::info!(target: LOG, "pod UID {} registered from PID {pid} (netns cookie {}{userns})", req.pod_uid, netns.cookie);
    tx.send(Registration { uid: req.pod_uid, pid, netns, reply: reply_tx })
        .await
        .map_err(|_| anyhow!("the agent is shutting down"))?;
    while let Some(r) = reply_rx.recv().await {
        let last = r.is_final();
        if wr.write_all(send(r).as_bytes()).await.is_err() {
            break; // the client gave up
        }
        if last {
            break;
        }
    }
    Ok(())
}

/// The client side (`wait-ready --agent-socket`): retries until `timeout`
/// while the agent is absent or restarting; returns the ready message, or
/// fails with the agent's error or the last thing it was waiting for.
pub fn wait_ready(socket: &Path, pod_uid: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "pod UID {pod_uid}: not programmed after {timeout:?} (last: {last}); failing closed so no \
                 application container starts without redirection"
            );
        }
        match UnixStream::connect(socket) {
            Err(e) => last = format!("no agent at {}: {e}", socket.display()),
            Ok(mut s) => {
                let mut req = serde_json::to_string(&Request { pod_uid: pod_uid.to_string() })?;
                req.push('\n');
                s.write_all(req.as_bytes()).context("sending the request to the agent")?;
                s.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                let mut rd = BufReader::new(s);
                loop {
                    let mut line = String::new();
                    match rd.read_line(&mut line) {
                        Ok(0) => {
                            last = format!("the agent closed the connection (last: {last})");
                            break;
                        }
                        Ok(_) => {
                            let r: Reply = serde_json::from_str(line.trim())
                                .with_context(|| format!("agent reply {:?}", line.trim()))?;
                            match r.state {
                                State::Ready => return Ok(r.message),
                                State::Error => bail!("pod UID {pod_uid}: the agent refused: {}", r.message),
                                State::Waiting => {
                                    if r.message != last {
                                        eprintln!("waiting: {}", r.message);
                                    }
                                    last = r.message;
                                }
                            }
                        }
                        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                            break
                        }
                        Err(e) => {
                            last = format!("reading from the agent: {e}");
                            break;
                        }
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        assert_eq!(serde_json::to_string(&Request { pod_uid: "u".into() }).unwrap(), r#"{"podUid":"u"}"#);
        assert_eq!(serde_json::to_string(&Reply::ready("ok")).unwrap(), r#"{"state":"ready","message":"ok"}"#);
        assert!(Reply::error("x").is_final() && !Reply::waiting("x").is_final());
    }

    #[test]
    fn no_agent_fails_closed_with_the_reason() {
        let sock = std::env::temp_dir().join(format!("rdr-none-{}.sock", std::process::id()));
        let e = wait_ready(&sock, "u1", Duration::from_millis(300)).unwrap_err().to_string();
        assert!(e.contains("no agent at") && e.contains("failing closed") && e.contains("u1"), "{e}");
    }

    /// A process of no pod is refused with the reason (the test process is
    /// in no `pod<uid>` cgroup).
    #[test]
    fn foreign_process_is_refused() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let sock = std::env::temp_dir().join(format!("rdr-reg-{}.sock", std::process::id()));
        let res = rt.block_on(async {
            let l = bind(&sock).unwrap();
            let (tx, _rx) = mpsc::channel(4);
            tokio::spawn(serve(l, PathBuf::from("/proc"), 0, PathBuf::from("/sys/fs/cgroup"), tx));
            let s2 = sock.clone();
            tokio::task::spawn_blocking(move || {
                wait_ready(&s2, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", Duration::from_secs(5))
            })
            .await
            .unwrap()
        });
        let _ = std::fs::remove_file(&sock);
        let e = format!("{:#}", res.unwrap_err());
        assert!(e.contains("refused") && e.contains("is in no pod's cgroup"), "{e}");
    }

    /// A caller in CRI-O's conmon cgroup (in the pod's cgroup but the
    /// node's network namespace), and a container process in the node's
    /// namespace, are refused: neither registers the node as a pod.
    #[test]
    fn conmon_and_the_node_namespace_are_refused() {
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP conmon_and_the_node_namespace_are_refused: reading a namespace's cookie needs root");
            return;
        }
        let uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
        let pod =
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice", uid.replace('-', "_"));
        let id = "a".repeat(64);
        let pid = std::process::id();
        let root = crate::sys::mounts::cgroup2_root().unwrap();
        let node = crate::sys::netns::current_netns_cookie().unwrap();
        for (place, want) in [
            (format!("crio-conmon-{id}.scope"), "CRI-O's conmon cgroup"),
            (format!("crio-{id}.scope"), "the node's network namespace"),
        ] {
            let proc_root = std::env::temp_dir().join(format!("rdr-proc-{pid}-{}", want.len()));
            // The process's own namespaces, under a cgroup of the pod.
            std::fs::create_dir_all(proc_root.join(pid.to_string())).unwrap();
            std::fs::write(proc_root.join(format!("{pid}/cgroup")), format!("0::/{pod}/{place}\n")).unwrap();
            let _ = std::fs::remove_file(proc_root.join(format!("{pid}/ns")));
            std::os::unix::fs::symlink(format!("/proc/{pid}/ns"), proc_root.join(format!("{pid}/ns"))).unwrap();
            let sock = proc_root.join("agent.sock");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let res = rt.block_on(async {
                let l = bind(&sock).unwrap();
                let (tx, _rx) = mpsc::channel(4);
                tokio::spawn(serve(l, proc_root.clone(), node, root.clone(), tx));
                let s2 = sock.clone();
                tokio::task::spawn_blocking(move || wait_ready(&s2, uid, Duration::from_secs(5))).await.unwrap()
            });
            let _ = std::fs::remove_dir_all(&proc_root);
            let e = format!("{:#}", res.unwrap_err());
            assert!(e.contains(want) && e.contains(uid), "{place}: {e}");
        }
    }
}
