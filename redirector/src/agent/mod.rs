//! The agents: two sources of desired state over one data plane.
//!
//! - [`reconcile`]: the pass both call (the workloads wanted, the cookies
//!   to keep, what earlier passes programmed → the maps) and its log line;
//! - [`runtime`]: what both do around it (signals, status endpoints,
//!   full-map reports, the retry policy, the exit notice);
//! - [`standalone`]: `redirector run --config FILE` (the config file,
//!   SIGHUP, polling) and `redirector check`;
//! - [`k8s`]: `redirector run --kube` (watches, namespace discovery, the
//!   init containers' registry).
pub mod k8s;
pub mod reconcile;
pub mod runtime;
pub mod standalone;
