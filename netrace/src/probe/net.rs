//! The real probes: one socket per probe, bound to an explicit source port, paced to a bounded
//! rate with a bounded number in flight. No privileges needed (ports below
//! `net.ipv4.ip_unprivileged_port_start` are skipped when they cannot be bound).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::os::fd::AsRawFd as _;
use std::time::Duration;

use serde::Serialize;
use tokio::net::{TcpSocket, UdpSocket};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::infer::{Oracle, Outcome};

/// At most this many probes wait for an answer at once.
pub const MAX_IN_FLIGHT: usize = 64;

/// What a UDP probe sends (`nc -u` sends what is typed; an echo service sends it back).
pub const UDP_PAYLOAD: &[u8] = b"netrace probe\n";

/// The transport a probe uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One probe as it happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Record {
    pub proto: Proto,
    pub port: u16,
    pub outcome: Outcome,
    /// Time from connect (TCP) or send (UDP) to the answer, refusal or error.
    pub rtt_us: Option<u64>,
    /// Why a probe was skipped or unreachable (e.g. `port in use`, `EHOSTUNREACH`).
    pub detail: Option<String>,
}

/// Starts at most one probe per `interval`, never bursting after a pause.
#[derive(Debug)]
struct Pacer {
    interval: Duration,
    next: Option<Instant>,
}

impl Pacer {
    async fn wait(&mut self) {
        let now = Instant::now();
        if let Some(next) = self.next {
            if next > now {
                tokio::time::sleep_until(next).await;
            }
        }
        let base = self.next.map_or(now, |n| n.max(now));
        self.next = Some(base + self.interval);
    }
}

/// Probes `target` over the network; an [`Oracle`] for the inference.
pub struct NetOracle {
    rt: tokio::runtime::Runtime,
    proto: Proto,
    target: SocketAddr,
    timeout: Duration,
    pacer: Pacer,
    /// Every probe so far, in the order they were asked for.
    pub records: Vec<Record>,
}

impl NetOracle {
    /// `rate` probes per second at most (> 0).
    pub fn new(proto: Proto, target: SocketAddr, timeout: Duration, rate: f64) -> io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            rt,
            proto,
            target,
            timeout,
            pacer: Pacer {
                interval: Duration::from_secs_f64(1.0 / rate.max(0.001)),
                next: None,
            },
            records: Vec::new(),
        })
    }
}

impl Oracle for NetOracle {
    fn probe(&mut self, ports: &[u16]) -> anyhow::Result<Vec<Outcome>> {
        let records = self.rt.block_on(batch(
            &mut self.pacer,
            self.proto,
            self.target,
            self.timeout,
            ports,
        ))?;
        let outcomes = records.iter().map(|r| r.outcome).collect();
        self.records.extend(records);
        Ok(outcomes)
    }
}

async fn batch(
    pacer: &mut Pacer,
    proto: Proto,
    target: SocketAddr,
    timeout: Duration,
    ports: &[u16],
) -> anyhow::Result<Vec<Record>> {
    let mut set: JoinSet<(usize, io::Result<Record>)> = JoinSet::new();
    let mut out: Vec<Option<Record>> = vec![None; ports.len()];
    let store = |joined: Result<(usize, io::Result<Record>), tokio::task::JoinError>,
                 out: &mut Vec<Option<Record>>|
     -> anyhow::Result<()> {
        let (i, rec) = joined.map_err(|e| anyhow::anyhow!("a probe task failed: {e}"))?;
        let rec = rec.map_err(|e| anyhow::anyhow!("probing from port {}: {e}", ports[i]))?;
        out[i] = Some(rec);
        Ok(())
    };
    for (i, &port) in ports.iter().enumerate() {
        while set.len() >= MAX_IN_FLIGHT {
            if let Some(joined) = set.join_next().await {
                store(joined, &mut out)?;
            }
        }
        pacer.wait().await;
        set.spawn(async move {
            let rec = match proto {
                Proto::Tcp => tcp(port, target, timeout).await,
                Proto::Udp => udp(port, target, timeout).await,
            };
            (i, rec)
        });
    }
    while let Some(joined) = set.join_next().await {
        store(joined, &mut out)?;
    }
    out.into_iter()
        .zip(ports)
        .map(|(r, p)| r.ok_or_else(|| anyhow::anyhow!("no result for port {p} (internal error)")))
        .collect()
}

fn unspecified(target: SocketAddr, port: u16) -> SocketAddr {
    let ip: IpAddr = if target.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    SocketAddr::new(ip, port)
}

fn micros(d: Duration) -> Option<u64> {
    Some(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The errno's name for the errors a probe can meet, else the error's text.
fn errno_name(e: &io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH (host unreachable)",
        Some(libc::ENETUNREACH) => "ENETUNREACH (network unreachable)",
        Some(libc::EHOSTDOWN) => "EHOSTDOWN (host down)",
        Some(libc::ENETDOWN) => "ENETDOWN (network down)",
        Some(libc::ENONET) => "ENONET (machine not on the network)",
        Some(libc::EACCES) => "EACCES (prohibited)",
        Some(libc::EPERM) => "EPERM (blocked by a local firewall)",
        Some(libc::EPROTO) => "EPROTO (protocol error)",
        Some(libc::ECONNREFUSED) => "ECONNREFUSED",
        Some(libc::ECONNRESET) => "ECONNRESET",
        Some(libc::ETIMEDOUT) => "ETIMEDOUT",
        Some(libc::EADDRINUSE) => "port in use",
        Some(libc::EADDRNOTAVAIL) => "address not available",
        _ => return e.to_string(),
    };
    name.to_string()
}

/// What an error after a successful bind says about the probe; `None` for errors that are
/// not about the network (they abort the run).
fn classify(e: &io::Error) -> Option<Outcome> {
    match e.raw_os_error()? {
        libc::ECONNREFUSED | libc::ECONNRESET => Some(Outcome::Refused),
        libc::ETIMEDOUT => Some(Outcome::Timeout),
        libc::EHOSTUNREACH
        | libc::ENETUNREACH
        | libc::EHOSTDOWN
        | libc::ENETDOWN
        | libc::ENONET
        | libc::EACCES
        | libc::EPERM
        | libc::EPROTO
        | libc::EMSGSIZE => Some(Outcome::Unreachable),
        // The 4-tuple is taken (a connection of someone else's from the same port).
        libc::EADDRINUSE | libc::EADDRNOTAVAIL => Some(Outcome::Skipped),
        _ => None,
    }
}

fn record(proto: Proto, port: u16, outcome: Outcome, started: Option<Instant>) -> Record {
    Record {
        proto,
        port,
        outcome,
        rtt_us: started.and_then(|s| micros(s.elapsed())),
        detail: None,
    }
}

/// A bind failure: the port is in use or not ours to bind (skipped), or a real error.
fn bind_failed(proto: Proto, port: u16, e: io::Error) -> io::Result<Record> {
    let detail = match e.raw_os_error() {
        Some(libc::EADDRINUSE) => "port in use",
        Some(libc::EACCES | libc::EPERM) => "not permitted to bind (privileged port)",
        _ => return Err(e),
    };
    Ok(Record {
        detail: Some(detail.to_string()),
        ..record(proto, port, Outcome::Skipped, None)
    })
}

fn failed(proto: Proto, port: u16, e: io::Error, started: Instant) -> io::Result<Record> {
    match classify(&e) {
        Some(outcome) => Ok(Record {
            detail: (outcome != Outcome::Refused && outcome != Outcome::Timeout)
                .then(|| errno_name(&e)),
            ..record(proto, port, outcome, Some(started))
        }),
        None => Err(e),
    }
}

/// Connects from `port` to `target`. SO_REUSEADDR stays off (a port in use or in TIME_WAIT
/// is skipped, not stolen); SO_LINGER 0 closes an answered connection with a RST, so neither
/// side keeps a TIME_WAIT that would block the port.
async fn tcp(port: u16, target: SocketAddr, timeout: Duration) -> io::Result<Record> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(false)?;
    socket.set_zero_linger()?;
    if let Err(e) = socket.bind(unspecified(target, port)) {
        return bind_failed(Proto::Tcp, port, e);
    }
    let started = Instant::now();
    match tokio::time::timeout(timeout, socket.connect(target)).await {
        // Dropping the connect future closes the socket still in SYN-SENT: nothing is sent.
        Err(_) => Ok(record(Proto::Tcp, port, Outcome::Timeout, None)),
        Ok(Ok(stream)) => {
            let rec = record(Proto::Tcp, port, Outcome::Answered, Some(started));
            drop(stream); // RST (linger 0)
            Ok(rec)
        }
        Ok(Err(e)) => failed(Proto::Tcp, port, e, started),
    }
}

/// Asks for ICMP errors of every kind on a UDP socket (without it Linux reports only port
/// unreachable on a connected UDP socket).
fn recv_errors(socket: &UdpSocket, v4: bool) -> io::Result<()> {
    let (level, name) = if v4 {
        (libc::IPPROTO_IP, libc::IP_RECVERR)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
    };
    let on: libc::c_int = 1;
    // SAFETY: the descriptor is the open socket borrowed for the call; the option value is a
    // c_int that lives across the call and its size is passed alongside.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends one datagram from `port` to `target` and waits for any reply.
async fn udp(port: u16, target: SocketAddr, timeout: Duration) -> io::Result<Record> {
    let socket = match UdpSocket::bind(unspecified(target, port)).await {
        Ok(s) => s,
        Err(e) => return bind_failed(Proto::Udp, port, e),
    };
    recv_errors(&socket, target.is_ipv4())?;
    let started = Instant::now();
    if let Err(e) = socket.connect(target).await {
        return failed(Proto::Udp, port, e, started);
    }
    if let Err(e) = socket.send(UDP_PAYLOAD).await {
        return failed(Proto::Udp, port, e, started);
    }
    let mut buf = [0u8; 2048];
    match tokio::time::timeout(timeout, socket.recv(&mut buf)).await {
        Err(_) => Ok(record(Proto::Udp, port, Outcome::Timeout, None)),
        Ok(Ok(_)) => Ok(record(Proto::Udp, port, Outcome::Answered, Some(started))),
        Ok(Err(e)) => failed(Proto::Udp, port, e, started),
    }
}

/// The local address this host would use to reach `target` (no packet is sent).
pub fn local_addr_towards(target: SocketAddr) -> Option<IpAddr> {
    let socket = StdUdpSocket::bind(unspecified(target, 0)).ok()?;
    socket.connect(target).ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn oracle(proto: Proto, target: SocketAddr) -> NetOracle {
        NetOracle::new(proto, target, Duration::from_millis(300), 200.0)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A free port: bound and released again (another process could take it meanwhile, so
    /// the tests only rely on outcomes that cannot be confused).
    fn free_port() -> u16 {
        StdUdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn loopback_answers_refusals_and_ports_in_use() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let target = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        // A port held by another socket of ours: skipped, not failed.
        let held = TcpListener::bind("0.0.0.0:0").unwrap_or_else(|e| panic!("{e}"));
        let held_port = held.local_addr().map(|a| a.port()).unwrap_or(0);
        let mut o = oracle(Proto::Tcp, target);
        let a = free_port();
        let got = o.probe(&[a, held_port]).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(got, vec![Outcome::Answered, Outcome::Skipped]);
        assert_eq!(o.records[1].detail.as_deref(), Some("port in use"));
        // Closed with a RST: the same port can be bound again at once (no TIME_WAIT).
        let got = o.probe(&[a]).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(got, vec![Outcome::Answered]);
        drop(listener);
        let got = o.probe(&[free_port()]).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(got, vec![Outcome::Refused]);
    }

    #[test]
    fn loopback_udp_echo_closed_and_silent() {
        let echo = StdUdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let target = echo.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let server = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            if let Ok((n, peer)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], peer);
            }
            // Stay bound but silent for the second probe.
            let _ = echo.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = echo.recv_from(&mut buf);
        });
        let mut o = oracle(Proto::Udp, target);
        let got = o.probe(&[free_port()]).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(got, vec![Outcome::Answered]);
        let got = o.probe(&[free_port()]).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(got, vec![Outcome::Timeout]);
        let _ = server.join();
        let closed = SocketAddr::new(target.ip(), free_port());
        let mut o = oracle(Proto::Udp, closed);
        let got = o.probe(&[free_port()]).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(got, vec![Outcome::Refused]);
    }

    #[test]
    fn the_pacer_keeps_the_rate_without_bursts() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        rt.block_on(async {
            let mut p = Pacer {
                interval: Duration::from_millis(10),
                next: None,
            };
            let t0 = Instant::now();
            for _ in 0..11 {
                p.wait().await;
            }
            let took = t0.elapsed();
            assert!(took >= Duration::from_millis(100), "{took:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
            let t1 = Instant::now();
            for _ in 0..3 {
                p.wait().await;
            }
            // No catching up on the pause: the second and third wait a full interval.
            let took = t1.elapsed();
            assert!(took >= Duration::from_millis(20), "{took:?}");
        });
    }

    #[test]
    fn local_address_is_found() {
        let a = local_addr_towards("127.0.0.1:9".parse().unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(a, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }
}
