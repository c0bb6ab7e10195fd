//! Per-packet cost: netrace's egress and ingress programs against the empty classifier of the
//! same object, on the same frames, through `BPF_PROG_TEST_RUN`.
//!
//! Two methods, each with its own baseline:
//! - *repeated*: one test run executes the program `repeat` times on one frame; the time per
//!   run is the wall-clock time of the call divided by `repeat` (the kernel's own figure is
//!   whole nanoseconds, too coarse for a 5 ns baseline; it is kept as a cross-check). A SYN
//!   repeated hits the same 4-tuple: after the first run it is the retransmission path.
//! - *single*: a new 4-tuple per call (`repeat = 1`), to measure the paths a repeated frame
//!   cannot: a new SYN (map insert and its port logged, no event) and the SYN-ACK that
//!   matches it (map delete, answer logged for user space to count), alternating per flow,
//!   as `netrace watch` runs by default (which drains the logs; so does this, untimed);
//!   then the same with an event for each (`SEND_SYNS | SEND_ANSWERS`, per-connection
//!   output). The kernel times a single run including its timer (two clock reads), so the
//!   empty classifier is timed the same way alongside.

use std::time::Instant;

use netrace_common::{Counter, SEND_ANSWERS, SEND_SYNS};
use serde_json::{json, Value};

use crate::{
    frames::{self, ACK, CLIENT4, CLIENT6, PSH, SERVER4, SERVER6, SERVER_PORT, SYN},
    kernel::{Kernel, EGRESS, INGRESS, NOOP},
    stats::{median, round, trimmed_mean},
};

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    /// What each program does with it, and whether that is the SYN or SYN-ACK path (target:
    /// absolute time) or a packet it only parses and ignores (target: ratio to empty).
    egress: (&'static str, bool),
    ingress: (&'static str, bool),
}

const IGNORED: (&str, bool) = ("parsed, ignored", false);

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "SYN (IPv4)",
            frame: frames::tcp4(
                CLIENT4,
                SERVER4,
                (40000, SERVER_PORT),
                frames::ISN,
                0,
                SYN,
                0,
            ),
            egress: ("same 4-tuple every run: retransmission path", true),
            ingress: IGNORED,
        },
        Case {
            name: "SYN-ACK (IPv4)",
            frame: frames::tcp4(SERVER4, CLIENT4, (SERVER_PORT, 40001), 7, 8, SYN | ACK, 0),
            egress: IGNORED,
            ingress: (
                "no pending entry: lookup miss + unmatched-answer event",
                true,
            ),
        },
        Case {
            name: "ACK + 1448 B data (IPv4)",
            frame: frames::tcp4(
                CLIENT4,
                SERVER4,
                (40002, SERVER_PORT),
                9,
                10,
                ACK | PSH,
                1448,
            ),
            egress: IGNORED,
            ingress: IGNORED,
        },
        Case {
            name: "SYN (IPv6)",
            frame: frames::tcp6(CLIENT6, SERVER6, (40003, SERVER_PORT), frames::ISN, SYN),
            egress: ("same 4-tuple every run: retransmission path", true),
            ingress: IGNORED,
        },
        Case {
            name: "UDP, 512 B (IPv4)",
            frame: frames::udp4(CLIENT4, SERVER4, (40004, 53), 512),
            egress: IGNORED,
            ingress: IGNORED,
        },
    ]
}

pub fn run(quick: bool) -> anyhow::Result<Value> {
    let (rounds, repeat, single_calls) = if quick {
        (7, 100_000u32, 20_000u32)
    } else {
        (31, 500_000u32, 200_000u32)
    };
    // netrace's defaults (`--max-pending`, `--ringbuf-kib`).
    let mut k = Kernel::load(
        netrace_common::DEFAULT_MAX_PENDING,
        netrace_common::DEFAULT_RINGBUF_BYTES,
    )?;
    let cases = cases();
    let progs = [NOOP, EGRESS, INGRESS];
    // [case][prog] → samples of ns per run (wall clock), and the kernel's own figures.
    let mut wall = vec![vec![Vec::new(); progs.len()]; cases.len()];
    let mut kern = vec![vec![Vec::new(); progs.len()]; cases.len()];
    // Warm-up: caches, the first insert of the repeated SYN.
    for c in &cases {
        for p in progs {
            k.run(p, &c.frame, 1000)?;
        }
    }
    for _ in 0..rounds {
        for (ci, c) in cases.iter().enumerate() {
            for (pi, p) in progs.iter().enumerate() {
                let t0 = Instant::now();
                let r = k.run(p, &c.frame, repeat)?;
                let ns = t0.elapsed().as_nanos() as f64 / f64::from(repeat);
                wall[ci][pi].push(ns);
                kern[ci][pi].push(r.duration.as_nanos() as f64);
            }
        }
        k.drain();
    }
    let packets: Vec<Value> = cases
        .iter()
        .enumerate()
        .map(|(ci, c)| {
            let m = |pi: usize| round(median(&wall[ci][pi]), 2);
            let mk = |pi: usize| median(&kern[ci][pi]);
            json!({
                "packet": c.name,
                "frame_bytes": c.frame.len(),
                "egress_path": c.egress.0,
                "egress_on_syn_path": c.egress.1,
                "ingress_path": c.ingress.0,
                "ingress_on_syn_path": c.ingress.1,
                "noop_ns": m(0),
                "egress_ns": m(1),
                "ingress_ns": m(2),
                "kernel_reported_ns": {"noop": mk(0), "egress": mk(1), "ingress": mk(2)},
            })
        })
        .collect();
    // Flows far away from the repeated frames' ports and addresses, and apart per mode.
    let single = single_flows(&mut k, single_calls, 0, 10_000_000)?;
    let single_events = single_flows(&mut k, single_calls, SEND_SYNS | SEND_ANSWERS, 20_000_000)?;
    Ok(json!({
        "rounds": rounds,
        "repeat": repeat,
        "packets": packets,
        "single": single,
        "single_events": single_events,
    }))
}

/// New SYN and matched SYN-ACK, one new flow per call, alternating, with the empty classifier
/// timed the same way on the same SYN. `send` is what the kernel sends one by one: 0 is
/// `netrace watch`'s default (no SYN event, the answer counted in the kernel), `SEND_SYNS |
/// SEND_ANSWERS` an event for each (per-connection output, attribution). `base` keeps the
/// flows of successive calls apart.
fn single_flows(k: &mut Kernel, calls: u32, send: u32, base: u32) -> anyhow::Result<Value> {
    k.set_send(send)?;
    let mut syn = frames::syn4(0);
    let mut synack = frames::synack4(0);
    let (mut noop, mut egress, mut ingress) = (Vec::new(), Vec::new(), Vec::new());
    k.drain();
    let c0: Vec<u64> = COUNTED.iter().map(|c| k.counter(*c)).collect();
    let mut events = 0;
    for i in 0..calls {
        frames::set_syn_flow(&mut syn, base + i);
        frames::set_synack_flow(&mut synack, base + i);
        noop.push(k.run(NOOP, &syn, 1)?.duration.as_nanos() as f64);
        egress.push(k.run(EGRESS, &syn, 1)?.duration.as_nanos() as f64);
        ingress.push(k.run(INGRESS, &synack, 1)?.duration.as_nanos() as f64);
        // Often enough that the answer and port logs never fill, on any number of CPUs.
        if i % 512 == 511 {
            events += k.drain();
        }
    }
    events += k.drain();
    let d: Vec<u64> = COUNTED
        .iter()
        .zip(&c0)
        .map(|(c, before)| k.counter(*c) - before)
        .collect();
    let [seen, retrans, matched, booked, logged, books_full, ring_drops, map_full] = d[..] else {
        anyhow::bail!("counter list changed");
    };
    let new_syns = seen - retrans;
    let n = u64::from(calls);
    let events_mode = send != 0;
    // Books mode: every answer counted in the kernel, through the CPU's answer log, no event
    // at all. Events mode: an event per SYN and per answer, nothing booked.
    let (want_events, want_booked) = if events_mode { (2 * n, 0) } else { (0, n) };
    let ok = new_syns == n
        && matched == n
        && booked == want_booked
        && logged == want_booked
        && books_full == 0
        && events == want_events
        && ring_drops == 0
        && map_full == 0;
    if !ok {
        anyhow::bail!(
            "the single-run paths were not what they claim (send = {send}): {calls} flows, \
             {new_syns} new SYNs, {matched} SYN-ACKs matched, {booked} answers booked \
             ({logged} through the log), {books_full} books full, {events} events, {ring_drops} ring drops, {map_full} \
             map-full"
        );
    }
    let mut left = Vec::new();
    k.maps.pending.walk_into(&mut left);
    Ok(json!({
        "calls": calls,
        "send": send,
        "noop_ns": round(trimmed_mean(&noop), 2),
        "new_syn_ns": round(trimmed_mean(&egress), 2),
        "matched_synack_ns": round(trimmed_mean(&ingress), 2),
        "noop_median_ns": median(&noop),
        "new_syn_median_ns": median(&egress),
        "matched_synack_median_ns": median(&ingress),
        "checks": {
            "new_syns": new_syns, "synacks_matched": matched, "answered_booked": booked,
            "answered_logged": logged,
            "books_full": books_full, "events": events, "ringbuf_full": ring_drops,
            "pending_map_full": map_full, "pending_entries_left": left.len(),
        },
    }))
}

/// The counters [`single_flows`] checks, in the order it reads them.
const COUNTED: [Counter; 8] = [
    Counter::SynSeen,
    Counter::SynRetransmit,
    Counter::SynAckMatched,
    Counter::AnsweredBooked,
    Counter::AnsweredLogged,
    Counter::BooksFull,
    Counter::RingbufFull,
    Counter::PendingMapFull,
];
