//! Prometheus metrics at `/metrics` (`--metrics-addr`): outcomes by port bucket and by
//! inside/outside the allowed range, kernel drops, and a connect-RTT histogram.
//!
//! Labels are bounded: interface (the watched ones), outcome (six values), port bucket (the
//! histogram's buckets) and range (inside/outside). Never addresses or ports.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::{ports::PortRange, track::tracker::OutcomeKind};

/// Upper bounds (seconds) of the connect-RTT histogram buckets.
const RTT_BOUNDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0,
];

#[derive(Default)]
struct State {
    /// (iface, outcome, bucket, range) → count
    outcomes: BTreeMap<(String, &'static str, String, &'static str), u64>,
    rtt_counts: [u64; RTT_BOUNDS.len()],
    rtt_count: u64,
    rtt_sum: f64,
    kernel: BTreeMap<&'static str, u64>,
    pending: u64,
}

/// Cheap to clone; the watch loop writes, the HTTP task reads.
#[derive(Clone, Default)]
pub struct Metrics {
    state: Arc<Mutex<State>>,
    buckets: Arc<Vec<PortRange>>,
    allowed: Option<PortRange>,
}

fn outcome_label(k: OutcomeKind) -> &'static str {
    match k {
        OutcomeKind::Answered => "answered",
        OutcomeKind::Lost => "lost",
        OutcomeKind::Refused => "refused",
        OutcomeKind::Unreachable => "unreachable",
        OutcomeKind::Late => "late",
        OutcomeKind::Abandoned => "abandoned",
    }
}

impl Metrics {
    pub fn new(buckets: Vec<PortRange>, allowed: PortRange) -> Self {
        Self {
            state: Arc::default(),
            buckets: Arc::new(buckets),
            allowed: Some(allowed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the counters inconsistent enough to
        // matter; keep serving.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn outcome(&self, iface: &str, kind: OutcomeKind, port: u16, rtt_ns: Option<u64>) {
        let bucket = self
            .buckets
            .iter()
            .find(|b| b.contains(port))
            .map_or_else(|| "other".to_string(), ToString::to_string);
        let range = if self.allowed.is_some_and(|a| a.contains(port)) {
            "inside"
        } else {
            "outside"
        };
        let mut s = self.lock();
        *s.outcomes
            .entry((iface.to_string(), outcome_label(kind), bucket, range))
            .or_default() += 1;
        if let (OutcomeKind::Answered, Some(ns)) = (kind, rtt_ns) {
            let secs = ns as f64 / 1e9;
            s.rtt_count += 1;
            s.rtt_sum += secs;
            for (i, b) in RTT_BOUNDS.iter().enumerate() {
                if secs <= *b {
                    s.rtt_counts[i] += 1;
                }
            }
        }
    }

    pub fn kernel_counters(
        &self,
        counters: impl IntoIterator<Item = (&'static str, u64)>,
        pending: u64,
    ) {
        let mut s = self.lock();
        s.kernel.extend(counters);
        s.pending = pending;
    }

    /// The exposition text (Prometheus text format 0.0.4).
    pub fn render(&self) -> String {
        let s = self.lock();
        let mut o = String::new();
        let k = |name: &str| s.kernel.get(name).copied().unwrap_or(0);
        let _ = writeln!(o, "# HELP netrace_syns_total Outbound TCP SYN packets seen on the watched interfaces (first and retransmitted).");
        let _ = writeln!(o, "# TYPE netrace_syns_total counter");
        let _ = writeln!(o, "netrace_syns_total {}", k("syn_seen"));
        let _ = writeln!(o, "# HELP netrace_syn_retransmits_total SYNs that repeated an unanswered SYN (the client is retrying).");
        let _ = writeln!(o, "# TYPE netrace_syn_retransmits_total counter");
        let _ = writeln!(o, "netrace_syn_retransmits_total {}", k("syn_retransmit"));
        let _ = writeln!(o, "# HELP netrace_connections_total Connection attempts by outcome, source-port bucket, and whether the port is inside the range the firewall lets SYN-ACKs back into. lost = no SYN-ACK within the SYN timeout.");
        let _ = writeln!(o, "# TYPE netrace_connections_total counter");
        for ((iface, outcome, bucket, range), n) in &s.outcomes {
            let _ = writeln!(
                o,
                "netrace_connections_total{{iface=\"{iface}\",outcome=\"{outcome}\",port_bucket=\"{bucket}\",range=\"{range}\"}} {n}"
            );
        }
        let _ = writeln!(o, "# HELP netrace_events_dropped_total Outcomes the kernel could not hand to netrace because the ring buffer was full (raise --ringbuf-kib).");
        let _ = writeln!(o, "# TYPE netrace_events_dropped_total counter");
        let _ = writeln!(o, "netrace_events_dropped_total {}", k("ringbuf_full"));
        let _ = writeln!(o, "# HELP netrace_pending_map_full_total SYNs not tracked because the pending map was full (raise --max-pending).");
        let _ = writeln!(o, "# TYPE netrace_pending_map_full_total counter");
        let _ = writeln!(
            o,
            "netrace_pending_map_full_total {}",
            k("pending_map_full")
        );
        let _ = writeln!(
            o,
            "# HELP netrace_pending_connections SYNs waiting for an answer right now."
        );
        let _ = writeln!(o, "# TYPE netrace_pending_connections gauge");
        let _ = writeln!(o, "netrace_pending_connections {}", s.pending);
        let _ = writeln!(o, "# HELP netrace_connect_rtt_seconds Time from the first SYN to its SYN-ACK, for answered connections.");
        let _ = writeln!(o, "# TYPE netrace_connect_rtt_seconds histogram");
        for (i, b) in RTT_BOUNDS.iter().enumerate() {
            let _ = writeln!(
                o,
                "netrace_connect_rtt_seconds_bucket{{le=\"{b}\"}} {}",
                s.rtt_counts[i]
            );
        }
        let _ = writeln!(
            o,
            "netrace_connect_rtt_seconds_bucket{{le=\"+Inf\"}} {}",
            s.rtt_count
        );
        let _ = writeln!(o, "netrace_connect_rtt_seconds_sum {}", s.rtt_sum);
        let _ = writeln!(o, "netrace_connect_rtt_seconds_count {}", s.rtt_count);
        o
    }
}

/// Serves `/metrics` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Metrics) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("");
            let (status, ctype, body) = if path == "/metrics" {
                (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    m.render(),
                )
            } else {
                ("404 Not Found", "text/plain", "try /metrics\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// Binds the listener (before attaching, so a busy port is a usage error).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bounded_labels() {
        let m = Metrics::new(
            vec![PortRange::new(1, 32767), PortRange::new(32768, 65535)],
            PortRange::new(32768, 65535),
        );
        m.outcome("eth0", OutcomeKind::Lost, 2000, None);
        m.outcome("eth0", OutcomeKind::Answered, 40000, Some(2_000_000));
        m.kernel_counters([("syn_seen", 2)], 0);
        let t = m.render();
        assert!(t.contains("netrace_connections_total{iface=\"eth0\",outcome=\"lost\",port_bucket=\"1-32767\",range=\"outside\"} 1"));
        assert!(t.contains("netrace_syns_total 2"));
        assert!(t.contains("netrace_connect_rtt_seconds_bucket{le=\"0.0025\"} 1"));
        assert!(t.contains("netrace_connect_rtt_seconds_bucket{le=\"0.001\"} 0"));
        assert!(t.contains("netrace_connect_rtt_seconds_count 1"));
    }
}
