//! The tracker against a model of the kernel side, in an order the input chooses:
//!
//! - the kernel: the real pairing rules (`netrace_common::pairing`) over a pending map of
//!   bounded size, with a sink that keeps the answer books (bounded too: a full book sends an
//!   event instead) and sends no SYN events, as `watch` runs by default, or sends every SYN and
//!   every answer, as per-connection output does; its events go through a ring buffer of
//!   bounded size that drops (and counts) what does not fit; an answer may meet its bucket's
//!   lock taken (`Take::Busy`), and is then sent for the sweep to pair before it decides
//!   anything;
//! - user space: draining the ring, sweeping the kernel map (at least once per SYN timeout)
//!   and finishing as `watch/pump.rs` does, over a pending map that finds its due entries
//!   itself (as the mapped IPv4 table and the kernel's IPv6 iterator do) or is walked in
//!   batches, as the input chooses, and lets the input put a packet (an answer, a
//!   retransmitted SYN, a SYN with a new ISN, a stray SYN-ACK) after the finding or between
//!   batches, between a take and the put-back, and after the put-back (at most two per 4-tuple
//!   in a sweep);
//! - clients that open connections on a few 4-tuples, retransmit their SYNs until they have an
//!   answer (within the late window), give up for a new ISN, and servers that answer (SYN-ACK,
//!   RST, ICMP error), repeat their answers, or never answer.
//!
//! Every attempt (4-tuple, ISN) has a known fate, followed as the packets and the sweep's takes
//! happen by the rule the design promises ("whoever removes an entry reports it"): answered by
//! the kernel (booked or sent), abandoned (superseded while waiting, or taken by a sweep that
//! could not put it back because a new ISN took the 4-tuple), taken by the sweep after the SYN
//! timeout (lost; an answer after that is late), not tracked (map full), or still waiting. The
//! tracker's outcomes and the books must agree with it (the few races the design cannot see are
//! named where they are allowed, and in docs/reliability.md, Limits):
//!
//! - every outcome and every booked answer belongs to a real attempt; at most one final
//!   outcome per attempt (answered, booked, refused, unreachable, abandoned or lost), a late
//!   answer only after lost, at most once;
//! - without ring-buffer drops the accounting is exact: the outcomes are those of the fate;
//!   an attempt answered before its SYN timeout is answered exactly once (booked or sent, with
//!   its round trip); an unanswered one taken by the sweep is lost exactly once; the attempts
//!   still young at the end are the ones counted waiting;
//! - with drops, every attempt whose outcomes differ from its fate is paid for by a drop.
#![no_main]

use std::collections::{HashMap, VecDeque};

use libfuzzer_sys::{arbitrary::Unstructured, fuzz_target};
use netrace::{
    kernel::events::Event,
    track::tracker::{
        retry_horizon_ns, MemoryMap, Outcome, OutcomeKind, PendingMap, PutBack, ScanPos, Tracker,
    },
};
use netrace_common::{
    answer_of,
    pairing::{self, EventSink, Insert, MemorySink, MemoryTable, Note, PendingTable, Take},
    parse::{Answer, Parsed},
    Counter, EventKind, ExpireCutoffs, FlowKey, OutcomeEvent, PendingSyn, FAMILY_V4, FAMILY_V6,
    STATE_LOST, STATE_WAITING,
};

const S: u64 = 1_000_000_000;
const SYN_TIMEOUT: u64 = 3 * S;
const LATE_WINDOW: u64 = 60 * S;
/// 4-tuples the clients use: few, so that attempts collide.
const KEYS: u8 = 4;
/// ISNs of SYN-ACKs that answer no attempt (attempts' ISNs start just below the wrap and
/// never get this far).
const STRAY_ISN: u32 = 0x8000_0000;

fn key(n: u8) -> FlowKey {
    FlowKey {
        family: if n % 2 == 0 { FAMILY_V4 } else { FAMILY_V6 },
        src_port: 1000 + u16::from(n),
        dst_port: 443,
        ..Default::default()
    }
}

/// The pending map while every bucket's lock stays taken: an answer cannot look for its
/// entry (`Take::Busy`). Only answers are delivered through it.
struct Locked;

impl PendingTable for Locked {
    fn modify<R, F: FnOnce(&mut PendingSyn) -> R>(&mut self, _key: &FlowKey, _f: F) -> Option<R> {
        None
    }
    fn get(&self, _key: &FlowKey) -> Option<PendingSyn> {
        None
    }
    fn insert_new(&mut self, _key: &FlowKey, _value: &PendingSyn) -> Insert {
        Insert::Busy
    }
    fn remove(&mut self, _key: &FlowKey) -> bool {
        false
    }
    fn take_if<F: FnOnce(&PendingSyn) -> bool>(&mut self, _key: &FlowKey, _accept: F) -> Take {
        Take::Busy
    }
}

/// The kernel's sink: `MemorySink` with answer books of bounded size (a full book sends the
/// answer as an event, counted, as `netrace-ebpf` does).
struct KernelSink {
    inner: MemorySink,
    books_cap: usize,
}

impl EventSink for KernelSink {
    fn now(&mut self) -> u64 {
        self.inner.now()
    }
    fn ifindex(&self) -> u32 {
        self.inner.ifindex()
    }
    fn count(&mut self, counter: Counter) {
        self.inner.count(counter);
    }
    fn syn_port(&mut self, port: u16) {
        self.inner.syn_port(port);
    }
    fn note(&mut self, note: Note) {
        self.inner.note(note);
    }
    fn unmatched(&mut self, key: &FlowKey, ack: u32, answer: Answer) {
        self.inner.unmatched(key, ack, answer);
    }
    fn busy(&mut self, key: &FlowKey, ack: u32, answer: Answer) {
        self.inner.busy(key, ack, answer);
    }
    fn sends_syns(&self) -> bool {
        self.inner.sends_syns()
    }
    fn book_answer(&mut self, key: &FlowKey, pending: &PendingSyn, now: u64) -> bool {
        if self
            .inner
            .books
            .as_ref()
            .is_some_and(|b| b.len() >= self.books_cap)
        {
            self.inner.count(Counter::BooksFull);
            return false;
        }
        self.inner.book_answer(key, pending, now)
    }
    fn emit(
        &mut self,
        kind: EventKind,
        key: &FlowKey,
        pending: &PendingSyn,
        now: u64,
        icmp_type: u8,
        icmp_code: u8,
    ) {
        self.inner
            .emit(kind, key, pending, now, icmp_type, icmp_code);
    }
}

/// What the design says an attempt's outcome is, as far as it has gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Never in the kernel map (full at each of its SYNs).
    NotTracked,
    Waiting,
    /// The kernel removed its waiting entry with an answer of this kind, at this time, for an
    /// entry first seen then (round trip).
    Answered {
        kind: EventKind,
        rtt: Option<u64>,
    },
    /// A SYN with a new ISN replaced its waiting entry.
    Abandoned,
    /// The sweep took its waiting entry after the SYN timeout.
    Lost,
    /// Lost, then an answer reached netrace.
    LostLate,
}

#[derive(Debug)]
struct Attempt {
    n: u8,
    isn: u32,
    /// The client's first SYN.
    first_syn: u64,
    fate: Fate,
    /// The client has its answer (SYN-ACK or RST), or gave up for a new ISN: no more SYNs.
    done: bool,
    /// An RST or ICMP error arrived while user space held the entry (between a take and its
    /// put-back): the kernel cannot see it, nobody reports it.
    unseen_answer: bool,
    /// Its first answer came while its entry was waiting, before the SYN timeout: this kind.
    in_time: Option<EventKind>,
    /// Its SYN-ACK came while user space held the entry (the tracker pairs it at the next
    /// sweep, by 4-tuple and ISN, as it pairs translated answers)...
    answered_while_held: bool,
    /// The server's answer (repeats are the same).
    answer: Option<Answer>,
    /// A SYN made a new entry for it after it was reported lost, which the sweep has not yet
    /// put back marked lost (the next sweep that walks the map, or the first after the SYN
    /// timeout where the map finds the due entries itself).
    recreated: bool,
    /// An answer found that entry: booked by the kernel, or late (see `recreated`).
    late_or_booked: bool,
    /// ... and then the entry went before that sweep (a new ISN took the 4-tuple: the tracker
    /// reports it abandoned; or the entry could not be put back: no longer tracked).
    entry_gone: bool,
}

/// The kernel side and the clients.
struct World {
    table: MemoryTable,
    sink: KernelSink,
    ring: VecDeque<OutcomeEvent>,
    ring_cap: usize,
    ring_drops: u64,
    now: u64,
    attempts: Vec<Attempt>,
    index: HashMap<(FlowKey, u32), usize>,
    current: [Option<usize>; KEYS as usize],
    next_isn: u32,
    next_stray: u32,
    /// How long a client keeps trying (SYNs, and servers' answers to them), from its first SYN.
    horizon: u64,
    /// Sweeps begun.
    sweeps: u64,
    /// Whether the map finds the due entries itself (the mapped table, the kernel's iterator).
    iterators: bool,
    /// When the last one began.
    last_sweep: u64,
    /// The kernel's SYN count when the last pass over the map began (`None` before the first).
    swept_syns: Option<u64>,
    /// Packets per 4-tuple the input may still put in the current sweep.
    races: [u8; KEYS as usize],
    /// The last put-back failed: the key, the attempt and its fate and `entry_gone` before.
    unput: Option<(FlowKey, usize, Fate, bool)>,
    /// The entry user space holds between a take and its put-back.
    held: Option<(FlowKey, PendingSyn)>,
    /// The answers that met their bucket locked, as the tracker received them (in order):
    /// key, attempt, the answer's time. The sweep takes their entries first.
    busy: VecDeque<(FlowKey, usize, u64)>,
    trace: bool,
}

/// A packet on the wire, chosen by the input.
#[derive(Clone, Copy, Debug)]
enum Packet {
    /// A client opens a connection (a new ISN) on 4-tuple n.
    NewSyn(u8),
    /// The current attempt on 4-tuple n sends its SYN again.
    Retransmit(u8),
    /// The server answers the current attempt on 4-tuple n.
    Answer(u8, Answer),
    /// The same, while the lock of the entry's bucket stays taken (its holder held up): the
    /// kernel cannot look, and sends the answer for user space to pair.
    LockedAnswer(u8, Answer),
    /// A SYN-ACK to 4-tuple n that answers no attempt.
    Stray(u8),
}

fn packet(u: &mut Unstructured) -> Packet {
    let n = u.int_in_range(0..=KEYS - 1).unwrap_or(0);
    match u.int_in_range(0..=8u8).unwrap_or(0) {
        8 => Packet::LockedAnswer(
            n,
            match u.int_in_range(0..=2u8).unwrap_or(0) {
                0 => Answer::SynAck,
                1 => Answer::Rst,
                _ => Answer::Unreachable {
                    icmp_type: 3,
                    code: 1,
                },
            },
        ),
        0 | 1 => Packet::NewSyn(n),
        2 => Packet::Retransmit(n),
        3 => Packet::Answer(n, Answer::Rst),
        4 => Packet::Answer(
            n,
            Answer::Unreachable {
                icmp_type: 3,
                code: 1,
            },
        ),
        5 => Packet::Stray(n),
        _ => Packet::Answer(n, Answer::SynAck),
    }
}

impl World {
    fn attempt_of(&self, key: &FlowKey, isn: u32) -> Option<usize> {
        self.index.get(&(*key, isn)).copied()
    }

    /// The current attempt on 4-tuple n, if the client still has it going (within its
    /// horizon).
    fn live(&self, n: u8) -> Option<usize> {
        let i = self.current[usize::from(n)]?;
        (self.now - self.attempts[i].first_syn < self.horizon).then_some(i)
    }

    /// The server's answer to the current attempt on 4-tuple n (a server repeats its answer;
    /// it does not change its mind): the attempt, its key and ISN, the answer and what it
    /// acknowledges.
    fn answer_to(&mut self, n: u8, answer: Answer) -> Option<(usize, FlowKey, u32, Answer, u32)> {
        let i = self.live(n)?;
        let isn = self.attempts[i].isn;
        let answer = *self.attempts[i].answer.get_or_insert(answer);
        let ack = match answer {
            Answer::Unreachable { .. } => isn,
            _ => isn.wrapping_add(1),
        };
        Some((i, key(n), isn, answer, ack))
    }

    fn deliver(&mut self, parsed: &Parsed) {
        self.sink.inner.now = self.now;
        pairing::on_packet(&mut self.table, &mut self.sink, None, parsed);
        self.queue_events();
    }

    /// Moves what the kernel sent into the ring buffer (what does not fit is dropped, counted).
    fn queue_events(&mut self) {
        for ev in self.sink.inner.take_events() {
            if self.ring.len() >= self.ring_cap {
                self.ring_drops += 1;
                self.sink.inner.count(Counter::RingbufFull);
            } else {
                self.ring.push_back(ev);
            }
        }
    }

    fn packet(&mut self, p: Packet) {
        if self.trace {
            eprintln!(
                "  {} packet {p:?} (held {:?})",
                self.now,
                self.held.map(|(k, _)| k.src_port)
            );
        }
        match p {
            Packet::NewSyn(n) => {
                let k = key(n);
                if let Some(prev) = self.current[usize::from(n)] {
                    let a = &mut self.attempts[prev];
                    a.done = true;
                    a.entry_gone = true;
                    if let Some(e) = self.table.map.get(&k) {
                        if e.isn == a.isn && e.state == STATE_WAITING && a.fate == Fate::Waiting {
                            a.fate = Fate::Abandoned;
                        }
                    }
                }
                let isn = self.next_isn;
                self.next_isn = self.next_isn.wrapping_add(1);
                let i = self.attempts.len();
                self.attempts.push(Attempt {
                    n,
                    isn,
                    first_syn: self.now,
                    fate: Fate::NotTracked,
                    done: false,
                    unseen_answer: false,
                    in_time: None,
                    answered_while_held: false,
                    answer: None,
                    recreated: false,
                    late_or_booked: false,
                    entry_gone: false,
                });
                self.index.insert((k, isn), i);
                self.current[usize::from(n)] = Some(i);
                self.syn(k, i);
            }
            Packet::Retransmit(n) => {
                let Some(i) = self.live(n) else { return };
                if self.attempts[i].done {
                    return;
                }
                self.syn(key(n), i);
            }
            Packet::Answer(n, answer) => {
                let Some((i, k, isn, answer, ack)) = self.answer_to(n, answer) else {
                    return;
                };
                let found = self.table.map.get(&k).filter(|e| e.isn == isn).copied();
                let a = &mut self.attempts[i];
                // Not modelled: a client that keeps retransmitting after an ICMP error (a soft
                // error for connect()); see docs/reliability.md, Limits.
                a.done = true;
                let (kind, _) = pairing::resolution(answer);
                let held = self.held.filter(|(hk, hp)| *hk == k && hp.isn == isn);
                // A SYN-ACK that finds no entry is sent to user space, unless the 4-tuple has
                // an answer in the books (a server repeating the SYN-ACK of a booked
                // connection, the kernel assumes: counted, not sent).
                let reported = answer == Answer::SynAck
                    && !self
                        .sink
                        .inner
                        .books
                        .iter()
                        .flatten()
                        .any(|(bk, _, _)| *bk == k);
                a.fate = match (a.fate, found.map(|e| e.state)) {
                    (Fate::Waiting, Some(STATE_WAITING)) => {
                        let first = found.map_or(0, |e| e.first_ns);
                        if self.now - first < SYN_TIMEOUT {
                            a.in_time = Some(kind);
                        }
                        Fate::Answered {
                            kind,
                            rtt: Some(self.now - first),
                        }
                    }
                    (Fate::Lost, Some(state)) => {
                        if state == STATE_WAITING {
                            // Only in the moment a sweep holds the entry it marks lost.
                            assert!(a.recreated, "a waiting entry for a lost attempt: {a:?}");
                            a.late_or_booked = true;
                        }
                        Fate::LostLate
                    }
                    // The sweep took the entry: a SYN-ACK finds none and is reported as such;
                    // the tracker knows the attempt is lost.
                    (Fate::Lost, None) if reported => Fate::LostLate,
                    (Fate::Waiting, None) if reported && held.is_some() => {
                        // Taken by a sweep that found it changed since its walk and puts it
                        // back: the tracker pairs the SYN-ACK with it at its next sweep.
                        a.answered_while_held = true;
                        Fate::Answered { kind, rtt: None }
                    }
                    (Fate::Waiting, None) => {
                        a.unseen_answer = true;
                        Fate::Waiting
                    }
                    (f, _) => f,
                };
                self.deliver(&Parsed::Answer {
                    key: k,
                    ack,
                    answer,
                });
            }
            Packet::LockedAnswer(n, answer) => {
                let Some((i, k, _, answer, ack)) = self.answer_to(n, answer) else {
                    return;
                };
                // The client has its answer; the attempt's fate is decided when user space
                // takes the entry (`RacyMap::take`).
                self.attempts[i].done = true;
                self.sink.inner.now = self.now;
                pairing::on_packet(
                    &mut Locked,
                    &mut self.sink,
                    None,
                    &Parsed::Answer {
                        key: k,
                        ack,
                        answer,
                    },
                );
                self.queue_events();
            }
            Packet::Stray(n) => {
                let isn = self.next_stray;
                self.next_stray = self.next_stray.wrapping_add(1);
                self.deliver(&Parsed::Answer {
                    key: key(n),
                    ack: isn.wrapping_add(1),
                    answer: Answer::SynAck,
                });
            }
        }
    }

    fn syn(&mut self, k: FlowKey, i: usize) {
        let isn = self.attempts[i].isn;
        let had_entry = self.table.map.contains_key(&k);
        self.deliver(&Parsed::Syn {
            key: k,
            isn,
            data_len: 0,
        });
        let a = &mut self.attempts[i];
        let holds = self.table.map.get(&k).is_some_and(|e| e.isn == isn);
        let inserted = !had_entry && holds;
        if a.fate == Fate::NotTracked && holds {
            a.fate = Fate::Waiting;
        }
        // A SYN of an attempt reported lost made a new, waiting entry (its old one was held by
        // the sweep, or could not go back): until the sweep marks it lost, an answer to it is
        // counted answered by the kernel.
        if inserted && matches!(a.fate, Fate::Lost | Fate::LostLate) {
            a.recreated = true;
        }
    }
}

/// The kernel map as the sweep sees it: the input may put a packet on the wire between the
/// walk and a take, between a take and the put-back, and after a put-back.
struct RacyMap<'w, 'u, 'd> {
    w: &'w mut World,
    u: &'u mut Unstructured<'d>,
    /// The keys a walk has still to read.
    walk: Vec<FlowKey>,
}

impl RacyMap<'_, '_, '_> {
    fn maybe_race(&mut self) {
        // One time in four (never once the input is used up), at most two packets per
        // 4-tuple in a sweep: every race of one or two packets with the sweep's walk, takes
        // and put-backs. (Three SYNs or answers on one 4-tuple in the microseconds the sweep
        // holds its entry are not modelled.)
        if self.u.arbitrary::<u8>().unwrap_or(0) >= 192 {
            let p = packet(self.u);
            let n = match p {
                Packet::NewSyn(n)
                | Packet::Retransmit(n)
                | Packet::Answer(n, _)
                | Packet::LockedAnswer(n, _)
                | Packet::Stray(n) => n,
            };
            let budget = &mut self.w.races[usize::from(n)];
            if *budget > 0 {
                *budget -= 1;
                self.w.packet(p);
            }
        }
    }
}

impl RacyMap<'_, '_, '_> {
    /// The sweep's first takes: one per answer that met its bucket locked, in order. An entry
    /// of the answered attempt is resolved by that answer, as the kernel would have resolved
    /// it (late if it was reported lost); another attempt's entry goes back.
    fn take_for_busy(&mut self, key: &FlowKey) -> Option<PendingSyn> {
        self.w.held = None;
        let (bk, i, at) = self
            .w
            .busy
            .pop_front()
            .expect("a busy answer for each take");
        assert_eq!(bk, *key, "the sweep pairs the busy answers in order");
        self.maybe_race();
        let p = self.w.table.map.remove(key);
        let a = &mut self.w.attempts[i];
        let answer = a.answer.expect("a busy answer is an answer");
        match p {
            Some(p) if p.isn == a.isn => {
                let (kind, _) = pairing::resolution(answer);
                a.fate = match (a.fate, p.state) {
                    (Fate::Waiting, STATE_WAITING) => {
                        let rtt = at - p.first_ns;
                        if rtt < SYN_TIMEOUT {
                            a.in_time = Some(kind);
                        }
                        Fate::Answered {
                            kind,
                            rtt: Some(rtt),
                        }
                    }
                    (Fate::Lost, _) => Fate::LostLate,
                    (f, _) => f,
                };
                if self.w.trace {
                    eprintln!(
                        "  {} busy answer takes {} isn {}: {:?}",
                        self.w.now, key.src_port, p.isn, a.fate
                    );
                }
                Some(p)
            }
            other => {
                // A SYN-ACK without its entry: unmatched, late for an attempt reported lost.
                if answer == Answer::SynAck && a.fate == Fate::Lost {
                    a.fate = Fate::LostLate;
                }
                // Another attempt's entry goes back unchanged. Packets in that moment are not
                // modelled: a retransmission and then an answer there would see the attempt
                // reported abandoned and booked (three packets on one 4-tuple within the
                // microseconds of a take; see docs/reliability.md, Limits).
                if let Some(p) = other {
                    self.w.held = Some((*key, p));
                }
                other
            }
        }
    }
}

impl PendingMap for RacyMap<'_, '_, '_> {
    fn scan_next(&mut self, pos: &mut ScanPos, out: &mut Vec<(FlowKey, PendingSyn)>) {
        // A walk in batches: the keys as they were at its start, each with what it holds when
        // its batch is read (an entry made since is not seen; one gone is skipped).
        out.clear();
        if pos.start() {
            let mut keys: Vec<FlowKey> = self.w.table.map.keys().copied().collect();
            keys.sort_by_key(|k| (k.src_port, k.family));
            self.walk = keys;
        }
        let n = self.u.int_in_range(1..=4usize).unwrap_or(4);
        for k in self.walk.drain(..n.min(self.walk.len())) {
            if let Some(p) = self.w.table.map.get(&k) {
                out.push((k, *p));
            }
        }
        if self.walk.is_empty() {
            pos.finish();
        }
        self.maybe_race();
    }
    fn due(
        &mut self,
        cut: ExpireCutoffs,
        out: &mut Vec<(FlowKey, PendingSyn)>,
    ) -> Option<(u64, u64)> {
        // The map's own finder where it works, or not (then the sweep walks).
        if !self.w.iterators {
            return None;
        }
        let found = MemoryMap(self.w.table.map.clone()).due(cut, out);
        self.maybe_race();
        found
    }
    fn take(&mut self, key: &FlowKey) -> Option<PendingSyn> {
        // An entry taken before and not put back is gone for good.
        self.w.held = None;
        self.maybe_race();
        let p = self.w.table.map.remove(key);
        // The sweep takes the entry that kept its own from going back: if it is the same
        // attempt's (a retransmission), it merges them and puts that back.
        if let Some((k, i, fate, gone)) = self.w.unput.take() {
            if k == *key && p.is_some_and(|p| p.isn == self.w.attempts[i].isn) {
                self.w.attempts[i].fate = fate;
                self.w.attempts[i].entry_gone = gone;
            }
        }
        if let Some(p) = p {
            let now = self.w.now;
            if let Some(i) = self.w.attempt_of(key, p.isn) {
                let a = &mut self.w.attempts[i];
                // User space took a waiting entry past the SYN timeout: it reports it lost.
                if p.state == STATE_WAITING
                    && now - p.first_ns >= SYN_TIMEOUT
                    && a.fate == Fate::Waiting
                {
                    a.fate = Fate::Lost;
                }
            }
            if self.w.trace {
                eprintln!(
                    "  {now} take {} isn {} state {}",
                    key.src_port, p.isn, p.state
                );
            }
            self.w.held = Some((*key, p));
            self.maybe_race();
        }
        p
    }
    fn take_for_answer(&mut self, key: &FlowKey) -> Option<PendingSyn> {
        self.take_for_busy(key)
    }
    fn put_back(&mut self, key: &FlowKey, value: &PendingSyn) -> PutBack {
        self.w.held = None;
        // BPF_NOEXIST into a preallocated map: refused if the key has an entry again or the
        // map is full.
        let r = match self.w.table.insert_new(key, value) {
            Insert::Inserted => PutBack::Done,
            Insert::Exists => PutBack::Taken,
            Insert::Full | Insert::Busy => PutBack::Refused,
        };
        self.w.unput = None;
        if let Some(i) = self.w.attempt_of(key, value.isn) {
            let a = &mut self.w.attempts[i];
            if r == PutBack::Done && value.state == STATE_LOST {
                a.recreated = false;
            }
            if r != PutBack::Done {
                // Unless the sweep takes the new entry to merge it (a retransmission).
                self.w.unput = Some((*key, i, a.fate, a.entry_gone));
                a.entry_gone = true;
                if value.state == STATE_WAITING && a.fate == Fate::Waiting {
                    a.fate = match r {
                        // A new ISN took the 4-tuple while user space held the entry: user
                        // space removed it, it reports it.
                        PutBack::Taken => Fate::Abandoned,
                        // No room: no longer tracked, as if its SYN had found the map full.
                        _ => Fate::NotTracked,
                    };
                }
            }
        }
        if self.w.trace {
            eprintln!(
                "  {} put back {} isn {} state {}: {r:?}",
                self.w.now, key.src_port, value.isn, value.state
            );
        }
        self.maybe_race();
        r
    }
}

/// A tick of watch/pump.rs: drain what is in the ring, then sweep (the input racing it), unless
/// nothing can have changed since the last pass.
fn tick(w: &mut World, t: &mut Tracker, u: &mut Unstructured, out: &mut Vec<Outcome>) {
    drain(w, t, out, usize::MAX);
    let now = w.now;
    w.last_sweep = now;
    // As watch/pump.rs: no pass over the map when no SYN came since the last one (the count
    // read before the pass) and the tracker holds nothing; the map is then empty.
    let syns = w.sink.inner.counter(Counter::SynSeen);
    if w.swept_syns == Some(syns) && t.idle() {
        assert!(
            w.table.map.is_empty(),
            "a pass was skipped over a map that holds {:?}",
            w.table.map
        );
        return;
    }
    w.swept_syns = Some(syns);
    w.sweeps += 1;
    w.races = [2; KEYS as usize];
    t.sweep(
        now,
        &mut RacyMap {
            w,
            u,
            walk: Vec::new(),
        },
        out,
    );
    w.held = None;
    w.unput = None;
    // The sweep leaves no waiting entry of an attempt it reported lost past the SYN timeout.
    for (k, e) in &w.table.map {
        if e.state == STATE_WAITING && now - e.first_ns >= SYN_TIMEOUT {
            if let Some(i) = w.attempt_of(k, e.isn) {
                let a = &w.attempts[i];
                assert!(
                    !matches!(a.fate, Fate::Lost | Fate::LostLate),
                    "a waiting entry for a lost attempt after a sweep: {a:?}"
                );
            }
        }
    }
}

fn drain(w: &mut World, t: &mut Tracker, out: &mut Vec<Outcome>, max: usize) {
    for _ in 0..max {
        let Some(raw) = w.ring.pop_front() else {
            return;
        };
        let kind = EventKind::from_u32(raw.kind).expect("the rules send known kinds");
        if kind == EventKind::BusyAnswer {
            let answer = answer_of(raw.pending.syns, raw.icmp_type, raw.icmp_code)
                .expect("the rules send known answers");
            let isn = match answer {
                Answer::Unreachable { .. } => raw.pending.isn,
                _ => raw.pending.isn.wrapping_sub(1),
            };
            let i = w
                .attempt_of(&raw.key, isn)
                .expect("a busy answer answers an attempt");
            w.busy.push_back((raw.key, i, raw.ts_ns));
        }
        t.on_event(&Event { kind, raw }, out);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let books = u.arbitrary::<bool>().unwrap_or(true);
    let horizon_on = u.arbitrary::<bool>().unwrap_or(false);
    let mut sink = MemorySink {
        report_unmatched: true,
        ..MemorySink::default()
    };
    if books {
        sink.send_syns = false;
        sink.books = Some(Vec::new());
    }
    let mut w = World {
        table: MemoryTable {
            map: HashMap::new(),
            max_entries: u.int_in_range(1..=6usize).unwrap_or(4),
        },
        sink: KernelSink {
            inner: sink,
            books_cap: u.int_in_range(0..=64usize).unwrap_or(64),
        },
        ring: VecDeque::new(),
        ring_cap: u.int_in_range(1..=64usize).unwrap_or(64),
        ring_drops: 0,
        // Near the end of u64 or not, the clock must not matter.
        now: if u.arbitrary::<bool>().unwrap_or(false) {
            u64::MAX - 1_000_000_000_000_000
        } else {
            1_000_000_000
        },
        attempts: Vec::new(),
        index: HashMap::new(),
        current: [None; KEYS as usize],
        // ISNs start just below the wrap and are never reused.
        next_isn: u32::MAX - u.int_in_range(0..=3u32).unwrap_or(0),
        next_stray: STRAY_ISN,
        // A client gives up within the late window: a SYN retransmitted after it (the kernel
        // entry cleared) is not modelled, see docs/reliability.md, Limits.
        horizon: LATE_WINDOW,
        held: None,
        busy: VecDeque::new(),
        sweeps: 0,
        iterators: u.arbitrary::<bool>().unwrap_or(true),
        last_sweep: 0,
        swept_syns: None,
        races: [0; KEYS as usize],
        unput: None,
        trace: std::env::var_os("NETRACE_FUZZ_TRACE").is_some(),
    };
    w.last_sweep = w.now;
    let mut t = Tracker::new(SYN_TIMEOUT, LATE_WINDOW);
    if horizon_on {
        t = t.with_retry_horizon(retry_horizon_ns(6), 1 << 20);
    }
    let mut out: Vec<Outcome> = Vec::new();
    while !u.is_empty() {
        w.now += 1;
        let op = u.int_in_range(0..=5u8).unwrap_or(0);
        if w.trace {
            eprintln!(
                "{} op {op}: map {:?} ring {} drops {} out {:?}",
                w.now,
                w.table
                    .map
                    .iter()
                    .map(|(k, p)| (k.src_port, p.isn, p.state))
                    .collect::<Vec<_>>(),
                w.ring.len(),
                w.ring_drops,
                out.iter()
                    .map(|o| (o.key.src_port, o.pending.isn, o.kind))
                    .collect::<Vec<_>>()
            );
        }
        match op {
            0 | 1 => {
                let p = packet(&mut u);
                w.packet(p);
            }
            2 => {
                let to = w.now
                    + match u.int_in_range(0..=4u8).unwrap_or(0) {
                        0 => 1_000_000,
                        1 => 500_000_000,
                        2 => 2_000_000_000,
                        3 => 61_000_000_000,
                        _ => u64::from(u.arbitrary::<u32>().unwrap_or(0)),
                    };
                // User space sweeps at least once per SYN timeout (`watch` every second).
                while to - w.last_sweep > SYN_TIMEOUT {
                    w.now = w.last_sweep + SYN_TIMEOUT;
                    tick(&mut w, &mut t, &mut u, &mut out);
                }
                w.now = to;
            }
            3 => {
                let max = u.int_in_range(1..=8usize).unwrap_or(1);
                drain(&mut w, &mut t, &mut out, max);
            }
            // A tick of watch/pump.rs: drain what is in the ring, then sweep.
            4 => tick(&mut w, &mut t, &mut u, &mut out),
            _ => {
                // The ring buffer frees up (user space is fast again).
                w.ring_cap = w.ring_cap.max(u.int_in_range(1..=64usize).unwrap_or(1));
            }
        }
    }
    // The end of a run: detach, drain, finish (its sweep sees no more packets).
    drain(&mut w, &mut t, &mut out, usize::MAX);
    let now = w.now;
    let mut finish_input = Unstructured::new(&[]);
    let waiting_at_exit = t.finish(
        now,
        &mut RacyMap {
            w: &mut w,
            u: &mut finish_input,
            walk: Vec::new(),
        },
        &mut out,
    );
    drain(&mut w, &mut t, &mut out, usize::MAX);
    check(&w, &t, &out, waiting_at_exit);
});

fn check(w: &World, t: &Tracker, out: &[Outcome], waiting_at_exit: u64) {
    use OutcomeKind::*;
    let mut kinds: Vec<Vec<OutcomeKind>> = vec![Vec::new(); w.attempts.len()];
    let mut rtts: Vec<Option<u64>> = vec![None; w.attempts.len()];
    for o in out {
        let i = w
            .attempt_of(&o.key, o.pending.isn)
            .unwrap_or_else(|| panic!("an outcome for no attempt: {o:?}"));
        kinds[i].push(o.kind);
        if o.kind != Late {
            rtts[i] = o.rtt_ns;
        }
    }
    let mut booked = vec![0u32; w.attempts.len()];
    for (k, p, _) in w.sink.inner.books.iter().flatten() {
        let i = w
            .attempt_of(k, p.isn)
            .unwrap_or_else(|| panic!("a booked answer for no attempt: {k:?} {p:?}"));
        booked[i] += 1;
    }
    let drops = w.ring_drops;
    if w.trace {
        for (i, a) in w.attempts.iter().enumerate() {
            eprintln!(
                "{} isn {} first {} fate {:?}: outcomes {:?} booked {}",
                key(a.n).src_port,
                a.isn,
                a.first_syn,
                a.fate,
                kinds[i],
                booked[i]
            );
        }
        eprintln!(
            "stats {:?} waiting {waiting_at_exit} drops {drops}",
            t.stats
        );
    }
    let mut differ = 0u64;
    let mut young = 0u64;
    for (i, a) in w.attempts.iter().enumerate() {
        let ks = kinds[i].as_slice();
        let b = booked[i];
        let ctx = || format!("attempt {a:?}: outcomes {ks:?}, booked {b} (drops {drops})");
        // Whatever happened: at most one final outcome, late only after lost.
        let shape_ok = matches!(
            (ks, b),
            (
                [] | [Answered] | [Refused] | [Unreachable] | [Lost] | [Abandoned] | [Lost, Late],
                0
            ) | ([], 1)
        ) || (a.late_or_booked && matches!(ks, [Lost] | [Lost, Late]) && b == 1);
        assert!(shape_ok, "{}", ctx());
        let want: &[OutcomeKind] = match a.fate {
            Fate::NotTracked => &[],
            Fate::Waiting => {
                young += 1;
                &[]
            }
            Fate::Answered { kind, rtt } => {
                let sent = match kind {
                    EventKind::Refused => Refused,
                    EventKind::Unreachable => Unreachable,
                    _ => Answered,
                };
                if ks == [sent] {
                    if drops == 0 && rtt.is_some() {
                        assert_eq!(rtts[i], rtt, "{}", ctx());
                    }
                    continue;
                }
                if b == 1 && ks.is_empty() && sent == Answered {
                    continue;
                }
                if a.answered_while_held && a.entry_gone && matches!(ks, [] | [Abandoned]) {
                    continue;
                }
                &[sent]
            }
            Fate::Abandoned => &[Abandoned],
            Fate::Lost => &[Lost],
            // Booked instead of late, and a repeat of the answer late besides: the answer to a
            // retransmission that made a new entry while the sweep held the lost one, in the
            // moment before the sweep takes it to merge it.
            Fate::LostLate if a.late_or_booked && matches!(ks, [Lost] | [Lost, Late]) && b == 1 => {
                continue
            }
            Fate::LostLate => &[Lost, Late],
        };
        if ks == want && b == 0 {
            continue;
        }
        assert!(drops > 0, "{}: want {want:?}", ctx());
        differ += 1;
    }
    assert!(
        differ <= drops,
        "{differ} attempts differ from their fate, {drops} ring-buffer drops"
    );
    // Every attempt answered in time is answered once, every young one is counted waiting.
    if drops == 0 {
        for (i, a) in w.attempts.iter().enumerate() {
            if let Some(kind) = a.in_time {
                let once = match kind {
                    EventKind::Refused => kinds[i] == [Refused],
                    EventKind::Unreachable => kinds[i] == [Unreachable],
                    _ => (kinds[i] == [Answered]) != (booked[i] == 1),
                };
                assert!(
                    once,
                    "attempt {a:?} answered in time: {:?}, booked {}",
                    kinds[i], booked[i]
                );
            }
            if a.fate == Fate::Waiting && !a.unseen_answer {
                let e = w.table.map.get(&key(a.n)).copied();
                assert!(
                    e.is_some_and(|e| e.isn == a.isn && w.now - e.first_ns < SYN_TIMEOUT),
                    "attempt {a:?} waiting at the end, entry {e:?}"
                );
            }
        }
        assert_eq!(waiting_at_exit, young, "waiting at exit");
    }
}
