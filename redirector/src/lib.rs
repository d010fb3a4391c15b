//! redirector: eBPF transparent redirection for service-mesh sidecars.
//!
//! What to program is decided in `redirector-policy` (parsing, dialects,
//! compile, map encoding, Kubernetes planning); this crate does it:
//!
//! - [`dataplane`]: the only code that loads programs and writes maps;
//! - [`error`]: the errors callers branch on (full maps, pinned layouts);
//! - [`agent`]: the standalone and the Kubernetes agent over one reconcile
//!   core; [`inspect`]: reading the state back;
//! - [`sys`]: `bpf(2)`, namespaces, mounts, listeners, kernel features;
//! - [`webhook`]: `redirector webhook`, the admission webhook's HTTPS
//!   server (its answers are decided in `redirector-policy`).
pub mod agent;
pub mod check_pod;
pub mod dataplane;
pub mod dropin;
pub mod error;
pub mod inspect;
pub mod logging;
pub mod metrics;
pub mod sys;
pub mod webhook;
