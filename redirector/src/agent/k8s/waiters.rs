//! The init containers waiting at the gate (`redirector wait-ready
//! --agent-socket`): each is answered when its pod's state changes, until
//! a final `ready` or `error`.
use std::collections::BTreeSet;

use tokio::sync::mpsc;

use redirector_policy::k8s::injector::{decide, Decision};

use super::{registry::Reply, Agent};

/// A registered init container waiting for its pod to be programmed.
struct Waiter {
    uid: String,
    reply: mpsc::UnboundedSender<Reply>,
    last: Option<Reply>,
}

/// The registered init containers still waiting.
#[derive(Default)]
pub(super) struct Waiters(Vec<Waiter>);

impl Waiters {
    pub(super) fn add(&mut self, uid: String, reply: mpsc::UnboundedSender<Reply>) {
        self.0.push(Waiter { uid, reply, last: None });
    }

    /// The pod UIDs waited for.
    pub(super) fn uids(&self) -> BTreeSet<&String> {
        self.0.iter().map(|w| &w.uid).collect()
    }

    /// Sends each waiter `reply_for(its pod UID)` if that differs from the
    /// last reply it got; drops those answered finally and those whose
    /// init container gave up.
    fn answer(&mut self, reply_for: impl Fn(&str) -> Reply) {
        let mut keep = Vec::new();
        for mut w in std::mem::take(&mut self.0) {
            let reply = reply_for(&w.uid);
            if w.last.as_ref() != Some(&reply) {
                if w.reply.send(reply.clone()).is_err() {
                    continue; // the init container gave up
                }
                w.last = Some(reply.clone());
            }
            if !reply.is_final() {
                keep.push(w);
            }
        }
        self.0 = keep;
    }
}

impl Agent {
    /// Answers every waiter from the last pass's results (or what is
    /// still missing).
    pub(super) fn answer_waiters(&mut self) {
        let node = self.opts.node_name.clone();
        let rules = self.mesh.as_ref().map(|_| self.rules());
        let mut waiters = std::mem::take(&mut self.waiters);
        waiters.answer(|uid| match (self.pods.items.get(uid), &rules) {
            _ if !self.synced() => Reply::waiting(self.waiting_for()),
            (_, None) => {
                Reply::waiting(format!("mesh settings invalid: {}", self.mesh_error.clone().unwrap_or_default()))
            }
            (None, _) => Reply::waiting(format!("pod UID {uid} not seen on node {node} yet")),
            (Some(p), Some(rules)) if !decide(p, rules).programmed() => Reply::error(match decide(p, rules) {
                Decision::Refused { container, tool, problem } => format!(
                    "pod {}: init container {container} ({tool}): {problem}; redirector does not program it",
                    p.key()
                ),
                Decision::NotMeshed { why } => format!("pod {} is not a sidecar workload: {why}", p.key()),
                _ => unreachable!("programmed"),
            }),
            (Some(p), _) if p.host_network => {
                Reply::error(format!("pod {} uses the node's network namespace; it cannot be redirected", p.key()))
            }
            (Some(p), _) => match (self.ready_pods.get(&p.key()), self.failed_pods.get(&p.key())) {
                (Some(_), _) => {
                    let cookie = self.netns.get(uid).map(|h| h.cookie).unwrap_or_default();
                    Reply::ready(format!("pod {} is programmed (netns cookie {cookie})", p.key()))
                }
                (None, Some(e)) => Reply::waiting(format!("pod {}: {e}", p.key())),
                (None, None) => Reply::waiting(format!("pod {}: not programmed yet", p.key())),
            },
        });
        self.waiters = waiters;
    }
}
