//! Project tasks: `cargo xtask demo`, `cargo xtask test`, `cargo xtask bench`, `cargo xtask setup`.
//! Each one starts with the bootstrap, so the two commands in the README are all a fresh
//! Debian machine needs.

mod bench;
mod bootstrap;
mod demo;
mod deploy;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "netrace's build, test, demo and benchmark tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (Debian packages, bpf-linker) and nothing else.
    Setup {
        /// Only what building netrace needs (the container image's build stage).
        #[arg(long)]
        build_only: bool,
    },
    /// Set up, build, and run netrace on the built-in lab: the seed failure, then its fix.
    Demo,
    /// Build a statically linked netrace into target/static/netrace (for the container image).
    Static,
    /// Write deploy/prometheus/prometheusrule.yaml from deploy/prometheus/rules.yaml.
    SyncRules,
    /// Set up, and check the files under deploy/ offline (part of `test`).
    CheckDeploy,
    /// Set up, build, and run every check: fmt, clippy (both sides), deploy files, unit and
    /// end-to-end tests.
    Test {
        /// Also run the slow tests (a 10-minute run, a million-SYN flood).
        #[arg(long)]
        long: bool,
    },
    /// Set up, build (release), and measure netrace's cost against its baselines.
    Bench {
        /// Fewer repetitions, under a minute; writes under target/netrace-bench/.
        #[arg(long)]
        quick: bool,
        /// Measure nothing: rewrite docs/benchmarks.md from docs/benchmarks.json, after a
        /// change to how the results are reported.
        #[arg(long, conflicts_with = "quick")]
        render: bool,
    },
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn step(title: &str) {
    eprintln!("\n==> {title}");
}

/// Runs a command in the workspace root; fails with its name.
fn run(title: &str, cmd: &mut Command) -> anyhow::Result<()> {
    step(title);
    let status = cmd
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("starting: {title}"))?;
    if !status.success() {
        bail!("{title}: failed ({status})");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The userspace crates (the kernel crate only builds for the BPF target).
const USER_PACKAGES: [&str; 4] = ["netrace", "netrace-common", "netrace-lab", "xtask"];

fn with_packages(cmd: &mut Command) -> &mut Command {
    for p in USER_PACKAGES {
        cmd.args(["-p", p]);
    }
    cmd
}

/// The kernel crate on its real target, with the Debian compiler.
fn kernel_cargo(subcommand: &str) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", bootstrap::EBPF_TOOLCHAIN, "cargo", subcommand])
        .args([
            "-p",
            "netrace-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .env("RUSTC_BOOTSTRAP", "1")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO");
    c
}

fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn build_netrace() -> anyhow::Result<PathBuf> {
    run(
        "build netrace (the kernel programs are compiled and embedded by netrace/build.rs)",
        cargo().args(["build", "-p", "netrace"]),
    )?;
    Ok(workspace_root().join("target/debug/netrace"))
}

/// A statically linked release binary: glibc's static libc, no NSS or dlopen in netrace.
fn build_static() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    run(
        "build a static netrace (release, +crt-static)",
        cargo()
            .args(["build", "--release", "-p", "netrace"])
            .args(["--target", "x86_64-unknown-linux-gnu"])
            .args(["--target-dir", "target/static-build"])
            // With an explicit --target, RUSTFLAGS reach only the target, not build scripts.
            .env("RUSTFLAGS", "-C target-feature=+crt-static"),
    )?;
    let built = root.join("target/static-build/x86_64-unknown-linux-gnu/release/netrace");
    let dest_dir = root.join("target/static");
    std::fs::create_dir_all(&dest_dir).context("creating target/static")?;
    let dest = dest_dir.join("netrace");
    std::fs::copy(&built, &dest).with_context(|| format!("copying {}", built.display()))?;
    let ldd = Command::new("ldd")
        .arg(&dest)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&ldd.stdout) + String::from_utf8_lossy(&ldd.stderr);
    if !text.contains("not a dynamic executable") && !text.contains("statically linked") {
        bail!("{} is not static: {}", dest.display(), text.trim());
    }
    let version = Command::new(&dest)
        .arg("--version")
        .output()
        .context("running it")?;
    if !version.status.success() {
        bail!("the static binary does not run");
    }
    eprintln!(
        "static binary: {} ({})",
        dest.display(),
        String::from_utf8_lossy(&version.stdout).trim()
    );
    Ok(dest)
}

fn test(long: bool) -> anyhow::Result<()> {
    run(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    run(
        "clippy -D warnings: userspace crates",
        with_packages(cargo().arg("clippy")).args(["--all-targets", "--", "-D", "warnings"]),
    )?;
    run(
        "clippy -D warnings: kernel crate (bpfel-unknown-none)",
        kernel_cargo("clippy").args(["--", "-D", "warnings"]),
    )?;
    deploy::check()?;
    // Before the end-to-end tests: the image test builds the Containerfile's `prebuilt` stage
    // from this binary.
    let static_bin = build_static()?;
    let nextest = has_nextest();
    let mut unit = cargo();
    if nextest {
        unit.args(["nextest", "run", "--no-fail-fast", "--lib", "--bins"]);
    } else {
        unit.args(["test", "--no-fail-fast", "--lib", "--bins"]);
    }
    run("unit tests", with_packages(&mut unit))?;
    let mut e2e = cargo();
    if nextest {
        e2e.args(["nextest", "run", "--no-fail-fast", "--test", "*"]);
        if long {
            e2e.args(["--run-ignored", "all"]);
        }
    } else {
        e2e.args(["test", "--no-fail-fast", "--test", "*"]);
        if long {
            e2e.args(["--", "--include-ignored"]);
        }
    }
    e2e.env("NETRACE_STATIC", &static_bin);
    let stale_before = netrace_lab::stale_leftovers();
    let e2e = run(
        "end-to-end tests (root: network namespaces, real packets, the real binary, the image)",
        with_packages(&mut e2e),
    );
    let leaks = leak_check(&stale_before);
    e2e.and(leaks)
}

/// After every test process has exited, whatever the order they ran in: no lab namespace or
/// root-namespace link of a test process that finished during the run remains (each test's
/// lab removes its own names when dropped; this catches one that did not). Leftovers that
/// were there before the run are named but left to whoever made them.
fn leak_check(stale_before: &[String]) -> anyhow::Result<()> {
    step("leak check: no nrt* namespace or link of a finished test process remains");
    let (earlier, leaked): (Vec<String>, Vec<String>) = netrace_lab::stale_leftovers()
        .into_iter()
        .partition(|n| stale_before.contains(n));
    if !earlier.is_empty() {
        eprintln!(
            "left before this run, not by it (remove with `ip netns del NAME`): {}",
            earlier.join(" ")
        );
    }
    if leaked.is_empty() {
        eprintln!("none left by this run");
        return Ok(());
    }
    for name in &leaked {
        let what = if Path::new("/run/netns").join(name).exists() {
            "netns"
        } else {
            "link"
        };
        let _ = Command::new("ip").args([what, "del", name]).status();
    }
    bail!(
        "test processes of this run left lab namespaces or links behind (removed now): {}",
        leaked.join(" ")
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Reading and writing two files needs neither root nor the toolchain.
    if let Task::Bench { render: true, .. } = cli.task {
        return match bench::render() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("xtask: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Task::SyncRules = cli.task {
        return match deploy::sync_rules() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("xtask: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let name = match cli.task {
        Task::Setup { .. } => "setup",
        Task::SyncRules => "sync-rules",
        Task::CheckDeploy => "check-deploy",
        Task::Demo => "demo",
        Task::Test { .. } => "test",
        Task::Bench { .. } => "bench",
        Task::Static => "static",
    };
    let result = bootstrap::require_root(name)
        .and_then(|()| match cli.task {
            // The image's build stage: the compiler side only.
            Task::Setup { build_only: true } | Task::Static => bootstrap::ensure_build(),
            _ => bootstrap::ensure(),
        })
        .and_then(|()| match cli.task {
            Task::Setup { .. } | Task::SyncRules => Ok(()),
            Task::CheckDeploy => deploy::check(),
            Task::Demo => build_netrace().and_then(|bin| demo::run(&bin)),
            Task::Test { long } => test(long),
            Task::Bench { quick, .. } => build_netrace().and_then(|bin| bench::run(&bin, quick)),
            Task::Static => build_static().map(|_| ()),
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
