//! `netrace fleet --prometheus URL`: the fleet's verdict on one screen, from the metrics every
//! node's `netrace watch --metrics-addr` exports and Prometheus collects. Which nodes lose
//! SYN-ACKs from which source-port ranges, each node's learned edge and own verdict, and the
//! fix per group of nodes that share a problem.
//!
//! `query` speaks Prometheus's HTTP API, `judging` turns the answers into nodes and groups,
//! `render` prints them.

pub mod judging;
pub mod query;
pub mod render;

use std::time::Duration;

use crate::{
    cli::FleetArgs,
    error::{exit, UsageError},
    options::OutputFormat,
};

/// A duration as PromQL spells it (whole seconds).
fn promql_duration(d: Duration) -> String {
    format!("{}s", d.as_secs().max(1))
}

/// The fleet's queries, with `selector` (extra matchers) and the window.
pub fn queries(selector: &str, window: Duration) -> [(&'static str, String); 7] {
    let sel = selector
        .trim()
        .trim_matches(|c| c == '{' || c == '}')
        .trim();
    let extra = if sel.is_empty() {
        String::new()
    } else {
        format!(",{sel}")
    };
    let only = if sel.is_empty() {
        String::new()
    } else {
        format!("{{{sel}}}")
    };
    let w = promql_duration(window);
    let by = "node, instance, node_pool";
    [
        (
            "attempts",
            format!(
                "sum by ({by}, range, port_bucket) (increase(netrace_connections_total{{outcome!=\"late\"{extra}}}[{w}]))"
            ),
        ),
        (
            "lost",
            format!(
                "sum by ({by}, range, port_bucket) (increase(netrace_connections_total{{outcome=~\"lost|abandoned\"{extra}}}[{w}]))"
            ),
        ),
        ("edges", format!("netrace_allowed_range_edge{only}")),
        ("verdicts", format!("netrace_verdict{only} == 1")),
        ("nat_modes", format!("netrace_nat_mode{only} == 1")),
        (
            "destinations",
            format!(
                "topk by (node, instance) (3, sum by ({by}, destination) (increase(netrace_destination_connections_total{{outcome=~\"lost|abandoned\"{extra}}}[{w}])) > 0)"
            ),
        ),
        ("nodes", format!("max by ({by}) (netrace_syns_total{only})")),
    ]
}

/// Asks Prometheus, judges, prints. Exit status 0: no node has a problem to fix; 1: some
/// node has one; 2 (an error): Prometheus unreachable, or it holds no netrace series.
pub fn run(args: &FleetArgs) -> anyhow::Result<u8> {
    let url = query::PrometheusUrl::parse(&args.prometheus)?;
    let client = query::Client::new(url, args.timeout);
    let mut answers = judging::Answers::default();
    for (name, promql) in queries(&args.selector, args.window) {
        let samples = client.query(&promql)?;
        let slot = match name {
            "attempts" => &mut answers.attempts,
            "lost" => &mut answers.lost,
            "edges" => &mut answers.edges,
            "verdicts" => &mut answers.verdicts,
            "nat_modes" => &mut answers.nat_modes,
            "destinations" => &mut answers.destinations,
            _ => &mut answers.nodes,
        };
        *slot = samples;
    }
    let nodes = judging::nodes(&answers);
    if nodes.is_empty() {
        return Err(UsageError(format!(
            "no netrace series in Prometheus at {}{}: is the DaemonSet running with \
             --metrics-addr, and does Prometheus scrape it (deploy/prometheus/podmonitor.yaml)?",
            client.url(),
            if args.selector.is_empty() {
                String::new()
            } else {
                format!(" matching {}", args.selector)
            }
        ))
        .into());
    }
    let groups = judging::groups(&nodes);
    let report = render::Report {
        prometheus: client.url().to_string(),
        window: args.window,
        allowed: args.allowed_ports,
        nodes: &nodes,
        groups: &groups,
    };
    let text = match args.output {
        OutputFormat::Text => render::text(&report),
        OutputFormat::Json => render::json(&report),
    };
    print!("{text}");
    Ok(if groups.iter().any(|g| g.judgement.is_problem()) {
        exit::LOSS
    } else {
        exit::CLEAN
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// netrace's metric names (the contract with the rules, the dashboard and this module).
    const CONTRACT: &str = include_str!("../../metrics.txt");

    #[test]
    fn queries_use_only_the_contracts_metrics() {
        let names: Vec<&str> = CONTRACT
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        for (what, q) in queries("", Duration::from_secs(60)) {
            let used: Vec<&str> = q
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("netrace_"))
                .collect();
            assert!(!used.is_empty(), "{what}: {q}");
            for name in used {
                assert!(
                    names.contains(&name),
                    "{what} queries {name}, not in metrics.txt"
                );
            }
        }
    }

    #[test]
    fn queries_carry_the_selector_and_window() {
        let q = queries("job=\"netrace\"", Duration::from_secs(600));
        assert!(
            q[0].1.contains("{outcome!=\"late\",job=\"netrace\"}[600s]"),
            "{}",
            q[0].1
        );
        assert_eq!(q[2].1, "netrace_allowed_range_edge{job=\"netrace\"}");
        let q = queries("", Duration::from_secs(3600));
        assert_eq!(q[3].1, "netrace_verdict == 1");
        assert!(q[1].1.contains("{outcome=~\"lost|abandoned\"}[3600s]"));
    }
}
