//! Packet parsing for the classifiers: Ethernet, up to two VLAN tags, IPv4 (with options,
//! skipping non-first fragments), IPv6 (with a bounded extension-header walk), TCP, and ICMP /
//! ICMPv6 destination-unreachable quoting a TCP header.
//!
//! Every read goes through `bpf_skb_load_bytes` into a fixed-size stack buffer, so a packet
//! shorter than a header fails the read and is skipped (counted as truncated), never misread.

use aya_ebpf::programs::TcContext;
use netrace_common::{Counter, FlowKey, FAMILY_V4, FAMILY_V6, MAX_IPV6_EXT_HEADERS};

use crate::count;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_HLEN: usize = 14;
const MAX_VLAN_TAGS: usize = 2;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMPV6_DEST_UNREACH: u8 = 1;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The kind of answer an ingress packet gives to a SYN.
#[derive(Clone, Copy)]
pub enum Answer {
    SynAck,
    Rst,
    Unreachable { icmp_type: u8, code: u8 },
}

/// What a packet means to netrace. Keys are always oriented with the connecting side as source.
pub enum Parsed {
    /// An outbound SYN and its initial sequence number.
    Syn { key: FlowKey, isn: u32 },
    /// An inbound answer; `ack` is the acknowledgement number (or, for ICMP, the quoted
    /// sequence number).
    Answer {
        key: FlowKey,
        ack: u32,
        answer: Answer,
    },
}

/// Network-layer facts needed to go on to the transport header.
struct L3 {
    family: u8,
    proto: u8,
    l4_off: usize,
    src: [u8; 16],
    dst: [u8; 16],
}

#[inline(always)]
fn load<const N: usize>(ctx: &TcContext, off: usize) -> Option<[u8; N]> {
    match ctx.load::<[u8; N]>(off) {
        Ok(b) => Some(b),
        Err(_) => {
            count(Counter::Truncated);
            None
        }
    }
}

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    u16::from_be_bytes([b0, b1])
}

#[inline(always)]
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Whether TCP `flags` can matter: a SYN alone on egress, a SYN-ACK or RST+ACK on ingress.
#[inline(always)]
fn flags_matter(flags: u8, egress: bool) -> bool {
    if egress {
        flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
    } else {
        flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN | TCP_ACK
            || flags & (TCP_RST | TCP_ACK) == TCP_RST | TCP_ACK
    }
}

/// The fast path: most packets are plain data or ACKs in the common shape (untagged IPv4
/// without options, untagged IPv6 straight to TCP or UDP), readable in the skb's linear data.
/// Judged with direct packet reads, they leave here. `false` only where the full parser would
/// also drop the packet without touching a counter; anything unusual (tags, options,
/// fragments, extension headers, short or non-linear data) goes on to the full parser.
#[inline(always)]
fn surely_irrelevant(ctx: &TcContext, egress: bool) -> bool {
    let (data, end) = (ctx.data(), ctx.data_end());
    // Ethernet + IPv4 (20) + TCP base header (20), the shortest shape judged here.
    if data + ETH_HLEN + 40 > end {
        return false;
    }
    // SAFETY: every read below is at a constant offset under 54, inside the bound just checked;
    // the verifier checks the same.
    let at = |off: usize| unsafe { *((data + off) as *const u8) };
    let proto = be16(at(12), at(13));
    let (l4, next) = match proto {
        ETH_P_IP => {
            // Version 4, IHL 5, not a later fragment.
            if at(ETH_HLEN) != 0x45 || be16(at(ETH_HLEN + 6), at(ETH_HLEN + 7)) & 0x1fff != 0 {
                return false;
            }
            (ETH_HLEN + 20, at(ETH_HLEN + 9))
        }
        ETH_P_IPV6 => {
            if data + ETH_HLEN + 60 > end || at(ETH_HLEN) >> 4 != 6 {
                return false;
            }
            // SAFETY: as above, now under 74.
            let next = unsafe { *((data + ETH_HLEN + 6) as *const u8) };
            (ETH_HLEN + 40, next)
        }
        ETH_P_8021Q | ETH_P_8021AD => return false,
        // ARP, LLDP, ...: never interesting, and the full parser counts nothing for them.
        _ => return true,
    };
    match next {
        IPPROTO_TCP => {
            let tcp = data + l4;
            if tcp + 20 > end {
                return false;
            }
            // SAFETY: offsets 12 and 13 of the 20 bytes just checked.
            let (off_byte, flags) =
                unsafe { (*((tcp + 12) as *const u8), *((tcp + 13) as *const u8)) };
            let doff = (off_byte >> 4) as usize * 4;
            // Malformed or cut short: the full parser counts those.
            doff >= 20 && tcp + doff <= end && !flags_matter(flags, egress)
        }
        IPPROTO_ICMP if proto == ETH_P_IP => egress,
        IPPROTO_ICMPV6 if proto == ETH_P_IPV6 => egress,
        // IPv6 extension headers: the full parser walks them.
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_AUTH | IPV6_DEST_OPTS
            if proto == ETH_P_IPV6 =>
        {
            false
        }
        _ => true,
    }
}

/// Parses the packet in `ctx`; `egress` selects what is interesting (SYNs out, answers in).
#[inline(always)]
pub fn parse(ctx: &TcContext, egress: bool) -> Option<Parsed> {
    if surely_irrelevant(ctx, egress) {
        return None;
    }
    let l3 = l3(ctx)?;
    match l3.proto {
        IPPROTO_TCP => tcp(ctx, &l3, egress),
        IPPROTO_ICMP if !egress && l3.family == FAMILY_V4 => icmp4(ctx, l3.l4_off),
        IPPROTO_ICMPV6 if !egress && l3.family == FAMILY_V6 => icmp6(ctx, l3.l4_off),
        _ => None,
    }
}

#[inline(always)]
fn l3(ctx: &TcContext) -> Option<L3> {
    let eth = load::<ETH_HLEN>(ctx, 0)?;
    let mut proto = be16(eth[12], eth[13]);
    let mut off = ETH_HLEN;
    let mut tags = 0;
    while tags < MAX_VLAN_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let tag = load::<4>(ctx, off)?;
        proto = be16(tag[2], tag[3]);
        off += 4;
        tags += 1;
    }
    match proto {
        ETH_P_IP => ipv4(ctx, off),
        ETH_P_IPV6 => ipv6(ctx, off),
        _ => None,
    }
}

#[inline(always)]
fn ipv4(ctx: &TcContext, off: usize) -> Option<L3> {
    let h = load::<20>(ctx, off)?;
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        count(Counter::Malformed);
        return None;
    }
    if be16(h[6], h[7]) & 0x1fff != 0 {
        count(Counter::Fragment);
        return None;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src[..4].copy_from_slice(&h[12..16]);
    dst[..4].copy_from_slice(&h[16..20]);
    Some(L3 {
        family: FAMILY_V4,
        proto: h[9],
        l4_off: off + ihl,
        src,
        dst,
    })
}

#[inline(always)]
fn ipv6(ctx: &TcContext, off: usize) -> Option<L3> {
    let h = load::<40>(ctx, off)?;
    if h[0] >> 4 != 6 {
        count(Counter::Malformed);
        return None;
    }
    let mut next = h[6];
    let mut off = off + 40;
    let mut walked = 0;
    while walked < MAX_IPV6_EXT_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let e = load::<2>(ctx, off)?;
                next = e[0];
                off += (e[1] as usize + 1) * 8;
            }
            IPV6_AUTH => {
                let e = load::<2>(ctx, off)?;
                next = e[0];
                off += (e[1] as usize + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let e = load::<8>(ctx, off)?;
                if be16(e[2], e[3]) & 0xfff8 != 0 {
                    count(Counter::Fragment);
                    return None;
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
        count(Counter::Ipv6ChainTooLong);
        return None;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    Some(L3 {
        family: FAMILY_V6,
        proto: next,
        l4_off: off,
        src,
        dst,
    })
}

#[inline(always)]
fn key(family: u8, src: [u8; 16], dst: [u8; 16], src_port: u16, dst_port: u16) -> FlowKey {
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
fn tcp(ctx: &TcContext, l3: &L3, egress: bool) -> Option<Parsed> {
    let t = load::<20>(ctx, l3.l4_off)?;
    let doff = (t[12] >> 4) as usize * 4;
    if doff < 20 {
        count(Counter::Malformed);
        return None;
    }
    // The whole header, options included, must be there: a segment cut inside its options
    // would be dropped by the receiving stack, so it must not count as a SYN or an answer.
    load::<1>(ctx, l3.l4_off + doff - 1)?;
    let sport = be16(t[0], t[1]);
    let dport = be16(t[2], t[3]);
    let flags = t[13];
    if !flags_matter(flags, egress) {
        return None;
    }
    if egress {
        // A connection attempt: SYN alone (ECN bits allowed), never with ACK, RST or FIN.
        return Some(Parsed::Syn {
            key: key(l3.family, l3.src, l3.dst, sport, dport),
            isn: be32(&t, 4),
        });
    }
    let answer = if flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN | TCP_ACK {
        Answer::SynAck
    } else if flags & (TCP_RST | TCP_ACK) == TCP_RST | TCP_ACK {
        Answer::Rst
    } else {
        return None;
    };
    // The answer travels the other way: its destination is the connecting side.
    Some(Parsed::Answer {
        key: key(l3.family, l3.dst, l3.src, dport, sport),
        ack: be32(&t, 8),
        answer,
    })
}

/// The quoted packet inside an ICMP error is the SYN as it left: source is the connecting side.
#[inline(always)]
fn quoted_tcp(
    ctx: &TcContext,
    family: u8,
    src: [u8; 16],
    dst: [u8; 16],
    off: usize,
    icmp_type: u8,
    code: u8,
) -> Option<Parsed> {
    // RFC 792 guarantees the first 8 bytes of the transport header: ports and sequence number.
    let t = load::<8>(ctx, off)?;
    Some(Parsed::Answer {
        key: key(family, src, dst, be16(t[0], t[1]), be16(t[2], t[3])),
        ack: be32(&t, 4),
        answer: Answer::Unreachable { icmp_type, code },
    })
}

#[inline(always)]
fn icmp4(ctx: &TcContext, off: usize) -> Option<Parsed> {
    let i = load::<8>(ctx, off)?;
    if i[0] != ICMP_DEST_UNREACH {
        return None;
    }
    let inner = off + 8;
    let h = load::<20>(ctx, inner)?;
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        count(Counter::Malformed);
        return None;
    }
    if h[9] != IPPROTO_TCP {
        return None;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src[..4].copy_from_slice(&h[12..16]);
    dst[..4].copy_from_slice(&h[16..20]);
    quoted_tcp(ctx, FAMILY_V4, src, dst, inner + ihl, i[0], i[1])
}

#[inline(always)]
fn icmp6(ctx: &TcContext, off: usize) -> Option<Parsed> {
    let i = load::<8>(ctx, off)?;
    if i[0] != ICMPV6_DEST_UNREACH {
        return None;
    }
    let inner = off + 8;
    let h = load::<40>(ctx, inner)?;
    // A SYN from a Linux stack carries no extension headers; others are not followed here.
    if h[0] >> 4 != 6 || h[6] != IPPROTO_TCP {
        return None;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    quoted_tcp(ctx, FAMILY_V6, src, dst, inner + 40, i[0], i[1])
}
