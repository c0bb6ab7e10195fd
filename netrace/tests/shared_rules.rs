//! The kernel's parsing and pairing rules (`netrace_common::{parse, pairing}`) run in user space
//! over packets with capture timestamps, their events fed to the same tracker `watch` uses:
//! the path `netrace analyze` takes. Pure user space, no privileges.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;

use netrace::{
    kernel::events::Event,
    track::tracker::{MemoryMap, OutcomeKind, Tracker},
};
use netrace_common::{
    pairing::{on_packet, MemorySink},
    parse::{parse, Direction, Link},
    EventKind,
};
use netrace_lab::wire::*;

const MS: u64 = 1_000_000;
const S: u64 = 1_000 * MS;
const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// A capture's packets through the rules and the tracker, sweeping as capture time passes.
struct Replay {
    map: MemoryMap,
    sink: MemorySink,
    tracker: Tracker,
    outcomes: Vec<netrace::track::tracker::Outcome>,
}

impl Replay {
    fn new() -> Self {
        Self {
            map: MemoryMap::default(),
            sink: MemorySink::default(),
            tracker: Tracker::new(3 * S, 60 * S),
            outcomes: Vec::new(),
        }
    }

    fn packet(&mut self, ts: u64, dir: Direction, frame: &[u8]) {
        self.tracker.sweep(ts, &mut self.map, &mut self.outcomes);
        self.sink.now = ts;
        self.sink.ifindex = 2;
        if let Ok(p) = parse(frame, Link::Ethernet, dir) {
            on_packet(&mut self.map.0, &mut self.sink, None, &p);
        }
        for raw in self.sink.take_events() {
            let kind = EventKind::from_u32(raw.kind).unwrap();
            self.tracker
                .on_event(&Event { kind, raw }, &mut self.outcomes);
        }
    }

    fn kinds_by_port(&self) -> Vec<(u16, OutcomeKind)> {
        let mut v: Vec<_> = self
            .outcomes
            .iter()
            .map(|o| (o.key.src_port, o.kind))
            .collect();
        v.sort_by_key(|(p, _)| *p);
        v
    }
}

#[test]
fn a_capture_replayed_through_the_kernel_rules_and_the_tracker() {
    use Direction::{Egress, Ingress};
    let syn = |port, isn| syn((LOCAL, port).into(), (REMOTE, 443).into(), isn);
    let synack = |port, ack| {
        answer(
            (LOCAL, port).into(),
            (REMOTE, 443).into(),
            TCP_SYN | TCP_ACK,
            ack,
        )
    };
    let mut tfo = Tcp::syn(40_005, 443, 500);
    tfo.options
        .extend_from_slice(&[34, 10, 1, 2, 3, 4, 5, 6, 7, 8]);
    tfo.payload = vec![1; 200];
    let tfo = tcp4(&[], &Ipv4::new(LOCAL, REMOTE, IPPROTO_TCP), &tfo);

    let mut r = Replay::new();
    r.packet(0, Egress, &syn(40_001, 100));
    r.packet(MS, Egress, &syn(40_002, 200));
    r.packet(2 * MS, Egress, &syn(40_003, 300));
    r.packet(3 * MS, Egress, &syn(40_004, 400));
    r.packet(4 * MS, Egress, &tfo);
    r.packet(10 * MS, Ingress, &synack(40_001, 101));
    // Fragmentation needed does not end the attempt; time exceeded does.
    r.packet(
        11 * MS,
        Ingress,
        &icmp_error(
            ROUTER.into(),
            ((LOCAL, 40_004).into(), (REMOTE, 443).into()),
            400,
            3,
            4,
        ),
    );
    r.packet(
        12 * MS,
        Ingress,
        &icmp_error(
            ROUTER.into(),
            ((LOCAL, 40_003).into(), (REMOTE, 443).into()),
            300,
            11,
            0,
        ),
    );
    r.packet(14 * MS, Ingress, &synack(40_005, 500 + 1 + 200));
    // 40_002 retransmits at 1 s, and is answered only at 5 s: after the 3 s timeout.
    r.packet(S + MS, Egress, &syn(40_002, 200));
    r.packet(4 * S, Egress, &syn(40_004, 400));
    r.packet(5 * S, Ingress, &synack(40_002, 201));
    r.packet(7 * S, Egress, &syn(40_009, 900));

    assert_eq!(
        r.kinds_by_port(),
        vec![
            (40_001, OutcomeKind::Answered),
            (40_002, OutcomeKind::Lost),
            (40_002, OutcomeKind::Late),
            (40_003, OutcomeKind::Unreachable),
            (40_004, OutcomeKind::Lost),
            (40_005, OutcomeKind::Answered),
        ]
    );
    let unreachable = r
        .outcomes
        .iter()
        .find(|o| o.kind == OutcomeKind::Unreachable)
        .unwrap();
    assert_eq!(unreachable.rtt_ns, Some(10 * MS));
    assert_eq!(unreachable.icmp, Some((11, 0)));
    let lost = r
        .outcomes
        .iter()
        .find(|o| o.key.src_port == 40_002 && o.kind == OutcomeKind::Lost)
        .unwrap();
    assert_eq!(
        lost.pending.syns, 2,
        "the retransmission is the same attempt"
    );
    let mut more = Vec::new();
    let waiting = r.tracker.finish(7 * S + MS, &mut r.map, &mut more);
    assert_eq!((waiting, more), (1, vec![]), "40_009 is still waiting");
}
