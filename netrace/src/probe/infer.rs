//! Where is the edge? Pure functions over "probe these ports, tell me what came back": which
//! ports to sample, how to bisect towards the edges of the allowed range, and what the results
//! say. The network is behind [`Oracle`], so the logic is tested against fake firewalls.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::ports::PortRange;

/// What one probe from one bound source port ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// TCP: the handshake completed (the SYN-ACK came back). UDP: a reply came back.
    Answered,
    /// TCP: a RST came back. UDP: ICMP port unreachable came back (nothing listens).
    Refused,
    /// An ICMP error (host or network unreachable, administratively prohibited) or a local
    /// refusal to send.
    Unreachable,
    /// Nothing came back within the timeout.
    Timeout,
    /// The source port could not be bound (in use, or not permitted); not a result.
    Skipped,
}

impl Outcome {
    /// Whether traffic came back to the source port: `Some(true)` for an answer or a refusal
    /// (both are packets that reached the port), `Some(false)` for silence, `None` when the
    /// probe says nothing about the return path (ICMP errors, skipped ports).
    pub fn came_back(self) -> Option<bool> {
        match self {
            Outcome::Answered | Outcome::Refused => Some(true),
            Outcome::Timeout => Some(false),
            Outcome::Unreachable | Outcome::Skipped => None,
        }
    }

    /// The name used in the JSON output and the table.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Refused => "refused",
            Outcome::Unreachable => "unreachable",
            Outcome::Timeout => "timeout",
            Outcome::Skipped => "skipped",
        }
    }
}

/// Why a probe was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// One of the ports spread evenly over the range.
    Sample,
    /// A port between a silent and an answering port, to narrow an edge down.
    Bisect,
}

/// Runs probes: one outcome per port, in the order of `ports`.
pub trait Oracle {
    fn probe(&mut self, ports: &[u16]) -> anyhow::Result<Vec<Outcome>>;
}

impl<F: FnMut(u16) -> Outcome> Oracle for F {
    fn probe(&mut self, ports: &[u16]) -> anyhow::Result<Vec<Outcome>> {
        Ok(ports.iter().map(|&p| self(p)).collect())
    }
}

/// `n` ports spread evenly over `range`, both ends included, ascending and distinct; every
/// port of the range when it has no more than `n`.
pub fn sample_ports(range: PortRange, n: u32) -> Vec<u16> {
    let count = range.count();
    if n >= count {
        return (range.start..=range.end).collect();
    }
    if n <= 1 {
        return vec![range.start];
    }
    let span = u64::from(count - 1);
    let steps = u64::from(n - 1);
    let mut ports: Vec<u16> = (0..=steps)
        .map(|i| {
            let offset = (i * span + steps / 2) / steps;
            // offset <= span < 65535, so the sum stays a port of the range.
            u16::try_from(u64::from(range.start) + offset).unwrap_or(range.end)
        })
        .collect();
    ports.dedup();
    ports
}

/// One side of the allowed range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeStatus {
    /// The neighbouring port outside is silent (or there is no port beyond): the edge is
    /// known to the port.
    Exact,
    /// Some silent port lies outside, but ports between it and `inside` are untested (the
    /// bisection budget ran out, or they could not be bound).
    Bounded,
    /// No silent port on this side: the allowed range reaches at least to `inside`, maybe
    /// beyond the probed range.
    Open,
}

/// Where one edge of the allowed range lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Edge {
    pub status: EdgeStatus,
    /// The outermost port on this side that got an answer back (the lowest for the lower
    /// edge, the highest for the upper edge).
    pub inside: u16,
    /// The innermost silent port beyond it, if any.
    pub outside: Option<u16>,
}

impl Edge {
    /// Ports that may still be the first (lower edge) or last (upper edge) allowed port.
    pub fn uncertainty(&self) -> u32 {
        match (self.status, self.outside) {
            (EdgeStatus::Bounded, Some(o)) => u32::from(o.abs_diff(self.inside)),
            _ => 0,
        }
    }

    /// The candidates for the edge port as a range: for the lower edge the first allowed port
    /// lies in it, for the upper edge the last.
    pub fn candidates(&self, lower: bool) -> PortRange {
        match (self.status, self.outside) {
            (EdgeStatus::Bounded, Some(o)) if lower => PortRange::new(o + 1, self.inside),
            (EdgeStatus::Bounded, Some(o)) => PortRange::new(self.inside, o - 1),
            _ => PortRange::new(self.inside, self.inside),
        }
    }
}

/// What the results say, as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Answers come back to one contiguous range of ports and not around it.
    Range,
    /// Every usable probe got an answer: no source-port filter inside the probed range.
    AllAnswered,
    /// No probe got an answer.
    NoneAnswered,
    /// Silent ports lie between answering ones: not a port-range filter (random loss, or
    /// ports translated by SNAT on the way).
    NotARange,
    /// Every probe was skipped or unreachable.
    NothingUsable,
}

/// Limits of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub range: PortRange,
    /// Ports probed first, spread evenly.
    pub samples: u32,
    /// At most this many probes more to narrow the edges down.
    pub max_extra: u32,
}

/// One probe and its outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Probed {
    pub port: u16,
    pub outcome: Outcome,
    pub phase: Phase,
}

/// The analysis of a set of results.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Analysis {
    pub kind: Kind,
    pub lower: Option<Edge>,
    pub upper: Option<Edge>,
    /// Silent ports between the lowest and highest answering port (for `NotARange`).
    pub interleaved_silent: u32,
    /// Probes that came back (answered or refused), that were silent, and the rest.
    pub came_back: u32,
    pub silent: u32,
    pub inconclusive: u32,
}

impl Analysis {
    /// The range known to get answers back: lowest to highest answering port. For `Range`
    /// and `AllAnswered` the allowed range is assumed to be exactly this when both edges
    /// are exact.
    pub fn answered_span(&self) -> Option<PortRange> {
        match (self.lower, self.upper) {
            (Some(l), Some(u)) => Some(PortRange::new(l.inside, u.inside)),
            _ => None,
        }
    }

    /// Both edges known to the port.
    pub fn exact(&self) -> bool {
        [self.lower, self.upper]
            .iter()
            .all(|e| e.is_some_and(|e| e.status == EdgeStatus::Exact))
    }
}

/// The whole inference: every probe in order, the final analysis, and the bisection's use
/// of its budget.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Inference {
    pub probes: Vec<Probed>,
    pub analysis: Analysis,
    pub extra_probes: u32,
    /// The bisection stopped because `max_extra` was reached with an edge still open.
    pub budget_exhausted: bool,
}

/// Analyses `results` (port → outcome), assuming the allowed set is one contiguous range.
pub fn analyse(results: &BTreeMap<u16, Outcome>) -> Analysis {
    let mut back = Vec::new();
    let mut silent = Vec::new();
    let mut inconclusive = 0u32;
    for (&port, &o) in results {
        match o.came_back() {
            Some(true) => back.push(port),
            Some(false) => silent.push(port),
            None => inconclusive += 1,
        }
    }
    let counts = |kind, lower, upper, interleaved| Analysis {
        kind,
        lower,
        upper,
        interleaved_silent: interleaved,
        came_back: back.len() as u32,
        silent: silent.len() as u32,
        inconclusive,
    };
    let (Some(&lo), Some(&hi)) = (back.first(), back.last()) else {
        let kind = if silent.is_empty() {
            Kind::NothingUsable
        } else {
            Kind::NoneAnswered
        };
        return counts(kind, None, None, 0);
    };
    let interleaved = silent.iter().filter(|&&p| lo < p && p < hi).count() as u32;
    let below = silent.iter().copied().filter(|&p| p < lo).max();
    let above = silent.iter().copied().filter(|&p| p > hi).min();
    let edge = |inside: u16, outside: Option<u16>, limit: u16| {
        let status = match outside {
            Some(o) if o.abs_diff(inside) == 1 => EdgeStatus::Exact,
            Some(_) => EdgeStatus::Bounded,
            None if inside == limit => EdgeStatus::Exact,
            None => EdgeStatus::Open,
        };
        Edge {
            status,
            inside,
            outside,
        }
    };
    let lower = edge(lo, below, 1);
    let upper = edge(hi, above, u16::MAX);
    let kind = if interleaved > 0 {
        Kind::NotARange
    } else if silent.is_empty() {
        Kind::AllAnswered
    } else {
        Kind::Range
    };
    counts(kind, Some(lower), Some(upper), interleaved)
}

/// The unprobed port nearest the middle of the ports strictly between `a` and `b`.
fn midpoint(a: u16, b: u16, results: &BTreeMap<u16, Outcome>) -> Option<u16> {
    let (a, b) = (a.min(b), a.max(b));
    if b - a < 2 {
        return None;
    }
    let mid = a + (b - a) / 2;
    let span = b - a;
    (0..span).find_map(|d| {
        [mid.checked_sub(d), mid.checked_add(d)]
            .into_iter()
            .flatten()
            .find(|&p| a < p && p < b && !results.contains_key(&p))
    })
}

/// Probes the samples, then bisects each bounded edge until it is exact, cannot be narrowed
/// (every port in between was skipped or unreachable) or the budget is spent. Both edges are
/// narrowed in the same rounds, one probe per edge per round.
pub fn infer(plan: &Plan, oracle: &mut impl Oracle) -> anyhow::Result<Inference> {
    let mut results = BTreeMap::new();
    let mut probes = Vec::new();
    let mut run = |ports: &[u16], phase: Phase, results: &mut BTreeMap<u16, Outcome>| {
        let outcomes = oracle.probe(ports)?;
        if outcomes.len() != ports.len() {
            anyhow::bail!(
                "{} outcomes for {} probes (internal error)",
                outcomes.len(),
                ports.len()
            );
        }
        for (&port, &outcome) in ports.iter().zip(&outcomes) {
            results.insert(port, outcome);
            probes.push(Probed {
                port,
                outcome,
                phase,
            });
        }
        anyhow::Ok(())
    };
    run(
        &sample_ports(plan.range, plan.samples),
        Phase::Sample,
        &mut results,
    )?;
    let mut extra = 0u32;
    let mut exhausted = false;
    loop {
        let a = analyse(&results);
        if a.kind != Kind::Range {
            break;
        }
        let next: Vec<u16> = [a.lower, a.upper]
            .into_iter()
            .flatten()
            .filter(|e| e.status == EdgeStatus::Bounded)
            .filter_map(|e| e.outside.and_then(|o| midpoint(o, e.inside, &results)))
            .collect();
        if next.is_empty() {
            break;
        }
        let room = plan.max_extra.saturating_sub(extra) as usize;
        if room == 0 {
            exhausted = true;
            break;
        }
        let batch = &next[..next.len().min(room)];
        run(batch, Phase::Bisect, &mut results)?;
        extra += batch.len() as u32;
    }
    Ok(Inference {
        probes,
        analysis: analyse(&results),
        extra_probes: extra,
        budget_exhausted: exhausted,
    })
}

#[cfg(test)]
mod tests;
