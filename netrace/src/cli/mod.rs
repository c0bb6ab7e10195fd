//! The command line as clap sees it: the subcommands and their arguments, unchecked. Nothing
//! here looks at the system or imports a subcommand; `watch::config` and `probe::config` turn
//! the arguments into checked configurations (every problem a usage error, exit 2).

pub mod analyze;
pub mod check;
pub mod fleet;
pub mod probe;
pub mod watch;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub use self::{
    analyze::AnalyzeArgs, check::CheckArgs, fleet::FleetArgs, probe::ProbeArgs, watch::WatchArgs,
};

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
                  sudo netrace watch --output json | jq 'select(.outcome==\"lost\")'\n  \
                  netrace analyze uplink.pcap                # the same report from a tcpdump capture"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// More diagnostics on standard error: -v for what netrace decides (e.g. why TCX fell back
    /// to clsact), -vv for debugging, -vvv for everything. RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Pair outbound SYNs with their answers and report loss by source-port range.
    Watch(Box<WatchArgs>),
    /// Find which source ports get their SYN-ACK back from HOST:PORT (no root needed).
    Probe(Box<ProbeArgs>),
    /// Say whether this node can run `netrace watch`, and how (kernel, TCX, BTF, ring buffer,
    /// capabilities, tracefs, cgroups, default route, other programs on the uplink).
    Check(CheckArgs),
    /// The same report as `watch`, from a packet capture (pcap, pcapng; no root needed).
    Analyze(Box<AnalyzeArgs>),
    /// The fleet's verdict from Prometheus: which nodes lose SYN-ACKs, from which ports, the fix.
    Fleet(Box<FleetArgs>),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print a man page (roff) on standard output: netrace(1), or netrace-COMMAND(1).
    Man {
        /// The subcommand whose page to print (watch, probe, check, ...).
        command: Option<String>,
        /// Write every page (netrace.1, netrace-watch.1, ...) into this directory instead.
        #[arg(long, value_name = "DIR", conflicts_with = "command")]
        out_dir: Option<PathBuf>,
    },
}
