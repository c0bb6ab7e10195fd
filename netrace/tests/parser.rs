//! The kernel parser and classifiers, exercised through `BPF_PROG_TEST_RUN` on crafted packets.
//!
//! Every test loads its own fresh kernel object (so the maps start empty), runs packets through
//! `netrace_egress` / `netrace_ingress` without attaching anything, and checks the outcome
//! through the maps: the pending-SYN hash, the per-CPU counters, the per-port SYN tally and the
//! ring buffer. Every run also asserts the verdict is `TC_ACT_UNSPEC` and the packet comes back
//! unchanged (see `support::bpf::Bpf::run`).
//!
//! What holds for both address families is written once and run for each ([`each_family`]:
//! the family under test is printed, so a failure names it); what only one family has (IPv4
//! options and fragment fields, IPv6 extension headers) is tested for that family alone.
//! Frames come from the lab's packet builder, `netrace_lab::wire`.
//!
//! These tests need root (or CAP_BPF + CAP_NET_ADMIN): without it they fail, saying so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netrace::track::tracker::{PendingMap, PutBack};
use netrace_common::{
    BookKey, Counter, EventKind, FlowKey, KernelFilter, BOOK_PORTS, FAMILY_V4, FAMILY_V6,
    MAX_IPV6_EXT_HEADERS, STATE_LOST,
};
use netrace_lab::wire::{
    answer, arp_request, dot1ad, dot1q, ethernet, icmp, icmp_error, icmp_proto, syn, tcp4, tcp6,
    tcp_frame, udp, Ext, Ip, Ipv4, Ipv6, Tcp, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_NONE, IPPROTO_TCP, IPPROTO_UDP, IP_DF, IP_MF, TCP_ACK, TCP_CWR,
    TCP_ECE, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN,
};
use support::bpf::{key, pin_to_cpu, Bpf, Event};

const LOCAL4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const REMOTE4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const ROUTER4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const LOCAL6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
const REMOTE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x20);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);

const SPORT: u16 = 40_001;
const DPORT: u16 = 443;
const ISN: u32 = 0x1234_5678;

/// One address family's cast and its ICMP numbers.
#[derive(Clone, Copy, Debug)]
struct Fam {
    name: &'static str,
    local: IpAddr,
    remote: IpAddr,
    /// A third address: the router sending ICMP errors, and a wrong address for answers.
    router: IpAddr,
    /// Length of the plain IP header.
    ip_len: usize,
    /// Destination unreachable, port unreachable: (type, code).
    port_unreachable: (u8, u8),
    /// Another destination-unreachable code, carried through as is.
    other_unreachable: (u8, u8),
    /// ICMP (type, code) pairs that do not end an attempt: ignored even when they quote the SYN.
    not_ending: &'static [(u8, u8)],
    /// ICMP errors other than destination unreachable that end an attempt (time exceeded,
    /// parameter problem): reported as unreachable, with their type and code.
    other_ending: &'static [(u8, u8)],
    /// Echo request and reply types.
    echo: (u8, u8),
}

const V4: Fam = Fam {
    name: "IPv4",
    local: IpAddr::V4(LOCAL4),
    remote: IpAddr::V4(REMOTE4),
    router: IpAddr::V4(ROUTER4),
    ip_len: 20,
    port_unreachable: (3, 3),
    other_unreachable: (3, 1),
    // Source quench, redirect, echo reply, and fragmentation needed (which asks for a smaller
    // packet and does not end the attempt).
    not_ending: &[(4, 0), (5, 0), (0, 0), (3, 4)],
    // Time exceeded (in transit, in reassembly), parameter problem.
    other_ending: &[(11, 0), (11, 1), (12, 0)],
    echo: (8, 0),
};

const V6: Fam = Fam {
    name: "IPv6",
    local: IpAddr::V6(LOCAL6),
    remote: IpAddr::V6(REMOTE6),
    router: IpAddr::V6(ROUTER6),
    ip_len: 40,
    port_unreachable: (1, 4),
    other_unreachable: (1, 3),
    // Packet too big (asks for a smaller packet), echo reply (no error).
    not_ending: &[(2, 0), (129, 0)],
    // Time exceeded, parameter problem.
    other_ending: &[(3, 0), (4, 1)],
    echo: (128, 129),
};

/// Runs `test` once for IPv4 and once for IPv6, printing which one runs (libtest shows the
/// printed lines of a failing test, so the failure names its family).
fn each_family(test: impl Fn(Fam)) {
    for fam in [V4, V6] {
        println!("---- {}", fam.name);
        test(fam);
    }
}

impl Fam {
    fn local_at(self, port: u16) -> SocketAddr {
        SocketAddr::new(self.local, port)
    }

    fn remote_at(self, port: u16) -> SocketAddr {
        SocketAddr::new(self.remote, port)
    }

    /// The key of `local:sport -> remote:DPORT`.
    fn key(self, sport: u16) -> FlowKey {
        key(self.local_at(sport), self.remote_at(DPORT))
    }

    /// A SYN `local:sport -> remote:DPORT`.
    fn syn(self, sport: u16, isn: u32) -> Vec<u8> {
        syn(self.local_at(sport), self.remote_at(DPORT), isn)
    }

    /// The answer to the SYN `local:sport -> remote:DPORT`.
    fn answer(self, sport: u16, flags: u8, ack: u32) -> Vec<u8> {
        answer(self.local_at(sport), self.remote_at(DPORT), flags, ack)
    }

    /// An ICMP error from the router quoting the SYN `local:sport -> remote:DPORT` with `seq`.
    fn icmp_error(self, sport: u16, seq: u32, (icmp_type, code): (u8, u8)) -> Vec<u8> {
        icmp_error(
            self.router,
            (self.local_at(sport), self.remote_at(DPORT)),
            seq,
            icmp_type,
            code,
        )
    }

    /// `tcp` from the local side to the remote side, with `tags`.
    fn outbound(self, tags: &[(u16, u16)], tcp: &Tcp) -> Vec<u8> {
        tcp_frame(tags, self.local, self.remote, tcp)
    }

    /// `tcp` from the remote side to the local side, with `tags`.
    fn inbound(self, tags: &[(u16, u16)], tcp: &Tcp) -> Vec<u8> {
        tcp_frame(tags, self.remote, self.local, tcp)
    }

    /// Ethernet + a plain IP header `src -> dst` carrying `proto` + `payload`.
    fn ip_frame(self, src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
        Ip::new(src, dst, proto).frame(&[], payload)
    }
}

/// Loads a fresh object and sends one SYN `local:sport -> remote:DPORT`, draining its `Syn`
/// event.
fn with_pending(fam: Fam, sport: u16, isn: u32) -> Bpf {
    let mut bpf = Bpf::load();
    bpf.egress(&fam.syn(sport, isn));
    assert!(
        bpf.pending(&fam.key(sport)).is_some(),
        "the SYN was not tracked"
    );
    let ev = bpf.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, EventKind::Syn);
    bpf
}

/// Asserts `packet` (sent on egress to a fresh object) is tracked under exactly `key` with `isn`.
#[track_caller]
fn assert_tracked(packet: &[u8], key: FlowKey, isn: u32) {
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

/// Asserts exactly one event of `kind` is waiting and returns it.
#[track_caller]
fn one_event(bpf: &mut Bpf, kind: EventKind) -> Event {
    let mut ev = bpf.events();
    assert_eq!(ev.len(), 1, "events: {ev:?}");
    assert_eq!(ev[0].kind, kind);
    ev.swap_remove(0)
}

// ---- 1. Egress SYNs ----------------------------------------------------------------------------

#[test]
fn egress_syn_creates_pending_entry_and_syn_event() {
    each_family(|fam| {
        let mut bpf = Bpf::load();
        bpf.egress(&fam.syn(SPORT, ISN));

        let key = fam.key(SPORT);
        let all = bpf.pending_all();
        assert_eq!(all.len(), 1, "pending: {all:?}");
        let (k, p) = all[0];
        assert_eq!(k, key);
        // Addresses in network order (IPv4 in the first 4 bytes), ports in host order.
        match fam.local {
            IpAddr::V4(_) => {
                assert_eq!(k.family, FAMILY_V4);
                assert_eq!(k.src_addr[..4], [198, 51, 100, 10]);
                assert_eq!(k.dst_addr[..4], [203, 0, 113, 20]);
                assert_eq!(k.src_addr[4..], [0; 12]);
                assert_eq!(k.dst_addr[4..], [0; 12]);
            }
            IpAddr::V6(_) => {
                assert_eq!(k.family, FAMILY_V6);
                assert_eq!(k.src_addr, LOCAL6.octets());
                assert_eq!(k.dst_addr, REMOTE6.octets());
            }
        }
        assert_eq!((k.src_port, k.dst_port), (SPORT, DPORT));
        assert_eq!(p.isn, ISN);
        assert_eq!(p.syns, 1);
        assert_ne!(p.first_ns, 0);
        assert_eq!(p.first_ns, p.last_ns);
        assert_eq!(p.data_len, 0);

        let ev = one_event(&mut bpf, EventKind::Syn);
        assert_eq!(ev.raw.key, key);
        assert_eq!(ev.raw.pending, p);
        assert_eq!(ev.raw.ifindex, p.ifindex);
        assert_eq!(ev.raw.ts_ns, p.first_ns);
        assert_eq!((ev.raw.icmp_type, ev.raw.icmp_code), (0, 0));

        bpf.assert_counters(&[(Counter::SynSeen, 1)]);
        assert_eq!(bpf.syn_port(SPORT), 1);
        assert_eq!(bpf.syn_ports(), vec![(SPORT, 1)]);
    });
}

#[test]
fn egress_syn_retransmission_counts_without_new_event() {
    each_family(|fam| {
        let mut bpf = with_pending(fam, SPORT, ISN);
        let key = fam.key(SPORT);
        let first = bpf.pending(&key).unwrap();

        bpf.egress(&fam.syn(SPORT, ISN));
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

        bpf.egress(&fam.syn(SPORT, ISN));
        assert_eq!(bpf.pending(&key).unwrap().syns, 3);
        bpf.assert_counters(&[(Counter::SynSeen, 3), (Counter::SynRetransmit, 2)]);
        assert_eq!(bpf.syn_port(SPORT), 3);
        assert_eq!(bpf.pending_all().len(), 1);
    });
}

#[test]
fn egress_syn_with_new_isn_supersedes_old_entry() {
    each_family(|fam| {
        let mut bpf = with_pending(fam, SPORT, ISN);
        let key = fam.key(SPORT);
        bpf.egress(&fam.syn(SPORT, ISN));
        let old = bpf.pending(&key).unwrap();
        assert_eq!(old.syns, 2);

        const NEW_ISN: u32 = 0x9abc_def0;
        bpf.egress(&fam.syn(SPORT, NEW_ISN));
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
    });
}

#[test]
fn egress_distinct_tuples_are_distinct_entries() {
    let mut bpf = Bpf::load();
    let (l4, r4) = (V4.local_at(SPORT), V4.remote_at(DPORT));
    let (l4b, r4b) = (V4.local_at(SPORT + 1), V4.remote_at(DPORT + 1));
    let (l6, r6) = (V6.local_at(SPORT), V6.remote_at(DPORT));
    bpf.egress(&syn(l4, r4, ISN));
    bpf.egress(&syn(l4b, r4, ISN));
    bpf.egress(&syn(l4, r4b, ISN));
    bpf.egress(&syn(l6, r6, ISN));
    let mut keys: Vec<_> = bpf.pending_all().into_iter().map(|(k, _)| k).collect();
    keys.sort_by_key(|k| (k.family, k.src_port, k.dst_port));
    assert_eq!(
        keys,
        vec![key(l4, r4), key(l4, r4b), key(l4b, r4), key(l6, r6)]
    );
    assert_eq!(bpf.events().len(), 4);
    bpf.assert_counters(&[(Counter::SynSeen, 4)]);
    assert_eq!(bpf.syn_ports(), vec![(SPORT, 3), (SPORT + 1, 1)]);
}

#[test]
fn egress_ecn_setup_syn_is_tracked() {
    each_family(|fam| {
        let mut tcp = Tcp::syn(SPORT, DPORT, ISN);
        tcp.flags = TCP_SYN | TCP_ECE | TCP_CWR;
        assert_tracked(&fam.outbound(&[], &tcp), fam.key(SPORT), ISN);
    });
}

#[test]
fn egress_syn_with_maximal_tcp_options_is_tracked() {
    each_family(|fam| {
        let mut tcp = Tcp::syn(SPORT, DPORT, ISN);
        tcp.options = vec![1; 40];
        let pkt = fam.outbound(&[], &tcp);
        assert_eq!(pkt[14 + fam.ip_len + 12] >> 4, 15);
        assert_tracked(&pkt, fam.key(SPORT), ISN);
    });
}

// ---- 2. SYN-ACKs -------------------------------------------------------------------------------

#[test]
fn ingress_synack_acknowledging_isn_plus_one_answers() {
    each_family(|fam| {
        let mut bpf = with_pending(fam, SPORT, ISN);
        let key = fam.key(SPORT);
        let pending = bpf.pending(&key).unwrap();

        bpf.ingress(&fam.answer(SPORT, TCP_SYN | TCP_ACK, ISN + 1));
        assert_eq!(bpf.pending(&key), None, "the answered entry is removed");
        let ev = one_event(&mut bpf, EventKind::Answered);
        assert_eq!(
            ev.raw.key, key,
            "the key is oriented from the connecting side"
        );
        assert_eq!(ev.raw.pending, pending);
        assert!(ev.raw.ts_ns >= pending.last_ns);
        assert_eq!((ev.raw.icmp_type, ev.raw.icmp_code), (0, 0));
        bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::SynAckMatched, 1)]);

        // A duplicated SYN-ACK finds no entry: it is reported as unmatched, with the ISN it
        // acknowledges (user space knows the connection was answered and drops it).
        bpf.ingress(&fam.answer(SPORT, TCP_SYN | TCP_ACK, ISN + 1));
        assert_eq!(bpf.pending_all(), Vec::new(), "pending entries");
        let ev = one_event(&mut bpf, EventKind::UnmatchedSynAck);
        assert_eq!((ev.raw.key, ev.raw.pending.isn), (key, ISN));
        bpf.assert_counters(&[
            (Counter::SynSeen, 1),
            (Counter::SynAckMatched, 1),
            (Counter::SynAckUnmatched, 1),
        ]);
    });
}

#[test]
fn ingress_synack_with_wrong_ack_is_a_mismatch() {
    each_family(|fam| {
        let mut bpf = with_pending(fam, SPORT, ISN);
        let key = fam.key(SPORT);
        let pending = bpf.pending(&key).unwrap();

        for wrong in [ISN, ISN + 2, 0, ISN.wrapping_sub(1)] {
            bpf.ingress(&fam.answer(SPORT, TCP_SYN | TCP_ACK, wrong));
        }
        assert_eq!(bpf.pending(&key), Some(pending), "the entry stays");
        assert_eq!(bpf.events(), vec![]);
        bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::SynAckMismatch, 4)]);

        // The right answer still resolves it afterwards.
        bpf.ingress(&fam.answer(SPORT, TCP_SYN | TCP_ACK, ISN + 1));
        assert_eq!(bpf.pending(&key), None);
        let ev = one_event(&mut bpf, EventKind::Answered);
        assert_eq!(ev.raw.pending, pending);
        bpf.assert_counters(&[
            (Counter::SynSeen, 1),
            (Counter::SynAckMismatch, 4),
            (Counter::SynAckMatched, 1),
        ]);
    });
}

#[test]
fn ingress_synack_for_other_tuple_is_ignored() {
    each_family(|fam| {
        let mut bpf = with_pending(fam, SPORT, ISN);
        let synack = |local: SocketAddr, remote: SocketAddr| {
            answer(local, remote, TCP_SYN | TCP_ACK, ISN + 1)
        };
        let (local, remote) = (fam.local_at(SPORT), fam.remote_at(DPORT));
        // Wrong local port, wrong remote port, wrong remote address, wrong local address.
        bpf.ingress(&synack(fam.local_at(SPORT + 1), remote));
        bpf.ingress(&synack(local, fam.remote_at(DPORT + 1)));
        bpf.ingress(&synack(local, SocketAddr::new(fam.router, DPORT)));
        bpf.ingress(&synack(SocketAddr::new(fam.router, SPORT), remote));
        // The same tuple, not swapped (as if the SYN-ACK came from the local side).
        bpf.ingress(&synack(remote, local));
        // None is pending: each is reported as an unmatched SYN-ACK (for user space to pair
        // by ISN or count), and the pending entry stays.
        assert!(bpf.pending(&fam.key(SPORT)).is_some());
        let kinds: Vec<EventKind> = bpf.events().iter().map(|e| e.kind).collect();
        assert_eq!(kinds, vec![EventKind::UnmatchedSynAck; 5]);
        bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::SynAckUnmatched, 5)]);
    });
}

#[test]
fn ingress_synack_ack_wraps_around() {
    each_family(|fam| {
        let mut bpf = with_pending(fam, SPORT, u32::MAX);
        bpf.ingress(&fam.answer(SPORT, TCP_SYN | TCP_ACK, 0));
        let ev = one_event(&mut bpf, EventKind::Answered);
        assert_eq!(ev.raw.pending.isn, u32::MAX);
        assert_eq!(bpf.pending_all(), vec![]);
    });
}

// ---- 3. RSTs and ICMP errors -------------------------------------------------------------------

#[test]
fn ingress_rst_ack_acknowledging_syn_refuses() {
    each_family(|fam| {
        let mut bpf = with_pending(fam, SPORT, ISN);
        let key = fam.key(SPORT);
        let pending = bpf.pending(&key).unwrap();

        // A RST acknowledging something else is ignored, and is no SYN-ACK mismatch.
        bpf.ingress(&fam.answer(SPORT, TCP_RST | TCP_ACK, ISN));
        assert!(bpf.pending(&key).is_some());
        assert_eq!(bpf.events(), vec![]);
        bpf.assert_counters(&[(Counter::SynSeen, 1)]);

        bpf.ingress(&fam.answer(SPORT, TCP_RST | TCP_ACK, ISN + 1));
        assert_eq!(bpf.pending(&key), None);
        let ev = one_event(&mut bpf, EventKind::Refused);
        assert_eq!(ev.raw.key, key);
        assert_eq!(ev.raw.pending, pending);
        assert_eq!((ev.raw.icmp_type, ev.raw.icmp_code), (0, 0));
        bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::RstMatched, 1)]);
    });
}

#[test]
fn ingress_rst_without_ack_is_ignored() {
    each_family(|fam| {
        let mut bpf = with_pending(fam, SPORT, ISN);
        bpf.ingress(&fam.answer(SPORT, TCP_RST, ISN + 1));
        assert_eq!(bpf.pending_all().len(), 1);
        assert_eq!(bpf.events(), vec![]);
        bpf.assert_counters(&[(Counter::SynSeen, 1)]);
    });
}

#[test]
fn ingress_icmp_unreachable_quoting_syn() {
    each_family(|fam| {
        let mut bpf = with_pending(fam, SPORT, ISN);
        let key = fam.key(SPORT);
        let pending = bpf.pending(&key).unwrap();

        // Quoting another sequence number: not this SYN.
        bpf.ingress(&fam.icmp_error(SPORT, ISN + 1, fam.port_unreachable));
        assert!(bpf.pending(&key).is_some(), "wrong quoted sequence number");
        assert_eq!(bpf.events(), vec![]);
        bpf.assert_counters(&[(Counter::SynSeen, 1)]);

        bpf.ingress(&fam.icmp_error(SPORT, ISN, fam.port_unreachable));
        assert_eq!(bpf.pending(&key), None);
        let ev = one_event(&mut bpf, EventKind::Unreachable);
        assert_eq!(ev.raw.key, key);
        assert_eq!(ev.raw.pending, pending);
        assert_eq!((ev.raw.icmp_type, ev.raw.icmp_code), fam.port_unreachable);
        bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::IcmpMatched, 1)]);
    });
}

#[test]
fn ingress_icmp_unreachable_carries_its_code() {
    each_family(|fam| {
        let mut bpf = with_pending(fam, SPORT, ISN);
        bpf.ingress(&fam.icmp_error(SPORT, ISN, fam.other_unreachable));
        let ev = one_event(&mut bpf, EventKind::Unreachable);
        assert_eq!((ev.raw.icmp_type, ev.raw.icmp_code), fam.other_unreachable);
    });
}

#[test]
fn ingress_icmp_other_types_are_ignored() {
    each_family(|fam| {
        let mut bpf = with_pending(fam, SPORT, ISN);
        for &tc in fam.not_ending {
            bpf.ingress(&fam.icmp_error(SPORT, ISN, tc));
        }
        // A destination unreachable quoting UDP, not TCP.
        let quoted =
            Ip::new(fam.local, fam.remote, IPPROTO_UDP).build(&udp(SPORT, DPORT, &[])[..8]);
        let msg = icmp(
            fam.port_unreachable.0,
            fam.port_unreachable.1,
            [0; 4],
            &quoted,
        );
        bpf.ingress(&fam.ip_frame(fam.router, fam.local, icmp_proto(fam.local), &msg));
        assert_eq!(bpf.pending_all().len(), 1);
        assert_eq!(bpf.events(), vec![]);
        bpf.assert_counters(&[(Counter::SynSeen, 1)]);
    });
}

#[test]
fn ingress_icmp_time_exceeded_and_parameter_problem_end_the_attempt() {
    each_family(|fam| {
        for &(t, c) in fam.other_ending {
            let mut bpf = with_pending(fam, SPORT, ISN);
            let (key, pending) = bpf.pending_all()[0];
            bpf.ingress(&fam.icmp_error(SPORT, ISN, (t, c)));
            let ev = bpf.events();
            assert_eq!(ev.len(), 1, "type {t} code {c}: events {ev:?}");
            assert_eq!(ev[0].kind, EventKind::Unreachable);
            assert_eq!(ev[0].raw.key, key);
            assert_eq!(ev[0].raw.pending, pending);
            assert_eq!((ev[0].raw.icmp_type, ev[0].raw.icmp_code), (t, c));
            assert_eq!(bpf.pending_all(), vec![]);
            bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::IcmpMatched, 1)]);
        }
    });
}

#[test]
fn egress_icmp_errors_are_ignored() {
    each_family(|fam| {
        let mut bpf = with_pending(fam, SPORT, ISN);
        bpf.egress(&fam.icmp_error(SPORT, ISN, fam.port_unreachable));
        assert_eq!(bpf.pending_all().len(), 1);
        assert_eq!(bpf.events(), vec![]);
        bpf.assert_counters(&[(Counter::SynSeen, 1)]);
    });
}

/// An ICMP error quoting the IPv4 SYN with `quoted_ip`'s header, from the router.
fn icmp4_quoting(quoted_ip: Ipv4, code: u8, outer: Ipv4, tags: &[(u16, u16)]) -> Vec<u8> {
    let quoted_tcp = Tcp::syn(SPORT, DPORT, ISN).build();
    let msg = icmp(3, code, [0; 4], &quoted_ip.build(&quoted_tcp[..8]));
    ethernet(tags, ETH_P_IP, &outer.build(&msg))
}

#[test]
fn ingress_icmp_quoting_ipv4_with_options() {
    let mut bpf = with_pending(V4, SPORT, ISN);
    let quoted = Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).option_bytes(8);
    let pkt = icmp4_quoting(quoted, 13, Ipv4::new(ROUTER4, LOCAL4, IPPROTO_ICMP), &[]);
    assert_eq!(pkt[14 + 20 + 8] & 0x0f, 7, "the quoted header's IHL");
    bpf.ingress(&pkt);
    let ev = one_event(&mut bpf, EventKind::Unreachable);
    assert_eq!((ev.raw.icmp_type, ev.raw.icmp_code), (3, 13));
    assert_eq!(bpf.pending_all(), vec![]);
}

#[test]
fn ingress_icmp_with_outer_ip_options_matches() {
    let mut bpf = with_pending(V4, SPORT, ISN);
    let outer = Ipv4::new(ROUTER4, LOCAL4, IPPROTO_ICMP).option_bytes(16);
    bpf.ingress(&icmp4_quoting(
        Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP),
        10,
        outer,
        &[dot1q(3)],
    ));
    let ev = one_event(&mut bpf, EventKind::Unreachable);
    assert_eq!((ev.raw.icmp_type, ev.raw.icmp_code), (3, 10));
    bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::IcmpMatched, 1)]);
}

#[test]
fn ingress_icmp_quoting_a_malformed_ipv4_header_is_malformed() {
    let mut bpf = with_pending(V4, SPORT, ISN);
    bpf.ingress(&icmp4_quoting(
        Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).ihl(4),
        3,
        Ipv4::new(ROUTER4, LOCAL4, IPPROTO_ICMP),
        &[],
    ));
    assert_eq!(bpf.pending_all().len(), 1);
    assert_eq!(bpf.events(), vec![]);
    bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::Malformed, 1)]);
}

// ---- 4. IPv6 extension headers -----------------------------------------------------------------

fn syn6_through(exts: &[Ext], tcp: &Tcp) -> Vec<u8> {
    tcp6(
        &[],
        &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP).exts(exts),
        tcp,
    )
}

#[test]
fn ipv6_syn_through_extension_headers_is_tracked() {
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
        let pkt = syn6_through(chain, &Tcp::syn(SPORT, DPORT, ISN));
        assert_tracked(&pkt, V6.key(SPORT), ISN);
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
    let pkt = syn6_through(&chain, &Tcp::syn(SPORT, DPORT, ISN));
    assert_tracked(&pkt, V6.key(SPORT), ISN);
}

#[test]
fn ipv6_chain_longer_than_the_walk_bound_is_not_tracked() {
    let mut bpf = Bpf::load();
    for extra in 1..=3 {
        let n = MAX_IPV6_EXT_HEADERS as usize + extra;
        let chain = vec![Ext::DestOpts { len8: 0 }; n];
        bpf.egress(&syn6_through(&chain, &Tcp::syn(SPORT, DPORT, ISN)));
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
        let chain = [Ext::HopByHop { len8: 0 }, Ext::Fragment { offset, more }];
        bpf.egress(&syn6_through(&chain, &Tcp::syn(SPORT, DPORT, ISN)));
        bpf.assert_untouched();
        bpf.assert_counters(&[(Counter::Fragment, i as u64 + 1)]);
    }
}

#[test]
fn ipv6_first_fragment_is_tracked() {
    let chain = [Ext::Fragment {
        offset: 0,
        more: true,
    }];
    let pkt = syn6_through(&chain, &Tcp::syn(SPORT, DPORT, ISN));
    assert_tracked(&pkt, V6.key(SPORT), ISN);
}

#[test]
fn ipv6_synack_through_extension_headers_answers() {
    let mut bpf = with_pending(V6, SPORT, ISN);
    let tcp = Tcp::answer(SPORT, DPORT, TCP_SYN | TCP_ACK, ISN + 1);
    let pkt = tcp6(
        &[],
        &Ipv6::new(REMOTE6, LOCAL6, IPPROTO_TCP)
            .exts(&[Ext::HopByHop { len8: 0 }, Ext::DestOpts { len8: 1 }]),
        &tcp,
    );
    bpf.ingress(&pkt);
    one_event(&mut bpf, EventKind::Answered);
    assert_eq!(bpf.pending_all(), vec![]);
}

#[test]
fn ipv6_no_next_header() {
    let mut bpf = Bpf::load();
    // Next header 59: nothing follows.
    let pkt = ethernet(
        &[],
        ETH_P_IPV6,
        &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_NONE)
            .exts(&[Ext::DestOpts { len8: 0 }])
            .build(&Tcp::syn(SPORT, DPORT, ISN).build()),
    );
    bpf.egress(&pkt);
    bpf.assert_untouched();
    bpf.assert_counters(&[]);
}

#[test]
fn ip_header_with_the_other_familys_version_is_malformed() {
    each_family(|fam| {
        // Ethertype IPv4 with version 6 in the header, and the other way round.
        let mut bpf = Bpf::load();
        let other = if fam.local.is_ipv4() { 6 } else { 4 };
        let ip = Ip::new(fam.local, fam.remote, IPPROTO_TCP).version(other);
        bpf.egress(&ip.frame(&[], &Tcp::syn(SPORT, DPORT, ISN).build()));
        bpf.assert_untouched();
        bpf.assert_counters(&[(Counter::Malformed, 1)]);
    });
}

// ---- 5. VLAN tags ------------------------------------------------------------------------------

#[test]
fn vlan_tagged_syn_is_tracked() {
    each_family(|fam| {
        for vid in [100, 4094] {
            let pkt = fam.outbound(&[dot1q(vid)], &Tcp::syn(SPORT, DPORT, ISN));
            assert_eq!(&pkt[12..14], &[0x81, 0x00]);
            assert_tracked(&pkt, fam.key(SPORT), ISN);
        }
    });
}

#[test]
fn qinq_tagged_syn_is_tracked() {
    each_family(|fam| {
        let pkt = fam.outbound(&[dot1ad(200), dot1q(100)], &Tcp::syn(SPORT, DPORT, ISN));
        assert_eq!(&pkt[12..14], &[0x88, 0xa8]);
        assert_eq!(&pkt[16..18], &[0x81, 0x00]);
        assert_tracked(&pkt, fam.key(SPORT), ISN);

        // Two 802.1Q tags (old-style QinQ) as well.
        let pkt = fam.outbound(&[dot1q(7), dot1q(8)], &Tcp::syn(SPORT, DPORT, ISN));
        assert_tracked(&pkt, fam.key(SPORT), ISN);
    });
}

#[test]
fn vlan_tagged_answers_resolve() {
    each_family(|fam| {
        let mut bpf = with_pending(fam, SPORT, ISN);
        let tcp = Tcp::answer(SPORT, DPORT, TCP_SYN | TCP_ACK, ISN + 1);
        bpf.ingress(&fam.inbound(&[dot1ad(200), dot1q(100)], &tcp));
        one_event(&mut bpf, EventKind::Answered);
        assert_eq!(bpf.pending_all(), vec![]);
    });
}

#[test]
fn three_vlan_tags_are_beyond_the_parser() {
    each_family(|fam| {
        let mut bpf = Bpf::load();
        let tags = [dot1ad(1), dot1q(2), dot1q(3)];
        bpf.egress(&fam.outbound(&tags, &Tcp::syn(SPORT, DPORT, ISN)));
        bpf.assert_untouched();
        bpf.assert_counters(&[]);
    });
}

// ---- 6. IPv4 header fields, TCP data offset ----------------------------------------------------

#[test]
fn ipv4_with_options_is_tracked_for_every_ihl() {
    for ihl in 6u8..=15 {
        let opt_len = (usize::from(ihl) - 5) * 4;
        let ip = Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).option_bytes(opt_len);
        let sport = SPORT + u16::from(ihl);
        let isn = ISN + u32::from(ihl);
        let pkt = tcp4(&[], &ip, &Tcp::syn(sport, DPORT, isn));
        assert_eq!(pkt[14] & 0x0f, ihl);
        assert_tracked(&pkt, V4.key(sport), isn);
    }
}

#[test]
fn ipv4_non_first_fragment_is_skipped() {
    let mut bpf = Bpf::load();
    let cases = [1u16, IP_MF | 1, IP_MF | 185, 0x1fff, IP_DF | 8];
    for (i, ff) in cases.into_iter().enumerate() {
        let ip = Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).flags_frag(ff);
        bpf.egress(&tcp4(&[], &ip, &Tcp::syn(SPORT, DPORT, ISN)));
        bpf.assert_untouched();
        bpf.assert_counters(&[(Counter::Fragment, i as u64 + 1)]);
    }
    // An answer in a non-first fragment is skipped too.
    let mut bpf = with_pending(V4, SPORT, ISN);
    let tcp = Tcp::answer(SPORT, DPORT, TCP_SYN | TCP_ACK, ISN + 1);
    bpf.ingress(&tcp4(
        &[],
        &Ipv4::new(REMOTE4, LOCAL4, IPPROTO_TCP).flags_frag(IP_MF | 3),
        &tcp,
    ));
    assert_eq!(bpf.pending_all().len(), 1);
    assert_eq!(bpf.events(), vec![]);
    bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::Fragment, 1)]);
}

#[test]
fn ipv4_first_fragment_and_df_are_tracked() {
    for ff in [0u16, IP_DF, IP_MF] {
        let ip = Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).flags_frag(ff);
        assert_tracked(
            &tcp4(&[], &ip, &Tcp::syn(SPORT, DPORT, ISN)),
            V4.key(SPORT),
            ISN,
        );
    }
}

#[test]
fn ipv4_ihl_below_five_is_malformed() {
    let mut bpf = Bpf::load();
    for ihl in 0u8..5 {
        let ip = Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).ihl(ihl);
        bpf.egress(&tcp4(&[], &ip, &Tcp::syn(SPORT, DPORT, ISN)));
        bpf.assert_untouched();
        bpf.assert_counters(&[(Counter::Malformed, u64::from(ihl) + 1)]);
    }
}

#[test]
fn tcp_data_offset_below_five_is_malformed() {
    each_family(|fam| {
        let mut bpf = Bpf::load();
        for doff in 0u8..5 {
            let tcp = Tcp::syn(SPORT, DPORT, ISN).data_offset(doff);
            bpf.egress(&fam.outbound(&[], &tcp));
            bpf.assert_untouched();
            bpf.assert_counters(&[(Counter::Malformed, u64::from(doff) + 1)]);
        }
        // On ingress too: a SYN-ACK with a bad data offset resolves nothing.
        let mut bpf = with_pending(fam, SPORT, ISN);
        let tcp = Tcp::answer(SPORT, DPORT, TCP_SYN | TCP_ACK, ISN + 1).data_offset(4);
        bpf.ingress(&fam.inbound(&[], &tcp));
        assert_eq!(bpf.pending_all().len(), 1);
        assert_eq!(bpf.events(), vec![]);
        bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::Malformed, 1)]);
    });
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
fn truncated_syn_at_every_length() {
    each_family(|fam| {
        let mut bpf = Bpf::load();
        let full = fam.outbound(&[], &bare_syn());
        assert_eq!(full.len(), 14 + fam.ip_len + 20);
        assert_every_prefix_truncated(&mut bpf, &full, true);
        assert_eq!(bpf.pending_all().len(), 1, "the full SYN is tracked");
        assert_eq!(bpf.syn_ports(), vec![(SPORT, 1)]);
        // Only the 20 bytes of TCP header are cut where the kernel runs the program.
        bpf.assert_counters(&[(Counter::SynSeen, 1), (Counter::Truncated, 20)]);
    });
}

#[test]
fn truncated_ipv4_syn_with_options_at_every_length() {
    let mut bpf = Bpf::load();
    let full = tcp4(
        &[],
        &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).option_bytes(40),
        &bare_syn(),
    );
    assert_every_prefix_truncated(&mut bpf, &full, true);
    assert_eq!(bpf.pending_all().len(), 1);
}

#[test]
fn truncated_ipv6_syn_with_extension_headers_at_every_length() {
    let mut bpf = Bpf::load();
    let full = syn6_through(
        &[
            Ext::HopByHop { len8: 1 },
            Ext::Fragment {
                offset: 0,
                more: true,
            },
            Ext::Auth { len4: 4 },
            Ext::DestOpts { len8: 0 },
        ],
        &bare_syn(),
    );
    assert_every_prefix_truncated(&mut bpf, &full, true);
    assert_eq!(bpf.pending_all().len(), 1);
}

#[test]
fn truncated_vlan_syn_at_every_length() {
    // Tagged frames reach the program at every length, so these also cover truncation inside
    // the VLAN tag and inside the IPv4 / IPv6 header.
    each_family(|fam| {
        let mut bpf = Bpf::load();
        let full = fam.outbound(&[dot1q(100)], &bare_syn());
        let ran = assert_every_prefix_truncated(&mut bpf, &full, true);
        assert_eq!(ran, full.len() - 14);
        assert_eq!(bpf.pending_all().len(), 1);
        bpf.assert_counters(&[
            (Counter::SynSeen, 1),
            (Counter::Truncated, (4 + fam.ip_len + 20) as u64),
        ]);
    });

    let mut bpf = Bpf::load();
    let full = tcp6(
        &[dot1ad(200), dot1q(100)],
        &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP)
            .exts(&[Ext::HopByHop { len8: 0 }, Ext::Routing { len8: 1 }]),
        &bare_syn(),
    );
    let ran = assert_every_prefix_truncated(&mut bpf, &full, true);
    assert_eq!(ran, full.len() - 14);
    assert_eq!(bpf.pending_all().len(), 1);

    let mut bpf = Bpf::load();
    let full = tcp4(
        &[dot1q(100)],
        &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).option_bytes(12),
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
    each_family(|fam| {
        for tags in [&[][..], &[dot1q(5)][..]] {
            let mut bpf = Bpf::load();
            let full = fam.outbound(tags, &Tcp::syn(SPORT, DPORT, ISN));
            assert_every_prefix_truncated(&mut bpf, &full, true);
            assert_eq!(bpf.pending_all().len(), 1);
        }
    });
}

#[test]
fn tcp_header_cut_inside_its_options_is_truncated() {
    // The whole TCP header, options included, must be present: a segment cut inside its
    // options is neither a SYN nor an answer (the receiving stack would drop it).
    each_family(|fam| {
        let mut bpf = Bpf::load();
        let full = fam.syn(SPORT, ISN);
        bpf.egress(&full[..full.len() - 1]);
        assert!(bpf.pending_all().is_empty());
        bpf.assert_counters(&[(Counter::Truncated, 1)]);

        bpf.egress(&full);
        assert_eq!(bpf.pending_all().len(), 1);
        let mut synack = Tcp::answer(SPORT, DPORT, TCP_SYN | TCP_ACK, ISN + 1);
        synack.options = vec![2, 4, 0x05, 0xb4, 1, 1, 1, 1];
        let answer = fam.inbound(&[], &synack);
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
    });
}

#[test]
fn truncated_answers_at_every_length() {
    each_family(|fam| {
        let synack = Tcp::answer(SPORT, DPORT, TCP_SYN | TCP_ACK, ISN + 1);
        let answers = [
            fam.answer(SPORT, TCP_SYN | TCP_ACK, ISN + 1),
            fam.answer(SPORT, TCP_RST | TCP_ACK, ISN + 1),
            fam.inbound(&[dot1q(9)], &synack),
            fam.icmp_error(SPORT, ISN, fam.port_unreachable),
        ];
        for full in answers {
            let mut bpf = with_pending(fam, SPORT, ISN);
            // The ICMPv6 error quotes the whole SYN; the parser needs only 40 + 8 bytes of it,
            // so longer prefixes are complete answers, not truncated ones.
            let icmp6 = full[12..14] == ETH_P_IPV6.to_be_bytes() && full[14 + 6] == IPPROTO_ICMPV6;
            let needed = if icmp6 {
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
    });
}

// ---- 8. What is not a connection attempt -------------------------------------------------------

#[test]
fn non_tcp_packets_are_ignored() {
    each_family(|fam| {
        let (req, reply) = fam.echo;
        let icmp_p = icmp_proto(fam.local);
        let mut packets = vec![
            fam.ip_frame(
                fam.local,
                fam.remote,
                IPPROTO_UDP,
                &udp(SPORT, 53, b"query"),
            ),
            // Echo request and reply.
            fam.ip_frame(
                fam.local,
                fam.remote,
                icmp_p,
                &icmp(req, 0, [0, 1, 0, 1], b"ping"),
            ),
            fam.ip_frame(
                fam.remote,
                fam.local,
                icmp_p,
                &icmp(reply, 0, [0, 1, 0, 1], b"ping"),
            ),
            // A UDP datagram whose first bytes would look like a SYN if read as TCP.
            fam.ip_frame(
                fam.local,
                fam.remote,
                IPPROTO_UDP,
                &Tcp::syn(SPORT, DPORT, ISN).build(),
            ),
            arp_request(LOCAL4, REMOTE4),
            // An unknown ethertype and a bare 14-byte Ethernet header.
            ethernet(&[], 0x88cc, &[0; 46]),
            ethernet(&[], ETH_P_ARP, &[]),
        ];
        // A tagged frame announcing IP but ending after the tag (the kernel refuses an
        // untagged IP frame that short): the only truncated one.
        let ethertype = Ip::new(fam.local, fam.remote, IPPROTO_TCP).ethertype();
        packets.push(ethernet(&[dot1q(1)], ethertype, &[]));
        let mut bpf = Bpf::load();
        for (i, p) in packets.iter().enumerate() {
            bpf.egress(p);
            bpf.ingress(p);
            bpf.assert_untouched();
            let truncated = if i == packets.len() - 1 { 2 } else { 0 };
            bpf.assert_counters(&[(Counter::Truncated, truncated)]);
        }
        assert_eq!(bpf.syn_ports(), vec![]);
    });
}

#[test]
fn egress_segments_other_than_syn_are_not_tracked() {
    each_family(|fam| {
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
            bpf.egress(&fam.outbound(&[], &tcp));
            bpf.assert_untouched();
        }
        bpf.assert_counters(&[]);
        assert_eq!(bpf.syn_ports(), vec![]);
    });
}

#[test]
fn ingress_syn_is_not_tracked_nor_an_answer() {
    each_family(|fam| {
        let mut bpf = Bpf::load();
        bpf.ingress(&syn(fam.remote_at(DPORT), fam.local_at(SPORT), ISN));
        bpf.assert_untouched();
        bpf.assert_counters(&[]);

        // A simultaneous-open SYN for a pending attempt leaves it pending.
        let mut bpf = with_pending(fam, SPORT, ISN);
        let tcp = Tcp::syn(DPORT, SPORT, 77).ack(ISN + 1);
        bpf.ingress(&fam.inbound(&[], &tcp));
        bpf.ingress(&fam.syn(SPORT, ISN));
        assert_eq!(bpf.pending_all().len(), 1);
        assert_eq!(bpf.events(), vec![]);
        bpf.assert_counters(&[(Counter::SynSeen, 1)]);
        assert_eq!(bpf.syn_port(SPORT), 1);
    });
}

#[test]
fn ingress_plain_ack_and_fin_resolve_nothing() {
    each_family(|fam| {
        let mut bpf = with_pending(fam, SPORT, ISN);
        for flags in [TCP_ACK, TCP_ACK | TCP_PSH, TCP_FIN | TCP_ACK] {
            bpf.ingress(&fam.answer(SPORT, flags, ISN + 1));
        }
        assert_eq!(bpf.pending_all().len(), 1);
        assert_eq!(bpf.events(), vec![]);
        bpf.assert_counters(&[(Counter::SynSeen, 1)]);
    });
}

// ---- The kernel destination filter -------------------------------------------------------------

#[test]
fn destination_port_filter_counts_what_it_leaves_out() {
    let mut bpf = Bpf::load_with_filter(KernelFilter {
        dst_port: DPORT,
        ..Default::default()
    });
    for fam in [V4, V6] {
        bpf.egress(&syn(fam.local_at(SPORT), fam.remote_at(80), ISN));
    }
    bpf.assert_untouched();
    bpf.assert_counters(&[(Counter::Filtered, 2)]);
    assert_eq!(bpf.syn_ports(), vec![], "filtered SYNs are not tallied");

    bpf.egress(&V4.syn(SPORT, ISN));
    assert_eq!(bpf.pending_all().len(), 1);
    bpf.assert_counters(&[(Counter::Filtered, 2), (Counter::SynSeen, 1)]);
}

#[test]
fn destination_network_filter_matches_prefixes() {
    let to = |dst: IpAddr| syn(V4.local_at(SPORT), SocketAddr::new(dst, DPORT), ISN);
    let mut net = [0u8; 16];
    net[..4].copy_from_slice(&[203, 0, 113, 0]);
    let mut bpf = Bpf::load_with_filter(KernelFilter {
        dst_family: FAMILY_V4,
        dst_prefix_len: 25,
        dst_net: net,
        ..Default::default()
    });
    // In 203.0.113.0/25: .20 and .127. Outside: .128, 203.0.114.20, and any IPv6.
    bpf.egress(&V4.syn(SPORT, ISN));
    bpf.egress(&to(Ipv4Addr::new(203, 0, 113, 127).into()));
    bpf.egress(&to(Ipv4Addr::new(203, 0, 113, 128).into()));
    bpf.egress(&to(Ipv4Addr::new(203, 0, 114, 20).into()));
    bpf.egress(&V6.syn(SPORT, ISN));
    assert_eq!(bpf.pending_all().len(), 2);
    bpf.assert_counters(&[(Counter::SynSeen, 2), (Counter::Filtered, 3)]);

    let mut bpf = Bpf::load_with_filter(KernelFilter {
        dst_family: FAMILY_V6,
        dst_prefix_len: 48,
        dst_net: Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0).octets(),
        ..Default::default()
    });
    bpf.egress(&V6.syn(SPORT, ISN));
    bpf.egress(&syn(
        V6.local_at(SPORT),
        SocketAddr::new(ROUTER6.into(), DPORT),
        ISN,
    ));
    bpf.egress(&V4.syn(SPORT, ISN));
    assert_eq!(
        bpf.pending_all()
            .into_iter()
            .map(|(k, _)| k)
            .collect::<Vec<_>>(),
        vec![V6.key(SPORT)]
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
    each_family(|fam| {
        // The server took the data (ack = isn + 1 + len) or only the SYN (ack = isn + 1).
        for took in [true, false] {
            let mut bpf = Bpf::load();
            let key = fam.key(SPORT);
            bpf.egress(&fam.outbound(&[], &tfo_syn(SPORT, ISN, 300)));
            let p = bpf.pending(&key).expect("the Fast Open SYN is tracked");
            assert_eq!(p.data_len, 300);
            let ack = if took { ISN + 1 + 300 } else { ISN + 1 };
            // Acknowledging part of the data is no answer to this SYN.
            bpf.ingress(&fam.answer(SPORT, TCP_SYN | TCP_ACK, ISN + 1 + 299));
            bpf.ingress(&fam.answer(SPORT, TCP_SYN | TCP_ACK, ack));
            let ev = bpf.events();
            assert_eq!(
                ev.iter().map(|e| e.kind).collect::<Vec<_>>(),
                [EventKind::Syn, EventKind::Answered],
                "data taken {took}"
            );
            assert_eq!(ev[1].raw.pending.data_len, 300);
            assert_eq!(bpf.pending_all(), vec![]);
            bpf.assert_counters(&[
                (Counter::SynSeen, 1),
                (Counter::SynAckMismatch, 1),
                (Counter::SynAckMatched, 1),
            ]);
        }
    });
}

#[test]
fn tfo_retransmitted_without_data_still_accepts_the_data_ack() {
    let mut bpf = Bpf::load();
    bpf.egress(&V4.outbound(&[], &tfo_syn(SPORT, ISN, 40)));
    bpf.egress(&V4.syn(SPORT, ISN));
    let key = V4.key(SPORT);
    let p = bpf.pending(&key).unwrap();
    assert_eq!((p.syns, p.data_len), (2, 40));
    bpf.ingress(&V4.answer(SPORT, TCP_RST | TCP_ACK, ISN + 41));
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
    bpf.egress_l3(&bare_ip(&V4.syn(SPORT, ISN)));
    bpf.egress_l3(&bare_ip(&V6.syn(SPORT, ISN)));
    bpf.egress_l3(&bare_ip(&V4.syn(SPORT + 1, ISN)));
    assert_eq!(bpf.pending_all().len(), 3);
    bpf.ingress_l3(&bare_ip(&V4.answer(SPORT, TCP_SYN | TCP_ACK, ISN + 1)));
    bpf.ingress_l3(&bare_ip(&V6.answer(SPORT, TCP_RST | TCP_ACK, ISN + 1)));
    bpf.ingress_l3(&bare_ip(&V4.icmp_error(SPORT + 1, ISN, (11, 0))));
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
    assert_eq!(ev[3].raw.key, V4.key(SPORT));
    assert_eq!(ev[4].raw.key, V6.key(SPORT));
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
    bpf.egress_l3(&bare_ip(&V4.outbound(&[], &data)));
    bpf.egress_l3(&bare_ip(&V6.outbound(&[], &data)));
    bpf.egress_l3(&Ipv4::new(LOCAL4, REMOTE4, IPPROTO_UDP).build(&udp(SPORT, DPORT, b"hello")));
    bpf.egress_l3(&V4.syn(SPORT, ISN));
    let syn = bare_ip(&V4.syn(SPORT, ISN));
    bpf.egress_l3(&syn[..syn.len() - 1]);
    assert_eq!(bpf.pending_all(), vec![]);
    assert_eq!(bpf.events(), vec![]);
    bpf.assert_counters(&[(Counter::Truncated, 1)]);
}

/// A CPU whose logs are full (user space fell behind) counts in place, as the kernel did
/// before the logs: the answer in its book, the SYN's port in the shared tally. Nothing is
/// lost, and the kernel itself knows a repeated SYN-ACK of an answer in a book.
#[test]
fn a_full_log_falls_back_to_the_books() {
    // One CPU, so that one CPU's logs fill.
    pin_to_cpu(0);
    let cpus = aya::util::nr_cpus().expect("the possible CPUs") as u32;
    let slots = u16::try_from(netrace_common::log::log_slots(cpus)).unwrap();
    each_family(|fam| {
        let mut bpf = Bpf::load_books();
        // Exactly as many as a log holds, then one more.
        let base = 20_000;
        for i in 0..=slots {
            bpf.egress(&fam.syn(base + i, ISN));
            bpf.ingress(&fam.answer(base + i, TCP_SYN | TCP_ACK, ISN + 1));
        }
        let n = u64::from(slots) + 1;
        assert_eq!(bpf.events(), Vec::new(), "nothing sent");
        assert_eq!(bpf.counter(Counter::AnsweredBooked), n);
        assert_eq!(bpf.counter(Counter::AnsweredLogged), n - 1);
        let mut books = Vec::new();
        bpf.maps.books.walk_into(&mut books).unwrap();
        let last = base + slots;
        let in_books: Vec<(u16, u32)> = books
            .iter()
            .flat_map(|(bk, book)| {
                book.answered
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| **n > 0)
                    .map(|(i, n)| ((usize::from(bk.port_group) * BOOK_PORTS + i) as u16, *n))
            })
            .collect();
        assert_eq!(
            in_books,
            vec![(last, 1)],
            "the answer the log had no room for"
        );
        let logged = bpf.answer_logs();
        assert_eq!(logged.len(), usize::from(slots));
        assert!(logged.iter().zip(base..).all(|(r, p)| r.src_port == p));
        // The shared tally holds the last SYN's port, the logs the others: every port once.
        assert_eq!(bpf.maps.syn_ports.get(&u32::from(last), 0).unwrap(), 1);
        let tally = bpf.syn_ports();
        assert_eq!(tally.len(), usize::from(slots) + 1);
        assert!(tally.iter().all(|(_, n)| *n == 1));
        // A repeat of the booked answer: the kernel knows it.
        bpf.ingress(&fam.answer(last, TCP_SYN | TCP_ACK, ISN + 1));
        assert_eq!(bpf.events(), Vec::new());
        assert_eq!(bpf.counter(Counter::SynAckRepeated), 1);
        // Read, the logs take records again.
        bpf.egress(&fam.syn(base - 1, ISN));
        bpf.ingress(&fam.answer(base - 1, TCP_SYN | TCP_ACK, ISN + 1));
        assert_eq!(bpf.counter(Counter::AnsweredLogged), n);
        assert_eq!(bpf.answer_logs().len(), 1);
    });
}

/// As `watch` runs by default: a new SYN sends nothing, an answered SYN is appended to the
/// CPU's answer log (its book, source port) for user space to count, its round trip counted
/// in the kernel, and sends nothing either; refused, unreachable and a late answer (to an
/// entry user space marked lost) are still events.
#[test]
fn books_count_answers_without_events() {
    each_family(|fam| {
        let mut bpf = Bpf::load_books();
        let key = fam.key(SPORT);
        bpf.egress(&fam.syn(SPORT, ISN));
        assert_eq!(bpf.events(), Vec::new(), "no event for a new SYN");
        assert_eq!(bpf.pending_all().len(), 1);
        bpf.ingress(&fam.answer(SPORT, TCP_SYN | TCP_ACK, ISN + 1));
        assert_eq!(bpf.events(), Vec::new(), "no event for a booked answer");
        assert_eq!(bpf.pending_all(), Vec::new());
        let logged = bpf.answer_logs();
        assert_eq!(logged.len(), 1, "{logged:?}");
        let r = logged[0];
        assert_eq!(r.book, BookKey::of(&key, r.book.ifindex));
        assert_eq!(r.src_port, SPORT);
        let mut books = Vec::new();
        bpf.maps.books.walk_into(&mut books).unwrap();
        assert_eq!(books, Vec::new(), "the log had room: no book");
        assert_eq!(bpf.maps.books.rtt().iter().sum::<u64>(), 1);
        assert_eq!(bpf.syn_ports(), vec![(SPORT, 1)], "the SYN's port, logged");
        bpf.assert_counters(&[
            (Counter::SynSeen, 1),
            (Counter::SynAckMatched, 1),
            (Counter::AnsweredBooked, 1),
            (Counter::AnsweredLogged, 1),
        ]);

        // The server repeats the SYN-ACK (our ACK was lost): no entry, and no book holds the
        // answer, so it goes to user space as unmatched; user space knows the answer from the
        // log and counts a repeat (`tracker.repeated_synacks`), not a sign of translation.
        bpf.ingress(&fam.answer(SPORT, TCP_SYN | TCP_ACK, ISN + 1));
        one_event(&mut bpf, EventKind::UnmatchedSynAck);
        assert_eq!(bpf.counter(Counter::SynAckUnmatched), 1);
        // One to a port nothing was answered on is unmatched, as with events.
        bpf.ingress(&fam.answer(SPORT + 7, TCP_SYN | TCP_ACK, ISN + 1));
        one_event(&mut bpf, EventKind::UnmatchedSynAck);

        // Refused: an event.
        bpf.egress(&fam.syn(SPORT + 1, ISN));
        bpf.ingress(&fam.answer(SPORT + 1, TCP_RST | TCP_ACK, ISN + 1));
        one_event(&mut bpf, EventKind::Refused);

        // An entry user space marked lost: its answer is an event, not booked.
        bpf.egress(&fam.syn(SPORT + 2, ISN));
        let lost_key = fam.key(SPORT + 2);
        let mut p = bpf.pending(&lost_key).unwrap();
        p.state = STATE_LOST;
        let taken = PendingMap::take(&mut bpf.maps.pending, &lost_key);
        assert!(taken.is_some());
        assert_eq!(
            PendingMap::put_back(&mut bpf.maps.pending, &lost_key, &p),
            PutBack::Done
        );
        assert_eq!(
            PendingMap::put_back(&mut bpf.maps.pending, &lost_key, &p),
            PutBack::Taken,
            "put back only where there is no entry"
        );
        bpf.ingress(&fam.answer(SPORT + 2, TCP_SYN | TCP_ACK, ISN + 1));
        let ev = one_event(&mut bpf, EventKind::Answered);
        assert_eq!(ev.raw.pending.state, STATE_LOST);
        assert_eq!(bpf.counter(Counter::AnsweredBooked), 1);
        // Taking an entry that is gone finds nothing (the kernel took it first).
        assert_eq!(PendingMap::take(&mut bpf.maps.pending, &lost_key), None);
    });
}
