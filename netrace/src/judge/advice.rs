//! The fix: every line of advice netrace prints, for `watch` (a range problem seen on the
//! node), `probe` (a range found from outside) and the coming `analyze`. The one place for fix
//! text: the commands are written once, here, and both subcommands build their lists from
//! these functions.

use crate::{
    node::NodePorts,
    ports::PortRange,
    track::natmode::{NatMode, NatReport},
};

/// The highest port of Linux's default `ip_local_port_range`; ports above it are left for
/// listeners by convention.
const DEFAULT_LOCAL_END: u16 = 60999;
/// The lowest port a local range may start at (`net.ipv4.ip_unprivileged_port_start`'s
/// default; the kernel refuses a local range below it).
const UNPRIVILEGED_START: u16 = 1024;
/// A narrower local range than this runs out of ports under load.
const MIN_LOCAL_PORTS: u32 = 4096;

/// The live line's warning when the SYNs are seen before a translation (or not at all).
pub const OUT_OF_SIGHT_LIVE: &str =
    "translation out of sight: a program rewrites addresses after netrace sees the SYN; \
     use --egress-hook xmit";

/// The fix when the SYNs were seen before a translation, with the tc hook (`tc_hook`) or the
/// device hook.
pub fn out_of_sight(tc_hook: bool) -> Vec<String> {
    if tc_hook {
        vec![
            "run netrace again with --egress-hook xmit: the device hook sees each SYN as it \
             reaches the driver, after every tc program, with the port the firewall sees"
                .into(),
        ]
    } else {
        vec![
            "check that every interface the node's traffic leaves through is watched \
             (--iface, repeatable)"
                .into(),
        ]
    }
}

/// `iptables` rule that makes SNAT pick ports only from `r`: inserted first in the chain, so
/// that it comes before the node's own MASQUERADE rule (appended after it, it never matches).
pub fn masquerade_rule(r: PortRange) -> String {
    format!(
        "iptables -t nat -I POSTROUTING 1 -o IFACE -p tcp -j MASQUERADE --random-fully \
         --to-ports {}-{}",
        r.start, r.end
    )
}

/// The same in nftables.
pub fn nftables_rule(r: PortRange) -> String {
    format!(
        "nftables: masquerade to :{}-{} fully-random",
        r.start, r.end
    )
}

/// Calico's setting for SNAT's port range.
pub fn calico_setting(r: PortRange) -> String {
    format!("FELIX_NATPORTRANGE={}:{}", r.start, r.end)
}

/// The command that sets the local port range.
pub fn sysctl_local_range(r: PortRange) -> String {
    format!(
        "sysctl -w net.ipv4.ip_local_port_range=\"{} {}\"",
        r.start, r.end
    )
}

/// The local port range to suggest so that locally chosen ports come back through a firewall
/// that lets answers in only to `allowed`: none when `local` already fits; else as much of
/// `local` as fits, if that leaves plenty of ports; else all of `allowed` from 1024 up.
pub fn suggest_local_range(allowed: PortRange, local: Option<PortRange>) -> Option<PortRange> {
    let floor = allowed.start.max(UNPRIVILEGED_START);
    if floor > allowed.end {
        return None;
    }
    match local {
        Some(l) if allowed.covers(&l) => None,
        Some(l) if l.start.max(floor) <= l.end.min(allowed.end) => {
            let both = PortRange::new(l.start.max(floor), l.end.min(allowed.end));
            Some(if both.count() >= MIN_LOCAL_PORTS {
                both
            } else {
                PortRange::new(floor, allowed.end)
            })
        }
        _ => Some(PortRange::new(floor, allowed.end)),
    }
}

/// Widening the firewall instead.
pub fn widen_firewall() -> String {
    "or widen the firewall (security group, NACL, on-premises ACL) to accept TCP return \
     traffic to ports 1024-65535"
        .to_string()
}

/// The fix for a range problem seen by `watch` on a node: SNAT picks ports outside `allowed`.
pub fn for_node(allowed: PortRange, node: &NodePorts, nat: Option<&NatReport>) -> Vec<String> {
    let mut out = Vec::new();
    let (a, b) = (allowed.start, allowed.end);
    if nat.is_some_and(|n| n.mode == NatMode::KeepsPorts) {
        out.push(format!(
            "SNAT keeps the pods' own ports, so the pods pick them: set \
             net.ipv4.ip_local_port_range=\"{a} {}\" in the pods (securityContext.sysctls)",
            b.min(DEFAULT_LOCAL_END)
        ));
    }
    out.push(format!(
        "restrict SNAT to the allowed range: {} ({}); then delete the failed attempts' \
         conntrack entries, which keep their old ports until they expire (2 min): conntrack -D \
         -p tcp --state SYN_SENT",
        masquerade_rule(allowed),
        nftables_rule(allowed)
    ));
    out.push(format!(
        "with a CNI: Calico {}; AWS VPC CNI AWS_VPC_K8S_CNI_RANDOMIZESNAT=none (keeps the pod's own \
         port); kube-proxy/Flannel: add the --to-ports rule above the CNI's MASQUERADE",
        calico_setting(allowed)
    ));
    out.push(widen_firewall());
    // Only when the node's range is known: a guess would be worse than nothing here.
    let local = node.local_range();
    if let Some(r) = local.and_then(|l| suggest_local_range(allowed, Some(l))) {
        out.push(format!(
            "and keep the node's own sockets inside it: {} (and in /etc/sysctl.d/ to keep it)",
            sysctl_local_range(r)
        ));
    }
    out
}

/// The fix for a range found by `probe` from this host: its own sockets first, then the node
/// that SNATs it, if any.
pub fn for_probed_host(allowed: PortRange, node: &NodePorts) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(r) = suggest_local_range(allowed, node.local_range()) {
        out.push(format!(
            "keep this host's own connections inside it: {} (and in /etc/sysctl.d/ to keep it)",
            sysctl_local_range(r)
        ));
    }
    out.push(format!(
        "on a node that SNATs pods, restrict SNAT to it: {} ({}; Calico: {})",
        masquerade_rule(allowed),
        nftables_rule(allowed),
        calico_setting(allowed)
    ));
    out.push(widen_firewall());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_range_suggestions() {
        let allowed = PortRange::new(32768, 65535);
        let fits = Some(PortRange::new(32768, 60999));
        assert_eq!(suggest_local_range(allowed, fits), None);
        // As much of the current range as fits.
        let r = suggest_local_range(PortRange::new(40000, 65535), fits);
        assert_eq!(r, Some(PortRange::new(40000, 60999)));
        // Nothing of it fits: the whole allowed range, from 1024 up.
        let r = suggest_local_range(PortRange::new(500, 30000), fits);
        assert_eq!(r, Some(PortRange::new(1024, 30000)));
        // Too little of it fits.
        let r = suggest_local_range(PortRange::new(59000, 65535), fits);
        assert_eq!(r, Some(PortRange::new(59000, 65535)));
        // Nothing a local range may use.
        assert_eq!(suggest_local_range(PortRange::new(1, 1000), fits), None);
        // Unknown local range.
        assert_eq!(
            suggest_local_range(allowed, None),
            Some(PortRange::new(32768, 65535))
        );
    }

    #[test]
    fn both_subcommands_give_the_same_commands() {
        let allowed = PortRange::new(40000, 65535);
        let node = NodePorts {
            ip_local_port_range: Some((32768, 60999)),
            ip_local_reserved_ports: String::new(),
            tcp_syn_retries: Some(6),
        };
        let watch = for_node(allowed, &node, None);
        let probe = for_probed_host(allowed, &node);
        for command in [
            masquerade_rule(allowed),
            nftables_rule(allowed),
            calico_setting(allowed),
            sysctl_local_range(PortRange::new(40000, 60999)),
            widen_firewall(),
        ] {
            assert!(
                watch.iter().any(|l| l.contains(&command)),
                "{command}\n{watch:?}"
            );
            assert!(
                probe.iter().any(|l| l.contains(&command)),
                "{command}\n{probe:?}"
            );
        }
    }
}
