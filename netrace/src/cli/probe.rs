//! The arguments of `netrace probe`, as typed. Checked into a `ProbeConfig` by
//! `probe::config`.

use clap::Args;

use crate::options::OutputFormat;

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
