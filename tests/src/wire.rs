//! Crafted frames: the one packet builder of every netrace test (Ethernet with 802.1Q /
//! 802.1ad tags, IPv4 with options and fragment fields, IPv6 with extension-header chains, TCP,
//! UDP, ICMP and ICMPv6, ARP), built byte by byte in network byte order so that headers can lie
//! (IHL, data offset, version, truncation), plus an `AF_PACKET` [`Injector`] that puts frames
//! on a lab interface. netrace's `BPF_PROG_TEST_RUN` tests (`netrace/tests/parser.rs`) and the
//! lab's on-the-wire tests (`tests/tests/robustness.rs`) both build their frames here.
//!
//! Checksums are computed where cheap (the IPv4 header) and left zero elsewhere: netrace's
//! parser never looks at them, and crafted frames are never delivered to a socket.
//!
//! Sent on an interface from inside its namespace, a frame passes that interface's tc
//! *egress* (`dev_queue_xmit`, no qdisc bypass) and arrives at the veth peer's tc *ingress*.
//! So frames for netrace's egress program are sent on the watched interface itself, frames for
//! its ingress program on the peer. Every frame carries [`FOREIGN_MAC`] as its destination, so
//! the receiving stack drops it as "for another host" right after tc: crafted frames are seen
//! by netrace and by nothing else (no RST, no ICMP error comes back).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{bail, Context as _, Result};

use crate::netns;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv6 "no next header".
pub const IPPROTO_NONE: u8 = 59;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_ECE: u8 = 0x40;
pub const TCP_CWR: u8 = 0x80;

/// IPv4 "don't fragment".
pub const IP_DF: u16 = 0x4000;
/// IPv4 "more fragments".
pub const IP_MF: u16 = 0x2000;

/// A locally administered unicast address no lab interface has: the destination of every
/// crafted frame, so the receiving stack drops it (`PACKET_OTHERHOST`) after tc has seen it.
pub const FOREIGN_MAC: [u8; 6] = [0x02, 0x6e, 0x72, 0x74, 0x00, 0x01];
const SOURCE_MAC: [u8; 6] = [0x02, 0x6e, 0x72, 0x74, 0x00, 0x02];

/// An 802.1Q tag (TPID, TCI) for VLAN `vid`.
pub fn dot1q(vid: u16) -> (u16, u16) {
    (ETH_P_8021Q, vid & 0x0fff)
}

/// An 802.1ad (outer QinQ) tag (TPID, TCI) for VLAN `vid`.
pub fn dot1ad(vid: u16) -> (u16, u16) {
    (ETH_P_8021AD, vid & 0x0fff)
}

/// An Ethernet frame to [`FOREIGN_MAC`]: each tag as (TPID, TCI), then `ethertype`, `payload`.
pub fn ethernet(tags: &[(u16, u16)], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(14 + 4 * tags.len() + payload.len());
    out.extend_from_slice(&FOREIGN_MAC);
    out.extend_from_slice(&SOURCE_MAC);
    for (tpid, tci) in tags {
        out.extend_from_slice(&tpid.to_be_bytes());
        out.extend_from_slice(&tci.to_be_bytes());
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

/// An IPv4 header. `ihl` overrides the header-length field (it may lie); options are padded
/// to 4 bytes.
#[derive(Clone, Debug)]
pub struct Ipv4 {
    pub version: u8,
    pub ihl: Option<u8>,
    /// Flags and fragment offset (8-byte units), as the 16-bit wire field.
    pub flags_frag: u16,
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
            flags_frag: IP_DF,
            proto,
            src,
            dst,
            options: Vec::new(),
        }
    }

    /// `len` bytes of options: NOPs ended by End-of-Options-List.
    pub fn option_bytes(mut self, len: usize) -> Self {
        self.options = vec![1u8; len];
        if let Some(last) = self.options.last_mut() {
            *last = 0;
        }
        self
    }

    pub fn ihl(mut self, ihl: u8) -> Self {
        self.ihl = Some(ihl);
        self
    }

    pub fn flags_frag(mut self, v: u16) -> Self {
        self.flags_frag = v;
        self
    }

    pub fn version(mut self, v: u8) -> Self {
        self.version = v;
        self
    }

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
        h.push(0);
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&0x4e52_u16.to_be_bytes()); // id
        h.extend_from_slice(&self.flags_frag.to_be_bytes());
        h.push(64);
        h.push(self.proto);
        h.extend_from_slice(&[0, 0]);
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
    /// Hop-by-hop options with `len8` extra 8-byte units.
    HopByHop { len8: u8 },
    /// Destination options with `len8` extra 8-byte units.
    DestOpts { len8: u8 },
    /// Routing header (segments left 0) with `len8` extra 8-byte units.
    Routing { len8: u8 },
    /// Fragment header: offset in 8-byte units and the M flag.
    Fragment { offset: u16, more: bool },
    /// Authentication header; `len4` is its Payload Len field (4-byte units minus 2).
    Auth { len4: u8 },
}

impl Ext {
    /// The header's protocol number (what the previous header names as "next").
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
            Ext::HopByHop { len8 } | Ext::DestOpts { len8 } | Ext::Routing { len8 } => {
                let len = (usize::from(len8) + 1) * 8;
                let mut b = vec![0u8; len];
                b[0] = next;
                b[1] = len8;
                if !matches!(self, Ext::Routing { .. }) {
                    b[2] = 1; // PadN over the rest
                    b[3] = (len - 4) as u8;
                }
                b
            }
            Ext::Fragment { offset, more } => {
                let mut b = vec![0u8; 8];
                b[0] = next;
                b[2..4].copy_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                b[4..8].copy_from_slice(&0x6e72_7400_u32.to_be_bytes());
                b
            }
            Ext::Auth { len4 } => {
                let mut b = vec![0u8; (usize::from(len4) + 2) * 4];
                b[0] = next;
                b[1] = len4;
                b[4..8].copy_from_slice(&0x0000_0100_u32.to_be_bytes()); // SPI
                b
            }
        }
    }
}

/// An IPv6 header, a chain of extension headers, then the upper layer `proto`.
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

    pub fn exts(mut self, exts: &[Ext]) -> Self {
        self.exts = exts.to_vec();
        self
    }

    pub fn version(mut self, v: u8) -> Self {
        self.version = v;
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
        h.push(64);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(&chain);
        h.extend_from_slice(payload);
        h
    }
}

/// A TCP header; `data_offset` overrides the wire field (32-bit words).
#[derive(Clone, Debug)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub data_offset: Option<u8>,
    pub options: Vec<u8>,
    /// Bytes after the header (a Fast Open SYN's data).
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
            options: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// A SYN as Linux sends it (MSS, SACK permitted, timestamps, window scale).
    pub fn syn(sport: u16, dport: u16, isn: u32) -> Self {
        let mut t = Self::new(sport, dport, TCP_SYN).seq(isn);
        t.options = vec![
            2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
        ];
        t
    }

    /// The answer to a SYN `sport -> dport`: travels `dport -> sport` with `flags` and `ack`.
    pub fn answer(syn_sport: u16, syn_dport: u16, flags: u8, ack: u32) -> Self {
        Self::new(syn_dport, syn_sport, flags)
            .seq(0x6e72_7400)
            .ack(ack)
    }

    pub fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    pub fn ack(mut self, ack: u32) -> Self {
        self.ack = ack;
        self
    }

    /// Drops the TCP options.
    pub fn without_options(mut self) -> Self {
        self.options.clear();
        self
    }

    pub fn data_offset(mut self, words: u8) -> Self {
        self.data_offset = Some(words);
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
        h.extend_from_slice(&64240_u16.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0, 0]); // checksum (nobody checks it), urgent pointer
        h.extend_from_slice(&options);
        h.extend_from_slice(&self.payload);
        h
    }
}

/// An ICMP / ICMPv6 message: type, code, zero checksum, `rest` (the 4 bytes of
/// rest-of-header: unused in errors, identifier and sequence in echoes), body.
pub fn icmp(icmp_type: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut h = vec![icmp_type, code, 0, 0];
    h.extend_from_slice(&rest);
    h.extend_from_slice(body);
    h
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

/// An ARP request (who has `target`, tell `sender`), IPv4 over Ethernet.
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    b.extend_from_slice(&ETH_P_IP.to_be_bytes());
    b.extend_from_slice(&[6, 4]);
    b.extend_from_slice(&1u16.to_be_bytes()); // request
    b.extend_from_slice(&SOURCE_MAC);
    b.extend_from_slice(&sender.octets());
    b.extend_from_slice(&[0; 6]);
    b.extend_from_slice(&target.octets());
    ethernet(&[], ETH_P_ARP, &b)
}

/// Ethernet + IPv4 + TCP.
pub fn tcp4(tags: &[(u16, u16)], ip: &Ipv4, tcp: &Tcp) -> Vec<u8> {
    ethernet(tags, ETH_P_IP, &ip.build(&tcp.build()))
}

/// Ethernet + IPv6 (+ extension headers) + TCP.
pub fn tcp6(tags: &[(u16, u16)], ip: &Ipv6, tcp: &Tcp) -> Vec<u8> {
    ethernet(tags, ETH_P_IPV6, &ip.build(&tcp.build()))
}

/// An IPv4 or IPv6 header, for tests that run over both families.
#[derive(Clone, Debug)]
pub enum Ip {
    V4(Ipv4),
    V6(Ipv6),
}

impl Ip {
    /// A plain header `src -> dst` carrying `proto`. Panics when the two addresses are of
    /// different families (a bug in the test).
    pub fn new(src: IpAddr, dst: IpAddr, proto: u8) -> Self {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => Ip::V4(Ipv4::new(s, d, proto)),
            (IpAddr::V6(s), IpAddr::V6(d)) => Ip::V6(Ipv6::new(s, d, proto)),
            _ => panic!("a packet from {src} to {dst} mixes address families"),
        }
    }

    /// The ethertype announcing this header.
    pub fn ethertype(&self) -> u16 {
        match self {
            Ip::V4(_) => ETH_P_IP,
            Ip::V6(_) => ETH_P_IPV6,
        }
    }

    /// Sets the header's version field (to make it lie).
    pub fn version(self, v: u8) -> Self {
        match self {
            Ip::V4(h) => Ip::V4(h.version(v)),
            Ip::V6(h) => Ip::V6(h.version(v)),
        }
    }

    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        match self {
            Ip::V4(h) => h.build(payload),
            Ip::V6(h) => h.build(payload),
        }
    }

    /// Ethernet (with `tags`) + this header + `payload`.
    pub fn frame(&self, tags: &[(u16, u16)], payload: &[u8]) -> Vec<u8> {
        ethernet(tags, self.ethertype(), &self.build(payload))
    }
}

/// The ICMP protocol number of `addr`'s family (ICMP or ICMPv6).
pub fn icmp_proto(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        IPPROTO_ICMP
    } else {
        IPPROTO_ICMPV6
    }
}

/// Ethernet (with `tags`) + IPv4 or IPv6 `src -> dst` + `tcp`.
pub fn tcp_frame(tags: &[(u16, u16)], src: IpAddr, dst: IpAddr, tcp: &Tcp) -> Vec<u8> {
    Ip::new(src, dst, IPPROTO_TCP).frame(tags, &tcp.build())
}

/// A SYN as Linux sends it, `from -> to`, with sequence number `isn`.
pub fn syn(from: SocketAddr, to: SocketAddr, isn: u32) -> Vec<u8> {
    tcp_frame(
        &[],
        from.ip(),
        to.ip(),
        &Tcp::syn(from.port(), to.port(), isn),
    )
}

/// The answer to the SYN `from -> to`: a segment `to -> from` with `flags` and `ack`.
pub fn answer(from: SocketAddr, to: SocketAddr, flags: u8, ack: u32) -> Vec<u8> {
    tcp_frame(
        &[],
        to.ip(),
        from.ip(),
        &Tcp::answer(from.port(), to.port(), flags, ack),
    )
}

/// An ICMP or ICMPv6 error (`icmp_type`, `code`) from `router` to the sender of the SYN
/// `from -> to` with sequence number `seq`, quoting it: for IPv4 the IP header and the first
/// 8 bytes of TCP (what RFC 792 requires at least), for IPv6 the whole SYN (as RFC 4443
/// asks, as much as fits).
pub fn icmp_error(
    router: IpAddr,
    (from, to): (SocketAddr, SocketAddr),
    seq: u32,
    icmp_type: u8,
    code: u8,
) -> Vec<u8> {
    let tcp = Tcp::syn(from.port(), to.port(), seq).build();
    let quoted_tcp = if from.is_ipv4() { &tcp[..8] } else { &tcp[..] };
    let quoted = Ip::new(from.ip(), to.ip(), IPPROTO_TCP).build(quoted_tcp);
    let msg = icmp(icmp_type, code, [0; 4], &quoted);
    Ip::new(router, from.ip(), icmp_proto(router)).frame(&[], &msg)
}

const SOL_PACKET: i32 = 263;
const PACKET_QDISC_BYPASS: i32 = 20;

/// An `AF_PACKET` raw socket bound to one interface of one namespace; frames sent through it
/// go out of that interface through its tc egress hook.
#[derive(Debug)]
pub struct Injector {
    fd: OwnedFd,
    ifindex: i32,
    /// The interface, for messages.
    pub iface: String,
}

impl Injector {
    /// Opens the socket inside namespace `ns` on interface `iface`.
    pub fn open(ns: &str, iface: &str) -> Result<Self> {
        let name = iface.to_owned();
        let (fd, ifindex) = netns::spawn_in(ns, "lab-injector", move || {
            let c = std::ffi::CString::new(name.clone())?;
            // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
            let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
            if ifindex == 0 {
                bail!("no interface {name} in this namespace");
            }
            // SAFETY: socket() has no memory-safety preconditions; the result is checked.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            if raw < 0 {
                return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
            }
            // SAFETY: `raw` is a fresh descriptor owned by nothing else.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let off: i32 = 0;
            // SAFETY: a valid int option value and its size; the fd is open.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    SOL_PACKET,
                    PACKET_QDISC_BYPASS,
                    (&off as *const i32).cast(),
                    std::mem::size_of::<i32>() as u32,
                )
            };
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = 0; // send only: receive nothing
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: `sll` is a valid sockaddr_ll and its exact size is passed.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("bind(AF_PACKET, {name})"));
            }
            Ok((fd, ifindex as i32))
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("the injector thread panicked"))??;
        Ok(Self {
            fd,
            ifindex,
            iface: iface.to_owned(),
        })
    }

    /// Sends one frame as is (it must start with an Ethernet header).
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&FOREIGN_MAC);
        // SAFETY: `frame` is valid for `frame.len()` bytes; `sll` is a valid address of the
        // size passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n as usize != frame.len() {
            return Err(std::io::Error::other(format!(
                "sent {n} of {} bytes",
                frame.len()
            )));
        }
        Ok(())
    }
}
