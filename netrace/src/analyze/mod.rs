//! `netrace analyze`: the report `watch` gives, from packet captures, without privileges.
//! This file only wires the parts together:
//!
//! - `config`: the checked options, and the parts they build (tracker, histogram, filter);
//! - `crate::capture`: the captures' frames, merged in time order here;
//! - `replay`: parser, pairing rules and tracker over the frames;
//! - `finish`: the verdict, the report, the notes about the capture, the exit status.

pub mod config;
mod finish;
mod replay;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

pub use self::config::AnalyzeConfig;
use self::replay::Replay;
use crate::{
    capture::{Capture, CaptureError},
    error::exit,
};

/// A capture being read, and the replay's index for each of its interfaces.
struct Source {
    capture: Capture,
    ifindex: HashMap<usize, u32>,
    label: String,
}

impl Source {
    fn ifindex(&mut self, iface: usize, replay: &mut Replay, several: bool) -> u32 {
        if let Some(i) = self.ifindex.get(&iface) {
            return *i;
        }
        let name = match self.capture.interfaces().get(iface) {
            Some(i) if i.name.is_some() && !several => i.label(iface),
            Some(i) if i.name.is_some() => format!("{}:{}", self.label, i.label(iface)),
            _ if self.capture.interfaces().len() > 1 => format!("{}:if{iface}", self.label),
            _ => self.label.clone(),
        };
        let index = replay.add_interface(name);
        self.ifindex.insert(iface, index);
        index
    }
}

/// Runs `netrace analyze`; returns the exit status.
pub fn run(cfg: AnalyzeConfig) -> anyhow::Result<u8> {
    let mut captures = Vec::new();
    for path in &cfg.files {
        let label = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        captures.push((label, Capture::open(path)?));
    }
    let mut replay = Replay::new(&cfg);
    let Some(sources) = replay_all(&mut replay, captures)? else {
        // Standard output closed (e.g. `| head`): end quietly.
        return Ok(exit::CLEAN);
    };
    let Ok(report) = finish::report(&cfg, &mut replay, &sources) else {
        return Ok(exit::CLEAN);
    };
    finish::write(&cfg, &mut replay, &report)
}

/// Feeds every frame of `captures` (label, capture) to `replay` in time order. `None` when
/// standard output closed on the way.
fn replay_all(
    replay: &mut Replay,
    captures: Vec<(String, Capture)>,
) -> Result<Option<Vec<Capture>>, CaptureError> {
    let several = captures.len() > 1;
    let mut sources: Vec<Source> = captures
        .into_iter()
        .map(|(label, capture)| Source {
            capture,
            ifindex: HashMap::new(),
            label,
        })
        .collect();
    let mut live: Vec<usize> = Vec::new();
    for (i, s) in sources.iter_mut().enumerate() {
        if s.capture.advance()? {
            live.push(i);
        }
    }
    // Merge in time order: the earliest current frame next.
    while !live.is_empty() {
        let pos = (0..live.len())
            .min_by_key(|&p| {
                sources[live[p]]
                    .capture
                    .current()
                    .map_or(u64::MAX, |f| f.ts_ns)
            })
            .unwrap_or(0);
        let s = &mut sources[live[pos]];
        let Some(iface) = s.capture.current().map(|f| f.iface) else {
            live.remove(pos);
            continue;
        };
        let ifindex = s.ifindex(iface, replay, several);
        if let Some(frame) = s.capture.current() {
            if replay.frame(&frame, ifindex).is_err() {
                return Ok(None);
            }
        }
        if !s.capture.advance()? {
            live.remove(pos);
        }
    }
    Ok(Some(sources.into_iter().map(|s| s.capture).collect()))
}
