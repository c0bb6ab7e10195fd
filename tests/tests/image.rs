//! End to end: netrace's container image, built with podman from the Containerfile's
//! `prebuilt` stage (the static binary `cargo xtask static` built; no registry needed) and run
//! for real in the seed lab's node namespace. Its report must match the client's own results,
//! it must leave nothing attached when it exits, and the image must stay small.
//!
//! Needs root and podman (with runc); `cargo xtask test` installs podman and builds the static
//! binary first. Run it alone with
//! `cargo xtask static && cargo test -p netrace-lab --test image -- --nocapture`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netrace_lab::{
    inspect, is_root, truth, Family, Lab, LabOptions, NetraceOutput, TcpCounts, TcpOutcome,
};
use serde_json::Value;

const TCP: usize = 200;
const FIREWALL_MIN: u16 = 32768;
/// How long the container's netrace watches (`--duration`): it exits by itself after this.
const DURATION: Duration = Duration::from_secs(60);
const SYN_TIMEOUT_MS: u64 = 1500;
/// The image holds the static binary alone.
const MAX_IMAGE_BYTES: u64 = 20 * 1000 * 1000;

/// Global podman options these machines need (before the subcommand).
const PODMAN_GLOBAL: &[&str] = &["--cgroup-manager", "cgroupfs", "--runtime", "runc"];
/// `podman run` options these machines need.
const PODMAN_ULIMITS: &[&str] = &[
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn podman_present() -> bool {
    Command::new("podman")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn podman(args: &[&str]) -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(PODMAN_GLOBAL).args(args);
    cmd
}

/// Runs podman to completion; panics with what it printed when it fails.
fn podman_ok(args: &[&str], dir: &Path) -> String {
    let out = podman(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start podman {args:?}: {e}"));
    assert!(
        out.status.success(),
        "podman {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The test image; removed when dropped (also on a failed assertion).
struct Image {
    tag: String,
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = podman(&["rmi", "--force", &self.tag])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The static binary the `prebuilt` stage copies: `$NETRACE_STATIC` (set by `cargo xtask
/// test`) must be the workspace's target/static/netrace, the only path the build context has.
fn static_binary(root: &Path) -> PathBuf {
    let expected = root.join("target/static/netrace");
    if let Some(given) = std::env::var_os("NETRACE_STATIC") {
        let given = PathBuf::from(given);
        let same = given.canonicalize().ok() == expected.canonicalize().ok();
        assert!(
            same,
            "NETRACE_STATIC={} is not {}, the path the Containerfile's prebuilt stage copies",
            given.display(),
            expected.display()
        );
    }
    assert!(
        expected.is_file(),
        "{} is missing: build it with `cargo xtask static` (`cargo xtask test` does)",
        expected.display()
    );
    expected
}

/// A directory removed when dropped.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn reader(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn joined(h: Option<JoinHandle<String>>) -> String {
    h.and_then(|h| h.join().ok()).unwrap_or_default()
}

fn set(ports: &[u16]) -> BTreeSet<u16> {
    ports.iter().copied().collect()
}

#[test]
fn image_runs_the_seed_lab() {
    if !podman_present() && !is_root() {
        println!(
            "SKIPPED image_runs_the_seed_lab: podman is not installed and this is not root \
             (`cargo xtask test` runs as root and installs podman)"
        );
        return;
    }
    assert!(
        is_root(),
        "the image end-to-end test needs root (network namespaces, eBPF): run it with \
         `cargo xtask test` or as root"
    );
    assert!(
        podman_present(),
        "podman is not installed: `cargo xtask setup` installs it (apt-get install podman runc)"
    );
    let root = workspace_root();
    let binary = static_binary(&root);

    let lab = Lab::new(LabOptions::seed()).unwrap_or_else(|e| panic!("{e:#}"));
    let image = Image {
        tag: format!(
            "localhost/netrace-test:{}-{}",
            lab.names().stem,
            std::process::id()
        ),
    };

    // Build: the prebuilt stage needs no base image.
    let started = Instant::now();
    podman_ok(
        &[
            "build",
            "--target",
            "prebuilt",
            "-t",
            &image.tag,
            "-f",
            "Containerfile",
            ".",
        ],
        &root,
    );
    let size: u64 = podman_ok(
        &["image", "inspect", "--format", "{{.Size}}", &image.tag],
        &root,
    )
    .trim()
    .parse()
    .unwrap_or_else(|e| panic!("image size: {e}"));
    let binary_size = std::fs::metadata(&binary).map(|m| m.len()).unwrap_or(0);
    println!(
        "image {}: {size} bytes ({:.1} MB; the static binary is {:.1} MB), built in {:.1} s",
        image.tag,
        size as f64 / 1e6,
        binary_size as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    assert!(
        size < MAX_IMAGE_BYTES,
        "the image is {size} bytes, over {MAX_IMAGE_BYTES}"
    );
    assert!(
        size >= binary_size,
        "the image ({size} bytes) is smaller than the binary it holds ({binary_size} bytes)"
    );

    // Run it in the node's network namespace, watching the uplink; the ready file comes back
    // through a bind mount.
    let ready_dir = std::env::temp_dir().join(format!(
        "netrace-image-{}-{}",
        lab.names().stem,
        std::process::id()
    ));
    std::fs::create_dir_all(&ready_dir).unwrap();
    let _ready_dir = RemoveDir(ready_dir.clone());
    let ready_file = ready_dir.join("ready");
    let _ = std::fs::remove_file(&ready_file);
    let network = format!("ns:/run/netns/{}", lab.node_ns());
    let volume = format!("{}:/ready", ready_dir.display());
    let duration = format!("{}s", DURATION.as_secs());
    let syn_timeout = format!("{SYN_TIMEOUT_MS}ms");
    let mut args: Vec<&str> = vec!["run", "--rm", "--privileged", "--network", &network];
    args.extend_from_slice(PODMAN_ULIMITS);
    args.extend_from_slice(&[
        "--volume",
        &volume,
        &image.tag,
        "watch",
        "--iface",
        lab.node_uplink(),
        "--duration",
        &duration,
        "--output",
        "json",
        "--ready-file",
        "/ready/ready",
        "--syn-timeout",
        &syn_timeout,
    ]);
    let command_line = format!("podman {} {}", PODMAN_GLOBAL.join(" "), args.join(" "));
    let spawned = Instant::now();
    let child = podman(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{command_line}`: {e}"));
    // Read both pipes while it runs: a full pipe would block netrace's output and its exit.
    let mut child = child;
    let stdout = child.stdout.take().map(reader);
    let stderr = child.stderr.take().map(reader);
    let mut child = Some(child);
    while !ready_file.exists() {
        if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!(
                "`{command_line}` exited ({status}) before it was ready:\n{}\n{}",
                joined(stderr),
                joined(stdout)
            );
        }
        if spawned.elapsed() > DURATION / 2 {
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            panic!(
                "`{command_line}` wrote no ready file within {:?}",
                DURATION / 2
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "container ready {:.1} s after `podman run`",
        spawned.elapsed().as_secs_f64()
    );

    // The client's traffic and the lab's own view of it.
    let family = Family::V4;
    let server = lab.server_addr(family);
    let attempts = lab
        .client()
        .tcp(server, TCP, &|_, _| {})
        .unwrap_or_else(|e| panic!("TCP client to {server}: {e:#}"));
    let counts = TcpCounts::of(&attempts);
    if let Some(s) = lab.server() {
        s.wait_accepted(counts.connected, Duration::from_secs(3));
    }
    let truth =
        truth::collect(&lab, family, &attempts).unwrap_or_else(|e| panic!("ground truth: {e:#}"));
    std::thread::sleep(Duration::from_millis(SYN_TIMEOUT_MS) + Duration::from_secs(1));
    let traffic_done = spawned.elapsed();
    assert!(
        traffic_done + Duration::from_secs(2) < DURATION,
        "the client's traffic took until {traffic_done:?} after `podman run`, too close to \
         --duration {DURATION:?} to be sure netrace saw all of it"
    );

    // netrace stops by itself after --duration; podman run returns its exit status.
    let mut c = child.take().unwrap();
    let deadline = spawned + DURATION + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = c.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            panic!(
                "`{command_line}` did not exit within 60 s of --duration:\n{}",
                joined(stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out =
        NetraceOutput::from_captured(command_line.clone(), status, joined(stdout), joined(stderr));
    let ctx = out.describe();

    // Nothing left on the interface once the container is gone.
    let attached =
        inspect::snapshot(lab.node_ns(), lab.node_uplink()).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        attached.is_empty(),
        "{} still has something attached after the container exited: {attached:?}\n{ctx}",
        lab.node_uplink()
    );

    // The report against the client's own results.
    assert!(
        counts.timed_out > 0,
        "the seed lab lost nothing: {counts:?}"
    );
    assert_eq!(
        counts.connected + counts.timed_out,
        counts.attempts,
        "unexpected client outcomes: {counts:?}"
    );
    assert!(
        out.unparsed.is_empty(),
        "non-JSON output: {:?}\n{ctx}",
        out.unparsed
    );
    let truth_lost = truth.snat_ports_where(&TcpOutcome::TimedOut);
    let truth_answered = truth.snat_ports_where(&TcpOutcome::Connected);
    assert_eq!(
        truth_lost, truth.firewall_dropped,
        "lab's own views disagree"
    );
    let lost = out.lost_ports();
    let answered = out.answered_ports();
    assert_eq!(
        set(&lost),
        truth_lost,
        "lost ports differ from the client's timed-out SNAT ports\n{ctx}"
    );
    assert_eq!(
        set(&answered),
        truth_answered,
        "answered ports differ from the client's connected SNAT ports\n{ctx}"
    );
    assert_eq!(lost.len(), counts.timed_out, "{ctx}");
    assert_eq!(answered.len(), counts.connected, "{ctx}");
    let total = |p: &str| out.summary_at(p).and_then(Value::as_u64);
    assert_eq!(
        total("/totals/lost"),
        Some(counts.timed_out as u64),
        "{ctx}"
    );
    assert_eq!(
        total("/totals/answered"),
        Some(counts.connected as u64),
        "{ctx}"
    );
    assert_eq!(
        out.summary_at("/verdict/kind").and_then(Value::as_str),
        Some("range_problem"),
        "{ctx}"
    );
    assert!(
        lost.iter().all(|&p| p < FIREWALL_MIN),
        "lost port >= {FIREWALL_MIN}\n{ctx}"
    );
    assert_eq!(out.code(), Some(1), "exit code with loss\n{ctx}");
    println!(
        "image run: {} attempts, {} lost, {} answered (traffic done {:.1} s after `podman run`, \
         --duration {:?}); netrace in the container agreed (range_problem, exit 1, nothing \
         left attached)",
        counts.attempts,
        counts.timed_out,
        counts.connected,
        traffic_done.as_secs_f64(),
        DURATION
    );

    drop(image);
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}
