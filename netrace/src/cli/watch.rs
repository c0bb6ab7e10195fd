//! The arguments of `netrace watch`, as typed. Checked into a `WatchConfig` by
//! `watch::config`.

use std::path::PathBuf;

use clap::Args;
use netrace_common::DEFAULT_MAX_PENDING;

use crate::options::{AttachMode, EgressHook, Events, OutputFormat};

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Interface to watch (repeatable; `*` and `?` globs allowed, e.g. 'eth*').
    /// Default: the interface carrying the default route.
    #[arg(short, long = "iface", value_name = "IFACE", help_heading = "Where")]
    pub ifaces: Vec<String>,

    /// Attachment: TCX links (kernel 6.6+) or legacy clsact filters.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto, help_heading = "Where")]
    pub attach: AttachMode,

    /// Where outbound SYNs are seen: tc egress, or the device (after every tc program and any
    /// BPF SNAT); auto picks the device when another program is on the uplink's egress.
    #[arg(long, value_enum, default_value_t = EgressHook::Auto, help_heading = "Where")]
    pub egress_hook: EgressHook,

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

    /// Room in the kernel's pending-SYN table: at least N SYNs waiting for an answer (the
    /// table has twice as many slots, 336 bytes per 8, plus 336 KiB for the SYNs in flight;
    /// SYNs it cannot place are counted, not tracked).
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

    /// Every D (e.g. 1m, 30s), a summary of the last D on standard error (attempts, answered,
    /// lost, inside vs outside the allowed range, the verdict so far), and with --output json
    /// a `"type":"interval"` object.
    #[arg(
        long,
        value_name = "D",
        allow_negative_numbers = true,
        help_heading = "Output"
    )]
    pub interval: Option<String>,

    /// Stream connection outcomes as they are decided: all, lost (everything but answered) or
    /// none. Default: all with --output json, none with text.
    #[arg(long, value_enum, value_name = "WHICH", help_heading = "Output")]
    pub events: Option<Events>,

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

    /// The node's root filesystem, for naming pods from its /var/log/pods (e.g. /host in a
    /// pod). Default: /host when /host/var/log/pods exists, else /.
    #[arg(long, value_name = "DIR", help_heading = "Attribution")]
    pub host_root: Option<PathBuf>,

    /// The node's cgroup2 tree, for naming a process's cgroup and pod (e.g.
    /// /host/sys/fs/cgroup in a pod). Default: where cgroup2 is mounted in netrace's view.
    #[arg(long, value_name = "DIR", help_heading = "Attribution")]
    pub cgroup_root: Option<PathBuf>,

    /// Where the node's procfs is mounted. Default: /host/proc when it is mounted (a debug
    /// pod or DaemonSet), else /proc.
    #[arg(long, value_name = "DIR", help_heading = "Limits")]
    pub procfs: Option<PathBuf>,
}
