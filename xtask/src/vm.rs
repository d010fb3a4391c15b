//! `cargo xtask vm-test`: the kernel integration tests inside qemu VMs, on
//! Debian's own cloud kernels. Per kernel: fetch and unpack the kernel
//! packages, build an initramfs (static busybox, ip, iptables, the modules
//! the tests need, the static test binaries), boot it without any network
//! device and read the verdict from the serial log.
//!
//! Everything downloaded goes through private apt configurations under
//! target/vm/apt: the host's apt sources are never touched.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{run, succeeds, target_dir, workspace_root};

#[derive(clap::Args)]
pub struct Args {
    /// The kernel to boot.
    #[arg(long, default_value = "all", value_parser = ["5.10", "6.1", "6.12", "7.x", "all"])]
    kernel: String,
    /// Keep the initramfs and print the qemu command line to re-run by hand.
    #[arg(long)]
    keep: bool,
    /// qemu accelerator. auto is tcg unless REDIRECTOR_VM_ACCEL=kvm.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    accel: Accel,
    /// Echo the serial console on stdout.
    #[arg(long)]
    verbose: bool,
    /// Time limit per kernel, in seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Extra arguments for the test binary (e.g. a test name filter).
    #[arg(last = true)]
    test_args: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Accel {
    Auto,
    Tcg,
    Kvm,
}

struct KernelSpec {
    label: &'static str,
    suite: &'static str,
}

const KERNELS: &[KernelSpec] = &[
    KernelSpec { label: "5.10", suite: "bullseye" },
    KernelSpec { label: "6.1", suite: "bookworm" },
    KernelSpec { label: "6.12", suite: "trixie" },
    KernelSpec { label: "7.x", suite: "trixie-backports" },
];

/// Per suite, this meta package depends (with `=` versions) on the
/// packages holding the kernel and its modules; from 7.x those are split
/// into linux-binary-*, linux-modules-* and linux-base-*.
const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";

/// Modules for veth pairs and iptables-nft nat rules (owner, tcp,
/// multiport and comment matches, REDIRECT). Their dependencies are read
/// from each module; names a kernel builds in or lacks are skipped.
const MODULES: &[&str] = &[
    "veth",
    "nfnetlink",
    "x_tables",
    "nf_tables",
    "nft_compat",
    "nf_defrag_ipv4",
    "nf_defrag_ipv6",
    "libcrc32c",
    "nf_conntrack",
    "nf_nat",
    "nf_nat_redirect",
    "nft_chain_nat",
    "nft_nat",
    "nft_redir",
    "xt_owner",
    "xt_REDIRECT",
    "xt_multiport",
    "xt_tcpudp",
    "xt_comment",
];

const GUEST_TRIPLE: &str = "x86_64-unknown-linux-gnu";
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const RESULT_MARKER: &str = "REDIRECTOR-VM-RESULT";

pub fn vm_test(args: &Args) -> Result<()> {
    let vm = target_dir().join("vm");
    fs::create_dir_all(&vm).with_context(|| format!("creating {}", vm.display()))?;
    let accel = resolve_accel(args.accel)?;
    let mirrors = host_mirrors();
    ensure_qemu(&vm, &mirrors)?;
    ensure_host_tools()?;
    let payload = build_guest_binaries()?;
    let apt = Apt::new(vm.join("apt/guest"), &guest_sources(&mirrors))?;
    let busybox = ensure_busybox(&apt, &vm)?;
    let base = base_initramfs(&busybox, &payload)?;

    let specs: Vec<&KernelSpec> = KERNELS.iter().filter(|k| args.kernel == "all" || args.kernel == k.label).collect();
    let mut outcomes = Vec::new();
    for spec in specs {
        let outcome = match test_kernel(args, accel, &apt, &vm, spec, &base) {
            Ok(o) => o,
            Err(e) => Outcome::error(spec.label, format!("{e:#}")),
        };
        println!("{}", outcome.line());
        outcomes.push(outcome);
    }
    print_summary(&outcomes);
    let bad: Vec<&str> = outcomes.iter().filter(|o| !o.ok()).map(|o| o.label).collect();
    if !bad.is_empty() {
        bail!("vm-test failed on kernel(s) {}", bad.join(", "));
    }
    Ok(())
}

fn test_kernel(
    args: &Args,
    accel: Accel,
    apt: &Apt,
    vm: &Path,
    spec: &KernelSpec,
    base: &Initramfs,
) -> Result<Outcome> {
    let kernel = ensure_kernel(apt, vm, spec)?;
    eprintln!("xtask: kernel {} ({}) from {}", spec.label, kernel.release, kernel.packages.join(" "));
    let work = vm.join(spec.label);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let mut initramfs = base.clone();
    let modules = add_modules(&mut initramfs, &kernel)?;
    initramfs.file("init", Data::Bytes(init_script(&modules, &args.test_args).into_bytes()), 0o755);
    let initrd = work.join("initramfs.cpio.gz");
    initramfs.write_gz(&initrd)?;

    let mut qemu = qemu_command(accel, &kernel.vmlinuz, &initrd);
    if args.keep {
        let line = shell_line(&qemu);
        let script = work.join("qemu.sh");
        fs::write(&script, format!("#!/bin/sh\nexec {line}\n"))
            .with_context(|| format!("writing {}", script.display()))?;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
        println!("xtask: qemu command line for {} (also in {}):\n{line}", spec.label, script.display());
    }
    let log = vm.join(format!("{}.log", spec.label));
    let boot = boot(&mut qemu, &log, args.verbose, Duration::from_secs(args.timeout))?;
    if !args.keep {
        fs::remove_file(&initrd).ok();
        fs::remove_file(work.join("qemu.sh")).ok();
    }
    Ok(Outcome::from_boot(spec.label, &kernel.release, boot))
}

// ---------------------------------------------------------------- accel

fn resolve_accel(requested: Accel) -> Result<Accel> {
    let accel = match requested {
        Accel::Auto => match std::env::var("REDIRECTOR_VM_ACCEL").as_deref() {
            Ok("kvm") => Accel::Kvm,
            Ok("tcg") | Err(_) => {
                if Path::new("/dev/kvm").exists() {
                    eprintln!(
                        "xtask: warning: using TCG although /dev/kvm exists (it may be a slow nested one); \
                         pass --accel kvm or set REDIRECTOR_VM_ACCEL=kvm to use it"
                    );
                }
                Accel::Tcg
            }
            Ok(other) => bail!("REDIRECTOR_VM_ACCEL={other}: expected kvm or tcg"),
        },
        other => other,
    };
    if accel == Accel::Kvm {
        fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").context("opening /dev/kvm for --accel kvm")?;
    }
    Ok(accel)
}

// ---------------------------------------------------------------- apt

/// Where the host's apt sources get Debian from.
struct Mirrors {
    debian: String,
    security: Option<String>,
}

/// Reads the host's apt sources (one-line and deb822) for the mirror that
/// serves bookworm and the one that serves bookworm-security.
fn host_mirrors() -> Mirrors {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    let mut entries: Vec<(String, Vec<String>)> = Vec::new();
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else { continue };
        match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => entries.extend(deb822_entries(&text)),
            Some("list") => entries.extend(one_line_entries(&text)),
            _ => {}
        }
    }
    let find = |suite: &str| {
        entries
            .iter()
            .find(|(_, suites)| suites.iter().any(|s| s == suite))
            .map(|(uri, _)| uri.trim_end_matches('/').to_owned())
    };
    Mirrors {
        debian: find("bookworm").unwrap_or_else(|| "http://deb.debian.org/debian".into()),
        security: find("bookworm-security"),
    }
}

fn one_line_entries(text: &str) -> Vec<(String, Vec<String>)> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next()?.trim();
            let rest = line.strip_prefix("deb ")?.trim_start();
            let rest = match rest.strip_prefix('[') {
                Some(r) => r.split_once(']')?.1,
                None => rest,
            };
            let mut words = rest.split_whitespace();
            Some((words.next()?.to_owned(), vec![words.next()?.to_owned()]))
        })
        .collect()
}

fn deb822_entries(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
        };
        let is_deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        let enabled = field("Enabled").is_none_or(|e| e != "no");
        if let (true, true, Some(uris), Some(suites)) = (is_deb, enabled, field("URIs"), field("Suites")) {
            let suites: Vec<String> = suites.split_whitespace().map(str::to_owned).collect();
            for uri in uris.split_whitespace() {
                out.push((uri.to_owned(), suites.clone()));
            }
        }
    }
    out
}

fn sources_list(mirror: &str, suites: &[&str]) -> String {
    suites.iter().map(|s| format!("deb [signed-by={DEBIAN_KEYRING}] {mirror} {s} main\n")).collect()
}

/// Kernels and busybox: never installed, only downloaded and unpacked.
fn guest_sources(m: &Mirrors) -> String {
    sources_list(&m.debian, &["bullseye", "bookworm", "bookworm-backports", "trixie", "trixie-backports"])
}

/// For installing qemu on the host: only the host's own release.
fn host_sources(m: &Mirrors) -> String {
    let mut s = sources_list(&m.debian, &["bookworm", "bookworm-backports"]);
    if let Some(sec) = &m.security {
        s += &sources_list(sec, &["bookworm-security"]);
    }
    s
}

/// A private apt configuration: its own sources.list, package lists,
/// caches and download directory.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(dir: PathBuf, sources: &str) -> Result<Apt> {
        for sub in ["lists/partial", "archives/partial", "cache"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let list = dir.join("sources.list");
        if fs::read_to_string(&list).ok().as_deref() != Some(sources) {
            fs::write(&list, sources).with_context(|| format!("writing {}", list.display()))?;
            // Lists of other sources would mislead the next resolution.
            for entry in fs::read_dir(dir.join("lists"))?.flatten() {
                if entry.path().is_file() {
                    fs::remove_file(entry.path()).ok();
                }
            }
        }
        Ok(Apt { dir })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let d = |sub: &str| self.dir.join(sub).display().to_string();
        for opt in [
            format!("Dir::Etc::SourceList={}", d("sources.list")),
            "Dir::Etc::SourceParts=/nonexistent".into(),
            format!("Dir::State::Lists={}", d("lists")),
            format!("Dir::Cache={}", d("cache")),
            format!("Dir::Cache::Archives={}", d("archives")),
            // The private directories need not be readable by `_apt`.
            "APT::Sandbox::User=root".into(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false".into(),
        ] {
            cmd.arg("-o").arg(opt);
        }
        // Keep xtask's stdout for the results.
        cmd.env("DEBIAN_FRONTEND", "noninteractive").stdout(std::io::stderr());
        cmd
    }

    fn has_lists(&self) -> bool {
        fs::read_dir(self.dir.join("lists"))
            .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().contains("_Packages")))
            .unwrap_or(false)
    }

    fn update(&self) -> Result<()> {
        run(self.command("apt-get").arg("-q").arg("update"))
    }

    fn ensure_lists(&self) -> Result<()> {
        if self.has_lists() {
            return Ok(());
        }
        self.update()
    }

    /// `apt-cache show` of one package version (`name=version` or
    /// `name/suite`): its first stanza.
    fn show(&self, what: &str) -> Result<String> {
        let out = self
            .command("apt-cache")
            .args(["show", what])
            // command() sends stdout to stderr; here we need it.
            .stdout(Stdio::piped())
            .output()
            .with_context(|| format!("running apt-cache show {what}"))?;
        if !out.status.success() {
            bail!("apt-cache show {what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(text.split("\n\n").next().unwrap_or_default().to_owned())
    }

    fn download(&self, into: &Path, packages: &[String]) -> Result<()> {
        fs::create_dir_all(into).with_context(|| format!("creating {}", into.display()))?;
        run(self.command("apt-get").current_dir(into).args(["-q", "download"]).args(packages))
    }
}

fn control_field(stanza: &str, name: &str) -> Option<String> {
    stanza.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(|v| v.trim().to_owned()))
}

/// The `name (= version)` entries of a Depends field: the packages built
/// from the same source at the same version.
fn exact_depends(depends: &str) -> Vec<(String, String)> {
    depends
        .split(',')
        .filter(|group| !group.contains('|'))
        .filter_map(|dep| {
            let (name, rest) = dep.split_once('(')?;
            let version = rest.trim().strip_prefix('=')?.trim().strip_suffix(')')?.trim();
            let name = name.trim().split(':').next()?;
            Some((name.to_owned(), version.to_owned()))
        })
        .collect()
}

// ---------------------------------------------------------------- host tools

fn ensure_qemu(vm: &Path, mirrors: &Mirrors) -> Result<()> {
    if succeeds(Command::new("qemu-system-x86_64").arg("--version")) {
        return Ok(());
    }
    if !crate::is_root() {
        bail!("qemu-system-x86_64 is missing: run `cargo xtask vm-test` as root once to install it");
    }
    // bookworm's own qemu (7.2) would replace the preinstalled qemu-utils
    // from backports; a private list keeps backports out of the host's apt.
    eprintln!("xtask: installing qemu-system-x86 from bookworm-backports");
    let apt = Apt::new(vm.join("apt/host"), &host_sources(mirrors))?;
    apt.update()?;
    run(apt.command("apt-get").args([
        "install",
        "-y",
        "--no-install-recommends",
        "--no-remove",
        "-t",
        "bookworm-backports",
        "qemu-system-x86",
    ]))?;
    if !succeeds(Command::new("qemu-system-x86_64").arg("--version")) {
        bail!("qemu-system-x86_64 still does not run after installing qemu-system-x86");
    }
    Ok(())
}

/// Host programs the initramfs build needs, and their Debian packages.
const HOST_TOOLS: &[(&str, &str)] = &[
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
    ("gzip", "gzip"),
    ("dash", "dash"),
    ("ip", "iproute2"),
    ("iptables", "iptables"),
];

fn ensure_host_tools() -> Result<()> {
    let missing: Vec<&str> = HOST_TOOLS
        .iter()
        .filter(|(tool, _)| !succeeds(Command::new("sh").args(["-c", &format!("command -v {tool}")])))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages {missing:?}");
    run(Command::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

// ---------------------------------------------------------------- guest binaries

struct Payload {
    redirector: PathBuf,
    /// The layout-upgrade test's next-layout agent.
    layout_next: PathBuf,
    kernel_tests: PathBuf,
}

/// Static glibc builds of the agent and the kernel test binary. The flag
/// is scoped to the target so build scripts (aya-build's nightly eBPF
/// build among them) stay dynamic.
fn build_guest_binaries() -> Result<Payload> {
    let root = workspace_root();
    let cargo = |sub: &str| {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&root)
            .env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS", "-C target-feature=+crt-static")
            .args([sub, "--release", "--target", GUEST_TRIPLE, "-p", "redirector"]);
        cmd
    };
    // The next-layout agent first: the plain build after it puts the
    // shipped agent back at target/<triple>/release/redirector.
    run(cargo("build").args(["--bin", "redirector", "--features", "layout-next"]))?;
    let release = target_dir().join(GUEST_TRIPLE).join("release");
    let layout_next = target_dir().join(GUEST_TRIPLE).join("layout-next/redirector");
    fs::create_dir_all(layout_next.parent().expect("a parent"))?;
    fs::copy(release.join("redirector"), &layout_next).context("copying the next-layout agent")?;
    run(cargo("build").args(["--bin", "redirector"]))?;
    let mut test = cargo("test");
    test.args(["--test", "kernel", "--no-run", "--message-format=json"]).stderr(Stdio::inherit());
    eprintln!("xtask: running {test:?}");
    let out = test.output().context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the kernel test binary failed with {}", out.status);
    }
    let kernel_tests = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(r#""reason":"compiler-artifact""#) && l.contains(r#""name":"kernel""#))
        .find_map(json_executable)
        .context("cargo reported no executable for the `kernel` test target")?;
    let payload = Payload { redirector: release.join("redirector"), layout_next, kernel_tests };
    for bin in [&payload.redirector, &payload.layout_next, &payload.kernel_tests] {
        let elf = fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
        if has_interpreter(&elf)? {
            bail!("{} is dynamically linked (crt-static did not apply)", bin.display());
        }
    }
    Ok(payload)
}

/// The `"executable":"..."` of one cargo JSON message.
fn json_executable(line: &str) -> Option<PathBuf> {
    let start = line.find(r#""executable":""#)? + r#""executable":""#.len();
    let end = line[start..].find('"')?;
    Some(PathBuf::from(line[start..start + end].replace("\\\\", "\\")))
}

// ---------------------------------------------------------------- ELF

fn read_u16(b: &[u8], at: usize) -> Result<u16> {
    Ok(u16::from_le_bytes(b.get(at..at + 2).context("truncated ELF")?.try_into()?))
}

fn read_u32(b: &[u8], at: usize) -> Result<u32> {
    Ok(u32::from_le_bytes(b.get(at..at + 4).context("truncated ELF")?.try_into()?))
}

fn read_u64(b: &[u8], at: usize) -> Result<usize> {
    Ok(u64::from_le_bytes(b.get(at..at + 8).context("truncated ELF")?.try_into()?) as usize)
}

fn check_elf64(b: &[u8]) -> Result<()> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        bail!("not a little-endian ELF64 file");
    }
    Ok(())
}

/// Whether a program header asks for a dynamic loader (PT_INTERP).
fn has_interpreter(elf: &[u8]) -> Result<bool> {
    check_elf64(elf)?;
    let (phoff, phentsize, phnum) =
        (read_u64(elf, 0x20)?, read_u16(elf, 0x36)? as usize, read_u16(elf, 0x38)? as usize);
    for i in 0..phnum {
        if read_u32(elf, phoff + i * phentsize)? == 3 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The contents of the named ELF section.
fn elf_section<'a>(elf: &'a [u8], name: &str) -> Result<Option<&'a [u8]>> {
    check_elf64(elf)?;
    let (shoff, shentsize, shnum, shstrndx) = (
        read_u64(elf, 0x28)?,
        read_u16(elf, 0x3a)? as usize,
        read_u16(elf, 0x3c)? as usize,
        read_u16(elf, 0x3e)? as usize,
    );
    let header = |i: usize| -> Result<(usize, usize, usize)> {
        let h = shoff + i * shentsize;
        Ok((read_u32(elf, h)? as usize, read_u64(elf, h + 0x18)?, read_u64(elf, h + 0x20)?))
    };
    let (_, strtab, _) = header(shstrndx)?;
    for i in 0..shnum {
        let (name_at, offset, size) = header(i)?;
        let start = strtab + name_at;
        let raw = elf.get(start..).context("bad ELF section name")?;
        let this = &raw[..raw.iter().position(|&c| c == 0).unwrap_or(raw.len())];
        if this == name.as_bytes() {
            return Ok(Some(elf.get(offset..offset + size).context("ELF section out of bounds")?));
        }
    }
    Ok(None)
}

// ---------------------------------------------------------------- kernels

struct Kernel {
    /// `uname -r` of the kernel.
    release: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
    /// `name=version` of every package it was unpacked from.
    packages: Vec<String>,
}

const PACKAGES_FILE: &str = ".packages";

/// The kernel packages of a suite, downloaded and unpacked into
/// target/vm/kernels/<label> once.
fn ensure_kernel(apt: &Apt, vm: &Path, spec: &KernelSpec) -> Result<Kernel> {
    let dir = vm.join("kernels").join(spec.label);
    if !dir.join(PACKAGES_FILE).exists() {
        fetch_kernel(apt, &dir, spec)
            .with_context(|| format!("fetching the {} kernel from {}", spec.label, spec.suite))?;
    }
    locate_kernel(&dir)
}

fn fetch_kernel(apt: &Apt, dir: &Path, spec: &KernelSpec) -> Result<()> {
    apt.ensure_lists()?;
    // Lists older than the mirror name versions it no longer has.
    let packages = match resolve_kernel_packages(apt, spec.suite) {
        Ok(p) => p,
        Err(_) => {
            apt.update()?;
            resolve_kernel_packages(apt, spec.suite)?
        }
    };
    let sibling = |suffix: &str| dir.with_file_name(format!("{}.{suffix}", spec.label));
    let debs = sibling("debs");
    fs::remove_dir_all(&debs).ok();
    if apt.download(&debs, &packages).is_err() {
        apt.update()?;
        apt.download(&debs, &packages)?;
    }
    let partial = sibling("partial");
    fs::remove_dir_all(&partial).ok();
    fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    for deb in fs::read_dir(&debs)?.flatten().map(|e| e.path()) {
        if deb.extension().is_some_and(|e| e == "deb") {
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
        }
    }
    fs::write(partial.join(PACKAGES_FILE), packages.join("\n") + "\n")?;
    fs::remove_dir_all(dir).ok();
    fs::rename(&partial, dir).with_context(|| format!("moving {} to {}", partial.display(), dir.display()))?;
    fs::remove_dir_all(&debs).ok();
    Ok(())
}

/// The meta package of the suite and everything it pulls in at exactly
/// its version, as `name=version`.
fn resolve_kernel_packages(apt: &Apt, suite: &str) -> Result<Vec<String>> {
    let meta = apt.show(&format!("{KERNEL_META_PACKAGE}/{suite}"))?;
    let version = control_field(&meta, "Version").context("no Version in apt-cache show")?;
    let mut todo = vec![(KERNEL_META_PACKAGE.to_owned(), version)];
    let mut seen = BTreeSet::new();
    while let Some((name, version)) = todo.pop() {
        let id = format!("{name}={version}");
        if !seen.insert(id.clone()) {
            continue;
        }
        let stanza = apt.show(&id)?;
        todo.extend(exact_depends(&control_field(&stanza, "Depends").unwrap_or_default()));
    }
    Ok(seen.into_iter().collect())
}

fn locate_kernel(dir: &Path) -> Result<Kernel> {
    let packages = fs::read_to_string(dir.join(PACKAGES_FILE))?.lines().map(str::to_owned).collect();
    let modules_root = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| dir.join(p))
        .find(|p| p.is_dir())
        .with_context(|| format!("no lib/modules in {}", dir.display()))?;
    let modules = fs::read_dir(&modules_root)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("kernel").is_dir())
        .with_context(|| format!("no kernel modules under {}", modules_root.display()))?;
    let release = modules.file_name().unwrap().to_string_lossy().into_owned();
    let vmlinuz = [dir.join(format!("boot/vmlinuz-{release}")), modules.join("vmlinuz")]
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| format!("no vmlinuz for {release} in {}", dir.display()))?;
    Ok(Kernel { release, vmlinuz, modules, packages })
}

/// `foo-bar.ko.xz` → `foo_bar` (modprobe treats - and _ alike).
fn module_name(file: &str) -> Option<String> {
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"].iter().find_map(|ext| file.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

fn index_modules(dir: &Path, index: &mut HashMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(name) = module_name(&entry.file_name().to_string_lossy()) {
            index.insert(name, path);
        }
    }
    Ok(())
}

fn decompress(path: &Path) -> Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return fs::read(path).with_context(|| format!("reading {}", path.display())),
    };
    let out = Command::new(tool).arg("-dc").arg(path).output().with_context(|| format!("running {tool} -dc"))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}

/// The `depends=` entry of a module's .modinfo.
fn module_depends(ko: &[u8]) -> Result<Vec<String>> {
    let info = elf_section(ko, ".modinfo")?.context("module without .modinfo")?;
    let depends = info
        .split(|&c| c == 0)
        .find_map(|field| field.strip_prefix(b"depends="))
        .map(|d| String::from_utf8_lossy(d).into_owned())
        .unwrap_or_default();
    Ok(depends.split(',').filter(|d| !d.is_empty()).map(|d| d.replace('-', "_")).collect())
}

/// Adds the wanted modules and their dependencies (decompressed), returns
/// their guest paths in load order.
fn add_modules(image: &mut Initramfs, kernel: &Kernel) -> Result<Vec<String>> {
    let mut index = HashMap::new();
    index_modules(&kernel.modules.join("kernel"), &mut index)?;
    let builtin: BTreeSet<String> = fs::read_to_string(kernel.modules.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| module_name(l.rsplit('/').next()?))
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    let (mut in_kernel, mut absent) = (Vec::new(), Vec::new());
    for want in MODULES {
        visit_module(want, &index, &mut seen, &mut order, &mut |name| {
            if builtin.contains(name) {
                in_kernel.push(name.to_owned())
            } else {
                absent.push(name.to_owned())
            }
        })?;
    }
    eprintln!(
        "xtask: {} modules to load; built in: {}; no such module: {}",
        order.len(),
        if in_kernel.is_empty() { "-".into() } else { in_kernel.join(" ") },
        if absent.is_empty() { "-".into() } else { absent.join(" ") },
    );
    let mut paths = Vec::new();
    for (name, bytes) in order {
        let guest = format!("lib/modules/{}/{name}.ko", kernel.release);
        image.file(&guest, Data::Bytes(bytes), 0o644);
        paths.push(format!("/{guest}"));
    }
    Ok(paths)
}

/// Depth-first: dependencies land in `order` before their dependents.
fn visit_module(
    name: &str,
    index: &HashMap<String, PathBuf>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<(String, Vec<u8>)>,
    not_found: &mut dyn FnMut(&str),
) -> Result<()> {
    if !seen.insert(name.to_owned()) {
        return Ok(());
    }
    let Some(path) = index.get(name) else {
        not_found(name);
        return Ok(());
    };
    let bytes = decompress(path)?;
    for dep in module_depends(&bytes).with_context(|| format!("reading {}", path.display()))? {
        visit_module(&dep, index, seen, order, not_found)?;
    }
    order.push((name.to_owned(), bytes));
    Ok(())
}

// ---------------------------------------------------------------- initramfs

#[derive(Clone)]
enum Data {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

#[derive(Clone)]
enum Entry {
    Dir,
    File(Data, u32),
    Symlink(String),
    CharDev(u32, u32),
}

/// An initramfs being assembled: archive path (no leading /) → entry.
/// Sorted, so every directory precedes its contents.
#[derive(Clone, Default)]
struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

impl Initramfs {
    fn insert(&mut self, path: &str, entry: Entry) {
        let path = path.trim_start_matches('/');
        let mut parent = Path::new(path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            self.entries.entry(p.to_string_lossy().into_owned()).or_insert(Entry::Dir);
            parent = p.parent();
        }
        self.entries.insert(path.to_owned(), entry);
    }

    fn dir(&mut self, path: &str) {
        self.insert(path, Entry::Dir);
    }

    fn file(&mut self, path: &str, data: Data, mode: u32) {
        self.insert(path, Entry::File(data, mode));
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.insert(path, Entry::Symlink(target.to_owned()));
    }

    /// A host file at the same path, with its permission bits.
    fn host_file(&mut self, path: &Path) -> Result<()> {
        let mode =
            fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.permissions().mode() & 0o7777;
        self.file(&path.to_string_lossy(), Data::Host(path.to_owned()), mode);
        Ok(())
    }

    /// A host program and every shared library `ldd` names for it.
    fn host_program(&mut self, path: &Path) -> Result<()> {
        self.host_file(path)?;
        for lib in ldd(path)? {
            self.host_file(&lib)?;
        }
        Ok(())
    }

    /// Writes a gzip-compressed cpio (newc) archive.
    fn write_gz(&self, out: &Path) -> Result<()> {
        let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut gzip = Command::new("gzip")
            .args(["-c", "-n"])
            .stdin(Stdio::piped())
            .stdout(file)
            .spawn()
            .context("starting gzip")?;
        let mut w = std::io::BufWriter::new(gzip.stdin.take().unwrap());
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let (mode, data, rdev) = match entry {
                Entry::Dir => (0o040755, Vec::new(), (0, 0)),
                Entry::File(Data::Host(p), m) => {
                    (0o100000 | m, fs::read(p).with_context(|| format!("reading {}", p.display()))?, (0, 0))
                }
                Entry::File(Data::Bytes(b), m) => (0o100000 | m, b.clone(), (0, 0)),
                Entry::Symlink(t) => (0o120777, t.as_bytes().to_vec(), (0, 0)),
                Entry::CharDev(major, minor) => (0o020600, Vec::new(), (*major, *minor)),
            };
            cpio_entry(&mut w, ino as u32 + 1, path, mode, &data, rdev)?;
        }
        cpio_entry(&mut w, 0, "TRAILER!!!", 0, &[], (0, 0))?;
        w.flush()?;
        drop(w);
        let status = gzip.wait()?;
        if !status.success() {
            bail!("gzip failed with {status}");
        }
        Ok(())
    }
}

fn cpio_entry(
    w: &mut impl std::io::Write,
    ino: u32,
    name: &str,
    mode: u32,
    data: &[u8],
    rdev: (u32, u32),
) -> Result<()> {
    let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
    let fields = [ino, mode, 0, 0, nlink, 0, data.len() as u32, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
    let mut header = String::from("070701");
    for f in fields {
        header += &format!("{f:08x}");
    }
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w, header.len() + name.len() + 1)?;
    w.write_all(data)?;
    pad4(w, data.len())?;
    Ok(())
}

fn pad4(w: &mut impl std::io::Write, len: usize) -> Result<()> {
    w.write_all(&[0; 3][..(4 - len % 4) % 4])?;
    Ok(())
}

/// Absolute paths of the libraries (and loader) `ldd` resolves.
fn ldd(path: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(path).output().context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable"
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        if line.contains("not found") {
            bail!("ldd {}: {}", path.display(), line.trim());
        }
        let candidate = match line.split_once("=>") {
            Some((_, r)) => r.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(lib) = candidate.filter(|l| l.starts_with('/')) {
            libs.push(PathBuf::from(lib));
        }
    }
    Ok(libs)
}

fn ensure_busybox(apt: &Apt, vm: &Path) -> Result<PathBuf> {
    let dir = vm.join("busybox");
    let find = || ["bin/busybox", "usr/bin/busybox"].iter().map(|p| dir.join(p)).find(|p| p.is_file());
    if let Some(found) = find() {
        return Ok(found);
    }
    apt.ensure_lists()?;
    let debs = vm.join("busybox.debs");
    fs::remove_dir_all(&debs).ok();
    apt.download(&debs, &["busybox-static/bookworm".to_owned()])?;
    for deb in fs::read_dir(&debs)?.flatten().map(|e| e.path()) {
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
    }
    fs::remove_dir_all(&debs).ok();
    find().context("busybox-static has no busybox binary")
}

const IPTABLES_MULTI: &str = "/usr/sbin/xtables-nft-multi";
const IPTABLES_NAMES: &[&str] = &[
    "iptables",
    "iptables-nft",
    "iptables-save",
    "iptables-restore",
    "iptables-nft-save",
    "iptables-nft-restore",
    "ip6tables",
    "ip6tables-nft",
];
const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// Everything but the kernel modules and /init: the same for all kernels.
fn base_initramfs(busybox: &Path, payload: &Payload) -> Result<Initramfs> {
    let mut image = Initramfs::default();
    for d in ["proc", "sys", "dev", "run", "tmp", "root", "etc", "sbin", "usr/bin"] {
        image.dir(d);
    }
    image.insert("dev/console", Entry::CharDev(5, 1));
    image.file("bin/busybox", Data::Host(busybox.to_owned()), 0o755);
    // The real ip and iptables stand in for busybox's reduced applets. The
    // shell is dash: Debian's busybox sh runs its own applets before
    // searching PATH, so `sh -c 'ip ...'` would get busybox's `ip`.
    let ours = |name: &str| {
        ["busybox", "sh", "ip"].contains(&name) || name.starts_with("iptables") || name.starts_with("ip6tables")
    };
    for applet in busybox_applets(busybox)?.iter().filter(|a| !ours(a)) {
        image.symlink(&format!("bin/{applet}"), "busybox");
    }
    let dash = which("dash")?;
    image.host_program(&dash)?;
    image.symlink("bin/sh", &dash.to_string_lossy());
    let ip = which("ip")?;
    image.host_program(&ip)?;
    image.host_program(Path::new(IPTABLES_MULTI))?;
    for name in IPTABLES_NAMES {
        image.symlink(&format!("usr/sbin/{name}"), "xtables-nft-multi");
    }
    for ext in fs::read_dir(XTABLES_DIR).with_context(|| format!("reading {XTABLES_DIR}"))?.flatten() {
        image.host_program(&ext.path())?;
    }
    for etc in ["/etc/protocols", "/etc/services"] {
        if Path::new(etc).is_file() {
            image.host_file(Path::new(etc))?;
        }
    }
    image.file("etc/passwd", Data::Bytes(b"root:x:0:0:root:/root:/bin/sh\n".to_vec()), 0o644);
    image.file("etc/group", Data::Bytes(b"root:x:0:\n".to_vec()), 0o644);
    image.file("bin/redirector", Data::Host(payload.redirector.clone()), 0o755);
    image.file("bin/redirector-layout-next", Data::Host(payload.layout_next.clone()), 0o755);
    image.file("bin/kernel-tests", Data::Host(payload.kernel_tests.clone()), 0o755);
    Ok(image)
}

fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("running {} --list", busybox.display()))?;
    if !out.status.success() {
        bail!("{} --list failed", busybox.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).filter(|a| !a.is_empty()).collect())
}

fn which(program: &str) -> Result<PathBuf> {
    let out = Command::new("sh").args(["-c", &format!("command -v {program}")]).output()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || !path.starts_with('/') {
        bail!("{program} is not installed on the host");
    }
    // Same path in the guest as on the host, minus the /usr merge links.
    fs::canonicalize(&path).with_context(|| format!("resolving {path}"))
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_./=:,+".contains(&c)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn init_script(modules: &[String], test_args: &[String]) -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         # Generated by `cargo xtask vm-test`.\n\
         export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TMPDIR=/tmp\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mkdir -p /dev/pts /dev/shm\n\
         mount -t devpts devpts /dev/pts\n\
         mount -t tmpfs tmpfs /run\n\
         mount -t tmpfs tmpfs /tmp\n\
         mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null\n\
         mkdir -p /run/netns\n",
    );
    s += &format!("echo 'REDIRECTOR-VM: loading {} modules'\n", modules.len());
    s += &format!(
        "for m in {}; do\n    insmod \"$m\" || echo \"REDIRECTOR-VM: insmod $m failed\"\ndone\n",
        modules.join(" ")
    );
    let args: String = test_args.iter().map(|a| format!(" {}", shell_quote(a))).collect();
    s += &format!(
        "ip link set lo up\n\
         echo \"REDIRECTOR-VM: running the kernel tests on $(uname -r)\"\n\
         cd /tmp\n\
         REDIRECTOR_BIN=/bin/redirector REDIRECTOR_LAYOUT_NEXT_BIN=/bin/redirector-layout-next REDIRECTOR_CHURN_CONNECTIONS=2000 RUST_BACKTRACE=1 /bin/kernel-tests --test-threads=1{args}\n\
         rc=$?\n\
         echo \"{RESULT_MARKER} rc=$rc kernel=$(uname -r)\"\n\
         sync\n\
         poweroff -f\n"
    );
    s
}

// ---------------------------------------------------------------- qemu

fn qemu_command(accel: Accel, vmlinuz: &Path, initrd: &Path) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    match accel {
        Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
        // `max` offers RDRAND, which seeds the guest's CRNG at once.
        _ => cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
    };
    cmd.args(["-M", "pc", "-m", "1024", "-smp", "2", "-nodefaults", "-nographic"])
        .args(["-serial", "stdio", "-monitor", "none", "-nic", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet rdinit=/init"]);
    cmd
}

fn shell_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

struct Boot {
    lines: Vec<String>,
    secs: f64,
    timed_out: bool,
}

/// Runs qemu, streaming the serial console to `log`, killing it at the
/// deadline.
fn boot(qemu: &mut Command, log: &Path, verbose: bool, timeout: Duration) -> Result<Boot> {
    let mut log_file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    eprintln!("xtask: booting, serial log in {} (time limit {}s)", log.display(), timeout.as_secs());
    let start = Instant::now();
    let mut child = qemu.stdin(Stdio::null()).stdout(Stdio::piped()).spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || -> Vec<String> {
        let mut lines = Vec::new();
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let line = strip_escapes(String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']));
            let _ = writeln!(log_file, "{line}");
            if verbose {
                println!("{line}");
            }
            lines.push(line);
            buf.clear();
        }
        lines
    });
    let mut timed_out = false;
    loop {
        if child.try_wait().context("waiting for qemu")?.is_some() {
            break;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            child.kill().ok();
            child.wait().ok();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let secs = start.elapsed().as_secs_f64();
    let lines = reader.join().map_err(|_| anyhow!("the serial reader panicked"))?;
    Ok(Boot { lines, secs, timed_out })
}

/// Drops the terminal control sequences SeaBIOS and the kernel emit.
fn strip_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // ESC c, or ESC [ parameters final-letter.
            if chars.next_if_eq(&'[').is_some() {
                while chars.next().is_some_and(|c| !c.is_ascii_alphabetic()) {}
            } else {
                chars.next();
            }
        } else if !c.is_control() || c == '\t' {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------- results

#[derive(Default)]
struct Counts {
    passed: u32,
    failed: u32,
    /// libtest's ignored plus the tests that printed a SKIP line.
    skipped: u32,
}

/// libtest's `test result: ok. 3 passed; 0 failed; 1 ignored; ...`.
fn parse_test_result(line: &str) -> Option<Counts> {
    let rest = &line[line.find("test result: ")?..];
    let mut c = Counts::default();
    for part in rest.split(';') {
        let mut words = part.split_whitespace().rev();
        let (Some(what), Some(n)) = (words.next(), words.next()) else { continue };
        let Ok(n) = n.parse() else { continue };
        match what {
            "passed" => c.passed = n,
            "failed" => c.failed = n,
            "ignored" => c.skipped = n,
            _ => {}
        }
    }
    Some(c)
}

/// Tests that printed `SKIP <name>: <reason>` (possibly after libtest's
/// `test <name> ... ` on the same line).
fn skipped_tests(lines: &[String]) -> u32 {
    let names: BTreeSet<&str> = lines
        .iter()
        .filter_map(|l| {
            let rest = &l[l.find("SKIP ")? + "SKIP ".len()..];
            // `: ` ends the name; a test in a module is `module::name`.
            let (name, _) = rest.split_once(": ")?;
            (!name.is_empty() && !name.contains(' ')).then_some(name)
        })
        .collect();
    names.len() as u32
}

/// `REDIRECTOR-VM-RESULT rc=<rc> kernel=<uname -r>`.
fn parse_result_line(line: &str) -> Option<(i32, String)> {
    let rest = &line[line.find(RESULT_MARKER)? + RESULT_MARKER.len()..];
    let mut rc = None;
    let mut kernel = None;
    for word in rest.split_whitespace() {
        if let Some(v) = word.strip_prefix("rc=") {
            rc = v.parse().ok();
        } else if let Some(v) = word.strip_prefix("kernel=") {
            kernel = Some(v.to_owned());
        }
    }
    Some((rc?, kernel.unwrap_or_default()))
}

struct Outcome {
    label: &'static str,
    release: String,
    counts: Option<Counts>,
    rc: Option<i32>,
    secs: f64,
    timed_out: bool,
    error: Option<String>,
    /// Each failed test with the first lines of its panic message.
    failures: Vec<(String, Vec<String>)>,
}

impl Outcome {
    fn error(label: &'static str, error: String) -> Outcome {
        Outcome {
            label,
            release: "?".into(),
            counts: None,
            rc: None,
            secs: 0.0,
            timed_out: false,
            error: Some(error),
            failures: Vec::new(),
        }
    }

    fn from_boot(label: &'static str, release: &str, boot: Boot) -> Outcome {
        let mut counts = boot.lines.iter().rev().find_map(|l| parse_test_result(l));
        if let Some(c) = &mut counts {
            // A test that skips itself returns early and so counts as passed.
            let skips = skipped_tests(&boot.lines);
            c.passed = c.passed.saturating_sub(skips);
            c.skipped += skips;
        }
        let result = boot.lines.iter().rev().find_map(|l| parse_result_line(l));
        let (rc, release) = match result {
            Some((rc, uname)) if !uname.is_empty() => (Some(rc), uname),
            Some((rc, _)) => (Some(rc), release.to_owned()),
            None => (None, release.to_owned()),
        };
        let failures = failures(&boot.lines);
        Outcome { label, release, counts, rc, secs: boot.secs, timed_out: boot.timed_out, error: None, failures }
    }

    fn status(&self) -> String {
        match (&self.error, self.timed_out, self.rc, &self.counts) {
            (Some(e), ..) => format!("ERROR: {e}"),
            (None, true, ..) => "TIMEOUT".into(),
            (None, false, None, _) => format!("NO {RESULT_MARKER} LINE"),
            (None, false, Some(_), Some(c)) if c.failed > 0 => "FAILED".into(),
            (None, false, Some(0), Some(_)) => "ok".into(),
            (None, false, Some(0), None) => "NO TEST SUMMARY".into(),
            (None, false, Some(rc), _) => format!("FAILED (rc={rc})"),
        }
    }

    fn ok(&self) -> bool {
        self.status() == "ok"
    }

    fn line(&self) -> String {
        let counts = match &self.counts {
            Some(c) => format!("{} passed, {} failed, {} skipped", c.passed, c.failed, c.skipped),
            None => "no test summary".into(),
        };
        let status = if self.ok() { String::new() } else { format!(" [{}]", self.status()) };
        format!("kernel {} ({}): {counts}, {:.0}s{status}", self.label, self.release, self.secs)
    }
}

/// The failed tests of a libtest run (`test NAME ... FAILED`), each with
/// the first lines of what it printed after `---- NAME stdout ----` (the
/// panic message), so a CI log names the failure without the serial log.
fn failures(lines: &[String]) -> Vec<(String, Vec<String>)> {
    const KEEP: usize = 12;
    let names: Vec<&str> =
        lines.iter().filter_map(|l| l.trim().strip_prefix("test ")?.strip_suffix(" ... FAILED")).collect();
    names
        .iter()
        .map(|name| {
            let header = format!("---- {name} stdout ----");
            let body = lines
                .iter()
                .skip_while(|l| l.trim() != header)
                .skip(1)
                .filter(|l| !l.trim().is_empty())
                .take_while(|l| {
                    !l.starts_with("stack backtrace:") && !l.starts_with("---- ") && l.trim() != "failures:"
                })
                .take(KEEP)
                .cloned()
                .collect();
            (name.to_string(), body)
        })
        .collect()
}

fn print_summary(outcomes: &[Outcome]) {
    println!(
        "\n{:<6} {:<32} {:>6} {:>6} {:>7} {:>6}  status",
        "label", "kernel", "passed", "failed", "skipped", "time"
    );
    for o in outcomes {
        let (p, f, s) = match &o.counts {
            Some(c) => (c.passed.to_string(), c.failed.to_string(), c.skipped.to_string()),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!("{:<6} {:<32} {p:>6} {f:>6} {s:>7} {:>5.0}s  {}", o.label, o.release, o.secs, o.status());
    }
    for o in outcomes {
        for (name, body) in &o.failures {
            println!("\nkernel {}: {name} FAILED (whole output in target/vm/{}.log)", o.label, o.label);
            for l in body {
                println!("    {l}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_tests_are_counted_by_their_full_path() {
        let lines: Vec<String> = [
            "test lifecycle::sighup_reapplies_the_config ... SKIP lifecycle::sighup_reapplies_the_config: kernel 5.10 lacks x",
            "test lifecycle::restarts_under_load_lose_no_connection ... SKIP lifecycle::restarts_under_load_lose_no_connection: kernel 5.10 lacks x",
            "SKIP top_level_test: kernel 5.10 lacks x",
            "SKIP top_level_test: printed twice",
            "test kernel_support::unsupported_kernel_is_refused_clearly ... ok",
        ]
        .iter()
        .map(|l| l.to_string())
        .collect();
        assert_eq!(skipped_tests(&lines), 3);
    }

    #[test]
    fn failed_tests_are_named_with_their_panic_message() {
        let log: Vec<String> = "\
test kube::a ... ok
test kube::b ... FAILED
test c ... FAILED

failures:

---- kube::b stdout ----

thread 'kube::b' (170) panicked at tests/kernel/kube.rs:363:5:
assertion failed: ready
stack backtrace:
   0: x
---- c stdout ----
boom

failures:
    kube::b
    c

test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s"
            .lines()
            .map(str::to_string)
            .collect();
        let f = failures(&log);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].0, "kube::b");
        assert_eq!(
            f[0].1,
            ["thread 'kube::b' (170) panicked at tests/kernel/kube.rs:363:5:", "assertion failed: ready"]
        );
        assert_eq!(f[1].0, "c");
        assert_eq!(f[1].1, ["boom"]);
    }
}
