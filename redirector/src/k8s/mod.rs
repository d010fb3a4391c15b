//! Kubernetes mode (`redirector run --kube`).
//!
//! - [`redirector_policy::k8s`]: parsing (Pod objects, the ConfigMap and
//!   OSM's MeshConfig into typed values) and the pure plan (pods + mesh +
//!   namespaces + pinned state → what to program, keep and report);
//! - [`discover`], [`registry`]: finding each pod's network namespace
//!   (from /proc, and from the init container's registration);
//! - [`agent`]: the watch loop, which applies through the same
//!   [`crate::dataplane`] as the standalone agent.
pub mod agent;
pub mod discover;
pub mod registry;
