//! The fleet's screen (text) and its JSON.

use std::{fmt::Write as _, time::Duration};

use serde_json::json;

use super::judging::{Edge, Group, Judgement, NodeView};
use crate::{
    judge::advice,
    node::NodePorts,
    ports::PortRange,
    track::natmode::{NatMode, NatReport},
};

/// What `netrace fleet` found.
#[derive(Debug)]
pub struct Report<'a> {
    pub prometheus: String,
    pub window: Duration,
    /// `--allowed-ports`: the range for the fix where no edge was learned.
    pub allowed: PortRange,
    pub nodes: &'a [NodeView],
    pub groups: &'a [Group],
}

fn window_words(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |l| format!("{:.1}%", 100.0 * l))
}

fn edge_words(e: &Edge) -> String {
    match (e.estimate, e.min, e.max) {
        (Some(est), Some(lo), Some(hi)) => format!("{est:.0} ({lo:.0}-{hi:.0})"),
        (Some(est), _, _) => format!("{est:.0}"),
        _ => "-".to_string(),
    }
}

fn ranges_words(r: &[PortRange]) -> String {
    if r.is_empty() {
        "-".to_string()
    } else {
        r.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn own_words(v: &NodeView) -> String {
    v.own_verdict
        .as_deref()
        .map_or_else(|| "-".to_string(), |s| s.replace('_', " "))
}

/// The range to restrict SNAT to: `--allowed-ports` when the learned edge's bracket holds
/// its start (the evidence agrees with it), else from the learned estimate up; `--allowed-ports`
/// when nothing was learned.
fn fix_range(g: &Group, allowed: PortRange) -> PortRange {
    match (g.lower_bracket, g.lower_edge) {
        (Some((lo, hi)), _) if (lo..=hi).contains(&allowed.start) => allowed,
        (_, Some(e)) if e > 1 && e <= allowed.end => PortRange::new(e, allowed.end),
        _ => allowed,
    }
}

/// What to do for a group (empty when nothing is to be done).
pub fn fix(g: &Group, allowed: PortRange, nodes: &[NodeView]) -> Vec<String> {
    match g.judgement {
        Judgement::RangeProblem => {
            let range = fix_range(g, allowed);
            let nat = g.keeps_ports.then(|| NatReport {
                mode: NatMode::KeepsPorts,
                pairs: 0,
                range: None,
                range_sure: false,
                to_ports: false,
                summary: String::new(),
            });
            advice::for_node(range, &NodePorts::default(), nat.as_ref())
        }
        Judgement::DestinationProblem => {
            let mut out = vec![
                "the loss does not depend on the source port: look at the path and the \
                 destinations (a stateful firewall's or conntrack's limits, the servers' \
                 backlog, MTU), not at SNAT"
                    .to_string(),
            ];
            let mut dests: Vec<String> = nodes
                .iter()
                .filter(|n| g.nodes.contains(&n.node))
                .flat_map(|n| {
                    n.lossy_destinations
                        .iter()
                        .map(move |(d, c)| format!("{d} ({c:.0} lost on {})", n.node))
                })
                .collect();
            dests.truncate(5);
            if !dests.is_empty() {
                out.push(format!("destinations losing most: {}", dests.join(", ")));
            }
            out
        }
        Judgement::NotEnoughEvidence => vec![
            "too few connections to judge: widen --window, or run `netrace watch --duration \
             10m` on these nodes (or `netrace probe HOST:PORT` from them)"
                .to_string(),
        ],
        Judgement::NoProblem | Judgement::NoTraffic => Vec::new(),
    }
}

fn group_headline(g: &Group, allowed: PortRange) -> String {
    let n = g.nodes.len();
    let nodes = format!(
        "{} node{}{}",
        n,
        if n == 1 { "" } else { "s" },
        if g.pools.is_empty() {
            String::new()
        } else {
            format!(" (pool {})", g.pools.join(", "))
        }
    );
    let names = g.nodes.join(", ");
    match g.judgement {
        Judgement::RangeProblem => {
            let edge = match (g.lower_edge, g.lower_bracket) {
                (Some(e), Some((lo, hi))) => {
                    let fits = if (lo..=hi).contains(&allowed.start) {
                        format!("as --allowed-ports {allowed} says")
                    } else {
                        format!("not where --allowed-ports {allowed} puts it")
                    };
                    format!(
                        "they come back above a learned edge between {lo} and {hi} (estimate \
                         {e}), {fits}"
                    )
                }
                (Some(e), None) => format!("they come back from port {e} up (learned edge)"),
                _ => format!(
                    "the firewall lets them back only into {allowed} (--allowed-ports; no \
                     edge learned)"
                ),
            };
            format!(
                "range problem on {nodes}: {names}\n  SYN-ACKs to source ports {} are lost; {edge}",
                ranges_words(&g.lossy_ports)
            )
        }
        j => format!("{} on {nodes}: {names}", j.words()),
    }
}

/// The one screen.
pub fn text(r: &Report<'_>) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "netrace fleet: {} node{} in {}, last {}",
        r.nodes.len(),
        if r.nodes.len() == 1 { "" } else { "s" },
        r.prometheus,
        window_words(r.window)
    );
    let _ = writeln!(o);
    let w = r
        .nodes
        .iter()
        .map(|n| n.node.len())
        .chain([4])
        .max()
        .unwrap_or(4);
    let pw = r
        .nodes
        .iter()
        .map(|n| n.pool.len())
        .chain([4])
        .max()
        .unwrap_or(4);
    let _ = writeln!(
        o,
        "{:<w$}  {:<pw$}  {:>8}  {:>6}  {:>8}  {:>8}  {:<14}  {:<20}  {:<20}  node's own verdict",
        "node",
        "pool",
        "attempts",
        "lost",
        "outside",
        "inside",
        "losing ports",
        "learned edge",
        "verdict"
    );
    for n in r.nodes {
        let t = n.total();
        let _ = writeln!(
            o,
            "{:<w$}  {:<pw$}  {:>8.0}  {:>6.0}  {:>8}  {:>8}  {:<14}  {:<20}  {:<20}  {}",
            n.node,
            if n.pool.is_empty() { "-" } else { &n.pool },
            t.attempts,
            t.lost,
            pct(n.outside.loss()),
            pct(n.inside.loss()),
            ranges_words(&n.lossy_ports),
            edge_words(&n.lower_edge),
            n.judgement.map_or("-", Judgement::words),
            own_words(n),
        );
    }
    let _ = writeln!(
        o,
        "(outside/inside: loss outside/inside the allowed range; verdict: over the last {}; \
         the node's own: over its whole run)",
        window_words(r.window)
    );
    for g in r.groups {
        let _ = writeln!(o);
        let _ = writeln!(o, "{}", group_headline(g, r.allowed));
        let steps = fix(g, r.allowed, r.nodes);
        if !steps.is_empty() {
            let _ = writeln!(o, "  fix:");
            for (i, s) in steps.iter().enumerate() {
                let _ = writeln!(o, "    {}. {s}", i + 1);
            }
        }
    }
    o
}

/// One JSON object (and a newline).
pub fn json(r: &Report<'_>) -> String {
    let groups: Vec<_> = r
        .groups
        .iter()
        .map(|g| {
            json!({
                "judgement": g.judgement,
                "nodes": g.nodes,
                "pools": g.pools,
                "losing_ports": g.lossy_ports.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "lower_edge": g.lower_edge,
                "lower_edge_bracket": g.lower_bracket,
                "fix_range": fix_range(g, r.allowed).to_string(),
                "fix": fix(g, r.allowed, r.nodes),
            })
        })
        .collect();
    let nodes: Vec<_> = r
        .nodes
        .iter()
        .map(|n| {
            json!({
                "node": n.node,
                "pool": n.pool,
                "judgement": n.judgement,
                "own_verdict": n.own_verdict,
                "nat_mode": n.nat_mode,
                "inside": n.inside,
                "outside": n.outside,
                "losing_ports": n.lossy_ports.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "lower_edge": n.lower_edge,
                "upper_edge": n.upper_edge,
                "lossy_destinations": n.lossy_destinations,
            })
        })
        .collect();
    let v = json!({
        "type": "fleet",
        "prometheus": r.prometheus,
        "window_seconds": r.window.as_secs(),
        "nodes": nodes,
        "groups": groups,
    });
    format!("{v}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(edge: Option<u16>, bracket: Option<(u16, u16)>) -> Group {
        Group {
            judgement: Judgement::RangeProblem,
            lossy_ports: vec![PortRange::new(1024, 32767)],
            lower_edge: edge,
            lower_bracket: bracket,
            nodes: vec!["n".into()],
            pools: Vec::new(),
            keeps_ports: false,
        }
    }

    #[test]
    fn the_fix_follows_the_learned_edge_only_where_it_contradicts_the_configured_range() {
        let allowed = PortRange::new(32768, 65535);
        let agrees = group(Some(32853), Some((32738, 32853)));
        assert_eq!(fix_range(&agrees, allowed), allowed);
        let differs = group(Some(40000), Some((39950, 40000)));
        assert_eq!(fix_range(&differs, allowed), PortRange::new(40000, 65535));
        assert_eq!(fix_range(&group(None, None), allowed), allowed);
        let steps = fix(&differs, allowed, &[]);
        assert!(steps[0].contains("--to-ports 40000-65535"), "{steps:?}");
        let head = group_headline(&agrees, allowed);
        assert!(
            head.contains("between 32738 and 32853 (estimate 32853), as --allowed-ports"),
            "{head}"
        );
    }
}
