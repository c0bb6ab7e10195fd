//! End to end: `netrace probe` run in the lab's node namespace, whose uplink faces the
//! firewall. The labs here have no SNAT (`SnatMode::None`): the node's MASQUERADE rule has no
//! source match, so with SNAT it would rewrite the node's own sockets too (the seed-lab test
//! below shows that), and only without it is the bound source port the port the firewall sees.
//!
//! Needs root (for the lab; the probe itself runs unprivileged in one test). Run one test with
//! e.g. `cargo test -p netrace-lab --test probe edge_32768 -- --nocapture`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use netrace_lab::netrace_run::run_once;
use netrace_lab::probe_lab;
use netrace_lab::{netrace_bin, require_root, Family, Lab, LabOptions, Server, SnatMode, UdpMode};
use serde_json::Value;

/// Short timeout and high rate: the lab answers in well under a millisecond.
const FAST: [&str; 4] = ["--timeout", "300ms", "--rate", "200"];
/// Each probe run must stay well under this.
const RUN_LIMIT: Duration = Duration::from_secs(30);

/// A lab whose firewall lets SYN-ACKs back only to `min..`, without SNAT.
fn lab(min: u16) -> Lab {
    require_root();
    Lab::new(
        LabOptions::seed()
            .firewall_min_port(min)
            .snat_mode(SnatMode::None),
    )
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Asserts there are probes, and every one of them ended in `outcome` (`all` on an empty map
/// is true: it would let a run that probed nothing pass).
#[track_caller]
fn assert_all(probes: &BTreeMap<u16, String>, outcome: &str, ctx: &str) {
    assert!(!probes.is_empty(), "no probes at all\n{ctx}");
    let other: Vec<_> = probes.iter().filter(|(_, o)| *o != outcome).collect();
    assert!(other.is_empty(), "probes not {outcome}: {other:?}\n{ctx}");
}

fn target(addr: SocketAddr) -> String {
    addr.to_string() // [v6]:port for IPv6
}

/// What one `netrace probe` printed.
struct Probe {
    what: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Probe {
    fn ctx(&self) -> String {
        format!(
            "`{}` exited {:?} after {:?}\n--- stderr ---\n{}\n--- stdout ---\n{}",
            self.what,
            self.code,
            self.took,
            self.stderr.trim_end(),
            self.stdout.trim_end()
        )
    }

    fn json(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{}", self.ctx()))
            })
            .collect()
    }

    fn summary(&self) -> Value {
        let all = self.json();
        let last = all.last().cloned().unwrap_or(Value::Null);
        assert_eq!(
            last["type"],
            "summary",
            "the last line is not the summary\n{}",
            self.ctx()
        );
        assert_eq!(
            all.iter().filter(|v| v["type"] == "summary").count(),
            1,
            "{}",
            self.ctx()
        );
        last
    }

    /// Every probe line of `proto`: port → outcome (asserting no port was probed twice).
    fn outcomes(&self, proto: &str) -> BTreeMap<u16, String> {
        let mut m = BTreeMap::new();
        for v in self.json().iter().filter(|v| v["type"] == "probe") {
            assert!(
                ["tcp", "udp"].contains(&v["proto"].as_str().unwrap_or("")),
                "{v}"
            );
            assert!(
                ["sample", "bisect"].contains(&v["phase"].as_str().unwrap_or("")),
                "{v}"
            );
            if v["proto"] != proto {
                continue;
            }
            let port = u16::try_from(v["port"].as_u64().unwrap_or(0)).unwrap_or(0);
            let outcome = v["outcome"].as_str().unwrap_or("?").to_owned();
            assert!(
                m.insert(port, outcome).is_none(),
                "{proto} port {port} probed twice\n{}",
                self.ctx()
            );
        }
        m
    }
}

/// Runs `netrace probe ARGS` in `ns` (optionally as another user via `setpriv`).
fn run_in(ns: &str, as_nobody: bool, args: &[&str]) -> Probe {
    let bin = netrace_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let nobody: &[&str] = if as_nobody {
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ]
    } else {
        &[]
    };
    let mut argv = vec!["probe"];
    argv.extend_from_slice(args);
    let started = Instant::now();
    // Killed well after RUN_LIMIT: the assertion below reports the overrun.
    let out = run_once(&bin, ns, nobody, &argv, RUN_LIMIT * 4).unwrap_or_else(|e| panic!("{e:#}"));
    let p = Probe {
        what: out.command_line,
        code: out.status.code(),
        stdout: out.stdout,
        stderr: out.stderr,
        took: started.elapsed(),
    };
    assert!(p.took < RUN_LIMIT, "the probe took too long\n{}", p.ctx());
    p
}

fn probe_json(lab: &Lab, addr: SocketAddr, extra: &[&str]) -> Probe {
    let t = target(addr);
    let mut args = vec![t.as_str(), "--output", "json"];
    args.extend(FAST);
    args.extend_from_slice(extra);
    run_in(lab.node_ns(), false, &args)
}

fn u64_at(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no number at {pointer} in {v}"))
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {v}"))
}

/// The inference found exactly `lo..=hi`, to the port, with both edges exact; every TCP
/// probe inside answered and every one outside timed out.
fn assert_range(p: &Probe, lo: u16, hi: u16) {
    let s = p.summary();
    let ctx = p.ctx();
    assert_eq!(str_at(&s, "/inference/kind"), "range", "{ctx}");
    assert_eq!(
        s.pointer("/inference/exact"),
        Some(&Value::Bool(true)),
        "{ctx}"
    );
    assert_eq!(
        u64_at(&s, "/inference/allowed/start"),
        u64::from(lo),
        "{ctx}"
    );
    assert_eq!(u64_at(&s, "/inference/allowed/end"), u64::from(hi), "{ctx}");
    assert_eq!(str_at(&s, "/inference/lower/status"), "exact", "{ctx}");
    assert_eq!(str_at(&s, "/inference/upper/status"), "exact", "{ctx}");
    assert_eq!(
        u64_at(&s, "/inference/lower/inside"),
        u64::from(lo),
        "{ctx}"
    );
    if lo > 1 {
        assert_eq!(
            u64_at(&s, "/inference/lower/outside"),
            u64::from(lo - 1),
            "{ctx}"
        );
    }
    assert_eq!(
        u64_at(&s, "/inference/upper/inside"),
        u64::from(hi),
        "{ctx}"
    );
    if hi < u16::MAX {
        assert_eq!(
            u64_at(&s, "/inference/upper/outside"),
            u64::from(hi + 1),
            "{ctx}"
        );
    }
    let tcp = p.outcomes("tcp");
    for (&port, outcome) in &tcp {
        let expect = if (lo..=hi).contains(&port) {
            "answered"
        } else {
            "timeout"
        };
        assert_eq!(outcome, expect, "TCP from port {port}\n{ctx}");
    }
    let bisect = p
        .json()
        .iter()
        .filter(|v| v["type"] == "probe" && v["proto"] == "tcp" && v["phase"] == "bisect")
        .count() as u64;
    assert_eq!(bisect, u64_at(&s, "/inference/extra_probes"), "{ctx}");
    assert!(bisect > 0, "no bisection was needed?\n{ctx}");
    assert_eq!(u64_at(&s, "/totals/probes"), tcp.len() as u64, "{ctx}");
    assert_eq!(s["primary"], "tcp", "{ctx}");
    assert_eq!(p.code, Some(1), "exit status with ports lost\n{ctx}");
}

/// The server saw exactly the answered ports as peers: the bound port is the port outside.
fn assert_server_saw(lab: &Lab, p: &Probe, family: Family) {
    let answered: BTreeSet<u16> = p
        .outcomes("tcp")
        .into_iter()
        .filter(|(_, o)| o == "answered")
        .map(|(port, _)| port)
        .collect();
    let server = lab.server().expect("the lab's server");
    server.wait_accepted(answered.len(), Duration::from_secs(5));
    let seen: BTreeSet<u16> = server
        .accepted_ports(family == Family::V6)
        .into_iter()
        .collect();
    assert_eq!(
        seen,
        answered,
        "server peers vs answered probes\n{}",
        p.ctx()
    );
}

#[test]
fn edge_32768_with_udp_echo() {
    let lab = lab(32768);
    let server = lab.server_addr(Family::V4);
    let p = probe_json(&lab, server, &[]);
    assert_range(&p, 32768, 65535);
    assert_server_saw(&lab, &p, Family::V4);
    let s = p.summary();
    let ctx = p.ctx();
    // The article's comparison: UDP gets through from the ports TCP cannot use.
    assert_eq!(str_at(&s, "/udp/kind"), "tcp_only_filter", "{ctx}");
    let udp = p.outcomes("udp");
    assert!(udp.len() >= 16, "{ctx}");
    assert_all(&udp, "answered", &ctx);
    assert!(
        udp.contains_key(&32767) && udp.contains_key(&32768),
        "{ctx}"
    );
    assert!(u64_at(&s, "/udp/where_tcp_silent") > 0, "{ctx}");
    assert_eq!(
        u64_at(&s, "/udp/where_tcp_silent"),
        u64_at(&s, "/udp/where_tcp_silent_came_back"),
        "{ctx}"
    );
    assert_eq!(s["snat_warning"], false, "{ctx}");
    assert_eq!(s["family"], "ipv4", "{ctx}");
    assert_eq!(
        s["local_addr"],
        lab.node_uplink_ip(Family::V4).to_string(),
        "{ctx}"
    );
    assert!(
        s["fix"].as_array().is_some_and(|f| f
            .iter()
            .any(|x| x.as_str().unwrap_or("").contains("--to-ports 32768-65535"))),
        "{ctx}"
    );
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn edge_40000_json_and_text() {
    let lab = lab(40000);
    let server = lab.server_addr(Family::V4);
    let p = probe_json(&lab, server, &["--tcp"]);
    assert_range(&p, 40000, 65535);
    assert!(p.outcomes("udp").is_empty(), "--tcp alone probes no UDP");
    assert_eq!(p.summary()["udp"], Value::Null);
    assert_server_saw(&lab, &p, Family::V4);

    // The same in words (the ports probed above may be probed again: answered ones were
    // closed with a RST, timed-out ones are still dropped by the firewall).
    let t = target(server);
    let mut args = vec![t.as_str()];
    args.extend(FAST);
    let text = run_in(lab.node_ns(), false, &args);
    println!("{}", text.stdout);
    let ctx = text.ctx();
    assert_eq!(text.code, Some(1), "{ctx}");
    let out = &text.stdout;
    assert!(
        out.contains("TCP: SYN-ACKs come back only to source ports 40000-65535"),
        "{ctx}"
    );
    assert!(
        out.contains("lower edge 40000: exact (port 39999 got no answer, port 40000 did)"),
        "{ctx}"
    );
    assert!(out.contains("source ports"), "{ctx}");
    assert!(
        out.contains("40000-49151"),
        "the table splits at the edge\n{ctx}"
    );
    assert!(out.contains("UDP: replies came back to"), "{ctx}");
    assert!(out.contains("nc -vvu"), "{ctx}");
    assert!(out.contains("net.ipv4.ip_local_port_range"), "{ctx}");
    assert!(out.contains("--to-ports 40000-65535"), "{ctx}");
    assert!(out.contains("netrace watch"), "the SNAT note\n{ctx}");
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn edge_1024() {
    let lab = lab(1024);
    let server = lab.server_addr(Family::V4);
    // Over the default 1024-65535 everything answers: no filter there, exit 0.
    let p = probe_json(&lab, server, &[]);
    let s = p.summary();
    let ctx = p.ctx();
    assert_eq!(str_at(&s, "/inference/kind"), "all_answered", "{ctx}");
    assert_eq!(str_at(&s, "/inference/lower/status"), "open", "{ctx}");
    assert_eq!(u64_at(&s, "/inference/lower/inside"), 1024, "{ctx}");
    assert_eq!(u64_at(&s, "/inference/extra_probes"), 0, "{ctx}");
    assert_all(&p.outcomes("tcp"), "answered", &ctx);
    assert_eq!(str_at(&s, "/udp/kind"), "both_through", "{ctx}");
    assert_eq!(p.code, Some(0), "{ctx}");
    // From port 1 up (root may bind ports below 1024) the edge is found to the port.
    let p = probe_json(&lab, server, &["--ports", "1-65535"]);
    assert_range(&p, 1024, 65535);
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn two_edges_40000_to_60999() {
    let lab = lab(40000);
    probe_lab::firewall_max_port(&lab, 60999).unwrap_or_else(|e| panic!("{e:#}"));
    let p = probe_json(&lab, lab.server_addr(Family::V4), &["--tcp"]);
    assert_range(&p, 40000, 60999);
    let s = p.summary();
    assert!(
        s["fix"].as_array().is_some_and(|f| f.iter().any(|x| x
            .as_str()
            .unwrap_or("")
            .contains("ip_local_port_range=\"40000 60999\""))),
        "{}",
        p.ctx()
    );
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn ipv6_edge_40000() {
    let lab = lab(40000);
    let server = lab.server_addr(Family::V6);
    let p = probe_json(&lab, server, &[]);
    assert_range(&p, 40000, 65535);
    assert_server_saw(&lab, &p, Family::V6);
    let s = p.summary();
    assert_eq!(s["family"], "ipv6");
    assert_eq!(str_at(&s, "/udp/kind"), "tcp_only_filter", "{}", p.ctx());
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn server_without_udp_answer() {
    let lab = lab(32768);
    probe_lab::server_icmp_unlimited(&lab).unwrap_or_else(|e| panic!("{e:#}"));
    let start = |port, udp| {
        Server::start_with(lab.server_ns(), port, udp).unwrap_or_else(|e| panic!("{e:#}"))
    };
    let (mut silent, mut closed) = (start(8081, UdpMode::Silent), start(8082, UdpMode::Closed));
    let at = |s: &Server| SocketAddr::new(lab.server_addr(Family::V4).ip(), s.port());

    // Bound but silent: no reply, none expected; TCP still finds the edge.
    let p = probe_json(&lab, at(&silent), &[]);
    assert_range(&p, 32768, 65535);
    let s = p.summary();
    let ctx = p.ctx();
    assert_eq!(str_at(&s, "/udp/kind"), "no_reply", "{ctx}");
    assert!(
        str_at(&s, "/udp/text").contains("no reply expected"),
        "{ctx}"
    );
    let udp = p.outcomes("udp");
    assert_all(&udp, "timeout", &ctx);
    assert_eq!(
        silent.udp_received(),
        udp.len(),
        "every datagram arrived\n{ctx}"
    );
    assert!(!silent.accepted().is_empty(), "{ctx}");

    // Closed: ICMP port unreachable comes back from every port (UDP is not filtered).
    let p = probe_json(&lab, at(&closed), &[]);
    assert_range(&p, 32768, 65535);
    let s = p.summary();
    let ctx = p.ctx();
    assert_eq!(str_at(&s, "/udp/kind"), "udp_closed", "{ctx}");
    assert_all(&p.outcomes("udp"), "refused", &ctx);

    // --udp alone against the silent service: nothing to infer, said so.
    let p = probe_json(&lab, at(&silent), &["--udp", "--samples", "16"]);
    let s = p.summary();
    let ctx = p.ctx();
    assert_eq!(s["primary"], "udp", "{ctx}");
    assert_eq!(str_at(&s, "/inference/kind"), "none_answered", "{ctx}");
    assert!(
        str_at(&s, "/inference/headline").contains("no reply expected"),
        "{ctx}"
    );
    assert!(p.outcomes("tcp").is_empty(), "{ctx}");

    silent.stop().unwrap_or_else(|e| panic!("{e:#}"));
    closed.stop().unwrap_or_else(|e| panic!("{e:#}"));
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn unprivileged_probe() {
    let lab = lab(32768);
    let t = target(lab.server_addr(Family::V4));
    let mut args = vec![t.as_str(), "--output", "json", "--ports", "1-65535"];
    args.extend(FAST);
    let p = run_in(lab.node_ns(), true, &args);
    let s = p.summary();
    let ctx = p.ctx();
    // Ports below 1024 cannot be bound without privileges: skipped, not failed.
    let tcp = p.outcomes("tcp");
    let low: Vec<&String> = tcp.range(1..1024).map(|(_, o)| o).collect();
    assert!(
        !low.is_empty() && low.iter().all(|o| *o == "skipped"),
        "{ctx}"
    );
    assert!(p.stdout.contains("not permitted to bind"), "{ctx}");
    assert_eq!(str_at(&s, "/inference/kind"), "range", "{ctx}");
    assert_eq!(u64_at(&s, "/inference/allowed/start"), 32768, "{ctx}");
    assert_eq!(str_at(&s, "/inference/lower/status"), "exact", "{ctx}");
    assert_eq!(u64_at(&s, "/totals/skipped"), low.len() as u64, "{ctx}");
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn ports_in_use_are_skipped() {
    let lab = lab(32768);
    // Hold two sample ports (the first and last of the range) in the node namespace.
    let holder = netrace_lab::netns::spawn_in(lab.node_ns(), "probe-holder", || {
        let a = std::net::TcpListener::bind("0.0.0.0:1024")?;
        let b = std::net::UdpSocket::bind("0.0.0.0:65535")?;
        let c = std::net::TcpListener::bind("0.0.0.0:65535")?;
        Ok((a, b, c))
    })
    .unwrap_or_else(|e| panic!("{e:#}"))
    .join()
    .unwrap_or_else(|_| panic!("holder panicked"))
    .unwrap_or_else(|e| panic!("{e:#}"));
    let p = probe_json(&lab, lab.server_addr(Family::V4), &[]);
    let ctx = p.ctx();
    let tcp = p.outcomes("tcp");
    assert_eq!(tcp.get(&1024).map(String::as_str), Some("skipped"), "{ctx}");
    assert_eq!(
        tcp.get(&65535).map(String::as_str),
        Some("skipped"),
        "{ctx}"
    );
    assert_eq!(
        p.outcomes("udp").get(&65535).map(String::as_str),
        Some("skipped"),
        "{ctx}"
    );
    let s = p.summary();
    assert_eq!(str_at(&s, "/inference/kind"), "range", "{ctx}");
    assert_eq!(u64_at(&s, "/inference/allowed/start"), 32768, "{ctx}");
    // 65535 could not be probed: the highest answering port is the one below it.
    assert!(u64_at(&s, "/inference/allowed/end") < 65535, "{ctx}");
    assert_eq!(str_at(&s, "/inference/upper/status"), "open", "{ctx}");
    drop(holder);
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

/// In the seed lab the node's `MASQUERADE --random-fully` rewrites the node's own sockets too:
/// the bound port is not the port the firewall sees, and the probe must say so instead of
/// inventing a range.
#[test]
fn seed_lab_snat_rewrites_the_nodes_own_ports() {
    require_root();
    let lab = Lab::seed().unwrap_or_else(|e| panic!("{e:#}"));
    let p = probe_json(&lab, lab.server_addr(Family::V4), &["--tcp"]);
    let s = p.summary();
    let ctx = p.ctx();
    assert_eq!(str_at(&s, "/inference/kind"), "not_a_range", "{ctx}");
    assert_eq!(s["snat_warning"], true, "{ctx}");
    assert!(
        s["notes"].as_array().is_some_and(|n| n
            .iter()
            .any(|x| x.as_str().unwrap_or("").contains("netrace watch"))),
        "{ctx}"
    );
    assert_eq!(u64_at(&s, "/inference/extra_probes"), 0, "{ctx}");
    assert_eq!(p.code, Some(1), "{ctx}");
    // The server saw other ports than the ones bound.
    let bound: BTreeSet<u16> = p
        .outcomes("tcp")
        .into_iter()
        .filter(|(_, o)| o == "answered")
        .map(|(port, _)| port)
        .collect();
    let server = lab.server().expect("the lab's server");
    server.wait_accepted(bound.len(), Duration::from_secs(5));
    let seen: BTreeSet<u16> = server.accepted_ports(false).into_iter().collect();
    assert!(seen.iter().all(|&port| port >= 32768), "{seen:?}");
    assert_ne!(seen, bound, "SNAT kept the node's ports?\n{ctx}");
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn usage_errors_are_one_line_and_exit_2() {
    let bin = netrace_bin().unwrap_or_else(|e| panic!("{e:#}"));
    for (args, needle) in [
        (vec![], "HOST:PORT"),
        (vec!["198.18.3.2"], "HOST:PORT"),
        (vec!["198.18.3.2:8080", "--rate", "1000"], "--rate"),
        (vec!["198.18.3.2:8080", "--ports", "5-1"], "--ports"),
        (vec!["198.18.3.2:8080", "--timeout", "0s"], "--timeout"),
        (vec!["2001:db8::1:8080"], "brackets"),
    ] {
        let out = Command::new(&bin)
            .arg("probe")
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("netrace: "), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}
