//! Loads the embedded kernel object, sizes its maps, sets the filter, and hands out the maps.

use anyhow::{anyhow, Context as _};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    Ebpf, EbpfLoader,
};
use netrace_common::{
    Counter, FlowKey, KernelFilter, PendingSyn, SkbOffsets, TpOffsets, XmitIface,
};

use crate::track::tracker::PendingMap;

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
/// An empty classifier in the same object, the baseline for benchmarks.
pub const NOOP_PROGRAM: &str = "netrace_noop";

/// The kernel side's maps, taken out of the object so the programs and maps have separate
/// owners.
pub struct Maps {
    pub events: RingBuf<MapData>,
    pub pending: Pending,
    pub counters: PerCpuArray<MapData, u64>,
    pub syn_ports: Array<MapData, u64>,
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

pub struct Pending(pub HashMap<MapData, FlowKey, PendingSyn>);

impl PendingMap for Pending {
    fn get(&self, key: &FlowKey) -> Option<PendingSyn> {
        self.0.get(key, 0).ok()
    }

    fn remove(&mut self, key: &FlowKey) {
        // Already gone (answered meanwhile) is fine.
        let _ = self.0.remove(key);
    }

    fn scan(&self) -> Vec<(FlowKey, PendingSyn)> {
        self.0.iter().filter_map(Result::ok).collect()
    }
}

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
    let mut ebpf = EbpfLoader::new()
        .override_global(aya_log::LEVEL, &kernel_log, true)
        .map_max_entries("PENDING", max_pending)
        .map_max_entries("EVENTS", ringbuf_bytes)
        .load(EBPF_OBJECT)
        .context("loading netrace's kernel programs")?;
    let mut take = |name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| anyhow!("the kernel object has no map {name}"))
    };
    let events = RingBuf::try_from(take("EVENTS")?)?;
    let pending = HashMap::try_from(take("PENDING")?)?;
    let counters = PerCpuArray::try_from(take("COUNTERS")?)?;
    let syn_ports = Array::try_from(take("SYN_PORTS")?)?;
    let mut filter_map: Array<MapData, KernelFilter> = Array::try_from(take("FILTER")?)?;
    filter_map
        .set(0, filter, 0)
        .context("setting the destination filter")?;
    let tp_offsets = Array::try_from(take("TP_OFFSETS")?)?;
    let skb_offsets = Array::try_from(take("SKB_OFFSETS")?)?;
    let xmit_ifaces = HashMap::try_from(take("XMIT_IFACES")?)?;
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
            pending: Pending(pending),
            counters,
            syn_ports,
            filter: filter_map,
            tp_offsets,
            kernel_log,
            skb_offsets,
            xmit_ifaces,
        },
    ))
}

/// Every counter the kernel keeps, summed over CPUs, by name.
pub const COUNTERS: [(Counter, &str); 16] = [
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
        self.counters
            .get(&(c as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// SYN packets per source port, only the ports that saw any.
    pub fn syn_ports(&self) -> Vec<(u16, u64)> {
        self.syn_ports
            .iter()
            .enumerate()
            .filter_map(|(port, v)| match v {
                Ok(n) if n > 0 => u16::try_from(port).ok().map(|p| (p, n)),
                _ => None,
            })
            .collect()
    }
}
