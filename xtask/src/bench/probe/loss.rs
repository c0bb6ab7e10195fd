//! No silent loss. Connections are new SYNs sent through the egress program and, for nine in
//! ten, their SYN-ACKs through the ingress program (`BPF_PROG_TEST_RUN`); every tenth stays
//! unanswered, so that entries still pending take part in every account. In every run:
//!
//! - *books mode* (`netrace watch`'s default: no SYN events, answers counted in the kernel,
//!   through the CPUs' answer logs or in the answer books): `answered_booked` + answered
//!   events received + `ringbuf_full` + entries still pending + `pending_map_full` == new
//!   SYNs sent;
//! - *events mode* (`SEND_SYNS | SEND_ANSWERS`, per-connection output): events received +
//!   `ringbuf_full` == events the kernel had to send (a SYN event per tracked SYN, an event
//!   per answer).
//!
//! The runs: bursts into a 4 KiB ring nobody drains (`--ringbuf-kib 4`: where per-connection
//! output starts dropping); books mode with a pending map too small (`pending_map_full`) and
//! with the answer books full and a 4 KiB ring (answers sent as events, and dropped); and
//! paced runs while a consumer drains the ring the way `netrace watch` does (woken by the
//! kernel or every 50 ms), in both modes.

use std::{
    os::fd::AsRawFd as _,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail};
use netrace::track::tracker::Tracker;
use netrace_common::{
    Counter, PendingSyn, DEFAULT_RINGBUF_BYTES, OUTCOME_EVENT_SIZE, SEND_ANSWERS, SEND_SYNS,
    STATE_WAITING,
};
use serde_json::{json, Value};

use crate::{
    frames,
    kernel::{test_run, Kernel, Kinds, EGRESS, INGRESS},
    stats::round,
};

const SMALL_RING: u32 = 4096;
/// As `netrace watch` drains: when the kernel wakes it (a quarter of the ring is full) and
/// otherwise every 50 ms (`DRAIN` in netrace/src/watch/pump.rs).
const DRAIN_MS: i32 = 50;
const MAX_PENDING: u32 = netrace_common::DEFAULT_MAX_PENDING;
/// Per-connection events (`--events all` with attribution; `--events all` alone sends only
/// the answers).
const EVENTS: u32 = SEND_SYNS | SEND_ANSWERS;
/// Every `UNANSWERED`-th connection gets no SYN-ACK.
const UNANSWERED: u32 = 10;

fn answered(i: u32) -> bool {
    i % UNANSWERED != UNANSWERED - 1
}

/// One run and its accounting.
#[derive(Default)]
struct Tally {
    send: u32,
    /// New SYNs sent.
    syns: u64,
    /// SYN-ACKs sent.
    answers: u64,
    kinds: Kinds,
    syn_seen: u64,
    booked: u64,
    books_full: u64,
    ring_full: u64,
    map_full: u64,
    /// SYN-ACKs without a pending entry whose port has a booked answer (taken as repeats).
    repeated: u64,
    /// Entries still waiting in the kernel's pending maps after the run.
    pending: u64,
}

/// The counters a tally reads, as deltas over a run.
#[derive(Clone, Copy, Default)]
struct Counters {
    syn_seen: u64,
    booked: u64,
    books_full: u64,
    ring_full: u64,
    map_full: u64,
    repeated: u64,
}

impl Counters {
    fn of(k: &Kernel) -> Self {
        Self {
            syn_seen: k.counter(Counter::SynSeen),
            booked: k.counter(Counter::AnsweredBooked),
            books_full: k.counter(Counter::BooksFull),
            ring_full: k.counter(Counter::RingbufFull),
            map_full: k.counter(Counter::PendingMapFull),
            repeated: k.counter(Counter::SynAckRepeated),
        }
    }
}

/// Entries waiting in both pending maps.
fn waiting(k: &mut Kernel) -> u64 {
    let mut all: Vec<(netrace_common::FlowKey, PendingSyn)> = Vec::new();
    k.maps.pending.walk_into(&mut all);
    all.iter().filter(|(_, p)| p.state == STATE_WAITING).count() as u64
}

impl Tally {
    /// The run's tally: counters since `before`, the records received, what was sent.
    fn new(k: &mut Kernel, before: Counters, kinds: Kinds, syns: u64, answers: u64) -> Self {
        let now = Counters::of(k);
        Self {
            send: k.send,
            syns,
            answers,
            kinds,
            syn_seen: now.syn_seen - before.syn_seen,
            booked: now.booked - before.booked,
            books_full: now.books_full - before.books_full,
            ring_full: now.ring_full - before.ring_full,
            map_full: now.map_full - before.map_full,
            repeated: now.repeated - before.repeated,
            pending: waiting(k),
        }
    }

    /// The books-mode account: every new SYN is booked, sent as an answered event, dropped
    /// with the ring full, still pending, or not tracked (map full).
    fn books_sum(&self) -> u64 {
        self.booked + self.kinds.answered + self.ring_full + self.pending + self.map_full
    }

    /// Events the kernel had to send in events mode: one per tracked SYN, one per answer
    /// (answered, or unmatched for a SYN that found the map full).
    fn events_due(&self) -> u64 {
        self.syns - self.map_full + self.answers
    }

    /// Nothing silent.
    fn accounted(&self) -> bool {
        let books = self.books_sum() == self.syns;
        self.syn_seen == self.syns
            && self.kinds.undecodable == 0
            && if self.send == 0 {
                // Ring drops could only be answered events: no unmatched ones were dropped
                // (the runs with a full map have room for them), so the sum is exact.
                books && self.kinds.syn == 0
            } else {
                self.kinds.total() + self.ring_full == self.events_due()
                    && self.booked == 0
                    && self.pending + self.answers == self.syns - self.map_full
            }
    }

    fn json(&self) -> Value {
        json!({
            "mode": if self.send == 0 { "books" } else { "events" },
            "syns_sent": self.syns,
            "synacks_sent": self.answers,
            "syn_seen": self.syn_seen,
            "answered_booked": self.booked,
            "books_full": self.books_full,
            "events_received": self.kinds.total(),
            "answered_events": self.kinds.answered,
            "syn_events": self.kinds.syn,
            "unmatched_events": self.kinds.unmatched,
            "synack_repeated": self.repeated,
            "ringbuf_full": self.ring_full,
            "pending_map_full": self.map_full,
            "still_pending": self.pending,
            "books_sum": self.books_sum(),
            "events_due": if self.send == 0 { Value::Null } else { self.events_due().into() },
            "accounted": self.accounted(),
        })
    }
}

/// Frames for connection `i`: its SYN and its SYN-ACK (both rewritten in place).
struct Conn {
    syn: Vec<u8>,
    synack: Vec<u8>,
}

impl Conn {
    fn new() -> Self {
        Self {
            syn: frames::syn4(0),
            synack: frames::synack4(0),
        }
    }

    fn set(&mut self, i: u32) {
        frames::set_syn_flow(&mut self.syn, i);
        frames::set_synack_flow(&mut self.synack, i);
    }
}

/// Bursts of `n` connections (SYN, SYN-ACK) with per-connection events into a 4 KiB ring
/// nobody drains during the burst.
fn bursts(quick: bool) -> anyhow::Result<Value> {
    let mut k = Kernel::load_with(MAX_PENDING, SMALL_RING, filter(EVENTS))?;
    let mut c = Conn::new();
    let mut next = 0u32;
    let mut burst = |k: &mut Kernel, n: u32| -> anyhow::Result<Tally> {
        let before = Counters::of(k);
        for _ in 0..n {
            c.set(next);
            next += 1;
            k.run(EGRESS, &c.syn, 1)?;
            k.run(INGRESS, &c.synack, 1)?;
        }
        let mut kinds = Kinds::default();
        k.drain_kinds(&mut kinds);
        Ok(Tally::new(k, before, kinds, u64::from(n), u64::from(n)))
    };
    let mut capacity = None;
    for n in 1..=256 {
        let t = burst(&mut k, n)?;
        if !t.accounted() {
            bail!(
                "a burst of {n} connections was not accounted for: {}",
                t.json()
            );
        }
        if t.ring_full > 0 {
            capacity = Some(n - 1);
            break;
        }
    }
    let capacity = capacity.ok_or_else(|| anyhow!("no drops in bursts of up to 256"))?;
    let sizes: &[u32] = if quick {
        &[100, 10_000]
    } else {
        &[100, 1_000, 10_000, 100_000]
    };
    let mut above = Vec::new();
    for &n in sizes {
        let t = burst(&mut k, n)?;
        above.push(json!({"burst": n, "tally": t.json()}));
    }
    Ok(json!({
        "ring_bytes": SMALL_RING,
        "record_bytes": OUTCOME_EVENT_SIZE + 8,
        "events_per_connection": 2,
        "capacity": capacity,
        "first_drop_at": capacity + 1,
        "above": above,
    }))
}

fn filter(send: u32) -> netrace_common::KernelFilter {
    netrace_common::KernelFilter {
        send,
        ..Default::default()
    }
}

/// Books mode with the pending map (IPv4) too small for the `n` SYNs: all SYNs first, then
/// the answers; the answers to untracked SYNs are unmatched events (the default ring holds
/// them all, so ring drops, if any, are answered events only).
fn map_full(n: u32) -> anyhow::Result<Value> {
    const SMALL_MAP: u32 = 4096;
    let mut k = Kernel::load_with(SMALL_MAP, DEFAULT_RINGBUF_BYTES, filter(0))?;
    let mut c = Conn::new();
    let before = Counters::of(&k);
    let mut kinds = Kinds::default();
    for i in 0..n {
        c.set(i);
        k.run(EGRESS, &c.syn, 1)?;
    }
    let mut answers = 0;
    for i in (0..n).filter(|i| answered(*i)) {
        c.set(i);
        k.run(INGRESS, &c.synack, 1)?;
        answers += 1;
        if answers % 4096 == 0 {
            k.drain_kinds(&mut kinds);
        }
    }
    k.drain_kinds(&mut kinds);
    let t = Tally::new(&mut k, before, kinds, u64::from(n), answers);
    Ok(json!({
        "run": "books mode, pending map of 4096 entries",
        "max_pending": SMALL_MAP,
        "ring_bytes": DEFAULT_RINGBUF_BYTES,
        "tally": t.json(),
    }))
}

/// Books mode with the answer books full (a server port per connection out of 4096, so
/// thousands of books) and a 4 KiB ring drained only at the end, the answer logs not at all:
/// once the logs are full, answers go to the books, and beyond the books they are sent as
/// events, most of them dropped.
fn books_full(n: u32) -> anyhow::Result<Value> {
    let mut k = Kernel::load_with(MAX_PENDING, SMALL_RING, filter(0))?;
    let mut c = Conn::new();
    let before = Counters::of(&k);
    let mut answers = 0;
    for i in 0..n {
        c.set(i);
        frames::set_server_port(&mut c.syn, &mut c.synack, 20_000 + (i % 4096) as u16);
        k.run(EGRESS, &c.syn, 1)?;
        if answered(i) {
            k.run(INGRESS, &c.synack, 1)?;
            answers += 1;
        }
    }
    let mut kinds = Kinds::default();
    k.drain_kinds(&mut kinds);
    let t = Tally::new(&mut k, before, kinds, u64::from(n), answers);
    Ok(json!({
        "run": "books mode, answer books full, 4 KiB ring undrained",
        "ring_bytes": SMALL_RING,
        "tally": t.json(),
    }))
}

/// Waits until `fd` is readable or `timeout_ms` passed.
fn wait_readable(fd: i32, timeout_ms: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd that lives across the call; poll writes only revents.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
}

/// Connections at `rate` per second (`None`: as fast as one thread can issue them) for `secs`,
/// into a ring of `ring` bytes drained by a second thread as `netrace watch` drains it.
fn paced(send: u32, ring: u32, rate: Option<f64>, secs: f64) -> anyhow::Result<(Value, bool)> {
    let mut k = Kernel::load_with(MAX_PENDING, ring, filter(send))?;
    // The previous run's maps are freed by a kernel worker after their descriptors close;
    // let it finish, or its CPU time looks like a slow consumer.
    std::thread::sleep(Duration::from_millis(500));
    let before = Counters::of(&k);
    let Kernel { att, maps, .. } = &mut k;
    let (events, logs) = (&mut maps.events, &mut maps.logs);
    let done = AtomicBool::new(false);
    let started = std::sync::Barrier::new(2);
    let mut c = Conn::new();
    let (sent, answers, elapsed, kinds) = std::thread::scope(|s| {
        let consumer = s.spawn(|| {
            // SYNs start only once the consumer runs: a thread's start-up is not the drain rate.
            started.wait();
            let mut tracker = Tracker::new(3_000_000_000, 60_000_000_000);
            let mut outcomes = Vec::new();
            let mut kinds = Kinds::default();
            let fd = events.as_raw_fd();
            loop {
                // Read the flag first: a record submitted before it was set is drained below.
                let finished = done.load(Ordering::Acquire);
                while let Some(item) = events.next() {
                    kinds.add(&item);
                    if let Ok(ev) = netrace::kernel::events::Event::try_from(&*item) {
                        tracker.on_event(&ev, &mut outcomes);
                    }
                    outcomes.clear();
                }
                logs.drain(|_| ());
                if finished {
                    break;
                }
                wait_readable(fd, DRAIN_MS);
            }
            kinds
        });
        started.wait();
        let produced = produce(att, &mut c, rate, secs);
        done.store(true, Ordering::Release);
        let kinds = consumer
            .join()
            .map_err(|_| anyhow!("the ring-buffer consumer panicked"))?;
        let (sent, answers, elapsed) = produced?;
        anyhow::Ok((sent, answers, elapsed, kinds))
    })?;
    let t = Tally::new(&mut k, before, kinds, sent, answers);
    let clean = t.ring_full == 0 && t.map_full == 0;
    let achieved = sent as f64 / elapsed.as_secs_f64();
    Ok((
        json!({
            "ring_bytes": ring,
            "target_rate": rate.map(|r| round(r, 0)),
            "achieved_rate": round(achieved, 0),
            "tally": t.json(),
        }),
        clean,
    ))
}

/// Issues connections (SYN, then the SYN-ACK for nine in ten) at `rate`; returns SYNs and
/// SYN-ACKs sent and the time taken.
fn produce(
    att: &mut netrace::kernel::attach::Attachments,
    c: &mut Conn,
    rate: Option<f64>,
    secs: f64,
) -> anyhow::Result<(u64, u64, Duration)> {
    let start = Instant::now();
    let end = Duration::from_secs_f64(secs);
    let mut i = 0u32;
    let mut answers = 0u64;
    loop {
        let now = start.elapsed();
        if now >= end {
            break;
        }
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64(f64::from(i) / rate);
            if due > now {
                let wait = due - now;
                if wait > Duration::from_micros(200) {
                    std::thread::sleep(wait - Duration::from_micros(100));
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
        }
        c.set(i);
        test_run(att, EGRESS, &c.syn, 1)?;
        if answered(i) {
            test_run(att, INGRESS, &c.synack, 1)?;
            answers += 1;
        }
        i += 1;
    }
    Ok((u64::from(i), answers, start.elapsed()))
}

fn tally_ok(v: &Value) -> bool {
    v.pointer("/tally/accounted") == Some(&Value::Bool(true))
}

pub fn run(quick: bool) -> anyhow::Result<Value> {
    let burst = bursts(quick)?;
    let overflow_n = if quick { 20_000 } else { 100_000 };
    let overflows = vec![map_full(overflow_n)?, books_full(overflow_n)?];
    let secs = if quick { 0.25 } else { 1.0 };
    let rates: &[f64] = if quick {
        &[5e3, 20e3, 100e3]
    } else {
        &[2e3, 5e3, 10e3, 20e3, 50e3, 100e3, 200e3]
    };
    let mut small = Vec::new();
    // The highest rate whose run dropped nothing, and the lowest whose run dropped: a drop is
    // the consumer waking late once, so on a busy machine the two may overlap.
    let mut max_clean: Option<f64> = None;
    let mut first_dropping: Option<f64> = None;
    for r in rates.iter().copied().map(Some).chain([None]) {
        let (v, clean) = paced(EVENTS, SMALL_RING, r, secs)?;
        let achieved = v
            .get("achieved_rate")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        if clean {
            max_clean = Some(max_clean.map_or(achieved, |m| m.max(achieved)));
        } else if first_dropping.is_none() {
            first_dropping = Some(achieved);
        }
        small.push(v);
    }
    let (books_small, books_small_clean) = paced(0, SMALL_RING, None, secs)?;
    let (default_ring, default_clean) = paced(EVENTS, DEFAULT_RINGBUF_BYTES, None, secs)?;
    let all_accounted = small.iter().all(tally_ok)
        && tally_ok(&books_small)
        && tally_ok(&default_ring)
        && overflows.iter().all(tally_ok)
        && burst
            .get("above")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().all(tally_ok));
    let runs = small.len()
        + 2
        + overflows.len()
        + burst
            .get("above")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
    Ok(json!({
        "burst": burst,
        "overflows": overflows,
        "paced_small_ring": small,
        "max_clean_rate_small_ring": max_clean,
        "first_dropping_rate_small_ring": first_dropping,
        "books_small_ring_at_max_rate": books_small,
        "books_small_ring_clean": books_small_clean,
        "default_ring_at_max_rate": default_ring,
        "default_ring_clean": default_clean,
        "all_accounted": all_accounted,
        "runs": runs,
        "unanswered_one_in": UNANSWERED,
        "seconds_per_rate": secs,
    }))
}
