//! The tracker against a model of the kernel side: a pending map of bounded size that SYNs
//! fill and answers empty exactly as `netrace-ebpf` does, a ring buffer of bounded size that
//! drops (and counts) what does not fit, and user space draining, adopting, sweeping and
//! finishing as `watch.rs` does, in an order the input chooses. Every connection attempt the
//! model made has a known fate; the tracker's outcomes must agree with it:
//!
//! - an outcome always belongs to a real attempt, at most one final outcome per attempt, and a
//!   late answer only after a lost one;
//! - without ring-buffer drops the accounting is exact: answered as answered (or lost, then
//!   late), superseded as abandoned (or lost first), timed out as lost, young ones counted as
//!   waiting at exit, nothing adopted, nothing "answered unseen";
//! - with drops, nothing the tracker heard of vanishes without being counted somewhere.
#![no_main]

use std::collections::{HashMap, VecDeque};

use libfuzzer_sys::{arbitrary::Unstructured, fuzz_target};
use netrace::{
    kernel::events::Event,
    track::tracker::{Outcome, OutcomeKind, PendingMap, Tracker},
};
use netrace_common::{
    EventKind, FlowKey, OutcomeEvent, PendingSyn, FAMILY_V4, FAMILY_V6, OUTCOME_EVENT_SIZE,
};

const SYN_TIMEOUT: u64 = 3_000_000_000;
const LATE_WINDOW: u64 = 60_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Pending,
    Answered(EventKind),
    Superseded,
    /// User space removed the kernel entry (end of the late window).
    RemovedByUser,
    /// The pending map was full.
    NotTracked,
}

#[derive(Debug)]
struct Attempt {
    key: FlowKey,
    isn: u32,
    first_ns: u64,
    fate: Fate,
    syn_delivered: bool,
}

#[derive(Default)]
struct Kernel {
    map: HashMap<FlowKey, PendingSyn>,
    cap: usize,
    /// Events and, for SYN events, the attempt they announce.
    ring: VecDeque<(OutcomeEvent, Option<usize>)>,
    ring_cap: usize,
    ring_drops: u64,
    attempts: Vec<Attempt>,
    current: HashMap<FlowKey, usize>,
    next_isn: u32,
}

impl PendingMap for Kernel {
    fn get(&self, key: &FlowKey) -> Option<PendingSyn> {
        self.map.get(key).copied()
    }
    fn remove(&mut self, key: &FlowKey) {
        if self.map.remove(key).is_some() {
            if let Some(i) = self.current.remove(key) {
                self.attempts[i].fate = Fate::RemovedByUser;
            }
        }
    }
    fn scan(&self) -> Vec<(FlowKey, PendingSyn)> {
        self.map.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

impl Kernel {
    fn emit(
        &mut self,
        kind: EventKind,
        key: FlowKey,
        p: PendingSyn,
        now: u64,
        attempt: Option<usize>,
    ) {
        if self.ring.len() >= self.ring_cap {
            self.ring_drops += 1;
            return;
        }
        let ev = OutcomeEvent {
            kind: kind as u32,
            ifindex: 1,
            key,
            pending: p,
            ts_ns: now,
            icmp_type: if kind == EventKind::Unreachable { 3 } else { 0 },
            icmp_code: if kind == EventKind::Unreachable { 1 } else { 0 },
            _pad: [0; 6],
        };
        self.ring.push_back((ev, attempt));
    }

    fn new_attempt(&mut self, key: FlowKey, isn: u32, now: u64) -> (usize, PendingSyn) {
        let p = PendingSyn {
            first_ns: now,
            last_ns: now,
            isn,
            syns: 1,
            ifindex: 1,
            data_len: 0,
        };
        self.attempts.push(Attempt {
            key,
            isn,
            first_ns: now,
            fate: Fate::Pending,
            syn_delivered: false,
        });
        (self.attempts.len() - 1, p)
    }

    /// `on_syn` of netrace-ebpf. `retransmit`: repeat the pending entry's ISN if there is one.
    fn syn(&mut self, key: FlowKey, retransmit: bool, now: u64) {
        if let Some(e) = self.map.get(&key).copied() {
            if retransmit {
                let e = self.map.get_mut(&key).expect("present");
                e.syns = e.syns.saturating_add(1);
                e.last_ns = now;
                return;
            }
            let isn = self.fresh_isn();
            self.emit(EventKind::Superseded, key, e, now, None);
            if let Some(i) = self.current.get(&key) {
                self.attempts[*i].fate = Fate::Superseded;
            }
            let (i, p) = self.new_attempt(key, isn, now);
            self.map.insert(key, p);
            self.current.insert(key, i);
            self.emit(EventKind::Syn, key, p, now, Some(i));
            return;
        }
        let isn = self.fresh_isn();
        let (i, p) = self.new_attempt(key, isn, now);
        if self.map.len() >= self.cap {
            self.attempts[i].fate = Fate::NotTracked;
            return;
        }
        self.map.insert(key, p);
        self.current.insert(key, i);
        self.emit(EventKind::Syn, key, p, now, Some(i));
    }

    /// `on_answer` of netrace-ebpf, for an answer that matches (a mismatch changes nothing).
    fn answer(&mut self, key: FlowKey, kind: EventKind, now: u64) {
        let Some(p) = self.map.remove(&key) else {
            return;
        };
        if let Some(i) = self.current.remove(&key) {
            self.attempts[i].fate = Fate::Answered(kind);
        }
        self.emit(kind, key, p, now, None);
    }

    /// ISNs are never reused on a 4-tuple (RFC 6528 makes them grow with time); they start
    /// just below the wrap.
    fn fresh_isn(&mut self) -> u32 {
        let isn = self.next_isn;
        self.next_isn = self.next_isn.wrapping_add(1);
        isn
    }
}

fn key(n: u8) -> FlowKey {
    FlowKey {
        family: if n % 2 == 0 { FAMILY_V4 } else { FAMILY_V6 },
        src_port: 1000 + u16::from(n),
        dst_port: 443,
        ..Default::default()
    }
}

fn bytes_of(ev: &OutcomeEvent) -> Vec<u8> {
    // SAFETY: OutcomeEvent is repr(C) plain data without implicit padding.
    unsafe {
        std::slice::from_raw_parts((ev as *const OutcomeEvent).cast::<u8>(), OUTCOME_EVENT_SIZE)
    }
    .to_vec()
}

fn drain(k: &mut Kernel, t: &mut Tracker, out: &mut Vec<Outcome>, max: usize) {
    for _ in 0..max {
        let Some((ev, attempt)) = k.ring.pop_front() else {
            return;
        };
        if let Some(i) = attempt {
            k.attempts[i].syn_delivered = true;
        }
        let ev = Event::try_from(bytes_of(&ev).as_slice()).expect("a model event decodes");
        t.on_event(&ev, out);
        assert!(t.pending() <= t.held());
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let mut k = Kernel {
        cap: u.int_in_range(1..=6usize).unwrap_or(4),
        ring_cap: u.int_in_range(1..=64usize).unwrap_or(64),
        next_isn: u32::MAX - u.int_in_range(0..=3u32).unwrap_or(0),
        ..Kernel::default()
    };
    // Near the end of u64 or not, the clock must not matter.
    let mut now: u64 = if u.arbitrary::<bool>().unwrap_or(false) {
        u64::MAX - 1_000_000_000_000_000
    } else {
        1_000_000_000
    };
    let mut t = Tracker::new(SYN_TIMEOUT, LATE_WINDOW);
    let mut out: Vec<Outcome> = Vec::new();
    let mut seen_drops = 0;
    let trace = std::env::var_os("NETRACE_FUZZ_TRACE").is_some();
    while !u.is_empty() {
        now += 1;
        let op = u.int_in_range(0..=5u8).unwrap_or(0);
        if trace {
            eprintln!(
                "now {now} op {op}: map {:?} ring {} drops {} out {:?}",
                k.map.values().map(|p| p.isn).collect::<Vec<_>>(),
                k.ring.len(),
                k.ring_drops,
                out.iter()
                    .map(|o| (o.key.src_port, o.pending.isn, o.kind))
                    .collect::<Vec<_>>()
            );
        }
        match op {
            0 => {
                let n = u.int_in_range(0..=3u8).unwrap_or(0);
                let retransmit = u.arbitrary::<bool>().unwrap_or(false);
                k.syn(key(n), retransmit, now);
            }
            1 => {
                let n = u.int_in_range(0..=3u8).unwrap_or(0);
                let kind = match u.int_in_range(0..=5u8).unwrap_or(0) {
                    0 => EventKind::Refused,
                    1 => EventKind::Unreachable,
                    _ => EventKind::Answered,
                };
                k.answer(key(n), kind, now);
            }
            2 => {
                now += match u.int_in_range(0..=4u8).unwrap_or(0) {
                    0 => 1_000_000,
                    1 => 500_000_000,
                    2 => 2_000_000_000,
                    3 => 61_000_000_000,
                    _ => u64::from(u.arbitrary::<u32>().unwrap_or(0)),
                };
            }
            3 => {
                let max = u.int_in_range(1..=8usize).unwrap_or(1);
                drain(&mut k, &mut t, &mut out, max);
            }
            // A tick of watch.rs: drain what is in the ring, adopt after drops, sweep.
            4 => {
                drain(&mut k, &mut t, &mut out, usize::MAX);
                if k.ring_drops > seen_drops {
                    seen_drops = k.ring_drops;
                    t.adopt(&k);
                }
                t.sweep(now, &mut k, &mut out);
            }
            _ => {
                // The ring buffer frees up (user space is fast again).
                k.ring_cap = k.ring_cap.max(u.int_in_range(1..=64usize).unwrap_or(1));
            }
        }
        assert!(t.pending() <= t.held());
    }
    // The end of a run: detach, drain, finish.
    drain(&mut k, &mut t, &mut out, usize::MAX);
    let fates: Vec<Fate> = k.attempts.iter().map(|a| a.fate).collect();
    let waiting_at_exit = t.finish(now, &mut k, &mut out);
    assert_eq!(t.held(), 0);

    // Attribute every outcome to its attempt.
    let index: HashMap<(FlowKey, u32, u64), usize> = k
        .attempts
        .iter()
        .enumerate()
        .map(|(i, a)| ((a.key, a.isn, a.first_ns), i))
        .collect();
    let mut kinds: Vec<Vec<OutcomeKind>> = vec![Vec::new(); k.attempts.len()];
    for o in &out {
        let i = *index
            .get(&(o.key, o.pending.isn, o.pending.first_ns))
            .unwrap_or_else(|| panic!("an outcome for no attempt: {o:?}"));
        kinds[i].push(o.kind);
    }
    let drops = k.ring_drops > 0;
    let stats = t.stats;
    if trace {
        for (i, a) in k.attempts.iter().enumerate() {
            eprintln!(
                "{} isn {} first {} fate {:?} delivered {} outcomes {:?}",
                a.key.src_port, a.isn, a.first_ns, fates[i], a.syn_delivered, kinds[i]
            );
        }
        eprintln!("stats {stats:?} waiting {waiting_at_exit}");
    }
    let mut unaccounted = 0u64;
    let mut young = 0u64;
    for (i, a) in k.attempts.iter().enumerate() {
        use OutcomeKind::*;
        let ks = kinds[i].as_slice();
        let ctx = || {
            format!(
                "attempt {a:?} fate {:?}: outcomes {ks:?} (drops {})",
                fates[i], k.ring_drops
            )
        };
        let shape_ok = matches!(
            ks,
            [] | [Answered] | [Refused] | [Unreachable] | [Lost] | [Abandoned] | [Lost, Late]
        );
        assert!(shape_ok, "{}", ctx());
        let ok = match fates[i] {
            Fate::Answered(kind) => {
                let want = match kind {
                    EventKind::Refused => Refused,
                    EventKind::Unreachable => Unreachable,
                    _ => Answered,
                };
                ks == [want]
                    || ks == [Lost, Late]
                    // Both its answer and a later SYN on the 4-tuple dropped: indistinguishable
                    // from a superseded attempt (reported abandoned), or its answer dropped
                    // after it was reported lost.
                    || (drops && matches!(ks, [] | [Lost] | [Abandoned]))
            }
            Fate::Superseded => matches!(ks, [Abandoned] | [Lost]) || (drops && ks.is_empty()),
            Fate::RemovedByUser => ks == [Lost],
            Fate::Pending => {
                let age = now - a.first_ns;
                if age >= SYN_TIMEOUT {
                    ks == [Lost] || (drops && ks.is_empty())
                } else {
                    young += 1;
                    ks.is_empty()
                }
            }
            Fate::NotTracked => ks.is_empty(),
        };
        assert!(ok, "{}", ctx());
        let final_outcome = ks.iter().any(|k| *k != Late);
        if a.syn_delivered && !final_outcome {
            unaccounted += 1;
        }
    }
    if drops {
        assert!(
            unaccounted <= stats.answered_unseen + waiting_at_exit,
            "{unaccounted} attempts the tracker heard of ended without an outcome, but only \
             {} answered unseen + {waiting_at_exit} waiting were counted",
            stats.answered_unseen
        );
    } else {
        assert_eq!(stats.answered_unseen, 0);
        assert_eq!(stats.adopted, 0);
        assert_eq!(waiting_at_exit, young);
    }
});
