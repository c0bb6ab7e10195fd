//! `netrace probe`'s terminal report: the table, the inferred range, UDP, this host, the fix
//! and the notes. Computes nothing.

use std::io::{self, Write};

use crate::probe::summary::Summary;

/// The terminal report.
pub fn write_text(w: &mut impl Write, s: &Summary) -> io::Result<()> {
    let st = &s.setup;
    let from = st
        .local_addr
        .map_or(String::new(), |l| format!(" from {l}"));
    let protos = if st.compare_udp {
        "TCP (and UDP to compare)".to_string()
    } else {
        st.primary.name().to_uppercase()
    };
    let resolved = if st.target == st.address.to_string() {
        String::new()
    } else {
        format!(" ({})", st.address)
    };
    writeln!(
        w,
        "netrace probe: {}{resolved} over {protos}{from}: source ports {}, {} samples + {} \
         bisection probes, timeout {} ms, at most {}/s",
        st.target,
        st.ports,
        s.inference.sample_probes,
        s.inference.extra_probes,
        st.timeout_ms,
        st.rate
    )?;
    writeln!(w)?;
    writeln!(
        w,
        "{:<13} {:>6} {:>8} {:>7} {:>7} {:>7} {:>7}  result",
        "source ports", "probes", "answered", "refused", "unreach", "timeout", "skipped"
    )?;
    for b in &s.buckets {
        let t = b.tally;
        writeln!(
            w,
            "{:<13} {:>6} {:>8} {:>7} {:>7} {:>7} {:>7}  {}",
            format!("{}-{}", b.start, b.end),
            t.probes,
            t.answered,
            t.refused,
            t.unreachable,
            t.timeout,
            t.skipped,
            b.result
        )?;
    }
    writeln!(w)?;
    writeln!(w, "{}", s.inference.headline)?;
    for d in &s.inference.details {
        writeln!(w, "  - {d}")?;
    }
    if let Some(u) = &s.udp {
        writeln!(w, "{}", u.text)?;
    }
    if let Some((a, b)) = s.node.ip_local_port_range {
        let fits = match (s.node.local_range_inside_allowed, s.inference.allowed) {
            (Some(true), Some(r)) => format!(": fits inside {r}"),
            (Some(false), Some(r)) => {
                let mut outside = Vec::new();
                if a < r.start {
                    outside.push(format!("{a}-{}", b.min(r.start - 1)));
                }
                if b > r.end {
                    outside.push(format!("{}-{b}", a.max(r.end + 1)));
                }
                format!(
                    ": does NOT fit inside {r}; this host's own connections that draw a port in \
                     {} will hang",
                    outside.join(" or ")
                )
            }
            _ => String::new(),
        };
        writeln!(w, "this host: net.ipv4.ip_local_port_range {a} {b}{fits}")?;
    }
    if !s.fix.is_empty() {
        writeln!(w)?;
        writeln!(w, "fix:")?;
        for (i, f) in s.fix.iter().enumerate() {
            writeln!(w, "  {}. {f}", i + 1)?;
        }
    }
    writeln!(w)?;
    for n in &s.notes {
        if n.starts_with("WARNING") {
            writeln!(w, "{n}")?;
        } else {
            writeln!(w, "note: {n}")?;
        }
    }
    Ok(())
}
