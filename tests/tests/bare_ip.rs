//! An interface without an Ethernet header (issue 14 item 5): `netrace watch` on a tun device
//! (link type 65534, as WireGuard) parses its packets from the IP header. The far side of the
//! tun is this test: it answers SYNs by destination port with a SYN-ACK, a RST, silence or an
//! ICMP time exceeded, and netrace's per-connection outcomes must agree with the client's own
//! results. Needs root.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use netrace_lab::wire::{self, Ipv4, Tcp, IPPROTO_TCP, TCP_ACK, TCP_RST, TCP_SYN};
use netrace_lab::{cmd, is_root, names, netns, netrace_bin, NetraceOptions, NetraceRun};
use serde_json::Value;

const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 77, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 18, 77, 2);
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 77, 9);
const ANSWERED: u16 = 8080;
const REFUSED: u16 = 8081;
const SILENT: u16 = 8082;
const TTL_EXCEEDED: u16 = 8083;

/// Deletes the namespace (and the tun inside it) when dropped.
struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = cmd::run("ip", &["netns", "del", &self.0]);
    }
}

/// An IPv4 packet whose TCP checksum is right, so the client's stack takes it.
fn tcp_packet(src: Ipv4Addr, dst: Ipv4Addr, tcp: &Tcp) -> Vec<u8> {
    let mut seg = tcp.build();
    let mut pseudo = Vec::with_capacity(12 + seg.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, IPPROTO_TCP]);
    pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&seg);
    let c = wire::checksum(&pseudo);
    seg[16..18].copy_from_slice(&c.to_be_bytes());
    Ipv4::new(src, dst, IPPROTO_TCP).build(&seg)
}

/// The far side of the tun: reads what the namespace sends and answers SYNs by port.
fn responder(name: String, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let mut tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // struct ifreq: the name, then the flags (IFF_TUN | IFF_NO_PI).
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr[16..18].copy_from_slice(&(0x0001u16 | 0x1000).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifr` is large enough to hold;
    // the descriptor is open for the whole call.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), 0x4004_54ca, ifr.as_mut_ptr()) };
    anyhow::ensure!(rc == 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: tun.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd that lives across the call.
        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
            continue;
        }
        let n = tun.read(&mut buf)?;
        let p = &buf[..n];
        if n < 40 || p[0] >> 4 != 4 || p[9] != IPPROTO_TCP {
            continue;
        }
        let ihl = usize::from(p[0] & 0x0f) * 4;
        let t = &p[ihl..];
        let (sport, dport) = (
            u16::from_be_bytes([t[0], t[1]]),
            u16::from_be_bytes([t[2], t[3]]),
        );
        let isn = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
        if t[13] & (TCP_SYN | TCP_ACK) != TCP_SYN {
            continue;
        }
        let ack = isn.wrapping_add(1);
        let out = match dport {
            ANSWERED => tcp_packet(
                REMOTE,
                LOCAL,
                &Tcp::answer(sport, dport, TCP_SYN | TCP_ACK, ack),
            ),
            REFUSED => tcp_packet(
                REMOTE,
                LOCAL,
                &Tcp::answer(sport, dport, TCP_RST | TCP_ACK, ack),
            ),
            TTL_EXCEEDED => {
                let mut msg = wire::icmp(11, 0, [0; 4], &p[..ihl + 8]);
                let c = wire::checksum(&msg);
                msg[2..4].copy_from_slice(&c.to_be_bytes());
                Ipv4::new(ROUTER, LOCAL, 1).build(&msg)
            }
            _ => continue,
        };
        tun.write_all(&out)?;
    }
    Ok(())
}

#[test]
fn tun_interface_outcomes_match_the_client() {
    assert!(
        is_root(),
        "this test needs root (network namespaces, tun, eBPF); run it with `cargo xtask test` \
         or as root: `cargo test -p netrace-lab --test bare_ip`"
    );
    let stem = format!("{}tun", names::process_prefix());
    let ns = Ns(format!("{stem}ns"));
    let dev = format!("{stem}0");
    cmd::run("ip", &["netns", "add", &ns.0]).unwrap();
    for args in [
        vec!["ip", "link", "set", "lo", "up"],
        vec!["ip", "tuntap", "add", "dev", &dev, "mode", "tun"],
        vec!["ip", "addr", "add", "198.18.77.1/24", "dev", &dev],
        vec!["ip", "link", "set", &dev, "up"],
    ] {
        cmd::ns_exec(&ns.0, &args).unwrap();
    }
    assert_eq!(
        cmd::ns_exec(&ns.0, &["cat", &format!("/sys/class/net/{dev}/type")])
            .unwrap()
            .trim(),
        "65534"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let far = {
        let (dev, stop) = (dev.clone(), stop.clone());
        netns::spawn_in(&ns.0, "tun-far-side", move || responder(dev, stop)).unwrap()
    };

    let bin: PathBuf = netrace_bin().unwrap();
    let watch =
        NetraceRun::start(&NetraceOptions::new(bin, &ns.0, &dev).args(["--duration", "8s"]))
            .unwrap_or_else(|e| panic!("starting netrace: {e:#}"));

    // The client's own results: local port → what connect() said.
    let client = netns::spawn_in(&ns.0, "tun-client", || {
        let mut seen = Vec::new();
        for port in [
            ANSWERED,
            ANSWERED,
            ANSWERED,
            REFUSED,
            REFUSED,
            SILENT,
            TTL_EXCEEDED,
        ] {
            let sock = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            let addr: SocketAddr = (REMOTE, port).into();
            let r = sock.connect_timeout(&addr.into(), Duration::from_secs(1));
            let local = sock
                .local_addr()?
                .as_socket()
                .map(|a| a.port())
                .unwrap_or(0);
            let kind = match r {
                Ok(()) => "answered",
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "refused",
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => "lost",
                Err(e) if e.raw_os_error() == Some(libc::EHOSTUNREACH) => "unreachable",
                Err(e) => anyhow::bail!("connect to port {port}: {e}"),
            };
            drop(sock);
            seen.push((local, port, kind));
        }
        Ok(seen)
    })
    .unwrap();
    let seen = client.join().unwrap().unwrap();

    let out = watch
        .wait(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
    stop.store(true, Ordering::Relaxed);
    far.join().unwrap().unwrap();
    let (stdout, stderr) = (&out.stdout, &out.stderr);
    let records: BTreeMap<u16, Value> = out
        .connections()
        .map(|v| (v["src_port"].as_u64().unwrap() as u16, v.clone()))
        .collect();
    let expected: Vec<_> = [
        (ANSWERED, "answered"),
        (ANSWERED, "answered"),
        (ANSWERED, "answered"),
        (REFUSED, "refused"),
        (REFUSED, "refused"),
        (SILENT, "lost"),
        (TTL_EXCEEDED, "unreachable"),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        seen.iter().map(|(_, p, k)| (*p, *k)).collect::<Vec<_>>(),
        expected,
        "the client's own results (the lab is broken, not netrace)"
    );
    for (local, port, kind) in &seen {
        let r = records
            .get(local)
            .unwrap_or_else(|| panic!("no record for port {local}; stdout:\n{stdout}\n{stderr}"));
        assert_eq!(r["outcome"], *kind, "port {local} -> {port}: {r}");
        assert_eq!(r["dst_port"], *port);
        if *kind == "unreachable" {
            assert_eq!(
                (r["icmp_type"].as_u64(), r["icmp_code"].as_u64()),
                (Some(11), Some(0))
            );
        }
    }
    assert_eq!(records.len(), seen.len(), "records: {records:?}");
    assert_eq!(out.code(), Some(1), "a lost connection: exit 1; {stderr}");
}
