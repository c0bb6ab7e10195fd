//! The tracker at its edges (docs/reliability.md, case 15 and the fuzzing): kernel timestamps
//! near the end of u64, sequence numbers at the wrap, and a SYN event that replaces a waiting
//! entry whose Superseded event was dropped. Pure user space, no privileges.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;

use netrace::{
    kernel::events::Event,
    track::tracker::{MemoryMap, OutcomeKind, Tracker},
};
use netrace_common::{EventKind, FlowKey, PendingSyn};

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
    t.on_event(&Event::new(EventKind::Syn, a, pa, base), &mut out);
    t.on_event(&Event::new(EventKind::Syn, b, pb, base), &mut out);
    t.on_event(&Event::new(EventKind::Answered, a, pa, u64::MAX), &mut out);
    assert_eq!(out[0].kind, OutcomeKind::Answered);
    assert_eq!(out[0].rtt_ns, Some(10 * S));
    // A clock behind the kernel's timestamps (it never is) ages nothing.
    t.sweep(0, &mut m, &mut out);
    assert_eq!(out.len(), 1);
    t.sweep(u64::MAX, &mut m, &mut out);
    assert_eq!(out[1].kind, OutcomeKind::Lost);
    assert_eq!(t.pending(), 0);
    assert_eq!(
        t.held(),
        1,
        "kept for the late window, which cannot end before u64::MAX"
    );
    // An answer stamped before the SYN (impossible) is not a negative round trip.
    t.on_event(&Event::new(EventKind::Answered, b, pb, 0), &mut out);
    assert_eq!(out[2].kind, OutcomeKind::Late);
    assert_eq!(out[2].rtt_ns, Some(0));
    assert_eq!(t.finish(u64::MAX, &mut m, &mut out), 0);
    assert_eq!(t.held(), 0);
}

/// The tracker compares ISNs only for equality; the kernel does the `isn + 1` arithmetic.
/// An entry whose ISN is 0xffffffff is matched by its answer, not mistaken for another.
#[test]
fn isn_at_the_wrap() {
    let mut t = Tracker::new(3 * S, 60 * S);
    let mut out = Vec::new();
    let k = key(3);
    let p = pending(S, u32::MAX);
    t.on_event(&Event::new(EventKind::Syn, k, p, S), &mut out);
    t.on_event(
        &Event::new(EventKind::Answered, k, pending(S, 0), S + 1),
        &mut out,
    );
    assert_eq!(
        out[0].kind,
        OutcomeKind::Answered,
        "another attempt's answer"
    );
    assert_eq!(t.pending(), 1, "0xffffffff still waits");
    t.on_event(&Event::new(EventKind::Answered, k, p, S + 2), &mut out);
    assert_eq!(out[1].kind, OutcomeKind::Answered);
    assert_eq!(out[1].pending.isn, u32::MAX);
    assert_eq!(t.held(), 0);
}

/// Found by the `tracker_model` fuzz target: a waiting entry replaced by a SYN event with
/// another ISN, its Superseded event dropped (ring buffer full), used to vanish without any
/// outcome. It is reported abandoned, as `sweep` reports a replaced kernel entry.
#[test]
fn replaced_entry_whose_superseded_event_was_dropped_is_abandoned() {
    let mut t = Tracker::new(3 * S, 60 * S);
    let mut m = MemoryMap::default();
    let mut out = Vec::new();
    let k = key(4);
    let old = pending(S, 10);
    let new = pending(2 * S, 11);
    t.on_event(&Event::new(EventKind::Syn, k, old, S), &mut out);
    // (Superseded for `old` dropped.)
    t.on_event(&Event::new(EventKind::Syn, k, new, 2 * S), &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].kind, OutcomeKind::Abandoned);
    assert_eq!(out[0].pending, old);
    // The same attempt adopted first and then announced is not a replacement.
    let adopted = pending(3 * S, 12);
    let k2 = key(5);
    m.0.insert(k2, adopted);
    t.adopt(&m);
    t.on_event(&Event::new(EventKind::Syn, k2, adopted, 3 * S), &mut out);
    assert_eq!(out.len(), 1);
    m.0.remove(&k2);
    t.on_event(
        &Event::new(EventKind::Answered, k2, adopted, 3 * S + 5),
        &mut out,
    );
    t.on_event(
        &Event::new(EventKind::Answered, k, new, 2 * S + 5),
        &mut out,
    );
    let kinds: Vec<_> = out.iter().map(|o| o.kind).collect();
    assert_eq!(
        kinds,
        [
            OutcomeKind::Abandoned,
            OutcomeKind::Answered,
            OutcomeKind::Answered
        ]
    );
    assert_eq!(t.held(), 0);
}
