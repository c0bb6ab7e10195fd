//! End to end: the fleet view. Two lab nodes, one behind the seed's firewall (SYN-ACKs only
//! to ports 32768-65535) and one behind an open firewall, each running `netrace watch
//! --metrics-addr`; a real Prometheus server (Debian's) in a namespace of its own, linked to
//! both nodes, scrapes them and evaluates the shipped rules (deploy/prometheus/rules.yaml, hold
//! times cut to zero). The recording rules and the alerts evaluate on the live series: the
//! range alert fires for the seed node only, Prometheus's counts match the clients' own, and
//! `netrace fleet` names the seed node and its fix, and the open node as fine.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use netrace_lab::prometheus::{self, label, value, PromNet, PromServer, Target};
use netrace_lab::{
    is_root, netrace_bin, netrace_run::run_once, Family, Lab, LabOptions, NetraceOptions,
    NetraceRun, TcpCounts,
};

const METRICS_PORT: u16 = 19478;

fn repo_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Polls `promql` until `done(result)` holds, at most `secs` seconds; returns the last result.
fn wait_for(
    prom: &PromServer,
    promql: &str,
    secs: u64,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let r = prom.query(promql).expect("querying prometheus");
        if done(&r) || Instant::now() >= deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn by_node(result: &[serde_json::Value], node: &str) -> Vec<f64> {
    result
        .iter()
        .filter(|s| label(s, "node") == node)
        .map(value)
        .collect()
}

#[test]
fn prometheus_rules_alert_on_the_bad_node_only_and_fleet_names_it() {
    assert!(is_root(), "needs root: run it through `cargo xtask test`");
    let bin = netrace_bin().expect("the netrace binary");
    let seed = Lab::new(LabOptions::seed().ipv6(false)).expect("the seed lab");
    let open =
        Lab::new(LabOptions::seed().ipv6(false).firewall_min_port(1024)).expect("the open lab");
    let mut net = PromNet::new().expect("the Prometheus namespace");
    let seed_ip = net.link(&seed).expect("linking the seed node");
    let open_ip = net.link(&open).expect("linking the open node");
    let (bad, good) = (seed.node_ns().to_string(), open.node_ns().to_string());

    let start = |lab: &Lab, ip| {
        NetraceRun::start(
            &NetraceOptions::for_lab(lab, &bin)
                .syn_timeout(Duration::from_millis(1500))
                .args(["--metrics-addr", &format!("{ip}:{METRICS_PORT}")]),
        )
        .expect("starting netrace")
    };
    let seed_run = start(&seed, seed_ip);
    let open_run = start(&open, open_ip);

    let rules = prometheus::rules_without_hold(&repo_file("deploy/prometheus/rules.yaml"));
    let targets = [
        Target {
            addr: format!("{seed_ip}:{METRICS_PORT}"),
            node: bad.clone(),
            node_pool: "pool-seed".into(),
        },
        Target {
            addr: format!("{open_ip}:{METRICS_PORT}"),
            node: good.clone(),
            node_pool: "pool-open".into(),
        },
    ];
    let prom = PromServer::start(&net, &targets, &rules).expect("starting prometheus");
    let up = wait_for(&prom, "up == 1", 30, |r| r.len() == 2);
    assert_eq!(up.len(), 2, "both targets up: {up:?}\n{}", prom.log());

    // Traffic in rounds for about 20 s, so the counters rise across many scrapes.
    let (mut seed_attempts, mut open_attempts) = (Vec::new(), Vec::new());
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        let s = std::thread::scope(|scope| {
            let a = scope.spawn(|| {
                seed.client()
                    .tcp(seed.server_addr(Family::V4), 48, &|_, _| {})
            });
            let b = scope.spawn(|| {
                open.client()
                    .tcp(open.server_addr(Family::V4), 48, &|_, _| {})
            });
            (
                a.join().expect("seed client"),
                b.join().expect("open client"),
            )
        });
        seed_attempts.extend(s.0.expect("seed client"));
        open_attempts.extend(s.1.expect("open client"));
    }
    seed_run.settle();
    let (seed_truth, open_truth) = (TcpCounts::of(&seed_attempts), TcpCounts::of(&open_attempts));
    assert!(seed_truth.timed_out > 0, "the seed lab loses connections");
    assert_eq!(
        open_truth.timed_out, 0,
        "the open lab loses none: {open_truth:?}"
    );

    // Prometheus's view of each node's counters matches the clients' own counts.
    let lost_q = r#"sum by (node) (netrace_connections_total{outcome=~"lost|abandoned"}) or sum by (node) (netrace_connections_total) * 0"#;
    let lost = wait_for(&prom, lost_q, 20, |r| {
        by_node(r, &bad) == [seed_truth.timed_out as f64]
    });
    assert_eq!(
        by_node(&lost, &bad),
        [seed_truth.timed_out as f64],
        "{lost:?}"
    );
    assert_eq!(by_node(&lost, &good), [0.0], "{lost:?}");
    let answered = prom
        .query(r#"sum by (node) (netrace_connections_total{outcome="answered"})"#)
        .expect("query");
    assert_eq!(by_node(&answered, &bad), [seed_truth.connected as f64]);
    assert_eq!(by_node(&answered, &good), [open_truth.connected as f64]);

    // What the nodes export is what netrace/metrics.txt says, name and type.
    let contract: Vec<(String, String)> = repo_file("netrace/metrics.txt")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect();
    let (_, metadata) = prom.get("/api/v1/metadata").expect("metadata");
    let metadata: serde_json::Value = serde_json::from_str(&metadata).expect("metadata JSON");
    let exported: Vec<(String, String)> = metadata["data"]
        .as_object()
        .expect("metadata by name")
        .iter()
        .filter(|(name, _)| name.starts_with("netrace_"))
        .map(|(name, m)| {
            (
                name.clone(),
                m[0]["type"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(exported.len() >= 7, "{exported:?}");
    // Prometheus keys its metadata by metric family: an OpenMetrics counter's family has no
    // `_total` (its samples do).
    let family = |contract_name: &str, kind: &str| {
        if kind == "counter" {
            contract_name
                .strip_suffix("_total")
                .unwrap_or(contract_name)
                .to_string()
        } else {
            contract_name.to_string()
        }
    };
    let exported_as = |n: &str, k: &str, name: &str| n == name || family(n, k) == name;
    for (name, kind) in &exported {
        assert!(
            contract
                .iter()
                .any(|(n, k)| exported_as(n, k, name) && k == kind),
            "netrace exports {name} ({kind}), which netrace/metrics.txt does not list so"
        );
    }
    let missing: Vec<&str> = contract
        .iter()
        .filter(|(n, k)| !exported.iter().any(|(e, _)| exported_as(n, k, e)))
        .map(|(n, _)| n.as_str())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "note: netrace/metrics.txt lists metrics netrace does not export yet: {missing:?}"
        );
    }

    // The recording rules on the live series: the seed node loses outside the range and
    // nothing inside; the open node loses nothing anywhere.
    let ratio = wait_for(&prom, "node_range:netrace_loss:ratio10m", 20, |r| {
        r.len() == 4
    });
    let get = |node: &str, range: &str| {
        ratio
            .iter()
            .find(|s| label(s, "node") == node && label(s, "range") == range)
            .map(value)
            .unwrap_or_else(|| panic!("no ratio for {node} {range}: {ratio:?}"))
    };
    assert!(get(&bad, "outside") > 0.9, "{ratio:?}");
    assert_eq!(get(&bad, "inside"), 0.0, "{ratio:?}");
    assert_eq!(get(&good, "outside"), 0.0, "{ratio:?}");
    assert_eq!(get(&good, "inside"), 0.0, "{ratio:?}");
    let pools = prom
        .query(r#"node_pool_range:netrace_loss:ratio10m{range="outside"}"#)
        .expect("query");
    assert_eq!(pools.len(), 2, "{pools:?}");
    let heat = prom
        .query("node_bucket:netrace_loss:ratio10m")
        .expect("query");
    // Cells without attempts in the window (0/0) have no loss to show.
    for s in heat.iter().filter(|s| !value(s).is_nan()) {
        let lossy = value(s) > 0.5;
        let expect = label(s, "node") == bad && label(s, "range") == "outside";
        assert_eq!(lossy, expect, "heatmap cell {s}");
    }

    // The alerts: the range alert fires for the seed node, and only for it.
    let firing = wait_for(
        &prom,
        r#"ALERTS{alertname="NetraceSynAckLossOutsideAllowedRange",alertstate="firing"}"#,
        30,
        |r| !r.is_empty(),
    );
    let nodes: Vec<&str> = firing.iter().map(|s| label(s, "node")).collect();
    assert_eq!(nodes, [bad.as_str()], "{firing:?}\n{}", prom.log());
    let thin = prom
        .query(r#"ALERTS{alertname="NetraceEvidenceTooThin",alertstate="firing"}"#)
        .expect("query");
    assert!(thin.is_empty(), "enough evidence on both nodes: {thin:?}");
    let (_, alerts) = prom.get("/api/v1/alerts").expect("alerts");
    assert!(
        !alerts.contains(&format!("\"node\":\"{good}\"")),
        "{alerts}"
    );

    // `netrace fleet` against the same Prometheus names the seed node and its fix.
    let url = prom.url();
    let out = run_once(
        &bin,
        prom.ns(),
        &[],
        &["fleet", "--prometheus", &url, "--window", "5m"],
        Duration::from_secs(60),
    )
    .expect("running netrace fleet");
    let (stdout, stderr) = (&out.stdout, &out.stderr);
    eprintln!("netrace fleet printed:\n{stdout}");
    assert_eq!(
        out.code(),
        Some(1),
        "a node has a problem: {stdout}{stderr}"
    );
    let range_line = stdout
        .lines()
        .find(|l| l.starts_with("range problem on"))
        .unwrap_or_else(|| panic!("no range problem group:\n{stdout}"));
    assert!(
        range_line.contains(&bad) && !range_line.contains(&good),
        "{stdout}"
    );
    assert!(range_line.contains("pool-seed"), "{stdout}");
    let fine_line = stdout
        .lines()
        .find(|l| l.starts_with("no problem on"))
        .unwrap_or_else(|| panic!("no group without a problem:\n{stdout}"));
    assert!(
        fine_line.contains(&good) && !fine_line.contains(&bad),
        "{stdout}"
    );
    assert!(
        stdout.contains("SYN-ACKs to source ports 1024-32767 are lost"),
        "{stdout}"
    );
    assert!(stdout.contains("--to-ports"), "the fix: {stdout}");
    let row = |node: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(node))
            .unwrap_or_else(|| panic!("no row for {node}:\n{stdout}"))
            .to_string()
    };
    assert!(row(&bad).contains("range problem"), "{stdout}");
    assert!(row(&good).contains("no problem"), "{stdout}");
    // The learned edge, when the nodes export it.
    let edges = prom
        .query(r#"netrace_allowed_range_edge{edge="lower",bound="estimate"}"#)
        .expect("query");
    if let Some(e) = edges.iter().find(|s| label(s, "node") == bad) {
        let edge = value(e);
        assert!(
            (32000.0..=33600.0).contains(&edge),
            "the seed node's learned lower edge is near 32768: {edge}"
        );
        assert!(
            stdout.contains(&format!(
                "(estimate {edge:.0}), as --allowed-ports 32768-65535 says"
            )),
            "the seed firewall's edge, 32768, lies in the learned bracket: {stdout}"
        );
        assert!(stdout.contains("--to-ports 32768-65535"), "{stdout}");
    } else {
        eprintln!(
            "note: netrace exports no netrace_allowed_range_edge yet; the edge is not checked"
        );
    }

    let json = run_once(
        &bin,
        prom.ns(),
        &[],
        &[
            "fleet",
            "--prometheus",
            &url,
            "--window",
            "5m",
            "--output",
            "json",
        ],
        Duration::from_secs(60),
    )
    .expect("running netrace fleet --output json");
    let v: serde_json::Value =
        serde_json::from_str(&json.stdout).expect("fleet --output json is one JSON object");
    let groups = v["groups"].as_array().expect("groups");
    assert_eq!(groups[0]["judgement"], "range_problem", "{v}");
    assert_eq!(groups[0]["nodes"], serde_json::json!([bad]), "{v}");

    prom.stop().expect("stopping prometheus");
    seed_run.stop().expect("stopping netrace (seed)");
    open_run.stop().expect("stopping netrace (open)");
    drop(net);
    seed.teardown().expect("teardown");
    open.teardown().expect("teardown");
}

#[test]
fn fleet_says_in_one_line_when_prometheus_is_unreachable() {
    let bin = netrace_bin().expect("the netrace binary");
    // Port 1 on loopback: nothing listens there.
    let out = Command::new(&bin)
        .args([
            "fleet",
            "--prometheus",
            "http://127.0.0.1:1",
            "--timeout",
            "2s",
        ])
        .output()
        .expect("running netrace fleet");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot reach Prometheus at http://127.0.0.1:1"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}
