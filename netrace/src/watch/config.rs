//! Everything `netrace watch` needs, checked before the kernel is touched: [`WatchConfig`],
//! built from the command line's [`WatchArgs`]. Every problem found here is a usage error
//! (exit 2) naming the option. The checked config then builds the parts of a run (kernel
//! filter, tracker, histogram, metrics), so no one assembles them field by field.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use netrace_common::{KernelFilter, MAX_MAX_PENDING};

use crate::{
    cli::WatchArgs,
    error::UsageError,
    kernel::events::addr_bytes,
    metrics::Metrics,
    node::{iface, NodePorts},
    options::{AttachMode, Cidr, EgressHook, Events, OutputFormat},
    ports::{parse_duration, PortRange},
    track::{
        stats::Histogram,
        tracker::{self, Tracker},
    },
};

/// How long a connection reported lost is still paired with a late answer by its kernel
/// entry. Linux gives up on a connect after about 127 s (tcp_syn_retries = 6); after this
/// window the tracker remembers the lost attempt in user space until then.
pub const LATE_WINDOW: Duration = Duration::from_secs(60);

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

/// The node's root as seen from a pod that mounts it (the DaemonSet mounts it at /host).
const HOST_ROOT: &str = "/host";

fn default_host_root() -> PathBuf {
    let host = Path::new(HOST_ROOT);
    if host.join("var/log/pods").is_dir() {
        host.to_path_buf()
    } else {
        PathBuf::from("/")
    }
}

/// Everything `netrace watch` needs, checked.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    pub ifaces: Vec<String>,
    pub attach: AttachMode,
    pub egress_hook: EgressHook,
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
    pub metrics_addr: Option<SocketAddr>,
    /// Pod-side interfaces (their ingress carries the pods' own SYNs).
    pub pod_ifaces: Vec<String>,
    /// Attach the socket-state tracepoint for process attribution.
    pub processes: bool,
    /// `--interval`: how often to summarise the last stretch.
    pub interval: Option<Duration>,
    /// Which outcomes are streamed as they are decided.
    pub events: Events,
    /// The node's root filesystem (for `/var/log/pods`).
    pub host_root: PathBuf,
    /// The node's cgroup2 tree, when given.
    pub cgroup_root: Option<PathBuf>,
}

fn usage(option: &str, msg: impl std::fmt::Display) -> UsageError {
    UsageError(format!("{option}: {msg}"))
}

impl WatchConfig {
    /// Validates every option; interfaces are resolved against the running system.
    pub fn from_args(args: &WatchArgs) -> Result<Self, UsageError> {
        let allowed: PortRange = args
            .allowed_ports
            .parse()
            .map_err(|e| usage("--allowed-ports", e))?;
        let syn_timeout =
            parse_duration(&args.syn_timeout).map_err(|e| usage("--syn-timeout", e))?;
        let duration = args
            .duration
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|e| usage("--duration", e))?;
        let bucket_edges = parse_edges(&args.buckets).map_err(|e| usage("--buckets", e))?;
        let (filter_dst, filter_dport) =
            parse_filters(args.filter_dst.as_deref(), args.filter_dport.as_deref())?;
        if args.max_pending == 0 || args.max_pending > MAX_MAX_PENDING {
            return Err(usage(
                "--max-pending",
                format!("must be 1-{MAX_MAX_PENDING}, got {}", args.max_pending),
            ));
        }
        let kib = args.ringbuf_kib;
        if kib < 4 || !kib.is_power_of_two() || kib > 1 << 20 {
            return Err(usage(
                "--ringbuf-kib",
                format!("must be a power of two from 4 to 1048576, got {kib}"),
            ));
        }
        check_output_dirs(args)?;
        let procfs = args.procfs.clone().unwrap_or_else(default_procfs);
        if !procfs.join("sys/net").is_dir() {
            return Err(usage(
                "--procfs",
                format!("{} does not look like a procfs mount", procfs.display()),
            ));
        }
        let metrics_addr = args
            .metrics_addr
            .as_deref()
            .map(|a| {
                a.parse::<SocketAddr>()
                    .map_err(|_| format!("'{a}' is not an address:port like 0.0.0.0:9477"))
            })
            .transpose()
            .map_err(|e| usage("--metrics-addr", e))?;
        let interval = args
            .interval
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|e| usage("--interval", e))?;
        let events = args.events.unwrap_or(match args.output {
            OutputFormat::Json => Events::All,
            OutputFormat::Text => Events::None,
        });
        let host_root = args.host_root.clone().unwrap_or_else(default_host_root);
        if !host_root.is_dir() {
            return Err(usage(
                "--host-root",
                format!("{} is not a directory", host_root.display()),
            ));
        }
        if let Some(c) = args
            .cgroup_root
            .as_ref()
            .filter(|c| !c.join("cgroup.controllers").is_file())
        {
            return Err(usage(
                "--cgroup-root",
                format!(
                    "{} is not a cgroup2 mount (no cgroup.controllers)",
                    c.display()
                ),
            ));
        }
        let (ifaces, pod_ifaces) = resolve_interfaces(args, &procfs)?;
        let processes = !args.no_processes && (args.processes || !pod_ifaces.is_empty());
        Ok(Self {
            ifaces,
            attach: args.attach,
            egress_hook: args.egress_hook,
            allowed,
            bucket_edges,
            syn_timeout,
            duration,
            filter_dst,
            filter_dport,
            output: args.output,
            svg: args.svg.clone(),
            list_lost: args.list_lost,
            ready_file: args.ready_file.clone(),
            max_pending: args.max_pending,
            ringbuf_bytes: kib * 1024,
            procfs,
            metrics_addr,
            pod_ifaces,
            processes,
            interval,
            events,
            host_root,
            cgroup_root: args.cgroup_root.clone(),
        })
    }

    /// What the kernel programs keep (`--filter-dst`, `--filter-dport`).
    pub fn kernel_filter(&self) -> KernelFilter {
        let mut f = kernel_filter(self.filter_dst, self.filter_dport);
        // Attribution pairs SYNs and answers one by one; per-connection output needs every
        // answered connection. Otherwise the kernel counts answers in its books.
        if self.correlating() {
            f.send |= netrace_common::SEND_SYNS | netrace_common::SEND_ANSWERS;
        }
        if self.events == Events::All {
            f.send |= netrace_common::SEND_ANSWERS;
        }
        f
    }

    /// An empty histogram over the configured buckets.
    pub fn histogram(&self) -> Histogram {
        Histogram::new(self.allowed, &self.bucket_edges)
    }

    /// A tracker with the configured timeout and the late window, remembering lost attempts
    /// for the node's SYN-retry horizon.
    pub fn tracker(&self, node: &NodePorts) -> Tracker {
        Tracker::new(
            self.syn_timeout.as_nanos() as u64,
            LATE_WINDOW.as_nanos() as u64,
        )
        .with_retry_horizon(
            tracker::retry_horizon_ns(node.tcp_syn_retries.unwrap_or(6)),
            tracker::MAX_LOST_MEMORY,
        )
    }

    /// The metrics, labelled with the histogram's buckets.
    pub fn metrics(&self) -> Metrics {
        Metrics::new(
            self.histogram().buckets.iter().map(|b| b.range()).collect(),
            self.allowed,
            &self.ifaces,
        )
    }

    /// Whether pod or process attribution is on.
    pub fn correlating(&self) -> bool {
        !self.pod_ifaces.is_empty() || self.processes
    }
}

/// Files written later (the ready file once attached) are checked now, before the kernel is
/// touched.
fn check_output_dirs(args: &WatchArgs) -> Result<(), UsageError> {
    for (option, file) in [("--svg", &args.svg), ("--ready-file", &args.ready_file)] {
        check_dir_of(option, file.as_deref())?;
    }
    Ok(())
}

/// The directory an output file will be written into must exist.
pub(crate) fn check_dir_of(option: &str, file: Option<&Path>) -> Result<(), UsageError> {
    let dir = file
        .and_then(Path::parent)
        .filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        if !dir.is_dir() {
            return Err(usage(
                option,
                format!("directory {} does not exist", dir.display()),
            ));
        }
    }
    Ok(())
}

/// The uplink interfaces and the pod-side ones, resolved and kept apart.
fn resolve_interfaces(
    args: &WatchArgs,
    procfs: &Path,
) -> Result<(Vec<String>, Vec<String>), UsageError> {
    let ifaces = iface::resolve(&args.ifaces, procfs).map_err(|e| usage("--iface", e))?;
    let mut pod_ifaces = if args.pod_ifaces.is_empty() {
        Vec::new()
    } else {
        iface::resolve(&args.pod_ifaces, procfs).map_err(|e| usage("--pod-iface", e))?
    };
    if args.all_interfaces {
        pod_ifaces.extend(iface::all_interfaces());
    }
    pod_ifaces.retain(|p| p != "lo" && !ifaces.contains(p));
    pod_ifaces.sort();
    pod_ifaces.dedup();
    if let Some(p) = args.pod_ifaces.iter().find(|p| ifaces.contains(p)) {
        return Err(usage(
            "--pod-iface",
            format!("'{p}' is also an --iface: an interface is either the uplink or pod-side"),
        ));
    }
    Ok((ifaces, pod_ifaces))
}

/// The destination filter for `--filter-dst` and `--filter-dport` (what the kernel keeps in
/// `watch`, what the pairing rules keep in `analyze`).
pub fn kernel_filter(filter_dst: Option<Cidr>, filter_dport: Option<u16>) -> KernelFilter {
    let mut f = KernelFilter {
        dst_port: filter_dport.unwrap_or(0),
        ..Default::default()
    };
    if let Some(c) = filter_dst {
        let (family, bytes) = addr_bytes(c.addr);
        f.dst_family = family;
        f.dst_prefix_len = c.prefix_len;
        f.dst_net = bytes;
    }
    f
}

/// A port, 1-65535 (`--filter-dport`).
/// `--filter-dst` and `--filter-dport`, as `watch` and `analyze` both take them.
pub(crate) fn parse_filters(
    dst: Option<&str>,
    dport: Option<&str>,
) -> Result<(Option<Cidr>, Option<u16>), UsageError> {
    let dst = dst
        .map(str::parse::<Cidr>)
        .transpose()
        .map_err(|e| usage("--filter-dst", e))?;
    let dport = dport
        .map(parse_port)
        .transpose()
        .map_err(|e| usage("--filter-dport", e))?;
    Ok((dst, dport))
}

pub(crate) fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("'{p}' is not a port (1-65535)")),
    }
}

/// Histogram bucket edges (`--buckets`), sorted, without repeats.
pub(crate) fn parse_edges(s: &str) -> Result<Vec<u16>, String> {
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
    fn edges() {
        assert_eq!(parse_edges("49152, 1024,1024"), Ok(vec![1024, 49152]));
        assert!(parse_edges("1024,x").is_err());
        assert!(parse_edges("0").is_err());
    }
}
