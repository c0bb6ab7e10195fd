//! The IPv4 pending table against the real kernel programs (`BPF_PROG_TEST_RUN`): a table far
//! too small for the SYNs sent, so buckets fill and keys live in the buckets after their own.
//! Every SYN is either in the table or counted as refused; every entry is found again by its
//! answer, by user space's take and put-back, and nothing is left behind. Needs root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
};

use netrace::track::tracker::{PendingMap as _, PutBack};
use netrace_common::{table, Counter, FlowKey, KernelFilter, STATE_LOST};
use netrace_lab::wire::{answer, syn, TCP_ACK, TCP_SYN};
use support::bpf::Bpf;

const ISN: u32 = 9_000;
/// Room for at least 64 entries: 16 buckets of 8 slots.
const MAX_PENDING: u32 = 64;

fn tuple(i: u16) -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::from((Ipv4Addr::new(198, 18, 1, (i % 7) as u8 + 1), 1024 + i)),
        SocketAddr::from((Ipv4Addr::new(198, 19, 0, 20), 443)),
    )
}

#[test]
fn a_crowded_table_finds_every_entry_it_took_and_counts_the_rest() {
    let mut bpf = Bpf::load_sized(KernelFilter::default(), MAX_PENDING);
    let slots = table::buckets_for(MAX_PENDING) as usize * table::WAYS;
    assert_eq!(bpf.maps.pending.v4.capacity(), slots);
    let tuples: Vec<_> = (0..400).map(tuple).collect();
    for (from, to) in &tuples {
        bpf.egress(&syn(*from, *to, ISN));
    }
    let refused = bpf.counter(Counter::PendingMapFull);
    let held: HashSet<FlowKey> = bpf.pending_all().into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        held.len() as u64 + refused,
        tuples.len() as u64,
        "in the table or counted"
    );
    assert!(
        (MAX_PENDING as usize..=slots).contains(&held.len()),
        "{} entries in {slots} slots",
        held.len()
    );
    assert!(
        bpf.maps.pending.v4.spilled() > 0,
        "no key went to a next bucket"
    );

    // A retransmission finds its entry wherever it lives.
    for (from, to) in &tuples {
        bpf.egress(&syn(*from, *to, ISN));
    }
    assert_eq!(
        bpf.counter(Counter::SynRetransmit),
        held.len() as u64,
        "each held entry's SYN again is a retransmission"
    );

    // User space takes each entry and puts it back marked lost.
    for k in &held {
        let p = bpf.maps.pending.take(k).expect("taken");
        assert_eq!(p.isn, ISN);
        assert_eq!(bpf.maps.pending.take(k), None, "taken once");
        let back = netrace_common::PendingSyn {
            state: STATE_LOST,
            ..p
        };
        assert_eq!(bpf.maps.pending.put_back(k, &back), PutBack::Done);
        assert_eq!(bpf.maps.pending.put_back(k, &back), PutBack::Taken);
    }
    assert!(bpf.pending_all().iter().all(|(_, p)| p.state == STATE_LOST));

    // Every answer finds its entry: the table ends empty, with no spill count left over.
    for (from, to) in &tuples {
        bpf.ingress(&answer(*from, *to, TCP_SYN | TCP_ACK, ISN + 1));
    }
    assert_eq!(bpf.counter(Counter::SynAckMatched), held.len() as u64);
    assert_eq!(bpf.pending_all(), Vec::new());
    assert_eq!(bpf.maps.pending.v4.spilled(), 0);

    // And it holds as many again.
    for (from, to) in &tuples {
        bpf.egress(&syn(*from, *to, ISN + 1));
    }
    assert_eq!(bpf.pending_all().len(), held.len());
    assert_eq!(bpf.maps.pending.errors, 0);
}
