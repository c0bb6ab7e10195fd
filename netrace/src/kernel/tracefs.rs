//! The tracefs side of the `sock:inet_sock_set_state` tracepoint: where tracefs is, mounting
//! it privately when it is not (as inside `ip netns exec`, which remounts /sys), and the
//! field offsets of the running kernel, read from the event's `format` file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use netrace_common::TpOffsets;

pub const CATEGORY: &str = "sock";
pub const EVENT: &str = "inet_sock_set_state";
const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

fn has_event(root: &Path) -> bool {
    root.join("events")
        .join(CATEGORY)
        .join(EVENT)
        .join("format")
        .exists()
}

/// Finds tracefs; if it is not mounted, mounts it at /sys/kernel/tracing privately
/// (see `mounts`).
pub fn ensure() -> anyhow::Result<PathBuf> {
    if let Some(found) = CANDIDATES.iter().map(Path::new).find(|p| has_event(p)) {
        return Ok(found.to_path_buf());
    }
    let probe = format!("events/{CATEGORY}/{EVENT}/format");
    crate::kernel::mounts::ensure("tracefs", CANDIDATES[0], &probe)?;
    Ok(PathBuf::from(CANDIDATES[0]))
}

/// Parses the event's `format` file into field offsets.
pub fn parse_format(text: &str) -> anyhow::Result<TpOffsets> {
    let mut o = TpOffsets::default();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = "";
        let mut offset = None;
        for part in rest.split(';') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.trim().parse::<u16>().ok();
            } else if !part.contains(':') && !part.is_empty() {
                decl = part;
            }
        }
        let name = decl
            .split_whitespace()
            .last()
            .unwrap_or("")
            .split('[')
            .next()
            .unwrap_or("");
        let Some(off) = offset else { continue };
        match name {
            "skaddr" => o.skaddr = off,
            "oldstate" => o.oldstate = off,
            "newstate" => o.newstate = off,
            "sport" => o.sport = off,
            "dport" => o.dport = off,
            "family" => o.family = off,
            "protocol" => o.protocol = off,
            "saddr" => o.saddr = off,
            "daddr" => o.daddr = off,
            "saddr_v6" => o.saddr_v6 = off,
            "daddr_v6" => o.daddr_v6 = off,
            _ => {}
        }
    }
    let missing: Vec<&str> = [
        ("skaddr", o.skaddr),
        ("oldstate", o.oldstate),
        ("newstate", o.newstate),
        ("sport", o.sport),
        ("dport", o.dport),
        ("family", o.family),
        ("protocol", o.protocol),
        ("saddr", o.saddr),
        ("daddr", o.daddr),
        ("saddr_v6", o.saddr_v6),
        ("daddr_v6", o.daddr_v6),
    ]
    .iter()
    .filter(|(_, v)| *v == 0)
    .map(|(n, _)| *n)
    .collect();
    if !missing.is_empty() {
        bail!("{CATEGORY}:{EVENT} has no field(s) {}", missing.join(", "));
    }
    Ok(o)
}

/// Reads the running kernel's offsets.
pub fn offsets(root: &Path) -> anyhow::Result<TpOffsets> {
    let path = root
        .join("events")
        .join(CATEGORY)
        .join(EVENT)
        .join("format");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_format(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "name: inet_sock_set_state
ID: 2287
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:const void * skaddr;	offset:8;	size:8;	signed:0;
	field:int oldstate;	offset:16;	size:4;	signed:1;
	field:int newstate;	offset:20;	size:4;	signed:1;
	field:__u16 sport;	offset:24;	size:2;	signed:0;
	field:__u16 dport;	offset:26;	size:2;	signed:0;
	field:__u16 family;	offset:28;	size:2;	signed:0;
	field:__u16 protocol;	offset:30;	size:2;	signed:0;
	field:__u8 saddr[4];	offset:32;	size:4;	signed:0;
	field:__u8 daddr[4];	offset:36;	size:4;	signed:0;
	field:__u8 saddr_v6[16];	offset:40;	size:16;	signed:0;
	field:__u8 daddr_v6[16];	offset:56;	size:16;	signed:0;
";

    #[test]
    fn parses_a_format_file() {
        let o = parse_format(SAMPLE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((o.skaddr, o.oldstate, o.newstate), (8, 16, 20));
        assert_eq!((o.sport, o.dport, o.family, o.protocol), (24, 26, 28, 30));
        assert_eq!((o.saddr, o.daddr, o.saddr_v6, o.daddr_v6), (32, 36, 40, 56));
    }

    #[test]
    fn missing_fields_are_named() {
        let cut: String = SAMPLE
            .lines()
            .filter(|l| !l.contains("dport"))
            .collect::<Vec<_>>()
            .join("\n");
        let e = parse_format(&cut)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("dport"), "{e}");
    }

    /// The offsets come from the running kernel, not from a table: find tracefs or mount it
    /// as netrace does (`ensure`), then read them. As root this must work; without root
    /// tracefs may be unmountable or unreadable, which says nothing about netrace: the test
    /// then says on the terminal that it skipped, and why (never a silent pass).
    #[test]
    fn reads_the_running_kernels_format_file() {
        let root = match ensure() {
            Ok(root) => root,
            // SAFETY: geteuid has no preconditions and cannot fail.
            Err(e) if unsafe { libc::geteuid() } != 0 => {
                use std::io::Write as _;
                // Straight to the terminal: libtest captures only print!/eprint! output.
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED {}::reads_the_running_kernels_format_file: not root, and \
                     tracefs is neither mounted nor mountable here ({e:#})",
                    module_path!()
                );
                return;
            }
            Err(e) => panic!("as root, tracefs is neither mounted nor mountable: {e:#}"),
        };
        assert!(
            has_event(&root),
            "{} has no {CATEGORY}:{EVENT}",
            root.display()
        );
        let o = offsets(&root).unwrap_or_else(|e| panic!("{e}"));
        assert!(o.newstate > o.oldstate && o.skaddr >= 8, "{o:?}");
        assert!(
            o.sport > o.newstate && o.daddr_v6 > o.saddr_v6,
            "field order of the running kernel's format: {o:?}"
        );
    }
}
