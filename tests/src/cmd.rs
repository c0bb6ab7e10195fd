//! Running commands, in the root namespace or inside a lab namespace, with errors that say
//! what ran and what it printed on standard error.
//!
//! Call these only from threads that never entered a namespace: a child process inherits the
//! network namespace of the thread that spawns it.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context as _, Result};

fn command_line(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `program args...`, feeding it `input` on standard input if given, and returns all it
/// printed and its exit status, whatever that is. A failed write of `input` (the program
/// exited without reading it) is not an error: the status and output say what happened.
pub fn output_with_input(program: &str, args: &[&str], input: Option<&str>) -> Result<Output> {
    let line = command_line(program, args);
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        let _ = stdin.write_all(input.as_bytes());
    }
    child
        .wait_with_output()
        .with_context(|| format!("cannot wait for `{line}`"))
}

/// Runs `program args...`, feeding it `input` on standard input if given; returns standard
/// output, or an error naming the command, its exit status and its standard error.
pub fn run_with_input(program: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    let out = output_with_input(program, args, input)?;
    if !out.status.success() {
        let mut msg = format!(
            "`{}` failed ({}): {}",
            command_line(program, args),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        if let Some(input) = input {
            msg.push_str(&format!("\ninput was:\n{input}"));
        }
        bail!(msg);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args...` in the caller's namespace.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    run_with_input(program, args, None)
}

/// Runs `args...` inside namespace `ns` (`ip netns exec NS args...`).
pub fn ns_exec(ns: &str, args: &[&str]) -> Result<String> {
    ns_exec_with_input(ns, args, None)
}

/// Like [`ns_exec`], with `input` on standard input (e.g. an `nft -f -` ruleset).
pub fn ns_exec_with_input(ns: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(args);
    run_with_input("ip", &full, input)
}

/// Fails the calling test, saying why and how to run it, unless this process runs as root:
/// the end-to-end tests build network namespaces, firewalls and BPF programs.
#[track_caller]
pub fn require_root() {
    assert!(
        is_root(),
        "the netrace-lab end-to-end tests need root (network namespaces, nftables, AF_PACKET, \
         eBPF); run them with `cargo xtask test`, or as root: `cargo test -p netrace-lab`"
    );
}

/// Whether this process runs as root (the lab needs it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
