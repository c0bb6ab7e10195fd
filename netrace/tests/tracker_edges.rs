//! The tracker at its edges (docs/reliability.md, case 15 and the fuzzing): kernel timestamps
//! near the end of u64 and sequence numbers at the wrap. Pure user space, no privileges.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;

use netrace::{
    kernel::events::Event,
    track::tracker::{MemoryMap, OutcomeKind, Tracker},
};
use netrace_common::{
    pairing::{self, MemorySink, MemoryTable},
    parse::{Answer, Parsed},
    Counter, EventKind, FlowKey, PendingSyn, STATE_LOST,
};

const S: u64 = 1_000_000_000;

/// An IPv4 connection from local port `port` to a server's port 443.
fn key(port: u16) -> FlowKey {
    support::bpf::key(
        SocketAddr::from(([198, 51, 100, 10], port)),
        SocketAddr::from(([203, 0, 113, 20], 443)),
    )
}

/// A first SYN sent at `first` with `isn`.
fn pending(first: u64, isn: u32) -> PendingSyn {
    PendingSyn::first(first, isn, 0)
}

/// `bpf_ktime_get_ns` counts from boot and will not reach u64::MAX, but nothing in the tracker
/// may overflow if it did: ages, round-trip times and the late window near the limit.
#[test]
fn timestamps_near_the_end_of_u64() {
    let base = u64::MAX - 10 * S;
    let mut t = Tracker::new(3 * S, 60 * S);
    let mut m = MemoryMap::default();
    let mut out = Vec::new();
    let (a, b) = (key(1), key(2));
    let (pa, pb) = (pending(base, 7), pending(base, 9));
    m.0.insert(b, pb);
    t.on_event(&Event::new(EventKind::Answered, a, pa, u64::MAX), &mut out);
    assert_eq!(out[0].kind, OutcomeKind::Answered);
    assert_eq!(out[0].rtt_ns, Some(10 * S));
    // A clock behind the kernel's timestamps (it never is) ages nothing.
    t.sweep(0, &mut m, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(t.pending(), 1);
    t.sweep(u64::MAX, &mut m, &mut out);
    assert_eq!(out[1].kind, OutcomeKind::Lost);
    assert_eq!(t.pending(), 0);
    assert_eq!(
        t.held(),
        1,
        "kept for the late window, which cannot end before u64::MAX"
    );
    assert_eq!(m.0[&b].state, STATE_LOST);
    // An answer stamped before the SYN (impossible) is not a negative round trip.
    let lost = m.0.remove(&b).unwrap();
    t.on_event(&Event::new(EventKind::Answered, b, lost, 0), &mut out);
    assert_eq!(out[2].kind, OutcomeKind::Late);
    assert_eq!(out[2].rtt_ns, Some(0));
    assert_eq!(t.finish(u64::MAX, &mut m, &mut out), 0);
    assert_eq!(t.held(), 0);
}

/// The pairing rules do the `isn + 1` arithmetic: an entry whose ISN is 0xffffffff is matched
/// by the answer acknowledging 0, and not by one acknowledging 0xffffffff.
#[test]
fn isn_at_the_wrap() {
    let mut table = MemoryTable::default();
    let mut sink = MemorySink::default();
    let k = key(3);
    let syn = Parsed::Syn {
        key: k,
        isn: u32::MAX,
        data_len: 0,
    };
    pairing::on_packet(&mut table, &mut sink, None, &syn);
    let answer = |ack| Parsed::Answer {
        key: k,
        ack,
        answer: Answer::SynAck,
    };
    pairing::on_packet(&mut table, &mut sink, None, &answer(u32::MAX));
    assert_eq!(table.map.len(), 1, "0xffffffff still waits");
    pairing::on_packet(&mut table, &mut sink, None, &answer(0));
    assert!(table.map.is_empty());
    let mut t = Tracker::new(3 * S, 60 * S);
    let mut out = Vec::new();
    for raw in sink.take_events() {
        let kind = EventKind::from_u32(raw.kind).unwrap();
        t.on_event(&Event { kind, raw }, &mut out);
    }
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].kind, OutcomeKind::Answered);
    assert_eq!(out[0].pending.isn, u32::MAX);
    assert_eq!(sink.counter(Counter::SynAckMismatch), 1);
}
