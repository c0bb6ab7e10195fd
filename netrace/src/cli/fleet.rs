//! The arguments of `netrace fleet`, as typed. The URL is checked by `fleet::query`.

use std::time::Duration;

use clap::Args;

use crate::{
    options::{OutputFormat, DEFAULT_ALLOWED},
    ports::{parse_duration, PortRange},
};

/// Arguments of `netrace fleet`.
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    kubectl -n monitoring port-forward svc/prometheus-operated 9090 &\n  \
    netrace fleet --prometheus http://127.0.0.1:9090\n  \
    netrace fleet --prometheus http://127.0.0.1:9090 --window 6h --selector 'cluster=\"prod\"'\n\n\
    Exit status: 0 no node has a problem to fix, 1 some node has one, 2 error.")]
pub struct FleetArgs {
    /// The Prometheus server that scrapes netrace, e.g. http://127.0.0.1:9090 (through
    /// `kubectl port-forward`) or http://prometheus.monitoring:9090.
    #[arg(long, value_name = "URL")]
    pub prometheus: String,

    /// How far back to count connection attempts and losses.
    #[arg(long, value_name = "D", default_value = "1h", value_parser = parse_duration)]
    pub window: Duration,

    /// The range the firewall lets SYN-ACKs back into, for the fix, where a node has not
    /// learned its edge (as `netrace watch --allowed-ports`).
    #[arg(long, value_name = "A-B", default_value_t = DEFAULT_ALLOWED)]
    pub allowed_ports: PortRange,

    /// Extra label matchers for netrace's series, e.g. 'job="netrace",cluster="prod"'.
    #[arg(long, value_name = "MATCHERS", default_value = "")]
    pub selector: String,

    /// How long to wait for each answer from Prometheus.
    #[arg(long, value_name = "D", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Output format: one screen (text), or one JSON object.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}
