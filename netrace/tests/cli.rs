//! The real binary's help, completions and man page, generated from the clap definitions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn netrace(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_netrace"))
        .args(args)
        .output()
        .expect("running netrace");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn watch_help_teaches_the_options_by_group() {
    let (code, out, _) = netrace(&["watch", "--help"]);
    assert_eq!(code, 0);
    for needle in [
        "--iface",
        "--allowed-ports",
        "--syn-timeout",
        "--filter-dst",
        "--output",
        "--svg",
        "--list-lost",
        "--ready-file",
        "--pod-iface",
        "--metrics-addr",
        "Where:",
        "Analysis:",
        "Filter:",
        "Output:",
        "Attribution:",
    ] {
        assert!(
            out.contains(needle),
            "`netrace watch --help` lacks {needle}:\n{out}"
        );
    }
}

#[test]
fn completions_for_every_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef netrace"),
        ("fish", "complete -c netrace"),
    ] {
        let (code, out, err) = netrace(&["completions", shell]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(marker), "{shell}: {out}");
        assert!(
            out.contains("allowed-ports"),
            "{shell} completion lacks watch options"
        );
    }
    let (code, _, err) = netrace(&["completions", "tcsh"]);
    assert_eq!(code, 2, "an unknown shell is a usage error: {err}");
}

#[test]
fn man_page_is_roff() {
    let (code, out, _) = netrace(&["man"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with(".ie") || out.contains(".TH netrace"),
        "{}",
        &out[..200.min(out.len())]
    );
    assert!(out.contains("watch"), "the man page lists the subcommands");
}
