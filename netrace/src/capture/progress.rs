//! A progress line on standard error while a large capture is read, only when standard error
//! is a terminal: bytes read of the file's size, rewritten in place a few times a second and
//! erased when reading ends.

use std::{
    io::{IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

/// Files smaller than this are read too fast for a progress line to help.
pub const LARGE_FILE: u64 = 64 << 20;
const EVERY: Duration = Duration::from_millis(250);

pub struct Progress {
    label: String,
    total: Option<u64>,
    enabled: bool,
    started: Instant,
    last: Option<Instant>,
    shown: bool,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

impl Progress {
    /// A progress line for reading `label`, shown when standard error is a terminal and the
    /// file is at least [`LARGE_FILE`] bytes (or of unknown size).
    pub fn new(label: &str, total: Option<u64>) -> Self {
        let large = total.is_none_or(|t| t >= LARGE_FILE);
        Self::with(label, total, large && std::io::stderr().is_terminal())
    }

    /// One that never shows anything.
    pub fn hidden() -> Self {
        Self::with("", None, false)
    }

    fn with(label: &str, total: Option<u64>, enabled: bool) -> Self {
        Self {
            label: label.to_string(),
            total,
            enabled,
            started: Instant::now(),
            last: None,
            shown: false,
        }
    }

    /// The line for `read` bytes, as it would be shown.
    pub fn line(&self, read: u64) -> String {
        match self.total {
            Some(total) if total > 0 => format!(
                "netrace: reading {}: {:.0} of {:.0} MiB ({:.0}%)",
                self.label,
                mib(read),
                mib(total),
                100.0 * read.min(total) as f64 / total as f64
            ),
            _ => format!("netrace: reading {}: {:.0} MiB", self.label, mib(read)),
        }
    }

    /// Shows `read` bytes, at most every 250 ms, and not in the first second.
    pub fn update(&mut self, read: u64) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if now.duration_since(self.started) < Duration::from_secs(1)
            || self.last.is_some_and(|l| now.duration_since(l) < EVERY)
        {
            return;
        }
        self.last = Some(now);
        self.shown = true;
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K{}", self.line(read));
        let _ = err.flush();
    }

    /// Erases the line.
    pub fn finish(&mut self) {
        if self.shown {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
            self.shown = false;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let p = Progress::with("big.pcap", Some(200 << 20), false);
        assert_eq!(
            p.line(50 << 20),
            "netrace: reading big.pcap: 50 of 200 MiB (25%)"
        );
        let p = Progress::with("-", None, false);
        assert_eq!(p.line(3 << 20), "netrace: reading -: 3 MiB");
        assert!(!Progress::hidden().enabled);
    }
}
