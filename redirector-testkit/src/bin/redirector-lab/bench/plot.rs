//! PNG plots of a report: connection rate against the number of excluded
//! CIDRs and ports, idle and pinned to one CPU, and latency CDFs, one line
//! per setup.
//!
//! Text needs a TrueType font, read at run time (DejaVu Sans, Debian's
//! `fonts-dejavu-core`, which `cargo xtask bootstrap` installs); without
//! one the plots are drawn without text and `results.md` says so.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};
use plotters::{
    coord::{CoordTranslate, Shift},
    prelude::*,
    style::{register_font, FontStyle},
};

use super::{
    newconn::{Direction, Regime, Scenario},
    report::Report,
    stats::Stats,
};

const FONTS: [&str; 2] = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];

/// none, iptables, redirector.
const COLORS: [RGBColor; 3] = [RGBColor(90, 90, 90), RGBColor(214, 39, 40), RGBColor(31, 119, 180)];

/// Registers a font for plotters' "sans-serif"; false if none is found.
fn font() -> bool {
    static FOUND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| {
        FONTS.iter().any(|path| {
            std::fs::read(path).ok().is_some_and(|bytes| {
                register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice())).is_ok()
            })
        })
    })
}

/// The files written and whether they carry text.
pub struct Plots {
    pub files: Vec<PathBuf>,
    pub with_text: bool,
}

pub fn write_all(report: &Report, out: &Path) -> Result<Plots> {
    let with_text = font();
    let mut files = Vec::new();
    let f = out.join("rate_vs_rules.png");
    rate_vs_rules(report, &f, with_text).with_context(|| format!("plotting {}", f.display()))?;
    files.push(f);
    let f = out.join("latency_cdf.png");
    latency_cdfs(report, &f, with_text).with_context(|| format!("plotting {}", f.display()))?;
    files.push(f);
    Ok(Plots { files, with_text })
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("{e:?}")
}

/// Picks one regime of a scenario.
type RegimeOf = fn(&Scenario) -> &Regime;

/// Two rows (idle, pinned) of three panels: outbound vs CIDRs, inbound vs
/// CIDRs, outbound vs ports.
fn rate_vs_rules(report: &Report, file: &Path, text: bool) -> Result<()> {
    let root = BitMapBackend::new(file, (1500, 1040)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let panels = root.split_evenly((2, 3));
    let series = |dir: Direction, ports: bool| -> Vec<(usize, &Scenario)> {
        let mut v: Vec<(usize, &Scenario)> = report
            .scenarios
            .iter()
            .filter(|s| s.direction == dir)
            .filter(|s| if ports { s.excluded_cidrs == 0 } else { s.excluded_ports == 0 })
            .map(|s| (if ports { s.excluded_ports } else { s.excluded_cidrs }, s))
            .collect();
        v.sort_by_key(|(n, _)| *n);
        v
    };
    let idle: RegimeOf = |s| &s.idle;
    let pinned: RegimeOf = |s| &s.pinned;
    let mut specs = Vec::new();
    for (regime, how) in [(idle, "idle"), (pinned, "pinned to one CPU")] {
        specs.push((
            series(Direction::Outbound, false),
            regime,
            format!("outbound new connections/s, {how}"),
            "excluded CIDRs",
        ));
        specs.push((
            series(Direction::Inbound, false),
            regime,
            format!("inbound new connections/s, {how}"),
            "excluded CIDRs",
        ));
        specs.push((
            series(Direction::Outbound, true),
            regime,
            format!("outbound new connections/s, {how}"),
            "excluded ports",
        ));
    }
    for (area, (points, regime, title, x_desc)) in panels.iter().zip(specs) {
        rate_panel(area, &points, regime, (&title, x_desc), text)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// The x axis is the index of the rule count (0, 10, 100, … evenly apart).
fn rate_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    points: &[(usize, &Scenario)],
    regime: RegimeOf,
    (title, x_desc): (&str, &str),
    text: bool,
) -> Result<()> {
    let ymax = points
        .iter()
        .flat_map(|(_, s)| regime(s).setups.iter().map(|(_, st)| st.rate_per_s))
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.15;
    let n = points.len().max(1);
    let mut b = ChartBuilder::on(area);
    b.margin(12);
    if text {
        b.caption(title, ("sans-serif", 18)).x_label_area_size(45).y_label_area_size(65);
    }
    let mut chart = b.build_cartesian_2d(-0.3f64..(n as f64 - 0.7), 0f64..ymax).map_err(plot_err)?;
    let labels: Vec<String> = points.iter().map(|(k, _)| k.to_string()).collect();
    let label = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            labels.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let count = |y: &f64| format!("{y:.0}");
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh();
    if text {
        mesh.x_labels(n).x_label_formatter(&label).y_label_formatter(&count).y_desc("connections/s").x_desc(x_desc);
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(plot_err)?;
    for (k, color) in COLORS.iter().enumerate() {
        let pts: Vec<(f64, f64)> =
            points.iter().enumerate().map(|(i, (_, s))| (i as f64, regime(s).setups[k].1.rate_per_s)).collect();
        let style = ShapeStyle::from(color).stroke_width(3);
        let line = chart.draw_series(LineSeries::new(pts.clone(), style)).map_err(plot_err)?;
        if text {
            let name = points.first().map_or("", |(_, s)| regime(s).setups[k].0.as_str()).to_string();
            line.label(name).legend(legend_mark(style));
        }
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled()))).map_err(plot_err)?;
    }
    if text {
        draw_legend(&mut chart)?;
    }
    Ok(())
}

/// Six panels of latency CDFs (log x): outbound and inbound new
/// connections without exclusions and outbound at the largest CIDR count,
/// idle; outbound and inbound without exclusions pinned; and the
/// change-to-in-force latencies.
fn latency_cdfs(report: &Report, file: &Path, text: bool) -> Result<()> {
    let root = BitMapBackend::new(file, (1800, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let panels = root.split_evenly((2, 3));
    let first = |dir: Direction| {
        report.scenarios.iter().find(|s| s.direction == dir && s.excluded_cidrs == 0 && s.excluded_ports == 0)
    };
    let largest = report
        .scenarios
        .iter()
        .filter(|s| s.direction == Direction::Outbound && s.excluded_ports == 0)
        .max_by_key(|s| s.excluded_cidrs);
    let c = &report.control_plane.change;
    let mut specs: Vec<(String, Vec<(String, Stats)>)> = Vec::new();
    for s in [first(Direction::Outbound), first(Direction::Inbound), largest].into_iter().flatten() {
        specs.push((format!("{}, idle (µs)", s.name), s.idle.setups.clone()));
    }
    for s in [first(Direction::Outbound), first(Direction::Inbound)].into_iter().flatten() {
        specs.push((format!("{}, pinned (µs)", s.name), s.pinned.setups.clone()));
    }
    specs.push((
        "change → in force (µs)".into(),
        vec![
            ("iptables-restore (exit)".into(), c.iptables_restore.clone()),
            ("iptables (seen)".into(), c.iptables_in_force.clone()),
            ("redirector (seen)".into(), c.redirector_in_force.clone()),
        ],
    ));
    for (area, (title, lines)) in panels.iter().zip(specs) {
        cdf_panel(area, &title, &lines, text)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

fn cdf_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    lines: &[(String, Stats)],
    text: bool,
) -> Result<()> {
    let all = lines.iter().flat_map(|(_, s)| s.cdf_us.iter().copied());
    let (lo, hi) = all.fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if hi > 0.0 { ((lo * 0.8).max(0.1), hi * 1.25) } else { (1.0, 10.0) };
    let mut b = ChartBuilder::on(area);
    b.margin(14);
    if text {
        b.caption(title, ("sans-serif", 18)).x_label_area_size(40).y_label_area_size(50);
    }
    let mut chart = b.build_cartesian_2d((lo..hi).log_scale(), 0f64..1.0).map_err(plot_err)?;
    // Only 1, 2 and 5 times a power of ten: log axes crowd their labels.
    let label = |v: &f64| {
        let lead = v / 10f64.powf(v.log10().floor());
        if [1.0, 2.0, 5.0].iter().any(|l| (lead - l).abs() < 1e-6) {
            format!("{v:.0}")
        } else {
            String::new()
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(WHITE);
    if text {
        mesh.x_desc("µs (log scale)").y_desc("fraction ≤ x").x_label_formatter(&label);
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(plot_err)?;
    for ((name, st), color) in lines.iter().zip(COLORS.iter().cycle()) {
        let n = st.cdf_us.len().max(1) as f64;
        let pts: Vec<(f64, f64)> = st.cdf_us.iter().enumerate().map(|(i, v)| (v.max(lo), (i + 1) as f64 / n)).collect();
        let style = ShapeStyle::from(color).stroke_width(2);
        let line = chart.draw_series(LineSeries::new(pts, style)).map_err(plot_err)?;
        if text {
            line.label(name.clone()).legend(legend_mark(style));
        }
    }
    if text {
        draw_legend(&mut chart)?;
    }
    Ok(())
}

/// A series' mark in the legend: a short line in its style.
fn legend_mark(style: ShapeStyle) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style)
}

/// The legend of a panel (both plots draw it alike): lower right, on a
/// light background, one line per labelled series.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(chart: &mut ChartContext<'a, DB, CT>) -> Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{control::ChangeLatency, report::ControlPlane};

    fn stats(base: f64) -> Stats {
        let mut v: Vec<std::time::Duration> =
            (1..500).map(|i| std::time::Duration::from_secs_f64((base + i as f64) * 1e-6)).collect();
        Stats::from_samples(&mut v, 0.05)
    }

    fn regime(p50s: [f64; 3]) -> Regime {
        Regime {
            setups: ["none", "iptables", "redirector"]
                .iter()
                .zip(p50s)
                .map(|(n, b)| (n.to_string(), stats(b)))
                .collect(),
            ratio_vs_none: 1.0,
            ratio_vs_iptables: 1.0,
            cost_over_none_us: Vec::new(),
        }
    }

    fn report() -> Report {
        let scenario = |dir, excluded_cidrs, excluded_ports| Scenario {
            name: format!("{dir:?} {excluded_cidrs} {excluded_ports}"),
            direction: dir,
            excluded_cidrs,
            excluded_ports,
            iptables_exclusion_rules: 0,
            idle: regime([50.0, 90.0, 60.0]),
            pinned: regime([15.0, 23.0, 18.0]),
            agent_rss_kib: None,
            bpf: Default::default(),
        };
        Report {
            machine: "test".into(),
            kernel: "test".into(),
            quick: true,
            loadavg_1min_before: 0.0,
            loadavg_1min_after: 0.0,
            wall_seconds: 0.0,
            rounds: 1,
            seconds_per_round: 0.05,
            pinned_cpu: 1,
            inherited_programs: Vec::new(),
            dns: Vec::new(),
            scenarios: vec![
                scenario(Direction::Outbound, 0, 0),
                scenario(Direction::Inbound, 0, 0),
                scenario(Direction::Outbound, 1000, 0),
                scenario(Direction::Outbound, 0, 1000),
            ],
            established: Vec::new(),
            control_plane: ControlPlane {
                change: ChangeLatency {
                    changes: 3,
                    policy: String::new(),
                    redirector_in_force: stats(1000.0),
                    iptables_restore: stats(9000.0),
                    iptables_in_force: stats(9100.0),
                    agent_rss_kib: None,
                    at_scale: Vec::new(),
                },
                sync: Vec::new(),
                agent: Vec::new(),
            },
            targets: Vec::new(),
        }
    }

    /// Both forms draw: with the font (if this machine has one) and without
    /// any text (a machine without fonts-dejavu-core).
    #[test]
    fn plots_render_with_and_without_text() {
        let dir = std::env::temp_dir().join(redirector_testkit::unique("redirector-plot-test-"));
        std::fs::create_dir_all(&dir).unwrap();
        let r = report();
        let mut texts = vec![false];
        if font() {
            texts.push(true);
        }
        for text in texts {
            let (a, b) = (dir.join(format!("rate-{text}.png")), dir.join(format!("cdf-{text}.png")));
            rate_vs_rules(&r, &a, text).unwrap();
            latency_cdfs(&r, &b, text).unwrap();
            for f in [a, b] {
                let head = std::fs::read(&f).unwrap();
                assert!(head.starts_with(b"\x89PNG"), "{}", f.display());
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
