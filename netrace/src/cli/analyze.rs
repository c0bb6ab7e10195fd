//! The arguments of `netrace analyze`, as typed. Checked into an `AnalyzeConfig` by
//! `analyze::config`. The options mean what they mean for `watch`.

use std::path::PathBuf;

use clap::Args;

use crate::options::OutputFormat;

#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    /// Capture files (pcap or pcapng, plain or gzip; `-` for standard input). Several files are
    /// read as one capture in time order: the uplink and the pod side, or a rotated capture.
    #[arg(value_name = "FILE", required = true, help_heading = "Where")]
    pub files: Vec<PathBuf>,

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

    /// A SYN without an answer this long after it (in capture time) is reported lost.
    #[arg(
        long,
        value_name = "D",
        default_value = "3s",
        allow_negative_numbers = true,
        help_heading = "Analysis"
    )]
    pub syn_timeout: String,

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
}
