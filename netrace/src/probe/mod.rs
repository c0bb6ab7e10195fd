//! `netrace probe HOST:PORT`: find which source ports get their SYN-ACK back, from the outside.
//!
//! The article's manual narrowing down (ping works, `nc -vv` fails sometimes, `nc -vvu` always
//! works), done methodically: TCP connects from explicitly bound source ports spread over a
//! range, bisection towards the edges of the range that gets answers, and UDP from the same
//! ports to compare. No privileges needed; the rate and the number of probes in flight are
//! bounded. See docs/probe.md.

pub mod infer;
pub mod net;
pub mod report;

use std::io::{IsTerminal as _, Write as _};
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::Path;
use std::time::Duration;

use clap::Args;

use crate::cli::OutputFormat;
use crate::error::UsageError;
use crate::node::NodePorts;
use crate::ports::{parse_duration, PortRange};

use self::infer::{infer, Plan};
use self::net::{local_addr_towards, NetOracle, Proto};

/// Highest `--rate`: probes started per second.
pub const MAX_RATE: f64 = 200.0;
/// Most `--samples`.
pub const MAX_SAMPLES: u32 = 4096;
/// Most `--max-extra`.
pub const MAX_EXTRA: u32 = 256;
/// Longest `--timeout`.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30);

/// Arguments of `netrace probe`.
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    netrace probe 203.0.113.10:443                  # TCP over 1024-65535, UDP to compare\n  \
    netrace probe db.example.com:5432 --tcp --ports 20000-40000 --samples 64\n  \
    netrace probe [2001:db8::10]:443 --output json | jq 'select(.type==\"summary\")'\n\n\
    Exit status: 0 every probe got an answer, 1 some got none, 2 error.")]
pub struct ProbeArgs {
    /// The server to probe, as HOST:PORT (a name, an IPv4 address, or [IPv6]:PORT).
    #[arg(value_name = "HOST:PORT")]
    pub target: Option<String>,

    /// Probe TCP (default: TCP, and UDP to compare).
    #[arg(long)]
    pub tcp: bool,

    /// Probe UDP (default: TCP, and UDP to compare). With --udp alone the edges of the UDP
    /// range are searched.
    #[arg(long)]
    pub udp: bool,

    /// Source ports to probe from.
    #[arg(long, value_name = "A-B", default_value = "1024-65535")]
    pub ports: String,

    /// Ports probed first, spread evenly over --ports (both ends included).
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub samples: u32,

    /// At most this many more probes to narrow the edges down by bisection (0: none).
    #[arg(long, value_name = "N", default_value_t = 40)]
    pub max_extra: u32,

    /// A probe without an answer after this long gets "timeout" (e.g. 300ms, 2s). The default
    /// leaves room for one SYN retransmission.
    #[arg(long, value_name = "D", default_value = "1500ms")]
    pub timeout: String,

    /// Start at most this many probes per second (at most 200).
    #[arg(long, value_name = "R", default_value_t = 50.0)]
    pub rate: f64,

    /// Output format: text (a table, the inferred range and the fix) or json (one object per
    /// probe, then a summary; see docs/probe.md).
    #[arg(long, value_enum, default_value_t = OutputFormat::Text, hide_possible_values = true)]
    pub output: OutputFormat,
}

/// Everything `netrace probe` needs, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeConfig {
    /// HOST:PORT as given.
    pub target_text: String,
    pub target: SocketAddr,
    pub tcp: bool,
    pub udp: bool,
    pub range: PortRange,
    pub samples: u32,
    pub max_extra: u32,
    pub timeout: Duration,
    pub rate: f64,
    pub output: OutputFormat,
}

fn usage(option: &str, msg: impl std::fmt::Display) -> UsageError {
    UsageError(format!("{option}: {msg}"))
}

/// Splits `HOST:PORT` (`[v6]:PORT` for IPv6 addresses) and checks the port.
pub fn split_target(s: &str) -> Result<(String, u16), String> {
    let example = "like 203.0.113.10:443, db.example.com:5432 or [2001:db8::10]:443";
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("'{s}' is not HOST:PORT ({example})"))?;
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6,
        None if host.contains(':') => {
            return Err(format!(
                "'{s}': write IPv6 addresses in brackets ({example})"
            ))
        }
        None => host,
    };
    if host.is_empty() {
        return Err(format!("'{s}' has no host ({example})"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((host.to_string(), p)),
        _ => Err(format!("'{s}': '{port}' is not a port (1-65535)")),
    }
}

impl ProbeArgs {
    /// Checks every option and resolves the target (a name is looked up once; the first
    /// address is probed).
    pub fn validate(&self) -> Result<ProbeConfig, UsageError> {
        let text = self.target.as_deref().map(str::trim).unwrap_or_default();
        if text.is_empty() {
            return Err(UsageError(
                "probe needs the server to probe as HOST:PORT, e.g. netrace probe \
                 203.0.113.10:443"
                    .to_string(),
            ));
        }
        let (host, port) = split_target(text).map_err(|e| usage("probe", e))?;
        let range: PortRange = self.ports.parse().map_err(|e| usage("--ports", e))?;
        if !(2..=MAX_SAMPLES).contains(&self.samples) {
            return Err(usage(
                "--samples",
                format!("must be 2-{MAX_SAMPLES}, got {}", self.samples),
            ));
        }
        if self.max_extra > MAX_EXTRA {
            return Err(usage(
                "--max-extra",
                format!("must be 0-{MAX_EXTRA}, got {}", self.max_extra),
            ));
        }
        let timeout = parse_duration(&self.timeout).map_err(|e| usage("--timeout", e))?;
        if timeout > MAX_TIMEOUT {
            return Err(usage(
                "--timeout",
                format!(
                    "must be at most {}s, got {}",
                    MAX_TIMEOUT.as_secs(),
                    self.timeout
                ),
            ));
        }
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= MAX_RATE) {
            return Err(usage(
                "--rate",
                format!(
                    "must be more than 0 and at most {MAX_RATE} probes per second, got {}",
                    self.rate
                ),
            ));
        }
        let target = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| usage("probe", format!("cannot resolve '{host}': {e}")))?
            .next()
            .ok_or_else(|| usage("probe", format!("'{host}' has no address")))?;
        let (tcp, udp) = match (self.tcp, self.udp) {
            (false, false) => (true, true),
            flags => flags,
        };
        Ok(ProbeConfig {
            target_text: text.to_string(),
            target,
            tcp,
            udp,
            range,
            samples: self.samples,
            max_extra: self.max_extra,
            timeout,
            rate: self.rate,
            output: self.output,
        })
    }
}

/// Runs `netrace probe`; returns the exit status.
pub fn run(args: &ProbeArgs) -> anyhow::Result<u8> {
    let cfg = args.validate()?;
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
        let ports = report::udp_ports(cfg.range, cfg.samples, &inference.analysis);
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
    let setup = report::Setup {
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
    let summary = report::build(
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
            let lines = report::json_lines(
                &summary,
                &inference,
                &oracle.records,
                udp_records.as_deref().unwrap_or_default(),
            )?;
            for line in lines {
                writeln!(out, "{line}")?;
            }
        }
        OutputFormat::Text => report::write_text(&mut out, &summary)?,
    }
    out.flush()?;
    if summary.exit_code == crate::error::exit::ERROR {
        eprintln!("netrace: {}", summary.inference.headline);
    }
    Ok(summary.exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Wrapper {
        #[command(flatten)]
        args: ProbeArgs,
    }

    fn parse(argv: &[&str]) -> Result<ProbeConfig, String> {
        let w = Wrapper::try_parse_from(std::iter::once("probe").chain(argv.iter().copied()))
            .map_err(|e| e.to_string())?;
        w.args.validate().map_err(|e| e.0)
    }

    #[test]
    fn targets() {
        assert_eq!(split_target("10.0.0.1:443"), Ok(("10.0.0.1".into(), 443)));
        assert_eq!(
            split_target("[2001:db8::1]:80"),
            Ok(("2001:db8::1".into(), 80))
        );
        assert_eq!(
            split_target("db.example.com:5432"),
            Ok(("db.example.com".into(), 5432))
        );
        assert!(split_target("2001:db8::1:80").is_err_and(|e| e.contains("brackets")));
        assert!(split_target("10.0.0.1").is_err());
        assert!(split_target("10.0.0.1:0").is_err());
        assert!(split_target("10.0.0.1:70000").is_err());
        assert!(split_target(":80").is_err());
    }

    #[test]
    fn defaults_and_limits() {
        let c = parse(&["127.0.0.1:8080"]).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.tcp && c.udp);
        assert_eq!(c.range, PortRange::new(1024, 65535));
        assert_eq!(c.samples, 128);
        assert_eq!(c.rate, 50.0);
        assert_eq!(c.timeout, Duration::from_millis(1500));
        assert_eq!(c.target, SocketAddr::from(([127, 0, 0, 1], 8080)));
        let c = parse(&["[::1]:8080", "--udp", "--ports", "2000-3000"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!c.tcp && c.udp);
        assert!(c.target.is_ipv6());
        assert_eq!(c.range, PortRange::new(2000, 3000));
        let missing = parse(&[]).err().unwrap_or_default();
        assert!(missing.contains("HOST:PORT"), "{missing}");
        assert!(!missing.contains('\n'), "{missing}");
        assert!(parse(&["127.0.0.1:80", "--rate", "201"]).is_err_and(|e| e.starts_with("--rate")));
        assert!(parse(&["127.0.0.1:80", "--rate", "0"]).is_err());
        assert!(parse(&["127.0.0.1:80", "--rate", "NaN"]).is_err());
        assert!(parse(&["127.0.0.1:80", "--samples", "1"]).is_err());
        assert!(parse(&["127.0.0.1:80", "--max-extra", "1000"]).is_err());
        assert!(parse(&["127.0.0.1:80", "--timeout", "1m"]).is_err());
        assert!(parse(&["127.0.0.1:80", "--ports", "9-2"]).is_err_and(|e| e.starts_with("--ports")));
    }
}
