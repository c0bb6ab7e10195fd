//! netrace's own kernel object, loaded the way `netrace watch` loads it, with its programs
//! run through `BPF_PROG_TEST_RUN`; and the memory the maps and this process use.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context as _};
use aya::{programs::SchedClassifier, TestRun as _, TestRunOptions, TestRunResult};
use netrace::{
    kernel::attach::Attachments,
    kernel::events::Event,
    kernel::loader::{self, Maps, NOOP_PROGRAM},
};
use netrace_common::{Counter, EventKind, KernelFilter};

pub use netrace::kernel::loader::{EGRESS_PROGRAM as EGRESS, INGRESS_PROGRAM as INGRESS};
pub const NOOP: &str = NOOP_PROGRAM;

/// TC_ACT_UNSPEC (-1) as the kernel reports a program's return value.
const TC_ACT_UNSPEC: u32 = u32::MAX;

pub struct Kernel {
    pub att: Attachments,
    pub maps: Maps,
    /// What the kernel sends one by one (the filter's `send`).
    pub send: u32,
}

impl Kernel {
    /// `loader::load` with these sizes and the default filter (`send` = 0: the kernel keeps
    /// answered attempts in its books and sends no SYN events, `netrace watch`'s default
    /// mode); the empty classifier is loaded from the same object before the object goes to
    /// [`Attachments`], which loads egress and ingress.
    pub fn load(max_pending: u32, ringbuf_bytes: u32) -> anyhow::Result<Self> {
        Self::load_with(max_pending, ringbuf_bytes, KernelFilter::default())
    }

    /// As [`Kernel::load`], with `filter` (its `send` flags choose the per-connection events).
    pub fn load_with(
        max_pending: u32,
        ringbuf_bytes: u32,
        filter: KernelFilter,
    ) -> anyhow::Result<Self> {
        let (mut ebpf, maps) = loader::load(max_pending, ringbuf_bytes, filter)?;
        let noop: &mut SchedClassifier = ebpf
            .program_mut(NOOP)
            .ok_or_else(|| anyhow!("the kernel object has no program {NOOP}"))?
            .try_into()?;
        noop.load()
            .with_context(|| format!("the kernel refused program {NOOP}"))?;
        let att = Attachments::new(ebpf)?;
        Ok(Self {
            att,
            maps,
            send: filter.send,
        })
    }

    /// Runs `prog` on `frame` `repeat` times in the kernel.
    pub fn run(&mut self, prog: &str, frame: &[u8], repeat: u32) -> anyhow::Result<TestRunResult> {
        test_run(&mut self.att, prog, frame, repeat)
    }

    /// Sets what the kernel sends one by one ([`netrace_common::SEND_SYNS`],
    /// [`netrace_common::SEND_ANSWERS`]; 0: books only), as the filter map `watch` sets.
    pub fn set_send(&mut self, send: u32) -> anyhow::Result<()> {
        let filter = KernelFilter {
            send,
            ..KernelFilter::default()
        };
        self.maps
            .filter
            .set(0, filter, 0)
            .context("setting the kernel filter")?;
        self.send = send;
        Ok(())
    }

    /// A kernel counter, summed over CPUs.
    pub fn counter(&self, c: Counter) -> u64 {
        Maps::counters_view(&self.maps.counters, &self.maps.syn_ports).counter(c)
    }

    /// Empties the ring buffer and the per-CPU logs (as `netrace watch` does every 50 ms
    /// while busy); returns how many records the ring held.
    pub fn drain(&mut self) -> u64 {
        self.maps.logs.drain(|_| ());
        let mut n = 0;
        while let Some(item) = self.maps.events.next() {
            drop(item);
            n += 1;
        }
        n
    }

    /// Empties the ring buffer into `kinds`, counting records by kind.
    pub fn drain_kinds(&mut self, kinds: &mut Kinds) {
        while let Some(item) = self.maps.events.next() {
            kinds.add(&item);
        }
    }
}

/// Ring-buffer records by kind.
#[derive(Clone, Copy, Debug, Default)]
pub struct Kinds {
    pub syn: u64,
    pub answered: u64,
    pub unmatched: u64,
    pub other: u64,
    pub undecodable: u64,
}

impl Kinds {
    pub fn add(&mut self, record: &[u8]) {
        match Event::try_from(record).map(|e| e.kind) {
            Ok(EventKind::Syn) => self.syn += 1,
            Ok(EventKind::Answered) => self.answered += 1,
            Ok(EventKind::UnmatchedSynAck) => self.unmatched += 1,
            Ok(_) => self.other += 1,
            Err(_) => self.undecodable += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.syn + self.answered + self.unmatched + self.other + self.undecodable
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
/// with the kernel's own figure for its memory (`memlock:` in fdinfo) and its name.
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
        let num_hex = |k: &str| {
            f.get(k)
                .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
                .unwrap_or(0)
        };
        let max_entries = num("max_entries");
        // The kernel's name for the map (its first 15 bytes), else its type.
        let name = id
            .parse::<u32>()
            .ok()
            .and_then(|id| aya::maps::MapInfo::from_id(id).ok())
            .and_then(|i| i.name_as_str().map(str::to_string))
            .filter(|n| !n.is_empty());
        let kind = match *ty {
            "1" if num_hex("map_flags") & 1 == 0 => "hash, preallocated",
            "1" => "hash",
            "2" => "array",
            "6" => "per-CPU array",
            "27" => "ring buffer",
            _ => "other",
        };
        let name = format!("{} ({kind})", name.as_deref().unwrap_or("?"));
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

/// This process's resident set size in bytes (`VmRSS` in /proc/self/status), without the BPF
/// maps it has mapped (see [`mapped_bpf_bytes`]).
pub fn rss_bytes() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let rss = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(kib)
        .ok_or_else(|| anyhow!("no VmRSS in /proc/self/status"))?;
    Ok(rss.saturating_sub(mapped_bpf_bytes()?))
}

/// A `/proc` size field ("  123 kB") in bytes.
fn kib(v: &str) -> Option<u64> {
    v.trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()
        .map(|k| k * 1024)
}

/// The resident bytes of BPF maps mapped into this process (the IPv4 pending table): the
/// maps' own figure counts them already, so the process's RSS is taken without them.
fn mapped_bpf_bytes() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/self/smaps").context("reading /proc/self/smaps")?;
    let mut in_map = false;
    let mut total = 0;
    for line in text.lines() {
        // A mapping's header: "start-end perms offset dev inode [path]".
        if line
            .split_whitespace()
            .next()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            in_map = line.ends_with("anon_inode:bpf-map");
        } else if in_map {
            if let Some(v) = line.strip_prefix("Rss:") {
                total += kib(v).unwrap_or(0);
            }
        }
    }
    Ok(total)
}
