//! The kernel and the system, below the data plane: raw `bpf(2)` calls
//! ([`bpf`]), cgroup-v2 directories and who is inside them ([`cgroup`]),
//! network namespaces and their cookies ([`netns`]), those an agent holds
//! between passes ([`nscache`]), the cgroup2 and bpffs
//! mounts ([`mounts`]), the kubelet's pods cgroup ([`kubepods`]), a
//! proxy's pre-existing listeners read from a namespace's socket tables
//! ([`listeners`]), a workload's nameservers ([`resolv`]), user namespaces
//! and their ID maps ([`userns`]), and
//! what the running kernel supports ([`features`], `redirector probe`).
pub mod bpf;
pub mod cgroup;
pub mod features;
pub mod kubepods;
pub mod listeners;
pub mod mounts;
pub mod netns;
pub mod nscache;
pub mod resolv;
pub mod userns;
