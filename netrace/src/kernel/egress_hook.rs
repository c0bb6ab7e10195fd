//! Where netrace observes outbound SYNs, and why.
//!
//! - **tc**: a classifier on the uplink's egress, first in line. It runs after netfilter's
//!   SNAT (iptables/nftables MASQUERADE) and so sees the translated port, but *before* every
//!   other tc/TCX program: where SNAT is itself a BPF program on that hook (Cilium's BPF
//!   masquerading, GKE Dataplane V2, Calico's eBPF dataplane), it sees the pod's port, or
//!   nothing at all when such a program runs first and returns a final verdict.
//! - **xmit** (the device hook): the `net_dev_start_xmit` raw tracepoint, as the packet reaches
//!   the driver, after every tc program: always the port the firewall sees. It needs the
//!   kernel's BTF (for `sk_buff` offsets) and costs a little on every packet any device sends.
//!
//! `auto` takes the device hook when another program is attached to a watched interface's
//! egress (TCX or a clsact filter), and says so.

use std::os::unix::fs::MetadataExt as _;

use aya::programs::{SchedClassifier, TcAttachType};
use netrace_common::{SkbOffsets, XmitIface, XMIT_LINK_ETHERNET, XMIT_LINK_RAW_IP};

use crate::{
    kernel::{btf, netlink},
    options::EgressHook,
};

/// The hook in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    Tc,
    Xmit,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Tc => "tc",
            Hook::Xmit => "xmit",
        }
    }
}

/// The decision and the one line that explains it.
#[derive(Clone, Debug)]
pub struct Choice {
    pub hook: Hook,
    /// Offsets for the device hook (only with [`Hook::Xmit`]).
    pub offsets: Option<SkbOffsets>,
    pub reason: String,
    /// The default case (auto, nothing else on egress, tc): the reason goes only to the
    /// report, not to standard error.
    pub quiet: bool,
}

/// Programs other than netrace's on `iface`'s egress: TCX programs and clsact BPF filters,
/// by name. Errors count as none (an older kernel without TCX has no TCX programs).
pub fn foreign_egress(iface: &str) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok((_, progs)) = SchedClassifier::query_tcx(iface, TcAttachType::Egress) {
        for p in progs {
            let name = p.name_as_str().unwrap_or("").to_string();
            if !name.starts_with("netrace_") {
                found.push(if name.is_empty() {
                    format!("TCX program id {}", p.id())
                } else {
                    format!("TCX program {name}")
                });
            }
        }
    }
    let filters = crate::node::iface::index(iface)
        .and_then(|idx| netlink::filters(idx, netlink::Hook::Egress).ok())
        .unwrap_or_default();
    for f in filters {
        let name = f.bpf_name.unwrap_or_default();
        if f.kind == "bpf" && !name.contains("netrace_") {
            found.push(format!("tc filter {name}"));
        }
    }
    found
}

/// What the device hook needs from this kernel (its BTF), or what is missing.
pub fn xmit_offsets() -> anyhow::Result<SkbOffsets> {
    let btf = btf::Btf::from_sys_fs()?;
    btf::skb_offsets(&btf)
}

/// The inode number of netrace's own network namespace (the watched devices live there).
pub fn own_netns() -> anyhow::Result<u32> {
    let ino = std::fs::metadata("/proc/self/ns/net")
        .map_err(|e| anyhow::anyhow!("reading /proc/self/ns/net: {e}"))?
        .ino();
    u32::try_from(ino).map_err(|_| anyhow::anyhow!("namespace inode {ino} out of range"))
}

/// The device hook's entry for `iface` (what its frames start with).
pub fn xmit_iface(iface: &str, netns: u32) -> XmitIface {
    let arphrd = std::fs::read_to_string(format!("/sys/class/net/{iface}/type"))
        .ok()
        .and_then(|t| t.trim().parse::<u16>().ok())
        .unwrap_or(1);
    // ARPHRD_NONE (tun, WireGuard), ARPHRD_TUNNEL/TUNNEL6, ARPHRD_PPP start at the IP header.
    let link = match arphrd {
        65534 | 768 | 769 | 512 => XMIT_LINK_RAW_IP,
        _ => XMIT_LINK_ETHERNET,
    };
    XmitIface { netns, link }
}

/// Decides the hook for `ifaces` under `mode`. An explicit `xmit` the kernel cannot serve is
/// an error; `auto` falls back to tc and says what is missing.
pub fn choose(mode: EgressHook, ifaces: &[String]) -> anyhow::Result<Choice> {
    let tc = |reason: String| Choice {
        hook: Hook::Tc,
        offsets: None,
        reason,
        quiet: false,
    };
    match mode {
        EgressHook::Tc => Ok(tc("egress hook: tc (--egress-hook tc)".into())),
        EgressHook::Xmit => {
            let offsets = xmit_offsets().map_err(|e| {
                anyhow::anyhow!("--egress-hook xmit: the device hook cannot run here: {e:#}")
            })?;
            Ok(Choice {
                hook: Hook::Xmit,
                offsets: Some(offsets),
                reason: "egress hook: xmit, the net_dev_start_xmit tracepoint (--egress-hook xmit)"
                    .into(),
                quiet: false,
            })
        }
        EgressHook::Auto => {
            let foreign: Vec<String> = ifaces
                .iter()
                .flat_map(|i| {
                    foreign_egress(i)
                        .into_iter()
                        .map(move |p| format!("{p} on {i}"))
                })
                .collect();
            if foreign.is_empty() {
                return Ok(Choice {
                    quiet: true,
                    ..tc(
                        "egress hook: tc (no other program on the egress of the watched \
                          interfaces)"
                            .into(),
                    )
                });
            }
            let seen = foreign.join(", ");
            match xmit_offsets() {
                Ok(offsets) => Ok(Choice {
                    hook: Hook::Xmit,
                    offsets: Some(offsets),
                    reason: format!(
                        "egress hook: xmit, the net_dev_start_xmit tracepoint, because {seen} \
                         may rewrite addresses after a tc classifier sees the SYN"
                    ),
                    quiet: false,
                }),
                Err(e) => Ok(tc(format!(
                    "egress hook: tc, although {seen} may rewrite addresses after it: the \
                     device hook is unavailable ({e:#})"
                ))),
            }
        }
    }
}
