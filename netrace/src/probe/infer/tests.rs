use super::*;

/// A stateless firewall letting answers back only to `lo..=hi`.
fn firewall(lo: u16, hi: u16) -> impl FnMut(u16) -> Outcome {
    move |p| {
        if (lo..=hi).contains(&p) {
            Outcome::Answered
        } else {
            Outcome::Timeout
        }
    }
}

fn plan(range: PortRange, samples: u32, max_extra: u32) -> Plan {
    Plan {
        range,
        samples,
        max_extra,
    }
}

fn full() -> PortRange {
    PortRange::new(1024, 65535)
}

fn run(p: &Plan, o: &mut impl Oracle) -> Inference {
    infer(p, o).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn samples_are_spread_and_include_both_ends() {
    let s = sample_ports(full(), 128);
    assert_eq!(s.len(), 128);
    assert_eq!(s.first(), Some(&1024));
    assert_eq!(s.last(), Some(&65535));
    assert!(s.windows(2).all(|w| w[0] < w[1]));
    let gaps: Vec<u16> = s.windows(2).map(|w| w[1] - w[0]).collect();
    let (min, max) = (gaps.iter().min(), gaps.iter().max());
    assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{gaps:?}");
    // At least one per 1024-port block.
    for block in (1024..65535u32).step_by(1024) {
        assert!(s
            .iter()
            .any(|&p| (block..block + 1024).contains(&u32::from(p))));
    }
    assert_eq!(
        sample_ports(PortRange::new(10, 14), 128),
        vec![10, 11, 12, 13, 14]
    );
    assert_eq!(sample_ports(PortRange::new(10, 14), 1), vec![10]);
    assert_eq!(sample_ports(PortRange::new(1, 65535), 2), vec![1, 65535]);
    assert_eq!(sample_ports(PortRange::new(80, 80), 5), vec![80]);
}

#[test]
fn the_seed_firewall_is_found_to_the_port() {
    let inf = run(&plan(full(), 128, 40), &mut firewall(32768, 65535));
    let a = &inf.analysis;
    assert_eq!(a.kind, Kind::Range);
    assert_eq!(a.answered_span(), Some(PortRange::new(32768, 65535)));
    assert!(a.exact(), "{a:?}");
    assert_eq!(
        a.lower,
        Some(Edge {
            status: EdgeStatus::Exact,
            inside: 32768,
            outside: Some(32767)
        })
    );
    // 65535 is the last port there is.
    assert_eq!(a.upper.map(|e| e.status), Some(EdgeStatus::Exact));
    // 508 ports between samples: 9 halvings.
    assert!(inf.extra_probes <= 10, "{}", inf.extra_probes);
    assert!(!inf.budget_exhausted);
    assert_eq!(
        inf.probes
            .iter()
            .filter(|p| p.phase == Phase::Sample)
            .count(),
        128
    );
    let mut ports: Vec<u16> = inf.probes.iter().map(|p| p.port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), inf.probes.len(), "a port was probed twice");
}

#[test]
fn every_edge_is_found_exactly() {
    // Two-sided ranges, edges on and between samples, near the ends of the probed range.
    let cases = [
        (40000, 65535),
        (1025, 65535),
        (1024, 60999),
        (20000, 40000),
        (1024, 1024),
        (65535, 65535),
        (49152, 50175),
        (1536, 65534),
    ];
    for (lo, hi) in cases {
        let inf = run(&plan(full(), 128, 64), &mut firewall(lo, hi));
        let a = &inf.analysis;
        assert!(
            a.kind == Kind::Range || (lo, hi) == (1024, 65535),
            "{lo}-{hi}: {a:?}"
        );
        assert_eq!(
            a.answered_span(),
            Some(PortRange::new(lo, hi)),
            "{lo}-{hi}: {a:?}"
        );
        assert!(a.exact() || lo == 1024, "{lo}-{hi}: {a:?}");
    }
}

#[test]
fn many_edges_pseudo_random() {
    let mut x: u32 = 12345;
    for _ in 0..200 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let a = 1025 + (x >> 8) % 64000;
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let b = 1025 + (x >> 8) % 64000;
        let (lo, hi) = (a.min(b) as u16, a.max(b) as u16);
        let inf = run(&plan(full(), 64, 40), &mut firewall(lo, hi));
        let a = &inf.analysis;
        if a.kind == Kind::NoneAnswered {
            // A narrow range between two samples is invisible: nothing to bisect.
            assert!(hi - lo < 1100, "{lo}-{hi}");
            continue;
        }
        assert_eq!(a.answered_span(), Some(PortRange::new(lo, hi)), "{lo}-{hi}");
        assert!(a.exact(), "{lo}-{hi}: {a:?}");
        assert!(
            inf.extra_probes <= 2 * 11,
            "{lo}-{hi}: {}",
            inf.extra_probes
        );
    }
}

#[test]
fn the_edge_at_1024_needs_ports_below_it() {
    // Probing 1024-65535 alone cannot see below 1024: the lower edge stays open.
    let inf = run(&plan(full(), 128, 40), &mut firewall(1024, 65535));
    assert_eq!(inf.analysis.kind, Kind::AllAnswered);
    assert_eq!(inf.analysis.lower.map(|e| e.status), Some(EdgeStatus::Open));
    assert_eq!(inf.extra_probes, 0);
    // From port 1 up, the edge is found to the port.
    let inf = run(
        &plan(PortRange::new(1, 65535), 128, 40),
        &mut firewall(1024, 65535),
    );
    assert_eq!(inf.analysis.kind, Kind::Range);
    assert!(inf.analysis.exact());
    assert_eq!(
        inf.analysis.answered_span(),
        Some(PortRange::new(1024, 65535))
    );
}

#[test]
fn a_small_budget_leaves_a_bounded_edge_that_holds_the_truth() {
    for budget in [0, 1, 3, 5] {
        let inf = run(&plan(full(), 128, budget), &mut firewall(40000, 65535));
        let a = &inf.analysis;
        assert_eq!(a.kind, Kind::Range);
        let lower = a.lower.unwrap_or_else(|| panic!("no lower edge"));
        assert_eq!(lower.status, EdgeStatus::Bounded, "budget {budget}");
        assert!(lower.candidates(true).contains(40000), "{lower:?}");
        assert!(lower.uncertainty() > 1);
        assert_eq!(inf.extra_probes, budget);
        assert!(inf.budget_exhausted);
    }
}

#[test]
fn two_edges_bisect_in_the_same_rounds() {
    let mut calls = Vec::new();
    let mut fw = firewall(20000, 40000);
    let mut oracle = |p: u16| fw(p);
    struct Counting<'a, F>(&'a mut F, &'a mut Vec<usize>);
    impl<F: FnMut(u16) -> Outcome> Oracle for Counting<'_, F> {
        fn probe(&mut self, ports: &[u16]) -> anyhow::Result<Vec<Outcome>> {
            self.1.push(ports.len());
            Ok(ports.iter().map(|&p| (self.0)(p)).collect())
        }
    }
    let inf = run(
        &plan(full(), 128, 64),
        &mut Counting(&mut oracle, &mut calls),
    );
    assert!(inf.analysis.exact());
    assert_eq!(calls.first(), Some(&128));
    assert!(calls[1..].iter().all(|&n| n <= 2), "{calls:?}");
    assert!(calls[1..].contains(&2), "{calls:?}");
}

#[test]
fn skipped_and_unreachable_ports_are_stepped_around() {
    // 32767 is in use: the edge is known to lie at 32767 or 32768.
    let mut fw = firewall(32768, 65535);
    let mut oracle = |p: u16| {
        if p == 32767 {
            Outcome::Skipped
        } else if p == 32766 {
            Outcome::Unreachable
        } else {
            fw(p)
        }
    };
    let inf = run(&plan(full(), 128, 40), &mut oracle);
    let lower = inf
        .analysis
        .lower
        .unwrap_or_else(|| panic!("no lower edge"));
    assert_eq!(lower.status, EdgeStatus::Bounded);
    assert_eq!(lower.inside, 32768);
    assert_eq!(lower.outside, Some(32765));
    assert_eq!(lower.candidates(true), PortRange::new(32766, 32768));
    assert!(!inf.budget_exhausted);
    assert_eq!(inf.analysis.inconclusive, 2);
}

#[test]
fn refusals_count_as_answers() {
    let mut oracle = |p: u16| {
        if p >= 32768 {
            Outcome::Refused
        } else {
            Outcome::Timeout
        }
    };
    let inf = run(&plan(full(), 128, 40), &mut oracle);
    assert_eq!(inf.analysis.kind, Kind::Range);
    assert_eq!(
        inf.analysis.answered_span(),
        Some(PortRange::new(32768, 65535))
    );
}

#[test]
fn random_loss_is_not_a_range() {
    // Ports translated at random (SNAT on the way): half the probes are silent, anywhere.
    let mut oracle = |p: u16| {
        let h = u32::from(p).wrapping_mul(2_654_435_761) >> 16;
        if h % 2 == 0 {
            Outcome::Answered
        } else {
            Outcome::Timeout
        }
    };
    let inf = run(&plan(full(), 128, 40), &mut oracle);
    assert_eq!(inf.analysis.kind, Kind::NotARange);
    assert!(inf.analysis.interleaved_silent > 10);
    assert_eq!(inf.extra_probes, 0);
}

#[test]
fn all_and_nothing() {
    let inf = run(&plan(full(), 64, 40), &mut |_| Outcome::Answered);
    assert_eq!(inf.analysis.kind, Kind::AllAnswered);
    assert_eq!(inf.analysis.came_back, 64);
    let inf = run(&plan(full(), 64, 40), &mut |_| Outcome::Timeout);
    assert_eq!(inf.analysis.kind, Kind::NoneAnswered);
    assert_eq!(inf.analysis.lower, None);
    let inf = run(&plan(full(), 64, 40), &mut |_| Outcome::Skipped);
    assert_eq!(inf.analysis.kind, Kind::NothingUsable);
    assert_eq!(inf.analysis.inconclusive, 64);
}

#[test]
fn oracle_errors_and_short_answers_propagate() {
    struct Broken(usize);
    impl Oracle for Broken {
        fn probe(&mut self, ports: &[u16]) -> anyhow::Result<Vec<Outcome>> {
            if self.0 == 0 {
                anyhow::bail!("too many open files")
            }
            Ok(vec![Outcome::Answered; ports.len().saturating_sub(self.0)])
        }
    }
    assert!(infer(&plan(full(), 8, 4), &mut Broken(0)).is_err());
    assert!(infer(&plan(full(), 8, 4), &mut Broken(1)).is_err());
}

#[test]
fn midpoints_skip_probed_ports() {
    let mut r = BTreeMap::new();
    assert_eq!(midpoint(10, 20, &r), Some(15));
    assert_eq!(midpoint(20, 10, &r), Some(15));
    assert_eq!(midpoint(10, 11, &r), None);
    assert_eq!(midpoint(10, 12, &r), Some(11));
    r.insert(11, Outcome::Skipped);
    assert_eq!(midpoint(10, 12, &r), None);
    r.insert(15, Outcome::Skipped);
    assert_eq!(midpoint(10, 20, &r), Some(14));
}
