//! The only owner of connection state in user space, and the only place that decides *lost*,
//! *late* and *abandoned*. The kernel decides answered, refused and unreachable; user space
//! decides what never got an answer, by time.

use std::collections::{HashMap, VecDeque};

use netrace_common::{EventKind, FlowKey, PendingSyn};

use crate::kernel::events::Event;

/// The kernel's pending map, as the tracker needs it (a fake one in unit tests).
pub trait PendingMap {
    fn get(&self, key: &FlowKey) -> Option<PendingSyn>;
    fn remove(&mut self, key: &FlowKey);
    /// Every entry, for adopting SYNs whose events were lost.
    fn scan(&self) -> Vec<(FlowKey, PendingSyn)>;
}

/// A pending map in memory: the tracker without a kernel (unit tests, fuzzing, models).
#[derive(Clone, Debug, Default)]
pub struct MemoryMap(pub HashMap<FlowKey, PendingSyn>);

impl PendingMap for MemoryMap {
    fn get(&self, key: &FlowKey) -> Option<PendingSyn> {
        self.0.get(key).copied()
    }
    fn remove(&mut self, key: &FlowKey) {
        self.0.remove(key);
    }
    fn scan(&self) -> Vec<(FlowKey, PendingSyn)> {
        self.0.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    Answered,
    Lost,
    Refused,
    Unreachable,
    /// An answer after the connection was reported lost.
    Late,
    /// A new SYN with another ISN on the same 4-tuple before any answer: given up, unanswered.
    Abandoned,
}

impl OutcomeKind {
    /// Whether this outcome counts as a lost connection in the totals.
    pub fn is_loss(self) -> bool {
        matches!(self, Self::Lost | Self::Abandoned)
    }
}

/// One decided connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub kind: OutcomeKind,
    pub key: FlowKey,
    pub pending: PendingSyn,
    /// First SYN to the answer, when there was one.
    pub rtt_ns: Option<u64>,
    pub icmp: Option<(u8, u8)>,
    /// The 4-tuple the answer came back to, when it differs from the SYN's: paired by (remote
    /// address, remote port, ISN) because something translated the SYN after netrace saw it.
    pub answered_as: Option<FlowKey>,
}

#[derive(Clone, Copy, Debug)]
struct Tracked {
    pending: PendingSyn,
    /// When user space reported it lost; the kernel entry stays for the late window so that a
    /// late answer is still paired with this connection.
    lost_at: Option<u64>,
    /// A retransmission of the SYN of an attempt already decided by an answer (same 4-tuple,
    /// same ISN): the same connection, not a new one. Its answer or silence is not reported.
    /// (A client stack takes an ICMP error that arrives while `connect()` still holds the
    /// socket for a soft error and sends the SYN again.)
    repeat: bool,
}

/// Counts of things the tracker noticed that are not outcomes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackerStats {
    /// Connections answered in the kernel whose outcome event was dropped (ring buffer full):
    /// known not lost, outcome unknown.
    pub answered_unseen: u64,
    /// SYNs adopted from the kernel map because their event was dropped.
    pub adopted: u64,
    /// SYNs retransmitted after their attempt had been answered (not counted again).
    pub repeated_syns: u64,
    /// SYNs of an attempt already reported lost, seen after its kernel entry was cleared
    /// (the client kept retrying, `tcp_syn_retries`): the same attempt, not counted again.
    pub syns_after_lost: u64,
    /// Lost attempts forgotten before their retry horizon because the memory of lost
    /// attempts was full (a later SYN of theirs would count as a new attempt).
    pub lost_memory_overflow: u64,
    /// Answers paired with their SYN by (remote address, remote port, ISN) because they came
    /// back to another local address or port: the SYN was translated after netrace saw it.
    pub translated_answers: u64,
    /// One such pair (the SYN's 4-tuple, the answer's), for the report.
    pub translated_example: Option<(FlowKey, FlowKey)>,
    /// SYN-ACKs for 4-tuples never seen leaving that no pending SYN explains.
    pub unmatched_synacks: u64,
}

/// The key of the ISN index: family, remote address, remote port, ISN. Translation of the
/// local side leaves all four unchanged.
type IsnKey = (u8, [u8; 16], u16, u32);

fn isn_key(key: &FlowKey, isn: u32) -> IsnKey {
    (key.family, key.dst_addr, key.dst_port, isn)
}

/// How long an answered attempt is remembered, to recognise a retransmission of its SYN:
/// Linux resends an unacknowledged SYN after 1, 3 and 7 s. Bounded, as every answered
/// connection costs memory for this long.
const REPEAT_WINDOW_NS: u64 = 10_000_000_000;

/// At most this many lost attempts are remembered after their late window (about 5 MiB).
pub const MAX_LOST_MEMORY: usize = 65_536;
/// At most this many keys of answers whose events were dropped wait to be collected.
const MAX_UNSEEN: usize = 65_536;

/// How long a client keeps sending SYNs for one connect, from its first SYN, plus a little:
/// Linux's timeouts double from 1 s, so `retries` retransmissions give up after
/// 2^(retries+1) - 1 s (127 s for the default 6). Linear timeouts
/// (`tcp_syn_linear_timeouts`) only shorten it.
pub fn retry_horizon_ns(tcp_syn_retries: u32) -> u64 {
    let retries = tcp_syn_retries.min(20);
    ((1u64 << (retries + 1)) - 1 + 3) * 1_000_000_000
}

pub struct Tracker {
    syn_timeout_ns: u64,
    late_window_ns: u64,
    repeat_window_ns: u64,
    entries: HashMap<FlowKey, Tracked>,
    /// Attempts decided by an answer in the last repeat window: ISN and when, so that a
    /// retransmitted SYN of one is recognised as the same attempt.
    decided: HashMap<FlowKey, (u32, u64)>,
    decided_order: VecDeque<(u64, FlowKey)>,
    /// SYNs by remote address, remote port and ISN, for answers that come back to another
    /// 4-tuple. Stale entries are dropped by the sweep.
    by_isn: HashMap<IsnKey, FlowKey>,
    /// Kernel entries (with their ISN) of attempts decided here by the ISN index, removed from
    /// the kernel map at the next sweep.
    kernel_removals: Vec<(FlowKey, u32)>,
    /// Lost attempts whose kernel entry was cleared after the late window: ISN and until
    /// when a SYN or an answer of theirs still belongs to them (their retry horizon).
    lost_memory: HashMap<FlowKey, (u32, u64)>,
    lost_order: VecDeque<(u64, FlowKey)>,
    retry_horizon_ns: u64,
    max_lost_memory: usize,
    /// Attempts answered whose outcome event was dropped, for the caller to count as
    /// answered ([`Tracker::take_unseen_answers`]).
    unseen_answers: Vec<(FlowKey, PendingSyn)>,
    pub stats: TrackerStats,
}

impl Tracker {
    pub fn new(syn_timeout_ns: u64, late_window_ns: u64) -> Self {
        Self {
            syn_timeout_ns,
            late_window_ns: late_window_ns.max(syn_timeout_ns),
            repeat_window_ns: late_window_ns.min(REPEAT_WINDOW_NS).max(syn_timeout_ns),
            entries: HashMap::new(),
            decided: HashMap::new(),
            decided_order: VecDeque::new(),
            by_isn: HashMap::new(),
            kernel_removals: Vec::new(),
            lost_memory: HashMap::new(),
            lost_order: VecDeque::new(),
            retry_horizon_ns: 0,
            max_lost_memory: MAX_LOST_MEMORY,
            unseen_answers: Vec::new(),
            stats: TrackerStats::default(),
        }
    }

    /// Remembers each lost attempt until `horizon_ns` after its first SYN (see
    /// [`retry_horizon_ns`]), at most `max` of them: a SYN retransmitted after its kernel
    /// entry was cleared is then the same attempt, and an answer to it is *late*.
    pub fn with_retry_horizon(mut self, horizon_ns: u64, max: usize) -> Self {
        self.retry_horizon_ns = horizon_ns;
        self.max_lost_memory = max;
        self
    }

    /// Lost attempts remembered beyond their late window.
    pub fn lost_remembered(&self) -> usize {
        self.lost_memory.len()
    }

    fn is_remembered_lost(&self, key: &FlowKey, isn: u32) -> bool {
        self.lost_memory.get(key).is_some_and(|(i, _)| *i == isn)
    }

    fn remember_lost(&mut self, key: FlowKey, isn: u32, until_ns: u64) {
        if let Some(e) = self.lost_memory.get_mut(&key) {
            *e = (isn, until_ns);
            self.lost_order.push_back((until_ns, key));
            return;
        }
        while self.lost_memory.len() >= self.max_lost_memory.max(1) {
            let Some((at, old)) = self.lost_order.pop_front() else {
                break;
            };
            if self.lost_memory.get(&old).is_some_and(|(_, u)| *u == at) {
                self.lost_memory.remove(&old);
                self.stats.lost_memory_overflow += 1;
            }
        }
        self.lost_memory.insert(key, (isn, until_ns));
        self.lost_order.push_back((until_ns, key));
    }

    /// Keys of attempts answered whose outcome event was dropped since the last call: they
    /// count as answered attempts (their kind and RTT are unknown).
    pub fn take_unseen_answers(&mut self) -> Vec<(FlowKey, PendingSyn)> {
        std::mem::take(&mut self.unseen_answers)
    }

    fn is_decided(&self, key: &FlowKey, isn: u32) -> bool {
        self.decided.get(key).is_some_and(|(i, _)| *i == isn)
    }

    fn remember_decided(&mut self, key: FlowKey, isn: u32, at_ns: u64) {
        self.decided.insert(key, (isn, at_ns));
        self.decided_order.push_back((at_ns, key));
    }

    /// Connections waiting for an answer (not yet reported).
    pub fn pending(&self) -> usize {
        self.entries
            .values()
            .filter(|t| t.lost_at.is_none() && !t.repeat)
            .count()
    }

    /// Entries held, including lost ones kept for the late window.
    pub fn held(&self) -> usize {
        self.entries.len()
    }

    /// Source ports of every entry held (waiting, lost within the late window, repeats).
    pub fn held_ports(&self) -> Vec<u16> {
        self.entries.keys().map(|k| k.src_port).collect()
    }

    pub fn on_event(&mut self, ev: &Event, out: &mut Vec<Outcome>) {
        let key = ev.raw.key;
        let p = ev.raw.pending;
        match ev.kind {
            EventKind::Syn => {
                // A waiting entry replaced by a SYN with another ISN, its Superseded event
                // dropped (ring buffer full): the kernel gave the old attempt up, as `sweep`
                // reports when the map holds another ISN. Overwritten silently, it was never
                // counted.
                if let Some(old) = self.entries.get(&key) {
                    if old.lost_at.is_none() && !old.repeat && old.pending.isn != p.isn {
                        out.push(Outcome {
                            kind: OutcomeKind::Abandoned,
                            key,
                            pending: old.pending,
                            rtt_ns: None,
                            icmp: None,
                            answered_as: None,
                        });
                    }
                }
                if self.is_remembered_lost(&key, p.isn) {
                    // The same connection, still retrying after it was reported lost.
                    self.stats.syns_after_lost += 1;
                    self.entries.insert(
                        key,
                        Tracked {
                            pending: p,
                            lost_at: Some(ev.raw.ts_ns),
                            repeat: false,
                        },
                    );
                    return;
                }
                let repeat = self.is_decided(&key, p.isn);
                if repeat {
                    self.stats.repeated_syns += 1;
                }
                self.by_isn.insert(isn_key(&key, p.isn), key);
                self.entries.insert(
                    key,
                    Tracked {
                        pending: p,
                        lost_at: None,
                        repeat,
                    },
                );
            }
            EventKind::Superseded => {
                let reported = match self.entries.get(&key) {
                    Some(t) if t.pending.isn == p.isn => t.lost_at.is_some() || t.repeat,
                    _ => self.is_decided(&key, p.isn) || self.is_remembered_lost(&key, p.isn),
                };
                if let Some(t) = self.entries.get(&key) {
                    if t.pending.isn == p.isn {
                        self.entries.remove(&key);
                    }
                }
                if !reported {
                    out.push(Outcome {
                        kind: OutcomeKind::Abandoned,
                        key,
                        pending: p,
                        rtt_ns: None,
                        icmp: None,
                        answered_as: None,
                    });
                }
            }
            EventKind::Answered | EventKind::Refused | EventKind::Unreachable => {
                let (was_lost, repeat) = match self.entries.get(&key) {
                    Some(t) if t.pending.isn == p.isn => {
                        let seen = (t.lost_at.is_some(), t.repeat);
                        self.entries.remove(&key);
                        seen
                    }
                    _ => (
                        self.is_remembered_lost(&key, p.isn),
                        self.is_decided(&key, p.isn),
                    ),
                };
                if repeat {
                    // This attempt's outcome was reported at its first answer.
                    return;
                }
                self.remember_decided(key, p.isn, ev.raw.ts_ns);
                let kind = match (was_lost, ev.kind) {
                    (true, _) => OutcomeKind::Late,
                    (false, EventKind::Refused) => OutcomeKind::Refused,
                    (false, EventKind::Unreachable) => OutcomeKind::Unreachable,
                    (false, _) => OutcomeKind::Answered,
                };
                let icmp = (ev.kind == EventKind::Unreachable)
                    .then_some((ev.raw.icmp_type, ev.raw.icmp_code));
                out.push(Outcome {
                    kind,
                    key,
                    pending: p,
                    rtt_ns: Some(ev.raw.ts_ns.saturating_sub(p.first_ns)),
                    icmp,
                    answered_as: None,
                });
            }
            EventKind::UnmatchedSynAck => self.on_unmatched_synack(ev, out),
            // Not connection state: the correlator's business.
            EventKind::PodSyn | EventKind::SockConnect | EventKind::SockLeftSynSent => {}
        }
    }

    /// A SYN-ACK for a 4-tuple with no kernel entry: the answer to a SYN seen under another
    /// local address or port (translated after netrace saw it) if one waits with the same
    /// remote address, remote port and ISN; else a sign that SYNs leave unseen.
    fn on_unmatched_synack(&mut self, ev: &Event, out: &mut Vec<Outcome>) {
        let answer_key = ev.raw.key;
        let isn = ev.raw.pending.isn;
        if self.is_decided(&answer_key, isn) {
            return; // A repeated SYN-ACK of an answered connection.
        }
        let Some(&syn_key) = self.by_isn.get(&isn_key(&answer_key, isn)) else {
            self.stats.unmatched_synacks += 1;
            return;
        };
        if self.is_decided(&syn_key, isn) {
            return; // A repeated SYN-ACK of a connection paired this way already.
        }
        let Some(t) = self
            .entries
            .get(&syn_key)
            .copied()
            .filter(|t| t.pending.isn == isn)
        else {
            self.stats.unmatched_synacks += 1;
            return;
        };
        self.entries.remove(&syn_key);
        self.kernel_removals.push((syn_key, isn));
        self.remember_decided(syn_key, isn, ev.raw.ts_ns);
        if t.repeat {
            return;
        }
        self.stats.translated_answers += 1;
        if self.stats.translated_example.is_none() {
            self.stats.translated_example = Some((syn_key, answer_key));
        }
        out.push(Outcome {
            kind: if t.lost_at.is_some() {
                OutcomeKind::Late
            } else {
                OutcomeKind::Answered
            },
            key: syn_key,
            pending: t.pending,
            rtt_ns: Some(ev.raw.ts_ns.saturating_sub(t.pending.first_ns)),
            icmp: None,
            answered_as: Some(answer_key),
        });
    }

    /// Forgets an attempt still waiting for its answer, without an outcome: it was not a
    /// connection of the watched side after all (`analyze`: a SYN seen before its SNAT twin on
    /// the uplink, which is the connection the report counts). `false` when no waiting attempt
    /// of that ISN was held.
    pub fn forget(&mut self, key: &FlowKey, isn: u32) -> bool {
        match self.entries.get(key) {
            Some(t) if t.pending.isn == isn && t.lost_at.is_none() && !t.repeat => {
                self.entries.remove(key);
                true
            }
            _ => false,
        }
    }

    /// Decides *lost* for entries older than the SYN timeout, and forgets lost entries once
    /// their late window has passed.
    pub fn sweep(&mut self, now_ns: u64, map: &mut impl PendingMap, out: &mut Vec<Outcome>) {
        for (key, isn) in std::mem::take(&mut self.kernel_removals) {
            if map.get(&key).is_some_and(|k| k.isn == isn) {
                map.remove(&key);
            }
        }
        let mut expired = Vec::new();
        let mut due = Vec::new();
        for (key, t) in &self.entries {
            let age = now_ns.saturating_sub(t.pending.first_ns);
            match t.lost_at {
                None if age >= self.syn_timeout_ns => due.push(*key),
                Some(_) if age >= self.late_window_ns => expired.push(*key),
                _ => {}
            }
        }
        for key in due {
            let Some(t) = self.entries.get(&key).copied() else {
                continue;
            };
            if t.repeat {
                // Unanswered again: still the attempt decided before, nothing to report.
                self.entries.remove(&key);
                if map.get(&key).is_some_and(|k| k.isn == t.pending.isn) {
                    map.remove(&key);
                }
                continue;
            }
            match map.get(&key) {
                Some(k) if k.isn == t.pending.isn => {
                    let pending = PendingSyn {
                        syns: k.syns,
                        last_ns: k.last_ns,
                        ..t.pending
                    };
                    self.entries.insert(
                        key,
                        Tracked {
                            pending,
                            lost_at: Some(now_ns),
                            repeat: false,
                        },
                    );
                    out.push(Outcome {
                        kind: OutcomeKind::Lost,
                        key,
                        pending,
                        rtt_ns: None,
                        icmp: None,
                        answered_as: None,
                    });
                }
                Some(k) => {
                    // The kernel replaced the entry and both events were dropped.
                    out.push(Outcome {
                        kind: OutcomeKind::Abandoned,
                        key,
                        pending: t.pending,
                        rtt_ns: None,
                        icmp: None,
                        answered_as: None,
                    });
                    self.entries.insert(
                        key,
                        Tracked {
                            pending: k,
                            lost_at: None,
                            repeat: self.is_decided(&key, k.isn),
                        },
                    );
                }
                None => {
                    // Only an answer removes a kernel entry: the outcome event was dropped.
                    // Still an answered attempt: not counting it would inflate the loss rate.
                    self.entries.remove(&key);
                    self.stats.answered_unseen += 1;
                    if self.unseen_answers.len() < MAX_UNSEEN {
                        self.unseen_answers.push((key, t.pending));
                    }
                }
            }
        }
        for key in expired {
            if let Some(t) = self.entries.remove(&key) {
                if map.get(&key).is_some_and(|k| k.isn == t.pending.isn) {
                    map.remove(&key);
                }
                let until = t.pending.first_ns.saturating_add(self.retry_horizon_ns);
                if until > now_ns && !self.is_remembered_lost(&key, t.pending.isn) {
                    self.remember_lost(key, t.pending.isn, until);
                }
            }
        }
        while let Some(&(until, key)) = self.lost_order.front() {
            if until > now_ns {
                break;
            }
            self.lost_order.pop_front();
            if self.lost_memory.get(&key).is_some_and(|(_, u)| *u == until) {
                self.lost_memory.remove(&key);
            }
        }
        while let Some(&(at, key)) = self.decided_order.front() {
            if now_ns.saturating_sub(at) < self.repeat_window_ns {
                break;
            }
            self.decided_order.pop_front();
            if self.decided.get(&key).is_some_and(|(_, t)| *t == at) {
                self.decided.remove(&key);
            }
        }
        if self.by_isn.len() > 2 * (self.entries.len() + self.decided.len()) + 64 {
            let (entries, decided) = (&self.entries, &self.decided);
            self.by_isn.retain(|(_, _, _, isn), key| {
                entries.get(key).is_some_and(|t| t.pending.isn == *isn)
                    || decided.get(key).is_some_and(|(i, _)| i == isn)
            });
        }
    }

    /// Takes in kernel entries the tracker has not heard of (their SYN events were dropped).
    pub fn adopt(&mut self, map: &impl PendingMap) {
        for (key, p) in map.scan() {
            let repeat = self.is_decided(&key, p.isn);
            let lost_at = self
                .is_remembered_lost(&key, p.isn)
                .then_some(p.last_ns.max(p.first_ns));
            if let std::collections::hash_map::Entry::Vacant(v) = self.entries.entry(key) {
                v.insert(Tracked {
                    pending: p,
                    lost_at,
                    repeat,
                });
                self.stats.adopted += 1;
            }
        }
    }

    /// Final sweep at exit: returns how many connections were still waiting (younger than
    /// the SYN timeout), which are neither answered nor lost. Clears every kernel entry.
    pub fn finish(
        &mut self,
        now_ns: u64,
        map: &mut impl PendingMap,
        out: &mut Vec<Outcome>,
    ) -> u64 {
        self.sweep(now_ns, map, out);
        let waiting = self.pending() as u64;
        for key in self.entries.keys() {
            map.remove(key);
        }
        self.entries.clear();
        waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netrace_common::FAMILY_V4;

    const S: u64 = 1_000_000_000;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            family: FAMILY_V4,
            src_port: port,
            dst_port: 80,
            ..Default::default()
        }
    }

    fn pending(first: u64, isn: u32) -> PendingSyn {
        PendingSyn::first(first, isn, 0)
    }

    fn ev(kind: EventKind, key: FlowKey, p: PendingSyn, ts: u64) -> Event {
        Event::new(kind, key, p, ts)
    }

    #[test]
    fn answered_lost_late() {
        let mut t = Tracker::new(3 * S, 60 * S);
        let mut m = MemoryMap::default();
        let mut out = Vec::new();
        let (a, b) = (key(40000), key(2000));
        let (pa, pb) = (pending(S, 7), pending(S, 9));
        m.0.insert(a, pa);
        m.0.insert(b, pb);
        t.on_event(&ev(EventKind::Syn, a, pa, S), &mut out);
        t.on_event(&ev(EventKind::Syn, b, pb, S), &mut out);
        m.0.remove(&a);
        t.on_event(&ev(EventKind::Answered, a, pa, S + 500), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, OutcomeKind::Answered);
        assert_eq!(out[0].rtt_ns, Some(500));
        t.sweep(3 * S, &mut m, &mut out);
        assert_eq!(out.len(), 1, "not yet timed out at 2 s");
        if let Some(p) = m.0.get_mut(&b) {
            p.syns = 3;
        }
        t.sweep(4 * S, &mut m, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].kind, OutcomeKind::Lost);
        assert_eq!(out[1].pending.syns, 3);
        t.sweep(5 * S, &mut m, &mut out);
        assert_eq!(out.len(), 2, "lost is reported once");
        m.0.remove(&b);
        t.on_event(&ev(EventKind::Answered, b, pb, 10 * S), &mut out);
        assert_eq!(out[2].kind, OutcomeKind::Late);
        assert_eq!(t.held(), 0);
    }

    #[test]
    fn syn_retransmitted_after_an_answer_is_the_same_attempt() {
        // An ICMP error that reaches the client while connect() holds its socket is a soft
        // error there: the stack sends the same SYN again and gets the same error.
        let mut t = Tracker::new(S, 10 * S);
        let mut m = MemoryMap::default();
        let mut out = Vec::new();
        let k = key(40000);
        let p1 = pending(0, 7);
        t.on_event(&ev(EventKind::Syn, k, p1, 0), &mut out);
        t.on_event(&ev(EventKind::Unreachable, k, p1, S / 1000), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, OutcomeKind::Unreachable);
        let p2 = pending(S, 7);
        t.on_event(&ev(EventKind::Syn, k, p2, S), &mut out);
        assert_eq!(t.pending(), 0, "a repeat is not a new attempt waiting");
        t.on_event(&ev(EventKind::Unreachable, k, p2, S + 1), &mut out);
        assert_eq!(out.len(), 1, "the repeat's answer is not reported again");
        assert_eq!(t.stats.repeated_syns, 1);
        // Unanswered repeat: cleared silently, kernel entry too.
        let p3 = pending(3 * S, 7);
        m.0.insert(k, p3);
        t.on_event(&ev(EventKind::Syn, k, p3, 3 * S), &mut out);
        t.sweep(5 * S, &mut m, &mut out);
        assert_eq!(out.len(), 1);
        assert!(m.0.is_empty());
        assert_eq!(t.held(), 0);
        // A new ISN on the same tuple is a new attempt; after the window the old one is gone.
        let p4 = pending(6 * S, 8);
        t.on_event(&ev(EventKind::Syn, k, p4, 6 * S), &mut out);
        t.on_event(&ev(EventKind::Answered, k, p4, 6 * S + 5), &mut out);
        assert_eq!(out.len(), 2);
        t.sweep(30 * S, &mut m, &mut out);
        let p5 = pending(31 * S, 8);
        t.on_event(&ev(EventKind::Syn, k, p5, 31 * S), &mut out);
        assert_eq!(
            t.pending(),
            1,
            "outside the window it counts as a new attempt"
        );
    }

    #[test]
    fn late_window_clears_kernel_entry() {
        let mut t = Tracker::new(S, 10 * S);
        let mut m = MemoryMap::default();
        let mut out = Vec::new();
        let k = key(1500);
        let p = pending(0, 1);
        m.0.insert(k, p);
        t.on_event(&ev(EventKind::Syn, k, p, 0), &mut out);
        t.sweep(2 * S, &mut m, &mut out);
        assert_eq!(out[0].kind, OutcomeKind::Lost);
        assert!(m.0.contains_key(&k));
        t.sweep(11 * S, &mut m, &mut out);
        assert!(!m.0.contains_key(&k));
        assert_eq!(t.held(), 0);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn dropped_answer_event_is_not_a_loss() {
        let mut t = Tracker::new(S, 10 * S);
        let mut m = MemoryMap::default();
        let mut out = Vec::new();
        let k = key(1500);
        t.on_event(&ev(EventKind::Syn, k, pending(0, 1), 0), &mut out);
        t.sweep(2 * S, &mut m, &mut out);
        assert!(out.is_empty());
        assert_eq!(t.stats.answered_unseen, 1);
        assert_eq!(
            t.take_unseen_answers(),
            vec![(k, pending(0, 1))],
            "still an answered attempt"
        );
        assert!(t.take_unseen_answers().is_empty());
    }

    #[test]
    fn dropped_syn_event_is_adopted_then_lost() {
        let mut t = Tracker::new(S, 10 * S);
        let mut m = MemoryMap::default();
        let mut out = Vec::new();
        let k = key(1500);
        m.0.insert(k, pending(0, 1));
        t.adopt(&m);
        assert_eq!(t.stats.adopted, 1);
        t.sweep(2 * S, &mut m, &mut out);
        assert_eq!(out[0].kind, OutcomeKind::Lost);
    }

    #[test]
    fn superseded_is_abandoned_once() {
        let mut t = Tracker::new(S, 10 * S);
        let mut m = MemoryMap::default();
        let mut out = Vec::new();
        let k = key(1500);
        let old = pending(0, 1);
        t.on_event(&ev(EventKind::Syn, k, old, 0), &mut out);
        t.on_event(&ev(EventKind::Superseded, k, old, S / 2), &mut out);
        let new = pending(S / 2, 99);
        m.0.insert(k, new);
        t.on_event(&ev(EventKind::Syn, k, new, S / 2), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, OutcomeKind::Abandoned);
        assert!(out[0].kind.is_loss());
        m.0.remove(&k);
        t.on_event(&ev(EventKind::Answered, k, new, S), &mut out);
        assert_eq!(out[1].kind, OutcomeKind::Answered);
    }

    /// A client with tcp_syn_retries = 6 sends SYNs at 0, 1, 3, 7, 15, 31 and 63 s. The kernel
    /// entry is cleared after the 60 s late window; the SYN at 63 s (same ISN) is still the
    /// same attempt, and an answer to it is late, not a second connection.
    #[test]
    fn syn_after_the_late_window_is_the_same_attempt() {
        let mut t = Tracker::new(3 * S, 60 * S).with_retry_horizon(retry_horizon_ns(6), 10);
        let mut m = MemoryMap::default();
        let mut out = Vec::new();
        let k = key(2000);
        let p = pending(0, 42);
        m.0.insert(k, p);
        t.on_event(&ev(EventKind::Syn, k, p, 0), &mut out);
        for s in [1, 3, 7, 15, 31] {
            if let Some(e) = m.0.get_mut(&k) {
                e.syns += 1;
                e.last_ns = s * S;
            }
            t.sweep(s * S + 1, &mut m, &mut out);
        }
        t.sweep(62 * S, &mut m, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, OutcomeKind::Lost);
        assert_eq!(
            out[0].pending.syns, 3,
            "lost at the SYN timeout, after three SYNs"
        );
        assert!(
            m.0.is_empty(),
            "the kernel entry is cleared after the late window"
        );
        assert_eq!(t.lost_remembered(), 1);
        // The seventh SYN recreates the kernel entry.
        let p7 = pending(63 * S, 42);
        m.0.insert(k, p7);
        t.on_event(&ev(EventKind::Syn, k, p7, 63 * S), &mut out);
        assert_eq!(t.pending(), 0, "not a new attempt waiting");
        t.sweep(70 * S, &mut m, &mut out);
        assert_eq!(out.len(), 1, "not reported lost a second time");
        assert_eq!(t.stats.syns_after_lost, 1);
        // Its SYN-ACK makes the attempt late.
        m.0.remove(&k);
        t.on_event(&ev(EventKind::Answered, k, p7, 71 * S), &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].kind, OutcomeKind::Late);
        // After the horizon, the memory is gone; a new ISN is a new attempt anyway.
        t.sweep(200 * S, &mut m, &mut out);
        assert_eq!(t.lost_remembered(), 0);
        let p2 = pending(201 * S, 43);
        t.on_event(&ev(EventKind::Syn, k, p2, 201 * S), &mut out);
        assert_eq!(t.pending(), 1);
    }

    #[test]
    fn lost_memory_is_capped_and_overflow_counted() {
        let mut t = Tracker::new(S, 2 * S).with_retry_horizon(retry_horizon_ns(6), 2);
        let mut m = MemoryMap::default();
        let mut out = Vec::new();
        for port in 1..=3 {
            let p = pending(0, u32::from(port));
            m.0.insert(key(port), p);
            t.on_event(&ev(EventKind::Syn, key(port), p, 0), &mut out);
        }
        t.sweep(S, &mut m, &mut out);
        t.sweep(3 * S, &mut m, &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(t.lost_remembered(), 2);
        assert_eq!(t.stats.lost_memory_overflow, 1);
        assert_eq!(retry_horizon_ns(6), 130 * S);
    }

    #[test]
    fn finish_counts_waiting_and_clears_kernel() {
        let mut t = Tracker::new(3 * S, 10 * S);
        let mut m = MemoryMap::default();
        let mut out = Vec::new();
        let k = key(1500);
        m.0.insert(k, pending(0, 1));
        t.on_event(&ev(EventKind::Syn, k, pending(0, 1), 0), &mut out);
        assert_eq!(t.finish(S, &mut m, &mut out), 1);
        assert!(out.is_empty());
        assert!(m.0.is_empty());
    }

    #[test]
    fn answer_to_a_translated_tuple_pairs_by_isn() {
        let mut t = Tracker::new(3 * S, 60 * S);
        let mut m = MemoryMap::default();
        let mut out = Vec::new();
        let pod = FlowKey {
            src_addr: [198, 18, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst_addr: [198, 18, 3, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..key(40001)
        };
        let node = FlowKey {
            src_port: 8257,
            src_addr: [198, 18, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..pod
        };
        let p = pending(S, 77);
        m.0.insert(pod, p);
        t.on_event(&ev(EventKind::Syn, pod, p, S), &mut out);
        t.on_event(
            &ev(EventKind::UnmatchedSynAck, node, pending(S + 5, 77), S + 5),
            &mut out,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, OutcomeKind::Answered);
        assert_eq!(out[0].key, pod);
        assert_eq!(out[0].answered_as, Some(node));
        assert_eq!(out[0].rtt_ns, Some(5));
        assert_eq!(t.stats.translated_answers, 1);
        assert_eq!(t.stats.translated_example, Some((pod, node)));
        t.sweep(2 * S, &mut m, &mut out);
        assert!(m.0.is_empty(), "the kernel entry goes with the answer");
        assert_eq!(out.len(), 1);
        // The server repeats its SYN-ACK: the same connection, nothing new.
        t.on_event(
            &ev(EventKind::UnmatchedSynAck, node, pending(S + 9, 77), S + 9),
            &mut out,
        );
        assert_eq!((out.len(), t.stats.unmatched_synacks), (1, 0));
        // A SYN-ACK no SYN explains (same remote, other ISN).
        t.on_event(
            &ev(EventKind::UnmatchedSynAck, node, pending(S + 9, 78), S + 9),
            &mut out,
        );
        assert_eq!((out.len(), t.stats.unmatched_synacks), (1, 1));
    }

    #[test]
    fn translated_answer_after_the_timeout_is_late() {
        let mut t = Tracker::new(S, 60 * S);
        let mut m = MemoryMap::default();
        let mut out = Vec::new();
        let pod = key(40001);
        let node = key(8257);
        let p = pending(0, 7);
        m.0.insert(pod, p);
        t.on_event(&ev(EventKind::Syn, pod, p, 0), &mut out);
        t.sweep(2 * S, &mut m, &mut out);
        assert_eq!(out[0].kind, OutcomeKind::Lost);
        t.on_event(
            &ev(EventKind::UnmatchedSynAck, node, pending(3 * S, 7), 3 * S),
            &mut out,
        );
        assert_eq!(out[1].kind, OutcomeKind::Late);
        assert_eq!(out[1].answered_as, Some(node));
        t.sweep(4 * S, &mut m, &mut out);
        assert!(m.0.is_empty());
        assert_eq!(t.held(), 0);
    }
}
