//! The event pump: drain the ring buffer, track each connection to its outcome, record the
//! outcomes (histogram, metrics, JSON lines, the lost list), sweep the pending map on a tick,
//! and notice vanished interfaces, until a signal, the duration, a closed standard output or
//! the last interface ends the run.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use netrace_common::{
    AnswerBook, BookKey, Counter, EventKind, FlowKey, BOOK_PORTS, FAMILY_V4, RTT_SLOTS,
};
use tokio::{
    signal::unix::{signal, Signal, SignalKind},
    time::{interval, sleep_until, MissedTickBehavior},
};

use super::{
    answered::{Answered, Dest},
    config::WatchConfig,
    interfaces::Interfaces,
    setup::Kernel,
};
use crate::{
    judge::{
        advice,
        translation::TranslationSigns,
        verdict::{self, Verdict},
    },
    kernel::{
        egress_hook::Hook,
        events::{addrs, Record},
        loader::{self, Books},
        logs::Logs,
    },
    metrics::{self, Metrics},
    node::NodePorts,
    options::{Events, OutputFormat},
    render,
    report::{monotonic_ns, Clock, ConnRecord, IntervalReport, ShortVerdict, Tally},
    track::natmode::{self, NatReport},
    track::{
        correlate::Correlator,
        destinations::{Destination, Destinations, Slot},
        stats::Histogram,
        tracker::{Outcome, OutcomeKind, Tracker},
    },
};

/// At most this many lost connections are kept for `--list-lost`.
const MAX_LISTED: usize = 100_000;
const TICK: Duration = Duration::from_millis(250);
/// The kernel wakes netrace only when a quarter of the ring buffer is full; below that,
/// events are collected this often while they come, and with the tick when they do not (an
/// idle node wakes netrace four times a second, not twenty).
const DRAIN: Duration = Duration::from_millis(50);
/// The drain timer when events stopped coming: the tick drains until they come again.
const DRAIN_IDLE: Duration = Duration::from_secs(3600);
/// The kernel map is walked at most this often (and at least every quarter of the SYN
/// timeout): each walk visits every bucket of the map.
const SWEEP_MAX: Duration = Duration::from_secs(1);
/// ... and never more often than every SWEEP_SHARE times its own duration (2 % of a core).
const SWEEP_SHARE: u32 = 50;
/// ... but at least this often: the tracker's windows (repeat, late) assume sweeps well inside
/// them.
const SWEEP_SPACED_MAX: Duration = Duration::from_secs(10);
/// How often the watched interfaces are looked up by name (to notice one that went away).
const IFACE_CHECK: Duration = Duration::from_secs(1);
/// How often the live progress line is redrawn.
const DRAW: Duration = Duration::from_secs(1);
/// How often the verdict so far is worked out for the metrics.
const JUDGE: Duration = Duration::from_secs(5);
/// ... and this long after the latest outcome once a sweep found nothing new, so a scrape
/// after a burst sees all of it. (Answers counted in the kernel arrive with the sweeps, a
/// burst each time: without the quiet sweep, steady traffic was judged after every sweep.)
const JUDGE_SETTLED: Duration = Duration::from_millis(500);
/// Rows of the "by destination" table (the rest are summed in an "other" row).
pub const TOP_DESTINATIONS: usize = 10;

/// Why the loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Signal,
    Duration,
    /// Standard output was closed (e.g. `| head`): end quietly.
    BrokenPipe,
    /// Every watched interface went away.
    InterfacesGone,
}

/// SIGINT and SIGTERM, installed before anything is attached so that Ctrl-C during setup
/// ends the run cleanly instead of killing it.
pub struct Signals {
    sigint: Signal,
    sigterm: Signal,
}

impl Signals {
    pub fn install() -> anyhow::Result<Self> {
        Ok(Self {
            sigint: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            sigterm: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }
}

/// Everything one run collects.
pub struct Pump {
    pub cfg: WatchConfig,
    pub started: Instant,
    clock: Clock,
    pub tracker: Tracker,
    pub histogram: Histogram,
    /// Outcomes by destination, for the verdict (bounded).
    pub destinations: Destinations,
    /// Unreachable outcomes by (IPv6, ICMP type, code).
    pub icmp: BTreeMap<(bool, u8, u8), u64>,
    /// Source ports of every attempt the tracker knew (one bit per port): after ring-buffer
    /// drops, ports the kernel tallied SYNs for and the tracker never knew are attempts whose
    /// every event was dropped.
    known_ports: Vec<u64>,
    /// Outcomes recorded since the verdict was last worked out for the metrics, and when the
    /// latest was recorded.
    unjudged: bool,
    last_outcome: Instant,
    /// Whether the latest sweep brought no outcome (no lost, no answers from the books).
    quiet_sweep: bool,
    last_iface_check: Instant,
    /// Records the tick's own drain found (events coming again: the drain timer restarts).
    tick_drained: usize,
    pub lost: Vec<ConnRecord>,
    pub lost_not_listed: u64,
    pub decode_errors: u64,
    pub interfaces: Interfaces,
    pub correlator: Option<Correlator>,
    /// Why the run lost attribution or interfaces, for the report.
    pub notes: Vec<String>,
    metrics: Metrics,
    out: io::Stdout,
    outcomes: Vec<Outcome>,
    live: render::live::Live,
    last_drawn: Instant,
    /// The kernel's answer books and round-trip histogram as last read, to take differences.
    books_seen: foldhash::HashMap<BookKey, Box<AnswerBook>>,
    books_buf: Vec<(BookKey, AnswerBook)>,
    /// The source ports with an answer counted, so that a SYN-ACK the server repeats is
    /// known as such.
    answered: Answered,
    /// Answers read and not yet counted, from the books or the logs: (book, source port,
    /// count).
    books_fresh: Vec<(BookKey, u16, u64)>,
    rtt_seen: Vec<u64>,
    /// The kernel's count of SYNs at the last pass over the pending maps, and of answers
    /// counted in the kernel at the last read of the round trips: unchanged, there is nothing
    /// new to read.
    swept_syns: u64,
    read_booked: u64,
    /// The answers counted in the books (not the logs) at the last read of the books.
    read_in_books: u64,
    last_sweep: Instant,
    /// How long the last sweep took.
    sweep_cost: Duration,
    /// The node's port settings, for the verdict so far.
    pub node: NodePorts,
    last_judged: Instant,
    /// When the last `--interval` summary was written, and the totals then.
    interval_start: Instant,
    interval_totals: Tally,
    /// Where outbound SYNs are observed, and the line that says why.
    pub hook: Hook,
    pub hook_reason: String,
}

impl Pump {
    pub fn new(
        cfg: WatchConfig,
        interfaces: Interfaces,
        correlator: Option<Correlator>,
        notes: Vec<String>,
        metrics: Metrics,
        node: NodePorts,
        (hook, hook_reason): (Hook, String),
    ) -> Self {
        Self {
            started: Instant::now(),
            clock: Clock::now(),
            tracker: cfg.tracker(&node),
            histogram: cfg.histogram(),
            destinations: Destinations::default(),
            icmp: BTreeMap::new(),
            known_ports: vec![0; 65536 / 64],
            unjudged: false,
            last_outcome: Instant::now(),
            quiet_sweep: true,
            last_iface_check: Instant::now(),
            tick_drained: 0,
            lost: Vec::new(),
            lost_not_listed: 0,
            decode_errors: 0,
            interfaces,
            correlator,
            notes,
            metrics,
            out: io::stdout(),
            outcomes: Vec::new(),
            live: render::live::Live::new(),
            last_drawn: Instant::now(),
            books_seen: foldhash::HashMap::default(),
            books_buf: Vec::new(),
            books_fresh: Vec::new(),
            answered: Answered::default(),
            rtt_seen: vec![0; RTT_SLOTS as usize],
            swept_syns: u64::MAX,
            read_booked: u64::MAX,
            read_in_books: u64::MAX,
            last_sweep: Instant::now(),
            sweep_cost: Duration::ZERO,
            node,
            last_judged: Instant::now(),
            interval_start: Instant::now(),
            interval_totals: Tally::default(),
            hook,
            hook_reason,
            cfg,
        }
    }

    /// Pumps until the run ends; says why.
    pub async fn run(&mut self, kernel: &mut Kernel, signals: &mut Signals) -> anyhow::Result<End> {
        let deadline = self
            .cfg
            .duration
            .map(|d| tokio::time::Instant::now() + d)
            .unwrap_or_else(|| {
                tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86400)
            });
        let mut next_drain = tokio::time::Instant::now() + DRAIN;
        let mut tick = interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let end = loop {
            tokio::select! {
                r = kernel.ring.readable_mut() => {
                    let mut guard = r.context("waiting on the ring buffer")?;
                    // The logs first: a repeated SYN-ACK's event is known by the answer
                    // before it (`Answered::contains`).
                    self.drain_logs(&mut kernel.logs);
                    self.drain(guard.get_inner_mut());
                    guard.clear_ready();
                    if self.record().is_err() {
                        break End::BrokenPipe;
                    }
                }
                _ = sleep_until(next_drain) => {
                    let busy = self.drain_logs(&mut kernel.logs) + self.drain(kernel.ring.get_mut()) > 0;
                    next_drain = tokio::time::Instant::now() + if busy { DRAIN } else { DRAIN_IDLE };
                    if self.record().is_err() {
                        break End::BrokenPipe;
                    }
                }
                _ = tick.tick() => {
                    if let Some(end) = self.tick(kernel) {
                        break end;
                    }
                    if self.tick_drained > 0 {
                        next_drain = tokio::time::Instant::now() + DRAIN;
                    }
                }
                _ = signals.sigint.recv() => break End::Signal,
                _ = signals.sigterm.recv() => break End::Signal,
                _ = sleep_until(deadline) => break End::Duration,
            }
        };
        self.live.clear();
        Ok(end)
    }

    /// The periodic work: sweep the pending map, update the metrics, notice vanished
    /// interfaces, redraw the progress line.
    fn tick(&mut self, kernel: &mut Kernel) -> Option<End> {
        // Read what the kernel already reported before judging by the map: an entry answered
        // a moment ago is gone from the map while its event still waits in the ring, and the
        // sweep would count it twice (or as abandoned).
        self.tick_drained = self.drain_logs(&mut kernel.logs) + self.drain(kernel.ring.get_mut());
        // Every counter in one system call, after the drain: a SYN or an answer counted after
        // this read is looked at by the next sweep. A counter that cannot be read counts as
        // changed.
        let counts = kernel.all_counters();
        let counter = |c: Counter| counts.as_ref().and_then(|v| v.get(c as usize).copied());
        let ring_drops = counter(Counter::RingbufFull).unwrap_or(0);
        // A sweep visits every entry of the map in the kernel: with very many pending (a SYN
        // flood, a million lost in their late window) it is spaced out so that it never takes
        // more than 1/SWEEP_SHARE of the time; lost connections are then decided later.
        let every = (self.cfg.syn_timeout / 4)
            .clamp(TICK, SWEEP_MAX)
            .max((self.sweep_cost * SWEEP_SHARE).min(SWEEP_SPACED_MAX));
        if self.last_sweep.elapsed() >= every {
            let started = Instant::now();
            self.last_sweep = started;
            let now = monotonic_ns();
            // With nothing held and no SYN since the last pass, the maps are empty: an idle
            // node costs no pass over their buckets.
            let syns = counter(Counter::SynSeen);
            if syns.is_none_or(|n| n != self.swept_syns) || !self.tracker.idle() {
                self.tracker
                    .sweep(now, &mut kernel.pending, &mut self.outcomes);
                self.swept_syns = syns.unwrap_or(u64::MAX);
            }
            // The books hold the answers the logs had no room for: read only when there are
            // new ones (a walk of every book is a system call per chunk of them).
            let booked = counter(Counter::AnsweredBooked);
            let in_books = booked
                .zip(counter(Counter::AnsweredLogged))
                .map(|(b, l)| b - l.min(b));
            if in_books.is_none_or(|n| n != self.read_in_books) {
                self.read_books(&mut kernel.books);
                self.read_in_books = in_books.unwrap_or(u64::MAX);
            }
            if booked.is_none_or(|n| n != self.read_booked) {
                self.read_rtt(&kernel.books);
                self.read_booked = booked.unwrap_or(u64::MAX);
            }
            self.quiet_sweep = self.outcomes.is_empty() && self.last_outcome < started;
            if let Some(c) = self.correlator.as_mut() {
                c.prune(now);
            }
            self.sweep_cost = started.elapsed();
            self.metrics.kernel_counters(
                loader::COUNTERS
                    .iter()
                    .map(|(c, name)| (*name, counter(*c).unwrap_or(0))),
                self.tracker.pending() as u64,
            );
        } else {
            self.metrics.heartbeat();
        }
        let signs = TranslationSigns::new(self.hook, &self.tracker.stats);
        if signs.out_of_sight(self.histogram.totals.attempts) {
            self.live.warn(Some(advice::OUT_OF_SIGHT_LIVE.to_string()));
        }
        if self.record().is_err() {
            return Some(End::BrokenPipe);
        }
        // A name lookup per interface is a socket and an ioctl: once a second is soon enough.
        let vanished = if self.last_iface_check.elapsed() >= IFACE_CHECK {
            self.last_iface_check = Instant::now();
            self.interfaces.check()
        } else {
            Vec::new()
        };
        for name in vanished {
            let msg = format!(
                "interface {name} went away after {:.1} s; stopped watching it",
                self.started.elapsed().as_secs_f64()
            );
            self.live.clear();
            eprintln!("netrace: {msg}");
            self.notes.push(msg);
            let hooks: &[&'static str] = if self.cfg.ifaces.contains(&name) {
                &["egress", "ingress"]
            } else {
                &["pod_ingress"]
            };
            for hook in hooks {
                self.metrics.set_attached(&name, hook, false);
            }
        }
        if self.interfaces.all_gone() {
            return Some(End::InterfacesGone);
        }
        if self.last_judged.elapsed() >= JUDGE
            || (self.unjudged && self.quiet_sweep && self.last_outcome.elapsed() >= JUDGE_SETTLED)
        {
            self.judge_for_metrics();
        }
        if self
            .cfg
            .interval
            .is_some_and(|d| self.interval_start.elapsed() >= d)
            && self.interval().is_err()
        {
            return Some(End::BrokenPipe);
        }
        if self.last_drawn.elapsed() >= DRAW && self.cfg.output == OutputFormat::Text {
            self.live.draw(
                &self.histogram,
                self.tracker.pending(),
                ring_drops,
                self.started.elapsed().as_secs_f64(),
            );
            self.last_drawn = Instant::now();
        }
        None
    }

    /// The verdict so far, the NAT mode and the learned range edges, for the metrics.
    fn judge_for_metrics(&mut self) {
        let (verdict, nat) = self.judge();
        self.judged(&verdict);
        if let Some(mode) = nat.and_then(|n| serde_json::to_value(n.mode).ok()) {
            self.metrics
                .set_nat_mode(mode.as_str().unwrap_or("unknown"));
        }
    }

    /// Hands a verdict and its learned edges (estimate, bracket) to the metrics.
    pub fn judged(&mut self, v: &Verdict) {
        self.unjudged = false;
        self.last_judged = Instant::now();
        self.metrics.set_verdict(metric_verdict(v, &self.histogram));
        let lower = v.learned.lower.map(|l| {
            let b = l.bracket();
            (l.estimate, b.start, b.end)
        });
        let upper = v.learned.upper.map(|u| {
            let b = u.bracket();
            (u.estimate, b.start, b.end)
        });
        self.metrics.set_range_edge(metrics::Edge::Lower, lower);
        self.metrics.set_range_edge(metrics::Edge::Upper, upper);
    }

    fn know(&mut self, port: u16) {
        if let Some(w) = self.known_ports.get_mut(usize::from(port) / 64) {
            *w |= 1 << (port % 64);
        }
    }

    /// Whether the tracker knew an attempt from `port`.
    pub fn knew(&self, port: u16) -> bool {
        self.known_ports
            .get(usize::from(port) / 64)
            .is_some_and(|w| w & (1 << (port % 64)) != 0)
    }

    /// The verdict on what was seen so far, and the NAT mode when pod-side interfaces are
    /// watched.
    fn judge(&self) -> (Verdict, Option<NatReport>) {
        let nat = self
            .correlator
            .as_ref()
            .filter(|_| !self.cfg.pod_ifaces.is_empty())
            .map(|c| natmode::detect(c.pairs()));
        // SYNs seen before a translation (or not at all): the ports are not the firewall's.
        let signs = TranslationSigns::new(self.hook, &self.tracker.stats);
        let t = self.histogram.totals;
        if signs.out_of_sight(t.attempts) {
            return (
                signs.verdict(&self.cfg.ifaces, self.cfg.allowed, t.attempts, t.lost),
                nat,
            );
        }
        (
            verdict::decide(
                &self.histogram,
                &self.destinations,
                &self.node,
                nat.as_ref(),
            ),
            nat,
        )
    }

    /// Writes one `--interval` summary: a line on standard error, and with JSON output an
    /// `"type":"interval"` object on standard output. Errors only on a closed standard output.
    fn interval(&mut self) -> io::Result<()> {
        let totals = Tally::of(&self.histogram);
        let (verdict, _) = self.judge();
        let r = IntervalReport {
            kind_tag: "interval",
            unix_ms: self.clock.unix_ms(monotonic_ns()),
            elapsed_s: self.started.elapsed().as_secs_f64(),
            interval_s: self.interval_start.elapsed().as_secs_f64(),
            allowed_ports: self.cfg.allowed,
            window: totals.since(&self.interval_totals),
            totals,
            pending: self.tracker.pending() as u64,
            verdict: ShortVerdict::of(&verdict),
        };
        // The next interval starts where this one should have ended (no drift), unless the
        // loop fell far behind.
        if let Some(d) = self.cfg.interval {
            self.interval_start += d;
            if self.interval_start.elapsed() > d {
                self.interval_start = Instant::now();
            }
        }
        self.interval_totals = totals;
        self.live.clear();
        eprintln!("{}", render::live::interval_line(&r));
        if self.cfg.output == OutputFormat::Json {
            let mut line = serde_json::to_vec(&r).map_err(io::Error::other)?;
            line.push(b'\n');
            let mut out = self.out.lock();
            out.write_all(&line)?;
            out.flush()?;
        }
        Ok(())
    }

    /// After the programs are detached: collects what is still in flight and counts what is
    /// still waiting. Returns the number still waiting, and whether standard output still
    /// takes the records.
    pub fn finish(&mut self, kernel: &mut Kernel) -> (u64, io::Result<()>) {
        self.drain_logs(&mut kernel.logs);
        self.drain(kernel.ring.get_mut());
        let pending_at_exit =
            self.tracker
                .finish(monotonic_ns(), &mut kernel.pending, &mut self.outcomes);
        let waiting: Vec<u16> = self.tracker.waiting_ports().collect();
        for port in waiting {
            self.know(port);
        }
        self.read_books(&mut kernel.books);
        self.read_rtt(&kernel.books);
        (pending_at_exit, self.record())
    }

    /// Counts what the kernel booked since the last read: answered connections by interface,
    /// destination and source port.
    fn read_books(&mut self, books: &mut Books) {
        let mut buf = std::mem::take(&mut self.books_buf);
        if let Err(e) = books.walk_into(&mut buf) {
            log::debug!("reading the answer books: {e}");
        }
        // The buffers are kept between reads: a busy node's read finds thousands of ports.
        let mut fresh = std::mem::take(&mut self.books_fresh);
        fresh.clear();
        for (k, b) in &buf {
            let seen = self.books_seen.entry(*k).or_default();
            if seen.answered == b.answered {
                continue;
            }
            for (i, (now, before)) in b.answered.iter().zip(seen.answered.iter()).enumerate() {
                let n = now.wrapping_sub(*before);
                if n > 0 {
                    let port = usize::from(k.port_group) * BOOK_PORTS + i;
                    fresh.push((*k, port as u16, u64::from(n)));
                }
            }
            **seen = *b;
        }
        self.books_buf = buf;
        self.books_fresh = fresh;
        self.count_answers();
    }

    /// Reads the answers the CPUs' logs hold (and their SYN source ports); returns how many
    /// records.
    fn drain_logs(&mut self, logs: &mut Logs) -> usize {
        let mut fresh = std::mem::take(&mut self.books_fresh);
        fresh.clear();
        let n = logs.drain(|r| fresh.push((r.book, r.src_port, 1)));
        self.books_fresh = fresh;
        if n > 0 {
            self.count_answers();
        }
        n
    }

    /// Counts the answers in `books_fresh` (book, source port, how many): the histogram, the
    /// destinations, the metrics.
    fn count_answers(&mut self) {
        let fresh = std::mem::take(&mut self.books_fresh);
        // The metrics by interface, destination, port bucket and side of the range: one
        // update per group, not one per port (each costs label strings and a lookup). Answers
        // to one destination mostly come together in `fresh` (a book's ports, or a run of log
        // records): its destination and its groups are looked up once per run, not per answer
        // (a hash per answer was a good part of this process's CPU at high rates).
        let width = 2 * (self.histogram.buckets.len() + 1);
        let mut groups: foldhash::HashMap<(u32, Destination), usize> = foldhash::HashMap::default();
        // Per destination, `width` groups: (a port of the group, how many).
        let mut counts: Vec<(u16, u64)> = Vec::new();
        let same_run = |a: &BookKey, b: &BookKey| {
            (a.ifindex, a.family, a.dst_port, a.dst_addr)
                == (b.ifindex, b.family, b.dst_port, b.dst_addr)
        };
        let mut run: Option<(BookKey, usize, Slot, Dest)> = None;
        for &(k, port, n) in &fresh {
            let (base, row, marks) = match run {
                Some((bk, base, row, marks)) if same_run(&bk, &k) => (base, row, marks),
                _ => {
                    let d = destination(&FlowKey {
                        family: k.family,
                        dst_port: k.dst_port,
                        dst_addr: k.dst_addr,
                        ..FlowKey::default()
                    });
                    let base = *groups.entry((k.ifindex, d)).or_insert_with(|| {
                        counts.resize(counts.len() + width, (0, 0));
                        counts.len() - width
                    });
                    let row = self.destinations.slot(d);
                    let marks = self.answered.dest(&k);
                    run = Some((k, base, row, marks));
                    (base, row, marks)
                }
            };
            self.know(port);
            self.answered.mark(marks, port);
            self.histogram.add_n(port, OutcomeKind::Answered, n);
            self.destinations
                .add_n_at(row, port, OutcomeKind::Answered, n);
            let bucket = self
                .histogram
                .buckets
                .iter()
                .position(|b| b.range().contains(port))
                .unwrap_or(width / 2 - 1);
            let inside = usize::from(self.cfg.allowed.contains(port));
            if let Some(g) = counts.get_mut(base + 2 * bucket + inside) {
                if g.1 == 0 {
                    g.0 = port;
                }
                g.1 += n;
            }
        }
        for ((ifindex, dst), base) in groups {
            let name = self.interfaces.name(ifindex);
            for &(port, n) in counts.get(base..base + width).unwrap_or_default() {
                if n > 0 {
                    self.metrics.outcomes(
                        &name,
                        OutcomeKind::Answered,
                        port,
                        SocketAddr::new(dst.addr, dst.port),
                        n,
                    );
                }
            }
        }
        if !fresh.is_empty() {
            self.unjudged = true;
            self.last_outcome = Instant::now();
        }
        self.books_fresh = fresh;
    }

    /// The round trips of the answers counted in the kernel since the last read, for the
    /// metrics.
    fn read_rtt(&mut self, books: &Books) {
        let rtt = books.rtt();
        for (slot, (now, before)) in rtt.iter().zip(self.rtt_seen.iter()).enumerate() {
            self.metrics.rtt_slot(slot, now.saturating_sub(*before));
        }
        self.rtt_seen = rtt;
    }

    /// Reads every record waiting in the ring buffer into the tracker and the correlator;
    /// returns how many.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> usize {
        let mut n = 0;
        while let Some(item) = ring.next() {
            n += 1;
            match Record::try_from(&*item) {
                Ok(Record::Conn(ev))
                    if ev.kind == EventKind::UnmatchedSynAck
                        && self.answered.contains(&ev.raw.key, ev.raw.ifindex) =>
                {
                    self.tracker.stats.repeated_synacks += 1;
                }
                Ok(Record::Conn(ev)) => {
                    if let Some(c) = self.correlator.as_mut() {
                        let (key, p) = (ev.raw.key, ev.raw.pending);
                        match ev.kind {
                            EventKind::PodSyn => {
                                c.pod_syn(key, p.isn, p.first_ns);
                                continue;
                            }
                            EventKind::Syn => c.uplink_syn(key, p.isn, p.first_ns),
                            _ => {}
                        }
                    }
                    self.tracker.on_event(&ev, &mut self.outcomes);
                }
                Ok(Record::Sock(r)) => {
                    if let Some(c) = self.correlator.as_mut() {
                        c.sock(&r);
                    }
                }
                Err(e) => {
                    self.decode_errors += 1;
                    log::debug!("undecodable event: {e}");
                }
            }
        }
        n
    }

    /// Records the outcomes collected so far; JSON lines go out at once. Errors only on a
    /// closed standard output.
    fn record(&mut self) -> io::Result<()> {
        let mut lines = Vec::new();
        if !self.outcomes.is_empty() {
            self.unjudged = true;
            self.last_outcome = Instant::now();
        }
        for o in &self.outcomes {
            let port = o.key.src_port;
            if let Some(w) = self.known_ports.get_mut(usize::from(port) / 64) {
                *w |= 1 << (port % 64);
            }
        }
        for o in self.outcomes.drain(..) {
            self.histogram.add(o.key.src_port, o.kind);
            self.destinations
                .add(destination(&o.key), o.key.src_port, o.kind);
            if let (OutcomeKind::Unreachable, Some((t, c))) = (o.kind, o.icmp) {
                let v6 = o.key.family != FAMILY_V4;
                *self.icmp.entry((v6, t, c)).or_default() += 1;
            }
            let name = self.interfaces.name(o.pending.ifindex);
            let (_, dst) = addrs(&o.key);
            self.metrics.outcome(
                &name,
                o.kind,
                o.key.src_port,
                metrics::destination(dst, o.key.dst_port),
                o.rtt_ns,
            );
            let stream = match self.cfg.events {
                Events::All => true,
                Events::Lost => o.kind != OutcomeKind::Answered,
                Events::None => false,
            };
            if !stream && !o.kind.is_loss() {
                if let Some(c) = self.correlator.as_mut() {
                    c.forget(&o.key);
                }
                continue;
            }
            let mut rec = ConnRecord::new(&o, name, &self.clock, self.cfg.allowed);
            if let Some(c) = self.correlator.as_mut() {
                rec.who = c.attribute(&o.key, o.kind.is_loss());
            }
            if stream {
                match self.cfg.output {
                    OutputFormat::Json => {
                        serde_json::to_writer(&mut lines, &rec).map_err(io::Error::other)?;
                    }
                    OutputFormat::Text => {
                        lines.extend_from_slice(render::live::event_line(&rec).as_bytes());
                    }
                }
                lines.push(b'\n');
            }
            if o.kind.is_loss() {
                if self.lost.len() < MAX_LISTED {
                    self.lost.push(rec);
                } else {
                    self.lost_not_listed += 1;
                }
            }
        }
        if !lines.is_empty() {
            let mut out = self.out.lock();
            out.write_all(&lines)?;
            out.flush()?;
        }
        Ok(())
    }
}

/// The `netrace_verdict` label for a verdict (the names the metrics contract uses).
fn metric_verdict(v: &Verdict, h: &Histogram) -> &'static str {
    let kind = serde_json::to_value(v.kind).unwrap_or_default();
    match kind.as_str().unwrap_or("") {
        "range_problem" => "range_problem",
        "destination_problem" => "destination_problem",
        "translation_out_of_sight" => "translation_out_of_sight",
        "no_problem" => "no_problem",
        // Nothing lost: no problem. Loss the port range does not explain: its cause is not
        // known from what netrace saw.
        "no_range_problem" if h.totals.lost == 0 => "no_problem",
        _ => "not_enough_evidence",
    }
}

/// Where a connection went.
fn destination(key: &FlowKey) -> Destination {
    let (_, addr) = addrs(key);
    Destination {
        addr,
        port: key.dst_port,
    }
}
