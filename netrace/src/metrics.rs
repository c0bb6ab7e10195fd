//! Prometheus metrics (`--metrics-addr`): the exposition through `prometheus-client`, served by
//! hyper at `/metrics`, with `/healthz` and `/readyz` for Kubernetes probes.
//!
//! Labels are bounded: interface (the watched ones), outcome (six values), port bucket (the
//! histogram's buckets), range (inside/outside), hook, verdict, NAT mode, edge/bound, kernel
//! event name, and for `netrace_destination_connections_total` the top ten destinations by
//! attempts (the rest as `other`). Every known label set is there from the start, at zero.
//!
//! The server never gets in the way of the tracing: at most [`MAX_CONNECTIONS`] connections at
//! once (more are closed at once), one request per connection, a deadline on the request
//! headers and on the whole connection, and errors on accept (e.g. out of file descriptors)
//! only slow the accept loop down.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{
        text::encode, DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
    },
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        MetricType,
    },
    registry::Registry,
};
use tokio::{net::TcpListener, sync::Semaphore};

use crate::{ports::PortRange, track::tracker::OutcomeKind};

/// Upper bounds (seconds) of the connect-RTT histogram buckets.
/// The kernel's round-trip histogram's bounds, in seconds: booked answers are observed by
/// slot, so the buckets must be the same.
fn rtt_bounds() -> impl Iterator<Item = f64> {
    netrace_common::RTT_BOUNDS_US
        .iter()
        .map(|us| *us as f64 / 1e6)
}

/// The connect round-trip histogram. prometheus_client's `Histogram` observes one value at a
/// time, and the kernel's books hand over answers by the thousand per slot: this one takes a
/// count, and is encoded by the same encoder call (`_bucket`, `_sum`, `_count`).
#[derive(Clone, Debug)]
struct RttHistogram(Arc<Mutex<RttInner>>);

#[derive(Debug)]
struct RttInner {
    sum: f64,
    count: u64,
    /// Upper bound and the observations in that bucket alone (the encoder adds them up), the
    /// last one +Inf.
    buckets: Vec<(f64, u64)>,
}

impl RttHistogram {
    fn new() -> Self {
        Self(Arc::new(Mutex::new(RttInner {
            sum: 0.0,
            count: 0,
            buckets: rtt_bounds()
                .chain(std::iter::once(f64::INFINITY))
                .map(|b| (b, 0))
                .collect(),
        })))
    }

    /// `n` observations of `seconds`.
    fn observe_n(&self, seconds: f64, n: u64) {
        if n == 0 {
            return;
        }
        let mut h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        h.sum += seconds * n as f64;
        h.count += n;
        if let Some((_, c)) = h.buckets.iter_mut().find(|(b, _)| *b >= seconds) {
            *c += n;
        }
    }
}

impl EncodeMetric for RttHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        encoder.encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Connections served at once; more are closed right after accept.
pub const MAX_CONNECTIONS: usize = 16;
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer than this.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// How many destinations get a label of their own.
const TOP_DESTINATIONS: usize = 10;
/// Destinations remembered for the top ten; beyond that, new ones count as `other`.
const MAX_DESTINATIONS: usize = 10_000;
/// `/healthz` fails when the watch loop has not ticked for this long.
const STALE_AFTER: Duration = Duration::from_secs(30);

/// The outcomes, in label order.
pub const OUTCOMES: [&str; 6] = [
    "answered",
    "lost",
    "refused",
    "unreachable",
    "late",
    "abandoned",
];
/// Values of `netrace_verdict{verdict}`.
pub const VERDICTS: [&str; 5] = [
    "no_problem",
    "range_problem",
    "destination_problem",
    "not_enough_evidence",
    "translation_out_of_sight",
];
/// Values of `netrace_nat_mode{mode}`.
pub const NAT_MODES: [&str; 4] = ["unknown", "none", "keeps-ports", "random-fully"];

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

fn outcome_index(k: OutcomeKind) -> usize {
    match k {
        OutcomeKind::Answered => 0,
        OutcomeKind::Lost => 1,
        OutcomeKind::Refused => 2,
        OutcomeKind::Unreachable => 3,
        OutcomeKind::Late => 4,
        OutcomeKind::Abandoned => 5,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnLabels {
    iface: String,
    outcome: &'static str,
    port_bucket: String,
    range: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttachLabels {
    iface: String,
    hook: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EdgeLabels {
    edge: &'static str,
    bound: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestLabels {
    destination: String,
    outcome: &'static str,
}

/// Which edge of the allowed range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edge {
    Lower,
    Upper,
}

/// Outcomes per destination; the top ten by attempts are exported on each scrape.
#[derive(Debug, Default)]
struct Destinations {
    state: Mutex<DestState>,
}

#[derive(Debug, Default)]
struct DestState {
    by_dst: HashMap<SocketAddr, [u64; 6]>,
    /// Destinations that found the table full.
    overflow: [u64; 6],
}

fn attempts(c: &[u64; 6]) -> u64 {
    // `late` is the second outcome of a connection already counted as lost.
    c.iter()
        .enumerate()
        .filter(|(i, _)| *i != 4)
        .map(|(_, n)| n)
        .sum()
}

impl Destinations {
    fn add(&self, dst: SocketAddr, outcome: usize, n: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let full = s.by_dst.len() >= MAX_DESTINATIONS;
        match s.by_dst.get_mut(&dst) {
            Some(c) => c[outcome] += n,
            None if full => s.overflow[outcome] += n,
            None => {
                let mut c = [0; 6];
                c[outcome] = n;
                s.by_dst.insert(dst, c);
            }
        }
    }

    /// (label, counts) for the top destinations, then `other`.
    fn snapshot(&self) -> Vec<(String, [u64; 6])> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<(&SocketAddr, &[u64; 6])> = s.by_dst.iter().collect();
        all.sort_by(|a, b| attempts(b.1).cmp(&attempts(a.1)).then(a.0.cmp(b.0)));
        let mut other = s.overflow;
        let mut out = Vec::new();
        for (i, (dst, c)) in all.into_iter().enumerate() {
            if i < TOP_DESTINATIONS {
                out.push((dst.to_string(), *c));
            } else {
                for (o, n) in other.iter_mut().zip(c) {
                    *o += n;
                }
            }
        }
        out.push(("other".to_string(), other));
        out
    }
}

impl Collector for Destinations {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(
            "netrace_destination_connections",
            "Connection attempts by outcome for the ten destinations (address:port) with the \
             most attempts since netrace started; all others as \"other\". The set of \
             destinations can change as counts grow.",
            None,
            MetricType::Counter,
        )?;
        for (destination, counts) in self.snapshot() {
            for (i, outcome) in OUTCOMES.iter().enumerate() {
                let labels = DestLabels {
                    destination: destination.clone(),
                    outcome,
                };
                ConstCounter::new(counts[i]).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

struct Inner {
    registry: Registry,
    buckets: Vec<PortRange>,
    allowed: PortRange,
    connections: Family<ConnLabels, Counter>,
    syns: Counter,
    syn_retransmits: Counter,
    events_dropped: Counter,
    pending_map_full: Counter,
    kernel: Family<EventLabels, Counter>,
    pending: Gauge,
    rtt: RttHistogram,
    attached: Family<AttachLabels, Gauge>,
    verdict: Family<VerdictLabels, Gauge>,
    edge: Family<EdgeLabels, Gauge>,
    nat_mode: Family<ModeLabels, Gauge>,
    destinations: Arc<Destinations>,
    ready: AtomicBool,
    started: Instant,
    /// Milliseconds after `started` of the watch loop's last tick.
    heartbeat_ms: AtomicU64,
}

/// Cheap to clone; the watch loop writes, the HTTP task reads.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl Metrics {
    /// The metrics of one run: `buckets` are the histogram's port buckets, `ifaces` the
    /// watched uplinks; every known label set starts at zero.
    pub fn new(buckets: Vec<PortRange>, allowed: PortRange, ifaces: &[String]) -> Self {
        let mut registry = Registry::default();
        let connections = Family::<ConnLabels, Counter>::default();
        registry.register(
            "netrace_connections",
            "Connection attempts by outcome, source-port bucket, and whether the port is inside \
             the range the firewall lets SYN-ACKs back into. lost = no SYN-ACK within the SYN \
             timeout",
            connections.clone(),
        );
        let syns = Counter::default();
        registry.register(
            "netrace_syns",
            "Outbound TCP SYN packets seen on the watched interfaces (first and retransmitted)",
            syns.clone(),
        );
        let syn_retransmits = Counter::default();
        registry.register(
            "netrace_syn_retransmits",
            "SYNs that repeated an unanswered SYN (the client is retrying)",
            syn_retransmits.clone(),
        );
        let events_dropped = Counter::default();
        registry.register(
            "netrace_events_dropped",
            "Outcomes the kernel could not hand to netrace because the ring buffer was full \
             (raise --ringbuf-kib)",
            events_dropped.clone(),
        );
        let pending_map_full = Counter::default();
        registry.register(
            "netrace_pending_map_full",
            "SYNs not tracked because the pending map was full (raise --max-pending) or their \
             bucket stayed locked (also the kernel event table_busy)",
            pending_map_full.clone(),
        );
        let kernel = Family::<EventLabels, Counter>::default();
        registry.register(
            "netrace_kernel_events",
            "Every counter the kernel programs keep, by name (see docs/operations.md)",
            kernel.clone(),
        );
        let pending = Gauge::default();
        registry.register(
            "netrace_pending_connections",
            "SYNs waiting for an answer right now",
            pending.clone(),
        );
        let rtt = RttHistogram::new();
        registry.register(
            "netrace_connect_rtt_seconds",
            "Time from the first SYN to its SYN-ACK, for answered connections",
            rtt.clone(),
        );
        let attached = Family::<AttachLabels, Gauge>::default();
        registry.register(
            "netrace_attached",
            "1 while netrace's program is attached to this interface and hook",
            attached.clone(),
        );
        let verdict = Family::<VerdictLabels, Gauge>::default();
        registry.register(
            "netrace_verdict",
            "1 for the current verdict on the connections seen so far, 0 for the others",
            verdict.clone(),
        );
        let edge = Family::<EdgeLabels, Gauge>::default();
        registry.register(
            "netrace_allowed_range_edge",
            "The learned edge of the port range SYN-ACKs come back to (estimate), with the \
             bracket it lies in (min, max); absent until learned",
            edge.clone(),
        );
        let nat_mode = Family::<ModeLabels, Gauge>::default();
        registry.register(
            "netrace_nat_mode",
            "1 for what the node's SNAT does with source ports, 0 for the others",
            nat_mode.clone(),
        );
        let build_info = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "netrace_build_info",
            "Always 1; the version of netrace as a label",
            build_info.clone(),
        );
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        let destinations = Arc::new(Destinations::default());
        registry.register_collector(Box::new(destinations.clone()));

        for iface in ifaces {
            for b in &buckets {
                let range = if allowed.contains(b.start) {
                    "inside"
                } else {
                    "outside"
                };
                for outcome in OUTCOMES {
                    let _ = connections.get_or_create(&ConnLabels {
                        iface: iface.clone(),
                        outcome,
                        port_bucket: b.to_string(),
                        range,
                    });
                }
            }
        }
        for (_, name) in crate::kernel::loader::COUNTERS {
            let _ = kernel.get_or_create(&EventLabels { event: name });
        }
        for v in VERDICTS {
            verdict
                .get_or_create(&VerdictLabels { verdict: v })
                .set(i64::from(v == "not_enough_evidence"));
        }
        for m in NAT_MODES {
            nat_mode
                .get_or_create(&ModeLabels { mode: m })
                .set(i64::from(m == "unknown"));
        }
        Self(Arc::new(Inner {
            registry,
            buckets,
            allowed,
            connections,
            syns,
            syn_retransmits,
            events_dropped,
            pending_map_full,
            kernel,
            pending,
            rtt,
            attached,
            verdict,
            edge,
            nat_mode,
            destinations,
            ready: AtomicBool::new(false),
            started: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
        }))
    }

    /// One decided connection: `dst` is the server (address and port).
    pub fn outcome(
        &self,
        iface: &str,
        kind: OutcomeKind,
        port: u16,
        dst: SocketAddr,
        rtt_ns: Option<u64>,
    ) {
        self.outcomes(iface, kind, port, dst, 1);
        if let (OutcomeKind::Answered, Some(ns)) = (kind, rtt_ns) {
            self.0.rtt.observe_n(ns as f64 / 1e9, 1);
        }
    }

    /// Answered connections the kernel counted in its round-trip histogram: `n` in `slot`
    /// of `netrace_common::RTT_BOUNDS_US` (observed at the slot's bound, so the buckets are
    /// exact and the sum an upper estimate).
    pub fn rtt_slot(&self, slot: usize, n: u64) {
        let bounds = netrace_common::RTT_BOUNDS_US;
        let us = bounds
            .get(slot)
            .copied()
            .unwrap_or(bounds[bounds.len() - 1] * 2);
        self.0.rtt.observe_n(us as f64 / 1e6, n);
    }

    /// `n` decided connections of one kind from one source port to one destination.
    pub fn outcomes(&self, iface: &str, kind: OutcomeKind, port: u16, dst: SocketAddr, n: u64) {
        let m = &self.0;
        let bucket = m
            .buckets
            .iter()
            .find(|b| b.contains(port))
            .map_or_else(|| "other".to_string(), ToString::to_string);
        let range = if m.allowed.contains(port) {
            "inside"
        } else {
            "outside"
        };
        m.connections
            .get_or_create(&ConnLabels {
                iface: iface.to_string(),
                outcome: outcome_label(kind),
                port_bucket: bucket,
                range,
            })
            .inc_by(n);
        m.destinations.add(dst, outcome_index(kind), n);
    }

    /// The kernel's counters (cumulative, by their names in `loader::COUNTERS`) and the number
    /// of SYNs waiting now. Also marks the watch loop as alive.
    pub fn kernel_counters(
        &self,
        counters: impl IntoIterator<Item = (&'static str, u64)>,
        pending: u64,
    ) {
        let m = &self.0;
        for (name, v) in counters {
            let set = |c: &Counter| c.inner().store(v, Ordering::Relaxed);
            match name {
                "syn_seen" => set(&m.syns),
                "syn_retransmit" => set(&m.syn_retransmits),
                "ringbuf_full" => set(&m.events_dropped),
                "pending_map_full" => set(&m.pending_map_full),
                _ => {}
            }
            set(&m.kernel.get_or_create(&EventLabels { event: name }));
        }
        m.pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
        self.heartbeat();
    }

    /// The watch loop is alive (for `/healthz`).
    pub fn heartbeat(&self) {
        let ms = self.0.started.elapsed().as_millis();
        self.0
            .heartbeat_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Whether netrace's `hook` (`egress`, `ingress`, `pod_ingress`) is attached to `iface`.
    pub fn set_attached(&self, iface: &str, hook: &'static str, attached: bool) {
        self.0
            .attached
            .get_or_create(&AttachLabels {
                iface: iface.to_string(),
                hook,
            })
            .set(i64::from(attached));
    }

    /// Every program is attached: `/readyz` answers 200 from now on (until `set_ready(false)`).
    pub fn set_ready(&self, ready: bool) {
        self.0.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::Relaxed)
    }

    /// The current verdict, one of [`VERDICTS`] (anything else is ignored).
    pub fn set_verdict(&self, verdict: &str) {
        if !VERDICTS.contains(&verdict) {
            log::debug!("metrics: unknown verdict {verdict}");
            return;
        }
        for v in VERDICTS {
            self.0
                .verdict
                .get_or_create(&VerdictLabels { verdict: v })
                .set(i64::from(v == verdict));
        }
    }

    /// The learned `edge` of the allowed range: its estimate and the bracket [min, max] it
    /// lies in; `None` removes it (not learned, or no longer).
    pub fn set_range_edge(&self, edge: Edge, value: Option<(u16, u16, u16)>) {
        let e = match edge {
            Edge::Lower => "lower",
            Edge::Upper => "upper",
        };
        for (i, bound) in ["estimate", "min", "max"].into_iter().enumerate() {
            let labels = EdgeLabels { edge: e, bound };
            match value {
                Some((est, min, max)) => {
                    let v = [est, min, max][i];
                    self.0.edge.get_or_create(&labels).set(i64::from(v));
                }
                None => {
                    self.0.edge.remove(&labels);
                }
            }
        }
    }

    /// What the node's SNAT does with ports, one of [`NAT_MODES`] (anything else is ignored).
    pub fn set_nat_mode(&self, mode: &str) {
        if !NAT_MODES.contains(&mode) {
            log::debug!("metrics: unknown NAT mode {mode}");
            return;
        }
        for m in NAT_MODES {
            self.0
                .nat_mode
                .get_or_create(&ModeLabels { mode: m })
                .set(i64::from(m == mode));
        }
    }

    /// The exposition text (OpenMetrics text format, which Prometheus reads).
    pub fn render(&self) -> String {
        let mut o = String::new();
        if let Err(e) = encode(&mut o, &self.0.registry) {
            log::warn!("encoding the metrics: {e}");
        }
        o
    }

    /// The same exposition in the Prometheus text format 0.0.4, for clients that do not ask
    /// for OpenMetrics (e.g. `curl`, `promtool check metrics`): counter families are named with
    /// their `_total` suffix, and `# EOF` / `# UNIT` lines are left out.
    pub fn render_prometheus(&self) -> String {
        to_prometheus_text(&self.render())
    }

    fn healthy(&self) -> bool {
        let last = Duration::from_millis(self.0.heartbeat_ms.load(Ordering::Relaxed));
        self.0.started.elapsed().saturating_sub(last) < STALE_AFTER
    }
}

/// OpenMetrics text → Prometheus text format 0.0.4 (see [`Metrics::render_prometheus`]).
fn to_prometheus_text(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len());
    for l in open_metrics.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = l.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(r) => out.push_str(&r),
            None => out.push_str(l),
        }
        out.push('\n');
    }
    out
}

fn respond(m: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let text = |status: u16, body: &'static str| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap_or_default()
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(405, "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let open_metrics = req
                .headers()
                .get_all("accept")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            let (ctype, body) = if open_metrics {
                (
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    m.render(),
                )
            } else {
                (
                    "text/plain; version=0.0.4; charset=utf-8",
                    m.render_prometheus(),
                )
            };
            Response::builder()
                .header("content-type", ctype)
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_default()
        }
        "/healthz" if m.healthy() => text(200, "ok\n"),
        "/healthz" => text(503, "the watch loop has stalled\n"),
        "/readyz" if m.is_ready() => text(200, "ready\n"),
        "/readyz" => text(503, "not attached yet\n"),
        _ => text(404, "try /metrics, /healthz or /readyz\n"),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Metrics) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut last_warning: Option<Instant> = None;
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // E.g. out of file descriptors: wait instead of spinning; say so once a minute.
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    log::warn!("metrics: accepting a connection: {e}");
                    last_warning = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            log::debug!("metrics: {MAX_CONNECTIONS} connections open; closing a new one");
            drop(sock);
            continue;
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req: Request<Incoming>| {
                let r = respond(&m, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(16 * 1024);
            let conn = builder.serve_connection(TokioIo::new(sock), service);
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                log::debug!("metrics: connection: {e}");
            }
        });
    }
}

/// The destination label of a connection to `addr`:`port`.
pub fn destination(addr: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(addr, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dst(last: u8) -> SocketAddr {
        SocketAddr::new(IpAddr::from([198, 18, 3, last]), 8080)
    }

    /// The counted histogram renders exactly as prometheus_client's own after the same
    /// observations one by one.
    #[test]
    fn rtt_histogram_by_count_renders_as_observed_one_by_one() -> std::fmt::Result {
        let render = |m: Box<dyn Fn(&mut Registry)>| {
            let mut r = Registry::default();
            m(&mut r);
            let mut t = String::new();
            encode(&mut t, &r).map(|()| t)
        };
        let seen = [(0.0004, 3), (0.002, 1), (0.9, 2), (1e6, 4)];
        let ours = render(Box::new(move |r| {
            let h = RttHistogram::new();
            for (v, n) in seen {
                h.observe_n(v, n);
            }
            r.register("rtt", "help", h);
        }))?;
        let theirs = render(Box::new(move |r| {
            let h = prometheus_client::metrics::histogram::Histogram::new(rtt_bounds());
            for (v, n) in seen {
                for _ in 0..n {
                    h.observe(v);
                }
            }
            r.register("rtt", "help", h);
        }))?;
        assert_eq!(ours, theirs);
        assert!(ours.contains("rtt_count 10"), "{ours}");
        Ok(())
    }

    #[test]
    fn renders_bounded_labels_from_zero() {
        let m = Metrics::new(
            vec![PortRange::new(1, 32767), PortRange::new(32768, 65535)],
            PortRange::new(32768, 65535),
            &["eth0".to_string()],
        );
        let t = m.render();
        assert!(t.contains("netrace_connections_total{iface=\"eth0\",outcome=\"lost\",port_bucket=\"1-32767\",range=\"outside\"} 0"), "{t}");
        assert!(
            t.contains("netrace_kernel_events_total{event=\"synack_mismatch\"} 0"),
            "{t}"
        );
        assert!(
            t.contains("netrace_verdict{verdict=\"not_enough_evidence\"} 1"),
            "{t}"
        );
        assert!(t.contains("netrace_build_info{version=\""), "{t}");
        m.outcome("eth0", OutcomeKind::Lost, 2000, dst(2), None);
        m.outcome(
            "eth0",
            OutcomeKind::Answered,
            40000,
            dst(2),
            Some(2_000_000),
        );
        m.kernel_counters([("syn_seen", 2)], 0);
        m.set_verdict("range_problem");
        let t = m.render();
        assert!(t.contains("netrace_connections_total{iface=\"eth0\",outcome=\"lost\",port_bucket=\"1-32767\",range=\"outside\"} 1"), "{t}");
        assert!(t.contains("netrace_syns_total 2"), "{t}");
        assert!(
            t.contains("netrace_kernel_events_total{event=\"syn_seen\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("netrace_connect_rtt_seconds_bucket{le=\"0.0025\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("netrace_connect_rtt_seconds_bucket{le=\"0.001\"} 0"),
            "{t}"
        );
        assert!(t.contains("netrace_connect_rtt_seconds_count 1"), "{t}");
        assert!(
            t.contains("netrace_verdict{verdict=\"range_problem\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("netrace_verdict{verdict=\"not_enough_evidence\"} 0"),
            "{t}"
        );
        assert!(t.contains("netrace_destination_connections_total{destination=\"198.18.3.2:8080\",outcome=\"lost\"} 1"), "{t}");
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new(vec![], PortRange::new(32768, 65535), &[]);
        m.set_attached("we\"ird\\if\n", "egress", true);
        let t = m.render();
        assert!(
            t.contains(r#"netrace_attached{iface="we\"ird\\if\n",hook="egress"} 1"#),
            "{t}"
        );
    }

    #[test]
    fn top_ten_destinations_and_other() {
        let d = Destinations::default();
        for i in 0..15u8 {
            for _ in 0..=i {
                d.add(dst(i), 1, 1);
            }
        }
        let s = d.snapshot();
        assert_eq!(s.len(), TOP_DESTINATIONS + 1);
        assert_eq!(s[0], (dst(14).to_string(), [0, 15, 0, 0, 0, 0]));
        // The five smallest (1 + 2 + 3 + 4 + 5 attempts) are "other".
        assert_eq!(s[10], ("other".to_string(), [0, 15, 0, 0, 0, 0]));
    }

    /// The metric names the rules, the dashboard and `netrace fleet` rely on.
    const CONTRACT: &str = include_str!("../metrics.txt");

    #[test]
    fn the_exposition_is_the_contract() {
        let m = Metrics::new(
            vec![PortRange::new(1, 32767), PortRange::new(32768, 65535)],
            PortRange::new(32768, 65535),
            &["eth0".to_string()],
        );
        m.outcome("eth0", OutcomeKind::Lost, 2000, dst(2), None);
        m.set_range_edge(Edge::Lower, Some((32768, 32700, 32800)));
        m.set_attached("eth0", "egress", true);
        let t = m.render_prometheus();
        let exported: Vec<(&str, &str)> = t
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .collect();
        let contract: Vec<(&str, &str)> = CONTRACT
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((f.next()?, f.next()?))
            })
            .collect();
        for e in &exported {
            assert!(
                contract.contains(e),
                "{e:?} is exported but not in metrics.txt"
            );
        }
        for c in &contract {
            assert!(
                exported.contains(c),
                "metrics.txt lists {c:?}, not exported:\n{t}"
            );
        }
    }

    #[test]
    fn range_edges_appear_and_go() {
        let m = Metrics::new(vec![], PortRange::new(32768, 65535), &[]);
        assert!(!m.render().contains("netrace_allowed_range_edge{"));
        m.set_range_edge(Edge::Lower, Some((32768, 32700, 32800)));
        let t = m.render();
        assert!(
            t.contains("netrace_allowed_range_edge{edge=\"lower\",bound=\"min\"} 32700"),
            "{t}"
        );
        m.set_range_edge(Edge::Lower, None);
        assert!(!m.render().contains("netrace_allowed_range_edge{"));
    }
}
