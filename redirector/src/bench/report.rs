//! results.json and results.md.
use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::{newconn::Scenario, stats::Stats};

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
    pub scenarios: Vec<Scenario>,
}

impl Report {
    pub fn write(&self, out: &Path) -> Result<()> {
        let json = out.join("results.json");
        std::fs::write(&json, serde_json::to_string_pretty(self)?).with_context(|| format!("writing {}", json.display()))?;
        let md = self.markdown();
        let mdp = out.join("results.md");
        std::fs::write(&mdp, &md).with_context(|| format!("writing {}", mdp.display()))?;
        println!("\n{md}\nwritten: {}, {}", json.display(), mdp.display());
        Ok(())
    }

    fn markdown(&self) -> String {
        let mut o = format!(
            "Kernel {}, {}; {} alternating rounds of {} s per setup; single-threaded client; \
             load average {:.2} before, {:.2} after; {:.0} s in all.\n\n",
            self.kernel,
            self.machine,
            self.rounds,
            self.seconds_per_round,
            self.loadavg_1min_before,
            self.loadavg_1min_after,
            self.wall_seconds
        );
        o.push_str("### New connections\n\n");
        o.push_str(NEWCONN_HEADER);
        for s in &self.scenarios {
            let _ = writeln!(o, "{}", newconn_row(s));
        }
        o
    }
}

const NEWCONN_HEADER: &str = "| scenario | iptables rules | none conn/s (p50/p99 µs) | iptables conn/s (p50/p99 µs) | redirector conn/s (p50/p99 µs) | redirector/none | redirector/iptables |\n|---|---|---|---|---|---|---|\n";

fn rate_cell(st: &Stats) -> String {
    format!("{:.0} ({:.0}/{:.0})", st.rate_per_s, st.p50_us, st.p99_us)
}

/// One results row, as printed while running and in `results.md`.
pub fn newconn_row(s: &Scenario) -> String {
    format!(
        "| {} | {} | {} | {} | {} | {:.2} | {:.2} |",
        s.name,
        s.iptables_exclusion_rules,
        rate_cell(&s.setups[0].1),
        rate_cell(&s.setups[1].1),
        rate_cell(&s.setups[2].1),
        s.ratio_vs_none,
        s.ratio_vs_iptables
    )
}
