//! Running commands, in the root namespace or inside a lab namespace, with errors that say
//! what ran and what it printed on standard error.
//!
//! Call these only from threads that never entered a namespace: a child process inherits the
//! network namespace of the thread that spawns it.

use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

fn command_line(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `program args...`, feeding it `input` on standard input if given; returns standard
/// output, or an error naming the command, its exit status and its standard error.
pub fn run_with_input(program: &str, args: &[&str], input: Option<&str>) -> Result<String> {
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
    if let Some(input) = input {
        let mut stdin = child.stdin.take().context("no stdin pipe")?;
        stdin
            .write_all(input.as_bytes())
            .with_context(|| format!("cannot write the input of `{line}`"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("cannot wait for `{line}`"))?;
    if !out.status.success() {
        let mut msg = format!(
            "`{line}` failed ({}): {}",
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

/// Whether this process runs as root (the lab needs it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
