//! The classifiers' side of parsing: a fast path that judges packets in the common shape with
//! direct reads (data and plain ACKs leave, SYNs and answers are parsed in place), then the
//! shared parser (`netrace_common::parse`, the same rules `netrace analyze` runs over
//! captures) reading through `bpf_skb_load_bytes` for everything else.

use aya_ebpf::programs::TcContext;
use netrace_common::{
    parse::{
        self, be16, flags_matter, Direction, Link, Packet, Parsed, ETH_HLEN, ETH_P_8021AD,
        ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPV6_AUTH,
        IPV6_DEST_OPTS, IPV6_FRAGMENT, IPV6_HOP_BY_HOP, IPV6_ROUTING,
    },
    FlowKey, FAMILY_V4, FAMILY_V6,
};

use crate::count;

/// The skb, read with `bpf_skb_load_bytes` into fixed-size stack buffers (the verifier is
/// happy with variable header offsets that way).
pub struct Skb<'a>(pub &'a TcContext);

impl Packet for Skb<'_> {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        self.0.load::<[u8; N]>(off).ok()
    }
}

/// What the fast path made of a packet.
enum Fast {
    /// Nothing the full parser would count or report.
    Irrelevant,
    /// A SYN or an answer in the common shape, parsed exactly as the full parser would.
    Parsed(Parsed),
    /// Anything unusual: the full parser decides.
    Full,
}

/// The fast path: most packets are in the common shape (untagged IPv4 without options,
/// untagged IPv6 straight to TCP or UDP) with their headers in the skb's linear data. Read
/// with direct packet reads, plain data and ACKs leave at once, and SYNs and answers are
/// parsed without a copy (`bpf_skb_load_bytes` is a helper call per header). Anything unusual
/// (tags, options, fragments, extension headers, short or non-linear data, ICMP) goes on to
/// the full parser, which counts what it drops. `L2` is the link-layer header's length: 14
/// (Ethernet) or 0 (the packet starts at IP).
#[inline(always)]
fn fast<const L2: usize>(ctx: &TcContext, dir: Direction) -> Fast {
    let (data, end) = (ctx.data(), ctx.data_end());
    // Link header + IPv4 (20) + TCP base header (20), the shortest shape judged here.
    if data + L2 + 40 > end {
        return Fast::Full;
    }
    // SAFETY: every read below through `at` is at a constant offset under L2 + 40, inside the
    // bound just checked; the verifier checks the same.
    let at = |off: usize| unsafe { *((data + off) as *const u8) };
    let v6 = if L2 == ETH_HLEN {
        match be16(at(12), at(13)) {
            ETH_P_IP => false,
            ETH_P_IPV6 => true,
            ETH_P_8021Q | ETH_P_8021AD => return Fast::Full,
            // ARP, LLDP, ...: never interesting, and the full parser counts nothing for them.
            _ => return Fast::Irrelevant,
        }
    } else {
        match at(0) >> 4 {
            4 => false,
            6 => true,
            _ => return Fast::Full,
        }
    };
    // Where TCP starts and the next protocol.
    let (l4, next) = if !v6 {
        // Version 4, IHL 5, not a later fragment.
        if at(L2) != 0x45 || be16(at(L2 + 6), at(L2 + 7)) & 0x1fff != 0 {
            return Fast::Full;
        }
        (L2 + 20, at(L2 + 9))
    } else {
        if data + L2 + 60 > end || at(L2) >> 4 != 6 {
            return Fast::Full;
        }
        // SAFETY: as above, now under L2 + 60.
        let next = unsafe { *((data + L2 + 6) as *const u8) };
        (L2 + 40, next)
    };
    match next {
        IPPROTO_TCP => {}
        // ICMP errors of the family: answers on ingress, for the full parser.
        IPPROTO_ICMP | IPPROTO_ICMPV6 if (next == IPPROTO_ICMPV6) == v6 => {
            return if dir == Direction::Egress {
                Fast::Irrelevant
            } else {
                Fast::Full
            };
        }
        // IPv6 extension headers: the full parser walks them.
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_AUTH | IPV6_DEST_OPTS if v6 => {
            return Fast::Full;
        }
        _ => return Fast::Irrelevant,
    }
    let tcp = data + l4;
    if tcp + 20 > end {
        return Fast::Full;
    }
    // SAFETY: offsets under 20 of the TCP header just checked.
    let t = |off: usize| unsafe { *((tcp + off) as *const u8) };
    let doff = (t(12) >> 4) as usize * 4;
    // Malformed or cut short: the full parser counts those.
    if doff < 20 || tcp + doff > end {
        return Fast::Full;
    }
    let flags = t(13);
    if !flags_matter(flags, dir) {
        return Fast::Irrelevant;
    }
    // The key is written in place, oriented with the connecting side as source: a zeroed key
    // (whole words), then the address bytes (byte-wise copies would call memset for the rest).
    let egress = dir == Direction::Egress;
    let mut key = FlowKey {
        family: if v6 { FAMILY_V6 } else { FAMILY_V4 },
        ..FlowKey::default()
    };
    let (sport, dport) = (be16(t(0), t(1)), be16(t(2), t(3)));
    if !v6 {
        let (local, remote) = if egress {
            (L2 + 12, L2 + 16)
        } else {
            (L2 + 16, L2 + 12)
        };
        let mut i = 0;
        while i < 4 {
            key.src_addr[i] = at(local + i);
            key.dst_addr[i] = at(remote + i);
            i += 1;
        }
    } else {
        let (local, remote) = if egress {
            (L2 + 8, L2 + 24)
        } else {
            (L2 + 24, L2 + 8)
        };
        let mut i = 0;
        while i < 16 {
            // SAFETY: offsets L2 + 8 .. L2 + 40, under the L2 + 60 bound checked for IPv6.
            unsafe {
                key.src_addr[i] = *((data + local + i) as *const u8);
                key.dst_addr[i] = *((data + remote + i) as *const u8);
            }
            i += 1;
        }
    }
    if egress {
        key.src_port = sport;
        key.dst_port = dport;
        // Where the IP packet ends by its own length, as the full parser computes it.
        let ip_end = if !v6 {
            let total = be16(at(L2 + 2), at(L2 + 3)) as usize;
            if total > 20 {
                L2 + total
            } else {
                L2 + 20
            }
        } else {
            L2 + 40 + be16(at(L2 + 4), at(L2 + 5)) as usize
        };
        return Fast::Parsed(Parsed::Syn {
            key,
            isn: u32::from_be_bytes([t(4), t(5), t(6), t(7)]),
            data_len: parse::syn_data_len(ip_end, l4 + doff),
        });
    }
    // The answer travels the other way: its destination is the connecting side.
    key.src_port = dport;
    key.dst_port = sport;
    Fast::Parsed(Parsed::Answer {
        key,
        ack: u32::from_be_bytes([t(8), t(9), t(10), t(11)]),
        answer: parse::answer_of(flags),
    })
}

/// Parses the packet in `ctx`, counting why when it means nothing.
#[inline(always)]
pub fn parse(ctx: &TcContext, link: Link, dir: Direction) -> Option<Parsed> {
    let fast = match link {
        Link::Ethernet => fast::<ETH_HLEN>(ctx, dir),
        Link::RawIp => fast::<0>(ctx, dir),
    };
    match fast {
        Fast::Irrelevant => return None,
        Fast::Parsed(p) => return Some(p),
        Fast::Full => {}
    }
    match parse::parse(&Skb(ctx), link, dir) {
        Ok(p) => Some(p),
        Err(skip) => {
            if let Some(c) = skip.counter() {
                count(c);
            }
            None
        }
    }
}
