//! The port-range loss histogram: pure accumulation over outcomes.

use serde::Serialize;

use crate::{ports::PortRange, track::tracker::OutcomeKind};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub attempts: u64,
    pub answered: u64,
    pub lost: u64,
    pub refused: u64,
    pub unreachable: u64,
    pub late: u64,
}

impl Counts {
    pub fn add(&mut self, kind: OutcomeKind) {
        self.add_n(kind, 1);
    }

    /// `n` outcomes of one kind (the kernel's books count answers by the thousand).
    pub fn add_n(&mut self, kind: OutcomeKind, n: u64) {
        match kind {
            OutcomeKind::Answered => self.answered += n,
            OutcomeKind::Lost | OutcomeKind::Abandoned => self.lost += n,
            OutcomeKind::Refused => self.refused += n,
            OutcomeKind::Unreachable => self.unreachable += n,
            // The same connection, already counted as an attempt when it was lost.
            OutcomeKind::Late => {
                self.late += n;
                return;
            }
        }
        self.attempts += n;
    }

    /// Lost as a percentage of attempts, `None` without attempts.
    pub fn loss_pct(&self) -> Option<f64> {
        (self.attempts > 0).then(|| 100.0 * self.lost as f64 / self.attempts as f64)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Bucket {
    pub start: u16,
    pub end: u16,
    #[serde(flatten)]
    pub counts: Counts,
    pub in_allowed_range: bool,
}

impl Bucket {
    pub fn range(&self) -> PortRange {
        PortRange::new(self.start, self.end)
    }
}

/// Loss by source-port bucket, with the allowed range's edges always on bucket boundaries.
#[derive(Clone, Debug)]
pub struct Histogram {
    pub allowed: PortRange,
    pub buckets: Vec<Bucket>,
    pub totals: Counts,
    pub inside: Counts,
    pub outside: Counts,
    /// Lowest and highest source port seen in any attempt.
    pub port_span: Option<(u16, u16)>,
    /// Highest lost port below the allowed range's start, lowest answered port (for the edge).
    pub lowest_answered: Option<u16>,
    pub highest_lost_outside_below: Option<u16>,
}

impl Histogram {
    /// `edges` are bucket starts; 1 (the lowest port) and the allowed range's ends are added.
    pub fn new(allowed: PortRange, edges: &[u16]) -> Self {
        let mut starts: Vec<u32> = edges.iter().map(|e| u32::from(*e)).collect();
        starts.push(1);
        starts.push(u32::from(allowed.start));
        starts.push(u32::from(allowed.end) + 1);
        starts.retain(|s| (1..=65535).contains(s));
        starts.sort_unstable();
        starts.dedup();
        let mut buckets = Vec::with_capacity(starts.len());
        for (i, s) in starts.iter().enumerate() {
            let end = starts.get(i + 1).map_or(65535, |n| n - 1);
            let (start, end) = (*s as u16, end as u16);
            buckets.push(Bucket {
                start,
                end,
                counts: Counts::default(),
                in_allowed_range: allowed.covers(&PortRange::new(start, end)),
            });
        }
        Self {
            allowed,
            buckets,
            totals: Counts::default(),
            inside: Counts::default(),
            outside: Counts::default(),
            port_span: None,
            lowest_answered: None,
            highest_lost_outside_below: None,
        }
    }

    pub fn add(&mut self, port: u16, kind: OutcomeKind) {
        self.add_n(port, kind, 1);
    }

    /// `n` outcomes of one kind from one source port.
    pub fn add_n(&mut self, port: u16, kind: OutcomeKind, n: u64) {
        if n == 0 {
            return;
        }
        self.totals.add_n(kind, n);
        if self.allowed.contains(port) {
            self.inside.add_n(kind, n);
        } else {
            self.outside.add_n(kind, n);
        }
        if let Some(b) = self.buckets.iter_mut().find(|b| b.range().contains(port)) {
            b.counts.add_n(kind, n);
        }
        if kind != OutcomeKind::Late {
            self.port_span = Some(match self.port_span {
                None => (port, port),
                Some((lo, hi)) => (lo.min(port), hi.max(port)),
            });
        }
        if kind == OutcomeKind::Answered {
            self.lowest_answered = Some(self.lowest_answered.map_or(port, |p| p.min(port)));
        }
        if kind.is_loss() && port < self.allowed.start {
            self.highest_lost_outside_below = Some(
                self.highest_lost_outside_below
                    .map_or(port, |p| p.max(port)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A count of outcomes (the kernel's books) lands as that many outcomes one by one would.
    #[test]
    fn counted_outcomes_add_up_as_single_ones() {
        let mut one = Histogram::new(PortRange::new(32768, 60999), &[1024, 32768]);
        let mut counted = one.clone();
        let seen = [
            (2000, OutcomeKind::Answered, 3),
            (40000, OutcomeKind::Answered, 5),
            (2000, OutcomeKind::Lost, 2),
            (2001, OutcomeKind::Late, 1),
            (65000, OutcomeKind::Refused, 4),
            (9000, OutcomeKind::Answered, 0),
        ];
        for (port, kind, n) in seen {
            for _ in 0..n {
                one.add(port, kind);
            }
            counted.add_n(port, kind, n);
        }
        assert_eq!(format!("{one:?}"), format!("{counted:?}"));
    }

    #[test]
    fn buckets_split_at_defaults_and_allowed_edges() {
        let h = Histogram::new(
            PortRange::new(32768, 60999),
            &[1024, 8192, 16384, 32768, 49152],
        );
        let starts: Vec<u16> = h.buckets.iter().map(|b| b.start).collect();
        assert_eq!(starts, vec![1, 1024, 8192, 16384, 32768, 49152, 61000]);
        assert_eq!(h.buckets.last().map(|b| b.end), Some(65535));
        let inside: Vec<bool> = h.buckets.iter().map(|b| b.in_allowed_range).collect();
        assert_eq!(inside, vec![false, false, false, false, true, true, false]);
    }

    #[test]
    fn counts_by_bucket_and_side() {
        let mut h = Histogram::new(PortRange::new(32768, 65535), &[1024, 32768]);
        h.add(2000, OutcomeKind::Lost);
        h.add(3000, OutcomeKind::Abandoned);
        h.add(3000, OutcomeKind::Late);
        h.add(40000, OutcomeKind::Answered);
        h.add(40001, OutcomeKind::Refused);
        assert_eq!(h.totals.attempts, 4);
        assert_eq!(h.totals.lost, 2);
        assert_eq!(h.totals.late, 1);
        assert_eq!(h.outside.lost, 2);
        assert_eq!(h.inside.attempts, 2);
        assert_eq!(h.buckets[1].counts.loss_pct(), Some(100.0));
        assert_eq!(h.buckets[2].counts.loss_pct(), Some(0.0));
        assert_eq!(h.buckets[0].counts.loss_pct(), None);
        assert_eq!(h.port_span, Some((2000, 40001)));
        assert_eq!(h.lowest_answered, Some(40000));
        assert_eq!(h.highest_lost_outside_below, Some(3000));
    }
}
