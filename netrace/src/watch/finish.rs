//! The end of a run: judge what the pump collected (NAT mode, verdict, fix), build the
//! [`Report`], write it (text or JSON, and the SVG), and choose the exit status.

use std::io::{self, Write as _};

use anyhow::Context as _;
use netrace_common::Counter;

use super::{
    pump::{End, Pump, TOP_DESTINATIONS},
    setup::Kernel,
};
use crate::{
    error::exit,
    judge::{
        icmp,
        translation::TranslationSigns,
        verdict::{self, VerdictKind},
    },
    node::NodePorts,
    options::OutputFormat,
    render,
    report::{Drops, PodLoss, Report},
    track::{natmode, tracker::OutcomeKind},
};

/// Judges what the run collected and builds the report.
pub fn report(pump: &mut Pump, kernel: &Kernel, node: NodePorts, pending_at_exit: u64) -> Report {
    let drops = Drops {
        events_lost: kernel.counter(Counter::RingbufFull),
        pending_map_full: kernel.counter(Counter::PendingMapFull),
        table_busy: kernel.counter(Counter::TableBusy),
        decode_errors: pump.decode_errors,
        answered_invisible: 0,
    };
    let mut drops = drops;
    if drops.events_lost > 0 && drops.pending_map_full == 0 {
        // Every SYN is tallied by port in the kernel. A port with SYNs that netrace never
        // heard of is an attempt whose every event was dropped; its kernel entry is gone, and
        // only an answer removes one (a full pending map would leave SYNs untracked, hence
        // the condition). Counted as answered, so the loss rate is not inflated.
        for (port, syns) in kernel.syn_ports() {
            if syns > 0 && !pump.knew(port) {
                pump.histogram.add(port, OutcomeKind::Answered);
                drops.answered_invisible += 1;
            }
        }
    }
    if drops.events_lost > 0 {
        // Answers the kernel matched but netrace could not place by port: their SYN and
        // answer events were both dropped. Said, so the loss rates are read knowing it.
        let matched = kernel.counter(Counter::SynAckMatched) + kernel.counter(Counter::RstMatched);
        let t = pump.histogram.totals;
        let placed = t.answered + t.refused + t.late;
        if matched > placed {
            pump.notes.push(format!(
                "the kernel matched {matched} SYN-ACKs and RSTs, {} more than netrace could \
                 place by source port (both of their events were dropped): the loss rates by \
                 port leave those answered connections out",
                matched - placed
            ));
        }
    }
    if pending_at_exit > 0 {
        pump.notes.push(format!(
            "{pending_at_exit} connections were still waiting for an answer (younger than \
             --syn-timeout {} ms) when netrace stopped; they are not counted",
            pump.cfg.syn_timeout.as_millis()
        ));
    }
    if let Some(c) = pump.correlator.as_ref() {
        log::debug!("correlator sizes {:?}", c.sizes());
    }
    let nat = pump
        .correlator
        .as_ref()
        .filter(|_| !pump.cfg.pod_ifaces.is_empty())
        .map(|c| natmode::detect(c.pairs()));
    // SYNs seen before a translation (or not at all): the ports are not the firewall's, so the
    // range is not judged.
    let translation = TranslationSigns::new(pump.hook, &pump.tracker.stats);
    let totals = pump.histogram.totals;
    let (mut verdict, fix) = if translation.out_of_sight(totals.attempts) {
        (
            translation.verdict(
                &pump.cfg.ifaces,
                pump.cfg.allowed,
                totals.attempts,
                totals.lost,
            ),
            translation.fix(),
        )
    } else {
        let verdict = verdict::decide(&pump.histogram, &pump.destinations, &node, nat.as_ref());
        let fix = verdict::fix(&verdict, &node, nat.as_ref());
        (verdict, fix)
    };
    if !pump.icmp.is_empty() {
        let counts: Vec<((bool, u8, u8), u64)> = pump.icmp.iter().map(|(k, n)| (*k, *n)).collect();
        verdict.details.push(format!(
            "unreachable, by ICMP error: {}",
            icmp::summary(&counts)
        ));
    }
    pump.judged(&verdict);
    let lost_by_pod = pump.correlator.as_ref().map(|_| PodLoss::group(&pump.lost));
    Report {
        interfaces: pump.cfg.ifaces.clone(),
        duration_s: pump.started.elapsed().as_secs_f64(),
        syn_timeout_ms: pump.cfg.syn_timeout.as_millis() as u64,
        histogram: pump.histogram.clone(),
        by_destination: pump.destinations.top(TOP_DESTINATIONS),
        tracker: pump.tracker.stats,
        verdict,
        fix,
        node,
        drops,
        counters: kernel.counters(),
        syn_packets_by_port: kernel.syn_ports(),
        pending_at_exit,
        lost: std::mem::take(&mut pump.lost),
        lost_not_listed: pump.lost_not_listed,
        notes: std::mem::take(&mut pump.notes),
        nat,
        lost_by_pod,
        egress_hook: pump.hook,
        egress_hook_reason: pump.hook_reason.clone(),
        translation,
    }
}

/// Writes the report (and the SVG) and returns the exit status. A closed standard output
/// ends quietly.
pub fn write(pump: &Pump, report: &Report, end: End) -> anyhow::Result<u8> {
    let cfg = &pump.cfg;
    if let Some(path) = &cfg.svg {
        crate::files::write_new(path, render::svg::render(report).as_bytes())
            .with_context(|| format!("writing --svg {}", path.display()))?;
    }
    let written = {
        let stdout = io::stdout();
        let mut out = stdout.lock();
        let r = match cfg.output {
            OutputFormat::Json => serde_json::to_writer(&mut out, &report.to_json())
                .map_err(io::Error::other)
                .and_then(|()| writeln!(out)),
            OutputFormat::Text => render::text::write(&mut out, report, cfg.list_lost),
        };
        r.and_then(|()| out.flush())
    };
    if written.is_err() {
        return Ok(exit::CLEAN);
    }
    if end == End::InterfacesGone {
        eprintln!(
            "netrace: every watched interface went away; the report above covers the time before"
        );
        return Ok(exit::ERROR);
    }
    Ok(
        if report.verdict.kind == VerdictKind::TranslationOutOfSight {
            exit::OUT_OF_SIGHT
        } else if report.totals().lost > 0 {
            exit::LOSS
        } else {
            exit::CLEAN
        },
    )
}
