//! Types shared by the kernel programs (`netrace-ebpf`) and user space (`netrace`).
//!
//! Every type here is `#[repr(C)]` with explicit padding so both sides agree on the layout
//! byte for byte. Event kinds and counter ids are numbered once and never reused: an old
//! user space reading a newer kernel object must never misread one kind as another.
#![cfg_attr(not(test), no_std)]

pub mod log;
pub mod pairing;
pub mod parse;
#[cfg(test)]
mod rules_tests;
pub mod table;

/// `AF_INET`, as stored in [`FlowKey::family`].
pub const FAMILY_V4: u8 = 2;
/// `AF_INET6`, as stored in [`FlowKey::family`].
pub const FAMILY_V6: u8 = 10;

/// Default capacity of the pending-SYN map; user space may change it before loading.
pub const DEFAULT_MAX_PENDING: u32 = 1 << 18;
/// Default ring-buffer size in bytes (a power of two, a multiple of the page size).
pub const DEFAULT_RINGBUF_BYTES: u32 = 1 << 22;
/// Upper bound user space accepts for `--max-pending`.
pub const MAX_MAX_PENDING: u32 = 1 << 24;
/// Number of entries in the per-source-port SYN packet counter array.
pub const PORT_SLOTS: u32 = 65536;
/// How many IPv6 extension headers the parser walks before giving up on a packet.
pub const MAX_IPV6_EXT_HEADERS: u32 = 8;

/// One outbound connection attempt, as seen at the interface (post-SNAT on an uplink).
///
/// Addresses are stored in network byte order in the first 4 (IPv4) or 16 (IPv6) bytes; the
/// rest is zero. Ports are in host byte order. `src` is always the local (connecting) side.
// Aligned to 8 (same size and layout): the kernel programs copy and compare keys in 8-byte
// words instead of byte by byte.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub family: u8,
    pub _pad: [u8; 3],
    pub src_port: u16,
    pub dst_port: u16,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
}

/// A SYN that has not been answered yet, the value of the pending map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PendingSyn {
    /// `bpf_ktime_get_ns` of the first SYN (CLOCK_MONOTONIC).
    pub first_ns: u64,
    /// `bpf_ktime_get_ns` of the latest SYN.
    pub last_ns: u64,
    /// Initial sequence number of the SYN; the answer must acknowledge `isn + 1`.
    pub isn: u32,
    /// SYNs sent with this ISN (1 + retransmissions).
    pub syns: u32,
    /// Interface the SYN left through.
    pub ifindex: u32,
    /// Bytes of data the SYN carried (TCP Fast Open): the answer may acknowledge
    /// `isn + 1 + data_len`. Zero for an ordinary SYN.
    pub data_len: u16,
    /// [`STATE_WAITING`] or [`STATE_LOST`].
    pub state: u8,
    pub _pad: u8,
}

/// [`PendingSyn::state`]: no answer yet, not reported.
pub const STATE_WAITING: u8 = 0;
/// [`PendingSyn::state`]: user space reported the attempt lost (it took the entry and put it
/// back in this state), so an answer now is *late* and always sent as an event.
pub const STATE_LOST: u8 = 1;

impl PendingSyn {
    /// The entry for the first SYN of an attempt, seen at `now` on `ifindex`.
    pub const fn first(now: u64, isn: u32, ifindex: u32) -> Self {
        Self {
            first_ns: now,
            last_ns: now,
            isn,
            syns: 1,
            ifindex,
            data_len: 0,
            state: STATE_WAITING,
            _pad: 0,
        }
    }

    /// The compact form the kernel's pending maps store.
    #[inline(always)]
    pub fn to_slot(&self) -> PendingSlot {
        // In units of 1024 ns: a shift, where a division would cost the kernel programs.
        let after = self.last_ns.saturating_sub(self.first_ns) >> LAST_SHIFT;
        PendingSlot {
            first_ns: self.first_ns,
            isn: self.isn,
            ifindex: self.ifindex,
            last_after: if after > u32::MAX as u64 {
                u32::MAX
            } else {
                after as u32
            },
            data_len: self.data_len,
            syns: if self.syns > u8::MAX as u32 {
                u8::MAX
            } else {
                self.syns as u8
            },
            state: self.state,
        }
    }
}

/// [`PendingSlot::last_after`]'s unit: 2^10 ns.
const LAST_SHIFT: u32 = 10;

/// A pending entry as the kernel's maps store it: 24 bytes instead of [`PendingSyn`]'s 32, so
/// that a million pending SYNs fit in about 100 MiB of preallocated map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PendingSlot {
    pub first_ns: u64,
    pub isn: u32,
    pub ifindex: u32,
    /// From the first SYN to the latest, in units of 1024 ns (saturating: 73 minutes).
    pub last_after: u32,
    pub data_len: u16,
    /// SYNs sent with this ISN (saturating at 255).
    pub syns: u8,
    pub state: u8,
}

impl PendingSlot {
    /// The full form, as events and user space carry it.
    #[inline(always)]
    pub fn to_pending(&self) -> PendingSyn {
        PendingSyn {
            first_ns: self.first_ns,
            last_ns: self.first_ns + ((self.last_after as u64) << LAST_SHIFT),
            isn: self.isn,
            syns: self.syns as u32,
            ifindex: self.ifindex,
            data_len: self.data_len,
            state: self.state,
            _pad: 0,
        }
    }
}

/// The key of the IPv4 pending map: 12 bytes instead of [`FlowKey`]'s 40.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct V4Key {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
}

/// The key of the IPv6 pending map.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct V6Key {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
}

impl FlowKey {
    /// The IPv4 map's key, for an IPv4 key.
    #[inline(always)]
    pub fn v4(&self) -> V4Key {
        let (s, d) = (&self.src_addr, &self.dst_addr);
        V4Key {
            src_addr: [s[0], s[1], s[2], s[3]],
            dst_addr: [d[0], d[1], d[2], d[3]],
            src_port: self.src_port,
            dst_port: self.dst_port,
        }
    }

    /// The IPv6 map's key, for an IPv6 key.
    #[inline(always)]
    pub fn v6(&self) -> V6Key {
        V6Key {
            src_addr: self.src_addr,
            dst_addr: self.dst_addr,
            src_port: self.src_port,
            dst_port: self.dst_port,
        }
    }
}

impl From<V4Key> for FlowKey {
    fn from(k: V4Key) -> Self {
        let mut key = FlowKey {
            family: FAMILY_V4,
            src_port: k.src_port,
            dst_port: k.dst_port,
            ..FlowKey::default()
        };
        key.src_addr[..4].copy_from_slice(&k.src_addr);
        key.dst_addr[..4].copy_from_slice(&k.dst_addr);
        key
    }
}

impl From<V6Key> for FlowKey {
    fn from(k: V6Key) -> Self {
        FlowKey {
            family: FAMILY_V6,
            _pad: [0; 3],
            src_port: k.src_port,
            dst_port: k.dst_port,
            src_addr: k.src_addr,
            dst_addr: k.dst_addr,
        }
    }
}

/// What the sweep's iterators report: entries waiting whose first SYN is before
/// `waiting_before_ns` (past the SYN timeout), and lost entries before `lost_before_ns` (past
/// the late window). Written by user space before each pass.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ExpireCutoffs {
    pub waiting_before_ns: u64,
    pub lost_before_ns: u64,
}

impl ExpireCutoffs {
    /// Whether an entry in `state` ([`STATE_WAITING`] or [`STATE_LOST`]) whose first SYN was
    /// at `first_ns` is due; `None` for any other state. The one rule of the kernel's
    /// iterators and of the in-memory map.
    #[inline(always)]
    pub fn due(&self, state: u8, first_ns: u64) -> Option<bool> {
        match state {
            STATE_WAITING => Some(first_ns < self.waiting_before_ns),
            STATE_LOST => Some(first_ns < self.lost_before_ns),
            _ => None,
        }
    }
}

/// An entry due, as the iterator over the pending map keyed by `K` writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Expired<K> {
    pub key: K,
    pub _pad: [u8; 4],
    pub slot: PendingSlot,
}

/// An IPv6 entry due.
pub type ExpiredV6 = Expired<V6Key>;

/// The last record of an iterator pass: how many entries that are not due the map holds,
/// waiting and lost.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ExpireSummary {
    /// [`ExpireSummary::MAGIC`], so that a reader that lost its place notices.
    pub magic: u32,
    pub _pad: u32,
    pub waiting: u64,
    pub lost: u64,
}

impl ExpireSummary {
    pub const MAGIC: u32 = 0x6e72_6578;
}

/// Source ports per answer book: a book counts the answered attempts of one interface and
/// destination for `BOOK_PORTS` consecutive source ports.
pub const BOOK_PORTS: usize = 256;
/// Default capacity of the answer books (each 1 KiB, allocated as used): 4096 books cover 16
/// destinations on every source port, or many more destinations on fewer ports.
pub const DEFAULT_MAX_BOOKS: u32 = 4096;

/// The key of the kernel's answer books.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct BookKey {
    /// Interface the SYN left through.
    pub ifindex: u32,
    pub family: u8,
    pub _pad: u8,
    pub dst_port: u16,
    /// `src_port / BOOK_PORTS`.
    pub port_group: u16,
    pub _pad2: u16,
    pub dst_addr: [u8; 16],
}

impl BookKey {
    /// The book that counts `key`'s answer, for a SYN that left through `ifindex`.
    #[inline(always)]
    pub fn of(key: &FlowKey, ifindex: u32) -> Self {
        Self {
            ifindex,
            family: key.family,
            _pad: 0,
            dst_port: key.dst_port,
            port_group: key.src_port / BOOK_PORTS as u16,
            _pad2: 0,
            dst_addr: key.dst_addr,
        }
    }

    /// `src_port`'s cell in its book.
    #[inline(always)]
    pub fn cell(src_port: u16) -> usize {
        src_port as usize % BOOK_PORTS
    }
}

/// Answered attempts per source port of a book (`src_port % BOOK_PORTS`), cumulative and
/// wrapping: user space reads differences.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnswerBook {
    pub answered: [u32; BOOK_PORTS],
}

impl Default for AnswerBook {
    fn default() -> Self {
        Self {
            answered: [0; BOOK_PORTS],
        }
    }
}

/// Upper bounds of the kernel's connect round-trip histogram, in microseconds; the last slot
/// counts everything above. The `netrace_connect_rtt_seconds` metric uses the same bounds.
pub const RTT_BOUNDS_US: [u64; 12] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    3_000_000,
];
/// Slots of the kernel's round-trip histogram.
pub const RTT_SLOTS: u32 = RTT_BOUNDS_US.len() as u32 + 1;

/// The slot of [`RTT_BOUNDS_US`] a round trip of `ns` falls into.
#[inline(always)]
pub fn rtt_slot(ns: u64) -> u32 {
    let mut i = 0;
    while i < RTT_BOUNDS_US.len() {
        // `ns / 1000 <= bound`, without a division in the kernel programs.
        if ns < (RTT_BOUNDS_US[i] + 1) * 1000 {
            return i as u32;
        }
        i += 1;
    }
    RTT_BOUNDS_US.len() as u32
}

/// What happened to a pending SYN, as decided in the kernel.
///
/// Numbers are part of the ring-buffer format: never renumber or reuse one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A SYN-ACK acknowledging `isn + 1` came back.
    Answered = 1,
    /// A RST acknowledging the SYN came back (nothing listening).
    Refused = 2,
    /// An ICMP or ICMPv6 error quoting the SYN came back that ends the attempt: destination
    /// unreachable (not fragmentation needed), time exceeded or parameter problem.
    Unreachable = 3,
    /// A new SYN with a different ISN replaced an unanswered entry for the same 4-tuple.
    Superseded = 4,
    /// A new pending entry: the first SYN of a connection attempt.
    Syn = 5,
    /// A SYN seen on a pod-side interface, in the pod's own address space (before SNAT). It
    /// creates no pending entry; user space links it to its uplink twin by ISN. Carried in an
    /// [`OutcomeEvent`] whose `pending.first_ns` is the time seen.
    PodSyn = 6,
    /// A TCP socket entered SYN_SENT (a `connect()`, in the connecting process): a
    /// [`SockEvent`] naming the socket's owner. The source port may still be 0.
    SockConnect = 7,
    /// A TCP socket left SYN_SENT: a [`SockEvent`] with the socket's final 4-tuple.
    SockLeftSynSent = 8,
    /// A SYN-ACK for a 4-tuple with no pending entry (after the destination filters). `key` is
    /// oriented as for a SYN (source = the connecting side, as the answer addresses it) and
    /// `pending.isn` is the acknowledgement number minus one, the ISN it answers. User space
    /// pairs it by (remote address, remote port, ISN) with a SYN seen under another source
    /// (translated after netrace saw it), or counts it as a sign of translation out of sight.
    UnmatchedSynAck = 9,
    /// An answer (SYN-ACK, RST or ICMP error) whose pending entry could not be looked at: the
    /// lock of a bucket that may hold it stayed taken (its holder held up, a virtual CPU
    /// preempted by its host). User space takes the entry itself and pairs it by the same
    /// rules, so that the attempt is not decided lost for want of a lock. `key` is oriented as
    /// for a SYN; `pending.isn` is the answer's raw acknowledgement number (for an ICMP error,
    /// the quoted sequence number); `pending.syns` the answer's [`answer_code`]; `icmp_type`
    /// and `icmp_code` as for [`EventKind::Unreachable`].
    BusyAnswer = 10,
}

/// An [`Answer`] as carried by an [`EventKind::BusyAnswer`] event (`pending.syns`).
#[inline(always)]
pub const fn answer_code(answer: parse::Answer) -> u32 {
    match answer {
        parse::Answer::SynAck => 1,
        parse::Answer::Rst => 2,
        parse::Answer::Unreachable { .. } => 3,
    }
}

/// The [`Answer`] of an [`EventKind::BusyAnswer`] event; `None` for a code this build does not
/// know.
pub const fn answer_of(code: u32, icmp_type: u8, icmp_code: u8) -> Option<parse::Answer> {
    match code {
        1 => Some(parse::Answer::SynAck),
        2 => Some(parse::Answer::Rst),
        3 => Some(parse::Answer::Unreachable {
            icmp_type,
            code: icmp_code,
        }),
        _ => None,
    }
}

impl EventKind {
    /// Decodes a raw kind; `None` for numbers this build does not know.
    pub fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Answered),
            2 => Some(Self::Refused),
            3 => Some(Self::Unreachable),
            4 => Some(Self::Superseded),
            5 => Some(Self::Syn),
            6 => Some(Self::PodSyn),
            7 => Some(Self::SockConnect),
            8 => Some(Self::SockLeftSynSent),
            9 => Some(Self::UnmatchedSynAck),
            10 => Some(Self::BusyAnswer),
            _ => None,
        }
    }
}

/// One record in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OutcomeEvent {
    /// An [`EventKind`] number.
    pub kind: u32,
    /// Interface the answer arrived on.
    pub ifindex: u32,
    pub key: FlowKey,
    /// The pending entry as it was when the answer arrived.
    pub pending: PendingSyn,
    /// `bpf_ktime_get_ns` when the answer arrived.
    pub ts_ns: u64,
    /// ICMP type and code for [`EventKind::Unreachable`], zero otherwise.
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub _pad: [u8; 6],
}

/// Size in bytes of one ring-buffer record.
pub const OUTCOME_EVENT_SIZE: usize = core::mem::size_of::<OutcomeEvent>();

/// A socket state change from the `sock:inet_sock_set_state` tracepoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockEvent {
    /// [`EventKind::SockConnect`] or [`EventKind::SockLeftSynSent`].
    pub kind: u32,
    /// Process id (thread group) of the task that ran when the state changed.
    pub tgid: u32,
    /// The socket's 4-tuple in its own network namespace (source = the socket).
    pub key: FlowKey,
    /// Kernel address of the socket, the join key between the two kinds.
    pub skaddr: u64,
    /// cgroup v2 id of the task (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    pub ts_ns: u64,
    /// The task's command name, NUL-padded.
    pub comm: [u8; 16],
    /// The TCP state entered (1 ESTABLISHED, 2 SYN_SENT, 7 CLOSE, ...).
    pub new_state: u32,
    /// Thread id of the task.
    pub pid: u32,
}

/// Size in bytes of a [`SockEvent`] record.
pub const SOCK_EVENT_SIZE: usize = core::mem::size_of::<SockEvent>();

/// Byte offsets of the `sock:inet_sock_set_state` fields, read by user space from the running
/// kernel's tracefs `format` file. All zero: the tracepoint program does nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TpOffsets {
    pub skaddr: u16,
    pub oldstate: u16,
    pub newstate: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    pub _pad: u16,
}

/// Byte offsets in the running kernel's `struct sk_buff`, `struct net_device` and `struct net`,
/// read by user space from the kernel's BTF, for the device hook (the `net_dev_start_xmit`
/// raw tracepoint), which reads the packet through the skb. All zero: the hook does nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SkbOffsets {
    /// `sk_buff.len`: bytes in the packet (linear and paged).
    pub skb_len: u16,
    /// `sk_buff.data_len`: bytes in pages; the linear part is `len - data_len`.
    pub skb_data_len: u16,
    /// `sk_buff.data`: on transmit, the start of the link-layer header.
    pub skb_data: u16,
    /// `net_device.ifindex`.
    pub dev_ifindex: u16,
    /// `net_device.nd_net.net` (the device's network namespace); 0 without namespaces.
    pub dev_net: u16,
    /// `net.ns.inum`: the namespace's inode number, as `stat /proc/self/ns/net` shows it.
    pub net_inum: u16,
    pub _pad: u32,
}

/// A device the device hook watches, the value of its map keyed by interface index.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct XmitIface {
    /// Inode number of the device's network namespace (interface indexes repeat across
    /// namespaces); ignored when [`SkbOffsets::dev_net`] is 0.
    pub netns: u32,
    /// What the frame starts with: [`XMIT_LINK_ETHERNET`] or [`XMIT_LINK_RAW_IP`].
    pub link: u32,
}

/// [`XmitIface::link`]: an Ethernet header.
pub const XMIT_LINK_ETHERNET: u32 = 0;
/// [`XmitIface::link`]: the IP header itself (tun, WireGuard, ipip).
pub const XMIT_LINK_RAW_IP: u32 = 1;
/// How many devices the device hook can watch.
pub const MAX_XMIT_IFACES: u32 = 256;

/// Filters applied in the kernel before a SYN takes a slot in the pending map, and what the
/// kernel sends one by one (read on every packet, so one lookup serves both).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KernelFilter {
    /// Destination port to keep, 0 for any.
    pub dst_port: u16,
    /// Address family of `dst_net`, 0 for any destination.
    pub dst_family: u8,
    /// Prefix length of `dst_net` in bits.
    pub dst_prefix_len: u8,
    /// [`SEND_SYNS`] and [`SEND_ANSWERS`]; 0: the kernel keeps the books.
    pub send: u32,
    /// Destination network, network byte order, same layout as [`FlowKey::dst_addr`].
    pub dst_net: [u8; 16],
}

/// [`KernelFilter::send`]: an [`EventKind::Syn`] event for every new pending entry (for
/// pod and process attribution, which pair SYNs one by one).
pub const SEND_SYNS: u32 = 1;
/// [`KernelFilter::send`]: an [`EventKind::Answered`] event for every answered attempt
/// (per-connection output); without it answers are counted in the answer books.
pub const SEND_ANSWERS: u32 = 2;

/// Indices into the per-CPU counter array. Never renumber or reuse one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Outbound SYNs (without ACK) that passed the filter.
    SynSeen = 0,
    /// Outbound SYNs that repeated a pending entry's ISN.
    SynRetransmit = 1,
    /// SYNs not tracked because the pending map was full.
    PendingMapFull = 2,
    /// Outcomes not delivered because the ring buffer had no room.
    RingbufFull = 3,
    /// SYN-ACKs matched to a pending SYN.
    SynAckMatched = 4,
    /// SYN-ACKs for a pending 4-tuple whose ack number did not match `isn + 1`.
    SynAckMismatch = 5,
    /// RSTs matched to a pending SYN.
    RstMatched = 6,
    /// ICMP/ICMPv6 unreachables matched to a pending SYN.
    IcmpMatched = 7,
    /// Packets cut short inside a header netrace needed.
    Truncated = 8,
    /// Headers with impossible values (IHL < 5, TCP data offset < 5).
    Malformed = 9,
    /// IPv4/IPv6 fragments after the first, skipped.
    Fragment = 10,
    /// IPv6 packets whose extension-header chain exceeded the walk bound.
    Ipv6ChainTooLong = 11,
    /// SYNs left out by the destination filters.
    Filtered = 12,
    /// SYNs seen on pod-side interfaces.
    PodSynSeen = 13,
    /// Socket state changes reported by the tracepoint.
    SockEvents = 14,
    /// SYN-ACKs (past the destination filters) for a 4-tuple with no pending entry.
    SynAckUnmatched = 15,
    /// Answered attempts counted in the kernel (answer log or books) instead of sent as events.
    AnsweredBooked = 16,
    /// Answered attempts sent as events because the answer books were full.
    BooksFull = 17,
    /// SYN-ACKs with no pending entry for a 4-tuple whose book holds an answer: a server
    /// repeating the SYN-ACK of a connection counted in the books (not a sign of translation).
    SynAckRepeated = 18,
    /// Of the SYNs counted in [`Counter::PendingMapFull`], those for which a lock of a bucket
    /// they needed stayed taken: its holder was held up (a virtual CPU preempted by its host),
    /// the map was not shown full. Counted in both, so the sums of what was tracked hold
    /// either way.
    TableBusy = 19,
    /// Of the answers counted in [`Counter::AnsweredBooked`], those written to the CPU's
    /// answer log (`netrace_common::log`) rather than counted in a book.
    AnsweredLogged = 20,
    /// Answers whose pending entry could not be looked at because a bucket's lock stayed
    /// taken: each sent as an [`EventKind::BusyAnswer`] for user space to pair.
    AnswerBusy = 21,
}

/// Number of counters (size of the per-CPU counter array).
pub const COUNTER_SLOTS: u32 = 22;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all four are #[repr(C)], made only of integers and byte arrays, with every
    // padding byte an explicit field, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PendingSyn {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OutcomeEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelFilter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TpOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SkbOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::XmitIface {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PendingSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::V4Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::V6Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BookKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AnswerBook {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ExpireCutoffs {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::table::HeadV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::table::SlotsV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::table::TableCmd {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::log::AnswerRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::log::PortLine {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::log::LogPos {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<FlowKey>(), 40);
        assert_eq!(core::mem::size_of::<PendingSyn>(), 32);
        assert_eq!(
            core::mem::size_of::<OutcomeEvent>(),
            4 + 4 + 40 + 32 + 8 + 8
        );
        assert_eq!(core::mem::size_of::<KernelFilter>(), 24);
        assert_eq!(
            core::mem::size_of::<SockEvent>(),
            4 + 4 + 40 + 8 + 8 + 8 + 16 + 4 + 4
        );
        assert_eq!(core::mem::size_of::<TpOffsets>(), 24);
        assert_eq!(core::mem::size_of::<SkbOffsets>(), 16);
        assert_eq!(core::mem::size_of::<XmitIface>(), 8);
        assert_eq!(core::mem::size_of::<PendingSlot>(), 24);
        assert_eq!(core::mem::size_of::<ExpiredV6>(), 36 + 4 + 24);
        assert_eq!(core::mem::size_of::<ExpireSummary>(), 24);
        assert_eq!(core::mem::size_of::<ExpireCutoffs>(), 16);
        assert_eq!(core::mem::size_of::<V4Key>(), 12);
        assert_eq!(core::mem::size_of::<V6Key>(), 36);
        assert_eq!(core::mem::size_of::<BookKey>(), 28);
        assert_eq!(core::mem::size_of::<AnswerBook>(), 4 * BOOK_PORTS);
    }

    #[test]
    fn slots_and_keys_round_trip() {
        let mut p = PendingSyn::first(5_000_000_000, 77, 3);
        p.last_ns = p.first_ns + 3_000_123 * 1024;
        p.syns = 3;
        p.data_len = 100;
        p.state = STATE_LOST;
        assert_eq!(p.to_slot().to_pending(), p);
        p.syns = 1000;
        assert_eq!(p.to_slot().syns, 255);
        let mut k = FlowKey {
            family: FAMILY_V4,
            src_port: 40000,
            dst_port: 443,
            ..FlowKey::default()
        };
        k.src_addr[..4].copy_from_slice(&[198, 18, 0, 1]);
        k.dst_addr[..4].copy_from_slice(&[198, 19, 0, 2]);
        assert_eq!(FlowKey::from(k.v4()), k);
        k.family = FAMILY_V6;
        k.src_addr = [0x20; 16];
        assert_eq!(FlowKey::from(k.v6()), k);
        assert_eq!(rtt_slot(0), 0);
        assert_eq!(rtt_slot(500_000), 0);
        assert_eq!(rtt_slot(501_000), 1);
        assert_eq!(rtt_slot(u64::MAX), RTT_BOUNDS_US.len() as u32);
    }

    #[test]
    fn event_kinds_round_trip() {
        for k in [
            EventKind::Answered,
            EventKind::Refused,
            EventKind::Unreachable,
            EventKind::Superseded,
            EventKind::Syn,
            EventKind::PodSyn,
            EventKind::SockConnect,
            EventKind::SockLeftSynSent,
            EventKind::UnmatchedSynAck,
            EventKind::BusyAnswer,
        ] {
            assert_eq!(EventKind::from_u32(k as u32), Some(k));
        }
        assert_eq!(EventKind::from_u32(0), None);
        assert_eq!(EventKind::from_u32(99), None);
    }
}
