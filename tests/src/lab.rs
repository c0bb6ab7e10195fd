//! The seed failure in a box: four network namespaces joined by veth pairs.
//!
//! ```text
//!  pod ──veth── node ──veth── firewall ──veth── server
//!  198.18.1.2   198.18.1.1    198.18.2.2        198.18.3.2:8080 (TCP accept, UDP echo)
//!  2001:db8:1::2 198.18.2.1   198.18.3.1        2001:db8:3::2
//!               (uplink: MASQUERADE --random-fully --to-ports 1024-65535)
//!                             (drops TCP towards the node with dport < 32768,
//!                              records each such port in @dropped4 / @dropped6)
//! ```
//!
//! Nothing in the root namespace is touched: veths are created inside the namespaces.
//! [`Lab`] deletes the namespaces on drop (also while unwinding from a panic) and when its
//! constructor fails half way.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::client::{Client, ClientOptions, PortAllocator, UdpOutcome};
use crate::cmd;
use crate::names::{LabNames, Teardown};
use crate::server::Server;

/// IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// `"ipv4"` or `"ipv6"`, as netrace's JSON and conntrack's `-f` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

/// How the node rewrites the pod's source on its uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnatMode {
    /// `MASQUERADE --random-fully` (kube-proxy, Calico, Flannel, AWS VPC CNI): uniform ports.
    RandomFully,
    /// Plain `MASQUERADE`: keeps the pod's port when it is free and inside the range.
    Plain,
    /// No SNAT: the node routes the pod's address; the firewall and server route back to it.
    None,
}

/// Which tool installs the SNAT rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnatBackend {
    /// `iptables -t nat ... -j MASQUERADE` (and `ip6tables`).
    Iptables,
    /// An `nft` table with `masquerade to :A-B fully-random`.
    Nftables,
}

/// What the lab looks like. `LabOptions::default()` is the seed failure.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The firewall drops TCP towards the node whose destination port is below this
    /// (default 32768; 1024 lets every SNAT port through, 0 disables the rule).
    pub firewall_min_port: u16,
    /// The firewall also drops TCP towards the node whose destination port is above this
    /// (default 65535: no such rule). Drops are recorded in the same set and counter.
    pub firewall_max_port: u16,
    /// The firewall silently drops every TCP packet towards [`addr::DEAD4`] /
    /// [`addr::DEAD6`], a destination that never answers (default false).
    pub dead_destination: bool,
    /// TCP Fast Open without cookies: the pod's SYNs may carry data, the server accepts it
    /// on every listener (`net.ipv4.tcp_fastopen` 5 in the pod, 0x602 in the server; default
    /// false).
    pub tcp_fastopen: bool,
    /// SNAT only the pod's subnet (`-s 198.18.1.0/24`, iptables backend), so the node's own
    /// connections leave with their own ports, as on a Kubernetes node (default false).
    pub snat_pods_only: bool,
    /// SNAT `--to-ports` range (default 1024-65535).
    pub snat_ports: (u16, u16),
    /// SNAT mode (default `RandomFully`).
    pub snat_mode: SnatMode,
    /// SNAT backend (default `Iptables`).
    pub snat_backend: SnatBackend,
    /// Configure IPv6 too (default true).
    pub ipv6: bool,
    /// The server's TCP and UDP port (default 8080).
    pub server_port: u16,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            firewall_min_port: 32768,
            firewall_max_port: 65535,
            dead_destination: false,
            snat_pods_only: false,
            tcp_fastopen: false,
            snat_ports: (1024, 65535),
            snat_mode: SnatMode::RandomFully,
            snat_backend: SnatBackend::Iptables,
            ipv6: true,
            server_port: 8080,
        }
    }
}

impl LabOptions {
    /// The seed failure (same as `default()`).
    pub fn seed() -> Self {
        Self::default()
    }
    /// Sets [`LabOptions::firewall_min_port`].
    pub fn firewall_min_port(mut self, port: u16) -> Self {
        self.firewall_min_port = port;
        self
    }
    /// Sets [`LabOptions::firewall_max_port`].
    pub fn firewall_max_port(mut self, port: u16) -> Self {
        self.firewall_max_port = port;
        self
    }
    /// Sets [`LabOptions::dead_destination`].
    pub fn dead_destination(mut self, on: bool) -> Self {
        self.dead_destination = on;
        self
    }
    /// Sets [`LabOptions::tcp_fastopen`].
    pub fn tcp_fastopen(mut self, on: bool) -> Self {
        self.tcp_fastopen = on;
        self
    }
    /// Sets [`LabOptions::snat_pods_only`].
    pub fn snat_pods_only(mut self, on: bool) -> Self {
        self.snat_pods_only = on;
        self
    }
    /// Sets [`LabOptions::snat_ports`].
    pub fn snat_ports(mut self, first: u16, last: u16) -> Self {
        self.snat_ports = (first, last);
        self
    }
    /// Sets [`LabOptions::snat_mode`].
    pub fn snat_mode(mut self, mode: SnatMode) -> Self {
        self.snat_mode = mode;
        self
    }
    /// Sets [`LabOptions::snat_backend`].
    pub fn snat_backend(mut self, backend: SnatBackend) -> Self {
        self.snat_backend = backend;
        self
    }
    /// Sets [`LabOptions::ipv6`].
    pub fn ipv6(mut self, on: bool) -> Self {
        self.ipv6 = on;
        self
    }
    /// Sets [`LabOptions::server_port`].
    pub fn server_port(mut self, port: u16) -> Self {
        self.server_port = port;
        self
    }
}

/// Table of the firewall's rules (in the firewall namespace).
pub const FIREWALL_TABLE: &str = "nrtfw";
/// Table of the node's SNAT rules with the nftables backend (in the node namespace).
pub const SNAT_TABLE: &str = "nrtnat";

/// Addresses of the lab (documentation ranges only: 198.18.0.0/15 and 2001:db8::/32).
pub mod addr {
    use std::net::{Ipv4Addr, Ipv6Addr};
    /// Pod.
    pub const POD4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
    /// Node, towards the pod.
    pub const NODE_POD4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
    /// Node uplink.
    pub const NODE_UP4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
    /// Firewall, towards the node.
    pub const FW_NODE4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
    /// Firewall, towards the server.
    pub const FW_SRV4: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
    /// Server.
    pub const SRV4: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 2);
    /// Pod.
    pub const POD6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
    /// Node, towards the pod.
    pub const NODE_POD6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
    /// Node uplink.
    pub const NODE_UP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
    /// Firewall, towards the node.
    pub const FW_NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
    /// Firewall, towards the server.
    pub const FW_SRV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 1);
    /// Server.
    pub const SRV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 2);
    /// A destination behind the firewall that never answers (with `dead_destination`).
    pub const DEAD4: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 9);
    /// A destination behind the firewall that never answers (with `dead_destination`).
    pub const DEAD6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 9);
}

/// Serialises `ip netns add/del` within the process: the first `ip netns add` on a machine
/// sets up the `/run/netns` mount, and two doing so at once can fail.
pub(crate) static NETNS_LOCK: Mutex<()> = Mutex::new(());

fn netns_cmd(args: &[&str]) -> Result<String> {
    let _guard = NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    cmd::run("ip", args)
}

enum SnatStep {
    /// A command line run in the node namespace.
    Command(Vec<String>),
    /// An `nft -f -` ruleset loaded in the node namespace.
    Nft(String),
}

/// A running lab; tears itself down on drop.
pub struct Lab {
    names: LabNames,
    opts: LabOptions,
    server: Option<Server>,
    ports: Arc<PortAllocator>,
    created: Vec<String>,
    torn_down: bool,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("names", &self.names)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl Lab {
    /// Builds the lab and starts the server; on any failure deletes whatever it had created.
    pub fn new(opts: LabOptions) -> Result<Self> {
        if !cmd::is_root() {
            bail!("the netrace lab needs root (network namespaces, nftables, iptables)");
        }
        let mut lab = Lab {
            names: LabNames::fresh(),
            opts,
            server: None,
            ports: Arc::new(PortAllocator::default()),
            created: Vec::new(),
            torn_down: false,
        };
        lab.setup()
            .with_context(|| format!("setting up lab {}", lab.names.stem))?;
        Ok(lab)
    }

    /// The seed lab: `Lab::new(LabOptions::default())`.
    pub fn seed() -> Result<Self> {
        Self::new(LabOptions::default())
    }

    fn setup(&mut self) -> Result<()> {
        let n = self.names.clone();
        for ns in n.namespaces() {
            netns_cmd(&["netns", "add", ns])?;
            self.created.push(ns.to_owned());
        }
        // Sysctls before the links exist, so the links take the namespace's defaults.
        for ns in n.namespaces() {
            let mut settings = vec![
                "net.ipv6.conf.all.accept_ra=0",
                "net.ipv6.conf.default.accept_ra=0",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ];
            if ns == n.server {
                settings.push("net.core.somaxconn=4096");
                settings.push("net.ipv4.tcp_max_syn_backlog=4096");
                if self.opts.tcp_fastopen {
                    // Server enabled, no cookie required, on every listener.
                    settings.push("net.ipv4.tcp_fastopen=1538");
                }
            }
            if ns == n.pod && self.opts.tcp_fastopen {
                // Client enabled, data in the SYN without a cookie.
                settings.push("net.ipv4.tcp_fastopen=5");
            }
            if ns == n.node || ns == n.firewall {
                settings.push("net.ipv4.ip_forward=1");
                settings.push("net.ipv6.conf.all.forwarding=1");
            }
            let mut args = vec!["sysctl", "-q", "-w"];
            args.extend(settings);
            cmd::ns_exec(ns, &args)?;
        }
        let veth = |a: &str, a_ns: &str, b: &str, b_ns: &str| {
            cmd::run(
                "ip",
                &[
                    "link", "add", a, "netns", a_ns, "type", "veth", "peer", b, "netns", b_ns,
                ],
            )
        };
        veth(&n.pod_if, &n.pod, &n.node_pod_if, &n.node)?;
        veth(&n.node_uplink, &n.node, &n.fw_node_if, &n.firewall)?;
        veth(&n.fw_server_if, &n.firewall, &n.server_if, &n.server)?;

        let v6 = self.opts.ipv6;
        let ifaces: [(&str, &str, Ipv4Addr, Ipv6Addr); 6] = [
            (&n.pod, &n.pod_if, addr::POD4, addr::POD6),
            (&n.node, &n.node_pod_if, addr::NODE_POD4, addr::NODE_POD6),
            (&n.node, &n.node_uplink, addr::NODE_UP4, addr::NODE_UP6),
            (&n.firewall, &n.fw_node_if, addr::FW_NODE4, addr::FW_NODE6),
            (&n.firewall, &n.fw_server_if, addr::FW_SRV4, addr::FW_SRV6),
            (&n.server, &n.server_if, addr::SRV4, addr::SRV6),
        ];
        for (ns, dev, a4, a6) in ifaces {
            ip(ns, &["addr", "add", &format!("{a4}/24"), "dev", dev])?;
            if v6 {
                ip(
                    ns,
                    &[
                        "-6",
                        "addr",
                        "add",
                        &format!("{a6}/64"),
                        "dev",
                        dev,
                        "nodad",
                    ],
                )?;
            }
            ip(ns, &["link", "set", dev, "up"])?;
        }
        for ns in n.namespaces() {
            ip(ns, &["link", "set", "lo", "up"])?;
        }
        let mut routes = vec![
            (&n.pod, format!("route add default via {}", addr::NODE_POD4)),
            (&n.node, format!("route add default via {}", addr::FW_NODE4)),
            (
                &n.firewall,
                format!("route add 198.18.1.0/24 via {}", addr::NODE_UP4),
            ),
            (
                &n.server,
                format!("route add default via {}", addr::FW_SRV4),
            ),
        ];
        if v6 {
            routes.extend([
                (
                    &n.pod,
                    format!("-6 route add default via {}", addr::NODE_POD6),
                ),
                (
                    &n.node,
                    format!("-6 route add default via {}", addr::FW_NODE6),
                ),
                (
                    &n.firewall,
                    format!("-6 route add 2001:db8:1::/64 via {}", addr::NODE_UP6),
                ),
                (
                    &n.server,
                    format!("-6 route add default via {}", addr::FW_SRV6),
                ),
            ]);
        }
        for (ns, route) in &routes {
            ip(ns, &route.split_whitespace().collect::<Vec<_>>())?;
        }
        self.install_snat()?;
        self.install_firewall()?;
        self.server = Some(Server::start(&n.server, self.opts.server_port)?);
        self.warm_up()?;
        Ok(())
    }

    /// One UDP echo per family from the pod through node and firewall to the server and back:
    /// it proves the path works and resolves every neighbour on the way. Without it the first
    /// burst of SYNs can overflow the queues of still unresolved neighbours and time out for
    /// reasons that have nothing to do with the firewall.
    fn warm_up(&self) -> Result<()> {
        let client = self.client_with(ClientOptions {
            workers: 1,
            connect_timeout: Duration::from_millis(500),
            udp_timeout: Duration::from_millis(500),
            ..ClientOptions::default()
        });
        let families: &[Family] = if self.opts.ipv6 {
            &[Family::V4, Family::V6]
        } else {
            &[Family::V4]
        };
        for &family in families {
            let server = self.server_addr(family);
            let mut ok = false;
            for _ in 0..10 {
                let done = client.udp(server, 1, &|_, _| {})?;
                if done.iter().all(|u| u.outcome == UdpOutcome::Echoed) {
                    ok = true;
                    break;
                }
            }
            if !ok {
                bail!("no UDP echo from {server} through the lab within 5 s");
            }
        }
        Ok(())
    }

    /// The SNAT configuration as commands run in the node namespace (an `nft -f -` step
    /// carries its ruleset).
    fn snat_steps(&self) -> Vec<SnatStep> {
        let n = &self.names;
        let (first, last) = self.opts.snat_ports;
        let range = format!("{first}-{last}");
        let random = self.opts.snat_mode == SnatMode::RandomFully;
        match (self.opts.snat_mode, self.opts.snat_backend) {
            (SnatMode::None, _) => Vec::new(),
            (_, SnatBackend::Iptables) => {
                let tools: &[&str] = if self.opts.ipv6 {
                    &["iptables", "ip6tables"]
                } else {
                    &["iptables"]
                };
                let mut steps = Vec::new();
                for tool in tools {
                    // `--to-ports` needs a protocol; kube-proxy's rule has none, and with none
                    // the range of ports >= 1024 is 1024-65535 anyway.
                    for proto in ["tcp", "udp"] {
                        let mut args: Vec<String> = [
                            tool,
                            "-w",
                            "-t",
                            "nat",
                            "-A",
                            "POSTROUTING",
                            "-o",
                            &n.node_uplink,
                            "-p",
                            proto,
                        ]
                        .iter()
                        .map(|a| a.to_string())
                        .collect();
                        if self.opts.snat_pods_only {
                            let pods = if *tool == "iptables" {
                                "198.18.1.0/24"
                            } else {
                                "2001:db8:1::/64"
                            };
                            args.extend(["-s".to_string(), pods.to_string()]);
                        }
                        args.extend(
                            ["-j", "MASQUERADE", "--to-ports", &range]
                                .iter()
                                .map(|a| a.to_string()),
                        );
                        if random {
                            args.push("--random-fully".into());
                        }
                        steps.push(SnatStep::Command(args));
                    }
                }
                steps
            }
            (_, SnatBackend::Nftables) => {
                let family = if self.opts.ipv6 {
                    ""
                } else {
                    "meta nfproto ipv4 "
                };
                let flags = if random { " fully-random" } else { "" };
                vec![SnatStep::Nft(format!(
                    "table inet {SNAT_TABLE} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    oifname \"{up}\" {family}meta l4proto {{ tcp, udp }} masquerade to :{range}{flags}\n  }}\n}}\n",
                    up = n.node_uplink,
                ))]
            }
        }
    }

    fn install_snat(&self) -> Result<()> {
        for step in self.snat_steps() {
            match step {
                SnatStep::Command(args) => {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    cmd::ns_exec(&self.names.node, &args)?;
                }
                SnatStep::Nft(ruleset) => {
                    cmd::ns_exec_with_input(&self.names.node, &["nft", "-f", "-"], Some(&ruleset))?;
                }
            }
        }
        Ok(())
    }

    /// The node's SNAT configuration as a person would type it (one line per command; the
    /// nft backend shows its rule). Empty without SNAT.
    pub fn snat_description(&self) -> Vec<String> {
        self.snat_steps()
            .into_iter()
            .flat_map(|step| match step {
                SnatStep::Command(args) => vec![args
                    .iter()
                    .filter(|a| a.as_str() != "-w")
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" ")],
                SnatStep::Nft(ruleset) => ruleset
                    .lines()
                    .filter(|l| l.contains("masquerade"))
                    .map(|l| format!("nft: {}", l.trim()))
                    .collect(),
            })
            .collect()
    }

    /// Replaces the node's SNAT rules with `mode` over `first..=last` (same backend), as an
    /// operator applying the fix would. Conntrack entries of earlier flows are kept (so their
    /// ground truth stays readable); new connections get the new mapping.
    pub fn set_snat(&mut self, mode: SnatMode, first: u16, last: u16) -> Result<()> {
        let node = self.names.node.clone();
        match (self.opts.snat_mode, self.opts.snat_backend) {
            (SnatMode::None, _) => {}
            (_, SnatBackend::Iptables) => {
                cmd::ns_exec(&node, &["iptables", "-w", "-t", "nat", "-F", "POSTROUTING"])?;
                if self.opts.ipv6 {
                    cmd::ns_exec(
                        &node,
                        &["ip6tables", "-w", "-t", "nat", "-F", "POSTROUTING"],
                    )?;
                }
            }
            (_, SnatBackend::Nftables) => {
                cmd::ns_exec(&node, &["nft", "delete", "table", "inet", SNAT_TABLE])?;
            }
        }
        self.opts.snat_mode = mode;
        self.opts.snat_ports = (first, last);
        self.install_snat()
            .with_context(|| format!("changing the SNAT of lab {}", self.names.stem))
    }

    fn install_firewall(&self) -> Result<()> {
        let n = &self.names;
        let min = self.opts.firewall_min_port;
        let max = self.opts.firewall_max_port;
        let mut rules = String::new();
        for (v, nf) in [("4", "ipv4"), ("6", "ipv6")] {
            let mut conds = Vec::new();
            if min != 0 {
                conds.push(format!("tcp dport < {min}"));
            }
            if max != 65535 {
                conds.push(format!("tcp dport > {max}"));
            }
            for cond in conds {
                rules.push_str(&format!(
                    "    iifname \"{srv}\" oifname \"{node}\" meta nfproto {nf} {cond} add @dropped{v} {{ tcp dport }} counter name drops{v} drop\n",
                    srv = n.fw_server_if,
                    node = n.fw_node_if,
                ));
            }
        }
        if self.opts.dead_destination {
            rules.push_str(&format!(
                "    ip daddr {} meta l4proto tcp counter name deaddrops drop\n    ip6 daddr {} meta l4proto tcp counter name deaddrops drop\n",
                addr::DEAD4,
                addr::DEAD6
            ));
        }
        let ruleset = format!(
            "table inet {FIREWALL_TABLE} {{\n  counter drops4 {{ }}\n  counter drops6 {{ }}\n  counter deaddrops {{ }}\n  set dropped4 {{ type inet_service; flags dynamic; size 65536; }}\n  set dropped6 {{ type inet_service; flags dynamic; size 65536; }}\n  chain forward {{\n    type filter hook forward priority filter; policy accept;\n{rules}  }}\n}}\n"
        );
        cmd::ns_exec_with_input(&n.firewall, &["nft", "-f", "-"], Some(&ruleset))?;
        Ok(())
    }

    /// The options the lab was built with.
    pub fn options(&self) -> &LabOptions {
        &self.opts
    }

    /// All names of the lab.
    pub fn names(&self) -> &LabNames {
        &self.names
    }

    /// The pod's namespace.
    pub fn pod_ns(&self) -> &str {
        &self.names.pod
    }

    /// The node's namespace (run netrace here).
    pub fn node_ns(&self) -> &str {
        &self.names.node
    }

    /// The firewall's namespace.
    pub fn firewall_ns(&self) -> &str {
        &self.names.firewall
    }

    /// The server's namespace.
    pub fn server_ns(&self) -> &str {
        &self.names.server
    }

    /// The node's uplink towards the firewall (in the node namespace): netrace's `--iface`.
    pub fn node_uplink(&self) -> &str {
        &self.names.node_uplink
    }

    /// The pod's address.
    pub fn pod_ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => addr::POD4.into(),
            Family::V6 => addr::POD6.into(),
        }
    }

    /// The node uplink's address (the post-SNAT source).
    pub fn node_uplink_ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => addr::NODE_UP4.into(),
            Family::V6 => addr::NODE_UP6.into(),
        }
    }

    /// The source address the server sees for the pod's connections.
    pub fn seen_source_ip(&self, family: Family) -> IpAddr {
        match self.opts.snat_mode {
            SnatMode::None => self.pod_ip(family),
            _ => self.node_uplink_ip(family),
        }
    }

    /// The server's address and port.
    pub fn server_addr(&self, family: Family) -> SocketAddr {
        let ip: IpAddr = match family {
            Family::V4 => addr::SRV4.into(),
            Family::V6 => addr::SRV6.into(),
        };
        SocketAddr::new(ip, self.opts.server_port)
    }

    /// The destination that never answers (with [`LabOptions::dead_destination`]), at the
    /// server's port.
    pub fn dead_addr(&self, family: Family) -> SocketAddr {
        let ip: IpAddr = match family {
            Family::V4 => addr::DEAD4.into(),
            Family::V6 => addr::DEAD6.into(),
        };
        SocketAddr::new(ip, self.opts.server_port)
    }

    /// A client in the node's own namespace (the node's own connections, not a pod's), with
    /// source ports from the node's ephemeral range 32768-60999.
    pub fn node_client(&self, opts: ClientOptions) -> Client {
        Client::new(
            &self.names.node,
            Arc::new(PortAllocator::new(32768, 60999)),
            opts,
        )
    }

    /// The running server.
    pub fn server(&self) -> Option<&Server> {
        self.server.as_ref()
    }

    /// A client in the pod namespace with default options (32 workers, 1 s timeouts).
    pub fn client(&self) -> Client {
        self.client_with(ClientOptions::default())
    }

    /// A client in the pod namespace with `opts`; it shares the lab's source-port allocator.
    pub fn client_with(&self, opts: ClientOptions) -> Client {
        Client::new(&self.names.pod, Arc::clone(&self.ports), opts)
    }

    /// Runs `args...` in namespace `ns` (one of this lab's), returning standard output.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<String> {
        cmd::ns_exec(ns, args)
    }

    /// Stops the server, deletes the namespaces (and with them the veths) and checks that no
    /// name of this lab remains. Drop does the same, printing errors.
    pub fn teardown(mut self) -> Result<()> {
        self.teardown_once()
    }
}

impl Teardown for Lab {
    fn what(&self) -> (&'static str, &str) {
        ("lab", &self.names.stem)
    }

    fn torn_down(&mut self) -> &mut bool {
        &mut self.torn_down
    }

    fn remove(&mut self, errors: &mut Vec<String>) {
        if let Some(mut server) = self.server.take() {
            if let Err(e) = server.stop() {
                errors.push(format!("{e:#}"));
            }
        }
        for ns in self.created.drain(..).rev() {
            if let Err(e) = netns_cmd(&["netns", "del", &ns]) {
                errors.push(format!("{e:#}"));
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown_on_drop();
    }
}

fn ip(ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    cmd::run("ip", &full)
}
