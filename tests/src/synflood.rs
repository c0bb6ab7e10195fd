//! Many unanswered SYNs, fast: hand-made IPv4 SYNs written to a raw socket (`IPPROTO_RAW`,
//! the kernel adds nothing but the IP checksum) from inside a namespace, one per 4-tuple.
//! No TCP socket exists for them, so the sender's stack never retransmits or resets anything:
//! exactly one SYN leaves per tuple.

use std::net::Ipv4Addr;

use anyhow::{anyhow, Context as _, Result};

use crate::netns;

/// One SYN: destination address and source port (the source address and destination port
/// are the flood's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SynTuple {
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Source port.
    pub src_port: u16,
}

/// A flood: `count` SYNs from `src` to `dport`, cycling through the source ports
/// `first_port..=65535` and then the next destination of `dsts`.
#[derive(Debug, Clone)]
pub struct SynFlood {
    /// Source address (an address of the sending namespace).
    pub src: Ipv4Addr,
    /// Destinations, used one after the other.
    pub dsts: Vec<Ipv4Addr>,
    /// Destination port.
    pub dport: u16,
    /// The first source port of each destination.
    pub first_port: u16,
    /// SYNs to send.
    pub count: usize,
}

impl SynFlood {
    /// The tuples the flood uses, in sending order (fewer than `count` if the destinations
    /// run out).
    pub fn tuples(&self) -> Vec<SynTuple> {
        let per_dst = usize::from(u16::MAX - self.first_port) + 1;
        (0..self.count)
            .map_while(|n| {
                let dst = *self.dsts.get(n / per_dst)?;
                let src_port = self.first_port + (n % per_dst) as u16;
                Some(SynTuple { dst, src_port })
            })
            .collect()
    }

    /// Sends the SYNs from namespace `ns`; returns the tuples the kernel accepted, in order
    /// (a send that keeps failing with `ENOBUFS` after retries is left out).
    pub fn send(&self, ns: &str) -> Result<Vec<SynTuple>> {
        let flood = self.clone();
        let ns = ns.to_owned();
        std::thread::spawn(move || -> Result<Vec<SynTuple>> {
            netns::enter(&ns)?;
            flood.send_here()
        })
        .join()
        .map_err(|_| anyhow!("the SYN sender panicked"))?
    }

    fn send_here(&self) -> Result<Vec<SynTuple>> {
        // SAFETY: plain socket(2) call; the result is checked below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("raw socket");
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let mut sent = Vec::with_capacity(self.count);
        let mut packet = [0u8; 40];
        for (n, t) in self.tuples().into_iter().enumerate() {
            build_syn(&mut packet, self.src, t.dst, t.src_port, self.dport, isn(n));
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(t.dst.octets()),
                },
                sin_zero: [0; 8],
            };
            let mut tries = 0;
            loop {
                // SAFETY: `packet` and `addr` are live, initialised buffers of the lengths
                // passed.
                let rc = unsafe {
                    libc::sendto(
                        raw,
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        (&addr as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
                if rc == packet.len() as isize {
                    sent.push(t);
                    break;
                }
                let e = std::io::Error::last_os_error();
                tries += 1;
                if e.raw_os_error() == Some(libc::ENOBUFS) && tries < 100 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    continue;
                }
                if e.raw_os_error() == Some(libc::ENOBUFS) {
                    break;
                }
                return Err(e).with_context(|| format!("sendto {}", t.dst));
            }
        }
        Ok(sent)
    }
}

fn isn(n: usize) -> u32 {
    // Any value works; spread them like a real stack would.
    (n as u32).wrapping_mul(2_654_435_761).wrapping_add(12345)
}

fn sum16(bytes: &[u8], mut acc: u32) -> u32 {
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        acc += u32::from(word);
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// A 40-byte IPv4 + TCP SYN (no options) with correct checksums.
pub fn build_syn(p: &mut [u8; 40], src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, isn: u32) {
    p.fill(0);
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let ip_csum = fold(sum16(&p[..20], 0));
    p[10..12].copy_from_slice(&ip_csum.to_be_bytes());
    let t = 20;
    p[t..t + 2].copy_from_slice(&sport.to_be_bytes());
    p[t + 2..t + 4].copy_from_slice(&dport.to_be_bytes());
    p[t + 4..t + 8].copy_from_slice(&isn.to_be_bytes());
    p[t + 12] = 5 << 4;
    p[t + 13] = 0x02; // SYN
    p[t + 14..t + 16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let csum = fold(sum16(&p[t..], sum16(&pseudo, 0)));
    p[t + 16..t + 18].copy_from_slice(&csum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify_and_tuples_cycle() {
        let mut p = [0u8; 40];
        let (s, d) = (
            Ipv4Addr::new(198, 18, 100, 1),
            Ipv4Addr::new(198, 18, 250, 1),
        );
        build_syn(&mut p, s, d, 40000, 80, 7);
        assert_eq!(fold(sum16(&p[..20], 0)), 0, "IP checksum");
        let mut pseudo = [0u8; 12];
        pseudo[..4].copy_from_slice(&s.octets());
        pseudo[4..8].copy_from_slice(&d.octets());
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(fold(sum16(&p[20..], sum16(&pseudo, 0))), 0, "TCP checksum");
        let f = SynFlood {
            src: s,
            dsts: vec![d, Ipv4Addr::new(198, 18, 250, 2)],
            dport: 80,
            first_port: 65534,
            count: 5,
        };
        let t = f.tuples();
        assert_eq!(t.len(), 4);
        assert_eq!(
            (t[1].src_port, t[2].src_port, t[2].dst),
            (65535, 65534, f.dsts[1])
        );
    }
}
