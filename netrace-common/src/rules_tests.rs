//! The shared parsing and pairing rules run in user space over byte slices: the same code the
//! kernel programs run over the skb (netrace/tests/parser.rs checks the kernel side through
//! `BPF_PROG_TEST_RUN` with the same packet builder, the lab's `netrace_lab::wire`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, Ipv6Addr};

use netrace_lab::wire::{self, *};

use crate::{
    pairing::{on_packet, MemorySink, MemoryTable},
    parse::{parse, Answer, Direction, Link, Parsed, Skip},
    Counter, EventKind, FlowKey, KernelFilter, FAMILY_V4, FAMILY_V6, MAX_IPV6_EXT_HEADERS,
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

use Direction::{Egress, Ingress};
use Link::{Ethernet, RawIp};

fn key4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> FlowKey {
    let mut k = FlowKey {
        family: FAMILY_V4,
        src_port: sport,
        dst_port: dport,
        ..Default::default()
    };
    k.src_addr[..4].copy_from_slice(&src.octets());
    k.dst_addr[..4].copy_from_slice(&dst.octets());
    k
}

fn key6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> FlowKey {
    FlowKey {
        family: FAMILY_V6,
        src_port: sport,
        dst_port: dport,
        src_addr: src.octets(),
        dst_addr: dst.octets(),
        ..Default::default()
    }
}

fn k4() -> FlowKey {
    key4(LOCAL4, SPORT, REMOTE4, DPORT)
}

fn k6() -> FlowKey {
    key6(LOCAL6, SPORT, REMOTE6, DPORT)
}

fn syn(key: FlowKey, isn: u32, data_len: u32) -> Result<Parsed, Skip> {
    Ok(Parsed::Syn { key, isn, data_len })
}

fn ans(key: FlowKey, ack: u32, answer: Answer) -> Result<Parsed, Skip> {
    Ok(Parsed::Answer { key, ack, answer })
}

fn unreach(key: FlowKey, ack: u32, icmp_type: u8, code: u8) -> Result<Parsed, Skip> {
    ans(key, ack, Answer::Unreachable { icmp_type, code })
}

/// Strips the Ethernet header: the same packet as a tun or WireGuard interface carries it.
fn raw(frame: &[u8]) -> Vec<u8> {
    frame[14..].to_vec()
}

fn tfo_syn(isn: u32, data: usize) -> Tcp {
    let mut t = Tcp::syn(SPORT, DPORT, isn);
    // The Fast Open cookie option (kind 34), then the data.
    t.options
        .extend_from_slice(&[34, 10, 1, 2, 3, 4, 5, 6, 7, 8]);
    t.payload = vec![0x47; data];
    t
}

fn icmp4_quoting_tcp_err(icmp_type: u8, code: u8) -> Vec<u8> {
    icmp_error(
        ROUTER4.into(),
        ((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into()),
        ISN,
        icmp_type,
        code,
    )
}

fn icmp6_quoting_tcp_err(icmp_type: u8, code: u8) -> Vec<u8> {
    icmp_error(
        ROUTER6.into(),
        ((LOCAL6, SPORT).into(), (REMOTE6, DPORT).into()),
        ISN,
        icmp_type,
        code,
    )
}

#[test]
fn parse_table() {
    let v4 = |tcp: &Tcp| tcp4(&[], &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP), tcp);
    let v6 = |tcp: &Tcp| tcp6(&[], &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP), tcp);
    let mut ecn = Tcp::syn(SPORT, DPORT, ISN);
    ecn.flags = TCP_SYN | TCP_ECE | TCP_CWR;
    let mut padded = v4(&Tcp::syn(SPORT, DPORT, ISN).without_options());
    padded.resize(60, 0); // Ethernet minimum frame: padding is not data
    let long_chain = vec![Ext::DestOpts { len8: 0 }; MAX_IPV6_EXT_HEADERS as usize + 1];
    let at_bound = vec![Ext::DestOpts { len8: 0 }; MAX_IPV6_EXT_HEADERS as usize];
    let v6_exts = [
        Ext::HopByHop { len8: 1 },
        Ext::Fragment {
            offset: 0,
            more: true,
        },
        Ext::Auth { len4: 4 },
        Ext::DestOpts { len8: 0 },
    ];

    type Case = (&'static str, Vec<u8>, Link, Direction, Result<Parsed, Skip>);
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        // Outbound SYNs.
        ("v4 syn", wire::syn((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into(), ISN), Ethernet, Egress, syn(k4(), ISN, 0)),
        ("v6 syn", wire::syn((LOCAL6, SPORT).into(), (REMOTE6, DPORT).into(), ISN), Ethernet, Egress, syn(k6(), ISN, 0)),
        ("ecn syn", v4(&ecn), Ethernet, Egress, syn(k4(), ISN, 0)),
        ("padded syn", padded, Ethernet, Egress, syn(k4(), ISN, 0)),
        ("v4 options", tcp4(&[], &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).option_bytes(40),
            &Tcp::syn(SPORT, DPORT, ISN)), Ethernet, Egress, syn(k4(), ISN, 0)),
        ("vlan", tcp4(&[dot1q(7)], &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP),
            &Tcp::syn(SPORT, DPORT, ISN)), Ethernet, Egress, syn(k4(), ISN, 0)),
        ("qinq v6", tcp6(&[dot1ad(8), dot1q(7)],
            &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP), &Tcp::syn(SPORT, DPORT, ISN)),
            Ethernet, Egress, syn(k6(), ISN, 0)),
        ("three tags", tcp4(&[dot1ad(1), dot1q(2), dot1q(3)],
            &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP), &Tcp::syn(SPORT, DPORT, ISN)),
            Ethernet, Egress, Err(Skip::Irrelevant)),
        ("v6 ext headers", tcp6(&[], &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP).exts(&v6_exts),
            &Tcp::syn(SPORT, DPORT, ISN)), Ethernet, Egress, syn(k6(), ISN, 0)),
        ("v6 chain at bound", tcp6(&[], &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP).exts(&at_bound),
            &Tcp::syn(SPORT, DPORT, ISN)), Ethernet, Egress, syn(k6(), ISN, 0)),
        ("v6 chain too long", tcp6(&[], &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP).exts(&long_chain),
            &Tcp::syn(SPORT, DPORT, ISN)), Ethernet, Egress, Err(Skip::Ipv6ChainTooLong)),
        ("syn on ingress", wire::syn((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into(), ISN), Ethernet, Ingress,
            Err(Skip::Irrelevant)),
        // TCP Fast Open: the data length comes from the IP header's length.
        ("tfo v4", v4(&tfo_syn(ISN, 100)), Ethernet, Egress, syn(k4(), ISN, 100)),
        ("tfo v6", v6(&tfo_syn(ISN, 1000)), Ethernet, Egress, syn(k6(), ISN, 1000)),
        ("tfo v6 ext headers", tcp6(&[], &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP).exts(&v6_exts),
            &tfo_syn(ISN, 33)), Ethernet, Egress, syn(k6(), ISN, 33)),
        ("tfo v4 options", tcp4(&[], &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).option_bytes(12),
            &tfo_syn(ISN, 7)), Ethernet, Egress, syn(k4(), ISN, 7)),
        // Answers.
        ("v4 synack", answer((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into(), TCP_SYN | TCP_ACK, ISN + 1),
            Ethernet, Ingress, ans(k4(), ISN + 1, Answer::SynAck)),
        ("v6 synack", answer((LOCAL6, SPORT).into(), (REMOTE6, DPORT).into(), TCP_SYN | TCP_ACK, ISN + 1),
            Ethernet, Ingress, ans(k6(), ISN + 1, Answer::SynAck)),
        ("v4 rst ack", answer((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into(), TCP_RST | TCP_ACK, ISN + 1),
            Ethernet, Ingress, ans(k4(), ISN + 1, Answer::Rst)),
        ("bare rst", answer((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into(), TCP_RST, ISN + 1),
            Ethernet, Ingress, Err(Skip::Irrelevant)),
        ("synack on egress", answer((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into(), TCP_SYN | TCP_ACK, ISN + 1),
            Ethernet, Egress, Err(Skip::Irrelevant)),
        ("plain ack", answer((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into(), TCP_ACK, ISN + 1),
            Ethernet, Ingress, Err(Skip::Irrelevant)),
        // ICMP errors quoting the SYN.
        ("port unreachable", icmp4_quoting_tcp_err(3, 3), Ethernet, Ingress, unreach(k4(), ISN, 3, 3)),
        ("host unreachable", icmp4_quoting_tcp_err(3, 1), Ethernet, Ingress, unreach(k4(), ISN, 3, 1)),
        ("frag needed", icmp4_quoting_tcp_err(3, 4), Ethernet, Ingress, Err(Skip::Irrelevant)),
        ("time exceeded", icmp4_quoting_tcp_err(11, 0), Ethernet, Ingress, unreach(k4(), ISN, 11, 0)),
        ("reassembly time exceeded", icmp4_quoting_tcp_err(11, 1), Ethernet, Ingress,
            unreach(k4(), ISN, 11, 1)),
        ("parameter problem", icmp4_quoting_tcp_err(12, 0), Ethernet, Ingress, unreach(k4(), ISN, 12, 0)),
        ("redirect", icmp4_quoting_tcp_err(5, 1), Ethernet, Ingress, Err(Skip::Irrelevant)),
        ("source quench", icmp4_quoting_tcp_err(4, 0), Ethernet, Ingress, Err(Skip::Irrelevant)),
        ("icmp on egress", icmp4_quoting_tcp_err(3, 3), Ethernet, Egress, Err(Skip::Irrelevant)),
        ("v6 unreachable", icmp6_quoting_tcp_err(1, 4), Ethernet, Ingress, unreach(k6(), ISN, 1, 4)),
        ("v6 packet too big", icmp6_quoting_tcp_err(2, 0), Ethernet, Ingress, Err(Skip::Irrelevant)),
        ("v6 time exceeded", icmp6_quoting_tcp_err(3, 0), Ethernet, Ingress, unreach(k6(), ISN, 3, 0)),
        ("v6 parameter problem", icmp6_quoting_tcp_err(4, 1), Ethernet, Ingress,
            unreach(k6(), ISN, 4, 1)),
        ("v6 echo reply", icmp6_quoting_tcp_err(129, 0), Ethernet, Ingress, Err(Skip::Irrelevant)),
        // No Ethernet header: tun, WireGuard, ipip, ppp.
        ("raw v4 syn", raw(&wire::syn((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into(), ISN)), RawIp, Egress,
            syn(k4(), ISN, 0)),
        ("raw v6 syn", raw(&wire::syn((LOCAL6, SPORT).into(), (REMOTE6, DPORT).into(), ISN)), RawIp, Egress,
            syn(k6(), ISN, 0)),
        ("raw tfo", raw(&v4(&tfo_syn(ISN, 5))), RawIp, Egress, syn(k4(), ISN, 5)),
        ("raw v4 synack", raw(&answer((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into(), TCP_SYN | TCP_ACK, ISN + 1)),
            RawIp, Ingress, ans(k4(), ISN + 1, Answer::SynAck)),
        ("raw v6 rst", raw(&answer((LOCAL6, SPORT).into(), (REMOTE6, DPORT).into(), TCP_RST | TCP_ACK, ISN + 1)),
            RawIp, Ingress, ans(k6(), ISN + 1, Answer::Rst)),
        ("raw time exceeded", raw(&icmp4_quoting_tcp_err(11, 0)), RawIp, Ingress,
            unreach(k4(), ISN, 11, 0)),
        ("raw v6 time exceeded", raw(&icmp6_quoting_tcp_err(3, 0)), RawIp, Ingress,
            unreach(k6(), ISN, 3, 0)),
        ("raw not ip", vec![0x50; 60], RawIp, Egress, Err(Skip::Irrelevant)),
        ("raw empty", vec![], RawIp, Egress, Err(Skip::Truncated)),
        ("ethernet frame read as raw", wire::syn((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into(), ISN), RawIp, Egress,
            Err(Skip::Irrelevant)),
        // Malformed and fragments.
        ("ihl 4", tcp4(&[], &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).ihl(4),
            &Tcp::syn(SPORT, DPORT, ISN)), Ethernet, Egress, Err(Skip::Malformed)),
        ("version 5 in v4 frame", tcp4(&[], &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).version(5),
            &Tcp::syn(SPORT, DPORT, ISN)), Ethernet, Egress, Err(Skip::Malformed)),
        ("doff 4", v4(&Tcp::syn(SPORT, DPORT, ISN).data_offset(4)), Ethernet, Egress,
            Err(Skip::Malformed)),
        ("v4 later fragment", tcp4(&[], &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).flags_frag(IP_MF | 185),
            &Tcp::syn(SPORT, DPORT, ISN)), Ethernet, Egress, Err(Skip::Fragment)),
        ("v4 first fragment", tcp4(&[], &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP).flags_frag(IP_MF),
            &Tcp::syn(SPORT, DPORT, ISN)), Ethernet, Egress, syn(k4(), ISN, 0)),
        ("v6 later fragment", tcp6(&[], &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP)
            .exts(&[Ext::Fragment { offset: 3, more: false }]), &Tcp::syn(SPORT, DPORT, ISN)),
            Ethernet, Egress, Err(Skip::Fragment)),
        ("udp", ethernet(&[], ETH_P_IP, &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_UDP).build(&udp(SPORT, DPORT, b"x"))),
            Ethernet, Egress, Err(Skip::Irrelevant)),
        ("arp", arp_request(LOCAL4, REMOTE4), Ethernet, Egress, Err(Skip::Irrelevant)),
    ];
    let mut failed = Vec::new();
    for (name, bytes, link, dir, want) in &cases {
        let got = parse(&bytes[..], *link, *dir);
        if got != *want {
            failed.push(format!("{name}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// Every proper prefix of a packet the parser needs whole is truncated, exactly as in the
/// kernel (where `BPF_PROG_TEST_RUN` cannot feed the shortest prefixes).
#[test]
fn every_prefix_is_truncated() {
    let bare = || Tcp::syn(SPORT, DPORT, ISN).without_options();
    let cases: Vec<(Vec<u8>, Link, Direction)> = vec![
        (
            tcp4(&[], &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP), &bare()),
            Ethernet,
            Egress,
        ),
        (
            wire::syn((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into(), ISN),
            Ethernet,
            Egress,
        ),
        (
            tcp6(
                &[dot1ad(200), dot1q(100)],
                &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP)
                    .exts(&[Ext::HopByHop { len8: 0 }, Ext::Routing { len8: 1 }]),
                &bare(),
            ),
            Ethernet,
            Egress,
        ),
        (
            answer(
                (LOCAL4, SPORT).into(),
                (REMOTE4, DPORT).into(),
                TCP_SYN | TCP_ACK,
                ISN + 1,
            ),
            Ethernet,
            Ingress,
        ),
        (icmp4_quoting_tcp_err(11, 0), Ethernet, Ingress),
        // ICMPv6: the parser needs the quoted IPv6 header and 8 bytes of TCP.
        (
            icmp6_quoting_tcp_err(3, 0)[..14 + 40 + 8 + 40 + 8].to_vec(),
            Ethernet,
            Ingress,
        ),
        (
            raw(&wire::syn(
                (LOCAL6, SPORT).into(),
                (REMOTE6, DPORT).into(),
                ISN,
            )),
            RawIp,
            Egress,
        ),
        (raw(&icmp4_quoting_tcp_err(3, 3)), RawIp, Ingress),
    ];
    for (full, link, dir) in cases {
        assert!(
            parse(&full[..], link, dir).is_ok(),
            "the whole packet parses"
        );
        for len in 0..full.len() {
            assert_eq!(
                parse(&full[..len], link, dir),
                Err(Skip::Truncated),
                "{len}-byte prefix of {}",
                full.len()
            );
        }
    }
}

/// The pairing rules over an in-memory table, fed parsed packets with explicit times.
struct Rig {
    table: MemoryTable,
    sink: MemorySink,
    filter: Option<KernelFilter>,
}

impl Rig {
    fn new() -> Self {
        Self {
            table: MemoryTable::default(),
            sink: MemorySink::default(),
            filter: None,
        }
    }

    fn packet(&mut self, t: u64, link: Link, dir: Direction, bytes: &[u8]) {
        self.sink.now = t;
        self.sink.ifindex = 3;
        match parse(bytes, link, dir) {
            Ok(p) => on_packet(&mut self.table, &mut self.sink, self.filter.as_ref(), &p),
            Err(skip) => {
                if let Some(c) = skip.counter() {
                    self.sink.counters[c as usize] += 1;
                }
            }
        }
    }

    fn out(&mut self, t: u64, bytes: &[u8]) {
        self.packet(t, Ethernet, Egress, bytes);
    }

    fn back(&mut self, t: u64, bytes: &[u8]) {
        self.packet(t, Ethernet, Ingress, bytes);
    }

    fn kinds(&mut self) -> Vec<(EventKind, u8, u8)> {
        self.sink
            .take_events()
            .into_iter()
            .map(|e| {
                (
                    EventKind::from_u32(e.kind).unwrap(),
                    e.icmp_type,
                    e.icmp_code,
                )
            })
            .collect()
    }
}

use EventKind::{Answered, Refused, Superseded, Syn, Unreachable};

#[test]
fn pairing_table() {
    let syn4p = |isn| wire::syn((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into(), isn);
    let syn6p = |isn| wire::syn((LOCAL6, SPORT).into(), (REMOTE6, DPORT).into(), isn);
    let tfo4 = |isn, n| {
        tcp4(
            &[],
            &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP),
            &tfo_syn(isn, n),
        )
    };
    let tfo6 = |isn, n| {
        tcp6(
            &[],
            &Ipv6::new(LOCAL6, REMOTE6, IPPROTO_TCP),
            &tfo_syn(isn, n),
        )
    };
    let a4 = |flags, ack| answer((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into(), flags, ack);
    let a6 = |flags, ack| answer((LOCAL6, SPORT).into(), (REMOTE6, DPORT).into(), flags, ack);
    const SA: u8 = TCP_SYN | TCP_ACK;
    const RA: u8 = TCP_RST | TCP_ACK;

    // (name, packets: (egress?, bytes), events expected, entries left)
    type Case = (
        &'static str,
        Vec<(bool, Vec<u8>)>,
        Vec<(EventKind, u8, u8)>,
        usize,
    );
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("v4 answered", vec![(true, syn4p(ISN)), (false, a4(SA, ISN + 1))],
            vec![(Syn, 0, 0), (Answered, 0, 0)], 0),
        ("v6 answered", vec![(true, syn6p(ISN)), (false, a6(SA, ISN + 1))],
            vec![(Syn, 0, 0), (Answered, 0, 0)], 0),
        ("ack wraps", vec![(true, syn4p(u32::MAX)), (false, a4(SA, 0))],
            vec![(Syn, 0, 0), (Answered, 0, 0)], 0),
        ("wrong ack", vec![(true, syn4p(ISN)), (false, a4(SA, ISN + 2)), (false, a4(SA, ISN))],
            vec![(Syn, 0, 0)], 1),
        ("duplicate synack", vec![(true, syn4p(ISN)), (false, a4(SA, ISN + 1)), (false, a4(SA, ISN + 1))],
            vec![(Syn, 0, 0), (Answered, 0, 0)], 0),
        ("refused", vec![(true, syn4p(ISN)), (false, a4(RA, ISN + 1))],
            vec![(Syn, 0, 0), (Refused, 0, 0)], 0),
        ("v6 refused", vec![(true, syn6p(ISN)), (false, a6(RA, ISN + 1))],
            vec![(Syn, 0, 0), (Refused, 0, 0)], 0),
        ("retransmits then answer", vec![(true, syn4p(ISN)), (true, syn4p(ISN)), (true, syn4p(ISN)),
            (false, a4(SA, ISN + 1))], vec![(Syn, 0, 0), (Answered, 0, 0)], 0),
        ("superseded", vec![(true, syn4p(ISN)), (true, syn4p(ISN + 99)), (false, a4(SA, ISN + 1))],
            vec![(Syn, 0, 0), (Superseded, 0, 0), (Syn, 0, 0)], 1),
        ("answer without syn", vec![(false, a4(SA, ISN + 1))], vec![], 0),
        // ICMP errors.
        ("port unreachable", vec![(true, syn4p(ISN)), (false, icmp4_quoting_tcp_err(3, 3))],
            vec![(Syn, 0, 0), (Unreachable, 3, 3)], 0),
        ("time exceeded", vec![(true, syn4p(ISN)), (false, icmp4_quoting_tcp_err(11, 0))],
            vec![(Syn, 0, 0), (Unreachable, 11, 0)], 0),
        ("parameter problem", vec![(true, syn4p(ISN)), (false, icmp4_quoting_tcp_err(12, 2))],
            vec![(Syn, 0, 0), (Unreachable, 12, 2)], 0),
        ("frag needed does not end it", vec![(true, syn4p(ISN)), (false, icmp4_quoting_tcp_err(3, 4)),
            (false, a4(SA, ISN + 1))], vec![(Syn, 0, 0), (Answered, 0, 0)], 0),
        ("v6 packet too big does not end it", vec![(true, syn6p(ISN)), (false, icmp6_quoting_tcp_err(2, 0)),
            (false, a6(SA, ISN + 1))], vec![(Syn, 0, 0), (Answered, 0, 0)], 0),
        ("v6 time exceeded", vec![(true, syn6p(ISN)), (false, icmp6_quoting_tcp_err(3, 0))],
            vec![(Syn, 0, 0), (Unreachable, 3, 0)], 0),
        ("v6 parameter problem", vec![(true, syn6p(ISN)), (false, icmp6_quoting_tcp_err(4, 0))],
            vec![(Syn, 0, 0), (Unreachable, 4, 0)], 0),
        ("icmp quoting another isn", vec![(true, syn4p(ISN + 1)), (false, icmp4_quoting_tcp_err(11, 0))],
            vec![(Syn, 0, 0)], 1),
        // TCP Fast Open.
        ("tfo data acked", vec![(true, tfo4(ISN, 100)), (false, a4(SA, ISN + 1 + 100))],
            vec![(Syn, 0, 0), (Answered, 0, 0)], 0),
        ("tfo data not acked", vec![(true, tfo4(ISN, 100)), (false, a4(SA, ISN + 1))],
            vec![(Syn, 0, 0), (Answered, 0, 0)], 0),
        ("tfo v6", vec![(true, tfo6(ISN, 1200)), (false, a6(SA, ISN + 1 + 1200))],
            vec![(Syn, 0, 0), (Answered, 0, 0)], 0),
        ("tfo refused", vec![(true, tfo4(ISN, 10)), (false, a4(RA, ISN + 11))],
            vec![(Syn, 0, 0), (Refused, 0, 0)], 0),
        ("tfo wraps", vec![(true, tfo4(u32::MAX - 5, 10)), (false, a4(SA, 5))],
            vec![(Syn, 0, 0), (Answered, 0, 0)], 0),
        ("tfo other length", vec![(true, tfo4(ISN, 100)), (false, a4(SA, ISN + 1 + 99))],
            vec![(Syn, 0, 0)], 1),
        ("tfo retransmitted bare, data acked", vec![(true, tfo4(ISN, 100)), (true, syn4p(ISN)),
            (false, a4(SA, ISN + 101))], vec![(Syn, 0, 0), (Answered, 0, 0)], 0),
        ("no data, no tfo ack", vec![(true, syn4p(ISN)), (false, a4(SA, ISN + 1 + 100))],
            vec![(Syn, 0, 0)], 1),
    ];
    let mut failed = Vec::new();
    for (name, packets, want, left) in cases {
        let mut rig = Rig::new();
        for (i, (egress, bytes)) in packets.iter().enumerate() {
            let t = 1_000 * (i as u64 + 1);
            if *egress {
                rig.out(t, bytes);
            } else {
                rig.back(t, bytes);
            }
        }
        let got = rig.kinds();
        if got != want || rig.table.map.len() != left {
            failed.push(format!(
                "{name}: events {got:?} (want {want:?}), {} entries left (want {left})",
                rig.table.map.len()
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn pairing_records_and_counts_as_the_kernel_does() {
    let mut rig = Rig::new();
    let key = k4();
    rig.out(
        10,
        &wire::syn((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into(), ISN),
    );
    rig.out(
        20,
        &wire::syn((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into(), ISN),
    );
    let p = rig.table.map[&key];
    assert_eq!(
        (p.first_ns, p.last_ns, p.isn, p.syns, p.ifindex, p.data_len),
        (10, 20, ISN, 2, 3, 0)
    );
    rig.back(
        25,
        &answer(
            (LOCAL4, SPORT).into(),
            (REMOTE4, DPORT).into(),
            TCP_SYN | TCP_ACK,
            ISN + 7,
        ),
    );
    rig.back(
        30,
        &answer(
            (LOCAL4, SPORT).into(),
            (REMOTE4, DPORT).into(),
            TCP_SYN | TCP_ACK,
            ISN + 1,
        ),
    );
    let ev = rig.sink.take_events();
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[0].kind, Syn as u32);
    assert_eq!(ev[0].ts_ns, 10);
    assert_eq!(ev[0].pending.syns, 1);
    assert_eq!(ev[1].kind, Answered as u32);
    assert_eq!(ev[1].key, key);
    assert_eq!(ev[1].ts_ns, 30);
    assert_eq!(ev[1].ifindex, 3);
    assert_eq!(
        ev[1].pending, p,
        "the answer carries the entry as it was when answered"
    );
    let c = |x| rig.sink.counter(x);
    assert_eq!(
        (
            c(Counter::SynSeen),
            c(Counter::SynRetransmit),
            c(Counter::SynAckMismatch),
            c(Counter::SynAckMatched)
        ),
        (2, 1, 1, 1)
    );
    assert_eq!(rig.sink.syn_ports.get(&SPORT), Some(&2));

    // A Fast Open SYN records its data length.
    let mut rig = Rig::new();
    rig.out(
        1,
        &tcp4(
            &[],
            &Ipv4::new(LOCAL4, REMOTE4, IPPROTO_TCP),
            &tfo_syn(ISN, 64),
        ),
    );
    assert_eq!(rig.table.map[&key].data_len, 64);
    assert_eq!(rig.sink.take_events()[0].pending.data_len, 64);
}

#[test]
fn pairing_filter_and_full_map() {
    let mut rig = Rig::new();
    rig.filter = Some(KernelFilter {
        dst_port: 80,
        ..Default::default()
    });
    rig.out(
        1,
        &wire::syn((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into(), ISN),
    );
    assert!(rig.table.map.is_empty());
    assert_eq!(rig.sink.counter(Counter::Filtered), 1);
    assert_eq!(rig.sink.counter(Counter::SynSeen), 0);
    rig.out(
        2,
        &wire::syn((LOCAL4, SPORT).into(), (REMOTE4, 80).into(), ISN),
    );
    assert_eq!(rig.table.map.len(), 1);

    // A /24 of the remote address.
    let mut net = [0u8; 16];
    net[..4].copy_from_slice(&[203, 0, 113, 0]);
    let mut rig = Rig::new();
    rig.filter = Some(KernelFilter {
        dst_family: FAMILY_V4,
        dst_prefix_len: 24,
        dst_net: net,
        ..Default::default()
    });
    rig.out(
        1,
        &wire::syn((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into(), ISN),
    );
    rig.out(
        1,
        &wire::syn((LOCAL4, SPORT).into(), (ROUTER4, DPORT).into(), ISN),
    );
    rig.out(
        1,
        &wire::syn((LOCAL6, SPORT).into(), (REMOTE6, DPORT).into(), ISN),
    );
    assert_eq!(
        rig.table.map.keys().copied().collect::<Vec<_>>(),
        vec![k4()]
    );
    assert_eq!(rig.sink.counter(Counter::Filtered), 2);

    let mut rig = Rig::new();
    rig.table.max_entries = 1;
    rig.out(
        1,
        &wire::syn((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into(), ISN),
    );
    rig.out(
        1,
        &wire::syn((LOCAL4, SPORT + 1).into(), (REMOTE4, DPORT).into(), ISN),
    );
    assert_eq!(rig.table.map.len(), 1);
    assert_eq!(rig.sink.counter(Counter::PendingMapFull), 1);
    assert_eq!(rig.kinds(), vec![(Syn, 0, 0)]);
}

#[test]
fn pairing_over_raw_ip() {
    let mut rig = Rig::new();
    rig.packet(
        1,
        RawIp,
        Egress,
        &raw(&wire::syn(
            (LOCAL6, SPORT).into(),
            (REMOTE6, DPORT).into(),
            ISN,
        )),
    );
    rig.packet(
        2,
        RawIp,
        Ingress,
        &raw(&answer(
            (LOCAL6, SPORT).into(),
            (REMOTE6, DPORT).into(),
            TCP_SYN | TCP_ACK,
            ISN + 1,
        )),
    );
    rig.packet(
        3,
        RawIp,
        Egress,
        &raw(&wire::syn(
            (LOCAL4, SPORT).into(),
            (REMOTE4, DPORT).into(),
            ISN,
        )),
    );
    rig.packet(4, RawIp, Ingress, &raw(&icmp4_quoting_tcp_err(11, 0)));
    assert_eq!(
        rig.kinds(),
        vec![
            (Syn, 0, 0),
            (Answered, 0, 0),
            (Syn, 0, 0),
            (Unreachable, 11, 0)
        ]
    );
    assert!(rig.table.map.is_empty());
}

#[test]
fn arphrd_types() {
    assert_eq!(Link::from_arphrd(1), Some(Ethernet));
    for t in [65534, 768, 769, 512] {
        assert_eq!(Link::from_arphrd(t), Some(RawIp), "type {t}");
    }
    // ARPHRD_IPGRE (778) may carry a header of its own; IEEE 802.11 radiotap (803) surely does.
    assert_eq!(Link::from_arphrd(778), None);
    assert_eq!(Link::from_arphrd(803), None);
}

#[test]
fn icmp_names() {
    use crate::parse::icmp_name;
    assert_eq!(icmp_name(false, 3, 3), "port unreachable");
    assert_eq!(icmp_name(false, 11, 0), "time to live exceeded in transit");
    assert_eq!(icmp_name(false, 12, 0), "parameter problem");
    assert_eq!(icmp_name(true, 1, 4), "port unreachable");
    assert_eq!(icmp_name(true, 3, 0), "hop limit exceeded in transit");
    assert_eq!(icmp_name(true, 4, 1), "parameter problem");
}

/// A pending table whose every bucket stays locked (its holder held up).
struct LockedTable;

impl crate::pairing::PendingTable for LockedTable {
    fn modify<R, F: FnOnce(&mut crate::PendingSyn) -> R>(
        &mut self,
        _: &FlowKey,
        _: F,
    ) -> Option<R> {
        None
    }
    fn get(&self, _: &FlowKey) -> Option<crate::PendingSyn> {
        None
    }
    fn insert_new(&mut self, _: &FlowKey, _: &crate::PendingSyn) -> crate::pairing::Insert {
        crate::pairing::Insert::Busy
    }
    fn remove(&mut self, _: &FlowKey) -> bool {
        false
    }
}

/// A SYN whose bucket stayed locked is untracked like one that found the map full (so the
/// sums of what was tracked hold), and counted apart as well (a bigger map would not help).
#[test]
fn a_syn_meeting_a_locked_bucket_is_counted_untracked_and_busy() {
    let mut sink = MemorySink::default();
    let syn = wire::syn((LOCAL4, SPORT).into(), (REMOTE4, DPORT).into(), ISN);
    let parsed = parse(syn.as_slice(), Ethernet, Egress).expect("a SYN");
    on_packet(&mut LockedTable, &mut sink, None, &parsed);
    assert_eq!(sink.counter(Counter::SynSeen), 1);
    assert_eq!(sink.counter(Counter::PendingMapFull), 1);
    assert_eq!(sink.counter(Counter::TableBusy), 1);
    assert!(sink.take_events().is_empty());
}
