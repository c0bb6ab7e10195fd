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
    /// Whether `range` ends where the samples say for sure; when false, the range is known to
    /// reach at least that far and may be wider.
    pub range_sure: bool,
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
/// 1 only when a port below 1024 was seen: MASQUERADE maps ports >= 1024 into 1024-65535.
const COMMON_LOW: [u16; 4] = [1, 1024, 30000, 32768];
const COMMON_HIGH: [u16; 3] = [32767, 60999, 65535];
/// A bound is plausible when the samples could fall this short of it by chance: for n
/// uniform samples over a span, missing an edge by g has a chance of about e^(-n g / span);
/// e^-10 is under 1 in 20 000.
const PLAUSIBLE: f64 = 10.0;

/// The common bounds the samples `lo..=hi` (n of them) could plausibly come from on one side:
/// `below` for the start (candidates at or below `lo`), else the end.
fn plausible(lo: u16, hi: u16, n: usize, candidates: &[u16], below: bool) -> Vec<u16> {
    candidates
        .iter()
        .copied()
        .filter(|c| {
            let (c, lo, hi) = (f64::from(*c), f64::from(lo), f64::from(hi));
            let (gap, span) = if below {
                (lo - c, hi - c)
            } else {
                (c - hi, c - lo)
            };
            gap >= 0.0 && span > 0.0 && n as f64 * gap / span <= PLAUSIBLE
        })
        .collect()
}

/// How much likelier the nearest plausible bound must be than any other plausible one
/// (likelihood ratio e^4, about 55): uniform samples over a wider span are less likely by
/// (narrow span / wide span)^n.
const LIKELIER: f64 = 4.0;

/// One side's bound: the nearest plausible common bound when it is clearly the likeliest,
/// else the observed sample (then the range is only known to reach at least that far).
fn snap(lo: u16, hi: u16, n: usize, below: bool) -> (u16, bool) {
    let candidates: Vec<u16> = if below {
        COMMON_LOW
            .iter()
            .copied()
            .filter(|c| *c != 1 || lo < 1024)
            .collect()
    } else {
        COMMON_HIGH.to_vec()
    };
    let mut fits = plausible(lo, hi, n, &candidates, below);
    let observed = if below { lo } else { hi };
    let span = |c: u16| -> f64 {
        let (c, lo, hi) = (f64::from(c), f64::from(lo), f64::from(hi));
        if below {
            hi - c + 1.0
        } else {
            c - lo + 1.0
        }
    };
    fits.sort_by(|a, b| span(*a).total_cmp(&span(*b)));
    match fits.as_slice() {
        [] => (observed, false),
        [best, rest @ ..] => {
            let clear = rest
                .iter()
                .all(|c| n as f64 * (span(*c) / span(*best)).ln() >= LIKELIER);
            if clear {
                (*best, true)
            } else {
                (observed, false)
            }
        }
    }
}

pub fn detect(pairs: &[Pair]) -> NatReport {
    let n = pairs.len();
    if n < MIN_PAIRS {
        return NatReport {
            mode: NatMode::Unknown,
            pairs: n,
            range: None,
            range_sure: false,
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
            range_sure: false,
            to_ports: false,
            summary,
        };
    }
    let (start, start_sure) = snap(lo, hi, n, true);
    let (end, end_sure) = snap(lo, hi, n, false);
    let range = PortRange::new(start.max(1), end.max(start.max(1)));
    let sure = start_sure && end_sure;
    let to_ports = sure && (range.start > 1024 || range.end < 65535);
    let flag = if to_ports {
        format!(" --to-ports {range}")
    } else {
        String::new()
    };
    let over = if sure {
        format!("about {range}")
    } else {
        format!("at least {range} (too few connections to tell where it ends; watch longer)")
    };
    NatReport {
        mode: NatMode::RandomFully,
        pairs: n,
        range: Some(range),
        range_sure: sure,
        to_ports,
        summary: format!(
            "SNAT randomises every source port over {over} ({} of {n} changed): \
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

    /// n uniform samples over `range` from a small deterministic generator.
    fn uniform(seed: u64, n: usize, range: PortRange) -> Vec<Pair> {
        let mut x = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407)
            | 1;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let port = u32::from(range.start) + (x % u64::from(range.count())) as u32;
                pair(33000 + i as u16, port as u16, true)
            })
            .collect()
    }

    /// At 10, 20 and 50 connections over 1024-65535 the estimate never claims 60999 (about
    /// half of 10-sample runs have their highest port below it); when unsure it says "at
    /// least", and with more connections it is sure more often.
    #[test]
    fn few_samples_never_snap_to_the_wrong_edge() {
        let r = PortRange::new(1024, 65535);
        for (n, min_sure) in [(10, 30), (20, 60), (50, 90)] {
            let mut sure = 0;
            for seed in 0..200 {
                let rep = detect(&uniform(seed, n, r));
                assert_eq!(rep.mode, NatMode::RandomFully);
                let got = rep.range.unwrap_or(PortRange::new(1, 1));
                if rep.range_sure {
                    sure += 1;
                    assert_eq!(got, r, "n={n} seed={seed}: {}", rep.summary);
                } else {
                    assert!(r.covers(&got), "n={n} seed={seed}: {}", rep.summary);
                    assert!(rep.summary.contains("at least"), "{}", rep.summary);
                    assert!(!rep.to_ports, "{}", rep.summary);
                }
                assert_ne!(got.end, 60999, "n={n} seed={seed}: {}", rep.summary);
            }
            assert!(
                sure * 100 >= min_sure * 200,
                "n={n}: sure in {sure} of 200 runs"
            );
        }
    }

    /// A --to-ports 32768-60999 range is never mistaken for 65535 either.
    #[test]
    fn to_ports_ending_at_60999() {
        let r = PortRange::new(32768, 60999);
        for seed in 0..100 {
            let rep = detect(&uniform(seed, 50, r));
            let got = rep.range.unwrap_or(PortRange::new(1, 1));
            assert!(got.end <= 60999, "seed={seed}: {}", rep.summary);
            if rep.range_sure {
                assert_eq!(got, r, "seed={seed}: {}", rep.summary);
            }
        }
        let rep = detect(&uniform(7, 400, r));
        assert!(rep.range_sure, "{}", rep.summary);
        assert_eq!(rep.range, Some(r));
    }

    /// Uniform samples over `r` (deterministic, evenly spread), SNATed.
    fn sample(n: u32, r: PortRange) -> Vec<Pair> {
        (0..n)
            .map(|i| pair(33000 + i as u16, spread(i, r), true))
            .collect()
    }

    #[test]
    fn a_top_sample_short_of_60999_does_not_claim_60999() {
        // 40 samples from 1024-65535 that all stayed below 60999 (the chance is 1 in 20):
        // 60999 is the nearest common bound, but 65535 is still plausible, so no --to-ports
        // range ending at 60999 is named.
        let r = PortRange::new(1024, 60500);
        let rep = detect(&sample(40, r));
        assert_eq!(rep.mode, NatMode::RandomFully);
        assert_ne!(rep.range.map(|g| g.end), Some(60999), "{}", rep.summary);
        assert!(!rep.range_sure, "{}", rep.summary);
        assert!(!rep.to_ports, "{}", rep.summary);
    }

    #[test]
    fn enough_samples_below_60999_name_it() {
        let r = PortRange::new(1024, 60999);
        let rep = detect(&sample(400, r));
        assert_eq!(rep.range, Some(r), "{}", rep.summary);
        assert!(rep.range_sure, "{}", rep.summary);
        assert!(rep.to_ports);
    }

    #[test]
    fn the_lower_edge_is_told_from_30000_with_enough_samples() {
        let r = PortRange::new(32768, 65535);
        // 200 samples rule out a range from 30000 (nothing in 30000-32767 by chance: 1 in 10
        // million). (With 60 that chance is still 0.8 %, yet the likelihood-ratio rule names
        // 32768 as sure there: a known difference, left to the verdict's owners.)
        let many = detect(&sample(200, r));
        assert_eq!(many.range, Some(r), "{}", many.summary);
        assert!(many.range_sure && many.to_ports, "{}", many.summary);
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
