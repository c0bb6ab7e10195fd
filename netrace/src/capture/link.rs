//! Link-layer types a capture can carry, and how each one's packets become the bytes the packet
//! parser reads: an Ethernet frame, either the captured one or one made up in front of the
//! network-layer bytes (zero addresses, the packet's EtherType), so that a single parser entry
//! point serves every link type.

/// Length of the Ethernet header the parser starts with (two addresses and an EtherType).
pub const ETH_HLEN: usize = 14;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

/// The link layers netrace reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Ethernet (link type 1), VLAN tags left for the parser.
    Ethernet,
    /// Linux cooked capture v1 (113; `tcpdump -i any` before libpcap 1.10): a 16-byte header
    /// ending in the EtherType.
    LinuxSll,
    /// Linux cooked capture v2 (276; `tcpdump -i any` since libpcap 1.10): a 20-byte header
    /// starting with the EtherType, with the interface index.
    LinuxSll2,
    /// Raw IPv4 or IPv6 (101, and 12 and 14 where old files wrote the platform's DLT_RAW;
    /// 228 IPv4 only, 229 IPv6 only): the version nibble tells which.
    RawIp,
    /// BSD loopback (0 NULL in the capturing host's byte order, 108 LOOP in network order): a
    /// 4-byte address family, then IP.
    Loopback,
}

impl Link {
    /// The link layer for a pcap/pcapng link-type number, `None` for one netrace does not read.
    pub fn from_linktype(linktype: i32) -> Option<Self> {
        match linktype {
            1 => Some(Self::Ethernet),
            113 => Some(Self::LinuxSll),
            276 => Some(Self::LinuxSll2),
            12 | 14 | 101 | 228 | 229 => Some(Self::RawIp),
            0 | 108 => Some(Self::Loopback),
            _ => None,
        }
    }

    /// Bytes before the network layer (or before a VLAN tag).
    pub const fn header_len(self) -> usize {
        match self {
            Self::Ethernet => ETH_HLEN,
            Self::LinuxSll => 16,
            Self::LinuxSll2 => 20,
            Self::RawIp => 0,
            Self::Loopback => 4,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Ethernet => "Ethernet",
            Self::LinuxSll => "Linux cooked v1",
            Self::LinuxSll2 => "Linux cooked v2",
            Self::RawIp => "raw IP",
            Self::Loopback => "loopback",
        }
    }

    /// The shortest snap length that holds the link header, an IPv4 header and a TCP header
    /// (no options, no VLAN tag).
    pub const fn min_snaplen_v4(self) -> u32 {
        self.header_len() as u32 + 20 + 20
    }

    /// The same for IPv6.
    pub const fn min_snaplen_v6(self) -> u32 {
        self.header_len() as u32 + 40 + 20
    }
}

/// What a cooked (`-i any`) capture says about a packet besides its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cooked {
    /// Linux packet type: 0 to this host, 1 broadcast, 2 multicast, 3 to another host,
    /// 4 sent by this host.
    pub packet_type: u8,
    /// The interface the packet was seen on (v2 only).
    pub ifindex: Option<u32>,
}

/// Linux packet type of a packet this host sent.
pub const PACKET_OUTGOING: u8 = 4;

/// The EtherType for network-layer bytes from their version nibble; 0 (none) when it is neither
/// IPv4 nor IPv6 (the parser then leaves the packet alone).
fn ethertype_of_ip(l3: &[u8]) -> u16 {
    match l3.first().map(|b| b >> 4) {
        Some(4) => ETHERTYPE_IPV4,
        Some(6) => ETHERTYPE_IPV6,
        _ => 0,
    }
}

/// Writes `captured` into `out` as an Ethernet frame. Returns the cooked-capture facts, if any.
/// A packet shorter than its link header becomes a frame with EtherType 0 and no payload: the
/// parser skips it.
pub(crate) fn to_ethernet(link: Link, captured: &[u8], out: &mut Vec<u8>) -> Option<Cooked> {
    out.clear();
    let made_up = |out: &mut Vec<u8>, ethertype: u16, payload: &[u8]| {
        out.extend_from_slice(&[0; 12]);
        out.extend_from_slice(&ethertype.to_be_bytes());
        out.extend_from_slice(payload);
    };
    match link {
        Link::Ethernet => {
            out.extend_from_slice(captured);
            None
        }
        Link::RawIp => {
            made_up(out, ethertype_of_ip(captured), captured);
            None
        }
        Link::Loopback => {
            let l3 = captured.get(4..).unwrap_or_default();
            made_up(out, ethertype_of_ip(l3), l3);
            None
        }
        Link::LinuxSll => match captured {
            [pt0, pt1, _, _, _, _, _, _, _, _, _, _, _, _, e0, e1, rest @ ..] => {
                made_up(out, u16::from_be_bytes([*e0, *e1]), rest);
                Some(Cooked {
                    packet_type: if *pt0 == 0 { *pt1 } else { u8::MAX },
                    ifindex: None,
                })
            }
            _ => {
                made_up(out, 0, &[]);
                None
            }
        },
        Link::LinuxSll2 => match captured {
            [e0, e1, _, _, i0, i1, i2, i3, _, _, pt, _, _, _, _, _, _, _, _, _, rest @ ..] => {
                made_up(out, u16::from_be_bytes([*e0, *e1]), rest);
                Some(Cooked {
                    packet_type: *pt,
                    ifindex: Some(u32::from_be_bytes([*i0, *i1, *i2, *i3])),
                })
            }
            _ => {
                made_up(out, 0, &[]);
                None
            }
        },
    }
}

/// A name for a link-type number, for error messages.
pub fn linktype_name(linktype: i32) -> &'static str {
    match linktype {
        0 => "NULL",
        1 => "ETHERNET",
        6 => "IEEE802_5",
        8 => "SLIP",
        9 => "PPP",
        10 => "FDDI",
        12 | 14 | 101 => "RAW",
        50 => "PPP_HDLC",
        51 => "PPP_ETHER",
        104 => "C_HDLC",
        105 => "IEEE802_11",
        108 => "LOOP",
        113 => "LINUX_SLL",
        119 => "PRISM_HEADER",
        127 => "IEEE802_11_RADIOTAP",
        147..=162 => "USER",
        163 => "IEEE802_11_AVS",
        187 => "BLUETOOTH_HCI_H4",
        189 => "USB_LINUX",
        192 => "PPI",
        195 => "IEEE802_15_4",
        220 => "USB_LINUX_MMAPPED",
        228 => "IPV4",
        229 => "IPV6",
        239 => "NFLOG",
        249 => "NETLINK",
        252 => "WIRESHARK_UPPER_PDU",
        276 => "LINUX_SLL2",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_types_map() {
        assert_eq!(Link::from_linktype(1), Some(Link::Ethernet));
        assert_eq!(Link::from_linktype(113), Some(Link::LinuxSll));
        assert_eq!(Link::from_linktype(276), Some(Link::LinuxSll2));
        for raw in [12, 14, 101, 228, 229] {
            assert_eq!(Link::from_linktype(raw), Some(Link::RawIp), "{raw}");
        }
        assert_eq!(Link::from_linktype(0), Some(Link::Loopback));
        assert_eq!(Link::from_linktype(108), Some(Link::Loopback));
        assert_eq!(Link::from_linktype(127), None);
        assert_eq!(linktype_name(127), "IEEE802_11_RADIOTAP");
        assert_eq!(Link::Ethernet.min_snaplen_v4(), 54);
        assert_eq!(Link::Ethernet.min_snaplen_v6(), 74);
    }

    #[test]
    fn cooked_and_raw_become_ethernet() {
        let ip4 = [0x45u8, 0, 0, 20];
        let mut out = Vec::new();

        assert_eq!(to_ethernet(Link::RawIp, &ip4, &mut out), None);
        assert_eq!(&out[12..14], &[0x08, 0x00]);
        assert_eq!(&out[14..], &ip4);

        let ip6 = [0x60u8, 0, 0, 0];
        let mut lo = vec![30, 0, 0, 0];
        lo.extend_from_slice(&ip6);
        to_ethernet(Link::Loopback, &lo, &mut out);
        assert_eq!(&out[12..14], &[0x86, 0xdd]);
        assert_eq!(&out[14..], &ip6);

        let mut sll = vec![0, 4, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0, 0x81, 0x00];
        sll.extend_from_slice(&[0, 5, 0x08, 0x00]);
        let c = to_ethernet(Link::LinuxSll, &sll, &mut out);
        assert_eq!(
            c,
            Some(Cooked {
                packet_type: PACKET_OUTGOING,
                ifindex: None
            })
        );
        assert_eq!(&out[12..], &[0x81, 0x00, 0, 5, 0x08, 0x00]);

        let mut sll2 = vec![
            0x86, 0xdd, 0, 0, 0, 0, 0, 7, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0,
        ];
        sll2.extend_from_slice(&ip6);
        let c = to_ethernet(Link::LinuxSll2, &sll2, &mut out);
        assert_eq!(
            c,
            Some(Cooked {
                packet_type: 0,
                ifindex: Some(7)
            })
        );
        assert_eq!(&out[12..14], &[0x86, 0xdd]);
        assert_eq!(&out[14..], &ip6);

        // Shorter than the link header: an empty frame the parser skips.
        assert_eq!(to_ethernet(Link::LinuxSll2, &sll2[..5], &mut out), None);
        assert_eq!(out, [0; 14]);
        to_ethernet(Link::RawIp, &[], &mut out);
        assert_eq!(out, [0; 14]);
    }
}
