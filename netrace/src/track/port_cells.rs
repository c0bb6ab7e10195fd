//! The per-port cells of the destination rows: how many attempts from each source port came
//! back and how many were lost, per row. Kept sparse (one hash map over every row's cells)
//! until a row holds many, then that row moves to an array indexed by port: a busy
//! destination answers from tens of thousands of ports a second, and a probe into a hash map
//! of a quarter million cells missed the cache every time (it was most of the process's CPU
//! at such rates); an array of one row is one access.

use foldhash::{HashMap, HashMapExt};

use super::destinations::{PortCell, Slot};

/// Cells a row holds in the sparse map before it moves to an array of its own.
const DENSE_AT: u32 = 4096;
/// Ports in a dense row (every source port).
const PORTS: usize = 1 << 16;

#[derive(Clone, Debug)]
pub struct PortCells {
    sparse: HashMap<(Slot, u16), PortCell>,
    /// Cells each row holds in `sparse`.
    sparse_by_row: HashMap<Slot, u32>,
    /// Rows with an array of their own (few: a linear search beats a hash here).
    dense: Vec<(Slot, Box<[PortCell]>)>,
    /// Sparse cells at most.
    max_sparse: usize,
    /// Dense rows at most.
    max_dense: usize,
}

impl PortCells {
    /// At most `max_cells` sparse cells (about 16 bytes each), and as many dense rows (512 KiB
    /// each) as `max_cells` cells would fill: the memory stays within about twice the sparse
    /// bound.
    pub fn new(max_cells: usize) -> Self {
        Self {
            sparse: HashMap::new(),
            sparse_by_row: HashMap::new(),
            dense: Vec::new(),
            max_sparse: max_cells,
            max_dense: max_cells / PORTS,
        }
    }

    /// The cell of `port` in `row`, made if there is room; `None` when the cells are full.
    pub fn get_or_make(&mut self, row: Slot, port: u16) -> Option<&mut PortCell> {
        if let Some(i) = self.dense.iter().position(|(s, _)| *s == row) {
            return self.dense[i].1.get_mut(usize::from(port));
        }
        if self.sparse.contains_key(&(row, port)) {
            return self.sparse.get_mut(&(row, port));
        }
        let in_row = self.sparse_by_row.get(&row).copied().unwrap_or(0);
        if in_row + 1 >= DENSE_AT && self.dense.len() < self.max_dense {
            self.densify(row);
            return self.dense.last_mut()?.1.get_mut(usize::from(port));
        }
        if self.sparse.len() >= self.max_sparse {
            return None;
        }
        *self.sparse_by_row.entry(row).or_default() += 1;
        Some(self.sparse.entry((row, port)).or_default())
    }

    /// Moves `row`'s sparse cells to an array of its own.
    fn densify(&mut self, row: Slot) {
        let mut cells = vec![PortCell::default(); PORTS].into_boxed_slice();
        self.sparse.retain(|&(s, port), c| {
            if s != row {
                return true;
            }
            cells[usize::from(port)] = *c;
            false
        });
        self.sparse_by_row.remove(&row);
        self.dense.push((row, cells));
    }

    /// Every cell that counted something: (row, port, cell), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (Slot, u16, PortCell)> + '_ {
        let sparse = self.sparse.iter().map(|(&(s, p), &c)| (s, p, c));
        let dense = self.dense.iter().flat_map(|(s, cells)| {
            cells
                .iter()
                .enumerate()
                .filter(|(_, c)| c.back > 0 || c.lost > 0)
                .map(move |(p, c)| (*s, p as u16, *c))
        });
        sparse.chain(dense)
    }

    /// An upper bound of the cells that counted something (for sizing).
    pub fn len_hint(&self) -> usize {
        self.sparse.len() + self.dense.len() * PORTS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(c: &PortCells) -> Vec<(Slot, u16, PortCell)> {
        let mut v: Vec<_> = c.iter().collect();
        v.sort_by_key(|(s, p, _)| (*s, *p));
        v
    }

    /// A row that moves to an array keeps every count it had, and counts on from there; the
    /// other rows stay sparse; with no room for an array, the row stays sparse and full cells
    /// are refused.
    #[test]
    fn a_busy_row_moves_to_an_array_and_keeps_its_counts() {
        let fill = |c: &mut PortCells| {
            for port in 0..DENSE_AT as u16 + 10 {
                if let Some(cell) = c.get_or_make(1, port) {
                    cell.back += 1;
                }
            }
            if let Some(cell) = c.get_or_make(2, 7) {
                cell.lost += 3;
            }
            if let Some(cell) = c.get_or_make(1, 7) {
                cell.lost += 1;
            }
        };
        let mut dense = PortCells::new(PORTS);
        fill(&mut dense);
        assert_eq!(dense.dense.len(), 1);
        assert_eq!(dense.sparse.len(), 1);
        let mut sparse = PortCells::new(PORTS - 1);
        fill(&mut sparse);
        assert!(sparse.dense.is_empty());
        assert_eq!(sorted(&dense), sorted(&sparse));
        assert_eq!(sorted(&dense).len(), DENSE_AT as usize + 11);
        assert!(sorted(&dense).contains(&(1, 7, PortCell { back: 1, lost: 1 })));

        let mut full = PortCells::new(3);
        for port in 0..5 {
            assert_eq!(full.get_or_make(1, port).is_some(), port < 3);
        }
        // A cell that exists is still counted when the rest are full.
        assert!(full.get_or_make(1, 0).is_some());
    }
}
