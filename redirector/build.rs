//! Builds the eBPF crate with aya-build (cargo +nightly, bpfel-unknown-none,
//! build-std=core, BTF) and leaves the object in OUT_DIR for the agent to
//! embed. With AYA_BUILD_SKIP=1 (e.g. `cargo check` on a machine without
//! bpf-linker) an empty placeholder is written instead; the agent then
//! refuses to start with a message saying so. (The restart test's changed
//! build of the same programs is built by redirector-testkit.)
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let object = out_dir.join("redirector-ebpf");
    let skip = env::var("AYA_BUILD_SKIP").map(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip.unwrap_or(false) {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        fs::write(&object, b"")?;
        return Ok(());
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("..").join("redirector-ebpf");
    let root = root.to_str().expect("utf-8 path").to_owned();
    // The layout-upgrade test's agent embeds programs of its own layout.
    let features: &[&str] = if env::var_os("CARGO_FEATURE_LAYOUT_NEXT").is_some() { &["layout-next"] } else { &[] };
    aya_build::build_ebpf(
        [aya_build::Package { name: "redirector-ebpf", root_dir: &root, features, ..Default::default() }],
        aya_build::Toolchain::default(),
    )?;
    Ok(())
}
