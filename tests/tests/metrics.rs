//! End to end: `netrace watch --metrics-addr` on the seed lab. The exposition passes
//! `promtool check metrics`, and its numbers match both the run's own summary and the client's
//! own view of its connections.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use netrace_lab::{
    is_root, netns, netrace_bin, Family, Lab, NetraceOptions, NetraceRun, TcpCounts,
};

const PORT: u16 = 19477;

fn scrape(ns: &str) -> String {
    netns::spawn_in(ns, "nrt-scrape", || {
        let mut s = TcpStream::connect(("127.0.0.1", PORT))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    })
    .expect("spawning the scraper")
    .join()
    .expect("the scraper panicked")
    .expect("scraping /metrics")
}

/// Sums `netrace_connections_total` by outcome and by range.
fn sums(text: &str) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let (mut by_outcome, mut by_range) = (BTreeMap::new(), BTreeMap::new());
    for line in text
        .lines()
        .filter(|l| l.starts_with("netrace_connections_total{"))
    {
        let (labels, value) = line.rsplit_once(' ').expect("a sample line has a value");
        let value: u64 = value.parse().expect("an integer counter");
        let label = |name: &str| {
            let key = format!("{name}=\"");
            let start = labels.find(&key).expect("label present") + key.len();
            labels[start..]
                .split('"')
                .next()
                .unwrap_or_default()
                .to_string()
        };
        *by_outcome.entry(label("outcome")).or_default() += value;
        *by_range.entry(label("range")).or_default() += value;
    }
    (by_outcome, by_range)
}

fn sample(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

#[test]
fn metrics_pass_promtool_and_match_the_summary() {
    assert!(is_root(), "needs root: run it through `cargo xtask test`");
    let lab = Lab::seed().expect("building the seed lab");
    lab.exec(lab.node_ns(), &["ip", "link", "set", "lo", "up"])
        .expect("loopback up in the node namespace");
    let opts = NetraceOptions::new(netrace_bin().expect("the netrace binary"))
        .syn_timeout(Duration::from_millis(1500))
        .args(["--metrics-addr", &format!("127.0.0.1:{PORT}")]);
    let run = NetraceRun::start(&lab, &opts).expect("starting netrace");
    let attempts = lab
        .client()
        .tcp(lab.server_addr(Family::V4), 120, &|_, _| {})
        .expect("the client");
    run.settle();
    let text = scrape(lab.node_ns());
    let out = run.stop().expect("stopping netrace");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).expect("a body").to_string();

    let check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("stdin").write_all(body.as_bytes())?;
            c.wait_with_output()
        })
        .expect("running promtool (installed by the bootstrap)");
    assert!(
        check.status.success(),
        "promtool check metrics failed:\n{}{}\n{body}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    let summary = out
        .summary()
        .unwrap_or_else(|| panic!("{}", out.describe()));
    let total = |k: &str| summary["totals"][k].as_u64().unwrap_or(u64::MAX);
    let (by_outcome, by_range) = sums(&body);
    let get = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    assert_eq!(get(&by_outcome, "answered"), total("answered"), "{body}");
    assert_eq!(
        get(&by_outcome, "lost") + get(&by_outcome, "abandoned"),
        total("lost"),
        "{body}"
    );
    let counts = TcpCounts::of(&attempts);
    assert_eq!(
        total("answered"),
        counts.connected as u64,
        "{}",
        out.describe()
    );
    assert_eq!(total("lost"), counts.timed_out as u64, "{}", out.describe());
    assert!(counts.timed_out > 0, "the seed lab loses connections");
    assert_eq!(
        get(&by_range, "outside"),
        summary["verdict"]["attempts_outside"]
            .as_u64()
            .unwrap_or(u64::MAX)
    );
    assert_eq!(
        sample(&body, "netrace_connect_rtt_seconds_count"),
        total("answered"),
        "one RTT observation per answered connection"
    );
    assert_eq!(
        sample(&body, "netrace_events_dropped_total"),
        summary["drops"]["events_lost"].as_u64().unwrap_or(u64::MAX)
    );
    assert!(sample(&body, "netrace_syns_total") >= 120);
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !line.contains("198.18.") && !line.contains("2001:db8"),
            "labels must never carry addresses: {line}"
        );
    }
}
