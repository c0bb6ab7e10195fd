//! The verdict (what explains the loss: the source-port range, a destination, or neither?)
//! and the fix. Pure functions over the histogram, the per-destination outcomes and the
//! node's settings.
//!
//! `--allowed-ports` is a stated assumption, not a fact: the evidence (which ports got
//! answers, which were lost, per destination; see `judge::evidence`) can confirm it, or
//! contradict it, and then the verdict says so and the fix uses the learned range.

use serde::Serialize;

use super::{
    advice,
    edge::Learned,
    evidence::{self, DestinationFinding, Evidence},
    exact::Method,
};
use crate::{
    node::NodePorts,
    ports::PortRange,
    track::{
        destinations::Destinations,
        natmode::{NatMode, NatReport},
        stats::Histogram,
    },
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictKind {
    RangeProblem,
    /// Destinations that never answer, from any port: not a port-range problem.
    DestinationProblem,
    NoRangeProblem,
    TooFew,
    NoTraffic,
    /// SYNs were seen before a translation (or not at all): ports not judged.
    TranslationOutOfSight,
}

/// Inside vs outside the range the verdict uses, for the destinations compared (those that
/// are not dead), and how the comparison was tested.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Comparison {
    pub attempts_inside: u64,
    pub lost_inside: u64,
    pub attempts_outside: u64,
    pub lost_outside: u64,
    /// One-sided: the chance of a difference this large if the port did not matter.
    pub p_value: f64,
    pub method: Method,
    /// Destinations that carried information (attempts on both sides, mixed outcomes).
    pub destinations: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub kind: VerdictKind,
    pub headline: String,
    pub details: Vec<String>,
    /// Inside and outside the assumed range (`--allowed-ports`), all destinations, as the
    /// histogram counts them.
    pub attempts_inside: u64,
    pub lost_inside: u64,
    pub attempts_outside: u64,
    pub lost_outside: u64,
    /// Source ports spread beyond the node's own local port range: someone translates ports.
    pub snat_suspected: bool,
    /// The range stated with `--allowed-ports` (default 32768-65535): the starting hypothesis.
    pub assumed: PortRange,
    /// The range the verdict and the fix use: `assumed`, unless the evidence contradicts it.
    pub allowed: PortRange,
    /// Whether the evidence contradicts `assumed`.
    pub contradicted: bool,
    /// What the answered and lost ports say about the edges.
    pub learned: Learned,
    /// Destinations that never answered, also from ports inside `allowed`.
    pub dead_destinations: Vec<DestinationFinding>,
    /// Destinations that answer but also lose many connections from inside `allowed`.
    pub lossy_destinations: Vec<DestinationFinding>,
    pub comparison: Comparison,
}

impl Verdict {
    /// A verdict that does not judge the ports (e.g. translation out of sight): no learned
    /// range, no comparison.
    pub fn not_judged(
        kind: VerdictKind,
        headline: String,
        details: Vec<String>,
        allowed: PortRange,
        snat_suspected: bool,
    ) -> Self {
        Self {
            kind,
            headline,
            details,
            attempts_inside: 0,
            lost_inside: 0,
            attempts_outside: 0,
            lost_outside: 0,
            snat_suspected,
            assumed: allowed,
            allowed,
            contradicted: false,
            learned: Learned::default(),
            dead_destinations: Vec::new(),
            lossy_destinations: Vec::new(),
            comparison: Comparison {
                attempts_inside: 0,
                lost_inside: 0,
                attempts_outside: 0,
                lost_outside: 0,
                p_value: 1.0,
                method: Method::Exact,
                destinations: 0,
            },
        }
    }
}

/// Fewer lost connections than this cannot support a conclusion.
pub const MIN_LOST: u64 = 3;
/// Fewer attempts than this cannot support a conclusion.
pub const MIN_ATTEMPTS: u64 = 10;

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

fn dead_list(dead: &[DestinationFinding]) -> String {
    let mut names: Vec<String> = dead
        .iter()
        .take(5)
        .map(|d| format!("{} ({} attempts)", d.label(), d.attempts))
        .collect();
    if dead.len() > 5 {
        names.push(format!("{} more", dead.len() - 5));
    }
    names.join(", ")
}

fn edge_details(e: &Evidence, out: &mut Vec<String>) {
    if let Some(l) = e.learned.lower {
        let agrees = if l.bracket().contains(e.assumed.start) {
            format!("; {} lies in it", e.assumed.start)
        } else {
            format!("; {} does not lie in it", e.assumed.start)
        };
        out.push(format!(
            "learned lower edge: SYN-ACKs come back from a port between {} (the highest lost \
             port below it) and {} (the lowest answered port){agrees}; {} connections below \
             it were all lost, {} above it ({} lost)",
            l.last_lost, l.first_answered, l.lost_beyond, l.attempts_within, l.lost_within
        ));
    }
    if let Some(u) = e.learned.upper {
        let agrees = if u.bracket().contains(e.assumed.end) {
            format!("; {} lies in it", e.assumed.end)
        } else {
            format!("; {} does not lie in it", e.assumed.end)
        };
        out.push(format!(
            "learned upper edge: SYN-ACKs come back up to a port between {} (the highest \
             answered port) and {} (the lowest lost port above it){agrees}; {} connections \
             above it were all lost, {} below it ({} lost)",
            u.last_answered, u.first_lost, u.lost_beyond, u.attempts_within, u.lost_within
        ));
    }
}

pub fn decide(
    h: &Histogram,
    dests: &Destinations,
    node: &NodePorts,
    nat: Option<&NatReport>,
) -> Verdict {
    let (inn, out) = (h.inside, h.outside);
    let assumed = h.allowed;
    let e = evidence::weigh(dests, assumed);
    let allowed = e.range;
    let local = node.local_range();
    let snat_suspected = match (h.port_span, local) {
        (Some((lo, hi)), Some(l)) => !l.contains(lo) || !l.contains(hi),
        _ => false,
    } || nat.is_some_and(|n| n.mode == NatMode::RandomFully);
    let c = e.compared;
    let comparison = Comparison {
        attempts_inside: c.n_in,
        lost_inside: c.lost_in,
        attempts_outside: c.n_out,
        lost_outside: c.lost_out,
        p_value: e.test.p_value,
        method: e.test.method,
        destinations: e.test.strata,
    };
    let mut details = Vec::new();
    let stated = if e.contradicted { "assumed" } else { "allowed" };
    details.push(format!(
        "inside the {stated} range {assumed}: {} attempts, {} lost ({:.1}%)",
        inn.attempts,
        inn.lost,
        pct(inn.lost, inn.attempts)
    ));
    details.push(format!(
        "outside it: {} attempts, {} lost ({:.1}%)",
        out.attempts,
        out.lost,
        pct(out.lost, out.attempts)
    ));
    if e.contradicted {
        details.push(format!(
            "the evidence contradicts the assumed range {assumed} (--allowed-ports): {}; \
             SYN-ACKs come back to {allowed}, and the verdict and the fix use that",
            e.contradictions.join("; ")
        ));
    }
    edge_details(&e, &mut details);
    if allowed != assumed {
        details.push(format!(
            "inside {allowed}: {} attempts, {} lost ({:.1}%); outside it: {} attempts, {} lost \
             ({:.1}%) (destinations that answer)",
            c.n_in,
            c.lost_in,
            pct(c.lost_in, c.n_in),
            c.n_out,
            c.lost_out,
            pct(c.lost_out, c.n_out)
        ));
    }
    for d in &e.dead {
        details.push(format!(
            "destination {} never answered: {} attempts, {} lost from ports inside {allowed} \
             and {} from ports outside it",
            d.label(),
            d.attempts,
            d.lost_inside,
            d.lost_outside
        ));
    }
    if !e.dead.is_empty() && e.learned.answered_span.is_none() {
        details.push(
            "no connection was answered at all, so where the firewall's range lies cannot be \
             checked: a firewall that drops SYN-ACKs to every port used would look the same"
                .to_string(),
        );
    }
    for d in e.lossy.iter().take(5) {
        details.push(format!(
            "destination {} lost {} connections from ports inside {allowed} too ({} of its {} \
             attempts answered): a lossy path or an overloaded server",
            d.label(),
            d.lost_inside,
            d.answered,
            d.attempts
        ));
    }
    if let Some(l) = local {
        let fits = if allowed.covers(&l) {
            "fits inside"
        } else {
            "does NOT fit inside"
        };
        details.push(format!(
            "the node's net.ipv4.ip_local_port_range {l} {fits} the allowed range{}",
            if e.contradicted {
                format!(" {allowed}")
            } else {
                String::new()
            }
        ));
    }
    if !node.ip_local_reserved_ports.is_empty() {
        details.push(format!(
            "net.ipv4.ip_local_reserved_ports: {}",
            node.ip_local_reserved_ports
        ));
    }
    if snat_suspected {
        if let (Some((lo, hi)), Some(l)) = (h.port_span, local) {
            details.push(format!(
                "source ports {lo}-{hi} spread beyond the node's own range {l}: the node is \
                 translating ports (SNAT/MASQUERADE, e.g. --random-fully)"
            ));
        }
    }
    if let Some(n) = nat.filter(|n| n.mode == NatMode::RandomFully) {
        if let Some(r) = n.range.filter(|r| !allowed.covers(r)) {
            let least = if n.range_sure { "" } else { "at least " };
            details.push(format!(
                "SNAT draws ports from {least}{r}, which reaches outside the allowed range \
                 {allowed}"
            ));
        }
    }
    if out.refused + inn.refused > 0 || out.unreachable + inn.unreachable > 0 {
        details.push(format!(
            "{} refused (RST) and {} unreachable (ICMP): the server or a firewall answered \
             those, they are not silent drops",
            inn.refused + out.refused,
            inn.unreachable + out.unreachable
        ));
    }
    let total = h.totals;
    let via = if snat_suspected {
        " chosen by the node's SNAT"
    } else {
        ""
    };
    let (kind, headline) = if total.attempts == 0 {
        (
            VerdictKind::NoTraffic,
            "no outbound TCP connection attempts were seen".to_string(),
        )
    } else if total.lost == 0 {
        (
            VerdictKind::NoRangeProblem,
            format!(
                "no range problem: none of {} connection attempts lost its SYN-ACK",
                total.attempts
            ),
        )
    } else if total.lost < MIN_LOST || total.attempts < MIN_ATTEMPTS {
        (
            VerdictKind::TooFew,
            format!(
                "not enough connections yet to tell: {} attempts, {} lost; watch longer",
                total.attempts, total.lost
            ),
        )
    } else if e.range_problem {
        let not_assumed = if e.contradicted {
            format!(", not {assumed} as assumed")
        } else {
            String::new()
        };
        let mut headline = format!(
            "range problem: {:.0}% of connections from source ports outside {allowed}{via} \
             lost their SYN-ACK, against {:.0}% inside; the firewall lets SYN-ACKs back only \
             to ports {allowed}{not_assumed}",
            pct(c.lost_out, c.n_out),
            pct(c.lost_in, c.n_in)
        );
        if !e.dead.is_empty() {
            headline.push_str(&format!(
                "; and a destination problem: {} never answered from any port",
                dead_list(&e.dead)
            ));
        }
        (VerdictKind::RangeProblem, headline)
    } else if !e.dead.is_empty() {
        let rest = if c.n_in + c.n_out > 0 {
            format!(
                "; other destinations: {} attempts, {} lost",
                c.n_in + c.n_out,
                c.lost_in + c.lost_out
            )
        } else {
            String::new()
        };
        let one = e.dead.len() == 1;
        let sides = if e.dead.iter().any(|d| d.lost_outside > 0) {
            format!("inside and outside {allowed}")
        } else {
            format!("inside {allowed}")
        };
        (
            VerdictKind::DestinationProblem,
            format!(
                "destination problem: {} never answered, from source ports {sides}: {} is \
                 down, blocked or overloaded; not a port-range problem{rest}",
                dead_list(&e.dead),
                if one { "the server" } else { "each server" }
            ),
        )
    } else if c.n_in == 0 && c.n_out > 0 {
        (
            VerdictKind::TooFew,
            format!(
                "not enough connections yet to tell: all {} compared attempts used source \
                 ports outside {allowed} and {} were lost; with none inside to compare, a \
                 destination that never answers would look the same; watch longer",
                c.n_out, c.lost_out
            ),
        )
    } else if c.n_out == 0 || c.lost_out == 0 {
        (
            VerdictKind::NoRangeProblem,
            format!(
                "no range problem: {} connections lost, but all used source ports inside \
                 {allowed}; look at the path or the server instead",
                total.lost
            ),
        )
    } else if c.n_in >= evidence::MIN_SIDE && c.lost_in >= MIN_LOST && c.n_out < evidence::MIN_SIDE
    {
        (
            VerdictKind::NoRangeProblem,
            format!(
                "no range problem: {} of {} connections from source ports inside {allowed} \
                 were lost as well; the loss has another cause",
                c.lost_in, c.n_in
            ),
        )
    } else if c.n_in >= evidence::MIN_SIDE && c.n_out >= evidence::MIN_SIDE {
        (
            VerdictKind::NoRangeProblem,
            format!(
                "no range problem: loss outside {allowed} ({:.0}%) is not clearly higher \
                 than inside ({:.0}%); the loss has another cause",
                pct(c.lost_out, c.n_out),
                pct(c.lost_in, c.n_in)
            ),
        )
    } else {
        (
            VerdictKind::TooFew,
            format!(
                "not enough connections yet to tell: inside {allowed} {} attempts ({} lost), \
                 outside {} ({} lost); watch longer",
                c.n_in, c.lost_in, c.n_out, c.lost_out
            ),
        )
    };
    Verdict {
        kind,
        headline,
        details,
        attempts_inside: inn.attempts,
        lost_inside: inn.lost,
        attempts_outside: out.attempts,
        lost_outside: out.lost,
        snat_suspected,
        assumed,
        allowed,
        contradicted: e.contradicted,
        learned: e.learned,
        dead_destinations: e.dead,
        lossy_destinations: e.lossy,
        comparison,
    }
}

/// What to change, when there is something to change: only for a range problem, and with
/// the range the evidence supports (`v.allowed`). A dead destination gets no SNAT fix.
pub fn fix(v: &Verdict, node: &NodePorts, nat: Option<&NatReport>) -> Vec<String> {
    if v.kind != VerdictKind::RangeProblem {
        return Vec::new();
    }
    advice::for_node(v.allowed, node, nat)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::destinations::Destination;
    use crate::track::tracker::OutcomeKind;
    use std::net::{IpAddr, Ipv4Addr};

    const ASSUMED: PortRange = PortRange::new(32768, 65535);

    fn node() -> NodePorts {
        NodePorts {
            ip_local_port_range: Some((32768, 60999)),
            ip_local_reserved_ports: String::new(),
            tcp_syn_retries: Some(6),
        }
    }

    fn dest(last: u8) -> Destination {
        Destination {
            addr: IpAddr::V4(Ipv4Addr::new(198, 18, 3, last)),
            port: 8080,
        }
    }

    /// Outcomes by (destination, port, kind), as the watch loop would record them.
    struct Run {
        h: Histogram,
        d: Destinations,
    }

    impl Run {
        fn new() -> Self {
            Self {
                h: Histogram::new(ASSUMED, &[1024, 32768]),
                d: Destinations::default(),
            }
        }
        fn add(&mut self, d: u8, port: u16, kind: OutcomeKind) -> &mut Self {
            self.h.add(port, kind);
            self.d.add(dest(d), port, kind);
            self
        }
        /// `n` connections to `d` over `lo..=hi`, lost where `lost(port)`.
        fn spread(
            &mut self,
            d: u8,
            n: u32,
            lo: u16,
            hi: u16,
            lost: impl Fn(u16) -> bool,
        ) -> &mut Self {
            let span = u32::from(hi - lo) + 1;
            for i in 0..n {
                let p = lo + ((i * 7919 + i / 3) % span) as u16;
                let k = if lost(p) {
                    OutcomeKind::Lost
                } else {
                    OutcomeKind::Answered
                };
                self.add(d, p, k);
            }
            self
        }
        fn verdict(&self) -> Verdict {
            decide(&self.h, &self.d, &node(), None)
        }
    }

    #[test]
    fn seed_case_is_a_range_problem_with_snat() {
        let mut r = Run::new();
        for i in 0..100u16 {
            r.add(2, 1024 + i * 300, OutcomeKind::Lost);
            r.add(2, 32768 + i * 300, OutcomeKind::Answered);
        }
        let v = r.verdict();
        assert_eq!(v.kind, VerdictKind::RangeProblem);
        assert!(v.snat_suspected);
        assert!(!v.contradicted);
        assert_eq!(v.allowed, ASSUMED);
        assert!(
            v.headline.starts_with(
                "range problem: 100% of connections from source ports outside 32768-65535 chosen \
             by the node's SNAT lost their SYN-ACK, against 0% inside; the firewall lets \
             SYN-ACKs back only to ports 32768-65535"
            ),
            "{}",
            v.headline
        );
        assert!(v.details.iter().any(|d| d.contains("SNAT")));
        assert!(v
            .details
            .iter()
            .any(|d| d.contains("between 30724 (the highest lost port below it) and 32768")));
        let f = fix(&v, &node(), None);
        assert!(f[0].contains("--to-ports 32768-65535"));
    }

    #[test]
    fn no_loss_is_no_range_problem() {
        let mut r = Run::new();
        r.spread(2, 50, 1024, 65535, |_| false);
        let v = r.verdict();
        assert_eq!(v.kind, VerdictKind::NoRangeProblem);
        assert!(fix(&v, &node(), None).is_empty());
    }

    #[test]
    fn uniform_loss_is_not_blamed_on_ports() {
        let mut r = Run::new();
        for i in 0..200u16 {
            let k = if i % 4 == 0 {
                OutcomeKind::Lost
            } else {
                OutcomeKind::Answered
            };
            r.add(2, 1024 + i * 320, k);
        }
        let v = r.verdict();
        assert_eq!(v.kind, VerdictKind::NoRangeProblem, "{}", v.headline);
        // Answers came back from ports far below 32768: the assumption is contradicted, and
        // inside the range that evidence supports, the loss is the same.
        assert!(v.contradicted, "{:?}", v.details);
        assert!(fix(&v, &node(), None).is_empty());
    }

    #[test]
    fn few_connections_say_so() {
        let mut r = Run::new();
        r.add(2, 2000, OutcomeKind::Lost)
            .add(2, 40000, OutcomeKind::Answered);
        let v = r.verdict();
        assert_eq!(v.kind, VerdictKind::TooFew);
        assert!(v
            .headline
            .starts_with("not enough connections yet to tell: 2 attempts, 1 lost"));
        assert_eq!(Run::new().verdict().kind, VerdictKind::NoTraffic);
    }

    /// The minimum: under 10 attempts nothing is concluded; 5 lost outside against 5 answered
    /// inside is still too few for the exact test (p = 1/252); 7 against 7 is enough
    /// (p = 1/3432).
    #[test]
    fn minimum_sample_boundary() {
        let run = |n: u16| {
            let mut r = Run::new();
            for i in 0..n {
                r.add(2, 2000 + i * 1000, OutcomeKind::Lost);
                r.add(2, 40000 + i * 1000, OutcomeKind::Answered);
            }
            r
        };
        let mut nine = run(4);
        nine.add(2, 9000, OutcomeKind::Lost);
        assert_eq!(nine.h.totals.attempts, 9);
        assert_eq!(nine.verdict().kind, VerdictKind::TooFew);
        let v = run(5).verdict();
        assert_eq!(v.kind, VerdictKind::TooFew, "{}", v.headline);
        assert!((v.comparison.p_value - 1.0 / 252.0).abs() < 1e-9);
        assert_eq!(
            v.headline,
            "not enough connections yet to tell: inside 32768-65535 5 attempts (0 lost), \
             outside 5 (5 lost); watch longer"
        );
        let v = run(7).verdict();
        assert_eq!(v.kind, VerdictKind::RangeProblem, "{}", v.headline);
        assert_eq!(v.comparison.method, Method::Exact);
        // Two lost of a hundred: below the minimum of lost connections.
        let mut r = Run::new();
        r.spread(2, 98, 32768, 65535, |_| false);
        r.add(2, 1500, OutcomeKind::Lost)
            .add(2, 2500, OutcomeKind::Lost);
        assert_eq!(r.verdict().kind, VerdictKind::TooFew);
    }

    /// A dead destination lost from every port while the node's own connections (inside the
    /// range) to another server succeed: a destination problem, never a SNAT fix.
    #[test]
    fn dead_destination_with_healthy_node_traffic() {
        let mut r = Run::new();
        r.spread(2, 100, 32768, 60999, |_| false);
        r.spread(9, 150, 1024, 65535, |_| true);
        let v = r.verdict();
        assert_eq!(v.kind, VerdictKind::DestinationProblem, "{}", v.headline);
        assert!(
            v.headline
                .contains("198.18.3.9:8080 (150 attempts) never answered"),
            "{}",
            v.headline
        );
        assert!(
            v.headline.contains("inside and outside 32768-65535"),
            "{}",
            v.headline
        );
        assert!(fix(&v, &node(), None).is_empty());
        assert_eq!(v.dead_destinations.len(), 1);
        // Pooled, outside looks far worse than inside: the old verdict blamed the range.
        assert!(v.lost_outside == v.attempts_outside && v.lost_inside < v.attempts_inside);
    }

    /// Only a destination that never answered, from every port: a destination problem,
    /// and the report says the range could not be checked.
    #[test]
    fn nothing_answered_at_all() {
        let mut r = Run::new();
        r.spread(9, 40, 1024, 65535, |_| true);
        let v = r.verdict();
        assert_eq!(v.kind, VerdictKind::DestinationProblem, "{}", v.headline);
        assert!(v
            .details
            .iter()
            .any(|d| d.contains("no connection was answered at all")));
        assert!(fix(&v, &node(), None).is_empty());
    }

    /// Mixed: a range problem towards one server and a dead one: both are reported, and the
    /// fix is for the range.
    #[test]
    fn mixed_destinations_report_both() {
        let mut r = Run::new();
        r.spread(2, 200, 1024, 65535, |p| p < 32768);
        r.spread(9, 60, 1024, 65535, |_| true);
        let v = r.verdict();
        assert_eq!(v.kind, VerdictKind::RangeProblem, "{}", v.headline);
        assert!(
            v.headline
                .contains("and a destination problem: 198.18.3.9:8080 (60 attempts)"),
            "{}",
            v.headline
        );
        assert!(v.headline.contains("against 0% inside"), "{}", v.headline);
        assert!(fix(&v, &node(), None)[0].contains("--to-ports 32768-65535"));
    }

    /// No attempt inside the range: a dead destination would look the same, so no range
    /// verdict from it alone; with another destination that shows the difference, the range
    /// problem stands.
    #[test]
    fn zero_inside_attempts() {
        let mut r = Run::new();
        r.spread(2, 50, 1024, 32767, |_| true);
        let v = r.verdict();
        assert_eq!(v.kind, VerdictKind::TooFew, "{}", v.headline);
        assert!(
            v.headline.contains("with none inside to compare"),
            "{}",
            v.headline
        );
        assert!(fix(&v, &node(), None).is_empty());
        r.spread(3, 100, 1024, 65535, |p| p < 32768);
        let v = r.verdict();
        assert_eq!(v.kind, VerdictKind::RangeProblem, "{}", v.headline);
    }

    /// The firewall's edge is 40000, not the assumed 32768: a sixth of the attempts inside the
    /// assumed range are lost. The verdict says the assumption is wrong and the fix uses the
    /// learned edge.
    #[test]
    fn partial_loss_inside_the_assumed_range() {
        let mut r = Run::new();
        r.spread(2, 400, 1024, 65535, |p| p < 40000);
        let v = r.verdict();
        assert!(v.lost_inside > 0 && v.lost_inside < v.attempts_inside);
        assert_eq!(v.kind, VerdictKind::RangeProblem, "{}", v.headline);
        assert!(v.contradicted);
        assert_eq!(v.allowed, PortRange::new(40000, 65535));
        assert!(
            v.headline
                .ends_with("only to ports 40000-65535, not 32768-65535 as assumed"),
            "{}",
            v.headline
        );
        assert!(v.headline.contains("against 0% inside"), "{}", v.headline);
        let lower = v.learned.lower.unwrap_or_else(|| panic!("{:?}", v.learned));
        assert!(lower.last_lost < 40000 && lower.first_answered >= 40000);
        assert!(v
            .details
            .iter()
            .any(|d| d.contains("contradicts the assumed range 32768-65535")));
        let f = fix(&v, &node(), None);
        assert!(f[0].contains("--to-ports 40000-65535"), "{f:?}");
        assert!(
            f.iter()
                .any(|l| l.contains("ip_local_port_range=\"40000 60999\"")),
            "{f:?}"
        );
    }

    /// Answers below the assumed start and an upper edge at 50000.
    #[test]
    fn upper_edge_and_answers_below_the_assumption() {
        let mut r = Run::new();
        r.spread(2, 400, 20000, 65535, |p| !(20000..=50000).contains(&p));
        let v = r.verdict();
        assert_eq!(v.kind, VerdictKind::RangeProblem, "{}", v.headline);
        assert!(v.contradicted);
        let upper = v.learned.upper.unwrap_or_else(|| panic!("{:?}", v.learned));
        assert!(upper.last_answered <= 50000 && upper.first_lost > 50000);
        assert_eq!(v.allowed.end, 49999);
        assert!(
            v.allowed.start >= 20000 && v.allowed.start < 20500,
            "{}",
            v.allowed
        );
    }
}
