//! Diff: which workloads a pass must write, leave alone or remove so that
//! the maps hold exactly the desired state. Pure mark and sweep; the data
//! plane applies the result.
use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
};

use crate::compile::Policy;

/// One workload the agent wants programmed.
#[derive(Clone, Debug)]
pub struct Desired {
    pub name: String,
    pub cookie: u64,
    /// The workload's network namespace (for its sk_lookup link and for
    /// finding a proxy that was listening before the agent started).
    pub netns: PathBuf,
    pub policy: Policy,
}

/// The map operations of one pass, as indexes into `desired` and cookies.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Ops {
    pub program: Vec<usize>,
    pub unchanged: Vec<usize>,
    pub remove: Vec<u64>,
}

/// Pure mark and sweep: what to write so the maps hold exactly `desired`
/// (plus `keep`), given the cookies `pinned` in the workloads map, what
/// this agent last wrote (`programmed`; empty after a restart, so every
/// workload is rewritten once) and the namespaces with an sk_lookup link.
pub fn diff(
    pinned: &BTreeSet<u64>,
    programmed: &HashMap<u64, Policy>,
    inbound_linked: &BTreeSet<u64>,
    desired: &[Desired],
    keep: &BTreeSet<u64>,
) -> Ops {
    let mut ops = Ops::default();
    for (i, d) in desired.iter().enumerate() {
        let in_force = programmed.get(&d.cookie) == Some(&d.policy)
            && pinned.contains(&d.cookie)
            && (!d.policy.inbound || inbound_linked.contains(&d.cookie));
        if in_force {
            ops.unchanged.push(i);
        } else {
            ops.program.push(i);
        }
    }
    let wanted: BTreeSet<u64> = desired.iter().map(|d| d.cookie).collect();
    ops.remove = pinned.iter().copied().filter(|c| !wanted.contains(c) && !keep.contains(c)).collect();
    ops
}
