//! Ethernet frames for `BPF_PROG_TEST_RUN`, built byte by byte: the packets netrace's programs
//! meet on an uplink. Addresses come only from 198.18.0.0/15 and 2001:db8::/32. Checksums are
//! left zero: the programs never read them.

pub const SYN: u8 = 0x02;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// The initial sequence number of every generated SYN; its SYN-ACK acknowledges `ISN + 1`.
pub const ISN: u32 = 0x1000_0000;

pub const CLIENT4: [u8; 4] = [198, 18, 0, 1];
pub const SERVER4: [u8; 4] = [198, 19, 0, 1];
pub const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const SERVER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const SERVER_PORT: u16 = 443;

const ETH_LEN: usize = 14;
/// Offsets in an IPv4 frame without IP options.
const V4_SRC: usize = ETH_LEN + 12;
const V4_DST: usize = ETH_LEN + 16;
const V4_SPORT: usize = ETH_LEN + 20;
const V4_DPORT: usize = ETH_LEN + 22;

fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// What a Linux client or server puts in a SYN or SYN-ACK (MSS, SACK permitted, timestamps,
/// window scale), or in any later segment (timestamps).
fn tcp_options(flags: u8) -> Vec<u8> {
    if flags & SYN != 0 {
        vec![
            2, 4, 0x05, 0xb4, // MSS 1460
            4, 2, // SACK permitted
            8, 10, 0, 0, 0, 1, 0, 0, 0, 0, // timestamps
            1, // NOP
            3, 3, 7, // window scale 7
        ]
    } else {
        vec![1, 1, 8, 10, 0, 0, 0, 2, 0, 0, 0, 1]
    }
}

fn tcp_header(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
    let options = tcp_options(flags);
    let doff = ((20 + options.len()) / 4) as u8;
    let mut h = Vec::with_capacity(20 + options.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&seq.to_be_bytes());
    h.extend_from_slice(&ack.to_be_bytes());
    h.push(doff << 4);
    h.push(flags);
    h.extend_from_slice(&64240u16.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    h.extend_from_slice(&options);
    h
}

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = eth(0x0800);
    let total = (20 + l4.len()) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]); // id, DF, ttl, proto, checksum
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(l4);
    f
}

/// An IPv4 TCP segment with `payload` zero bytes of data.
pub fn tcp4(
    src: [u8; 4],
    dst: [u8; 4],
    ports: (u16, u16),
    seq: u32,
    ack: u32,
    flags: u8,
    payload: usize,
) -> Vec<u8> {
    let mut l4 = tcp_header(ports.0, ports.1, seq, ack, flags);
    l4.resize(l4.len() + payload, 0);
    ipv4(src, dst, 6, &l4)
}

/// An IPv6 TCP segment without extension headers.
pub fn tcp6(src: [u8; 16], dst: [u8; 16], ports: (u16, u16), seq: u32, flags: u8) -> Vec<u8> {
    let l4 = tcp_header(ports.0, ports.1, seq, 0, flags);
    let mut f = eth(0x86dd);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    f.extend_from_slice(&[6, 64]); // next header TCP, hop limit
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&l4);
    f
}

/// An IPv4 UDP datagram with `payload` zero bytes.
pub fn udp4(src: [u8; 4], dst: [u8; 4], ports: (u16, u16), payload: usize) -> Vec<u8> {
    let mut l4 = Vec::with_capacity(8 + payload);
    l4.extend_from_slice(&ports.0.to_be_bytes());
    l4.extend_from_slice(&ports.1.to_be_bytes());
    l4.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.resize(8 + payload, 0);
    ipv4(src, dst, 17, &l4)
}

/// The client address and port of flow number `i`: ports 1024-65535, then the next address
/// in 198.18.0.0/16, so every `i` below 4 billion is its own 4-tuple.
pub fn flow(i: u32) -> ([u8; 4], u16) {
    const PORTS: u32 = 65536 - 1024;
    let port = 1024 + (i % PORTS) as u16;
    let host = i / PORTS + 1;
    ([198, 18, (host >> 8) as u8, (host & 0xff) as u8], port)
}

/// An outbound SYN of flow `i` (client → server).
pub fn syn4(i: u32) -> Vec<u8> {
    let (addr, port) = flow(i);
    tcp4(addr, SERVER4, (port, SERVER_PORT), ISN, 0, SYN, 0)
}

/// The SYN-ACK that answers [`syn4`] of flow `i` (server → client).
pub fn synack4(i: u32) -> Vec<u8> {
    let (addr, port) = flow(i);
    tcp4(
        SERVER4,
        addr,
        (SERVER_PORT, port),
        0x2000_0000,
        ISN.wrapping_add(1),
        SYN | ACK,
        0,
    )
}

/// Rewrites a frame made by [`syn4`] into flow `i`'s SYN, in place (no allocation).
pub fn set_syn_flow(frame: &mut [u8], i: u32) {
    let (addr, port) = flow(i);
    frame[V4_SRC..V4_SRC + 4].copy_from_slice(&addr);
    frame[V4_SPORT..V4_SPORT + 2].copy_from_slice(&port.to_be_bytes());
}

/// Rewrites a frame made by [`synack4`] into flow `i`'s SYN-ACK, in place.
pub fn set_synack_flow(frame: &mut [u8], i: u32) {
    let (addr, port) = flow(i);
    frame[V4_DST..V4_DST + 4].copy_from_slice(&addr);
    frame[V4_DPORT..V4_DPORT + 2].copy_from_slice(&port.to_be_bytes());
}

/// Sets the server port of a SYN made by [`syn4`] and of a SYN-ACK made by [`synack4`].
pub fn set_server_port(syn: &mut [u8], synack: &mut [u8], port: u16) {
    syn[V4_DPORT..V4_DPORT + 2].copy_from_slice(&port.to_be_bytes());
    synack[V4_SPORT..V4_SPORT + 2].copy_from_slice(&port.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_are_distinct_and_in_range() {
        assert_eq!(flow(0), ([198, 18, 0, 1], 1024));
        assert_eq!(flow(64511), ([198, 18, 0, 1], 65535));
        assert_eq!(flow(64512), ([198, 18, 0, 2], 1024));
        let mut f = syn4(0);
        set_syn_flow(&mut f, 64512);
        assert_eq!(f, syn4(64512));
        let mut a = synack4(0);
        set_synack_flow(&mut a, 70000);
        assert_eq!(a, synack4(70000));
        assert_eq!(syn4(0).len(), 14 + 20 + 40);
        assert_eq!(tcp6(CLIENT6, SERVER6, (1, 2), 3, SYN).len(), 14 + 40 + 40);
    }
}
