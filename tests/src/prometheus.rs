//! A real Prometheus server (Debian's `prometheus`) for the fleet tests, in a network namespace
//! of its own joined by a veth pair to each lab node it scrapes:
//!
//! ```text
//!  PROM namespace (nrt…prom)                      lab node namespaces
//!  lo 127.0.0.1:9090  prometheus                  (netrace --metrics-addr 198.19.N.2:PORT)
//!  nrt…pN 198.19.N.1/30  ──veth──  nrt…qN 198.19.N.2/30
//! ```
//!
//! Its configuration, rules and data live in a temporary directory of its own. Dropping the
//! [`PromServer`] stops the server, deletes its namespace (and with it the veths) and the
//! directory. Nothing in the root namespace is touched.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::cmd;
use crate::lab::{Lab, NETNS_LOCK};
use crate::names::LabNames;
use crate::netns;

/// Where Prometheus listens, inside its namespace.
pub const PROM_PORT: u16 = 9090;

/// One scrape target: a lab node and the labels Prometheus gives its series.
#[derive(Debug, Clone)]
pub struct Target {
    /// `ADDR:PORT` of netrace's metrics, as seen from the Prometheus namespace.
    pub addr: String,
    /// The `node` target label.
    pub node: String,
    /// The `node_pool` target label.
    pub node_pool: String,
}

/// The Prometheus namespace, linked to lab nodes.
pub struct PromNet {
    ns: String,
    stem: String,
    links: u8,
    deleted: bool,
}

impl std::fmt::Debug for PromNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromNet").field("ns", &self.ns).finish()
    }
}

impl PromNet {
    /// Creates the namespace (`nrt<pid><seq>prom`) with its loopback up.
    pub fn new() -> Result<Self> {
        let stem = LabNames::fresh().stem;
        let ns = format!("{stem}prom");
        {
            let _guard = NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            cmd::run("ip", &["netns", "add", &ns])?;
        }
        let net = Self {
            ns,
            stem,
            links: 0,
            deleted: false,
        };
        cmd::run("ip", &["-n", &net.ns, "link", "set", "lo", "up"])?;
        Ok(net)
    }

    /// The namespace's name.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Links the lab's node namespace to this one (198.19.N.1 here, 198.19.N.2 on the node)
    /// and returns the node side's address: bind netrace's metrics there.
    pub fn link(&mut self, lab: &Lab) -> Result<Ipv4Addr> {
        self.links += 1;
        let n = self.links;
        let (here, there) = (format!("{}p{n}", self.stem), format!("{}q{n}", self.stem));
        cmd::run(
            "ip",
            &[
                "link",
                "add",
                &here,
                "netns",
                &self.ns,
                "type",
                "veth",
                "peer",
                &there,
                "netns",
                lab.node_ns(),
            ],
        )?;
        let (a, b) = (Ipv4Addr::new(198, 19, n, 1), Ipv4Addr::new(198, 19, n, 2));
        for (ns, link, addr) in [(self.ns.as_str(), &here, a), (lab.node_ns(), &there, b)] {
            cmd::run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", link],
            )?;
            cmd::run("ip", &["-n", ns, "link", "set", link, "up"])?;
        }
        Ok(b)
    }

    fn delete(&mut self) -> Result<()> {
        if self.deleted {
            return Ok(());
        }
        self.deleted = true;
        let _guard = NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        cmd::run("ip", &["netns", "del", &self.ns]).map(|_| ())
    }
}

impl Drop for PromNet {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            eprintln!("netrace-lab: {e:#}");
        }
    }
}

/// A running Prometheus server; stopped on drop.
pub struct PromServer {
    child: Option<Child>,
    dir: PathBuf,
    ns: String,
}

impl std::fmt::Debug for PromServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromServer")
            .field("dir", &self.dir)
            .field("ns", &self.ns)
            .finish()
    }
}

/// A YAML string (double-quoted).
fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

/// The project's rule file with every `for:` hold time cut to zero: the expressions are the
/// shipped ones, evaluated as they are; only the wait before firing is gone.
pub fn rules_without_hold(rules: &str) -> String {
    rules
        .lines()
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with("for:") {
                format!("{}for: 0s", &l[..l.len() - t.len()])
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

impl PromServer {
    /// Starts `prometheus` in `net`'s namespace on 127.0.0.1:[`PROM_PORT`], scraping `targets`
    /// every second and evaluating `rules` (a rule file's text) every second; waits until it
    /// is ready.
    pub fn start(net: &PromNet, targets: &[Target], rules: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("netrace-lab-{}", net.ns));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data"))
            .with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("rules.yaml"), rules)?;
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - rules.yaml\nscrape_configs:\n  - job_name: netrace\n    static_configs:\n",
        );
        for t in targets {
            config.push_str(&format!(
                "      - targets: [{}]\n        labels:\n          node: {}\n          node_pool: {}\n",
                quoted(&t.addr),
                quoted(&t.node),
                quoted(&t.node_pool)
            ));
        }
        std::fs::write(dir.join("prometheus.yml"), &config)?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &net.ns, "prometheus"])
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{PROM_PORT}"))
            .arg("--log.level=warn")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start prometheus (Debian's `prometheus` package)")?;
        let mut server = Self {
            child: Some(child),
            dir,
            ns: net.ns.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = server.get("/-/ready") {
                return Ok(server);
            }
            if let Some(c) = server.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!("prometheus exited ({status}):\n{}", server.log());
                }
            }
            if Instant::now() >= deadline {
                bail!("prometheus not ready within 60 s:\n{}", server.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The base URL, as reachable from inside the namespace.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{PROM_PORT}")
    }

    /// The namespace the server runs in (run `netrace fleet` there).
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// The temporary directory (config, rules, data, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `GET path` from inside the namespace (HTTP/1.0: no chunking); status and body.
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        let path = path.to_owned();
        netns::spawn_in(&self.ns, "nrt-prom-http", move || {
            let mut s = TcpStream::connect(("127.0.0.1", PROM_PORT))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n").as_bytes())?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw)?;
            let text = String::from_utf8_lossy(&raw).into_owned();
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            Ok((status, body.to_owned()))
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("the HTTP thread panicked"))?
    }

    /// An instant query's result vector (`data.result`).
    pub fn query(&self, promql: &str) -> Result<Vec<Value>> {
        let (status, body) = self.get(&format!("/api/v1/query?query={}", url_encode(promql)))?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("HTTP {status} for `{promql}`: {body}"))?;
        if v["status"] != "success" {
            bail!("`{promql}`: {body}");
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Stops the server (SIGTERM, then SIGKILL after 10 s) and removes its directory.
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped
            // child (`ip netns exec` execs prometheus in place).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::remove_dir_all(&self.dir)
            .with_context(|| format!("removing {}", self.dir.display()))
    }
}

impl Drop for PromServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            eprintln!("netrace-lab: stopping prometheus: {e:#}");
        }
    }
}

/// Percent-encoding for a URL's query component.
pub fn url_encode(s: &str) -> String {
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

/// A sample's label, empty when absent.
pub fn label<'a>(sample: &'a Value, name: &str) -> &'a str {
    sample["metric"][name].as_str().unwrap_or("")
}

/// A sample's value (NaN when unreadable).
pub fn value(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_times_go_to_zero_and_nothing_else_changes() {
        let rules = "groups:\n  - rules:\n      - alert: A\n        expr: x > 1 # for: 5m\n        for: 10m\n";
        assert_eq!(
            rules_without_hold(rules),
            "groups:\n  - rules:\n      - alert: A\n        expr: x > 1 # for: 5m\n        for: 0s\n"
        );
    }
}
