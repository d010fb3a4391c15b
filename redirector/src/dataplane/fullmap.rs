//! Full maps the data path ran into: the eBPF programs cannot log, so
//! the agent reads their failure counters.
use redirector_common::{counter, map_names, MAX_ACCEL_SOCKETS, MAX_LISTENERS, MAX_TRACKED_CONNECTIONS};

use super::Maps;

/// Data-path insertions that failed because a map was full, found by the
/// eBPF counters: the programs cannot log, so the agent checks these on
/// every tick and reports each increase (error log and metric).
#[derive(Debug, Default)]
pub struct FullMapWatch {
    seen: Option<[u64; 4]>,
}

impl FullMapWatch {
    const WATCHED: [(u32, &'static str, u32, &'static str); 4] = [
        (
            counter::TUPLE_INSERT_FAILED,
            map_names::ORIG_BY_TUPLE,
            MAX_TRACKED_CONNECTIONS,
            "redirected connections could not record their original destination (their proxy is told its own address)",
        ),
        (
            counter::LISTENER_INSERT_FAILED,
            map_names::LISTENERS,
            MAX_LISTENERS,
            "proxy inbound listeners could not be registered (inbound connections to them are dropped, not let by)",
        ),
        (
            counter::SK_STORAGE_FAILED,
            map_names::SOCK_ORIG,
            0,
            "accepted proxy sockets could not store their original destination",
        ),
        (
            counter::ACCEL_SOCKET_ADD_FAILED,
            map_names::ACCEL_SOCKETS,
            MAX_ACCEL_SOCKETS,
            "sockets of accelerated connections stayed on TCP (they work, without acceleration)",
        ),
    ];

    /// One message per counter that grew since the last call (the first
    /// call reports what earlier agents left counted, once).
    pub fn check(&mut self, maps: &Maps) -> Vec<String> {
        let mut now = [0u64; 4];
        for (i, (index, ..)) in Self::WATCHED.iter().enumerate() {
            now[i] = maps.counter(*index).unwrap_or(0);
        }
        let before = self.seen.unwrap_or_default();
        self.seen = Some(now);
        Self::WATCHED
            .iter()
            .enumerate()
            .filter(|(i, _)| now[*i] > before[*i])
            .map(|(i, (_, map, capacity, what))| {
                let size = if *capacity > 0 {
                    format!("map {map} is full (capacity {capacity})")
                } else {
                    format!("map {map} could not grow")
                };
                format!("{size}: {} {what}; nothing was evicted", now[i] - before[i])
            })
            .collect()
    }
}
