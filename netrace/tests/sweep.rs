//! The sweep against the real kernel maps: entries made by the egress program itself
//! (`BPF_PROG_TEST_RUN`), answers by the ingress program, the map walked in batches and each
//! expired entry taken and put back marked lost, as `watch` does. Needs root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    collections::HashSet,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
};

use netrace::{
    report::monotonic_ns,
    track::tracker::{OutcomeKind, Tracker},
};
use netrace_common::{Counter, EventKind, FlowKey, KernelFilter, STATE_LOST, STATE_WAITING};
use netrace_lab::wire::{answer, syn, TCP_ACK, TCP_SYN};
use support::bpf::{key, Bpf};

const S: u64 = 1_000_000_000;
const ISN: u32 = 7_000;

fn v4(port: u16) -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::from((Ipv4Addr::new(198, 18, 0, 10), port)),
        SocketAddr::from((Ipv4Addr::new(198, 19, 0, 20), 443)),
    )
}

fn v6(port: u16) -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10), port)),
        SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x20), 443)),
    )
}

fn events(bpf: &mut Bpf, t: &mut Tracker, out: &mut Vec<netrace::track::tracker::Outcome>) {
    for ev in bpf.events() {
        t.on_event(&ev, out);
    }
}

/// More entries than one batch of the walk holds (4096), in both maps: every unanswered one is
/// reported lost exactly once, every answered one is not, and the lost ones stay in the kernel
/// marked lost, so that an answer now is late; after the late window the maps are empty. The
/// due entries found by the kernel's iterators (as `watch` does where they load), or by
/// walking the whole map in batches (the fallback).
#[test]
fn the_sweep_finds_due_entries_and_takes_what_it_reports() {
    sweep_case(true);
}

#[test]
fn the_sweep_walks_both_maps_in_batches_and_takes_what_it_reports() {
    sweep_case(false);
}

fn sweep_case(iterators: bool) {
    let mut bpf = Bpf::load_sized(KernelFilter::default(), 1 << 14);
    let mut tuples: Vec<(SocketAddr, SocketAddr)> = (1024..7024).map(v4).collect();
    tuples.extend((1024..1524).map(v6));
    for (from, to) in &tuples {
        bpf.egress(&syn(*from, *to, ISN));
    }
    // Every third one is answered: booked in the kernel, no event.
    for (from, to) in tuples.iter().step_by(3) {
        bpf.ingress(&answer(*from, *to, TCP_SYN | TCP_ACK, ISN + 1));
    }
    let answered = tuples.iter().step_by(3).count() as u64;
    assert_eq!(bpf.counter(Counter::AnsweredBooked), answered);
    let unanswered: HashSet<FlowKey> = tuples
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 0)
        .map(|(_, (f, t))| key(*f, *t))
        .collect();
    if iterators && bpf.maps.pending.expiry.is_none() {
        // Some kernels refuse tracing programs (EPERM before the verifier looks at an
        // instruction, under a policy netrace cannot change); `watch` then walks the maps,
        // which the other case tests.
        eprintln!("the kernel refused the sweep's iterators: only the batched walk is tested here");
        return;
    }
    if !iterators {
        bpf.maps.pending.expiry = None;
    }
    let now = monotonic_ns();
    let mut t = Tracker::new(S, 60 * S);
    let mut out = Vec::new();
    events(&mut bpf, &mut t, &mut out);
    assert!(out.is_empty(), "{out:?}");

    t.sweep(now, &mut bpf.maps.pending, &mut out);
    assert_eq!(t.pending(), unanswered.len(), "all still young");
    assert!(out.is_empty());

    t.sweep(now + 2 * S, &mut bpf.maps.pending, &mut out);
    let lost: Vec<FlowKey> = out
        .iter()
        .filter(|o| o.kind == OutcomeKind::Lost)
        .map(|o| o.key)
        .collect();
    assert_eq!(lost.len(), out.len());
    assert_eq!(lost.len(), unanswered.len(), "each lost once");
    assert_eq!(lost.iter().copied().collect::<HashSet<_>>(), unanswered);
    assert_eq!(t.pending(), 0);
    let all = bpf.pending_all();
    assert_eq!(all.len(), unanswered.len(), "kept for the late window");
    assert!(all.iter().all(|(_, p)| p.state == STATE_LOST));
    assert_eq!(bpf.maps.pending.errors, 0);

    // Reported once, however often it sweeps.
    t.sweep(now + 3 * S, &mut bpf.maps.pending, &mut out);
    assert_eq!(out.len(), unanswered.len());

    // A late answer is an event (never booked), and late.
    let (from, to) = tuples[1];
    bpf.ingress(&answer(from, to, TCP_SYN | TCP_ACK, ISN + 1));
    events(&mut bpf, &mut t, &mut out);
    assert_eq!(out.last().map(|o| o.kind), Some(OutcomeKind::Late));
    assert_eq!(bpf.counter(Counter::AnsweredBooked), answered);

    // A new attempt on a lost 4-tuple is waiting, not lost.
    let (from, to) = tuples[2];
    bpf.egress(&syn(from, to, ISN + 99));
    let fresh = bpf.pending(&key(from, to)).unwrap();
    assert_eq!((fresh.isn, fresh.state), (ISN + 99, STATE_WAITING));
    assert!(
        bpf.events().iter().all(|e| e.kind != EventKind::Superseded),
        "a lost attempt replaced is not abandoned"
    );

    // After the late window the lost entries are taken for good.
    t.sweep(now + 70 * S, &mut bpf.maps.pending, &mut out);
    let left = bpf.pending_all();
    assert_eq!(left.len(), 1, "only the new attempt: {left:?}");
    assert_eq!(t.held(), 0);
    let lost_again = out.iter().filter(|o| o.kind == OutcomeKind::Lost).count();
    assert_eq!(
        lost_again,
        unanswered.len() + 1,
        "the new attempt, lost once"
    );
}
