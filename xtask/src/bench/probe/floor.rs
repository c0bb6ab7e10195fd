//! The floor of the traffic figures: netrace's empty classifier (`netrace_noop`, from the same
//! object) attached to egress and ingress of an interface the way `netrace watch` attaches its
//! programs (TCX, first in line), held until SIGINT or SIGTERM, then detached.
//!
//! `bench_probe hold-noop IFACE READY_FILE [--stats]`, run inside the interface's namespace:
//! the ready file appears once both are attached. With `--stats` it also holds the kernel's
//! run-time statistics of every BPF program on (`BPF_ENABLE_STATS`) until it stops: the
//! statistics cost two clock reads per program run, so they are on only while held.

use std::path::Path;

use anyhow::{bail, Context as _};
use aya::{
    programs::{tc::TcAttachOptions, LinkOrder, TcAttachType},
    sys::{enable_stats, Stats},
};
use serde_json::{json, Value};

use crate::kernel::{Kernel, NOOP};

/// Blocks SIGINT and SIGTERM in this thread (and the threads it starts), to take them with
/// `sigwait`; returns the set.
fn block_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: a zeroed sigset_t is valid storage; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid, writable storage for a signal set.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        bail!("blocking SIGINT and SIGTERM failed ({rc})");
    }
    Ok(set)
}

pub fn run(iface: &str, ready: &Path, stats: bool) -> anyhow::Result<Value> {
    let set = block_signals()?;
    let _stats = stats
        .then(|| enable_stats(Stats::RunTime))
        .transpose()
        .context("BPF_ENABLE_STATS")?;
    let mut k = Kernel::load(1024, 4096)?;
    let prog = k.att.program(NOOP)?;
    let mut links = Vec::new();
    for ty in [TcAttachType::Egress, TcAttachType::Ingress] {
        let id = prog
            .attach_with_options(iface, ty, TcAttachOptions::TcxOrder(LinkOrder::first()))
            .with_context(|| format!("attaching {NOOP} to {iface} ({ty:?})"))?;
        links.push(id);
    }
    std::fs::write(ready, b"ready\n").with_context(|| format!("writing {}", ready.display()))?;
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is an initialised signal set blocked in this thread; `sig` is writable.
    let rc = unsafe { libc::sigwait(&set, &mut sig) };
    if rc != 0 {
        bail!("sigwait failed ({rc})");
    }
    let prog = k.att.program(NOOP)?;
    let mut detached = 0;
    for id in links {
        prog.detach(id)
            .with_context(|| format!("detaching {NOOP} from {iface}"))?;
        detached += 1;
    }
    Ok(json!({"iface": iface, "detached": detached, "signal": sig, "stats": stats}))
}
