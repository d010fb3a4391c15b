//! The errors callers branch on: a map refusing an entry because it is
//! full, and pinned maps of another layout. Everything else stays an
//! `anyhow::Error` with context.
//!
//! Each type has a `reason()`, the label of the `errors_total` metric;
//! [`reason`] finds it anywhere in an `anyhow::Error`'s chain, so a caller
//! holding an `anyhow::Error` writes
//! `metrics.error(redirector::error::reason(&e).unwrap_or("apply"))`.
use std::path::PathBuf;

use redirector_common::map_names;

/// A map refused an entry because it is full (nothing was evicted).
#[derive(Debug, thiserror::Error)]
#[error("map {map} is full (capacity {capacity}); {still_needed} more entries did not fit, nothing was evicted")]
pub struct MapFull {
    pub map: String,
    pub capacity: u32,
    pub still_needed: usize,
}

impl MapFull {
    /// Whether `e` is a policy map (workloads, ports, CIDRs) refusing a
    /// change: only another input change can make room there, so retrying
    /// the same input would only rewrite and roll back the same entries.
    pub fn is_policy_map_full(e: &anyhow::Error) -> bool {
        e.chain().any(|c| c.downcast_ref::<MapFull>().is_some_and(MapFull::is_policy_map))
    }

    /// Whether the full map is a policy map (anything but `LISTENERS`,
    /// which the data path fills and empties by itself).
    pub fn is_policy_map(&self) -> bool {
        self.map != map_names::LISTENERS
    }

    /// The metric label: the same as for the full maps the data path
    /// reports through its counters.
    pub fn reason(&self) -> &'static str {
        "map_full"
    }
}

/// Pinned maps this agent must not adopt: another agent's map layout.
/// The remedy is the same for all: `redirector cleanup` with the agent
/// that created them.
#[derive(Debug, thiserror::Error)]
pub enum PinnedLayout {
    /// The maps opened for reading (`inspect`, `wait-ready`) or stamped
    /// by this agent carry another layout version.
    #[error(
        "pinned maps have layout version {found} but this agent uses version {expected}; \
         run `redirector cleanup` with the old agent's version (or remove the pin directory) first"
    )]
    Version { found: u32, expected: u32 },
    /// Found by `Dataplane::load` before anything is changed: a newer
    /// agent's layout (an older one is migrated).
    #[error(
        "pinned maps in {} have layout version {found}, newer than this agent's {expected}: a newer agent \
         programmed this node and this agent cannot migrate back, so it changed nothing (redirection stays as \
         the newer agent left it); run the newer agent, or `redirector cleanup` with it first",
        .pin_dir.display()
    )]
    Newer { pin_dir: PathBuf, found: u32, expected: u32 },
    /// A pinned map's capacity differs from this build's (aya would adopt
    /// it whatever its size).
    #[error(
        "pinned map {} has capacity {pinned} but this agent's {map} has {expected} (another map layout); \
         run `redirector cleanup` with the agent that created it (or remove the pin directory) first",
        .path.display()
    )]
    Capacity { path: PathBuf, map: &'static str, pinned: u32, expected: u32 },
}

impl PinnedLayout {
    /// The metric label (one for every variant: one remedy).
    pub fn reason(&self) -> &'static str {
        "pinned_layout"
    }
}

/// The metric label of the first typed error in `e`'s chain (outermost
/// first), None when there is none: the caller keeps its own label then.
pub fn reason(e: &anyhow::Error) -> Option<&'static str> {
    e.chain().find_map(|c| {
        c.downcast_ref::<MapFull>()
            .map(MapFull::reason)
            .or_else(|| c.downcast_ref::<PinnedLayout>().map(PinnedLayout::reason))
    })
}

#[cfg(test)]
mod tests {
    use anyhow::Context as _;

    use super::*;

    fn full(map: &str) -> MapFull {
        MapFull { map: map.to_owned(), capacity: 262144, still_needed: 3 }
    }

    #[test]
    fn map_full_message_names_the_map_the_capacity_and_what_did_not_fit() {
        assert_eq!(
            full(map_names::PORTS).to_string(),
            "map RDR_PORTS is full (capacity 262144); 3 more entries did not fit, nothing was evicted"
        );
    }

    #[test]
    fn layout_version_message_is_unchanged() {
        assert_eq!(
            PinnedLayout::Version { found: 2, expected: 3 }.to_string(),
            "pinned maps have layout version 2 but this agent uses version 3; run `redirector cleanup` with \
             the old agent's version (or remove the pin directory) first"
        );
    }

    #[test]
    fn newer_layout_message_says_nothing_changed() {
        let e = PinnedLayout::Newer { pin_dir: "/sys/fs/bpf/redirector".into(), found: 6, expected: 5 };
        assert_eq!(
            e.to_string(),
            "pinned maps in /sys/fs/bpf/redirector have layout version 6, newer than this agent's 5: a newer agent \
             programmed this node and this agent cannot migrate back, so it changed nothing (redirection stays as \
             the newer agent left it); run the newer agent, or `redirector cleanup` with it first"
        );
    }

    #[test]
    fn capacity_message_is_unchanged() {
        let e = PinnedLayout::Capacity {
            path: "/sys/fs/bpf/redirector/RDR_WORKLOADS".into(),
            map: map_names::WORKLOADS,
            pinned: 4096,
            expected: 16384,
        };
        assert_eq!(
            e.to_string(),
            "pinned map /sys/fs/bpf/redirector/RDR_WORKLOADS has capacity 4096 but this agent's RDR_WORKLOADS has \
             16384 (another map layout); run `redirector cleanup` with the agent that created it (or remove the pin \
             directory) first"
        );
    }

    #[test]
    fn the_alternate_form_shows_the_context_then_the_typed_message() {
        let e = anyhow::Error::new(PinnedLayout::Version { found: 2, expected: 3 }).context("opening the maps");
        assert_eq!(format!("{e:#}"), format!("opening the maps: {}", PinnedLayout::Version { found: 2, expected: 3 }));
    }

    #[test]
    fn a_full_policy_map_is_found_under_context() {
        for map in [map_names::WORKLOADS, map_names::PORTS, map_names::CIDRS] {
            let e = anyhow::Error::new(full(map)).context("workload `a`: policy not applied, previous policy kept");
            assert!(MapFull::is_policy_map_full(&e), "{map}");
        }
    }

    #[test]
    fn a_full_listener_map_is_not_a_policy_map_full() {
        let e = anyhow::Error::new(full(map_names::LISTENERS)).context("finding the proxy's inbound listener");
        assert!(!full(map_names::LISTENERS).is_policy_map());
        assert!(!MapFull::is_policy_map_full(&e));
    }

    #[test]
    fn an_untyped_error_is_not_a_full_map() {
        let e = anyhow::anyhow!("map RDR_PORTS is full (capacity 262144)").context("writing");
        assert!(!MapFull::is_policy_map_full(&e));
        assert_eq!(reason(&e), None);
    }

    #[test]
    fn reason_labels_each_type_and_looks_through_context() {
        let full = anyhow::Error::new(full(map_names::LISTENERS)).context("outer");
        assert_eq!(reason(&full), Some("map_full"));
        let layout: anyhow::Result<()> = Err(PinnedLayout::Version { found: 2, expected: 3 }.into());
        assert_eq!(reason(&layout.context("loading").unwrap_err()), Some("pinned_layout"));
        let capacity = PinnedLayout::Capacity { path: PathBuf::new(), map: map_names::CIDRS, pinned: 1, expected: 2 };
        assert_eq!(capacity.reason(), "pinned_layout");
    }
}
