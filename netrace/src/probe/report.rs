//! What the probes found, in words and numbers: the per-range table, the inferred range with
//! its confidence, the TCP/UDP comparison, the node's settings and the fix. Pure functions
//! over the results; `write_text` and `json_lines` print them.

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use super::infer::{sample_ports, Analysis, Edge, EdgeStatus, Inference, Kind, Outcome, Phase};
use super::net::{Proto, Record};
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

    fn of<'a>(outcomes: impl IntoIterator<Item = &'a Outcome>) -> Self {
        let mut t = Self::default();
        for &o in outcomes {
            t.add(o);
        }
        t
    }

    fn came_back(&self) -> u32 {
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

/// How UDP fared next to TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UdpKind {
    /// UDP replies come back to ports where TCP answers do not: the filter is TCP-only.
    TcpOnlyFilter,
    /// UDP replies come back only where TCP answers do.
    SameAsTcp,
    /// TCP and UDP both come back everywhere probed.
    BothThrough,
    /// Nothing listens on the UDP port (ICMP port unreachable came back).
    UdpClosed,
    /// No reply at all: the service does not answer UDP, so none was expected.
    NoReply,
    /// Replies and silence with no pattern against TCP.
    Mixed,
}

/// The UDP side of the comparison.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UdpReport {
    pub kind: UdpKind,
    #[serde(flatten)]
    pub tally: Tally,
    /// Probes from ports where TCP gets no answer back, and how many of them came back.
    pub where_tcp_silent: u32,
    pub where_tcp_silent_came_back: u32,
    /// Probes from ports where TCP answers come back, and how many of them came back.
    pub where_tcp_answers: u32,
    pub where_tcp_answers_came_back: u32,
    pub text: String,
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

/// One probe line of the JSON output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeLine<'a> {
    #[serde(rename = "type")]
    pub type_tag: &'static str,
    pub phase: Phase,
    #[serde(flatten)]
    pub record: &'a Record,
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

/// The UDP ports that go with a TCP inference: spread over the range, plus the ports on
/// both sides of each edge, where the comparison says the most.
pub fn udp_ports(range: PortRange, samples: u32, analysis: &Analysis) -> Vec<u16> {
    let mut ports = sample_ports(range, samples.min(16));
    for e in [analysis.lower, analysis.upper].into_iter().flatten() {
        ports.push(e.inside);
        if let Some(o) = e.outside {
            ports.push(o);
        }
    }
    ports.retain(|&p| range.contains(p));
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Whether TCP answers come back to `port`, as far as the inference knows.
fn tcp_comes_back(a: &Analysis, port: u16) -> Option<bool> {
    match a.kind {
        Kind::AllAnswered => Some(true),
        Kind::NoneAnswered => Some(false),
        Kind::Range => {
            let (l, u) = (a.lower?, a.upper?);
            if (l.inside..=u.inside).contains(&port) {
                Some(true)
            } else if l.outside.is_some_and(|o| port <= o) || u.outside.is_some_and(|o| port >= o) {
                Some(false)
            } else {
                None
            }
        }
        Kind::NotARange | Kind::NothingUsable => None,
    }
}

/// Compares UDP with the TCP inference.
pub fn compare_udp(tcp: &Analysis, udp: &[Record], server_port: u16) -> UdpReport {
    let tally = Tally::of(udp.iter().map(|r| &r.outcome));
    let (mut ts, mut ts_back, mut ta, mut ta_back) = (0, 0, 0, 0);
    for r in udp {
        let Some(back) = r.outcome.came_back() else {
            continue;
        };
        match tcp_comes_back(tcp, r.port) {
            Some(false) => {
                ts += 1;
                ts_back += u32::from(back);
            }
            Some(true) => {
                ta += 1;
                ta_back += u32::from(back);
            }
            None => {}
        }
    }
    let usable = tally.came_back() + tally.timeout;
    let (kind, text) = if tally.answered == 0 && tally.refused > 0 {
        let outside = if ts_back > 0 {
            format!(", {ts_back} of them from ports where TCP gets no SYN-ACK")
        } else {
            String::new()
        };
        (
            UdpKind::UdpClosed,
            format!(
                "UDP: nothing listens on UDP port {server_port} (ICMP port unreachable came back \
                 to {} of {usable} ports{outside}); no reply expected, so UDP cannot be compared \
                 with TCP",
                tally.refused
            ),
        )
    } else if tally.answered == 0 {
        (
            UdpKind::NoReply,
            format!(
                "UDP: no reply to any of {usable} datagrams: the service does not answer UDP (no \
                 reply expected), so UDP says nothing here; `nc -vvu` would still call the port \
                 open"
            ),
        )
    } else if ts > 0 && ts_back > 0 {
        (
            UdpKind::TcpOnlyFilter,
            format!(
                "UDP: replies came back to {ts_back} of {ts} source ports where TCP gets no \
                 SYN-ACK (and to {ta_back} of {ta} where it does): the filter drops only TCP \
                 return traffic. This is the article's symptom: `nc -vvu` always works, `nc -vv` \
                 fails whenever the connection draws a blocked port"
            ),
        )
    } else if ts > 0 && ta_back > 0 {
        (
            UdpKind::SameAsTcp,
            format!(
                "UDP: replies came back only where TCP answers do ({ta_back} of {ta}), none to \
                 the {ts} ports where TCP gets no SYN-ACK: UDP is filtered the same way"
            ),
        )
    } else if ts == 0 && ta > 0 && ta_back == ta && tcp.kind == Kind::AllAnswered {
        (
            UdpKind::BothThrough,
            format!("UDP: replies came back to all {ta} probed ports, like TCP: both get through"),
        )
    } else {
        (
            UdpKind::Mixed,
            format!(
                "UDP: replies came back to {} of {usable} probed ports, with no clear pattern \
                 against TCP",
                tally.answered
            ),
        )
    };
    UdpReport {
        kind,
        tally,
        where_tcp_silent: ts,
        where_tcp_silent_came_back: ts_back,
        where_tcp_answers: ta,
        where_tcp_answers_came_back: ta_back,
        text,
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

/// The fix, for a range with TCP answers missing outside it.
fn fix(primary: Proto, kind: Kind, allowed: Option<PortRange>, node: &NodePorts) -> Vec<String> {
    let mut out = Vec::new();
    let Some(a) = allowed.filter(|_| kind == Kind::Range && primary == Proto::Tcp) else {
        return out;
    };
    let (lo, hi) = (a.start, a.end);
    // The kernel refuses a local range starting below net.ipv4.ip_unprivileged_port_start.
    let floor = lo.max(1024);
    if floor <= hi {
        let local = node.local_range();
        let suggest = match local {
            Some(l) if a.covers(&l) => None,
            // Keep as much of the current range as fits, if that leaves plenty of ports.
            Some(l) if l.start.max(floor) <= l.end.min(hi) => {
                let both = PortRange::new(l.start.max(floor), l.end.min(hi));
                Some(if both.count() >= 4096 {
                    both
                } else {
                    PortRange::new(floor, hi)
                })
            }
            _ => Some(PortRange::new(floor, hi)),
        };
        if let Some(r) = suggest {
            out.push(format!(
                "keep this host's own connections inside it: sysctl -w \
                 net.ipv4.ip_local_port_range=\"{} {}\" (and in /etc/sysctl.d/ to keep it)",
                r.start, r.end
            ));
        }
    }
    out.push(format!(
        "on a node that SNATs pods, restrict SNAT to it: iptables -t nat -A POSTROUTING -o IFACE \
         -p tcp -j MASQUERADE --random-fully --to-ports {lo}-{hi} (nftables: masquerade to \
         :{lo}-{hi} fully-random; Calico: FELIX_NATPORTRANGE={lo}:{hi})"
    ));
    out.push(
        "or widen the firewall (security group, NACL, ACL) to let TCP return traffic back to \
         ports 1024-65535"
            .to_string(),
    );
    out
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
    let fix = fix(setup.primary, a.kind, span, node);
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

/// The JSON lines: one per probe (primary protocol first, then UDP), then the summary.
pub fn json_lines(
    summary: &Summary,
    inf: &Inference,
    records: &[Record],
    udp: &[Record],
) -> serde_json::Result<Vec<String>> {
    let mut lines = Vec::new();
    for (p, r) in inf.probes.iter().zip(records) {
        lines.push(serde_json::to_string(&ProbeLine {
            type_tag: "probe",
            phase: p.phase,
            record: r,
        })?);
    }
    for r in udp {
        lines.push(serde_json::to_string(&ProbeLine {
            type_tag: "probe",
            phase: Phase::Sample,
            record: r,
        })?);
    }
    lines.push(serde_json::to_string(summary)?);
    Ok(lines)
}

/// The terminal report.
pub fn write_text(w: &mut impl Write, s: &Summary) -> io::Result<()> {
    let st = &s.setup;
    let from = st
        .local_addr
        .map_or(String::new(), |l| format!(" from {l}"));
    let protos = if st.compare_udp {
        "TCP (and UDP to compare)".to_string()
    } else {
        st.primary.name().to_uppercase()
    };
    let resolved = if st.target == st.address.to_string() {
        String::new()
    } else {
        format!(" ({})", st.address)
    };
    writeln!(
        w,
        "netrace probe: {}{resolved} over {protos}{from}: source ports {}, {} samples + {} \
         bisection probes, timeout {} ms, at most {}/s",
        st.target,
        st.ports,
        s.inference.sample_probes,
        s.inference.extra_probes,
        st.timeout_ms,
        st.rate
    )?;
    writeln!(w)?;
    writeln!(
        w,
        "{:<13} {:>6} {:>8} {:>7} {:>7} {:>7} {:>7}  result",
        "source ports", "probes", "answered", "refused", "unreach", "timeout", "skipped"
    )?;
    for b in &s.buckets {
        let t = b.tally;
        writeln!(
            w,
            "{:<13} {:>6} {:>8} {:>7} {:>7} {:>7} {:>7}  {}",
            format!("{}-{}", b.start, b.end),
            t.probes,
            t.answered,
            t.refused,
            t.unreachable,
            t.timeout,
            t.skipped,
            b.result
        )?;
    }
    writeln!(w)?;
    writeln!(w, "{}", s.inference.headline)?;
    for d in &s.inference.details {
        writeln!(w, "  - {d}")?;
    }
    if let Some(u) = &s.udp {
        writeln!(w, "{}", u.text)?;
    }
    if let Some((a, b)) = s.node.ip_local_port_range {
        let fits = match (s.node.local_range_inside_allowed, s.inference.allowed) {
            (Some(true), Some(r)) => format!(": fits inside {r}"),
            (Some(false), Some(r)) => {
                let mut outside = Vec::new();
                if a < r.start {
                    outside.push(format!("{a}-{}", b.min(r.start - 1)));
                }
                if b > r.end {
                    outside.push(format!("{}-{b}", a.max(r.end + 1)));
                }
                format!(
                    ": does NOT fit inside {r}; this host's own connections that draw a port in \
                     {} will hang",
                    outside.join(" or ")
                )
            }
            _ => String::new(),
        };
        writeln!(w, "this host: net.ipv4.ip_local_port_range {a} {b}{fits}")?;
    }
    if !s.fix.is_empty() {
        writeln!(w)?;
        writeln!(w, "fix:")?;
        for (i, f) in s.fix.iter().enumerate() {
            writeln!(w, "  {}. {f}", i + 1)?;
        }
    }
    writeln!(w)?;
    for n in &s.notes {
        if n.starts_with("WARNING") {
            writeln!(w, "{n}")?;
        } else {
            writeln!(w, "note: {n}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::infer::{infer, Plan};

    fn setup(primary: Proto) -> Setup {
        Setup {
            target: "server:8080".into(),
            address: SocketAddr::from(([198, 18, 3, 2], 8080)),
            family: "ipv4",
            local_addr: Some(IpAddr::from([198, 18, 2, 1])),
            primary,
            compare_udp: primary == Proto::Tcp,
            ports: PortRange::new(1024, 65535),
            samples: 128,
            max_extra: 40,
            timeout_ms: 300,
            rate: 50.0,
        }
    }

    fn node(lo: u16, hi: u16) -> NodePorts {
        NodePorts {
            ip_local_port_range: Some((lo, hi)),
            ip_local_reserved_ports: String::new(),
        }
    }

    /// The records a network oracle would have kept for `inf`.
    fn records(proto: Proto, inf: &Inference) -> Vec<Record> {
        inf.probes
            .iter()
            .map(|p| Record {
                proto,
                port: p.port,
                outcome: p.outcome,
                rtt_us: None,
                detail: None,
            })
            .collect()
    }

    /// Runs the inference against `oracle` and turns its outcomes into records.
    fn probe(proto: Proto, oracle: &mut impl FnMut(u16) -> Outcome) -> (Inference, Vec<Record>) {
        let plan = Plan {
            range: PortRange::new(1024, 65535),
            samples: 128,
            max_extra: 40,
        };
        let inf = infer(&plan, oracle).unwrap_or_else(|e| panic!("{e:#}"));
        let records = records(proto, &inf);
        (inf, records)
    }

    fn threshold(min: u16) -> impl FnMut(u16) -> Outcome {
        move |p| {
            if p >= min {
                Outcome::Answered
            } else {
                Outcome::Timeout
            }
        }
    }

    fn udp_records(ports: &[u16], mut f: impl FnMut(u16) -> Outcome) -> Vec<Record> {
        ports
            .iter()
            .map(|&port| Record {
                proto: Proto::Udp,
                port,
                outcome: f(port),
                rtt_us: None,
                detail: None,
            })
            .collect()
    }

    fn text(s: &Summary) -> String {
        let mut out = Vec::new();
        write_text(&mut out, s).unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn the_seed_case_reads_like_the_article() {
        let (inf, recs) = probe(Proto::Tcp, &mut threshold(32768));
        let ports = udp_ports(PortRange::new(1024, 65535), 128, &inf.analysis);
        assert!(
            ports.contains(&32767) && ports.contains(&32768),
            "{ports:?}"
        );
        let udp = udp_records(&ports, |_| Outcome::Answered);
        let s = build(
            setup(Proto::Tcp),
            &inf,
            &recs,
            Some(&udp),
            &node(32768, 60999),
        );
        assert_eq!(s.inference.kind, Kind::Range);
        assert_eq!(s.inference.allowed, Some(PortRange::new(32768, 65535)));
        assert!(s.inference.exact);
        assert!(s
            .inference
            .headline
            .contains("SYN-ACKs come back only to source ports 32768-65535"));
        let u = s.udp.as_ref().unwrap_or_else(|| panic!("no UDP"));
        assert_eq!(u.kind, UdpKind::TcpOnlyFilter);
        assert!(u.where_tcp_silent > 0 && u.where_tcp_silent == u.where_tcp_silent_came_back);
        assert_eq!(s.node.local_range_inside_allowed, Some(true));
        assert!(!s.fix.iter().any(|f| f.contains("sysctl")), "{:?}", s.fix);
        assert!(s.fix.iter().any(|f| f.contains("--to-ports 32768-65535")));
        assert!(!s.snat_warning);
        assert_eq!(s.exit_code, 1);
        // Buckets split at the edge: every bucket below is silent, every bucket above answers.
        for b in &s.buckets {
            let expect = if b.end < 32768 { "silent" } else { "answers" };
            assert_eq!(b.result, expect, "{b:?}");
        }
        let t = text(&s);
        assert!(
            t.contains("lower edge 32768: exact (port 32767 got no answer, port 32768 did)"),
            "{t}"
        );
        assert!(t.contains("32768-49151"), "{t}");
        assert!(
            t.contains("note: this assumes the firewall sees the source port bound here"),
            "{t}"
        );
        assert!(t.contains("netrace watch"), "{t}");
        let json = json_lines(&s, &inf, &recs, &udp).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(json.len(), recs.len() + udp.len() + 1);
        let v: serde_json::Value =
            serde_json::from_str(json.last().map_or("", |s| s.as_str())).unwrap_or_default();
        assert_eq!(v["type"], "summary");
        assert_eq!(v["inference"]["allowed"]["start"], 32768);
        assert_eq!(v["inference"]["lower"]["status"], "exact");
        assert_eq!(v["udp"]["kind"], "tcp_only_filter");
        assert_eq!(v["primary"], "tcp");
        let first: serde_json::Value = serde_json::from_str(&json[0]).unwrap_or_default();
        assert_eq!(first["type"], "probe");
        assert_eq!(first["port"], 1024);
        assert_eq!(first["outcome"], "timeout");
        assert_eq!(first["phase"], "sample");
    }

    #[test]
    fn a_local_range_outside_gets_a_sysctl() {
        let (inf, recs) = probe(Proto::Tcp, &mut threshold(40000));
        let s = build(setup(Proto::Tcp), &inf, &recs, None, &node(32768, 60999));
        assert_eq!(s.node.local_range_inside_allowed, Some(false));
        assert!(
            s.fix
                .iter()
                .any(|f| f.contains("net.ipv4.ip_local_port_range=\"40000 60999\"")),
            "{:?}",
            s.fix
        );
        let t = text(&s);
        assert!(
            t.contains("does NOT fit inside 40000-65535; this host's own connections that draw a port in 32768-39999 will hang"),
            "{t}"
        );
        // Nothing of the current range fits: the whole allowed range, from 1024 up.
        let mut st = setup(Proto::Tcp);
        st.ports = PortRange::new(1, 65535);
        let plan = Plan {
            range: st.ports,
            samples: 128,
            max_extra: 40,
        };
        let inf = infer(&plan, &mut |p: u16| {
            if (500..=30000).contains(&p) {
                Outcome::Answered
            } else {
                Outcome::Timeout
            }
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
        let recs = records(Proto::Tcp, &inf);
        let s = build(st, &inf, &recs, None, &node(32768, 60999));
        assert_eq!(s.inference.allowed, Some(PortRange::new(500, 30000)));
        assert!(
            s.fix
                .iter()
                .any(|f| f.contains("net.ipv4.ip_local_port_range=\"1024 30000\"")),
            "{:?}",
            s.fix
        );
        assert!(s.fix.iter().any(|f| f.contains("--to-ports 500-30000")));
    }

    #[test]
    fn udp_comparisons() {
        let (inf, _) = probe(Proto::Tcp, &mut threshold(32768));
        let ports = udp_ports(PortRange::new(1024, 65535), 128, &inf.analysis);
        let a = &inf.analysis;
        let r = compare_udp(a, &udp_records(&ports, |_| Outcome::Timeout), 8080);
        assert_eq!(r.kind, UdpKind::NoReply);
        assert!(r.text.contains("no reply expected"), "{}", r.text);
        let r = compare_udp(a, &udp_records(&ports, |_| Outcome::Refused), 8080);
        assert_eq!(r.kind, UdpKind::UdpClosed);
        // ICMP errors are rate-limited: some refused, the rest silent is still "closed".
        let mut n = 0;
        let r = compare_udp(
            a,
            &udp_records(&ports, |_| {
                n += 1;
                if n <= 6 {
                    Outcome::Refused
                } else {
                    Outcome::Timeout
                }
            }),
            8080,
        );
        assert_eq!(r.kind, UdpKind::UdpClosed);
        let r = compare_udp(a, &udp_records(&ports, threshold(32768)), 8080);
        assert_eq!(r.kind, UdpKind::SameAsTcp);
        let (all, _) = probe(Proto::Tcp, &mut |_| Outcome::Answered);
        let r = compare_udp(
            &all.analysis,
            &udp_records(&ports, |_| Outcome::Answered),
            8080,
        );
        assert_eq!(r.kind, UdpKind::BothThrough);
    }

    #[test]
    fn random_results_warn_about_snat() {
        let (inf, recs) = probe(Proto::Tcp, &mut |p| {
            if (u32::from(p).wrapping_mul(2_654_435_761) >> 16) % 2 == 0 {
                Outcome::Answered
            } else {
                Outcome::Timeout
            }
        });
        let s = build(setup(Proto::Tcp), &inf, &recs, None, &node(32768, 60999));
        assert_eq!(s.inference.kind, Kind::NotARange);
        assert!(s.snat_warning);
        assert!(s.fix.is_empty());
        let t = text(&s);
        assert!(
            t.contains("does not look like a source-port range filter"),
            "{t}"
        );
        assert!(
            t.contains("WARNING: the firewall may not see the source port bound here"),
            "{t}"
        );
    }

    #[test]
    fn a_private_source_towards_a_public_server_is_a_snat_hint() {
        let (inf, recs) = probe(Proto::Tcp, &mut threshold(32768));
        let mut st = setup(Proto::Tcp);
        st.local_addr = Some(IpAddr::from([10, 1, 2, 3]));
        st.address = SocketAddr::from(([203, 0, 113, 10], 443));
        let s = build(st, &inf, &recs, None, &node(32768, 60999));
        assert!(s.snat_warning);
        assert!(s.notes.iter().any(|n| n.contains("10.1.2.3 is private")));
        assert!(is_private(IpAddr::from([100, 64, 0, 1])));
        assert!(!is_private(IpAddr::from([100, 128, 0, 1])));
        assert!(is_private(
            "fd00::1".parse().unwrap_or(IpAddr::from([0; 4]))
        ));
        assert!(!is_private(
            "2001:db8::1".parse().unwrap_or(IpAddr::from([10, 0, 0, 1]))
        ));
    }

    #[test]
    fn all_none_and_udp_only() {
        let (inf, recs) = probe(Proto::Tcp, &mut |_| Outcome::Answered);
        let s = build(setup(Proto::Tcp), &inf, &recs, None, &node(32768, 60999));
        assert_eq!(s.exit_code, 0);
        assert!(s.fix.is_empty());
        assert!(s.inference.headline.contains("no source-port filter"));
        assert!(text(&s).contains("lower edge: open"));
        let (inf, recs) = probe(Proto::Udp, &mut |_| Outcome::Timeout);
        let s = build(setup(Proto::Udp), &inf, &recs, None, &node(32768, 60999));
        assert_eq!(s.inference.kind, Kind::NoneAnswered);
        assert!(s.inference.headline.contains("no reply expected"));
        assert_eq!(s.exit_code, 1);
        let (inf, recs) = probe(Proto::Tcp, &mut |_| Outcome::Skipped);
        let s = build(setup(Proto::Tcp), &inf, &recs, None, &node(32768, 60999));
        assert_eq!(s.exit_code, 2);
    }

    #[test]
    fn bounded_edges_are_worded_as_ranges() {
        let plan = Plan {
            range: PortRange::new(1024, 65535),
            samples: 128,
            max_extra: 2,
        };
        let inf = infer(&plan, &mut threshold(40000)).unwrap_or_else(|e| panic!("{e:#}"));
        let recs = records(Proto::Tcp, &inf);
        let s = build(setup(Proto::Tcp), &inf, &recs, None, &node(32768, 60999));
        assert!(!s.inference.exact);
        assert!(
            s.inference.headline.contains("somewhere in"),
            "{}",
            s.inference.headline
        );
        let lower = s
            .inference
            .lower
            .as_ref()
            .unwrap_or_else(|| panic!("no edge"));
        assert!(lower.candidates.contains(40000));
        assert!(text(&s).contains("--max-extra"));
    }
}
