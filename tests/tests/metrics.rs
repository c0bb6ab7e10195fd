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
    let opts = NetraceOptions::for_lab(&lab, netrace_bin().expect("the netrace binary"))
        .syn_timeout(Duration::from_millis(1500))
        .args(["--metrics-addr", &format!("127.0.0.1:{PORT}")]);
    let run = NetraceRun::start(&opts).expect("starting netrace");
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
    // The attached gauges, the build info, and every kernel counter, named.
    for hook in ["egress", "ingress"] {
        let line = format!(
            "netrace_attached{{iface=\"{}\",hook=\"{hook}\"}} 1",
            lab.node_uplink()
        );
        assert!(body.contains(&line), "no {line:?} in\n{body}");
    }
    assert!(body.contains("netrace_build_info{version=\""), "{body}");
    assert_eq!(
        sample(&body, "netrace_kernel_events_total{event=\"syn_seen\"}"),
        sample(&body, "netrace_syns_total")
    );
    assert_eq!(
        body.lines()
            .filter(|l| l.starts_with("netrace_kernel_events_total{"))
            .count(),
        summary["counters"].as_object().map_or(0, |c| c.len()),
        "one series per kernel counter in the summary"
    );
    // Only the destination metric names addresses (at most ten of them, and "other").
    let destinations: std::collections::BTreeSet<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("netrace_destination_connections_total{destination=\""))
        .filter_map(|l| l.split('"').next())
        .collect();
    assert!(destinations.contains("other"), "{body}");
    assert!(destinations.len() <= 11, "{destinations:?}");
    let server = lab.server_addr(Family::V4).to_string();
    assert!(
        destinations.contains(server.as_str()),
        "{destinations:?} lacks {server}"
    );
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("netrace_destination_connections_total"))
    {
        assert!(
            !line.contains("198.18.") && !line.contains("2001:db8"),
            "labels must never carry addresses: {line}"
        );
    }
    // The verdict, the learned edge and the destination, as the summary says.
    let server = lab.server_addr(Family::V4);
    assert_eq!(
        sample(
            &body,
            &format!(
                "netrace_destination_connections_total{{destination=\"{server}\",outcome=\"lost\"}}"
            )
        ),
        total("lost"),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            &format!(
                "netrace_destination_connections_total{{destination=\"{server}\",outcome=\"answered\"}}"
            )
        ),
        total("answered"),
        "{body}"
    );
    assert_eq!(
        sample(&body, "netrace_verdict{verdict=\"range_problem\"}"),
        1,
        "{body}"
    );
    assert_eq!(sample(&body, "netrace_verdict{verdict=\"no_problem\"}"), 0);
    let lo = sample(
        &body,
        "netrace_allowed_range_edge{edge=\"lower\",bound=\"min\"}",
    );
    let hi = sample(
        &body,
        "netrace_allowed_range_edge{edge=\"lower\",bound=\"max\"}",
    );
    assert!(
        lo <= 32768 && 32768 <= hi,
        "the seed's edge 32768 outside [{lo}, {hi}]"
    );
    assert_eq!(
        summary["verdict"]["learned"]["lower"]["first_answered"].as_u64(),
        Some(hi)
    );
}

// ---- readiness and an abused metrics port ----

use netrace_lab::star::Star;
use netrace_lab::{inspect, TcpOutcome};

const STAR_PORT: u16 = 8080;
const READY_PORT: u16 = 19478;

/// One HTTP GET of `path` on 127.0.0.1:`port` in `ns`: the status code, or `None` when nothing
/// answers (not listening yet, or the connection was closed without an answer).
fn get_status(ns: &str, port: u16, path: &str) -> Option<u16> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    netns::spawn_in(ns, "nrt-get", move || {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(request.as_bytes())?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })
    .ok()?
    .join()
    .ok()?
    .ok()?
    .split_whitespace()
    .nth(1)?
    .parse()
    .ok()
}

fn star_with_loopback() -> Star {
    assert!(is_root(), "needs root: run it through `cargo xtask test`");
    let mut s = Star::new(1).expect("building the star");
    s.start_server(0, STAR_PORT).expect("a server");
    s.hub_exec(&["ip", "link", "set", "lo", "up"])
        .expect("loopback up in the hub");
    s
}

/// `/readyz` answers 503 while netrace is still loading and attaching, and 200 only once its
/// programs are attached to the interface (checked against the kernel's own lists);
/// `/healthz` answers 200 while it runs.
#[test]
fn readyz_turns_ready_only_after_attach() {
    let s = star_with_loopback();
    let dev = s.hub_if(0).to_owned();
    let spec = NetraceOptions::new(netrace_bin().expect("the netrace binary"), s.hub_ns(), &dev)
        .args(["--metrics-addr", &format!("127.0.0.1:{READY_PORT}")]);
    let mut w = NetraceRun::spawn(&spec).expect("spawning netrace");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let attached_at_ready = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "never ready: {seen:?}"
        );
        match get_status(s.hub_ns(), READY_PORT, "/readyz") {
            Some(200) => {
                let snap = inspect::snapshot(s.hub_ns(), &dev).expect("snapshot");
                break snap;
            }
            Some(code) => {
                assert_eq!(code, 503, "{seen:?}");
                seen.push(code);
            }
            None => {}
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let ours = attached_at_ready
        .tcx_names()
        .iter()
        .filter(|n| n.starts_with("netrace_"))
        .count()
        + attached_at_ready.netrace_filters().len();
    assert!(
        ours >= 2,
        "/readyz said ready before netrace's programs were attached: {attached_at_ready:?}"
    );
    assert!(
        !seen.is_empty(),
        "/readyz never answered 'not ready' while netrace was attaching"
    );
    w.wait_ready(Duration::from_secs(10))
        .expect("the ready file");
    assert_eq!(get_status(s.hub_ns(), READY_PORT, "/healthz"), Some(200));
    assert_eq!(get_status(s.hub_ns(), READY_PORT, "/nonsense"), Some(404));
    let out = w.stop().expect("stopping netrace");
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    s.teardown().expect("teardown");
}

/// Hundreds of idle connections to the metrics port, with netrace limited to 64 open files:
/// tracing goes on (every connection the client made is reported as the client saw it, no
/// interface is taken for gone), and once the idle clients leave a scrape works again.
#[test]
fn metrics_port_abuse_does_not_stop_tracing() {
    const IDLE: usize = 300;
    let s = star_with_loopback();
    let dev = s.hub_if(0).to_owned();
    let spec = NetraceOptions::new(netrace_bin().expect("the netrace binary"), s.hub_ns(), &dev)
        .nofile(64)
        .args(["--metrics-addr", &format!("127.0.0.1:{READY_PORT}")]);
    let w = NetraceRun::start(&spec).expect("starting netrace");
    let (release, released) = std::sync::mpsc::channel::<()>();
    let idle = netns::spawn_in(s.hub_ns(), "nrt-idle", move || {
        let mut held = Vec::new();
        for _ in 0..IDLE {
            // Connections the server closes at once (over its limit) are fine: keep trying.
            if let Ok(c) = TcpStream::connect(("127.0.0.1", READY_PORT)) {
                held.push(c);
            }
        }
        let _ = released.recv_timeout(Duration::from_secs(60));
        Ok(held.len())
    })
    .expect("spawning the idle clients");
    std::thread::sleep(Duration::from_millis(500));
    let attempts = s
        .client()
        .tcp(s.spoke_addr(0, Family::V4, STAR_PORT), 40, &|_, _| {})
        .expect("the client");
    std::thread::sleep(Duration::from_millis(2500));
    release.send(()).expect("releasing the idle clients");
    let opened = idle.join().expect("idle thread").expect("idle clients");
    assert!(opened > 0, "no idle connection could be opened");
    // The server closes idle connections after its header timeout; then it serves again.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while get_status(s.hub_ns(), READY_PORT, "/metrics") != Some(200) {
        assert!(
            std::time::Instant::now() < deadline,
            "the metrics port never recovered"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = w.stop().expect("stopping netrace");
    let ctx = out.describe();
    assert!(!out.stderr.contains("went away"), "{ctx}");
    let connected: Vec<u16> = attempts
        .iter()
        .filter(|a| a.outcome == TcpOutcome::Connected)
        .map(|a| a.pod_port)
        .collect();
    assert_eq!(connected.len(), 40, "the star answers everything");
    let mut answered = out.answered_ports();
    answered.sort_unstable();
    let mut want = connected.clone();
    want.sort_unstable();
    assert_eq!(answered, want, "{ctx}");
    assert_eq!(out.code(), Some(0), "{ctx}");
    s.teardown().expect("teardown");
}
