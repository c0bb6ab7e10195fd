//! Figure 6, `netrace analyze` on a capture: packets per second through the reader, the parser, the
//! pairing rules and the tracker, against `tshark -r FILE -Y 'tcp.flags.syn==1'` reading the
//! same file. The capture is written here: connections from a node's uplink address to a
//! server, each a SYN, a SYN-ACK when the port is inside 32768-65535 (the seed failure), and
//! data packets, as a capture of a busy uplink holds mostly packets that are not SYNs.

use std::{
    io::{BufWriter, Write as _},
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

/// Packets per connection besides the handshake: data and acknowledgements.
const DATA_PACKETS: usize = 8;

/// Source and destination address and port.
type Flow = ([u8; 4], [u8; 4], u16, u16);

/// Ethernet, IPv4 and TCP headers (checksums left zero: no reader here checks them).
fn packet(
    (src, dst, sport, dport): Flow,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: usize,
) -> Vec<u8> {
    let mut p = Vec::with_capacity(54 + payload);
    p.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]);
    let total = (40 + payload) as u16;
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ack.to_be_bytes());
    p.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p.resize(54 + payload, 0x61);
    p
}

/// Writes a pcap of about `packets` packets; returns how many it wrote.
fn write_capture(path: &Path, packets: usize) -> anyhow::Result<u64> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut header = 0xa1b2_c3d4u32.to_le_bytes().to_vec();
    header.extend_from_slice(&2u16.to_le_bytes());
    header.extend_from_slice(&4u16.to_le_bytes());
    header.extend_from_slice(&[0; 8]);
    header.extend_from_slice(&262_144u32.to_le_bytes());
    header.extend_from_slice(&1u32.to_le_bytes());
    w.write_all(&header)?;
    let (node, server) = ([198, 18, 2, 1], [198, 18, 3, 2]);
    let mut written = 0u64;
    let mut ts_us: u64 = 1_700_000_000_000_000;
    let record = |w: &mut BufWriter<std::fs::File>,
                  written: &mut u64,
                  ts: u64,
                  p: &[u8]|
     -> anyhow::Result<()> {
        w.write_all(&((ts / 1_000_000) as u32).to_le_bytes())?;
        w.write_all(&((ts % 1_000_000) as u32).to_le_bytes())?;
        w.write_all(&(p.len() as u32).to_le_bytes())?;
        w.write_all(&(p.len() as u32).to_le_bytes())?;
        w.write_all(p)?;
        *written += 1;
        Ok(())
    };
    let mut i: u32 = 0;
    while (written as usize) < packets {
        let port = 1024 + (i.wrapping_mul(7919) % 64512) as u16;
        let isn = i.wrapping_mul(2_654_435_761);
        let syn = packet((node, server, port, 443), isn, 0, 0x02, 0);
        record(&mut w, &mut written, ts_us, &syn)?;
        if port >= 32768 {
            let sa = packet((server, node, 443, port), 77, isn.wrapping_add(1), 0x12, 0);
            record(&mut w, &mut written, ts_us + 300, &sa)?;
            for k in 0..DATA_PACKETS {
                let (s, d, sp, dp, len) = if k % 2 == 0 {
                    (node, server, port, 443, 200)
                } else {
                    (server, node, 443, port, 1200)
                };
                let p = packet((s, d, sp, dp), k as u32, 1, 0x18, len);
                record(&mut w, &mut written, ts_us + 400 + k as u64 * 50, &p)?;
            }
        }
        ts_us += 100;
        i += 1;
    }
    w.flush()?;
    Ok(written)
}

/// Wall-clock seconds of `cmd`, its standard output discarded.
fn time(cmd: &mut Command, ok: impl Fn(i32) -> bool) -> anyhow::Result<f64> {
    let start = Instant::now();
    let status = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    let secs = start.elapsed().as_secs_f64();
    if !status.status.code().is_some_and(&ok) {
        bail!(
            "{cmd:?} failed ({}): {}",
            status.status,
            String::from_utf8_lossy(&status.stderr).trim()
        );
    }
    Ok(secs)
}

/// tshark, from Debian's package; installed here, for the benchmark only.
fn ensure_tshark() -> anyhow::Result<()> {
    let present = Command::new("tshark")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    eprintln!("bench: installing tshark (Debian package, for the analyze baseline)");
    super::super::run(
        "apt-get install tshark",
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends", "tshark"]),
    )
}

fn median(v: &[f64]) -> f64 {
    super::median(v)
}

pub fn run(netrace: &Path, scratch: &Path, quick: bool) -> anyhow::Result<Value> {
    ensure_tshark()?;
    let target = if quick { 300_000 } else { 2_000_000 };
    let rounds = if quick { 1 } else { 3 };
    let file = scratch.join("analyze-bench.pcap");
    let packets = write_capture(&file, target)?;
    let bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "bench: capture of {packets} packets ({:.0} MiB)",
        bytes as f64 / f64::from(1 << 20)
    );
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for round in 0..rounds {
        let a = time(
            Command::new(netrace)
                .arg("analyze")
                .arg(&file)
                .args(["--output", "json"]),
            |c| c == 0 || c == 1,
        )?;
        let t = time(
            Command::new("tshark")
                .arg("-r")
                .arg(&file)
                .args(["-Y", "tcp.flags.syn==1"]),
            |c| c == 0,
        )?;
        eprintln!(
            "bench: analyze round {}/{rounds}: netrace {:.2} s, tshark {:.2} s",
            round + 1,
            a,
            t
        );
        ours.push(packets as f64 / a);
        theirs.push(packets as f64 / t);
    }
    let _ = std::fs::remove_file(&file);
    let (n, t) = (median(&ours), median(&theirs));
    Ok(json!({
        "packets": packets,
        "file_bytes": bytes,
        "netrace_pps": { "median": n, "runs": ours },
        "tshark_pps": { "median": t, "runs": theirs },
        "ratio": n / t,
        "tshark_command": "tshark -r FILE -Y 'tcp.flags.syn==1'",
    }))
}
