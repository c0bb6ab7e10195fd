//! What the probes found, in words and numbers: the per-range table, the inferred range with
//! its confidence, the node's settings and the notes, as one [`Summary`]. Pure functions over
//! the results; the UDP comparison is in `udp`, the fix comes from `judge::advice`, and
//! `render::probe_text` / `render::probe_json` print it.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use super::infer::{Analysis, Edge, EdgeStatus, Inference, Kind, Outcome, Phase};
use super::net::{Proto, Record};
use super::udp::{compare_udp, UdpReport};
use crate::judge::advice;
use crate::node::NodePorts;
use crate::options::DEFAULT_BUCKET_EDGES;
use crate::ports::PortRange;

/// How the run was asked for (for the report's header).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Setup {
    /// HOST:PORT as given.
    pub target: String,
    /// What it resolved to.
    pub address: SocketAddr,
    pub family: &'static str,
    /// The local address towards the target.
    pub local_addr: Option<IpAddr>,
    /// The protocol whose edges were searched (`tcp` unless only `--udp` was given).
    pub primary: Proto,
    /// Whether UDP was probed alongside TCP for the comparison.
    pub compare_udp: bool,
    pub ports: PortRange,
    pub samples: u32,
    pub max_extra: u32,
    pub timeout_ms: u64,
    pub rate: f64,
}

/// Probe counts by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub probes: u32,
    pub answered: u32,
    pub refused: u32,
    pub unreachable: u32,
    pub timeout: u32,
    pub skipped: u32,
}

impl Tally {
    fn add(&mut self, o: Outcome) {
        self.probes += 1;
        match o {
            Outcome::Answered => self.answered += 1,
            Outcome::Refused => self.refused += 1,
            Outcome::Unreachable => self.unreachable += 1,
            Outcome::Timeout => self.timeout += 1,
            Outcome::Skipped => self.skipped += 1,
        }
    }

    pub(crate) fn of<'a>(outcomes: impl IntoIterator<Item = &'a Outcome>) -> Self {
        let mut t = Self::default();
        for &o in outcomes {
            t.add(o);
        }
        t
    }

    pub(crate) fn came_back(&self) -> u32 {
        self.answered + self.refused
    }
}

/// One row of the table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BucketRow {
    pub start: u16,
    pub end: u16,
    #[serde(flatten)]
    pub tally: Tally,
    /// `answers` (every usable probe came back), `silent` (none did), `mixed`, or `none`
    /// (no usable probe).
    pub result: &'static str,
}

/// One edge, for the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EdgeReport {
    pub status: EdgeStatus,
    /// The outermost port that got an answer on this side.
    pub inside: u16,
    /// The nearest silent port beyond it.
    pub outside: Option<u16>,
    /// Where the first (lower) or last (upper) allowed port lies.
    pub candidates: PortRange,
}

impl EdgeReport {
    fn new(e: Edge, lower: bool) -> Self {
        Self {
            status: e.status,
            inside: e.inside,
            outside: e.outside,
            candidates: e.candidates(lower),
        }
    }
}

/// The inferred range and how sure it is.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InferenceReport {
    pub kind: Kind,
    /// Ports known to get answers back (lowest to highest answering port); with `exact`,
    /// the allowed range itself.
    pub allowed: Option<PortRange>,
    pub exact: bool,
    pub lower: Option<EdgeReport>,
    pub upper: Option<EdgeReport>,
    pub sample_probes: u32,
    pub extra_probes: u32,
    pub budget_exhausted: bool,
    /// Silent ports between answering ones.
    pub interleaved_silent: u32,
    /// Largest distance between two neighbouring answering probes: a hole narrower than this
    /// inside the range would go unnoticed.
    pub max_gap: Option<u32>,
    pub headline: String,
    pub details: Vec<String>,
}

/// This host's own port settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeReport {
    pub ip_local_port_range: Option<(u16, u16)>,
    /// Whether that range fits inside the ports known to get answers (null without a range).
    pub local_range_inside_allowed: Option<bool>,
}

/// The whole report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    #[serde(rename = "type")]
    pub type_tag: &'static str,
    #[serde(flatten)]
    pub setup: Setup,
    pub totals: Tally,
    pub buckets: Vec<BucketRow>,
    pub inference: InferenceReport,
    pub udp: Option<UdpReport>,
    pub node: NodeReport,
    pub fix: Vec<String>,
    /// The SNAT caveat is a warning (the results look like translated ports), not a note.
    pub snat_warning: bool,
    pub notes: Vec<String>,
    pub exit_code: u8,
}

fn answers(proto: Proto) -> &'static str {
    match proto {
        Proto::Tcp => "SYN-ACKs",
        Proto::Udp => "UDP replies",
    }
}

/// Bucket starts: the probed range's start, the usual edges, and the inferred edges.
fn bucket_rows(range: PortRange, records: &[Record], span: Option<PortRange>) -> Vec<BucketRow> {
    let mut starts: Vec<u32> = vec![u32::from(range.start)];
    let mut edges: Vec<u32> = DEFAULT_BUCKET_EDGES.iter().map(|&e| u32::from(e)).collect();
    if let Some(s) = span {
        edges.push(u32::from(s.start));
        edges.push(u32::from(s.end) + 1);
    }
    starts.extend(
        edges
            .into_iter()
            .filter(|&e| e > u32::from(range.start) && e <= u32::from(range.end)),
    );
    starts.sort_unstable();
    starts.dedup();
    let mut rows = Vec::new();
    for (i, &s) in starts.iter().enumerate() {
        let end = starts
            .get(i + 1)
            .map_or(u32::from(range.end), |&next| next - 1);
        let (start, end) = (
            u16::try_from(s).unwrap_or(u16::MAX),
            u16::try_from(end).unwrap_or(u16::MAX),
        );
        let tally = Tally::of(
            records
                .iter()
                .filter(|r| (start..=end).contains(&r.port))
                .map(|r| &r.outcome),
        );
        let usable = tally.came_back() + tally.timeout;
        let result = if usable == 0 {
            "none"
        } else if tally.timeout == 0 {
            "answers"
        } else if tally.came_back() == 0 {
            "silent"
        } else {
            "mixed"
        };
        rows.push(BucketRow {
            start,
            end,
            tally,
            result,
        });
    }
    rows
}

fn max_gap(records: &[Record]) -> Option<u32> {
    let mut back: Vec<u16> = records
        .iter()
        .filter(|r| r.outcome.came_back() == Some(true))
        .map(|r| r.port)
        .collect();
    back.sort_unstable();
    back.windows(2).map(|w| u32::from(w[1] - w[0])).max()
}

fn edge_detail(e: &Edge, lower: bool, range: PortRange, inf: &Inference) -> String {
    let side = if lower { "lower" } else { "upper" };
    let p = e.inside;
    match (e.status, e.outside) {
        (EdgeStatus::Exact, Some(o)) => {
            format!("{side} edge {p}: exact (port {o} got no answer, port {p} did)")
        }
        (EdgeStatus::Exact, None) => {
            format!(
                "{side} edge {p}: the {} port there is",
                if lower { "lowest" } else { "highest" }
            )
        }
        (EdgeStatus::Bounded, Some(o)) => {
            let c = e.candidates(lower);
            let why = if inf.budget_exhausted {
                format!(
                    "the bisection budget of {} extra probes is spent (raise --max-extra)",
                    inf.extra_probes
                )
            } else {
                "the ports in between could not be probed (in use, not permitted or unreachable)"
                    .to_string()
            };
            format!(
                "{side} edge: somewhere in {c} (port {o} got no answer, port {p} did; {} ports \
                 untested: {why})",
                c.count() - 1
            )
        }
        _ => {
            let (end, beyond, which) = if lower {
                (range.start, "below", "start")
            } else {
                (range.end, "above", "end")
            };
            if p == end {
                format!(
                    "{side} edge: open ({p}, the {which} of the probed range, got an answer; \
                     allowed ports may continue {beyond} it)"
                )
            } else {
                format!(
                    "{side} edge: open (port {p} got an answer and no port {beyond} it got none: \
                     those were skipped or unreachable; allowed ports may continue {beyond} {p})"
                )
            }
        }
    }
}

fn inference_report(setup: &Setup, inf: &Inference, records: &[Record]) -> InferenceReport {
    let a: &Analysis = &inf.analysis;
    let refused = records
        .iter()
        .filter(|r| r.outcome == Outcome::Refused)
        .count();
    let what = if refused == 0 {
        answers(setup.primary)
    } else {
        match setup.primary {
            Proto::Tcp => "answers (SYN-ACKs or RSTs)",
            Proto::Udp => "answers (replies or ICMP port unreachable)",
        }
    };
    let proto = setup.primary.name().to_uppercase();
    let span = a.answered_span();
    let gap = max_gap(records);
    let sample_probes = inf
        .probes
        .iter()
        .filter(|p| p.phase == Phase::Sample)
        .count() as u32;
    let mut details = Vec::new();
    let headline = match a.kind {
        Kind::Range | Kind::AllAnswered => {
            range_headline(setup, inf, (&proto, what), gap, &mut details)
        }
        _ => other_headline(setup, a, &proto, &mut details),
    };
    if refused > 0 {
        let port = setup.address.port();
        details.push(match setup.primary {
            Proto::Tcp => format!(
                "{refused} answers were RSTs (connection refused): nothing listens on TCP port \
                 {port}, but a RST reaching a port shows return traffic gets there, like a \
                 SYN-ACK"
            ),
            Proto::Udp => format!(
                "{refused} answers were ICMP port unreachable: nothing listens on UDP port \
                 {port}, but the ICMP error reaching a port shows return traffic gets there"
            ),
        });
    }
    if a.inconclusive > 0 {
        details.push(format!(
            "{} probes were skipped (port in use or not permitted) or unreachable; they count \
             neither way",
            a.inconclusive
        ));
    }
    if inf.extra_probes > 0 {
        details.push(format!(
            "{} extra probes narrowed the edges down by bisection",
            inf.extra_probes
        ));
    }
    InferenceReport {
        kind: a.kind,
        allowed: span,
        exact: a.exact(),
        lower: a.lower.map(|e| EdgeReport::new(e, true)),
        upper: a.upper.map(|e| EdgeReport::new(e, false)),
        sample_probes,
        extra_probes: inf.extra_probes,
        budget_exhausted: inf.budget_exhausted,
        interleaved_silent: a.interleaved_silent,
        max_gap: gap,
        headline,
        details,
    }
}

/// The headline (and the edge and confidence details) when the answers form a range.
fn range_headline(
    setup: &Setup,
    inf: &Inference,
    (proto, what): (&str, &str),
    gap: Option<u32>,
    details: &mut Vec<String>,
) -> String {
    let a: &Analysis = &inf.analysis;
    let span = a.answered_span();
    let s = span.unwrap_or(setup.ports);
    for (e, lower) in [(a.lower, true), (a.upper, false)] {
        if let Some(e) = e {
            details.push(edge_detail(&e, lower, setup.ports, inf));
        }
    }
    let gap_words = gap.map_or(String::new(), |g| {
        format!(
            "; answering probes are at most {g} ports apart, so a hole narrower than \
             that inside the range would go unnoticed"
        )
    });
    if a.kind == Kind::AllAnswered {
        details.push(format!(
            "confidence: all {} usable probes got an answer{gap_words}",
            a.came_back
        ));
    } else {
        details.push(format!(
            "confidence: {} probes got an answer inside {s}, {} outside it got none, \
             none interleaved (consistent with one contiguous range){gap_words}",
            a.came_back, a.silent
        ));
    }
    if a.kind == Kind::AllAnswered {
        format!(
            "{proto}: every probed source port got its answer ({} of {} usable probes): \
             no source-port filter in {}",
            a.came_back,
            a.came_back + a.silent,
            setup.ports
        )
    } else if a.exact() {
        format!("{proto}: {what} come back only to source ports {s}")
    } else {
        let lo = match a.lower {
            Some(e) if e.status == EdgeStatus::Bounded => {
                format!("somewhere in {}", e.candidates(true))
            }
            Some(e) if e.status == EdgeStatus::Open => format!("{} or below", e.inside),
            Some(e) => e.inside.to_string(),
            None => "?".to_string(),
        };
        let hi = match a.upper {
            Some(e) if e.status == EdgeStatus::Bounded => {
                format!("somewhere in {}", e.candidates(false))
            }
            Some(e) if e.status == EdgeStatus::Open => format!("{} or above", e.inside),
            Some(e) => e.inside.to_string(),
            None => "?".to_string(),
        };
        format!(
            "{proto}: {what} come back only to source ports {s} (at least): the range \
             starts at {lo} and ends at {hi}"
        )
    }
}

/// The headline when the answers do not form a range.
fn other_headline(setup: &Setup, a: &Analysis, proto: &str, details: &mut Vec<String>) -> String {
    match a.kind {
        Kind::NoneAnswered => {
            let usable = a.silent;
            if setup.primary == Proto::Udp {
                format!(
                    "UDP: no reply to any of {usable} datagrams: the service does not answer \
                 UDP (no reply expected), or UDP is filtered; this says nothing about a \
                 source-port range"
                )
            } else {
                format!(
                    "TCP: no SYN-ACK came back to any of {usable} probed source ports: the \
                 server does not answer or everything is filtered (not a source-port range; \
                 or an allowed range narrower than the samples are apart: raise --samples)"
                )
            }
        }
        Kind::NotARange => {
            let total = a.came_back + a.silent;
            details.push(format!(
                "{} of {total} usable probes got no answer; {} of them lie between answering \
             ports",
                a.silent, a.interleaved_silent
            ));
            format!(
                "{proto}: answers come back to ports all over {} with silent ports in between: \
             the loss does not look like a source-port range filter (random loss, or ports \
             rewritten by SNAT on the way)",
                setup.ports
            )
        }
        Kind::NothingUsable => format!(
            "{proto}: no usable probe: every source port was skipped (in use, not permitted) or \
         got an ICMP error"
        ),
        // Worded by `range_headline`.
        Kind::Range | Kind::AllAnswered => String::new(),
    }
}

/// Private, shared (CGNAT), link-local or unique-local: addresses usually translated on the
/// way out.
fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private() || v4.is_link_local() || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments()[0];
            (s & 0xfe00) == 0xfc00 || (s & 0xffc0) == 0xfe80
        }
    }
}

/// Builds the report. `records` are the primary protocol's probes in the order of
/// `inf.probes`; `udp` the comparison's, if any.
pub fn build(
    setup: Setup,
    inf: &Inference,
    records: &[Record],
    udp: Option<&[Record]>,
    node: &NodePorts,
) -> Summary {
    let inference = inference_report(&setup, inf, records);
    let a = &inf.analysis;
    let span = match a.kind {
        Kind::Range | Kind::AllAnswered => a.answered_span(),
        _ => None,
    };
    let buckets = bucket_rows(setup.ports, records, span);
    let udp = udp.map(|u| compare_udp(a, u, setup.address.port()));
    let local = node.local_range();
    let node_report = NodeReport {
        ip_local_port_range: node.ip_local_port_range,
        local_range_inside_allowed: match (local, span) {
            (Some(l), Some(s)) => Some(s.covers(&l)),
            _ => None,
        },
    };
    let fix = match span {
        Some(s) if a.kind == Kind::Range && setup.primary == Proto::Tcp => {
            advice::for_probed_host(s, node)
        }
        _ => Vec::new(),
    };
    let mut notes = Vec::new();
    let private_local = setup
        .local_addr
        .is_some_and(|l| is_private(l) && !is_private(setup.address.ip()));
    let snat_warning = a.kind == Kind::NotARange || (private_local && a.kind != Kind::AllAnswered);
    let snat = "if this host's traffic is SNATed on the way (a pod, a node with MASQUERADE \
                --random-fully, a NAT gateway), ports are rewritten and look random from outside; \
                run `sudo netrace watch` on the node alongside to see the ports after SNAT";
    if snat_warning {
        notes.push(format!(
            "WARNING: the firewall may not see the source port bound here: {snat}"
        ));
    } else {
        notes.push(format!(
            "this assumes the firewall sees the source port bound here; {snat}"
        ));
    }
    if let Some(l) = setup.local_addr.filter(|_| private_local) {
        notes.push(format!(
            "the local address {l} is private and {} is not: this host's connections are \
             probably translated (SNAT) on the way",
            setup.address.ip()
        ));
    }
    let exit_code = match a.kind {
        Kind::AllAnswered => crate::error::exit::CLEAN,
        Kind::NothingUsable => crate::error::exit::ERROR,
        Kind::Range | Kind::NoneAnswered | Kind::NotARange => crate::error::exit::LOSS,
    };
    Summary {
        type_tag: "summary",
        totals: Tally::of(records.iter().map(|r| &r.outcome)),
        setup,
        buckets,
        inference,
        udp,
        node: node_report,
        fix,
        snat_warning,
        notes,
        exit_code,
    }
}

#[cfg(test)]
mod tests;
