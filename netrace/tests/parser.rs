//! The kernel parser and classifiers, exercised through `BPF_PROG_TEST_RUN` on crafted packets.
//!
//! Every test loads its own fresh kernel object (so the maps start empty), runs packets through
//! `netrace_egress` / `netrace_ingress` without attaching anything, and checks the outcome
//! through the maps: the pending-SYN hash, the per-CPU counters, the per-port SYN tally and the
//! ring buffer. Every run also asserts the verdict is `TC_ACT_UNSPEC` and the packet comes back
//! unchanged (see `support::bpf::Bpf::run`).
//!
//! These tests need root (or CAP_BPF + CAP_NET_ADMIN): without it they fail, saying so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{Ipv4Addr, Ipv6Addr};

use netrace_common::{Counter, EventKind, KernelFilter, FAMILY_V4, MAX_IPV6_EXT_HEADERS};
use support::{
    bpf::{key4, key6, Bpf},
    packets::*,
};

const LOCAL4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const REMOTE4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const ROUTER4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const LOCAL6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
const REMOTE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x20);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);

const SPORT: u16 = 40_001;
const DPORT: u16 = 443;
const ISN: u32 = 0x1234_5678;

/// Loads a fresh object and sends one IPv4 SYN `LOCAL4:sport -> REMOTE4:DPORT`, draining its
/// `Syn` event.
fn with_pending_v4(sport: u16, isn: u32) -> Bpf {
    let mut bpf = Bpf::load();
    bpf.egress(&syn4(LOCAL4, sport, REMOTE4, DPORT, isn));
    let key = key4(LOCAL4, sport, REMOTE4, DPORT);
    assert!(bpf.pending(&key).is_some(), "the SYN was not tracked");
    let ev = bpf.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, EventKind::Syn);
    bpf
}

fn with_pending_v6(sport: u16, isn: u32) -> Bpf {
    let mut bpf = Bpf::load();
    bpf.egress(&syn6(LOCAL6, sport, REMOTE6, DPORT, isn));
    let key = key6(LOCAL6, sport, REMOTE6, DPORT);
    assert!(bpf.pending(&key).is_some(), "the IPv6 SYN was not tracked");
    let ev = bpf.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, EventKind::Syn);
    bpf
}

/// Asserts `packet` (sent on egress to a fresh object) is tracked under exactly `key` with `isn`.
#[track_caller]
fn assert_tracked(packet: &[u8], key: netrace_common::FlowKey, isn: u32) {
    let mut bpf = Bpf::load();
    bpf.egress(packet);
    let all = bpf.pending_all();
    assert_eq!(all.len(), 1, "pending entries: {all:?}");
    assert_eq!(all[0].0, key);
    assert_eq!(all[0].1.isn, isn);
    assert_eq!(all[0].1.syns, 1);
    let ev = bpf.events();
    assert_eq!(ev.len(), 1, "events: {ev:?}");
    assert_eq!(ev[0].kind, EventKind::Syn);
    assert_eq!(ev[0].raw.key, key);
    bpf.assert_counters(&[(Counter::SynSeen, 1)]);
    assert_eq!(bpf.syn_port(key.src_port), 1);
}

// ---- 1. Egress SYNs ----------------------------------------------------------------------------

#[test]
fn egress_ipv4_syn_creates_pending_entry_and_syn_event() {
    let mut bpf = Bpf::load();
    bpf.egress(&syn4(LOCAL4, SPORT, REMOTE4, DPORT, ISN));

    let key = key4(LOCAL4, SPORT, REMOTE4, DPORT);
    assert_eq!(key.family, FAMILY_V4);
    let all = bpf.pending_all();
    assert_eq!(all.len(), 1, "pending: {all:?}");
    let (k, p) = all[0];
    assert_eq!(
        k, key,
        "key with addresses in network order, ports in host order"
    );
    assert_eq!(k.src_addr[..4], [198, 51, 100, 10]);
    assert_eq!(k.dst_addr[..4], [203, 0, 113, 20]);
    assert_eq!(k.src_addr[4..], [0; 12]);
    assert_eq!(k.dst_addr[4..], [0; 12]);
    assert_eq!((k.src_port, k.dst_port), (SPORT, DPORT));
    assert_eq!(p.isn, ISN);
    assert_eq!(p.syns, 1);
    assert_ne!(p.first_ns, 0);
    assert_eq!(p.first_ns, p.last_ns);
    assert_eq!(p.data_len, 0);

    let ev = bpf.events();
    assert_eq!(ev.len(), 1, "events: {ev:?}");
    assert_eq!(ev[0].kind, EventKind::Syn);
    assert_eq!(ev[0].raw.key, key);
    assert_eq!(ev[0].raw.pending, p);
    assert_eq!(ev[0].raw.ifindex, p.ifindex);
    assert_eq!(ev[0].raw.ts_ns, p.first_ns);
    assert_eq!((ev[0].raw.icmp_type, ev[0].raw.icmp_code), (0, 0));

    bpf.assert_counters(&[(Counter::SynSeen, 1)]);
    assert_eq!(bpf.syn_port(SPORT), 1);
    assert_eq!(bpf.syn_ports(), vec![(SPORT, 1)]);
}

#[test]
fn egress_ipv4_syn_retransmission_counts_without_new_event() {
    let mut bpf = with_pending_v4(SPORT, ISN);
    let key = key4(LOCAL4, SPORT, REMOTE4, DPORT);
    let first = bpf.pending(&key).unwrap();

    bpf.egress(&syn4(LOCAL4, SPORT, REMOTE4, DPORT, ISN));
    let p = bpf.pending(&key).unwrap();
    assert_eq!(p.syns, 2);
    assert_eq!(p.isn, ISN);
    assert_eq!(p.first_ns, first.first_ns);
    assert!(p.last_ns >= first.last_ns);
    assert_eq!(
        bpf.events(),
        vec![],
        "a retransmission is not a new attempt"
    );
    bpf.assert_counters(&[(Counter::SynSeen, 2), (Counter::SynRetransmit, 1)]);
    assert_eq!(bpf.syn_port(SPORT), 2);

    bpf.egress(&syn4(LOCAL4, SPORT, REMOTE4, DPORT, ISN));
    assert_eq!(bpf.pending(&key).unwrap().syns, 3);
    bpf.assert_counters(&[(Counter::SynSeen, 3), (Counter::SynRetransmit, 2)]);
    assert_eq!(bpf.syn_port(SPORT), 3);
    assert_eq!(bpf.pending_all().len(), 1);
}

#[test]
fn egress_ipv4_syn_with_new_isn_supersedes_old_entry() {
    let mut bpf = with_pending_v4(SPORT, ISN);
    let key = key4(LOCAL4, SPORT, REMOTE4, DPORT);
    bpf.egress(&syn4(LOCAL4, SPORT, REMOTE4, DPORT, ISN));
    let old = bpf.pending(&key).unwrap();
    assert_eq!(old.syns, 2);

    const NEW_ISN: u32 = 0x9abc_def0;
    bpf.egress(&syn4(LOCAL4, SPORT, REMOTE4, DPORT, NEW_ISN));
    let ev = bpf.events();
    assert_eq!(ev.len(), 2, "events: {ev:?}");
    assert_eq!(ev[0].kind, EventKind::Superseded);
    assert_eq!(ev[0].raw.key, key);
    assert_eq!(ev[0].raw.pending, old, "Superseded carries the old entry");
    assert_eq!(ev[1].kind, EventKind::Syn);
    assert_eq!(ev[1].raw.key, key);
    assert_eq!(ev[1].raw.pending.isn, NEW_ISN);
    assert_eq!(ev[1].raw.pending.syns, 1);

    let fresh = bpf.pending(&key).unwrap();
    assert_eq!(fresh, ev[1].raw.pending);
    assert!(fresh.first_ns >= old.last_ns);
    assert_eq!(bpf.pending_all().len(), 1);
    bpf.assert_counters(&[(Counter::SynSeen, 3), (Counter::SynRetransmit, 1)]);
    assert_eq!(bpf.syn_port(SPORT), 3);
}

#[test]
fn egress_distinct_tuples_are_distinct_entries() {
    let mut bpf = Bpf::load();
    bpf.egress(&syn4(LOCAL4, SPORT, REMOTE4, DPORT, ISN));
    bpf.egress(&syn4(LOCAL4, SPORT + 1, REMOTE4, DPORT, ISN));
    bpf.egress(&syn4(LOCAL4, SPORT, REMOTE4, DPORT + 1, ISN));
    bpf.egress(&syn6(LOCAL6, SPORT, REMOTE6, DPORT, ISN));
    let mut keys: Vec<_> = bpf.pending_all().into_iter().map(|(k, _)| k).collect();
    keys.sort_by_key(|k| (k.family, k.src_port, k.dst_port));
    assert_eq!(
        keys,
        vec![
            key4(LOCAL4, SPORT, REMOTE4, DPORT),
            key4(LOCAL4, SPORT, REMOTE4, DPORT + 1),
            key4(LOCAL4, SPORT + 1, REMOTE4, DPORT),
            key6(LOCAL6, SPORT, REMOTE6, DPORT),
        ]
    );
    assert_eq!(bpf.events().len(), 4);
    bpf.assert_counters(&[(Counter::SynSeen, 4)]);
    assert_eq!(bpf.syn_ports(), vec![(SPORT, 3), (SPORT + 1, 1)]);
}

#[test]
fn egress_ecn_setup_syn_is_tracked() {
    let mut tcp = Tcp::syn(SPORT, DPORT, ISN);
    tcp.flags = TCP_SYN | TCP_ECE | TCP_CWR;
    assert_tracked(
        &tcp4(&[], &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP), &tcp),
        key4(LOCAL4, SPORT, REMOTE4, DPORT),
        ISN,
    );
}

#[test]
fn egress_syn_with_maximal_tcp_options_is_tracked() {
    let mut tcp = Tcp::syn(SPORT, DPORT, ISN);
    tcp.options = vec![1; 40];
    let pkt = tcp4(&[], &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP), &tcp);
    assert_eq!(pkt[14 + 20 + 12] >> 4, 15);
    assert_tracked(&pkt, key4(LOCAL4, SPORT, REMOTE4, DPORT), ISN);
}

// ---- 2. SYN-ACKs -------------------------------------------------------------------------------

#[test]
fn ingress_synack_acknowledging_isn_plus_one_answers() {
    let mut bpf = with_pending_v4(SPORT, ISN);
    let key = key4(LOCAL4, SPORT, REMOTE4, DPORT);
    let pending = bpf.pending(&key).unwrap();

    bpf.ingress(&answer4(
        LOCAL4,
        SPORT,
        REMOTE4,
        DPORT,
        TCP_SYN | TCP_ACK,
        ISN + 1,
    ));
    assert_eq!(bpf.pending(&key), None, "the answered entry is removed");
    let ev = bpf.events();
    assert_eq!(ev.len(), 1, "events: {ev:?}");
    assert_eq!(ev[0].kind, EventKind::Answered);
    assert_eq!(
        ev[0].raw.key, key,
        "the key is oriented from the connecting side"
    );
    assert_eq!(ev[0].raw.pending, pending);
    assert!(ev[0].raw.ts_ns >= pending.last_ns);
    assert_eq!((ev[0].raw.icmp_type, ev[0].raw.icmp_code), (0, 0));
    bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::SynAckMatched, 1)]);

    // A duplicated SYN-ACK finds no entry: it is reported as unmatched, with the ISN it
    // acknowledges (user space knows the connection was answered and drops it).
    bpf.ingress(&answer4(
        LOCAL4,
        SPORT,
        REMOTE4,
        DPORT,
        TCP_SYN | TCP_ACK,
        ISN + 1,
    ));
    assert_eq!(bpf.pending_all(), Vec::new(), "pending entries");
    let ev = bpf.events();
    assert_eq!(ev.len(), 1, "events: {ev:?}");
    assert_eq!(ev[0].kind, EventKind::UnmatchedSynAck);
    assert_eq!((ev[0].raw.key, ev[0].raw.pending.isn), (key, ISN));
    bpf.assert_counters(&[
        (Counter::SynSeen, 1),
        (Counter::SynAckMatched, 1),
        (Counter::SynAckUnmatched, 1),
    ]);
}

#[test]
fn ingress_synack_with_wrong_ack_is_a_mismatch() {
    let mut bpf = with_pending_v4(SPORT, ISN);
    let key = key4(LOCAL4, SPORT, REMOTE4, DPORT);
    let pending = bpf.pending(&key).unwrap();

    for wrong in [ISN, ISN + 2, 0, ISN.wrapping_sub(1)] {
        bpf.ingress(&answer4(
            LOCAL4,
            SPORT,
            REMOTE4,
            DPORT,
            TCP_SYN | TCP_ACK,
            wrong,
        ));
    }
    assert_eq!(bpf.pending(&key), Some(pending), "the entry stays");
    assert_eq!(bpf.events(), vec![]);
    bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::SynAckMismatch, 4)]);

    // The right answer still resolves it afterwards.
    bpf.ingress(&answer4(
        LOCAL4,
        SPORT,
        REMOTE4,
        DPORT,
        TCP_SYN | TCP_ACK,
        ISN + 1,
    ));
    assert_eq!(bpf.pending(&key), None);
    let ev = bpf.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, EventKind::Answered);
    bpf.assert_counters(&[
        (Counter::SynSeen, 1),
        (Counter::SynAckMismatch, 4),
        (Counter::SynAckMatched, 1),
    ]);
}

#[test]
fn ingress_synack_for_other_tuple_is_ignored() {
    let mut bpf = with_pending_v4(SPORT, ISN);
    let key = key4(LOCAL4, SPORT, REMOTE4, DPORT);
    // Wrong local port, wrong remote port, wrong remote address, wrong local address.
    bpf.ingress(&answer4(
        LOCAL4,
        SPORT + 1,
        REMOTE4,
        DPORT,
        TCP_SYN | TCP_ACK,
        ISN + 1,
    ));
    bpf.ingress(&answer4(
        LOCAL4,
        SPORT,
        REMOTE4,
        DPORT + 1,
        TCP_SYN | TCP_ACK,
        ISN + 1,
    ));
    bpf.ingress(&answer4(
        LOCAL4,
        SPORT,
        ROUTER4,
        DPORT,
        TCP_SYN | TCP_ACK,
        ISN + 1,
    ));
    bpf.ingress(&answer4(
        ROUTER4,
        SPORT,
        REMOTE4,
        DPORT,
        TCP_SYN | TCP_ACK,
        ISN + 1,
    ));
    // The same tuple, not swapped (as if the SYN-ACK came from the local side).
    bpf.ingress(&answer4(
        REMOTE4,
        DPORT,
        LOCAL4,
        SPORT,
        TCP_SYN | TCP_ACK,
        ISN + 1,
    ));
    // None is pending: each is reported as an unmatched SYN-ACK (for user space to pair by
    // ISN or count), and the pending entry stays.
    assert!(bpf.pending(&key).is_some());
    let kinds: Vec<EventKind> = bpf.events().iter().map(|e| e.kind).collect();
    assert_eq!(kinds, vec![EventKind::UnmatchedSynAck; 5]);
    bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::SynAckUnmatched, 5)]);
}

#[test]
fn ingress_synack_ack_wraps_around() {
    let mut bpf = with_pending_v4(SPORT, u32::MAX);
    bpf.ingress(&answer4(
        LOCAL4,
        SPORT,
        REMOTE4,
        DPORT,
        TCP_SYN | TCP_ACK,
        0,
    ));
    let ev = bpf.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, EventKind::Answered);
    assert_eq!(ev[0].raw.pending.isn, u32::MAX);
    assert_eq!(bpf.pending_all(), vec![]);
}

#[test]
fn ingress_ipv6_synack_answers() {
    let mut bpf = with_pending_v6(SPORT, ISN);
    let key = key6(LOCAL6, SPORT, REMOTE6, DPORT);
    let pending = bpf.pending(&key).unwrap();
    bpf.ingress(&answer6(
        LOCAL6,
        SPORT,
        REMOTE6,
        DPORT,
        TCP_SYN | TCP_ACK,
        ISN + 2,
    ));
    bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::SynAckMismatch, 1)]);
    bpf.ingress(&answer6(
        LOCAL6,
        SPORT,
        REMOTE6,
        DPORT,
        TCP_SYN | TCP_ACK,
        ISN + 1,
    ));
    let ev = bpf.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, EventKind::Answered);
    assert_eq!(ev[0].raw.key, key);
    assert_eq!(ev[0].raw.pending, pending);
    assert_eq!(bpf.pending_all(), vec![]);
    bpf.assert_counters(&[
        (Counter::SynSeen, 1),
        (Counter::SynAckMismatch, 1),
        (Counter::SynAckMatched, 1),
    ]);
}

// ---- 3. RSTs and ICMP errors -------------------------------------------------------------------

#[test]
fn ingress_rst_ack_acknowledging_syn_refuses() {
    let mut bpf = with_pending_v4(SPORT, ISN);
    let key = key4(LOCAL4, SPORT, REMOTE4, DPORT);
    let pending = bpf.pending(&key).unwrap();

    // A RST acknowledging something else is ignored, and is no SYN-ACK mismatch.
    bpf.ingress(&answer4(
        LOCAL4,
        SPORT,
        REMOTE4,
        DPORT,
        TCP_RST | TCP_ACK,
        ISN,
    ));
    assert!(bpf.pending(&key).is_some());
    assert_eq!(bpf.events(), vec![]);
    bpf.assert_counters(&[(Counter::SynSeen, 1)]);

    bpf.ingress(&answer4(
        LOCAL4,
        SPORT,
        REMOTE4,
        DPORT,
        TCP_RST | TCP_ACK,
        ISN + 1,
    ));
    assert_eq!(bpf.pending(&key), None);
    let ev = bpf.events();
    assert_eq!(ev.len(), 1, "events: {ev:?}");
    assert_eq!(ev[0].kind, EventKind::Refused);
    assert_eq!(ev[0].raw.key, key);
    assert_eq!(ev[0].raw.pending, pending);
    assert_eq!((ev[0].raw.icmp_type, ev[0].raw.icmp_code), (0, 0));
    bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::RstMatched, 1)]);
}

#[test]
fn ingress_rst_without_ack_is_ignored() {
    let mut bpf = with_pending_v4(SPORT, ISN);
    bpf.ingress(&answer4(LOCAL4, SPORT, REMOTE4, DPORT, TCP_RST, ISN + 1));
    assert_eq!(bpf.pending_all().len(), 1);
    assert_eq!(bpf.events(), vec![]);
    bpf.assert_counters(&[(Counter::SynSeen, 1)]);
}

#[test]
fn ingress_ipv6_rst_ack_refuses() {
    let mut bpf = with_pending_v6(SPORT, ISN);
    bpf.ingress(&answer6(
        LOCAL6,
        SPORT,
        REMOTE6,
        DPORT,
        TCP_RST | TCP_ACK,
        ISN + 1,
    ));
    let ev = bpf.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, EventKind::Refused);
    assert_eq!(ev[0].raw.key, key6(LOCAL6, SPORT, REMOTE6, DPORT));
    assert_eq!(bpf.pending_all(), vec![]);
    bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::RstMatched, 1)]);
}

#[test]
fn ingress_icmp_port_unreachable_quoting_syn() {
    let mut bpf = with_pending_v4(SPORT, ISN);
    let key = key4(LOCAL4, SPORT, REMOTE4, DPORT);
    let pending = bpf.pending(&key).unwrap();

    // Quoting another sequence number: not this SYN.
    bpf.ingress(&icmp4_error(
        ROUTER4,
        LOCAL4,
        SPORT,
        REMOTE4,
        DPORT,
        ISN + 1,
        3,
        3,
    ));
    assert!(bpf.pending(&key).is_some());
    assert_eq!(bpf.events(), vec![]);
    bpf.assert_counters(&[(Counter::SynSeen, 1)]);

    bpf.ingress(&icmp4_error(
        ROUTER4, LOCAL4, SPORT, REMOTE4, DPORT, ISN, 3, 3,
    ));
    assert_eq!(bpf.pending(&key), None);
    let ev = bpf.events();
    assert_eq!(ev.len(), 1, "events: {ev:?}");
    assert_eq!(ev[0].kind, EventKind::Unreachable);
    assert_eq!(ev[0].raw.key, key);
    assert_eq!(ev[0].raw.pending, pending);
    assert_eq!((ev[0].raw.icmp_type, ev[0].raw.icmp_code), (3, 3));
    bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::IcmpMatched, 1)]);
}

#[test]
fn ingress_icmp_host_unreachable_carries_its_code() {
    let mut bpf = with_pending_v4(SPORT, ISN);
    bpf.ingress(&icmp4_error(
        ROUTER4, LOCAL4, SPORT, REMOTE4, DPORT, ISN, 3, 1,
    ));
    let ev = bpf.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, EventKind::Unreachable);
    assert_eq!((ev[0].raw.icmp_type, ev[0].raw.icmp_code), (3, 1));
}

#[test]
fn ingress_icmp_quoting_ipv4_with_options() {
    let mut bpf = with_pending_v4(SPORT, ISN);
    let quoted_tcp = Tcp::syn(SPORT, DPORT, ISN).build();
    let quoted = Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP)
        .with_option_bytes(8)
        .build(&quoted_tcp[..8]);
    assert_eq!(quoted[0] & 0x0f, 7);
    let msg = icmp(3, 13, [0; 4], &quoted);
    let pkt = ethernet(
        &[],
        ETH_P_IP,
        &Ipv4::new(ROUTER4, LOCAL4, IPPROTO_ICMP).build(&msg),
    );
    bpf.ingress(&pkt);
    let ev = bpf.events();
    assert_eq!(ev.len(), 1, "events: {ev:?}");
    assert_eq!(ev[0].kind, EventKind::Unreachable);
    assert_eq!((ev[0].raw.icmp_type, ev[0].raw.icmp_code), (3, 13));
    assert_eq!(bpf.pending_all(), vec![]);
}

#[test]
fn ingress_icmp_with_outer_ip_options_matches() {
    let mut bpf = with_pending_v4(SPORT, ISN);
    let quoted_tcp = Tcp::syn(SPORT, DPORT, ISN).build();
    let quoted = Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).build(&quoted_tcp[..8]);
    let msg = icmp(3, 10, [0; 4], &quoted);
    let outer = Ipv4::new(ROUTER4, LOCAL4, IPPROTO_ICMP).with_option_bytes(16);
    bpf.ingress(&ethernet(
        &[VlanTag::dot1q(3)],
        ETH_P_IP,
        &outer.build(&msg),
    ));
    let ev = bpf.events();
    assert_eq!(ev.len(), 1, "events: {ev:?}");
    assert_eq!(ev[0].kind, EventKind::Unreachable);
    assert_eq!((ev[0].raw.icmp_type, ev[0].raw.icmp_code), (3, 10));
    bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::IcmpMatched, 1)]);
}

#[test]
fn ingress_icmp_quoting_a_malformed_ipv4_header_is_malformed() {
    let mut bpf = with_pending_v4(SPORT, ISN);
    let quoted_tcp = Tcp::syn(SPORT, DPORT, ISN).build();
    let quoted = Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP)
        .with_ihl(4)
        .build(&quoted_tcp[..8]);
    let msg = icmp(3, 3, [0; 4], &quoted);
    bpf.ingress(&ethernet(
        &[],
        ETH_P_IP,
        &Ipv4::new(ROUTER4, LOCAL4, IPPROTO_ICMP).build(&msg),
    ));
    assert_eq!(bpf.pending_all().len(), 1);
    assert_eq!(bpf.events(), vec![]);
    bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::Malformed, 1)]);
}

#[test]
fn ingress_icmp_other_types_are_ignored() {
    let mut bpf = with_pending_v4(SPORT, ISN);
    // Source quench (4), redirect (5), echo reply (0) quoting the SYN, and fragmentation
    // needed (3/4), which asks for a smaller packet and does not end the attempt.
    for (t, c) in [(4u8, 0u8), (5, 0), (0, 0), (3, 4)] {
        bpf.ingress(&icmp4_error(
            ROUTER4, LOCAL4, SPORT, REMOTE4, DPORT, ISN, t, c,
        ));
    }
    // A destination unreachable quoting UDP, not TCP.
    let quoted = Ipv4::new(LOCAL4, REMOTE4, IPPROTO_UDP).build(&udp(SPORT, DPORT, &[])[..8]);
    let msg = icmp(3, 3, [0; 4], &quoted);
    bpf.ingress(&ethernet(
        &[],
        ETH_P_IP,
        &Ipv4::new(ROUTER4, LOCAL4, IPPROTO_ICMP).build(&msg),
    ));
    assert_eq!(bpf.pending_all().len(), 1);
    assert_eq!(bpf.events(), vec![]);
    bpf.assert_counters(&[(Counter::SynSeen, 1)]);
}

#[test]
fn ingress_icmp_time_exceeded_and_parameter_problem_end_the_attempt() {
    for (v6, t, c) in [
        (false, 11u8, 0u8),
        (false, 11, 1),
        (false, 12, 0),
        (true, 3, 0),
        (true, 4, 1),
    ] {
        let mut bpf = if v6 {
            with_pending_v6(SPORT, ISN)
        } else {
            with_pending_v4(SPORT, ISN)
        };
        let (key, pending) = bpf.pending_all()[0];
        let pkt = if v6 {
            icmp6_error(ROUTER6, LOCAL6, SPORT, REMOTE6, DPORT, ISN, t, c)
        } else {
            icmp4_error(ROUTER4, LOCAL4, SPORT, REMOTE4, DPORT, ISN, t, c)
        };
        bpf.ingress(&pkt);
        let ev = bpf.events();
        assert_eq!(ev.len(), 1, "type {t} code {c}: events {ev:?}");
        assert_eq!(ev[0].kind, EventKind::Unreachable);
        assert_eq!(ev[0].raw.key, key);
        assert_eq!(ev[0].raw.pending, pending);
        assert_eq!((ev[0].raw.icmp_type, ev[0].raw.icmp_code), (t, c));
        assert_eq!(bpf.pending_all(), vec![]);
        bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::IcmpMatched, 1)]);
    }
}

#[test]
fn ingress_icmp6_unreachable_quoting_ipv6_syn() {
    let mut bpf = with_pending_v6(SPORT, ISN);
    let key = key6(LOCAL6, SPORT, REMOTE6, DPORT);
    let pending = bpf.pending(&key).unwrap();

    bpf.ingress(&icmp6_error(
        ROUTER6,
        LOCAL6,
        SPORT,
        REMOTE6,
        DPORT,
        ISN + 1,
        1,
        4,
    ));
    assert!(bpf.pending(&key).is_some(), "wrong quoted sequence number");
    // ICMPv6 packet too big (2) asks for a smaller packet; echo reply (129) is no error.
    bpf.ingress(&icmp6_error(
        ROUTER6, LOCAL6, SPORT, REMOTE6, DPORT, ISN, 2, 0,
    ));
    bpf.ingress(&icmp6_error(
        ROUTER6, LOCAL6, SPORT, REMOTE6, DPORT, ISN, 129, 0,
    ));
    assert!(bpf.pending(&key).is_some());
    assert_eq!(bpf.events(), vec![]);

    bpf.ingress(&icmp6_error(
        ROUTER6, LOCAL6, SPORT, REMOTE6, DPORT, ISN, 1, 4,
    ));
    assert_eq!(bpf.pending(&key), None);
    let ev = bpf.events();
    assert_eq!(ev.len(), 1, "events: {ev:?}");
    assert_eq!(ev[0].kind, EventKind::Unreachable);
    assert_eq!(ev[0].raw.key, key);
    assert_eq!(ev[0].raw.pending, pending);
    assert_eq!((ev[0].raw.icmp_type, ev[0].raw.icmp_code), (1, 4));
    bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::IcmpMatched, 1)]);
}

#[test]
fn egress_icmp_errors_are_ignored() {
    let mut bpf = with_pending_v4(SPORT, ISN);
    bpf.egress(&icmp4_error(
        ROUTER4, LOCAL4, SPORT, REMOTE4, DPORT, ISN, 3, 3,
    ));
    let mut bpf6 = with_pending_v6(SPORT, ISN);
    bpf6.egress(&icmp6_error(
        ROUTER6, LOCAL6, SPORT, REMOTE6, DPORT, ISN, 1, 4,
    ));
    for b in [&mut bpf, &mut bpf6] {
        assert_eq!(b.pending_all().len(), 1);
        assert_eq!(b.events(), vec![]);
        b.assert_counters(&[(Counter::SynSeen, 1)]);
    }
}

// ---- 4. IPv6 extension headers -----------------------------------------------------------------

#[test]
fn ipv6_syn_through_extension_headers_is_tracked() {
    let key = key6(LOCAL6, SPORT, REMOTE6, DPORT);
    let chains: &[&[Ext]] = &[
        &[
            Ext::HopByHop { len8: 0 },
            Ext::DestOpts { len8: 1 },
            Ext::Routing { len8: 2 },
        ],
        &[Ext::HopByHop { len8: 3 }],
        &[Ext::Routing { len8: 0 }, Ext::DestOpts { len8: 0 }],
        &[Ext::Auth { len4: 4 }],
        &[
            Ext::HopByHop { len8: 0 },
            Ext::Auth { len4: 2 },
            Ext::DestOpts { len8: 0 },
        ],
        &[
            Ext::HopByHop { len8: 0 },
            Ext::DestOpts { len8: 0 },
            Ext::Routing { len8: 0 },
            Ext::Fragment {
                offset: 0,
                more: false,
            },
            Ext::Auth { len4: 4 },
            Ext::DestOpts { len8: 0 },
        ],
    ];
    for chain in chains {
        let pkt = tcp6(
            &[],
            &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP).with_exts(chain),
            &Tcp::syn(SPORT, DPORT, ISN),
        );
        assert_tracked(&pkt, key, ISN);
    }
}

#[test]
fn ipv6_chain_at_the_walk_bound_is_tracked() {
    let n = MAX_IPV6_EXT_HEADERS as usize;
    let chain: Vec<Ext> = (0..n)
        .map(|i| match i % 3 {
            0 => Ext::DestOpts { len8: 0 },
            1 => Ext::Routing { len8: 0 },
            _ => Ext::HopByHop { len8: 0 },
        })
        .collect();
    let pkt = tcp6(
        &[],
        &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP).with_exts(&chain),
        &Tcp::syn(SPORT, DPORT, ISN),
    );
    assert_tracked(&pkt, key6(LOCAL6, SPORT, REMOTE6, DPORT), ISN);
}

#[test]
fn ipv6_chain_longer_than_the_walk_bound_is_not_tracked() {
    let mut bpf = Bpf::load();
    for extra in 1..=3 {
        let n = MAX_IPV6_EXT_HEADERS as usize + extra;
        let chain = vec![Ext::DestOpts { len8: 0 }; n];
        let pkt = tcp6(
            &[],
            &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP).with_exts(&chain),
            &Tcp::syn(SPORT, DPORT, ISN),
        );
        bpf.egress(&pkt);
        bpf.assert_untouched();
        bpf.assert_counters(&[(Counter::Ipv6ChainTooLong, extra as u64)]);
    }
    assert_eq!(bpf.syn_ports(), vec![]);
}

#[test]
fn ipv6_non_first_fragment_is_skipped() {
    let mut bpf = Bpf::load();
    for (i, (offset, more)) in [(1u16, true), (185, false), (0x1fff, false)]
        .into_iter()
        .enumerate()
    {
        let pkt = tcp6(
            &[],
            &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP)
                .with_exts(&[Ext::HopByHop { len8: 0 }, Ext::Fragment { offset, more }]),
            &Tcp::syn(SPORT, DPORT, ISN),
        );
        bpf.egress(&pkt);
        bpf.assert_untouched();
        bpf.assert_counters(&[(Counter::Fragment, i as u64 + 1)]);
    }
}

#[test]
fn ipv6_first_fragment_is_tracked() {
    let pkt = tcp6(
        &[],
        &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP).with_exts(&[Ext::Fragment {
            offset: 0,
            more: true,
        }]),
        &Tcp::syn(SPORT, DPORT, ISN),
    );
    assert_tracked(&pkt, key6(LOCAL6, SPORT, REMOTE6, DPORT), ISN);
}

#[test]
fn ipv6_synack_through_extension_headers_answers() {
    let mut bpf = with_pending_v6(SPORT, ISN);
    let tcp = Tcp::new(DPORT, SPORT, TCP_SYN | TCP_ACK).ack(ISN + 1);
    let pkt = tcp6(
        &[],
        &Ipv6::new(REMOTE6, LOCAL6, IPPROTO_TCP)
            .with_exts(&[Ext::HopByHop { len8: 0 }, Ext::DestOpts { len8: 1 }]),
        &tcp,
    );
    bpf.ingress(&pkt);
    let ev = bpf.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, EventKind::Answered);
    assert_eq!(bpf.pending_all(), vec![]);
}

#[test]
fn ipv6_no_next_header_and_bad_version() {
    let mut bpf = Bpf::load();
    // Next header 59: nothing follows.
    let pkt = ethernet(
        &[],
        ETH_P_IPV6,
        &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_NONE)
            .with_exts(&[Ext::DestOpts { len8: 0 }])
            .build(&Tcp::syn(SPORT, DPORT, ISN).build()),
    );
    bpf.egress(&pkt);
    bpf.assert_untouched();
    bpf.assert_counters(&[]);

    // Ethertype IPv6 but version 4 in the header.
    let mut ip = Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP);
    ip.version = 4;
    bpf.egress(&tcp6(&[], &ip, &Tcp::syn(SPORT, DPORT, ISN)));
    bpf.assert_untouched();
    bpf.assert_counters(&[(Counter::Malformed, 1)]);
}

// ---- 5. VLAN tags ------------------------------------------------------------------------------

#[test]
fn vlan_tagged_syn_is_tracked() {
    let pkt = tcp4(
        &[VlanTag::dot1q(100)],
        &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP),
        &Tcp::syn(SPORT, DPORT, ISN),
    );
    assert_eq!(&pkt[12..14], &[0x81, 0x00]);
    assert_tracked(&pkt, key4(LOCAL4, SPORT, REMOTE4, DPORT), ISN);

    let pkt6 = tcp6(
        &[VlanTag::dot1q(4094)],
        &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP),
        &Tcp::syn(SPORT, DPORT, ISN),
    );
    assert_tracked(&pkt6, key6(LOCAL6, SPORT, REMOTE6, DPORT), ISN);
}

#[test]
fn qinq_tagged_syn_is_tracked() {
    let tags = [VlanTag::dot1ad(200), VlanTag::dot1q(100)];
    let pkt = tcp4(
        &tags,
        &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP),
        &Tcp::syn(SPORT, DPORT, ISN),
    );
    assert_eq!(&pkt[12..14], &[0x88, 0xa8]);
    assert_eq!(&pkt[16..18], &[0x81, 0x00]);
    assert_tracked(&pkt, key4(LOCAL4, SPORT, REMOTE4, DPORT), ISN);

    let pkt6 = tcp6(
        &tags,
        &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP),
        &Tcp::syn(SPORT, DPORT, ISN),
    );
    assert_tracked(&pkt6, key6(LOCAL6, SPORT, REMOTE6, DPORT), ISN);

    // Two 802.1Q tags (old-style QinQ) as well.
    let pkt = tcp4(
        &[VlanTag::dot1q(7), VlanTag::dot1q(8)],
        &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP),
        &Tcp::syn(SPORT, DPORT, ISN),
    );
    assert_tracked(&pkt, key4(LOCAL4, SPORT, REMOTE4, DPORT), ISN);
}

#[test]
fn vlan_tagged_answers_resolve() {
    let mut bpf = with_pending_v4(SPORT, ISN);
    let tcp = Tcp::new(DPORT, SPORT, TCP_SYN | TCP_ACK).ack(ISN + 1);
    bpf.ingress(&tcp4(
        &[VlanTag::dot1ad(200), VlanTag::dot1q(100)],
        &Ipv4::new(REMOTE4, LOCAL4, IPPROTO_TCP),
        &tcp,
    ));
    let ev = bpf.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, EventKind::Answered);
    assert_eq!(bpf.pending_all(), vec![]);
}

#[test]
fn three_vlan_tags_are_beyond_the_parser() {
    let mut bpf = Bpf::load();
    let pkt = tcp4(
        &[VlanTag::dot1ad(1), VlanTag::dot1q(2), VlanTag::dot1q(3)],
        &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP),
        &Tcp::syn(SPORT, DPORT, ISN),
    );
    bpf.egress(&pkt);
    bpf.assert_untouched();
    bpf.assert_counters(&[]);
}

// ---- 6. IPv4 header fields ---------------------------------------------------------------------

#[test]
fn ipv4_with_options_is_tracked_for_every_ihl() {
    for ihl in 6u8..=15 {
        let opt_len = (usize::from(ihl) - 5) * 4;
        let ip = Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).with_option_bytes(opt_len);
        let sport = SPORT + u16::from(ihl);
        let pkt = tcp4(&[], &ip, &Tcp::syn(sport, DPORT, ISN + u32::from(ihl)));
        assert_eq!(pkt[14] & 0x0f, ihl);
        assert_tracked(
            &pkt,
            key4(LOCAL4, sport, REMOTE4, DPORT),
            ISN + u32::from(ihl),
        );
    }
}

#[test]
fn ipv4_non_first_fragment_is_skipped() {
    let mut bpf = Bpf::load();
    let cases = [1u16, IP_MF | 1, IP_MF | 185, 0x1fff, IP_DF | 8];
    for (i, ff) in cases.into_iter().enumerate() {
        let ip = Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).with_flags_frag(ff);
        bpf.egress(&tcp4(&[], &ip, &Tcp::syn(SPORT, DPORT, ISN)));
        bpf.assert_untouched();
        bpf.assert_counters(&[(Counter::Fragment, i as u64 + 1)]);
    }
    // An answer in a non-first fragment is skipped too.
    let mut bpf = with_pending_v4(SPORT, ISN);
    let tcp = Tcp::new(DPORT, SPORT, TCP_SYN | TCP_ACK).ack(ISN + 1);
    bpf.ingress(&tcp4(
        &[],
        &Ipv4::new(REMOTE4, LOCAL4, IPPROTO_TCP).with_flags_frag(IP_MF | 3),
        &tcp,
    ));
    assert_eq!(bpf.pending_all().len(), 1);
    assert_eq!(bpf.events(), vec![]);
    bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::Fragment, 1)]);
}

#[test]
fn ipv4_first_fragment_and_df_are_tracked() {
    for ff in [0u16, IP_DF, IP_MF] {
        let ip = Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).with_flags_frag(ff);
        assert_tracked(
            &tcp4(&[], &ip, &Tcp::syn(SPORT, DPORT, ISN)),
            key4(LOCAL4, SPORT, REMOTE4, DPORT),
            ISN,
        );
    }
}

#[test]
fn ipv4_ihl_below_five_is_malformed() {
    let mut bpf = Bpf::load();
    for ihl in 0u8..5 {
        let ip = Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).with_ihl(ihl);
        bpf.egress(&tcp4(&[], &ip, &Tcp::syn(SPORT, DPORT, ISN)));
        bpf.assert_untouched();
        bpf.assert_counters(&[(Counter::Malformed, u64::from(ihl) + 1)]);
    }
    // Ethertype IPv4, version 6 in the header.
    let ip = Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).with_version(6);
    bpf.egress(&tcp4(&[], &ip, &Tcp::syn(SPORT, DPORT, ISN)));
    bpf.assert_untouched();
    bpf.assert_counters(&[(Counter::Malformed, 6)]);
}

#[test]
fn tcp_data_offset_below_five_is_malformed() {
    let mut bpf = Bpf::load();
    for doff in 0u8..5 {
        let tcp = Tcp::syn(SPORT, DPORT, ISN).with_data_offset(doff);
        bpf.egress(&tcp4(&[], &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP), &tcp));
        bpf.assert_untouched();
        bpf.assert_counters(&[(Counter::Malformed, u64::from(doff) + 1)]);
    }
    // On ingress too: a SYN-ACK with a bad data offset resolves nothing.
    let mut bpf = with_pending_v4(SPORT, ISN);
    let tcp = Tcp::new(DPORT, SPORT, TCP_SYN | TCP_ACK)
        .ack(ISN + 1)
        .with_data_offset(4);
    bpf.ingress(&tcp4(&[], &Ipv4::new(REMOTE4, LOCAL4, IPPROTO_TCP), &tcp));
    assert_eq!(bpf.pending_all().len(), 1);
    assert_eq!(bpf.events(), vec![]);
    bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::Malformed, 1)]);
}

// ---- 7. Truncation -----------------------------------------------------------------------------

const EINVAL: i32 = 22;

/// The shortest untagged frame `BPF_PROG_TEST_RUN` may accept: recent kernels refuse (EINVAL)
/// a frame whose ethertype is IPv4 or IPv6 but which cannot hold the IP header, so the
/// program never sees those prefixes. Tagged frames (ethertype 802.1Q/802.1ad) are not
/// checked by the kernel, which is how the parser's own IP-header truncation paths are reached.
fn kernel_min_len(frame: &[u8]) -> usize {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        ETH_P_IP => 14 + 20,
        ETH_P_IPV6 => 14 + 40,
        _ => 14,
    }
}

/// Feeds every prefix of `full` from 14 bytes to `full.len() - 1` and checks each one the
/// kernel runs is counted as truncated exactly once, changes nothing else and emits nothing;
/// then runs `full` itself. Returns how many prefixes the program actually ran on.
fn assert_every_prefix_truncated(bpf: &mut Bpf, full: &[u8], egress: bool) -> usize {
    let base = bpf.counters();
    let base_truncated = bpf.counter(Counter::Truncated);
    let pending = bpf.pending_all();
    let min = kernel_min_len(full);
    let mut ran = 0;
    for len in 14..full.len() {
        let prefix = &full[..len];
        match bpf.try_direction(egress, prefix) {
            Ok(()) => ran += 1,
            Err(EINVAL) if len < min => continue,
            Err(e) => panic!(
                "BPF_PROG_TEST_RUN refused the {len}-byte prefix: {}",
                std::io::Error::from_raw_os_error(e)
            ),
        }
        assert_eq!(
            bpf.pending_all(),
            pending,
            "the {len}-byte prefix changed the pending map"
        );
        assert_eq!(
            bpf.events(),
            vec![],
            "the {len}-byte prefix emitted an event"
        );
        assert_eq!(
            bpf.counter(Counter::Truncated) - base_truncated,
            ran as u64,
            "the {len}-byte prefix was not counted as truncated exactly once"
        );
        let others: Vec<_> = bpf
            .counters()
            .into_iter()
            .zip(&base)
            .filter(|((name, _), _)| *name != "truncated")
            .map(|((name, now), (_, before))| (name, now - before))
            .filter(|(_, d)| *d != 0)
            .collect();
        assert_eq!(others, vec![], "the {len}-byte prefix moved other counters");
    }
    assert!(
        ran >= full.len() - min,
        "only {ran} prefixes of {} bytes ran",
        full.len()
    );
    // The whole packet still goes through.
    if egress {
        bpf.egress(full);
    } else {
        bpf.ingress(full);
    }
    ran
}

/// A SYN without TCP options: every byte of it is a byte the parser needs.
fn bare_syn() -> Tcp {
    Tcp::syn(SPORT, DPORT, ISN).without_options()
}

#[test]
fn truncated_ipv4_syn_at_every_length() {
    let mut bpf = Bpf::load();
    let full = tcp4(&[], &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP), &bare_syn());
    assert_eq!(full.len(), 54);
    assert_every_prefix_truncated(&mut bpf, &full, true);
    assert_eq!(bpf.pending_all().len(), 1, "the full SYN is tracked");
    assert_eq!(bpf.syn_ports(), vec![(SPORT, 1)]);
    bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::Truncated, 20)]);
}

#[test]
fn truncated_ipv4_syn_with_options_at_every_length() {
    let mut bpf = Bpf::load();
    let full = tcp4(
        &[],
        &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).with_option_bytes(40),
        &bare_syn(),
    );
    assert_every_prefix_truncated(&mut bpf, &full, true);
    assert_eq!(bpf.pending_all().len(), 1);
}

#[test]
fn truncated_ipv6_syn_at_every_length() {
    let mut bpf = Bpf::load();
    let full = tcp6(&[], &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP), &bare_syn());
    assert_every_prefix_truncated(&mut bpf, &full, true);
    assert_eq!(bpf.pending_all().len(), 1);
    bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::Truncated, 20)]);
}

#[test]
fn truncated_ipv6_syn_with_extension_headers_at_every_length() {
    let mut bpf = Bpf::load();
    let full = tcp6(
        &[],
        &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP).with_exts(&[
            Ext::HopByHop { len8: 1 },
            Ext::Fragment {
                offset: 0,
                more: true,
            },
            Ext::Auth { len4: 4 },
            Ext::DestOpts { len8: 0 },
        ]),
        &bare_syn(),
    );
    assert_every_prefix_truncated(&mut bpf, &full, true);
    assert_eq!(bpf.pending_all().len(), 1);
}

#[test]
fn truncated_vlan_syn_at_every_length() {
    // Tagged frames reach the program at every length, so these also cover truncation inside
    // the VLAN tag and inside the IPv4 / IPv6 header.
    let mut bpf = Bpf::load();
    let full = tcp4(
        &[VlanTag::dot1q(100)],
        &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP),
        &bare_syn(),
    );
    let ran = assert_every_prefix_truncated(&mut bpf, &full, true);
    assert_eq!(ran, full.len() - 14);
    assert_eq!(bpf.pending_all().len(), 1);
    bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::Truncated, 44)]);

    let mut bpf = Bpf::load();
    let full = tcp6(
        &[VlanTag::dot1ad(200), VlanTag::dot1q(100)],
        &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP)
            .with_exts(&[Ext::HopByHop { len8: 0 }, Ext::Routing { len8: 1 }]),
        &bare_syn(),
    );
    let ran = assert_every_prefix_truncated(&mut bpf, &full, true);
    assert_eq!(ran, full.len() - 14);
    assert_eq!(bpf.pending_all().len(), 1);

    let mut bpf = Bpf::load();
    let full = tcp4(
        &[VlanTag::dot1q(100)],
        &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).with_option_bytes(12),
        &bare_syn(),
    );
    let ran = assert_every_prefix_truncated(&mut bpf, &full, true);
    assert_eq!(ran, full.len() - 14);
    assert_eq!(bpf.pending_all().len(), 1);
}

#[test]
fn truncated_linux_style_syn_at_every_length() {
    // A SYN as Linux sends it (20 bytes of options): every prefix that cuts the IP header, the
    // base TCP header or its options is truncated; only the whole SYN is tracked.
    for tags in [&[][..], &[VlanTag::dot1q(5)][..]] {
        let mut bpf = Bpf::load();
        let full = tcp4(
            tags,
            &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP),
            &Tcp::syn(SPORT, DPORT, ISN),
        );
        assert_every_prefix_truncated(&mut bpf, &full, true);
        assert_eq!(bpf.pending_all().len(), 1);
    }
}

#[test]
fn tcp_header_cut_inside_its_options_is_truncated() {
    // The whole TCP header, options included, must be present: a segment cut inside its
    // options is neither a SYN nor an answer (the receiving stack would drop it).
    let mut bpf = Bpf::load();
    let full = syn4(LOCAL4, SPORT, REMOTE4, DPORT, ISN);
    bpf.egress(&full[..full.len() - 1]);
    assert!(bpf.pending_all().is_empty());
    bpf.assert_counters(&[(Counter::Truncated, 1)]);

    bpf.egress(&full);
    assert_eq!(bpf.pending_all().len(), 1);
    let mut synack = Tcp::new(DPORT, SPORT, TCP_SYN | TCP_ACK).ack(ISN + 1);
    synack.options = vec![2, 4, 0x05, 0xb4, 1, 1, 1, 1];
    let answer = tcp4(&[], &Ipv4::new(REMOTE4, LOCAL4, IPPROTO_TCP), &synack);
    bpf.ingress(&answer[..answer.len() - 4]);
    assert_eq!(
        bpf.pending_all().len(),
        1,
        "a cut SYN-ACK must not resolve the SYN"
    );
    bpf.ingress(&answer);
    let ev = bpf.events();
    assert_eq!(
        ev.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [EventKind::Syn, EventKind::Answered]
    );
    bpf.assert_counters(&[
        (Counter::Truncated, 2),
        (Counter::SynSeen, 1),
        (Counter::SynAckMatched, 1),
    ]);
}

#[test]
fn truncated_answers_at_every_length() {
    let bare_answer4 = |flags: u8| {
        tcp4(
            &[],
            &Ipv4::new(REMOTE4, LOCAL4, IPPROTO_TCP),
            &Tcp::new(DPORT, SPORT, flags).ack(ISN + 1),
        )
    };
    let cases: Vec<(Bpf, Vec<u8>)> = vec![
        (with_pending_v4(SPORT, ISN), bare_answer4(TCP_SYN | TCP_ACK)),
        (with_pending_v4(SPORT, ISN), bare_answer4(TCP_RST | TCP_ACK)),
        (
            with_pending_v4(SPORT, ISN),
            tcp4(
                &[VlanTag::dot1q(9)],
                &Ipv4::new(REMOTE4, LOCAL4, IPPROTO_TCP),
                &Tcp::new(DPORT, SPORT, TCP_SYN | TCP_ACK).ack(ISN + 1),
            ),
        ),
        (
            with_pending_v4(SPORT, ISN),
            icmp4_error(ROUTER4, LOCAL4, SPORT, REMOTE4, DPORT, ISN, 3, 3),
        ),
        (
            with_pending_v6(SPORT, ISN),
            answer6(LOCAL6, SPORT, REMOTE6, DPORT, TCP_SYN | TCP_ACK, ISN + 1),
        ),
        (
            with_pending_v6(SPORT, ISN),
            icmp6_error(ROUTER6, LOCAL6, SPORT, REMOTE6, DPORT, ISN, 1, 4),
        ),
    ];
    for (mut bpf, full) in cases {
        // The ICMPv6 error quotes the whole SYN; the parser needs only 40 + 8 bytes of it, so
        // longer prefixes are complete answers, not truncated ones.
        let needed = if full[12..14] == ETH_P_IPV6.to_be_bytes() && full[14 + 6] == IPPROTO_ICMPV6 {
            14 + 40 + 8 + 40 + 8
        } else {
            full.len()
        };
        assert_every_prefix_truncated(&mut bpf, &full[..needed], false);
        assert_eq!(
            bpf.pending_all(),
            vec![],
            "the full answer resolves the SYN"
        );
        assert_eq!(bpf.events().len(), 1);
    }
}

// ---- 8. What is not a connection attempt -------------------------------------------------------

#[test]
fn non_tcp_packets_are_ignored() {
    let mut packets = vec![
        ethernet(
            &[],
            ETH_P_IP,
            &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_UDP).build(&udp(SPORT, 53, b"query")),
        ),
        ethernet(
            &[],
            ETH_P_IPV6,
            &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_UDP).build(&udp(SPORT, 53, b"query")),
        ),
        // ICMP echo request and reply.
        ethernet(
            &[],
            ETH_P_IP,
            &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_ICMP).build(&icmp(8, 0, [0, 1, 0, 1], b"ping")),
        ),
        ethernet(
            &[],
            ETH_P_IP,
            &Ipv4::new(REMOTE4, LOCAL4, IPPROTO_ICMP).build(&icmp(0, 0, [0, 1, 0, 1], b"ping")),
        ),
        // ICMPv6 echo request and reply.
        ethernet(
            &[],
            ETH_P_IPV6,
            &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_ICMPV6).build(&icmp(128, 0, [0, 1, 0, 1], b"ping")),
        ),
        ethernet(
            &[],
            ETH_P_IPV6,
            &Ipv6::new(REMOTE6, LOCAL6, IPPROTO_ICMPV6).build(&icmp(129, 0, [0, 1, 0, 1], b"ping")),
        ),
        arp_request(LOCAL4, REMOTE4),
        // An unknown ethertype, a bare 14-byte Ethernet header, and a tagged frame announcing
        // IPv4 but ending after the tag (the kernel refuses an untagged IPv4 frame that short).
        ethernet(&[], 0x88cc, &[0; 46]),
        ethernet(&[], ETH_P_ARP, &[]),
        ethernet(&[VlanTag::dot1q(1)], ETH_P_IP, &[]),
    ];
    // A UDP datagram whose first bytes would look like a SYN if read as TCP.
    let fake = Tcp::syn(SPORT, DPORT, ISN).build();
    packets.push(ethernet(
        &[],
        ETH_P_IP,
        &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_UDP).build(&fake),
    ));
    let mut bpf = Bpf::load();
    for (i, p) in packets.iter().enumerate() {
        bpf.egress(p);
        bpf.ingress(p);
        bpf.assert_untouched();
        // The tagged frame ending after its tag is the only truncated one.
        let truncated = if i >= packets.len() - 2 { 2 } else { 0 };
        bpf.assert_counters(&[(Counter::Truncated, truncated)]);
    }
    assert_eq!(bpf.syn_ports(), vec![]);
}

#[test]
fn egress_segments_other_than_syn_are_not_tracked() {
    let mut bpf = Bpf::load();
    for flags in [
        TCP_SYN | TCP_ACK,
        TCP_ACK,
        TCP_ACK | TCP_PSH,
        TCP_RST,
        TCP_RST | TCP_ACK,
        TCP_FIN | TCP_ACK,
        TCP_SYN | TCP_FIN,
        TCP_SYN | TCP_RST,
        TCP_SYN | TCP_ACK | TCP_ECE,
        0,
    ] {
        let tcp = Tcp::new(SPORT, DPORT, flags).seq(ISN).ack(ISN);
        bpf.egress(&tcp4(&[], &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP), &tcp));
        bpf.egress(&tcp6(&[], &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP), &tcp));
        bpf.assert_untouched();
    }
    bpf.assert_counters(&[]);
    assert_eq!(bpf.syn_ports(), vec![]);
}

#[test]
fn ingress_syn_is_not_tracked_nor_an_answer() {
    let mut bpf = Bpf::load();
    bpf.ingress(&syn4(REMOTE4, DPORT, LOCAL4, SPORT, ISN));
    bpf.ingress(&syn6(REMOTE6, DPORT, LOCAL6, SPORT, ISN));
    bpf.assert_untouched();
    bpf.assert_counters(&[]);

    // A simultaneous-open SYN for a pending attempt leaves it pending.
    let mut bpf = with_pending_v4(SPORT, ISN);
    let tcp = Tcp::syn(DPORT, SPORT, 77).ack(ISN + 1);
    bpf.ingress(&tcp4(&[], &Ipv4::new(REMOTE4, LOCAL4, IPPROTO_TCP), &tcp));
    bpf.ingress(&syn4(LOCAL4, SPORT, REMOTE4, DPORT, ISN));
    assert_eq!(bpf.pending_all().len(), 1);
    assert_eq!(bpf.events(), vec![]);
    bpf.assert_counters(&[(Counter::SynSeen, 1)]);
    assert_eq!(bpf.syn_port(SPORT), 1);
}

#[test]
fn ingress_plain_ack_and_fin_resolve_nothing() {
    let mut bpf = with_pending_v4(SPORT, ISN);
    for flags in [TCP_ACK, TCP_ACK | TCP_PSH, TCP_FIN | TCP_ACK] {
        bpf.ingress(&answer4(LOCAL4, SPORT, REMOTE4, DPORT, flags, ISN + 1));
    }
    assert_eq!(bpf.pending_all().len(), 1);
    assert_eq!(bpf.events(), vec![]);
    bpf.assert_counters(&[(Counter::SynSeen, 1)]);
}

// ---- The kernel destination filter -------------------------------------------------------------

#[test]
fn destination_port_filter_counts_what_it_leaves_out() {
    let mut bpf = Bpf::load_with_filter(KernelFilter {
        dst_port: DPORT,
        ..Default::default()
    });
    bpf.egress(&syn4(LOCAL4, SPORT, REMOTE4, 80, ISN));
    bpf.egress(&syn6(LOCAL6, SPORT, REMOTE6, 80, ISN));
    bpf.assert_untouched();
    bpf.assert_counters(&[(Counter::Filtered, 2)]);
    assert_eq!(bpf.syn_ports(), vec![], "filtered SYNs are not tallied");

    bpf.egress(&syn4(LOCAL4, SPORT, REMOTE4, DPORT, ISN));
    assert_eq!(bpf.pending_all().len(), 1);
    bpf.assert_counters(&[(Counter::Filtered, 2), (Counter::SynSeen, 1)]);
}

#[test]
fn destination_network_filter_matches_prefixes() {
    let mut net = [0u8; 16];
    net[..4].copy_from_slice(&[203, 0, 113, 0]);
    let mut bpf = Bpf::load_with_filter(KernelFilter {
        dst_family: FAMILY_V4,
        dst_prefix_len: 25,
        dst_net: net,
        ..Default::default()
    });
    // In 203.0.113.0/25: .20 and .127. Outside: .128, 203.0.114.20, and any IPv6.
    bpf.egress(&syn4(LOCAL4, SPORT, REMOTE4, DPORT, ISN));
    bpf.egress(&syn4(
        LOCAL4,
        SPORT,
        Ipv4Addr::new(203, 0, 113, 127),
        DPORT,
        ISN,
    ));
    bpf.egress(&syn4(
        LOCAL4,
        SPORT,
        Ipv4Addr::new(203, 0, 113, 128),
        DPORT,
        ISN,
    ));
    bpf.egress(&syn4(
        LOCAL4,
        SPORT,
        Ipv4Addr::new(203, 0, 114, 20),
        DPORT,
        ISN,
    ));
    bpf.egress(&syn6(LOCAL6, SPORT, REMOTE6, DPORT, ISN));
    assert_eq!(bpf.pending_all().len(), 2);
    bpf.assert_counters(&[(Counter::SynSeen, 2), (Counter::Filtered, 3)]);

    let mut bpf = Bpf::load_with_filter(KernelFilter {
        dst_family: netrace_common::FAMILY_V6,
        dst_prefix_len: 48,
        dst_net: Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0).octets(),
        ..Default::default()
    });
    bpf.egress(&syn6(LOCAL6, SPORT, REMOTE6, DPORT, ISN));
    bpf.egress(&syn6(LOCAL6, SPORT, ROUTER6, DPORT, ISN));
    bpf.egress(&syn4(LOCAL4, SPORT, REMOTE4, DPORT, ISN));
    assert_eq!(
        bpf.pending_all()
            .into_iter()
            .map(|(k, _)| k)
            .collect::<Vec<_>>(),
        vec![key6(LOCAL6, SPORT, REMOTE6, DPORT)]
    );
    bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::Filtered, 2)]);
}

// ---- 10. TCP Fast Open -------------------------------------------------------------------------

/// A Fast Open SYN: a cookie option and `data` bytes of payload.
fn tfo_syn(sport: u16, isn: u32, data: usize) -> Tcp {
    let mut t = Tcp::syn(sport, DPORT, isn);
    t.options
        .extend_from_slice(&[34, 10, 1, 2, 3, 4, 5, 6, 7, 8]);
    t.payload = vec![0x47; data];
    t
}

#[test]
fn tfo_syn_records_its_data_and_either_ack_answers() {
    // The server took the data (ack = isn + 1 + len) or only the SYN (ack = isn + 1).
    for (v6, took) in [(false, true), (false, false), (true, true), (true, false)] {
        let mut bpf = Bpf::load();
        let tcp = tfo_syn(SPORT, ISN, 300);
        let (syn, key) = if v6 {
            (
                tcp6(&[], &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP), &tcp),
                key6(LOCAL6, SPORT, REMOTE6, DPORT),
            )
        } else {
            (
                tcp4(&[], &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP), &tcp),
                key4(LOCAL4, SPORT, REMOTE4, DPORT),
            )
        };
        bpf.egress(&syn);
        let p = bpf.pending(&key).expect("the Fast Open SYN is tracked");
        assert_eq!(p.data_len, 300);
        let ack = if took { ISN + 1 + 300 } else { ISN + 1 };
        // Acknowledging part of the data is no answer to this SYN.
        let partial = ISN + 1 + 299;
        if v6 {
            bpf.ingress(&answer6(
                LOCAL6,
                SPORT,
                REMOTE6,
                DPORT,
                TCP_SYN | TCP_ACK,
                partial,
            ));
            bpf.ingress(&answer6(
                LOCAL6,
                SPORT,
                REMOTE6,
                DPORT,
                TCP_SYN | TCP_ACK,
                ack,
            ));
        } else {
            bpf.ingress(&answer4(
                LOCAL4,
                SPORT,
                REMOTE4,
                DPORT,
                TCP_SYN | TCP_ACK,
                partial,
            ));
            bpf.ingress(&answer4(
                LOCAL4,
                SPORT,
                REMOTE4,
                DPORT,
                TCP_SYN | TCP_ACK,
                ack,
            ));
        }
        let ev = bpf.events();
        assert_eq!(
            ev.iter().map(|e| e.kind).collect::<Vec<_>>(),
            [EventKind::Syn, EventKind::Answered],
            "v6 {v6}, data taken {took}"
        );
        assert_eq!(ev[1].raw.pending.data_len, 300);
        assert_eq!(bpf.pending_all(), vec![]);
        bpf.assert_counters(&[
            (Counter::SynSeen, 1),
            (Counter::SynAckMismatch, 1),
            (Counter::SynAckMatched, 1),
        ]);
    }
}

#[test]
fn tfo_retransmitted_without_data_still_accepts_the_data_ack() {
    let mut bpf = Bpf::load();
    let syn = tcp4(
        &[],
        &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP),
        &tfo_syn(SPORT, ISN, 40),
    );
    bpf.egress(&syn);
    bpf.egress(&syn4(LOCAL4, SPORT, REMOTE4, DPORT, ISN));
    let key = key4(LOCAL4, SPORT, REMOTE4, DPORT);
    let p = bpf.pending(&key).unwrap();
    assert_eq!((p.syns, p.data_len), (2, 40));
    bpf.ingress(&answer4(
        LOCAL4,
        SPORT,
        REMOTE4,
        DPORT,
        TCP_RST | TCP_ACK,
        ISN + 41,
    ));
    let ev = bpf.events();
    assert_eq!(
        ev.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [EventKind::Syn, EventKind::Refused]
    );
}

// ---- 11. Interfaces without an Ethernet header -------------------------------------------------

/// The packet as a tun or WireGuard interface carries it: from the IP header on.
fn bare_ip(frame: &[u8]) -> Vec<u8> {
    frame[14..].to_vec()
}

#[test]
fn bare_ip_syn_and_answers_pair() {
    let mut bpf = Bpf::load();
    bpf.egress_l3(&bare_ip(&syn4(LOCAL4, SPORT, REMOTE4, DPORT, ISN)));
    bpf.egress_l3(&bare_ip(&syn6(LOCAL6, SPORT, REMOTE6, DPORT, ISN)));
    bpf.egress_l3(&bare_ip(&syn4(LOCAL4, SPORT + 1, REMOTE4, DPORT, ISN)));
    assert_eq!(bpf.pending_all().len(), 3);
    bpf.ingress_l3(&bare_ip(&answer4(
        LOCAL4,
        SPORT,
        REMOTE4,
        DPORT,
        TCP_SYN | TCP_ACK,
        ISN + 1,
    )));
    bpf.ingress_l3(&bare_ip(&answer6(
        LOCAL6,
        SPORT,
        REMOTE6,
        DPORT,
        TCP_RST | TCP_ACK,
        ISN + 1,
    )));
    bpf.ingress_l3(&bare_ip(&icmp4_error(
        ROUTER4,
        LOCAL4,
        SPORT + 1,
        REMOTE4,
        DPORT,
        ISN,
        11,
        0,
    )));
    let ev = bpf.events();
    assert_eq!(
        ev.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [
            EventKind::Syn,
            EventKind::Syn,
            EventKind::Syn,
            EventKind::Answered,
            EventKind::Refused,
            EventKind::Unreachable
        ]
    );
    assert_eq!(ev[3].raw.key, key4(LOCAL4, SPORT, REMOTE4, DPORT));
    assert_eq!(ev[4].raw.key, key6(LOCAL6, SPORT, REMOTE6, DPORT));
    assert_eq!((ev[5].raw.icmp_type, ev[5].raw.icmp_code), (11, 0));
    assert_eq!(bpf.pending_all(), vec![]);
    bpf.assert_counters(&[
        (Counter::SynSeen, 3),
        (Counter::SynAckMatched, 1),
        (Counter::RstMatched, 1),
        (Counter::IcmpMatched, 1),
    ]);
}

#[test]
fn bare_ip_programs_skip_what_is_not_a_syn() {
    let mut bpf = Bpf::load();
    // Data, a plain ACK, UDP, an Ethernet frame (not IP at offset 0), a truncated SYN.
    let data = Tcp::new(SPORT, DPORT, TCP_ACK | TCP_PSH).seq(ISN + 1);
    bpf.egress_l3(&bare_ip(&tcp4(
        &[],
        &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP),
        &data,
    )));
    bpf.egress_l3(&bare_ip(&tcp6(
        &[],
        &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP),
        &data,
    )));
    bpf.egress_l3(&Ipv4::new(LOCAL4, REMOTE4, IPPROTO_UDP).build(&udp(SPORT, DPORT, b"hello")));
    bpf.egress_l3(&syn4(LOCAL4, SPORT, REMOTE4, DPORT, ISN));
    let syn = bare_ip(&syn4(LOCAL4, SPORT, REMOTE4, DPORT, ISN));
    bpf.egress_l3(&syn[..syn.len() - 1]);
    assert_eq!(bpf.pending_all(), vec![]);
    assert_eq!(bpf.events(), vec![]);
    bpf.assert_counters(&[(Counter::Truncated, 1)]);
}
