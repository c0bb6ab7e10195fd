//! The classifiers' side of parsing: a fast path that lets the common packets (data and plain
//! ACKs) leave with a few direct reads, then the shared parser (`netrace_common::parse`, the
//! same rules `netrace analyze` runs over captures) reading through `bpf_skb_load_bytes`.

use aya_ebpf::programs::TcContext;
use netrace_common::parse::{
    self, be16, flags_matter, Direction, Link, Packet, Parsed, ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q,
    ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPV6_AUTH, IPV6_DEST_OPTS,
    IPV6_FRAGMENT, IPV6_HOP_BY_HOP, IPV6_ROUTING,
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

/// The fast path: most packets are plain data or ACKs in the common shape (untagged IPv4
/// without options, untagged IPv6 straight to TCP or UDP), readable in the skb's linear data.
/// Judged with direct packet reads, they leave here. `false` only where the full parser would
/// also drop the packet without touching a counter; anything unusual (tags, options,
/// fragments, extension headers, short or non-linear data) goes on to the full parser.
/// `L2` is the link-layer header's length: 14 (Ethernet) or 0 (the packet starts at IP).
#[inline(always)]
fn surely_irrelevant<const L2: usize>(ctx: &TcContext, dir: Direction) -> bool {
    let (data, end) = (ctx.data(), ctx.data_end());
    // Link header + IPv4 (20) + TCP base header (20), the shortest shape judged here.
    if data + L2 + 40 > end {
        return false;
    }
    // SAFETY: every read below is at a constant offset under L2 + 40, inside the bound just
    // checked; the verifier checks the same.
    let at = |off: usize| unsafe { *((data + off) as *const u8) };
    let v6 = if L2 == ETH_HLEN {
        match be16(at(12), at(13)) {
            ETH_P_IP => false,
            ETH_P_IPV6 => true,
            ETH_P_8021Q | ETH_P_8021AD => return false,
            // ARP, LLDP, ...: never interesting, and the full parser counts nothing for them.
            _ => return true,
        }
    } else {
        match at(0) >> 4 {
            4 => false,
            6 => true,
            _ => return false,
        }
    };
    let (l4, next) = if !v6 {
        // Version 4, IHL 5, not a later fragment.
        if at(L2) != 0x45 || be16(at(L2 + 6), at(L2 + 7)) & 0x1fff != 0 {
            return false;
        }
        (L2 + 20, at(L2 + 9))
    } else {
        if data + L2 + 60 > end || at(L2) >> 4 != 6 {
            return false;
        }
        // SAFETY: as above, now under L2 + 60.
        let next = unsafe { *((data + L2 + 6) as *const u8) };
        (L2 + 40, next)
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
            doff >= 20 && tcp + doff <= end && !flags_matter(flags, dir)
        }
        IPPROTO_ICMP if !v6 => dir == Direction::Egress,
        IPPROTO_ICMPV6 if v6 => dir == Direction::Egress,
        // IPv6 extension headers: the full parser walks them.
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_AUTH | IPV6_DEST_OPTS if v6 => false,
        _ => true,
    }
}

/// Parses the packet in `ctx`, counting why when it means nothing.
#[inline(always)]
pub fn parse(ctx: &TcContext, link: Link, dir: Direction) -> Option<Parsed> {
    let irrelevant = match link {
        Link::Ethernet => surely_irrelevant::<ETH_HLEN>(ctx, dir),
        Link::RawIp => surely_irrelevant::<0>(ctx, dir),
    };
    if irrelevant {
        return None;
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
