//! Shared lists: which list id (`WorkloadPolicy::policy_id`) holds which
//! lists, and how many workloads use it. Workloads whose [`Policy::lists`]
//! are equal share one id, so a mesh-wide change writes its new lists once
//! and then only switches each workload's entry; the entries of an id go
//! when its last workload leaves it. Pure bookkeeping: the data plane
//! writes the maps and asks this table which ids it may reuse or retire.
use std::{
    collections::{BTreeSet, HashMap},
    hash::{DefaultHasher, Hash as _, Hasher as _},
};

use crate::compile::Policy;

/// One id in use: a policy with its lists (any user's: only the lists are
/// read) and the number of workloads whose entry names the id.
#[derive(Debug)]
struct Entry {
    id: u32,
    lists_of: Policy,
    users: usize,
}

/// The list ids in force, by content.
#[derive(Debug, Default)]
pub struct SharedLists {
    /// By a hash of the lists; equal hashes are told apart by the lists.
    by_hash: HashMap<u64, Vec<Entry>>,
}

fn hash(p: &Policy) -> u64 {
    let mut h = DefaultHasher::new();
    p.lists().hash(&mut h);
    h.finish()
}

impl SharedLists {
    /// The id under which the lists of `p` are written, if any workload
    /// uses them.
    pub fn find(&self, p: &Policy) -> Option<u32> {
        let lists = p.lists();
        self.by_hash.get(&hash(p))?.iter().find(|e| e.lists_of.lists() == lists).map(|e| e.id)
    }

    /// One more workload names `id`, which holds the lists of `p`.
    pub fn acquire(&mut self, p: &Policy, id: u32) {
        let bucket = self.by_hash.entry(hash(p)).or_default();
        match bucket.iter_mut().find(|e| e.id == id) {
            Some(e) => {
                debug_assert!(e.lists_of.lists() == p.lists(), "id {id} holds other lists");
                e.users += 1;
            }
            None => bucket.push(Entry { id, lists_of: p.clone(), users: 1 }),
        }
    }

    /// A workload no longer names `id` (which holds the lists of `p`).
    /// True when it was the last one: the id's entries may go.
    pub fn release(&mut self, p: &Policy, id: u32) -> bool {
        let h = hash(p);
        let Some(bucket) = self.by_hash.get_mut(&h) else { return false };
        let Some(i) = bucket.iter().position(|e| e.id == id) else { return false };
        bucket[i].users -= 1;
        if bucket[i].users > 0 {
            return false;
        }
        bucket.swap_remove(i);
        if bucket.is_empty() {
            self.by_hash.remove(&h);
        }
        true
    }

    /// Forgets every id not in `live` (ids no pinned workload names any
    /// more: their entries may have been swept, so they must never be
    /// reused).
    pub fn retain_live(&mut self, live: &BTreeSet<u32>) {
        self.by_hash.retain(|_, bucket| {
            bucket.retain(|e| live.contains(&e.id));
            !bucket.is_empty()
        });
    }

    /// Number of distinct ids in use.
    pub fn len(&self) -> usize {
        self.by_hash.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{compile, MeshSettings, WorkloadAnnotations};

    fn policy(port: u16) -> Policy {
        let mut p = compile(&MeshSettings::default(), &WorkloadAnnotations::default());
        p.outbound_port_exclusion.insert(port);
        p
    }

    #[test]
    fn equal_lists_share_one_id_whatever_else_differs() {
        let mut s = SharedLists::default();
        let a = policy(6379);
        assert_eq!(s.find(&a), None);
        s.acquire(&a, 5);
        // Another pod: other addresses, other proxy cgroup, same lists.
        let b = a.clone().with_local_addresses(["192.0.2.7".parse().unwrap()]).with_proxy_cgroup(99);
        assert_eq!(s.find(&b), Some(5));
        s.acquire(&b, 5);
        assert_eq!(s.find(&policy(6380)), None);
        assert_eq!(s.len(), 1);
        // The id goes with its last user, not before.
        assert!(!s.release(&a, 5));
        assert_eq!(s.find(&a), Some(5));
        assert!(s.release(&b, 5));
        assert_eq!(s.find(&a), None);
        assert!(s.is_empty());
    }

    #[test]
    fn inclusion_none_and_empty_are_other_lists() {
        let a = policy(1);
        let b = Policy { outbound_port_inclusion: Some(BTreeSet::new()), ..a.clone() };
        let mut s = SharedLists::default();
        s.acquire(&a, 1);
        assert_eq!(s.find(&b), None);
    }

    #[test]
    fn a_mesh_wide_change_moves_every_user_to_one_new_id() {
        let mut s = SharedLists::default();
        let (old, new) = (policy(1), policy(2));
        for _ in 0..3 {
            s.acquire(&old, 10);
        }
        let mut retired = Vec::new();
        for n in 0..3 {
            if s.find(&new).is_none() {
                assert_eq!(n, 0, "the new lists are written once");
            }
            s.acquire(&new, 11);
            if s.release(&old, 10) {
                retired.push(10);
            }
        }
        assert_eq!(retired, [10], "the old id goes once, after its last user");
        assert_eq!(s.find(&new), Some(11));
    }

    #[test]
    fn ids_no_workload_names_are_forgotten() {
        let mut s = SharedLists::default();
        s.acquire(&policy(1), 1);
        s.acquire(&policy(2), 2);
        s.retain_live(&BTreeSet::from([2]));
        assert_eq!((s.find(&policy(1)), s.find(&policy(2))), (None, Some(2)));
        // Releasing an id already forgotten changes nothing.
        assert!(!s.release(&policy(1), 1));
    }
}
