//! Which source ports had an answer counted, per destination as seen through one interface,
//! so that a SYN-ACK the server repeats is known as a repeat (the kernel's books did this
//! before the logs). Each answer from the logs marks a bit: the destination is looked up once
//! per run of answers to it (`dest`), then each port is two index steps, not a hash of the
//! whole book key per answer (that was a fifth of this process's CPU at high rates).
//!
//! Bounded: at most [`MAX_DESTS`] destinations and [`MAX_GROUPS`] groups of 256 ports with an
//! answer; when either is full everything is forgotten and marking starts over (a repeat of
//! an answer from before that is then counted as an unmatched SYN-ACK, as when the kernel's
//! books were full).

use foldhash::{HashMap, HashMapExt};
use netrace_common::{BookKey, FlowKey, BOOK_PORTS};

const GROUPS_PER_DEST: usize = (1 << 16) / BOOK_PORTS;
pub const MAX_DESTS: usize = 4096;
pub const MAX_GROUPS: usize = 1 << 16;
/// "No group yet" in a destination's group index.
const NONE: u32 = u32::MAX;

/// A destination's place in [`Answered`], valid until the next [`Answered::dest`] that clears.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dest(usize);

#[derive(Debug)]
pub struct Answered {
    /// By book key with the port group zeroed (interface, family, address, port).
    index: HashMap<BookKey, Dest>,
    /// Per destination, [`GROUPS_PER_DEST`] indexes into `bits`.
    groups: Vec<u32>,
    /// A bit per source port of a group.
    bits: Vec<[u64; BOOK_PORTS / 64]>,
}

fn dest_key(k: &BookKey) -> BookKey {
    BookKey {
        port_group: 0,
        ..*k
    }
}

impl Default for Answered {
    fn default() -> Self {
        Self {
            index: HashMap::new(),
            groups: Vec::new(),
            bits: Vec::new(),
        }
    }
}

impl Answered {
    /// The destination of book `k`, made if new (everything is forgotten first when the
    /// destinations are full).
    pub fn dest(&mut self, k: &BookKey) -> Dest {
        let key = dest_key(k);
        if let Some(d) = self.index.get(&key) {
            return *d;
        }
        if self.index.len() >= MAX_DESTS {
            self.clear();
        }
        let d = Dest(self.index.len());
        self.groups
            .resize(self.groups.len() + GROUPS_PER_DEST, NONE);
        self.index.insert(key, d);
        d
    }

    /// Marks `port` of destination `d` answered. `d` must come from [`Answered::dest`] since
    /// the last clear; a stale one marks nothing.
    pub fn mark(&mut self, d: Dest, port: u16) {
        let at = d.0 * GROUPS_PER_DEST + usize::from(port) / BOOK_PORTS;
        let Some(&g) = self.groups.get(at) else {
            return;
        };
        let g = if g == NONE {
            if self.bits.len() >= MAX_GROUPS {
                // Forget everything but keep this destination's place: the caller holds it.
                self.bits.clear();
                self.groups.iter_mut().for_each(|g| *g = NONE);
            }
            self.bits.push([0; BOOK_PORTS / 64]);
            let g = self.bits.len() - 1;
            if let Some(slot) = self.groups.get_mut(at) {
                *slot = g as u32;
            }
            g
        } else {
            g as usize
        };
        let cell = BookKey::cell(port);
        if let Some(b) = self.bits.get_mut(g) {
            b[cell / 64] |= 1 << (cell % 64);
        }
    }

    /// Whether an answer to `key` (a SYN that left through `ifindex`) was marked.
    pub fn contains(&self, key: &FlowKey, ifindex: u32) -> bool {
        let Some(d) = self.index.get(&dest_key(&BookKey::of(key, ifindex))) else {
            return false;
        };
        let at = d.0 * GROUPS_PER_DEST + usize::from(key.src_port) / BOOK_PORTS;
        let cell = BookKey::cell(key.src_port);
        self.groups
            .get(at)
            .and_then(|&g| self.bits.get(g as usize))
            .is_some_and(|b| b[cell / 64] & (1 << (cell % 64)) != 0)
    }

    fn clear(&mut self) {
        self.index.clear();
        self.groups.clear();
        self.bits.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netrace_common::FAMILY_V4;

    fn key(last: u8, src_port: u16) -> FlowKey {
        FlowKey {
            family: FAMILY_V4,
            src_port,
            dst_port: 443,
            dst_addr: [198, 18, 0, last, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..FlowKey::default()
        }
    }

    /// A marked port is known on its destination and interface only; full bounds forget
    /// everything, and marking goes on after that.
    #[test]
    fn marks_per_destination_and_interface_and_forgets_when_full() {
        let mut a = Answered::default();
        let d = a.dest(&BookKey::of(&key(1, 40000), 2));
        a.mark(d, 40000);
        assert!(a.contains(&key(1, 40000), 2));
        assert!(!a.contains(&key(1, 40001), 2));
        assert!(!a.contains(&key(1, 40000), 3));
        assert!(!a.contains(&key(2, 40000), 2));
        // The same destination through another port group is the same place.
        assert_eq!(a.dest(&BookKey::of(&key(1, 1024), 2)), d);

        let far = |i: usize, port: u16| FlowKey {
            dst_addr: [
                198,
                19,
                (i >> 8) as u8,
                i as u8,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
            ],
            ..key(0, port)
        };
        for i in 0..MAX_DESTS {
            a.dest(&BookKey::of(&far(i, 1), 2));
        }
        // The destination past the bound forgot everything before it.
        assert!(!a.contains(&key(1, 40000), 2));
        assert_eq!(a.index.len(), 1);

        // Every group of enough destinations fills the groups; the next mark forgets them.
        let per_dest = MAX_GROUPS / GROUPS_PER_DEST;
        for i in 0..per_dest {
            let d = a.dest(&BookKey::of(&far(i, 0), 2));
            for g in 0..GROUPS_PER_DEST {
                a.mark(d, (g * BOOK_PORTS) as u16);
            }
        }
        assert!(a.contains(&far(0, 0), 2));
        let d = a.dest(&BookKey::of(&key(1, 40000), 2));
        a.mark(d, 40000);
        assert!(!a.contains(&far(0, 0), 2));
        assert!(a.contains(&key(1, 40000), 2));
    }
}
