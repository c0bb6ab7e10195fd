//! A second pod behind the same node (IPv4), for tests that must tell pods apart. Its
//! namespace and veth carry the lab's stem, and it removes them on drop.

use std::{net::Ipv4Addr, sync::Arc};

use anyhow::Result;

use crate::{
    client::{Client, ClientOptions, PortAllocator},
    cmd, Lab,
};

/// The second pod's address and the node's address towards it.
pub const POD2_4: Ipv4Addr = Ipv4Addr::new(198, 18, 4, 2);
pub const NODE_POD2_4: Ipv4Addr = Ipv4Addr::new(198, 18, 4, 1);

pub struct ExtraPod {
    /// The pod's namespace.
    pub ns: String,
    /// The node's interface towards this pod (in the node namespace): a pod-side interface.
    pub node_if: String,
    ports: Arc<PortAllocator>,
}

impl ExtraPod {
    /// Adds the pod to `lab`; `ports` are the pod's own source ports (keep them apart from
    /// the first pod's so conntrack tells the two apart).
    pub fn add(lab: &Lab, first_port: u16, last_port: u16) -> Result<Self> {
        let stem = &lab.names().stem;
        let pod = Self {
            ns: format!("{stem}pq2"),
            node_if: format!("{stem}n2"),
            ports: Arc::new(PortAllocator::new(first_port, last_port)),
        };
        let pod_if = format!("{stem}p2");
        let node = lab.node_ns();
        cmd::run("ip", &["netns", "add", &pod.ns])?;
        let steps: Vec<Vec<String>> = vec![
            vec![
                "ip",
                "link",
                "add",
                &pod_if,
                "netns",
                &pod.ns,
                "type",
                "veth",
                "peer",
                &pod.node_if,
                "netns",
                node,
            ],
            vec![
                "ip",
                "-n",
                &pod.ns,
                "addr",
                "add",
                &format!("{POD2_4}/24"),
                "dev",
                &pod_if,
            ],
            vec!["ip", "-n", &pod.ns, "link", "set", &pod_if, "up"],
            vec!["ip", "-n", &pod.ns, "link", "set", "lo", "up"],
            vec![
                "ip",
                "-n",
                &pod.ns,
                "route",
                "add",
                "default",
                "via",
                &NODE_POD2_4.to_string(),
            ],
            vec![
                "ip",
                "-n",
                node,
                "addr",
                "add",
                &format!("{NODE_POD2_4}/24"),
                "dev",
                &pod.node_if,
            ],
            vec!["ip", "-n", node, "link", "set", &pod.node_if, "up"],
        ]
        .into_iter()
        .map(|v| v.into_iter().map(String::from).collect())
        .collect();
        for step in steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            cmd::run(args[0], &args[1..])?;
        }
        Ok(pod)
    }

    /// A client in this pod.
    pub fn client(&self) -> Client {
        Client::new(&self.ns, Arc::clone(&self.ports), ClientOptions::default())
    }
}

impl Drop for ExtraPod {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth, and with it the node's end.
        let _ = cmd::run("ip", &["netns", "del", &self.ns]);
    }
}
