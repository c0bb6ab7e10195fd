//! End to end: the seed failure where the node's SNAT is a BPF program on the uplink's TCX
//! hooks (as Cilium's BPF masquerading, GKE Dataplane V2 and Calico's eBPF dataplane do it),
//! not netfilter. The program, written for the test (`netrace_lab::bpf_snat`), maps pod ports
//! statelessly and returns `TC_ACT_OK`, a final verdict. Behind the seed's firewall about half
//! the connections lose their SYN-ACK.
//!
//! - With the device hook (`--egress-hook auto` picking it, or `xmit`), netrace sees each SYN
//!   as it reaches the driver, after the SNAT: its per-connection outcomes agree with the
//!   client's, its ports are the translated ones, and the verdict is the seed's range problem.
//!   The SNAT is placed after netrace in the chain (attached first; netrace then goes first)
//!   and before it (attached after netrace, first in line on egress).
//! - With the hook forced to tc, netrace's classifier sees the pod's ports (SNAT after it) or
//!   no SYN at all (SNAT before it, final verdict): the report, the JSON and the exit status say
//!   translation is out of sight instead of counting connections lost.
//!
//! IPv4 and IPv6. Needs root.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use netrace_lab::bpf_snat::{translate, BpfSnat, Order};
use netrace_lab::truth;
use netrace_lab::{
    is_root, netrace_bin, Family, Lab, LabOptions, NetraceOptions, NetraceOutput, NetraceRun,
    SnatMode, TcpAttempt, TcpCounts, TcpOutcome,
};
use serde_json::Value;

const TCP: usize = 200;
const FIREWALL_MIN: u16 = 32768;
/// netrace's exit status for translation out of sight.
const EXIT_OUT_OF_SIGHT: i32 = 3;

fn require_root() {
    assert!(
        is_root(),
        "the netrace-lab end-to-end tests need root (network namespaces, nftables, eBPF); \
         run them with `cargo xtask test` or as root: `cargo test -p netrace-lab`"
    );
}

/// The seed lab without netfilter SNAT (the node routes the pod's address).
fn lab(family: Family) -> Lab {
    Lab::new(
        LabOptions::seed()
            .snat_mode(SnatMode::None)
            .ipv6(family == Family::V6),
    )
    .unwrap_or_else(|e| panic!("{e:#}"))
}

fn start(lab: &Lab, hook: &str) -> NetraceRun {
    let bin = netrace_bin().unwrap_or_else(|e| panic!("{e:#}"));
    NetraceRun::start(&NetraceOptions::for_lab(lab, bin).args(["--egress-hook", hook]))
        .unwrap_or_else(|e| panic!("starting netrace: {e:#}"))
}

fn drive(lab: &Lab, family: Family) -> Vec<TcpAttempt> {
    let server = lab.server_addr(family);
    let attempts = lab
        .client()
        .tcp(server, TCP, &|_, _| {})
        .unwrap_or_else(|e| panic!("TCP client to {server}: {e:#}"));
    let connected = TcpCounts::of(&attempts).connected;
    if let Some(s) = lab.server() {
        s.wait_accepted(connected, Duration::from_secs(3));
    }
    attempts
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

/// The translated ports of the client's attempts that ended with `outcome`.
fn translated(attempts: &[TcpAttempt], outcome: &TcpOutcome) -> BTreeSet<u16> {
    attempts
        .iter()
        .filter(|a| &a.outcome == outcome)
        .map(|a| translate(a.pod_port))
        .collect()
}

/// The client's view, the firewall's and the server's agree, and the lab shows the failure.
fn check_ground_truth(lab: &Lab, family: Family, attempts: &[TcpAttempt]) {
    let c = TcpCounts::of(attempts);
    assert_eq!(c.connected + c.timed_out, c.attempts, "{c:?}");
    assert!(c.timed_out > TCP / 4 && c.connected > TCP / 4, "{c:?}");
    let timed_out = translated(attempts, &TcpOutcome::TimedOut);
    let dropped = truth::firewall_dropped_ports(lab, family).unwrap();
    assert_eq!(
        timed_out, dropped,
        "the firewall's dropped ports are not exactly the client's timed-out translated ports"
    );
    let accepted: BTreeSet<u16> = lab
        .server()
        .map(|s| s.accepted_ports(family == Family::V6).into_iter().collect())
        .unwrap_or_default();
    assert_eq!(
        translated(attempts, &TcpOutcome::Connected),
        accepted,
        "the server's accepted ports are not exactly the client's connected translated ports"
    );
}

/// The device hook sees translated ports: every outcome as the client had it, the ports the
/// firewall saw, the seed's verdict and exit status.
fn device_hook_case(order: Order, hook: &str, family: Family) {
    require_root();
    let lab = lab(family);
    // Attached before netrace starts, the SNAT ends up after netrace's programs (netrace goes
    // first in line); attached after, with `First`, it runs before them on egress.
    let early = (order == Order::Last).then(|| BpfSnat::attach(&lab, order).unwrap());
    let netrace = start(&lab, hook);
    let late = (order == Order::First).then(|| BpfSnat::attach(&lab, order).unwrap());
    let attempts = drive(&lab, family);
    netrace.settle();
    let out = netrace.stop().unwrap_or_else(|e| panic!("{e:#}"));
    drop((early, late));
    let ctx = out.describe();
    check_ground_truth(&lab, family, &attempts);
    assert!(
        out.stderr.contains("egress hook: xmit"),
        "netrace did not say it used the device hook\n{ctx}"
    );
    assert_eq!(summary_str(&out, "/egress_hook/hook"), "xmit", "{ctx}");
    for c in out.connections() {
        assert_eq!(
            c.get("src").and_then(Value::as_str),
            Some(lab.node_uplink_ip(family).to_string().as_str()),
            "a connection not from the node's translated address: {c}\n{ctx}"
        );
    }
    let lost: BTreeSet<u16> = out.lost_ports().into_iter().collect();
    let answered: BTreeSet<u16> = out.answered_ports().into_iter().collect();
    assert_eq!(out.lost_ports().len(), lost.len(), "duplicates\n{ctx}");
    assert_eq!(
        lost,
        translated(&attempts, &TcpOutcome::TimedOut),
        "netrace's lost ports differ from the client's timed-out (translated) ports\n{ctx}"
    );
    assert_eq!(
        answered,
        translated(&attempts, &TcpOutcome::Connected),
        "netrace's answered ports differ from the client's connected (translated) ports\n{ctx}"
    );
    assert!(lost.iter().all(|&p| p < FIREWALL_MIN), "{ctx}");
    let c = TcpCounts::of(&attempts);
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
    // The histogram holds the translated ports: the lost ones all outside the range.
    let buckets = out
        .summary_at("/buckets")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no buckets\n{ctx}"));
    let lost_outside: u64 = buckets
        .iter()
        .filter(|b| b.get("in_allowed_range") == Some(&Value::Bool(false)))
        .filter_map(|b| b.get("lost").and_then(Value::as_u64))
        .sum();
    assert_eq!(lost_outside, c.timed_out as u64, "{ctx}");
    assert_eq!(summary_str(&out, "/verdict/kind"), "range_problem", "{ctx}");
    let headline = summary_str(&out, "/verdict/headline");
    assert!(headline.contains("32768"), "{headline}\n{ctx}");
    let fix = out
        .summary_at("/fix")
        .and_then(Value::as_array)
        .map(|f| f.len())
        .unwrap_or(0);
    assert!(fix > 0, "no fix\n{ctx}");
    assert_eq!(out.code(), Some(1), "exit code with loss\n{ctx}");
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn bpf_snat_after_netrace_auto_picks_the_device_hook() {
    device_hook_case(Order::Last, "auto", Family::V4);
}

#[test]
fn bpf_snat_before_netrace_device_hook_sees_translated_ports() {
    device_hook_case(Order::First, "xmit", Family::V4);
}

#[test]
fn bpf_snat_ipv6_device_hook_sees_translated_ports() {
    device_hook_case(Order::Last, "auto", Family::V6);
}

/// With the hook forced to tc: translation out of sight, said in the report, the JSON and
/// the exit status; never a range verdict from the wrong ports.
fn tc_hook_case(order: Order, family: Family) {
    require_root();
    let lab = lab(family);
    let early = (order == Order::Last).then(|| BpfSnat::attach(&lab, order).unwrap());
    let netrace = start(&lab, "tc");
    let late = (order == Order::First).then(|| BpfSnat::attach(&lab, order).unwrap());
    let attempts = drive(&lab, family);
    netrace.settle();
    let out = netrace.stop().unwrap_or_else(|e| panic!("{e:#}"));
    drop((early, late));
    let ctx = out.describe();
    check_ground_truth(&lab, family, &attempts);
    assert_eq!(summary_str(&out, "/egress_hook/hook"), "tc", "{ctx}");
    assert_eq!(
        summary_str(&out, "/verdict/kind"),
        "translation_out_of_sight",
        "{ctx}"
    );
    let headline = summary_str(&out, "/verdict/headline");
    assert!(
        headline.contains("--egress-hook xmit") && headline.contains(lab.node_uplink()),
        "{headline}\n{ctx}"
    );
    let signs = summary_u64(&out, "/translation/translated_answers")
        + summary_u64(&out, "/translation/unmatched_synacks");
    let connected = TcpCounts::of(&attempts).connected as u64;
    assert!(
        signs >= connected / 2,
        "{signs} signs for {connected} connections\n{ctx}"
    );
    if order == Order::Last {
        // netrace saw the pod's SYNs; their answers came back translated and were paired by
        // ISN: each answered record names the port it came back to.
        for c in out.connections() {
            if c.get("outcome").and_then(Value::as_str) == Some("answered") {
                let port = c.get("answered_src_port").and_then(Value::as_u64);
                let pod = c.get("src_port").and_then(Value::as_u64).unwrap_or(0) as u16;
                assert_eq!(port, Some(u64::from(translate(pod))), "{c}\n{ctx}");
            }
        }
    }
    assert_eq!(out.code(), Some(EXIT_OUT_OF_SIGHT), "exit status\n{ctx}");
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn bpf_snat_after_netrace_tc_hook_says_translation_out_of_sight() {
    tc_hook_case(Order::Last, Family::V4);
}

#[test]
fn bpf_snat_before_netrace_tc_hook_says_translation_out_of_sight() {
    tc_hook_case(Order::First, Family::V4);
}

#[test]
fn bpf_snat_ipv6_after_netrace_tc_hook_says_translation_out_of_sight() {
    tc_hook_case(Order::Last, Family::V6);
}

/// The text report says it too.
#[test]
fn tc_hook_text_report_names_the_problem_and_the_fix() {
    require_root();
    let lab = lab(Family::V4);
    let snat = BpfSnat::attach(&lab, Order::Last).unwrap();
    let bin = netrace_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let netrace = NetraceRun::start(
        &NetraceOptions::for_lab(&lab, bin)
            .output(netrace_lab::Output::Text)
            .args(["--egress-hook", "tc"]),
    )
    .unwrap_or_else(|e| panic!("starting netrace: {e:#}"));
    let attempts = drive(&lab, Family::V4);
    netrace.settle();
    let out = netrace.stop().unwrap_or_else(|e| panic!("{e:#}"));
    drop(snat);
    let ctx = out.describe();
    assert!(TcpCounts::of(&attempts).timed_out > 0);
    assert!(
        out.stdout.contains("translation out of sight")
            && out.stdout.contains("--egress-hook xmit"),
        "{ctx}"
    );
    assert_eq!(out.code(), Some(EXIT_OUT_OF_SIGHT), "{ctx}");
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}
