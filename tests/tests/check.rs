//! End to end: `netrace check` in a namespace whose uplink carries another tool's TCX program
//! and tc filter. It runs with an empty environment (no external programs), says the node can
//! run netrace, names the uplink, and lists both foreign programs, as the test put them there.
//! Also the kernel programs' debug messages, present with `-vv` and absent without.
//!
//! Needs root; `cargo xtask test` runs it as root.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;

use netrace_lab::foreign_tcx::{ForeignTcx, FOREIGN_PROG_NAME};
use netrace_lab::inspect::Dir;
use netrace_lab::star::Star;
use netrace_lab::{is_root, netrace_bin};

#[test]
fn check_names_the_uplink_and_foreign_programs() {
    assert!(is_root(), "needs root: run it through `cargo xtask test`");
    let s = Star::new(1).expect("building the star");
    let dev = s.hub_if(0).to_owned();
    let tcx = ForeignTcx::drop_tcp_port(s.hub_ns(), &dev, Dir::Egress, 8082)
        .expect("a foreign TCX program");
    for args in [
        vec!["tc", "qdisc", "add", "dev", &dev, "clsact"],
        vec![
            "tc", "filter", "add", "dev", &dev, "ingress", "protocol", "all", "prio", "7", "u32",
            "match", "u32", "0", "0", "classid", "1:1",
        ],
    ] {
        s.hub_exec(&args).expect("a foreign tc filter");
    }
    let bin = netrace_bin().expect("the netrace binary");
    let out = Command::new("ip")
        .args(["netns", "exec", s.hub_ns()])
        .arg(&bin)
        .args(["check", "--iface", &dev])
        .env_clear()
        .output()
        .expect("running netrace check");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let ctx = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{ctx}");
    for what in [
        "kernel",
        "TCX",
        "BTF",
        "ring buffer",
        "capabilities",
        "tracefs",
        "cgroup view",
    ] {
        assert!(
            text.lines().any(|l| l
                .split_whitespace()
                .skip(1)
                .collect::<Vec<_>>()
                .join(" ")
                .starts_with(what)),
            "no {what} line\n{ctx}"
        );
    }
    assert!(text.contains(&format!("--iface names {dev}")), "{ctx}");
    let uplink = text
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("uplink"))
        .unwrap_or_else(|| panic!("no uplink line\n{ctx}"));
    assert!(
        uplink.contains(&format!("TCX egress {FOREIGN_PROG_NAME}")),
        "{ctx}"
    );
    assert!(uplink.contains("tc ingress u32 (priority 7)"), "{ctx}");
    assert!(text.contains("this node can run netrace watch"), "{ctx}");
    drop(tcx);
    s.teardown().expect("teardown");
}

/// `-vv` turns on the kernel programs' debug messages (aya-log): a SYN the destination filter
/// skips is said on standard error; without it, nothing is.
#[test]
fn kernel_debug_messages_only_when_asked() {
    use netrace_lab::Family;
    use netrace_lab::{NetraceOptions, NetraceRun};
    assert!(is_root(), "needs root: run it through `cargo xtask test`");
    let mut s = Star::new(1).expect("building the star");
    s.start_server(0, 8080).expect("a server");
    let dev = s.hub_if(0).to_owned();
    let bin = netrace_bin().expect("the netrace binary");
    let skipped = "SYN to port 8080 skipped: outside --filter-dst/--filter-dport";
    for (verbose, want) in [(true, true), (false, false)] {
        let mut spec = NetraceOptions::new(&bin, s.hub_ns(), &dev).args(["--filter-dport", "9"]);
        if verbose {
            spec = spec.args(["-vv"]);
        }
        let w = NetraceRun::start(&spec).expect("starting netrace");
        s.client()
            .tcp(s.spoke_addr(0, Family::V4, 8080), 3, &|_, _| {})
            .expect("the client");
        std::thread::sleep(std::time::Duration::from_millis(500));
        let out = w.stop().expect("stopping netrace");
        assert_eq!(
            out.stderr.contains(skipped),
            want,
            "-vv {verbose}\n{}",
            out.describe()
        );
    }
    s.teardown().expect("teardown");
}
