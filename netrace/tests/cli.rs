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

/// The man page is roff a `man` reader can format: a title line, the usual sections in
/// order, every request line a known roff request, hyphens escaped, and the options and
/// subcommands `--help` lists, each as a tagged paragraph.
#[test]
fn man_page_is_roff() {
    let (code, out, err) = netrace(&["man"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    let title = lines.iter().find(|l| l.starts_with(".TH "));
    assert!(
        title.is_some_and(|t| t.starts_with(".TH netrace 1 ")),
        "no `.TH netrace 1` title line:\n{out}"
    );
    // Sections, in the order man pages have them.
    let sections: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix(".SH "))
        .collect();
    let mut at = 0;
    for want in ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "SUBCOMMANDS"] {
        let pos = sections[at..]
            .iter()
            .position(|s| *s == want)
            .unwrap_or_else(|| {
                panic!(
                    "no section {want} after {:?}: {sections:?}",
                    &sections[..at]
                )
            });
        at += pos + 1;
    }
    // Every request line is a roff request a formatter knows.
    const REQUESTS: [&str; 13] = [
        ".ie", ".el", ".TH", ".SH", ".SS", ".PP", ".TP", ".IP", ".RS", ".RE", ".br", ".sp", ".nf",
    ];
    for l in lines.iter().filter(|l| l.starts_with('.')) {
        let req = l.split_whitespace().next().unwrap_or("");
        assert!(
            REQUESTS.contains(&req) || req == ".fi",
            "unknown roff request {req:?} in line {l:?}"
        );
    }
    // NAME is `netrace \- summary`; no unescaped option dashes anywhere.
    let name_at = lines.iter().position(|l| *l == ".SH NAME").unwrap();
    assert!(
        lines[name_at + 1].starts_with("netrace \\- "),
        "NAME line: {:?}",
        lines[name_at + 1]
    );
    for l in &lines {
        assert!(!l.contains(" --"), "unescaped `--` in {l:?}");
    }
    // The options and subcommands of `netrace --help`, each a tagged paragraph (.TP).
    let section = |name: &str| -> Vec<&str> {
        let start = lines
            .iter()
            .position(|l| *l == format!(".SH {name}"))
            .unwrap()
            + 1;
        lines[start..]
            .iter()
            .take_while(|l| !l.starts_with(".SH "))
            .copied()
            .collect()
    };
    let tagged = |body: &[&str]| -> Vec<String> {
        body.windows(2)
            .filter(|w| w[0] == ".TP")
            .map(|w| w[1].to_owned())
            .collect()
    };
    let options = tagged(&section("OPTIONS"));
    for want in ["\\fB\\-\\-help\\fR", "\\fB\\-\\-version\\fR"] {
        assert!(
            options.iter().any(|o| o.contains(want)),
            "OPTIONS lacks {want}: {options:?}"
        );
    }
    let subcommands = tagged(&section("SUBCOMMANDS"));
    let (_, help, _) = netrace(&["--help"]);
    let listed: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  ") || l.trim().is_empty())
        // A command's line starts with two spaces; its wrapped description, with more.
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        listed.contains(&"watch") && listed.contains(&"probe"),
        "{help}"
    );
    for cmd in listed {
        let want = format!("netrace\\-{cmd}(1)");
        assert!(
            subcommands.contains(&want),
            "SUBCOMMANDS lacks {want}: {subcommands:?}"
        );
    }
}
