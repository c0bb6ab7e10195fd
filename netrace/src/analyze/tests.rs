//! The whole of `analyze` (reader, merge, parser, pairing rules, tracker, judge) on captures
//! written here packet by packet, where every outcome is known by construction.

use std::net::Ipv4Addr;
use std::time::Duration;

use netrace_lab::wire::{tcp_frame, Tcp};

use super::{config::AnalyzeConfig, finish, replay::Replay, replay_all};
use crate::{
    capture::{write, Capture},
    judge::verdict::VerdictKind,
    options::{OutputFormat, DEFAULT_ALLOWED, DEFAULT_BUCKET_EDGES},
    report::Report,
};

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const T0: u64 = 1_700_000_000 * S;
const NODE: [u8; 4] = [198, 18, 2, 1];
const POD: [u8; 4] = [198, 18, 1, 2];
const SERVER: [u8; 4] = [198, 18, 3, 2];
const SYN: u8 = 0x02;
const SYNACK: u8 = 0x12;
const RSTACK: u8 = 0x14;
const ACK: u8 = 0x10;

/// Ethernet, IPv4 and TCP headers (the lab's packet builder, as every test's).
fn tcp(src: [u8; 4], dst: [u8; 4], ports: (u16, u16), seq: u32, ack: u32, flags: u8) -> Vec<u8> {
    let tcp = Tcp::new(ports.0, ports.1, flags).seq(seq).ack(ack);
    tcp_frame(
        &[],
        Ipv4Addr::from(src).into(),
        Ipv4Addr::from(dst).into(),
        &tcp,
    )
}

/// The same packet as a Linux cooked v2 record, `outgoing` or received.
fn cooked(eth: &[u8], outgoing: bool) -> Vec<u8> {
    let mut p = vec![0x08, 0x00, 0, 0, 0, 0, 0, 2, 0, 1];
    p.push(if outgoing { 4 } else { 0 });
    p.extend_from_slice(&[6, 2, 0, 0, 0, 0, 1, 0, 0]);
    p.extend_from_slice(&eth[14..]);
    p
}

fn config() -> AnalyzeConfig {
    AnalyzeConfig {
        files: Vec::new(),
        allowed: DEFAULT_ALLOWED,
        bucket_edges: DEFAULT_BUCKET_EDGES.to_vec(),
        syn_timeout: Duration::from_secs(3),
        filter_dst: None,
        filter_dport: None,
        output: OutputFormat::Text,
        svg: None,
        list_lost: false,
    }
}

fn analyze(cfg: &AnalyzeConfig, files: Vec<(&str, Vec<u8>)>) -> Report {
    let captures = files
        .into_iter()
        .map(|(name, bytes)| match Capture::from_bytes(name, bytes) {
            Ok(c) => (name.to_string(), c),
            Err(e) => panic!("{e}"),
        })
        .collect();
    let mut replay = Replay::new(cfg);
    let sources = match replay_all(&mut replay, captures) {
        Ok(Some(s)) => s,
        other => panic!("replay: {other:?}"),
    };
    match finish::report(cfg, &mut replay, &sources) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    }
}

/// The seed failure: ports below 32768 never get their SYN-ACK.
fn seed_uplink(n: u16) -> write::Pcap {
    let mut p = write::Pcap::new(1, 262_144, true, false);
    let mut t = T0;
    for i in 0..n {
        let port = 1024 + i * (64000 / n);
        let isn = 1000 + u32::from(i);
        p.packet(t, &tcp(NODE, SERVER, (port, 443), isn, 0, SYN), 54);
        if port >= 32768 {
            p.packet(
                t + MS,
                &tcp(SERVER, NODE, (443, port), 7, isn + 1, SYNACK),
                54,
            );
            p.packet(
                t + 2 * MS,
                &tcp(NODE, SERVER, (port, 443), isn + 1, 8, ACK),
                54,
            );
        }
        t += 3 * MS;
    }
    // Time goes on: a packet after the SYN timeout, of no interest.
    p.packet(t + 5 * S, &tcp(SERVER, NODE, (443, 9), 1, 1, ACK), 54);
    p
}

#[test]
fn seed_capture_gives_the_range_verdict() {
    let cfg = config();
    let r = analyze(&cfg, vec![("uplink.pcap", seed_uplink(100).bytes)]);
    let t = r.totals();
    assert_eq!(t.attempts, 100);
    let outside = (0..100u16).filter(|i| 1024 + i * 640 < 32768).count() as u64;
    assert_eq!(t.lost, outside);
    assert_eq!(t.answered, 100 - outside);
    assert!(r.lost.iter().all(|c| c.src_port < 32768));
    assert_eq!(
        r.verdict.kind,
        VerdictKind::RangeProblem,
        "{:?} {t:?}",
        r.verdict
    );
    assert_eq!(r.pending_at_exit, 0);
    assert_eq!(r.interfaces, ["uplink.pcap"]);
    assert!(r.notes.is_empty(), "{:?}", r.notes);
    // The same capture, gzip-compressed and as pcapng: the same report.
    let gz = match write::gzip(&seed_uplink(100).bytes) {
        Ok(g) => g,
        Err(e) => panic!("{e}"),
    };
    let z = analyze(&cfg, vec![("uplink.pcap.gz", gz)]);
    assert_eq!(z.totals(), t);
}

#[test]
fn late_refused_and_waiting() {
    let mut p = write::Pcap::new(1, 0, false, false);
    // 40000: lost at 3 s, answered at 4 s: late. 40001: refused. 40002: a SYN-ACK that
    // acknowledges something else is no answer: lost. 40003: too young at the end: waiting.
    p.packet(T0, &tcp(NODE, SERVER, (40000, 443), 5, 0, SYN), 54);
    p.packet(T0 + S, &tcp(NODE, SERVER, (40001, 80), 50, 0, SYN), 54);
    p.packet(T0 + S, &tcp(NODE, SERVER, (40002, 443), 70, 0, SYN), 54);
    p.packet(
        T0 + S + MS,
        &tcp(SERVER, NODE, (80, 40001), 0, 51, RSTACK),
        54,
    );
    p.packet(
        T0 + S + MS,
        &tcp(SERVER, NODE, (443, 40002), 1, 99, SYNACK),
        54,
    );
    p.packet(
        T0 + 4 * S,
        &tcp(SERVER, NODE, (443, 40000), 9, 6, SYNACK),
        54,
    );
    p.packet(T0 + 5 * S, &tcp(NODE, SERVER, (40003, 443), 90, 0, SYN), 54);
    let r = analyze(&config(), vec![("t.pcap", p.bytes)]);
    let t = r.totals();
    assert_eq!((t.lost, t.late, t.refused), (2, 1, 1), "{t:?}");
    assert_eq!(r.pending_at_exit, 1);
    assert!(r.notes.iter().any(|n| n.contains("still waiting")));
    assert_eq!(r.counters.get("synack_mismatch"), Some(&1));
}

#[test]
fn one_direction_only_is_said() {
    let mut p = write::Pcap::new(1, 0, false, false);
    for i in 0..5u16 {
        p.packet(
            T0 + u64::from(i) * S,
            &tcp(NODE, SERVER, (40000 + i, 443), 1, 0, SYN),
            54,
        );
    }
    let r = analyze(&config(), vec![("out.pcap", p.bytes)]);
    assert!(
        r.notes.iter().any(|n| n.starts_with("no SYN-ACKs at all")),
        "{:?}",
        r.notes
    );
}

/// Both sides of SNAT: the pod's SYN, then the same ISN from the node's address moments later.
fn pod_and_uplink() -> (write::Pcap, write::Pcap) {
    let mut pod = write::Pcap::new(1, 0, true, false);
    let mut up = write::Pcap::new(1, 0, true, false);
    for i in 0..20u16 {
        let t = T0 + u64::from(i) * 10 * MS;
        let isn = 5000 + u32::from(i) * 7;
        let pod_port = 45000 + i;
        let snat_port = if i % 2 == 0 { 2000 + i } else { 50000 + i };
        pod.packet(t, &tcp(POD, SERVER, (pod_port, 443), isn, 0, SYN), 54);
        up.packet(
            t + 20_000,
            &tcp(NODE, SERVER, (snat_port, 443), isn, 0, SYN),
            54,
        );
        if snat_port >= 32768 {
            up.packet(
                t + MS,
                &tcp(SERVER, NODE, (443, snat_port), 3, isn + 1, SYNACK),
                54,
            );
            pod.packet(
                t + MS + 20_000,
                &tcp(SERVER, POD, (443, pod_port), 3, isn + 1, SYNACK),
                54,
            );
        }
    }
    up.packet(T0 + 10 * S, &tcp(SERVER, NODE, (443, 9), 1, 1, ACK), 54);
    (pod, up)
}

fn assert_linked(r: &Report) {
    let t = r.totals();
    assert_eq!((t.attempts, t.lost, t.answered), (20, 10, 10), "{t:?}");
    assert!(
        r.lost.iter().all(|c| c.src_port < 32768),
        "uplink ports counted"
    );
    for c in &r.lost {
        assert_eq!(c.who.pod_src, Some(std::net::IpAddr::from(POD)), "{c:?}");
        assert_eq!(c.who.pod_src_port, Some(45000 + (c.src_port - 2000)));
    }
    assert!(r.lost_by_pod.is_some());
    assert_eq!(
        r.counters.get("syn_seen"),
        Some(&20),
        "pod-side SYNs are not attempts"
    );
}

#[test]
fn two_files_link_the_pod_side() {
    let (pod, up) = pod_and_uplink();
    let r = analyze(
        &config(),
        vec![("pod.pcap", pod.bytes), ("up.pcap", up.bytes)],
    );
    assert_linked(&r);
    assert_eq!(r.interfaces, ["up.pcap"]);
}

#[test]
fn two_interfaces_in_one_pcapng_link_the_pod_side() {
    let (pod, up) = pod_and_uplink();
    // Re-read both and write one pcapng with two interfaces, in time order.
    let mut frames = Vec::new();
    for (i, bytes) in [pod.bytes, up.bytes].into_iter().enumerate() {
        let c = match Capture::from_bytes("x", bytes) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        frames.extend(
            c.frames()
                .filter_map(Result::ok)
                .map(|f| (f.ts_ns, i, f.ethernet)),
        );
    }
    frames.sort_by_key(|f| (f.0, f.1));
    let mut ng = write::PcapNg::new(false);
    ng.interface(1, 0, Some("veth-pod"), Some(9))
        .interface(1, 0, Some("eth0"), Some(9));
    for (ts, i, data) in frames {
        ng.packet(i as u32, ts, &data, data.len() as u32);
    }
    let r = analyze(&config(), vec![("node.pcapng", ng.bytes)]);
    assert_linked(&r);
    assert_eq!(r.interfaces, ["eth0"]);
}

#[test]
fn cooked_capture_counts_what_the_host_sent() {
    let mut p = write::Pcap::new(276, 0, true, false);
    // The pod's SYN arrives on its veth, leaves the uplink translated, is answered.
    let isn = 77;
    p.packet(
        T0,
        &cooked(&tcp(POD, SERVER, (45000, 443), isn, 0, SYN), false),
        64,
    );
    p.packet(
        T0 + 20_000,
        &cooked(&tcp(NODE, SERVER, (50000, 443), isn, 0, SYN), true),
        64,
    );
    p.packet(
        T0 + MS,
        &cooked(&tcp(SERVER, NODE, (443, 50000), 1, isn + 1, SYNACK), false),
        64,
    );
    p.packet(
        T0 + MS + 20_000,
        &cooked(&tcp(SERVER, POD, (443, 45000), 1, isn + 1, SYNACK), true),
        64,
    );
    // Someone connecting to the node: received SYN, sent SYN-ACK; not an attempt of ours.
    p.packet(
        T0 + 2 * MS,
        &cooked(&tcp(SERVER, NODE, (3000, 22), 9, 0, SYN), false),
        64,
    );
    p.packet(
        T0 + 3 * MS,
        &cooked(&tcp(NODE, SERVER, (22, 3000), 1, 10, SYNACK), true),
        64,
    );
    // A lost one, seen on both sides.
    p.packet(
        T0 + 4 * MS,
        &cooked(&tcp(POD, SERVER, (45001, 443), 99, 0, SYN), false),
        64,
    );
    p.packet(
        T0 + 4 * MS + 20_000,
        &cooked(&tcp(NODE, SERVER, (2000, 443), 99, 0, SYN), true),
        64,
    );
    p.packet(
        T0 + 9 * S,
        &cooked(&tcp(SERVER, NODE, (443, 9), 1, 1, ACK), false),
        64,
    );
    let r = analyze(&config(), vec![("any.pcap", p.bytes)]);
    let t = r.totals();
    assert_eq!((t.attempts, t.answered, t.lost), (2, 1, 1), "{t:?}");
    assert_eq!(r.lost[0].src_port, 2000);
    assert_eq!(r.lost[0].who.pod_src_port, Some(45001));
}

#[test]
fn destination_filters_apply() {
    let mut cfg = config();
    cfg.filter_dport = Some(80);
    let r = analyze(&cfg, vec![("uplink.pcap", seed_uplink(40).bytes)]);
    assert_eq!(r.totals().attempts, 0);
    assert_eq!(r.counters.get("filtered"), Some(&40));
}
