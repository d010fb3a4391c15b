//! Kubernetes planning, pure: the parts of a Pod the agent needs and which
//! pods are meshed ([`pods`], [`injector`]: the policy their injector
//! wrote into the init container), the mesh settings from the ConfigMap and
//! OSM's MeshConfig ([`mesh`]), and from pods + mesh + namespaces + pinned
//! state to what to program, keep and report ([`plan`]); with feature
//! `k8s`, `admission`: `redirector webhook`'s answer to an AdmissionReview.
#[cfg(feature = "k8s")]
pub mod admission;
pub mod injector;
pub mod mesh;
pub mod plan;
pub mod pods;
