//! Per-packet cost of the device hook (the `net_dev_start_xmit` raw tracepoint) next to the tc
//! egress classifier and the empty classifier, on real packets: `BPF_PROG_TEST_RUN` does not
//! run tracepoints, so the kernel's own run-time statistics (`BPF_ENABLE_STATS`, the
//! `run_time_ns` / `run_cnt` of each program) are read around a run of TCP connections over a
//! veth pair between two namespaces of our own.
//!
//! Two phases: the device not watched (every run of the tracepoint returns after the map
//! lookup, as it does for every other device on a node), then watched (every packet parsed;
//! SYNs go to the pending map). The tracepoint also runs for the server's packets on the other
//! end of the pair (another namespace: rejected), so the watched figure is estimated from the
//! phase's total minus the rejected runs at the unwatched phase's cost.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _};
use aya::{
    programs::{tc::TcAttachOptions, LinkOrder, ProgramInfo, TcAttachType},
    sys::{enable_stats, Stats},
};
use netrace::{
    kernel::{egress_hook, loader::XMIT_PROGRAM as XMIT},
    options::AttachMode,
};
use netrace_common::SkbOffsets;
use serde_json::{json, Value};

use crate::{
    kernel::{Kernel, EGRESS, NOOP},
    stats::round,
};

const CLIENT: &str = "198.18.200.1";
const SERVER: &str = "198.18.200.2";
const PORT: u16 = 9099;

/// Two namespaces joined by a veth pair; deleted on drop.
struct Pair {
    client_ns: String,
    server_ns: String,
    client_if: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Pair {
    fn new() -> anyhow::Result<Self> {
        let id = std::process::id() % 1_000_000;
        let p = Self {
            client_ns: format!("nrtxc{id}"),
            server_ns: format!("nrtxs{id}"),
            client_if: format!("nrtxc{id}"),
        };
        let server_if = format!("nrtxs{id}");
        ip(&["netns", "add", &p.client_ns])?;
        ip(&["netns", "add", &p.server_ns])?;
        ip(&[
            "link",
            "add",
            &p.client_if,
            "netns",
            &p.client_ns,
            "type",
            "veth",
            "peer",
            &server_if,
            "netns",
            &p.server_ns,
        ])?;
        for (ns, dev, a) in [
            (&p.client_ns, &p.client_if, CLIENT),
            (&p.server_ns, &server_if, SERVER),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{a}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(p)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.client_ns]);
        let _ = ip(&["netns", "del", &self.server_ns]);
    }
}

fn enter(ns: &str) -> anyhow::Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: a valid namespace fd for the duration of the call; only this thread moves.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

/// A private mount namespace with sysfs mounted afresh at /sys (for the current network
/// namespace).
fn own_sysfs() -> anyhow::Result<()> {
    // SAFETY: plain system calls with constant, NUL-terminated arguments; they change only
    // this (single-threaded) process's mount namespace.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNS)");
        }
        let root = c"/".as_ptr();
        if libc::mount(
            std::ptr::null(),
            root,
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("making mounts private");
        }
        let sys = c"/sys".as_ptr();
        let _ = libc::umount2(sys, libc::MNT_DETACH);
        if libc::mount(
            c"sysfs".as_ptr(),
            sys,
            c"sysfs".as_ptr(),
            0,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("mounting sysfs");
        }
    }
    Ok(())
}

/// Short TCP connections (connect, 100 bytes, the server closes first, so that TIME_WAIT
/// stays on its side and the client's ports stay free) for `secs`, one at a time; returns
/// how many.
fn traffic(secs: f64) -> anyhow::Result<u64> {
    let to: SocketAddr = format!("{SERVER}:{PORT}").parse()?;
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut n = 0;
    while Instant::now() < end {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(1))?;
        s.write_all(&[7u8; 100])?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)?;
        n += 1;
    }
    Ok(n)
}

fn delta(before: &ProgramInfo, after: &ProgramInfo) -> (u64, u64) {
    (
        after.run_time().as_nanos() as u64 - before.run_time().as_nanos() as u64,
        after.run_count() - before.run_count(),
    )
}

fn per_run(ns: u64, runs: u64) -> f64 {
    if runs == 0 {
        0.0
    } else {
        round(ns as f64 / runs as f64, 1)
    }
}

/// One phase's programs, each as (ns per run, runs).
struct Phase {
    connections: u64,
    noop: (f64, u64),
    egress: Option<(f64, u64)>,
    xmit: (f64, u64),
}

fn info(k: &mut Kernel, name: &str) -> anyhow::Result<ProgramInfo> {
    Ok(if name == XMIT {
        k.att
            .xmit_program()
            .ok_or_else(|| anyhow!("no device hook program"))?
            .info()?
    } else {
        k.att.program(name)?.info()?
    })
}

/// Loads netrace's object afresh, attaches as `netrace watch --egress-hook tc` (`watched`
/// false: tc egress and ingress, the device hook running but the device not in its map) or
/// `--egress-hook xmit` (`watched` true: tc ingress, the device hook watching the device),
/// plus the empty classifier last on egress; runs `secs` of connections.
fn phase(client_if: &str, offsets: SkbOffsets, watched: bool, secs: f64) -> anyhow::Result<Phase> {
    let mut k = Kernel::load(
        netrace_common::DEFAULT_MAX_PENDING,
        netrace_common::DEFAULT_RINGBUF_BYTES,
    )?;
    k.maps.skb_offsets.set(0, offsets, 0)?;
    if watched {
        let ifindex = netrace::node::iface::index(client_if)
            .ok_or_else(|| anyhow!("no interface {client_if}"))?;
        let netns = egress_hook::own_netns()?;
        k.maps
            .xmit_ifaces
            .insert(ifindex, egress_hook::xmit_iface(client_if, netns), 0)?;
    }
    k.att.tc_egress = !watched;
    k.att.attach(client_if, AttachMode::Tcx)?;
    k.att.program(NOOP)?.attach_with_options(
        client_if,
        TcAttachType::Egress,
        TcAttachOptions::TcxOrder(LinkOrder::last()),
    )?;
    k.att.attach_xmit()?;
    traffic(0.3)?; // warm-up: neighbours, caches, the maps' first entries
    k.drain();
    let names: &[&str] = if watched {
        &[NOOP, XMIT]
    } else {
        &[NOOP, EGRESS, XMIT]
    };
    let before = names
        .iter()
        .map(|n| info(&mut k, n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let connections = traffic(secs)?;
    let after = names
        .iter()
        .map(|n| info(&mut k, n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    k.drain();
    let d = |i: usize| {
        let (ns, runs) = delta(&before[i], &after[i]);
        (per_run(ns, runs), runs)
    };
    Ok(Phase {
        connections,
        noop: d(0),
        egress: (!watched).then(|| d(1)),
        xmit: d(names.len() - 1),
    })
}

pub fn run(quick: bool) -> anyhow::Result<Value> {
    let secs = if quick { 2.0 } else { 5.0 };
    let offsets = egress_hook::xmit_offsets().context("the device hook needs the kernel's BTF")?;
    let pair = Pair::new()?;
    // This thread watches from the client's namespace, with a /sys of that namespace (netrace
    // reads interface types there), as `ip netns exec` gives netrace; done before any other
    // thread exists, which a new mount namespace requires.
    enter(&pair.client_ns)?;
    own_sysfs()?;
    let server_ns = pair.server_ns.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_srv = Arc::clone(&stop);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || -> anyhow::Result<()> {
        enter(&server_ns)?;
        let l = TcpListener::bind(format!("{SERVER}:{PORT}"))?;
        let _ = ready_tx.send(());
        for s in l.incoming() {
            if stop_srv.load(Ordering::Relaxed) {
                break;
            }
            if let Ok(mut s) = s {
                let mut buf = [0u8; 100];
                let _ = s.read_exact(&mut buf);
            }
        }
        Ok(())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| anyhow!("the bench server did not start"))?;
    let _stats = enable_stats(Stats::RunTime).context("BPF_ENABLE_STATS")?;
    let tc = phase(&pair.client_if, offsets, false, secs)?;
    let xmit = phase(&pair.client_if, offsets, true, secs)?;
    // In the second phase the device hook also ran for the server's packets (the other end of
    // the pair, in another namespace: rejected); those runs, as many as the first phase's
    // rejected runs per connection, are taken off at the first phase's cost.
    let reject_per_conn = tc.xmit.1 as f64 / tc.connections.max(1) as f64;
    let own_runs = xmit.noop.1 as f64;
    let rejected_runs = (xmit.xmit.1 as f64 - own_runs).max(0.0);
    let watched_ns = if own_runs > 0.0 {
        (xmit.xmit.0 * xmit.xmit.1 as f64 - tc.xmit.0 * rejected_runs).max(0.0) / own_runs
    } else {
        0.0
    };
    stop.store(true, Ordering::Relaxed);
    let _ =
        TcpStream::connect_timeout(&format!("{SERVER}:{PORT}").parse()?, Duration::from_secs(1));
    let _ = server.join();
    drop(pair);
    Ok(json!({
        "secs": secs,
        "tc_hook": {
            "connections": tc.connections,
            "noop_ns": tc.noop.0, "noop_runs": tc.noop.1,
            "egress_ns": tc.egress.map(|e| e.0), "egress_runs": tc.egress.map(|e| e.1),
            "xmit_unwatched_ns": tc.xmit.0, "xmit_unwatched_runs": tc.xmit.1,
            "xmit_unwatched_runs_per_connection": round(reject_per_conn, 2),
        },
        "xmit_hook": {
            "connections": xmit.connections,
            "noop_ns": xmit.noop.0, "noop_runs": xmit.noop.1,
            "xmit_ns_all_runs": xmit.xmit.0, "xmit_runs": xmit.xmit.1,
            "xmit_watched_ns": round(watched_ns, 1),
        },
    }))
}
