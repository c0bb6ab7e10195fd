//! The finished results: per-connection records and the end-of-run report. Computed here,
//! written by `render`.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;

use crate::{
    judge::translation::TranslationSigns,
    judge::verdict::Verdict,
    kernel::egress_hook::Hook,
    kernel::events::addrs,
    node::NodePorts,
    ports::PortRange,
    track::correlate::Attribution,
    track::destinations::DestinationRow,
    track::natmode::NatReport,
    track::stats::{Bucket, Counts, Histogram},
    track::tracker::{Outcome, OutcomeKind, TrackerStats},
};

/// One connection outcome, as printed (`--list-lost`, JSON lines).
#[derive(Clone, Debug, Serialize)]
pub struct ConnRecord {
    #[serde(rename = "type")]
    pub kind_tag: &'static str,
    pub outcome: OutcomeKind,
    pub family: &'static str,
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
    pub iface: String,
    pub syns: u32,
    pub isn: u32,
    pub first_seen_unix_ms: u64,
    pub rtt_us: Option<u64>,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
    pub in_allowed_range: bool,
    /// Where the answer came back to, when a translation after netrace's egress hook changed
    /// the SYN's source (paired by remote address, remote port and ISN); null otherwise.
    pub answered_src: Option<IpAddr>,
    pub answered_src_port: Option<u16>,
    /// Pod-side tuple and process, when attribution is on (null otherwise).
    #[serde(flatten)]
    pub who: Attribution,
}

/// Lost connections grouped by the pod (UID, else address) they came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodLoss {
    pub pod_src: Option<IpAddr>,
    pub pod_uid: Option<String>,
    /// `NAMESPACE/NAME`, when the node's `/var/log/pods` names the UID.
    pub pod: Option<String>,
    pub lost: u64,
    /// Commands seen among the lost connections (pid in parentheses), at most a few.
    pub processes: Vec<String>,
}

impl PodLoss {
    /// Groups lost records; records without attribution form one group (`pod_src` null).
    pub fn group(lost: &[ConnRecord]) -> Vec<PodLoss> {
        let mut groups: BTreeMap<(Option<String>, Option<IpAddr>), PodLoss> = BTreeMap::new();
        for r in lost {
            let addr = if r.who.pod_uid.is_some() {
                None
            } else {
                r.who.pod_src
            };
            let g = groups
                .entry((r.who.pod_uid.clone(), addr))
                .or_insert_with(|| PodLoss {
                    pod_src: r.who.pod_src,
                    pod_uid: r.who.pod_uid.clone(),
                    pod: r
                        .who
                        .pod_namespace
                        .as_ref()
                        .zip(r.who.pod_name.as_ref())
                        .map(|(ns, name)| format!("{ns}/{name}")),
                    lost: 0,
                    processes: Vec::new(),
                });
            g.lost += 1;
            if let (Some(comm), Some(pid)) = (&r.who.comm, r.who.pid) {
                let p = format!("{comm} ({pid})");
                if g.processes.len() < 5 && !g.processes.contains(&p) {
                    g.processes.push(p);
                }
            }
        }
        let mut out: Vec<PodLoss> = groups.into_values().collect();
        out.sort_by_key(|g| std::cmp::Reverse(g.lost));
        out
    }
}

/// Converts CLOCK_MONOTONIC nanoseconds (the kernel's timestamps) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    unix_ms_at_start: u64,
    mono_ns_at_start: u64,
}

impl Clock {
    pub fn now() -> Self {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            unix_ms_at_start: unix_ms,
            mono_ns_at_start: monotonic_ns(),
        }
    }

    /// For timestamps that are already nanoseconds since the Unix epoch (a capture's).
    pub const fn unix_epoch() -> Self {
        Self {
            unix_ms_at_start: 0,
            mono_ns_at_start: 0,
        }
    }

    pub fn unix_ms(&self, mono_ns: u64) -> u64 {
        let delta_ms = (mono_ns as i128 - self.mono_ns_at_start as i128) / 1_000_000;
        (self.unix_ms_at_start as i128 + delta_ms).max(0) as u64
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

impl ConnRecord {
    pub fn new(o: &Outcome, iface: String, clock: &Clock, allowed: PortRange) -> Self {
        let (src, dst) = addrs(&o.key);
        Self {
            kind_tag: "connection",
            outcome: o.kind,
            family: if src.is_ipv4() { "ipv4" } else { "ipv6" },
            src,
            src_port: o.key.src_port,
            dst,
            dst_port: o.key.dst_port,
            iface,
            syns: o.pending.syns,
            isn: o.pending.isn,
            first_seen_unix_ms: clock.unix_ms(o.pending.first_ns),
            rtt_us: o.rtt_ns.map(|n| n / 1000),
            icmp_type: o.icmp.map(|i| i.0),
            icmp_code: o.icmp.map(|i| i.1),
            in_allowed_range: allowed.contains(o.key.src_port),
            answered_src: o.answered_as.map(|k| addrs(&k).0),
            answered_src_port: o.answered_as.map(|k| k.src_port),
            who: Attribution::default(),
        }
    }
}

/// What could not be seen, always reported.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Drops {
    /// Outcomes and SYNs the kernel could not hand over (ring buffer full).
    pub events_lost: u64,
    /// SYNs not tracked because the pending map was full, or their bucket stayed locked.
    pub pending_map_full: u64,
    /// Of those, the ones whose bucket stayed locked (its holder was held up): not a sign of
    /// too small a map.
    pub table_busy: u64,
    /// Ring-buffer records that did not decode.
    pub decode_errors: u64,
    /// Connections whose every event was lost (ring buffer full), answered since their kernel
    /// entry is gone: source ports the kernel tallied SYNs for that netrace never heard of.
    /// Counted as answered; their destination is unknown.
    pub answered_invisible: u64,
}

impl Drops {
    pub fn any(&self) -> bool {
        self.events_lost + self.pending_map_full + self.decode_errors > 0
    }
}

/// Everything printed at the end of a run.
#[derive(Clone, Debug)]
pub struct Report {
    pub interfaces: Vec<String>,
    pub duration_s: f64,
    pub syn_timeout_ms: u64,
    pub histogram: Histogram,
    /// Outcomes by destination: the top ones by attempts, then "other".
    pub by_destination: Vec<DestinationRow>,
    /// What the tracker noticed besides outcomes.
    pub tracker: TrackerStats,
    pub verdict: Verdict,
    pub fix: Vec<String>,
    pub node: NodePorts,
    pub drops: Drops,
    pub counters: BTreeMap<&'static str, u64>,
    pub syn_packets_by_port: Vec<(u16, u64)>,
    pub pending_at_exit: u64,
    /// Lost connections, for `--list-lost` (capped; see `lost_not_listed`).
    pub lost: Vec<ConnRecord>,
    pub lost_not_listed: u64,
    /// Why the run ended early, if it did (e.g. an interface went away).
    pub notes: Vec<String>,
    /// What SNAT does to ports, when pod-side interfaces were watched.
    pub nat: Option<NatReport>,
    /// Lost connections by pod, when attribution was on.
    pub lost_by_pod: Option<Vec<PodLoss>>,
    /// Where outbound SYNs were observed, and why there.
    pub egress_hook: Hook,
    pub egress_hook_reason: String,
    /// Signs of translation netrace could not follow (always reported; see `verdict`).
    pub translation: TranslationSigns,
}

#[derive(Serialize)]
struct Totals {
    #[serde(flatten)]
    counts: Counts,
    pending_at_exit: u64,
}

impl Report {
    pub fn totals(&self) -> Counts {
        self.histogram.totals
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.histogram.buckets
    }

    /// The JSON summary object (docs/json.md).
    pub fn to_json(&self) -> serde_json::Value {
        let allowed = self.histogram.allowed;
        let buckets: Vec<serde_json::Value> = self
            .buckets()
            .iter()
            .map(|b| {
                serde_json::json!({
                    "start": b.start, "end": b.end,
                    "attempts": b.counts.attempts, "answered": b.counts.answered,
                    "lost": b.counts.lost, "refused": b.counts.refused,
                    "unreachable": b.counts.unreachable, "late": b.counts.late,
                    "loss_pct": b.counts.loss_pct(),
                    "in_allowed_range": b.in_allowed_range,
                })
            })
            .collect();
        serde_json::json!({
            "type": "summary",
            "interfaces": self.interfaces,
            "duration_s": (self.duration_s * 1000.0).round() / 1000.0,
            "allowed_ports": allowed,
            "syn_timeout_ms": self.syn_timeout_ms,
            "totals": Totals { counts: self.totals(), pending_at_exit: self.pending_at_exit },
            "buckets": buckets,
            "by_destination": self.by_destination.iter().map(|r| serde_json::json!({
                "destination": r.label(),
                "attempts": r.counts.attempts, "answered": r.counts.answered,
                "lost": r.counts.lost, "refused": r.counts.refused,
                "unreachable": r.counts.unreachable, "late": r.counts.late,
                "loss_pct": r.counts.loss_pct(),
            })).collect::<Vec<_>>(),
            "verdict": self.verdict,
            "fix": self.fix,
            "node": {
                "ip_local_port_range": self.node.ip_local_port_range,
                "ip_local_reserved_ports": self.node.ip_local_reserved_ports,
                "local_range_inside_allowed": self.node.local_range().map(|l| allowed.covers(&l)),
            },
            "drops": self.drops,
            "tracker": {
                "syns_after_lost": self.tracker.syns_after_lost,
                "lost_memory_overflow": self.tracker.lost_memory_overflow,
                "repeated_syns": self.tracker.repeated_syns,
                "repeated_synacks": self.tracker.repeated_synacks,
                "busy_paired": self.tracker.busy_paired,
                "busy_unpaired": self.tracker.busy_unpaired,
                "sweep_races": self.tracker.sweep_races,
                "put_back_refused": self.tracker.put_back_refused,
            },
            "counters": self.counters,
            "syn_packets_by_port": self.syn_packets_by_port,
            "notes": self.notes,
            "nat": self.nat,
            "lost_by_pod": self.lost_by_pod,
            "egress_hook": { "hook": self.egress_hook, "reason": self.egress_hook_reason },
            "translation": self.translation,
        })
    }
}

/// Attempts and losses on one side of the allowed range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Side {
    pub attempts: u64,
    pub lost: u64,
}

/// What happened during a stretch of time, split by the allowed range (`--interval`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub attempts: u64,
    pub answered: u64,
    pub lost: u64,
    pub refused: u64,
    pub unreachable: u64,
    pub late: u64,
    pub inside: Side,
    pub outside: Side,
}

impl Tally {
    /// Everything since the start.
    pub fn of(h: &Histogram) -> Self {
        let t = &h.totals;
        Self {
            attempts: t.attempts,
            answered: t.answered,
            lost: t.lost,
            refused: t.refused,
            unreachable: t.unreachable,
            late: t.late,
            inside: Side {
                attempts: h.inside.attempts,
                lost: h.inside.lost,
            },
            outside: Side {
                attempts: h.outside.attempts,
                lost: h.outside.lost,
            },
        }
    }

    /// What was added since `earlier`.
    pub fn since(&self, earlier: &Tally) -> Self {
        let side = |a: Side, b: Side| Side {
            attempts: a.attempts.saturating_sub(b.attempts),
            lost: a.lost.saturating_sub(b.lost),
        };
        Self {
            attempts: self.attempts.saturating_sub(earlier.attempts),
            answered: self.answered.saturating_sub(earlier.answered),
            lost: self.lost.saturating_sub(earlier.lost),
            refused: self.refused.saturating_sub(earlier.refused),
            unreachable: self.unreachable.saturating_sub(earlier.unreachable),
            late: self.late.saturating_sub(earlier.late),
            inside: side(self.inside, earlier.inside),
            outside: side(self.outside, earlier.outside),
        }
    }
}

/// The verdict so far, in short.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShortVerdict {
    /// As `verdict.kind` in the summary.
    pub kind: String,
    pub headline: String,
}

impl ShortVerdict {
    pub fn of(v: &Verdict) -> Self {
        let kind = serde_json::to_value(v.kind)
            .ok()
            .and_then(|k| k.as_str().map(str::to_string))
            .unwrap_or_default();
        Self {
            kind,
            headline: v.headline.clone(),
        }
    }

    /// The kind in a few words (`range problem`).
    pub fn words(&self) -> String {
        self.kind.replace('_', " ")
    }
}

/// One `--interval` summary (`"type": "interval"` in JSON).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IntervalReport {
    #[serde(rename = "type")]
    pub kind_tag: &'static str,
    pub unix_ms: u64,
    /// Seconds since netrace started watching.
    pub elapsed_s: f64,
    /// Length of this interval in seconds.
    pub interval_s: f64,
    pub allowed_ports: PortRange,
    /// Connections decided during this interval.
    pub window: Tally,
    /// Connections decided since the start.
    pub totals: Tally,
    /// SYNs waiting for an answer now.
    pub pending: u64,
    pub verdict: ShortVerdict,
}
