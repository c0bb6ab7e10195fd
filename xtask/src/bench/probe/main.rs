//! The kernel half of `cargo xtask bench`, run by it (see `xtask/src/bench/mod.rs`): netrace's
//! kernel programs through `BPF_PROG_TEST_RUN`, its maps, its tracker. An example of the xtask
//! package because it links the `netrace` library, whose build needs the BPF toolchain that
//! `cargo xtask` itself installs: xtask proper must build without it.
//!
//! `bench_probe per-packet|loss|xmit [--quick]`, `bench_probe scale N`: one JSON object on standard
//! output; progress and errors on standard error. `bench_probe hold-noop IFACE READY_FILE
//! [--stats]`: the empty classifier on the interface until SIGINT (the traffic figures' floor),
//! with the kernel's run-time statistics on while it holds it if asked. Needs root.

mod floor;
mod frames;
mod kernel;
mod loss;
mod per_packet;
mod scale;
mod stats;
mod xmit;

use std::process::ExitCode;

use anyhow::{anyhow, bail};

fn run() -> anyhow::Result<serde_json::Value> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    match args.first().map(String::as_str) {
        Some("per-packet") => per_packet::run(quick),
        Some("loss") => loss::run(quick),
        Some("xmit") => xmit::run(quick),
        Some("scale") => {
            let n = args
                .get(1)
                .and_then(|n| n.parse::<u32>().ok())
                .ok_or_else(|| anyhow!("usage: bench_probe scale N"))?;
            scale::run(n)
        }
        Some("hold-noop") => match (args.get(1), args.get(2)) {
            (Some(iface), Some(ready)) => floor::run(
                iface,
                std::path::Path::new(ready),
                args.iter().any(|a| a == "--stats"),
            ),
            _ => bail!("usage: bench_probe hold-noop IFACE READY_FILE [--stats]"),
        },
        _ => bail!(
            "usage: bench_probe per-packet|loss|xmit [--quick] | scale N | hold-noop IFACE \
             READY_FILE [--stats]"
        ),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench_probe: {e:#}");
            ExitCode::FAILURE
        }
    }
}
