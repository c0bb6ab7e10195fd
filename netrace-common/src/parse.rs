//! Packet parsing, one set of rules for every source of packets: the kernel's tc classifiers
//! (over the skb), a device-level hook (over `bpf_probe_read_kernel`) and `netrace analyze`
//! (over byte slices from a capture).
//!
//! Ethernet with up to two VLAN tags, or a bare IP packet ([`Link::RawIp`]: WireGuard, tun,
//! ipip, ip6tnl, ppp); IPv4 (with options, skipping non-first fragments), IPv6 (with a bounded
//! extension-header walk), TCP, and ICMP / ICMPv6 errors that end a connection attempt
//! (destination unreachable except fragmentation needed, time exceeded, parameter problem)
//! quoting a TCP header.
//!
//! Every read goes through [`Packet::load`] into a fixed-size buffer, so a packet shorter than a
//! header fails the read and is skipped as [`Skip::Truncated`], never misread. Every function is
//! `#[inline(always)]` and every loop bounded by a constant, as the BPF verifier needs.

use crate::{Counter, FlowKey, FAMILY_V4, FAMILY_V6, MAX_IPV6_EXT_HEADERS};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const ETH_HLEN: usize = 14;
const MAX_VLAN_TAGS: usize = 2;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_AUTH: u8 = 51;
pub const IPV6_DEST_OPTS: u8 = 60;

pub const ICMP_DEST_UNREACH: u8 = 3;
/// ICMP destination unreachable code 4: fragmentation needed (path MTU discovery).
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
/// ICMPv6 packet too big (path MTU discovery): never ends an attempt.
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_PARAMETER_PROBLEM: u8 = 4;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A source of packet bytes: the skb in the kernel, a byte slice in user space.
pub trait Packet {
    /// The `N` bytes at `off`, or `None` when the packet ends before `off + N`.
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
}

impl Packet for [u8] {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let end = off.checked_add(N)?;
        self.get(off..end)?.try_into().ok()
    }
}

/// What the packet starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// An Ethernet header (ARPHRD_ETHER, also loopback), possibly with VLAN tags.
    Ethernet,
    /// The IP header itself; its version nibble says IPv4 or IPv6 (ARPHRD_NONE for tun and
    /// WireGuard, ARPHRD_TUNNEL ipip, ARPHRD_TUNNEL6 ip6tnl, ARPHRD_PPP).
    RawIp,
}

impl Link {
    /// The link for an interface of kernel type `arphrd` (`/sys/class/net/IFACE/type`), or
    /// `None` when netrace cannot parse its frames.
    pub const fn from_arphrd(arphrd: u16) -> Option<Self> {
        match arphrd {
            // ARPHRD_ETHER, ARPHRD_LOOPBACK (a zeroed Ethernet header).
            1 | 772 => Some(Self::Ethernet),
            // ARPHRD_NONE (tun, WireGuard), ARPHRD_TUNNEL (ipip), ARPHRD_TUNNEL6 (ip6tnl),
            // ARPHRD_PPP: the packet starts at the IP header at tc.
            65534 | 768 | 769 | 512 => Some(Self::RawIp),
            _ => None,
        }
    }
}

/// Which way the packet travels: what is interesting (SYNs out, answers in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Egress,
    Ingress,
}

/// The kind of answer an inbound packet gives to a SYN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    SynAck,
    Rst,
    /// An ICMP / ICMPv6 error that ends the attempt: destination unreachable (except
    /// fragmentation needed), time exceeded or parameter problem.
    Unreachable {
        icmp_type: u8,
        code: u8,
    },
}

impl Answer {
    /// The ICMP type and code an event carries for this answer: an ICMP error's own, zero for
    /// the others.
    #[inline(always)]
    pub const fn icmp(self) -> (u8, u8) {
        match self {
            Answer::Unreachable { icmp_type, code } => (icmp_type, code),
            _ => (0, 0),
        }
    }
}

/// What a packet means to netrace. Keys are always oriented with the connecting side as source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// An outbound SYN, its initial sequence number, and how many bytes of data it carries
    /// (TCP Fast Open; the IP header's length minus the headers).
    Syn {
        key: FlowKey,
        isn: u32,
        data_len: u32,
    },
    /// An inbound answer; `ack` is the acknowledgement number (or, for ICMP, the quoted
    /// sequence number).
    Answer {
        key: FlowKey,
        ack: u32,
        answer: Answer,
    },
}

/// Why a packet means nothing to netrace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Not a SYN or an answer (other protocols, other flags, wrong direction): not counted.
    Irrelevant,
    /// Cut short inside a header netrace needed.
    Truncated,
    /// A header with impossible values (IHL < 5, TCP data offset < 5, wrong IP version).
    Malformed,
    /// An IPv4 or IPv6 fragment after the first.
    Fragment,
    /// An IPv6 extension-header chain longer than [`MAX_IPV6_EXT_HEADERS`].
    Ipv6ChainTooLong,
}

impl Skip {
    /// The counter this reason is tallied under; `None` for [`Skip::Irrelevant`].
    #[inline(always)]
    pub const fn counter(self) -> Option<Counter> {
        match self {
            Self::Irrelevant => None,
            Self::Truncated => Some(Counter::Truncated),
            Self::Malformed => Some(Counter::Malformed),
            Self::Fragment => Some(Counter::Fragment),
            Self::Ipv6ChainTooLong => Some(Counter::Ipv6ChainTooLong),
        }
    }
}

/// Network-layer facts needed to go on to the transport header.
struct L3 {
    family: u8,
    proto: u8,
    l4_off: usize,
    /// Where the IP packet ends by its own length field (saturated at `l4_off`).
    end_off: usize,
    src: [u8; 16],
    dst: [u8; 16],
}

#[inline(always)]
fn load<P: Packet + ?Sized, const N: usize>(p: &P, off: usize) -> Result<[u8; N], Skip> {
    match p.load::<N>(off) {
        Some(b) => Ok(b),
        None => Err(Skip::Truncated),
    }
}

#[inline(always)]
pub fn be16(b0: u8, b1: u8) -> u16 {
    u16::from_be_bytes([b0, b1])
}

#[inline(always)]
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Whether TCP `flags` can matter: a SYN alone on egress, a SYN-ACK or RST+ACK on ingress.
#[inline(always)]
pub fn flags_matter(flags: u8, dir: Direction) -> bool {
    match dir {
        Direction::Egress => flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN,
        Direction::Ingress => {
            flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN | TCP_ACK
                || flags & (TCP_RST | TCP_ACK) == TCP_RST | TCP_ACK
        }
    }
}

/// Whether an ICMP (`v6 == false`) or ICMPv6 error of `icmp_type`/`code` quoting a SYN ends the
/// attempt (the connecting stack gives up, or would after its retries): destination
/// unreachable, time exceeded, parameter problem. Fragmentation needed and packet too big ask
/// for a smaller packet and do not.
#[inline(always)]
pub fn icmp_ends_attempt(v6: bool, icmp_type: u8, code: u8) -> bool {
    if v6 {
        matches!(
            icmp_type,
            ICMPV6_DEST_UNREACH | ICMPV6_TIME_EXCEEDED | ICMPV6_PARAMETER_PROBLEM
        )
    } else {
        match icmp_type {
            ICMP_DEST_UNREACH => code != ICMP_FRAG_NEEDED,
            ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM => true,
            _ => false,
        }
    }
}

/// Parses `pkt`, which starts as `link` says, travelling `dir`.
#[inline(always)]
pub fn parse<P: Packet + ?Sized>(pkt: &P, link: Link, dir: Direction) -> Result<Parsed, Skip> {
    let l3 = l3(pkt, link)?;
    match (l3.proto, dir) {
        (IPPROTO_TCP, _) => tcp(pkt, &l3, dir),
        (IPPROTO_ICMP, Direction::Ingress) if l3.family == FAMILY_V4 => icmp4(pkt, l3.l4_off),
        (IPPROTO_ICMPV6, Direction::Ingress) if l3.family == FAMILY_V6 => icmp6(pkt, l3.l4_off),
        _ => Err(Skip::Irrelevant),
    }
}

#[inline(always)]
fn l3<P: Packet + ?Sized>(pkt: &P, link: Link) -> Result<L3, Skip> {
    if let Link::RawIp = link {
        let v = load::<P, 1>(pkt, 0)?;
        return match v[0] >> 4 {
            4 => ipv4(pkt, 0),
            6 => ipv6(pkt, 0),
            _ => Err(Skip::Irrelevant),
        };
    }
    let eth = load::<P, ETH_HLEN>(pkt, 0)?;
    let mut proto = be16(eth[12], eth[13]);
    let mut off = ETH_HLEN;
    let mut tags = 0;
    while tags < MAX_VLAN_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let tag = load::<P, 4>(pkt, off)?;
        proto = be16(tag[2], tag[3]);
        off += 4;
        tags += 1;
    }
    match proto {
        ETH_P_IP => ipv4(pkt, off),
        ETH_P_IPV6 => ipv6(pkt, off),
        _ => Err(Skip::Irrelevant),
    }
}

#[inline(always)]
fn ipv4<P: Packet + ?Sized>(pkt: &P, off: usize) -> Result<L3, Skip> {
    let h = load::<P, 20>(pkt, off)?;
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Err(Skip::Malformed);
    }
    if be16(h[6], h[7]) & 0x1fff != 0 {
        return Err(Skip::Fragment);
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src[..4].copy_from_slice(&h[12..16]);
    dst[..4].copy_from_slice(&h[16..20]);
    let l4_off = off + ihl;
    let total = be16(h[2], h[3]) as usize;
    Ok(L3 {
        family: FAMILY_V4,
        proto: h[9],
        l4_off,
        end_off: if total > ihl { off + total } else { l4_off },
        src,
        dst,
    })
}

#[inline(always)]
fn ipv6<P: Packet + ?Sized>(pkt: &P, off: usize) -> Result<L3, Skip> {
    let h = load::<P, 40>(pkt, off)?;
    if h[0] >> 4 != 6 {
        return Err(Skip::Malformed);
    }
    let end = off + 40 + be16(h[4], h[5]) as usize;
    let mut next = h[6];
    let mut off = off + 40;
    let mut walked = 0;
    while walked < MAX_IPV6_EXT_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let e = load::<P, 2>(pkt, off)?;
                next = e[0];
                off += (e[1] as usize + 1) * 8;
            }
            IPV6_AUTH => {
                let e = load::<P, 2>(pkt, off)?;
                next = e[0];
                off += (e[1] as usize + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let e = load::<P, 8>(pkt, off)?;
                if be16(e[2], e[3]) & 0xfff8 != 0 {
                    return Err(Skip::Fragment);
                }
                next = e[0];
                off += 8;
            }
            _ => break,
        }
        walked += 1;
    }
    if matches!(
        next,
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AUTH | IPV6_FRAGMENT
    ) {
        return Err(Skip::Ipv6ChainTooLong);
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    Ok(L3 {
        family: FAMILY_V6,
        proto: next,
        l4_off: off,
        end_off: if end > off { end } else { off },
        src,
        dst,
    })
}

/// A [`FlowKey`] from its parts.
#[inline(always)]
pub fn key(family: u8, src: [u8; 16], dst: [u8; 16], src_port: u16, dst_port: u16) -> FlowKey {
    FlowKey {
        family,
        _pad: [0; 3],
        src_port,
        dst_port,
        src_addr: src,
        dst_addr: dst,
    }
}

#[inline(always)]
fn tcp<P: Packet + ?Sized>(pkt: &P, l3: &L3, dir: Direction) -> Result<Parsed, Skip> {
    let t = load::<P, 20>(pkt, l3.l4_off)?;
    let doff = (t[12] >> 4) as usize * 4;
    if doff < 20 {
        return Err(Skip::Malformed);
    }
    // The whole header, options included, must be there: a segment cut inside its options
    // would be dropped by the receiving stack, so it must not count as a SYN or an answer.
    load::<P, 1>(pkt, l3.l4_off + doff - 1)?;
    let sport = be16(t[0], t[1]);
    let dport = be16(t[2], t[3]);
    let flags = t[13];
    if !flags_matter(flags, dir) {
        return Err(Skip::Irrelevant);
    }
    if let Direction::Egress = dir {
        // flags_matter: SYN (ECE/CWR/PSH/URG allowed), never with ACK, RST or FIN.
        return Ok(Parsed::Syn {
            key: key(l3.family, l3.src, l3.dst, sport, dport),
            isn: be32(&t, 4),
            data_len: syn_data_len(l3.end_off, l3.l4_off + doff),
        });
    }
    // The answer travels the other way: its destination is the connecting side.
    Ok(Parsed::Answer {
        key: key(l3.family, l3.dst, l3.src, dport, sport),
        ack: be32(&t, 8),
        answer: answer_of(flags),
    })
}

/// The bytes of data a SYN carries: from the end of its TCP header (`data_end`) to where the
/// IP packet ends by its own length (`ip_end`).
#[inline(always)]
pub fn syn_data_len(ip_end: usize, data_end: usize) -> u32 {
    if ip_end > data_end {
        (ip_end - data_end) as u32
    } else {
        0
    }
}

/// What an inbound segment whose flags [matter](flags_matter) answers with.
#[inline(always)]
pub fn answer_of(flags: u8) -> Answer {
    if flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN | TCP_ACK {
        Answer::SynAck
    } else {
        // flags_matter on ingress: the other case is RST+ACK.
        Answer::Rst
    }
}

/// The quoted packet inside an ICMP error is the SYN as it left: source is the connecting side.
#[inline(always)]
fn quoted_tcp<P: Packet + ?Sized>(
    pkt: &P,
    family: u8,
    src: [u8; 16],
    dst: [u8; 16],
    off: usize,
    icmp_type: u8,
    code: u8,
) -> Result<Parsed, Skip> {
    // RFC 792 guarantees the first 8 bytes of the transport header: ports and sequence number.
    let t = load::<P, 8>(pkt, off)?;
    Ok(Parsed::Answer {
        key: key(family, src, dst, be16(t[0], t[1]), be16(t[2], t[3])),
        ack: be32(&t, 4),
        answer: Answer::Unreachable { icmp_type, code },
    })
}

#[inline(always)]
fn icmp4<P: Packet + ?Sized>(pkt: &P, off: usize) -> Result<Parsed, Skip> {
    let i = load::<P, 8>(pkt, off)?;
    if !icmp_ends_attempt(false, i[0], i[1]) {
        return Err(Skip::Irrelevant);
    }
    let inner = off + 8;
    let h = load::<P, 20>(pkt, inner)?;
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Err(Skip::Malformed);
    }
    if h[9] != IPPROTO_TCP {
        return Err(Skip::Irrelevant);
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src[..4].copy_from_slice(&h[12..16]);
    dst[..4].copy_from_slice(&h[16..20]);
    quoted_tcp(pkt, FAMILY_V4, src, dst, inner + ihl, i[0], i[1])
}

#[inline(always)]
fn icmp6<P: Packet + ?Sized>(pkt: &P, off: usize) -> Result<Parsed, Skip> {
    let i = load::<P, 8>(pkt, off)?;
    if !icmp_ends_attempt(true, i[0], i[1]) {
        return Err(Skip::Irrelevant);
    }
    let inner = off + 8;
    let h = load::<P, 40>(pkt, inner)?;
    // A SYN from a Linux stack carries no extension headers; others are not followed here.
    if h[0] >> 4 != 6 || h[6] != IPPROTO_TCP {
        return Err(Skip::Irrelevant);
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    quoted_tcp(pkt, FAMILY_V6, src, dst, inner + 40, i[0], i[1])
}

/// A short name for an ICMP (`v6 == false`) or ICMPv6 error that ends an attempt, for reports:
/// "port unreachable", "time exceeded in transit", ...
pub fn icmp_name(v6: bool, icmp_type: u8, code: u8) -> &'static str {
    if v6 {
        return match (icmp_type, code) {
            (ICMPV6_DEST_UNREACH, 0) => "no route to destination",
            (ICMPV6_DEST_UNREACH, 1) => "administratively prohibited",
            (ICMPV6_DEST_UNREACH, 2) => "beyond scope of source address",
            (ICMPV6_DEST_UNREACH, 3) => "address unreachable",
            (ICMPV6_DEST_UNREACH, 4) => "port unreachable",
            (ICMPV6_DEST_UNREACH, 5) => "source address failed policy",
            (ICMPV6_DEST_UNREACH, 6) => "reject route to destination",
            (ICMPV6_DEST_UNREACH, _) => "destination unreachable",
            (ICMPV6_PACKET_TOO_BIG, _) => "packet too big",
            (ICMPV6_TIME_EXCEEDED, 0) => "hop limit exceeded in transit",
            (ICMPV6_TIME_EXCEEDED, _) => "fragment reassembly time exceeded",
            (ICMPV6_PARAMETER_PROBLEM, _) => "parameter problem",
            _ => "ICMPv6 error",
        };
    }
    match (icmp_type, code) {
        (ICMP_DEST_UNREACH, 0) => "network unreachable",
        (ICMP_DEST_UNREACH, 1) => "host unreachable",
        (ICMP_DEST_UNREACH, 2) => "protocol unreachable",
        (ICMP_DEST_UNREACH, 3) => "port unreachable",
        (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED) => "fragmentation needed",
        (ICMP_DEST_UNREACH, 5) => "source route failed",
        (ICMP_DEST_UNREACH, 6) => "destination network unknown",
        (ICMP_DEST_UNREACH, 7) => "destination host unknown",
        (ICMP_DEST_UNREACH, 9 | 10 | 13) => "administratively prohibited",
        (ICMP_DEST_UNREACH, 11) => "network unreachable for type of service",
        (ICMP_DEST_UNREACH, 12) => "host unreachable for type of service",
        (ICMP_DEST_UNREACH, _) => "destination unreachable",
        (ICMP_TIME_EXCEEDED, 0) => "time to live exceeded in transit",
        (ICMP_TIME_EXCEEDED, _) => "fragment reassembly time exceeded",
        (ICMP_PARAMETER_PROBLEM, _) => "parameter problem",
        _ => "ICMP error",
    }
}
