//! Loads the embedded kernel object, sizes its maps, sets the filter, and hands out the maps.

use std::{
    mem::size_of,
    os::fd::{AsFd as _, BorrowedFd},
};

use anyhow::{anyhow, Context as _};
use aya::{
    maps::IterableMap as _,
    programs::{Iter, SchedClassifier},
};
use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf},
    Ebpf, EbpfLoader,
};
use netrace_common::{
    log::PORT_LANES, AnswerBook, BookKey, Counter, ExpireCutoffs, ExpireSummary, Expired, FlowKey,
    KernelFilter, PendingSlot, PendingSyn, SkbOffsets, TpOffsets, V6Key, XmitIface, COUNTER_SLOTS,
    FAMILY_V4, RTT_SLOTS,
};

use super::{batch, logs::Logs, table::TableV4};
use crate::track::tracker::{NotDue, PendingMap, PutBack, ScanPos};

/// The kernel programs, compiled from `netrace-ebpf` by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netrace"));

pub const EGRESS_PROGRAM: &str = "netrace_egress";
pub const INGRESS_PROGRAM: &str = "netrace_ingress";
/// Egress and ingress of interfaces without a link-layer header (WireGuard, tun, ipip, ppp).
pub const EGRESS_L3_PROGRAM: &str = "netrace_egress_l3";
pub const INGRESS_L3_PROGRAM: &str = "netrace_ingress_l3";
/// Pod-side ingress: SYNs in the pods' own address space, for NAT correlation.
pub const POD_INGRESS_PROGRAM: &str = "netrace_pod_ingress";
/// The sock:inet_sock_set_state tracepoint program, for process attribution.
pub const SOCK_STATE_PROGRAM: &str = "netrace_sock_state";
/// The device hook: the `net_dev_start_xmit` raw tracepoint (outbound SYNs after every tc
/// program, so after any BPF SNAT).
pub const XMIT_PROGRAM: &str = "netrace_xmit";
/// The raw tracepoint the device hook attaches to.
pub const XMIT_TRACEPOINT: &str = "net_dev_start_xmit";
/// The sweep's iterator over the IPv6 pending map.
pub const EXPIRE_V6_PROGRAM: &str = "netrace_expire_v6";
/// The IPv4 table's control program (user space's take and put-back).
pub const TABLE_CTL_PROGRAM: &str = "netrace_table_ctl";
/// An empty classifier in the same object, the baseline for benchmarks.
pub const NOOP_PROGRAM: &str = "netrace_noop";

/// The kernel side's maps, taken out of the object so the programs and maps have separate
/// owners.
pub struct Maps {
    pub events: RingBuf<MapData>,
    pub pending: Pending,
    pub books: Books,
    pub counters: PerCpuArray<MapData, u64>,
    pub syn_ports: Array<MapData, u64>,
    /// The per-CPU answer and port logs.
    pub logs: Logs,
    /// Held only so the map outlives the programs that read it.
    pub filter: Array<MapData, KernelFilter>,
    /// Tracepoint field offsets, set before the tracepoint is attached.
    pub tp_offsets: Array<MapData, TpOffsets>,
    /// The kernel programs' debug messages, when asked for (`-vv`).
    pub kernel_log: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// `sk_buff` / `net_device` offsets for the device hook, set before it is attached.
    pub skb_offsets: Array<MapData, SkbOffsets>,
    /// The devices the device hook watches, by interface index.
    pub xmit_ifaces: HashMap<MapData, u32, XmitIface>,
}

/// The pending maps, IPv4 and IPv6, as one.
pub struct Pending {
    pub v4: TableV4,
    pub v6: HashMap<MapData, V6Key, PendingSlot>,
    /// Errors of the last operations (reported once by the caller, never fatal: a failed
    /// walk only delays decisions to the next one).
    pub errors: u64,
    /// The next bucket of the IPv4 table in a walk.
    walk_v4: usize,
    walk_v6: batch::Walk<V6Key, PendingSlot>,
    /// The kernel's finder of due IPv6 entries; `None` where iterators cannot load (the
    /// sweep walks the whole map instead).
    pub expiry: Option<Expiry>,
}

/// Buckets of the IPv4 table per step of a walk (about 1 MiB of table).
const WALK_BUCKETS: usize = 4096;

/// The sweep's iterator (`netrace_expire_v6`), linked to the IPv6 pending map, and the
/// cutoffs it reads.
pub struct Expiry {
    link: std::os::fd::OwnedFd,
    cutoffs: Array<MapData, ExpireCutoffs>,
    buf: Vec<u8>,
}

impl Expiry {
    /// Loads the iterator and links it to the map. Needs the kernel's BTF.
    fn new(ebpf: &mut Ebpf, v6: BorrowedFd<'_>) -> anyhow::Result<Self> {
        let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
        let name = EXPIRE_V6_PROGRAM;
        let prog: &mut Iter = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("the kernel object has no program {name}"))?
            .try_into()?;
        prog.load("bpf_map_elem", &btf)
            .with_context(|| format!("the kernel refused program {name}"))?;
        let fd = prog.fd()?;
        let link =
            batch::link_map_iter(fd.as_fd(), v6).with_context(|| format!("linking {name}"))?;
        let cutoffs = Array::try_from(
            ebpf.take_map("EXPIRE_CUTOFFS")
                .ok_or_else(|| anyhow!("the kernel object has no map EXPIRE_CUTOFFS"))?,
        )?;
        Ok(Self {
            link,
            cutoffs,
            buf: Vec::new(),
        })
    }

    /// Runs the iterator: the due entries appended to `out`, and the number of entries
    /// waiting and lost.
    fn due(
        &mut self,
        cut: ExpireCutoffs,
        out: &mut Vec<(FlowKey, PendingSyn)>,
    ) -> anyhow::Result<(u64, u64)> {
        self.cutoffs.set(0, cut, 0)?;
        batch::run_iter(self.link.as_fd(), &mut self.buf)?;
        let summary = decode_due::<V6Key>(&self.buf, out)?;
        Ok((summary.waiting, summary.lost))
    }
}

/// An iterator's output over the map keyed by `K`: [`Expired`] records, then one
/// [`ExpireSummary`].
fn decode_due<K: Copy>(
    buf: &[u8],
    out: &mut Vec<(FlowKey, PendingSyn)>,
) -> anyhow::Result<ExpireSummary>
where
    FlowKey: From<K>,
{
    let tail = size_of::<ExpireSummary>();
    let size = size_of::<Expired<K>>();
    let body = buf
        .len()
        .checked_sub(tail)
        .filter(|n| n % size == 0)
        .ok_or_else(|| anyhow!("the sweep's iterator wrote {} bytes", buf.len()))?;
    out.reserve(body / size);
    for rec in buf[..body].chunks_exact(size) {
        // SAFETY: `rec` holds exactly size_of::<Expired<K>>() bytes written by the iterator
        // from such a value, a plain #[repr(C)] type of integers and byte arrays; read
        // unaligned.
        let r: Expired<K> = unsafe { std::ptr::read_unaligned(rec.as_ptr().cast::<Expired<K>>()) };
        out.push((FlowKey::from(r.key), r.slot.to_pending()));
    }
    // SAFETY: the last `tail` bytes are an ExpireSummary, as above.
    let s: ExpireSummary =
        unsafe { std::ptr::read_unaligned(buf[body..].as_ptr().cast::<ExpireSummary>()) };
    if s.magic != ExpireSummary::MAGIC {
        anyhow::bail!("the sweep's iterator output does not end with its summary");
    }
    Ok(s)
}

impl Pending {
    /// Every entry, into `out` (cleared first).
    pub fn walk_into(&mut self, out: &mut Vec<(FlowKey, PendingSyn)>) {
        out.clear();
        self.v4.for_each(0..self.v4.buckets(), |k, v| {
            out.push((FlowKey::from(*k), v.to_pending()));
        });
        let v6 = batch::walk(self.v6.map().fd().as_fd(), |k: &V6Key, v: &PendingSlot| {
            out.push((FlowKey::from(*k), v.to_pending()));
        });
        self.failed("walking the pending map", v6);
    }

    /// `r`'s value; an error is counted and logged (never fatal: see `errors`).
    fn failed<T>(&mut self, what: &str, r: std::io::Result<T>) -> Option<T> {
        r.map_err(|e| {
            self.errors += 1;
            log::debug!("{what}: {e}");
        })
        .ok()
    }
}

impl PendingMap for Pending {
    fn due(
        &mut self,
        cut: ExpireCutoffs,
        out: &mut Vec<(FlowKey, PendingSyn)>,
    ) -> Option<(u64, u64)> {
        let expiry = self.expiry.as_mut()?;
        out.clear();
        // IPv4: read where it lies, front to back.
        let mut rest = NotDue::default();
        self.v4.for_each(0..self.v4.buckets(), |k, v| {
            if rest.is_due(&cut, v.state, v.first_ns) {
                out.push((FlowKey::from(*k), v.to_pending()));
            }
        });
        match expiry.due(cut, out) {
            Ok((w, l)) => Some((rest.waiting + w, rest.lost + l)),
            Err(e) => {
                // Walk the whole map from now on.
                log::debug!("the sweep's iterator failed, walking the map instead: {e:#}");
                self.errors += 1;
                self.expiry = None;
                None
            }
        }
    }

    fn scan_next(&mut self, pos: &mut ScanPos, out: &mut Vec<(FlowKey, PendingSyn)>) {
        out.clear();
        if pos.start() {
            self.walk_v4 = 0;
            self.walk_v6.restart();
        }
        if self.walk_v4 < self.v4.buckets() {
            let end = self.walk_v4.saturating_add(WALK_BUCKETS);
            self.v4.for_each(self.walk_v4..end, |k, v| {
                out.push((FlowKey::from(*k), v.to_pending()));
            });
            self.walk_v4 = end.min(self.v4.buckets());
            return;
        }
        let r = self
            .walk_v6
            .next_batch(self.v6.map().fd().as_fd())
            .map(|(keys, values)| {
                out.extend(
                    keys.iter()
                        .zip(values)
                        .map(|(k, v)| (FlowKey::from(*k), v.to_pending())),
                );
            });
        self.failed("walking the pending map", r);
        if self.walk_v6.done() {
            pos.finish();
        }
    }

    fn take(&mut self, key: &FlowKey) -> Option<PendingSyn> {
        let r = if key.family == FAMILY_V4 {
            self.v4.take(&key.v4())
        } else {
            batch::take::<_, PendingSlot>(self.v6.map().fd().as_fd(), &key.v6())
        };
        self.failed("taking a pending entry", r)?
            .map(|s| s.to_pending())
    }

    fn put_back(&mut self, key: &FlowKey, value: &PendingSyn) -> PutBack {
        // Unless the key has an entry again: a SYN that made a new entry meanwhile wins.
        let slot = value.to_slot();
        if key.family == FAMILY_V4 {
            let r = self.v4.put_back(&key.v4(), &slot);
            return self
                .failed("putting a pending entry back", r)
                .unwrap_or(PutBack::Refused);
        }
        match self.v6.insert(key.v6(), slot, BPF_NOEXIST) {
            Ok(()) => PutBack::Done,
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                PutBack::Taken
            }
            Err(e) => {
                // E2BIG: the map is full.
                self.errors += 1;
                log::debug!("putting a pending entry back: {e}");
                PutBack::Refused
            }
        }
    }
}

/// The kernel's answer books and round-trip histogram: answered attempts counted without an
/// event each.
pub struct Books {
    pub books: HashMap<MapData, BookKey, AnswerBook>,
    pub rtt: PerCpuArray<MapData, u64>,
    /// Kept between reads: its buffers are made (and zeroed) once.
    walk: batch::Walk<BookKey, AnswerBook>,
}

/// Books per batch when reading them (1 KiB each).
const BOOKS_CHUNK: usize = 64;

impl Books {
    /// Every book, into `out` (cleared first).
    pub fn walk_into(&mut self, out: &mut Vec<(BookKey, AnswerBook)>) -> std::io::Result<()> {
        out.clear();
        self.walk.restart();
        while !self.walk.done() {
            let (keys, values) = self.walk.next_batch(self.books.map().fd().as_fd())?;
            out.extend(keys.iter().copied().zip(values.iter().copied()));
        }
        Ok(())
    }

    /// The round-trip histogram's slots (cumulative).
    pub fn rtt(&self) -> Vec<u64> {
        (0..RTT_SLOTS)
            .map(|i| {
                self.rtt
                    .get(&i, 0)
                    .map_or(0, |per_cpu| per_cpu.iter().sum::<u64>())
            })
            .collect()
    }
}

/// `BPF_NOEXIST`: insert only if the key has no entry.
const BPF_NOEXIST: u64 = 1;

/// Capacity of the IPv6 pending map for a given `--max-pending`: a quarter (most nodes connect
/// out over IPv4; the IPv6 map is not preallocated, so only its buckets cost memory until
/// used), at least 1024.
pub fn max_pending_v6(max_pending: u32) -> u32 {
    (max_pending / 4).max(1024)
}

/// Whether this CPU's stores are seen in program order (x86-64), so that a plain store
/// releases a table lock (see `TABLE_V4_TSO` in the kernel crate's table module). The kernel
/// programs run on the CPU this binary was built for.
const TABLE_V4_TSO: u32 = if cfg!(target_arch = "x86_64") { 1 } else { 0 };

/// Loads the object with the configured map sizes.
pub fn load(
    max_pending: u32,
    ringbuf_bytes: u32,
    filter: KernelFilter,
) -> anyhow::Result<(Ebpf, Maps)> {
    // The kernel programs' debug messages (aya-log) only when asked for (-vv): level 0 turns
    // every call site into one global read.
    let kernel_log: u8 = if log::log_enabled!(target: "netrace", log::Level::Debug) {
        aya_log::Level::Debug as u8
    } else {
        0
    };
    let regions = netrace_common::table::Regions::for_max_pending(max_pending);
    let (mask, near_mask, buckets) = (regions.far - 1, regions.near - 1, regions.buckets());
    // A seed per run: which 4-tuples share a bucket is not predictable from outside.
    let seed =
        std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8)
            as u32;
    // The logs have a part per possible CPU (the CPU numbers the programs see).
    let cpus = aya::util::nr_cpus()
        .map_err(|(_, e)| e)
        .context("reading the possible CPUs")?;
    let cpus_u32 = u32::try_from(cpus).context("too many CPUs")?;
    let log_slots = netrace_common::log::log_slots(cpus_u32);
    let log_records = cpus_u32
        .checked_mul(log_slots)
        .context("too many CPUs for the logs")?;
    let mut ebpf = EbpfLoader::new()
        .override_global(aya_log::LEVEL, &kernel_log, true)
        .override_global("TABLE_V4_MASK", &mask, true)
        .override_global("TABLE_V4_NEAR_MASK", &near_mask, true)
        .override_global("TABLE_V4_SEED", &seed, true)
        .override_global("TABLE_V4_TSO", &TABLE_V4_TSO, true)
        .override_global("LOG_SLOTS", &log_slots, true)
        .map_max_entries("TABLE_V4", buckets)
        .map_max_entries("SLOTS_V4", buckets)
        .map_max_entries("PENDING_V6", max_pending_v6(max_pending))
        .map_max_entries("EVENTS", ringbuf_bytes)
        .map_max_entries("ANSWER_LOG", log_records)
        .map_max_entries("PORT_LOG", log_records / PORT_LANES as u32)
        .map_max_entries("LOG_HEADS", cpus_u32)
        .map_max_entries("LOG_TAILS", cpus_u32)
        .load(EBPF_OBJECT)
        .context("loading netrace's kernel programs")?;
    let ctl = {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(TABLE_CTL_PROGRAM)
            .ok_or_else(|| anyhow!("the kernel object has no program {TABLE_CTL_PROGRAM}"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("the kernel refused program {TABLE_CTL_PROGRAM}"))?;
        prog.fd()?.try_clone()?
    };
    let mut take = |name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| anyhow!("the kernel object has no map {name}"))
    };
    let events = RingBuf::try_from(take("EVENTS")?)?;
    let mut array = |name: &str| match take(name)? {
        aya::maps::Map::Array(m) => Ok(m),
        _ => Err(anyhow!("the kernel object's {name} is not an array")),
    };
    let (heads, slots) = (array("TABLE_V4")?, array("SLOTS_V4")?);
    let logs = Logs::new(
        array("ANSWER_LOG")?,
        array("PORT_LOG")?,
        array("LOG_HEADS")?,
        array("LOG_TAILS")?,
        cpus,
        log_slots as usize,
    )
    .context("mapping the per-CPU logs")?;
    let mut pending = Pending {
        v4: TableV4::new(heads, slots, ctl, buckets).context("mapping the IPv4 pending table")?,
        v6: HashMap::try_from(take("PENDING_V6")?)?,
        errors: 0,
        walk_v4: 0,
        walk_v6: batch::Walk::default(),
        expiry: None,
    };

    let books = Books {
        books: HashMap::try_from(take("BOOKS")?)?,
        rtt: PerCpuArray::try_from(take("RTT")?)?,
        walk: batch::Walk::with_chunk(BOOKS_CHUNK),
    };
    let counters = PerCpuArray::try_from(take("COUNTERS")?)?;
    let syn_ports = Array::try_from(take("SYN_PORTS")?)?;
    let mut filter_map: Array<MapData, KernelFilter> = Array::try_from(take("FILTER")?)?;
    filter_map
        .set(0, filter, 0)
        .context("setting the destination filter")?;
    let tp_offsets = Array::try_from(take("TP_OFFSETS")?)?;
    let skb_offsets = Array::try_from(take("SKB_OFFSETS")?)?;
    let xmit_ifaces = HashMap::try_from(take("XMIT_IFACES")?)?;
    match Expiry::new(&mut ebpf, pending.v6.map().fd().as_fd()) {
        Ok(e) => pending.expiry = Some(e),
        Err(e) => log::debug!("the sweep walks the whole pending map: {e:#}"),
    }
    let kernel_log = if kernel_log == 0 {
        None
    } else {
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::warn!("the kernel programs' debug messages are off: {e}");
                None
            }
        }
    };
    Ok((
        ebpf,
        Maps {
            events,
            pending,
            books,
            counters,
            syn_ports,
            logs,
            filter: filter_map,
            tp_offsets,
            kernel_log,
            skb_offsets,
            xmit_ifaces,
        },
    ))
}

/// Every counter the kernel keeps, summed over CPUs, by name.
pub const COUNTERS: [(Counter, &str); 22] = [
    (Counter::SynSeen, "syn_seen"),
    (Counter::SynRetransmit, "syn_retransmit"),
    (Counter::PendingMapFull, "pending_map_full"),
    (Counter::RingbufFull, "ringbuf_full"),
    (Counter::SynAckMatched, "synack_matched"),
    (Counter::SynAckMismatch, "synack_mismatch"),
    (Counter::RstMatched, "rst_matched"),
    (Counter::IcmpMatched, "icmp_matched"),
    (Counter::Truncated, "truncated"),
    (Counter::Malformed, "malformed"),
    (Counter::Fragment, "fragment"),
    (Counter::Ipv6ChainTooLong, "ipv6_chain_too_long"),
    (Counter::Filtered, "filtered"),
    (Counter::PodSynSeen, "pod_syn_seen"),
    (Counter::SockEvents, "sock_events"),
    (Counter::SynAckUnmatched, "synack_unmatched"),
    (Counter::AnsweredBooked, "answered_booked"),
    (Counter::BooksFull, "books_full"),
    (Counter::SynAckRepeated, "synack_repeated"),
    (Counter::TableBusy, "table_busy"),
    (Counter::AnsweredLogged, "answered_logged"),
    (Counter::AnswerBusy, "answer_busy"),
];

/// Read-only access to the counters and the per-port SYN tally.
pub struct CountersView<'a> {
    counters: &'a PerCpuArray<MapData, u64>,
    syn_ports: &'a Array<MapData, u64>,
}

impl Maps {
    pub fn counters_view<'a>(
        counters: &'a PerCpuArray<MapData, u64>,
        syn_ports: &'a Array<MapData, u64>,
    ) -> CountersView<'a> {
        CountersView {
            counters,
            syn_ports,
        }
    }
}

impl CountersView<'_> {
    pub fn counter(&self, c: Counter) -> u64 {
        self.try_counter(c).unwrap_or(0)
    }

    /// Every counter at once (by `Counter as usize`), or `None` when they could not be read.
    pub fn all(&self) -> Option<Vec<u64>> {
        let cpus = aya::util::nr_cpus().ok()?;
        let fd = aya::maps::IterableMap::map(self.counters).fd().as_fd();
        batch::per_cpu_sums(fd, COUNTER_SLOTS as usize, cpus)
            .map_err(|e| log::debug!("reading the counters: {e}"))
            .ok()
    }

    /// The counter, or `None` when it could not be read.
    pub fn try_counter(&self, c: Counter) -> Option<u64> {
        self.counters
            .get(&(c as u32), 0)
            .ok()
            .map(|v| v.iter().sum())
    }

    /// SYN packets per source port, only the ports that saw any: the kernel's shared tally
    /// plus `logged`, those read from the port logs (indexed by port).
    pub fn syn_ports(&self, logged: &[u64]) -> Vec<(u16, u64)> {
        self.syn_ports
            .iter()
            .enumerate()
            .filter_map(|(port, v)| {
                let n = v.unwrap_or(0) + logged.get(port).copied().unwrap_or(0);
                let port = u16::try_from(port).ok()?;
                (n > 0).then_some((port, n))
            })
            .collect()
    }
}
