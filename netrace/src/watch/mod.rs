//! `netrace watch`: set up (load, attach), pump (drain, track, record), finish (judge,
//! report). This file only wires the parts together; each lives in its own file:
//!
//! - `config`: the checked options, and the parts they build (tracker, histogram, metrics);
//! - `setup`: privileges aside, everything that puts netrace in place in the kernel;
//! - `pump`: the loop from ring buffer to outcomes;
//! - `interfaces`: the attached and vanished interfaces;
//! - `finish`: the verdict, the report and the exit status.

mod answered;
pub mod config;
mod finish;
mod interfaces;
mod pump;
mod setup;

pub use self::config::WatchConfig;

use self::pump::{End, Pump, Signals};
use crate::{error::exit, node::privileges, node::NodePorts};

/// Runs `netrace watch`; returns the exit status.
pub async fn run(cfg: WatchConfig) -> anyhow::Result<u8> {
    privileges::check()?;
    privileges::raise_fd_limit();
    // Signals first, so Ctrl-C during attach ends the run cleanly instead of killing it.
    let mut signals = Signals::install()?;
    let metrics = cfg.metrics();
    let _metrics_server = setup::metrics_server(&cfg, &metrics)?;
    let node = NodePorts::read(&cfg.procfs);
    let setup::Attached {
        mut kernel,
        interfaces,
        notes,
        correlator,
        hook,
        hook_reason,
    } = setup::attach(&cfg, &metrics)?; // On this thread: its private mounts are this thread's.

    let mut pump = Pump::new(
        cfg,
        interfaces,
        correlator,
        notes,
        metrics.clone(),
        node.clone(),
        (hook, hook_reason),
    );
    let end = pump.run(&mut kernel, &mut signals).await?;

    // Detach first, then collect what is still in flight.
    metrics.set_ready(false);
    kernel.attachments.detach_all();
    let (pending_at_exit, flushed) = pump.finish(&mut kernel);
    if end == End::BrokenPipe || flushed.is_err() {
        return Ok(exit::CLEAN);
    }
    let report = finish::report(&mut pump, &kernel, node, pending_at_exit);
    finish::write(&pump, &report, end)
}
