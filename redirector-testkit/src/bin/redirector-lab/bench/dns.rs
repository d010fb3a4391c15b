//! DNS capture's cost: UDP queries to port 53 per second, one client
//! thread, side by side under the three setups, rounds alternated:
//!
//! - `none`: the client asks the proxy's DNS listener (127.0.0.1:15053)
//!   itself;
//! - `iptables`: istio-iptables' DNS rules (`--redirect-dns`) send its
//!   queries to the nameserver there, conntrack's reverse NAT shows the
//!   replies from it;
//! - `redirector`: the agent with `dnsCapture: true` (sendmsg4 or connect4,
//!   recvmsg4).
//!
//! Two client styles: an unconnected socket (`sendto` per query, as musl
//! and dig) and a connected one (`connect` once, as glibc). The listener
//! is a blocking responder thread (no polling delay in the figures); the
//! "real" nameserver in the peer namespace must never see a query.
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use redirector_testkit::{self as testkit, dns::Via, AgentProcess, PinDir, Topology};
use serde::Serialize;

use super::{
    setup::{in_cgroup, Cgroups, Kind, TempDir, KINDS},
    stats::{ratio, Stats},
    Plan,
};

const NAMESERVER: &str = "198.51.100.53";
const LISTENER: &str = "127.0.0.1:15053";
const ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 153);

#[derive(Serialize)]
pub struct DnsRates {
    pub name: String,
    /// Queries per second and their round-trip latencies, per setup.
    pub setups: Vec<(String, Stats)>,
    pub ratio_vs_none: f64,
    pub ratio_vs_iptables: f64,
}

/// A blocking UDP DNS responder (answers with [`ANSWER`]); counts what it
/// answered.
struct Responder {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Responder {
    fn start(netns: &Path, addr: SocketAddr) -> Result<Self> {
        let file = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let sock = std::thread::spawn(move || -> Result<UdpSocket> {
            redirector::sys::netns::enter_netns(&file)?;
            let u = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
            u.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok(u)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("responder setup panicked"))??;
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let (s, a) = (stop.clone(), answered.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    if let Some(reply) = testkit::dns::answer(&buf[..n], ANSWER) {
                        let _ = sock.send_to(&reply, from);
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Ok(Self { stop, answered, thread: Some(thread) })
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct DnsSetup {
    kind: Kind,
    // Dropped in this order: the agent stops first.
    agent: Option<(AgentProcess, PinDir, TempDir)>,
    listener: Responder,
    nameserver: Responder,
    topo: Topology,
    cgroup: PathBuf,
}

impl DnsSetup {
    fn start(kind: Kind, tag: &str, cgroups: Cgroups<'_>) -> Result<Self> {
        super::interrupted()?;
        let topo = Topology::new(tag)?;
        let app = topo.app.path();
        topo.peer.exec(&["ip", "addr", "add", &format!("{NAMESERVER}/32"), "dev", "lo"])?;
        let cgroup = if kind.has_agent() { cgroups.attach } else { cgroups.clean };
        let listener = in_cgroup(cgroup, || Responder::start(&app, LISTENER.parse()?))??;
        let nameserver = Responder::start(&topo.peer.path(), format!("{NAMESERVER}:53").parse()?)?;
        let mut agent = None;
        match kind {
            Kind::None => {}
            Kind::Iptables => {
                topo.app
                    .shell(&testkit::dns::istio_dns_rules(NAMESERVER, 1337))
                    .context("istio-iptables' DNS rules")?;
            }
            Kind::Redirector | Kind::Sockmap => {
                let pins = PinDir::new()?;
                let dir = TempDir::new("redirector-bench-dns-")?;
                let cfg = dir.0.join("config.yaml");
                std::fs::write(
                    &cfg,
                    format!(
                        "mesh:\n  preset: istio\n  dnsCapture: true\n  dnsServers: [\"{NAMESERVER}\"]\nworkloads:\n  - \
                         name: bench\n    netns: {}\n",
                        app.display()
                    ),
                )?;
                let bin = testkit::agent_binary()?;
                let a = AgentProcess::start_polling(
                    &bin,
                    &cfg,
                    cgroups.attach,
                    &pins.path,
                    &dir.0.join("agent.log"),
                    "100ms",
                )?;
                a.wait_programmed(&bin, &pins.path, &app)?;
                agent = Some((a, pins, dir));
            }
        }
        Ok(Self { kind, agent, listener, nameserver, topo, cgroup: cgroup.to_owned() })
    }
}

pub fn run(plan: &Plan, cgroups: Cgroups<'_>) -> Result<Vec<DnsRates>> {
    eprintln!("bench: DNS capture: starting the three setups");
    let setups: Vec<DnsSetup> =
        KINDS.iter().enumerate().map(|(i, k)| DnsSetup::start(*k, &format!("q{i}"), cgroups)).collect::<Result<_>>()?;
    let mut out = Vec::new();
    for via in [Via::Udp, Via::UdpConnected] {
        let mut lat: Vec<Vec<Duration>> = vec![Vec::new(); KINDS.len()];
        let mut busy = vec![0f64; KINDS.len()];
        for _ in 0..plan.rounds {
            super::interrupted()?;
            for (i, s) in setups.iter().enumerate() {
                lat[i].extend(round(s, via, plan.secs)?);
                busy[i] += plan.secs;
            }
        }
        let st: Vec<Stats> = (0..KINDS.len()).map(|i| Stats::from_samples(&mut lat[i], busy[i])).collect();
        let r = DnsRates {
            name: match via {
                Via::Udp => "UDP queries, unconnected socket (sendto each)".into(),
                _ => "UDP queries, connected socket".into(),
            },
            ratio_vs_none: ratio(st[2].rate_per_s, st[0].rate_per_s),
            ratio_vs_iptables: ratio(st[2].rate_per_s, st[1].rate_per_s),
            setups: KINDS.iter().map(|k| k.name().to_string()).zip(st).collect(),
        };
        println!("{}", dns_row(&r));
        out.push(r);
    }
    for s in &setups {
        let leaked = s.nameserver.answered.load(Ordering::Relaxed);
        if leaked > 0 {
            bail!("{} setup: {leaked} queries reached the nameserver instead of the DNS listener", s.kind.name());
        }
        if s.listener.answered.load(Ordering::Relaxed) == 0 {
            bail!("{} setup: the DNS listener answered nothing", s.kind.name());
        }
        let _ = (&s.agent, &s.topo);
    }
    drop(setups);
    Ok(out)
}

/// Queries back to back for `secs`; one round-trip time per answer.
fn round(s: &DnsSetup, via: Via, secs: f64) -> Result<Vec<Duration>> {
    let dst: SocketAddr =
        if s.kind == Kind::None { LISTENER.to_string() } else { format!("{NAMESERVER}:53") }.parse()?;
    let app = s.topo.app.path();
    in_cgroup(&s.cgroup, || {
        testkit::in_netns_as(&app, 1000, move || -> Result<Vec<Duration>> {
            let u = UdpSocket::bind("0.0.0.0:0")?;
            u.set_read_timeout(Some(Duration::from_secs(1)))?;
            if via == Via::UdpConnected {
                u.connect(dst)?;
            }
            let q = testkit::dns::example_query();
            let mut buf = [0u8; 1500];
            let mut lat = Vec::new();
            let end = Instant::now() + Duration::from_secs_f64(secs);
            while Instant::now() < end {
                let t = Instant::now();
                if via == Via::UdpConnected {
                    u.send(&q)?;
                } else {
                    u.send_to(&q, dst)?;
                }
                let (n, from) = u.recv_from(&mut buf).with_context(|| format!("no answer from {dst}"))?;
                if from != dst || n < 16 {
                    bail!("answer from {from} ({n} bytes), asked {dst}");
                }
                lat.push(t.elapsed());
            }
            Ok(lat)
        })
    })??
    .with_context(|| format!("DNS {via:?}, {} setup", s.kind.name()))
}

pub fn dns_row(r: &DnsRates) -> String {
    let cell = |st: &Stats| format!("{:.0}/s ({:.0}/{:.0})", st.rate_per_s, st.p50_us, st.p99_us);
    format!(
        "| {} | {} | {} | {} | {:.2} | {:.2} |",
        r.name,
        cell(&r.setups[0].1),
        cell(&r.setups[1].1),
        cell(&r.setups[2].1),
        r.ratio_vs_none,
        r.ratio_vs_iptables
    )
}

/// The report's section.
pub fn section(rates: &[DnsRates]) -> String {
    let mut o = String::from(
        "\n### DNS capture\n\nUDP queries to port 53, one client thread, answered by a blocking responder on the proxy's DNS \
         port (none: asked there directly; iptables: istio-iptables' DNS rules; redirector: `dnsCapture: true`). Queries per \
         second (p50/p99 round trip µs).\n\n| client | none | iptables | redirector | redirector/none | redirector/iptables |\n\
         |---|---|---|---|---|---|\n",
    );
    for r in rates {
        o.push_str(&dns_row(r));
        o.push('\n');
    }
    o
}
