//! End to end: the pairing edge cases, each against the client's own result.
//!
//! - TCP Fast Open: a SYN carrying data is answered with `ack = isn + 1 + len`; netrace
//!   reports it *answered*, one record per connection (the server's own Fast Open counter
//!   proves the data rode in the SYN).
//! - ICMP time exceeded: SYNs sent with a TTL that runs out at the firewall; the client's
//!   connect fails (host unreachable), netrace reports *unreachable* with ICMP type 11 code 0
//!   and the report names it.
//! - A repeated SYN-ACK (the client's ACK dropped at the firewall): counted as a repeat of an
//!   answered connection, exactly as many as the firewall forwarded, never as a sign of
//!   translation.
//!
//! Needs root. `cargo test -p netrace-lab --test pairing`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use netrace_lab::{
    is_root, netrace_bin, ClientOptions, Family, Lab, LabOptions, NetraceOptions, NetraceOutput,
    NetraceRun, SnatMode, TcpCounts, TcpOutcome,
};
use serde_json::Value;

fn require_root() {
    assert!(
        is_root(),
        "the netrace-lab end-to-end tests need root (network namespaces, nftables, eBPF); \
         run them with `cargo xtask test` or as root: `cargo test -p netrace-lab`"
    );
}

fn start(lab: &Lab) -> NetraceRun {
    let bin = netrace_bin().unwrap_or_else(|e| panic!("{e:#}"));
    NetraceRun::start(&NetraceOptions::for_lab(lab, bin))
        .unwrap_or_else(|e| panic!("starting netrace: {e:#}"))
}

/// The seed's lab without translation and with every port let back in, IPv4 only.
fn open_lab() -> Lab {
    Lab::new(
        LabOptions::seed()
            .snat_mode(SnatMode::None)
            .firewall_min_port(0)
            .ipv6(false),
    )
    .unwrap_or_else(|e| panic!("{e:#}"))
}

fn total(out: &NetraceOutput, k: &str) -> Option<u64> {
    out.summary_at(&format!("/totals/{k}"))
        .and_then(Value::as_u64)
}

/// `nstat`'s absolute value of `counter` in namespace `ns`.
fn nstat(lab: &Lab, ns: &str, counter: &str) -> u64 {
    let out = lab
        .exec(ns, &["nstat", "-az", counter])
        .unwrap_or_else(|e| panic!("{e:#}"));
    out.lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some(counter)).then(|| it.next()?.parse().ok())?
        })
        .unwrap_or(0)
}

#[test]
fn tcp_fast_open_is_answered() {
    require_root();
    let lab = Lab::new(
        LabOptions::seed()
            .snat_mode(SnatMode::None)
            .firewall_min_port(0)
            .tcp_fastopen(true)
            .ipv6(false),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let server_ns = lab.server_ns().to_owned();
    let before = nstat(&lab, &server_ns, "TcpExtTCPFastOpenPassive");
    let netrace = start(&lab);
    let attempts = lab
        .client_with(ClientOptions {
            fast_open: true,
            ..ClientOptions::default()
        })
        .tcp(lab.server_addr(Family::V4), 30, &|_, _| {})
        .unwrap_or_else(|e| panic!("{e:#}"));
    netrace.settle();
    let out = netrace.stop().unwrap_or_else(|e| panic!("{e:#}"));
    let ctx = out.describe();
    // The handshake completed for every attempt: the server accepted each (the lab's server
    // closes at once, with the Fast Open data unread, so a client may see that reset instead
    // of its own success).
    let ports: BTreeSet<u16> = attempts.iter().map(|a| a.pod_port).collect();
    let accepted: BTreeSet<u16> = lab
        .server()
        .map(|s| s.accepted_ports(false))
        .unwrap_or_default()
        .into_iter()
        .collect();
    assert_eq!(accepted, ports, "the server accepted every attempt");
    for a in &attempts {
        assert!(
            a.outcome == TcpOutcome::Connected
                || matches!(&a.outcome, TcpOutcome::Error(e) if e.contains("reset")),
            "{a:?}"
        );
    }
    let passive = nstat(&lab, &server_ns, "TcpExtTCPFastOpenPassive") - before;
    assert_eq!(passive, 30, "the server took data in 30 SYNs (Fast Open)");
    let answered = out.answered_ports();
    assert_eq!(
        answered.iter().copied().collect::<BTreeSet<u16>>(),
        attempts
            .iter()
            .map(|a| a.pod_port)
            .collect::<BTreeSet<u16>>(),
        "{ctx}"
    );
    assert_eq!(answered.len(), 30, "one record per connection\n{ctx}");
    assert_eq!(total(&out, "answered"), Some(30), "{ctx}");
    assert_eq!(total(&out, "lost"), Some(0), "{ctx}");
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn icmp_time_exceeded_is_unreachable_and_named() {
    require_root();
    let lab = open_lab();
    // One ICMP error per SYN: no per-destination rate limit at the firewall.
    lab.exec(
        lab.firewall_ns(),
        &["sysctl", "-q", "-w", "net.ipv4.icmp_ratelimit=0"],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let netrace = start(&lab);
    // TTL 2: the node forwards it with 1 left, the firewall cannot forward it and answers
    // with ICMP time exceeded (type 11, code 0).
    let attempts = lab
        .client_with(ClientOptions {
            ttl: Some(2),
            connect_timeout: Duration::from_secs(3),
            ..ClientOptions::default()
        })
        .tcp(lab.server_addr(Family::V4), 20, &|_, _| {})
        .unwrap_or_else(|e| panic!("{e:#}"));
    netrace.settle();
    let out = netrace.stop().unwrap_or_else(|e| panic!("{e:#}"));
    let ctx = out.describe();
    let c = TcpCounts::of(&attempts);
    assert_eq!(c.unreachable, 20, "the client's connects failed: {c:?}");
    let records: Vec<&Value> = out
        .connections()
        .filter(|r| r["outcome"] == "unreachable")
        .collect();
    assert_eq!(records.len(), 20, "{ctx}");
    for r in &records {
        assert_eq!(
            (r["icmp_type"].as_u64(), r["icmp_code"].as_u64()),
            (Some(11), Some(0)),
            "{r}"
        );
    }
    assert_eq!(
        records
            .iter()
            .filter_map(|r| r["src_port"].as_u64())
            .map(|p| p as u16)
            .collect::<BTreeSet<u16>>(),
        attempts
            .iter()
            .map(|a| a.pod_port)
            .collect::<BTreeSet<u16>>(),
        "{ctx}"
    );
    assert_eq!(total(&out, "unreachable"), Some(20), "{ctx}");
    assert_eq!(total(&out, "lost"), Some(0), "{ctx}");
    let details = out
        .summary_at("/verdict/details")
        .map(Value::to_string)
        .unwrap_or_default();
    assert!(
        details.contains("20 time to live exceeded in transit (ICMP 11/0)"),
        "the report does not name the ICMP error: {details}"
    );
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

/// A server that repeats its SYN-ACK (the client's ACK never reached it): the repeat finds no
/// pending entry, and with answers counted in the kernel (the default, `--events lost`) the
/// kernel has no record of them; netrace knows it from the answers it read and counts a
/// repeat, never a SYN-ACK for a connection it did not see leave (a sign of translation that
/// would turn the verdict into "translation out of sight"). Ground truth: the firewall counts
/// the SYN-ACKs it forwards.
#[test]
fn a_repeated_synack_is_a_repeat_not_translation() {
    require_root();
    let lab = open_lab();
    let server = lab.server_addr(Family::V4);
    let port = server.port().to_string();
    // In the firewall: only the client's SYNs reach the server (its ACK, FIN or RST never
    // does, so the server repeats its SYN-ACK: at 1 s, then 3 s), and the SYN-ACKs coming
    // back are counted.
    let fw = lab.firewall_ns();
    let nft = |rule: &str| {
        lab.exec(fw, &["nft", rule])
            .unwrap_or_else(|e| panic!("nft {rule}: {e:#}"))
    };
    nft("add table inet nrt_repeat");
    nft("add chain inet nrt_repeat relay { type filter hook forward priority -10; }");
    nft(&format!(
        "add rule inet nrt_repeat relay tcp dport {port} tcp flags & (syn | ack) != syn drop"
    ));
    nft(&format!(
        "add rule inet nrt_repeat relay tcp sport {port} tcp flags & (syn | ack) == syn | ack counter"
    ));
    let bin = netrace_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let netrace = NetraceRun::start(&NetraceOptions::for_lab(&lab, bin).args(["--events", "lost"]))
        .unwrap_or_else(|e| panic!("starting netrace: {e:#}"));
    const N: usize = 20;
    let attempts = lab
        .client()
        .tcp(server, N, &|_, _| {})
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        attempts.iter().all(|a| a.outcome == TcpOutcome::Connected),
        "the client saw every SYN-ACK: {attempts:?}"
    );
    // After the first repeat (1 s), well before the second (3 s), so that netrace has
    // stopped and the counter is read before it.
    std::thread::sleep(Duration::from_millis(1500));
    let out = netrace.stop().unwrap_or_else(|e| panic!("{e:#}"));
    let listed = lab
        .exec(
            fw,
            &["nft", "-j", "list", "chain", "inet", "nrt_repeat", "relay"],
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    let ctx = out.describe();
    let json: Value = serde_json::from_str(&listed).unwrap_or_else(|e| panic!("{e}: {listed}"));
    let synacks = json["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.pointer("/rule/expr"))
        .flat_map(|e| e.as_array().into_iter().flatten())
        .find_map(|e| e.pointer("/counter/packets").and_then(Value::as_u64))
        .unwrap_or_else(|| panic!("no SYN-ACK counter in {listed}"));
    let repeats = synacks - N as u64;
    assert!(
        repeats >= N as u64,
        "the server repeated every SYN-ACK ({synacks} SYN-ACKs)"
    );
    assert_eq!(total(&out, "answered"), Some(N as u64), "{ctx}");
    assert_eq!(total(&out, "lost"), Some(0), "{ctx}");
    let seen_repeats = out
        .summary_at("/tracker/repeated_synacks")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        + out
            .summary_at("/counters/synack_repeated")
            .and_then(Value::as_u64)
            .unwrap_or(0);
    assert_eq!(seen_repeats, repeats, "every repeat known as one\n{ctx}");
    assert_eq!(
        out.summary_at("/translation/unmatched_synacks")
            .and_then(Value::as_u64),
        Some(0),
        "{ctx}"
    );
    assert_ne!(
        out.summary_at("/verdict/kind").and_then(Value::as_str),
        Some("translation_out_of_sight"),
        "{ctx}"
    );
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}
