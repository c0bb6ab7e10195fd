//! The terminal report: histogram, verdict, fix, drops.

use std::io::{self, Write};

use crate::report::{Drops, Report};

const BAR_WIDTH: usize = 30;

pub fn write(w: &mut impl Write, r: &Report, list_lost: bool) -> io::Result<()> {
    let t = r.totals();
    let allowed = r.histogram.allowed;
    writeln!(
        w,
        "netrace: {} connection attempts on {} in {:.1} s; SYN-ACKs allowed back to ports {allowed}",
        t.attempts,
        r.interfaces.join(", "),
        r.duration_s
    )?;
    writeln!(
        w,
        "         {} answered, {} lost, {} refused, {} unreachable, {} late, {} still waiting at exit",
        t.answered, t.lost, t.refused, t.unreachable, t.late, r.pending_at_exit
    )?;
    writeln!(w, "         {}", r.egress_hook_reason)?;
    let v = &r.verdict;
    if v.contradicted {
        writeln!(
            w,
            "         the evidence says SYN-ACKs come back to ports {}, not {allowed} (see the verdict)",
            v.allowed
        )?;
    }
    writeln!(w)?;
    writeln!(
        w,
        "{:<13} {:>8} {:>8} {:>7} {:>7}  loss",
        "source ports", "attempts", "answered", "lost", "loss %"
    )?;
    for b in r.buckets() {
        let c = b.counts;
        let pct = c
            .loss_pct()
            .map_or_else(|| "-".to_string(), |p| format!("{p:.1}%"));
        let filled = c
            .loss_pct()
            .map_or(0, |p| (p / 100.0 * BAR_WIDTH as f64).round() as usize);
        let bar: String = "#".repeat(filled) + &".".repeat(BAR_WIDTH - filled.min(BAR_WIDTH));
        let side = if b.in_allowed_range {
            "allowed"
        } else {
            "outside"
        };
        writeln!(
            w,
            "{:<13} {:>8} {:>8} {:>7} {:>7}  {bar} {side}",
            format!("{}-{}", b.start, b.end),
            c.attempts,
            c.answered,
            c.lost,
            pct
        )?;
    }
    writeln!(w)?;
    if let Some(l) = v.learned.lower {
        writeln!(
            w,
            "learned lower edge: between port {} (lost) and port {} (answered){}",
            l.last_lost,
            l.first_answered,
            if v.allowed.start == l.estimate && v.contradicted {
                format!("; the fix uses {}", l.estimate)
            } else {
                String::new()
            }
        )?;
    }
    if let Some(u) = v.learned.upper {
        writeln!(
            w,
            "learned upper edge: between port {} (answered) and port {} (lost){}",
            u.last_answered,
            u.first_lost,
            if v.allowed.end == u.estimate && v.contradicted {
                format!("; the fix uses {}", u.estimate)
            } else {
                String::new()
            }
        )?;
    }
    writeln!(w, "verdict: {}", v.headline)?;
    for d in &v.details {
        writeln!(w, "  - {d}")?;
    }
    if let Some(nat) = &r.nat {
        writeln!(w, "  - NAT: {}", nat.summary)?;
    }
    if !r.by_destination.is_empty() {
        writeln!(w)?;
        writeln!(w, "by destination:")?;
        writeln!(
            w,
            "  {:<45} {:>8} {:>8} {:>7} {:>7}",
            "destination", "attempts", "answered", "lost", "loss %"
        )?;
        for row in &r.by_destination {
            let c = row.counts;
            let pct = c
                .loss_pct()
                .map_or_else(|| "-".to_string(), |p| format!("{p:.1}%"));
            writeln!(
                w,
                "  {:<45} {:>8} {:>8} {:>7} {:>7}",
                row.label(),
                c.attempts,
                c.answered,
                c.lost,
                pct
            )?;
        }
    }
    if let Some(groups) = r.lost_by_pod.as_ref().filter(|g| !g.is_empty()) {
        writeln!(w)?;
        writeln!(w, "lost connections by pod:")?;
        for g in groups {
            let who = match (g.pod.as_ref().or(g.pod_uid.as_ref()), g.pod_src) {
                (Some(uid), Some(a)) => format!("pod {uid} ({a})"),
                (Some(uid), None) => format!("pod {uid}"),
                (None, Some(a)) => format!("{a}"),
                (None, None) => "not linked to a pod".to_string(),
            };
            let procs = if g.processes.is_empty() {
                String::new()
            } else {
                format!("  {}", g.processes.join(", "))
            };
            writeln!(w, "  {:>6} lost  {who}{procs}", g.lost)?;
        }
    }
    if !r.fix.is_empty() {
        writeln!(w)?;
        writeln!(w, "fix:")?;
        for (i, f) in r.fix.iter().enumerate() {
            writeln!(w, "  {}. {f}", i + 1)?;
        }
    }
    let d = r.drops;
    writeln!(w)?;
    if d.any() {
        writeln!(
            w,
            "WARNING: netrace missed events: {} lost (ring buffer full, raise --ringbuf-kib), \
             {}, {} undecodable",
            d.events_lost,
            untracked(&d),
            d.decode_errors
        )?;
    } else {
        writeln!(w, "nothing missed: 0 events lost, 0 SYNs untracked")?;
    }
    for n in &r.notes {
        writeln!(w, "note: {n}")?;
    }
    if list_lost {
        writeln!(w)?;
        writeln!(w, "lost connections ({}):", t.lost)?;
        for l in &r.lost {
            writeln!(
                w,
                "  {} {}:{} -> {}:{}  syns={} first_seen_unix_ms={}",
                l.iface, l.src, l.src_port, l.dst, l.dst_port, l.syns, l.first_seen_unix_ms
            )?;
        }
        if r.lost_not_listed > 0 {
            writeln!(
                w,
                "  ... and {} more (use --output json for all)",
                r.lost_not_listed
            )?;
        }
    }
    Ok(())
}

/// The untracked SYNs and what to do: a bigger map helps only those that found it full.
fn untracked(d: &Drops) -> String {
    let (all, busy) = (d.pending_map_full, d.table_busy.min(d.pending_map_full));
    let full = all - busy;
    match (full, busy) {
        (_, 0) => format!("{all} SYNs untracked (pending map full, raise --max-pending)"),
        (0, _) => format!(
            "{all} SYNs untracked (their pending-table bucket stayed locked: its holder was held \
             up, not a full map)"
        ),
        _ => format!(
            "{all} SYNs untracked ({full} with the pending map full, raise --max-pending; {busy} \
             with their bucket held up)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drops(full: u64, busy: u64) -> Drops {
        Drops {
            pending_map_full: full,
            table_busy: busy,
            ..Drops::default()
        }
    }

    /// "Raise --max-pending" only where SYNs found the map full.
    #[test]
    fn untracked_syns_get_the_fix_for_their_cause() {
        assert!(untracked(&drops(5, 0)).contains("raise --max-pending"));
        let busy = untracked(&drops(2, 2));
        assert!(
            !busy.contains("--max-pending") && busy.contains("held up"),
            "{busy}"
        );
        let both = untracked(&drops(5, 2));
        assert!(both.contains("3 with the pending map full") && both.contains("2 with"));
    }
}
