//! Diff: which workloads a pass must write, leave alone or remove so that
//! the maps hold exactly the desired state. Pure mark and sweep; the data
//! plane applies the result.
use std::{
    borrow::Borrow,
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
pub fn diff<P: Borrow<Policy>>(
    pinned: &BTreeSet<u64>,
    programmed: &HashMap<u64, P>,
    inbound_linked: &BTreeSet<u64>,
    desired: &[Desired],
    keep: &BTreeSet<u64>,
) -> Ops {
    let mut ops = Ops::default();
    for (i, d) in desired.iter().enumerate() {
        let in_force = programmed.get(&d.cookie).map(Borrow::borrow) == Some(&d.policy)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{compile, MeshSettings, WorkloadAnnotations};

    /// A compiled policy; `inbound` says whether it needs an sk_lookup
    /// link, `port` tells two policies apart.
    fn policy(inbound: bool, port: u16) -> Policy {
        let p = compile(&MeshSettings::default(), &WorkloadAnnotations::default());
        Policy { inbound, outbound_port: port, ..p }
    }

    fn desired(name: &str, cookie: u64, policy: Policy) -> Desired {
        Desired { name: name.into(), cookie, netns: PathBuf::from(format!("/proc/self/fd/{cookie}")), policy }
    }

    fn set(cookies: &[u64]) -> BTreeSet<u64> {
        cookies.iter().copied().collect()
    }

    #[test]
    fn a_workload_pinned_as_last_programmed_is_unchanged() {
        let want = [desired("a", 1, policy(false, 15001))];
        let programmed = HashMap::from([(1, policy(false, 15001))]);
        let ops = diff(&set(&[1]), &programmed, &set(&[]), &want, &set(&[]));
        assert_eq!(ops, Ops { program: vec![], unchanged: vec![0], remove: vec![] });
    }

    #[test]
    fn a_changed_policy_is_programmed() {
        let want = [desired("a", 1, policy(false, 15002))];
        let programmed = HashMap::from([(1, policy(false, 15001))]);
        let ops = diff(&set(&[1]), &programmed, &set(&[]), &want, &set(&[]));
        assert_eq!(ops, Ops { program: vec![0], unchanged: vec![], remove: vec![] });
    }

    #[test]
    fn a_new_workload_is_programmed() {
        let want = [desired("a", 1, policy(false, 15001)), desired("b", 2, policy(false, 15001))];
        let programmed = HashMap::from([(1, policy(false, 15001))]);
        let ops = diff(&set(&[1]), &programmed, &set(&[]), &want, &set(&[]));
        assert_eq!(ops, Ops { program: vec![1], unchanged: vec![0], remove: vec![] });
    }

    #[test]
    fn a_workload_missing_from_the_pinned_map_is_programmed_again() {
        // Programmed by this agent, but its entry is gone from the map.
        let want = [desired("a", 1, policy(false, 15001))];
        let programmed = HashMap::from([(1, policy(false, 15001))]);
        let ops = diff(&set(&[]), &programmed, &set(&[]), &want, &set(&[]));
        assert_eq!(ops, Ops { program: vec![0], unchanged: vec![], remove: vec![] });
    }

    #[test]
    fn a_pinned_workload_no_longer_desired_is_removed() {
        let want = [desired("a", 1, policy(false, 15001))];
        let programmed = HashMap::from([(1, policy(false, 15001)), (2, policy(false, 15001))]);
        let ops = diff(&set(&[1, 2, 3]), &programmed, &set(&[]), &want, &set(&[]));
        // 3 was pinned by someone else (an earlier agent): removed too.
        assert_eq!(ops, Ops { program: vec![], unchanged: vec![0], remove: vec![2, 3] });
    }

    #[test]
    fn a_kept_workload_is_neither_removed_nor_programmed() {
        let want = [desired("a", 1, policy(false, 15001))];
        let programmed = HashMap::from([(1, policy(false, 15001)), (2, policy(false, 15001))]);
        let ops = diff(&set(&[1, 2]), &programmed, &set(&[]), &want, &set(&[2]));
        assert_eq!(ops, Ops { program: vec![], unchanged: vec![0], remove: vec![] });
    }

    #[test]
    fn after_a_restart_every_desired_workload_is_rewritten_once() {
        // Nothing programmed by this process yet, everything still pinned
        // by the previous agent, the inbound link included.
        let want = [desired("a", 1, policy(false, 15001)), desired("b", 2, policy(true, 15001))];
        let ops = diff(&set(&[1, 2, 3]), &HashMap::<u64, Policy>::new(), &set(&[2]), &want, &set(&[]));
        assert_eq!(ops, Ops { program: vec![0, 1], unchanged: vec![], remove: vec![3] });
        // The next pass, having written them, leaves them alone.
        let programmed = HashMap::from([(1, policy(false, 15001)), (2, policy(true, 15001))]);
        let ops = diff(&set(&[1, 2]), &programmed, &set(&[2]), &want, &set(&[]));
        assert_eq!(ops, Ops { program: vec![], unchanged: vec![0, 1], remove: vec![] });
    }

    #[test]
    fn an_inbound_workload_without_its_sk_lookup_link_is_programmed() {
        let want = [desired("a", 1, policy(true, 15001))];
        let programmed = HashMap::from([(1, policy(true, 15001))]);
        let ops = diff(&set(&[1]), &programmed, &set(&[]), &want, &set(&[]));
        assert_eq!(ops, Ops { program: vec![0], unchanged: vec![], remove: vec![] });
        let ops = diff(&set(&[1]), &programmed, &set(&[1]), &want, &set(&[]));
        assert_eq!(ops, Ops { program: vec![], unchanged: vec![0], remove: vec![] });
    }

    #[test]
    fn an_outbound_only_workload_needs_no_sk_lookup_link() {
        let want = [desired("a", 1, policy(false, 15001))];
        let programmed = HashMap::from([(1, policy(false, 15001))]);
        let ops = diff(&set(&[1]), &programmed, &set(&[]), &want, &set(&[]));
        assert_eq!(ops.unchanged, vec![0]);
    }

    #[test]
    fn nothing_desired_and_nothing_kept_removes_everything_pinned() {
        let ops = diff(&set(&[4, 5]), &HashMap::<u64, Policy>::new(), &set(&[4]), &[], &set(&[]));
        assert_eq!(ops, Ops { program: vec![], unchanged: vec![], remove: vec![4, 5] });
    }
}
