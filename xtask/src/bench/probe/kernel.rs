//! netrace's own kernel object, loaded the way `netrace watch` loads it, with its programs
//! run through `BPF_PROG_TEST_RUN`; and the memory the maps and this process use.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context as _};
use aya::{programs::SchedClassifier, TestRun as _, TestRunOptions, TestRunResult};
use netrace::{
    kernel::attach::Attachments,
    kernel::events::Event,
    kernel::loader::{self, Maps, NOOP_PROGRAM},
    track::tracker::{Outcome, Tracker},
};
use netrace_common::{Counter, KernelFilter};

pub use netrace::kernel::loader::{EGRESS_PROGRAM as EGRESS, INGRESS_PROGRAM as INGRESS};
pub const NOOP: &str = NOOP_PROGRAM;

/// TC_ACT_UNSPEC (-1) as the kernel reports a program's return value.
const TC_ACT_UNSPEC: u32 = u32::MAX;

pub struct Kernel {
    pub att: Attachments,
    pub maps: Maps,
}

impl Kernel {
    /// `loader::load` with these sizes and no filter; the empty classifier is loaded from the
    /// same object before the object goes to [`Attachments`], which loads egress and ingress.
    pub fn load(max_pending: u32, ringbuf_bytes: u32) -> anyhow::Result<Self> {
        let (mut ebpf, maps) = loader::load(max_pending, ringbuf_bytes, KernelFilter::default())?;
        let noop: &mut SchedClassifier = ebpf
            .program_mut(NOOP)
            .ok_or_else(|| anyhow!("the kernel object has no program {NOOP}"))?
            .try_into()?;
        noop.load()
            .with_context(|| format!("the kernel refused program {NOOP}"))?;
        let att = Attachments::new(ebpf)?;
        Ok(Self { att, maps })
    }

    /// Runs `prog` on `frame` `repeat` times in the kernel.
    pub fn run(&mut self, prog: &str, frame: &[u8], repeat: u32) -> anyhow::Result<TestRunResult> {
        test_run(&mut self.att, prog, frame, repeat)
    }

    /// A kernel counter, summed over CPUs.
    pub fn counter(&self, c: Counter) -> u64 {
        Maps::counters_view(&self.maps.counters, &self.maps.syn_ports).counter(c)
    }

    /// Empties the ring buffer; returns how many records it held.
    pub fn drain(&mut self) -> u64 {
        let mut n = 0;
        while let Some(item) = self.maps.events.next() {
            drop(item);
            n += 1;
        }
        n
    }

    /// Empties the ring buffer into `tracker`, as `netrace watch` does; returns the records.
    pub fn drain_into(
        &mut self,
        tracker: &mut Tracker,
        outcomes: &mut Vec<Outcome>,
    ) -> anyhow::Result<u64> {
        let mut n = 0;
        while let Some(item) = self.maps.events.next() {
            let ev = Event::try_from(&*item).map_err(|e| anyhow!("undecodable event: {e}"))?;
            tracker.on_event(&ev, outcomes);
            n += 1;
        }
        Ok(n)
    }
}

/// Runs `prog` on `frame` `repeat` times in the kernel; it must leave the packet alone.
pub fn test_run(
    att: &mut Attachments,
    prog: &str,
    frame: &[u8],
    repeat: u32,
) -> anyhow::Result<TestRunResult> {
    let opts = TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::new()
    };
    let r = att
        .program(prog)?
        .test_run(opts)
        .map_err(|e| anyhow!("BPF_PROG_TEST_RUN of {prog}: {e}"))?;
    if r.return_value != TC_ACT_UNSPEC {
        anyhow::bail!(
            "{prog} returned {} instead of TC_ACT_UNSPEC",
            r.return_value as i32
        );
    }
    Ok(r)
}

/// One map of this process, from `/proc/self/fdinfo`.
#[derive(Clone, Debug)]
pub struct MapMem {
    pub name: String,
    pub max_entries: u64,
    pub memlock: u64,
}

fn fdinfo_fields(text: &str) -> BTreeMap<&str, &str> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect()
}

/// Every BPF map this process holds (by map id, so a map with two descriptors counts once),
/// with the kernel's own figure for its memory (`memlock:` in fdinfo). netrace's maps are told
/// apart by type and size.
pub fn maps_memory() -> anyhow::Result<Vec<MapMem>> {
    let mut by_id = BTreeMap::new();
    let dir = std::fs::read_dir("/proc/self/fdinfo").context("reading /proc/self/fdinfo")?;
    for entry in dir.flatten() {
        // Descriptors come and go (the read_dir's own among them): skip what vanished.
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let f = fdinfo_fields(&text);
        let (Some(ty), Some(id)) = (f.get("map_type"), f.get("map_id")) else {
            continue;
        };
        let num = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let max_entries = num("max_entries");
        let name = match (*ty, max_entries) {
            ("1", _) => "PENDING (hash)".to_string(),
            ("27", _) => "EVENTS (ring buffer)".to_string(),
            ("6", _) => "COUNTERS (per-CPU array)".to_string(),
            ("2", 65536) => "SYN_PORTS (array)".to_string(),
            ("2", 1) if num("value_size") == 24 => "FILTER (array)".to_string(),
            (t, _) => format!("map type {t}"),
        };
        by_id.insert(
            id.to_string(),
            MapMem {
                name,
                max_entries,
                memlock: num("memlock"),
            },
        );
    }
    Ok(by_id.into_values().collect())
}

/// This process's resident set size in bytes (`VmRSS` in /proc/self/status).
pub fn rss_bytes() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| anyhow!("no VmRSS in /proc/self/status"))
}
