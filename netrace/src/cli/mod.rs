//! Command-line arguments, and their validation into a [`WatchConfig`] before anything touches
//! the kernel. Every problem found here is a usage error (exit 2) naming the option.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use netrace_common::{DEFAULT_MAX_PENDING, MAX_MAX_PENDING};

use crate::{
    error::UsageError,
    node::iface,
    ports::{parse_duration, PortRange},
};

/// The range the article's firewall lets SYN-ACKs back into.
pub const DEFAULT_ALLOWED: PortRange = PortRange::new(32768, 65535);
/// Bucket edges always drawn in the histogram (plus both ends of the allowed range).
pub const DEFAULT_BUCKET_EDGES: [u16; 5] = [1024, 8192, 16384, 32768, 49152];

#[derive(Parser, Debug)]
#[command(
    name = "netrace",
    version,
    about = "Which outbound TCP connections never got their SYN-ACK back, and was their source \
             port outside the range the firewall lets back in?",
    long_about = "netrace pairs every outbound TCP SYN with its SYN-ACK on a node's uplink, \
                  where the source port is the one an outside firewall sees (after SNAT), and \
                  reports connection loss by source-port range with a verdict and a fix.\n\n\
                  Exit status: 0 no connection lost, 1 connections lost, 2 error.",
    after_help = "Examples:\n  sudo netrace watch                         # the default-route interface, until Ctrl-C\n  \
                  sudo netrace watch --iface eth0 --duration 5m --list-lost\n  \
                  sudo netrace watch --output json | jq 'select(.outcome==\"lost\")'"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Pair outbound SYNs with their answers and report loss by source-port range.
    Watch(Box<WatchArgs>),
    /// Find which source ports get their SYN-ACK back from HOST:PORT (no root needed).
    Probe(Box<crate::probe::ProbeArgs>),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on standard output.
    Man,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// A histogram, verdict and fix for a terminal.
    Text,
    /// One JSON object per connection outcome, then a summary object (see docs/json.md).
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttachMode {
    /// TCX links where the kernel has them (6.6+), else a clsact filter.
    Auto,
    /// TCX links only; fail on older kernels.
    Tcx,
    /// Legacy clsact filters named netrace_egress / netrace_ingress.
    Clsact,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Interface to watch (repeatable; `*` and `?` globs allowed, e.g. 'eth*').
    /// Default: the interface carrying the default route.
    #[arg(short, long = "iface", value_name = "IFACE", help_heading = "Where")]
    pub ifaces: Vec<String>,

    /// Attachment: TCX links (kernel 6.6+) or legacy clsact filters.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto, help_heading = "Where")]
    pub attach: AttachMode,

    /// Source ports the outside firewall lets SYN-ACKs back into.
    #[arg(
        long,
        value_name = "A-B",
        default_value = "32768-65535",
        help_heading = "Analysis"
    )]
    pub allowed_ports: String,

    /// Histogram bucket edges, comma separated (both ends of the allowed range are always added).
    #[arg(
        long,
        value_name = "P,P,..",
        default_value = "1024,8192,16384,32768,49152",
        allow_negative_numbers = true,
        help_heading = "Analysis"
    )]
    pub buckets: String,

    /// A SYN without an answer after this long is reported lost (e.g. 500ms, 3s).
    #[arg(
        long,
        value_name = "D",
        default_value = "3s",
        allow_negative_numbers = true,
        help_heading = "Analysis"
    )]
    pub syn_timeout: String,

    /// Stop after this long (e.g. 30s, 5m). Default: until Ctrl-C or SIGTERM.
    #[arg(
        long,
        value_name = "D",
        allow_negative_numbers = true,
        help_heading = "Analysis"
    )]
    pub duration: Option<String>,

    /// Track only connections to this network (e.g. 203.0.113.0/24, 2001:db8::/32).
    #[arg(long, value_name = "CIDR", help_heading = "Filter")]
    pub filter_dst: Option<String>,

    /// Track only connections to this destination port.
    #[arg(
        long,
        value_name = "PORT",
        allow_negative_numbers = true,
        help_heading = "Filter"
    )]
    pub filter_dport: Option<String>,

    /// Output format on standard output.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text, help_heading = "Output")]
    pub output: OutputFormat,

    /// Also draw the histogram as an SVG chart into FILE.
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    pub svg: Option<PathBuf>,

    /// List every lost connection in the text report.
    #[arg(long, help_heading = "Output")]
    pub list_lost: bool,

    /// Write this file once the programs are attached (for scripts and tests).
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    pub ready_file: Option<PathBuf>,

    /// Capacity of the kernel's pending-SYN map (SYNs beyond it are counted, not tracked).
    #[arg(
        long,
        value_name = "N",
        default_value_t = DEFAULT_MAX_PENDING,
        allow_negative_numbers = true,
        help_heading = "Limits"
    )]
    pub max_pending: u32,

    /// Ring-buffer size in KiB (a power of two, at least 4).
    #[arg(
        long,
        value_name = "KIB",
        default_value_t = 4096,
        allow_negative_numbers = true,
        help_heading = "Limits"
    )]
    pub ringbuf_kib: u32,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9477).
    #[arg(long, value_name = "ADDR", help_heading = "Output")]
    pub metrics_addr: Option<String>,

    /// Pod-side interface (the host end of a pod's veth; repeatable, globs allowed): link each
    /// uplink connection to the pod's own address and port, by the SYN's sequence number.
    #[arg(long = "pod-iface", value_name = "IFACE", help_heading = "Attribution")]
    pub pod_ifaces: Vec<String>,

    /// Treat every other interface (not --iface, not lo) as pod-side.
    #[arg(long, help_heading = "Attribution")]
    pub all_interfaces: bool,

    /// Name the process (pid, command, cgroup, pod UID) behind each connection, from the
    /// sock:inet_sock_set_state tracepoint. On by default with --pod-iface/--all-interfaces.
    #[arg(long, help_heading = "Attribution")]
    pub processes: bool,

    /// Do not attach the tracepoint, even with --pod-iface.
    #[arg(long, conflicts_with = "processes", help_heading = "Attribution")]
    pub no_processes: bool,

    /// Where the node's procfs is mounted. Default: /host/proc when it is mounted (a debug
    /// pod or DaemonSet), else /proc.
    #[arg(long, value_name = "DIR", help_heading = "Limits")]
    pub procfs: Option<PathBuf>,
}

/// The node's procfs as seen from a pod that mounts it (kubectl debug, the DaemonSet).
const HOST_PROCFS: &str = "/host/proc";

fn default_procfs() -> PathBuf {
    let host = Path::new(HOST_PROCFS);
    if host.join("sys/net").is_dir() {
        host.to_path_buf()
    } else {
        PathBuf::from("/proc")
    }
}

/// A destination network to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("'{s}' is not an address or network like 203.0.113.0/24"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = if p.is_empty() {
            max
        } else {
            p.parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("'{s}': the prefix length must be 0-{max}"))?
        };
        Ok(Self { addr, prefix_len })
    }
}

/// Everything `netrace watch` needs, checked.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    pub ifaces: Vec<String>,
    pub attach: AttachMode,
    pub allowed: PortRange,
    pub bucket_edges: Vec<u16>,
    pub syn_timeout: Duration,
    pub duration: Option<Duration>,
    pub filter_dst: Option<Cidr>,
    pub filter_dport: Option<u16>,
    pub output: OutputFormat,
    pub svg: Option<PathBuf>,
    pub list_lost: bool,
    pub ready_file: Option<PathBuf>,
    pub max_pending: u32,
    pub ringbuf_bytes: u32,
    pub procfs: PathBuf,
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Pod-side interfaces (their ingress carries the pods' own SYNs).
    pub pod_ifaces: Vec<String>,
    /// Attach the socket-state tracepoint for process attribution.
    pub processes: bool,
}

fn usage(option: &str, msg: impl std::fmt::Display) -> UsageError {
    UsageError(format!("{option}: {msg}"))
}

impl WatchArgs {
    /// Validates every option; interfaces are resolved against the running system.
    pub fn validate(&self) -> Result<WatchConfig, UsageError> {
        let allowed: PortRange = self
            .allowed_ports
            .parse()
            .map_err(|e| usage("--allowed-ports", e))?;
        let syn_timeout =
            parse_duration(&self.syn_timeout).map_err(|e| usage("--syn-timeout", e))?;
        let duration = self
            .duration
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|e| usage("--duration", e))?;
        let bucket_edges = parse_edges(&self.buckets).map_err(|e| usage("--buckets", e))?;
        let filter_dst = self
            .filter_dst
            .as_deref()
            .map(str::parse::<Cidr>)
            .transpose()
            .map_err(|e| usage("--filter-dst", e))?;
        let filter_dport = self
            .filter_dport
            .as_deref()
            .map(|p| match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("'{p}' is not a port (1-65535)")),
            })
            .transpose()
            .map_err(|e| usage("--filter-dport", e))?;
        if self.max_pending == 0 || self.max_pending > MAX_MAX_PENDING {
            return Err(usage(
                "--max-pending",
                format!("must be 1-{MAX_MAX_PENDING}, got {}", self.max_pending),
            ));
        }
        let kib = self.ringbuf_kib;
        if kib < 4 || !kib.is_power_of_two() || kib > 1 << 20 {
            return Err(usage(
                "--ringbuf-kib",
                format!("must be a power of two from 4 to 1048576, got {kib}"),
            ));
        }
        // Files written later (the ready file once attached) are checked now, before the
        // kernel is touched.
        for (option, file) in [("--svg", &self.svg), ("--ready-file", &self.ready_file)] {
            let dir = file
                .as_deref()
                .and_then(std::path::Path::parent)
                .filter(|d| !d.as_os_str().is_empty());
            if let Some(dir) = dir {
                if !dir.is_dir() {
                    return Err(usage(
                        option,
                        format!("directory {} does not exist", dir.display()),
                    ));
                }
            }
        }
        let procfs = self.procfs.clone().unwrap_or_else(default_procfs);
        if !procfs.join("sys/net").is_dir() {
            return Err(usage(
                "--procfs",
                format!("{} does not look like a procfs mount", procfs.display()),
            ));
        }
        let metrics_addr = self
            .metrics_addr
            .as_deref()
            .map(|a| {
                a.parse::<std::net::SocketAddr>()
                    .map_err(|_| format!("'{a}' is not an address:port like 0.0.0.0:9477"))
            })
            .transpose()
            .map_err(|e| usage("--metrics-addr", e))?;
        let ifaces = iface::resolve(&self.ifaces, &procfs).map_err(|e| usage("--iface", e))?;
        let mut pod_ifaces = if self.pod_ifaces.is_empty() {
            Vec::new()
        } else {
            iface::resolve(&self.pod_ifaces, &procfs).map_err(|e| usage("--pod-iface", e))?
        };
        if self.all_interfaces {
            pod_ifaces.extend(iface::all_interfaces());
        }
        pod_ifaces.retain(|p| p != "lo" && !ifaces.contains(p));
        pod_ifaces.sort();
        pod_ifaces.dedup();
        if let Some(p) = self.pod_ifaces.iter().find(|p| ifaces.contains(p)) {
            return Err(usage(
                "--pod-iface",
                format!("'{p}' is also an --iface: an interface is either the uplink or pod-side"),
            ));
        }
        let processes = !self.no_processes && (self.processes || !pod_ifaces.is_empty());
        Ok(WatchConfig {
            ifaces,
            attach: self.attach,
            allowed,
            bucket_edges,
            syn_timeout,
            duration,
            filter_dst,
            filter_dport,
            output: self.output,
            svg: self.svg.clone(),
            list_lost: self.list_lost,
            ready_file: self.ready_file.clone(),
            max_pending: self.max_pending,
            ringbuf_bytes: kib * 1024,
            procfs,
            metrics_addr,
            pod_ifaces,
            processes,
        })
    }
}

fn parse_edges(s: &str) -> Result<Vec<u16>, String> {
    let mut edges = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<u16>() {
            Ok(n) if n > 0 => edges.push(n),
            _ => return Err(format!("'{part}' is not a port (1-65535)")),
        }
    }
    edges.sort_unstable();
    edges.dedup();
    Ok(edges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c: Cidr = "198.18.0.0/15".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.prefix_len, 15);
        assert_eq!("2001:db8::1".parse::<Cidr>().map(|c| c.prefix_len), Ok(128));
        assert!("198.18.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn edges() {
        assert_eq!(parse_edges("49152, 1024,1024"), Ok(vec![1024, 49152]));
        assert!(parse_edges("1024,x").is_err());
        assert!(parse_edges("0").is_err());
    }
}
