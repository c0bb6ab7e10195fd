//! What watches the client's interface during a traffic run: nothing; netrace's empty
//! classifier on egress and ingress (the floor any tc program pays, held by the bench probe);
//! the real `netrace watch` binary in its default mode (the kernel keeps the books, only lost
//! and failed connections are sent one by one) or with per-connection output (`--events
//! all`); or `tcpdump` writing the same SYN / SYN-ACK selection to a file. Each runs inside
//! the client namespace (`ip netns exec`, which execs the tool in place, so the child's pid is
//! the tool's), is started before the traffic and stopped with SIGINT after it.

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;

use super::net::BenchNet;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    None,
    /// netrace's empty classifier on egress and ingress.
    Empty,
    /// `netrace watch --output json --events lost`: the kernel keeps the books.
    Netrace,
    /// `netrace watch --output json --events all`: an event per answered connection.
    NetraceEvents,
    Tcpdump,
}

/// The programs a run may start.
pub struct Bins {
    pub netrace: PathBuf,
    /// The bench probe, which holds the empty classifier (`hold-noop`).
    pub probe: PathBuf,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::None,
        Mode::Empty,
        Mode::Netrace,
        Mode::NetraceEvents,
        Mode::Tcpdump,
    ];

    /// The key in the results (JSON) and the label in the progress lines.
    pub fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Empty => "empty",
            Mode::Netrace => "netrace",
            Mode::NetraceEvents => "netrace_events",
            Mode::Tcpdump => "tcpdump",
        }
    }
}

/// The same selection netrace makes, as a capture filter.
pub const TCPDUMP_FILTER: &str = "tcp[tcpflags] & (tcp-syn) != 0";

/// What a tracer reported when it stopped.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// netrace: connections it reported answered; tcpdump: packets it captured.
    pub count: u64,
    /// netrace: events it could not receive (ring buffer full); tcpdump: packets the kernel
    /// dropped.
    pub dropped: u64,
    /// tcpdump: packets its filter accepted in the kernel (captured ones plus those still
    /// unread when it stopped); netrace: SYNs its kernel program saw.
    pub matched: u64,
    /// Resident memory of the tracer just before it was stopped, in bytes.
    pub rss_bytes: u64,
    /// CPU time (user + system) the tracer process used between ready and stop, in seconds.
    pub cpu_s: f64,
    /// Wall-clock time between ready and stop, in seconds.
    pub wall_s: f64,
    /// On-CPU time between ready and stop by the scheduler's account, in seconds.
    pub sched_s: f64,
    /// netrace: connections it reported lost (lost or abandoned).
    pub lost: u64,
}

impl Seen {
    /// Adds what another run of the same mode reported: counts and times add up, the
    /// resident memory is the largest.
    pub fn add(&mut self, other: &Seen) {
        self.count += other.count;
        self.dropped += other.dropped;
        self.matched += other.matched;
        self.rss_bytes = self.rss_bytes.max(other.rss_bytes);
        self.cpu_s += other.cpu_s;
        self.wall_s += other.wall_s;
        self.sched_s += other.sched_s;
        self.lost += other.lost;
    }
}

pub struct Tracer {
    mode: Mode,
    child: Option<Child>,
    /// CPU seconds the tracer had used when it became ready, and when that was.
    cpu_at_ready: f64,
    sched_at_ready: f64,
    ready_at: Instant,
    stdout: PathBuf,
    stderr: Option<JoinHandle<String>>,
    files: Vec<PathBuf>,
}

/// User + system CPU time of a process, in seconds (fields 14 and 15 of /proc/PID/stat,
/// counted after the command name, which may contain spaces).
fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    // After ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    (ticks(11) + ticks(12)) / hz
}

/// On-CPU time of every thread of a process, in seconds, from the scheduler
/// (`/proc/PID/task/*/schedstat`, first field: nanoseconds), finer than the clock ticks of
/// [`cpu_of`]; threads that exited are no longer counted.
pub fn sched_of(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

impl Tracer {
    /// Starts `mode` on the client's interface and waits until it is ready.
    pub fn start(mode: Mode, net: &BenchNet, bins: &Bins, dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(mode, net, bins, dir, false)
    }

    /// As [`Tracer::start`]; with `stats`, the empty classifier's holder also keeps the
    /// kernel's run-time statistics of every BPF program on while it runs.
    pub fn start_with(
        mode: Mode,
        net: &BenchNet,
        bins: &Bins,
        dir: &Path,
        stats: bool,
    ) -> anyhow::Result<Self> {
        let tag = format!("{}-{}", mode.name(), net.client_if);
        let stdout = dir.join(format!("{tag}.out"));
        let mut t = Tracer {
            mode,
            child: None,
            cpu_at_ready: 0.0,
            sched_at_ready: 0.0,
            ready_at: Instant::now(),
            stdout: stdout.clone(),
            stderr: None,
            files: vec![stdout.clone()],
        };
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &net.client_ns]);
        let ready = dir.join(format!("{tag}.ready"));
        match mode {
            Mode::None => return Ok(t),
            Mode::Empty => {
                let _ = std::fs::remove_file(&ready);
                t.files.push(ready.clone());
                cmd.arg(&bins.probe)
                    .args(["hold-noop", &net.client_if])
                    .arg(&ready);
                if stats {
                    cmd.arg("--stats");
                }
            }
            Mode::Netrace | Mode::NetraceEvents => {
                let _ = std::fs::remove_file(&ready);
                t.files.push(ready.clone());
                // `--output json` alone sends every answered connection (`--events all`);
                // `--events lost` is the always-on mode: answers counted in the kernel.
                let events = if mode == Mode::Netrace { "lost" } else { "all" };
                cmd.arg(&bins.netrace).args([
                    "watch",
                    "--iface",
                    &net.client_if,
                    "--output",
                    "json",
                    "--events",
                    events,
                ]);
                cmd.arg("--ready-file").arg(&ready);
            }
            Mode::Tcpdump => {
                let pcap = dir.join(format!("{tag}.pcap"));
                t.files.push(pcap.clone());
                cmd.args(["tcpdump", "-i", &net.client_if, "-Z", "root", "-w"])
                    .arg(&pcap)
                    .arg(TCPDUMP_FILTER);
            }
        }
        let out =
            File::create(&stdout).with_context(|| format!("creating {}", stdout.display()))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", mode.name()))?;
        let (tx, rx) = mpsc::channel();
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("no stderr pipe"))?;
        t.child = Some(child);
        t.stderr = Some(std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        }));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let is_ready = match mode {
                Mode::Tcpdump => rx.try_recv().is_ok(),
                _ => ready.exists(),
            };
            if is_ready {
                t.cpu_at_ready = t.child.as_ref().map_or(0.0, |c| cpu_of(c.id()));
                t.sched_at_ready = t.child.as_ref().map_or(0.0, |c| sched_of(c.id()));
                t.ready_at = Instant::now();
                return Ok(t);
            }
            if let Some(c) = t.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    let err = t
                        .stderr
                        .take()
                        .and_then(|h| h.join().ok())
                        .unwrap_or_default();
                    bail!(
                        "{} exited ({status}) before it was ready: {}",
                        mode.name(),
                        err.trim()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("{} was not ready within 30 s", mode.name());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The tracer's process, once started (none for [`Mode::None`]).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the tracer with SIGINT and reads what it reported.
    pub fn stop(mut self) -> anyhow::Result<Seen> {
        let Some(mut child) = self.child.take() else {
            return Ok(Seen::default());
        };
        let rss = rss_of(child.id());
        let cpu = cpu_of(child.id()) - self.cpu_at_ready;
        let sched = sched_of(child.id()) - self.sched_at_ready;
        let wall = self.ready_at.elapsed().as_secs_f64();
        let pid = i32::try_from(child.id()).map_err(|_| anyhow!("pid out of range"))?;
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child, not yet
        // reaped, so it cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not stop within 20 s of SIGINT", self.mode.name());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let stdout = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        let mut seen = match self.mode {
            Mode::None => Seen::default(),
            Mode::Empty => floor_seen(&stdout, &stderr, status)?,
            Mode::Netrace | Mode::NetraceEvents => netrace_seen(&stdout, &stderr, status)?,
            Mode::Tcpdump => tcpdump_seen(&stderr)?,
        };
        seen.rss_bytes = rss;
        seen.cpu_s = cpu;
        seen.wall_s = wall;
        seen.sched_s = sched;
        Ok(seen)
    }
}

fn netrace_seen(
    stdout: &str,
    stderr: &str,
    status: std::process::ExitStatus,
) -> anyhow::Result<Seen> {
    // 0: nothing lost, 1: something lost; both are a finished run.
    if !matches!(status.code(), Some(0 | 1)) {
        bail!("netrace exited {status}: {}", stderr.trim());
    }
    let summary = stdout
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v.get("type").and_then(Value::as_str) == Some("summary"))
        .ok_or_else(|| anyhow!("netrace printed no summary; stderr: {}", stderr.trim()))?;
    let at = |p: &str| summary.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    Ok(Seen {
        count: at("/totals/answered"),
        dropped: at("/drops/events_lost") + at("/drops/pending_map_full"),
        matched: at("/counters/syn_seen"),
        lost: at("/totals/lost") + at("/totals/abandoned"),
        ..Seen::default()
    })
}

/// The empty classifier's holder: detached both on SIGINT.
fn floor_seen(
    stdout: &str,
    stderr: &str,
    status: std::process::ExitStatus,
) -> anyhow::Result<Seen> {
    let v: Value = serde_json::from_str(stdout.trim()).map_err(|_| {
        anyhow!(
            "the empty classifier's holder exited {status} without a report: {}",
            stderr.trim()
        )
    })?;
    if !status.success() || v.get("detached").and_then(Value::as_u64) != Some(2) {
        bail!("the empty classifier was not detached cleanly ({status}): {v}");
    }
    Ok(Seen::default())
}

/// `N packets captured` and `N packets dropped by kernel` from tcpdump's exit report.
fn tcpdump_seen(stderr: &str) -> anyhow::Result<Seen> {
    let number = |suffix: &str| {
        stderr
            .lines()
            .find(|l| l.trim_end().ends_with(suffix))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    let count = number("packets captured")
        .ok_or_else(|| anyhow!("tcpdump printed no capture count: {}", stderr.trim()))?;
    Ok(Seen {
        count,
        dropped: number("packets dropped by kernel").unwrap_or(0),
        matched: number("packets received by filter").unwrap_or(0),
        ..Seen::default()
    })
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}
