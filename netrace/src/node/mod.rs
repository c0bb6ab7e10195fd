//! Facts about the node: its own port settings (`NodePorts`, read from the node's procfs,
//! e.g. /host/proc in a pod), its interfaces (`iface`), netrace's privileges (`privileges`) and
//! cgroups, for naming pods (`cgroups`); and `check`, the preflight that reports them all.

pub mod cgroups;
pub mod check;
pub mod iface;
pub mod privileges;

use std::{fs, path::Path};

use serde::Serialize;

use crate::ports::PortRange;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodePorts {
    /// `net.ipv4.ip_local_port_range` (also used for IPv6), when readable.
    pub ip_local_port_range: Option<(u16, u16)>,
    /// `net.ipv4.ip_local_reserved_ports`, verbatim (comma-separated ports and ranges).
    pub ip_local_reserved_ports: String,
    /// `net.ipv4.tcp_syn_retries`: how long a client keeps retrying a connect (also IPv6).
    pub tcp_syn_retries: Option<u32>,
}

impl NodePorts {
    pub fn read(procfs: &Path) -> Self {
        let dir = procfs.join("sys/net/ipv4");
        let range = fs::read_to_string(dir.join("ip_local_port_range"))
            .ok()
            .and_then(|s| parse_range(&s));
        let reserved = fs::read_to_string(dir.join("ip_local_reserved_ports"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let retries = fs::read_to_string(dir.join("tcp_syn_retries"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Self {
            ip_local_port_range: range,
            ip_local_reserved_ports: reserved,
            tcp_syn_retries: retries,
        }
    }

    pub fn local_range(&self) -> Option<PortRange> {
        self.ip_local_port_range.map(|(a, b)| PortRange::new(a, b))
    }
}

fn parse_range(s: &str) -> Option<(u16, u16)> {
    let mut it = s.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) if a <= b => Some((a, b)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sysctl_text() {
        assert_eq!(parse_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_range("garbage"), None);
        assert_eq!(parse_range("5 1"), None);
    }

    #[test]
    fn reads_this_machine() {
        let n = NodePorts::read(Path::new("/proc"));
        assert!(n.ip_local_port_range.is_some());
        assert!(n.tcp_syn_retries.is_some());
    }
}
