//! End to end: what `netrace watch` says while it runs, for logs that are read as they come
//! (`kubectl logs` of the DaemonSet). `--events lost` streams exactly the connections the
//! client saw time out (no answered ones), `--interval` writes summaries whose windows add up
//! to the final totals, in JSON (`"type":"interval"` objects) and in text (lines on standard
//! error, event lines on standard output). Ground truth: the client's own results.
//!
//! Needs root; `cargo xtask test` runs it as root.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use netrace_lab::{
    netrace_bin, require_root, Family, Lab, NetraceOptions, NetraceOutput, NetraceRun, Output,
    TcpCounts,
};
use serde_json::Value;

fn field(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no number at {pointer} in {v}"))
}

/// `netrace watch` on the lab streaming its losses and a summary every second; after `quiet`
/// with no traffic, `n` connections from the client; netrace stopped one interval after
/// everything is decided. Its output, and the client's own counts (some of each outcome).
fn connect_and_stop(lab: &Lab, quiet: Duration, n: usize) -> (NetraceOutput, TcpCounts) {
    let opts = NetraceOptions::for_lab(lab, netrace_bin().expect("the netrace binary"))
        .syn_timeout(Duration::from_millis(1500))
        .args(["--events", "lost", "--interval", "1s"]);
    let run = NetraceRun::start(&opts).expect("starting netrace");
    std::thread::sleep(quiet);
    let attempts = lab
        .client()
        .tcp(lab.server_addr(Family::V4), n, &|_, _| {})
        .expect("the client");
    run.settle();
    std::thread::sleep(Duration::from_millis(1200));
    let out = run.stop().expect("stopping netrace");
    let counts = TcpCounts::of(&attempts);
    assert!(counts.timed_out > 0 && counts.connected > 0, "{counts:?}");
    (out, counts)
}

/// The streamed records of connections the client saw time out.
fn timed_out<'a>(records: impl Iterator<Item = &'a Value>) -> usize {
    records
        .filter(|c| c["outcome"] == "lost" || c["outcome"] == "abandoned")
        .count()
}

/// The `"type":"interval"` objects, in order.
fn intervals(json: &[Value]) -> Vec<&Value> {
    json.iter().filter(|v| v["type"] == "interval").collect()
}

#[test]
fn json_events_lost_and_intervals_add_up() {
    require_root();
    let lab = Lab::seed().expect("building the seed lab");
    let (out, counts) = connect_and_stop(&lab, Duration::ZERO, 120);
    let ctx = out.describe();

    // Only losses are streamed, one per connection the client saw time out.
    let streamed: Vec<&Value> = out.connections().collect();
    assert!(
        streamed.iter().all(|c| c["outcome"] != "answered"),
        "--events lost streamed an answered connection\n{ctx}"
    );
    assert_eq!(
        timed_out(streamed.iter().copied()),
        counts.timed_out,
        "{ctx}"
    );

    // The intervals: windows add up to the totals they report, and the last totals are the
    // summary's (everything was decided before the last interval).
    let intervals = intervals(&out.json);
    assert!(intervals.len() >= 2, "expected interval objects\n{ctx}");
    let summary = out.summary().unwrap_or_else(|| panic!("{ctx}"));
    let mut sum_attempts = 0;
    let mut sum_lost = 0;
    for i in &intervals {
        sum_attempts += field(i, "/window/attempts");
        sum_lost += field(i, "/window/lost");
        assert_eq!(field(i, "/totals/attempts"), sum_attempts, "{i}");
        assert_eq!(field(i, "/totals/lost"), sum_lost, "{i}");
        assert_eq!(
            field(i, "/window/inside/attempts") + field(i, "/window/outside/attempts"),
            field(i, "/window/attempts"),
            "{i}"
        );
        assert!(i["verdict"]["kind"].is_string(), "{i}");
    }
    let last = intervals.last().unwrap();
    assert_eq!(
        field(last, "/totals/attempts"),
        field(summary, "/totals/attempts"),
        "{ctx}"
    );
    assert_eq!(
        field(last, "/totals/lost"),
        field(summary, "/totals/lost"),
        "{ctx}"
    );
    assert_eq!(
        field(last, "/totals/lost"),
        counts.timed_out as u64,
        "{ctx}"
    );
    assert_eq!(
        field(last, "/totals/outside/attempts"),
        field(summary, "/verdict/attempts_outside"),
        "{ctx}"
    );
    assert_eq!(last["verdict"]["kind"], summary["verdict"]["kind"], "{ctx}");
    // The summary line on standard error, too.
    assert!(
        out.stderr
            .lines()
            .filter(|l| l.starts_with("netrace: ["))
            .count()
            >= intervals.len(),
        "{ctx}"
    );
    lab.teardown().expect("teardown");
}

#[test]
fn text_events_and_interval_lines() {
    require_root();
    let lab = Lab::seed().expect("building the seed lab");
    let opts = NetraceOptions::for_lab(&lab, netrace_bin().expect("the netrace binary"))
        .output(Output::Text)
        .syn_timeout(Duration::from_millis(1500))
        .args(["--events", "lost", "--interval", "1s"]);
    let run = NetraceRun::start(&opts).expect("starting netrace");
    let attempts = lab
        .client()
        .tcp(lab.server_addr(Family::V4), 100, &|_, _| {})
        .expect("the client");
    run.settle();
    std::thread::sleep(Duration::from_millis(1200));
    let out = run.stop().expect("stopping netrace");
    let ctx = out.describe();
    let counts = TcpCounts::of(&attempts);
    assert!(counts.timed_out > 0, "{counts:?}");

    // One event line per lost connection, before the report, each naming its side of the range.
    let events: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("lost ") || l.starts_with("abandoned "))
        .collect();
    assert_eq!(events.len(), counts.timed_out, "{ctx}");
    assert!(
        events
            .iter()
            .all(|l| l.contains(" -> ") && l.ends_with("the allowed range")),
        "{ctx}"
    );
    assert!(
        !out.stdout.lines().any(|l| l.starts_with("answered ")),
        "{ctx}"
    );
    // Interval lines on standard error, the last one with every loss and a verdict.
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("netrace: [") && l.contains("verdict: "))
        .collect();
    assert!(lines.len() >= 2, "{ctx}");
    let last = lines.last().unwrap();
    let want = format!(
        "since start: {} attempts, {} lost",
        counts.attempts, counts.timed_out
    );
    assert!(last.contains(&want), "{last:?} lacks {want:?}\n{ctx}");
    assert!(last.contains("outside: "), "{ctx}");
    lab.teardown().expect("teardown");
}

/// An idle node costs netrace no pass over its maps and no read of its books (nothing new
/// since the last one); connections after a quiet spell must still all be seen: every
/// timeout streamed as lost, every connect counted answered, nothing in the quiet windows.
#[test]
fn connections_after_a_quiet_spell_are_all_seen() {
    require_root();
    let lab = Lab::seed().expect("building the seed lab");
    // Several sweep periods with no SYN at all.
    let (out, counts) = connect_and_stop(&lab, Duration::from_secs(3), 60);
    let ctx = out.describe();

    assert_eq!(timed_out(out.connections()), counts.timed_out, "{ctx}");
    let summary = out.summary().unwrap_or_else(|| panic!("{ctx}"));
    assert_eq!(
        field(summary, "/totals/answered"),
        counts.connected as u64,
        "{ctx}"
    );
    assert_eq!(
        field(summary, "/totals/lost"),
        counts.timed_out as u64,
        "{ctx}"
    );
    // The quiet spell's windows saw nothing; the first ones cover it.
    let intervals = intervals(&out.json);
    assert!(intervals.len() >= 3, "expected interval objects\n{ctx}");
    assert_eq!(field(intervals[0], "/window/attempts"), 0, "{ctx}");
    lab.teardown().expect("teardown");
}
