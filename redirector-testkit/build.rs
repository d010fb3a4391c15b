//! Builds `redirector-ebpf-upgrade-test`: the agent's programs built with
//! the eBPF crate's `upgrade-test` feature (connect4/6 also count
//! `upgrade_test_build`). The restart test replaces the running programs
//! with it under load, as an upgrade to a build with changed programs
//! would. With AYA_BUILD_SKIP=1 an empty placeholder is written instead.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let object = out_dir.join("redirector-ebpf");
    let variant = out_dir.join("redirector-ebpf-upgrade-test");
    let skip = env::var("AYA_BUILD_SKIP").map(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip.unwrap_or(false) {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        fs::write(&variant, b"")?;
        return Ok(());
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("..").join("redirector-ebpf");
    let root = root.to_str().expect("utf-8 path").to_owned();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "redirector-ebpf",
            root_dir: &root,
            features: &["upgrade-test"],
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;
    fs::rename(&object, &variant)?;
    Ok(())
}
