//! The traffic: a bulk TCP stream and a stream of short connections from the client namespace
//! to the server namespace. Each side runs on threads of this process that entered their
//! namespace (a network namespace is per thread); nothing else is involved.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _};
use netrace_lab::netns::spawn_in;

use super::net::{BenchNet, SERVER_ADDR};

const STREAM_PORT: u16 = 5201;
const CONN_PORT: u16 = 5202;
const CONN_CLIENT_THREADS: usize = 2;

fn join<T>(h: std::thread::JoinHandle<anyhow::Result<T>>, what: &str) -> anyhow::Result<T> {
    h.join()
        .map_err(|_| anyhow!("the {what} thread panicked"))?
}

/// Waits until the listener has a connection to accept, at most `timeout_ms`.
fn readable(l: &TcpListener, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for an open socket and lives across the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    rc > 0 && pfd.revents & libc::POLLIN != 0
}

/// std listens with a backlog of 128: thousands of handshakes a second overflow it whenever
/// the accepting thread waits for a CPU, and each overflow costs a client a 1 s SYN
/// retransmission. Listening again raises it (capped by the namespace's somaxconn, 4096).
fn deepen_backlog(l: TcpListener) -> std::io::Result<TcpListener> {
    // SAFETY: listen on a valid, open socket descriptor that `l` owns for the whole call.
    let rc = unsafe { libc::listen(l.as_raw_fd(), 4096) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(l)
}

/// A listener in the server namespace; returns once it listens.
fn listen<T: Send + 'static>(
    net: &BenchNet,
    name: &str,
    port: u16,
    serve: impl FnOnce(TcpListener) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<T>>> {
    let (tx, rx) = mpsc::channel();
    let h = spawn_in(&net.server_ns, name, move || {
        let l = TcpListener::bind(SocketAddr::from((SERVER_ADDR, port)));
        let l = match l.and_then(deepen_backlog) {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                bail!("binding {SERVER_ADDR}:{port}: {e}");
            }
        };
        serve(l)
    })?;
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => Ok(h),
        Ok(Err(e)) => Err(anyhow!("the {name} server could not listen: {e}")),
        Err(_) => Err(anyhow!("the {name} server did not start")),
    }
}

/// Pins the calling thread to `cpu` (modulo the CPUs there are), so that a stream's two ends
/// keep their places run after run instead of being shuffled by the scheduler, which on a
/// small machine moves a single stream's throughput by more than any tracer does.
fn pin_to_cpu(cpu: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the index is below the number of CPUs, far below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu % cpus, &mut set) };
    // SAFETY: pid 0 is the calling thread; the set lives across the call with its exact size.
    // Failure (e.g. a restricted cpuset) only leaves the thread unpinned.
    let _ = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
}

/// One bulk TCP stream for `secs`: returns the server's received bits per second.
pub fn stream(net: &BenchNet, secs: f64) -> anyhow::Result<f64> {
    let server = listen(net, "nrb-stream-srv", STREAM_PORT, move |l| {
        pin_to_cpu(1);
        l.set_nonblocking(true)?;
        if !readable(&l, 10_000) {
            bail!("no client connected within 10 s");
        }
        let (mut s, _) = l.accept().context("accepting the stream")?;
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = vec![0u8; 1 << 18];
        let mut bytes = 0u64;
        let t0 = Instant::now();
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => bytes += n as u64,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading the stream"),
            }
        }
        Ok((bytes, t0.elapsed()))
    })?;
    let client = spawn_in(&net.client_ns, "nrb-stream-cli", move || {
        pin_to_cpu(0);
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from((SERVER_ADDR, STREAM_PORT)),
            Duration::from_secs(5),
        )
        .context("connecting the stream")?;
        let buf = vec![0x5au8; 1 << 17];
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let mut bytes = 0u64;
        while Instant::now() < end {
            s.write_all(&buf).context("writing the stream")?;
            bytes += buf.len() as u64;
        }
        s.shutdown(Shutdown::Write)?;
        Ok(bytes)
    })?;
    let sent = join(client, "stream client");
    let (received, elapsed) = join(server, "stream server")?;
    let sent = sent?;
    if received != sent {
        bail!("the stream server received {received} of {sent} bytes");
    }
    Ok(received as f64 * 8.0 / elapsed.as_secs_f64())
}

/// What a connection-rate run did.
pub struct ConnRate {
    pub connections: u64,
    /// Connects that took longer than [`SLOW_CONNECT`] (a SYN retransmission takes 1 s).
    pub slow: u64,
    pub errors: u64,
    pub accepted: u64,
    pub per_second: f64,
}

pub const SLOW_CONNECT: Duration = Duration::from_millis(100);

/// The pause after a connection-rate run: the last handshakes reach the accept queue, and a
/// tracer reads what the run left it (netrace drains its logs every 50 ms when busy) before
/// the next run, on another pair, begins.
pub const SETTLE: Duration = Duration::from_millis(200);

/// Closes with a RST instead of a FIN (`SO_LINGER` 0): no TIME_WAIT on either side, so
/// millions of connections over the rounds neither run out of ports nor meet an old
/// connection's TIME_WAIT (whose SYN would be answered late, after a 1 s retransmission).
fn abort_on_close(s: &TcpStream) -> anyhow::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor owned by `s`, and a pointer to a `linger` that lives
    // across the call with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setting SO_LINGER");
    }
    Ok(())
}

/// Short TCP connections (connect, then close with a RST) from several client threads for
/// `secs`, as fast as they go or, with `rate`, paced at that many per second in all (each
/// thread its share, on a fixed schedule); one server thread accepts and closes.
pub fn connections(net: &BenchNet, secs: f64, rate: Option<f64>) -> anyhow::Result<ConnRate> {
    let stop = Arc::new(AtomicBool::new(false));
    let stop_srv = Arc::clone(&stop);
    let server = listen(net, "nrb-conn-srv", CONN_PORT, move |l| {
        l.set_nonblocking(true)?;
        let mut accepted = 0u64;
        loop {
            match l.accept() {
                Ok((s, _)) => {
                    drop(s);
                    accepted += 1;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if stop_srv.load(Ordering::Relaxed) {
                        return Ok(accepted);
                    }
                    readable(&l, 50);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("accepting"),
            }
        }
    })?;
    let errors = Arc::new(AtomicU64::new(0));
    let dur = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut clients = Vec::new();
    for t in 0..CONN_CLIENT_THREADS {
        let errors = Arc::clone(&errors);
        clients.push(spawn_in(
            &net.client_ns,
            &format!("nrb-conn-cli{t}"),
            move || {
                let addr = SocketAddr::from((SERVER_ADDR, CONN_PORT));
                let mut done = 0u64;
                let mut in_window = 0u64;
                let mut slow = 0u64;
                let mut started = 0u64;
                let interval = rate.map(|r| CONN_CLIENT_THREADS as f64 / r);
                while start.elapsed() < dur {
                    if let Some(interval) = interval {
                        let due = Duration::from_secs_f64(started as f64 * interval);
                        let now = start.elapsed();
                        if due > now {
                            std::thread::sleep(due - now);
                            continue;
                        }
                    }
                    started += 1;
                    let t0 = Instant::now();
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                        Ok(s) => {
                            abort_on_close(&s)?;
                            drop(s);
                            done += 1;
                            if start.elapsed() <= dur {
                                in_window += 1;
                            }
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if t0.elapsed() > SLOW_CONNECT {
                        slow += 1;
                    }
                }
                Ok((done, in_window, slow))
            },
        )?);
    }
    let (mut connections, mut in_window, mut slow) = (0, 0, 0);
    let mut first_err = None;
    for c in clients {
        match join(c, "connection client") {
            Ok((n, w, s)) => {
                connections += n;
                in_window += w;
                slow += s;
            }
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    // Let the last handshakes reach the accept queue, and the tracer read what it was told,
    // then stop the server.
    std::thread::sleep(SETTLE);
    stop.store(true, Ordering::Relaxed);
    let accepted = join(server, "connection server")?;
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok(ConnRate {
        connections,
        slow,
        errors: errors.load(Ordering::Relaxed),
        accepted,
        // Connections done within the run's window over the window: a connect still waiting
        // for a retransmitted SYN when the window closes does not stretch the run.
        per_second: in_window as f64 / dur.as_secs_f64(),
    })
}
