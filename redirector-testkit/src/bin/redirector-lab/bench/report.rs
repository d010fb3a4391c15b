//! results.json and results.md.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::{
    bpfstats::ProgCost,
    control::{sync_row, AgentScale, ChangeLatency, Sync},
    dns::{section as dns_section, DnsRates},
    established::{established_row, Established, Pattern},
    newconn::{cost_row, newconn_row, stats_row, Direction, Scenario},
    stats::{mib, ms},
};

#[derive(Serialize)]
pub struct ControlPlane {
    pub change: ChangeLatency,
    pub sync: Vec<Sync>,
    pub agent: Vec<AgentScale>,
}

#[derive(Serialize)]
pub struct Report {
    pub machine: String,
    pub kernel: String,
    pub quick: bool,
    /// 1-minute load average before and after: well above 0 before means
    /// something else (a compile) was running; read the numbers with care.
    pub loadavg_1min_before: f64,
    pub loadavg_1min_after: f64,
    pub wall_seconds: f64,
    pub rounds: usize,
    pub seconds_per_round: f64,
    /// The CPU of the pinned regime (client and proxy stand-in).
    pub pinned_cpu: usize,
    /// Programs on the agent's hooks attached above the bench's cgroups
    /// (so running for every setup alike); empty on a clean machine.
    pub inherited_programs: Vec<String>,
    pub scenarios: Vec<Scenario>,
    pub established: Vec<Established>,
    /// DNS capture: UDP queries per second.
    pub dns: Vec<DnsRates>,
    pub control_plane: ControlPlane,
    /// The goals (not assertions), each with what this run measured.
    pub targets: Vec<Target>,
}

#[derive(Serialize)]
pub struct Target {
    pub goal: String,
    pub measured: String,
    /// None: not measured in this run (e.g. a size --quick leaves out).
    pub met: Option<bool>,
}

/// The goals of the bench issue against a report's numbers.
pub fn targets(scenarios: &[Scenario], established: &[Established], cp: &ControlPlane) -> Vec<Target> {
    let mut t = Vec::new();
    if let Some(e) = established.iter().find(|e| e.pattern == Pattern::RequestResponse) {
        t.push(Target {
            goal: format!("sockmap: {} request rate ≥ 1.5 × iptables (issue 7)", e.name),
            measured: format!(
                "{:.2} × iptables ({:.2} × plain redirector, {:.2} × none)",
                e.sockmap_vs_iptables, e.sockmap_vs_redirector, e.sockmap_vs_none
            ),
            met: Some(e.sockmap_vs_iptables >= 1.5),
        });
    }
    let p99 = cp.change.redirector_in_force.p99_us / 1e3;
    let scaled: Vec<String> = cp
        .change
        .at_scale
        .iter()
        .map(|a| {
            format!(
                "{:.2} ms with {} workloads, {} ({} changes)",
                a.in_force.p99_us / 1e3,
                a.workloads,
                a.change,
                a.changes
            )
        })
        .collect();
    let passes: Vec<String> =
        cp.sync.iter().map(|s| format!("{:.1} ms at {} workloads", s.redirector.one_change_ms, s.workloads)).collect();
    let worst = cp.change.at_scale.iter().map(|a| a.in_force.p99_us / 1e3).fold(p99, f64::max);
    t.push(Target {
        goal: "change to in force, p99 ≤ 5 ms".into(),
        measured: format!(
            "{p99:.2} ms over {} changes with one workload{}{} (SIGHUP → new verdict seen); Dataplane::apply with one change: {}",
            cp.change.changes,
            if scaled.is_empty() { "" } else { "; " },
            scaled.join(", "),
            passes.join(", ")
        ),
        met: Some(worst <= 5.0),
    });
    // Issue 19's goals at scale: one workload's change, and a mesh-wide
    // one until every workload has it (the pass's end).
    for (change, workloads, goal_ms, until_all) in
        [("one workload", 1001, 2.0, false), ("one workload", 10001, 5.0, false), ("mesh-wide", 10001, 20.0, true)]
    {
        let Some(a) = cp.change.at_scale.iter().find(|a| a.change == change && a.workloads == workloads) else {
            continue;
        };
        let p99 = if until_all { a.pass.p99_us } else { a.in_force.p99_us } / 1e3;
        t.push(Target {
            goal: format!(
                "{change} change with {workloads} workloads {}, p99 ≤ {goal_ms} ms (issue 19)",
                if until_all { "in force for all" } else { "in force" }
            ),
            measured: format!("{p99:.2} ms ({} changes)", a.changes),
            met: Some(p99 <= goal_ms),
        });
    }
    let at_1000 = cp.sync.iter().find(|s| s.workloads == 1000);
    let agent_1000 = cp.agent.iter().find(|a| a.workloads == 1000);
    t.push(match at_1000 {
        Some(s) => Target {
            goal: "full sync of 1,000 workloads ≤ 1 s".into(),
            measured: match agent_1000 {
                Some(a) => format!(
                    "{:.1} ms (Dataplane::apply); the agent: {:.0} ms from its start to all 1,000 programmed",
                    s.redirector.sync_ms, a.programmed_ms
                ),
                None => format!("{:.1} ms (Dataplane::apply)", s.redirector.sync_ms),
            },
            met: Some(s.redirector.sync_ms <= 1000.0 && agent_1000.is_none_or(|a| a.programmed_ms <= 1000.0)),
        },
        None => Target { goal: "full sync of 1,000 workloads ≤ 1 s".into(), measured: "not run".into(), met: None },
    });
    let goal = "agent RSS at 1,000 workloads ≤ 50 MiB".to_string();
    t.push(match (cp.agent.iter().find(|a| a.workloads == 1000), at_1000) {
        (Some(a), _) => Target {
            goal,
            measured: format!(
                "{} MiB VmRSS, {} MiB peak (VmHWM): `redirector run`, all 1,000 programmed",
                mib(a.rss_kib),
                mib(a.rss_peak_kib)
            ),
            met: Some(a.rss_kib.max(a.rss_peak_kib) as f64 / 1024.0 <= 50.0),
        },
        (None, Some(s)) => {
            let r = &s.redirector;
            Target {
                goal,
                measured: format!(
                    "{} MiB VmRSS after the sync, {} MiB peak (VmHWM), in the bench-sync process",
                    mib(r.rss_synced_kib),
                    mib(r.rss_peak_kib)
                ),
                met: Some(r.rss_synced_kib.max(r.rss_peak_kib) as f64 / 1024.0 <= 50.0),
            }
        }
        (None, None) => Target { goal, measured: "not run".into(), met: None },
    });
    // Issue 19's new-connection goals.
    let worst = |pick: fn(&Scenario) -> f64| {
        scenarios.iter().map(|s| (pick(s), s.name.as_str())).min_by(|a, b| a.0.total_cmp(&b.0))
    };
    if let Some((r, name)) = worst(|s| s.pinned.ratio_vs_none) {
        t.push(Target {
            goal: "pinned: redirector/none ≥ 0.95 in every new-connection scenario (issue 19)".into(),
            measured: format!("{r:.2} at worst ({name})"),
            met: Some(r >= 0.95),
        });
    }
    let bare: Vec<&Scenario> = scenarios.iter().filter(|s| s.excluded_cidrs == 0 && s.excluded_ports == 0).collect();
    if !bare.is_empty() {
        let r = bare.iter().map(|s| s.pinned.ratio_vs_iptables).fold(f64::INFINITY, f64::min);
        let each: Vec<String> = bare
            .iter()
            .map(|s| {
                format!("{} {:.2}", s.name.replace(" new connections, no exclusions", ""), s.pinned.ratio_vs_iptables)
            })
            .collect();
        t.push(Target {
            goal: "pinned: redirector/iptables ≥ 1.35 with no exclusions (issue 19)".into(),
            measured: each.join(", "),
            met: Some(r >= 1.35),
        });
    }
    if let Some((r, name)) = worst(|s| s.idle.ratio_vs_none) {
        t.push(Target {
            goal: "idle: redirector/none ≥ 0.97 in every new-connection scenario (issue 19)".into(),
            measured: format!("{r:.2} at worst ({name})"),
            met: Some(r >= 0.97),
        });
    }
    t
}

impl Report {
    /// Writes results.json and results.md (which links the `plots`, or
    /// describes them when they carry no text).
    pub fn write(&self, out: &Path, plots: &[PathBuf], plots_have_text: bool) -> Result<()> {
        let json = out.join("results.json");
        std::fs::write(&json, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", json.display()))?;
        let mut md = self.markdown();
        md.push_str("\n### Plots\n\n");
        for f in plots {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let _ = writeln!(md, "![{name}]({name})");
        }
        if !plots_have_text {
            md.push_str(
                "\nNo TrueType font was found (fonts-dejavu-core), so the plots carry no text. rate_vs_rules.png, left to right: \
                 outbound vs excluded CIDRs, inbound vs excluded CIDRs, outbound vs excluded ports; latency_cdf.png: outbound and \
                 inbound new connections without exclusions, outbound with the most CIDRs, change to in force. \
                 Grey: none (iptables-restore's exit in the last), red: iptables, blue: redirector.\n",
            );
        }
        let mdp = out.join("results.md");
        std::fs::write(&mdp, &md).with_context(|| format!("writing {}", mdp.display()))?;
        println!("\n{md}\nwritten: {}, {} and the plots", json.display(), mdp.display());
        Ok(())
    }

    fn markdown(&self) -> String {
        let mut o = format!(
            "Kernel {}, {}; {} alternating rounds of {} s per setup and regime; single-threaded client; pinned regime on CPU {}; \
             load average {:.2} before, {:.2} after; {:.0} s in all.\n\n",
            self.kernel,
            self.machine,
            self.rounds,
            self.seconds_per_round,
            self.pinned_cpu,
            self.loadavg_1min_before,
            self.loadavg_1min_after,
            self.wall_seconds
        );
        if !self.inherited_programs.is_empty() {
            let _ = writeln!(
                o,
                "Programs attached above the bench's cgroups ran for every setup alike: {}.\n",
                self.inherited_programs.join(", ")
            );
        }
        o.push_str("### Targets (goals, not assertions)\n\n| goal | measured | met |\n|---|---|---|\n");
        for t in &self.targets {
            let met = match t.met {
                Some(true) => "yes",
                Some(false) => "no",
                None => "–",
            };
            let _ = writeln!(o, "| {} | {} | {met} |", t.goal, t.measured);
        }
        o.push_str(
            "\n### New connections, idle\n\nClient and proxy stand-in wherever the scheduler puts them (each connection pays \
             cross-CPU wake-ups).\n\n",
        );
        o.push_str(NEWCONN_HEADER);
        for s in &self.scenarios {
            let _ = writeln!(o, "{}", newconn_row(s, &s.idle));
        }
        let _ = write!(
            o,
            "\n### New connections, pinned to one CPU\n\nClient and proxy stand-in both on CPU {} (`sched_setaffinity`, as \
             `taskset` does), in the same rounds as the idle ones: a connection's time is one CPU's work.\n\n{NEWCONN_HEADER}",
            self.pinned_cpu
        );
        for s in &self.scenarios {
            let _ = writeln!(o, "{}", newconn_row(s, &s.pinned));
        }
        o.push_str(
            "\n### Per-connection cost over none\n\np50 connection time of none, and of iptables and redirector over it, in µs; \
             pinned, that is CPU time per connection. Last column: the redirector's eBPF time per connection as the kernel's \
             statistics count it, and less the statistics' floor for every run (an empty program's time per run: the part of \
             their own cost inside the counted time).\n\n",
        );
        o.push_str(COST_HEADER);
        for s in &self.scenarios {
            let _ = writeln!(o, "{}", cost_row(s));
        }
        o.push_str(
            "\n### What the BPF statistics cost\n\nPinned redirector rounds whose blocks of 1,000 connections run with \
             `BPF_ENABLE_STATS` off and on by turns: the p50 connection time with it off and on, the difference per connection \
             and per program run (its whole cost, inside and outside the counted time), and the floor (an empty program's \
             counted time per run: the part inside).\n\n",
        );
        o.push_str(STATS_HEADER);
        for s in &self.scenarios {
            let _ = writeln!(o, "{}", stats_row(s));
        }
        let _ = write!(
            o,
            "\n### Established traffic\n\nOne connection app → proxy per round (redirected to it for iptables and redirector); \
             the proxy echoes (request/response) or reads and counts (throughput). sockmap: the agent with \
             `mesh.acceleration: sockmap` (bytes moved socket to socket by sk_msg).\n\n{ESTABLISHED_HEADER}"
        );
        for e in &self.established {
            let _ = writeln!(o, "{}", established_row(e));
        }
        o.push_str(&self.bpf_table());
        if !self.dns.is_empty() {
            o.push_str(&dns_section(&self.dns));
        }
        o.push_str(&change_section(&self.control_plane.change));
        let rss: Vec<String> = self
            .scenarios
            .iter()
            .filter(|s| s.direction == Direction::Outbound)
            .filter_map(|s| {
                Some(format!("{} MiB with {}", mib(s.agent_rss_kib?), s.name.split(", ").last().unwrap_or("")))
            })
            .collect();
        if !rss.is_empty() {
            let _ = writeln!(o, "In the new-connection scenarios (one workload): {}.", rss.join("; "));
        }
        let _ = write!(
            o,
            "\n### Full sync\n\nredirector: `Dataplane::apply` of N synthetic workloads in a process of its own \
             (`redirector-lab bench-sync`: the agent's data-plane code without its event loop). osm-init: \
             `iptables-restore` of the same per-pod policy into a fresh network namespace per pod, one after the other.\n\n{SYNC_HEADER}"
        );
        for s in &self.control_plane.sync {
            let _ = writeln!(o, "{}", sync_row(s));
        }
        if !self.control_plane.agent.is_empty() {
            o.push_str(
                "\nThe agent itself (`redirector run`) with N workloads, each a parked thread of the bench alone in a network \
                 namespace of its own, named by `pid:`; the same policy, inbound off:\n\n\
                 | workloads | start → programs attached ms | start → all workloads programmed ms | VmRSS MiB | VmHWM MiB |\n|---|---|---|---|---|\n",
            );
            for a in &self.control_plane.agent {
                let _ = writeln!(
                    o,
                    "| {} | {:.0} | {:.0} | {} | {} |",
                    a.workloads,
                    a.attached_ms,
                    a.programmed_ms,
                    mib(a.rss_kib),
                    mib(a.rss_peak_kib)
                );
            }
        }
        if let Some(s) = self.control_plane.sync.last() {
            let _ = write!(o, "\nMap memory at {} workloads (memlock, KiB): ", s.workloads);
            let maps: Vec<String> = s
                .redirector
                .maps
                .iter()
                .map(|m| format!("{} {} (capacity {})", m.name, m.memlock_bytes / 1024, m.capacity))
                .collect();
            let _ = writeln!(o, "{}.", maps.join(", "));
        }
        o
    }
}

const ESTABLISHED_HEADER: &str = "| pattern | none | iptables | redirector | sockmap | redirector/none | redirector/iptables | sockmap/none | sockmap/iptables | sockmap/redirector |\n|---|---|---|---|---|---|---|---|---|---|\n";

impl Report {
    /// ns per run (runs per connection or transaction) of each program.
    fn bpf_table(&self) -> String {
        let rows: Vec<(String, &[ProgCost])> = self
            .scenarios
            .iter()
            .map(|s| (s.name.clone(), s.bpf.programs.as_slice()))
            .chain(self.established.iter().map(|e| (e.name.clone(), e.bpf_programs.as_slice())))
            .chain(self.established.iter().map(|e| (format!("{}, sockmap", e.name), e.bpf_programs_sockmap.as_slice())))
            .filter(|(_, p)| !p.is_empty())
            .collect();
        let mut names: Vec<&str> = Vec::new();
        for (_, progs) in &rows {
            for p in progs.iter() {
                if !names.contains(&p.program.as_str()) {
                    names.push(&p.program);
                }
            }
        }
        let mut o = String::from(
            "\n### eBPF cost per program\n\nFrom the kernel's run-time statistics (`run_time_ns / run_cnt`), as counted (the \
             statistics' floor included): new connections in the pinned blocks with the statistics on, established traffic in one \
             extra round with them on: ns per run (runs per connection, or per transaction).\n\n| scenario |",
        );
        for n in &names {
            let _ = write!(o, " {n} |");
        }
        o.push_str("\n|---|");
        o.push_str(&"---|".repeat(names.len()));
        o.push('\n');
        for (name, progs) in rows {
            let _ = write!(o, "| {name} |");
            for n in &names {
                // Several sk_lookup instances (one per workload) add up.
                let (runs, ns, per_op) = progs
                    .iter()
                    .filter(|p| p.program == *n)
                    .fold((0u64, 0u64, 0f64), |a, p| (a.0 + p.runs, a.1 + p.run_time_ns, a.2 + p.runs_per_op));
                let cell = if runs == 0 {
                    "–".to_string()
                } else {
                    format!("{:.0} ({:.2})", ns as f64 / runs as f64, per_op)
                };
                let _ = write!(o, " {cell} |");
            }
            o.push('\n');
        }
        o
    }
}

const SYNC_HEADER: &str = "| workloads | redirector load ms | sync ms | re-sync (unchanged) ms | one change ms | port / CIDR entries | RSS start / loaded / synced MiB | map memory MiB | osm-init restores ms (pods measured) | redirector/iptables |\n|---|---|---|---|---|---|---|---|---|---|\n";

const COST_HEADER: &str = "| scenario | idle: none p50 µs | iptables +µs | redirector +µs | pinned: none p50 µs | iptables +µs | redirector +µs | redirector's eBPF µs per connection, counted / less floor |\n|---|---|---|---|---|---|---|---|\n";

const STATS_HEADER: &str = "| scenario | program runs per connection | floor ns per run | statistics off: p50 µs | on: p50 µs | on − off ns per connection | ns per run |\n|---|---|---|---|---|---|---|\n";

const NEWCONN_HEADER: &str = "| scenario | iptables rules | none conn/s (p50/p99 µs) | iptables conn/s (p50/p99 µs) | redirector conn/s (p50/p99 µs) | redirector/none | redirector/iptables |\n|---|---|---|---|---|---|---|\n";

/// The change-to-in-force section of results.md (also what `bench --only
/// changes` writes).
pub fn change_section(c: &ChangeLatency) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "\n### Change to in force\n\n{} changes per setup ({}); probe connections back to back until the new verdict shows.\n\n\
         | setup | p50 ms | p90 ms | p99 ms | max ms |\n|---|---|---|---|---|\n",
        c.changes, c.policy
    );
    for (what, st) in [
        ("redirector: SIGHUP → new verdict seen", &c.redirector_in_force),
        ("iptables: `iptables-restore` of osm-init's whole set, start → exit", &c.iptables_restore),
        ("iptables: start → new verdict seen", &c.iptables_in_force),
    ] {
        let _ =
            writeln!(o, "| {what} | {} | {} | {} | {} |", ms(st.p50_us), ms(st.p90_us), ms(st.p99_us), ms(st.max_us));
    }
    if let Some(kib) = c.agent_rss_kib {
        let _ = writeln!(o, "\nThe agent (`redirector run`, this one workload) had a VmRSS of {} MiB.", mib(kib));
    }
    if !c.at_scale.is_empty() {
        let _ = write!(
            o,
            "\nThe same changes while the agent has other workloads in its config (each alone in a network \
             namespace, the same mesh settings, inbound off). A *mesh-wide* change flips the port in the mesh-wide \
             exclusion list, so every workload's lists change; a *one workload* change flips it in an annotation of the \
             probed workload alone. \"in force\" is when the probed workload sees it, \"pass end\" when the agent logs \
             the pass, every changed workload reprogrammed.\n\n\
             | change | workloads | changes | in force p50 ms | p90 ms | p99 ms | max ms | pass end p50 ms | p99 ms | the agent's log: SIGHUP → pass logged p50 ms | p99 ms | agent VmRSS MiB |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|\n"
        );
        for a in &c.at_scale {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                a.change,
                a.workloads,
                a.changes,
                ms(a.in_force.p50_us),
                ms(a.in_force.p90_us),
                ms(a.in_force.p99_us),
                ms(a.in_force.max_us),
                ms(a.pass.p50_us),
                ms(a.pass.p99_us),
                ms(a.agent_pass.p50_us),
                ms(a.agent_pass.p99_us),
                a.agent_rss_kib.map_or("–".into(), mib)
            );
        }
    }
    o
}
