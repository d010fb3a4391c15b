//! Structured logs through `tracing`: human-readable by default, one JSON
//! object per line with `--log-format json`. `RUST_LOG` filters (default
//! `info`); `log` records from this crate and its dependencies are bridged.
use tracing_subscriber::{fmt, EnvFilter};

pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    // A second init (tests) is harmless: the first subscriber stays.
    let _ = if json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
}
