//! User-namespace ID maps (`/proc/PID/uid_map`, `gid_map`), pure.
//!
//! The data path identifies the proxy by `bpf_get_current_uid_gid()`,
//! which returns the caller's IDs as the initial user namespace sees them
//! (kernel `bpf_get_current_uid_gid`: `from_kuid(&init_user_ns, …)`). A
//! proxy running as UID 1337 inside a user namespace (a pod with
//! `hostUsers: false`: the kubelet maps 65,536 IDs starting at a multiple
//! of 65,536) has another UID there, so the proxy's UID and GID are
//! translated through the workload's maps before they are written.
//!
//! Format (user_namespaces(7)): one range per line, `inside outside count`
//! separated by white space; read by a process of the initial namespace,
//! `outside` is an ID of that namespace. The kernel writes each field as
//! `%10u` and accepts at most 340 lines.
use std::fmt;

use anyhow::{anyhow, bail, Result};

/// One line of an ID map: `count` IDs from `inside` map to `outside`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IdRange {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

/// A `uid_map` or `gid_map`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct IdMap {
    pub ranges: Vec<IdRange>,
}

/// The ID maps of one user namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdMaps {
    pub uid: IdMap,
    pub gid: IdMap,
}

/// The most lines the kernel accepts in an ID map.
pub const MAX_RANGES: usize = 340;

impl IdMap {
    /// Parses a map as the kernel prints it. Every error names the line
    /// and the reason; an empty map (a namespace whose map was not written
    /// yet) maps no ID.
    pub fn parse(text: &str) -> Result<Self> {
        let mut ranges = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = || format!("line {} {:?}", n + 1, line.trim());
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [inside, outside, count] = fields[..] else {
                bail!("{}: not `inside outside count` ({} fields)", at(), fields.len());
            };
            let num = |what: &str, v: &str| {
                v.parse::<u32>().map_err(|_| anyhow!("{}: {what} {v:?} is not an ID (0-4294967295)", at()))
            };
            let r = IdRange {
                inside: num("inside", inside)?,
                outside: num("outside", outside)?,
                count: num("count", count)?,
            };
            if r.count == 0 {
                bail!("{}: count 0", at());
            }
            if u64::from(r.inside) + u64::from(r.count) > 1 << 32 || u64::from(r.outside) + u64::from(r.count) > 1 << 32
            {
                bail!("{}: the range runs past ID 4294967295", at());
            }
            if let Some(o) = ranges.iter().find(|o: &&IdRange| overlap(o.inside, o.count, r.inside, r.count)) {
                bail!("{}: its inside IDs overlap those of {} {} {}", at(), o.inside, o.outside, o.count);
            }
            ranges.push(r);
        }
        if ranges.len() > MAX_RANGES {
            bail!("{} ranges: the kernel accepts at most {MAX_RANGES}", ranges.len());
        }
        Ok(Self { ranges })
    }

    /// The map of the initial user namespace (`0 0 4294967295`): every ID
    /// is itself.
    pub fn is_identity(&self) -> bool {
        self.ranges == [IdRange { inside: 0, outside: 0, count: u32::MAX }]
    }

    /// The outside ID of `inside`, if it is mapped.
    pub fn to_outside(&self, inside: u32) -> Option<u32> {
        self.ranges
            .iter()
            .find(|r| inside >= r.inside && inside - r.inside < r.count)
            .map(|r| r.outside + (inside - r.inside))
    }
}

fn overlap(a: u32, a_len: u32, b: u32, b_len: u32) -> bool {
    let (a, a_end, b, b_end) =
        (u64::from(a), u64::from(a) + u64::from(a_len), u64::from(b), u64::from(b) + u64::from(b_len));
    a < b_end && b < a_end
}

impl fmt::Display for IdMap {
    /// One line per range, `;`-separated: `0 65536 65536`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ranges.is_empty() {
            return f.write_str("(empty)");
        }
        let lines: Vec<String> =
            self.ranges.iter().map(|r| format!("{} {} {}", r.inside, r.outside, r.count)).collect();
        f.write_str(&lines.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_format_and_translation() {
        // As the kernel prints a hostUsers: false pod's map (%10u fields).
        let m = IdMap::parse("         0     524288      65536\n").unwrap();
        assert_eq!(m.ranges, [IdRange { inside: 0, outside: 524288, count: 65536 }]);
        assert_eq!(m.to_outside(0), Some(524288));
        assert_eq!(m.to_outside(1337), Some(525625));
        assert_eq!(m.to_outside(65535), Some(589823));
        assert_eq!(m.to_outside(65536), None);
        assert!(!m.is_identity());
        assert_eq!(m.to_string(), "0 524288 65536");
        let init = IdMap::parse("         0          0 4294967295\n").unwrap();
        assert!(init.is_identity());
        assert_eq!(init.to_outside(1337), Some(1337));
        assert_eq!(init.to_outside(u32::MAX), None, "-1 is never mapped");
        // Several ranges; an empty map maps nothing.
        let m = IdMap::parse("0 1000 1\n1 100000 65536\n").unwrap();
        assert_eq!((m.to_outside(0), m.to_outside(1), m.to_outside(1337)), (Some(1000), Some(100000), Some(101336)));
        let empty = IdMap::parse("").unwrap();
        assert_eq!((empty.to_outside(0), empty.to_string()), (None, "(empty)".to_string()));
    }

    #[test]
    fn bad_maps_name_the_line_and_the_reason() {
        for (text, want) in [
            ("0 0\n", "line 1 \"0 0\": not `inside outside count` (2 fields)"),
            ("0 0 1\n0 x 1\n", "line 2 \"0 x 1\": outside \"x\" is not an ID"),
            ("0 -1 1", "outside \"-1\" is not an ID"),
            ("0 0 4294967296", "count \"4294967296\" is not an ID"),
            ("5 0 0", "line 1 \"5 0 0\": count 0"),
            ("4294967295 0 2", "runs past ID 4294967295"),
            ("0 4294967295 2", "runs past ID 4294967295"),
            ("0 1000 10\n9 2000 5", "line 2 \"9 2000 5\": its inside IDs overlap those of 0 1000 10"),
            ("0 0 1 1", "(4 fields)"),
        ] {
            let e = IdMap::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let many: String = (0..341).map(|i| format!("{i} {} 1\n", 1000 + i)).collect();
        assert!(IdMap::parse(&many).unwrap_err().to_string().contains("at most 340"));
        let most: String = (0..340).map(|i| format!("{i} {} 1\n", 1000 + i)).collect();
        assert_eq!(IdMap::parse(&most).unwrap().ranges.len(), 340);
    }
}
