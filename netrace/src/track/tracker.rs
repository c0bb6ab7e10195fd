//! The only place in user space that decides *lost*, *late* and *abandoned*. The kernel
//! decides answered, refused and unreachable, and keeps every waiting SYN in its pending map;
//! user space holds no copy of them. A sweep walks the kernel map in batches and takes (removes
//! atomically) each entry older than the SYN timeout: whoever removes an entry reports it, so
//! an answer racing the sweep is counted once. A taken entry is reported lost and put back
//! marked lost, so that a late answer, or a retransmitted SYN of the same attempt, is still
//! recognised; after the late window it is taken for good and remembered until the client's
//! retry horizon.

use std::collections::{HashMap, HashSet, VecDeque};

use netrace_common::{
    answer_of,
    pairing::{acknowledges, resolution},
    parse::Answer,
    EventKind, ExpireCutoffs, FlowKey, OutcomeEvent, PendingSyn, STATE_LOST, STATE_WAITING,
};

use crate::kernel::events::Event;

/// Where a walk of the pending map stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanPos {
    started: bool,
    done: bool,
}

impl ScanPos {
    /// Whether this is the walk's first step (and marks it started).
    pub fn start(&mut self) -> bool {
        !std::mem::replace(&mut self.started, true)
    }

    /// The walk has seen every entry.
    pub fn finish(&mut self) {
        self.done = true;
    }

    pub fn done(&self) -> bool {
        self.done
    }
}

/// The kernel's pending map, as the tracker needs it (an in-memory one for `analyze`, unit
/// tests and fuzzing).
pub trait PendingMap {
    /// The next entries of a walk at `pos` into `out` (cleared first), finishing `pos` with
    /// the last ones. Entries may be taken or put back between steps. A walk goes in steps so
    /// that user space never holds a copy of the whole map.
    fn scan_next(&mut self, pos: &mut ScanPos, out: &mut Vec<(FlowKey, PendingSyn)>);
    /// Only the entries due (waiting with a first SYN before `cut.waiting_before_ns`, lost
    /// before `cut.lost_before_ns`), found where the map is, into `out` (cleared first); and
    /// how many of the others wait and how many are held lost. `None` when the map cannot
    /// (then the tracker walks it).
    fn due(
        &mut self,
        _cut: ExpireCutoffs,
        _out: &mut Vec<(FlowKey, PendingSyn)>,
    ) -> Option<(u64, u64)> {
        None
    }
    /// Removes the entry for `key` and returns it: whoever takes an entry reports it.
    fn take(&mut self, key: &FlowKey) -> Option<PendingSyn>;
    /// The same, to pair an answer the kernel could not look for (a bucket's lock stayed
    /// taken): a take of its own so that a model of the map can tell it from the sweep's.
    fn take_for_answer(&mut self, key: &FlowKey) -> Option<PendingSyn> {
        self.take(key)
    }
    /// Puts an entry back unless the key has one again (a new SYN wins).
    fn put_back(&mut self, key: &FlowKey, value: &PendingSyn) -> PutBack;
}

/// What became of an entry put back into the kernel map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutBack {
    /// It is back.
    Done,
    /// The key has an entry again: a SYN made it while user space held this one.
    Taken,
    /// The map refused it (full: SYNs took the free slots meanwhile).
    Refused,
}

/// A pending map in memory: the kernel's map for `analyze`, unit tests and models.
#[derive(Clone, Debug, Default)]
pub struct MemoryMap(pub HashMap<FlowKey, PendingSyn>);

/// What [`PendingMap::due`] counts besides the due entries: those waiting, those held lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NotDue {
    pub waiting: u64,
    pub lost: u64,
}

impl NotDue {
    /// Whether an entry in `state` first seen at `first_ns` is due under `cut`; one that is
    /// not is counted here.
    pub fn is_due(&mut self, cut: &ExpireCutoffs, state: u8, first_ns: u64) -> bool {
        match cut.due(state, first_ns) {
            Some(true) => true,
            Some(false) if state == STATE_LOST => {
                self.lost += 1;
                false
            }
            Some(false) => {
                self.waiting += 1;
                false
            }
            None => false,
        }
    }
}

impl PendingMap for MemoryMap {
    fn due(
        &mut self,
        cut: ExpireCutoffs,
        out: &mut Vec<(FlowKey, PendingSyn)>,
    ) -> Option<(u64, u64)> {
        out.clear();
        let mut rest = NotDue::default();
        for (k, p) in &self.0 {
            if rest.is_due(&cut, p.state, p.first_ns) {
                out.push((*k, *p));
            }
        }
        Some((rest.waiting, rest.lost))
    }

    fn scan_next(&mut self, pos: &mut ScanPos, out: &mut Vec<(FlowKey, PendingSyn)>) {
        out.clear();
        if pos.start() {
            out.extend(self.0.iter().map(|(k, v)| (*k, *v)));
        }
        pos.finish();
    }
    fn take(&mut self, key: &FlowKey) -> Option<PendingSyn> {
        self.0.remove(key)
    }
    fn put_back(&mut self, key: &FlowKey, value: &PendingSyn) -> PutBack {
        if self.0.contains_key(key) {
            return PutBack::Taken;
        }
        self.0.insert(*key, *value);
        PutBack::Done
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

/// Counts of things the tracker noticed that are not outcomes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackerStats {
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
    /// SYN-ACKs with no entry for a 4-tuple whose answer was counted in the kernel (as user
    /// space reads its answer logs and books): the server repeating an answer, not a sign
    /// of translation.
    pub repeated_synacks: u64,
    /// Answers whose entry the kernel could not look at (a bucket's lock stayed taken) that
    /// the sweep paired by taking the entry itself.
    pub busy_paired: u64,
    /// Such answers that could not be kept for the sweep (too many at once, or an answer
    /// this build does not know): their attempts may be decided lost.
    pub busy_unpaired: u64,
    /// Entries the sweep took that had changed since the walk (put back, decided later).
    pub sweep_races: u64,
    /// Waiting entries the sweep took by such a race and could not put back because the
    /// map was full: no longer tracked, like a SYN that finds the map full.
    pub put_back_refused: u64,
}

/// The key of the ISN index: family, remote address, remote port, ISN. Translation of the
/// local side leaves all four unchanged.
type IsnKey = (u8, [u8; 16], u16, u32);

fn isn_key(key: &FlowKey, isn: u32) -> IsnKey {
    (key.family, key.dst_addr, key.dst_port, isn)
}

/// How long an attempt decided by an event is remembered, to recognise a retransmission of
/// its SYN: Linux resends an unacknowledged SYN after 1, 3 and 7 s. Bounded, as every such
/// attempt costs memory for this long.
const REPEAT_WINDOW_NS: u64 = 10_000_000_000;

/// At most this many lost attempts are remembered after their late window (about 5 MiB).
pub const MAX_LOST_MEMORY: usize = 65_536;
/// At most this many answers to unknown 4-tuples wait for the next sweep to be paired.
const MAX_UNMATCHED: usize = 65_536;

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
    /// Attempts reported lost whose kernel entry is kept (marked lost) for the late window:
    /// the only connections user space holds, and only the lost ones.
    lost: HashMap<FlowKey, PendingSyn>,
    /// Attempts decided by an event in the last repeat window, by 4-tuple and ISN, and when,
    /// so that a retransmitted SYN of one is recognised as the same attempt. Two attempts of
    /// one 4-tuple may be decided moments apart (one abandoned for a new ISN while a late
    /// answer decides the one before).
    decided: HashMap<(FlowKey, u32), u64>,
    decided_order: VecDeque<(u64, FlowKey, u32)>,
    /// SYNs by remote address, remote port and ISN, from SYN events (when the kernel sends
    /// them), for answers that come back to another 4-tuple.
    by_isn: HashMap<IsnKey, FlowKey>,
    /// Answers to 4-tuples with no entry, with the ISN they answer and when: paired at the
    /// next sweep with a waiting entry of the same remote address, port and ISN.
    unmatched: Vec<(FlowKey, u32, u64)>,
    /// Answers whose entry the kernel could not look at (a bucket's lock stayed taken): the
    /// key, the raw acknowledgement, the answer and when, paired at the next sweep (before it
    /// decides anything lost) by taking the entry here.
    busy: Vec<(FlowKey, u32, Answer, u64, u32)>,
    /// Lost attempts answered late by a SYN-ACK that found no entry (the sweep held it): their
    /// entry, put back marked lost after that, stays until the end of its late window; the
    /// ISN and that end, so that an answer that finds it then is a repeat, not late again.
    answered_late: HashMap<FlowKey, (u32, u64)>,
    /// Lost attempts whose kernel entry was cleared after the late window: ISN and until
    /// when a SYN or an answer of theirs still belongs to them (their retry horizon).
    lost_memory: HashMap<FlowKey, (u32, u64)>,
    lost_order: VecDeque<(u64, FlowKey)>,
    retry_horizon_ns: u64,
    max_lost_memory: usize,
    /// Entries waiting for an answer at the last sweep, and their source ports (a bitmap).
    waiting: usize,
    waiting_ports: Vec<u64>,
    /// One step of a walk of the kernel map (kept to reuse its allocation).
    chunk: Vec<(FlowKey, PendingSyn)>,
    pub stats: TrackerStats,
}

impl Tracker {
    pub fn new(syn_timeout_ns: u64, late_window_ns: u64) -> Self {
        Self {
            syn_timeout_ns,
            late_window_ns: late_window_ns.max(syn_timeout_ns),
            repeat_window_ns: late_window_ns.min(REPEAT_WINDOW_NS).max(syn_timeout_ns),
            lost: HashMap::new(),
            decided: HashMap::new(),
            decided_order: VecDeque::new(),
            by_isn: HashMap::new(),
            unmatched: Vec::new(),
            busy: Vec::new(),
            answered_late: HashMap::new(),
            lost_memory: HashMap::new(),
            lost_order: VecDeque::new(),
            retry_horizon_ns: 0,
            max_lost_memory: MAX_LOST_MEMORY,
            waiting: 0,
            waiting_ports: vec![0; 65536 / 64],
            chunk: Vec::new(),
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

    /// Whether `key` with `isn` is an attempt already reported lost.
    fn was_lost(&self, key: &FlowKey, isn: u32) -> bool {
        self.lost.get(key).is_some_and(|p| p.isn == isn) || self.is_remembered_lost(key, isn)
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

    /// A lost attempt leaves the late window: forgotten, but remembered until its horizon, and
    /// at least two SYN timeouts: a SYN retransmitted within the late window may have made a
    /// new entry for it just now, which the sweep finds only once that entry is due; until then
    /// it, or the kernel's report that a new ISN replaced it, is this attempt's, not a new one.
    fn retire_lost(&mut self, key: FlowKey, p: PendingSyn, now_ns: u64) {
        let until = p
            .first_ns
            .saturating_add(self.retry_horizon_ns)
            .max(now_ns.saturating_add(self.syn_timeout_ns.saturating_mul(2)));
        if until > now_ns && !self.is_remembered_lost(&key, p.isn) {
            self.remember_lost(key, p.isn, until);
        }
    }

    fn is_answered_late(&self, key: &FlowKey, isn: u32) -> bool {
        self.answered_late.get(key).is_some_and(|(i, _)| *i == isn)
    }

    fn is_decided(&self, key: &FlowKey, isn: u32) -> bool {
        self.decided.contains_key(&(*key, isn))
    }

    fn remember_decided(&mut self, key: FlowKey, isn: u32, at_ns: u64) {
        self.decided.insert((key, isn), at_ns);
        self.decided_order.push_back((at_ns, key, isn));
    }

    /// Connections waiting for an answer at the last sweep (not yet reported).
    pub fn pending(&self) -> usize {
        self.waiting
    }

    /// Whether the tracker holds nothing and the pending map held nothing at the last sweep:
    /// until a new SYN, a sweep would find nothing to do.
    pub fn idle(&self) -> bool {
        self.waiting == 0
            && self.lost.is_empty()
            && self.decided.is_empty()
            && self.by_isn.is_empty()
            && self.unmatched.is_empty()
            && self.busy.is_empty()
            && self.answered_late.is_empty()
            && self.lost_memory.is_empty()
    }

    /// Source ports of the entries still waiting at the last sweep.
    pub fn waiting_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.waiting_ports.iter().enumerate().flat_map(|(w, bits)| {
            (0..64)
                .filter(move |b| bits & (1u64 << b) != 0)
                .map(move |b| (w * 64 + b) as u16)
        })
    }

    /// Lost attempts held for their late window.
    pub fn held(&self) -> usize {
        self.lost.len()
    }

    fn outcome(kind: OutcomeKind, key: FlowKey, pending: PendingSyn) -> Outcome {
        Outcome {
            kind,
            key,
            pending,
            rtt_ns: None,
            icmp: None,
            answered_as: None,
        }
    }

    pub fn on_event(&mut self, ev: &Event, out: &mut Vec<Outcome>) {
        let key = ev.raw.key;
        let p = ev.raw.pending;
        match ev.kind {
            EventKind::Syn => {
                // Only for answers that come back to another 4-tuple: the kernel map holds the
                // attempt itself.
                self.by_isn.insert(isn_key(&key, p.isn), key);
            }
            EventKind::Superseded => {
                // The kernel reports only entries still waiting; one of an attempt reported
                // already (a repeat, or a retry after the late window) is not a new loss.
                let reported = self.is_decided(&key, p.isn) || self.was_lost(&key, p.isn);
                if self.lost.get(&key).is_some_and(|l| l.isn == p.isn) {
                    self.lost.remove(&key);
                }
                if !reported {
                    out.push(Self::outcome(OutcomeKind::Abandoned, key, p));
                    // Reported: user space may hold the entry the new SYN replaced (a
                    // retransmission's, made while it held this one) and find it gone.
                    self.remember_decided(key, p.isn, ev.raw.ts_ns);
                }
            }
            EventKind::Answered | EventKind::Refused | EventKind::Unreachable => {
                if p.state == STATE_LOST && self.is_answered_late(&key, p.isn) {
                    // A repeat of the answer that made it late, which found its entry.
                    self.answered_late.remove(&key);
                    return;
                }
                let was_lost = p.state == STATE_LOST || self.was_lost(&key, p.isn);
                if self.lost.get(&key).is_some_and(|l| l.isn == p.isn) {
                    self.lost.remove(&key);
                }
                // Answered now: a repeat of this answer after the repeat window is not late
                // again (the sweep may have moved it to the memory of lost attempts while
                // this event waited in the ring buffer).
                if self.is_remembered_lost(&key, p.isn) {
                    self.lost_memory.remove(&key);
                }
                if self.is_decided(&key, p.isn) {
                    // A repeat: this attempt's outcome was reported at its first answer.
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
                    rtt_ns: Some(ev.raw.ts_ns.saturating_sub(p.first_ns)),
                    icmp,
                    ..Self::outcome(kind, key, p)
                });
            }
            EventKind::UnmatchedSynAck => self.on_unmatched_synack(ev, out),
            EventKind::BusyAnswer => {
                let answer = answer_of(p.syns, ev.raw.icmp_type, ev.raw.icmp_code);
                match answer {
                    Some(a) if self.busy.len() < MAX_UNMATCHED => {
                        self.busy
                            .push((key, p.isn, a, ev.raw.ts_ns, ev.raw.ifindex));
                    }
                    // Counted: the attempt may be decided lost for want of its answer.
                    _ => self.stats.busy_unpaired += 1,
                }
            }
            // Not connection state: the correlator's business.
            EventKind::PodSyn | EventKind::SockConnect | EventKind::SockLeftSynSent => {}
        }
    }

    /// A SYN-ACK for a 4-tuple with no kernel entry: late, if it answers an attempt reported
    /// lost whose entry the sweep had taken; else kept for the next sweep, which pairs it with
    /// a SYN seen under another local address or port (translated after netrace saw it).
    fn on_unmatched_synack(&mut self, ev: &Event, out: &mut Vec<Outcome>) {
        let key = ev.raw.key;
        let isn = ev.raw.pending.isn;
        if self.is_decided(&key, isn) {
            return; // A repeated SYN-ACK of an answered connection.
        }
        if self.was_lost(&key, isn) {
            let p = self
                .lost
                .remove(&key)
                .unwrap_or_else(|| PendingSyn::first(ev.raw.ts_ns, isn, ev.raw.ifindex));
            self.lost_memory.remove(&key);
            self.remember_decided(key, isn, ev.raw.ts_ns);
            if self.answered_late.len() < MAX_UNMATCHED {
                let until = p.first_ns.saturating_add(self.late_window_ns);
                self.answered_late.insert(key, (isn, until));
            }
            out.push(Outcome {
                rtt_ns: Some(ev.raw.ts_ns.saturating_sub(p.first_ns)),
                ..Self::outcome(OutcomeKind::Late, key, p)
            });
            return;
        }
        if self.unmatched.len() < MAX_UNMATCHED {
            self.unmatched.push((key, isn, ev.raw.ts_ns));
        } else {
            self.stats.unmatched_synacks += 1;
        }
    }

    /// Pairs the answers that came back to unknown 4-tuples with waiting entries of the same
    /// remote address, port and ISN; returns the keys taken.
    fn pair_translated(
        &mut self,
        index: &HashMap<IsnKey, FlowKey>,
        map: &mut impl PendingMap,
        out: &mut Vec<Outcome>,
    ) -> HashSet<FlowKey> {
        let mut taken = HashSet::new();
        for (answer_key, isn, ts) in std::mem::take(&mut self.unmatched) {
            if self.is_decided(&answer_key, isn) {
                continue;
            }
            let ik = isn_key(&answer_key, isn);
            let walked = index.get(&ik).copied();
            let Some(syn_key) = walked.or_else(|| self.by_isn.get(&ik).copied()) else {
                self.stats.unmatched_synacks += 1;
                continue;
            };
            if self.is_decided(&syn_key, isn) {
                continue; // A repeated SYN-ACK of a connection paired this way already.
            }
            if walked.is_none() {
                // A SYN seen once, whose entry is not in the map as walked: its 4-tuple may
                // hold another attempt now, which is not this answer's to take.
                self.stats.unmatched_synacks += 1;
                continue;
            }
            let Some(p) = map.take(&syn_key) else {
                self.stats.unmatched_synacks += 1;
                continue;
            };
            if p.isn != isn {
                self.put_back_other(syn_key, p, map, out, 0);
                self.stats.unmatched_synacks += 1;
                continue;
            }
            taken.insert(syn_key);
            // A repeated SYN-ACK of this connection finds it decided.
            self.by_isn.insert(ik, syn_key);
            let was_lost = p.state == STATE_LOST || self.was_lost(&syn_key, isn);
            self.lost.remove(&syn_key);
            self.remember_decided(syn_key, isn, ts);
            self.stats.translated_answers += 1;
            if self.stats.translated_example.is_none() {
                self.stats.translated_example = Some((syn_key, answer_key));
            }
            let kind = if was_lost {
                OutcomeKind::Late
            } else {
                OutcomeKind::Answered
            };
            out.push(Outcome {
                rtt_ns: Some(ts.saturating_sub(p.first_ns)),
                answered_as: Some(answer_key),
                ..Self::outcome(kind, syn_key, p)
            });
        }
        taken
    }

    /// Pairs the answers whose entry the kernel could not look at: takes the entry and applies
    /// the kernel's rules to it, as if the answer had found it then. An entry the answer does
    /// not acknowledge goes back; a SYN-ACK without its entry is then an unmatched one (a
    /// translated answer, or a repeat).
    fn pair_busy(&mut self, map: &mut impl PendingMap, out: &mut Vec<Outcome>) {
        for (key, ack, answer, ts, ifindex) in std::mem::take(&mut self.busy) {
            let (icmp_type, icmp_code) = answer.icmp();
            let event = |kind: EventKind, pending: PendingSyn| Event {
                kind,
                raw: OutcomeEvent {
                    kind: kind as u32,
                    ifindex,
                    key,
                    pending,
                    ts_ns: ts,
                    icmp_type,
                    icmp_code,
                    ..OutcomeEvent::default()
                },
            };
            let taken = map.take_for_answer(&key);
            match taken {
                Some(p) if acknowledges(&p, ack, answer) => {
                    self.stats.busy_paired += 1;
                    self.on_event(&event(resolution(answer).0, p), out);
                    continue;
                }
                Some(p) => self.put_back_other(key, p, map, out, 0),
                None => {}
            }
            if answer == Answer::SynAck {
                let seen = PendingSyn::first(ts, ack.wrapping_sub(1), ifindex);
                self.on_unmatched_synack(&event(EventKind::UnmatchedSynAck, seen), out);
            }
        }
    }

    /// Forgets an attempt still waiting for its answer, without an outcome: it was not a
    /// connection of the watched side after all (`analyze`: a SYN seen before its SNAT twin on
    /// the uplink, which is the connection the report counts). `false` when no waiting attempt
    /// of that ISN was there.
    pub fn forget(&mut self, key: &FlowKey, isn: u32, map: &mut impl PendingMap) -> bool {
        match map.take(key) {
            Some(p) if p.isn == isn && p.state == STATE_WAITING => true,
            Some(p) => {
                let _ = map.put_back(key, &p);
                false
            }
            None => false,
        }
    }

    /// Walks the kernel map: pairs translated answers, decides *lost* for entries older than
    /// the SYN timeout, and clears lost entries once their late window has passed.
    pub fn sweep(&mut self, now_ns: u64, map: &mut impl PendingMap, out: &mut Vec<Outcome>) {
        self.sweep_with(now_ns, map, out, false);
    }

    /// The sweep; `full` walks the whole map even where the map finds the due entries itself
    /// (for the ports of the entries still waiting, at the end).
    fn sweep_with(
        &mut self,
        now_ns: u64,
        map: &mut impl PendingMap,
        out: &mut Vec<Outcome>,
        full: bool,
    ) {
        self.pair_busy(map, out);
        self.answered_late.retain(|_, (_, until)| *until > now_ns);
        // Entries that may be the SYNs of answers that came back to another 4-tuple: left for
        // the pairing after the walk.
        let wanted: HashSet<IsnKey> = self
            .unmatched
            .iter()
            .map(|(k, isn, _)| isn_key(k, *isn))
            .collect();
        let mut candidates: HashMap<IsnKey, FlowKey> = HashMap::new();
        let prune = self.by_isn.len() > 2 * (self.waiting + self.decided.len()) + 64;
        let mut live: HashSet<IsnKey> = HashSet::new();
        let mut waiting = 0;
        self.waiting_ports.fill(0);
        let mut chunk = std::mem::take(&mut self.chunk);
        // The common case: the map finds the due entries itself; nothing else is read.
        let cut = ExpireCutoffs {
            // Nothing is due before the clock has run for a SYN timeout (late window).
            waiting_before_ns: now_ns
                .checked_sub(self.syn_timeout_ns)
                .map_or(0, |t| t.saturating_add(1)),
            lost_before_ns: now_ns
                .checked_sub(self.late_window_ns)
                .map_or(0, |t| t.saturating_add(1)),
        };
        let found = if full || prune || !wanted.is_empty() {
            None
        } else {
            map.due(cut, &mut chunk)
        };
        if let Some((w, _)) = found {
            waiting = usize::try_from(w).unwrap_or(usize::MAX);
            let due = std::mem::take(&mut chunk);
            for (key, seen) in &due {
                waiting += usize::from(self.visit(key, seen, now_ns, map, out));
            }
            chunk = due;
        }
        let mut deferred: Vec<(FlowKey, PendingSyn)> = Vec::new();
        let mut pos = ScanPos::default();
        if found.is_some() {
            pos.finish();
        }
        while !pos.done() {
            map.scan_next(&mut pos, &mut chunk);
            for (key, seen) in &chunk {
                let ik = isn_key(key, seen.isn);
                if prune {
                    live.insert(ik);
                }
                if wanted.contains(&ik) {
                    candidates.insert(ik, *key);
                    deferred.push((*key, *seen));
                    continue;
                }
                waiting += usize::from(self.visit(key, seen, now_ns, map, out));
            }
        }
        chunk.clear();
        self.chunk = chunk;
        let paired = if self.unmatched.is_empty() {
            HashSet::new()
        } else {
            self.pair_translated(&candidates, map, out)
        };
        // The entries left for the pairing that it did not take: decided or counted now.
        for (key, seen) in &deferred {
            if !paired.contains(key) {
                waiting += usize::from(self.visit(key, seen, now_ns, map, out));
            }
        }
        self.waiting = waiting;
        // Lost attempts whose kernel entry went another way (a new ISN took the 4-tuple).
        let late = self.late_window_ns;
        let gone: Vec<(FlowKey, PendingSyn)> = self
            .lost
            .iter()
            .filter(|(_, p)| now_ns.saturating_sub(p.first_ns) >= late)
            .map(|(k, p)| (*k, *p))
            .collect();
        for (k, p) in gone {
            self.lost.remove(&k);
            self.retire_lost(k, p, now_ns);
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
        while let Some(&(at, key, isn)) = self.decided_order.front() {
            if now_ns.saturating_sub(at) < self.repeat_window_ns {
                break;
            }
            self.decided_order.pop_front();
            if self.decided.get(&(key, isn)) == Some(&at) {
                self.decided.remove(&(key, isn));
            }
        }
        if prune {
            let decided = &self.decided;
            self.by_isn
                .retain(|ik, key| live.contains(ik) || decided.contains_key(&(*key, ik.3)));
        }
    }

    fn note_waiting(&mut self, key: &FlowKey) {
        if let Some(w) = self.waiting_ports.get_mut(usize::from(key.src_port) / 64) {
            *w |= 1 << (key.src_port % 64);
        }
    }

    /// One entry of the map: decides it if due; whether it is still waiting (young: its port
    /// is then noted among the waiting ones).
    fn visit(
        &mut self,
        key: &FlowKey,
        seen: &PendingSyn,
        now_ns: u64,
        map: &mut impl PendingMap,
        out: &mut Vec<Outcome>,
    ) -> bool {
        let age = now_ns.saturating_sub(seen.first_ns);
        match seen.state {
            // A young entry of an attempt already reported (a SYN retransmitted after its
            // entry went) is decided now, before an answer to it is counted again.
            STATE_WAITING
                if age < self.syn_timeout_ns
                    && !self.is_decided(key, seen.isn)
                    && !self.was_lost(key, seen.isn) =>
            {
                self.note_waiting(key);
                return true;
            }
            STATE_WAITING => self.decide_lost(*key, seen, map, out),
            STATE_LOST if age >= self.late_window_ns => {
                let Some(p) = map.take(key) else {
                    return false; // Answered a moment ago: its late event is on its way.
                };
                if p.isn != seen.isn || p.state != STATE_LOST {
                    self.stats.sweep_races += 1;
                    self.put_back_other(*key, p, map, out, 0);
                    return false;
                }
                self.lost.remove(key);
                if self.is_answered_late(key, p.isn) {
                    self.answered_late.remove(key);
                } else {
                    self.retire_lost(*key, p, now_ns);
                }
            }
            _ => {}
        }
        false
    }

    /// Puts back an entry the sweep took although it was not the one it was after (it changed
    /// since the walk). If a SYN with a new ISN took the 4-tuple meanwhile, the sweep removed
    /// the entry and reports it: a waiting attempt not yet reported is abandoned, as the kernel
    /// would have reported it had it replaced the entry. If the map filled up meanwhile, it is
    /// no longer tracked (counted).
    fn put_back_other(
        &mut self,
        key: FlowKey,
        p: PendingSyn,
        map: &mut impl PendingMap,
        out: &mut Vec<Outcome>,
        depth: u32,
    ) {
        let unreported = p.state == STATE_WAITING
            && !self.is_decided(&key, p.isn)
            && !self.was_lost(&key, p.isn);
        match self.put_back_merging(key, p, map, out, depth) {
            PutBack::Done => {}
            PutBack::Taken if unreported => {
                out.push(Self::outcome(OutcomeKind::Abandoned, key, p));
                // Reported: the kernel may report it too, if the new SYN replaced a
                // retransmission's entry of this attempt (`Superseded`, still in the ring).
                self.remember_decided(key, p.isn, p.last_ns);
            }
            PutBack::Refused if unreported => self.stats.put_back_refused += 1,
            PutBack::Taken | PutBack::Refused => {}
        }
    }

    /// Puts a taken entry back. A retransmission of its SYN may have made a new entry while
    /// the sweep held it: the same attempt, merged into this one (else an answer to it would
    /// count as a new attempt's, and a lost attempt's as answered). A new ISN that took the
    /// 4-tuple meanwhile wins: `Taken` (the sweep took the new entry to look at it, and puts it
    /// back in turn). `depth` bounds how many new ISNs in a row are followed.
    fn put_back_merging(
        &mut self,
        key: FlowKey,
        mut p: PendingSyn,
        map: &mut impl PendingMap,
        out: &mut Vec<Outcome>,
        depth: u32,
    ) -> PutBack {
        for _ in 0..4 {
            match map.put_back(&key, &p) {
                PutBack::Taken => {}
                r => return r,
            }
            let Some(q) = map.take(&key) else {
                // Gone again: answered, so it was another attempt's (or this one's, answered
                // by a retransmission: the moment is too short to tell).
                return PutBack::Taken;
            };
            if q.isn != p.isn {
                if depth < 4 {
                    self.put_back_other(key, q, map, out, depth + 1);
                } else {
                    let _ = map.put_back(&key, &q);
                }
                return PutBack::Taken;
            }
            p.syns = p.syns.saturating_add(q.syns);
            p.last_ns = p.last_ns.max(q.last_ns);
            p.data_len = p.data_len.max(q.data_len);
        }
        PutBack::Taken
    }

    /// An entry older than the SYN timeout: take it (unless an answer took it first), report
    /// it lost, and put it back marked lost for the late window.
    fn decide_lost(
        &mut self,
        key: FlowKey,
        seen: &PendingSyn,
        map: &mut impl PendingMap,
        out: &mut Vec<Outcome>,
    ) {
        let Some(p) = map.take(&key) else {
            return; // Answered a moment ago: the kernel reported it.
        };
        if p.isn != seen.isn || p.state != STATE_WAITING {
            // A new attempt took the 4-tuple since the walk: decided at a later sweep.
            self.stats.sweep_races += 1;
            self.put_back_other(key, p, map, out, 0);
            return;
        }
        if self.is_decided(&key, p.isn) {
            // A retransmission of an attempt decided by its answer, unanswered again: nothing
            // new to report, and no entry to keep.
            self.stats.repeated_syns += 1;
            return;
        }
        // Back, or not (a new ISN took the 4-tuple, or the map is full): the tracker holds it
        // as lost either way.
        let _ = self.put_back_merging(
            key,
            PendingSyn {
                state: STATE_LOST,
                ..p
            },
            map,
            out,
            0,
        );
        let again = self.was_lost(&key, p.isn);
        if again {
            // The same connection, still retrying after it was reported lost.
            self.stats.syns_after_lost += 1;
            self.lost_memory.remove(&key);
        }
        self.lost.insert(key, p);
        if !again {
            out.push(Self::outcome(OutcomeKind::Lost, key, p));
        }
    }

    /// Final sweep at exit: returns how many connections were still waiting (younger than
    /// the SYN timeout), which are neither answered nor lost.
    pub fn finish(
        &mut self,
        now_ns: u64,
        map: &mut impl PendingMap,
        out: &mut Vec<Outcome>,
    ) -> u64 {
        self.sweep_with(now_ns, map, out, true);
        self.pending() as u64
    }
}

#[cfg(test)]
mod tests {
    use netrace_common::{
        pairing::{self, MemorySink},
        parse::{Answer, Parsed},
        FAMILY_V4,
    };

    use super::*;

    const S: u64 = 1_000_000_000;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            family: FAMILY_V4,
            src_port: port,
            dst_port: 80,
            ..Default::default()
        }
    }

    /// The pairing rules over an in-memory map and sink (the kernel's part) and the tracker.
    struct Lab {
        map: MemoryMap,
        sink: MemorySink,
        t: Tracker,
        out: Vec<Outcome>,
    }

    impl Lab {
        /// `books`: the kernel keeps answered attempts in its books and sends no SYN events,
        /// as `watch` runs by default.
        fn new(t: Tracker, books: bool) -> Self {
            let mut sink = MemorySink {
                report_unmatched: true,
                ..MemorySink::default()
            };
            if books {
                sink.send_syns = false;
                sink.books = Some(Vec::new());
            }
            Self {
                map: MemoryMap::default(),
                sink,
                t,
                out: Vec::new(),
            }
        }

        fn pump(&mut self) {
            for raw in self.sink.take_events() {
                if let Some(kind) = EventKind::from_u32(raw.kind) {
                    self.t.on_event(&Event { kind, raw }, &mut self.out);
                }
            }
        }

        fn packet(&mut self, ns: u64, parsed: Parsed) {
            self.sink.now = ns;
            pairing::on_packet(&mut self.map.0, &mut self.sink, None, &parsed);
            self.pump();
        }

        fn syn(&mut self, ns: u64, key: FlowKey, isn: u32) {
            self.packet(
                ns,
                Parsed::Syn {
                    key,
                    isn,
                    data_len: 0,
                },
            );
        }

        fn answer(&mut self, ns: u64, key: FlowKey, isn: u32, answer: Answer) {
            let ack = match answer {
                Answer::Unreachable { .. } => isn,
                _ => isn.wrapping_add(1),
            };
            self.packet(ns, Parsed::Answer { key, ack, answer });
        }

        /// An answer while its bucket's lock stays taken (see [`Locked`]).
        fn answer_locked(&mut self, ns: u64, key: FlowKey, ack: u32, answer: Answer) {
            self.sink.now = ns;
            let parsed = Parsed::Answer { key, ack, answer };
            pairing::on_packet(&mut Locked(&mut self.map.0), &mut self.sink, None, &parsed);
        }

        fn sweep(&mut self, ns: u64) {
            self.pump();
            self.t.sweep(ns, &mut self.map, &mut self.out);
        }

        fn kinds(&self) -> Vec<OutcomeKind> {
            self.out.iter().map(|o| o.kind).collect()
        }

        fn finish_is(&mut self, ns: u64, waiting: u64) {
            assert_eq!(self.t.finish(ns, &mut self.map, &mut self.out), waiting);
        }

        fn booked(&self) -> usize {
            self.sink.books.as_ref().map_or(0, Vec::len)
        }
    }

    const UNREACHABLE: Answer = Answer::Unreachable {
        icmp_type: 3,
        code: 1,
    };

    /// The map as the kernel sees it while a bucket's lock stays taken: an answer cannot
    /// look for its entry.
    struct Locked<'a>(&'a mut HashMap<FlowKey, PendingSyn>);

    impl pairing::PendingTable for Locked<'_> {
        fn modify<R, F: FnOnce(&mut PendingSyn) -> R>(&mut self, key: &FlowKey, f: F) -> Option<R> {
            self.0.get_mut(key).map(f)
        }
        fn get(&self, key: &FlowKey) -> Option<PendingSyn> {
            self.0.get(key).copied()
        }
        fn insert_new(&mut self, _key: &FlowKey, _value: &PendingSyn) -> pairing::Insert {
            pairing::Insert::Busy
        }
        fn remove(&mut self, _key: &FlowKey) -> bool {
            false
        }
        fn take_if<F: FnOnce(&PendingSyn) -> bool>(
            &mut self,
            _key: &FlowKey,
            _accept: F,
        ) -> pairing::Take {
            pairing::Take::Busy
        }
    }

    /// An answer that met its bucket locked is paired by the next sweep, before it decides
    /// anything lost: a SYN-ACK is an answer, a RST a refusal, an ICMP error unreachable, in
    /// both modes; one that acknowledges another ISN leaves the entry to be decided lost, and
    /// is then an unmatched SYN-ACK.
    #[test]
    fn an_answer_that_met_a_locked_bucket_is_paired_by_the_sweep() {
        for books in [false, true] {
            for (answer, kind) in [
                (Answer::SynAck, OutcomeKind::Answered),
                (Answer::Rst, OutcomeKind::Refused),
                (UNREACHABLE, OutcomeKind::Unreachable),
            ] {
                let mut l = Lab::new(Tracker::new(3 * S, 60 * S), books);
                let a = key(40000);
                l.syn(S, a, 7);
                let ack = match answer {
                    Answer::Unreachable { .. } => 7,
                    _ => 8,
                };
                l.answer_locked(S + 500, a, ack, answer);
                assert_eq!(
                    l.sink.counters[netrace_common::Counter::AnswerBusy as usize],
                    1
                );
                l.pump();
                assert!(l.out.is_empty(), "nothing decided before the sweep");
                // Past the SYN timeout: without the pairing, the entry would be lost.
                l.sweep(5 * S);
                assert_eq!(l.kinds(), [kind], "{answer:?}, books {books}");
                assert_eq!(l.out[0].rtt_ns, Some(500));
                assert_eq!((l.t.stats.busy_paired, l.t.pending()), (1, 0));
                l.finish_is(6 * S, 0);
            }
            let mut l = Lab::new(Tracker::new(3 * S, 60 * S), books);
            let a = key(40000);
            l.syn(S, a, 7);
            l.answer_locked(S + 500, a, 100, Answer::SynAck);
            l.sweep(5 * S);
            assert_eq!(l.kinds(), [OutcomeKind::Lost]);
            assert_eq!(l.t.stats.busy_paired, 0);
            assert_eq!(l.t.stats.unmatched_synacks, 1);
        }
    }

    #[test]
    fn answered_lost_late() {
        for books in [false, true] {
            let mut l = Lab::new(Tracker::new(3 * S, 60 * S), books);
            let (a, b) = (key(40000), key(2000));
            l.syn(S, a, 7);
            l.syn(S, b, 9);
            l.answer(S + 500, a, 7, Answer::SynAck);
            if books {
                assert_eq!((l.booked(), l.out.len()), (1, 0), "counted in the books");
            } else {
                assert_eq!(l.kinds(), [OutcomeKind::Answered]);
                assert_eq!(l.out[0].rtt_ns, Some(500));
            }
            let before = l.out.len();
            l.sweep(3 * S);
            assert_eq!(l.t.pending(), 1);
            l.syn(2 * S, b, 9);
            l.syn(3 * S, b, 9);
            l.sweep(4 * S);
            assert_eq!(l.out.len(), before + 1);
            let lost = l.out[before];
            assert_eq!((lost.kind, lost.pending.syns), (OutcomeKind::Lost, 3));
            assert_eq!(l.map.0[&b].state, STATE_LOST, "kept, marked lost");
            l.sweep(5 * S);
            assert_eq!(l.out.len(), before + 1, "lost is reported once");
            l.answer(10 * S, b, 9, Answer::SynAck);
            assert_eq!(l.out[before + 1].kind, OutcomeKind::Late);
            assert_eq!(
                l.booked(),
                usize::from(books),
                "a late answer is never booked"
            );
            assert_eq!(l.t.held(), 0);
            assert!(l.map.0.is_empty());
        }
    }

    /// A lost attempt whose entry could not be put back (a full map) retransmits within the
    /// late window, which makes a new waiting entry; the late window ends before that entry is
    /// due, then a new ISN replaces it: the kernel's report of the replaced entry is the lost
    /// attempt's, not a second outcome (found by the `tracker_model` fuzz target).
    #[test]
    fn lost_attempt_replaced_after_its_late_window_is_not_abandoned_too() {
        let mut l = Lab::new(Tracker::new(3 * S, 60 * S), true);
        let k = key(1000);
        l.syn(S, k, 7);
        l.sweep(5 * S);
        assert_eq!(l.kinds(), [OutcomeKind::Lost]);
        // The put-back refused: the tracker holds the attempt, the map has no entry.
        assert!(l.map.0.remove(&k).is_some());
        l.syn(60 * S, k, 7);
        l.sweep(61 * S + 1);
        assert_eq!(l.t.held(), 0, "its late window is over");
        l.syn(62 * S, k, 8);
        l.sweep(63 * S);
        assert_eq!(l.kinds(), [OutcomeKind::Lost], "{:?}", l.out);
        l.sweep(66 * S);
        assert_eq!(l.kinds(), [OutcomeKind::Lost, OutcomeKind::Lost]);
        assert_eq!(l.out[1].pending.isn, 8);
    }

    /// A pending map whose `take` races an answer: the answer is applied just before the take
    /// (the kernel removed the entry first) or just after it (before the entry is put back).
    struct RacyMap<'a> {
        lab_map: &'a mut MemoryMap,
        sink: &'a mut MemorySink,
        race: Option<(bool, FlowKey, u32)>,
    }

    impl RacyMap<'_> {
        fn answer(&mut self, key: FlowKey, isn: u32) {
            let parsed = Parsed::Answer {
                key,
                ack: isn.wrapping_add(1),
                answer: Answer::SynAck,
            };
            pairing::on_packet(&mut self.lab_map.0, &mut *self.sink, None, &parsed);
        }
    }

    impl PendingMap for RacyMap<'_> {
        fn scan_next(&mut self, pos: &mut ScanPos, out: &mut Vec<(FlowKey, PendingSyn)>) {
            self.lab_map.scan_next(pos, out);
        }
        fn take(&mut self, key: &FlowKey) -> Option<PendingSyn> {
            match self.race.take() {
                Some((true, k, isn)) => {
                    self.answer(k, isn);
                    self.lab_map.take(key)
                }
                Some((false, k, isn)) => {
                    let p = self.lab_map.take(key);
                    self.answer(k, isn);
                    p
                }
                None => self.lab_map.take(key),
            }
        }
        fn put_back(&mut self, key: &FlowKey, value: &PendingSyn) -> PutBack {
            self.lab_map.put_back(key, value)
        }
    }

    #[test]
    fn an_answer_racing_the_sweep_is_counted_once() {
        for (before, books) in [(true, true), (true, false), (false, true), (false, false)] {
            let mut l = Lab::new(Tracker::new(S, 60 * S), books);
            let k = key(3000);
            l.syn(0, k, 5);
            let mut racy = RacyMap {
                lab_map: &mut l.map,
                sink: &mut l.sink,
                race: Some((before, k, 5)),
            };
            l.t.sweep(2 * S, &mut racy, &mut l.out);
            l.pump();
            let kinds = l.kinds();
            if before {
                // The kernel took the entry: answered (booked or sent), never lost.
                let answered = l.booked() + kinds.len();
                assert_eq!(answered, 1, "{kinds:?}");
                assert!(!kinds.contains(&OutcomeKind::Lost));
            } else {
                // The sweep took it: lost, and the answer that found no entry is late.
                assert_eq!(kinds, [OutcomeKind::Lost, OutcomeKind::Late]);
                assert_eq!(l.booked(), 0);
            }
            l.sweep(100 * S);
            assert_eq!(l.kinds(), kinds, "nothing more");
        }
    }

    /// A pending map that puts packets on the wire between the walk and the first take, and
    /// right after takes (before the put-back), one per take. It finds no due entries itself:
    /// the sweep walks it.
    struct Injecting<'a> {
        lab_map: &'a mut MemoryMap,
        sink: &'a mut MemorySink,
        after_scan: Vec<Parsed>,
        after_take: Vec<Parsed>,
    }

    fn syn(key: FlowKey, isn: u32) -> Parsed {
        Parsed::Syn {
            key,
            isn,
            data_len: 0,
        }
    }

    impl Injecting<'_> {
        fn inject(&mut self, packets: Vec<Parsed>) {
            for p in packets {
                pairing::on_packet(&mut self.lab_map.0, &mut *self.sink, None, &p);
            }
        }
    }

    impl PendingMap for Injecting<'_> {
        fn scan_next(&mut self, pos: &mut ScanPos, out: &mut Vec<(FlowKey, PendingSyn)>) {
            self.lab_map.scan_next(pos, out);
            let p = std::mem::take(&mut self.after_scan);
            self.inject(p);
        }
        fn take(&mut self, key: &FlowKey) -> Option<PendingSyn> {
            let p = self.lab_map.take(key);
            if !self.after_take.is_empty() {
                let next = self.after_take.remove(0);
                self.inject(vec![next]);
            }
            p
        }
        fn put_back(&mut self, key: &FlowKey, value: &PendingSyn) -> PutBack {
            self.lab_map.put_back(key, value)
        }
    }

    /// Found by the `tracker_model` fuzz target: the SYN retransmitted while the sweep holds
    /// the entry it is reporting lost makes a new, waiting entry; the answer to it was counted
    /// answered (in the books) after the attempt was reported lost. The sweep marks it lost.
    #[test]
    fn a_syn_retransmitted_while_the_sweep_holds_its_entry_stays_lost() {
        for books in [false, true] {
            let mut l = Lab::new(Tracker::new(S, 60 * S), books);
            let k = key(3000);
            l.syn(0, k, 7);
            l.sink.now = 2 * S;
            let mut racy = Injecting {
                lab_map: &mut l.map,
                sink: &mut l.sink,
                after_scan: Vec::new(),
                after_take: vec![syn(k, 7)],
            };
            l.t.sweep(2 * S, &mut racy, &mut l.out);
            assert_eq!(l.map.0[&k].state, STATE_LOST);
            assert_eq!(l.map.0[&k].syns, 2);
            l.answer(2 * S + 1, k, 7, Answer::SynAck);
            assert_eq!(l.kinds(), [OutcomeKind::Lost, OutcomeKind::Late]);
            assert_eq!(l.booked(), 0);
            l.finish_is(3 * S, 0);
        }
    }

    /// Found by the `tracker` fuzz target: before the clock had run for a SYN timeout, the
    /// cutoff for due entries saturated to 1 and an entry of time 0 was due though young: it
    /// was neither counted waiting nor decided.
    #[test]
    fn nothing_is_due_before_the_clock_has_run_a_syn_timeout() {
        let mut l = Lab::new(Tracker::new(3 * S, 60 * S), true);
        l.syn(0, key(1000), 1);
        l.sweep(2 * S);
        assert_eq!((l.t.pending(), l.out.len()), (1, 0));
        l.sweep(3 * S);
        assert_eq!(l.kinds(), [OutcomeKind::Lost]);
    }

    /// Found by the `tracker` fuzz target: an entry the walk left for the pairing of an answer
    /// that came back to another 4-tuple (same remote address, port and ISN), which the pairing
    /// did not take, was neither counted waiting nor decided lost by that sweep.
    #[test]
    fn an_entry_left_for_the_pairing_is_still_counted() {
        let mut l = Lab::new(Tracker::new(S, 60 * S), true);
        let (a, b) = (key(3000), key(3001));
        l.syn(0, a, 7);
        l.syn(2 * S, b, 7);
        // One answer with ISN 7 to a third 4-tuple: it pairs with one of the two entries.
        unmatched(&mut l, 2 * S + 1, key(9000), 7);
        l.sweep(2 * S + 2);
        let paired = l
            .out
            .iter()
            .filter(|o| o.kind == OutcomeKind::Answered)
            .count();
        let lost = l.out.iter().filter(|o| o.kind == OutcomeKind::Lost).count();
        assert_eq!(paired, 1);
        // The other one: lost (a) or counted waiting (b).
        assert_eq!(lost + l.t.pending(), 1, "{:?}", l.kinds());
    }

    /// Found by the `tracker_model` fuzz target: a SYN-ACK that arrives while the sweep holds
    /// the entry it reports lost is late; the entry put back after it stays for the late
    /// window, and the server's repeat of its SYN-ACK after the repeat window found it and was
    /// late a second time.
    #[test]
    fn a_late_answer_racing_the_put_back_is_late_once() {
        for books in [false, true] {
            let mut l = Lab::new(Tracker::new(S, 60 * S), books);
            let k = key(3000);
            l.syn(0, k, 5);
            l.sink.now = 2 * S;
            let mut racy = RacyMap {
                lab_map: &mut l.map,
                sink: &mut l.sink,
                race: Some((false, k, 5)),
            };
            l.t.sweep(2 * S, &mut racy, &mut l.out);
            l.pump();
            assert_eq!(l.kinds(), [OutcomeKind::Lost, OutcomeKind::Late]);
            l.sweep(20 * S);
            l.answer(21 * S, k, 5, Answer::SynAck);
            l.sweep(22 * S);
            assert_eq!(l.kinds(), [OutcomeKind::Lost, OutcomeKind::Late]);
            assert_eq!(l.booked(), 0);
        }
    }

    /// Found by the `tracker_model` fuzz target: a SYN-ACK repeated after its connection's
    /// repeat window, which found no entry, was paired by the SYN events' record with the
    /// 4-tuple's next attempt: the sweep took that entry (a SYN on the 4-tuple while it held it
    /// made it report the attempt abandoned).
    #[test]
    fn a_stale_syn_record_does_not_take_another_attempt() {
        let mut l = Lab::new(Tracker::new(S, 10 * S), false);
        let k = key(3000);
        l.syn(0, k, 7);
        l.answer(S / 1000, k, 7, Answer::SynAck);
        l.sweep(11 * S);
        l.answer(11 * S, k, 7, Answer::SynAck);
        l.syn(11 * S + 1, k, 8);
        l.pump();
        l.sink.now = 12 * S;
        let mut racy = Injecting {
            lab_map: &mut l.map,
            sink: &mut l.sink,
            after_scan: Vec::new(),
            after_take: vec![syn(k, 9)],
        };
        l.t.sweep(12 * S, &mut racy, &mut l.out);
        assert_eq!(l.kinds(), [OutcomeKind::Answered]);
        assert_eq!(l.map.0[&k].isn, 8);
        assert_eq!(l.t.stats.unmatched_synacks, 1);
    }

    /// Found by the `tracker_model` fuzz target: the sweep takes an entry that a new ISN put
    /// there after its walk, and while it holds it another new ISN takes the 4-tuple. The
    /// entry it took cannot go back: the sweep removed it, so the sweep reports it.
    #[test]
    fn an_entry_the_sweep_cannot_put_back_is_reported() {
        for books in [false, true] {
            let mut l = Lab::new(Tracker::new(S, 60 * S), books);
            let k = key(3000);
            l.syn(0, k, 1);
            l.sink.now = 2 * S;
            let mut racy = Injecting {
                lab_map: &mut l.map,
                sink: &mut l.sink,
                after_scan: vec![syn(k, 2)],
                after_take: vec![syn(k, 3)],
            };
            l.t.sweep(2 * S, &mut racy, &mut l.out);
            l.pump();
            let isns: Vec<(OutcomeKind, u32)> =
                l.out.iter().map(|o| (o.kind, o.pending.isn)).collect();
            assert_eq!(
                isns,
                [(OutcomeKind::Abandoned, 2), (OutcomeKind::Abandoned, 1)]
            );
            assert_eq!(l.map.0[&k].isn, 3);
            assert_eq!(l.t.finish(2 * S, &mut l.map, &mut l.out), 1);
            assert_eq!(l.out.len(), 2);
        }
    }

    #[test]
    fn syn_retransmitted_after_an_answer_is_the_same_attempt() {
        // An ICMP error that reaches the client while connect() holds its socket is a soft
        // error there: the stack sends the same SYN again and gets the same error.
        let mut l = Lab::new(Tracker::new(S, 10 * S), true);
        let k = key(40000);
        l.syn(0, k, 7);
        l.answer(S / 1000, k, 7, UNREACHABLE);
        assert_eq!(l.kinds(), [OutcomeKind::Unreachable]);
        l.syn(S, k, 7);
        l.answer(S + 1, k, 7, UNREACHABLE);
        assert_eq!(l.out.len(), 1, "the repeat's answer is not reported again");
        // Unanswered repeat: cleared silently, kernel entry too.
        l.syn(3 * S, k, 7);
        l.sweep(5 * S);
        assert_eq!(l.out.len(), 1);
        assert!(l.map.0.is_empty());
        assert_eq!(l.t.stats.repeated_syns, 1);
        // A new ISN on the same tuple is a new attempt.
        l.syn(6 * S, k, 8);
        l.sweep(6 * S);
        assert_eq!(l.t.pending(), 1);
    }

    #[test]
    fn superseded_is_abandoned_once() {
        let mut l = Lab::new(Tracker::new(S, 10 * S), true);
        let k = key(1500);
        l.syn(0, k, 1);
        l.syn(S / 2, k, 99);
        assert_eq!(l.kinds(), [OutcomeKind::Abandoned]);
        assert!(l.out[0].kind.is_loss());
        l.answer(S, k, 99, Answer::SynAck);
        assert_eq!((l.out.len(), l.booked()), (1, 1));
        // A lost attempt replaced by a new ISN is not abandoned a second time.
        l.syn(2 * S, k, 200);
        l.sweep(4 * S);
        l.syn(5 * S, k, 300);
        assert_eq!(l.kinds(), [OutcomeKind::Abandoned, OutcomeKind::Lost]);
    }

    /// A client with tcp_syn_retries = 6 sends SYNs at 0, 1, 3, 7, 15, 31 and 63 s. The kernel
    /// entry is cleared after the 60 s late window; the SYN at 63 s (same ISN) is still the
    /// same attempt, and an answer to it is late, not a second connection.
    #[test]
    fn syn_after_the_late_window_is_the_same_attempt() {
        let t = Tracker::new(3 * S, 60 * S).with_retry_horizon(retry_horizon_ns(6), 10);
        let mut l = Lab::new(t, true);
        let k = key(2000);
        l.syn(0, k, 42);
        for s in [1, 3, 7, 15, 31] {
            l.syn(s * S, k, 42);
            l.sweep(s * S + 1);
        }
        l.sweep(62 * S);
        assert_eq!(l.kinds(), [OutcomeKind::Lost]);
        assert_eq!(
            l.out[0].pending.syns, 3,
            "lost at the SYN timeout, after three SYNs"
        );
        assert!(
            l.map.0.is_empty(),
            "the kernel entry is cleared after the late window"
        );
        assert_eq!(l.t.lost_remembered(), 1);
        // The seventh SYN recreates the kernel entry: not reported lost a second time.
        l.syn(63 * S, k, 42);
        l.sweep(70 * S);
        assert_eq!(l.out.len(), 1);
        assert_eq!(l.t.stats.syns_after_lost, 1);
        // Its SYN-ACK makes the attempt late.
        l.answer(71 * S, k, 42, Answer::SynAck);
        assert_eq!(l.kinds(), [OutcomeKind::Lost, OutcomeKind::Late]);
        assert_eq!(l.booked(), 0);
        // After the horizon, a new ISN is a new attempt.
        l.sweep(200 * S);
        assert_eq!(l.t.lost_remembered(), 0);
        l.syn(201 * S, k, 43);
        l.sweep(201 * S);
        assert_eq!(l.t.pending(), 1);
    }

    /// Found by the `tracker_model` fuzz target: a late answer whose event was still in the
    /// ring buffer when the sweep ended the late window; the server's repeat of it, after the
    /// repeat window, was reported late a second time.
    #[test]
    fn a_late_answer_is_late_once_when_its_event_waits_across_the_late_window() {
        let t = Tracker::new(S, 10 * S).with_retry_horizon(retry_horizon_ns(6), 10);
        let mut l = Lab::new(t, true);
        let k = key(2500);
        l.syn(0, k, 9);
        l.sweep(2 * S);
        assert_eq!(l.kinds(), [OutcomeKind::Lost]);
        // The SYN-ACK takes the lost entry; the sweep runs before its event is read.
        l.sink.now = 11 * S;
        let parsed = Parsed::Answer {
            key: k,
            ack: 10,
            answer: Answer::SynAck,
        };
        pairing::on_packet(&mut l.map.0, &mut l.sink, None, &parsed);
        l.t.sweep(11 * S, &mut l.map, &mut l.out);
        l.pump();
        assert_eq!(l.kinds(), [OutcomeKind::Lost, OutcomeKind::Late]);
        // The server repeats its SYN-ACK after the repeat window: nothing new.
        l.sweep(25 * S);
        l.answer(26 * S, k, 9, Answer::SynAck);
        l.sweep(27 * S);
        assert_eq!(l.kinds(), [OutcomeKind::Lost, OutcomeKind::Late]);
    }

    #[test]
    fn lost_memory_is_capped_and_overflow_counted() {
        let t = Tracker::new(S, 2 * S).with_retry_horizon(retry_horizon_ns(6), 2);
        let mut l = Lab::new(t, true);
        for port in 1..=3 {
            l.syn(0, key(port), u32::from(port));
        }
        l.sweep(S);
        l.sweep(3 * S);
        assert_eq!(l.out.len(), 3);
        assert_eq!(l.t.lost_remembered(), 2);
        assert_eq!(l.t.stats.lost_memory_overflow, 1);
        assert_eq!(retry_horizon_ns(6), 130 * S);
    }

    #[test]
    fn finish_counts_waiting() {
        let mut l = Lab::new(Tracker::new(3 * S, 10 * S), true);
        l.syn(0, key(1500), 1);
        assert_eq!(l.t.finish(S, &mut l.map, &mut l.out), 1);
        assert!(l.out.is_empty());
    }

    fn unmatched(l: &mut Lab, ns: u64, answer_key: FlowKey, isn: u32) {
        let ev = Event::new(
            EventKind::UnmatchedSynAck,
            answer_key,
            PendingSyn::first(ns, isn, 0),
            ns,
        );
        l.t.on_event(&ev, &mut l.out);
    }

    #[test]
    fn answer_to_a_translated_tuple_pairs_by_isn() {
        for books in [false, true] {
            let mut l = Lab::new(Tracker::new(3 * S, 60 * S), books);
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
            l.syn(S, pod, 77);
            unmatched(&mut l, S + 5, node, 77);
            l.sweep(S + 10);
            assert_eq!(l.kinds(), [OutcomeKind::Answered]);
            assert_eq!(l.out[0].key, pod);
            assert_eq!(l.out[0].answered_as, Some(node));
            assert_eq!(l.out[0].rtt_ns, Some(5));
            assert_eq!(l.t.stats.translated_answers, 1);
            assert_eq!(l.t.stats.translated_example, Some((pod, node)));
            assert!(l.map.0.is_empty(), "the kernel entry goes with the answer");
            // The server repeats its SYN-ACK: the same connection, nothing new.
            unmatched(&mut l, S + 9, node, 77);
            l.sweep(2 * S);
            assert_eq!((l.out.len(), l.t.stats.unmatched_synacks), (1, 0));
            // A SYN-ACK no SYN explains (same remote, other ISN).
            unmatched(&mut l, S + 9, node, 78);
            l.sweep(2 * S);
            assert_eq!((l.out.len(), l.t.stats.unmatched_synacks), (1, 1));
        }
    }

    #[test]
    fn translated_answer_after_the_timeout_is_late() {
        let mut l = Lab::new(Tracker::new(S, 60 * S), true);
        let (pod, node) = (key(40001), key(8257));
        l.syn(0, pod, 7);
        l.sweep(2 * S);
        assert_eq!(l.kinds(), [OutcomeKind::Lost]);
        unmatched(&mut l, 3 * S, node, 7);
        l.sweep(3 * S);
        assert_eq!(l.kinds(), [OutcomeKind::Lost, OutcomeKind::Late]);
        assert_eq!(l.out[1].answered_as, Some(node));
        assert!(l.map.0.is_empty());
        assert_eq!(l.t.held(), 0);
    }
}
