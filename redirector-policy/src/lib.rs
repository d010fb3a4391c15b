//! redirector-policy: what redirector programs, decided without a kernel.
//! No I/O but reading a config file; no aya, tokio or kube.
//!
//! - [`values`]: ports, port ranges, CIDRs, lists;
//! - [`mesh`]: mesh-wide settings ([`MeshSettings`]) and their document;
//! - [`dialect`]: one module per mesh (annotation keys and parser, preset
//!   defaults, sidecar container, injector mark);
//! - [`config`]: the config file (mesh + workloads);
//! - [`idmap`]: user-namespace ID maps (`uid_map`, `gid_map`);
//! - [`located`]: errors that name the key path, the value and the line;
//! - [`compile`]: mesh settings + annotations → [`Policy`];
//! - [`encode`]: [`Policy`] → map entries (the kernel ABI);
//! - [`evaluate`]: the reference evaluator (from the policy and from the
//!   encoded entries);
//! - [`k8s`]: Kubernetes planning (pods, mesh sources, plan);
//! - `oracle` (feature `oracle`): the meshes' iptables rule generators and
//!   a nat-table interpreter, the differential tests' oracle.
pub mod compile;
pub mod config;
pub mod dialect;
pub mod diff;
pub mod encode;
pub mod evaluate;
pub mod idmap;
pub mod k8s;
pub mod located;
pub mod mesh;
#[cfg(any(test, feature = "oracle"))]
pub mod oracle;
pub mod shared;
pub mod values;

pub use compile::{compile, DnsCapture, DnsServers, Lists, Policy};
pub use config::{load_config, parse_config, policies, Config, NetnsRef, WorkloadSpec};
pub use dialect::{
    annotation_key_warnings, istio_annotations, kuma_annotations, linkerd_annotations, osm_annotations,
    parse_annotations, parse_annotations_each, KeyWarning, LoopbackMode, Preset, PresetDefaults, WorkloadAnnotations,
};
pub use diff::{diff, Desired, Ops};
pub use encode::{cidr_entries, cidr_entry, map_entries, map_entries_with, written_ranges, MapEntries};
pub use evaluate::{
    evaluate, evaluate_entries, evaluate_inbound, Bypass, InboundConn, OutboundConn, Protocol, Verdict,
};
pub use idmap::{IdMap, IdMaps};
pub use located::{problems_of, Problem, Problems};
pub use mesh::{
    parse_mesh_document, Acceleration, DnsSettings, MeshSettings, DEFAULT_DNS_PORT, DEFAULT_INBOUND_PORT,
    DEFAULT_OUTBOUND_PORT, DEFAULT_PROXY_UID,
};
pub use shared::SharedLists;
pub use values::{canonical_net, parse_cidr, parse_port, Inclusion};
