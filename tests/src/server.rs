//! The one test server: a TCP listener and (by default) a UDP echo on one port, as threads of
//! this process that entered a namespace. The TCP side records every accepted peer (on the far
//! side of the node's SNAT, that is the post-SNAT address and port) and closes the connection.
//! For `netrace probe`'s tests the UDP side can instead be bound and silent, or closed
//! ([`UdpMode`]).

use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context as _, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns;

/// One connection the server accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The peer as the server saw it (IPv4 peers as plain IPv4).
    pub peer: SocketAddr,
    /// Wall-clock time of the accept, in ms since the Unix epoch.
    pub at_unix_ms: u64,
}

/// What the server does with UDP on its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpMode {
    /// Echo every datagram back (the lab's server).
    Echo,
    /// Bound and read, never answered (a service that does not speak UDP).
    Silent,
    /// Nothing bound: the namespace's kernel answers with ICMP port unreachable.
    Closed,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    accepted: Mutex<Vec<Accepted>>,
    udp_peers: Mutex<Vec<SocketAddr>>,
    udp_received: AtomicUsize,
    udp_echoed: AtomicUsize,
}

/// A running server; stops its threads on [`Server::stop`] or drop.
pub struct Server {
    port: u16,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<Result<()>>>,
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Server {
    /// Starts the TCP listener and the UDP echo on `[::]:port` (dual stack) inside `ns`;
    /// returns once both are bound.
    pub fn start(ns: &str, port: u16) -> Result<Self> {
        Self::start_with(ns, port, UdpMode::Echo)
    }

    /// Starts the TCP listener on `[::]:port` (dual stack) inside `ns`, and UDP as `udp`
    /// says; returns once everything is bound.
    pub fn start_with(ns: &str, port: u16, udp: UdpMode) -> Result<Self> {
        let shared = Arc::new(Shared::default());
        let any = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();

        let tcp_shared = Arc::clone(&shared);
        let tcp_ready = ready_tx.clone();
        let mut threads = vec![netns::spawn_in(ns, "lab-tcp-server", move || {
            let listener = match listen(any) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tcp_ready.send(Err(anyhow!("TCP bind {any}: {e}")));
                    return Ok(());
                }
            };
            let _ = tcp_ready.send(Ok(()));
            accept_loop(&listener, &tcp_shared);
            Ok(())
        })?];

        if udp != UdpMode::Closed {
            let udp_shared = Arc::clone(&shared);
            threads.push(netns::spawn_in(ns, "lab-udp-server", move || {
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
                udp_loop(&socket, &udp_shared, udp == UdpMode::Echo);
                Ok(())
            })?);
        }

        let expected = threads.len();
        let mut server = Server {
            port,
            shared,
            threads,
        };
        for _ in 0..expected {
            let ready = ready_rx
                .recv_timeout(Duration::from_secs(10))
                .context("the server threads did not report within 10 s");
            match ready {
                Ok(Ok(())) => {}
                Ok(Err(e)) | Err(e) => {
                    let _ = server.stop_threads();
                    return Err(e.context(format!("starting the server in namespace {ns}")));
                }
            }
        }
        Ok(server)
    }

    /// The port both listeners use.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every accepted TCP connection so far, in order.
    pub fn accepted(&self) -> Vec<Accepted> {
        lock(&self.shared.accepted).clone()
    }

    /// The peer ports of accepted TCP connections from IPv4 (`v6 == false`) or IPv6 peers.
    pub fn accepted_ports(&self, v6: bool) -> Vec<u16> {
        lock(&self.shared.accepted)
            .iter()
            .filter(|a| a.peer.is_ipv6() == v6)
            .map(|a| a.peer.port())
            .collect()
    }

    /// Waits until at least `n` TCP connections have been accepted or `timeout` passed (the
    /// client may see a handshake complete a moment before the accept loop records it);
    /// returns the number accepted.
    pub fn wait_accepted(&self, n: usize, timeout: Duration) -> usize {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let got = lock(&self.shared.accepted).len();
            if got >= n || std::time::Instant::now() >= deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Number of UDP datagrams received so far (echoed or not).
    pub fn udp_received(&self) -> usize {
        self.shared.udp_received.load(Ordering::Relaxed)
    }

    /// Number of UDP datagrams echoed so far.
    pub fn udp_echoed(&self) -> usize {
        self.shared.udp_echoed.load(Ordering::Relaxed)
    }

    /// Peers of every UDP datagram echoed so far.
    pub fn udp_peers(&self) -> Vec<SocketAddr> {
        lock(&self.shared.udp_peers).clone()
    }

    /// Stops both threads and waits for them; idempotent.
    pub fn stop(&mut self) -> Result<()> {
        self.stop_threads()
    }

    fn stop_threads(&mut self) -> Result<()> {
        self.shared.stop.store(true, Ordering::Relaxed);
        let mut first_err = None;
        for t in self.threads.drain(..) {
            let res = t
                .join()
                .map_err(|_| anyhow!("a server thread panicked"))
                .and_then(|r| r);
            if let (Err(e), None) = (res, &first_err) {
                first_err = Some(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop_threads();
    }
}

/// A dual-stack listener with a deep accept queue: a burst of connections from 32 clients
/// must not overflow it while the accept thread waits for a CPU (an overflowing queue drops
/// SYNs, which looks exactly like loss).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn accept_loop(listener: &TcpListener, shared: &Shared) {
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                lock(&shared.accepted).push(Accepted {
                    peer: canonical(peer),
                    at_unix_ms: unix_ms(SystemTime::now()),
                });
                drop(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                netns::poll_readable(listener.as_raw_fd(), 100);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn udp_loop(socket: &UdpSocket, shared: &Shared, echo: bool) {
    let mut buf = [0u8; 2048];
    while !shared.stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((len, peer)) => {
                shared.udp_received.fetch_add(1, Ordering::Relaxed);
                if echo && socket.send_to(&buf[..len], peer).is_ok() {
                    shared.udp_echoed.fetch_add(1, Ordering::Relaxed);
                    lock(&shared.udp_peers).push(canonical(peer));
                }
            }
            Err(_) => continue,
        }
    }
}
