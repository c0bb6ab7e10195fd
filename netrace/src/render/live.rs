//! The live one-line summary on a terminal, redrawn about once a second.

use std::io::{self, IsTerminal, Write};

use crate::{
    report::{ConnRecord, IntervalReport, Tally},
    track::stats::Histogram,
};

pub struct Live {
    enabled: bool,
    drawn: bool,
    /// A warning shown after the counts (e.g. translation out of sight).
    warning: Option<String>,
}

impl Live {
    /// Draws on standard error, and only when it is a terminal.
    pub fn new() -> Self {
        Self {
            enabled: io::stderr().is_terminal(),
            drawn: false,
            warning: None,
        }
    }

    /// Shows `warning` after the counts from the next redraw on.
    pub fn warn(&mut self, warning: Option<String>) {
        self.warning = warning;
    }

    pub fn draw(&mut self, h: &Histogram, waiting: usize, dropped: u64, elapsed_s: f64) {
        if !self.enabled {
            return;
        }
        let c = &h.totals;
        let mut e = io::stderr().lock();
        let _ = write!(
            e,
            "\r\x1b[K[{elapsed_s:>5.0}s] attempts {}  answered {}  lost {} (inside {}, outside {})  \
             refused {}  unreachable {}  waiting {waiting}  events dropped {dropped}",
            c.attempts,
            c.answered,
            c.lost,
            h.inside.lost,
            h.outside.lost,
            c.refused,
            c.unreachable
        );
        if let Some(w) = &self.warning {
            let _ = write!(e, "  | {w}");
        }
        let _ = e.flush();
        self.drawn = true;
    }

    pub fn clear(&mut self) {
        if self.drawn {
            let _ = write!(io::stderr(), "\r\x1b[K");
            self.drawn = false;
        }
    }
}

impl Default for Live {
    fn default() -> Self {
        Self::new()
    }
}

fn pct(lost: u64, attempts: u64) -> String {
    if attempts == 0 {
        "-".to_string()
    } else {
        format!("{:.1}%", 100.0 * lost as f64 / attempts as f64)
    }
}

fn tally(t: &Tally, allowed: &str) -> String {
    format!(
        "{} attempts, {} answered, {} lost, {} refused, {} unreachable; inside {allowed}: {} \
         attempts, {} lost ({}); outside: {} attempts, {} lost ({})",
        t.attempts,
        t.answered,
        t.lost,
        t.refused,
        t.unreachable,
        t.inside.attempts,
        t.inside.lost,
        pct(t.inside.lost, t.inside.attempts),
        t.outside.attempts,
        t.outside.lost,
        pct(t.outside.lost, t.outside.attempts),
    )
}

/// The `--interval` line for standard error.
pub fn interval_line(r: &IntervalReport) -> String {
    let allowed = r.allowed_ports.to_string();
    format!(
        "netrace: [{:.0}s] last {:.0}s: {}; since start: {} attempts, {} lost; {} waiting; \
         verdict: {}",
        r.elapsed_s,
        r.interval_s,
        tally(&r.window, &allowed),
        r.totals.attempts,
        r.totals.lost,
        r.pending,
        r.verdict.words()
    )
}

/// One streamed outcome (`--events`) as a text line.
pub fn event_line(r: &ConnRecord) -> String {
    let outcome = serde_json::to_value(r.outcome)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let mut line = format!(
        "{outcome} {} {}:{} -> {}:{} syns={} {} the allowed range",
        r.iface,
        r.src,
        r.src_port,
        r.dst,
        r.dst_port,
        r.syns,
        if r.in_allowed_range {
            "inside"
        } else {
            "outside"
        }
    );
    if let (Some(a), Some(p)) = (r.who.pod_src, r.who.pod_src_port) {
        line.push_str(&format!(" pod_src={a}:{p}"));
    }
    if let (Some(ns), Some(name)) = (&r.who.pod_namespace, &r.who.pod_name) {
        line.push_str(&format!(" pod={ns}/{name}"));
    } else if let Some(uid) = &r.who.pod_uid {
        line.push_str(&format!(" pod_uid={uid}"));
    }
    if let (Some(comm), Some(pid)) = (&r.who.comm, r.who.pid) {
        line.push_str(&format!(" process={comm}({pid})"));
    }
    line
}
