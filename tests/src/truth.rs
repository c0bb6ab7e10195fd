//! Ground truth from the lab's own vantage points: the ports the firewall refused (its nft
//! sets and counters), the node's conntrack table (pod port → post-SNAT port), the server's
//! accepted peers, joined with what the client saw.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::client::{TcpAttempt, TcpOutcome};
use crate::cmd;
use crate::lab::{Family, Lab, SnatMode, FIREWALL_TABLE};

fn suffix(family: Family) -> &'static str {
    match family {
        Family::V4 => "4",
        Family::V6 => "6",
    }
}

fn nft_objects(lab: &Lab, args: &[&str]) -> Result<Vec<Value>> {
    let mut full = vec!["nft", "-j"];
    full.extend_from_slice(args);
    let out = cmd::ns_exec(lab.firewall_ns(), &full)?;
    let json: Value = serde_json::from_str(&out)
        .with_context(|| format!("parsing `nft -j {}`: {out}", args.join(" ")))?;
    match json.get("nftables").and_then(Value::as_array) {
        Some(objects) => Ok(objects.clone()),
        None => bail!(
            "`nft -j {}` printed no \"nftables\" array: {out}",
            args.join(" ")
        ),
    }
}

/// The post-SNAT destination ports the firewall dropped (its `dropped4`/`dropped6` set).
pub fn firewall_dropped_ports(lab: &Lab, family: Family) -> Result<BTreeSet<u16>> {
    let set = format!("dropped{}", suffix(family));
    let objects = nft_objects(lab, &["list", "set", "inet", FIREWALL_TABLE, &set])?;
    let mut ports = BTreeSet::new();
    for obj in &objects {
        let Some(elems) = obj.pointer("/set/elem").and_then(Value::as_array) else {
            continue;
        };
        for e in elems {
            // A plain number, or {"elem": {"val": N, ...}} when elements carry expressions.
            let v = e
                .as_u64()
                .or_else(|| e.pointer("/elem/val").and_then(Value::as_u64));
            match v.and_then(|v| u16::try_from(v).ok()) {
                Some(p) => {
                    ports.insert(p);
                }
                None => bail!("unexpected element {e} in set {set}"),
            }
        }
    }
    Ok(ports)
}

/// Packets the firewall dropped (its `drops4`/`drops6` counter); SYN-ACK retransmissions
/// count too, so this is at least the number of dropped connections.
pub fn firewall_drop_packets(lab: &Lab, family: Family) -> Result<u64> {
    let counter = format!("drops{}", suffix(family));
    let objects = nft_objects(lab, &["list", "counter", "inet", FIREWALL_TABLE, &counter])?;
    objects
        .iter()
        .find_map(|o| o.pointer("/counter/packets").and_then(Value::as_u64))
        .with_context(|| format!("no packet count in counter {counter}"))
}

/// One conntrack entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConntrackEntry {
    /// `tcp`, `udp`, ...
    pub protocol: String,
    /// TCP state (`SYN_SENT`, `ESTABLISHED`, `TIME_WAIT`, ...), if any.
    pub state: Option<String>,
    /// The original direction's source address.
    pub orig_src: IpAddr,
    /// The original direction's destination address.
    pub orig_dst: IpAddr,
    /// The original direction's source port (the pod's port).
    pub orig_sport: u16,
    /// The original direction's destination port.
    pub orig_dport: u16,
    /// The reply direction's source address.
    pub reply_src: IpAddr,
    /// The reply direction's destination address (the post-SNAT source address).
    pub reply_dst: IpAddr,
    /// The reply direction's source port.
    pub reply_sport: u16,
    /// The reply direction's destination port (the post-SNAT source port).
    pub reply_dport: u16,
    /// `[UNREPLIED]`.
    pub unreplied: bool,
}

/// Parses one line of `conntrack -L` output.
pub fn parse_conntrack_line(line: &str) -> Option<ConntrackEntry> {
    let mut tokens = line.split_whitespace();
    let protocol = tokens.next()?.to_owned();
    let mut state = None;
    let mut unreplied = false;
    let mut src = Vec::new();
    let mut dst = Vec::new();
    let mut sport = Vec::new();
    let mut dport = Vec::new();
    for t in tokens {
        if let Some((k, v)) = t.split_once('=') {
            match k {
                "src" => src.push(v.parse::<IpAddr>().ok()?),
                "dst" => dst.push(v.parse::<IpAddr>().ok()?),
                "sport" => sport.push(v.parse::<u16>().ok()?),
                "dport" => dport.push(v.parse::<u16>().ok()?),
                _ => {}
            }
        } else if t == "[UNREPLIED]" {
            unreplied = true;
        } else if src.is_empty() && t.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            state = Some(t.to_owned());
        }
    }
    Some(ConntrackEntry {
        protocol,
        state,
        orig_src: *src.first()?,
        orig_dst: *dst.first()?,
        orig_sport: *sport.first()?,
        orig_dport: *dport.first()?,
        reply_src: *src.get(1)?,
        reply_dst: *dst.get(1)?,
        reply_sport: *sport.get(1)?,
        reply_dport: *dport.get(1)?,
        unreplied,
    })
}

/// The node's conntrack entries for `protocol` (`tcp` or `udp`) and `family`.
pub fn conntrack(lab: &Lab, protocol: &str, family: Family) -> Result<Vec<ConntrackEntry>> {
    let out = cmd::ns_exec(
        lab.node_ns(),
        &["conntrack", "-L", "-f", family.name(), "-p", protocol],
    )?;
    Ok(out.lines().filter_map(parse_conntrack_line).collect())
}

/// Pod source port → post-SNAT source port, for the pod's flows to the server over
/// `protocol`, from the node's conntrack table. Without SNAT every port maps to itself
/// (the node may then track nothing at all), so the map is empty and callers should use
/// [`Lab::options`]`.snat_mode` or [`post_snat_port`].
pub fn snat_map(lab: &Lab, protocol: &str, family: Family) -> Result<HashMap<u16, u16>> {
    let pod = lab.pod_ip(family);
    let server = lab.server_addr(family);
    let mut map = HashMap::new();
    for e in conntrack(lab, protocol, family)? {
        if e.orig_src == pod && e.orig_dst == server.ip() && e.orig_dport == server.port() {
            if let Some(old) = map.insert(e.orig_sport, e.reply_dport) {
                if old != e.reply_dport {
                    bail!(
                        "pod port {} maps to two post-SNAT ports ({old} and {})",
                        e.orig_sport,
                        e.reply_dport
                    );
                }
            }
        }
    }
    Ok(map)
}

/// The post-SNAT port of `pod_port` according to `map` (identity without SNAT).
pub fn post_snat_port(lab: &Lab, map: &HashMap<u16, u16>, pod_port: u16) -> Option<u16> {
    match lab.options().snat_mode {
        SnatMode::None => Some(pod_port),
        _ => map.get(&pod_port).copied(),
    }
}

/// One TCP attempt with what the rest of the lab knows about it.
#[derive(Debug, Clone)]
pub struct TcpTruth {
    /// The client's record.
    pub attempt: TcpAttempt,
    /// The source port the firewall and server saw (and netrace on the uplink sees).
    pub snat_port: Option<u16>,
    /// The firewall's set holds `snat_port`.
    pub dropped_by_firewall: bool,
    /// The server accepted a connection from `snat_port`.
    pub accepted_by_server: bool,
}

/// Everything the lab knows about a TCP run.
#[derive(Debug, Clone)]
pub struct Truth {
    /// Which family the run used.
    pub family: Family,
    /// Per attempt, in client order.
    pub tcp: Vec<TcpTruth>,
    /// The firewall's dropped-port set.
    pub firewall_dropped: BTreeSet<u16>,
    /// The firewall's drop counter (packets).
    pub firewall_drop_packets: u64,
    /// Source ports of the server's accepted connections from [`Lab::seen_source_ip`].
    pub server_accepted: BTreeSet<u16>,
}

impl Truth {
    /// Post-SNAT ports of the attempts with `outcome`.
    pub fn snat_ports_where(&self, outcome: &TcpOutcome) -> BTreeSet<u16> {
        self.tcp
            .iter()
            .filter(|t| &t.attempt.outcome == outcome)
            .filter_map(|t| t.snat_port)
            .collect()
    }

    /// Attempts whose post-SNAT port is unknown (no conntrack entry).
    pub fn unmapped(&self) -> Vec<&TcpTruth> {
        self.tcp.iter().filter(|t| t.snat_port.is_none()).collect()
    }
}

/// Joins the client's `attempts` with conntrack, the firewall and the server. Call it right
/// after the client finishes (conntrack forgets closed flows after a while).
pub fn collect(lab: &Lab, family: Family, attempts: &[TcpAttempt]) -> Result<Truth> {
    let map = snat_map(lab, "tcp", family)?;
    let firewall_dropped = firewall_dropped_ports(lab, family)?;
    let firewall_drop_packets = firewall_drop_packets(lab, family)?;
    let seen = lab.seen_source_ip(family);
    let server_accepted: BTreeSet<u16> = lab
        .server()
        .map(|s| s.accepted())
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a.peer.ip() == seen)
        .map(|a| a.peer.port())
        .collect();
    let tcp = attempts
        .iter()
        .map(|a| {
            let snat_port = post_snat_port(lab, &map, a.pod_port);
            TcpTruth {
                attempt: a.clone(),
                snat_port,
                dropped_by_firewall: snat_port.is_some_and(|p| firewall_dropped.contains(&p)),
                accepted_by_server: snat_port.is_some_and(|p| server_accepted.contains(&p)),
            }
        })
        .collect();
    Ok(Truth {
        family,
        tcp,
        firewall_dropped,
        firewall_drop_packets,
        server_accepted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_conntrack_lines() {
        let line = "tcp      6 115 SYN_SENT src=198.18.1.2 dst=198.18.3.2 sport=54658 dport=8080 [UNREPLIED] src=198.18.3.2 dst=198.18.2.1 sport=8080 dport=10936 mark=0 use=1";
        let e = parse_conntrack_line(line);
        assert_eq!(
            e.as_ref()
                .map(|e| (e.orig_sport, e.reply_dport, e.unreplied)),
            Some((54658, 10936, true))
        );
        assert_eq!(e.and_then(|e| e.state), Some("SYN_SENT".to_owned()));
        let udp = "udp      17 29 src=2001:db8:1::2 dst=2001:db8:3::2 sport=33000 dport=8080 src=2001:db8:3::2 dst=2001:db8:2::1 sport=8080 dport=2000 mark=0 use=1";
        let e = parse_conntrack_line(udp);
        assert_eq!(
            e.as_ref().map(|e| (e.reply_dport, e.state.clone())),
            Some((2000, None))
        );
        assert!(parse_conntrack_line("conntrack v1.4.7: 0 flow entries").is_none());
    }
}
