//! Scale: `n` unanswered SYNs, each its own 4-tuple, put into the pending map by the egress
//! program itself (`BPF_PROG_TEST_RUN`, one call per SYN), with their events drained into a
//! [`Tracker`] as `netrace watch` does. Then the memory of the maps (the kernel's `memlock`
//! figure) and of this process (RSS), and the time of the sweep that decides them lost: one
//! kernel map lookup per entry. Runs in a process of its own per `n`, so that RSS starts clean.

use std::time::{Duration, Instant};

use anyhow::bail;
use netrace::{
    report::monotonic_ns,
    track::tracker::{OutcomeKind, Tracker},
};
use netrace_common::Counter;
use serde_json::{json, Value};

use crate::{
    frames,
    kernel::{maps_memory, rss_bytes, Kernel, MapMem, EGRESS},
    stats::round,
};

/// What `--max-pending` would be for a million pending SYNs: 2^20.
pub const MAX_PENDING: u32 = 1 << 20;
const SYN_TIMEOUT: Duration = Duration::from_secs(3);
const LATE_WINDOW: Duration = Duration::from_secs(60);

fn maps_json(maps: &[MapMem]) -> Value {
    maps.iter()
        .map(|m| json!({"map": m.name, "max_entries": m.max_entries, "memlock_bytes": m.memlock}))
        .collect()
}

pub fn run(n: u32) -> anyhow::Result<Value> {
    let rss_start = rss_bytes()?;
    let mut k = Kernel::load(MAX_PENDING, netrace_common::DEFAULT_RINGBUF_BYTES)?;
    let empty_maps = maps_memory()?;
    let rss_empty = rss_bytes()?;
    let mut tracker = Tracker::new(SYN_TIMEOUT.as_nanos() as u64, LATE_WINDOW.as_nanos() as u64);
    let mut outcomes = Vec::new();
    let mut frame = frames::syn4(0);
    let t0 = Instant::now();
    let mut events = 0;
    for i in 0..n {
        frames::set_syn_flow(&mut frame, i);
        k.run(EGRESS, &frame, 1)?;
        if i % 8192 == 8191 {
            events += k.drain_into(&mut tracker, &mut outcomes)?;
        }
    }
    events += k.drain_into(&mut tracker, &mut outcomes)?;
    let fill = t0.elapsed();
    let map_full = k.counter(Counter::PendingMapFull);
    let ring_full = k.counter(Counter::RingbufFull);
    if tracker.pending() != n as usize || map_full != 0 || ring_full != 0 {
        bail!(
            "{n} SYNs sent but the tracker holds {} ({events} events, {map_full} map-full, \
             {ring_full} ring drops)",
            tracker.pending()
        );
    }
    let maps = maps_memory()?;
    let rss = rss_bytes()?;

    // Every entry is now older than the SYN timeout: the sweep looks each one up in the kernel
    // map and reports it lost.
    let now = monotonic_ns() + SYN_TIMEOUT.as_nanos() as u64 + 1_000_000_000;
    let t0 = Instant::now();
    tracker.sweep(now, &mut k.maps.pending, &mut outcomes);
    let sweep = t0.elapsed();
    let lost = outcomes
        .iter()
        .filter(|o| o.kind == OutcomeKind::Lost)
        .count();
    if lost != n as usize {
        bail!("the sweep of {n} pending SYNs reported {lost} lost");
    }

    let total = |m: &[MapMem]| m.iter().map(|x| x.memlock).sum::<u64>();
    Ok(json!({
        "pending": n,
        "max_pending": MAX_PENDING,
        "fill_s": round(fill.as_secs_f64(), 3),
        "fill_method": "BPF_PROG_TEST_RUN of the egress program, one SYN per call, events drained into a Tracker",
        "maps_empty_bytes": total(&empty_maps),
        "maps_bytes": total(&maps),
        "maps": maps_json(&maps),
        "maps_empty": maps_json(&empty_maps),
        "rss_start_bytes": rss_start,
        "rss_empty_bytes": rss_empty,
        "rss_bytes": rss,
        "total_bytes": total(&maps) + rss,
        "total_empty_bytes": total(&empty_maps) + rss_empty,
        "sweep_s": round(sweep.as_secs_f64(), 4),
        "sweep_ns_per_entry": round(sweep.as_nanos() as f64 / f64::from(n), 1),
    }))
}
