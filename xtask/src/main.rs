//! `cargo xtask`: bootstrap a fresh machine, build, test, demo.
//! Every step is idempotent: what is already there is left alone.
mod vm;

use std::{
    path::PathBuf,
    process::Command,
};

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
    /// Build the agent (target/release/redirector, eBPF object embedded).
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
    /// side (new connections, established traffic, control plane, eBPF cost);
    /// results.json, results.md and PNG plots in target/bench (needs root).
    Bench {
        /// A smoke run (two rule-set sizes, short rounds; under 2 minutes).
        #[arg(long)]
        quick: bool,
    },
    /// The kernel tests inside qemu VMs on Debian's cloud kernels
    /// (5.10, 6.1, 6.12, newest backport); needs root for apt.
    VmTest(vm::Args),
}

/// Debian packages: LLVM 22 for bpf-linker, bpftool for `map dump`,
/// iptables for the differential tests, iproute2 for namespaces, a
/// TrueType font for the text of the bench's plots.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "iptables",
    "iproute2",
    "fonts-dejavu-core",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";

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
            let bin = target_dir().join("release/redirector");
            run(Command::new(bin).arg("demo"))
        }
        Task::Bench { quick } => {
            bootstrap()?;
            build()?;
            let mut cmd = Command::new(target_dir().join("release/redirector"));
            cmd.arg("bench").arg("--out").arg(target_dir().join("bench"));
            if quick {
                cmd.arg("--quick");
            }
            run(&mut cmd)
        }
        Task::VmTest(args) => {
            bootstrap()?;
            vm::vm_test(&args)
        }
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
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
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

fn build() -> Result<()> {
    run(Command::new("cargo")
        .current_dir(workspace_root())
        .args(["build", "--release", "-p", "redirector"]))
}

fn test(args: &[String]) -> Result<()> {
    if !is_root() {
        bail!("the kernel tests attach eBPF programs and create namespaces: run `cargo xtask test` as root");
    }
    // One cargo invocation: unit and property tests of every crate, then the
    // kernel tests. One thread: the kernel tests move the process between
    // cgroups.
    run(Command::new("cargo")
        .current_dir(workspace_root())
        .args(["test", "--release", "--workspace", "--exclude", "redirector-ebpf"])
        .args(["--lib", "--bins", "--tests", "--"])
        .arg("--test-threads=1")
        .args(args))
}
