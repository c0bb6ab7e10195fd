//! Everything a fresh Debian machine needs before netrace builds and its tests run, checked
//! in well under two seconds when present, installed (with each step printed) when not.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _};

/// Debian packages: the compiler with library source for the kernel crate, LLVM 22 for
/// bpf-linker, and the tools the tests drive.
pub const PACKAGES: &[&str] = &[
    "rustc-web",
    "rust-web-src",
    "rust-web-clippy",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "iptables",
    "nftables",
    "conntrack",
    "tcpdump",
    // promtool, to check the metrics and the example alert rules.
    "prometheus",
];

/// Python packages (PyPI): offline validation of the Kubernetes manifests.
const PYTHON_PACKAGES: &[(&str, &str)] = &[("kubernetes_validate", "kubernetes-validate")];

/// Where the Debian compiler (the kernel crate's toolchain) lives.
pub const EBPF_TOOLCHAIN: &str = "/usr";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const LIBRARY_SOURCE: &str = "/usr/lib/rustlib/src/rust/library";

fn say(msg: &str) {
    eprintln!("bootstrap: {msg}");
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Stops at once, before any work, when not root.
pub fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "`cargo xtask {what}` must run as root (it installs packages, loads eBPF programs \
             and creates network namespaces): run `sudo -E env PATH=\"$PATH\" cargo xtask {what}`"
        );
    }
    Ok(())
}

fn missing_packages() -> anyhow::Result<Vec<&'static str>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Status}\n"])
        .args(PACKAGES)
        .output()
        .context("running dpkg-query (is this a Debian machine?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(PACKAGES
        .iter()
        .copied()
        .filter(|p| !text.lines().any(|l| l == format!("{p} installed")))
        .collect())
}

/// Where `cargo install` puts bpf-linker, else wherever PATH finds one.
fn bpf_linker_path() -> Option<PathBuf> {
    let installed = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map(|home| home.join("bin").join("bpf-linker"))
        .filter(|p| p.exists());
    installed.or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|dir| dir.join("bpf-linker"))
            .find(|p| p.exists())
    })
}

/// Whether bpf-linker is installed and linked against LLVM 22 (rustc-web's LLVM).
fn bpf_linker_ok() -> bool {
    let Some(path) = bpf_linker_path() else {
        return false;
    };
    Command::new("ldd")
        .arg(&path)
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("libLLVM.so.22"))
}

fn run(cmd: &mut Command, what: &str, fix: &str) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status}); to fix it by hand: {fix}");
    }
    Ok(())
}

/// Checks and installs; idempotent.
pub fn ensure() -> anyhow::Result<()> {
    let started = Instant::now();
    let missing = missing_packages()?;
    if !missing.is_empty() {
        let list = missing.join(" ");
        let fix = format!("apt-get update && apt-get install -y {list}");
        if !is_root() {
            bail!("missing Debian packages {list} and not root to install them: {fix}");
        }
        say(&format!("installing Debian packages: {list}"));
        run(
            Command::new("apt-get").args(["update", "-q"]),
            "apt-get update (is the package registry reachable?)",
            &fix,
        )?;
        run(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "apt-get install",
            &fix,
        )?;
    }
    for (module, package) in PYTHON_PACKAGES {
        let present = Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !present {
            say(&format!("installing Python package {package} (pip)"));
            run(
                Command::new("python3").args(["-m", "pip", "install", "-q", package]),
                "pip install",
                &format!("python3 -m pip install {package}"),
            )?;
        }
    }
    if !Path::new(LIBRARY_SOURCE).is_dir() {
        bail!(
            "{LIBRARY_SOURCE} is missing although rust-web-src is installed: \
             apt-get install --reinstall rust-web-src"
        );
    }
    if !bpf_linker_ok() {
        let fix = format!(
            "PATH={LLVM_BIN}:$PATH cargo install bpf-linker --no-default-features --features llvm-22"
        );
        say("installing bpf-linker built against LLVM 22 (about a minute)");
        let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
        run(
            Command::new("cargo")
                .args([
                    "install",
                    "--force",
                    "bpf-linker",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("PATH", path),
            "cargo install bpf-linker",
            &fix,
        )?;
    }
    say(&format!(
        "toolchain ready ({} Debian packages, bpf-linker with LLVM 22) in {:.2} s",
        PACKAGES.len(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}
