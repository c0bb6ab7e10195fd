//! Lab additions for `netrace probe`: an upper edge for the firewall's allowed range, and ICMP
//! errors without rate limit in the server namespace. (A second server that answers TCP but
//! not UDP is [`crate::Server::start_with`] in the lab's server namespace.) They change nothing
//! the lab itself built, so every other test sees the lab unchanged.

use anyhow::{Context as _, Result};

use crate::lab::{Lab, FIREWALL_TABLE};

/// Adds an upper edge to the firewall: TCP towards the node with a destination port above
/// `max` is dropped too, so SYN-ACKs come back only to `firewall_min_port..=max`.
pub fn firewall_max_port(lab: &Lab, max: u16) -> Result<()> {
    let n = lab.names();
    let max = max.to_string();
    lab.exec(
        lab.firewall_ns(),
        &[
            "nft",
            "add",
            "rule",
            "inet",
            FIREWALL_TABLE,
            "forward",
            "iifname",
            &n.fw_server_if,
            "oifname",
            &n.fw_node_if,
            "tcp",
            "dport",
            ">",
            &max,
            "drop",
        ],
    )
    .with_context(|| format!("adding an upper edge {max} to the firewall of {}", n.stem))?;
    Ok(())
}

/// Lets the server namespace send ICMP errors without rate limit (a UDP port closed answers
/// every datagram with port unreachable, not only the first few).
pub fn server_icmp_unlimited(lab: &Lab) -> Result<()> {
    lab.exec(
        lab.server_ns(),
        &[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.icmp_ratelimit=0",
            "net.ipv6.icmp.ratelimit=0",
        ],
    )?;
    Ok(())
}
