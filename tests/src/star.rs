//! A small topology for lifecycle tests: a *hub* namespace (where the client connects from
//! and netrace watches) joined by one veth pair to each of N *spoke* namespaces (servers).
//!
//! ```text
//!            ┌── hub_if(0) ──veth── spoke 0: 198.18.100.2, 2001:db8:100::2
//!   hub  ────┤                      (hub side 198.18.100.1, 2001:db8:100::1)
//!            └── hub_if(1) ──veth── spoke 1: 198.18.101.2, 2001:db8:101::2
//! ```
//!
//! Unlike [`crate::Lab`] it can lose parts while netrace runs: [`Star::delete_hub_link`]
//! deletes one veth pair, [`Star::delete_spoke_ns`] the namespace at the far end (which takes
//! the veth pair with it). Neighbours are static, so nothing waits for ARP or DAD. Names use
//! [`crate::names`] stems; the namespaces still present are deleted on drop.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::client::{Client, ClientOptions, PortAllocator};
use crate::cmd;
use crate::lab::Family;
use crate::names::{LabNames, Teardown};
use crate::server::Server;

/// The first spoke's subnet is 198.18.100.0/24 (and 2001:db8:100::/64).
const FIRST_SUBNET: usize = 100;
/// At most this many spokes.
pub const MAX_SPOKES: usize = 50;

/// `ip netns add/del`, serialised with the lab's (the first one on a machine sets up the
/// `/run/netns` mount).
fn netns(args: &[&str]) -> Result<String> {
    let _guard = crate::lab::NETNS_LOCK
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    cmd::run("ip", args)
}

struct Spoke {
    ns: String,
    hub_if: String,
    spoke_if: String,
    servers: Vec<Server>,
    ns_alive: bool,
}

/// A hub and its spokes; deletes its namespaces on drop.
pub struct Star {
    stem: String,
    hub: String,
    spokes: Vec<Spoke>,
    ports: Arc<PortAllocator>,
    torn_down: bool,
}

impl std::fmt::Debug for Star {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Star")
            .field("stem", &self.stem)
            .field("spokes", &self.spokes.len())
            .finish_non_exhaustive()
    }
}

fn ip(ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    cmd::run("ip", &full)
}

fn mac(ns: &str, dev: &str) -> Result<String> {
    let out = ip(ns, &["-j", "link", "show", "dev", dev])?;
    let json: serde_json::Value = serde_json::from_str(&out)?;
    json.pointer("/0/address")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("no MAC address for {dev} in {ns}: {out}"))
}

fn ns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

impl Star {
    /// Builds a hub with `spokes` spokes (1..=[`MAX_SPOKES`]); on failure deletes what it made.
    pub fn new(spokes: usize) -> Result<Self> {
        if !cmd::is_root() {
            bail!("the star topology needs root (network namespaces)");
        }
        if spokes == 0 || spokes > MAX_SPOKES {
            bail!("1 to {MAX_SPOKES} spokes, not {spokes}");
        }
        let stem = LabNames::fresh().stem;
        let mut star = Star {
            hub: format!("{stem}hub"),
            spokes: (0..spokes)
                .map(|i| Spoke {
                    ns: format!("{stem}s{i}"),
                    hub_if: format!("{stem}h{i}"),
                    spoke_if: format!("{stem}p{i}"),
                    servers: Vec::new(),
                    ns_alive: false,
                })
                .collect(),
            stem,
            ports: Arc::new(PortAllocator::default()),
            torn_down: false,
        };
        star.setup()
            .with_context(|| format!("setting up star {}", star.stem))?;
        Ok(star)
    }

    fn setup(&mut self) -> Result<()> {
        netns(&["netns", "add", &self.hub])?;
        for s in &mut self.spokes {
            netns(&["netns", "add", &s.ns])?;
            s.ns_alive = true;
        }
        let all: Vec<String> = std::iter::once(self.hub.clone())
            .chain(self.spokes.iter().map(|s| s.ns.clone()))
            .collect();
        for ns in &all {
            cmd::ns_exec(
                ns,
                &[
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv6.conf.all.accept_ra=0",
                    "net.ipv6.conf.default.accept_ra=0",
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                    "net.core.somaxconn=4096",
                    "net.ipv4.tcp_max_syn_backlog=4096",
                ],
            )?;
            ip(ns, &["link", "set", "lo", "up"])?;
        }
        for i in 0..self.spokes.len() {
            let s = &self.spokes[i];
            cmd::run(
                "ip",
                &[
                    "link",
                    "add",
                    &s.hub_if,
                    "netns",
                    &self.hub,
                    "type",
                    "veth",
                    "peer",
                    &s.spoke_if,
                    "netns",
                    &s.ns,
                ],
            )?;
            for (ns, dev, fam4, fam6) in [
                (
                    &self.hub,
                    &s.hub_if,
                    self.hub_ip(i, Family::V4),
                    self.hub_ip(i, Family::V6),
                ),
                (
                    &s.ns,
                    &s.spoke_if,
                    self.spoke_ip(i, Family::V4),
                    self.spoke_ip(i, Family::V6),
                ),
            ] {
                ip(ns, &["addr", "add", &format!("{fam4}/24"), "dev", dev])?;
                ip(
                    ns,
                    &[
                        "-6",
                        "addr",
                        "add",
                        &format!("{fam6}/64"),
                        "dev",
                        dev,
                        "nodad",
                    ],
                )?;
                ip(ns, &["link", "set", dev, "up"])?;
            }
            // Static neighbours: no ARP/ND on the way of the first burst of SYNs.
            let hub_mac = mac(&self.hub, &s.hub_if)?;
            let spoke_mac = mac(&s.ns, &s.spoke_if)?;
            for f in [Family::V4, Family::V6] {
                ip(
                    &self.hub,
                    &[
                        "neigh",
                        "replace",
                        &self.spoke_ip(i, f).to_string(),
                        "lladdr",
                        &spoke_mac,
                        "dev",
                        &s.hub_if,
                        "nud",
                        "permanent",
                    ],
                )?;
                ip(
                    &s.ns,
                    &[
                        "neigh",
                        "replace",
                        &self.hub_ip(i, f).to_string(),
                        "lladdr",
                        &hub_mac,
                        "dev",
                        &s.spoke_if,
                        "nud",
                        "permanent",
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// `nrt<pid><seq>`, the start of every name of this star.
    pub fn stem(&self) -> &str {
        &self.stem
    }

    /// The hub namespace (client and netrace).
    pub fn hub_ns(&self) -> &str {
        &self.hub
    }

    /// Number of spokes.
    pub fn spokes(&self) -> usize {
        self.spokes.len()
    }

    /// The hub's link towards spoke `i` (in the hub namespace).
    pub fn hub_if(&self, i: usize) -> &str {
        &self.spokes[i].hub_if
    }

    /// Spoke `i`'s namespace.
    pub fn spoke_ns(&self, i: usize) -> &str {
        &self.spokes[i].ns
    }

    /// The hub's address towards spoke `i`.
    pub fn hub_ip(&self, i: usize, family: Family) -> IpAddr {
        let n = FIRST_SUBNET + i;
        match family {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(198, 18, n as u8, 1)),
            Family::V6 => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, n as u16, 0, 0, 0, 0, 1)),
        }
    }

    /// Spoke `i`'s address.
    pub fn spoke_ip(&self, i: usize, family: Family) -> IpAddr {
        let n = FIRST_SUBNET + i;
        match family {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(198, 18, n as u8, 2)),
            Family::V6 => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, n as u16, 0, 0, 0, 0, 2)),
        }
    }

    /// Spoke `i`'s address with `port`.
    pub fn spoke_addr(&self, i: usize, family: Family, port: u16) -> SocketAddr {
        SocketAddr::new(self.spoke_ip(i, family), port)
    }

    /// Starts a [`Server`] (TCP accept, UDP echo) on `port` in spoke `i`.
    pub fn start_server(&mut self, i: usize, port: u16) -> Result<()> {
        let server = Server::start(&self.spokes[i].ns, port)?;
        self.spokes[i].servers.push(server);
        Ok(())
    }

    /// The servers of spoke `i`, in start order.
    pub fn servers(&self, i: usize) -> &[Server] {
        &self.spokes[i].servers
    }

    /// Stops the servers of spoke `i` (their threads hold the namespace alive).
    pub fn stop_servers(&mut self, i: usize) -> Result<()> {
        for mut s in self.spokes[i].servers.drain(..) {
            s.stop()?;
        }
        Ok(())
    }

    /// A client in the hub (default options); source ports from the star's allocator.
    pub fn client(&self) -> Client {
        self.client_with(ClientOptions::default())
    }

    /// A client in the hub with `opts`.
    pub fn client_with(&self, opts: ClientOptions) -> Client {
        Client::new(&self.hub, Arc::clone(&self.ports), opts)
    }

    /// Runs `args...` in the hub namespace.
    pub fn hub_exec(&self, args: &[&str]) -> Result<String> {
        cmd::ns_exec(&self.hub, args)
    }

    /// Routes `cidr` from the hub through spoke `i`, where an nftables rule drops it before
    /// routing: a black hole behind the watched interface, silent (no ICMP).
    pub fn blackhole(&self, i: usize, cidr: &str) -> Result<()> {
        let via = self.spoke_ip(i, Family::V4).to_string();
        ip(
            &self.hub,
            &["route", "add", cidr, "via", &via, "dev", self.hub_if(i)],
        )?;
        let table = format!(
            "table ip nrtblackhole {{\n  chain pre {{\n    type filter hook prerouting priority -300; policy accept;\n    ip daddr {cidr} drop\n  }}\n}}\n"
        );
        cmd::ns_exec_with_input(&self.spokes[i].ns, &["nft", "-f", "-"], Some(&table))?;
        Ok(())
    }

    /// Deletes the hub's link to spoke `i` (and with it the spoke's end).
    pub fn delete_hub_link(&self, i: usize) -> Result<()> {
        ip(&self.hub, &["link", "del", self.hub_if(i)])?;
        Ok(())
    }

    /// Stops spoke `i`'s servers and deletes its namespace: the kernel then destroys the
    /// veth pair, and the hub's end vanishes a moment later.
    pub fn delete_spoke_ns(&mut self, i: usize) -> Result<()> {
        self.stop_servers(i)?;
        netns(&["netns", "del", &self.spokes[i].ns])?;
        self.spokes[i].ns_alive = false;
        Ok(())
    }

    /// Whether `dev` exists in the hub.
    pub fn hub_has_link(&self, dev: &str) -> bool {
        ip(&self.hub, &["link", "show", "dev", dev]).is_ok()
    }

    /// Waits until `dev` is gone from the hub; false on timeout.
    pub fn wait_hub_link_gone(&self, dev: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.hub_has_link(dev) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Stops the servers, deletes the namespaces still present, and checks that no name of
    /// this star remains. Drop does the same, printing errors.
    pub fn teardown(mut self) -> Result<()> {
        self.teardown_once()
    }
}

impl Teardown for Star {
    fn what(&self) -> (&'static str, &str) {
        ("star", &self.stem)
    }

    fn torn_down(&mut self) -> &mut bool {
        &mut self.torn_down
    }

    fn remove(&mut self, errors: &mut Vec<String>) {
        for i in 0..self.spokes.len() {
            if let Err(e) = self.stop_servers(i) {
                errors.push(format!("{e:#}"));
            }
        }
        let mut namespaces: Vec<String> = self
            .spokes
            .iter()
            .filter(|s| s.ns_alive)
            .map(|s| s.ns.clone())
            .collect();
        namespaces.push(self.hub.clone());
        for ns in namespaces {
            if ns_exists(&ns) {
                if let Err(e) = netns(&["netns", "del", &ns]) {
                    errors.push(format!("{e:#}"));
                }
            }
        }
    }
}

impl Drop for Star {
    fn drop(&mut self) {
        self.teardown_on_drop();
    }
}
