//! Scale: `n` unanswered SYNs, each its own 4-tuple, put into the pending map by the egress
//! program itself (`BPF_PROG_TEST_RUN`, one call per SYN), in `netrace watch`'s default mode
//! (no SYN events: user space holds no copy of them). Then the memory of the maps (the
//! kernel's `memlock` figure) and of this process (RSS) while a [`Tracker`] sweeps them as
//! `watch` does every second (all still waiting); the time to find the expired entries among
//! them as the sweep finds them (`PendingMap::due`: the kernel's iterators write out only the
//! due entries), and, for comparison, to walk the whole map in batches (`scan_next`, the
//! sweep's fallback); and the time for
//! `Tracker::sweep` to decide them all lost (take and put back each). Last, the map layout
//! the issue asks to compare: a plain BPF hash map of the old layout (40-byte key, 32-byte
//! value, not preallocated) and of the new one (12-byte key, 24-byte value, preallocated),
//! created from user space with the same capacity and filled with `n` entries. Runs in a
//! process of its own per `n`, so that RSS starts clean.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use netrace::{
    kernel::batch,
    report::monotonic_ns,
    track::tracker::{OutcomeKind, PendingMap as _, ScanPos, Tracker},
};
use netrace_common::{Counter, ExpireCutoffs, FlowKey, PendingSyn, V4Key, STATE_WAITING};
use serde_json::{json, Value};

use crate::{
    frames,
    kernel::{maps_memory, rss_bytes, Kernel, MapMem, EGRESS},
    stats::{median, round},
};

/// What `--max-pending` would be for a million pending SYNs: 2^20.
pub const MAX_PENDING: u32 = 1 << 20;
/// Longer than filling a million entries takes on a busy machine (2.4 s on an idle one): the
/// "nothing due yet" sweep right after the fill must find every entry still waiting. The
/// later figures take their time past the timeout as a number, not by waiting.
const SYN_TIMEOUT: Duration = Duration::from_secs(30);
const LATE_WINDOW: Duration = Duration::from_secs(60);

fn maps_json(maps: &[MapMem]) -> Value {
    maps.iter()
        .map(|m| json!({"map": m.name, "max_entries": m.max_entries, "memlock_bytes": m.memlock}))
        .collect()
}

/// The peak resident set size of this process (`VmHWM`), in bytes.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
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
        if i % 65536 == 65535 {
            events += k.drain();
        }
    }
    events += k.drain();
    let fill = t0.elapsed();
    let map_full = k.counter(Counter::PendingMapFull);
    let ring_full = k.counter(Counter::RingbufFull);
    let maps_filled = maps_memory()?;
    let rss_filled = rss_bytes()?;

    // As `watch` sweeps every second: nothing expired yet, every entry waiting. This is the
    // memory of `watch` holding them, and the cost of a sweep with nothing due.
    let finder = if k.maps.pending.expiry.is_some() {
        "mapped table read in place (IPv4), kernel iterator (IPv6)"
    } else {
        "batched walk (the IPv6 iterator did not load)"
    };
    let mut quiet = Vec::new();
    for _ in 0..3 {
        let fresh = monotonic_ns();
        let t0 = Instant::now();
        tracker.sweep(fresh, &mut k.maps.pending, &mut outcomes);
        quiet.push(t0.elapsed().as_secs_f64());
    }
    if tracker.pending() != n as usize
        || !outcomes.is_empty()
        || map_full != 0
        || ring_full != 0
        || events != 0
    {
        bail!(
            "{n} SYNs sent but {} entries wait ({} outcomes, {events} events, {map_full} \
             map-full, {ring_full} ring drops)",
            tracker.pending(),
            outcomes.len()
        );
    }
    let maps = maps_memory()?;
    let rss = rss_bytes()?;

    // Finding the expired entries, at a time past the SYN timeout, as the sweep finds them
    // (`PendingMap::due`: the kernel's iterators write out only the due entries; every entry
    // is due here). The first run allocates the buffers; later ones reuse them.
    let timeout = SYN_TIMEOUT.as_nanos() as u64;
    let expired_at = monotonic_ns() + timeout + 1_000_000_000;
    let cut = ExpireCutoffs {
        waiting_before_ns: expired_at - timeout + 1,
        lost_before_ns: expired_at.saturating_sub(LATE_WINDOW.as_nanos() as u64) + 1,
    };
    let mut due = Vec::new();
    let mut finds = Vec::new();
    let mut found = None;
    for _ in 0..5 {
        let t0 = Instant::now();
        let counts = k.maps.pending.due(cut, &mut due);
        finds.push(t0.elapsed().as_secs_f64());
        found = counts.map(|_| due.len());
    }
    drop(due);
    // The whole map walked in batches, as the sweep does where iterators do not load (and to
    // pair translated answers, and at the end): every entry read, the age test applied.
    let mut chunk = Vec::new();
    let mut walks = Vec::new();
    let mut expired = 0;
    let mut batches = 0;
    for _ in 0..3 {
        let t0 = Instant::now();
        let mut pos = ScanPos::default();
        expired = 0;
        batches = 0;
        while !pos.done() {
            k.maps.pending.scan_next(&mut pos, &mut chunk);
            batches += 1;
            expired += chunk
                .iter()
                .filter(|(_, p)| {
                    p.state == STATE_WAITING && expired_at.saturating_sub(p.first_ns) >= timeout
                })
                .count();
        }
        walks.push(t0.elapsed().as_secs_f64());
    }
    drop(chunk);
    if expired != n as usize || found.is_some_and(|f| f != n as usize) || k.maps.pending.errors != 0
    {
        bail!(
            "{n} pending SYNs due: the finder found {found:?}, the walk {expired} ({} errors)",
            k.maps.pending.errors
        );
    }

    // Deciding them: every entry taken, reported lost and put back marked lost.
    let t0 = Instant::now();
    outcomes.clear();
    tracker.sweep(expired_at, &mut k.maps.pending, &mut outcomes);
    let sweep = t0.elapsed();
    let lost = outcomes
        .iter()
        .filter(|o| o.kind == OutcomeKind::Lost)
        .count();
    if lost != n as usize {
        bail!("the sweep of {n} pending SYNs reported {lost} lost");
    }
    let rss_after_sweep = rss_bytes()?;
    drop(outcomes);
    drop(tracker);
    let peak = peak_rss_bytes();
    drop(k);

    let layouts = layouts(n)?;

    let total = |m: &[MapMem]| m.iter().map(|x| x.memlock).sum::<u64>();
    let walk = median(&walks);
    // Where the iterator did not load, `due` finds nothing itself and the sweep walks the
    // whole map: that walk is the time to find the expired ones.
    let (find, find_first) = if found.is_some() {
        (
            median(&finds[1..]),
            finds.first().copied().unwrap_or(f64::NAN),
        )
    } else {
        (walk, walks.first().copied().unwrap_or(f64::NAN))
    };
    Ok(json!({
        "pending": n,
        "max_pending": MAX_PENDING,
        "fill_s": round(fill.as_secs_f64(), 3),
        "fill_method": "BPF_PROG_TEST_RUN of the egress program, one SYN per call, default mode (no SYN events)",
        "maps_empty_bytes": total(&empty_maps),
        "maps_bytes": total(&maps),
        "maps_filled_bytes": total(&maps_filled),
        "maps": maps_json(&maps),
        "maps_empty": maps_json(&empty_maps),
        "rss_start_bytes": rss_start,
        "rss_empty_bytes": rss_empty,
        "rss_filled_bytes": rss_filled,
        "rss_bytes": rss,
        "rss_after_sweep_bytes": rss_after_sweep,
        "rss_peak_bytes": peak,
        "total_bytes": total(&maps) + rss,
        "total_empty_bytes": total(&empty_maps) + rss_empty,
        "finder": finder,
        "find_s": round(find, 5),
        "find_first_s": round(find_first, 5),
        "find_ns_per_entry": round(find * 1e9 / f64::from(n), 1),
        "found": found,
        "quiet_sweep_s": round(median(&quiet), 5),
        "walk_s": round(walk, 5),
        "walk_ns_per_entry": round(walk * 1e9 / f64::from(n), 1),
        "walk_expired": expired,
        "walk_batches": batches,
        "sweep_s": round(sweep.as_secs_f64(), 4),
        "sweep_ns_per_entry": round(sweep.as_nanos() as f64 / f64::from(n), 1),
        "lost_reported": lost,
        "layouts": layouts,
    }))
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_F_NO_PREALLOC: u32 = 1;

/// The prefix of `union bpf_attr` that `BPF_MAP_CREATE` needs.
#[repr(C)]
#[derive(Default)]
struct CreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// `union bpf_attr` for the `BPF_MAP_*_BATCH` commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised `repr(C)` prefix of `union bpf_attr` whose
    // pointers (if any) point at buffers the caller keeps alive for the call; the size passed
    // is its own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A BPF hash map made from user space, `MAX_PENDING` entries of `K` → `V`.
fn hash_map<K, V>(prealloc: bool) -> anyhow::Result<OwnedFd> {
    let mut attr = CreateAttr {
        map_type: BPF_MAP_TYPE_HASH,
        key_size: std::mem::size_of::<K>() as u32,
        value_size: std::mem::size_of::<V>() as u32,
        max_entries: MAX_PENDING,
        map_flags: if prealloc { 0 } else { BPF_F_NO_PREALLOC },
    };
    let fd = bpf(BPF_MAP_CREATE, &mut attr).context("creating a BPF hash map")?;
    let fd = i32::try_from(fd).context("a map descriptor out of range")?;
    // SAFETY: the kernel just returned this descriptor for a new map; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Inserts `keys` → `values` in one batch.
fn update_batch<K, V>(fd: &OwnedFd, keys: &[K], values: &[V]) -> anyhow::Result<()> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len().min(values.len()) as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    bpf(BPF_MAP_UPDATE_BATCH, &mut attr).context("filling a BPF hash map")?;
    if attr.count as usize != keys.len() {
        bail!(
            "a batch update took {} of {} entries",
            attr.count,
            keys.len()
        );
    }
    Ok(())
}

/// The kernel's `memlock` figure for the map behind `fd`.
fn memlock(fd: &OwnedFd) -> anyhow::Result<u64> {
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no memlock in {path}"))
}

/// One layout filled with `n` entries (keys from `key(i)`): its memory and the time of a
/// batched walk of it.
fn layout<K: aya::Pod + Default, V: aya::Pod + Default>(
    n: u32,
    prealloc: bool,
    key: impl Fn(u32) -> K,
    value: V,
) -> anyhow::Result<Value> {
    let fd = hash_map::<K, V>(prealloc)?;
    let empty = memlock(&fd)?;
    const CHUNK: u32 = 16384;
    let mut i = 0;
    let t0 = Instant::now();
    while i < n {
        let m = CHUNK.min(n - i);
        let keys: Vec<K> = (i..i + m).map(&key).collect();
        let values = vec![value; m as usize];
        update_batch(&fd, &keys, &values)?;
        i += m;
    }
    let fill = t0.elapsed();
    let filled = memlock(&fd)?;
    let mut walks = Vec::new();
    let mut seen = 0u64;
    for _ in 0..3 {
        seen = 0;
        let t0 = Instant::now();
        batch::walk(fd.as_fd(), |_: &K, _: &V| seen += 1).context("walking a BPF hash map")?;
        walks.push(t0.elapsed().as_secs_f64());
    }
    if seen != u64::from(n) {
        bail!("a walk of {n} entries found {seen}");
    }
    Ok(json!({
        "key_bytes": std::mem::size_of::<K>(),
        "value_bytes": std::mem::size_of::<V>(),
        "preallocated": prealloc,
        "max_entries": MAX_PENDING,
        "memlock_empty_bytes": empty,
        "memlock_bytes": filled,
        "fill_s": round(fill.as_secs_f64(), 3),
        "walk_s": round(median(&walks), 5),
    }))
}

/// The old layout (`FlowKey` → `PendingSyn`, not preallocated, as netrace kept before issue
/// 16) against the new one (`V4Key` → `PendingSlot`, preallocated), `n` IPv4 entries each.
fn layouts(n: u32) -> anyhow::Result<Value> {
    let v4 = |i: u32| {
        let (addr, port) = frames::flow(i);
        V4Key {
            src_addr: addr,
            dst_addr: frames::SERVER4,
            src_port: port,
            dst_port: frames::SERVER_PORT,
        }
    };
    let old = layout(
        n,
        false,
        |i| FlowKey::from(v4(i)),
        PendingSyn::first(1, frames::ISN, 1),
    )?;
    let new = layout(n, true, v4, PendingSyn::first(1, frames::ISN, 1).to_slot())?;
    Ok(json!({"old": old, "new": new}))
}
