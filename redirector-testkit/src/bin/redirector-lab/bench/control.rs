//! The control plane: how fast a change is in force, how long a full sync
//! of many workloads takes and what it costs in memory, each next to what
//! osm-init's `iptables-restore` takes for the same job.
use std::{
    collections::BTreeSet,
    io::Read as _,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use redirector::dataplane::{Dataplane, Desired};
use redirector_common::map_names;
use redirector_policy::{compile, oracle::osm_init_commands, parse_config, Policy};
use redirector_testkit::{self as testkit, PinDir};
use serde::{Deserialize, Serialize};

use super::{
    setup::{
        config, in_cgroup, policy, restore_input, BenchCgroup, Cgroups, Exclusions, Kind, Setup, Spec, TempDir,
        PROBE_PORT,
    },
    stats::{mib, Stats},
    sys,
};

/// The policy whose changes are timed: 10 excluded CIDRs and 10 excluded
/// ports, the probe port flipping in and out of the port list.
const CHANGE_BASE: Exclusions = Exclusions { cidrs: 10, ports: 10, probe_port: false };

#[derive(Serialize)]
pub struct ChangeLatency {
    pub changes: usize,
    pub policy: String,
    /// SIGHUP to the agent → a probe connection sees the new verdict.
    pub redirector_in_force: Stats,
    /// `iptables-restore` of osm-init's whole rule set, start to exit.
    pub iptables_restore: Stats,
    /// The same start → a probe connection sees the new verdict.
    pub iptables_in_force: Stats,
    /// The agent's VmRSS (one workload, this policy) after the changes.
    pub agent_rss_kib: Option<u64>,
    /// The same changes (of the one probed workload) while the agent also
    /// has many other workloads to resolve, survey and diff on each pass.
    pub at_scale: Vec<ChangeAtScale>,
}

#[derive(Serialize)]
pub struct ChangeAtScale {
    /// What flips: `mesh-wide` (the port in the mesh settings' list, so
    /// every workload's lists change) or `one workload` (in an annotation
    /// of the probed workload only).
    pub change: &'static str,
    /// Workloads in the agent's config: the probed one and the others.
    pub workloads: usize,
    pub changes: usize,
    /// SIGHUP → a probe connection sees the new verdict.
    pub in_force: Stats,
    /// SIGHUP → the agent logs the end of that pass.
    pub pass: Stats,
    /// The same pass by the agent's own log timestamps (SIGHUP received →
    /// pass logged).
    pub agent_pass: Stats,
    pub agent_rss_kib: Option<u64>,
}

/// Flips [`PROBE_PORT`] between excluded and redirected `changes` times in
/// each setup and times how long until a new connection sees it; then, for
/// each of `scale`, the agent's flips again with that many other workloads
/// in its config (`scale_changes` times).
pub fn change_to_in_force(
    changes: usize,
    scale: &[usize],
    scale_changes: usize,
    cgroups: Cgroups<'_>,
) -> Result<ChangeLatency> {
    eprintln!("bench: change-to-in-force, {changes} changes per setup");
    let spec = Spec { agent_poll: "3600s", ..Spec::new(CHANGE_BASE) };
    let agent_setup = Setup::start(Kind::Redirector, "c0", spec, cgroups)?;
    let ipt_setup = Setup::start(Kind::Iptables, "c1", spec, cgroups)?;
    let agent = agent_setup.agent.as_ref().context("the redirector setup has no agent")?;
    let app = agent_setup.topo.app.path();
    let texts = [config(&app, CHANGE_BASE), config(&app, Exclusions { probe_port: true, ..CHANGE_BASE })];
    let flipper = Flipper {
        config: agent.config.clone(),
        pid: agent.process.child.id() as i32,
        log: agent.process.log.clone(),
        app: app.clone(),
        cgroup: agent_setup.cgroup.clone(),
    };
    let mut redirector = flipper.flip(&texts, changes)?.in_force;
    let agent_rss_kib = agent_setup.agent_rss_kib();
    let flipper_base_text = texts[0].clone();
    // The same flip as an annotation of the probed workload alone (the
    // config's last lines are that workload's; the others come after).
    let one_workload = [
        texts[0].clone(),
        format!(
            "{}    annotations:\n      openservicemesh.io/outbound-port-exclusion-list: \"{PROBE_PORT}\"\n",
            texts[0]
        ),
    ];
    let mut at_scale = Vec::new();
    // What the agent's config file holds after the one-workload flips.
    let mut installed: Option<String> = None;
    for &n in scale {
        super::interrupted()?;
        let others = ParkedNamespaces::new(n)?;
        for (change, texts) in [("mesh-wide", &texts), ("one workload", &one_workload)] {
            eprintln!("bench: change-to-in-force ({change}) with {n} other workloads, {scale_changes} changes");
            // Inbound off, as in the sync scenarios: the others have no
            // proxy listening (and the probe is outbound).
            let texts = texts
                .clone()
                .map(|t| t.replacen("mesh:\n", "mesh:\n  inbound: false\n", 1) + &others.workloads_yaml("w"));
            // Every workload programmed, the probed one redirected, before
            // the first timed change (a config the agent already has makes
            // no pass to wait for).
            if installed.as_deref() != Some(texts[0].as_str()) {
                flipper.settle(&texts[0])?;
            }
            let bin = testkit::agent_binary()?;
            agent
                .process
                .wait_programmed(&bin, &agent.pins.path, &others.last_netns())
                .context("the other workloads programmed")?;
            let mut f = flipper.flip(&texts, scale_changes)?;
            // The last change installed the redirected text for an even
            // count, the excluded one for an odd one.
            installed = Some(texts[usize::from(scale_changes % 2 == 1)].clone());
            at_scale.push(ChangeAtScale {
                change,
                workloads: n + 1,
                changes: scale_changes,
                in_force: Stats::from_samples(&mut f.in_force, 0.0),
                pass: Stats::from_samples(&mut f.pass, 0.0),
                agent_pass: Stats::from_samples(&mut f.agent_side, 0.0),
                agent_rss_kib: agent_setup.agent_rss_kib(),
            });
        }
        // The others out of the config again before their namespaces go.
        flipper.settle(&flipper_base_text)?;
        installed = Some(flipper_base_text.clone());
    }

    let dir = TempDir::new("redirector-bench-restore-")?;
    let files = [dir.0.join("redirected.rules"), dir.0.join("excluded.rules")];
    for (file, probe_port) in files.iter().zip([false, true]) {
        let rules = restore_input(&osm_init_commands(&policy(Exclusions { probe_port, ..CHANGE_BASE })?));
        std::fs::write(file, rules).with_context(|| format!("writing {}", file.display()))?;
    }
    let ipt_ns = ipt_setup.topo.app.path();
    let ipt = in_cgroup(&ipt_setup.cgroup, || {
        testkit::in_netns_as(&ipt_ns, 0, move || -> Result<Vec<(Duration, Duration)>> {
            let mut out = Vec::new();
            for i in 0..changes {
                super::interrupted()?;
                let excluded = i % 2 == 0;
                let file = &files[usize::from(excluded)];
                let t = Instant::now();
                // A child forked here runs in this thread's network namespace.
                let res = Command::new("iptables-restore").arg(file).output().context("running iptables-restore")?;
                if !res.status.success() {
                    bail!("iptables-restore {}: {}", file.display(), String::from_utf8_lossy(&res.stderr).trim());
                }
                let restored = t.elapsed();
                wait_for_verdict(excluded, t)?;
                out.push((restored, t.elapsed()));
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(out)
        })
    })???;
    drop(dir);
    let (mut restore, mut in_force): (Vec<Duration>, Vec<Duration>) = ipt.into_iter().unzip();
    Ok(ChangeLatency {
        changes,
        policy: format!(
            "{} excluded CIDRs, {} excluded ports in the mesh settings; port {PROBE_PORT} flips between excluded and redirected there",
            CHANGE_BASE.cidrs, CHANGE_BASE.ports
        ),
        redirector_in_force: Stats::from_samples(&mut redirector, 0.0),
        iptables_restore: Stats::from_samples(&mut restore, 0.0),
        iptables_in_force: Stats::from_samples(&mut in_force, 0.0),
        agent_rss_kib,
        at_scale,
    })
}

/// What [`Flipper::flip`] timed, one sample per change.
struct Flips {
    /// Change → new verdict seen.
    in_force: Vec<Duration>,
    /// Change → the agent logged the pass.
    pass: Vec<Duration>,
    /// From the agent's log timestamps: SIGHUP received → pass logged.
    agent_side: Vec<Duration>,
}

/// Changes the agent's config and times each change.
#[derive(Clone)]
struct Flipper {
    config: PathBuf,
    pid: i32,
    log: PathBuf,
    /// The probed workload's namespace, and the cgroup whose programs
    /// redirect it.
    app: PathBuf,
    cgroup: PathBuf,
}

impl Flipper {
    /// Renames `text` into place (the agent never reads half a file) and
    /// SIGHUPs the agent.
    fn install(&self, text: &str) -> Result<()> {
        let next = self.config.with_extension("next");
        std::fs::write(&next, text).with_context(|| format!("writing {}", next.display()))?;
        std::fs::rename(&next, &self.config)
            .with_context(|| format!("renaming {} to {}", next.display(), self.config.display()))?;
        // SAFETY: signalling the agent we started.
        if unsafe { libc::kill(self.pid, libc::SIGHUP) } != 0 {
            return Err(std::io::Error::last_os_error()).context("SIGHUP to the agent");
        }
        Ok(())
    }

    /// Installs `text` and waits until the agent has logged the pass that
    /// read it.
    fn settle(&self, text: &str) -> Result<()> {
        let mut log = PassLog::new(&self.log);
        let (before, t) = (log.passes, Instant::now());
        self.install(text)?;
        log.wait_beyond(before, t)
    }

    /// `changes` times, installs `texts[1]` (the probe port excluded) and
    /// `texts[0]` (redirected) in turn: SIGHUP → the new verdict seen from
    /// the workload, and SIGHUP → the agent has logged the end of that pass
    /// (awaited before the next change, so that no change queues behind
    /// the rest of the previous pass).
    fn flip(&self, texts: &[String; 2], changes: usize) -> Result<Flips> {
        let (me, texts) = (self.clone(), texts.clone());
        in_cgroup(&self.cgroup, || {
            testkit::in_netns_as(&self.app, 0, move || -> Result<Flips> {
                let (mut in_force, mut pass) = (Vec::new(), Vec::new());
                let mut log = PassLog::new(&me.log);
                for i in 0..changes {
                    super::interrupted()?;
                    let excluded = i % 2 == 0;
                    let before = log.poll();
                    let t = Instant::now();
                    me.install(&texts[usize::from(excluded)])?;
                    wait_for_verdict(excluded, t)?;
                    in_force.push(t.elapsed());
                    log.wait_beyond(before, t)?;
                    pass.push(t.elapsed());
                }
                Ok(Flips { in_force, pass, agent_side: log.agent_side })
            })
        })??
    }
}

/// Counts the passes the agent logs (`applied: …`, one per pass that
/// changed something), reading only what was appended since the last look
/// (re-reading a log that holds a line naming 10,000 workloads every poll
/// would take the CPU the agent's pass needs).
struct PassLog {
    log: PathBuf,
    offset: u64,
    passes: usize,
    /// The agent's own view, from its log timestamps: SIGHUP received →
    /// that pass logged, for each pass that followed a SIGHUP.
    agent_side: Vec<Duration>,
    hup_at: Option<Duration>,
}

/// The time of day of an agent log line (`2026-12-01T12:38:53.159734Z …`).
fn log_time(line: &str) -> Option<Duration> {
    let t = line.split_whitespace().next()?.split_once('T')?.1.strip_suffix('Z')?;
    let mut parts = t.split(':');
    let (h, m, sec): (u64, u64, f64) =
        (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some(Duration::from_secs(h * 3600 + m * 60) + Duration::from_secs_f64(sec))
}

impl PassLog {
    fn new(log: &Path) -> Self {
        let mut me = Self { log: log.to_owned(), offset: 0, passes: 0, agent_side: Vec::new(), hup_at: None };
        me.poll();
        me.agent_side.clear();
        me
    }

    /// Passes logged so far (complete lines only).
    fn poll(&mut self) -> usize {
        use std::io::{Seek as _, SeekFrom};
        let mut new = Vec::new();
        let read = std::fs::File::open(&self.log)
            .and_then(|mut f| f.seek(SeekFrom::Start(self.offset)).and_then(|_| f.read_to_end(&mut new)));
        if read.is_ok() {
            if let Some(end) = new.iter().rposition(|b| *b == b'\n') {
                for line in String::from_utf8_lossy(&new[..=end]).lines() {
                    if line.contains("SIGHUP: re-reading") {
                        self.hup_at = log_time(line);
                    } else if line.contains("applied: ") {
                        self.passes += 1;
                        if let (Some(hup), Some(done)) = (self.hup_at.take(), log_time(line)) {
                            // Across midnight the difference is meaningless.
                            if let Some(d) = done.checked_sub(hup) {
                                self.agent_side.push(d);
                            }
                        }
                    }
                }
                self.offset += end as u64 + 1;
            }
        }
        self.passes
    }

    /// Waits until more than `before` passes are logged.
    fn wait_beyond(&mut self, before: usize, since: Instant) -> Result<()> {
        while self.poll() == before {
            if since.elapsed() > Duration::from_secs(60) {
                bail!("the agent logged no pass within 60 s of a change");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(())
    }
}

/// Threads of this process, each parked alone in a network namespace of
/// its own: stand-in workloads for the scale scenarios, named in a config
/// by thread id (`pid:` → /proc/<tid>/ns/net). Dropping them ends the
/// threads and with them the namespaces.
struct ParkedNamespaces {
    tids: Vec<i32>,
    release: Option<std::sync::mpsc::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ParkedNamespaces {
    fn new(n: usize) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (release, parked) = std::sync::mpsc::channel::<()>();
        let parked = std::sync::Arc::new(std::sync::Mutex::new(parked));
        let mut me = Self { tids: Vec::with_capacity(n), release: Some(release), threads: Vec::with_capacity(n) };
        for _ in 0..n {
            let (tx, parked) = (tx.clone(), parked.clone());
            let t = std::thread::Builder::new().stack_size(64 << 10).spawn(move || {
                // SAFETY: moves only this thread into a new network namespace.
                let r = if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
                    // SAFETY: gettid has no preconditions.
                    Ok(unsafe { libc::gettid() })
                } else {
                    Err(std::io::Error::last_os_error())
                };
                let ok = r.is_ok();
                let _ = tx.send(r);
                if ok {
                    // Until the sender is dropped: every thread then returns.
                    let _ = parked.lock().map(|p| p.recv());
                }
            })?;
            me.threads.push(t);
        }
        drop(tx);
        for r in rx.iter().take(n) {
            me.tids.push(r.context("unshare(CLONE_NEWNET) for a workload thread")?);
        }
        Ok(me)
    }

    /// Config entries for them, named `{prefix}0`, `{prefix}1`, …
    fn workloads_yaml(&self, prefix: &str) -> String {
        self.tids.iter().enumerate().map(|(i, tid)| format!("  - name: {prefix}{i}\n    pid: {tid}\n")).collect()
    }

    fn last_netns(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.tids.last().copied().unwrap_or(0)))
    }
}

impl Drop for ParkedNamespaces {
    fn drop(&mut self) {
        drop(self.release.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Connects to 192.0.2.10:[`PROBE_PORT`] over and over until the answer
/// shows the expected verdict: `direct …` (excluded) or `proxy …` (the
/// same probing for every setup).
fn wait_for_verdict(excluded: bool, since: Instant) -> Result<()> {
    let dst = SocketAddr::from(([192, 0, 2, 10], PROBE_PORT));
    let want: &[u8] = if excluded { b"direct " } else { b"proxy " };
    let mut buf = [0u8; 128];
    let mut last = String::new();
    while since.elapsed() < Duration::from_secs(5) {
        // Back to back for the first 2 ms; then 200 µs apart, so that on a
        // small machine the probes do not take the CPU the change being
        // timed needs (at most 0.2 ms more on what is measured).
        if since.elapsed() > Duration::from_millis(2) {
            std::thread::sleep(Duration::from_micros(200));
        }
        let answer = (|| -> std::io::Result<usize> {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.read(&mut buf)
        })();
        match answer {
            Ok(n) if buf[..n].starts_with(want) => return Ok(()),
            Ok(n) => last = String::from_utf8_lossy(&buf[..n]).trim().to_string(),
            Err(e) => last = e.to_string(),
        }
    }
    bail!(
        "{dst} was not {} 5 s after the change; last answer: {last}",
        if excluded { "excluded" } else { "redirected" }
    )
}

/// What one full sync of N synthetic workloads measured (the `bench-sync`
/// child process prints it as JSON).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct SyncRun {
    pub workloads: usize,
    /// Loading and attaching the programs, creating the maps.
    pub load_ms: f64,
    /// First apply: every workload new.
    pub sync_ms: f64,
    /// The same desired state again (nothing changes).
    pub resync_unchanged_ms: f64,
    /// One workload's policy changed, with all the others listed.
    pub one_change_ms: f64,
    pub port_entries: usize,
    pub cidr_entries: usize,
    /// VmRSS of the process before loading, after loading, after the sync;
    /// VmHWM at the end.
    pub rss_start_kib: u64,
    pub rss_loaded_kib: u64,
    pub rss_synced_kib: u64,
    pub rss_peak_kib: u64,
    /// `memlock` of each pinned map (its kernel memory) and its capacity
    /// (`max_entries`, as the kernel reports it).
    pub maps: Vec<MapMemory>,
    pub map_memory_bytes: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct MapMemory {
    pub name: String,
    pub capacity: u32,
    pub memlock_bytes: u64,
}

/// osm-init's side of a full sync: `iptables-restore` of the per-pod rule
/// set into a fresh network namespace, once per pod.
#[derive(Serialize)]
pub struct OsmInitSync {
    /// Pods restored for real; `total_ms` is `per_pod_ms × workloads` when
    /// this is smaller than `workloads`.
    pub measured_pods: usize,
    pub extrapolated: bool,
    /// One pod's restore (µs).
    pub per_pod: Stats,
    pub total_ms: f64,
}

#[derive(Serialize)]
pub struct Sync {
    pub workloads: usize,
    pub policy: String,
    /// `Dataplane::apply` in a process of its own (the agent's code without
    /// its tokio loop): synthetic namespace cookies, inbound off.
    pub redirector: SyncRun,
    pub iptables: OsmInitSync,
    /// sync_ms / iptables total.
    pub ratio_vs_iptables: f64,
}

/// The per-workload policy of the sync: OSM's defaults (5 reserved inbound
/// ports), 3 excluded ports and 3 excluded CIDRs, inbound off (synthetic
/// workloads have no namespace to attach `sk_lookup` to).
fn sync_policy() -> Result<Policy> {
    let cfg = parse_config(
        "mesh:\n  inbound: false\n  outboundPortExclusionList: [6379, 7070, 9000]\n  \
         outboundIPRangeExclusionList: [\"198.51.100.0/24\", \"203.0.113.0/25\", \"192.0.2.128/25\"]\n\
         workloads:\n  - name: w\n    netns: /run/netns/w\n",
    )
    .context("the sync policy")?;
    Ok(compile(&cfg.mesh, &cfg.workloads[0].annotations))
}

const SYNC_POLICY: &str = "OSM defaults, 3 excluded ports, 3 excluded CIDRs, inbound off";

/// Synthetic netns cookies: far above the kernel's (which count from 1).
const COOKIE_BASE: u64 = 1 << 48;

/// `redirector-lab bench-sync`: one full sync in this process, JSON on stdout.
pub fn sync_child(workloads: usize, cgroup: &Path) -> Result<()> {
    let rss = || sys::proc_field("/proc/self/status", "VmRSS");
    let rss_start_kib = rss()?;
    let pins = PinDir::new()?;
    let t = Instant::now();
    let mut dp = Dataplane::load(&pins.path, cgroup)?;
    let load_ms = ms(t);
    let rss_loaded_kib = rss()?;
    let policy = sync_policy()?;
    let mut desired: Vec<Desired> = (0..workloads)
        .map(|i| Desired {
            name: format!("w{i}"),
            cookie: COOKIE_BASE + i as u64,
            netns: PathBuf::from("/nonexistent"),
            policy: policy.clone(),
        })
        .collect();
    let apply = |dp: &mut Dataplane, desired: &[Desired], what: &str| -> Result<(f64, usize, usize)> {
        let t = Instant::now();
        let r = dp.apply(desired, &BTreeSet::new());
        let took = ms(t);
        if let Some((name, e)) = r.errors.first() {
            bail!("{what} of {workloads} workloads: {} errors, the first: {name}: {e:#}", r.errors.len());
        }
        Ok((took, r.programmed.len(), r.unchanged.len()))
    };
    let (sync_ms, programmed, _) = apply(&mut dp, &desired, "sync")?;
    if programmed != workloads {
        bail!("sync programmed {programmed} of {workloads} workloads");
    }
    let rss_synced_kib = rss()?;
    let (resync_unchanged_ms, _, unchanged) = apply(&mut dp, &desired, "re-sync")?;
    if unchanged != workloads {
        bail!("re-sync left {unchanged} of {workloads} workloads unchanged");
    }
    if let Some(d) = desired.first_mut() {
        d.policy.outbound_port_exclusion.insert(PROBE_PORT);
    }
    let (one_change_ms, programmed, _) = apply(&mut dp, &desired, "one change")?;
    if programmed != usize::from(workloads > 0) {
        bail!("one change programmed {programmed} workloads");
    }
    let port_entries = dp.maps.port_keys()?.len();
    let cidr_entries = dp.maps.cidr_keys()?.len();
    let mut maps = Vec::new();
    for name in map_names::PINNED {
        let fd = redirector::sys::bpf::obj_get(&pins.path.join(name))?;
        let memlock_bytes =
            sys::proc_field(&format!("/proc/self/fdinfo/{}", std::os::fd::AsRawFd::as_raw_fd(&fd)), "memlock")?;
        let capacity = aya::maps::MapInfo::from_pin(pins.path.join(name))
            .with_context(|| format!("map info of {name}"))?
            .max_entries();
        maps.push(MapMemory { name: name.to_string(), capacity, memlock_bytes });
    }
    let run = SyncRun {
        workloads,
        load_ms,
        sync_ms,
        resync_unchanged_ms,
        one_change_ms,
        port_entries,
        cidr_entries,
        rss_start_kib,
        rss_loaded_kib,
        rss_synced_kib,
        rss_peak_kib: sys::proc_field("/proc/self/status", "VmHWM")?,
        map_memory_bytes: maps.iter().map(|m| m.memlock_bytes).sum(),
        maps,
    };
    println!("{}", serde_json::to_string(&run)?);
    drop(dp);
    drop(pins);
    Ok(())
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Full syncs of each size, each in a `bench-sync` child process, next to
/// osm-init's per-pod restores (for real up to `max_real_pods` pods).
pub fn syncs(sizes: &[usize], max_real_pods: usize) -> Result<Vec<Sync>> {
    let policy = sync_policy()?;
    let rules = std::env::temp_dir().join(testkit::unique("redirector-bench-pod-rules-"));
    std::fs::write(&rules, restore_input(&osm_init_commands(&policy)))
        .with_context(|| format!("writing {}", rules.display()))?;
    let r = (|| {
        let mut out = Vec::new();
        for &n in sizes {
            super::interrupted()?;
            eprintln!("bench: full sync of {n} workloads");
            let redirector = sync_in_child(n)?;
            let pods = n.min(max_real_pods);
            let mut per_pod = osm_init_restores(pods, &rules)?;
            let measured_total: f64 = per_pod.iter().map(|d| d.as_secs_f64() * 1e3).sum();
            let total_ms = if pods == n { measured_total } else { measured_total / pods as f64 * n as f64 };
            let per_pod = Stats::from_samples(&mut per_pod, 0.0);
            let iptables = OsmInitSync { measured_pods: pods, extrapolated: pods < n, per_pod, total_ms };
            let s = Sync {
                workloads: n,
                policy: SYNC_POLICY.into(),
                ratio_vs_iptables: super::stats::ratio(redirector.sync_ms, total_ms),
                redirector,
                iptables,
            };
            println!("{}", sync_row(&s));
            out.push(s);
        }
        Ok(out)
    })();
    let _ = std::fs::remove_file(&rules);
    r
}

fn sync_in_child(workloads: usize) -> Result<SyncRun> {
    let cgroup = BenchCgroup::new("redirector-bench-sync-")?;
    let bin = std::env::current_exe()?;
    let out = Command::new(&bin)
        .args(["bench-sync", "--workloads", &workloads.to_string(), "--cgroup"])
        .arg(&cgroup.path)
        .output()
        .with_context(|| format!("running {} bench-sync", bin.display()))?;
    if !out.status.success() {
        bail!("bench-sync --workloads {workloads} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("bench-sync output {text:?}"))
}

/// `iptables-restore` of `rules` into `pods` fresh network namespaces, one
/// after the other (each made by a thread's `unshare`, gone with it).
fn osm_init_restores(pods: usize, rules: &Path) -> Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(pods);
    for _ in 0..pods {
        super::interrupted()?;
        let rules = rules.to_owned();
        let took = std::thread::spawn(move || -> Result<Duration> {
            // SAFETY: moves only this thread into a new network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET)");
            }
            let t = Instant::now();
            let res = Command::new("iptables-restore").arg(&rules).output().context("running iptables-restore")?;
            if !res.status.success() {
                bail!("iptables-restore {}: {}", rules.display(), String::from_utf8_lossy(&res.stderr).trim());
            }
            Ok(t.elapsed())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("iptables-restore thread panicked"))??;
        out.push(took);
    }
    Ok(out)
}

/// A real `redirector run` with N workloads: RSS once all are programmed.
#[derive(Serialize)]
pub struct AgentScale {
    pub workloads: usize,
    pub policy: String,
    /// Agent start → its log says the programs are attached (probe, load).
    pub attached_ms: f64,
    /// Agent start → its log reports the first pass: every workload
    /// programmed (polled every 2 ms).
    pub programmed_ms: f64,
    pub rss_kib: u64,
    pub rss_peak_kib: u64,
}

/// Starts the agent on `n` workloads, each a parked thread of this process
/// alone in a new network namespace, named in the config by its thread id
/// (`pid:` → /proc/<tid>/ns/net); inbound off, the sync's policy.
pub fn agent_at_scale(n: usize) -> Result<AgentScale> {
    eprintln!("bench: the agent with {n} workloads");
    let workloads = ParkedNamespaces::new(n)?;
    let result = (|| -> Result<AgentScale> {
        let mut cfg = String::from(
            "mesh:\n  inbound: false\n  outboundPortExclusionList: [6379, 7070, 9000]\n  \
             outboundIPRangeExclusionList: [\"198.51.100.0/24\", \"203.0.113.0/25\", \"192.0.2.128/25\"]\nworkloads:\n",
        );
        cfg.push_str(&workloads.workloads_yaml("w"));
        let cgroup = BenchCgroup::new("redirector-bench-agent-")?;
        let pins = PinDir::new()?;
        let dir = TempDir::new("redirector-bench-agent-")?;
        let file = dir.0.join("config.yaml");
        std::fs::write(&file, cfg).with_context(|| format!("writing {}", file.display()))?;
        let bin = testkit::agent_binary()?;
        let t = Instant::now();
        let agent = testkit::AgentProcess::start(&bin, &file, &cgroup.path, &pins.path, &dir.0.join("agent.log"))?;
        let (mut attached_ms, mut programmed_ms) = (None, None);
        while programmed_ms.is_none() && t.elapsed() < Duration::from_secs(60) {
            let log = agent.log_text();
            if attached_ms.is_none() && log.contains("attached to cgroup") {
                attached_ms = Some(ms(t));
            }
            if log.contains("applied: ") {
                programmed_ms = Some(ms(t));
                let want = format!("applied: {n} programmed");
                if !log.contains(&want) {
                    bail!("the agent's first pass did not program all {n} workloads:\n{log}");
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let programmed_ms =
            programmed_ms.with_context(|| format!("the agent did not report its first pass:\n{}", agent.log_text()))?;
        agent.wait_programmed(&bin, &pins.path, &workloads.last_netns())?;
        let status = format!("/proc/{}/status", agent.child.id());
        Ok(AgentScale {
            workloads: n,
            policy: SYNC_POLICY.into(),
            attached_ms: attached_ms.unwrap_or(programmed_ms),
            programmed_ms,
            rss_kib: sys::proc_field(&status, "VmRSS")?,
            rss_peak_kib: sys::proc_field(&status, "VmHWM")?,
        })
        // Dropped in reverse order: the agent stops, then its files,
        // pins and cgroup go.
    })();
    drop(workloads);
    result
}

/// One full-sync row, as printed while running and in `results.md`.
pub fn sync_row(s: &Sync) -> String {
    let r = &s.redirector;
    let i = &s.iptables;
    format!(
        "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {} / {} | {} / {} / {} | {:.1} | {:.0} ({}{}) | {:.3} |",
        s.workloads,
        r.load_ms,
        r.sync_ms,
        r.resync_unchanged_ms,
        r.one_change_ms,
        r.port_entries,
        r.cidr_entries,
        mib(r.rss_start_kib),
        mib(r.rss_loaded_kib),
        mib(r.rss_synced_kib),
        r.map_memory_bytes as f64 / (1024.0 * 1024.0),
        i.total_ms,
        i.measured_pods,
        if i.extrapolated { ", extrapolated" } else { "" },
        s.ratio_vs_iptables
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only complete lines count, each once, however the appends are cut.
    #[test]
    fn pass_log_counts_appended_complete_lines_once() {
        use std::io::Write as _;
        let dir = TempDir::new("redirector-passlog-").unwrap();
        let path = dir.0.join("agent.log");
        let mut f = std::fs::File::create(&path).unwrap();
        writeln!(f, "INFO attached\nINFO applied: 3 programmed").unwrap();
        let mut log = PassLog::new(&path);
        assert_eq!(log.passes, 1);
        write!(f, "INFO SIGHUP\nINFO appl").unwrap();
        assert_eq!(log.poll(), 1);
        writeln!(f, "ied: 1 programmed [\"w\"]").unwrap();
        assert_eq!(log.poll(), 2);
        assert_eq!(log.poll(), 2);
        writeln!(f, "INFO applied: 0 programmed\nERROR x\nINFO applied: 1 programmed").unwrap();
        assert_eq!(log.poll(), 4);
        assert!(log.wait_beyond(3, Instant::now()).is_ok());
        // SIGHUP received → pass logged, from the agent's timestamps.
        writeln!(f, "2026-12-01T12:38:53.159734Z  INFO redirector::agent: SIGHUP: re-reading /c.yaml").unwrap();
        writeln!(f, "2026-12-01T12:38:53.177957Z  INFO redirector::agent: applied: 1 programmed").unwrap();
        assert_eq!(log.poll(), 5);
        assert_eq!(log.agent_side.len(), 1);
        assert!((log.agent_side[0].as_secs_f64() - 0.018223).abs() < 1e-6, "{:?}", log.agent_side);
        assert_eq!(log_time("12:00 x"), None);
    }

    #[test]
    fn sync_policy_fits_the_maps_at_10000_workloads() {
        let p = sync_policy().unwrap();
        let e = redirector_policy::map_entries(&p, 1);
        assert!(!p.inbound);
        assert_eq!((e.ports.len(), e.cidrs.len()), (8, 3));
        assert!(10_000 * e.ports.len() as u32 <= redirector_common::MAX_PORT_RULES);
        assert!(10_000 * e.cidrs.len() as u32 <= redirector_common::MAX_CIDR_RULES);
        const { assert!(10_000 <= redirector_common::MAX_WORKLOADS) };
    }
}
