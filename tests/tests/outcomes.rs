//! End to end: every outcome `netrace watch` reports, with real connections in network
//! namespaces, checked against what each client attempt itself saw and what the firewall
//! recorded; then the report itself (text histogram, verdict, fix, `--list-lost`, `--svg`,
//! JSON summary) for loss outside the allowed range and for no loss.
//!
//! The outcome lab is the four-namespace lab without SNAT (netrace on the node's uplink sees
//! the pod's own source ports, so every client attempt is matched to its record by port), a
//! second listener, and an nftables table in the firewall namespace:
//!
//! | server port | what happens                                   | client sees  | netrace     |
//! |-------------|------------------------------------------------|--------------|-------------|
//! | 8080        | the lab's server answers                        | connected    | answered    |
//! | 8081        | nothing listens: the server's kernel sends RST  | refused      | refused     |
//! | 8082        | firewall: REJECT with ICMP(v6) port-unreachable | refused      | unreachable |
//! | 8083        | a listener, but the firewall drops its SYN-ACKs | timed out    | lost        |
//! | 8084        | firewall: REJECT with host/addr-unreachable     | unreachable  | unreachable |
//!
//! Needs root. `cargo test -p netrace-lab --test outcomes`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use netrace_lab::truth::{self, Truth};
use netrace_lab::{
    cmd, netrace_bin, require_root, xml, ClientOptions, Family, Lab, LabOptions, NetraceOptions,
    NetraceOutput, NetraceRun, Output, Server, SnatMode, TcpAttempt, TcpCounts, TcpOutcome,
};
use serde_json::Value;

const ANSWER: u16 = 8080;
const REFUSE: u16 = 8081;
const PORT_UNREACH: u16 = 8082;
const LOST: u16 = 8083;
const HOST_UNREACH: u16 = 8084;
/// The table this test adds to the firewall namespace.
const TABLE: &str = "nrtout";

fn bin() -> PathBuf {
    netrace_bin().unwrap_or_else(|e| panic!("{e:#}"))
}

/// One group of attempts: where they go, how many, and what each side must say.
struct Case {
    port: u16,
    n: usize,
    client: TcpOutcome,
    netrace: &'static str,
    /// (ICMP type, code) netrace must report, per family.
    icmp: Option<((u8, u8), (u8, u8))>,
    /// The firewall set (without the family digit) that records these attempts' pod ports.
    set: &'static str,
}

const CASES: [Case; 5] = [
    Case {
        port: ANSWER,
        n: 40,
        client: TcpOutcome::Connected,
        netrace: "answered",
        icmp: None,
        set: "ans",
    },
    Case {
        port: REFUSE,
        n: 25,
        client: TcpOutcome::Refused,
        netrace: "refused",
        icmp: None,
        set: "rst",
    },
    Case {
        port: PORT_UNREACH,
        n: 25,
        client: TcpOutcome::Refused,
        netrace: "unreachable",
        // ICMP dest-unreachable/port-unreachable; ICMPv6 dest-unreachable/port-unreachable.
        icmp: Some(((3, 3), (1, 4))),
        set: "pun",
    },
    Case {
        port: LOST,
        n: 25,
        client: TcpOutcome::TimedOut,
        netrace: "lost",
        icmp: None,
        set: "lost",
    },
    Case {
        port: HOST_UNREACH,
        n: 25,
        client: TcpOutcome::Unreachable,
        netrace: "unreachable",
        // ICMP host-unreachable; ICMPv6 address-unreachable.
        icmp: Some(((3, 1), (1, 3))),
        set: "hun",
    },
];

/// The outcome lab: no SNAT, the lab's own port rule off, a listener on [`LOST`], the
/// firewall table, and no ICMP rate limit in the firewall (a burst of REJECTs would otherwise
/// be answered only in part, and the rest would time out).
fn outcome_lab() -> (Lab, Server) {
    let lab = Lab::new(
        LabOptions::seed()
            .snat_mode(SnatMode::None)
            .firewall_min_port(0),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let n = lab.names().clone();
    cmd::ns_exec(
        lab.firewall_ns(),
        &[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.icmp_ratelimit=0",
            "net.ipv4.icmp_ratemask=0",
            "net.ipv6.icmp.ratelimit=0",
        ],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let mut sets = String::new();
    let mut rules = String::new();
    for (v, nf, pun, hun) in [
        (
            "4",
            "ipv4",
            "icmp type port-unreachable",
            "icmp type host-unreachable",
        ),
        (
            "6",
            "ipv6",
            "icmpv6 type port-unreachable",
            "icmpv6 type addr-unreachable",
        ),
    ] {
        for set in ["ans", "rst", "pun", "lost", "hun"] {
            sets.push_str(&format!(
                "  set {set}{v} {{ type inet_service; flags dynamic; size 65536; }}\n"
            ));
        }
        let back = format!(
            "iifname \"{}\" oifname \"{}\" meta nfproto {nf}",
            n.fw_server_if, n.fw_node_if
        );
        let out = format!(
            "iifname \"{}\" oifname \"{}\" meta nfproto {nf}",
            n.fw_node_if, n.fw_server_if
        );
        rules.push_str(&format!(
            "    {back} tcp sport {ANSWER} tcp flags & (syn | ack) == syn | ack add @ans{v} {{ tcp dport }} accept\n\
             \x20   {back} tcp sport {LOST} tcp flags & (syn | ack) == syn | ack add @lost{v} {{ tcp dport }} drop\n\
             \x20   {back} tcp sport {REFUSE} tcp flags & rst == rst add @rst{v} {{ tcp dport }} accept\n\
             \x20   {out} tcp dport {PORT_UNREACH} add @pun{v} {{ tcp sport }} reject with {pun}\n\
             \x20   {out} tcp dport {HOST_UNREACH} add @hun{v} {{ tcp sport }} reject with {hun}\n"
        ));
    }
    let ruleset = format!(
        "table inet {TABLE} {{\n{sets}  chain forward {{\n    type filter hook forward priority filter - 10; policy accept;\n{rules}  }}\n}}\n"
    );
    cmd::ns_exec_with_input(lab.firewall_ns(), &["nft", "-f", "-"], Some(&ruleset))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let lost_server = Server::start(lab.server_ns(), LOST).unwrap_or_else(|e| panic!("{e:#}"));
    (lab, lost_server)
}

/// The ports in the firewall's set `name` (e.g. `ans4`).
fn firewall_set(lab: &Lab, name: &str) -> BTreeSet<u16> {
    let out = cmd::ns_exec(
        lab.firewall_ns(),
        &["nft", "-j", "list", "set", "inet", TABLE, name],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let json: Value = serde_json::from_str(&out).unwrap();
    let mut ports = BTreeSet::new();
    for obj in json["nftables"].as_array().into_iter().flatten() {
        for e in obj
            .pointer("/set/elem")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let v = e
                .as_u64()
                .or_else(|| e.pointer("/elem/val").and_then(Value::as_u64))
                .unwrap_or_else(|| panic!("unexpected element {e} in set {name}"));
            ports.insert(u16::try_from(v).unwrap());
        }
    }
    ports
}

fn suffix(family: Family) -> &'static str {
    match family {
        Family::V4 => "4",
        Family::V6 => "6",
    }
}

fn records_by_port(out: &NetraceOutput) -> HashMap<u16, &Value> {
    let mut by_port: HashMap<u16, &Value> = HashMap::new();
    for c in out.connections() {
        let port = c["src_port"]
            .as_u64()
            .unwrap_or_else(|| panic!("no src_port: {c}")) as u16;
        if let Some(old) = by_port.insert(port, c) {
            panic!(
                "two records for source port {port}:\n{old}\n{c}\n{}",
                out.describe()
            );
        }
    }
    by_port
}

fn total(out: &NetraceOutput, key: &str) -> u64 {
    out.summary_at(&format!("/totals/{key}"))
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no totals.{key}\n{}", out.describe()))
}

/// Every attempt of every case, against the client, the firewall, the server and netrace.
fn outcomes_case(family: Family) {
    require_root();
    let (lab, lost_server) = outcome_lab();
    let netrace = NetraceRun::start(&NetraceOptions::for_lab(&lab, bin()))
        .unwrap_or_else(|e| panic!("starting netrace: {e:#}"));
    // 3 s, not 1: an ICMP error that arrives while connect() still holds the socket is a soft
    // error for Linux, which then retransmits the SYN after 1 s and fails at the next error
    // (`TcpExtLockDroppedIcmps`). Such an attempt is still one attempt for netrace.
    let client = lab.client_with(ClientOptions {
        connect_timeout: Duration::from_secs(3),
        ..ClientOptions::default()
    });
    let server_ip = lab.server_addr(family).ip();
    let mut runs: Vec<(&Case, Vec<TcpAttempt>)> = Vec::new();
    for case in &CASES {
        let attempts = client
            .tcp(SocketAddr::new(server_ip, case.port), case.n, &|_, _| {})
            .unwrap_or_else(|e| panic!("client to port {}: {e:#}", case.port));
        runs.push((case, attempts));
    }
    let connected = runs[0].1.len();
    lab.server()
        .unwrap()
        .wait_accepted(connected, Duration::from_secs(3));
    netrace.settle();
    let out = netrace
        .stop()
        .unwrap_or_else(|e| panic!("stopping netrace: {e:#}"));
    let ctx = out.describe();

    // 1. The clients' own view: every attempt of a case ended the way the case says.
    for (case, attempts) in &runs {
        let wrong: Vec<_> = attempts
            .iter()
            .filter(|a| a.outcome != case.client)
            .map(|a| (a.pod_port, a.outcome.clone(), a.elapsed))
            .collect();
        assert!(
            wrong.is_empty(),
            "port {}: the client expected {:?} but saw (pod port, outcome, elapsed) {wrong:?}",
            case.port,
            case.client
        );
    }

    // 2. The firewall's view of the same attempts, by pod port (no SNAT in this lab).
    for (case, attempts) in &runs {
        let ports: BTreeSet<u16> = attempts.iter().map(|a| a.pod_port).collect();
        assert_eq!(ports.len(), attempts.len(), "pod ports repeat");
        let set = format!("{}{}", case.set, suffix(family));
        assert_eq!(
            firewall_set(&lab, &set),
            ports,
            "port {}: the firewall's set {set} differs from the client's ports",
            case.port
        );
    }
    let v6 = family == Family::V6;
    let accepted: BTreeSet<u16> = lab
        .server()
        .unwrap()
        .accepted_ports(v6)
        .into_iter()
        .collect();
    let answered_truth: BTreeSet<u16> = runs[0].1.iter().map(|a| a.pod_port).collect();
    assert_eq!(accepted, answered_truth, "the server's accepted ports");
    assert!(
        lost_server.accepted_ports(v6).is_empty(),
        "the SYN-ACK-less server accepted connections"
    );

    // 3. netrace: exactly one record per attempt, matched by source port, with the outcome
    //    and fields of its case; nothing else.
    assert!(out.unparsed.is_empty(), "non-JSON output\n{ctx}");
    let by_port = records_by_port(&out);
    let attempts_total: usize = runs.iter().map(|(_, a)| a.len()).sum();
    let pod_ip = lab.pod_ip(family).to_string();
    for (case, attempts) in &runs {
        for a in attempts {
            let r = by_port.get(&a.pod_port).unwrap_or_else(|| {
                panic!(
                    "no netrace record for the attempt from port {} to {} ({:?})\n{ctx}",
                    a.pod_port, case.port, a.outcome
                )
            });
            let field = |k: &str| r.get(k).cloned().unwrap_or(Value::Null);
            assert_eq!(field("outcome"), case.netrace, "outcome of {r}");
            assert_eq!(field("dst_port"), u64::from(case.port), "dst_port of {r}");
            assert_eq!(field("family"), family.name(), "family of {r}");
            assert_eq!(field("src"), pod_ip.as_str(), "src of {r}");
            assert_eq!(field("dst"), server_ip.to_string().as_str(), "dst of {r}");
            assert_eq!(field("iface"), lab.node_uplink(), "iface of {r}");
            assert_eq!(field("in_allowed_range"), true, "in_allowed_range of {r}");
            assert!(
                field("syns").as_u64().is_some_and(|s| s >= 1),
                "syns of {r}"
            );
            let rtt = field("rtt_us");
            if case.netrace == "lost" {
                assert!(rtt.is_null(), "a lost connection has an rtt: {r}");
            } else {
                let rtt = rtt.as_u64().unwrap_or_else(|| panic!("no rtt_us: {r}"));
                assert!(
                    u128::from(rtt) <= a.elapsed.as_micros() + 100_000,
                    "rtt {rtt} us longer than the client's whole connect ({:?}): {r}",
                    a.elapsed
                );
            }
            let icmp = (field("icmp_type").as_u64(), field("icmp_code").as_u64());
            match case.icmp {
                Some((v4, v6)) => {
                    let (t, c) = if family == Family::V4 { v4 } else { v6 };
                    assert_eq!(
                        icmp,
                        (Some(u64::from(t)), Some(u64::from(c))),
                        "ICMP type/code of {r}"
                    );
                }
                None => assert_eq!(icmp, (None, None), "ICMP fields of {r}"),
            }
            let first_seen = field("first_seen_unix_ms").as_u64().unwrap();
            assert!(
                first_seen + 1000 >= a.started_unix_ms && first_seen <= a.started_unix_ms + 1000,
                "first_seen_unix_ms {first_seen} vs the client's start {}: {r}",
                a.started_unix_ms
            );
        }
    }
    assert_eq!(
        by_port.len(),
        attempts_total,
        "netrace reported connections no client made\n{ctx}"
    );

    // 4. The totals equal the clients' counts.
    let count = |o: &str| {
        runs.iter()
            .filter(|(c, _)| c.netrace == o)
            .map(|(_, a)| a.len() as u64)
            .sum::<u64>()
    };
    assert_eq!(total(&out, "attempts"), attempts_total as u64, "{ctx}");
    for o in ["answered", "lost", "refused", "unreachable"] {
        assert_eq!(total(&out, o), count(o), "totals.{o}\n{ctx}");
    }
    assert_eq!(total(&out, "late"), 0, "{ctx}");
    assert_eq!(total(&out, "pending_at_exit"), 0, "{ctx}");
    let counter = |k: &str| {
        out.summary_at(&format!("/counters/{k}"))
            .and_then(Value::as_u64)
    };
    assert_eq!(counter("synack_matched"), Some(count("answered")), "{ctx}");
    assert_eq!(counter("rst_matched"), Some(count("refused")), "{ctx}");
    // Per packet: an attempt whose first ICMP error was a soft error for the client gets a
    // second one for its retransmitted SYN.
    let icmp = counter("icmp_matched").unwrap();
    assert!(
        (count("unreachable")..=2 * count("unreachable")).contains(&icmp),
        "icmp_matched {icmp}\n{ctx}"
    );
    // Every attempt to the SYN-ACK-less server is lost, from ports inside the allowed range,
    // while the others are answered there: a destination problem, not a range problem.
    let kind = out.summary_at("/verdict/kind").and_then(Value::as_str);
    assert_eq!(
        kind,
        Some("destination_problem"),
        "a destination that never answers\n{ctx}"
    );
    let headline = out
        .summary_at("/verdict/headline")
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert!(
        headline.contains(&format!("{server_ip}:{LOST}"))
            || headline.contains(&format!("]:{LOST}")),
        "the dead destination is not named: {headline}"
    );
    assert!(
        out.summary_at("/fix")
            .and_then(Value::as_array)
            .is_some_and(|f| f.is_empty()),
        "no fix for a destination problem\n{ctx}"
    );
    let details = out.summary_at("/verdict/details").unwrap().to_string();
    assert!(
        details.contains(&format!(
            "{} refused (RST) and {} unreachable (ICMP)",
            count("refused"),
            count("unreachable")
        )),
        "the verdict does not account for refused/unreachable: {details}"
    );
    assert_eq!(
        out.code(),
        Some(1),
        "exit status with a lost connection\n{ctx}"
    );
    drop(lost_server);
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn outcomes_ipv4() {
    outcomes_case(Family::V4);
}

#[test]
fn outcomes_ipv6() {
    outcomes_case(Family::V6);
}

// ---- the report: text, --list-lost, --svg, JSON summary ----

/// Histogram buckets with the default edges and allowed range 32768-65535.
const BUCKETS: [(u16, u16); 6] = [
    (1, 1023),
    (1024, 8191),
    (8192, 16383),
    (16384, 32767),
    (32768, 49151),
    (49152, 65535),
];
const ALLOWED_START: u16 = 32768;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    attempts: u64,
    answered: u64,
    lost: u64,
}

impl Counts {
    fn pct(&self) -> Option<f64> {
        (self.attempts > 0).then(|| 100.0 * self.lost as f64 / self.attempts as f64)
    }
}

/// The expected histogram from the ground truth (post-SNAT port and the client's outcome).
fn expected_buckets(truth: &Truth) -> Vec<Counts> {
    let mut b = vec![Counts::default(); BUCKETS.len()];
    for t in &truth.tcp {
        let port = t.snat_port.expect("every attempt has a SNAT port");
        let i = BUCKETS
            .iter()
            .position(|(s, e)| (*s..=*e).contains(&port))
            .unwrap();
        b[i].attempts += 1;
        match t.attempt.outcome {
            TcpOutcome::Connected => b[i].answered += 1,
            TcpOutcome::TimedOut => b[i].lost += 1,
            ref o => panic!("unexpected client outcome {o:?}"),
        }
    }
    b
}

fn check_text(lab: &Lab, truth: &Truth, out: &NetraceOutput, expected: &[Counts], loss_case: bool) {
    let ctx = out.describe();
    let text = &out.stdout;
    let lines: Vec<&str> = text.lines().collect();
    let c = TcpCounts::of(
        &truth
            .tcp
            .iter()
            .map(|t| t.attempt.clone())
            .collect::<Vec<_>>(),
    );

    // Header and totals.
    let head = format!(
        "netrace: {} connection attempts on {} in ",
        c.attempts,
        lab.node_uplink()
    );
    assert!(
        lines[0].starts_with(&head)
            && lines[0].ends_with("s; SYN-ACKs allowed back to ports 32768-65535"),
        "header line: {:?}\n{ctx}",
        lines[0]
    );
    assert_eq!(
        lines[1].trim(),
        format!(
            "{} answered, {} lost, 0 refused, 0 unreachable, 0 late, 0 still waiting at exit",
            c.connected, c.timed_out
        ),
        "{ctx}"
    );

    // The histogram: one row per bucket, numbers from the ground truth.
    let h = lines
        .iter()
        .position(|l| l.starts_with("source ports"))
        .unwrap_or_else(|| panic!("no histogram header\n{ctx}"));
    assert_eq!(
        lines[h].split_whitespace().collect::<Vec<_>>(),
        ["source", "ports", "attempts", "answered", "lost", "loss", "%", "loss"],
        "{ctx}"
    );
    for (i, ((start, end), want)) in BUCKETS.iter().zip(expected).enumerate() {
        let row = lines[h + 1 + i];
        let cols: Vec<&str> = row.split_whitespace().collect();
        let pct = want
            .pct()
            .map_or_else(|| "-".to_string(), |p| format!("{p:.1}%"));
        let filled = want
            .pct()
            .map_or(0, |p| (p / 100.0 * 30.0).round() as usize);
        let bar = "#".repeat(filled) + &".".repeat(30 - filled);
        let side = if *start >= ALLOWED_START {
            "allowed"
        } else {
            "outside"
        };
        assert_eq!(
            cols,
            [
                format!("{start}-{end}").as_str(),
                &want.attempts.to_string(),
                &want.answered.to_string(),
                &want.lost.to_string(),
                &pct,
                &bar,
                side
            ],
            "histogram row {i}: {row:?}\n{ctx}"
        );
    }
    assert!(lines[h + 1 + BUCKETS.len()].is_empty(), "{ctx}");

    // The verdict and the fix.
    let verdict = lines
        .iter()
        .find(|l| l.starts_with("verdict: "))
        .unwrap_or_else(|| panic!("no verdict line\n{ctx}"));
    let fix_at = lines.iter().position(|l| *l == "fix:");
    if loss_case {
        assert!(
            verdict.starts_with("verdict: range problem: 100% of connections from source ports outside 32768-65535 chosen by the node's SNAT lost their SYN-ACK, against 0% inside"),
            "{verdict}\n{ctx}"
        );
        let fix_at = fix_at.unwrap_or_else(|| panic!("no fix section\n{ctx}"));
        let fixes: Vec<&str> = lines[fix_at + 1..]
            .iter()
            .take_while(|l| !l.is_empty())
            .copied()
            .collect();
        assert!(fixes.len() >= 3, "{fixes:?}");
        for (i, f) in fixes.iter().enumerate() {
            assert!(f.starts_with(&format!("  {}. ", i + 1)), "fix line {f:?}");
        }
        assert!(
            fixes[0].contains("MASQUERADE --random-fully --to-ports 32768-65535")
                && fixes[0].contains("masquerade to :32768-65535 fully-random"),
            "the first fix does not restrict SNAT: {}",
            fixes[0]
        );
    } else {
        assert_eq!(
            *verdict,
            format!(
                "verdict: no range problem: none of {} connection attempts lost its SYN-ACK",
                c.attempts
            ),
            "{ctx}"
        );
        assert!(fix_at.is_none(), "a fix without loss\n{ctx}");
    }
    assert!(
        lines.contains(&"nothing missed: 0 events lost, 0 SYNs untracked"),
        "{ctx}"
    );

    // --list-lost: one line per lost connection, the ground truth's ports and times.
    let ll = lines
        .iter()
        .position(|l| l.starts_with("lost connections ("))
        .unwrap_or_else(|| panic!("no --list-lost section\n{ctx}"));
    assert_eq!(lines[ll], format!("lost connections ({}):", c.timed_out));
    let listed: Vec<&str> = lines[ll + 1..]
        .iter()
        .take_while(|l| l.starts_with("  "))
        .copied()
        .collect();
    assert_eq!(listed.len(), c.timed_out, "{ctx}");
    let server = lab.server_addr(Family::V4);
    let by_snat: HashMap<u16, &TcpAttempt> = truth
        .tcp
        .iter()
        .filter(|t| t.attempt.outcome == TcpOutcome::TimedOut)
        .map(|t| (t.snat_port.unwrap(), &t.attempt))
        .collect();
    let mut ports = BTreeSet::new();
    for l in &listed {
        // "  IFACE SRC:PORT -> DST:PORT  syns=N first_seen_unix_ms=MS"
        let cols: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(cols.len(), 6, "{l:?}");
        assert_eq!(cols[0], lab.node_uplink(), "{l:?}");
        let (src, port) = cols[1].rsplit_once(':').unwrap();
        assert_eq!(src, lab.node_uplink_ip(Family::V4).to_string(), "{l:?}");
        assert_eq!(cols[2], "->");
        assert_eq!(cols[3], server.to_string(), "{l:?}");
        let port: u16 = port.parse().unwrap();
        assert!(
            port < ALLOWED_START,
            "a listed port inside the range: {l:?}"
        );
        assert!(ports.insert(port), "listed twice: {l:?}");
        let syns: u32 = cols[4].strip_prefix("syns=").unwrap().parse().unwrap();
        assert!(syns >= 1, "{l:?}");
        let ms: u64 = cols[5]
            .strip_prefix("first_seen_unix_ms=")
            .unwrap()
            .parse()
            .unwrap();
        let a = by_snat
            .get(&port)
            .unwrap_or_else(|| panic!("listed a port no attempt lost: {l:?}"));
        assert!(
            ms + 1000 >= a.started_unix_ms && ms <= a.started_unix_ms + 1000,
            "first_seen {ms} far from the client's start {}: {l:?}",
            a.started_unix_ms
        );
    }
    assert_eq!(ports, truth.snat_ports_where(&TcpOutcome::TimedOut));
    assert_eq!(
        ports, truth.firewall_dropped,
        "listed vs the firewall's drops"
    );
}

fn check_svg(path: &PathBuf, expected: &[Counts]) {
    let doc = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("--svg wrote no {}: {e}", path.display()));
    let root =
        xml::parse(&doc).unwrap_or_else(|e| panic!("the SVG is not well-formed: {e:#}\n{doc}"));
    assert_eq!(root.name, "svg");
    assert_eq!(root.attr("xmlns"), Some("http://www.w3.org/2000/svg"));
    let bars: Vec<&xml::Element> = root
        .descendants("rect")
        .into_iter()
        .filter(|r| r.children.iter().any(|c| c.name == "title"))
        .collect();
    assert_eq!(bars.len(), BUCKETS.len(), "one bar per bucket\n{doc}");
    let plot_height = 250.0;
    for ((bar, (start, end)), want) in bars.iter().zip(BUCKETS).zip(expected) {
        let title = &bar
            .children
            .iter()
            .find(|c| c.name == "title")
            .unwrap()
            .text;
        assert_eq!(
            *title,
            format!(
                "{start}-{end}: {} attempts, {} lost",
                want.attempts, want.lost
            )
        );
        let h: f64 = bar.attr("height").unwrap().parse().unwrap();
        let want_h = plot_height * want.pct().unwrap_or(0.0) / 100.0;
        assert!(
            (h - want_h).abs() < 0.11,
            "bar {start}-{end}: height {h}, expected {want_h}"
        );
        let colour = if start >= ALLOWED_START {
            "#2e8b57"
        } else {
            "#c0392b"
        };
        assert_eq!(bar.attr("fill"), Some(colour), "bar {start}-{end}");
    }
}

fn check_json_summary(truth: &Truth, out: &NetraceOutput, expected: &[Counts], loss_case: bool) {
    let ctx = out.describe();
    let s = out.summary().unwrap_or_else(|| panic!("no summary\n{ctx}"));
    let buckets = s["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), BUCKETS.len(), "{ctx}");
    for ((b, (start, end)), want) in buckets.iter().zip(BUCKETS).zip(expected) {
        assert_eq!(
            (b["start"].as_u64(), b["end"].as_u64()),
            (Some(u64::from(start)), Some(u64::from(end)))
        );
        assert_eq!(
            (
                b["attempts"].as_u64(),
                b["answered"].as_u64(),
                b["lost"].as_u64()
            ),
            (Some(want.attempts), Some(want.answered), Some(want.lost)),
            "bucket {start}-{end}"
        );
        assert_eq!(
            (b["refused"].as_u64(), b["unreachable"].as_u64()),
            (Some(0), Some(0))
        );
        assert_eq!(b["loss_pct"].as_f64(), want.pct(), "bucket {start}-{end}");
        assert_eq!(b["in_allowed_range"], start >= ALLOWED_START);
    }
    let (mut ins, mut outs) = (Counts::default(), Counts::default());
    for (b, c) in BUCKETS.iter().zip(expected) {
        let side = if b.0 >= ALLOWED_START {
            &mut ins
        } else {
            &mut outs
        };
        side.attempts += c.attempts;
        side.lost += c.lost;
    }
    let v = &s["verdict"];
    assert_eq!(
        (
            v["attempts_inside"].as_u64(),
            v["lost_inside"].as_u64(),
            v["attempts_outside"].as_u64(),
            v["lost_outside"].as_u64()
        ),
        (
            Some(ins.attempts),
            Some(ins.lost),
            Some(outs.attempts),
            Some(outs.lost)
        ),
        "{ctx}"
    );
    let fix: Vec<&str> = s["fix"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    if loss_case {
        assert_eq!(v["kind"], "range_problem");
        assert_eq!(v["snat_suspected"], true, "{ctx}");
        assert!(
            fix.len() >= 3 && fix[0].contains("--to-ports 32768-65535"),
            "{fix:?}"
        );
        assert_eq!(out.code(), Some(1));
    } else {
        assert_eq!(v["kind"], "no_range_problem");
        assert!(fix.is_empty(), "{fix:?}");
        assert_eq!(out.code(), Some(0));
    }
    for k in ["events_lost", "pending_map_full", "decode_errors"] {
        assert_eq!(s["drops"][k].as_u64(), Some(0), "drops.{k}\n{ctx}");
    }
    // The kernel's own SYN tally covers every attempt's port.
    let tally: HashMap<u16, u64> = s["syn_packets_by_port"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap() as u16, p[1].as_u64().unwrap()))
        .collect();
    for t in &truth.tcp {
        let p = t.snat_port.unwrap();
        assert!(
            tally.get(&p).is_some_and(|n| *n >= 1),
            "no SYN tallied for port {p}"
        );
    }
    // syn_seen counts every SYN packet, retransmissions too.
    let seen = s["counters"]["syn_seen"].as_u64().unwrap();
    let again = s["counters"]["syn_retransmit"].as_u64().unwrap();
    assert_eq!(
        seen - again,
        truth.tcp.len() as u64,
        "one first SYN per attempt\n{ctx}"
    );
    assert_eq!(
        tally.values().sum::<u64>(),
        seen,
        "the per-port tally vs syn_seen"
    );
}

/// Deleted on drop, also when a check fails.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The same traffic watched twice at once: JSON, and text with `--list-lost --svg`.
fn report_case(opts: LabOptions, loss_case: bool) {
    require_root();
    let lab = Lab::new(opts).unwrap_or_else(|e| panic!("{e:#}"));
    let svg =
        TempFile(std::env::temp_dir().join(format!("netrace-outcomes-{}.svg", lab.names().stem)));
    let _ = std::fs::remove_file(&svg.0);
    let json = NetraceRun::start(&NetraceOptions::for_lab(&lab, bin()))
        .unwrap_or_else(|e| panic!("starting netrace: {e:#}"));
    let text = NetraceRun::start(
        &NetraceOptions::for_lab(&lab, bin())
            .output(Output::Text)
            .args(["--list-lost", "--svg", svg.0.to_str().unwrap()]),
    )
    .unwrap_or_else(|e| panic!("starting netrace: {e:#}"));
    let attempts = lab
        .client()
        .tcp(lab.server_addr(Family::V4), 200, &|_, _| {})
        .unwrap_or_else(|e| panic!("{e:#}"));
    let c = TcpCounts::of(&attempts);
    lab.server()
        .unwrap()
        .wait_accepted(c.connected, Duration::from_secs(3));
    let truth = truth::collect(&lab, Family::V4, &attempts).unwrap_or_else(|e| panic!("{e:#}"));
    json.settle();
    let json = json.stop().unwrap_or_else(|e| panic!("{e:#}"));
    let text = text.stop().unwrap_or_else(|e| panic!("{e:#}"));

    // The lab's own views agree, as in seed.rs.
    assert!(truth.unmapped().is_empty(), "attempts without a SNAT port");
    assert_eq!(c.connected + c.timed_out, c.attempts, "{c:?}");
    assert_eq!(
        truth.snat_ports_where(&TcpOutcome::TimedOut),
        truth.firewall_dropped
    );
    if loss_case {
        assert!(c.timed_out > 0 && c.connected > 0, "{c:?}");
    } else {
        assert_eq!(c.connected, c.attempts, "{c:?}");
    }
    let expected = expected_buckets(&truth);
    check_text(&lab, &truth, &text, &expected, loss_case);
    assert_eq!(
        text.code(),
        json.code(),
        "the two runs disagree on the exit status"
    );
    assert!(
        text.stderr.contains("netrace: watching "),
        "no start line on stderr\n{}",
        text.describe()
    );
    check_svg(&svg.0, &expected);
    check_json_summary(&truth, &json, &expected, loss_case);
    drop(svg);
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn report_loss_outside_the_allowed_range() {
    report_case(LabOptions::seed(), true);
}

#[test]
fn report_no_loss() {
    report_case(LabOptions::seed().snat_ports(32768, 65535), false);
}
