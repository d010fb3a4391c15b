//! The agents: two sources of desired state over one data plane.
//!
//! - [`standalone`]: `redirector run --config FILE` (the config file,
//!   SIGHUP, polling) and `redirector check`;
//! - [`k8s`]: `redirector run --kube` (watches, namespace discovery, the
//!   init containers' registry).
pub mod k8s;
pub mod standalone;
