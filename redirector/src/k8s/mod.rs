//! Kubernetes mode (`redirector run --kube`).
//!
//! - [`pods`], [`mesh`]: parsing (Pod objects, the ConfigMap and OSM's
//!   MeshConfig into typed values);
//! - [`plan`]: pure policy (pods + mesh + namespaces + pinned state → what
//!   to program, keep and report);
//! - [`discover`], [`registry`]: finding each pod's network namespace
//!   (from /proc, and from the init container's registration);
//! - [`agent`]: the watch loop, which applies through the same
//!   [`crate::dataplane`] as the standalone agent.
pub mod agent;
pub mod discover;
pub mod mesh;
pub mod plan;
pub mod pods;
pub mod registry;
