//! Everything a fresh Debian machine needs before netrace builds and its tests run, checked
//! in well under two seconds when present, installed (with each step printed) when not.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _};

/// Debian packages that build netrace: the compiler with library source for the kernel crate,
/// and LLVM 22 for bpf-linker. The container image's build stage installs these alone
/// (`cargo xtask setup --build-only`).
pub const BUILD_PACKAGES: &[&str] = &[
    "rustc-web",
    "rust-web-src",
    "rust-web-clippy",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];

/// Debian packages the tests drive.
pub const TOOL_PACKAGES: &[&str] = &[
    "iproute2",
    "iptables",
    "nftables",
    "conntrack",
    "tcpdump",
    // `nc`: the demo's pod runs the article's `nc -vv` / `nc -vvu` for real.
    "netcat-openbsd",
    // promtool (the metrics, the rules and their unit tests) and the Prometheus server the
    // fleet end-to-end test runs.
    "prometheus",
    // A virtual environment for the manifest validator (Debian's Python refuses a global pip
    // install).
    "python3-venv",
    // The container image's end-to-end test builds the image and runs it (podman with runc:
    // the runtime these machines need).
    "podman",
    "runc",
];

/// `kubectl kustomize` renders the kustomizations for validation. Debian's kubectl is in
/// `kubernetes-client`; installed only when no kubectl is on PATH (another one will do).
const KUBECTL_PACKAGE: &str = "kubernetes-client";

/// Python packages (PyPI), installed in [`venv_dir`]: offline validation of the Kubernetes
/// manifests (the schemas ship inside the package).
const PYTHON_PACKAGES: &[(&str, &str)] = &[("kubernetes_validate", "kubernetes-validate")];

/// The virtual environment for [`PYTHON_PACKAGES`], under the workspace's target directory.
pub fn venv_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        .join("target")
        .join("xtask-venv")
}

/// The virtual environment's Python.
pub fn venv_python() -> PathBuf {
    venv_dir().join("bin").join("python3")
}

/// Whether `name` is an executable file in a PATH directory.
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

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

fn missing_packages(wanted: &[&'static str]) -> anyhow::Result<Vec<&'static str>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Status}\n"])
        .args(wanted)
        .output()
        .context("running dpkg-query (is this a Debian machine?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(wanted
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

/// Checks and installs everything; idempotent.
pub fn ensure() -> anyhow::Result<()> {
    ensure_with(true)
}

/// Checks and installs what building netrace needs (the container image's build stage).
pub fn ensure_build() -> anyhow::Result<()> {
    ensure_with(false)
}

fn install_debian(missing: &[&str]) -> anyhow::Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
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
            .args(missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install",
        &fix,
    )
}

/// The manifest validator in its own virtual environment (works on a stock Debian 12, whose
/// system Python refuses `pip install`).
fn ensure_python_packages() -> anyhow::Result<()> {
    let venv = venv_dir();
    let python = venv_python();
    if !python.exists() {
        say(&format!(
            "creating a Python virtual environment in {}",
            venv.display()
        ));
        run(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            "python3 -m venv",
            &format!(
                "apt-get install python3-venv && python3 -m venv {}",
                venv.display()
            ),
        )?;
    }
    for (module, package) in PYTHON_PACKAGES {
        let present = Command::new(&python)
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !present {
            say(&format!(
                "installing Python package {package} (pip, in {})",
                venv.display()
            ));
            run(
                Command::new(&python).args(["-m", "pip", "install", "-q", package]),
                "pip install",
                &format!("{} -m pip install {package}", python.display()),
            )?;
        }
    }
    Ok(())
}

fn ensure_with(tools: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut wanted: Vec<&'static str> = BUILD_PACKAGES.to_vec();
    if tools {
        wanted.extend_from_slice(TOOL_PACKAGES);
        if !on_path("kubectl") {
            wanted.push(KUBECTL_PACKAGE);
        }
    }
    install_debian(&missing_packages(&wanted)?)?;
    if tools {
        ensure_python_packages()?;
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
        wanted.len(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}
