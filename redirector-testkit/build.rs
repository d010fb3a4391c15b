//! Builds `redirector-ebpf-upgrade-test`: the agent's programs built with
//! the eBPF crate's `upgrade-test` feature (connect4/6 also count
//! `upgrade_test_build`). The restart test replaces the running programs
//! with it under load, as an upgrade to a build with changed programs
//! would. And `redirector-ebpf-socklb-standin`: the same object plus a
//! stand-in for Cilium's socket load balancer (feature `socklb-standin`),
//! for the coexistence test. With AYA_BUILD_SKIP=1 empty placeholders are
//! written instead.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let object = out_dir.join("redirector-ebpf");
    let variants =
        [("upgrade-test", "redirector-ebpf-upgrade-test"), ("socklb-standin", "redirector-ebpf-socklb-standin")];
    let skip = env::var("AYA_BUILD_SKIP").map(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip.unwrap_or(false) {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        for (_, file) in variants {
            fs::write(out_dir.join(file), b"")?;
        }
        return Ok(());
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("..").join("redirector-ebpf");
    let root = root.to_str().expect("utf-8 path").to_owned();
    for (feature, file) in variants {
        aya_build::build_ebpf(
            [aya_build::Package {
                name: "redirector-ebpf",
                root_dir: &root,
                features: &[feature],
                ..Default::default()
            }],
            aya_build::Toolchain::default(),
        )?;
        fs::rename(&object, out_dir.join(file))?;
    }
    Ok(())
}
