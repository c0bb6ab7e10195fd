//! Two network namespaces joined by a veth pair, for the traffic benchmarks: a client and a
//! server, nothing else. Everything is created inside the namespaces (the root namespace's
//! interfaces, routes and firewall are never touched) and deleted on drop, also when setting up
//! fails half way or a benchmark returns an error.
//!
//! Names are `nrb` + this process's id in base 36 (5 digits) + a counter (2 digits) + a role,
//! so that a leftover tells which process made it: [`remove_stale`] deletes only those whose
//! process is gone.

use std::{
    net::Ipv4Addr,
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::Context as _;
use netrace_lab::{cmd, names::base36};

pub const PREFIX: &str = "nrb";
const PID_DIGITS: usize = 5;

pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 77, 1);
pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 77, 2);

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct BenchNet {
    pub client_ns: String,
    pub server_ns: String,
    /// The client's end of the veth (in `client_ns`): where netrace and tcpdump watch.
    pub client_if: String,
    pub server_if: String,
    created: Vec<String>,
}

impl BenchNet {
    pub fn new() -> anyhow::Result<Self> {
        match remove_stale() {
            Ok(gone) if !gone.is_empty() => {
                eprintln!(
                    "bench: removed namespaces left by dead runs: {}",
                    gone.join(" ")
                );
            }
            Ok(_) => {}
            Err(e) => eprintln!("bench: could not remove stale namespaces: {e:#}"),
        }
        let seq = NEXT.fetch_add(1, Ordering::Relaxed);
        let stem = format!(
            "{PREFIX}{}{}",
            base36(u64::from(std::process::id()), PID_DIGITS),
            base36(u64::from(seq), 2)
        );
        let mut net = Self {
            client_ns: format!("{stem}cli"),
            server_ns: format!("{stem}srv"),
            client_if: format!("{stem}c"),
            server_if: format!("{stem}s"),
            created: Vec::new(),
        };
        net.setup()
            .with_context(|| format!("setting up namespaces {stem}*"))?;
        Ok(net)
    }

    fn setup(&mut self) -> anyhow::Result<()> {
        for ns in [self.client_ns.clone(), self.server_ns.clone()] {
            cmd::run("ip", &["netns", "add", &ns])?;
            self.created.push(ns);
        }
        let (c, s) = (&self.client_ns, &self.server_ns);
        // Created inside the client namespace, the peer moved straight into the server's.
        cmd::ns_exec(
            c,
            &[
                "ip",
                "link",
                "add",
                &self.client_if,
                "type",
                "veth",
                "peer",
                "name",
                &self.server_if,
                "netns",
                s,
            ],
        )?;
        for (ns, dev, addr) in [
            (c, &self.client_if, CLIENT_ADDR),
            (s, &self.server_if, SERVER_ADDR),
        ] {
            cmd::ns_exec(
                ns,
                &["ip", "addr", "add", &format!("{addr}/24"), "dev", dev],
            )?;
            cmd::ns_exec(ns, &["ip", "link", "set", dev, "up"])?;
            cmd::ns_exec(ns, &["ip", "link", "set", "lo", "up"])?;
        }
        // Short connections at thousands per second: every port, and TIME_WAIT reuse (both
        // per namespace).
        cmd::ns_exec(
            c,
            &[
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_local_port_range=1024 65535",
                "net.ipv4.tcp_tw_reuse=1",
            ],
        )?;
        Ok(())
    }
}

impl Drop for BenchNet {
    fn drop(&mut self) {
        for ns in self.created.drain(..).rev() {
            if let Err(e) = cmd::run("ip", &["netns", "del", &ns]) {
                eprintln!("bench: could not delete namespace {ns}: {e:#}");
            }
        }
    }
}

/// Deletes `nrb*` namespaces whose creating process no longer runs; returns their names.
pub fn remove_stale() -> anyhow::Result<Vec<String>> {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return Ok(Vec::new());
    };
    let mut gone = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.get(..PID_DIGITS))
            .and_then(|d| u32::from_str_radix(d, 36).ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        cmd::run("ip", &["netns", "del", &name])?;
        gone.push(name);
    }
    Ok(gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_encode_the_pid() {
        assert_eq!(base36(35, 2), "0z");
        // Linux pids are at most 2^22 < 36^5, so the names stay 3 + 5 + 2 + 3 long.
        assert!(4_194_304 < 36u64.pow(5));
        let link = format!("{PREFIX}{}{}c", base36(4_194_304, PID_DIGITS), base36(0, 2));
        assert!(link.len() <= 15);
    }
}
