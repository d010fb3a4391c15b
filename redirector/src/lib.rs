//! redirector: eBPF transparent redirection for service-mesh sidecars.
//!
//! - [`config`]: parsing (config file, annotations) into typed values;
//! - [`policy`]: pure desired state and a reference evaluator;
//! - [`iptables`]: the osm-init rule set, as the oracle;
//! - [`dataplane`]: the only code that loads programs and writes maps;
//! - [`agent`]: the reconcile loop; [`inspect`]: reading the state back;
//! - [`probe`]: what the running kernel supports.
pub mod agent;
pub mod bpf_sys;
pub mod dataplane;
pub mod fakeapi;
pub mod inspect;
pub mod k8s;
pub mod listeners;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod probe;
pub mod sysfs;
pub mod testkit;
