//! Everything `netrace probe` needs, checked: [`ProbeConfig`], built from the command line's
//! [`ProbeArgs`]. Every problem is a usage error (exit 2) naming the option.

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::time::Duration;

use crate::cli::ProbeArgs;
use crate::error::UsageError;
use crate::options::OutputFormat;
use crate::ports::{parse_duration, PortRange};

/// Highest `--rate`: probes started per second.
pub const MAX_RATE: f64 = 200.0;
/// Most `--samples`.
pub const MAX_SAMPLES: u32 = 4096;
/// Most `--max-extra`.
pub const MAX_EXTRA: u32 = 256;
/// Longest `--timeout`.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30);

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

impl ProbeConfig {
    /// Checks every option and resolves the target (a name is looked up once; the first
    /// address is probed).
    pub fn from_args(args: &ProbeArgs) -> Result<Self, UsageError> {
        let text = args.target.as_deref().map(str::trim).unwrap_or_default();
        if text.is_empty() {
            return Err(UsageError(
                "probe needs the server to probe as HOST:PORT, e.g. netrace probe \
                 203.0.113.10:443"
                    .to_string(),
            ));
        }
        let (host, port) = split_target(text).map_err(|e| usage("probe", e))?;
        let range: PortRange = args.ports.parse().map_err(|e| usage("--ports", e))?;
        if !(2..=MAX_SAMPLES).contains(&args.samples) {
            return Err(usage(
                "--samples",
                format!("must be 2-{MAX_SAMPLES}, got {}", args.samples),
            ));
        }
        if args.max_extra > MAX_EXTRA {
            return Err(usage(
                "--max-extra",
                format!("must be 0-{MAX_EXTRA}, got {}", args.max_extra),
            ));
        }
        let timeout = parse_duration(&args.timeout).map_err(|e| usage("--timeout", e))?;
        if timeout > MAX_TIMEOUT {
            return Err(usage(
                "--timeout",
                format!(
                    "must be at most {}s, got {}",
                    MAX_TIMEOUT.as_secs(),
                    args.timeout
                ),
            ));
        }
        if !(args.rate.is_finite() && args.rate > 0.0 && args.rate <= MAX_RATE) {
            return Err(usage(
                "--rate",
                format!(
                    "must be more than 0 and at most {MAX_RATE} probes per second, got {}",
                    args.rate
                ),
            ));
        }
        let target = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| usage("probe", format!("cannot resolve '{host}': {e}")))?
            .next()
            .ok_or_else(|| usage("probe", format!("'{host}' has no address")))?;
        let (tcp, udp) = match (args.tcp, args.udp) {
            (false, false) => (true, true),
            flags => flags,
        };
        Ok(Self {
            target_text: text.to_string(),
            target,
            tcp,
            udp,
            range,
            samples: args.samples,
            max_extra: args.max_extra,
            timeout,
            rate: args.rate,
            output: args.output,
        })
    }
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
        ProbeConfig::from_args(&w.args).map_err(|e| e.0)
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
