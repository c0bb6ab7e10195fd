//! End to end: the seed failure (pod → node with `MASQUERADE --random-fully` → stateless
//! firewall allowing only 32768-65535 back → server) built in network namespaces, the client's
//! own view as ground truth, and the real `netrace` binary watching the node's uplink.
//!
//! Needs root; `cargo xtask test` runs it as root. Run one test with e.g.
//! `cargo test -p netrace-lab --test seed lab_sanity -- --nocapture`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use netrace_lab::truth::{self, Truth};
use netrace_lab::{
    netrace_bin, require_root, Family, Lab, LabOptions, NetraceOptions, NetraceOutput, NetraceRun,
    SnatBackend, SnatMode, TcpAttempt, TcpCounts, TcpOutcome, UdpExchange, UdpOutcome,
};
use serde_json::Value;

const TCP: usize = 200;
const UDP: usize = 50;
const FIREWALL_MIN: u16 = 32768;

/// What the client did and what the lab knows about it.
struct ClientRun {
    family: Family,
    tcp: Vec<TcpAttempt>,
    udp: Vec<UdpExchange>,
    truth: Truth,
}

impl ClientRun {
    fn counts(&self) -> TcpCounts {
        TcpCounts::of(&self.tcp)
    }
}

/// Runs `tcp` connections then `udp` exchanges from the pod and collects the ground truth.
fn drive(lab: &Lab, family: Family, tcp: usize, udp: usize) -> ClientRun {
    let client = lab.client();
    let server = lab.server_addr(family);
    let attempts = client
        .tcp(server, tcp, &|_, _| {})
        .unwrap_or_else(|e| panic!("TCP client to {server}: {e:#}"));
    let udp = client
        .udp(server, udp, &|_, _| {})
        .unwrap_or_else(|e| panic!("UDP client to {server}: {e:#}"));
    let connected = TcpCounts::of(&attempts).connected;
    if let Some(s) = lab.server() {
        s.wait_accepted(connected, Duration::from_secs(3));
    }
    let truth = truth::collect(lab, family, &attempts)
        .unwrap_or_else(|e| panic!("collecting ground truth: {e:#}"));
    ClientRun {
        family,
        tcp: attempts,
        udp,
        truth,
    }
}

fn set(ports: &[u16]) -> BTreeSet<u16> {
    ports.iter().copied().collect()
}

fn assert_no_duplicates(what: &str, ports: &[u16]) {
    let unique = set(ports);
    assert_eq!(
        unique.len(),
        ports.len(),
        "{what}: some ports reported more than once: {ports:?}"
    );
}

/// The lab's own views agree with each other: every attempt has a post-SNAT port; the client
/// timed out exactly on the ports the firewall dropped, connected exactly on the ports the
/// server accepted; every UDP exchange came back.
fn check_ground_truth(run: &ClientRun, firewall_min: u16) {
    let c = run.counts();
    let t = &run.truth;
    assert!(
        t.unmapped().is_empty(),
        "attempts without a conntrack entry on the node: {:?}",
        t.unmapped()
            .iter()
            .map(|x| x.attempt.pod_port)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        (c.refused, c.unreachable, c.other),
        (0, 0, 0),
        "unexpected client outcomes: {:?}",
        run.tcp
            .iter()
            .filter(|a| !matches!(a.outcome, TcpOutcome::Connected | TcpOutcome::TimedOut))
            .collect::<Vec<_>>()
    );
    assert_eq!(c.connected + c.timed_out, c.attempts);
    let timed_out = t.snat_ports_where(&TcpOutcome::TimedOut);
    let connected = t.snat_ports_where(&TcpOutcome::Connected);
    assert_eq!(
        timed_out.len(),
        c.timed_out,
        "two timed-out attempts share a SNAT port"
    );
    assert_eq!(
        connected.len(),
        c.connected,
        "two connections share a SNAT port"
    );
    let not_dropped: Vec<_> = t
        .tcp
        .iter()
        .filter(|x| x.attempt.outcome == TcpOutcome::TimedOut && !x.dropped_by_firewall)
        .map(|x| {
            (
                x.attempt.index,
                x.attempt.pod_port,
                x.snat_port,
                x.attempt.started_unix_ms,
            )
        })
        .collect();
    assert!(
        not_dropped.is_empty(),
        "timed out although the firewall did not drop them (index, pod port, SNAT port, start): \
         {not_dropped:?}"
    );
    assert_eq!(
        timed_out, t.firewall_dropped,
        "the firewall's dropped ports are not exactly the client's timed-out SNAT ports"
    );
    assert_eq!(
        connected, t.server_accepted,
        "the server's accepted ports are not exactly the client's connected SNAT ports"
    );
    if let Some(p) = timed_out.iter().find(|&&p| p >= firewall_min) {
        panic!("port {p} timed out although the firewall allows it");
    }
    if let Some(p) = connected.iter().find(|&&p| p < firewall_min) {
        panic!("port {p} connected although the firewall drops it");
    }
    assert!(
        t.firewall_drop_packets >= c.timed_out as u64,
        "firewall counted {} drops for {} timed-out connections",
        t.firewall_drop_packets,
        c.timed_out
    );
    let udp_failed: Vec<_> = run
        .udp
        .iter()
        .filter(|u| u.outcome != UdpOutcome::Echoed)
        .collect();
    assert!(
        udp_failed.is_empty(),
        "UDP exchanges failed: {udp_failed:?}"
    );
}

fn summary_str<'a>(out: &'a NetraceOutput, pointer: &str) -> &'a str {
    out.summary_at(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("summary has no string at {pointer}\n{}", out.describe()))
}

fn summary_u64(out: &NetraceOutput, pointer: &str) -> u64 {
    out.summary_at(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("summary has no number at {pointer}\n{}", out.describe()))
}

/// netrace's per-connection objects describe the lab's traffic.
fn check_connection_fields(lab: &Lab, run: &ClientRun, out: &NetraceOutput) {
    let server = lab.server_addr(run.family);
    let src = lab.seen_source_ip(run.family).to_string();
    for c in out.connections() {
        let field = |k: &str| c.get(k).cloned().unwrap_or(Value::Null);
        assert_eq!(field("family"), run.family.name(), "family of {c}");
        assert_eq!(field("dst"), server.ip().to_string(), "dst of {c}");
        assert_eq!(
            field("dst_port"),
            u64::from(server.port()),
            "dst_port of {c}"
        );
        assert_eq!(field("src"), src.as_str(), "src of {c}");
        assert_eq!(field("iface"), lab.node_uplink(), "iface of {c}");
    }
}

fn start_netrace(lab: &Lab) -> NetraceRun {
    let bin = netrace_bin().unwrap_or_else(|e| panic!("{e:#}"));
    NetraceRun::start(&NetraceOptions::for_lab(lab, bin))
        .unwrap_or_else(|e| panic!("starting netrace: {e:#}"))
}

/// The seed failure with netrace watching: it must report exactly the connections the client
/// lost, on exactly the ports the firewall refused, and blame the SNAT range.
fn seed_case(opts: LabOptions, family: Family) {
    require_root();
    let lab = Lab::new(opts).unwrap_or_else(|e| panic!("{e:#}"));
    let netrace = start_netrace(&lab);
    let run = drive(&lab, family, TCP, UDP);
    netrace.settle();
    let out = netrace
        .stop()
        .unwrap_or_else(|e| panic!("stopping netrace: {e:#}"));
    let ctx = out.describe();

    check_ground_truth(&run, FIREWALL_MIN);
    let c = run.counts();
    assert!(c.timed_out > 0, "the seed lab lost nothing: {c:?}");
    assert!(
        out.unparsed.is_empty(),
        "non-JSON output: {:?}\n{ctx}",
        out.unparsed
    );
    check_connection_fields(&lab, &run, &out);

    let lost = out.lost_ports();
    let answered = out.answered_ports();
    assert_no_duplicates("lost", &lost);
    assert_no_duplicates("answered", &answered);
    let truth_lost = run.truth.snat_ports_where(&TcpOutcome::TimedOut);
    let truth_answered = run.truth.snat_ports_where(&TcpOutcome::Connected);
    assert_eq!(
        set(&lost),
        truth_lost,
        "netrace's lost ports differ from the client's timed-out SNAT ports \
         (missing: {:?}, extra: {:?})\n{ctx}",
        truth_lost.difference(&set(&lost)).collect::<Vec<_>>(),
        set(&lost).difference(&truth_lost).collect::<Vec<_>>()
    );
    assert_eq!(
        set(&lost),
        run.truth.firewall_dropped,
        "lost vs firewall set\n{ctx}"
    );
    assert_eq!(
        set(&answered),
        truth_answered,
        "netrace's answered ports differ from the server's accepted ports \
         (missing: {:?}, extra: {:?})\n{ctx}",
        truth_answered
            .difference(&set(&answered))
            .collect::<Vec<_>>(),
        set(&answered)
            .difference(&truth_answered)
            .collect::<Vec<_>>()
    );
    assert_eq!(lost.len(), c.timed_out, "{ctx}");
    assert_eq!(answered.len(), c.connected, "{ctx}");
    assert!(
        lost.iter().all(|&p| p < FIREWALL_MIN),
        "lost port >= 32768\n{ctx}"
    );

    assert_eq!(
        summary_u64(&out, "/totals/lost"),
        c.timed_out as u64,
        "{ctx}"
    );
    assert_eq!(
        summary_u64(&out, "/totals/answered"),
        c.connected as u64,
        "{ctx}"
    );
    assert_eq!(summary_str(&out, "/verdict/kind"), "range_problem", "{ctx}");
    let mut words = summary_str(&out, "/verdict/headline").to_owned();
    for d in out
        .summary_at("/verdict/details")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        words.push('\n');
        words.push_str(d.as_str().unwrap_or_default());
    }
    let lower = words.to_lowercase();
    assert!(
        lower.contains("32768"),
        "the verdict does not mention 32768: {words}"
    );
    assert!(
        lower.contains("snat") || lower.contains("masquerade"),
        "the verdict does not mention SNAT or MASQUERADE: {words}"
    );
    assert_eq!(out.code(), Some(1), "exit code with loss\n{ctx}");
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

/// A lab without the failure: every connection succeeds and netrace must not cry wolf.
fn control_case(opts: LabOptions, family: Family) {
    require_root();
    let lab = Lab::new(opts).unwrap_or_else(|e| panic!("{e:#}"));
    let netrace = start_netrace(&lab);
    let run = drive(&lab, family, TCP, UDP);
    netrace.settle();
    let out = netrace
        .stop()
        .unwrap_or_else(|e| panic!("stopping netrace: {e:#}"));
    let ctx = out.describe();

    check_ground_truth(&run, lab.options().firewall_min_port);
    let c = run.counts();
    assert_eq!(c.connected, TCP, "the control lab lost connections: {c:?}");
    assert!(
        out.unparsed.is_empty(),
        "non-JSON output: {:?}\n{ctx}",
        out.unparsed
    );
    check_connection_fields(&lab, &run, &out);
    assert!(
        out.lost_ports().is_empty(),
        "false alarm: {:?}\n{ctx}",
        out.lost_ports()
    );
    let answered = out.answered_ports();
    assert_no_duplicates("answered", &answered);
    assert_eq!(set(&answered), run.truth.server_accepted, "{ctx}");
    assert_eq!(summary_u64(&out, "/totals/lost"), 0, "{ctx}");
    assert_eq!(summary_u64(&out, "/totals/answered"), TCP as u64, "{ctx}");
    assert_eq!(
        summary_str(&out, "/verdict/kind"),
        "no_range_problem",
        "{ctx}"
    );
    assert_eq!(out.code(), Some(0), "exit code without loss\n{ctx}");
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn seed_ipv4_iptables() {
    seed_case(LabOptions::seed(), Family::V4);
}

#[test]
fn seed_ipv6_iptables() {
    seed_case(LabOptions::seed(), Family::V6);
}

#[test]
fn seed_ipv4_nftables() {
    seed_case(
        LabOptions::seed().snat_backend(SnatBackend::Nftables),
        Family::V4,
    );
}

#[test]
fn control_firewall_allows_all() {
    control_case(LabOptions::seed().firewall_min_port(1024), Family::V4);
}

#[test]
fn control_snat_restricted_to_allowed_range() {
    control_case(LabOptions::seed().snat_ports(32768, 65535), Family::V4);
}

#[test]
fn control_no_snat() {
    control_case(LabOptions::seed().snat_mode(SnatMode::None), Family::V4);
}

// ---- the lab on its own, before netrace exists ----

/// About half of the connections of the seed lab time out, exactly those whose SNAT port the
/// firewall refuses; UDP is untouched.
fn sanity_seed(opts: LabOptions, family: Family) {
    require_root();
    let lab = Lab::new(opts).unwrap_or_else(|e| panic!("{e:#}"));
    let run = drive(&lab, family, TCP, UDP);
    let c = run.counts();
    println!(
        "{family:?}: {} TCP attempts, {} timed out, {} connected; firewall dropped {} ports \
         ({} packets); {} UDP echoed of {}",
        c.attempts,
        c.timed_out,
        c.connected,
        run.truth.firewall_dropped.len(),
        run.truth.firewall_drop_packets,
        run.udp
            .iter()
            .filter(|u| u.outcome == UdpOutcome::Echoed)
            .count(),
        run.udp.len()
    );
    check_ground_truth(&run, FIREWALL_MIN);
    // (32768 - 1024) / 64512 = 49.2 % of uniform SNAT ports are refused.
    assert!(
        (TCP * 3 / 10..=TCP * 7 / 10).contains(&c.timed_out),
        "expected about half of {TCP} connections to time out, got {c:?}"
    );
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn lab_sanity() {
    sanity_seed(LabOptions::seed(), Family::V4);
}

#[test]
fn lab_sanity_ipv6() {
    sanity_seed(LabOptions::seed(), Family::V6);
}

#[test]
fn lab_sanity_nftables() {
    sanity_seed(
        LabOptions::seed().snat_backend(SnatBackend::Nftables),
        Family::V4,
    );
}

#[test]
fn lab_sanity_nftables_ipv6() {
    sanity_seed(
        LabOptions::seed().snat_backend(SnatBackend::Nftables),
        Family::V6,
    );
}

#[test]
fn lab_sanity_controls() {
    require_root();
    for (what, opts, family) in [
        (
            "firewall 1024-65535",
            LabOptions::seed().firewall_min_port(1024),
            Family::V4,
        ),
        (
            "SNAT 32768-65535",
            LabOptions::seed().snat_ports(32768, 65535),
            Family::V4,
        ),
        (
            "SNAT 32768-65535 v6",
            LabOptions::seed().snat_ports(32768, 65535),
            Family::V6,
        ),
        (
            "no SNAT",
            LabOptions::seed().snat_mode(SnatMode::None),
            Family::V4,
        ),
        (
            "no SNAT v6",
            LabOptions::seed().snat_mode(SnatMode::None),
            Family::V6,
        ),
        (
            "plain MASQUERADE",
            LabOptions::seed().snat_mode(SnatMode::Plain),
            Family::V4,
        ),
    ] {
        let min = opts.firewall_min_port;
        let lab = Lab::new(opts).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        let run = drive(&lab, family, 100, 20);
        check_ground_truth(&run, min);
        let c = run.counts();
        assert_eq!(c.connected, 100, "{what}: {c:?}");
        assert!(run.truth.firewall_dropped.is_empty(), "{what}");
        lab.teardown().unwrap_or_else(|e| panic!("{what}: {e:#}"));
    }
}

// ---- teardown ----

#[test]
fn lab_teardown_leaves_nothing_even_on_panic_or_failed_setup() {
    require_root();
    let mine = |stem: &str| -> Vec<String> {
        netrace_lab::leftovers()
            .into_iter()
            .filter(|n| n.starts_with(stem))
            .collect()
    };

    let lab = Lab::seed().unwrap_or_else(|e| panic!("{e:#}"));
    let stem = lab.names().stem.clone();
    assert_eq!(
        mine(&stem).len(),
        4,
        "the lab's four namespaces: {:?}",
        mine(&stem)
    );
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(mine(&stem).is_empty(), "after teardown: {:?}", mine(&stem));

    let panicked = std::panic::catch_unwind(|| {
        let lab = Lab::seed().unwrap_or_else(|e| panic!("{e:#}"));
        let stem = lab.names().stem.clone();
        std::panic::panic_any(stem);
    });
    let stem = *panicked
        .expect_err("the closure panics")
        .downcast::<String>()
        .expect("the panic carries the lab's stem");
    assert!(mine(&stem).is_empty(), "after a panic: {:?}", mine(&stem));

    // iptables refuses the range 2000-1000 after the namespaces exist. (Other tests run labs
    // in parallel, so only names of the failed lab count; its stem is in the error.)
    let err = Lab::new(LabOptions::seed().snat_ports(2000, 1000)).expect_err("a bad SNAT range");
    let msg = format!("{err:#}");
    assert!(msg.contains("iptables"), "{msg}");
    let stem = msg
        .split_whitespace()
        .find(|w| w.starts_with("nrt"))
        .map(|w| w.trim_end_matches(':').to_owned())
        .unwrap_or_else(|| panic!("no lab name in the error: {msg}"));
    assert!(
        mine(&stem).is_empty(),
        "a failed setup left {:?}",
        mine(&stem)
    );
}
