//! Lab additions for `netrace probe`: a second server that answers TCP but not UDP (its UDP
//! port closed, or bound and silent), and an upper edge for the firewall's allowed range.
//! They change nothing the lab itself built, so every other test sees the lab unchanged.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::lab::{Family, Lab, FIREWALL_TABLE};
use crate::netns;

/// What the TCP-only server does with UDP on its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpMode {
    /// Nothing bound: the server's kernel answers with ICMP port unreachable.
    Closed,
    /// Bound and read, never answered (a service that does not speak UDP).
    Silent,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    accepted: AtomicUsize,
    udp_received: AtomicUsize,
}

/// A TCP server (accepts and closes) without a UDP answer, in the lab's server namespace.
pub struct TcpOnlyServer {
    port: u16,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<Result<()>>>,
}

impl TcpOnlyServer {
    /// Starts on `[::]:port` (dual stack) in the server namespace of `lab`; returns once bound.
    pub fn start(lab: &Lab, port: u16, udp: UdpMode) -> Result<Self> {
        let ns = lab.server_ns().to_owned();
        let shared = Arc::new(Shared::default());
        let any = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let mut threads = Vec::new();

        let tcp_shared = Arc::clone(&shared);
        let tcp_ready = ready_tx.clone();
        threads.push(netns::spawn_in(&ns, "lab-tcp-only", move || {
            let listener = match listen(any) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tcp_ready.send(Err(anyhow!("TCP bind {any}: {e}")));
                    return Ok(());
                }
            };
            let _ = tcp_ready.send(Ok(()));
            while !tcp_shared.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        tcp_shared.accepted.fetch_add(1, Ordering::Relaxed);
                        drop(stream);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        netns::poll_readable(listener.as_raw_fd(), 100);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            Ok(())
        })?);
        let mut expected = 1;
        if udp == UdpMode::Silent {
            expected += 1;
            let udp_shared = Arc::clone(&shared);
            threads.push(netns::spawn_in(&ns, "lab-udp-silent", move || {
                let socket = match UdpSocket::bind(any).and_then(|s| {
                    s.set_read_timeout(Some(Duration::from_millis(100)))
                        .map(|()| s)
                }) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow!("UDP bind {any}: {e}")));
                        return Ok(());
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let mut buf = [0u8; 2048];
                while !udp_shared.stop.load(Ordering::Relaxed) {
                    if socket.recv_from(&mut buf).is_ok() {
                        udp_shared.udp_received.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            })?);
        }
        let mut server = Self {
            port,
            shared,
            threads,
        };
        for _ in 0..expected {
            let ready = ready_rx
                .recv_timeout(Duration::from_secs(10))
                .context("the TCP-only server did not report within 10 s");
            match ready {
                Ok(Ok(())) => {}
                Ok(Err(e)) | Err(e) => {
                    let _ = server.stop();
                    return Err(e.context(format!("starting a TCP-only server in {ns}")));
                }
            }
        }
        Ok(server)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's address in `lab`.
    pub fn addr(&self, lab: &Lab, family: Family) -> SocketAddr {
        SocketAddr::new(lab.server_addr(family).ip(), self.port)
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Datagrams received (and left unanswered) so far; 0 with [`UdpMode::Closed`].
    pub fn udp_received(&self) -> usize {
        self.shared.udp_received.load(Ordering::Relaxed)
    }

    /// Stops the threads and waits for them; idempotent.
    pub fn stop(&mut self) -> Result<()> {
        self.shared.stop.store(true, Ordering::Relaxed);
        let mut first = None;
        for t in self.threads.drain(..) {
            let res = t
                .join()
                .map_err(|_| anyhow!("a TCP-only server thread panicked"))
                .and_then(|r| r);
            if let (Err(e), None) = (res, &first) {
                first = Some(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for TcpOnlyServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Adds an upper edge to the firewall: TCP towards the node with a destination port above
/// `max` is dropped too, so SYN-ACKs come back only to `firewall_min_port..=max`.
pub fn firewall_max_port(lab: &Lab, max: u16) -> Result<()> {
    let n = lab.names();
    let max = max.to_string();
    lab.exec(
        lab.firewall_ns(),
        &[
            "nft",
            "add",
            "rule",
            "inet",
            FIREWALL_TABLE,
            "forward",
            "iifname",
            &n.fw_server_if,
            "oifname",
            &n.fw_node_if,
            "tcp",
            "dport",
            ">",
            &max,
            "drop",
        ],
    )
    .with_context(|| format!("adding an upper edge {max} to the firewall of {}", n.stem))?;
    Ok(())
}

/// Lets the server namespace send ICMP errors without rate limit (a UDP port closed answers
/// every datagram with port unreachable, not only the first few).
pub fn server_icmp_unlimited(lab: &Lab) -> Result<()> {
    lab.exec(
        lab.server_ns(),
        &[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.icmp_ratelimit=0",
            "net.ipv6.icmp.ratelimit=0",
        ],
    )?;
    Ok(())
}
