//! Turns the measurements (one JSON document, also written out as is) into rows with their
//! baselines, ratios and targets, and renders them for the terminal and for
//! `docs/benchmarks.md`.

use std::fmt::Write as _;

use anyhow::{anyhow, Context as _};
use serde_json::Value;

use super::median;

/// One line of the results table.
#[derive(Debug, Clone)]
pub struct Row {
    pub section: &'static str,
    pub figure: String,
    pub value: String,
    pub baseline: String,
    pub ratio: String,
    pub target: String,
    /// None when the row has no target.
    pub met: Option<Outcome>,
}

/// What a measurement says of its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Met,
    Missed,
    /// The rounds scatter across the target: the interval that holds the true figure with
    /// 95 % confidence has values on both sides of it, so neither met nor missed is shown.
    Unresolved,
}

impl From<bool> for Outcome {
    fn from(met: bool) -> Self {
        if met {
            Outcome::Met
        } else {
            Outcome::Missed
        }
    }
}

impl Outcome {
    /// The word in the tables.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Met => "met",
            Outcome::Missed => "MISSED",
            Outcome::Unresolved => "not resolved",
        }
    }
}

impl Row {
    fn result(&self) -> &'static str {
        self.met.map_or("", Outcome::label)
    }
}

fn num(v: &Value, pointer: &str) -> anyhow::Result<f64> {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow!("the results have no number at {pointer}"))
}

fn arr<'a>(v: &'a Value, pointer: &str) -> anyhow::Result<&'a Vec<Value>> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("the results have no list at {pointer}"))
}

pub fn ns(x: f64) -> String {
    format!("{x:.1} ns")
}

pub fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

fn times(x: f64) -> String {
    format!("{x:.2}x")
}

fn pct(x: f64) -> String {
    format!("{:.1} %", x * 100.0)
}

pub fn count(n: f64) -> String {
    if n >= 1e6 && (n / 1e6).fract() == 0.0 {
        format!("{} M", n / 1e6)
    } else if n >= 1e3 && (n / 1e3).fract() == 0.0 {
        format!("{} k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

pub fn rate(per_s: f64) -> String {
    if per_s >= 1e6 {
        format!("{:.2} M/s", per_s / 1e6)
    } else {
        format!("{:.1} k/s", per_s / 1e3)
    }
}

/// The targets, as issue 16 states them.
pub mod target {
    /// Non-SYN packets: at most this times the empty classifier.
    pub const NON_SYN_RATIO: f64 = 1.2;
    /// A new SYN and a matched SYN-ACK, each (default mode).
    pub const SYN_PATH_NS: f64 = 200.0;
    /// Throughput ratio: at most this many points below the empty classifier's.
    pub const THROUGHPUT_POINTS_BELOW_EMPTY: f64 = 0.01;
    /// Connection-rate ratio: at most this many points below the empty classifier's...
    pub const CONN_POINTS_BELOW_EMPTY: f64 = 0.02;
    /// ... and at least this many above tcpdump's, in the same run.
    pub const CONN_POINTS_ABOVE_TCPDUMP: f64 = 0.05;
    /// 1 M pending SYNs: kernel maps + user-space RSS.
    pub const MILLION_BYTES: f64 = 128.0 * 1024.0 * 1024.0;
    /// 1 M pending SYNs: finding the expired ones.
    pub const FIND_EXPIRED_MILLION_S: f64 = 0.1;
    /// netrace's own CPU at a paced 10 k connections/s, percent of one core.
    pub const CPU_PERCENT: f64 = 1.0;
}

/// Every row, from the results document.
pub fn rows(r: &Value) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    per_packet_rows(r, &mut rows)?;
    traffic_rows(r, &mut rows)?;
    share_rows(r, &mut rows)?;
    cpu_rows(r, &mut rows)?;
    scale_rows(r, &mut rows)?;
    loss_rows(r, &mut rows)?;
    analyze_rows(r, &mut rows)?;
    Ok(rows)
}

/// `netrace analyze` against tshark on the same capture (absent from older results).
fn analyze_rows(r: &Value, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    if r.pointer("/analyze").is_none() {
        return Ok(());
    }
    let ours = num(r, "/analyze/netrace_pps/median")?;
    let theirs = num(r, "/analyze/tshark_pps/median")?;
    let packets = num(r, "/analyze/packets")?;
    rows.push(Row {
        section: "analyze",
        figure: format!("netrace analyze, {} packet capture", count(packets)),
        value: format!("{} packets", rate(ours)),
        baseline: format!("tshark -Y syn {} packets", rate(theirs)),
        ratio: times(ours / theirs),
        target: "faster than tshark".into(),
        met: Some((ours > theirs).into()),
    });
    Ok(())
}

fn per_packet_rows(r: &Value, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    const S: &str = "per packet";
    let packets = arr(r, "/per_packet/packets")?;
    let mut empty_repeated = Vec::new();
    for p in packets {
        let name = p
            .get("packet")
            .and_then(Value::as_str)
            .context("a packet without a name")?;
        let noop = num(p, "/noop_ns")?;
        empty_repeated.push(noop);
        for prog in ["egress", "ingress"] {
            let v = num(p, &format!("/{prog}_ns"))?;
            let on_path = p.get(format!("{prog}_on_syn_path")) == Some(&Value::Bool(true));
            let path = p
                .get(format!("{prog}_path"))
                .and_then(Value::as_str)
                .unwrap_or("");
            // The SYN paths a repeated frame takes (retransmission, answer without a pending
            // entry) have no target of their own; the new-SYN and matched-answer rows below do.
            let (target, met) = if on_path {
                (String::new(), None)
            } else {
                (
                    format!("<= {}x empty", target::NON_SYN_RATIO),
                    Some((v / noop <= target::NON_SYN_RATIO).into()),
                )
            };
            rows.push(Row {
                section: S,
                figure: format!("{prog}: {name}, {path}"),
                value: ns(v),
                baseline: format!("empty {}", ns(noop)),
                ratio: times(v / noop),
                target,
                met,
            });
        }
    }
    // Single runs carry the kernel timer's own cost, measured by the empty classifier timed
    // the same way; take it off to compare with the repeated rows.
    let empty = empty_repeated.iter().sum::<f64>() / empty_repeated.len().max(1) as f64;
    for (single, mode, with_target) in [
        ("single", "no event, answer logged", true),
        ("single_events", "per-connection events", false),
    ] {
        let base = format!("/per_packet/{single}");
        if r.pointer(&base).is_none() {
            continue;
        }
        let timer = num(r, &format!("{base}/noop_ns"))? - empty;
        let (syn_what, answer_what) = if with_target {
            ("insert + port log, no event", "delete + answer log")
        } else {
            ("insert + SYN event", "delete + answer event")
        };
        for (figure, key) in [
            (
                format!("egress: new SYN, new 4-tuple per call ({syn_what})"),
                "new_syn_ns",
            ),
            (
                format!("ingress: SYN-ACK matching a pending SYN ({answer_what})"),
                "matched_synack_ns",
            ),
        ] {
            let v = num(r, &format!("{base}/{key}"))? - timer;
            rows.push(Row {
                section: S,
                figure: if with_target {
                    figure
                } else {
                    format!("{figure}, {mode}")
                },
                value: ns(v),
                baseline: format!("empty {}", ns(empty)),
                ratio: times(v / empty),
                target: if with_target {
                    format!("<= {:.0} ns", target::SYN_PATH_NS)
                } else {
                    String::new()
                },
                met: with_target.then_some((v <= target::SYN_PATH_NS).into()),
            });
        }
    }
    Ok(())
}

/// The traffic modes in the order of the rows, with their labels.
const MODES: [(&str, &str); 5] = [
    ("none", "no tracer"),
    ("empty", "empty classifier (the floor)"),
    ("netrace", "netrace watch, default (books)"),
    (
        "netrace_events",
        "netrace, per-connection output (--events all)",
    ),
    ("tcpdump", "tcpdump (same SYN filter)"),
];

fn points(x: f64) -> String {
    format!("{:+.1} points", x * 100.0)
}

/// The least number of paired rounds for which [`median_interval`] exists.
const MIN_ROUNDS_FOR_INTERVAL: usize = 6;

/// A distribution-free 95 % confidence interval for the median of `d`: the order statistics
/// d(k) and d(n+1-k) of the sorted values, k the largest with P(Binomial(n, 1/2) < k) <=
/// 2.5 %, which hold the true median between them with at least 95 % probability whatever
/// the shape of the noise. None below [`MIN_ROUNDS_FOR_INTERVAL`] values.
pub fn median_interval(d: &[f64]) -> Option<(f64, f64)> {
    let n = d.len();
    if n < MIN_ROUNDS_FOR_INTERVAL {
        return None;
    }
    // P(X <= j) for X ~ Binomial(n, 1/2), summed term by term: C(n, j) / 2^n.
    let mut term = 0.5f64.powi(i32::try_from(n).ok()?);
    let mut below = 0.0;
    let mut k = 0;
    for j in 0..n {
        below += term;
        if below > 0.025 {
            break;
        }
        k = j + 1;
        term *= (n - j) as f64 / (j + 1) as f64;
    }
    if k == 0 {
        return None;
    }
    let mut s = d.to_vec();
    s.sort_by(f64::total_cmp);
    Some((s[k - 1], s[n - k]))
}

/// A comparison in points against its target (the difference must be at least `at_least`):
/// the median difference with its 95 % interval, met when the whole interval reaches the
/// target, missed when none of it does, not resolved when the noise of the rounds leaves
/// both possible.
fn judge_points(d: &[f64], at_least: f64) -> (String, Outcome) {
    let m = median(d);
    match median_interval(d) {
        Some((lo, hi)) => (
            format!(
                "{} (95 % interval {:+.1} … {:+.1})",
                points(m),
                lo * 100.0,
                hi * 100.0
            ),
            if lo >= at_least {
                Outcome::Met
            } else if hi < at_least {
                Outcome::Missed
            } else {
                Outcome::Unresolved
            },
        ),
        None => (
            format!("{} ({} rounds, no interval)", points(m), d.len()),
            Outcome::Unresolved,
        ),
    }
}

fn traffic_rows(r: &Value, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    for (section, key, unit) in [
        ("throughput", "stream", "bulk TCP stream"),
        ("connection rate", "connections", "short connections"),
    ] {
        let fmt = |x: f64| {
            if key == "stream" {
                format!("{:.2} Gbit/s", x / 1e9)
            } else {
                format!("{} conn", rate(x))
            }
        };
        let none = num(r, &format!("/traffic/{key}/none/median"))?;
        // Per-round ratios (see `series_json`), not the ratio of the medians.
        let ratio = |mode: &str| num(r, &format!("/traffic/{key}/{mode}/ratio"));
        for (mode, label) in MODES {
            let v = num(r, &format!("/traffic/{key}/{mode}/median"))?;
            rows.push(Row {
                section,
                figure: format!("{unit}, {label}"),
                value: fmt(v),
                baseline: if mode == "none" {
                    "-".into()
                } else {
                    format!("none {}", fmt(none))
                },
                ratio: pct(ratio(mode)?),
                target: String::new(),
                met: None,
            });
        }
        let (netrace, empty, tcpdump) = (ratio("netrace")?, ratio("empty")?, ratio("tcpdump")?);
        // The comparisons in points: the median over the rounds of the difference of two
        // modes' ratios in the same round (paired, as the modes ran seconds apart), so that a
        // round when the whole machine was slower weighs on both sides of the difference.
        let paired = |a: &str, b: &str| -> anyhow::Result<Vec<f64>> {
            let ratios = |mode: &str| -> anyhow::Result<Vec<f64>> {
                arr(r, &format!("/traffic/{key}/{mode}/ratios"))?
                    .iter()
                    .map(|v| {
                        v.as_f64()
                            .ok_or_else(|| anyhow!("a ratio of {mode} is not a number"))
                    })
                    .collect()
            };
            Ok(ratios(a)?
                .iter()
                .zip(ratios(b)?)
                .map(|(x, y)| x - y)
                .collect())
        };
        let mut comparisons = vec![(
            "the empty classifier",
            format!("empty {}", pct(empty)),
            paired("netrace", "empty")?,
            if key == "stream" {
                -target::THROUGHPUT_POINTS_BELOW_EMPTY
            } else {
                -target::CONN_POINTS_BELOW_EMPTY
            },
        )];
        if key == "connections" {
            comparisons.push((
                "tcpdump",
                format!("tcpdump {}", pct(tcpdump)),
                paired("netrace", "tcpdump")?,
                target::CONN_POINTS_ABOVE_TCPDUMP,
            ));
        }
        for (against, baseline, d, at_least) in comparisons {
            let (value, met) = judge_points(&d, at_least);
            rows.push(Row {
                section,
                figure: format!("netrace (default) against {against}"),
                value,
                baseline,
                ratio: pct(netrace),
                target: if at_least < 0.0 {
                    let p = -at_least * 100.0;
                    format!("within {p:.0} point{}", if p == 1.0 { "" } else { "s" })
                } else {
                    format!(">= {:.0} points above", at_least * 100.0)
                },
                met: Some(met),
            });
        }
    }
    Ok(())
}

/// netrace's share of the busy CPU under each load (absent from older results): the
/// throughput and connection-rate targets judged from CPU time, which the machine's noise
/// does not blur as it blurs the rates. Met when every round is within the target.
fn share_rows(r: &Value, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    if r.pointer("/traffic/cpu_share").is_none() {
        return Ok(());
    }
    for (section, key, at_most) in [
        (
            "throughput",
            "stream",
            target::THROUGHPUT_POINTS_BELOW_EMPTY,
        ),
        (
            "connection rate",
            "connections",
            target::CONN_POINTS_BELOW_EMPTY,
        ),
    ] {
        let at = |p: &str| num(r, &format!("/traffic/cpu_share/{key}/{p}"));
        let (med, max) = (at("median_share")?, at("max_share")?);
        let runs = arr(r, &format!("/traffic/cpu_share/{key}/runs"))?;
        let each =
            |f: &dyn Fn(&Value) -> Option<f64>| -> Vec<f64> { runs.iter().filter_map(f).collect() };
        let floor = median(&each(&|v| v.get("floor_share")?.as_f64()));
        let per_conn = median(&each(&|v| {
            let ns = v.get("netrace_ns")?.as_f64()? - v.get("floor_ns")?.as_f64()?;
            Some(ns / v.get("done")?.as_f64()?.max(1.0))
        }));
        let mut value = format!(
            "{:.2} % (highest of {} rounds {:.2} %",
            med * 100.0,
            runs.len(),
            max * 100.0
        );
        if key == "connections" {
            let _ = write!(value, "; programs {} per connection", ns(per_conn));
        }
        value.push(')');
        rows.push(Row {
            section,
            figure: "netrace's CPU beyond the empty classifier's, share of the busy CPU under \
                     this load (kernel run-time statistics + its process)"
                .into(),
            value,
            baseline: format!("empty classifier {:.2} %", floor * 100.0),
            ratio: "-".into(),
            target: format!(
                "<= {:.0} % (the rate target, from CPU time)",
                at_most * 100.0
            ),
            met: Some((max <= at_most).into()),
        });
    }
    Ok(())
}

fn cpu_rows(r: &Value, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    if r.pointer("/traffic/cpu").is_none() {
        return Ok(());
    }
    let p = num(r, "/traffic/cpu/cpu_percent_of_one_core")?;
    let target_rate = num(r, "/traffic/cpu/target_rate")?;
    let achieved = num(r, "/traffic/cpu/achieved_rate")?;
    let clean = r.pointer("/traffic/cpu/all_answered_nothing_lost") == Some(&Value::Bool(true));
    rows.push(Row {
        section: "CPU",
        figure: format!(
            "netrace's own CPU, paced {} connections (achieved {})",
            rate(target_rate),
            rate(achieved)
        ),
        value: format!("{p:.2} % of one core"),
        baseline: format!(
            "idle {:.2} %; {} of {} answered, {} lost, {} dropped",
            num(r, "/traffic/cpu/idle_cpu_percent_of_one_core").unwrap_or(f64::NAN),
            num(r, "/traffic/cpu/answered")?,
            num(r, "/traffic/cpu/connections")?,
            num(r, "/traffic/cpu/lost")?,
            num(r, "/traffic/cpu/dropped")?
        ),
        ratio: "-".into(),
        target: format!("<= {:.0} %, nothing lost", target::CPU_PERCENT),
        met: Some((p <= target::CPU_PERCENT && clean).into()),
    });
    Ok(())
}

fn scale_rows(r: &Value, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    const S: &str = "scale";
    let levels = arr(r, "/scale")?;
    for l in levels {
        let n = num(l, "/pending")?;
        let maps = num(l, "/maps_bytes")?;
        let rss = num(l, "/rss_bytes")?;
        let total = num(l, "/total_bytes")?;
        let empty = num(l, "/total_empty_bytes")?;
        let million = n >= 1e6;
        rows.push(Row {
            section: S,
            figure: format!("{} pending SYNs: memory (all maps + RSS)", count(n)),
            value: format!("{} + {} = {}", mib(maps), mib(rss), mib(total)),
            baseline: format!("0 pending {}", mib(empty)),
            ratio: times(total / empty),
            target: if million {
                format!("<= {}", mib(target::MILLION_BYTES))
            } else {
                String::new()
            },
            met: million.then_some((total <= target::MILLION_BYTES).into()),
        });
        let find = num(l, "/find_s")?;
        let finder = l.get("finder").and_then(Value::as_str).unwrap_or("?");
        rows.push(Row {
            section: S,
            figure: format!(
                "{} pending SYNs, all due: find the expired ones ({finder})",
                count(n)
            ),
            value: format!("{:.1} ms", find * 1e3),
            baseline: format!("whole-map batched walk {:.1} ms", num(l, "/walk_s")? * 1e3),
            ratio: times(find / num(l, "/walk_s")?),
            target: if million {
                format!("<= {:.0} ms", target::FIND_EXPIRED_MILLION_S * 1e3)
            } else {
                String::new()
            },
            met: million.then_some((find <= target::FIND_EXPIRED_MILLION_S).into()),
        });
        rows.push(Row {
            section: S,
            figure: format!("{} pending SYNs, none due: one sweep", count(n)),
            value: format!("{:.1} ms", num(l, "/quiet_sweep_s")? * 1e3),
            baseline: "-".into(),
            ratio: "-".into(),
            target: String::new(),
            met: None,
        });
        let sweep = num(l, "/sweep_s")?;
        rows.push(Row {
            section: S,
            figure: format!(
                "{} pending SYNs: decide them all lost (take + put back each)",
                count(n)
            ),
            value: format!("{:.1} ms", sweep * 1e3),
            baseline: format!("{:.0} ns/entry", num(l, "/sweep_ns_per_entry")?),
            ratio: "-".into(),
            target: String::new(),
            met: None,
        });
        if million && l.pointer("/layouts/old").is_some() {
            let old = num(l, "/layouts/old/memlock_bytes")?;
            let new = num(l, "/layouts/new/memlock_bytes")?;
            rows.push(Row {
                section: S,
                figure: format!(
                    "{} entries, hash map layout: compact (12 B key, preallocated) vs old (40 B key, not)",
                    count(n)
                ),
                value: format!(
                    "{} (walk {:.1} ms)",
                    mib(new),
                    num(l, "/layouts/new/walk_s")? * 1e3
                ),
                baseline: format!(
                    "old {} (walk {:.1} ms)",
                    mib(old),
                    num(l, "/layouts/old/walk_s")? * 1e3
                ),
                ratio: times(new / old),
                target: String::new(),
                met: None,
            });
        }
    }
    Ok(())
}

fn loss_rows(r: &Value, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    const S: &str = "no silent loss";
    let ring = num(r, "/loss/burst/ring_bytes")?;
    let record = num(r, "/loss/burst/record_bytes")?;
    let cap = num(r, "/loss/burst/capacity")?;
    rows.push(Row {
        section: S,
        figure: format!(
            "per-connection events: burst of connections into a {:.0} KiB ring, undrained",
            ring / 1024.0
        ),
        value: format!("{cap:.0} fit, drops from {:.0}", cap + 1.0),
        baseline: format!("{ring:.0} B / {record:.0} B per record, 2 per connection"),
        ratio: times(cap / (ring / record / 2.0).floor()),
        target: String::new(),
        met: None,
    });
    let clean = r
        .pointer("/loss/max_clean_rate_small_ring")
        .and_then(Value::as_f64);
    let dropping = r
        .pointer("/loss/first_dropping_rate_small_ring")
        .and_then(Value::as_f64);
    let books_rate = num(r, "/loss/books_small_ring_at_max_rate/achieved_rate")?;
    let books_events = num(
        r,
        "/loss/books_small_ring_at_max_rate/tally/events_received",
    )?;
    let books_clean = r.pointer("/loss/books_small_ring_clean") == Some(&Value::Bool(true));
    rows.push(Row {
        section: S,
        figure: "connection rate without drops, 4 KiB ring, drained as netrace does".into(),
        value: match (clean, dropping) {
            (Some(c), Some(d)) if d < c => format!(
                "events mode {} (a late wake-up also dropped some at {})",
                rate(c),
                rate(d)
            ),
            (Some(c), Some(d)) => format!("events mode {} (drops from {})", rate(c), rate(d)),
            (Some(c), None) => format!("events mode >= {} (generator's max)", rate(c)),
            (None, Some(d)) => format!("events mode: drops already at {}", rate(d)),
            (None, None) => "-".into(),
        },
        baseline: format!(
            "books mode: {} at {} ({books_events:.0} events)",
            if books_clean { "no drops" } else { "drops" },
            rate(books_rate)
        ),
        ratio: "-".into(),
        target: String::new(),
        met: None,
    });
    let all = r.pointer("/loss/all_accounted") == Some(&Value::Bool(true));
    let runs = num(r, "/loss/runs")?;
    let mut dropped = 0.0;
    let mut map_full = 0.0;
    let mut tallies: Vec<&Value> = arr(r, "/loss/paced_small_ring")?
        .iter()
        .chain(arr(r, "/loss/burst/above")?)
        .chain(arr(r, "/loss/overflows")?)
        .collect();
    tallies.push(&r["loss"]["books_small_ring_at_max_rate"]);
    tallies.push(&r["loss"]["default_ring_at_max_rate"]);
    for v in tallies {
        dropped += v
            .pointer("/tally/ringbuf_full")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        map_full += v
            .pointer("/tally/pending_map_full")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
    }
    rows.push(Row {
        section: S,
        figure: "booked + answered events + ringbuf_full + pending + map_full == new SYNs \
                 (books); events + ringbuf_full == sent (events)"
            .into(),
        value: format!(
            "{} of {runs:.0} runs ({} ring drops, {} map-full, all counted)",
            if all { "all" } else { "NOT all" },
            count(dropped),
            count(map_full)
        ),
        baseline: "-".into(),
        ratio: "-".into(),
        target: "nothing silent".into(),
        met: Some(all.into()),
    });
    Ok(())
}

const HEADERS: [&str; 7] = [
    "section", "figure", "measured", "baseline", "ratio", "target", "result",
];

fn cells(r: &Row) -> [&str; 7] {
    [
        r.section,
        &r.figure,
        &r.value,
        &r.baseline,
        &r.ratio,
        &r.target,
        r.result(),
    ]
}

/// A plain-text table for the terminal.
pub fn terminal_table(rows: &[Row]) -> String {
    let mut widths = HEADERS.map(str::len);
    for r in rows {
        for (w, c) in widths.iter_mut().zip(cells(r)) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |c: [&str; 7]| {
        let mut s = String::new();
        for (i, (cell, w)) in c.iter().zip(widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            let _ = write!(s, "{cell:<w$}");
        }
        s.trim_end().to_string()
    };
    let mut out = line(HEADERS);
    out.push('\n');
    out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1)));
    out.push('\n');
    for r in rows {
        out.push_str(&line(cells(r)));
        out.push('\n');
    }
    out
}

/// The same table in Markdown.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut out = format!("| {} |\n", HEADERS.join(" | "));
    out.push_str(&format!("|{}\n", "---|".repeat(HEADERS.len())));
    for r in rows {
        let c = cells(r).map(|c| {
            let c = c.replace('|', "\\|");
            if c == "MISSED" {
                "**MISSED**".to_string()
            } else {
                c
            }
        });
        out.push_str(&format!("| {} |\n", c.join(" | ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(count(10_000.0), "10 k");
        assert_eq!(count(1_000_000.0), "1 M");
        assert_eq!(count(1234.0), "1234");
        assert_eq!(rate(12_345.0), "12.3 k/s");
        assert_eq!(mib(128.0 * 1024.0 * 1024.0), "128.0 MiB");
        let rows = vec![Row {
            section: "s",
            figure: "a|b".into(),
            value: "1".into(),
            baseline: "2".into(),
            ratio: "0.50x".into(),
            target: "t".into(),
            met: Some(Outcome::Missed),
        }];
        assert!(markdown_table(&rows).contains("| s | a\\|b | 1 | 2 | 0.50x | t | **MISSED** |"));
        assert!(terminal_table(&rows).lines().count() == 3);
    }

    /// The interval's order statistics match the binomial tables (n = 6: the extremes,
    /// 96.9 %; n = 9: the 2nd and 8th, 96.1 %; n = 20: the 6th and 15th, 95.9 %).
    #[test]
    fn median_interval_order_statistics() {
        let d = |n: usize| (1..=n).map(|i| i as f64).collect::<Vec<_>>();
        assert_eq!(median_interval(&d(5)), None);
        assert_eq!(median_interval(&d(6)), Some((1.0, 6.0)));
        assert_eq!(median_interval(&d(9)), Some((2.0, 8.0)));
        assert_eq!(median_interval(&d(20)), Some((6.0, 15.0)));
    }

    #[test]
    fn points_are_judged_by_their_interval() {
        let rounds = |v: &[f64]| v.iter().map(|x| x / 100.0).collect::<Vec<_>>();
        let (_, o) = judge_points(
            &rounds(&[-0.5, -0.2, 0.0, 0.1, 0.3, 0.4, 0.6, 0.8, 1.0]),
            -0.01,
        );
        assert_eq!(o, Outcome::Met);
        let (_, o) = judge_points(
            &rounds(&[-9.0, -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.5]),
            -0.01,
        );
        assert_eq!(o, Outcome::Missed);
        let (v, o) = judge_points(
            &rounds(&[-12.5, -9.4, -5.1, -3.2, -3.0, -1.8, -0.3, 7.5, 10.9]),
            -0.01,
        );
        assert_eq!(o, Outcome::Unresolved);
        assert_eq!(v, "-3.0 points (95 % interval -9.4 … +7.5)");
        assert_eq!(judge_points(&[0.1], 0.05).1, Outcome::Unresolved);
    }
}
