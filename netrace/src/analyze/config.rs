//! Everything `netrace analyze` needs, checked before a capture is opened: [`AnalyzeConfig`],
//! built from the command line's [`AnalyzeArgs`] with the same checks and messages as `watch`
//! (exit 2, one line naming the option). The checked config builds the parts of a run.

use std::{path::PathBuf, time::Duration};

use netrace_common::KernelFilter;

use crate::{
    cli::AnalyzeArgs,
    error::UsageError,
    options::{Cidr, OutputFormat},
    ports::{parse_duration, PortRange},
    track::{stats::Histogram, tracker::Tracker},
    watch::config::{check_dir_of, kernel_filter, parse_edges, parse_filters, LATE_WINDOW},
};

/// Everything `netrace analyze` needs, checked.
#[derive(Clone, Debug)]
pub struct AnalyzeConfig {
    pub files: Vec<PathBuf>,
    pub allowed: PortRange,
    pub bucket_edges: Vec<u16>,
    pub syn_timeout: Duration,
    pub filter_dst: Option<Cidr>,
    pub filter_dport: Option<u16>,
    pub output: OutputFormat,
    pub svg: Option<PathBuf>,
    pub list_lost: bool,
}

fn usage(option: &str, msg: impl std::fmt::Display) -> UsageError {
    UsageError(format!("{option}: {msg}"))
}

impl AnalyzeConfig {
    pub fn from_args(args: &AnalyzeArgs) -> Result<Self, UsageError> {
        let allowed: PortRange = args
            .allowed_ports
            .parse()
            .map_err(|e| usage("--allowed-ports", e))?;
        let syn_timeout =
            parse_duration(&args.syn_timeout).map_err(|e| usage("--syn-timeout", e))?;
        let bucket_edges = parse_edges(&args.buckets).map_err(|e| usage("--buckets", e))?;
        let (filter_dst, filter_dport) =
            parse_filters(args.filter_dst.as_deref(), args.filter_dport.as_deref())?;
        check_dir_of("--svg", args.svg.as_deref())?;
        let stdin = args.files.iter().filter(|f| f.as_os_str() == "-").count();
        if stdin > 1 {
            return Err(UsageError(
                "FILE: standard input (-) can be read only once".into(),
            ));
        }
        Ok(Self {
            files: args.files.clone(),
            allowed,
            bucket_edges,
            syn_timeout,
            filter_dst,
            filter_dport,
            output: args.output,
            svg: args.svg.clone(),
            list_lost: args.list_lost,
        })
    }

    /// The destination filter the pairing rules apply, as the kernel does for `watch`.
    pub fn filter(&self) -> KernelFilter {
        kernel_filter(self.filter_dst, self.filter_dport)
    }

    pub fn histogram(&self) -> Histogram {
        Histogram::new(self.allowed, &self.bucket_edges)
    }

    /// The tracker, with the timeout and late window `watch` uses, on capture time.
    pub fn tracker(&self) -> Tracker {
        Tracker::new(
            self.syn_timeout.as_nanos() as u64,
            LATE_WINDOW.as_nanos() as u64,
        )
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn config(args: &[&str]) -> Result<AnalyzeConfig, String> {
        let cli = Cli::try_parse_from(["netrace", "analyze"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        match cli.command {
            Command::Analyze(a) => AnalyzeConfig::from_args(&a).map_err(|e| e.0),
            other => Err(format!("parsed as {other:?}")),
        }
    }

    #[test]
    fn options_mean_what_they_mean_for_watch() {
        let Ok(c) = config(&[
            "a.pcap",
            "b.pcapng.gz",
            "--allowed-ports",
            "1024-65535",
            "--syn-timeout",
            "500ms",
            "--filter-dport",
            "443",
            "--filter-dst",
            "198.18.0.0/15",
            "--output",
            "json",
        ]) else {
            panic!("valid arguments")
        };
        assert_eq!(c.files.len(), 2);
        assert_eq!(c.allowed, PortRange::new(1024, 65535));
        assert_eq!(c.syn_timeout, Duration::from_millis(500));
        assert_eq!(c.filter().dst_port, 443);
        assert_eq!(c.filter().dst_prefix_len, 15);
        assert_eq!(c.output, OutputFormat::Json);
    }

    #[test]
    fn bad_options_name_themselves() {
        for (args, option) in [
            (&["x.pcap", "--allowed-ports", "9-1"][..], "--allowed-ports"),
            (&["x.pcap", "--syn-timeout", "0s"], "--syn-timeout"),
            (&["x.pcap", "--filter-dport", "0"], "--filter-dport"),
            (&["x.pcap", "--filter-dst", "nowhere"], "--filter-dst"),
            (&["x.pcap", "--buckets", "1,x"], "--buckets"),
            (&["x.pcap", "--svg", "/no/such/dir/x.svg"], "--svg"),
            (&["-", "-"], "FILE"),
        ] {
            match config(args) {
                Err(e) => assert!(e.starts_with(option), "{args:?}: {e}"),
                Ok(_) => panic!("{args:?} accepted"),
            }
        }
        assert!(config(&[]).is_err(), "a FILE is required");
    }
}
