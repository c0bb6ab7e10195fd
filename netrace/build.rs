//! Compiles the kernel crate for the BPF target and leaves the object in OUT_DIR, where
//! `src/loader.rs` embeds it. The kernel crate needs a compiler with library source (Debian's
//! `rustc-web` under /usr by default), which `cargo xtask` installs; everything else is built by
//! the stable toolchain running this script.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=NETRACE_EBPF_TOOLCHAIN");
    // SAFETY: build scripts are single-threaded; the variable reaches only the inner build,
    // which needs `-Z build-std=core` from a non-nightly compiler.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let toolchain = std::env::var("NETRACE_EBPF_TOOLCHAIN").unwrap_or_else(|_| "/usr".into());
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("reading the workspace metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "netrace-ebpf")
        .ok_or_else(|| anyhow!("netrace-ebpf is not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("netrace-ebpf's manifest has no parent directory"))?;
    // The kernel crate's rules and types live in netrace-common too: a change there must
    // rebuild the object (aya-build only watches the kernel crate's own directory).
    let common = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "netrace-common")
        .ok_or_else(|| anyhow!("netrace-common is not in the workspace"))?;
    if let Some(dir) = common.manifest_path.parent() {
        println!("cargo:rerun-if-changed={dir}");
    }
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain)).context(
        "building the kernel programs (run `cargo xtask setup` to install the BPF toolchain)",
    )
}
