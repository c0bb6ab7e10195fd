//! The client: worker threads in the pod namespace that make TCP connections and UDP exchanges
//! to the server and record each attempt's own result. This is the ground truth of what the
//! application saw.
//!
//! Every attempt binds an explicit pod-side source port handed out by the lab's
//! [`PortAllocator`], never the same one twice in a lab's life. With `bind(0)` the kernel may hand
//! out the port of an earlier *failed* connection again (no TIME_WAIT holds it), and the node's
//! conntrack would then treat the new SYN as a retransmission of the old, unanswered flow and
//! give it the same post-SNAT port: two attempts, one flow, and no exact ground truth.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Context as _, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns;
use crate::server::unix_ms;

/// Hands out pod-side source ports, cycling through `first..=last`.
#[derive(Debug)]
pub struct PortAllocator {
    first: u16,
    last: u16,
    next: AtomicU32,
}

impl PortAllocator {
    /// Ports `first..=last` (`first <= last`).
    pub fn new(first: u16, last: u16) -> Self {
        let (first, last) = (first.min(last), first.max(last));
        Self {
            first,
            last,
            next: AtomicU32::new(0),
        }
    }

    /// The next port.
    pub fn next_port(&self) -> u16 {
        let span = u32::from(self.last - self.first) + 1;
        let n = self.next.fetch_add(1, Ordering::Relaxed) % span;
        self.first + n as u16
    }
}

impl Default for PortAllocator {
    /// The pod's default ephemeral range, 32768-60999.
    fn default() -> Self {
        Self::new(32768, 60999)
    }
}

/// How the client runs.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Concurrent worker threads (default 32).
    pub workers: usize,
    /// Give up a TCP connect after this long (default 1 s).
    pub connect_timeout: Duration,
    /// Give up waiting for a UDP echo after this long (default 1 s).
    pub udp_timeout: Duration,
    /// IP TTL / IPv6 hop limit of the TCP SYNs (default: the system's).
    pub ttl: Option<u32>,
    /// TCP Fast Open: the SYN carries [`TFO_PAYLOAD`] (`sendto` with `MSG_FASTOPEN`; the pod
    /// needs `net.ipv4.tcp_fastopen` with client and no-cookie bits, see
    /// [`crate::LabOptions::tcp_fastopen`]). Default false.
    pub fast_open: bool,
}

/// What a Fast Open SYN carries.
pub const TFO_PAYLOAD: &[u8] = b"netrace-lab tfo";

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            workers: 32,
            connect_timeout: Duration::from_secs(1),
            udp_timeout: Duration::from_secs(1),
            ttl: None,
            fast_open: false,
        }
    }
}

/// What one TCP connect attempt ended with, as the application saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpOutcome {
    /// The handshake completed.
    Connected,
    /// No answer within the connect timeout.
    TimedOut,
    /// The server (or something on the way) answered with a RST.
    Refused,
    /// An ICMP error: host or network unreachable.
    Unreachable,
    /// Anything else, with the error text.
    Error(String),
}

/// One TCP connect attempt.
#[derive(Debug, Clone)]
pub struct TcpAttempt {
    /// Position in the run, from 0.
    pub index: usize,
    /// The pod-side source port (before the node's SNAT).
    pub pod_port: u16,
    /// What the application saw.
    pub outcome: TcpOutcome,
    /// Wall-clock time of the connect call, in ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// How long the connect call took.
    pub elapsed: Duration,
}

/// What one UDP exchange ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UdpOutcome {
    /// The echo came back.
    Echoed,
    /// No echo within the timeout.
    TimedOut,
    /// Anything else, with the error text.
    Error(String),
}

/// One UDP exchange (send a datagram, wait for its echo).
#[derive(Debug, Clone)]
pub struct UdpExchange {
    /// Position in the run, from 0.
    pub index: usize,
    /// The pod-side source port.
    pub pod_port: u16,
    /// What the application saw.
    pub outcome: UdpOutcome,
    /// Wall-clock time of the send, in ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// Send to echo (or to giving up).
    pub elapsed: Duration,
}

/// Counts of TCP outcomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpCounts {
    /// All attempts.
    pub attempts: usize,
    /// [`TcpOutcome::Connected`].
    pub connected: usize,
    /// [`TcpOutcome::TimedOut`].
    pub timed_out: usize,
    /// [`TcpOutcome::Refused`].
    pub refused: usize,
    /// [`TcpOutcome::Unreachable`].
    pub unreachable: usize,
    /// [`TcpOutcome::Error`].
    pub other: usize,
}

impl TcpCounts {
    /// Counts the outcomes of `attempts`.
    pub fn of(attempts: &[TcpAttempt]) -> Self {
        let mut c = Self {
            attempts: attempts.len(),
            ..Self::default()
        };
        for a in attempts {
            match a.outcome {
                TcpOutcome::Connected => c.connected += 1,
                TcpOutcome::TimedOut => c.timed_out += 1,
                TcpOutcome::Refused => c.refused += 1,
                TcpOutcome::Unreachable => c.unreachable += 1,
                TcpOutcome::Error(_) => c.other += 1,
            }
        }
        c
    }
}

/// A client bound to one pod namespace and its port allocator.
#[derive(Debug, Clone)]
pub struct Client {
    ns: String,
    ports: Arc<PortAllocator>,
    opts: ClientOptions,
}

fn any_addr(server: SocketAddr, port: u16) -> SocketAddr {
    match server {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
    }
}

fn classify(e: &std::io::Error) -> TcpOutcome {
    match (e.kind(), e.raw_os_error()) {
        (ErrorKind::TimedOut, _) | (_, Some(libc::ETIMEDOUT)) => TcpOutcome::TimedOut,
        (ErrorKind::ConnectionRefused, _) | (_, Some(libc::ECONNREFUSED)) => TcpOutcome::Refused,
        (_, Some(libc::EHOSTUNREACH | libc::ENETUNREACH)) => TcpOutcome::Unreachable,
        _ => TcpOutcome::Error(e.to_string()),
    }
}

/// Ports already in use (e.g. in TIME_WAIT from an earlier run) are skipped, this many times.
const BIND_TRIES: usize = 1000;

impl Client {
    /// A client in namespace `ns` taking source ports from `ports`.
    pub fn new(ns: &str, ports: Arc<PortAllocator>, opts: ClientOptions) -> Self {
        Self {
            ns: ns.to_owned(),
            ports,
            opts,
        }
    }

    /// The options in use.
    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// Makes `n` TCP connections to `server`, `workers` at a time; calls `progress(done, attempt)`
    /// after each. Returns the attempts in index order.
    pub fn tcp(
        &self,
        server: SocketAddr,
        n: usize,
        progress: &(dyn Fn(usize, &TcpAttempt) + Sync),
    ) -> Result<Vec<TcpAttempt>> {
        self.run_workers(n, progress, |index| self.tcp_once(index, server))
    }

    /// Makes `n` UDP exchanges with `server`, `workers` at a time; calls `progress(done, exchange)`
    /// after each. Returns the exchanges in index order.
    pub fn udp(
        &self,
        server: SocketAddr,
        n: usize,
        progress: &(dyn Fn(usize, &UdpExchange) + Sync),
    ) -> Result<Vec<UdpExchange>> {
        self.run_workers(n, progress, |index| self.udp_once(index, server))
    }

    fn run_workers<R: Send>(
        &self,
        n: usize,
        progress: &(dyn Fn(usize, &R) + Sync),
        one: impl Fn(usize) -> Result<R> + Sync,
    ) -> Result<Vec<R>> {
        let next = AtomicUsize::new(0);
        let done = AtomicUsize::new(0);
        let results: Mutex<Vec<(usize, R)>> = Mutex::new(Vec::with_capacity(n));
        let workers = self.opts.workers.clamp(1, n.max(1));
        let outcomes: Vec<Result<()>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| -> Result<()> {
                        netns::enter(&self.ns)?;
                        loop {
                            let index = next.fetch_add(1, Ordering::Relaxed);
                            if index >= n {
                                return Ok(());
                            }
                            let r = one(index)?;
                            let count = done.fetch_add(1, Ordering::Relaxed) + 1;
                            progress(count, &r);
                            results
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push((index, r));
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow!("a client worker panicked")))
                })
                .collect()
        });
        for o in outcomes {
            o.with_context(|| format!("client in namespace {}", self.ns))?;
        }
        let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
        results.sort_by_key(|(i, _)| *i);
        Ok(results.into_iter().map(|(_, r)| r).collect())
    }

    fn tcp_socket(&self, server: SocketAddr) -> Result<(Socket, u16)> {
        for _ in 0..BIND_TRIES {
            let socket = Socket::new(
                Domain::for_address(server),
                Type::STREAM,
                Some(Protocol::TCP),
            )
            .context("TCP socket")?;
            let port = self.ports.next_port();
            match socket.bind(&any_addr(server, port).into()) {
                Ok(()) => return Ok((socket, port)),
                Err(e) if e.kind() == ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e).with_context(|| format!("bind TCP port {port}")),
            }
        }
        Err(anyhow!(
            "no free pod-side TCP port after {BIND_TRIES} tries"
        ))
    }

    fn tcp_once(&self, index: usize, server: SocketAddr) -> Result<TcpAttempt> {
        let (socket, pod_port) = self.tcp_socket(server)?;
        if let Some(ttl) = self.opts.ttl {
            match server {
                SocketAddr::V4(_) => socket.set_ttl_v4(ttl),
                SocketAddr::V6(_) => socket.set_unicast_hops_v6(ttl),
            }
            .context("setting the TTL")?;
        }
        let started = SystemTime::now();
        let clock = Instant::now();
        let outcome = if self.opts.fast_open {
            // A blocking sendto with MSG_FASTOPEN sends the SYN with the data and waits for
            // the handshake like connect (bounded by the send timeout).
            socket
                .set_write_timeout(Some(self.opts.connect_timeout))
                .context("SO_SNDTIMEO")?;
            match socket.send_to_with_flags(TFO_PAYLOAD, &server.into(), libc::MSG_FASTOPEN) {
                Ok(_) => TcpOutcome::Connected,
                Err(e) if e.kind() == ErrorKind::WouldBlock => TcpOutcome::TimedOut,
                Err(e) => classify(&e),
            }
        } else {
            match socket.connect_timeout(&server.into(), self.opts.connect_timeout) {
                Ok(()) => TcpOutcome::Connected,
                Err(e) => classify(&e),
            }
        };
        let elapsed = clock.elapsed();
        drop(socket);
        Ok(TcpAttempt {
            index,
            pod_port,
            outcome,
            started_unix_ms: unix_ms(started),
            elapsed,
        })
    }

    fn udp_socket(&self, server: SocketAddr) -> Result<(UdpSocket, u16)> {
        for _ in 0..BIND_TRIES {
            let port = self.ports.next_port();
            match UdpSocket::bind(any_addr(server, port)) {
                Ok(s) => return Ok((s, port)),
                Err(e) if e.kind() == ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e).with_context(|| format!("bind UDP port {port}")),
            }
        }
        Err(anyhow!(
            "no free pod-side UDP port after {BIND_TRIES} tries"
        ))
    }

    fn udp_once(&self, index: usize, server: SocketAddr) -> Result<UdpExchange> {
        let (socket, pod_port) = self.udp_socket(server)?;
        let payload = format!("netrace-lab udp {index} from {pod_port}");
        let started = SystemTime::now();
        let clock = Instant::now();
        let deadline = clock + self.opts.udp_timeout;
        let outcome = match socket.send_to(payload.as_bytes(), server) {
            Err(e) => UdpOutcome::Error(format!("send: {e}")),
            Ok(_) => {
                let mut buf = [0u8; 2048];
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break UdpOutcome::TimedOut;
                    }
                    if let Err(e) = socket.set_read_timeout(Some(left)) {
                        break UdpOutcome::Error(format!("set_read_timeout: {e}"));
                    }
                    match socket.recv_from(&mut buf) {
                        Ok((len, from)) if from == server && &buf[..len] == payload.as_bytes() => {
                            break UdpOutcome::Echoed
                        }
                        Ok(_) => continue,
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            break UdpOutcome::TimedOut
                        }
                        Err(e) => break UdpOutcome::Error(format!("recv: {e}")),
                    }
                }
            }
        };
        Ok(UdpExchange {
            index,
            pod_port,
            outcome,
            started_unix_ms: unix_ms(started),
            elapsed: clock.elapsed(),
        })
    }
}
