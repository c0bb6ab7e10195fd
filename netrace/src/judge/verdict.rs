//! The verdict (is the loss explained by the source-port range?) and the fix. Pure functions
//! over the histogram and the node's settings.

use serde::Serialize;

use super::advice;
use crate::{
    node::NodePorts,
    ports::PortRange,
    track::natmode::{NatMode, NatReport},
    track::stats::Histogram,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictKind {
    RangeProblem,
    NoRangeProblem,
    TooFew,
    NoTraffic,
    /// SYNs were seen before a translation (or not at all): ports not judged.
    TranslationOutOfSight,
}

#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub kind: VerdictKind,
    pub headline: String,
    pub details: Vec<String>,
    pub attempts_inside: u64,
    pub lost_inside: u64,
    pub attempts_outside: u64,
    pub lost_outside: u64,
    /// Source ports spread beyond the node's own local port range: someone translates ports.
    pub snat_suspected: bool,
}

/// Fewer lost connections than this cannot support a conclusion.
const MIN_LOST: u64 = 3;
/// Fewer attempts than this cannot support a conclusion.
const MIN_ATTEMPTS: u64 = 10;

/// How many standard errors apart the two loss rates must be (two-proportion z-test).
const Z_REQUIRED: f64 = 3.0;

fn z_score(lost_a: u64, n_a: u64, lost_b: u64, n_b: u64) -> f64 {
    if n_a == 0 || n_b == 0 {
        return 0.0;
    }
    let (pa, pb) = (lost_a as f64 / n_a as f64, lost_b as f64 / n_b as f64);
    let p = (lost_a + lost_b) as f64 / (n_a + n_b) as f64;
    let se = (p * (1.0 - p) * (1.0 / n_a as f64 + 1.0 / n_b as f64)).sqrt();
    if se == 0.0 {
        return if pa > pb { f64::INFINITY } else { 0.0 };
    }
    (pa - pb) / se
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// Judges the histogram: is the loss explained by the source-port range?
pub fn decide(h: &Histogram, node: &NodePorts, nat: Option<&NatReport>) -> Verdict {
    let (inn, out) = (h.inside, h.outside);
    let snat_suspected = match (h.port_span, node.local_range()) {
        (Some((lo, hi)), Some(l)) => !l.contains(lo) || !l.contains(hi),
        _ => false,
    } || nat.is_some_and(|n| n.mode == NatMode::RandomFully);
    let details = details(h, node, nat, snat_suspected);
    let (kind, headline) = conclusion(h, snat_suspected);
    Verdict {
        kind,
        headline,
        details,
        attempts_inside: inn.attempts,
        lost_inside: inn.lost,
        attempts_outside: out.attempts,
        lost_outside: out.lost,
        snat_suspected,
    }
}

/// The evidence, line by line.
fn details(
    h: &Histogram,
    node: &NodePorts,
    nat: Option<&NatReport>,
    snat_suspected: bool,
) -> Vec<String> {
    let (inn, out) = (h.inside, h.outside);
    let allowed = h.allowed;
    let local = node.local_range();
    let mut details = Vec::new();
    details.push(format!(
        "inside the allowed range {allowed}: {} attempts, {} lost ({:.1}%)",
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
    if let Some(l) = local {
        let fits = if allowed.covers(&l) {
            "fits inside"
        } else {
            "does NOT fit inside"
        };
        details.push(format!(
            "the node's net.ipv4.ip_local_port_range {l} {fits} the allowed range"
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
            details.push(format!(
                "SNAT draws ports from {r}, which reaches outside the allowed range {allowed}"
            ));
        }
    }
    if let (Some(lost), Some(ans)) = (h.highest_lost_outside_below, h.lowest_answered) {
        if lost < ans {
            details.push(format!(
                "observed edge: the highest lost port below the range is {lost}, the lowest \
                 answered port is {ans}"
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
    details
}

/// The kind of verdict and its headline.
fn conclusion(h: &Histogram, snat_suspected: bool) -> (VerdictKind, String) {
    let (inn, out) = (h.inside, h.outside);
    let allowed = h.allowed;
    let total = h.totals;
    if total.attempts == 0 {
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
                "too few connections to tell: {} attempts, {} lost; watch longer",
                total.attempts, total.lost
            ),
        )
    } else if out.lost == 0 || out.attempts == 0 {
        (
            VerdictKind::NoRangeProblem,
            format!(
                "no range problem: {} connections lost, but all used source ports inside \
                 {allowed}; look at the path or the server instead",
                total.lost
            ),
        )
    } else {
        let z = z_score(out.lost, out.attempts, inn.lost, inn.attempts);
        let strong_without_inside = inn.attempts == 0 && pct(out.lost, out.attempts) >= 90.0;
        if z >= Z_REQUIRED || strong_without_inside {
            let via = if snat_suspected {
                " chosen by the node's SNAT"
            } else {
                ""
            };
            (
                VerdictKind::RangeProblem,
                format!(
                    "range problem: {:.0}% of connections from source ports outside \
                     {allowed}{via} lost their SYN-ACK, against {:.0}% inside; the firewall \
                     lets SYN-ACKs back only to ports {allowed}",
                    pct(out.lost, out.attempts),
                    pct(inn.lost, inn.attempts)
                ),
            )
        } else {
            (
                VerdictKind::NoRangeProblem,
                format!(
                    "no range problem: loss outside {allowed} ({:.0}%) is not clearly higher \
                     than inside ({:.0}%); the loss has another cause",
                    pct(out.lost, out.attempts),
                    pct(inn.lost, inn.attempts)
                ),
            )
        }
    }
}

/// What to change, when there is something to change (the lines come from `advice`).
pub fn fix(
    v: &Verdict,
    allowed: PortRange,
    node: &NodePorts,
    nat: Option<&NatReport>,
) -> Vec<String> {
    if v.kind != VerdictKind::RangeProblem {
        return Vec::new();
    }
    advice::for_node(allowed, node, nat)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::tracker::OutcomeKind;

    fn node() -> NodePorts {
        NodePorts {
            ip_local_port_range: Some((32768, 60999)),
            ip_local_reserved_ports: String::new(),
        }
    }

    fn hist(pairs: &[(u16, OutcomeKind)]) -> Histogram {
        let mut h = Histogram::new(PortRange::new(32768, 65535), &[1024, 32768]);
        for (p, k) in pairs {
            h.add(*p, *k);
        }
        h
    }

    #[test]
    fn seed_case_is_a_range_problem_with_snat() {
        let mut pairs = Vec::new();
        for i in 0..100u16 {
            pairs.push((1024 + i * 300, OutcomeKind::Lost));
            pairs.push((32768 + i * 300, OutcomeKind::Answered));
        }
        let h = hist(&pairs);
        let v = decide(&h, &node(), None);
        assert_eq!(v.kind, VerdictKind::RangeProblem);
        assert!(v.snat_suspected);
        assert!(v.headline.contains("32768-65535"));
        assert!(v.details.iter().any(|d| d.contains("SNAT")));
        let f = fix(&v, h.allowed, &node(), None);
        assert!(f[0].contains("--to-ports 32768-65535"));
    }

    #[test]
    fn no_loss_is_no_range_problem() {
        let pairs: Vec<_> = (0..50u16)
            .map(|i| (1024 + i * 1000, OutcomeKind::Answered))
            .collect();
        let v = decide(&hist(&pairs), &node(), None);
        assert_eq!(v.kind, VerdictKind::NoRangeProblem);
        assert!(fix(&v, PortRange::new(32768, 65535), &node(), None).is_empty());
    }

    #[test]
    fn uniform_loss_is_not_blamed_on_ports() {
        let mut pairs = Vec::new();
        for i in 0..200u16 {
            let k = if i % 4 == 0 {
                OutcomeKind::Lost
            } else {
                OutcomeKind::Answered
            };
            pairs.push((1024 + i * 320, k));
        }
        let v = decide(&hist(&pairs), &node(), None);
        assert_eq!(v.kind, VerdictKind::NoRangeProblem, "{}", v.headline);
    }

    #[test]
    fn few_connections_say_so() {
        let v = decide(
            &hist(&[(2000, OutcomeKind::Lost), (40000, OutcomeKind::Answered)]),
            &node(),
            None,
        );
        assert_eq!(v.kind, VerdictKind::TooFew);
        let v = decide(&hist(&[]), &node(), None);
        assert_eq!(v.kind, VerdictKind::NoTraffic);
    }
}
