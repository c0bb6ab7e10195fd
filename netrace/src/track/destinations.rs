//! Outcomes by destination (address and port), bounded: the first `max_destinations`
//! destinations get their own row, later ones share an "other" row. For each row, which
//! source ports got answers and which were lost (bounded too), so the judge can learn the
//! firewall's edge from destinations that answer and compare inside and outside the range
//! within each destination.

use std::{fmt, net::IpAddr};

// foldhash is several times faster than SipHash on these small keys, and its per-process seed
// keeps crafted collisions from being free (the maps are bounded besides).
use foldhash::{HashMap, HashMapExt};

use serde::Serialize;

use crate::{
    ports::PortRange,
    track::{port_cells::PortCells, stats::Counts, tracker::OutcomeKind},
};

/// Where a connection went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    pub addr: IpAddr,
    pub port: u16,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

impl Serialize for Destination {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Per source port of one row: attempts that came back (SYN-ACK or RST, or a late
/// SYN-ACK) and attempts lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortCell {
    pub back: u32,
    pub lost: u32,
}

/// Lost and came-back attempts on one side of a range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Side {
    pub lost: u64,
    pub back: u64,
}

/// One row's attempts inside and outside a range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Split {
    pub inside: Side,
    pub outside: Side,
}

/// A row's index; the "other" row has its own.
pub type Slot = u16;
pub const OTHER: Slot = Slot::MAX;

/// Default bounds: 1024 destinations with their own row; 262 144 sparse (row, port) cells,
/// about 4 MiB, and up to four busy rows with an array of every port, 512 KiB each
/// (`PortCells`): about 6 MiB at most.
pub const MAX_DESTINATIONS: usize = 1024;
pub const MAX_CELLS: usize = 1 << 18;

#[derive(Clone, Debug)]
pub struct Destinations {
    index: HashMap<Destination, Slot>,
    rows: Vec<(Destination, Counts)>,
    other: Counts,
    /// Destinations that found no free row (counted once per attempt).
    pub other_attempts: u64,
    cells: PortCells,
    max_destinations: usize,
    /// Outcomes not kept per port because the cells were full (still in the counts).
    pub cells_overflow: u64,
}

/// One row of the "by destination" table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DestinationRow {
    /// `None` for the "other" row.
    pub destination: Option<Destination>,
    #[serde(flatten)]
    pub counts: Counts,
}

impl DestinationRow {
    pub fn label(&self) -> String {
        self.destination
            .map_or_else(|| "other".to_string(), |d| d.to_string())
    }
}

impl Default for Destinations {
    fn default() -> Self {
        Self::new(MAX_DESTINATIONS, MAX_CELLS)
    }
}

impl Destinations {
    pub fn new(max_destinations: usize, max_cells: usize) -> Self {
        Self {
            index: HashMap::new(),
            rows: Vec::new(),
            other: Counts::default(),
            other_attempts: 0,
            cells: PortCells::new(max_cells),
            max_destinations: max_destinations.min(usize::from(OTHER)),
            cells_overflow: 0,
        }
    }

    /// The row of `d`, made if there is room (else the "other" row's slot).
    pub fn slot(&mut self, d: Destination) -> Slot {
        if let Some(s) = self.index.get(&d) {
            return *s;
        }
        if self.rows.len() >= self.max_destinations {
            return OTHER;
        }
        let s = self.rows.len() as Slot;
        self.rows.push((d, Counts::default()));
        self.index.insert(d, s);
        s
    }

    /// Records one outcome of a connection from `src_port` to `d`.
    pub fn add(&mut self, d: Destination, src_port: u16, kind: OutcomeKind) {
        self.add_n(d, src_port, kind, 1);
    }

    /// Records `n` outcomes of one kind from `src_port` to `d`.
    pub fn add_n(&mut self, d: Destination, src_port: u16, kind: OutcomeKind, n: u64) {
        let slot = self.slot(d);
        self.add_n_at(slot, src_port, kind, n);
    }

    /// As [`Destinations::add_n`], to the row [`Destinations::slot`] gave (for a run of
    /// outcomes to one destination: its row is looked up once).
    pub fn add_n_at(&mut self, slot: Slot, src_port: u16, kind: OutcomeKind, n: u64) {
        if n == 0 {
            return;
        }
        match self.rows.get_mut(usize::from(slot)) {
            Some((_, c)) => c.add_n(kind, n),
            None => {
                self.other.add_n(kind, n);
                if kind != OutcomeKind::Late {
                    self.other_attempts += n;
                }
            }
        }
        self.add_port(slot, src_port, kind, n);
    }

    /// An attempt known answered whose outcome event was dropped (ring buffer full).
    pub fn add_unseen_answer(&mut self, d: Destination, src_port: u16) {
        self.add(d, src_port, OutcomeKind::Answered);
    }

    fn add_port(&mut self, slot: Slot, port: u16, kind: OutcomeKind, n: u64) {
        // An ICMP error says nothing about which ports SYN-ACKs come back to.
        if kind == OutcomeKind::Unreachable {
            return;
        }
        let Some(cell) = self.cells.get_or_make(slot, port) else {
            self.cells_overflow += n;
            return;
        };
        let m = u32::try_from(n).unwrap_or(u32::MAX);
        match kind {
            OutcomeKind::Answered | OutcomeKind::Refused => cell.back = cell.back.saturating_add(m),
            OutcomeKind::Lost | OutcomeKind::Abandoned => cell.lost = cell.lost.saturating_add(m),
            // The answer came after all: the port is reachable. The attempt stays lost in
            // the counts (it was, for the client's timeout), but not as evidence of a block.
            OutcomeKind::Late => {
                cell.back = cell.back.saturating_add(m);
                cell.lost = cell.lost.saturating_sub(m);
            }
            OutcomeKind::Unreachable => {}
        }
    }

    /// Rows by attempts, most first (ties by destination), at most `n`, then an "other" row
    /// with everything else when there is anything else.
    pub fn top(&self, n: usize) -> Vec<DestinationRow> {
        let mut rows: Vec<&(Destination, Counts)> = self.rows.iter().collect();
        rows.sort_by(|a, b| b.1.attempts.cmp(&a.1.attempts).then(a.0.cmp(&b.0)));
        let mut out: Vec<DestinationRow> = rows
            .iter()
            .take(n)
            .map(|(d, c)| DestinationRow {
                destination: Some(*d),
                counts: *c,
            })
            .collect();
        let mut other = self.other;
        for (_, c) in rows.iter().skip(n) {
            other.attempts += c.attempts;
            other.answered += c.answered;
            other.lost += c.lost;
            other.refused += c.refused;
            other.unreachable += c.unreachable;
            other.late += c.late;
        }
        if other.attempts > 0 || other.late > 0 {
            out.push(DestinationRow {
                destination: None,
                counts: other,
            });
        }
        out
    }

    /// Every row with its own slot (the "other" row last, with `None`).
    pub fn slots(&self) -> impl Iterator<Item = (Slot, Option<Destination>, Counts)> + '_ {
        self.rows
            .iter()
            .enumerate()
            .map(|(i, (d, c))| (i as Slot, Some(*d), *c))
            .chain(std::iter::once((OTHER, None, self.other)))
    }

    /// Per-port cells of the rows `include` accepts, merged: (port, back, lost) by port.
    pub fn ports(&self, include: impl Fn(Slot) -> bool) -> Vec<(u16, PortCell)> {
        // Sized once: growing it rehashed every entry several times per verdict.
        let mut merged: HashMap<u16, PortCell> =
            HashMap::with_capacity(self.cells.len_hint().min(usize::from(u16::MAX) + 1));
        for (slot, port, c) in self.cells.iter() {
            if include(slot) {
                let m = merged.entry(port).or_default();
                m.back += c.back;
                m.lost += c.lost;
            }
        }
        let mut v: Vec<(u16, PortCell)> = merged.into_iter().collect();
        v.sort_unstable_by_key(|(p, _)| *p);
        v
    }

    /// Every row's (lost, came back) inside and outside `range`, in one pass over the cells.
    pub fn splits(&self, range: PortRange) -> HashMap<Slot, Split> {
        let mut out: HashMap<Slot, Split> = HashMap::with_capacity(self.rows.len() + 1);
        for (slot, port, c) in self.cells.iter() {
            let s = out.entry(slot).or_default();
            let side = if range.contains(port) {
                &mut s.inside
            } else {
                &mut s.outside
            };
            side.lost += u64::from(c.lost);
            side.back += u64::from(c.back);
        }
        out
    }

    /// How many destinations have a row of their own.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.other.attempts == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn d(last: u8, port: u16) -> Destination {
        Destination {
            addr: IpAddr::V4(Ipv4Addr::new(198, 18, 3, last)),
            port,
        }
    }

    /// A count of outcomes (the kernel's books) lands as that many outcomes one by one would,
    /// the "other" row and a full cell table included.
    #[test]
    fn counted_outcomes_add_up_as_single_ones() {
        let mut one = Destinations::new(2, 3);
        let mut counted = one.clone();
        let seen = [
            (d(1, 80), 2000, OutcomeKind::Answered, 3),
            (d(1, 80), 2000, OutcomeKind::Lost, 2),
            (d(1, 80), 2000, OutcomeKind::Late, 1),
            (d(2, 80), 40000, OutcomeKind::Refused, 4),
            (d(3, 80), 40001, OutcomeKind::Answered, 5),
            (d(1, 80), 40002, OutcomeKind::Answered, 6),
            (d(2, 80), 40003, OutcomeKind::Lost, 7),
            (d(2, 80), 40004, OutcomeKind::Unreachable, 2),
        ];
        for (dst, port, kind, n) in seen {
            for _ in 0..n {
                one.add(dst, port, kind);
            }
            counted.add_n(dst, port, kind, n);
        }
        let cells = |t: &Destinations| {
            let mut c: Vec<_> = t.cells.iter().collect();
            c.sort_by_key(|(s, p, _)| (*s, *p));
            c
        };
        assert_eq!(one.rows, counted.rows);
        assert_eq!(one.other, counted.other);
        assert_eq!(one.other_attempts, counted.other_attempts);
        assert_eq!(one.cells_overflow, counted.cells_overflow);
        assert_eq!(cells(&one), cells(&counted));
        assert!(counted.cells_overflow > 0);
        assert!(counted.other_attempts > 0);
    }

    #[test]
    fn top_rows_and_other() {
        let mut t = Destinations::new(3, 100);
        for i in 0..5u8 {
            for j in 0..=i {
                t.add(d(i, 80), 1000 + u16::from(j), OutcomeKind::Answered);
            }
        }
        // Rows for the first three destinations seen; two more in "other".
        assert_eq!(t.len(), 3);
        let top = t.top(2);
        assert_eq!(top.len(), 3);
        assert_eq!(top[0].destination, Some(d(2, 80)));
        assert_eq!(top[0].counts.attempts, 3);
        assert_eq!(top[1].destination, Some(d(1, 80)));
        assert_eq!(top[2].label(), "other");
        // d(0): 1, d(3): 4, d(4): 5.
        assert_eq!(top[2].counts.attempts, 10);
        assert_eq!(t.other_attempts, 9);
        // Cells are capped at 100 and overflow is counted, never silently dropped.
        assert_eq!(t.cells_overflow, 0);
        let mut full = Destinations::new(3, 2);
        for p in 0..5 {
            full.add(d(1, 80), p, OutcomeKind::Lost);
        }
        assert_eq!(full.cells_overflow, 3);
        assert_eq!(full.top(10)[0].counts.lost, 5);
    }

    #[test]
    fn ports_and_split() {
        let mut t = Destinations::default();
        t.add(d(1, 80), 2000, OutcomeKind::Lost);
        t.add(d(1, 80), 40000, OutcomeKind::Answered);
        t.add(d(1, 80), 40001, OutcomeKind::Refused);
        t.add(d(1, 80), 40002, OutcomeKind::Unreachable);
        t.add(d(2, 80), 2000, OutcomeKind::Lost);
        t.add(d(2, 80), 2000, OutcomeKind::Late);
        let all = t.ports(|_| true);
        assert_eq!(all[0], (2000, PortCell { back: 1, lost: 1 }));
        assert_eq!(all.len(), 3);
        let one = t.ports(|s| s == 0);
        assert_eq!(one[0], (2000, PortCell { back: 0, lost: 1 }));
        let split = t.splits(PortRange::new(32768, 65535));
        assert_eq!(
            split.get(&0).copied().unwrap_or_default(),
            Split {
                inside: Side { lost: 0, back: 2 },
                outside: Side { lost: 1, back: 0 }
            }
        );
        assert_eq!(d(1, 80).to_string(), "198.18.3.1:80");
        let v6 = Destination {
            addr: "2001:db8::1"
                .parse()
                .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            port: 443,
        };
        assert_eq!(v6.to_string(), "[2001:db8::1]:443");
    }
}
