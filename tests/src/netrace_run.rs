//! The one runner of the real `netrace watch` binary in tests, the demo and benchmarks: in any
//! namespace, on any interfaces (the lab's node uplink by default, [`NetraceOptions::for_lab`]),
//! waited for through `--ready-file` or spawned without waiting (so a signal can arrive before
//! it is ready), signalled with anything, killed, waited for, its standard output optionally
//! handed to the caller (to close it, or pipe it into `head`). What it printed comes back as a
//! [`NetraceOutput`] (JSON lines per `docs/json.md`, or text).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

use crate::lab::Lab;

/// The `netrace` binary: `$NETRACE_BIN` if set, else the first `netrace` file found walking up
/// from this executable (`target/debug/deps/seed-…` → `target/debug/netrace`).
pub fn netrace_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("NETRACE_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("NETRACE_BIN={} is not a file", p.display());
    }
    let exe = std::env::current_exe().context("current_exe")?;
    for dir in exe.ancestors().skip(1) {
        let candidate = dir.join("netrace");
        if candidate.is_file() {
            return Ok(candidate);
        }
        if dir.file_name().is_some_and(|n| n == "target") {
            break;
        }
    }
    bail!(
        "no netrace binary found above {} (build it with `cargo build -p netrace` or set NETRACE_BIN)",
        exe.display()
    )
}

/// Output format of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// `--output json`: one object per line.
    Json,
    /// `--output text`: for people.
    Text,
}

/// How to run `netrace watch`: where, on what, and with which options.
#[derive(Debug, Clone)]
pub struct NetraceOptions {
    /// The binary.
    pub bin: PathBuf,
    /// Namespace to run in.
    pub ns: String,
    /// `--iface` arguments.
    pub ifaces: Vec<String>,
    /// `--output` (default JSON).
    pub output: Output,
    /// `--syn-timeout` (default 1500 ms).
    pub syn_timeout: Duration,
    /// More arguments after the usual ones.
    pub extra_args: Vec<String>,
    /// Read standard output on a thread (default); false hands it to the caller through
    /// [`NetraceRun::take_stdout`].
    pub capture_stdout: bool,
    /// How long [`NetraceRun::start`] waits for the ready file (default 30 s).
    pub ready_timeout: Duration,
    /// Run netrace with an empty environment (no PATH: it cannot run other programs).
    pub empty_env: bool,
    /// A limit on open files (soft and hard) for netrace, if set.
    pub nofile: Option<u64>,
}

impl NetraceOptions {
    /// `netrace watch --iface IFACE --output json --syn-timeout 1500ms` in namespace `ns`.
    pub fn new(bin: impl Into<PathBuf>, ns: &str, iface: &str) -> Self {
        Self {
            bin: bin.into(),
            ns: ns.to_owned(),
            ifaces: vec![iface.to_owned()],
            output: Output::Json,
            syn_timeout: Duration::from_millis(1500),
            extra_args: Vec::new(),
            capture_stdout: true,
            ready_timeout: Duration::from_secs(30),
            empty_env: false,
            nofile: None,
        }
    }

    /// [`NetraceOptions::new`] on the lab's node namespace, watching its uplink.
    pub fn for_lab(lab: &Lab, bin: impl Into<PathBuf>) -> Self {
        Self::new(bin, lab.node_ns(), lab.node_uplink())
    }

    /// Adds an `--iface`.
    pub fn iface(mut self, iface: &str) -> Self {
        self.ifaces.push(iface.to_owned());
        self
    }

    /// Sets the output format.
    pub fn output(mut self, output: Output) -> Self {
        self.output = output;
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets `--syn-timeout`.
    pub fn syn_timeout(mut self, d: Duration) -> Self {
        self.syn_timeout = d;
        self
    }

    /// Runs netrace with an empty environment (`env -i`): no PATH, no RUST_LOG.
    pub fn empty_environment(mut self) -> Self {
        self.empty_env = true;
        self
    }

    /// Limits netrace to `n` open files (soft and hard limit), as a small container would.
    pub fn nofile(mut self, n: u64) -> Self {
        self.nofile = Some(n);
        self
    }

    /// Leaves standard output to the caller ([`NetraceRun::take_stdout`]).
    pub fn uncaptured_stdout(mut self) -> Self {
        self.capture_stdout = false;
        self
    }

    /// The arguments after `netrace`: `watch --iface ... --output ... [--ready-file FILE]
    /// --syn-timeout ... [extra]`.
    pub fn watch_args(&self, ready_file: Option<&Path>) -> Vec<String> {
        let mut args: Vec<String> = vec!["watch".into()];
        for i in &self.ifaces {
            args.push("--iface".into());
            args.push(i.clone());
        }
        args.push("--output".into());
        args.push(
            match self.output {
                Output::Json => "json",
                Output::Text => "text",
            }
            .into(),
        );
        if let Some(f) = ready_file {
            args.push("--ready-file".into());
            args.push(f.to_string_lossy().into_owned());
        }
        args.push("--syn-timeout".into());
        args.push(format!("{}ms", self.syn_timeout.as_millis()));
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

static NEXT_READY: AtomicU32 = AtomicU32::new(0);

/// A running `netrace watch` (`ip netns exec NS netrace watch ...`); killed (SIGKILL) on drop
/// if still running.
pub struct NetraceRun {
    child: Option<Child>,
    pid: u32,
    command_line: String,
    ready_file: PathBuf,
    syn_timeout: Duration,
    ready_timeout: Duration,
    stdout_pipe: Option<ChildStdout>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

/// What a finished run printed.
#[derive(Debug, Clone)]
pub struct NetraceOutput {
    /// The command that ran.
    pub command_line: String,
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Standard output's lines that parsed as JSON (JSON output only).
    pub json: Vec<Value>,
    /// Non-empty standard output lines that did not parse as JSON (JSON output only).
    pub unparsed: Vec<String>,
}

impl NetraceOutput {
    /// A finished run's output; standard output's lines are split into JSON and the rest.
    pub fn from_captured(
        command_line: String,
        status: ExitStatus,
        stdout: String,
        stderr: String,
    ) -> Self {
        let mut json = Vec::new();
        let mut unparsed = Vec::new();
        for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Value>(line) {
                Ok(v) => json.push(v),
                Err(_) => unparsed.push(line.to_owned()),
            }
        }
        Self {
            command_line,
            status,
            stdout,
            stderr,
            json,
            unparsed,
        }
    }
}

fn reader(mut pipe: impl std::io::Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

impl NetraceRun {
    /// Starts `ip netns exec NS netrace watch ...` and returns at once (a signal may arrive
    /// before netrace is ready).
    pub fn spawn(opts: &NetraceOptions) -> Result<Self> {
        let ready_file = std::env::temp_dir().join(format!(
            "netrace-lab-{}-{}.ready",
            std::process::id(),
            NEXT_READY.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&ready_file);
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            opts.ns.clone(),
            opts.bin.to_string_lossy().into_owned(),
        ];
        args.extend(opts.watch_args(Some(&ready_file)));
        let mut cmd = Command::new("ip");
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if opts.empty_env {
            // `ip netns exec` hands its own (empty) environment to netrace.
            cmd.env_clear();
        }
        if let Some(n) = opts.nofile {
            use std::os::unix::process::CommandExt as _;
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe and touches only the child's limits.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let env = if opts.empty_env { "env -i " } else { "" };
        let command_line = format!("{env}ip {}", args.join(" "));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{command_line}`"))?;
        let pid = child.id();
        let pipe = child.stdout.take();
        let (stdout_pipe, stdout) = if opts.capture_stdout {
            (None, pipe.map(reader))
        } else {
            (pipe, None)
        };
        let stderr = child.stderr.take().map(reader);
        Ok(Self {
            child: Some(child),
            pid,
            command_line,
            ready_file,
            syn_timeout: opts.syn_timeout,
            ready_timeout: opts.ready_timeout,
            stdout_pipe,
            stdout,
            stderr,
        })
    }

    /// [`NetraceRun::spawn`], then [`NetraceRun::wait_ready`] (`ready_timeout`).
    pub fn start(opts: &NetraceOptions) -> Result<Self> {
        let mut run = Self::spawn(opts)?;
        run.wait_ready(run.ready_timeout)?;
        Ok(run)
    }

    /// The process id of netrace (`ip netns exec` execs it in place).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The command that runs.
    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// The `--syn-timeout` in use.
    pub fn syn_timeout(&self) -> Duration {
        self.syn_timeout
    }

    /// Sleeps for `--syn-timeout` + 1 s: call it after the last connection so that every lost
    /// connection has been decided before [`NetraceRun::stop`].
    pub fn settle(&self) {
        std::thread::sleep(self.syn_timeout + Duration::from_secs(1));
    }

    /// Whether the ready file exists (netrace attached everything).
    pub fn is_ready(&self) -> bool {
        self.ready_file.exists()
    }

    /// Standard output, if the options left it to the caller (once).
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.stdout_pipe.take()
    }

    /// Waits for the ready file; fails (with what it printed) if netrace exits first or the
    /// timeout passes (it is then killed).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.is_ready() {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                let out = self.collect(status);
                bail!("netrace exited before it was ready\n{}", out.describe());
            }
            if Instant::now() >= deadline {
                let out = self.kill_and_collect()?;
                bail!(
                    "netrace wrote no ready file {} within {timeout:?}\n{}",
                    self.ready_file.display(),
                    out.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exit status, if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait().context("waiting for netrace"),
            None => Ok(None),
        }
    }

    /// Sends signal `sig`.
    pub fn signal(&self, sig: i32) -> Result<()> {
        if self.child.is_none() {
            bail!("netrace already reaped");
        }
        let pid = i32::try_from(self.pid).map_err(|_| anyhow!("pid out of range"))?;
        // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child,
        // so it cannot have been reused.
        let rc = unsafe { libc::kill(pid, sig) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("kill(netrace)");
        }
        Ok(())
    }

    /// Waits up to `timeout` for the exit and returns what it printed; on timeout kills it
    /// and fails.
    pub fn wait(mut self, timeout: Duration) -> Result<NetraceOutput> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(self.collect(status));
            }
            if Instant::now() >= deadline {
                let out = self.kill_and_collect()?;
                bail!(
                    "netrace did not exit within {timeout:?}; killed\n{}",
                    out.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGINT (Ctrl-C), then [`NetraceRun::wait`] (20 s).
    pub fn stop(self) -> Result<NetraceOutput> {
        self.signal(libc::SIGINT)?;
        self.wait(Duration::from_secs(20))
    }

    /// SIGKILL and reap; returns what it printed.
    pub fn kill(mut self) -> Result<NetraceOutput> {
        self.kill_and_collect()
    }

    fn kill_and_collect(&mut self) -> Result<NetraceOutput> {
        let mut child = self.child.take().context("netrace already reaped")?;
        let _ = child.kill();
        let status = child.wait().context("waiting for netrace")?;
        Ok(self.collect(status))
    }

    fn collect(&mut self, status: ExitStatus) -> NetraceOutput {
        self.child = None;
        self.stdout_pipe = None;
        let join =
            |h: Option<JoinHandle<String>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
        let stdout = join(self.stdout.take());
        let stderr = join(self.stderr.take());
        NetraceOutput::from_captured(self.command_line.clone(), status, stdout, stderr)
    }
}

impl Drop for NetraceRun {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.ready_file);
    }
}

/// Runs `ip netns exec NS [prefix...] BIN ARGS...` to its end, killing it after `limit`: for
/// one-shot subcommands (`probe`, invalid command lines) and for runs under another identity
/// (`prefix`: `setpriv ...`, `capsh ...`). What it printed comes back as for a watch.
pub fn run_once(
    bin: &Path,
    ns: &str,
    prefix: &[&str],
    args: &[&str],
    limit: Duration,
) -> Result<NetraceOutput> {
    let mut argv: Vec<String> = vec!["netns".into(), "exec".into(), ns.into()];
    argv.extend(prefix.iter().map(|a| (*a).to_owned()));
    argv.push(bin.to_string_lossy().into_owned());
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    let command_line = format!("ip {}", argv.join(" "));
    let mut child = Command::new("ip")
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{command_line}`"))?;
    let stdout = child.stdout.take().map(reader);
    let stderr = child.stderr.take().map(reader);
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for netrace")? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break child.wait().context("waiting for netrace")?;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let join = |h: Option<JoinHandle<String>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok(NetraceOutput::from_captured(
        command_line,
        status,
        join(stdout),
        join(stderr),
    ))
}

/// Whether process `pid` has handlers installed for every signal in `sigs` (the `SigCgt`
/// mask of `/proc/PID/status`): netrace installs its SIGINT/SIGTERM handlers before it
/// touches the kernel.
pub fn catches_signals(pid: u32, sigs: &[i32]) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let Some(mask) = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
    else {
        return false;
    };
    sigs.iter()
        .all(|s| (1..=64).contains(s) && mask & (1u64 << (s - 1)) != 0)
}

impl NetraceOutput {
    /// The exit code (None if killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The `"type": "connection"` objects.
    pub fn connections(&self) -> impl Iterator<Item = &Value> {
        self.json
            .iter()
            .filter(|v| v.get("type").and_then(Value::as_str) == Some("connection"))
    }

    /// The `"type": "summary"` object, if printed.
    pub fn summary(&self) -> Option<&Value> {
        self.json
            .iter()
            .rev()
            .find(|v| v.get("type").and_then(Value::as_str) == Some("summary"))
    }

    /// `src_port` of every connection whose `outcome` is one of `outcomes`, in output order
    /// (duplicates kept, so callers can check there are none).
    pub fn src_ports(&self, outcomes: &[&str]) -> Vec<u16> {
        self.connections()
            .filter(|c| {
                c.get("outcome")
                    .and_then(Value::as_str)
                    .is_some_and(|o| outcomes.contains(&o))
            })
            .filter_map(|c| c.get("src_port").and_then(Value::as_u64))
            .filter_map(|p| u16::try_from(p).ok())
            .collect()
    }

    /// Ports netrace reported lost (`lost` and `abandoned`, as `totals.lost` counts them).
    pub fn lost_ports(&self) -> Vec<u16> {
        self.src_ports(&["lost", "abandoned"])
    }

    /// Ports netrace reported answered.
    pub fn answered_ports(&self) -> Vec<u16> {
        self.src_ports(&["answered"])
    }

    /// Number of connection objects per outcome.
    pub fn outcome_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for c in self.connections() {
            let o = c.get("outcome").and_then(Value::as_str).unwrap_or("?");
            *m.entry(o.to_owned()).or_insert(0) += 1;
        }
        m
    }

    /// A summary field by JSON pointer, e.g. `"/verdict/kind"`.
    pub fn summary_at(&self, pointer: &str) -> Option<&Value> {
        self.summary().and_then(|s| s.pointer(pointer))
    }

    /// Everything printed, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited {}\n--- stderr ---\n{}\n--- stdout ({} lines) ---\n{}",
            self.command_line,
            self.status,
            self.stderr.trim_end(),
            self.stdout.lines().count(),
            tail(&self.stdout, 40)
        )
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("[... {start} lines ...]\n"));
    }
    out.push_str(&lines[start..].join("\n"));
    out
}
