//! Unique, short names for the lab's namespaces and links, and the search for leftovers.
//!
//! Every name is `nrt` + the process id in base 36 (5 digits) + a per-process lab counter in
//! base 36 (3 digits) + a role (`pod`, `node`, `fw`, `srv` for namespaces; two letters for
//! links). Links stay within the kernel's 15 characters; parallel tests and parallel processes
//! never collide, and a leftover name tells which process made it.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

/// Every namespace and link of the lab starts with this.
pub const PREFIX: &str = "nrt";
const PID_DIGITS: usize = 5;
const SEQ_DIGITS: usize = 3;

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// `n` in base 36, zero-padded (or cut) to `width` digits: short, name-safe ids.
pub fn base36(mut n: u64, width: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `nrt` + this process's id: the start of every name this process creates.
pub fn process_prefix() -> String {
    format!(
        "{PREFIX}{}",
        base36(u64::from(std::process::id()), PID_DIGITS)
    )
}

/// The process id encoded in a lab name, if it is one: `nrt`, five base-36 digits, a
/// three-digit lab counter and a role.
fn pid_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits = rest.get(..PID_DIGITS)?;
    let lab_counter = rest.get(PID_DIGITS..PID_DIGITS + SEQ_DIGITS)?;
    if !lab_counter
        .bytes()
        .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    {
        return None;
    }
    u32::from_str_radix(digits, 36).ok()
}

/// The names of one lab.
#[derive(Debug, Clone)]
pub struct LabNames {
    /// `nrt<pid><seq>`, shared by every name below.
    pub stem: String,
    /// Namespace of the pod (the client).
    pub pod: String,
    /// Namespace of the node (routes, SNAT; netrace runs here).
    pub node: String,
    /// Namespace of the stateless firewall.
    pub firewall: String,
    /// Namespace of the server.
    pub server: String,
    /// The pod's interface (in `pod`).
    pub pod_if: String,
    /// The node's interface towards the pod (in `node`).
    pub node_pod_if: String,
    /// The node's uplink towards the firewall (in `node`): where netrace watches.
    pub node_uplink: String,
    /// The firewall's interface towards the node (in `firewall`).
    pub fw_node_if: String,
    /// The firewall's interface towards the server (in `firewall`).
    pub fw_server_if: String,
    /// The server's interface (in `server`).
    pub server_if: String,
}

impl LabNames {
    /// Fresh names, unique within this process and across processes.
    pub fn fresh() -> Self {
        let seq = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let stem = format!("{}{}", process_prefix(), base36(u64::from(seq), SEQ_DIGITS));
        let n = |role: &str| format!("{stem}{role}");
        Self {
            pod: n("pod"),
            node: n("node"),
            firewall: n("fw"),
            server: n("srv"),
            pod_if: n("pn"),
            node_pod_if: n("np"),
            node_uplink: n("nu"),
            fw_node_if: n("fn"),
            fw_server_if: n("fs"),
            server_if: n("sf"),
            stem,
        }
    }

    /// The four namespaces, pod first.
    pub fn namespaces(&self) -> [&str; 4] {
        [&self.pod, &self.node, &self.firewall, &self.server]
    }

    /// The six link names.
    pub fn links(&self) -> [&str; 6] {
        [
            &self.pod_if,
            &self.node_pod_if,
            &self.node_uplink,
            &self.fw_node_if,
            &self.fw_server_if,
            &self.server_if,
        ]
    }
}

/// Names of the network namespaces in `/run/netns` (what `ip netns list` shows).
pub fn root_namespaces() -> Vec<String> {
    dir_names(Path::new("/run/netns"))
}

/// Names of the links in the root namespace (as this process's `/sys` shows them).
pub fn root_links() -> Vec<String> {
    dir_names(Path::new("/sys/class/net"))
}

fn dir_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let names: BTreeSet<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.into_iter().collect()
}

fn lab_names_where(keep: impl Fn(&str) -> bool) -> Vec<String> {
    let mut out: Vec<String> = root_namespaces()
        .into_iter()
        .chain(root_links())
        .filter(|n| n.starts_with(PREFIX) && keep(n))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Namespaces and links named `stem...` (a lab's, a star's) that remove themselves once: by
/// an explicit teardown, which reports errors, or on drop, which prints them.
pub(crate) trait Teardown {
    /// What it is (`lab`, `star`) and its stem.
    fn what(&self) -> (&'static str, &str);
    /// The flag that makes teardown happen once.
    fn torn_down(&mut self) -> &mut bool;
    /// Stops what runs and deletes what was made, collecting errors.
    fn remove(&mut self, errors: &mut Vec<String>);

    /// Removes everything once, then checks that no name of the stem remains.
    fn teardown_once(&mut self) -> anyhow::Result<()> {
        if std::mem::replace(self.torn_down(), true) {
            return Ok(());
        }
        let mut errors = Vec::new();
        self.remove(&mut errors);
        let (what, stem) = self.what();
        check_torn_down(what, stem, errors)
    }

    /// [`Teardown::teardown_once`] from `Drop`: errors go to standard error.
    fn teardown_on_drop(&mut self) {
        if let Err(e) = self.teardown_once() {
            eprintln!("netrace-lab: {e:#}");
        }
    }
}

/// Ends a teardown of the namespaces and links named `stem...` (a lab's, a star's): fails
/// with the teardown's own `errors` and any such name still present.
fn check_torn_down(what: &str, stem: &str, mut errors: Vec<String>) -> anyhow::Result<()> {
    let remaining = lab_names_where(|n| n.starts_with(stem));
    if !remaining.is_empty() {
        errors.push(format!("still present after teardown: {remaining:?}"));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("tearing down {what} {stem}: {}", errors.join("; "))
    }
}

/// Lab namespaces and root-namespace links made by *this* process that still exist.
/// Safe to call while other processes run labs of their own.
pub fn leftovers() -> Vec<String> {
    let mine = process_prefix();
    lab_names_where(|n| n.starts_with(&mine))
}

/// Every `nrt*` namespace and root-namespace link, whoever made it.
pub fn leftovers_any() -> Vec<String> {
    lab_names_where(|_| true)
}

/// `nrt*` namespaces and root links whose creating process no longer runs: real leftovers,
/// whatever else runs on the machine. A name that does not encode a process id is not one of
/// the lab's and is left alone (another tool, or a person, may use the prefix).
pub fn stale_leftovers() -> Vec<String> {
    lab_names_where(|n| pid_of(n).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()))
}

/// Deletes [`stale_leftovers`] (namespaces with `ip netns del`, links with `ip link del`) and
/// returns what it deleted. Labs of running processes are left alone.
pub fn remove_stale() -> anyhow::Result<Vec<String>> {
    let stale = stale_leftovers();
    let namespaces = root_namespaces();
    for name in &stale {
        if namespaces.contains(name) {
            crate::cmd::run("ip", &["netns", "del", name])?;
        } else {
            crate::cmd::run("ip", &["link", "del", name])?;
        }
    }
    Ok(stale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_limit_and_encode_the_pid() {
        let names = LabNames::fresh();
        for link in names.links() {
            assert!(link.len() <= 15, "{link} is longer than 15 characters");
        }
        assert_eq!(pid_of(&names.node), Some(std::process::id()));
        assert_ne!(names.stem, LabNames::fresh().stem);
        assert_eq!(pid_of("nrtrtm1"), None, "not a lab name: left alone");
        assert_eq!(pid_of("nrt"), None);
        assert_eq!(base36(35, 3), "00z");
        assert_eq!(base36(36, 3), "010");
    }
}
