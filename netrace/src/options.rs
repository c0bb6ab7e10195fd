//! Types shared by the command line, the subcommands and the renderers: output format,
//! attachment mode, destination networks, and the defaults the histogram and the verdict start
//! from. Nothing here depends on the rest of netrace, so `cli` and the subcommands can both use
//! it without importing each other.

use std::net::IpAddr;

use clap::ValueEnum;

use crate::ports::PortRange;

/// The range the article's firewall lets SYN-ACKs back into.
pub const DEFAULT_ALLOWED: PortRange = PortRange::new(32768, 65535);
/// Bucket edges always drawn in the histogram (plus both ends of the allowed range).
pub const DEFAULT_BUCKET_EDGES: [u16; 5] = [1024, 8192, 16384, 32768, 49152];

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

/// Which connection outcomes `netrace watch` streams as they are decided (`--events`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Events {
    /// Every outcome, answered ones too.
    All,
    /// Everything but answered: lost, abandoned, refused, unreachable, late.
    Lost,
    /// None: only the report at the end (and --interval summaries).
    None,
}

/// Where outbound SYNs are observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EgressHook {
    /// The device hook when another BPF program sits on the uplink's tc egress (it may
    /// rewrite addresses after netrace's classifier, as Cilium and Calico eBPF do), else tc.
    Auto,
    /// A tc classifier on egress, first in line (after netfilter's SNAT, before other tc
    /// programs).
    Tc,
    /// The net_dev_start_xmit tracepoint: as the packet reaches the driver, after every tc
    /// program (needs the kernel's BTF).
    Xmit,
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
}
