//! redirector: eBPF transparent redirection for service-mesh sidecars.
//!
//! What to program is decided in `redirector-policy` (parsing, dialects,
//! compile, map encoding, Kubernetes planning); this crate does it:
//!
//! - [`dataplane`]: the only code that loads programs and writes maps;
//! - [`agent`]: the reconcile loop; [`inspect`]: reading the state back;
//! - [`k8s`]: the Kubernetes agent (watches, discovery, registry);
//! - [`probe`]: what the running kernel supports;
//! - [`bpf_sys`], [`netns`], [`sysfs`], [`listeners`]: system calls and
//!   kernel interfaces.
pub mod agent;
pub mod bpf_sys;
pub mod dataplane;
pub mod inspect;
pub mod k8s;
pub mod listeners;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod probe;
pub mod sysfs;
