//! What the connections say, destination by destination: where the firewall's range really
//! is (learned from destinations that answer), which destinations never answer from any port
//! (a destination problem), and whether, for the same destinations, the loss outside the
//! range is higher than inside (a range problem). Pure: the verdict words it.
//!
//! The order matters. Destinations that answered at least once show where SYN-ACKs come
//! back, so the edge is learned from them alone: a dead destination is lost at every port
//! and would otherwise drag the learned range towards whatever ports the healthy traffic
//! happened to use. A destination without a single answer is dead when it lost connections
//! from ports *inside* the range other destinations are answered on. The range comparison
//! is then made within each remaining destination and combined (exact stratified test, or
//! Mantel-Haenszel for large counts), so a lossy destination that happens to be reached from
//! outside ports more often cannot pass for a range problem.

use std::collections::HashSet;

use serde::Serialize;

use crate::{
    judge::{
        edge::{self, Learned},
        exact::{stratified_greater, Table, Test},
    },
    ports::PortRange,
    track::destinations::{Destination, Destinations, Slot, Split},
};

/// How unlikely the difference between outside and inside must be (one-sided) for a range
/// problem.
pub const ALPHA: f64 = 0.001;
/// A destination needs this many lost connections from inside the range, and not one
/// answer, to be called dead.
pub const MIN_DEAD_LOST_INSIDE: u64 = 3;
/// Without a significant difference, "no range problem" needs this many attempts on each
/// side of the range (else: not enough connections yet to tell).
pub const MIN_SIDE: u64 = 10;
/// A destination that answers but loses at least this share from inside the range, with at
/// least [`MIN_LOSSY_LOST`] lost there, is reported as lossy.
pub const LOSSY_SHARE: f64 = 0.2;
pub const MIN_LOSSY_LOST: u64 = 5;

/// A destination that never answered although other destinations are answered from the
/// same ports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DestinationFinding {
    /// `None`: the destinations without a row of their own, together.
    pub destination: Option<Destination>,
    pub attempts: u64,
    pub lost: u64,
    pub lost_inside: u64,
    pub lost_outside: u64,
    /// Attempts that came back (SYN-ACK or RST): 0 for a dead destination.
    pub answered: u64,
}

impl DestinationFinding {
    pub fn label(&self) -> String {
        self.destination
            .map_or_else(|| "other destinations".to_string(), |d| d.to_string())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evidence {
    /// The range stated (`--allowed-ports`, default 32768-65535): the starting hypothesis.
    pub assumed: PortRange,
    /// What the ports of destinations that answer say about the range.
    pub learned: Learned,
    /// The range judged against: the assumed one, unless the evidence contradicts it.
    pub range: PortRange,
    /// Whether the evidence contradicts the assumed range (then `range` is the learned one).
    pub contradicted: bool,
    /// Why, in words (empty when the evidence agrees or says nothing).
    pub contradictions: Vec<String>,
    /// Destinations that never answered, from inside the range too.
    pub dead: Vec<DestinationFinding>,
    /// Destinations that answer but lose much from inside the range too.
    pub lossy: Vec<DestinationFinding>,
    /// Attempts of the other destinations inside and outside `range` (lost / attempts).
    pub compared: Table,
    /// The stratified test on the other destinations.
    pub test: Test,
    /// The loss outside is significantly higher than inside, for the same destinations.
    pub range_problem: bool,
}

fn finding(split: Split, destination: Option<Destination>) -> (DestinationFinding, Table) {
    let (i, o) = (split.inside, split.outside);
    (
        DestinationFinding {
            destination,
            attempts: i.lost + i.back + o.lost + o.back,
            lost: i.lost + o.lost,
            lost_inside: i.lost,
            lost_outside: o.lost,
            answered: i.back + o.back,
        },
        Table::new(o.lost, o.lost + o.back, i.lost, i.lost + i.back),
    )
}

/// Weighs the evidence against the `assumed` range.
pub fn weigh(dests: &Destinations, assumed: PortRange) -> Evidence {
    let slots: Vec<(Slot, Option<Destination>)> = dests
        .slots()
        .filter(|(_, _, c)| c.attempts > 0)
        .map(|(s, d, _)| (s, d))
        .collect();
    let answering: HashSet<Slot> = dests
        .splits(PortRange::new(1, 65535))
        .into_iter()
        .filter(|(_, s)| s.inside.back > 0)
        .map(|(slot, _)| slot)
        .collect();
    let learned = edge::learn(&dests.ports(|s| answering.contains(&s)));
    let (range, contradictions) = effective_range(assumed, &learned);
    let splits = dests.splits(range);
    let mut dead = Vec::new();
    let mut lossy = Vec::new();
    let mut tables = Vec::new();
    let mut compared = Table::default();
    for (slot, d) in &slots {
        let (f, t) = finding(splits.get(slot).copied().unwrap_or_default(), *d);
        if f.answered == 0 && f.lost_inside >= MIN_DEAD_LOST_INSIDE {
            dead.push(f);
            continue;
        }
        let n_in = t.n_in;
        if f.answered > 0
            && f.lost_inside >= MIN_LOSSY_LOST
            && f.lost_inside as f64 >= LOSSY_SHARE * n_in as f64
        {
            lossy.push(f);
        }
        compared.lost_out += t.lost_out;
        compared.n_out += t.n_out;
        compared.lost_in += t.lost_in;
        compared.n_in += t.n_in;
        tables.push(t);
    }
    dead.sort_by_key(|d| std::cmp::Reverse(d.attempts));
    lossy.sort_by_key(|d| std::cmp::Reverse(d.lost_inside));
    let test = stratified_greater(&tables);
    let range_problem = test.p_value < ALPHA
        && compared.n_out > 0
        && compared.lost_out * compared.n_in.max(1) > compared.lost_in * compared.n_out;
    Evidence {
        assumed,
        learned,
        range,
        contradicted: !contradictions.is_empty(),
        contradictions,
        dead,
        lossy,
        compared,
        test,
        range_problem,
    }
}

/// The range to judge against, and what contradicts the assumed one.
fn effective_range(assumed: PortRange, learned: &Learned) -> (PortRange, Vec<String>) {
    let mut why = Vec::new();
    let Some((a0, a1)) = learned.answered_span else {
        return (assumed, why);
    };
    let start = match learned.lower {
        Some(e) if e.bracket().contains(assumed.start) => assumed.start,
        Some(e) => {
            why.push(format!(
                "the lower edge is between port {} (lost) and port {} (answered), not at {}: \
                 {} connections below it were all lost",
                e.last_lost, e.first_answered, assumed.start, e.lost_beyond
            ));
            e.estimate
        }
        None if a0 < assumed.start => {
            why.push(format!(
                "SYN-ACKs came back to ports as low as {a0}, below {}",
                assumed.start
            ));
            a0
        }
        None => assumed.start,
    };
    let end = match learned.upper {
        Some(e) if e.bracket().contains(assumed.end) => assumed.end,
        Some(e) => {
            why.push(format!(
                "the upper edge is between port {} (answered) and port {} (lost), not at {}: \
                 {} connections above it were all lost",
                e.last_answered, e.first_lost, assumed.end, e.lost_beyond
            ));
            e.estimate
        }
        None if a1 > assumed.end => {
            why.push(format!(
                "SYN-ACKs came back to ports as high as {a1}, above {}",
                assumed.end
            ));
            a1
        }
        None => assumed.end,
    };
    if end < start {
        return (assumed, Vec::new());
    }
    (PortRange::new(start, end), why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::tracker::OutcomeKind;
    use std::net::{IpAddr, Ipv4Addr};

    pub(crate) fn dest(last: u8) -> Destination {
        Destination {
            addr: IpAddr::V4(Ipv4Addr::new(198, 18, 3, last)),
            port: 8080,
        }
    }

    const ASSUMED: PortRange = PortRange {
        start: 32768,
        end: 65535,
    };

    /// `n` connections to `d` spread over `lo..=hi`, lost where `lost(port)`.
    fn spread(
        t: &mut Destinations,
        d: Destination,
        n: u32,
        lo: u16,
        hi: u16,
        lost: impl Fn(u16) -> bool,
    ) {
        let span = u32::from(hi - lo) + 1;
        for i in 0..n {
            let p = lo + ((i * 7919 + i / 3) % span) as u16;
            let k = if lost(p) {
                OutcomeKind::Lost
            } else {
                OutcomeKind::Answered
            };
            t.add(d, p, k);
        }
    }

    #[test]
    fn seed_agrees_with_the_assumption() {
        let mut t = Destinations::default();
        spread(&mut t, dest(2), 200, 1024, 65535, |p| p < 32768);
        let e = weigh(&t, ASSUMED);
        assert!(!e.contradicted, "{:?}", e.contradictions);
        assert_eq!(e.range, ASSUMED);
        assert!(e.range_problem);
        assert!(e.learned.lower.is_some_and(|l| l.bracket().contains(32768)));
        assert!(e.dead.is_empty());
    }

    #[test]
    fn an_edge_at_40000_is_learned() {
        let mut t = Destinations::default();
        spread(&mut t, dest(2), 300, 1024, 65535, |p| p < 40000);
        let e = weigh(&t, ASSUMED);
        assert!(e.contradicted);
        assert_eq!(e.range.start, 40000, "{:?}", e.learned);
        assert_eq!(e.range.end, 65535);
        assert!(e.range_problem);
        assert_eq!(e.compared.lost_in, 0);
    }

    #[test]
    fn a_dead_destination_is_not_a_range_problem() {
        // The node's own connections (32768-60999) to a healthy server all answered; the
        // pods' connections (SNAT 1024-65535) to a dead server all lost.
        let mut t = Destinations::default();
        spread(&mut t, dest(2), 100, 32768, 60999, |_| false);
        spread(&mut t, dest(9), 150, 1024, 65535, |_| true);
        let e = weigh(&t, ASSUMED);
        assert!(!e.range_problem, "{e:?}");
        assert_eq!(e.dead.len(), 1);
        assert_eq!(e.dead[0].destination, Some(dest(9)));
        assert_eq!(e.dead[0].attempts, 150);
        assert_eq!(e.range, ASSUMED);
    }

    #[test]
    fn mixed_findings_are_both_reported() {
        let mut t = Destinations::default();
        spread(&mut t, dest(2), 200, 1024, 65535, |p| p < 32768);
        spread(&mut t, dest(9), 60, 1024, 65535, |_| true);
        let e = weigh(&t, ASSUMED);
        assert!(e.range_problem);
        assert_eq!(e.dead.len(), 1);
        assert!(!e.contradicted, "{:?}", e.contradictions);
    }
}
