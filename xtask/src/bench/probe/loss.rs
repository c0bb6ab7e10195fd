//! No silent loss: with a 4 KiB ring buffer (`--ringbuf-kib 4`), how many new SYNs fit in a
//! burst nobody drains, how fast SYNs may come while a consumer drains the ring the way
//! `netrace watch` does (woken by the kernel or every 50 ms, decoding every record into a
//! [`Tracker`]), and, above those, that every SYN is accounted for: events received plus the
//! kernel's ring-full counter equal the SYNs sent, and `adopt()` recovers every dropped one.

use std::{
    os::fd::AsRawFd as _,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail};
use netrace::track::tracker::Tracker;
use netrace_common::{Counter, DEFAULT_RINGBUF_BYTES, OUTCOME_EVENT_SIZE};
use serde_json::{json, Value};

use crate::{
    frames,
    kernel::{test_run, Kernel, EGRESS},
    stats::round,
};

const SMALL_RING: u32 = 4096;
/// As `netrace watch` drains: when the kernel wakes it (a quarter of the ring is full) and
/// otherwise every 50 ms (`DRAIN` in netrace/src/watch/pump.rs).
const DRAIN_MS: i32 = 50;
const MAX_PENDING: u32 = 1 << 20;

/// One burst or paced run and its accounting.
struct Tally {
    sent: u64,
    received: u64,
    ring_full: u64,
    map_full: u64,
    syn_seen: u64,
}

impl Tally {
    fn of(k: &Kernel, sent: u64, received: u64) -> Self {
        Self {
            sent,
            received,
            ring_full: k.counter(Counter::RingbufFull),
            map_full: k.counter(Counter::PendingMapFull),
            syn_seen: k.counter(Counter::SynSeen),
        }
    }

    /// Nothing silent: every SYN the program saw is an event or a counted drop.
    fn accounted(&self) -> bool {
        self.syn_seen == self.sent && self.received + self.ring_full + self.map_full == self.sent
    }

    fn json(&self) -> Value {
        json!({
            "sent": self.sent, "syn_seen": self.syn_seen, "events_received": self.received,
            "ringbuf_full": self.ring_full, "pending_map_full": self.map_full,
            "accounted": self.accounted(),
        })
    }
}

/// Bursts of `n` new SYNs into a 4 KiB ring nobody drains during the burst.
fn bursts(quick: bool) -> anyhow::Result<Value> {
    let mut k = Kernel::load(MAX_PENDING, SMALL_RING)?;
    let mut frame = frames::syn4(0);
    let mut next = 0u32;
    let mut burst = |k: &mut Kernel, n: u32| -> anyhow::Result<Tally> {
        let before = Tally::of(k, 0, 0);
        for _ in 0..n {
            frames::set_syn_flow(&mut frame, next);
            next += 1;
            k.run(EGRESS, &frame, 1)?;
        }
        let received = k.drain();
        let after = Tally::of(k, u64::from(n), received);
        Ok(Tally {
            ring_full: after.ring_full - before.ring_full,
            map_full: after.map_full - before.map_full,
            syn_seen: after.syn_seen - before.syn_seen,
            ..after
        })
    };
    let mut capacity = None;
    for n in 1..=256 {
        let t = burst(&mut k, n)?;
        if !t.accounted() {
            bail!("a burst of {n} SYNs was not accounted for: {}", t.json());
        }
        if t.ring_full > 0 {
            capacity = Some(n - 1);
            break;
        }
    }
    let capacity = capacity.ok_or_else(|| anyhow!("no drops in bursts of up to 256 SYNs"))?;
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
        "capacity": capacity,
        "first_drop_at": capacity + 1,
        "above": above,
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

/// SYNs at `rate` per second (`None`: as fast as one thread can issue them) for `secs`, into a
/// ring of `ring` bytes drained by a second thread as `netrace watch` drains it.
fn paced(ring: u32, rate: Option<f64>, secs: f64) -> anyhow::Result<(Value, bool)> {
    let mut k = Kernel::load(MAX_PENDING, ring)?;
    // The previous run's maps (up to 200 k entries) are freed by a kernel worker after their
    // descriptors close; let it finish, or its CPU time looks like a slow consumer.
    std::thread::sleep(Duration::from_millis(500));
    let Kernel { att, maps } = &mut k;
    let events = &mut maps.events;
    let done = AtomicBool::new(false);
    let started = std::sync::Barrier::new(2);
    let mut frame = frames::syn4(0);
    let (sent, elapsed, received, tracker) = std::thread::scope(|s| {
        let consumer = s.spawn(|| {
            // SYNs start only once the consumer runs: a thread's start-up is not the drain rate.
            started.wait();
            let mut tracker = Tracker::new(3_000_000_000, 60_000_000_000);
            let mut outcomes = Vec::new();
            let mut received = 0u64;
            let fd = events.as_raw_fd();
            loop {
                // Read the flag first: a record submitted before it was set is drained below.
                let finished = done.load(Ordering::Acquire);
                while let Some(item) = events.next() {
                    if let Ok(ev) = netrace::kernel::events::Event::try_from(&*item) {
                        tracker.on_event(&ev, &mut outcomes);
                    }
                    received += 1;
                }
                if finished {
                    break;
                }
                wait_readable(fd, DRAIN_MS);
            }
            (received, tracker)
        });
        started.wait();
        let produced = produce(att, &mut frame, rate, secs);
        done.store(true, Ordering::Release);
        let (received, tracker) = consumer
            .join()
            .map_err(|_| anyhow!("the ring-buffer consumer panicked"))?;
        let (sent, elapsed) = produced?;
        anyhow::Ok((sent, elapsed, received, tracker))
    })?;
    let t = Tally::of(&k, sent, received);
    let clean = t.ring_full == 0 && t.map_full == 0;
    let achieved = sent as f64 / elapsed.as_secs_f64();
    Ok((
        json!({
            "ring_bytes": ring,
            "target_rate": rate.map(|r| round(r, 0)),
            "achieved_rate": round(achieved, 0),
            "tally": t.json(),
            "tracker_knows_all": tracker.pending() as u64 == sent,
        }),
        clean,
    ))
}

fn produce(
    att: &mut netrace::kernel::attach::Attachments,
    frame: &mut [u8],
    rate: Option<f64>,
    secs: f64,
) -> anyhow::Result<(u64, Duration)> {
    let start = Instant::now();
    let end = Duration::from_secs_f64(secs);
    let mut i = 0u32;
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
        frames::set_syn_flow(frame, i);
        test_run(att, EGRESS, frame, 1)?;
        i += 1;
    }
    Ok((u64::from(i), start.elapsed()))
}

pub fn run(quick: bool) -> anyhow::Result<Value> {
    let burst = bursts(quick)?;
    let secs = if quick { 0.25 } else { 1.0 };
    let rates: &[f64] = if quick {
        &[5e3, 20e3, 100e3]
    } else {
        &[2e3, 5e3, 10e3, 20e3, 50e3, 100e3, 200e3, 500e3]
    };
    let mut small = Vec::new();
    // The highest rate whose run dropped nothing, and the lowest whose run dropped: a drop is
    // the consumer waking late once, so on a busy machine the two may overlap.
    let mut max_clean: Option<f64> = None;
    let mut first_dropping: Option<f64> = None;
    let mut all_accounted = true;
    for r in rates.iter().copied().map(Some).chain([None]) {
        let (v, clean) = paced(SMALL_RING, r, secs)?;
        all_accounted &= v.pointer("/tally/accounted") == Some(&Value::Bool(true));
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
    let (default_ring, default_clean) = paced(DEFAULT_RINGBUF_BYTES, None, secs)?;
    all_accounted &= default_ring.pointer("/tally/accounted") == Some(&Value::Bool(true));
    Ok(json!({
        "burst": burst,
        "paced_small_ring": small,
        "max_clean_rate_small_ring": max_clean,
        "first_dropping_rate_small_ring": first_dropping,
        "default_ring_at_max_rate": default_ring,
        "default_ring_clean": default_clean,
        "all_accounted": all_accounted
            && burst.get("above").and_then(Value::as_array).is_some_and(|a| a
                .iter()
                .all(|b| b.pointer("/tally/accounted") == Some(&Value::Bool(true)))),
        "seconds_per_rate": secs,
    }))
}
