//! `netrace watch`: attach, pair, sweep, report. The one loop that ties the modules together.

use std::{
    collections::HashMap,
    io::{self, Write},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use netrace_common::{Counter, EventKind};
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
    time::{interval, sleep_until, MissedTickBehavior},
};

use crate::{
    cli::{OutputFormat, WatchConfig},
    error::{exit, UsageError},
    judge::verdict,
    kernel::attach::Attachments,
    kernel::events::Record,
    kernel::loader,
    metrics,
    node::iface,
    node::privileges,
    node::NodePorts,
    render,
    report::{monotonic_ns, Clock, ConnRecord, Drops, PodLoss, Report},
    track::correlate::Correlator,
    track::natmode,
    track::stats::Histogram,
    track::tracker::{Outcome, Tracker},
};

/// How long a connection reported lost is still paired with a late answer. Linux gives up on a
/// connect after about 127 s (tcp_syn_retries = 6); answers later than a minute are rare.
const LATE_WINDOW: Duration = Duration::from_secs(60);
/// At most this many lost connections are kept for `--list-lost`.
const MAX_LISTED: usize = 100_000;
const TICK: Duration = Duration::from_millis(250);
/// The kernel wakes netrace only when a quarter of the ring buffer is full; below that,
/// events are collected this often.
const DRAIN: Duration = Duration::from_millis(50);

/// Why the loop ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Signal,
    Duration,
    /// Standard output was closed (e.g. `| head`): end quietly.
    BrokenPipe,
    /// Every watched interface went away.
    InterfacesGone,
}

struct Session {
    cfg: WatchConfig,
    clock: Clock,
    tracker: Tracker,
    histogram: Histogram,
    lost: Vec<ConnRecord>,
    lost_not_listed: u64,
    decode_errors: u64,
    names: HashMap<u32, String>,
    out: io::Stdout,
    metrics: metrics::Metrics,
    /// Pod and process attribution, when asked for.
    correlator: Option<Correlator>,
}

/// Stops the metrics server when the run ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Session {
    fn iface_name(&self, ifindex: u32) -> String {
        self.names
            .get(&ifindex)
            .cloned()
            .or_else(|| iface::name(ifindex))
            .unwrap_or_else(|| format!("if{ifindex}"))
    }

    /// Records outcomes; JSON lines go out at once. Errors only on a closed stdout.
    fn record(&mut self, outcomes: &mut Vec<Outcome>) -> io::Result<()> {
        let mut lines = Vec::new();
        for o in outcomes.drain(..) {
            self.histogram.add(o.key.src_port, o.kind);
            let name = self.iface_name(o.pending.ifindex);
            self.metrics
                .outcome(&name, o.kind, o.key.src_port, o.rtt_ns);
            let wants_record = self.cfg.output == OutputFormat::Json || o.kind.is_loss();
            if !wants_record {
                if let Some(c) = self.correlator.as_mut() {
                    c.forget(&o.key);
                }
                continue;
            }
            let mut rec = ConnRecord::new(&o, name, &self.clock, self.cfg.allowed);
            if let Some(c) = self.correlator.as_mut() {
                rec.who = c.attribute(&o.key, o.kind.is_loss());
            }
            if self.cfg.output == OutputFormat::Json {
                let mut line = serde_json::to_vec(&rec).map_err(io::Error::other)?;
                line.push(b'\n');
                lines.extend_from_slice(&line);
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

fn drain(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    tracker: &mut Tracker,
    correlator: &mut Option<Correlator>,
    decode_errors: &mut u64,
    outcomes: &mut Vec<Outcome>,
) {
    while let Some(item) = ring.next() {
        match Record::try_from(&*item) {
            Ok(Record::Conn(ev)) => {
                if let Some(c) = correlator.as_mut() {
                    match ev.kind {
                        EventKind::PodSyn => {
                            c.pod_syn(ev.raw.key, ev.raw.pending.isn, ev.raw.pending.first_ns);
                            continue;
                        }
                        EventKind::Syn => {
                            c.uplink_syn(ev.raw.key, ev.raw.pending.isn, ev.raw.pending.first_ns)
                        }
                        _ => {}
                    }
                }
                tracker.on_event(&ev, outcomes);
            }
            Ok(Record::Sock(r)) => {
                if let Some(c) = correlator.as_mut() {
                    c.sock(&r);
                }
            }
            Err(e) => {
                *decode_errors += 1;
                log::debug!("undecodable event: {e}");
            }
        }
    }
}

/// Runs `netrace watch`; returns the exit status.
pub async fn run(cfg: WatchConfig) -> anyhow::Result<u8> {
    privileges::check()?;
    // Signals first, so Ctrl-C during attach ends the run cleanly instead of killing it.
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    let metrics = metrics::Metrics::new(
        Histogram::new(cfg.allowed, &cfg.bucket_edges)
            .buckets
            .iter()
            .map(|b| b.range())
            .collect(),
        cfg.allowed,
    );
    let _metrics_server = match cfg.metrics_addr {
        Some(addr) => {
            let listener = metrics::bind(addr)
                .await
                .map_err(|e| UsageError(format!("--metrics-addr: cannot listen on {addr}: {e}")))?;
            Some(AbortOnDrop(tokio::spawn(metrics::serve(
                listener,
                metrics.clone(),
            ))))
        }
        None => None,
    };
    let node = NodePorts::read(&cfg.procfs);
    let (ebpf, maps) = loader::load(
        cfg.max_pending,
        cfg.ringbuf_bytes,
        loader::kernel_filter(&cfg),
    )?;
    let loader::Maps {
        events,
        mut pending,
        counters,
        syn_ports,
        filter: _filter,
        mut tp_offsets,
    } = maps;
    let mut attachments = Attachments::new(ebpf)?;
    let mut names = HashMap::new();
    for name in &cfg.ifaces {
        let idx = iface::index(name)
            .ok_or_else(|| UsageError(format!("--iface: interface '{name}' went away")))?;
        attachments.attach(name, cfg.attach)?;
        names.insert(idx, name.clone());
    }
    for name in &cfg.pod_ifaces {
        let idx = iface::index(name)
            .ok_or_else(|| UsageError(format!("--pod-iface: interface '{name}' went away")))?;
        attachments.attach_pod_side(name)?;
        names.insert(idx, name.clone());
    }
    let mut notes = Vec::new();
    if cfg.processes {
        // Attribution is an extra: without it, the histogram and verdict still stand.
        let attached = crate::kernel::tracefs::ensure()
            .and_then(|root| crate::kernel::tracefs::offsets(&root))
            .and_then(|o| {
                tp_offsets
                    .set(0, o, 0)
                    .context("setting tracepoint offsets")?;
                attachments.attach_tracepoint()
            });
        if let Err(e) = attached {
            let msg = format!("process attribution is off: {e:#}");
            eprintln!("netrace: {msg}");
            notes.push(msg);
        }
    }
    let correlating = !cfg.pod_ifaces.is_empty() || cfg.processes;
    let mut cgroup_root = crate::node::cgroups::cgroup2_root();
    if cfg.processes && cgroup_root.is_none() {
        match crate::kernel::mounts::ensure("cgroup2", "/sys/fs/cgroup", "cgroup.controllers") {
            Ok(()) => cgroup_root = Some("/sys/fs/cgroup".into()),
            Err(e) => {
                let msg = format!("cgroups cannot be named: {e:#}");
                eprintln!("netrace: {msg}");
                notes.push(msg);
            }
        }
    }
    if let Some(path) = &cfg.ready_file {
        std::fs::write(path, "ready\n")
            .with_context(|| format!("writing --ready-file {}", path.display()))?;
    }
    if cfg.output == OutputFormat::Text {
        eprintln!(
            "netrace: watching {} ({}), SYN-ACKs allowed back to {}; Ctrl-C to stop and report",
            cfg.ifaces.join(", "),
            match attachments.via {
                Some(crate::kernel::attach::Via::Tcx) => "TCX",
                _ => "clsact",
            },
            cfg.allowed
        );
    }

    let started = Instant::now();
    let deadline = cfg
        .duration
        .map(|d| tokio::time::Instant::now() + d)
        .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86400));
    let mut session = Session {
        tracker: Tracker::new(
            cfg.syn_timeout.as_nanos() as u64,
            LATE_WINDOW.as_nanos() as u64,
        ),
        histogram: Histogram::new(cfg.allowed, &cfg.bucket_edges),
        clock: Clock::now(),
        lost: Vec::new(),
        lost_not_listed: 0,
        decode_errors: 0,
        names,
        out: io::stdout(),
        metrics,
        correlator: correlating
            .then(|| Correlator::new(cgroup_root.unwrap_or_else(|| "/sys/fs/cgroup".into()))),
        cfg,
    };
    let maps_for_counters = loader::Maps::counters_view(&counters, &syn_ports);
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long as
    // the AsyncFd owns the ring buffer.
    let mut ring = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {}", e.into_parts().1))?;
    let mut drain_tick = interval(DRAIN);
    drain_tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut tick = interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut live = render::live::Live::new();
    let mut last_drawn = Instant::now();
    let mut seen_ring_drops = 0;
    let mut outcomes = Vec::new();

    let end = loop {
        tokio::select! {
            r = ring.readable_mut() => {
                let mut guard = r.context("waiting on the ring buffer")?;
                drain(guard.get_inner_mut(), &mut session.tracker, &mut session.correlator, &mut session.decode_errors, &mut outcomes);
                guard.clear_ready();
                if session.record(&mut outcomes).is_err() {
                    break End::BrokenPipe;
                }
            }
            _ = drain_tick.tick() => {
                drain(ring.get_mut(), &mut session.tracker, &mut session.correlator, &mut session.decode_errors, &mut outcomes);
                if session.record(&mut outcomes).is_err() {
                    break End::BrokenPipe;
                }
            }
            _ = tick.tick() => {
                // Read what the kernel already reported before judging by the map: an entry
                // answered a moment ago is gone from the map while its event still waits in
                // the ring, and the sweep would count it twice (or as abandoned).
                drain(ring.get_mut(), &mut session.tracker, &mut session.correlator, &mut session.decode_errors, &mut outcomes);
                let ring_drops = maps_for_counters.counter(Counter::RingbufFull);
                if ring_drops > seen_ring_drops {
                    // Some SYN events never arrived: take their entries from the kernel map.
                    seen_ring_drops = ring_drops;
                    session.tracker.adopt(&pending);
                }
                let now = monotonic_ns();
                session.tracker.sweep(now, &mut pending, &mut outcomes);
                if let Some(c) = session.correlator.as_mut() {
                    c.prune(now);
                }
                session.metrics.kernel_counters(
                    loader::COUNTERS.iter().map(|(c, name)| (*name, maps_for_counters.counter(*c))),
                    session.tracker.pending() as u64,
                );
                if session.record(&mut outcomes).is_err() {
                    break End::BrokenPipe;
                }
                let gone: Vec<(u32, String)> = session
                    .names
                    .iter()
                    .filter(|(idx, name)| iface::index(name) != Some(**idx))
                    .map(|(i, n)| (*i, n.clone()))
                    .collect();
                for (idx, name) in gone {
                    let msg = format!("interface {name} went away after {:.1} s; stopped watching it", started.elapsed().as_secs_f64());
                    live.clear();
                    eprintln!("netrace: {msg}");
                    notes.push(msg);
                    session.names.remove(&idx);
                    // Keep the name for records of connections it already carried.
                    session.names.insert(u32::MAX - idx, name);
                }
                if session.names.keys().all(|k| *k > u32::MAX / 2) {
                    break End::InterfacesGone;
                }
                if last_drawn.elapsed() >= Duration::from_secs(1) && session.cfg.output == OutputFormat::Text {
                    live.draw(&session.histogram.totals, session.tracker.pending(), ring_drops, started.elapsed().as_secs_f64());
                    last_drawn = Instant::now();
                }
            }
            _ = sigint.recv() => break End::Signal,
            _ = sigterm.recv() => break End::Signal,
            _ = sleep_until(deadline) => break End::Duration,
        }
    };
    live.clear();

    // Detach first, then collect what is still in flight.
    attachments.detach_all();
    drain(
        ring.get_mut(),
        &mut session.tracker,
        &mut session.correlator,
        &mut session.decode_errors,
        &mut outcomes,
    );
    let pending_at_exit = session
        .tracker
        .finish(monotonic_ns(), &mut pending, &mut outcomes);
    let flushed = session.record(&mut outcomes);
    if end == End::BrokenPipe || flushed.is_err() {
        return Ok(exit::CLEAN);
    }

    let counters_by_name = loader::COUNTERS
        .iter()
        .map(|(c, name)| (*name, maps_for_counters.counter(*c)))
        .collect();
    let drops = Drops {
        events_lost: maps_for_counters.counter(Counter::RingbufFull),
        pending_map_full: maps_for_counters.counter(Counter::PendingMapFull),
        decode_errors: session.decode_errors,
        answered_unseen: session.tracker.stats.answered_unseen,
    };
    if pending_at_exit > 0 {
        notes.push(format!(
            "{pending_at_exit} connections were still waiting for an answer (younger than \
             --syn-timeout {} ms) when netrace stopped; they are not counted",
            session.cfg.syn_timeout.as_millis()
        ));
    }
    if let Some(c) = session.correlator.as_ref() {
        log::debug!("correlator sizes {:?}", c.sizes());
        if std::env::var_os("NETRACE_DEBUG").is_some() {
            eprintln!("correlator sizes {:?}", c.sizes());
        }
    }
    let nat = session
        .correlator
        .as_ref()
        .filter(|_| !session.cfg.pod_ifaces.is_empty())
        .map(|c| natmode::detect(c.pairs()));
    let verdict = verdict::decide(&session.histogram, &node, nat.as_ref());
    let fix = verdict::fix(&verdict, session.cfg.allowed, &node, nat.as_ref());
    let lost_by_pod = session
        .correlator
        .as_ref()
        .map(|_| PodLoss::group(&session.lost));
    let report = Report {
        interfaces: session.cfg.ifaces.clone(),
        duration_s: started.elapsed().as_secs_f64(),
        syn_timeout_ms: session.cfg.syn_timeout.as_millis() as u64,
        histogram: session.histogram.clone(),
        verdict,
        fix,
        node,
        drops,
        counters: counters_by_name,
        syn_packets_by_port: maps_for_counters.syn_ports(),
        pending_at_exit,
        lost: std::mem::take(&mut session.lost),
        lost_not_listed: session.lost_not_listed,
        notes,
        nat,
        lost_by_pod,
    };
    if let Some(path) = &session.cfg.svg {
        std::fs::write(path, render::svg::render(&report))
            .with_context(|| format!("writing --svg {}", path.display()))?;
    }
    let written = {
        let mut out = session.out.lock();
        let r = match session.cfg.output {
            OutputFormat::Json => serde_json::to_writer(&mut out, &report.to_json())
                .map_err(io::Error::other)
                .and_then(|()| writeln!(out)),
            OutputFormat::Text => render::text::write(&mut out, &report, session.cfg.list_lost),
        };
        r.and_then(|()| out.flush())
    };
    if written.is_err() {
        return Ok(exit::CLEAN);
    }
    if end == End::InterfacesGone {
        eprintln!(
            "netrace: every watched interface went away; the report above covers the time before"
        );
        return Ok(exit::ERROR);
    }
    Ok(if report.totals().lost > 0 {
        exit::LOSS
    } else {
        exit::CLEAN
    })
}
