//! `netrace watch` in any namespace, on any interfaces, for lifecycle tests: spawned without
//! waiting (so a signal can arrive before it is ready), signalled with anything, killed,
//! waited for, its standard output optionally handed to the caller (to close it, or pipe it
//! into `head`). What it printed comes back as a [`NetraceOutput`].
//!
//! [`crate::NetraceRun`] is the simpler runner for the four-namespace [`crate::Lab`].

use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::netrace_run::{NetraceOutput, Output};

/// What to run.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// The binary.
    pub bin: PathBuf,
    /// Namespace to run in.
    pub ns: String,
    /// `--iface` arguments.
    pub ifaces: Vec<String>,
    /// `--output`.
    pub output: Output,
    /// `--syn-timeout`.
    pub syn_timeout: Duration,
    /// More arguments.
    pub extra_args: Vec<String>,
    /// Read standard output on a thread (default); false hands it to the caller through
    /// [`Watcher::take_stdout`].
    pub capture_stdout: bool,
    /// Run netrace with an empty environment (no PATH: it cannot run other programs).
    pub empty_env: bool,
    /// A limit on open files (soft and hard) for netrace, if set.
    pub nofile: Option<u64>,
}

impl WatchSpec {
    /// `netrace watch --iface IFACE --output json --syn-timeout 1500ms` in `ns`.
    pub fn new(bin: impl Into<PathBuf>, ns: &str, iface: &str) -> Self {
        Self {
            bin: bin.into(),
            ns: ns.to_owned(),
            ifaces: vec![iface.to_owned()],
            output: Output::Json,
            syn_timeout: Duration::from_millis(1500),
            extra_args: Vec::new(),
            capture_stdout: true,
            empty_env: false,
            nofile: None,
        }
    }
    /// Adds an `--iface`.
    pub fn iface(mut self, iface: &str) -> Self {
        self.ifaces.push(iface.to_owned());
        self
    }
    /// Sets `--output`.
    pub fn output(mut self, output: Output) -> Self {
        self.output = output;
        self
    }
    /// Sets `--syn-timeout`.
    pub fn syn_timeout(mut self, d: Duration) -> Self {
        self.syn_timeout = d;
        self
    }
    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.extra_args.extend(args.into_iter().map(Into::into));
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
    /// Leaves standard output to the caller ([`Watcher::take_stdout`]).
    pub fn uncaptured_stdout(mut self) -> Self {
        self.capture_stdout = false;
        self
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A running `netrace watch`; killed (SIGKILL) on drop if still running.
pub struct Watcher {
    child: Option<Child>,
    pid: u32,
    command_line: String,
    ready_file: PathBuf,
    stdout_pipe: Option<ChildStdout>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

fn reader(mut pipe: impl std::io::Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

impl Watcher {
    /// Starts `ip netns exec NS netrace watch ...` and returns at once.
    pub fn spawn(spec: &WatchSpec) -> Result<Self> {
        let ready_file = std::env::temp_dir().join(format!(
            "netrace-watcher-{}-{}.ready",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&ready_file);
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            spec.ns.clone(),
            spec.bin.to_string_lossy().into_owned(),
            "watch".into(),
        ];
        for i in &spec.ifaces {
            args.push("--iface".into());
            args.push(i.clone());
        }
        args.extend([
            "--output".into(),
            match spec.output {
                Output::Json => "json".into(),
                Output::Text => "text".into(),
            },
            "--ready-file".into(),
            ready_file.to_string_lossy().into_owned(),
            "--syn-timeout".into(),
            format!("{}ms", spec.syn_timeout.as_millis()),
        ]);
        args.extend(spec.extra_args.iter().cloned());
        let command_line = format!("ip {}", args.join(" "));
        let mut cmd = Command::new("ip");
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if spec.empty_env {
            // `ip netns exec` hands its own (empty) environment to netrace.
            cmd.env_clear();
        }
        if let Some(n) = spec.nofile {
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
        let command_line = if spec.empty_env {
            format!("env -i {command_line}")
        } else {
            command_line
        };
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{command_line}`"))?;
        let pid = child.id();
        let pipe = child.stdout.take();
        let (stdout_pipe, stdout) = if spec.capture_stdout {
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
            stdout_pipe,
            stdout,
            stderr,
        })
    }

    /// [`Watcher::spawn`], then [`Watcher::wait_ready`] (30 s).
    pub fn start(spec: &WatchSpec) -> Result<Self> {
        let mut w = Self::spawn(spec)?;
        w.wait_ready(Duration::from_secs(30))?;
        Ok(w)
    }

    /// The process id (`ip netns exec` execs netrace in place).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The command that runs.
    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// Whether the ready file exists (netrace attached everything).
    pub fn is_ready(&self) -> bool {
        self.ready_file.exists()
    }

    /// Standard output, if the spec left it to the caller (once).
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
                    "netrace was not ready within {timeout:?}\n{}",
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

    /// SIGINT (Ctrl-C), then [`Watcher::wait`] (20 s).
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

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.ready_file);
    }
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
