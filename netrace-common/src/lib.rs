//! Types shared by the kernel programs (`netrace-ebpf`) and user space (`netrace`).
//!
//! Every type here is `#[repr(C)]` with explicit padding so both sides agree on the layout
//! byte for byte. Event kinds and counter ids are numbered once and never reused: an old
//! user space reading a newer kernel object must never misread one kind as another.
#![cfg_attr(not(test), no_std)]

pub mod pairing;
pub mod parse;
#[cfg(test)]
mod rules_tests;

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
#[repr(C)]
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
    pub data_len: u32,
}

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
        }
    }
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

/// Filters applied in the kernel before a SYN takes a slot in the pending map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KernelFilter {
    /// Destination port to keep, 0 for any.
    pub dst_port: u16,
    /// Address family of `dst_net`, 0 for any destination.
    pub dst_family: u8,
    /// Prefix length of `dst_net` in bits.
    pub dst_prefix_len: u8,
    pub _pad: u32,
    /// Destination network, network byte order, same layout as [`FlowKey::dst_addr`].
    pub dst_net: [u8; 16],
}

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
}

/// Number of counters (size of the per-CPU counter array).
pub const COUNTER_SLOTS: u32 = 16;

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
        ] {
            assert_eq!(EventKind::from_u32(k as u32), Some(k));
        }
        assert_eq!(EventKind::from_u32(0), None);
        assert_eq!(EventKind::from_u32(99), None);
    }
}
