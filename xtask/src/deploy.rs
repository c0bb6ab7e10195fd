//! The files under deploy/, checked offline: every Kubernetes manifest (and both
//! kustomizations' output) validated against the API schemas, the DaemonSet and the debug pod
//! held to the deployment policy, the Prometheus rules checked and unit-tested by promtool, the
//! PrometheusRule kept equal to the plain rule file, and the Grafana dashboard's queries held
//! to netrace's metric names (netrace/metrics.txt).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, ensure, Context as _};
use serde_json::Value;

use crate::{bootstrap, run, step, workspace_root};

/// The plain Prometheus rule file (the source of the PrometheusRule).
pub const RULES: &str = "deploy/prometheus/rules.yaml";
/// The same groups inside a PrometheusRule, written by `cargo xtask sync-rules`.
pub const PROMETHEUS_RULE: &str = "deploy/prometheus/prometheusrule.yaml";
/// The Grafana dashboard.
pub const DASHBOARD: &str = "deploy/prometheus/grafana-dashboard.json";
/// netrace's metric names: the one list the exposition, rules, dashboard and fleet agree on.
pub const CONTRACT: &str = "netrace/metrics.txt";
/// The image placeholder the manifests carry until the kustomization sets a real one.
pub const IMAGE_PLACEHOLDER: &str = "REGISTRY/netrace:TAG";

/// A user's overlay setting the image (kustomize wants its base relative:
/// target/deploy-check/overlay -> deploy). `bases:`, not `resources:`, for the kustomize inside
/// Debian 12's kubectl (1.20), which takes only files as resources; newer ones warn and accept.
const OVERLAY: &str = "bases:
  - ../../../deploy
images:
  - name: REGISTRY/netrace
    newName: registry.example.com/team/netrace
    newTag: 0.1.0
";

/// Series Prometheus itself makes, which the dashboard may query.
const PROMETHEUS_BUILTINS: [&str; 3] = ["ALERTS", "ALERTS_FOR_STATE", "up"];

fn read(rel: &str) -> anyhow::Result<String> {
    let path = workspace_root().join(rel);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// `rules` (a plain rule file) as a PrometheusRule: the groups under `spec:`.
pub fn prometheus_rule(rules: &str) -> anyhow::Result<String> {
    let start = rules
        .lines()
        .position(|l| l.starts_with("groups:"))
        .context("rules.yaml has no top-level `groups:`")?;
    let mut out = String::from(
        "# Generated from rules.yaml by `cargo xtask sync-rules`: edit rules.yaml, then run it.\n\
         # For the Prometheus Operator; the same rules as a plain rule file are in rules.yaml.\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  name: netrace\n  namespace: netrace\n  labels:\n    \
         app.kubernetes.io/name: netrace\n    app.kubernetes.io/part-of: netrace\n\
         spec:\n",
    );
    for line in rules.lines().skip(start) {
        if line.is_empty() {
            out.push('\n');
        } else {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// `cargo xtask sync-rules`: writes the PrometheusRule from rules.yaml.
pub fn sync_rules() -> anyhow::Result<()> {
    let text = prometheus_rule(&read(RULES)?)?;
    let path = workspace_root().join(PROMETHEUS_RULE);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// One metric of the contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContractMetric {
    pub name: String,
    pub kind: String,
    pub labels: Vec<String>,
}

/// Parses netrace/metrics.txt: `NAME TYPE LABELS` a line, `#` comments.
pub fn parse_contract(text: &str) -> anyhow::Result<Vec<ContractMetric>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, kind, labels] = fields[..] else {
            bail!(
                "{CONTRACT} line {}: want NAME TYPE LABELS, got {line:?}",
                i + 1
            );
        };
        ensure!(
            ["counter", "gauge", "histogram"].contains(&kind),
            "{CONTRACT} line {}: unknown type {kind}",
            i + 1
        );
        out.push(ContractMetric {
            name: name.to_string(),
            kind: kind.to_string(),
            labels: if labels == "-" {
                Vec::new()
            } else {
                labels.split(',').map(str::to_string).collect()
            },
        });
    }
    ensure!(!out.is_empty(), "{CONTRACT} lists no metric");
    Ok(out)
}

/// The names a query may use for the contract's metrics (histograms: their three series).
fn series_names(contract: &[ContractMetric]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for m in contract {
        if m.kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{}{suffix}", m.name));
            }
        } else {
            names.insert(m.name.clone());
        }
    }
    names
}

/// The recording rules' names in a rule file (`- record: NAME` lines).
pub fn recorded_names(rules: &str) -> BTreeSet<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record:"))
        .map(|n| n.trim().to_string())
        .collect()
}

/// Replaces quoted strings with spaces.
fn strip_strings(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' && q != '`' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
                out.push(' ');
            }
            None if matches!(c, '"' | '\'' | '`') => {
                quote = Some(c);
                out.push(' ');
            }
            None => out.push(c),
        }
    }
    out
}

/// Removes everything between `open` and `close` (label matchers, range durations).
fn strip_between(s: &str, open: char, close: char) -> String {
    let mut out = String::with_capacity(s.len());
    let mut depth = 0usize;
    for c in s.chars() {
        if c == open {
            depth += 1;
            out.push(' ');
        } else if c == close && depth > 0 {
            depth -= 1;
            out.push(' ');
        } else if depth == 0 {
            out.push(c);
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: [&str; 9] = [
    "and", "or", "unless", "bool", "offset", "inf", "nan", "atan2", "__name__",
];

/// The metric names a PromQL expression selects: identifiers that are not functions,
/// keywords, label lists, label matchers, strings, numbers, durations or Grafana variables.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let s = strip_between(&strip_between(&strip_strings(expr), '{', '}'), '[', ']');
    let chars: Vec<char> = s.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // After a grouping keyword, the parenthesised list that follows holds label names.
    let mut skip_list = false;
    let mut depth_skip: Option<usize> = None;
    let mut depth = 0usize;
    while i < chars.len() {
        let c = chars[i];
        if c == '(' {
            depth += 1;
            if skip_list {
                depth_skip = Some(depth);
                skip_list = false;
            }
            i += 1;
            continue;
        }
        if c == ')' {
            if depth_skip == Some(depth) {
                depth_skip = None;
            }
            depth = depth.saturating_sub(1);
            i += 1;
            continue;
        }
        if !is_ident(c) {
            if !c.is_whitespace() {
                skip_list = false;
            }
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        if depth_skip.is_some() {
            continue;
        }
        let after = chars[i..].iter().find(|c| !c.is_whitespace()).copied();
        // `sum by (...) (...)`: an aggregation whose grouping comes first.
        let next_word: String = chars[i..]
            .iter()
            .skip_while(|c| c.is_whitespace())
            .take_while(|c| is_ident(**c))
            .collect();
        let aggregation = next_word == "by" || next_word == "without";
        let dollar = start > 0 && chars[start - 1] == '$';
        if GROUPING.contains(&word.as_str()) {
            skip_list = true;
            continue;
        }
        skip_list = false;
        let numeric = word.starts_with(|c: char| c.is_ascii_digit());
        if dollar
            || numeric
            || after == Some('(')
            || aggregation
            || KEYWORDS.contains(&word.to_ascii_lowercase().as_str())
        {
            continue;
        }
        names.insert(word);
    }
    names
}

/// Every PromQL expression in a dashboard: panel targets and query variables
/// (`label_values(METRIC, LABEL)` counts as METRIC).
pub fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = Vec::new();
    let mut stack: Vec<&Value> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    while let Some(p) = stack.pop() {
        panels.push(p);
        stack.extend(p["panels"].as_array().into_iter().flatten());
    }
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push(e.to_string());
            }
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or_else(|| v["query"].as_str())
            .unwrap_or_default();
        let q = match q.strip_prefix("label_values(") {
            Some(rest) => rest.rsplit_once(',').map_or(rest, |(m, _)| m).to_string(),
            None => q.to_string(),
        };
        out.push(q);
    }
    out
}

/// The dashboard: parsed, ready for file provisioning (no `__inputs`, one datasource
/// variable), every panel's queries non-empty, and every metric they name either netrace's
/// (the contract), one of the rule file's recordings, or Prometheus's own.
pub fn check_dashboard(
    dashboard_text: &str,
    contract: &[ContractMetric],
    rules: &str,
) -> anyhow::Result<usize> {
    let d: Value = serde_json::from_str(dashboard_text).context("the dashboard is not JSON")?;
    ensure!(d["uid"].as_str().is_some_and(|u| !u.is_empty()), "no uid");
    ensure!(
        d["title"].as_str().is_some_and(|t| !t.is_empty()),
        "no title"
    );
    ensure!(
        d.get("__inputs").is_none(),
        "__inputs are for the import dialog; file provisioning leaves them unresolved"
    );
    let ds_var = d["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|v| v["type"] == "datasource" && v["name"] == "datasource");
    ensure!(ds_var, "no `datasource` variable of type datasource");
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().context("no panels")? {
        let id = p["id"].as_u64().context("a panel without an id")?;
        ensure!(ids.insert(id), "panel id {id} used twice");
        if p["type"] == "text" || p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().unwrap_or("?");
        ensure!(
            p["datasource"]["uid"] == "${datasource}",
            "panel {title:?}: datasource is not ${{datasource}}"
        );
        let targets = p["targets"].as_array().map_or(&[][..], Vec::as_slice);
        ensure!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            ensure!(
                t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "panel {title:?}: a target without expr"
            );
        }
    }
    let known = series_names(contract);
    let recorded = recorded_names(rules);
    let queries = dashboard_queries(&d);
    let mut unknown = BTreeMap::new();
    for q in &queries {
        for name in metric_names(q) {
            let ok = known.contains(&name)
                || recorded.contains(&name)
                || PROMETHEUS_BUILTINS.contains(&name.as_str());
            if !ok {
                unknown.insert(name, q.clone());
            }
        }
    }
    if let Some((name, q)) = unknown.iter().next() {
        bail!(
            "the dashboard queries {} metric(s) that are neither in {CONTRACT} nor recorded by \
             {RULES}: {:?} (e.g. {name} in `{q}`)",
            unknown.len(),
            unknown.keys().collect::<Vec<_>>()
        );
    }
    Ok(queries.len())
}

/// The raw netrace metrics a rule file uses (names without a colon) must be netrace's.
pub fn check_rules_metrics(rules: &str, contract: &[ContractMetric]) -> anyhow::Result<()> {
    let known = series_names(contract);
    let mut unknown = BTreeSet::new();
    for line in rules.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let mut word = String::new();
        for c in line.chars().chain(std::iter::once(' ')) {
            if is_ident(c) {
                word.push(c);
                continue;
            }
            if word.starts_with("netrace_") && !word.contains(':') && !known.contains(&word) {
                unknown.insert(word.clone());
            }
            word.clear();
        }
    }
    ensure!(
        unknown.is_empty(),
        "{RULES} uses metrics not in {CONTRACT}: {unknown:?}"
    );
    Ok(())
}

/// YAML documents as JSON, through the validator's virtual environment (PyYAML comes with
/// kubernetes-validate).
fn yaml_to_json(path: &Path) -> anyhow::Result<Vec<Value>> {
    let out = Command::new(bootstrap::venv_python())
        .args([
            "-c",
            "import json, sys, yaml\n\
             json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)",
        ])
        .arg(path)
        .stderr(Stdio::inherit())
        .output()
        .context("running the venv's python for PyYAML")?;
    ensure!(
        out.status.success(),
        "cannot parse {} as YAML",
        path.display()
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn kustomize(dir: &Path, out: &Path) -> anyhow::Result<()> {
    let rendered = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .stderr(Stdio::inherit())
        .output()
        .context("running kubectl kustomize")?;
    ensure!(
        rendered.status.success(),
        "kubectl kustomize {} failed",
        dir.display()
    );
    std::fs::write(out, &rendered.stdout).with_context(|| format!("writing {}", out.display()))
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> anyhow::Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name}"))
}

const APP_LABELS: [&str; 5] = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
];

/// The container's capabilities: all dropped, these three added, not privileged.
fn check_least_privilege(what: &str, container: &Value) -> anyhow::Result<()> {
    let sc = &container["securityContext"];
    ensure!(sc["privileged"] != true, "{what}: privileged");
    ensure!(
        sc["allowPrivilegeEscalation"] == false,
        "{what}: allowPrivilegeEscalation is not false"
    );
    ensure!(
        sc["capabilities"]["drop"] == serde_json::json!(["ALL"]),
        "{what}: capabilities are not dropped first"
    );
    let added: BTreeSet<&str> = sc["capabilities"]["add"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        added == BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON"]),
        "{what}: capabilities {added:?}, want BPF, NET_ADMIN, PERFMON"
    );
    Ok(())
}

/// The deployment policy, on the kustomization's output and the debug pod.
pub fn check_policy(rendered: &[Value], debug_pod: &[Value]) -> anyhow::Result<()> {
    let ns = find(rendered, "Namespace", "netrace")?;
    ensure!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged",
        "the namespace lacks its Pod Security label"
    );
    let ds = find(rendered, "DaemonSet", "netrace")?;
    let pod = &ds["spec"]["template"]["spec"];
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    for l in APP_LABELS {
        ensure!(labels[l].is_string(), "the pod template lacks label {l}");
        ensure!(
            ds["metadata"]["labels"][l].is_string(),
            "the DaemonSet lacks label {l}"
        );
    }
    ensure!(
        pod["nodeSelector"]["kubernetes.io/os"] == "linux",
        "no kubernetes.io/os: linux nodeSelector"
    );
    ensure!(
        pod["automountServiceAccountToken"] == false,
        "the service account token is mounted"
    );
    ensure!(
        pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault",
        "no RuntimeDefault seccomp profile"
    );
    let class = pod["priorityClassName"]
        .as_str()
        .context("no priority class")?;
    ensure!(
        class.starts_with("system-") || find(rendered, "PriorityClass", class).is_ok(),
        "priority class {class} is neither a system class nor part of the kustomization"
    );
    let c = &pod["containers"][0];
    check_least_privilege("the DaemonSet", c)?;
    ensure!(
        c["image"] == IMAGE_PLACEHOLDER,
        "the kustomization renders image {} (want the placeholder {IMAGE_PLACEHOLDER} until \
         a user sets it)",
        c["image"]
    );
    ensure!(
        c["livenessProbe"]["httpGet"]["path"] == "/healthz",
        "liveness is not /healthz"
    );
    ensure!(
        c["readinessProbe"]["httpGet"]["path"] == "/readyz",
        "readiness is not /readyz"
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        args.iter()
            .any(|a| a.starts_with("--metrics-addr=$(NODE_IP):")),
        "metrics are not bound to $(NODE_IP): {args:?}"
    );
    let node_ip = c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "NODE_IP")
        .context("no NODE_IP variable")?;
    ensure!(
        node_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP",
        "NODE_IP is not the downward API's status.hostIP"
    );
    let dbg = find(debug_pod, "Pod", "netrace-debug")?;
    ensure!(
        dbg["spec"]["automountServiceAccountToken"] == false,
        "the debug pod mounts the service account token"
    );
    let dc = &dbg["spec"]["containers"][0];
    check_least_privilege("the debug pod", dc)?;
    ensure!(
        dc["image"] == IMAGE_PLACEHOLDER,
        "the debug pod's image is not {IMAGE_PLACEHOLDER}"
    );
    Ok(())
}

/// The Prometheus Operator side (no schema offline for its custom resources): the PodMonitor
/// selects the DaemonSet's pods and their metrics port, in their namespace, and labels series
/// with `node`; the dashboard ConfigMap carries the dashboard file.
pub fn check_monitoring(app: &[Value], prom: &[Value], dashboard: &str) -> anyhow::Result<()> {
    let ds = find(app, "DaemonSet", "netrace")?;
    let pm = find(prom, "PodMonitor", "netrace")?;
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    let selector = pm["spec"]["selector"]["matchLabels"]
        .as_object()
        .context("the PodMonitor has no matchLabels")?;
    for (k, v) in selector {
        ensure!(
            &pod_labels[k] == v,
            "the PodMonitor selects {k}={v}, which the DaemonSet's pods do not carry"
        );
    }
    let ns = ds["metadata"]["namespace"].as_str().unwrap_or("default");
    ensure!(
        pm["metadata"]["namespace"] == ns
            || pm["spec"]["namespaceSelector"]["matchNames"]
                .as_array()
                .is_some_and(|a| a.iter().any(|n| n == ns)),
        "the PodMonitor does not look in namespace {ns}"
    );
    let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
    let port = endpoint["port"].as_str().context("no endpoint port name")?;
    let ports = ds["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_array()
        .into_iter()
        .flatten();
    ensure!(
        ports.clone().any(|p| p["name"] == port),
        "the PodMonitor scrapes port {port:?}, which the container does not name"
    );
    ensure!(
        endpoint["relabelings"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["targetLabel"] == "node"
                && r["sourceLabels"] == serde_json::json!(["__meta_kubernetes_pod_node_name"])),
        "the PodMonitor does not set the `node` label the rules group by"
    );
    let cm = find(prom, "ConfigMap", "netrace-dashboard")?;
    let shipped: Value = serde_json::from_str(dashboard)?;
    let carried = cm["data"]
        .as_object()
        .and_then(|d| d.values().next())
        .and_then(Value::as_str)
        .context("the dashboard ConfigMap carries no file")?;
    ensure!(
        serde_json::from_str::<Value>(carried)? == shipped,
        "the dashboard ConfigMap does not carry grafana-dashboard.json"
    );
    Ok(())
}

/// The manifests under deploy/ (not the kustomizations or the rule files).
fn manifests(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for dir in ["deploy", "deploy/prometheus"] {
        for entry in std::fs::read_dir(root.join(dir)).with_context(|| format!("listing {dir}"))? {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
            // Kubernetes objects only: not the kustomizations, rule files or Prometheus's own
            // configuration.
            let object = std::fs::read_to_string(&path)
                .is_ok_and(|t| t.lines().any(|l| l.starts_with("apiVersion:")));
            let skip = name == "kustomization.yaml" || !object;
            if yaml && !skip {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn is_rule_test(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().ends_with("_test.yaml"))
}

/// A plain Prometheus rule file: a top-level `groups:` key.
fn is_rule_file(path: &Path) -> bool {
    !is_rule_test(path)
        && std::fs::read_to_string(path).is_ok_and(|t| t.lines().any(|l| l.starts_with("groups:")))
}

/// Everything above, as steps of `cargo xtask test`.
pub fn check() -> anyhow::Result<()> {
    let root = workspace_root();
    let scratch = root.join("target").join("deploy-check");
    std::fs::create_dir_all(&scratch).context("creating target/deploy-check")?;

    step("deploy: render both kustomizations (kubectl kustomize), and one with an image set");
    let app = scratch.join("kustomize-deploy.yaml");
    let prom = scratch.join("kustomize-prometheus.yaml");
    kustomize(&root.join("deploy"), &app)?;
    kustomize(&root.join("deploy/prometheus"), &prom)?;
    // What docs/operations.md tells users to do: an overlay (or `kustomize edit set image`)
    // replacing the placeholder.
    let overlay = scratch.join("overlay");
    std::fs::create_dir_all(&overlay)?;
    std::fs::write(overlay.join("kustomization.yaml"), OVERLAY)?;
    let set = scratch.join("kustomize-overlay.yaml");
    kustomize(&overlay, &set)?;
    let set_text = std::fs::read_to_string(&set)?;
    ensure!(
        set_text.contains("image: registry.example.com/team/netrace:0.1.0")
            && !set_text.contains("REGISTRY/"),
        "setting the image through the kustomization did not replace the placeholder"
    );

    let mut files = manifests(&root)?;
    files.extend([app.clone(), prom.clone(), set]);
    let mut validate = Command::new(bootstrap::venv_python());
    validate
        .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
        .args(&files);
    run(
        &format!(
            "deploy: {} manifests and kustomize outputs validate offline (kubernetes-validate --strict)",
            files.len()
        ),
        &mut validate,
    )?;

    step("deploy: the DaemonSet and the debug pod follow the deployment policy");
    check_policy(
        &yaml_to_json(&app)?,
        &yaml_to_json(&root.join("deploy/debug-pod.yaml"))?,
    )?;
    step(
        "deploy: the PodMonitor scrapes the DaemonSet's pods; the ConfigMap carries the dashboard",
    );
    let prom_docs = yaml_to_json(&prom)?;
    find(&prom_docs, "PrometheusRule", "netrace")?;
    check_monitoring(&yaml_to_json(&app)?, &prom_docs, &read(DASHBOARD)?)?;

    let prom_dir = root.join("deploy/prometheus");
    let mut rule_files = Vec::new();
    let mut rule_tests = Vec::new();
    for entry in std::fs::read_dir(&prom_dir)? {
        let path = entry?.path();
        if is_rule_test(&path) {
            rule_tests.push(path);
        } else if is_rule_file(&path) {
            rule_files.push(path);
        }
    }
    rule_files.sort();
    rule_tests.sort();
    ensure!(
        !rule_files.is_empty() && !rule_tests.is_empty(),
        "no rule files or rule tests under deploy/prometheus"
    );
    run(
        "deploy: promtool check rules (every rule file)",
        Command::new("promtool")
            .args(["check", "rules"])
            .args(&rule_files),
    )?;
    run(
        "deploy: promtool test rules (the rules' unit tests on synthetic series)",
        Command::new("promtool")
            .args(["test", "rules"])
            .args(&rule_tests),
    )?;

    step("deploy: the PrometheusRule carries exactly rules.yaml");
    let rules = read(RULES)?;
    ensure!(
        read(PROMETHEUS_RULE)? == prometheus_rule(&rules)?,
        "{PROMETHEUS_RULE} differs from {RULES}: run `cargo xtask sync-rules`"
    );

    step("deploy: the dashboard parses and queries only netrace's metrics and recordings");
    let contract = parse_contract(&read(CONTRACT)?)?;
    check_rules_metrics(&rules, &contract)?;
    let n = check_dashboard(&read(DASHBOARD)?, &contract, &rules)?;
    eprintln!("{n} queries checked against {} metrics", contract.len());
    Ok(())
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    fn names(expr: &str) -> Vec<String> {
        metric_names(expr).into_iter().collect()
    }

    #[test]
    fn metric_names_skip_functions_labels_strings_and_variables() {
        assert_eq!(
            names(
                r#"sum by (node, le) (rate(netrace_connect_rtt_seconds_bucket{node=~"$node"}[$__rate_interval]))"#
            ),
            ["netrace_connect_rtt_seconds_bucket"]
        );
        assert_eq!(
            names("node_edge:x:max < on (edge) group_left () edge:y:median and on(edge) (z >= 3)"),
            ["edge:y:median", "node_edge:x:max", "z"]
        );
        assert_eq!(
            names(
                r#"topk(10, sum without (instance) (increase(a_total{outcome=~"lost|abandoned"}[1h])) > 0.5e3)"#
            ),
            ["a_total"]
        );
        assert_eq!(
            names(r#"histogram_quantile(0.99, b) or vector(1) unless c offset 5m"#),
            ["b", "c"]
        );
        assert!(names(r#"label_replace(up, "x", "$1", "instance", "(.*)")"#) == ["up"]);
    }

    #[test]
    fn the_dashboard_check_finds_an_unknown_metric() {
        let contract =
            parse_contract("netrace_a_total counter x\nnetrace_h histogram -\n").expect("contract");
        let rules = "groups:\n  - rules:\n      - record: node:netrace_a:rate5m\n";
        let dash = |expr: &str| {
            serde_json::json!({
                "uid": "u", "title": "t",
                "templating": {"list": [{"type": "datasource", "name": "datasource"},
                    {"type": "query", "name": "node", "query": {"query": "label_values(netrace_a_total, node)"}}]},
                "panels": [{"id": 1, "type": "timeseries", "title": "p",
                    "datasource": {"uid": "${datasource}"},
                    "targets": [{"expr": expr}]}]
            })
            .to_string()
        };
        let ok = dash("node:netrace_a:rate5m / rate(netrace_h_count[5m]) or ALERTS");
        assert_eq!(check_dashboard(&ok, &contract, rules).expect("valid"), 2);
        let bad = dash("rate(netrace_missing_total[5m])");
        let err = check_dashboard(&bad, &contract, rules).expect_err("unknown metric");
        assert!(err.to_string().contains("netrace_missing_total"), "{err}");
        assert!(check_rules_metrics("expr: rate(netrace_b_total[1m])", &contract).is_err());
        assert!(check_rules_metrics("expr: rate(netrace_a_total[1m])", &contract).is_ok());
    }

    #[test]
    fn the_prometheus_rule_indents_the_groups_under_spec() {
        let text = prometheus_rule("# c\ngroups:\n  - name: g\n\n    rules: []\n").expect("wraps");
        assert!(text.contains("kind: PrometheusRule\n"));
        assert!(text.ends_with("spec:\n  groups:\n    - name: g\n\n      rules: []\n"));
    }

    #[test]
    fn the_shipped_files_pass() {
        let contract = parse_contract(&read(CONTRACT).expect("contract")).expect("parses");
        let rules = read(RULES).expect("rules");
        check_rules_metrics(&rules, &contract).expect("rules use contract metrics");
        check_dashboard(&read(DASHBOARD).expect("dashboard"), &contract, &rules)
            .expect("dashboard valid");
        assert_eq!(
            read(PROMETHEUS_RULE).expect("prometheusrule"),
            prometheus_rule(&rules).expect("wraps"),
            "run `cargo xtask sync-rules`"
        );
    }
}
