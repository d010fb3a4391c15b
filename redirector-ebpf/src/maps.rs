//! The maps, as BTF map definitions so `bpftool map dump` prints typed keys
//! and values. The agent pins them by name under its pin directory.
use aya_ebpf::{
    bindings::{bpf_sock, BPF_F_NO_PREALLOC},
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray, SkStorage, SockHash},
    helpers::generated::bpf_sk_storage_get,
    macros::btf_map,
};
use redirector_common::{
    counter, CidrData, ListenerKey, Meta, OrigDst, PortKey, SockKey, TupleKey, WorkloadName, WorkloadPolicy,
    MAX_ACCEL_SOCKETS, MAX_CIDR_RULES, MAX_LISTENERS, MAX_PORT_RULES, MAX_TRACKED_CONNECTIONS, MAX_WORKLOADS,
};

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

/// Layout version and id allocator state; written by the agent only.
#[btf_map]
pub static RDR_META: Array<Meta, 1> = Array::new();

/// Per-workload policy, keyed by network namespace cookie.
#[btf_map]
pub static RDR_WORKLOADS: HashMap<u64, WorkloadPolicy, { MAX_WORKLOADS as usize }> = HashMap::new();

/// Workload names for `inspect`, keyed by netns cookie; written by the
/// agent, read by no program.
#[btf_map]
pub static RDR_NAMES: HashMap<u64, WorkloadName, { MAX_WORKLOADS as usize }, NO_PREALLOC> = HashMap::new();

/// Excluded ports per policy id and direction.
#[btf_map]
pub static RDR_PORTS: HashMap<PortKey, u8, { MAX_PORT_RULES as usize }, NO_PREALLOC> = HashMap::new();

/// CIDR rules per policy id and kind, both families (IPv4 stored mapped).
#[btf_map]
pub static RDR_CIDRS: LpmTrie<CidrData, u8, { MAX_CIDR_RULES as usize }> = LpmTrie::new();

/// The proxy's inbound listening sockets, per workload and family.
#[btf_map]
pub static RDR_LISTENERS: SockHash<ListenerKey, { MAX_LISTENERS as usize }> = SockHash::new();

/// Both ends of accelerated app ↔ proxy connections, each under its own
/// (netns, local, remote) tuple; the `sk_msg` program is attached to this
/// map. The kernel drops a socket from it when the socket closes.
#[btf_map]
pub static RDR_ACCEL_SOCKS: SockHash<SockKey, { MAX_ACCEL_SOCKETS as usize }> = SockHash::new();

/// Original destination of each established redirected connection, keyed
/// by its 4-tuple and netns; removed when the application's socket closes.
#[btf_map]
pub static RDR_ORIG_TUPLE: HashMap<TupleKey, OrigDst, { MAX_TRACKED_CONNECTIONS as usize }, NO_PREALLOC> =
    HashMap::new();

/// Original destination attached to the socket itself; freed with it.
#[btf_map]
pub static RDR_SOCK_ORIG: SkStorage<OrigDst> = SkStorage::new();

/// Per-CPU event counters (see `redirector_common::counter`).
#[btf_map]
pub static RDR_COUNTERS: PerCpuArray<u64, { counter::COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn count(index: u32) {
    if let Some(ptr) = RDR_COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *ptr += 1 };
    }
}

/// `bpf_sk_storage_get` on the socket-storage map for any socket pointer
/// (aya's wrapper only takes a sock_addr context).
#[inline(always)]
pub unsafe fn sock_orig(sk: *mut bpf_sock, init: Option<&mut OrigDst>) -> *mut OrigDst {
    let map = core::ptr::addr_of!(RDR_SOCK_ORIG).cast_mut().cast();
    let (value, flags) = match init {
        Some(v) => (core::ptr::from_mut(v).cast(), 1u64 /* BPF_SK_STORAGE_GET_F_CREATE */),
        None => (core::ptr::null_mut(), 0),
    };
    unsafe { bpf_sk_storage_get(map, sk.cast(), value, flags) }.cast()
}

pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;

/// Address words as the kernel hands them (network order in each `u32`)
/// to bytes.
#[inline(always)]
pub fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

#[inline(always)]
pub fn bytes_to_words(b: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}
