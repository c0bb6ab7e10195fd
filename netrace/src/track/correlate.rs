//! Who lost the connection: links each uplink connection (post-SNAT) to its pod-side twin
//! and to the process that opened it.
//!
//! - NAT rewrites addresses and ports but not the TCP initial sequence number, so a pod-side
//!   SYN and its uplink twin share (ISN, destination address, destination port) within a
//!   moment of each other. Where that join fails (a SYN proxy rewrites the ISN), conntrack's
//!   reply tuple (asked over ctnetlink) gives the original tuple instead.
//! - The `sock:inet_sock_set_state` tracepoint names the owner (pid, command, cgroup) of each
//!   socket entering SYN_SENT and its final 4-tuple when it leaves SYN_SENT; the pod-side tuple
//!   (or, for the node's own sockets, the uplink tuple) finds it.

use std::{collections::HashMap, net::IpAddr};

use netrace_common::{EventKind, FlowKey};
use serde::Serialize;

use crate::{
    kernel::events::{addr_bytes, addrs, SockRecord},
    kernel::netlink,
    node::cgroups::{PodNames, Resolver, Workload},
    track::natmode::Pair,
};

/// How far apart in time a pod-side SYN and its uplink twin may be.
pub const JOIN_WINDOW_NS: u64 = 2_000_000_000;
/// How long unmatched pod-side SYNs and socket owners are kept.
const KEEP_NS: u64 = 180_000_000_000;
/// Sockets remembered per 4-tuple (the same tuple in several network namespaces).
const MAX_OWNERS_PER_TUPLE: usize = 8;
/// Linked pairs kept for NAT mode detection.
const MAX_PAIRS: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkMethod {
    /// Same ISN, destination and port on both sides.
    Isn,
    /// conntrack's original tuple for the uplink (reply) tuple.
    Conntrack,
    /// The node's own socket: no translation to undo.
    Local,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub tgid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    seen_ns: u64,
}

/// Everything known about who made an uplink connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Attribution {
    pub pod_src: Option<IpAddr>,
    pub pod_src_port: Option<u16>,
    pub link_method: Option<LinkMethod>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub cgroup: Option<String>,
    pub pod_uid: Option<String>,
    /// The pod's namespace and name, from the node's `/var/log/pods` (`--host-root`).
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub container_id: Option<String>,
}

type JoinKey = (u32, u8, [u8; 16], u16);

fn join_key(key: &FlowKey, isn: u32) -> JoinKey {
    (isn, key.family, key.dst_addr, key.dst_port)
}

pub struct Correlator {
    /// Pod-side SYNs waiting for their uplink twin.
    pod_syns: HashMap<JoinKey, (FlowKey, u64)>,
    /// Uplink SYNs that arrived before their pod-side twin.
    early_uplink: HashMap<JoinKey, (FlowKey, u64)>,
    /// Uplink 4-tuple → pod-side 4-tuple, and when the pod-side SYN was seen (ISN links).
    links: HashMap<FlowKey, (FlowKey, LinkMethod, Option<u64>)>,
    owners_by_sk: HashMap<u64, Owner>,
    /// Sockets by 4-tuple, oldest first: the tracepoint sees every network namespace, and
    /// sockets in different namespaces (pods with the same addresses) can share a 4-tuple.
    owners_by_tuple: HashMap<FlowKey, Vec<Owner>>,
    pairs: Vec<Pair>,
    cgroups: Resolver,
    pod_names: Option<PodNames>,
    conntrack_lookups_left: u32,
}

impl Correlator {
    pub fn new(cgroup_root: impl Into<std::path::PathBuf>) -> Self {
        Self {
            pod_syns: HashMap::new(),
            early_uplink: HashMap::new(),
            links: HashMap::new(),
            owners_by_sk: HashMap::new(),
            owners_by_tuple: HashMap::new(),
            pairs: Vec::new(),
            cgroups: Resolver::new(cgroup_root),
            pod_names: None,
            conntrack_lookups_left: 1000,
        }
    }

    /// Names pods (namespace/name) from the kubelet's log directories under `host_root`.
    pub fn with_host_root(mut self, host_root: &std::path::Path) -> Self {
        self.pod_names = Some(PodNames::new(host_root));
        self
    }

    fn link(&mut self, uplink: FlowKey, pod: FlowKey, method: LinkMethod, pod_ts: Option<u64>) {
        self.links.insert(uplink, (pod, method, pod_ts));
        if self.pairs.len() < MAX_PAIRS && method != LinkMethod::Local {
            self.pairs.push(Pair {
                pod_addr: pod.src_addr,
                pod_port: pod.src_port,
                uplink_addr: uplink.src_addr,
                uplink_port: uplink.src_port,
            });
        }
    }

    /// A SYN on a pod-side interface (the pod's own tuple).
    pub fn pod_syn(&mut self, key: FlowKey, isn: u32, ts_ns: u64) {
        let j = join_key(&key, isn);
        match self.early_uplink.remove(&j) {
            Some((uplink, t)) if t.abs_diff(ts_ns) <= JOIN_WINDOW_NS => {
                self.link(uplink, key, LinkMethod::Isn, Some(ts_ns));
            }
            _ => {
                // Retransmissions repeat the first SYN; keep the first sighting.
                self.pod_syns.entry(j).or_insert((key, ts_ns));
            }
        }
    }

    /// A new pending SYN on the uplink.
    pub fn uplink_syn(&mut self, key: FlowKey, isn: u32, ts_ns: u64) {
        let j = join_key(&key, isn);
        match self.pod_syns.remove(&j) {
            Some((pod, t)) if t.abs_diff(ts_ns) <= JOIN_WINDOW_NS => {
                self.link(key, pod, LinkMethod::Isn, Some(t));
            }
            _ => {
                self.early_uplink.insert(j, (key, ts_ns));
            }
        }
    }

    /// Links uplink connection `uplink` to its pod-side twin `pod`, found by the caller by the
    /// same rule as [`Correlator::pod_syn`] (same ISN, destination and port, moments apart):
    /// `analyze` finds twins as it reads, and needs to know which one came first.
    /// A capture has no socket events, so no pod-side time is kept to pick a socket owner by.
    pub fn linked(&mut self, uplink: FlowKey, pod: FlowKey) {
        self.link(uplink, pod, LinkMethod::Isn, None);
    }

    pub fn sock(&mut self, r: &SockRecord) {
        let owner = Owner {
            tgid: r.raw.tgid,
            comm: r.comm(),
            cgroup_id: r.raw.cgroup_id,
            seen_ns: r.raw.ts_ns,
        };
        match r.kind {
            EventKind::SockConnect => {
                if r.raw.key.src_port != 0 {
                    self.add_owner(r.raw.key, owner.clone());
                }
                self.owners_by_sk.insert(r.raw.skaddr, owner);
            }
            EventKind::SockLeftSynSent => {
                if let Some(o) = self.owners_by_sk.remove(&r.raw.skaddr) {
                    self.add_owner(r.raw.key, o);
                }
            }
            _ => {}
        }
    }

    fn add_owner(&mut self, tuple: FlowKey, owner: Owner) {
        let owners = self.owners_by_tuple.entry(tuple).or_default();
        if !owners.contains(&owner) {
            owners.push(owner);
            owners.sort_by_key(|o| o.seen_ns);
            if owners.len() > MAX_OWNERS_PER_TUPLE {
                owners.remove(0);
            }
        }
    }

    /// The socket behind `tuple`: the last one to connect before the pod-side SYN was seen
    /// (`syn_ns`), else the last one seen.
    fn owner(&self, tuple: &FlowKey, syn_ns: Option<u64>) -> Option<&Owner> {
        let owners = self.owners_by_tuple.get(tuple)?;
        match syn_ns {
            Some(t) => owners.iter().rev().find(|o| o.seen_ns <= t),
            None => owners.last(),
        }
    }

    /// Forgets what can no longer be joined.
    pub fn prune(&mut self, now_ns: u64) {
        let fresh = |t: u64| now_ns.saturating_sub(t) <= KEEP_NS;
        let recent = |t: u64| now_ns.saturating_sub(t) <= JOIN_WINDOW_NS * 2;
        self.pod_syns.retain(|_, (_, t)| recent(*t));
        self.early_uplink.retain(|_, (_, t)| recent(*t));
        self.owners_by_sk.retain(|_, o| fresh(o.seen_ns));
        self.owners_by_tuple.retain(|_, owners| {
            owners.retain(|o| fresh(o.seen_ns));
            !owners.is_empty()
        });
    }

    /// Looks up who made uplink connection `key`; `lookup_conntrack` allows the slower
    /// fallback (used for lost connections only). The link is consumed.
    pub fn attribute(&mut self, key: &FlowKey, lookup_conntrack: bool) -> Attribution {
        let mut a = Attribution::default();
        let linked = self.links.remove(key).or_else(|| {
            if self.owners_by_tuple.contains_key(key) {
                return Some((*key, LinkMethod::Local, None));
            }
            if lookup_conntrack && self.conntrack_lookups_left > 0 {
                self.conntrack_lookups_left -= 1;
                let pod = conntrack_original(key)?;
                self.link(*key, pod, LinkMethod::Conntrack, None);
                self.links.remove(key)
            } else {
                None
            }
        });
        let (socket_tuple, syn_ns) = if let Some((pod, method, syn_ns)) = linked {
            let (src, _) = addrs(&pod);
            a.pod_src = Some(src);
            a.pod_src_port = Some(pod.src_port);
            a.link_method = Some(method);
            (pod, syn_ns)
        } else {
            (*key, None)
        };
        if let Some(o) = self.owner(&socket_tuple, syn_ns).cloned() {
            a.pid = Some(o.tgid);
            a.comm = Some(o.comm);
            if let Some(Workload {
                cgroup,
                pod_uid,
                container_id,
            }) = self.cgroups.resolve(o.cgroup_id)
            {
                if let (Some(uid), Some(names)) = (&pod_uid, self.pod_names.as_mut()) {
                    if let Some((ns, name)) = names.lookup(uid) {
                        a.pod_namespace = Some(ns);
                        a.pod_name = Some(name);
                    }
                }
                a.cgroup = Some(cgroup);
                a.pod_uid = pod_uid;
                a.container_id = container_id;
            }
        }
        a
    }

    /// Forgets the link of a connection that will not be reported (e.g. answered ones when
    /// only losses are attributed).
    pub fn forget(&mut self, key: &FlowKey) {
        self.links.remove(key);
    }

    /// (pod-side SYNs waiting, uplink SYNs waiting, links held), for diagnostics.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (
            self.pod_syns.len(),
            self.early_uplink.len(),
            self.links.len(),
        )
    }

    pub fn pairs(&self) -> &[Pair] {
        &self.pairs
    }
}

/// Asks conntrack for the original tuple of a translated connection, by its reply tuple
/// (server → uplink address:port), over ctnetlink. One request, answered within the send.
fn conntrack_original(key: &FlowKey) -> Option<FlowKey> {
    let (src, dst) = addrs(key);
    let reply = netlink::Tuple {
        src: dst,
        dst: src,
        sport: key.dst_port,
        dport: key.src_port,
    };
    let orig = match netlink::conntrack_original(&reply) {
        Ok(o) => o?,
        Err(e) => {
            log::debug!("conntrack lookup for {src}:{}: {e}", key.src_port);
            return None;
        }
    };
    let (family, src_addr) = addr_bytes(orig.src);
    Some(FlowKey {
        family,
        src_addr,
        src_port: orig.sport,
        ..*key
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netrace_common::{SockEvent, FAMILY_V4};

    fn key(src: [u8; 4], sport: u16) -> FlowKey {
        let mut k = FlowKey {
            family: FAMILY_V4,
            src_port: sport,
            dst_port: 8080,
            ..Default::default()
        };
        k.src_addr[..4].copy_from_slice(&src);
        k.dst_addr[..4].copy_from_slice(&[198, 18, 3, 2]);
        k
    }

    const POD: [u8; 4] = [198, 18, 1, 2];
    const NODE: [u8; 4] = [198, 18, 2, 1];

    fn sock(kind: EventKind, k: FlowKey, skaddr: u64, tgid: u32) -> SockRecord {
        SockRecord {
            kind,
            raw: SockEvent {
                kind: kind as u32,
                tgid,
                key: k,
                skaddr,
                comm: *b"client\0\0\0\0\0\0\0\0\0\0",
                ..Default::default()
            },
        }
    }

    #[test]
    fn isn_join_in_either_order() {
        let mut c = Correlator::new("/nonexistent");
        c.pod_syn(key(POD, 40000), 7, 100);
        c.uplink_syn(key(NODE, 2000), 7, 200);
        c.uplink_syn(key(NODE, 3000), 9, 300);
        c.pod_syn(key(POD, 40001), 9, 350);
        let a = c.attribute(&key(NODE, 2000), false);
        assert_eq!(a.pod_src_port, Some(40000));
        assert_eq!(a.link_method, Some(LinkMethod::Isn));
        assert_eq!(
            c.attribute(&key(NODE, 3000), false).pod_src_port,
            Some(40001)
        );
        assert_eq!(c.pairs().len(), 2);
    }

    #[test]
    fn the_same_tuple_in_two_namespaces_is_told_apart_by_time() {
        // Two pods with the same address in two network namespaces connect from the same
        // port: the owner is the socket that connected last before the pod-side SYN, not
        // the last one the tracepoint reported.
        let mut c = Correlator::new("/nonexistent");
        let pod = key(POD, 40000);
        let mut ours = sock(EventKind::SockConnect, pod, 1, 111);
        ours.raw.ts_ns = 90;
        c.sock(&ours);
        c.pod_syn(pod, 7, 100);
        c.uplink_syn(key(NODE, 2000), 7, 110);
        let mut theirs = sock(EventKind::SockConnect, pod, 2, 222);
        theirs.raw.ts_ns = 150;
        c.sock(&theirs);
        assert_eq!(c.attribute(&key(NODE, 2000), false).pid, Some(111));
    }

    #[test]
    fn isn_join_needs_the_same_destination_and_time() {
        let mut c = Correlator::new("/nonexistent");
        c.pod_syn(key(POD, 40000), 7, 0);
        let mut other = key(NODE, 2000);
        other.dst_port = 443;
        c.uplink_syn(other, 7, 10);
        assert_eq!(c.attribute(&other, false).pod_src_port, None);
        c.uplink_syn(key(NODE, 2001), 7, JOIN_WINDOW_NS * 3);
        assert_eq!(c.attribute(&key(NODE, 2001), false).pod_src_port, None);
    }

    #[test]
    fn owners_by_bound_port_and_by_final_tuple() {
        let mut c = Correlator::new("/nonexistent");
        // Bound before connect: the port is known at SYN_SENT.
        c.sock(&sock(EventKind::SockConnect, key(POD, 40000), 1, 111));
        // Unbound: port 0 at SYN_SENT, the final tuple when it leaves SYN_SENT.
        c.sock(&sock(EventKind::SockConnect, key(POD, 0), 2, 222));
        c.sock(&sock(EventKind::SockLeftSynSent, key(POD, 40001), 2, 0));
        c.pod_syn(key(POD, 40000), 7, 0);
        c.uplink_syn(key(NODE, 2000), 7, 1);
        c.pod_syn(key(POD, 40001), 8, 0);
        c.uplink_syn(key(NODE, 2001), 8, 1);
        let a = c.attribute(&key(NODE, 2000), false);
        assert_eq!((a.pid, a.comm.as_deref()), (Some(111), Some("client")));
        assert_eq!(c.attribute(&key(NODE, 2001), false).pid, Some(222));
    }

    #[test]
    fn local_sockets_need_no_link() {
        let mut c = Correlator::new("/nonexistent");
        c.sock(&sock(EventKind::SockConnect, key(NODE, 45000), 1, 333));
        let a = c.attribute(&key(NODE, 45000), false);
        assert_eq!(a.link_method, Some(LinkMethod::Local));
        assert_eq!(a.pid, Some(333));
    }
}
