//! `netrace probe HOST:PORT`: find which source ports get their SYN-ACK back, from the outside.
//!
//! The article's manual narrowing down (ping works, `nc -vv` fails sometimes, `nc -vvu` always
//! works), done methodically: TCP connects from explicitly bound source ports spread over a
//! range, bisection towards the edges of the range that gets answers, and UDP from the same
//! ports to compare. No privileges needed; the rate and the number of probes in flight are
//! bounded. See docs/probe.md.

pub mod config;
pub mod infer;
pub mod net;
pub mod summary;
pub mod udp;

use std::io::{IsTerminal as _, Write as _};
use std::path::Path;

use crate::node::NodePorts;
use crate::options::OutputFormat;

pub use self::config::ProbeConfig;

use self::infer::{infer, Plan};
use self::net::{local_addr_towards, NetOracle, Proto};

/// Runs `netrace probe`; returns the exit status.
pub fn run(cfg: &ProbeConfig) -> anyhow::Result<u8> {
    let primary = if cfg.tcp { Proto::Tcp } else { Proto::Udp };
    let compare_udp = cfg.tcp && cfg.udp;
    let plan = Plan {
        range: cfg.range,
        samples: cfg.samples,
        max_extra: cfg.max_extra,
    };
    let interactive = std::io::stderr().is_terminal();
    if interactive {
        eprintln!(
            "netrace: probing {} over {} from {} source ports in {} (at most {}/s)...",
            cfg.target,
            primary.name().to_uppercase(),
            infer::sample_ports(cfg.range, cfg.samples).len(),
            cfg.range,
            cfg.rate
        );
    }
    let mut oracle = NetOracle::new(primary, cfg.target, cfg.timeout, cfg.rate)?;
    let inference = infer(&plan, &mut oracle)?;
    let udp_records = if compare_udp {
        let ports = udp::udp_ports(cfg.range, cfg.samples, &inference.analysis);
        if interactive {
            eprintln!(
                "netrace: and UDP from {} of those ports to compare...",
                ports.len()
            );
        }
        let mut udp = NetOracle::new(Proto::Udp, cfg.target, cfg.timeout, cfg.rate)?;
        infer::Oracle::probe(&mut udp, &ports)?;
        Some(udp.records)
    } else {
        None
    };
    let setup = summary::Setup {
        target: cfg.target_text.clone(),
        address: cfg.target,
        family: if cfg.target.is_ipv4() { "ipv4" } else { "ipv6" },
        local_addr: local_addr_towards(cfg.target),
        primary,
        compare_udp,
        ports: cfg.range,
        samples: cfg.samples,
        max_extra: cfg.max_extra,
        timeout_ms: u64::try_from(cfg.timeout.as_millis()).unwrap_or(u64::MAX),
        rate: cfg.rate,
    };
    let node = NodePorts::read(Path::new("/proc"));
    let summary = summary::build(
        setup,
        &inference,
        &oracle.records,
        udp_records.as_deref(),
        &node,
    );
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match cfg.output {
        OutputFormat::Json => {
            let lines = crate::render::probe_json::json_lines(
                &summary,
                &inference,
                &oracle.records,
                udp_records.as_deref().unwrap_or_default(),
            )?;
            for line in lines {
                writeln!(out, "{line}")?;
            }
        }
        OutputFormat::Text => crate::render::probe_text::write_text(&mut out, &summary)?,
    }
    out.flush()?;
    if summary.exit_code == crate::error::exit::ERROR {
        eprintln!("netrace: {}", summary.inference.headline);
    }
    Ok(summary.exit_code)
}
