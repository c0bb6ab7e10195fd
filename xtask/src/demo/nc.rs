//! The pod side of the demo: real `nc` processes (Debian's netcat-openbsd) run inside the pod's
//! network namespace with `ip netns exec`, several at a time, each judged by what `nc` itself
//! says: for TCP (`nc -vv -z`) its exit status (0: connected) and the "timed out" it prints; for
//! UDP (`nc -vvu`) whether the server's echo came back on standard output.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Result};

/// What the UDP runs send (and expect back from the echo server).
pub const UDP_PAYLOAD: &str = "netrace-demo\n";

/// One `nc` command line, run in a namespace.
pub struct NcRun {
    ns: String,
    args: Vec<String>,
    input: Option<&'static str>,
}

/// How a batch of `nc` runs went.
#[derive(Clone, Copy, Debug, Default)]
pub struct NcCounts {
    /// Runs finished.
    pub runs: usize,
    /// Connected (TCP) or answered (UDP).
    pub ok: usize,
    /// Timed out (TCP) or no answer (UDP): what the firewall's drop looks like from the pod.
    pub failed: usize,
    /// Anything else (refused, unreachable, an `nc` error).
    pub other: usize,
}

enum NcResult {
    Ok,
    Failed,
    Other,
}

impl NcRun {
    /// `ip netns exec NS nc ARGS...`, with `input` on standard input (or none).
    pub fn new(ns: &str, args: &[&str], input: Option<&'static str>) -> Self {
        Self {
            ns: ns.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            input,
        }
    }

    /// The command exactly as it runs.
    pub fn command_line(&self) -> String {
        format!("ip netns exec {} nc {}", self.ns, self.args.join(" "))
    }

    fn once(&self) -> Result<NcResult> {
        let mut argv = vec!["netns", "exec", &self.ns, "nc"];
        argv.extend(self.args.iter().map(String::as_str));
        let out = netrace_lab::cmd::output_with_input("ip", &argv, self.input)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("command not found")
            || stderr.contains("No such file")
            || stderr.contains("invalid option")
        {
            bail!("`{}` cannot run: {}", self.command_line(), stderr.trim());
        }
        Ok(match self.input {
            // UDP: answered when the echo came back.
            Some(input) if stdout.contains(input.trim_end()) => NcResult::Ok,
            Some(_) if out.status.success() || stderr.contains("timed out") => NcResult::Failed,
            Some(_) => NcResult::Other,
            // TCP: nc -z exits 0 once connected, and says "timed out" when no SYN-ACK came.
            None if out.status.success() => NcResult::Ok,
            None if stderr.contains("timed out") => NcResult::Failed,
            None => NcResult::Other,
        })
    }

    /// Runs the command `n` times, `workers` at a time; calls `progress(done, counts so far)`
    /// after each run.
    pub fn repeat(
        &self,
        n: usize,
        workers: usize,
        progress: &(dyn Fn(usize, NcCounts) + Sync),
    ) -> Result<NcCounts> {
        let next = AtomicUsize::new(0);
        let counts = Mutex::new(NcCounts::default());
        std::thread::scope(|scope| -> Result<()> {
            let handles: Vec<_> = (0..workers.max(1))
                .map(|_| {
                    scope.spawn(|| -> Result<()> {
                        while next.fetch_add(1, Ordering::Relaxed) < n {
                            let result = self.once()?;
                            let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
                            c.runs += 1;
                            match result {
                                NcResult::Ok => c.ok += 1,
                                NcResult::Failed => c.failed += 1,
                                NcResult::Other => c.other += 1,
                            }
                            progress(c.runs, *c);
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join()
                    .map_err(|_| anyhow::anyhow!("an nc worker panicked"))??;
            }
            Ok(())
        })?;
        Ok(counts.into_inner().unwrap_or_else(|p| p.into_inner()))
    }
}
