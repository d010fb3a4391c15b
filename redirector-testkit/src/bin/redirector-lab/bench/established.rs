//! Established traffic, app ↔ proxy over one connection: request/response
//! rate with small messages and throughput with large writes. The proxy
//! stand-in ([`ProxyMode::Stream`]) echoes or sinks. Four setups: the three
//! of every scenario and `sockmap` (the agent with `mesh.acceleration:
//! sockmap`, attached to a cgroup of its own so that the plain redirector's
//! rounds never run its programs, nor it theirs).
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use redirector_testkit as testkit;
use serde::Serialize;

use super::{
    bpfstats::{self, ProgCost},
    setup::{in_cgroup, BenchCgroup, Cgroups, Exclusions, Kind, ProxyMode, Setup, Spec, ESTABLISHED_KINDS as KINDS},
    stats::{ratio, Stats},
    Plan,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// Write `n` bytes, read the `n` echoed back, repeat.
    RequestResponse,
    /// Write `n`-byte chunks as fast as the proxy reads them.
    Throughput,
}

const WORKLOADS: [(Pattern, usize); 3] =
    [(Pattern::RequestResponse, 64), (Pattern::Throughput, 64 << 10), (Pattern::Throughput, 1 << 20)];

#[derive(Serialize)]
pub struct Established {
    pub name: String,
    pub pattern: Pattern,
    pub message_bytes: usize,
    /// What `rate_per_s` counts: transactions or MiB.
    pub unit: &'static str,
    pub setups: Vec<(String, Stats)>,
    /// redirector (no acceleration) against none and iptables.
    pub ratio_vs_none: f64,
    pub ratio_vs_iptables: f64,
    /// sockmap (`mesh.acceleration: sockmap`) against none, iptables and
    /// the plain redirector.
    pub sockmap_vs_none: f64,
    pub sockmap_vs_iptables: f64,
    pub sockmap_vs_redirector: f64,
    /// Request/response only: per-program runs per transaction, from an
    /// extra redirector round with BPF statistics on.
    pub bpf_programs: Vec<ProgCost>,
    /// The same from an extra sockmap round (sk_msg runs per message).
    pub bpf_programs_sockmap: Vec<ProgCost>,
}

pub fn run(plan: &Plan, cgroups: Cgroups<'_>) -> Result<Vec<Established>> {
    eprintln!("bench: established traffic: starting the four setups");
    let spec = Spec { proxy: ProxyMode::Stream, ..Spec::new(Exclusions::default()) };
    let accel_cgroup = BenchCgroup::new("redirector-bench-accel-")?;
    let setups: Vec<Setup> = KINDS
        .iter()
        .enumerate()
        .map(|(i, kind)| {
            let cg = if *kind == Kind::Sockmap { Cgroups { attach: &accel_cgroup.path, ..cgroups } } else { cgroups };
            Setup::start(*kind, &format!("e{i}"), spec, cg)
        })
        .collect::<Result<_>>()?;
    let out = measure(plan, &setups);
    // The setups (agents, sockets) go before their cgroups.
    drop(setups);
    drop(accel_cgroup);
    out
}

fn measure(plan: &Plan, setups: &[Setup]) -> Result<Vec<Established>> {
    let mut out = Vec::new();
    for (pattern, size) in WORKLOADS {
        let mut lat: Vec<Vec<Duration>> = vec![Vec::new(); KINDS.len()];
        let mut bytes = vec![0u64; KINDS.len()];
        let mut busy = vec![0f64; KINDS.len()];
        for _ in 0..plan.rounds {
            super::interrupted()?;
            for (i, s) in setups.iter().enumerate() {
                let r = round(s, pattern, size, plan.established_secs)?;
                lat[i].extend(r.0);
                bytes[i] += r.1;
                busy[i] += r.2;
            }
        }
        let costs = |s: &Setup| -> Result<Vec<ProgCost>> {
            match (&s.agent, pattern) {
                (Some(a), Pattern::RequestResponse) => {
                    bpfstats::measure(&a.pins.path, || Ok(round(s, pattern, size, plan.established_secs)?.0.len()))
                }
                _ => Ok(Vec::new()),
            }
        };
        let bpf_programs = costs(&setups[2])?;
        let bpf_programs_sockmap = costs(&setups[3])?;
        let st: Vec<Stats> = (0..KINDS.len())
            .map(|i| match pattern {
                Pattern::RequestResponse => Stats::from_samples(&mut lat[i], busy[i]),
                Pattern::Throughput => Stats {
                    count: bytes[i] as usize,
                    rate_per_s: bytes[i] as f64 / (1 << 20) as f64 / busy[i],
                    ..Stats::default()
                },
            })
            .collect();
        let (name, unit) = match pattern {
            Pattern::RequestResponse => (format!("request/response, {size} B each way"), "transactions"),
            Pattern::Throughput => (format!("throughput, {} KiB writes", size >> 10), "MiB"),
        };
        let e = Established {
            name,
            pattern,
            message_bytes: size,
            unit,
            ratio_vs_none: ratio(st[2].rate_per_s, st[0].rate_per_s),
            ratio_vs_iptables: ratio(st[2].rate_per_s, st[1].rate_per_s),
            sockmap_vs_none: ratio(st[3].rate_per_s, st[0].rate_per_s),
            sockmap_vs_iptables: ratio(st[3].rate_per_s, st[1].rate_per_s),
            sockmap_vs_redirector: ratio(st[3].rate_per_s, st[2].rate_per_s),
            setups: KINDS.iter().map(|k| k.name().to_string()).zip(st).collect(),
            bpf_programs,
            bpf_programs_sockmap,
        };
        println!("{}", established_row(&e));
        out.push(e);
    }
    Ok(out)
}

/// One round against one setup: latencies (request/response), bytes and
/// seconds.
fn round(s: &Setup, pattern: Pattern, size: usize, secs: f64) -> Result<(Vec<Duration>, u64, f64)> {
    let dst: SocketAddr = if s.kind == Kind::None { "127.0.0.1:15001" } else { "192.0.2.10:80" }.parse()?;
    let redirected = s.kind != Kind::None;
    let app = s.topo.app.path();
    in_cgroup(&s.cgroup, || {
        testkit::in_netns_as(&app, 1000, move || match pattern {
            Pattern::RequestResponse => request_response(dst, redirected, size, secs).map(|v| (v, 0, secs)),
            Pattern::Throughput => throughput(dst, redirected, size, secs).map(|(b, t)| (Vec::new(), b, t)),
        })
    })??
    .with_context(|| format!("{:?} with {size}-byte messages, {} setup", pattern, s.kind.name()))
}

/// Connects and reads the proxy's line; `redirected`: it must have read
/// an original destination. Then sends the mode byte.
fn open(dst: SocketAddr, redirected: bool, mode: u8) -> Result<TcpStream> {
    let mut s =
        TcpStream::connect_timeout(&dst, Duration::from_secs(1)).with_context(|| format!("connecting to {dst}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_nodelay(true)?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") && line.len() < 256 {
        s.read_exact(&mut b).with_context(|| format!("reading the proxy's line from {dst}"))?;
        line.push(b[0]);
    }
    let text = String::from_utf8_lossy(&line);
    if !text.starts_with("proxy ") || (redirected && text.contains("no-original-dst")) {
        bail!("{dst} was not answered by the proxy: {text:?}");
    }
    s.write_all(&[mode])?;
    Ok(s)
}

/// Ping-pong of `size`-byte messages for `secs`; one latency per exchange.
fn request_response(dst: SocketAddr, redirected: bool, size: usize, secs: f64) -> Result<Vec<Duration>> {
    let mut s = open(dst, redirected, b'E')?;
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut lat = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back).context("reading the echo")?;
        lat.push(t.elapsed());
    }
    Ok(lat)
}

/// Writes `size`-byte chunks for `secs`, then waits for the proxy's count
/// of what it read; returns the bytes and the seconds until that count.
fn throughput(dst: SocketAddr, redirected: bool, size: usize, secs: f64) -> Result<(u64, f64)> {
    let mut s = open(dst, redirected, b'S')?;
    let chunk = vec![0xa5u8; size];
    let mut sent = 0u64;
    let t = Instant::now();
    let end = t + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        s.write_all(&chunk)?;
        sent += size as u64;
    }
    s.shutdown(Shutdown::Write)?;
    // What the proxy has yet to read may be a lot (with sockmap the writes
    // above queue in its socket, not in ours), and on a busy machine it
    // may take more than the 5 s of a line: the time until the count is
    // part of the figure, so wait for it.
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count).with_context(|| format!("reading the proxy's byte count ({sent} bytes sent)"))?;
    let took = t.elapsed().as_secs_f64();
    let read = u64::from_be_bytes(count);
    if read != sent {
        bail!("the proxy read {read} bytes of the {sent} sent to {dst}");
    }
    Ok((sent, took))
}

/// One established-traffic row: transactions/s (p50/p99 µs) or MiB/s.
pub fn established_row(e: &Established) -> String {
    let cell = |st: &Stats| match e.pattern {
        Pattern::RequestResponse => format!("{:.0}/s ({:.0}/{:.0})", st.rate_per_s, st.p50_us, st.p99_us),
        Pattern::Throughput => format!("{:.0} MiB/s", st.rate_per_s),
    };
    format!(
        "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        e.name,
        cell(&e.setups[0].1),
        cell(&e.setups[1].1),
        cell(&e.setups[2].1),
        cell(&e.setups[3].1),
        e.ratio_vs_none,
        e.ratio_vs_iptables,
        e.sockmap_vs_none,
        e.sockmap_vs_iptables,
        e.sockmap_vs_redirector
    )
}
