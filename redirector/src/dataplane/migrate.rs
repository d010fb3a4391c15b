//! Carrying a node across a map-layout change (an agent upgrade whose
//! `LAYOUT_VERSION` is newer than the pinned maps'), with no connection
//! failed or let by unredirected:
//!
//! 1. [`retire`]: the old layout's pins (maps, cgroup links, per-namespace
//!    `sk_lookup` links) move to `<pin>/retired-v<N>/`. Moving a pin
//!    changes nothing in the kernel: the old programs stay attached and
//!    keep redirecting with their own maps.
//! 2. The agent loads the new layout as on a fresh node: new maps at
//!    `<pin>/`, new links attached to the same cgroup *after* the old ones,
//!    so the old connect4/6 still run first and redirect every new
//!    connection; the new connect4/6 see the proxy's loopback address and
//!    let it be. Each old connection is tracked and answered by the old
//!    sockops/getsockopt; the new getsockopt misses it and leaves the old
//!    program's answer alone.
//! 3. [`progress`], after a pass that programmed every desired workload
//!    into the new maps: the old connect4/6 links are detached, so new
//!    connections take the new path. The rest of the old set stays while a
//!    connection it redirected is open (its tuple map is not empty: the
//!    application can still ask getpeername, the proxy SO_ORIGINAL_DST),
//!    then it is detached and unpinned.
//!
//! A crash at any step leaves a state the next start resumes: `retire`
//! moves the layout stamp (`RDR_META`) last, so pinned maps of the old
//! layout always come with it, and the retired set is finished by
//! [`progress`] whichever agent runs next. Pinned maps of a *newer* layout
//! are refused before anything changes (a downgrade leaves the newer
//! agent's state working).
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use redirector_common::{map_names, prog_names};

use super::pins::remove_pins;
use crate::sys::bpf;

const RETIRED_PREFIX: &str = "retired-v";

/// `<pin>/retired-v<version>`.
pub fn retired_dir(pin_dir: &Path, version: u32) -> PathBuf {
    pin_dir.join(format!("{RETIRED_PREFIX}{version}"))
}

/// The retired sets under `pin_dir`, oldest first.
pub fn retired_sets(pin_dir: &Path) -> Vec<(u32, PathBuf)> {
    let mut v: Vec<(u32, PathBuf)> = std::fs::read_dir(pin_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.strip_prefix(RETIRED_PREFIX)?.parse().ok()?;
            e.path().is_dir().then(|| (version, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Step 1: moves the pins of layout `version` from `pin_dir` into its
/// retired directory (merging with a partly moved one), the layout stamp
/// last. Returns the directory.
pub(super) fn retire(pin_dir: &Path, version: u32) -> Result<PathBuf> {
    let dir = retired_dir(pin_dir, version);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mv = |from: PathBuf, to: PathBuf| {
        std::fs::rename(&from, &to).with_context(|| format!("moving {} to {}", from.display(), to.display()))
    };
    for sub in ["links", "netns"] {
        let from = pin_dir.join(sub);
        if !from.is_dir() {
            continue;
        }
        let to = dir.join(sub);
        if !to.exists() {
            mv(from, to)?;
            continue;
        }
        for e in std::fs::read_dir(&from)? {
            let e = e?;
            mv(e.path(), to.join(e.file_name()))?;
        }
        std::fs::remove_dir(&from).with_context(|| format!("removing {}", from.display()))?;
    }
    // Every map of that layout (whatever its names were), the stamp last.
    let mut maps: Vec<PathBuf> = std::fs::read_dir(pin_dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("RDR_") && n != map_names::META))
        .map(|e| e.path())
        .collect();
    maps.sort();
    maps.push(pin_dir.join(map_names::META));
    for from in maps {
        if from.exists() {
            let to = dir.join(from.file_name().expect("a file name"));
            mv(from, to)?;
        }
    }
    Ok(dir)
}

/// Step 3, after a pass that programmed every desired workload: detaches
/// each retired set's connect programs, then the whole set once no
/// connection it redirected is open. Returns what happened, for the log.
pub(super) fn progress(pin_dir: &Path) -> Vec<Result<String>> {
    let mut out = Vec::new();
    for (version, dir) in retired_sets(pin_dir) {
        let mut detached = Vec::new();
        for prog in [prog_names::CONNECT4, prog_names::CONNECT6] {
            let link = dir.join("links").join(prog);
            if link.exists() {
                match std::fs::remove_file(&link) {
                    Ok(()) => detached.push(prog),
                    Err(e) => out.push(Err(anyhow::Error::new(e).context(format!("detaching {}", link.display())))),
                }
            }
        }
        if !detached.is_empty() {
            out.push(Ok(format!(
                "layout {version}: its {} detached, new connections take this agent's programs",
                detached.join(" and ")
            )));
        }
        let tuples = dir.join(map_names::ORIG_BY_TUPLE);
        let open = tuples.exists() && !bpf::pinned_map_is_empty(&tuples).unwrap_or(false);
        if open {
            continue;
        }
        out.push(
            remove_pins(&dir)
                .map(|removed| {
                    format!(
                        "layout {version} retired: no connection it redirected is open; {} pins removed, its programs \
                         detached",
                        removed.len()
                    )
                })
                .with_context(|| format!("removing the retired layout {version} in {}", dir.display())),
        );
    }
    out
}
