//! The tracker fed arbitrary event sequences (any bytes that decode), sweeps at arbitrary
//! times (up to the limits of u64), `forget`s and finishes, over a pending map (the kernel's)
//! the input edits at will, entries waiting or marked lost. It must never panic; after each
//! sweep no waiting entry older than the SYN timeout and no lost one older than the late window
//! is left in the map, and the waiting count is the number of waiting entries left; a late
//! answer comes only for a connection it reported lost (or from an entry the map itself marks
//! lost).
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::{arbitrary::Unstructured, fuzz_target};
use netrace::{
    kernel::events::Event,
    ports::PortRange,
    track::stats::Histogram,
    track::tracker::{MemoryMap, Outcome, OutcomeKind, Tracker},
};
use netrace_common::{
    FlowKey, PendingSyn, FAMILY_V4, FAMILY_V6, OUTCOME_EVENT_SIZE, STATE_LOST, STATE_WAITING,
};

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

/// After a sweep at `now`: what is left in the map is young (or lost by this sweep), and
/// counted.
fn check_swept(
    t: &Tracker,
    before: &MemoryMap,
    map: &MemoryMap,
    now: u64,
    timeout: u64,
    late: u64,
) {
    let mut waiting = 0;
    for (k, p) in &map.0 {
        let age = now.saturating_sub(p.first_ns);
        match p.state {
            STATE_WAITING => {
                assert!(age < timeout, "an expired waiting entry left: {k:?} {p:?}");
                waiting += 1;
            }
            STATE_LOST => assert!(
                age < late || before.0.get(k).is_some_and(|b| b.state == STATE_WAITING),
                "an expired lost entry left: {k:?} {p:?}"
            ),
            _ => {}
        }
    }
    assert_eq!(t.pending(), waiting);
}

fn check(out: &[Outcome], lost: &mut HashSet<(FlowKey, u32)>) {
    for o in out {
        match o.kind {
            OutcomeKind::Lost => {
                lost.insert((o.key, o.pending.isn));
            }
            OutcomeKind::Late => assert!(
                o.pending.state == STATE_LOST || lost.contains(&(o.key, o.pending.isn)),
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
    // The tracker's own late window is never shorter than the SYN timeout.
    let late = late.max(timeout);
    let mut map = MemoryMap::default();
    let mut hist = Histogram::new(PortRange::new(32768, 65535), &[1024, 8192, 16384, 49152]);
    let mut out = Vec::new();
    let mut lost = HashSet::new();
    let mut seen = 0;
    let trace = std::env::var_os("NETRACE_FUZZ_TRACE").is_some();
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
                    if trace {
                        eprintln!("event {:?} {:?}", ev.kind, ev.raw);
                    }
                    t.on_event(&ev, &mut out);
                }
            }
            2 => {
                let now = time(&mut u);
                let before = map.clone();
                if trace {
                    eprintln!("sweep at {now}: map {:?}", map.0);
                }
                t.sweep(now, &mut map, &mut out);
                if trace {
                    eprintln!("  -> map {:?} pending {} out {:?}", map.0, t.pending(), out);
                }
                check_swept(&t, &before, &map, now, timeout, late);
            }
            3 => {
                let k = key(&mut u);
                let isn = u.int_in_range(0..=3u32).unwrap_or(0);
                let before = map.0.get(&k).copied();
                let forgot = t.forget(&k, isn, &mut map);
                let waiting = before.is_some_and(|p| p.isn == isn && p.state == STATE_WAITING);
                assert_eq!(forgot, waiting);
                assert_eq!(map.0.get(&k).copied(), before.filter(|_| !forgot));
            }
            4 => {
                let k = key(&mut u);
                let p = PendingSyn {
                    first_ns: time(&mut u),
                    last_ns: time(&mut u),
                    isn: u.int_in_range(0..=3u32).unwrap_or(0),
                    syns: u.arbitrary().unwrap_or(1),
                    state: if u.arbitrary().unwrap_or(false) {
                        STATE_LOST
                    } else {
                        STATE_WAITING
                    },
                    ..Default::default()
                };
                // An entry marked lost stands for an attempt reported lost (only the sweep
                // puts such entries back): an answer to it, now or after the sweep retires
                // it, is late.
                if p.state == STATE_LOST {
                    lost.insert((k, p.isn));
                }
                map.0.insert(k, p);
            }
            5 => {
                let k = key(&mut u);
                map.0.remove(&k);
            }
            _ => {
                let now = time(&mut u);
                let before = map.clone();
                let waiting = t.finish(now, &mut map, &mut out);
                check_swept(&t, &before, &map, now, timeout, late);
                assert_eq!(waiting, t.pending() as u64);
            }
        }
        check(&out[seen as usize..], &mut lost);
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
