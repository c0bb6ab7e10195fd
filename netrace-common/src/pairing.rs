//! The SYN/answer pairing rules, one code path for the kernel (over its BPF maps and ring
//! buffer) and user space (over a `HashMap` and a `Vec` of events, for `netrace analyze`).
//!
//! - An outbound SYN that passes the filter creates a pending entry keyed by its 4-tuple (and
//!   reports [`EventKind::Syn`] when the sink [sends SYNs](EventSink::sends_syns)). The same
//!   ISN again is a retransmission: the entry's SYN count and last time move, nothing is
//!   reported. Another ISN on the same 4-tuple replaces the entry: the old one, if still
//!   waiting, is reported [`EventKind::Superseded`]. A full map is counted, never an eviction.
//! - An inbound SYN-ACK or RST+ACK acknowledging `isn + 1` (or `isn + 1 + data`, for a SYN
//!   that carried data: TCP Fast Open), or an ICMP error quoting the SYN's own sequence number,
//!   removes the entry and reports its outcome: an event, or for an answered attempt still
//!   waiting, a count in the sink's answer books when it keeps them. Whoever removes the entry
//!   reports it, so a duplicated answer, or one racing user space's sweep, is reported once.
//!
//! *Lost* and *late* are decided in user space from time (the tracker), not here.

use crate::{
    parse::{Answer, Parsed},
    Counter, EventKind, FlowKey, KernelFilter, PendingSyn, STATE_WAITING,
};

/// The outcome of inserting a new pending entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insert {
    Inserted,
    /// The key has an entry (a retransmission, another ISN on the same 4-tuple, or another
    /// CPU's insert a moment ago).
    Exists,
    /// The map is full.
    Full,
    /// A bucket the entry needed stayed locked by someone held up: not tracked, as when full.
    Busy,
}

/// What a SYN did to an existing entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Touched {
    /// The same ISN again: a retransmission.
    Retransmit,
    /// Another ISN: the entry now holds the new attempt; this was the old one.
    Replaced(PendingSyn),
}

/// The pending-SYN map.
pub trait PendingTable {
    /// Applies `f` to the entry for `key` in place; `None` when there is none.
    fn modify<R, F: FnOnce(&mut PendingSyn) -> R>(&mut self, key: &FlowKey, f: F) -> Option<R>;
    /// A copy of the entry for `key`.
    fn get(&self, key: &FlowKey) -> Option<PendingSyn>;
    /// Inserts an entry for a key that had none.
    fn insert_new(&mut self, key: &FlowKey, value: &PendingSyn) -> Insert;
    /// Removes the entry; `false` when it was not there (someone else removed it).
    fn remove(&mut self, key: &FlowKey) -> bool;
    /// Removes the entry for `key` if `accept` takes it, in one step where the table can.
    #[inline(always)]
    fn take_if<F: FnOnce(&PendingSyn) -> bool>(&mut self, key: &FlowKey, accept: F) -> Take {
        take_if_in_two_steps(self, key, accept)
    }
}

/// [`PendingTable::take_if`] as a [`PendingTable::get`], then a [`PendingTable::remove`] (which
/// may find the entry gone in between).
#[inline(always)]
pub fn take_if_in_two_steps<T: PendingTable + ?Sized, F: FnOnce(&PendingSyn) -> bool>(
    table: &mut T,
    key: &FlowKey,
    accept: F,
) -> Take {
    let Some(p) = table.get(key) else {
        return Take::Absent;
    };
    if !accept(&p) {
        return Take::Kept(p);
    }
    if table.remove(key) {
        Take::Taken(p)
    } else {
        Take::Gone
    }
}

/// What [`PendingTable::take_if`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// No entry for the key.
    Absent,
    /// An entry the caller did not accept, left in place.
    Kept(PendingSyn),
    /// The entry, removed.
    Taken(PendingSyn),
    /// Accepted, then removed by someone else before this could (who reports it).
    Gone,
    /// Whether there is an entry is not known: a lock it needed stayed taken.
    Busy,
}

/// A SYN or answer the rules left aside (already counted), with the values worth a debug line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Note {
    /// A SYN outside `--filter-dst` / `--filter-dport` ([`Counter::Filtered`]).
    Filtered { dst_port: u16 },
    /// A SYN not tracked: the pending map is full ([`Counter::PendingMapFull`]).
    PendingMapFull { src_port: u16 },
    /// A SYN-ACK for a pending 4-tuple acknowledging `ack` instead of `expected` (`isn + 1`;
    /// `isn + 1 + data_len` is accepted too) ([`Counter::SynAckMismatch`]).
    SynAckMismatch {
        src_port: u16,
        ack: u32,
        expected: u32,
    },
}

/// Where the rules' effects go, and the facts they need from their surroundings.
pub trait EventSink {
    /// The current time in nanoseconds (`bpf_ktime_get_ns`, or a capture's timestamp).
    fn now(&mut self) -> u64;
    /// The interface the packet is on.
    fn ifindex(&self) -> u32;
    /// Adds one to `counter`.
    fn count(&mut self, counter: Counter);
    /// One SYN packet (first or retransmitted) left from source port `port`.
    fn syn_port(&mut self, port: u16);
    /// Why a SYN or answer was left aside, after it was counted (debug output; nothing by
    /// default).
    #[inline(always)]
    fn note(&mut self, _note: Note) {}
    /// An answer for a 4-tuple with no pending entry. The kernel reports SYN-ACKs (for user
    /// space to pair by remote address, remote port and ISN when a translation after the
    /// egress hook changed the SYN's source); others ignore it.
    #[inline(always)]
    fn unmatched(&mut self, _key: &FlowKey, _ack: u32, _answer: Answer) {}
    /// An answer whose entry could not be looked at ([`Take::Busy`]): reported
    /// ([`EventKind::BusyAnswer`]) for user space to pair, never taken as unmatched.
    #[inline(always)]
    fn busy(&mut self, _key: &FlowKey, _ack: u32, _answer: Answer) {}
    /// Whether every new pending entry is reported ([`EventKind::Syn`]); the kernel sends
    /// them only when user space pairs SYNs one by one (attribution).
    #[inline(always)]
    fn sends_syns(&self) -> bool {
        true
    }
    /// Counts an answered attempt without an event (the kernel's answer books); `false`
    /// when it must be sent as an event (per-connection output asked for, or no room).
    #[inline(always)]
    fn book_answer(&mut self, _key: &FlowKey, _pending: &PendingSyn, _now: u64) -> bool {
        false
    }
    /// Reports an event (the ring buffer's record).
    fn emit(
        &mut self,
        kind: EventKind,
        key: &FlowKey,
        pending: &PendingSyn,
        now: u64,
        icmp_type: u8,
        icmp_code: u8,
    );
}

impl KernelFilter {
    /// Whether `key`'s destination passes the filter.
    #[inline(always)]
    pub fn matches(&self, key: &FlowKey) -> bool {
        if self.dst_port != 0 && self.dst_port != key.dst_port {
            return false;
        }
        if self.dst_family == 0 {
            return true;
        }
        if self.dst_family != key.family {
            return false;
        }
        let mut bits = self.dst_prefix_len as u32;
        let mut i = 0;
        while i < 16 {
            if bits == 0 {
                break;
            }
            let mask: u8 = if bits >= 8 {
                0xff
            } else {
                0xffu8 << (8 - bits)
            };
            if (key.dst_addr[i] ^ self.dst_net[i]) & mask != 0 {
                return false;
            }
            bits = bits.saturating_sub(8);
            i += 1;
        }
        true
    }
}

/// Whether an answer carrying `ack` is the answer to `pending`: a SYN-ACK or RST acknowledges
/// `isn + 1`, or `isn + 1 + data_len` when the SYN carried data (TCP Fast Open, the server took
/// the data); an ICMP error quotes the SYN's own sequence number.
#[inline(always)]
pub fn acknowledges(pending: &PendingSyn, ack: u32, answer: Answer) -> bool {
    match answer {
        Answer::Unreachable { .. } => ack == pending.isn,
        _ => {
            let next = pending.isn.wrapping_add(1);
            ack == next || ack == next.wrapping_add(pending.data_len as u32)
        }
    }
}

/// What an [`EventKind::BusyAnswer`] event carries for an answer at `now` on `ifindex`: its
/// `pending` (the raw acknowledgement and the answer's code) and ICMP type and code.
#[inline(always)]
pub fn busy_event(now: u64, ack: u32, answer: Answer, ifindex: u32) -> (PendingSyn, u8, u8) {
    let mut seen = PendingSyn::first(now, ack, ifindex);
    seen.syns = crate::answer_code(answer);
    let (icmp_type, icmp_code) = answer.icmp();
    (seen, icmp_type, icmp_code)
}

/// The event kind and counter of an answer that resolved its SYN.
#[inline(always)]
pub const fn resolution(answer: Answer) -> (EventKind, Counter) {
    match answer {
        Answer::SynAck => (EventKind::Answered, Counter::SynAckMatched),
        Answer::Rst => (EventKind::Refused, Counter::RstMatched),
        Answer::Unreachable { .. } => (EventKind::Unreachable, Counter::IcmpMatched),
    }
}

/// An outbound SYN on the uplink (see the module documentation).
#[inline(always)]
pub fn on_syn<T: PendingTable + ?Sized, S: EventSink + ?Sized>(
    table: &mut T,
    sink: &mut S,
    filter: Option<&KernelFilter>,
    key: &FlowKey,
    isn: u32,
    data_len: u32,
) {
    if let Some(f) = filter {
        if !f.matches(key) {
            sink.count(Counter::Filtered);
            sink.note(Note::Filtered {
                dst_port: key.dst_port,
            });
            return;
        }
    }
    sink.count(Counter::SynSeen);
    sink.syn_port(key.src_port);
    let now = sink.now();
    let data_len = if data_len > u16::MAX as u32 {
        u16::MAX
    } else {
        data_len as u16
    };
    let mut fresh = PendingSyn::first(now, isn, sink.ifindex());
    fresh.data_len = data_len;
    // Most SYNs are new: insert first (one lookup), look at the entry only when there is one.
    // Twice at most: the entry may go (answered, or taken by user space) between the two.
    let mut tries = 0;
    let touched = loop {
        tries += 1;
        let inserted = table.insert_new(key, &fresh);
        match inserted {
            Insert::Inserted => {
                if sink.sends_syns() {
                    sink.emit(EventKind::Syn, key, &fresh, now, 0, 0);
                }
                return;
            }
            Insert::Full | Insert::Busy => {
                sink.count(Counter::PendingMapFull);
                if let Insert::Busy = inserted {
                    sink.count(Counter::TableBusy);
                }
                sink.note(Note::PendingMapFull {
                    src_port: key.src_port,
                });
                return;
            }
            Insert::Exists => {}
        }
        let touched = table.modify(key, |entry| {
            let old = *entry;
            if old.isn == isn {
                entry.syns = old.syns.saturating_add(1);
                entry.last_ns = now;
                // A retransmitted Fast Open SYN usually carries no data; the first one's length
                // stays acceptable.
                if data_len > old.data_len {
                    entry.data_len = data_len;
                }
                return Touched::Retransmit;
            }
            *entry = fresh;
            Touched::Replaced(old)
        });
        if touched.is_some() || tries == 2 {
            break touched;
        }
    };
    match touched {
        Some(Touched::Retransmit) => sink.count(Counter::SynRetransmit),
        Some(Touched::Replaced(old)) => {
            // Same 4-tuple, new ISN: the old attempt was abandoned without an answer (unless
            // it was reported lost already).
            if old.state == STATE_WAITING {
                sink.emit(EventKind::Superseded, key, &old, now, 0, 0);
            }
            if sink.sends_syns() {
                sink.emit(EventKind::Syn, key, &fresh, now, 0, 0);
            }
        }
        // Gone twice between the insert and the look: a retransmission of an attempt being
        // decided at that moment (counted as a SYN).
        None => {}
    }
}

/// An inbound answer on the uplink (see the module documentation).
#[inline(always)]
pub fn on_answer<T: PendingTable + ?Sized, S: EventSink + ?Sized>(
    table: &mut T,
    sink: &mut S,
    key: &FlowKey,
    ack: u32,
    answer: Answer,
) {
    let pending = match table.take_if(key, |p| acknowledges(p, ack, answer)) {
        Take::Taken(p) => p,
        Take::Absent => {
            sink.unmatched(key, ack, answer);
            return;
        }
        Take::Kept(pending) => {
            if let Answer::SynAck = answer {
                sink.count(Counter::SynAckMismatch);
                sink.note(Note::SynAckMismatch {
                    src_port: key.src_port,
                    ack,
                    expected: pending.isn.wrapping_add(1),
                });
            }
            return;
        }
        Take::Gone => return,
        Take::Busy => {
            sink.count(Counter::AnswerBusy);
            sink.busy(key, ack, answer);
            return;
        }
    };
    let now = sink.now();
    let (kind, counter) = resolution(answer);
    sink.count(counter);
    // An answer to an attempt reported lost is late: always an event.
    if let (EventKind::Answered, STATE_WAITING) = (kind, pending.state) {
        if sink.book_answer(key, &pending, now) {
            return;
        }
    }
    let (icmp_type, icmp_code) = answer.icmp();
    sink.emit(kind, key, &pending, now, icmp_type, icmp_code);
}

/// A SYN seen on a pod-side interface, in the pod's address space: reported for linking to its
/// uplink twin by ISN, no pending entry.
#[inline(always)]
pub fn on_pod_syn<S: EventSink + ?Sized>(
    sink: &mut S,
    filter: Option<&KernelFilter>,
    key: &FlowKey,
    isn: u32,
    data_len: u32,
) {
    if let Some(f) = filter {
        if !f.matches(key) {
            return;
        }
    }
    sink.count(Counter::PodSynSeen);
    let now = sink.now();
    let mut seen = PendingSyn::first(now, isn, sink.ifindex());
    seen.data_len = if data_len > u16::MAX as u32 {
        u16::MAX
    } else {
        data_len as u16
    };
    sink.emit(EventKind::PodSyn, key, &seen, now, 0, 0);
}

/// A parsed packet on the uplink: a SYN on egress, an answer on ingress.
#[inline(always)]
pub fn on_packet<T: PendingTable + ?Sized, S: EventSink + ?Sized>(
    table: &mut T,
    sink: &mut S,
    filter: Option<&KernelFilter>,
    parsed: &Parsed,
) {
    match *parsed {
        Parsed::Syn { key, isn, data_len } => on_syn(table, sink, filter, &key, isn, data_len),
        Parsed::Answer { key, ack, answer } => on_answer(table, sink, &key, ack, answer),
    }
}

#[cfg(any(test, feature = "std"))]
pub use memory::{MemorySink, MemoryTable};

#[cfg(any(test, feature = "std"))]
mod memory {
    extern crate std;

    use std::{collections::HashMap, vec::Vec};

    use super::{busy_event, EventSink, Insert, PendingTable};
    use crate::parse::Answer;
    use crate::{BookKey, Counter, EventKind, FlowKey, OutcomeEvent, PendingSyn, COUNTER_SLOTS};

    /// A pending map in memory, optionally bounded like the kernel's (`max_entries`).
    #[derive(Clone, Debug, Default)]
    pub struct MemoryTable {
        pub map: HashMap<FlowKey, PendingSyn>,
        /// Capacity; 0 for unbounded.
        pub max_entries: usize,
    }

    impl PendingTable for MemoryTable {
        fn modify<R, F: FnOnce(&mut PendingSyn) -> R>(&mut self, key: &FlowKey, f: F) -> Option<R> {
            self.map.get_mut(key).map(f)
        }
        fn get(&self, key: &FlowKey) -> Option<PendingSyn> {
            self.map.get(key).copied()
        }
        fn insert_new(&mut self, key: &FlowKey, value: &PendingSyn) -> Insert {
            if self.map.contains_key(key) {
                return Insert::Exists;
            }
            if self.max_entries != 0 && self.map.len() >= self.max_entries {
                return Insert::Full;
            }
            self.map.insert(*key, *value);
            Insert::Inserted
        }
        fn remove(&mut self, key: &FlowKey) -> bool {
            self.map.remove(key).is_some()
        }
    }

    /// The same rules over a bare `HashMap` (e.g. the one inside the tracker's in-memory map).
    impl PendingTable for HashMap<FlowKey, PendingSyn> {
        fn modify<R, F: FnOnce(&mut PendingSyn) -> R>(&mut self, key: &FlowKey, f: F) -> Option<R> {
            HashMap::get_mut(self, key).map(f)
        }
        fn get(&self, key: &FlowKey) -> Option<PendingSyn> {
            HashMap::get(self, key).copied()
        }
        fn insert_new(&mut self, key: &FlowKey, value: &PendingSyn) -> Insert {
            if self.contains_key(key) {
                return Insert::Exists;
            }
            self.insert(*key, *value);
            Insert::Inserted
        }
        fn remove(&mut self, key: &FlowKey) -> bool {
            HashMap::remove(self, key).is_some()
        }
    }

    /// Collects what the rules report, as the kernel's ring buffer and counters would hold it.
    /// Set `now` (capture time) and `ifindex` before each packet.
    #[derive(Clone, Debug)]
    pub struct MemorySink {
        pub now: u64,
        pub ifindex: u32,
        /// Indexed by [`Counter`] number.
        pub counters: [u64; COUNTER_SLOTS as usize],
        /// SYN packets by source port.
        pub syn_ports: HashMap<u16, u64>,
        /// The ring buffer's records, in order; drain them with [`MemorySink::take_events`].
        pub events: Vec<OutcomeEvent>,
        /// Whether new pending entries are reported (as the kernel does for attribution).
        pub send_syns: bool,
        /// The answer books, when kept (as the kernel keeps them by default): answered
        /// attempts still waiting, with the time of the answer, instead of events.
        pub books: Option<Vec<(FlowKey, PendingSyn, u64)>>,
        /// Whether SYN-ACKs with no pending entry are reported, as the kernel does
        /// ([`EventKind::UnmatchedSynAck`]).
        pub report_unmatched: bool,
    }

    impl Default for MemorySink {
        fn default() -> Self {
            Self {
                now: 0,
                ifindex: 0,
                counters: [0; COUNTER_SLOTS as usize],
                syn_ports: HashMap::new(),
                events: Vec::new(),
                send_syns: true,
                books: None,
                report_unmatched: false,
            }
        }
    }

    impl MemorySink {
        /// The value of `counter`.
        pub fn counter(&self, counter: Counter) -> u64 {
            self.counters[counter as usize]
        }

        /// The events reported so far, leaving none.
        pub fn take_events(&mut self) -> Vec<OutcomeEvent> {
            core::mem::take(&mut self.events)
        }
    }

    impl EventSink for MemorySink {
        fn now(&mut self) -> u64 {
            self.now
        }
        fn ifindex(&self) -> u32 {
            self.ifindex
        }
        fn count(&mut self, counter: Counter) {
            self.counters[counter as usize] += 1;
        }
        fn syn_port(&mut self, port: u16) {
            *self.syn_ports.entry(port).or_default() += 1;
        }
        fn sends_syns(&self) -> bool {
            self.send_syns
        }
        fn unmatched(&mut self, key: &FlowKey, ack: u32, answer: Answer) {
            if self.report_unmatched && answer == Answer::SynAck {
                let booked = self.books.as_ref().is_some_and(|b| {
                    b.iter().any(|(k, p, _)| {
                        BookKey::of(k, p.ifindex) == BookKey::of(key, self.ifindex)
                            && k.src_port == key.src_port
                    })
                });
                if booked {
                    self.counters[Counter::SynAckRepeated as usize] += 1;
                    return;
                }
                self.counters[Counter::SynAckUnmatched as usize] += 1;
                let now = self.now;
                let seen = PendingSyn::first(now, ack.wrapping_sub(1), self.ifindex);
                self.emit(EventKind::UnmatchedSynAck, key, &seen, now, 0, 0);
            }
        }
        fn busy(&mut self, key: &FlowKey, ack: u32, answer: Answer) {
            let now = self.now;
            let (seen, icmp_type, icmp_code) = busy_event(now, ack, answer, self.ifindex);
            self.emit(EventKind::BusyAnswer, key, &seen, now, icmp_type, icmp_code);
        }
        fn book_answer(&mut self, key: &FlowKey, pending: &PendingSyn, now: u64) -> bool {
            match self.books.as_mut() {
                Some(b) => {
                    b.push((*key, *pending, now));
                    self.counters[Counter::AnsweredBooked as usize] += 1;
                    true
                }
                None => false,
            }
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
            self.events.push(OutcomeEvent {
                kind: kind as u32,
                ifindex: self.ifindex,
                key: *key,
                pending: *pending,
                ts_ns: now,
                icmp_type,
                icmp_code,
                _pad: [0; 6],
            });
        }
    }
}
