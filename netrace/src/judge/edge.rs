//! Where the firewall's range really is, learned from the evidence: which source ports got
//! answers and which were lost. A stateless rule that drops SYN-ACKs below (or above) some
//! port leaves every attempt below it lost and answers above it; the edge lies between the
//! highest lost port below the lowest answered port and that answered port (the reverse for
//! an upper edge). That bracket narrows as connections accumulate, and `netrace probe` finds
//! the same edge actively by bisection.
//!
//! An edge is learned only when it is significant: at least [`MIN_EDGE_LOST`] lost attempts
//! beyond it, all lost, against the loss between the edges (Fisher's exact test). So a few
//! random losses at the end of the port space never pass for an edge.

use serde::Serialize;

use crate::{
    judge::exact::{fisher_greater, Table},
    ports::PortRange,
    track::destinations::PortCell,
};

/// Fewer lost attempts beyond an edge cannot establish it.
pub const MIN_EDGE_LOST: u64 = 3;
/// How unlikely the concentration of loss beyond the edge must be under "the port does not
/// matter" (one-sided).
pub const EDGE_ALPHA: f64 = 0.001;
/// A bracket wider than this is not rounded: the proven end is used.
pub const ROUND_MAX_WIDTH: u32 = 4096;
/// Round values tried, roundest first. Ports are often configured in powers of two (32768)
/// or decimal round numbers (40000, 61000 - 1 = 60999).
const STEPS: [u32; 11] = [
    16384, 10000, 8192, 5000, 4096, 2048, 1024, 1000, 500, 100, 10,
];

/// The lower edge: the first port SYN-ACKs come back to lies in `last_lost + 1 ..=
/// first_answered`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LowerEdge {
    /// The highest lost port below the lowest answered port.
    pub last_lost: u16,
    /// The lowest port that got an answer.
    pub first_answered: u16,
    /// The first allowed port as the fix uses it: a round value inside the bracket, else
    /// `first_answered`.
    pub estimate: u16,
    /// Lost attempts below the edge (all attempts there).
    pub lost_beyond: u64,
    /// Attempts between the edges, and how many of them were lost.
    pub attempts_within: u64,
    pub lost_within: u64,
    pub p_value: f64,
}

/// The upper edge: the last port SYN-ACKs come back to lies in `last_answered ..=
/// first_lost - 1`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct UpperEdge {
    /// The highest port that got an answer.
    pub last_answered: u16,
    /// The lowest lost port above it.
    pub first_lost: u16,
    /// The last allowed port as the fix uses it.
    pub estimate: u16,
    pub lost_beyond: u64,
    pub attempts_within: u64,
    pub lost_within: u64,
    pub p_value: f64,
}

/// What the ports say about the range SYN-ACKs come back to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Learned {
    pub lower: Option<LowerEdge>,
    pub upper: Option<UpperEdge>,
    /// Lowest and highest port that got an answer.
    pub answered_span: Option<(u16, u16)>,
    /// Attempts the learning used (came back or lost).
    pub attempts: u64,
}

impl LowerEdge {
    pub fn bracket(&self) -> PortRange {
        PortRange::new(self.last_lost.saturating_add(1), self.first_answered)
    }
}

impl UpperEdge {
    pub fn bracket(&self) -> PortRange {
        PortRange::new(self.last_answered, self.first_lost.saturating_sub(1))
    }
}

impl Learned {
    /// The range the evidence supports: from the lower edge's estimate (or the lowest answered
    /// port) to the upper edge's (or the highest answered port). `None` without answers.
    pub fn observed(&self) -> Option<PortRange> {
        let (lo, hi) = self.answered_span?;
        let start = self.lower.map_or(lo, |e| e.estimate);
        let end = self.upper.map_or(hi, |e| e.estimate);
        Some(PortRange::new(start.min(end), end.max(start)))
    }
}

/// The first allowed port to use, given the bracket `(last_lost, first_answered]`: the
/// highest multiple of the roundest step inside it, when the bracket is narrow enough.
pub fn round_lower(last_lost: u16, first_answered: u16) -> u16 {
    let (lo, hi) = (u32::from(last_lost), u32::from(first_answered));
    if hi <= lo || hi - lo > ROUND_MAX_WIDTH {
        return first_answered;
    }
    for step in STEPS {
        let m = hi / step * step;
        if m > lo && m >= 1 {
            return m as u16;
        }
    }
    first_answered
}

/// The last allowed port to use, given the bracket `[last_answered, first_lost)`: one below
/// the lowest multiple of the roundest step in `(last_answered, first_lost]`.
pub fn round_upper(last_answered: u16, first_lost: u16) -> u16 {
    let (lo, hi) = (u32::from(last_answered), u32::from(first_lost));
    if hi <= lo || hi - lo > ROUND_MAX_WIDTH {
        return last_answered;
    }
    for step in STEPS {
        let m = (lo / step + 1) * step;
        if m <= hi {
            return (m - 1) as u16;
        }
    }
    last_answered
}

/// Learns the edges from per-port outcomes, sorted by port (as
/// [`crate::track::destinations::Destinations::ports`] returns them).
pub fn learn(ports: &[(u16, PortCell)]) -> Learned {
    let attempts = ports
        .iter()
        .map(|(_, c)| u64::from(c.back) + u64::from(c.lost))
        .sum();
    let first = ports.iter().find(|(_, c)| c.back > 0).map(|(p, _)| *p);
    let last = ports
        .iter()
        .rev()
        .find(|(_, c)| c.back > 0)
        .map(|(p, _)| *p);
    let (Some(a0), Some(a1)) = (first, last) else {
        return Learned {
            attempts,
            ..Learned::default()
        };
    };
    let sum = |f: &dyn Fn(u16) -> bool| -> (u64, u64) {
        ports
            .iter()
            .filter(|(p, _)| f(*p))
            .fold((0, 0), |(l, n), (_, c)| {
                (
                    l + u64::from(c.lost),
                    n + u64::from(c.lost) + u64::from(c.back),
                )
            })
    };
    let (lost_within, attempts_within) = sum(&|p| (a0..=a1).contains(&p));
    let (lost_below, _) = sum(&|p| p < a0);
    let (lost_above, _) = sum(&|p| p > a1);
    let significant = |lost_beyond: u64| -> Option<f64> {
        if lost_beyond < MIN_EDGE_LOST {
            return None;
        }
        let t = fisher_greater(Table::new(
            lost_beyond,
            lost_beyond,
            lost_within,
            attempts_within,
        ));
        (t.p_value < EDGE_ALPHA).then_some(t.p_value)
    };
    let lower = significant(lost_below).and_then(|p_value| {
        let last_lost = ports
            .iter()
            .rev()
            .find(|(p, c)| *p < a0 && c.lost > 0)
            .map(|(p, _)| *p)?;
        Some(LowerEdge {
            last_lost,
            first_answered: a0,
            estimate: round_lower(last_lost, a0),
            lost_beyond: lost_below,
            attempts_within,
            lost_within,
            p_value,
        })
    });
    let upper = significant(lost_above).and_then(|p_value| {
        let first_lost = ports
            .iter()
            .find(|(p, c)| *p > a1 && c.lost > 0)
            .map(|(p, _)| *p)?;
        Some(UpperEdge {
            last_answered: a1,
            first_lost,
            estimate: round_upper(a1, first_lost),
            lost_beyond: lost_above,
            attempts_within,
            lost_within,
            p_value,
        })
    });
    Learned {
        lower,
        upper,
        answered_span: Some((a0, a1)),
        attempts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cells(lost: &[u16], back: &[u16]) -> Vec<(u16, PortCell)> {
        let mut v: Vec<(u16, PortCell)> = Vec::new();
        for p in lost {
            v.push((*p, PortCell { back: 0, lost: 1 }));
        }
        for p in back {
            v.push((*p, PortCell { back: 1, lost: 0 }));
        }
        v.sort_unstable_by_key(|(p, _)| *p);
        v
    }

    #[test]
    fn rounding_only_inside_the_bracket() {
        assert_eq!(round_lower(32700, 32900), 32768);
        assert_eq!(round_lower(39870, 40012), 40000);
        assert_eq!(round_lower(40001, 40012), 40010);
        assert_eq!(round_lower(40011, 40012), 40012);
        // Too wide to guess: the proven end.
        assert_eq!(round_lower(20000, 40012), 40012);
        assert_eq!(round_upper(60950, 61020), 60999);
        assert_eq!(round_upper(49990, 50020), 49999);
        assert_eq!(round_upper(50001, 50003), 50001);
        assert_eq!(round_upper(1000, 9000), 1000);
    }

    #[test]
    fn lower_edge_at_40000() {
        // Lost every 300 ports from 1024 to 39871, answered from 40012 on.
        let lost: Vec<u16> = (0..130).map(|i| 1024 + i * 300).collect();
        let back: Vec<u16> = (0..80).map(|i| 40012 + i * 300).collect();
        let l = learn(&cells(&lost, &back));
        let e = l.lower.unwrap_or_else(|| panic!("no lower edge: {l:?}"));
        assert_eq!(
            (e.last_lost, e.first_answered, e.estimate),
            (39724, 40012, 40000)
        );
        assert_eq!(e.lost_beyond, 130);
        assert_eq!(e.attempts_within, 80);
        assert!(l.upper.is_none());
        assert_eq!(l.observed(), Some(PortRange::new(40000, 40012 + 79 * 300)));
    }

    #[test]
    fn upper_edge_below_65535() {
        let lost: Vec<u16> = (0..20).map(|i| 50007 + i * 700).collect();
        let back: Vec<u16> = (0..60).map(|i| 32800 + i * 285).collect();
        let l = learn(&cells(&lost, &back));
        assert!(l.lower.is_none());
        let e = l.upper.unwrap_or_else(|| panic!("no upper edge: {l:?}"));
        assert_eq!((e.last_answered, e.first_lost), (32800 + 59 * 285, 50007));
        assert_eq!(e.estimate, 49999);
    }

    #[test]
    fn random_loss_is_no_edge() {
        // 20 % loss everywhere: the two lost ports above the last answer are no edge.
        let mut v = Vec::new();
        for i in 0..200u16 {
            let c = if i % 5 == 0 || i > 197 {
                PortCell { back: 0, lost: 1 }
            } else {
                PortCell { back: 1, lost: 0 }
            };
            v.push((1024 + i * 300, c));
        }
        let l = learn(&v);
        assert!(l.lower.is_none() && l.upper.is_none(), "{l:?}");
    }

    #[test]
    fn few_lost_ports_are_no_edge() {
        let l = learn(&cells(&[1000, 2000], &[40000, 41000, 42000]));
        assert!(l.lower.is_none());
        assert_eq!(l.answered_span, Some((40000, 42000)));
        let l = learn(&cells(&[1000, 2000], &[]));
        assert_eq!(l.answered_span, None);
        assert_eq!(l.attempts, 2);
    }
}
