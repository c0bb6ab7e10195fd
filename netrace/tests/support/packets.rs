//! A small packet builder for feeding crafted frames to the kernel programs through
//! `BPF_PROG_TEST_RUN`: Ethernet with optional 802.1Q / 802.1ad tags, IPv4 (options, IHL,
//! fragment fields), IPv6 with extension headers, TCP, UDP, ICMP and ICMPv6, ARP.
//!
//! Everything is built by hand, byte by byte, in network byte order. Checksums are computed
//! where cheap (IPv4 header) and left zero elsewhere: the parser never looks at them.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_NONE: u8 = 59;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_ECE: u8 = 0x40;
pub const TCP_CWR: u8 = 0x80;

/// IPv4 "don't fragment" flag, in the flags/fragment-offset field.
pub const IP_DF: u16 = 0x4000;
/// IPv4 "more fragments" flag, in the flags/fragment-offset field.
pub const IP_MF: u16 = 0x2000;

const SRC_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const DST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

/// One VLAN tag: the TPID announcing it and the tag control information.
#[derive(Clone, Copy, Debug)]
pub struct VlanTag {
    pub tpid: u16,
    pub tci: u16,
}

impl VlanTag {
    pub fn dot1q(vid: u16) -> Self {
        Self {
            tpid: ETH_P_8021Q,
            tci: vid & 0x0fff,
        }
    }

    pub fn dot1ad(vid: u16) -> Self {
        Self {
            tpid: ETH_P_8021AD,
            tci: vid & 0x0fff,
        }
    }
}

/// An Ethernet frame: MAC addresses, then each tag's TPID + TCI, then `ethertype`, then `payload`.
pub fn ethernet(tags: &[VlanTag], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(14 + 4 * tags.len() + payload.len());
    out.extend_from_slice(&DST_MAC);
    out.extend_from_slice(&SRC_MAC);
    for t in tags {
        out.extend_from_slice(&t.tpid.to_be_bytes());
        out.extend_from_slice(&t.tci.to_be_bytes());
    }
    out.extend_from_slice(&ethertype.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The RFC 1071 Internet checksum.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in bytes.chunks(2) {
        let word = match chunk {
            [a, b] => u16::from_be_bytes([*a, *b]),
            [a] => u16::from_be_bytes([*a, 0]),
            _ => 0,
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header. `ihl` is the header length field in 32-bit words as written on the wire
/// (it may lie: `None` means "computed from the options"); options are padded to 4 bytes.
#[derive(Clone, Debug)]
pub struct Ipv4 {
    pub version: u8,
    pub ihl: Option<u8>,
    pub id: u16,
    /// Flags (DF, MF) and fragment offset in 8-byte units, as the 16-bit wire field.
    pub flags_frag: u16,
    pub ttl: u8,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub options: Vec<u8>,
}

impl Ipv4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Self {
        Self {
            version: 4,
            ihl: None,
            id: 0x1234,
            flags_frag: IP_DF,
            ttl: 64,
            proto,
            src,
            dst,
            options: Vec::new(),
        }
    }

    /// Adds `len` bytes of options: NOPs ended by an End-of-Options-List byte.
    pub fn with_option_bytes(mut self, len: usize) -> Self {
        self.options = vec![1u8; len];
        if let Some(last) = self.options.last_mut() {
            *last = 0;
        }
        self
    }

    pub fn with_ihl(mut self, ihl: u8) -> Self {
        self.ihl = Some(ihl);
        self
    }

    pub fn with_flags_frag(mut self, flags_frag: u16) -> Self {
        self.flags_frag = flags_frag;
        self
    }

    pub fn with_version(mut self, version: u8) -> Self {
        self.version = version;
        self
    }

    /// The header followed by `payload`.
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let mut options = self.options.clone();
        while !options.len().is_multiple_of(4) {
            options.push(0);
        }
        let hlen = 20 + options.len();
        let ihl = self.ihl.unwrap_or((hlen / 4) as u8);
        let total = (hlen + payload.len()) as u16;
        let mut h = Vec::with_capacity(hlen + payload.len());
        h.push((self.version << 4) | (ihl & 0x0f));
        h.push(0); // DSCP / ECN
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&self.id.to_be_bytes());
        h.extend_from_slice(&self.flags_frag.to_be_bytes());
        h.push(self.ttl);
        h.push(self.proto);
        h.extend_from_slice(&[0, 0]); // checksum, below
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(&options);
        let c = checksum(&h[..hlen]);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(payload);
        h
    }
}

/// One IPv6 extension header.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    /// Hop-by-hop options, `len8` extra 8-byte units (Hdr Ext Len).
    HopByHop { len8: u8 },
    /// Routing header (type 0 layout, segments left 0), `len8` extra 8-byte units.
    Routing { len8: u8 },
    /// Destination options, `len8` extra 8-byte units.
    DestOpts { len8: u8 },
    /// Fragment header: offset in 8-byte units and the M flag.
    Fragment { offset: u16, more: bool },
    /// Authentication header; `len4` is the Payload Len field (length in 4-byte units minus 2).
    Auth { len4: u8 },
}

impl Ext {
    pub fn number(self) -> u8 {
        match self {
            Ext::HopByHop { .. } => 0,
            Ext::Routing { .. } => 43,
            Ext::Fragment { .. } => 44,
            Ext::Auth { .. } => 51,
            Ext::DestOpts { .. } => 60,
        }
    }

    fn build(self, next: u8) -> Vec<u8> {
        match self {
            Ext::HopByHop { len8 } | Ext::DestOpts { len8 } => {
                let len = (usize::from(len8) + 1) * 8;
                let mut b = vec![0u8; len];
                b[0] = next;
                b[1] = len8;
                // PadN covering the rest of the header.
                b[2] = 1;
                b[3] = (len - 4) as u8;
                b
            }
            Ext::Routing { len8 } => {
                let len = (usize::from(len8) + 1) * 8;
                let mut b = vec![0u8; len];
                b[0] = next;
                b[1] = len8;
                b[2] = 0; // routing type
                b[3] = 0; // segments left
                b
            }
            Ext::Fragment { offset, more } => {
                let mut b = vec![0u8; 8];
                b[0] = next;
                let field = (offset << 3) | u16::from(more);
                b[2..4].copy_from_slice(&field.to_be_bytes());
                b[4..8].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
                b
            }
            Ext::Auth { len4 } => {
                let len = (usize::from(len4) + 2) * 4;
                let mut b = vec![0u8; len];
                b[0] = next;
                b[1] = len4;
                b[4..8].copy_from_slice(&0x0000_0100_u32.to_be_bytes()); // SPI
                b
            }
        }
    }
}

/// An IPv6 header followed by a chain of extension headers, then the upper-layer `proto`.
#[derive(Clone, Debug)]
pub struct Ipv6 {
    pub version: u8,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub proto: u8,
    pub exts: Vec<Ext>,
}

impl Ipv6 {
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr, proto: u8) -> Self {
        Self {
            version: 6,
            src,
            dst,
            proto,
            exts: Vec::new(),
        }
    }

    pub fn with_exts(mut self, exts: &[Ext]) -> Self {
        self.exts = exts.to_vec();
        self
    }

    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let mut chain = Vec::new();
        for (i, e) in self.exts.iter().enumerate() {
            let next = self.exts.get(i + 1).map_or(self.proto, |n| n.number());
            chain.extend_from_slice(&e.build(next));
        }
        let first = self.exts.first().map_or(self.proto, |e| e.number());
        let plen = (chain.len() + payload.len()) as u16;
        let mut h = Vec::with_capacity(40 + chain.len() + payload.len());
        h.extend_from_slice(&(u32::from(self.version) << 28).to_be_bytes());
        h.extend_from_slice(&plen.to_be_bytes());
        h.push(first);
        h.push(64); // hop limit
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(&chain);
        h.extend_from_slice(payload);
        h
    }
}

/// A TCP header. `data_offset` is the wire field in 32-bit words (`None`: computed from the
/// options); options are padded with NOPs to 4 bytes.
#[derive(Clone, Debug)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub data_offset: Option<u8>,
    pub window: u16,
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Tcp {
    pub fn new(sport: u16, dport: u16, flags: u8) -> Self {
        Self {
            sport,
            dport,
            seq: 0,
            ack: 0,
            flags,
            data_offset: None,
            window: 64240,
            options: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// A SYN as Linux sends it: MSS, SACK-permitted, timestamps, window scale.
    pub fn syn(sport: u16, dport: u16, isn: u32) -> Self {
        let mut t = Self::new(sport, dport, TCP_SYN).seq(isn);
        t.options = vec![
            2, 4, 0x05, 0xb4, // MSS 1460
            4, 2, // SACK permitted
            8, 10, 0, 0, 0, 1, 0, 0, 0, 0, // timestamps
            1, // NOP
            3, 3, 7, // window scale 7
        ];
        t
    }

    pub fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    pub fn ack(mut self, ack: u32) -> Self {
        self.ack = ack;
        self
    }

    pub fn with_data_offset(mut self, words: u8) -> Self {
        self.data_offset = Some(words);
        self
    }

    pub fn without_options(mut self) -> Self {
        self.options.clear();
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut options = self.options.clone();
        while !options.len().is_multiple_of(4) {
            options.push(1);
        }
        let hlen = 20 + options.len();
        let doff = self.data_offset.unwrap_or((hlen / 4) as u8);
        let mut h = Vec::with_capacity(hlen + self.payload.len());
        h.extend_from_slice(&self.sport.to_be_bytes());
        h.extend_from_slice(&self.dport.to_be_bytes());
        h.extend_from_slice(&self.seq.to_be_bytes());
        h.extend_from_slice(&self.ack.to_be_bytes());
        h.push(doff << 4);
        h.push(self.flags);
        h.extend_from_slice(&self.window.to_be_bytes());
        h.extend_from_slice(&[0, 0]); // checksum: not checked by anyone here
        h.extend_from_slice(&[0, 0]); // urgent pointer
        h.extend_from_slice(&options);
        h.extend_from_slice(&self.payload);
        h
    }
}

/// A UDP datagram (checksum left zero).
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(8 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

/// An ICMP or ICMPv6 message: type, code, checksum (zero), 4 bytes of "rest of header", body.
pub fn icmp(icmp_type: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(8 + body.len());
    h.push(icmp_type);
    h.push(code);
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&rest);
    h.extend_from_slice(body);
    h
}

/// An ARP request (who has `target`, tell `sender`) for IPv4 over Ethernet.
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    b.extend_from_slice(&ETH_P_IP.to_be_bytes());
    b.push(6);
    b.push(4);
    b.extend_from_slice(&1u16.to_be_bytes()); // request
    b.extend_from_slice(&SRC_MAC);
    b.extend_from_slice(&sender.octets());
    b.extend_from_slice(&[0; 6]);
    b.extend_from_slice(&target.octets());
    ethernet(&[], ETH_P_ARP, &b)
}

// ---- Whole frames used by the tests ----------------------------------------------------------

/// An Ethernet + IPv4 + TCP frame.
pub fn tcp4(tags: &[VlanTag], ip: &Ipv4, tcp: &Tcp) -> Vec<u8> {
    ethernet(tags, ETH_P_IP, &ip.build(&tcp.build()))
}

/// An Ethernet + IPv6 (+ extension headers) + TCP frame.
pub fn tcp6(tags: &[VlanTag], ip: &Ipv6, tcp: &Tcp) -> Vec<u8> {
    ethernet(tags, ETH_P_IPV6, &ip.build(&tcp.build()))
}

/// An outbound IPv4 SYN from `src:sport` to `dst:dport`.
pub fn syn4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, isn: u32) -> Vec<u8> {
    tcp4(
        &[],
        &Ipv4::new(src, dst, IPPROTO_TCP),
        &Tcp::syn(sport, dport, isn),
    )
}

/// An outbound IPv6 SYN from `[src]:sport` to `[dst]:dport`.
pub fn syn6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, isn: u32) -> Vec<u8> {
    tcp6(
        &[],
        &Ipv6::new(src, dst, IPPROTO_TCP),
        &Tcp::syn(sport, dport, isn),
    )
}

/// The inbound answer to an IPv4 SYN `local:lport -> remote:rport`: a TCP segment with `flags`
/// and acknowledgement number `ack`, travelling `remote:rport -> local:lport`.
pub fn answer4(
    local: Ipv4Addr,
    lport: u16,
    remote: Ipv4Addr,
    rport: u16,
    flags: u8,
    ack: u32,
) -> Vec<u8> {
    let tcp = Tcp::new(rport, lport, flags).seq(0x7000_0000).ack(ack);
    tcp4(&[], &Ipv4::new(remote, local, IPPROTO_TCP), &tcp)
}

/// The IPv6 counterpart of [`answer4`].
pub fn answer6(
    local: Ipv6Addr,
    lport: u16,
    remote: Ipv6Addr,
    rport: u16,
    flags: u8,
    ack: u32,
) -> Vec<u8> {
    let tcp = Tcp::new(rport, lport, flags).seq(0x7000_0000).ack(ack);
    tcp6(&[], &Ipv6::new(remote, local, IPPROTO_TCP), &tcp)
}

/// An ICMP error of `icmp_type`/`code` sent by `router` to `local`, quoting the IPv4 SYN
/// `local:lport -> remote:rport` with sequence number `seq` (IP header + 8 bytes of TCP, as
/// RFC 792 requires at least).
#[allow(clippy::too_many_arguments)]
pub fn icmp4_error(
    router: Ipv4Addr,
    local: Ipv4Addr,
    lport: u16,
    remote: Ipv4Addr,
    rport: u16,
    seq: u32,
    icmp_type: u8,
    code: u8,
) -> Vec<u8> {
    let quoted_ip = Ipv4::new(local, remote, IPPROTO_TCP);
    let quoted_tcp = Tcp::syn(lport, rport, seq).build();
    let quoted = quoted_ip.build(&quoted_tcp[..8]);
    let msg = icmp(icmp_type, code, [0; 4], &quoted);
    ethernet(
        &[],
        ETH_P_IP,
        &Ipv4::new(router, local, IPPROTO_ICMP).build(&msg),
    )
}

/// An ICMPv6 error of `icmp_type`/`code` sent by `router` to `local`, quoting the whole IPv6
/// SYN `[local]:lport -> [remote]:rport` with sequence number `seq`.
#[allow(clippy::too_many_arguments)]
pub fn icmp6_error(
    router: Ipv6Addr,
    local: Ipv6Addr,
    lport: u16,
    remote: Ipv6Addr,
    rport: u16,
    seq: u32,
    icmp_type: u8,
    code: u8,
) -> Vec<u8> {
    let quoted = Ipv6::new(local, remote, IPPROTO_TCP).build(&Tcp::syn(lport, rport, seq).build());
    let msg = icmp(icmp_type, code, [0; 4], &quoted);
    ethernet(
        &[],
        ETH_P_IPV6,
        &Ipv6::new(router, local, IPPROTO_ICMPV6).build(&msg),
    )
}
