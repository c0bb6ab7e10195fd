//! The histogram as an SVG bar chart: loss % per source-port bucket, bars coloured by whether
//! the bucket lies inside the allowed range.

use std::fmt::Write as _;

use crate::report::Report;

const W: f64 = 760.0;
const H: f64 = 380.0;
const LEFT: f64 = 60.0;
const BOTTOM: f64 = 300.0;
const TOP: f64 = 50.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn render(r: &Report) -> String {
    let buckets = r.buckets();
    let n = buckets.len().max(1) as f64;
    let slot = (W - LEFT - 20.0) / n;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="22" font-size="15" font-weight="bold">netrace: SYN-ACK loss by source port ({} attempts, {} lost)</text>"#,
        r.totals().attempts,
        r.totals().lost
    );
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="40" fill="#555">allowed return ports {}; green = inside, red = outside{}</text>"##,
        r.histogram.allowed,
        if r.verdict.contradicted {
            format!("; the evidence says {}", r.verdict.allowed)
        } else {
            String::new()
        }
    );
    for pct in [0u32, 25, 50, 75, 100] {
        let y = BOTTOM - (BOTTOM - TOP) * f64::from(pct) / 100.0;
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{pct}%</text>"##,
            W - 20.0,
            LEFT - 6.0,
            y + 4.0
        );
    }
    for (i, b) in buckets.iter().enumerate() {
        let x = LEFT + slot * i as f64 + slot * 0.15;
        let w = slot * 0.7;
        let pct = b.counts.loss_pct().unwrap_or(0.0);
        let h = (BOTTOM - TOP) * pct / 100.0;
        let colour = if b.in_allowed_range {
            "#2e8b57"
        } else {
            "#c0392b"
        };
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="{:.1}" width="{w:.1}" height="{h:.1}" fill="{colour}"><title>{}-{}: {} attempts, {} lost</title></rect>"#,
            BOTTOM - h,
            b.start,
            b.end,
            b.counts.attempts,
            b.counts.lost
        );
        let cx = x + w / 2.0;
        let _ = writeln!(
            s,
            r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            BOTTOM - h - 4.0,
            b.counts
                .loss_pct()
                .map_or_else(|| "-".into(), |p| format!("{p:.0}%"))
        );
        let _ = writeln!(
            s,
            r##"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}-{}</text><text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-size="10" fill="#555">n={}</text>"##,
            BOTTOM + 16.0,
            b.start,
            b.end,
            BOTTOM + 30.0,
            b.counts.attempts
        );
    }
    // The learned edges: a dashed line at the bucket holding the bracket, labelled with it.
    let v = &r.verdict;
    let edges = [
        v.learned.lower.map(|l| {
            (
                l.first_answered,
                format!("edge {}-{}", l.last_lost, l.first_answered),
            )
        }),
        v.learned.upper.map(|u| {
            (
                u.last_answered,
                format!("edge {}-{}", u.last_answered, u.first_lost),
            )
        }),
    ];
    for (port, label) in edges.into_iter().flatten() {
        let Some(i) = buckets.iter().position(|b| b.range().contains(port)) else {
            continue;
        };
        let b = &buckets[i];
        let within = f64::from(port - b.start) / (f64::from(b.end - b.start) + 1.0);
        let x = LEFT + slot * (i as f64 + within);
        let _ = writeln!(
            s,
            r##"<line class="learned-edge" x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{BOTTOM}" stroke="#1f4e9c" stroke-width="2" stroke-dasharray="5,3"/><text x="{:.1}" y="{:.1}" fill="#1f4e9c" font-size="10">{}</text>"##,
            x + 3.0,
            TOP + 10.0,
            esc(&label)
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" y1="{BOTTOM}" x2="{}" y2="{BOTTOM}" stroke="#333"/>"##,
        W - 20.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="{}" font-size="11">{}</text>"#,
        H - 20.0,
        esc(&r.verdict.headline.chars().take(120).collect::<String>())
    );
    s.push_str("</svg>\n");
    s
}
