//! What both agents do around their reconcile passes, in one place: the
//! signal handlers, the status endpoints (bound once), the data path's
//! full-map reports, the retry policy after a failed pass, and the exit
//! notice. What differs between the two agents is stated where they use
//! it and in `docs/architecture.md` ("Standalone and Kubernetes agents:
//! what differs").
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use log::{error, warn};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    dataplane::{FullMapWatch, Maps},
    metrics::Metrics,
};

/// A signal either agent acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGHUP: the standalone agent re-reads its config file, the
    /// Kubernetes agent does a full resync.
    Hangup,
    /// SIGTERM or SIGINT: the agent exits, leaving the redirection in force.
    Stop,
}

/// The handlers of SIGHUP, SIGTERM and SIGINT.
pub struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers. Each agent does this first: once a workload
    /// is programmed (what `wait-ready` reports), a SIGHUP must reach the
    /// agent's loop, not kill the agent.
    pub fn install() -> Result<Self> {
        Ok(Self {
            hup: signal(SignalKind::hangup()).context("installing SIGHUP handler")?,
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
        })
    }

    /// The next signal (cancel-safe: usable as a `select!` branch).
    pub async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.hup.recv() => Signal::Hangup,
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
        }
    }
}

/// The agent's metrics and status endpoints, its full-map watch, and what
/// it says when it exits.
pub struct Runtime {
    pub metrics: Arc<Metrics>,
    /// The log target of the agent these records belong to.
    target: &'static str,
    pin_dir: PathBuf,
    full_maps: FullMapWatch,
}

impl Runtime {
    /// Creates the metrics and, with `metrics_addr`, binds the status
    /// endpoints (`/healthz`, `/readyz`, `/metrics`) and serves them in the
    /// background. Both agents call this before loading the data plane, so
    /// a bad address fails the start before anything is attached; the
    /// socket bound here is the one served.
    pub async fn start(target: &'static str, pin_dir: PathBuf, metrics_addr: Option<SocketAddr>) -> Result<Self> {
        let metrics = Metrics::new(pin_dir.clone());
        if let Some(addr) = metrics_addr {
            let listener = crate::metrics::bind(addr)?;
            let m = metrics.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::metrics::serve(listener, m).await {
                    error!(target: target, "{e:#}");
                }
            });
        }
        Ok(Self { metrics, target, pin_dir, full_maps: FullMapWatch::default() })
    }

    /// Reports each full-map failure of the data path since the last check
    /// (the programs count them; they cannot log): an error line and
    /// `redirector_errors_total{reason="map_full"}`. True if there was any.
    pub fn check_full_maps(&mut self, maps: &Maps) -> bool {
        let problems = self.full_maps.check(maps);
        for problem in &problems {
            self.metrics.error("map_full");
            error!(target: self.target, "{problem}");
        }
        !problems.is_empty()
    }

    /// An agent whose pins were removed while it ran
    /// ([`crate::dataplane::Dataplane::check_pins`]'s error): the error
    /// line naming the missing pins, `redirector_errors_total{reason="pins_gone"}`,
    /// not ready, and the error it exits with (non-zero, and without the
    /// exit notice, which would claim the redirection stays in force).
    pub fn pins_gone(&self, e: anyhow::Error) -> anyhow::Error {
        error!(target: self.target, "{e:#}");
        self.metrics.error("pins_gone");
        self.metrics.set_ready(Some(format!("the pins in {} are gone", self.pin_dir.display())));
        anyhow::anyhow!(
            "exiting: this agent's pins in {} are gone and redirection is off (see the error above)",
            self.pin_dir.display()
        )
    }

    /// The last line of an agent that exits on SIGTERM/SIGINT: programs stay
    /// attached (their links are pinned) and the maps stay as they are.
    pub fn exit_notice(&self) {
        warn!(
            target: self.target,
            "exiting; redirection stays in force (links pinned in {}); `redirector cleanup` removes it",
            self.pin_dir.display()
        );
    }
}

/// When the standalone agent re-applies a pass that had errors: 1 s after
/// the first, doubling up to 60 s while they persist; a good pass resets
/// it. The Kubernetes agent does not use it: its resync tick runs a pass
/// every `--resync` (default 5 s), which retries whatever failed at that
/// fixed period (see `docs/architecture.md`).
#[derive(Debug, Default)]
pub struct Retry {
    at: Option<Instant>,
    delay: Duration,
}

impl Retry {
    /// Arms the next retry after a pass that `failed`, or resets.
    pub fn after(&mut self, failed: bool) {
        if !failed {
            *self = Self::default();
            return;
        }
        self.delay = (self.delay * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
        self.at = Some(Instant::now() + self.delay);
    }

    /// Whether a retry is armed and its time has come.
    pub fn due(&self) -> bool {
        self.at.is_some_and(|at| Instant::now() >= at)
    }
}
