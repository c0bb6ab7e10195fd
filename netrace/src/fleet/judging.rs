//! From the fleet's series to a verdict per node and groups of nodes that share one, with the
//! same thresholds as a node's own verdict (`judge::verdict::decide`): at least 10 attempts and 3 lost
//! to judge, and loss outside the allowed range at least three standard errors above loss
//! inside it (or 90% with nothing inside) for a range problem.

use std::collections::BTreeMap;

use serde::Serialize;

use super::query::Sample;
use crate::ports::PortRange;

/// Fewer lost connections than this cannot support a conclusion (as `judge::verdict::decide`).
const MIN_LOST: f64 = 3.0;
/// Fewer attempts than this cannot support a conclusion (as `judge::verdict::decide`).
const MIN_ATTEMPTS: f64 = 10.0;
/// Standard errors between the two loss rates (two-proportion z-test, as `judge::verdict::decide`).
const Z_REQUIRED: f64 = 3.0;
/// A bucket outside the allowed range losing at least this share is named as losing.
const LOSSY_BUCKET: f64 = 0.5;

/// The fleet's judgement of one node over the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Judgement {
    /// SYN-ACKs to source ports outside the allowed range are lost, inside they are not.
    RangeProblem,
    /// Connections are lost regardless of the source port: the path or the destination.
    DestinationProblem,
    /// Some loss, too few connections to tell.
    NotEnoughEvidence,
    /// Connections, none lost.
    NoProblem,
    /// No connection attempts in the window.
    NoTraffic,
}

impl Judgement {
    pub fn words(self) -> &'static str {
        match self {
            Self::RangeProblem => "range problem",
            Self::DestinationProblem => "destination problem",
            Self::NotEnoughEvidence => "not enough evidence",
            Self::NoProblem => "no problem",
            Self::NoTraffic => "no traffic",
        }
    }

    /// Whether this calls for a fix (the exit status is 1 then).
    pub fn is_problem(self) -> bool {
        matches!(self, Self::RangeProblem | Self::DestinationProblem)
    }
}

/// Attempts and losses (counter increases over the window, so not always whole numbers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Counts {
    pub attempts: f64,
    pub lost: f64,
}

impl Counts {
    pub fn loss(&self) -> Option<f64> {
        (self.attempts > 0.0).then(|| self.lost / self.attempts)
    }
}

/// A learned edge of the allowed range, with its bracket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Edge {
    pub estimate: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// One node, as the fleet's series show it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeView {
    /// The `node` target label, else `instance`.
    pub node: String,
    /// The `node_pool` target label, when set.
    pub pool: String,
    pub inside: Counts,
    pub outside: Counts,
    /// By source-port bucket label (e.g. "1024-8191"), with whether it is outside the range.
    pub buckets: BTreeMap<String, (Counts, bool)>,
    pub lower_edge: Edge,
    pub upper_edge: Edge,
    /// The node's own verdict (`netrace_verdict`), over its whole run.
    pub own_verdict: Option<String>,
    /// The NAT mode the node saw (`netrace_nat_mode`).
    pub nat_mode: Option<String>,
    /// Destinations losing the most, as "ADDR:PORT" with their lost count.
    pub lossy_destinations: Vec<(String, f64)>,
    pub judgement: Option<Judgement>,
    /// Outside buckets losing at least half their attempts, merged into ranges.
    pub lossy_ports: Vec<PortRange>,
}

impl NodeView {
    pub fn total(&self) -> Counts {
        Counts {
            attempts: self.inside.attempts + self.outside.attempts,
            lost: self.inside.lost + self.outside.lost,
        }
    }
}

/// The key a series belongs to: its `node` label, else its `instance`.
pub fn node_key(s: &Sample) -> String {
    match s.label("node") {
        "" => s.label("instance").to_string(),
        n => n.to_string(),
    }
}

fn z_score(lost_a: f64, n_a: f64, lost_b: f64, n_b: f64) -> f64 {
    if n_a <= 0.0 || n_b <= 0.0 {
        return 0.0;
    }
    let (pa, pb) = (lost_a / n_a, lost_b / n_b);
    let p = (lost_a + lost_b) / (n_a + n_b);
    let se = (p * (1.0 - p) * (1.0 / n_a + 1.0 / n_b)).sqrt();
    if se == 0.0 {
        return if pa > pb { f64::INFINITY } else { 0.0 };
    }
    (pa - pb) / se
}

/// The fleet's judgement of one node's counts.
pub fn judge(inside: Counts, outside: Counts) -> Judgement {
    // Increases are extrapolated: 2.97 lost connections are 3.
    let r = |x: f64| x.round();
    let (ia, il, oa, ol) = (
        r(inside.attempts),
        r(inside.lost),
        r(outside.attempts),
        r(outside.lost),
    );
    let (attempts, lost) = (ia + oa, il + ol);
    if attempts < 1.0 {
        Judgement::NoTraffic
    } else if lost < 1.0 {
        Judgement::NoProblem
    } else if lost < MIN_LOST || attempts < MIN_ATTEMPTS {
        Judgement::NotEnoughEvidence
    } else if ol < 1.0 || oa < 1.0 {
        Judgement::DestinationProblem
    } else if z_score(ol, oa, il, ia) >= Z_REQUIRED || (ia < 1.0 && ol / oa >= 0.9) {
        Judgement::RangeProblem
    } else {
        Judgement::DestinationProblem
    }
}

fn parse_bucket(label: &str) -> Option<PortRange> {
    label.parse().ok()
}

/// Outside buckets losing at least half their attempts, adjacent ones merged.
fn lossy_ports(buckets: &BTreeMap<String, (Counts, bool)>) -> Vec<PortRange> {
    let mut ranges: Vec<PortRange> = buckets
        .iter()
        .filter(|(_, (c, outside))| *outside && c.loss().is_some_and(|l| l >= LOSSY_BUCKET))
        .filter_map(|(label, _)| parse_bucket(label))
        .collect();
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<PortRange> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(last) if u32::from(last.end) + 1 >= u32::from(r.start) => {
                last.end = last.end.max(r.end);
            }
            _ => merged.push(r),
        }
    }
    merged
}

/// The raw answers of the fleet's queries.
#[derive(Debug, Default)]
pub struct Answers {
    /// `sum by (node, instance, node_pool, range, port_bucket)` of attempts over the window.
    pub attempts: Vec<Sample>,
    /// The same for lost connections.
    pub lost: Vec<Sample>,
    /// `netrace_allowed_range_edge`.
    pub edges: Vec<Sample>,
    /// `netrace_verdict == 1`.
    pub verdicts: Vec<Sample>,
    /// `netrace_nat_mode == 1`.
    pub nat_modes: Vec<Sample>,
    /// Lost connections by destination, per node.
    pub destinations: Vec<Sample>,
    /// One sample per node running netrace (`netrace_syns_total`).
    pub nodes: Vec<Sample>,
}

/// The node a sample belongs to, created on first sight.
fn view<'a>(by: &'a mut BTreeMap<String, NodeView>, s: &Sample) -> &'a mut NodeView {
    let key = node_key(s);
    let v = by.entry(key.clone()).or_insert_with(|| NodeView {
        node: key,
        ..NodeView::default()
    });
    if v.pool.is_empty() {
        v.pool = s.label("node_pool").to_string();
    }
    v
}

fn add_counts(by: &mut BTreeMap<String, NodeView>, s: &Sample, lost: bool) {
    let value = if s.value.is_finite() { s.value } else { 0.0 };
    let v = view(by, s);
    let outside = s.label("range") == "outside";
    let side = if outside {
        &mut v.outside
    } else {
        &mut v.inside
    };
    let bucket = &mut v
        .buckets
        .entry(s.label("port_bucket").to_string())
        .or_insert((Counts::default(), outside))
        .0;
    if lost {
        side.lost += value;
        bucket.lost += value;
    } else {
        side.attempts += value;
        bucket.attempts += value;
    }
}

/// Every node, judged, sorted by judgement (problems first) then name.
pub fn nodes(a: &Answers) -> Vec<NodeView> {
    let mut by: BTreeMap<String, NodeView> = BTreeMap::new();
    for s in &a.nodes {
        view(&mut by, s);
    }
    for s in &a.attempts {
        add_counts(&mut by, s, false);
    }
    for s in &a.lost {
        add_counts(&mut by, s, true);
    }
    for s in &a.edges {
        let v = view(&mut by, s);
        let edge = match s.label("edge") {
            "lower" => &mut v.lower_edge,
            "upper" => &mut v.upper_edge,
            _ => continue,
        };
        let slot = match s.label("bound") {
            "estimate" => &mut edge.estimate,
            "min" => &mut edge.min,
            "max" => &mut edge.max,
            _ => continue,
        };
        *slot = Some(s.value);
    }
    for s in &a.verdicts {
        view(&mut by, s).own_verdict = Some(s.label("verdict").to_string());
    }
    for s in &a.nat_modes {
        view(&mut by, s).nat_mode = Some(s.label("mode").to_string());
    }
    for s in &a.destinations {
        let d = s.label("destination").to_string();
        view(&mut by, s).lossy_destinations.push((d, s.value));
    }
    let mut out: Vec<NodeView> = by
        .into_values()
        .map(|mut v| {
            v.judgement = Some(judge(v.inside, v.outside));
            v.lossy_ports = lossy_ports(&v.buckets);
            v.lossy_destinations
                .sort_by(|x, y| y.1.total_cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
            v.lossy_destinations.truncate(3);
            v
        })
        .collect();
    out.sort_by(|x, y| {
        x.judgement
            .cmp(&y.judgement)
            .then_with(|| x.node.cmp(&y.node))
    });
    out
}

/// Nodes that share a judgement, the same losing port ranges and the same learned edge: one
/// fix for all of them.
#[derive(Clone, Debug, Serialize)]
pub struct Group {
    pub judgement: Judgement,
    pub lossy_ports: Vec<PortRange>,
    /// The learned lower edge's estimate, when the nodes learned one.
    pub lower_edge: Option<u16>,
    /// The bracket the edge lies in: the narrowest the group's nodes agree on (the highest
    /// `min`, the lowest `max`).
    pub lower_bracket: Option<(u16, u16)>,
    pub nodes: Vec<String>,
    pub pools: Vec<String>,
    /// Whether a node of the group saw SNAT keeping the pods' own ports.
    pub keeps_ports: bool,
}

fn port(v: f64) -> Option<u16> {
    (v.is_finite() && (1.0..=65535.0).contains(&v)).then(|| v.round() as u16)
}

/// Groups the judged nodes; problems first.
pub fn groups(nodes: &[NodeView]) -> Vec<Group> {
    let mut out: Vec<Group> = Vec::new();
    for n in nodes {
        let Some(j) = n.judgement else { continue };
        let edge = n.lower_edge.estimate.and_then(port);
        let found = out
            .iter_mut()
            .find(|g| g.judgement == j && g.lossy_ports == n.lossy_ports && g.lower_edge == edge);
        let g = match found {
            Some(g) => g,
            None => {
                out.push(Group {
                    judgement: j,
                    lossy_ports: n.lossy_ports.clone(),
                    lower_edge: edge,
                    lower_bracket: None,
                    nodes: Vec::new(),
                    pools: Vec::new(),
                    keeps_ports: false,
                });
                let last = out.len() - 1;
                &mut out[last]
            }
        };
        if let (Some(lo), Some(hi)) = (
            n.lower_edge.min.and_then(port),
            n.lower_edge.max.and_then(port),
        ) {
            g.lower_bracket = Some(match g.lower_bracket {
                Some((a, b)) => (a.max(lo), b.min(hi)),
                None => (lo, hi),
            });
        }
        g.nodes.push(n.node.clone());
        if !n.pool.is_empty() && !g.pools.contains(&n.pool) {
            g.pools.push(n.pool.clone());
        }
        g.keeps_ports |= n.nat_mode.as_deref() == Some("keeps-ports");
    }
    out.sort_by_key(|g| g.judgement);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(attempts: f64, lost: f64) -> Counts {
        Counts { attempts, lost }
    }

    #[test]
    fn judgements_follow_the_node_verdicts_thresholds() {
        assert_eq!(judge(c(0.0, 0.0), c(0.0, 0.0)), Judgement::NoTraffic);
        assert_eq!(judge(c(50.0, 0.0), c(50.0, 0.0)), Judgement::NoProblem);
        assert_eq!(
            judge(c(1.0, 0.0), c(1.0, 1.0)),
            Judgement::NotEnoughEvidence
        );
        assert_eq!(
            judge(c(100.0, 0.0), c(2.0, 2.0)),
            Judgement::NotEnoughEvidence
        );
        assert_eq!(
            judge(c(100.0, 0.0), c(100.0, 98.6)),
            Judgement::RangeProblem
        );
        assert_eq!(judge(c(0.0, 0.0), c(40.0, 40.0)), Judgement::RangeProblem);
        assert_eq!(
            judge(c(100.0, 20.0), c(100.0, 21.0)),
            Judgement::DestinationProblem
        );
        assert_eq!(
            judge(c(100.0, 20.0), c(0.0, 0.0)),
            Judgement::DestinationProblem
        );
    }

    fn sample(labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }

    #[test]
    fn nodes_and_groups() {
        let mut a = Answers::default();
        for (node, lost_low) in [("bad-1", 30.0_f64), ("bad-2", 25.0), ("good", 0.0)] {
            for (bucket, range, attempts, lost) in [
                ("1024-8191", "outside", 10.0, lost_low / 3.0),
                ("8192-32767", "outside", 20.0, lost_low * 2.0 / 3.0),
                ("32768-65535", "inside", 30.0, 0.0),
            ] {
                let labels = [
                    ("node", node),
                    ("node_pool", "p1"),
                    ("range", range),
                    ("port_bucket", bucket),
                ];
                a.attempts.push(sample(&labels, attempts));
                a.lost.push(sample(&labels, lost.min(attempts)));
            }
        }
        a.edges.push(sample(
            &[("node", "bad-1"), ("edge", "lower"), ("bound", "estimate")],
            32768.0,
        ));
        a.edges.push(sample(
            &[("node", "bad-2"), ("edge", "lower"), ("bound", "estimate")],
            32768.0,
        ));
        a.nodes
            .push(sample(&[("instance", "198.51.100.9:9477")], 0.0));
        let n = nodes(&a);
        let names: Vec<&str> = n.iter().map(|v| v.node.as_str()).collect();
        assert_eq!(names, ["bad-1", "bad-2", "good", "198.51.100.9:9477"]);
        assert_eq!(n[0].judgement, Some(Judgement::RangeProblem));
        assert_eq!(n[0].lossy_ports, [PortRange::new(1024, 32767)]);
        assert_eq!(n[2].judgement, Some(Judgement::NoProblem));
        assert_eq!(n[3].judgement, Some(Judgement::NoTraffic));
        let g = groups(&n);
        assert_eq!(g.len(), 3);
        assert_eq!(g[0].nodes, ["bad-1", "bad-2"]);
        assert_eq!(g[0].lower_edge, Some(32768));
        assert_eq!(g[0].pools, ["p1"]);
    }
}
