//! Prometheus's HTTP API: instant queries (`/api/v1/query`) over plain HTTP, and their vector
//! results as label sets with values.

use std::{collections::BTreeMap, fmt, time::Duration};

use serde_json::Value;

use crate::error::UsageError;

/// A Prometheus server's base URL: `http://HOST:PORT[/PREFIX]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrometheusUrl {
    base: String,
}

impl PrometheusUrl {
    /// Accepts `http://HOST[:PORT][/PREFIX]` (a trailing slash is dropped). TLS is not built
    /// in: reach an https-only server through `kubectl port-forward` and plain HTTP.
    pub fn parse(s: &str) -> Result<Self, UsageError> {
        let trimmed = s.trim().trim_end_matches('/');
        if trimmed.starts_with("https://") {
            return Err(UsageError(format!(
                "--prometheus {s}: https is not supported; reach Prometheus over plain http, \
                 e.g. `kubectl -n monitoring port-forward svc/prometheus-operated 9090` and \
                 --prometheus http://127.0.0.1:9090"
            )));
        }
        let Some(rest) = trimmed.strip_prefix("http://") else {
            return Err(UsageError(format!(
                "--prometheus {s}: want a URL like http://prometheus.monitoring:9090"
            )));
        };
        let host = rest.split('/').next().unwrap_or_default();
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(UsageError(format!(
                "--prometheus {s}: no host in it; want a URL like http://prometheus.monitoring:9090"
            )));
        }
        Ok(Self {
            base: trimmed.to_string(),
        })
    }

    fn api(&self, path: &str) -> String {
        format!("{}/api/v1/{path}", self.base)
    }
}

impl fmt::Display for PrometheusUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

/// One element of an instant vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// A label's value, empty when absent (as PromQL treats it).
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// `application/x-www-form-urlencoded` encoding of one value.
pub fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b));
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Parses the body of an `/api/v1/query` answer holding an instant vector.
pub fn parse_vector(body: &str) -> anyhow::Result<Vec<Sample>> {
    let v: Value = serde_json::from_str(body)
        .map_err(|e| anyhow::anyhow!("Prometheus answered with something other than JSON: {e}"))?;
    if v["status"] != "success" {
        anyhow::bail!(
            "Prometheus refused the query: {} ({})",
            v["error"].as_str().unwrap_or("no error text"),
            v["errorType"].as_str().unwrap_or("?")
        );
    }
    let data = &v["data"];
    if data["resultType"] != "vector" {
        anyhow::bail!(
            "Prometheus answered a {} where an instant vector was expected",
            data["resultType"]
        );
    }
    let mut out = Vec::new();
    for r in data["result"].as_array().into_iter().flatten() {
        let labels = r["metric"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect();
        let value = r["value"][1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .ok_or_else(|| anyhow::anyhow!("a sample without a numeric value: {r}"))?;
        out.push(Sample { labels, value });
    }
    Ok(out)
}

/// A Prometheus server to ask.
#[derive(Clone, Debug)]
pub struct Client {
    url: PrometheusUrl,
    timeout: Duration,
}

impl Client {
    pub fn new(url: PrometheusUrl, timeout: Duration) -> Self {
        Self { url, timeout }
    }

    pub fn url(&self) -> &PrometheusUrl {
        &self.url
    }

    /// Runs an instant query. A server that cannot be reached is a usage error (the URL is
    /// what to check); a query Prometheus rejects is an error.
    pub fn query(&self, promql: &str) -> anyhow::Result<Vec<Sample>> {
        let body = format!("query={}", form_encode(promql));
        let response = minreq::post(self.url.api("query"))
            .with_header("Content-Type", "application/x-www-form-urlencoded")
            .with_header("Accept", "application/json")
            .with_timeout(self.timeout.as_secs().max(1))
            .with_body(body)
            .send()
            .map_err(|e| {
                UsageError(format!(
                    "cannot reach Prometheus at {}: {e}; check --prometheus (e.g. \
                     `kubectl -n monitoring port-forward svc/prometheus-operated 9090` and \
                     --prometheus http://127.0.0.1:9090)",
                    self.url
                ))
            })?;
        let text = response.as_str().unwrap_or_default();
        match response.status_code {
            200 | 400 | 422 | 503 if text.trim_start().starts_with('{') => parse_vector(text),
            code => Err(UsageError(format!(
                "{} answered HTTP {code} {} to /api/v1/query: is it a Prometheus server? \
                 (check --prometheus, including any path prefix)",
                self.url, response.reason_phrase
            ))
            .into()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            PrometheusUrl::parse("http://127.0.0.1:9090/")
                .map(|u| u.api("query"))
                .ok(),
            Some("http://127.0.0.1:9090/api/v1/query".to_string())
        );
        assert_eq!(
            PrometheusUrl::parse("http://prom:9090/prefix")
                .map(|u| u.api("query"))
                .ok(),
            Some("http://prom:9090/prefix/api/v1/query".to_string())
        );
        assert!(PrometheusUrl::parse("https://prom").is_err());
        assert!(PrometheusUrl::parse("prom:9090").is_err());
        assert!(PrometheusUrl::parse("http://").is_err());
    }

    #[test]
    fn form_encoding() {
        assert_eq!(
            form_encode(r#"sum by (node) (x{a=~"b|c"})"#),
            "sum%20by%20%28node%29%20%28x%7Ba%3D~%22b%7Cc%22%7D%29"
        );
    }

    #[test]
    fn vectors() {
        let body = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"node":"a","range":"outside"},"value":[1700000000.1,"12.5"]},
            {"metric":{},"value":[1700000000.1,"NaN"]}]}}"#;
        let v = parse_vector(body).expect("parses");
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].label("node"), "a");
        assert_eq!(v[0].label("missing"), "");
        assert!((v[0].value - 12.5).abs() < 1e-9);
        assert!(v[1].value.is_nan());
        let err = parse_vector(
            r#"{"status":"error","errorType":"bad_data","error":"parse error at char 3"}"#,
        )
        .expect_err("an error");
        assert!(err.to_string().contains("parse error at char 3"), "{err}");
        assert!(parse_vector("<html>").is_err());
    }
}
