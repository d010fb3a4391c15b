//! The agent's status endpoints: `/healthz` (the main loop is alive),
//! `/readyz` (the data plane is loaded and the first full sync is done)
//! and `/metrics` (Prometheus text format). A small HTTP/1.1 server: one
//! request per connection, GET only.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Upper bounds (seconds) of the sync-latency histogram.
pub const SYNC_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// How long the main loop may be silent before `/healthz` fails.
pub const HEARTBEAT_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Default, Clone)]
pub struct Histogram {
    counts: [u64; SYNC_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        for (i, b) in SYNC_BUCKETS.iter().enumerate() {
            if seconds <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

#[derive(Debug)]
struct Inner {
    /// None: ready; Some: why not.
    not_ready: Option<String>,
    heartbeat: Instant,
    gauges: BTreeMap<&'static str, (u64, &'static str)>,
    sync: Histogram,
    errors: BTreeMap<String, u64>,
    registrations: u64,
}

/// Shared between the agent's loop (writer) and the HTTP server (reader).
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
    pin_dir: PathBuf,
}

impl Metrics {
    pub fn new(pin_dir: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                not_ready: Some("starting".into()),
                heartbeat: Instant::now(),
                gauges: BTreeMap::new(),
                sync: Histogram::default(),
                errors: BTreeMap::new(),
                registrations: 0,
            }),
            pin_dir,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_ready(&self, not_ready: Option<String>) {
        self.lock().not_ready = not_ready;
    }
    pub fn heartbeat(&self) {
        self.lock().heartbeat = Instant::now();
    }
    /// A gauge `redirector_<name>` with its help text.
    pub fn set_gauge(&self, name: &'static str, help: &'static str, value: u64) {
        self.lock().gauges.insert(name, (value, help));
    }
    pub fn observe_sync(&self, d: Duration) {
        self.lock().sync.observe(d.as_secs_f64());
    }
    /// Counts an error under a short reason (`invalid_annotation`, …).
    pub fn error(&self, reason: &str) {
        *self.lock().errors.entry(reason.to_string()).or_default() += 1;
    }
    pub fn registration(&self) {
        self.lock().registrations += 1;
    }

    pub fn healthy(&self) -> Result<(), String> {
        let age = self.lock().heartbeat.elapsed();
        if age > HEARTBEAT_LIMIT {
            return Err(format!("main loop silent for {age:?}"));
        }
        Ok(())
    }

    pub fn ready(&self) -> Result<(), String> {
        self.healthy()?;
        match &self.lock().not_ready {
            None => Ok(()),
            Some(why) => Err(why.clone()),
        }
    }

    /// The Prometheus text exposition. Map fill and eBPF counters are read
    /// from the pinned maps at scrape time.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let metric = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP redirector_{name} {help}\n# TYPE redirector_{name} {kind}");
        };
        {
            let m = self.lock();
            metric(&mut out, "ready", "gauge", "1 when the data plane is loaded and the first full sync is done.");
            let _ = writeln!(out, "redirector_ready {}", u8::from(m.not_ready.is_none()));
            for (name, (value, help)) in &m.gauges {
                metric(&mut out, name, "gauge", help);
                let _ = writeln!(out, "redirector_{name} {value}");
            }
            metric(
                &mut out,
                "sync_duration_seconds",
                "histogram",
                "Time from a change (pod, annotation, mesh settings, registration) to its policy being in the maps.",
            );
            for (b, c) in SYNC_BUCKETS.iter().zip(m.sync.counts) {
                let _ = writeln!(out, "redirector_sync_duration_seconds_bucket{{le=\"{b}\"}} {c}");
            }
            let _ = writeln!(out, "redirector_sync_duration_seconds_bucket{{le=\"+Inf\"}} {}", m.sync.count);
            let _ = writeln!(out, "redirector_sync_duration_seconds_sum {}", m.sync.sum);
            let _ = writeln!(out, "redirector_sync_duration_seconds_count {}", m.sync.count);
            metric(&mut out, "errors_total", "counter", "Errors by reason.");
            for (reason, n) in &m.errors {
                let _ = writeln!(out, "redirector_errors_total{{reason=\"{reason}\"}} {n}");
            }
            metric(
                &mut out,
                "registrations_total",
                "counter",
                "Pods that registered through the init container's socket.",
            );
            let _ = writeln!(out, "redirector_registrations_total {}", m.registrations);
        }
        match crate::inspect::snapshot(&self.pin_dir) {
            Ok(s) => {
                metric(&mut out, "map_entries", "gauge", "Entries in each pinned map.");
                for f in &s.maps {
                    let _ = writeln!(out, "redirector_map_entries{{map=\"{}\"}} {}", f.name, f.entries);
                }
                metric(&mut out, "map_capacity", "gauge", "Capacity of each pinned map.");
                for f in &s.maps {
                    let _ = writeln!(out, "redirector_map_capacity{{map=\"{}\"}} {}", f.name, f.capacity);
                }
                metric(
                    &mut out,
                    "datapath_events_total",
                    "counter",
                    "Data-path decisions counted by the eBPF programs (redirected and bypassed connections by reason).",
                );
                for (name, n) in &s.counters {
                    let _ = writeln!(out, "redirector_datapath_events_total{{event=\"{name}\"}} {n}");
                }
            }
            Err(e) => {
                let _ = writeln!(out, "# pinned maps unreadable: {}", format!("{e:#}").replace('\n', " "));
            }
        }
        out
    }
}

/// Binds the status endpoint. `[::]:PORT` is dual-stack whatever the
/// node's `net.ipv6.bindv6only` says (IPV6_V6ONLY is cleared), so one
/// DaemonSet argument serves kubelet's probes on IPv4-only, dual-stack and
/// IPv6-only clusters. A node without IPv6 fails the bind with the address
/// family's error: say `--metrics-addr=0.0.0.0:PORT` there (no silent
/// fallback to another address than the one asked for).
pub fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener> {
    bind_for("--metrics-addr", addr)
}

/// [`bind`] for the address given by `flag` (named in errors).
pub fn bind_for(flag: &str, addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener> {
    use std::os::fd::AsRawFd as _;
    let socket = if addr.is_ipv6() { tokio::net::TcpSocket::new_v6() } else { tokio::net::TcpSocket::new_v4() };
    let socket = socket.with_context(|| format!("{flag}={addr}: creating the socket"))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        let off: libc::c_int = 0;
        // SAFETY: a valid socket descriptor and a c_int option value of the
        // size passed.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&off as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("{flag}={addr}: clearing IPV6_V6ONLY"));
        }
    }
    socket.set_reuseaddr(true)?;
    socket.bind(addr).with_context(|| format!("{flag}={addr}: binding"))?;
    socket.listen(128).with_context(|| format!("{flag}={addr}: listening"))
}

/// Serves the endpoints on `listener` (bound by the caller, so a bad
/// address fails the agent's start) until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) -> Result<()> {
    log::info!("status endpoints on http://{}/{{healthz,readyz,metrics}}", listener.local_addr()?);
    loop {
        let (mut s, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                log::warn!("status endpoint: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                    let n = s.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&buf);
            let mut parts = head.lines().next().unwrap_or("").split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let path = path.split('?').next().unwrap_or("");
            let (status, ctype, body) = if method != "GET" {
                ("405 Method Not Allowed", "text/plain", "only GET\n".to_string())
            } else {
                match path {
                    "/healthz" => match m.healthy() {
                        Ok(()) => ("200 OK", "text/plain", "ok\n".into()),
                        Err(e) => ("503 Service Unavailable", "text/plain", format!("{e}\n")),
                    },
                    "/readyz" => match m.ready() {
                        Ok(()) => ("200 OK", "text/plain", "ready\n".into()),
                        Err(e) => ("503 Service Unavailable", "text/plain", format!("not ready: {e}\n")),
                    },
                    "/metrics" => {
                        let m2 = m.clone();
                        let body = tokio::task::spawn_blocking(move || m2.render()).await.unwrap_or_default();
                        ("200 OK", "text/plain; version=0.0.4", body)
                    }
                    _ => ("404 Not Found", "text/plain", "try /healthz, /readyz or /metrics\n".into()),
                }
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[::]` answers on both loopbacks (kubelet probes the pod's IPv4 or
    /// IPv6 address, whichever the cluster has), independent of the
    /// `bindv6only` sysctl.
    #[tokio::test]
    async fn unspecified_v6_status_address_is_dual_stack() {
        let l = bind("[::]:0".parse().unwrap()).unwrap();
        let port = l.local_addr().unwrap().port();
        for peer in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
            let (c, a) = tokio::join!(tokio::net::TcpStream::connect(&peer), l.accept());
            c.unwrap_or_else(|e| panic!("connect {peer}: {e}"));
            a.unwrap();
        }
        let v4 = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(v4.local_addr().unwrap().is_ipv4());
    }

    #[test]
    fn histogram_is_cumulative() {
        let mut h = Histogram::default();
        h.observe(0.002);
        h.observe(0.3);
        h.observe(10.0);
        assert_eq!(h.counts[0], 0);
        assert_eq!(h.counts[1], 1); // le 0.0025
        assert_eq!(h.counts[8], 2); // le 0.5
        assert_eq!(h.counts[11], 2); // le 5
        assert_eq!(h.count, 3);
    }

    #[test]
    fn render_and_readiness() {
        let m = Metrics::new(PathBuf::from("/nonexistent-pin-dir"));
        assert_eq!(m.ready().unwrap_err(), "starting");
        assert!(m.healthy().is_ok());
        m.set_gauge("pods_programmed", "Pods whose policy is in the maps.", 3);
        m.error("invalid_annotation");
        m.error("invalid_annotation");
        m.observe_sync(Duration::from_millis(3));
        m.set_ready(None);
        assert!(m.ready().is_ok());
        let text = m.render();
        for line in [
            "redirector_ready 1",
            "redirector_pods_programmed 3",
            "redirector_errors_total{reason=\"invalid_annotation\"} 2",
            "redirector_sync_duration_seconds_bucket{le=\"0.005\"} 1",
            "redirector_sync_duration_seconds_count 1",
            "# TYPE redirector_sync_duration_seconds histogram",
            "# pinned maps unreadable",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
