//! `redirector-lab`: the live demonstration and the benchmark, which drive
//! the shipped `redirector` binary from outside (`cargo xtask demo`,
//! `cargo xtask bench`). Never shipped.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod demo;

#[derive(Parser)]
#[command(name = "redirector-lab", about = "redirector's live demo and benchmark (test support, never shipped)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A self-contained live demonstration in throwaway namespaces.
    Demo,
    /// New-connection rate and latency, outbound and inbound, under no
    /// redirection, osm-init's iptables rules and redirector, side by side.
    Bench {
        /// Two sizes, short rounds: a smoke check (under 2 minutes).
        #[arg(long)]
        quick: bool,
        /// Only one scenario: `changes`, the control plane's change to in
        /// force (at the plan's scales: changes.json and changes.md in
        /// OUT); `dns`, DNS capture's queries per second (dns.json and
        /// dns.md).
        #[arg(long, value_parser = ["changes", "dns"])]
        only: Option<String>,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// (For `bench`.) One full sync of N synthetic workloads in a process
    /// of its own; prints what it measured as JSON.
    #[command(hide = true)]
    BenchSync {
        #[arg(long)]
        workloads: usize,
        /// An empty test cgroup to attach the programs to.
        #[arg(long)]
        cgroup: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    redirector::logging::init(false);
    if let Err(e) = real_main(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Demo => demo::run(),
        Cmd::Bench { quick, only: None, out } => bench::run(quick, &out),
        Cmd::Bench { quick, only: Some(o), out } if o == "dns" => bench::run_dns(quick, &out),
        Cmd::Bench { quick, only: Some(_), out } => bench::run_changes(quick, &out),
        Cmd::BenchSync { workloads, cgroup } => bench::sync_child(workloads, &cgroup),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
