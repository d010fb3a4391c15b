//! The decision chain's lookups (`redirector_common::decide`) over the
//! kernel maps and the connecting task.
use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_uid_gid},
    maps::lpm_trie::Key,
};
use redirector_common::{decide::Lookups, CidrData, PortKey, WorkloadPolicy, CIDR_KEY_PREFIX_BITS};

use crate::maps::{RDR_CIDRS, RDR_PORTS};

/// `RDR_PORTS`, `RDR_CIDRS` and the current task's identity.
pub struct Maps;

impl Lookups for Maps {
    #[inline(always)]
    fn port_rule(&self, policy_id: u32, kind: u8, port: u16) -> bool {
        let key = PortKey { policy_id, port, kind, _pad: 0 };
        unsafe { RDR_PORTS.get(&key) }.is_some()
    }

    #[inline(always)]
    fn cidr_hit(&self, policy_id: u32, kind: u8, addr: &[u8; 16]) -> bool {
        let key = Key::new(
            CIDR_KEY_PREFIX_BITS + 128,
            CidrData { policy_id_be: policy_id.to_be_bytes(), kind, addr: *addr, _pad: [0; 3] },
        );
        RDR_CIDRS.get(&key).is_some()
    }

    #[inline(always)]
    fn is_proxy(&self, policy: &WorkloadPolicy) -> bool {
        redirector_common::decide::is_proxy_with(
            policy,
            // SAFETY: no arguments; the task's cgroup-v2 id.
            || unsafe { bpf_get_current_cgroup_id() },
            bpf_get_current_uid_gid,
        )
    }
}
