//! `netrace probe --output json`: one line per probe, then the summary (docs/probe.md).

use serde::Serialize;

use crate::probe::{
    infer::{Inference, Phase},
    net::Record,
    summary::Summary,
};

/// One probe line of the JSON output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeLine<'a> {
    #[serde(rename = "type")]
    pub type_tag: &'static str,
    pub phase: Phase,
    #[serde(flatten)]
    pub record: &'a Record,
}

/// The JSON lines: one per probe (primary protocol first, then UDP), then the summary.
pub fn json_lines(
    summary: &Summary,
    inf: &Inference,
    records: &[Record],
    udp: &[Record],
) -> serde_json::Result<Vec<String>> {
    let mut lines = Vec::new();
    for (p, r) in inf.probes.iter().zip(records) {
        lines.push(serde_json::to_string(&ProbeLine {
            type_tag: "probe",
            phase: p.phase,
            record: r,
        })?);
    }
    for r in udp {
        lines.push(serde_json::to_string(&ProbeLine {
            type_tag: "probe",
            phase: Phase::Sample,
            record: r,
        })?);
    }
    lines.push(serde_json::to_string(summary)?);
    Ok(lines)
}
