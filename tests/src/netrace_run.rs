//! Running the real `netrace` binary inside the lab's node namespace, watching the node's
//! uplink, and collecting what it printed (JSON lines per `docs/json.md`, or text).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
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

/// How to run `netrace watch`.
#[derive(Debug, Clone)]
pub struct NetraceOptions {
    /// The binary.
    pub bin: PathBuf,
    /// `--output`.
    pub output: Output,
    /// `--syn-timeout` (default 1500 ms).
    pub syn_timeout: Duration,
    /// More arguments after the usual ones.
    pub extra_args: Vec<String>,
    /// How long to wait for the ready file (default 30 s).
    pub ready_timeout: Duration,
}

impl NetraceOptions {
    /// JSON output, `--syn-timeout 1500ms`.
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self {
            bin: bin.into(),
            output: Output::Json,
            syn_timeout: Duration::from_millis(1500),
            extra_args: Vec::new(),
            ready_timeout: Duration::from_secs(30),
        }
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
}

static NEXT_READY: AtomicU32 = AtomicU32::new(0);

/// A running `netrace watch`; killed on drop if not stopped.
pub struct NetraceRun {
    child: Option<Child>,
    command_line: String,
    ready_file: PathBuf,
    syn_timeout: Duration,
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

fn humantime_ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl NetraceRun {
    /// Starts `ip netns exec NODE netrace watch --iface UPLINK --output … --ready-file …
    /// --syn-timeout … [extra]` and waits for the ready file.
    pub fn start(lab: &Lab, opts: &NetraceOptions) -> Result<Self> {
        let ready_file = std::env::temp_dir().join(format!(
            "netrace-lab-{}-{}-{}.ready",
            std::process::id(),
            lab.names().stem,
            NEXT_READY.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&ready_file);
        let bin = opts.bin.to_string_lossy().into_owned();
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            lab.node_ns().into(),
            bin,
            "watch".into(),
            "--iface".into(),
            lab.node_uplink().into(),
            "--output".into(),
            match opts.output {
                Output::Json => "json".into(),
                Output::Text => "text".into(),
            },
            "--ready-file".into(),
            ready_file.to_string_lossy().into_owned(),
            "--syn-timeout".into(),
            humantime_ms(opts.syn_timeout),
        ];
        args.extend(opts.extra_args.iter().cloned());
        let command_line = format!("ip {}", args.join(" "));
        let mut child = Command::new("ip")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start `{command_line}`"))?;
        let stdout = child.stdout.take().map(reader);
        let stderr = child.stderr.take().map(reader);
        let mut run = NetraceRun {
            child: Some(child),
            command_line,
            ready_file,
            syn_timeout: opts.syn_timeout,
            stdout,
            stderr,
        };
        let deadline = Instant::now() + opts.ready_timeout;
        loop {
            if run.ready_file.exists() {
                return Ok(run);
            }
            let exited = match run.child.as_mut() {
                Some(c) => c.try_wait().context("waiting for netrace")?,
                None => None,
            };
            if let Some(status) = exited {
                let out = run.collect(status);
                bail!(
                    "`{}` exited ({status}) before it was ready\nstderr: {}\nstdout: {}",
                    out.command_line,
                    out.stderr.trim(),
                    out.stdout.trim()
                );
            }
            if Instant::now() >= deadline {
                let out = run.kill_and_collect()?;
                bail!(
                    "`{}` wrote no ready file {} within {:?}\nstderr: {}",
                    out.command_line,
                    run.ready_file.display(),
                    opts.ready_timeout,
                    out.stderr.trim()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id of netrace (`ip netns exec` execs it in place).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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

    /// Sends SIGINT, waits up to 20 s for the exit (then SIGKILL), returns what it printed.
    pub fn stop(mut self) -> Result<NetraceOutput> {
        let child = self.child.as_mut().context("netrace already stopped")?;
        signal(child, libc::SIGINT)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().context("waiting for netrace")? {
                return Ok(self.collect(status));
            }
            if Instant::now() >= deadline {
                let out = self.kill_and_collect()?;
                bail!(
                    "`{}` did not exit within 20 s of SIGINT; killed\nstderr: {}",
                    out.command_line,
                    out.stderr.trim()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill_and_collect(&mut self) -> Result<NetraceOutput> {
        let mut child = self.child.take().context("netrace already stopped")?;
        let _ = child.kill();
        let status = child.wait().context("waiting for netrace")?;
        self.child = Some(child);
        Ok(self.collect(status))
    }

    fn collect(&mut self, status: ExitStatus) -> NetraceOutput {
        self.child = None;
        let join =
            |h: Option<JoinHandle<String>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
        let stdout = join(self.stdout.take());
        let stderr = join(self.stderr.take());
        NetraceOutput::from_captured(self.command_line.clone(), status, stdout, stderr)
    }
}

fn signal(child: &Child, sig: i32) -> Result<()> {
    let pid = i32::try_from(child.id()).map_err(|_| anyhow!("pid out of range"))?;
    // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child, so it
    // cannot have been reused.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("kill(netrace)");
    }
    Ok(())
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

/// Convenience: `NetraceRun::start` with `NetraceOptions::new(bin)` and JSON output.
pub fn start_json(lab: &Lab, bin: &Path, extra: &[&str]) -> Result<NetraceRun> {
    NetraceRun::start(lab, &NetraceOptions::new(bin).args(extra.iter().copied()))
}
