//! What the node's SNAT does to source ports, judged from linked (pod-side, uplink) pairs:
//! keeps the pod's port when it can (plain MASQUERADE/SNAT), or randomises every port
//! (`--random-fully`, and `--random`, which current kernels randomise the same way), and over
//! which range (`--to-ports`).

use serde::Serialize;

use crate::ports::PortRange;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatMode {
    /// Not enough linked pairs to tell.
    Unknown,
    /// Neither addresses nor ports change: no SNAT.
    None,
    /// The address changes, the pod's port is kept (plain MASQUERADE / SNAT).
    KeepsPorts,
    /// Every port is drawn at random (`--random-fully` / `--random`).
    RandomFully,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NatReport {
    pub mode: NatMode,
    /// Linked pairs the judgement rests on.
    pub pairs: usize,
    /// The range the post-SNAT ports come from, snapped to common bounds when the samples
    /// are close to them.
    pub range: Option<PortRange>,
    /// Whether `range` is narrower than the default 1024-65535, i.e. `--to-ports` is in use.
    pub to_ports: bool,
    pub summary: String,
}

/// One linked connection: the pod's own source (address bytes, port) and what the uplink saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pair {
    pub pod_addr: [u8; 16],
    pub pod_port: u16,
    pub uplink_addr: [u8; 16],
    pub uplink_port: u16,
}

const MIN_PAIRS: usize = 10;
/// Bounds SNAT ranges usually have (the kernel's default, the ephemeral range, NodePorts').
const COMMON_LOW: [u16; 4] = [1, 1024, 30000, 32768];
const COMMON_HIGH: [u16; 3] = [32767, 60999, 65535];

fn snap(observed: u16, candidates: &[u16], tolerance: u32, below: bool) -> u16 {
    candidates
        .iter()
        .copied()
        .filter(|c| {
            let (c32, o32) = (u32::from(*c), u32::from(observed));
            if below {
                c32 <= o32 && o32 - c32 <= tolerance
            } else {
                c32 >= o32 && c32 - o32 <= tolerance
            }
        })
        .min_by_key(|c| (i64::from(*c) - i64::from(observed)).unsigned_abs())
        .unwrap_or(observed)
}

pub fn detect(pairs: &[Pair]) -> NatReport {
    let n = pairs.len();
    if n < MIN_PAIRS {
        return NatReport {
            mode: NatMode::Unknown,
            pairs: n,
            range: None,
            to_ports: false,
            summary: format!("too few linked connections ({n}) to tell what SNAT does"),
        };
    }
    let same_port = pairs.iter().filter(|p| p.pod_port == p.uplink_port).count();
    let same_addr = pairs.iter().filter(|p| p.pod_addr == p.uplink_addr).count();
    let lo = pairs.iter().map(|p| p.uplink_port).min().unwrap_or(0);
    let hi = pairs.iter().map(|p| p.uplink_port).max().unwrap_or(0);
    if same_port * 10 >= n * 9 {
        let mode = if same_addr * 10 >= n * 9 {
            NatMode::None
        } else {
            NatMode::KeepsPorts
        };
        let summary = match mode {
            NatMode::None => {
                "no SNAT: connections leave with the pod's own address and port".into()
            }
            _ => format!(
                "SNAT keeps the pod's source port when it can ({same_port} of {n}): plain \
                 MASQUERADE/SNAT without --random-fully; ports change only on collisions"
            ),
        };
        return NatReport {
            mode,
            pairs: n,
            range: None,
            to_ports: false,
            summary,
        };
    }
    // Uniform samples: the gap to the true edge is about range/n; a gap ten times that has a
    // chance of e^-10 (under 1 in 20 000), so a miss by six gaps (e^-6, 1 in 400) still snaps.
    let tolerance = (u32::from(hi - lo) / n as u32).saturating_mul(10).max(64);
    let start = snap(lo, &COMMON_LOW, tolerance, true);
    let end = snap(hi, &COMMON_HIGH, tolerance, false);
    let range = PortRange::new(start.max(1), end.max(start.max(1)));
    let to_ports = range.start > 1024 || range.end < 65535;
    let flag = if to_ports {
        format!(" --to-ports {range}")
    } else {
        String::new()
    };
    NatReport {
        mode: NatMode::RandomFully,
        pairs: n,
        range: Some(range),
        to_ports,
        summary: format!(
            "SNAT randomises every source port over about {range} ({} of {n} changed): \
             MASQUERADE --random-fully{flag} (or --random, which the kernel randomises alike)",
            n - same_port
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(pod_port: u16, uplink_port: u16, natted: bool) -> Pair {
        Pair {
            pod_addr: [1; 16],
            pod_port,
            uplink_addr: if natted { [2; 16] } else { [1; 16] },
            uplink_port,
        }
    }

    /// A cheap deterministic spread over a range.
    fn spread(i: u32, range: PortRange) -> u16 {
        (u32::from(range.start) + (i.wrapping_mul(2_654_435_761) % range.count())) as u16
    }

    #[test]
    fn random_fully_over_the_default_range() {
        let r = PortRange::new(1024, 65535);
        let pairs: Vec<Pair> = (0..300)
            .map(|i| pair(33000 + i as u16, spread(i, r), true))
            .collect();
        let rep = detect(&pairs);
        assert_eq!(rep.mode, NatMode::RandomFully);
        assert_eq!(rep.range, Some(r));
        assert!(!rep.to_ports);
    }

    #[test]
    fn random_fully_with_to_ports() {
        let r = PortRange::new(32768, 65535);
        let pairs: Vec<Pair> = (0..300)
            .map(|i| pair(33000 + i as u16, spread(i, r), true))
            .collect();
        let rep = detect(&pairs);
        assert_eq!(rep.mode, NatMode::RandomFully);
        assert_eq!(rep.range, Some(r));
        assert!(rep.to_ports);
        assert!(
            rep.summary.contains("--to-ports 32768-65535"),
            "{}",
            rep.summary
        );
    }

    #[test]
    fn an_unlucky_top_sample_still_snaps() {
        // 160 samples over 1024-65535 whose highest landed 2837 ports short of the edge (seen
        // once in a lab run): about seven average gaps.
        let r = PortRange::new(1024, 62698);
        let mut pairs: Vec<Pair> = (0..159)
            .map(|i| pair(33000 + i as u16, spread(i, r), true))
            .collect();
        pairs.push(pair(40000, 62698, true));
        pairs.push(pair(40001, 1458, true));
        let rep = detect(&pairs);
        assert_eq!(
            rep.range,
            Some(PortRange::new(1024, 65535)),
            "{}",
            rep.summary
        );
        assert!(!rep.to_ports);
    }

    #[test]
    fn plain_masquerade_keeps_ports() {
        let pairs: Vec<Pair> = (0..50).map(|i| pair(40000 + i, 40000 + i, true)).collect();
        assert_eq!(detect(&pairs).mode, NatMode::KeepsPorts);
    }

    #[test]
    fn no_snat() {
        let pairs: Vec<Pair> = (0..50).map(|i| pair(40000 + i, 40000 + i, false)).collect();
        assert_eq!(detect(&pairs).mode, NatMode::None);
    }

    #[test]
    fn few_pairs_are_unknown() {
        assert_eq!(detect(&[pair(1, 2, true)]).mode, NatMode::Unknown);
    }
}
