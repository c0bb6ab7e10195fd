//! The tracker fed arbitrary event sequences (any bytes that decode), sweeps at arbitrary
//! times (up to the limits of u64), adoptions and finishes, over a pending map the input
//! edits at will. It must never panic, never hold more waiting entries than entries, report a
//! late answer only for a connection it reported lost, and leave nothing behind after finish.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::{arbitrary::Unstructured, fuzz_target};
use netrace::{
    kernel::events::Event,
    ports::PortRange,
    track::stats::Histogram,
    track::tracker::{MemoryMap, Outcome, OutcomeKind, Tracker},
};
use netrace_common::{FlowKey, PendingSyn, FAMILY_V4, FAMILY_V6, OUTCOME_EVENT_SIZE};

/// A small key space, so that events collide.
fn key(u: &mut Unstructured) -> FlowKey {
    let n = u.int_in_range(0..=3u8).unwrap_or(0);
    FlowKey {
        family: if n % 2 == 0 { FAMILY_V4 } else { FAMILY_V6 },
        src_port: 1000 + u16::from(n),
        dst_port: 443,
        ..Default::default()
    }
}

fn time(u: &mut Unstructured) -> u64 {
    match u.int_in_range(0..=3u8).unwrap_or(0) {
        0 => u.int_in_range(0..=10_000_000_000u64).unwrap_or(0),
        1 => u64::MAX - u.int_in_range(0..=10_000_000_000u64).unwrap_or(0),
        _ => u.arbitrary().unwrap_or(0),
    }
}

fn check(t: &Tracker, out: &[Outcome], lost: &mut HashSet<(FlowKey, u32)>) {
    assert!(t.pending() <= t.held());
    for o in out {
        match o.kind {
            OutcomeKind::Lost => {
                lost.insert((o.key, o.pending.isn));
            }
            OutcomeKind::Late => assert!(
                lost.contains(&(o.key, o.pending.isn)),
                "late answer for a connection never reported lost: {o:?}"
            ),
            _ => {}
        }
        if o.kind == OutcomeKind::Lost || o.kind == OutcomeKind::Abandoned {
            assert!(o.rtt_ns.is_none());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let timeout = u.int_in_range(1..=10_000_000_000u64).unwrap_or(1);
    let late = u.arbitrary::<u64>().unwrap_or(0);
    let mut t = Tracker::new(timeout, late);
    let mut map = MemoryMap::default();
    let mut hist = Histogram::new(PortRange::new(32768, 65535), &[1024, 8192, 16384, 49152]);
    let mut out = Vec::new();
    let mut lost = HashSet::new();
    let mut seen = 0;
    while !u.is_empty() {
        match u.int_in_range(0..=6u8).unwrap_or(0) {
            // An arbitrary record, as the ring buffer would hand it over.
            0 => {
                let mut raw = [0u8; OUTCOME_EVENT_SIZE];
                let _ = u.fill_buffer(&mut raw);
                if let Ok(ev) = Event::try_from(&raw[..]) {
                    t.on_event(&ev, &mut out);
                }
            }
            // A structured record on the small key space.
            1 => {
                let mut raw = [0u8; OUTCOME_EVENT_SIZE];
                let _ = u.fill_buffer(&mut raw);
                raw[..4].copy_from_slice(&u.int_in_range(1..=8u32).unwrap_or(1).to_ne_bytes());
                if let Ok(mut ev) = Event::try_from(&raw[..]) {
                    ev.raw.key = key(&mut u);
                    ev.raw.pending.isn = u.int_in_range(0..=3u32).unwrap_or(0);
                    ev.raw.pending.first_ns = time(&mut u);
                    ev.raw.ts_ns = time(&mut u);
                    t.on_event(&ev, &mut out);
                }
            }
            2 => t.sweep(time(&mut u), &mut map, &mut out),
            3 => t.adopt(&map),
            4 => {
                let k = key(&mut u);
                let p = PendingSyn {
                    first_ns: time(&mut u),
                    last_ns: time(&mut u),
                    isn: u.int_in_range(0..=3u32).unwrap_or(0),
                    syns: u.arbitrary().unwrap_or(1),
                    ..Default::default()
                };
                map.0.insert(k, p);
            }
            5 => {
                let k = key(&mut u);
                map.0.remove(&k);
            }
            _ => {
                let held = t.held() as u64;
                let waiting = t.finish(time(&mut u), &mut map, &mut out);
                assert!(waiting <= held);
                assert_eq!(t.held(), 0);
                assert_eq!(t.pending(), 0);
            }
        }
        check(&t, &out[seen as usize..], &mut lost);
        for o in &out[seen as usize..] {
            hist.add(o.key.src_port, o.kind);
        }
        seen = out.len() as u64;
    }
    let total = hist.totals;
    assert_eq!(
        total.attempts,
        total.answered + total.lost + total.refused + total.unreachable
    );
});
