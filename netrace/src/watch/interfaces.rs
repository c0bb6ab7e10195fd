//! The interfaces a run watches: the ones still attached and the ones that went away during
//! the run. A vanished interface keeps its name for the records of connections it carried.

use std::collections::BTreeMap;

use crate::node::iface;

/// Attached and vanished interfaces, by index.
#[derive(Debug, Default)]
pub struct Interfaces {
    attached: BTreeMap<u32, String>,
    vanished: BTreeMap<u32, String>,
}

impl Interfaces {
    /// Records an interface netrace attached to.
    pub fn attached(&mut self, ifindex: u32, name: &str) {
        self.attached.insert(ifindex, name.to_string());
    }

    /// The name for records: the watched interface's, even after it vanished; else the
    /// system's current name for the index; else `if<index>`.
    pub fn name(&self, ifindex: u32) -> String {
        self.attached
            .get(&ifindex)
            .or_else(|| self.vanished.get(&ifindex))
            .cloned()
            .or_else(|| iface::name(ifindex))
            .unwrap_or_else(|| format!("if{ifindex}"))
    }

    /// Moves every attached interface whose name no longer has its index (deleted, or its
    /// namespace gone) to the vanished set; returns the names that went away just now.
    /// An interface whose name the kernel cannot look up for another reason (e.g. netrace is
    /// out of file descriptors) is not gone.
    pub fn check(&mut self) -> Vec<String> {
        self.check_with(iface::gone)
    }

    fn check_with(&mut self, gone_now: impl Fn(&str, u32) -> bool) -> Vec<String> {
        let gone: Vec<u32> = self
            .attached
            .iter()
            .filter(|(idx, name)| gone_now(name, **idx))
            .map(|(idx, _)| *idx)
            .collect();
        let mut names = Vec::new();
        for idx in gone {
            if let Some(name) = self.attached.remove(&idx) {
                names.push(name.clone());
                self.vanished.insert(idx, name);
            }
        }
        names
    }

    /// Whether every watched interface went away.
    pub fn all_gone(&self) -> bool {
        self.attached.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vanished_interfaces_are_reported_once_and_keep_their_names() {
        let mut ifs = Interfaces::default();
        ifs.attached(7, "nrtup0");
        ifs.attached(9, "nrtup1");
        let present = |n: &str| match n {
            "nrtup0" => Some(7),
            "nrtup1" => Some(9),
            _ => None,
        };
        let by = |f: fn(&str) -> Option<u32>| move |n: &str, idx: u32| f(n) != Some(idx);
        assert!(ifs.check_with(by(present)).is_empty());
        // nrtup1 goes away: reported once, its records keep the name.
        let only0 = |n: &str| (n == "nrtup0").then_some(7);
        assert_eq!(ifs.check_with(by(only0)), vec!["nrtup1".to_string()]);
        assert!(ifs.check_with(by(only0)).is_empty());
        assert_eq!(ifs.name(9), "nrtup1");
        assert!(!ifs.all_gone());
        // The index of nrtup0 now belongs to another interface: nrtup0 is gone too.
        assert_eq!(ifs.check_with(by(|_| Some(12))), vec!["nrtup0".to_string()]);
        assert!(ifs.all_gone());
        assert_eq!(ifs.name(7), "nrtup0");
    }
}
