//! The end of an analysis: the verdict and fix from the same judge as `watch`, the report, what
//! the capture itself says about how it was taken (one direction only, cut packets), and the
//! exit status.

use std::io::{self, Write as _};

use anyhow::Context as _;
use netrace_common::Counter;

use super::{config::AnalyzeConfig, replay::Replay};
use crate::{
    capture::Capture,
    error::exit,
    judge::{translation::TranslationSigns, verdict},
    kernel::egress_hook::Hook,
    kernel::loader::COUNTERS,
    node::NodePorts,
    options::OutputFormat,
    render,
    report::{Drops, PodLoss, Report},
    track::natmode,
};

/// What the capture says about how it was taken, as notes for the report.
fn notes(replay: &Replay, captures: &[&Capture], pending_at_exit: u64) -> Vec<String> {
    let f = &replay.facts;
    let mut notes = Vec::new();
    let syns = replay.counter(Counter::SynSeen);
    if f.packets == 0 {
        notes.push("the capture holds no packets".into());
    } else if syns == 0 && f.pod_side_syns == 0 {
        notes.push(format!(
            "no outbound SYNs in {} packets: was the capture filtered, or taken on the \
             answering side only?",
            f.packets
        ));
    } else if f.answers == 0 {
        notes.push(
            "no SYN-ACKs at all: was this captured on one direction only (tcpdump -Q out, a \
             one-way mirror port)? Every connection is reported lost"
                .into(),
        );
    }
    let truncated = replay.counter(Counter::Truncated);
    if truncated > 0 {
        let snaplens: Vec<String> = captures
            .iter()
            .flat_map(|c| c.interfaces().iter().map(|i| i.snaplen))
            .filter(|s| *s != 0)
            .map(|s| s.to_string())
            .collect();
        notes.push(format!(
            "{truncated} packets were cut short inside their headers (snap length {}); \
             capture with -s 0 to see them",
            if snaplens.is_empty() {
                "unknown".to_string()
            } else {
                snaplens.join(", ")
            }
        ));
    }
    if f.linked > 0 {
        notes.push(format!(
            "{} connections were seen both before and after SNAT (same ISN and destination); \
             each is counted once, with the port the uplink saw",
            f.linked
        ));
    }
    if f.out_of_order > 0 {
        notes.push(format!(
            "{} packets had timestamps earlier than a packet before them (taken as the latest \
             time seen)",
            f.out_of_order
        ));
    }
    if pending_at_exit > 0 {
        notes.push(format!(
            "{pending_at_exit} connections were still waiting for an answer at the end of the \
             capture (younger than --syn-timeout); they are not counted: keep capturing at \
             least --syn-timeout after the connections of interest"
        ));
    }
    notes
}

/// Ends the replay and judges: the report `watch` would write. Errors only when standard
/// output closed.
pub fn report(
    cfg: &AnalyzeConfig,
    replay: &mut Replay,
    captures: &[Capture],
) -> io::Result<Report> {
    let pending_at_exit = replay.finish()?;
    let refs: Vec<&Capture> = captures.iter().collect();
    let notes = notes(replay, &refs, pending_at_exit);
    for n in &notes {
        if n.starts_with("no ") {
            eprintln!("netrace: {n}");
        }
    }
    let node = NodePorts::default();
    let linked = replay.facts.linked > 0;
    let nat = linked.then(|| natmode::detect(replay.correlator.pairs()));
    // The same judge as watch's: SYNs seen before a translation (answers back to another
    // tuple, SYN-ACKs for SYNs never seen) make the ports not the firewall's.
    let translation = TranslationSigns::new(Hook::Tc, replay.tracker_stats());
    let totals = replay.histogram.totals;
    let (verdict, fix) = if translation.out_of_sight(totals.attempts) {
        (
            translation.verdict(&replay.names, cfg.allowed, totals.attempts, totals.lost),
            translation.fix(),
        )
    } else {
        let verdict = verdict::decide(&replay.histogram, &replay.destinations, &node, nat.as_ref());
        let fix = verdict::fix(&verdict, &node, nat.as_ref());
        (verdict, fix)
    };
    let lost_by_pod = linked.then(|| PodLoss::group(&replay.lost));
    let mut interfaces: Vec<String> = replay
        .names
        .iter()
        .zip(&replay.syns_by_iface)
        .filter(|(_, n)| **n > 0)
        .map(|(name, _)| name.clone())
        .collect();
    if interfaces.is_empty() {
        interfaces = replay.names.clone();
    }
    let f = replay.facts;
    Ok(Report {
        interfaces,
        duration_s: f.last_ns.saturating_sub(f.first_ns.unwrap_or(f.last_ns)) as f64 / 1e9,
        syn_timeout_ms: cfg.syn_timeout.as_millis() as u64,
        histogram: replay.histogram.clone(),
        by_destination: replay.destinations.top(10),
        tracker: *replay.tracker_stats(),
        verdict,
        fix,
        node,
        drops: Drops { ..Drops::default() },
        counters: COUNTERS
            .iter()
            .map(|(c, name)| (*name, replay.counter(*c)))
            .collect(),
        syn_packets_by_port: replay.syn_ports(),
        pending_at_exit,
        lost: std::mem::take(&mut replay.lost),
        lost_not_listed: replay.lost_not_listed,
        notes,
        nat,
        lost_by_pod,
        egress_hook: Hook::Tc,
        egress_hook_reason: "a packet capture: SYNs and answers as the capture saw them".into(),
        translation,
    })
}

/// Writes the report (and the SVG); returns the exit status.
pub fn write(cfg: &AnalyzeConfig, replay: &mut Replay, report: &Report) -> anyhow::Result<u8> {
    if let Some(path) = &cfg.svg {
        crate::files::write_new(path, render::svg::render(report).as_bytes())
            .with_context(|| format!("writing --svg {}", path.display()))?;
    }
    let f = replay.facts;
    let written = {
        let out = replay.out();
        let r = match cfg.output {
            OutputFormat::Json => {
                let mut summary = report.to_json();
                if let Some(obj) = summary.as_object_mut() {
                    obj.insert(
                        "capture".into(),
                        serde_json::json!({
                            "files": cfg.files,
                            "packets": f.packets,
                            "first_unix_ns": f.first_ns,
                            "last_unix_ns": f.last_ns,
                            "answers": f.answers,
                            "synacks": f.synacks,
                            "pod_side_syns": f.pod_side_syns,
                            "linked": f.linked,
                        }),
                    );
                }
                serde_json::to_writer(&mut *out, &summary)
                    .map_err(io::Error::other)
                    .and_then(|()| writeln!(out))
            }
            OutputFormat::Text => render::text::write(out, report, cfg.list_lost),
        };
        r.and_then(|()| out.flush())
    };
    if written.is_err() {
        return Ok(exit::CLEAN);
    }
    Ok(if report.totals().lost > 0 {
        exit::LOSS
    } else {
        exit::CLEAN
    })
}
