//! The replay: every frame of the captures, in time order, through the same packet parser and
//! SYN/answer pairing rules as the kernel programs (`netrace_common::parse`, `::pairing`, over an
//! in-memory pending map), into the same tracker as `watch`, on capture time.
//!
//! Direction. A cooked (`-i any`) capture, and a pcapng with `epb_flags` (dumpcap), say which
//! packets the host sent: SYNs sent are tracked, answers received are paired, as on a tc egress
//! and ingress hook. Other captures
//! hold both directions without saying: a SYN without ACK is taken as outbound from its
//! source, a SYN-ACK, RST or ICMP error as an answer.
//!
//! Translation. A capture of the pod side and the uplink (two files, a pcapng with both
//! interfaces, or `-i any`) sees each connection twice: first with the pod's own address and
//! port, then after SNAT. NAT keeps the initial sequence number, so the second SYN with the
//! same ISN, destination and port moments later is the same connection: the first sighting is
//! the pod side (forgotten as an attempt, kept as the connection's pod), the second is the one
//! the firewall sees and the report counts, as `watch --pod-iface` links them.

use std::{
    collections::HashMap,
    io::{self, Write as _},
};

use netrace_common::{
    pairing::{self, EventSink as _, MemorySink},
    parse::{self, Answer, Direction, Link as ParseLink, Parsed},
    Counter, EventKind, FlowKey, KernelFilter,
};

use super::config::AnalyzeConfig;
use crate::track::destinations::{Destination, Destinations};
use crate::{
    capture::Frame,
    kernel::events::Event,
    options::OutputFormat,
    report::{Clock, ConnRecord},
    track::{
        correlate::{Correlator, JOIN_WINDOW_NS},
        stats::Histogram,
        tracker::{MemoryMap, Outcome, Tracker},
    },
};

/// How often (in capture time) the tracker decides lost connections, as `watch` does.
const TICK_NS: u64 = 250_000_000;
/// At most this many lost connections are kept for `--list-lost`.
const MAX_LISTED: usize = 100_000;

type JoinKey = (u32, u8, [u8; 16], u16);

fn join_key(key: &FlowKey, isn: u32) -> JoinKey {
    (isn, key.family, key.dst_addr, key.dst_port)
}

/// What the replay saw besides connections, for the notes and the JSON summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    pub packets: u64,
    pub first_ns: Option<u64>,
    pub last_ns: u64,
    /// SYN-ACKs, RSTs and ICMP errors in the capture, paired or not.
    pub answers: u64,
    pub synacks: u64,
    /// SYNs seen on the pod side (before SNAT), not counted as attempts.
    pub pod_side_syns: u64,
    /// Connections seen on both sides of SNAT and linked.
    pub linked: u64,
    /// Packets whose timestamp went back in time (taken as the latest time seen).
    pub out_of_order: u64,
}

pub struct Replay {
    filter: KernelFilter,
    table: MemoryMap,
    sink: MemorySink,
    tracker: Tracker,
    pub histogram: Histogram,
    /// Outcomes by destination, for the verdict (bounded).
    pub destinations: Destinations,
    pub correlator: Correlator,
    pub lost: Vec<ConnRecord>,
    pub lost_not_listed: u64,
    pub facts: Facts,
    outcomes: Vec<Outcome>,
    clock: Clock,
    allowed: crate::ports::PortRange,
    json: bool,
    /// Interface names, by the index handed to the pairing rules (minus one).
    pub names: Vec<String>,
    /// Tracked SYNs by source interface.
    pub syns_by_iface: Vec<u64>,
    /// The latest SYN sighting of each (ISN, destination, port), to find SNAT twins.
    recent: HashMap<JoinKey, (FlowKey, u64)>,
    /// Pod-side tuples found so far, by ISN: their retransmissions are not attempts either.
    pod_side: HashMap<FlowKey, u32>,
    now: u64,
    last_sweep: u64,
    out: io::BufWriter<io::Stdout>,
}

impl Replay {
    pub fn new(cfg: &AnalyzeConfig) -> Self {
        Self {
            filter: cfg.filter(),
            table: MemoryMap::default(),
            sink: MemorySink::default(),
            tracker: cfg.tracker(),
            histogram: cfg.histogram(),
            destinations: Destinations::default(),
            correlator: Correlator::new("/sys/fs/cgroup"),
            lost: Vec::new(),
            lost_not_listed: 0,
            facts: Facts::default(),
            outcomes: Vec::new(),
            clock: Clock::unix_epoch(),
            allowed: cfg.allowed,
            json: cfg.output == OutputFormat::Json,
            names: Vec::new(),
            syns_by_iface: Vec::new(),
            recent: HashMap::new(),
            pod_side: HashMap::new(),
            now: 0,
            last_sweep: 0,
            out: io::BufWriter::with_capacity(1 << 16, io::stdout()),
        }
    }

    /// A new interface; returns the index the pairing rules see (from 1, as ifindexes).
    pub fn add_interface(&mut self, name: String) -> u32 {
        self.names.push(name);
        self.syns_by_iface.push(0);
        self.names.len() as u32
    }

    /// The kernel-side counters, as `watch` reads them from its per-CPU array.
    pub fn counter(&self, c: Counter) -> u64 {
        self.sink.counter(c)
    }

    /// What the tracker noticed besides outcomes (translated answers, unmatched SYN-ACKs).
    pub fn tracker_stats(&self) -> &crate::track::tracker::TrackerStats {
        &self.tracker.stats
    }

    /// SYN packets by source port, sorted.
    pub fn syn_ports(&self) -> Vec<(u16, u64)> {
        let mut v: Vec<(u16, u64)> = self
            .sink
            .syn_ports
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(p, n)| (*p, *n))
            .collect();
        v.sort_unstable();
        v
    }

    /// One captured packet on interface `ifindex` (from [`Replay::add_interface`]).
    /// Errors only when standard output is closed.
    pub fn frame(&mut self, frame: &Frame<'_>, ifindex: u32) -> io::Result<()> {
        let f = &mut self.facts;
        f.packets += 1;
        f.first_ns.get_or_insert(frame.ts_ns);
        if frame.ts_ns < self.now {
            f.out_of_order += 1;
        }
        self.now = self.now.max(frame.ts_ns);
        f.last_ns = self.now;
        if self.now >= self.last_sweep.saturating_add(TICK_NS) {
            self.sweep()?;
        }
        self.sink.now = self.now;
        self.sink.ifindex = ifindex;
        let bytes = frame.ethernet;
        let sent = frame.outbound;
        let (parsed, tracked) = match sent {
            // A cooked capture says which way: SYNs sent are attempts, answers received are
            // answers; SYNs received are the pod side (or someone connecting to this host).
            Some(true) => (
                parse::parse(bytes, ParseLink::Ethernet, Direction::Egress),
                true,
            ),
            Some(false) => match parse::parse(bytes, ParseLink::Ethernet, Direction::Ingress) {
                Err(parse::Skip::Irrelevant) => (
                    parse::parse(bytes, ParseLink::Ethernet, Direction::Egress),
                    false,
                ),
                other => (other, false),
            },
            None => match parse::parse(bytes, ParseLink::Ethernet, Direction::Egress) {
                Err(parse::Skip::Irrelevant) => (
                    parse::parse(bytes, ParseLink::Ethernet, Direction::Ingress),
                    true,
                ),
                other => (other, true),
            },
        };
        match parsed {
            Ok(Parsed::Syn { key, isn, data_len }) => {
                if !tracked {
                    self.pod_sighting(key, isn);
                } else if self.pod_side.get(&key) == Some(&isn) {
                    // A retransmission on the pod side of a linked connection.
                    self.facts.pod_side_syns += 1;
                } else {
                    self.uplink_syn(key, isn);
                    pairing::on_syn(
                        &mut self.table.0,
                        &mut self.sink,
                        Some(&self.filter),
                        &key,
                        isn,
                        data_len,
                    );
                    if let Some(n) = self.syns_by_iface.get_mut(ifindex as usize - 1) {
                        *n += 1;
                    }
                }
            }
            Ok(Parsed::Answer { key, ack, answer }) => {
                self.facts.answers += 1;
                if answer == Answer::SynAck {
                    self.facts.synacks += 1;
                }
                pairing::on_answer(&mut self.table.0, &mut self.sink, &key, ack, answer);
            }
            Err(skip) => {
                if let Some(c) = skip.counter() {
                    self.sink.count(c);
                }
            }
        }
        self.deliver()
    }

    /// A SYN the capture says was received: a pod-side sighting, if an uplink twin follows.
    fn pod_sighting(&mut self, key: FlowKey, isn: u32) {
        self.recent.insert(join_key(&key, isn), (key, self.now));
    }

    /// A SYN taken as outbound: if the same ISN to the same destination was seen moments ago
    /// from another tuple, that was this connection before SNAT.
    fn uplink_syn(&mut self, key: FlowKey, isn: u32) {
        let j = join_key(&key, isn);
        if let Some((earlier, t)) = self.recent.get(&j).copied() {
            if earlier != key && self.now.saturating_sub(t) <= JOIN_WINDOW_NS {
                let seen = self.table.0.get(&earlier).copied().filter(|p| p.isn == isn);
                if self.tracker.forget(&earlier, isn, &mut self.table) {
                    // Counted as a SYN of the uplink when it was not one: take it back.
                    self.sink.counters[Counter::SynSeen as usize] =
                        self.sink.counter(Counter::SynSeen).saturating_sub(1);
                    if let Some(n) = self.sink.syn_ports.get_mut(&earlier.src_port) {
                        *n = n.saturating_sub(1);
                    }
                }
                if let Some(p) = seen {
                    self.table.0.remove(&earlier);
                    if let Some(n) = self
                        .syns_by_iface
                        .get_mut((p.ifindex as usize).wrapping_sub(1))
                    {
                        *n = n.saturating_sub(1);
                    }
                }
                self.pod_side.insert(earlier, isn);
                self.correlator.linked(key, earlier);
                self.facts.pod_side_syns += 1;
                self.facts.linked += 1;
            }
        }
        self.recent.insert(j, (key, self.now));
    }

    /// Hands what the pairing rules reported to the tracker, and records the outcomes.
    fn deliver(&mut self) -> io::Result<()> {
        for raw in self.sink.events.drain(..) {
            let Some(kind) = EventKind::from_u32(raw.kind) else {
                continue;
            };
            self.tracker
                .on_event(&Event { kind, raw }, &mut self.outcomes);
        }
        self.record()
    }

    /// Decides lost connections at the current capture time, as `watch` does every tick.
    fn sweep(&mut self) -> io::Result<()> {
        self.last_sweep = self.now;
        self.tracker
            .sweep(self.now, &mut self.table, &mut self.outcomes);
        let now = self.now;
        self.recent
            .retain(|_, (_, t)| now.saturating_sub(*t) <= JOIN_WINDOW_NS);
        self.record()
    }

    /// The end of the capture: connections younger than the SYN timeout are still waiting.
    pub fn finish(&mut self) -> io::Result<u64> {
        self.deliver()?;
        let waiting = self
            .tracker
            .finish(self.now, &mut self.table, &mut self.outcomes);
        self.record()?;
        self.out.flush()?;
        Ok(waiting)
    }

    fn record(&mut self) -> io::Result<()> {
        for o in self.outcomes.drain(..) {
            self.histogram.add(o.key.src_port, o.kind);
            let (_, addr) = crate::kernel::events::addrs(&o.key);
            self.destinations.add(
                Destination {
                    addr,
                    port: o.key.dst_port,
                },
                o.key.src_port,
                o.kind,
            );
            let wants_record = self.json || o.kind.is_loss();
            if !wants_record {
                self.correlator.forget(&o.key);
                continue;
            }
            let name = self
                .names
                .get((o.pending.ifindex as usize).wrapping_sub(1))
                .cloned()
                .unwrap_or_else(|| format!("if{}", o.pending.ifindex));
            let mut rec = ConnRecord::new(&o, name, &self.clock, self.allowed);
            rec.who = self.correlator.attribute(&o.key, false);
            if self.json {
                serde_json::to_writer(&mut self.out, &rec).map_err(io::Error::other)?;
                self.out.write_all(b"\n")?;
            }
            if o.kind.is_loss() {
                if self.lost.len() < MAX_LISTED {
                    self.lost.push(rec);
                } else {
                    self.lost_not_listed += 1;
                }
            }
        }
        Ok(())
    }

    /// Standard output, for the summary after the connection lines.
    pub fn out(&mut self) -> &mut io::BufWriter<io::Stdout> {
        &mut self.out
    }
}
