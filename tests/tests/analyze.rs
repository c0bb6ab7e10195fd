//! End to end: `netrace analyze` on captures taken with `tcpdump -w` in the seed lab while
//! `netrace watch` runs on the node's uplink. The capture's report must give the same
//! per-connection outcomes and the same verdict as `watch` and as the client's own results:
//! the uplink capture, a cooked `-i any` capture of the whole node, a pcapng holding the pod
//! side and the uplink as two interfaces, the two captures given as two files, and a gzip copy.
//!
//! Needs root and tcpdump (`cargo xtask test` installs it). Run one test with e.g.
//! `cargo test -p netrace-lab --test analyze analyze_seed_ipv4 -- --nocapture`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use netrace_lab::truth::{self, Truth};
use netrace_lab::{
    is_root, netrace_bin, Family, Lab, LabOptions, NetraceOptions, NetraceOutput, NetraceRun,
    TcpAttempt, TcpCounts, TcpOutcome,
};
use serde_json::Value;

const TCP: usize = 120;

fn require_root() {
    assert!(
        is_root(),
        "the netrace-lab end-to-end tests need root (network namespaces, tcpdump, eBPF); run \
         them with `cargo xtask test` or as root: `cargo test -p netrace-lab`"
    );
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("netrace-analyze-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A `tcpdump -w` running in a namespace, stopped with SIGINT (which writes whole records).
struct Tcpdump {
    child: Child,
    file: PathBuf,
    stderr: mpsc::Receiver<String>,
}

impl Tcpdump {
    fn start(ns: &str, iface: &str, file: PathBuf) -> Self {
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", ns, "tcpdump", "-n", "-B", "65536", "-s", "0", "-i", iface, "-w",
            ])
            .arg(&file)
            .args(["tcp or udp or icmp or icmp6"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting tcpdump (is it installed?): {e}"));
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // tcpdump says "listening on IFACE" once its socket is open.
        let mut seen = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(line) if line.contains("listening on") => break,
                Ok(line) => seen.push(line),
                Err(e) => panic!("tcpdump on {iface} in {ns} did not start ({e}): {seen:?}"),
            }
        }
        Self {
            child,
            file,
            stderr: rx,
        }
    }

    fn stop(mut self) -> PathBuf {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let said: Vec<String> = self.stderr.try_iter().collect();
        assert!(status.success(), "tcpdump ended with {status}: {said:?}");
        let dropped: Vec<&String> = said
            .iter()
            .filter(|l| l.contains("dropped") && !l.starts_with("0 "))
            .collect();
        assert!(
            dropped.is_empty(),
            "tcpdump into {} dropped packets, the capture is incomplete: {said:?}",
            self.file.display()
        );
        self.file
    }
}

/// `netrace analyze FILE... --output json --syn-timeout T`.
fn analyze(files: &[&Path], syn_timeout: Duration, extra: &[&str]) -> NetraceOutput {
    let bin = netrace_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let mut cmd = Command::new(&bin);
    cmd.arg("analyze")
        .args(files)
        .args(["--output", "json", "--syn-timeout"])
        .arg(format!("{}ms", syn_timeout.as_millis()))
        .args(extra);
    let line = format!("{cmd:?}");
    let out = cmd.output().unwrap();
    NetraceOutput::from_captured(
        line,
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Source port → outcome, for every connection record.
fn outcomes(out: &NetraceOutput) -> BTreeMap<u16, String> {
    let mut m = BTreeMap::new();
    for c in out.connections() {
        let port = c["src_port"].as_u64().unwrap() as u16;
        let outcome = c["outcome"].as_str().unwrap().to_owned();
        assert!(
            m.insert(port, outcome).is_none(),
            "port {port} reported twice\n{}",
            out.describe()
        );
    }
    m
}

fn summary_str(out: &NetraceOutput, pointer: &str) -> String {
    out.summary_at(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer}\n{}", out.describe()))
        .to_owned()
}

fn summary_u64(out: &NetraceOutput, pointer: &str) -> u64 {
    out.summary_at(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no number at {pointer}\n{}", out.describe()))
}

/// `analyze`'s report says what `watch`'s says, connection by connection, and both agree with
/// the client.
fn assert_same_answer(what: &str, analyzed: &NetraceOutput, watched: &NetraceOutput, t: &Truth) {
    let ctx = format!(
        "{what}\n--- analyze ---\n{}\n--- watch ---\n{}",
        analyzed.describe(),
        watched.describe()
    );
    assert!(analyzed.unparsed.is_empty(), "non-JSON output\n{ctx}");
    let a = outcomes(analyzed);
    let w = outcomes(watched);
    let differ: Vec<_> = a
        .iter()
        .filter(|(p, o)| w.get(p) != Some(o))
        .chain(w.iter().filter(|(p, _)| !a.contains_key(p)))
        .collect();
    assert!(
        differ.is_empty(),
        "{what}: outcomes differ from watch's on {differ:?}\n{ctx}"
    );
    let lost: std::collections::BTreeSet<u16> = a
        .iter()
        .filter(|(_, o)| *o == "lost")
        .map(|(p, _)| *p)
        .collect();
    let answered: std::collections::BTreeSet<u16> = a
        .iter()
        .filter(|(_, o)| *o == "answered")
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(
        lost,
        t.snat_ports_where(&TcpOutcome::TimedOut),
        "{what}: lost ports vs the client's timed-out SNAT ports\n{ctx}"
    );
    assert_eq!(
        answered,
        t.snat_ports_where(&TcpOutcome::Connected),
        "{what}: answered ports vs the client's connected SNAT ports\n{ctx}"
    );
    for p in ["/totals/attempts", "/totals/lost", "/totals/answered"] {
        assert_eq!(
            summary_u64(analyzed, p),
            summary_u64(watched, p),
            "{what}: {p}\n{ctx}"
        );
    }
    assert_eq!(
        summary_str(analyzed, "/verdict/kind"),
        summary_str(watched, "/verdict/kind"),
        "{what}: verdict\n{ctx}"
    );
    assert_eq!(
        analyzed.code(),
        watched.code(),
        "{what}: exit status\n{ctx}"
    );
}

/// Every lost connection names the pod it came from (linked by ISN across SNAT).
fn assert_pod_linked(what: &str, out: &NetraceOutput, lab: &Lab, family: Family) {
    let pod = lab.pod_ip(family).to_string();
    for c in out.connections().filter(|c| c["outcome"] == "lost") {
        assert_eq!(
            c["pod_src"].as_str(),
            Some(pod.as_str()),
            "{what}: lost connection without its pod: {c}\n{}",
            out.describe()
        );
        assert_eq!(c["link_method"], "isn", "{what}: {c}");
    }
}

/// The pcap records of a tcpdump file: (timestamp in microseconds, packet bytes).
fn pcap_records(file: &Path) -> (u32, Vec<(u64, Vec<u8>)>) {
    let b = std::fs::read(file).unwrap();
    let u32at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let nanos = match u32at(0) {
        0xa1b2_c3d4 => false,
        0xa1b2_3c4d => true,
        m => panic!("{}: not a little-endian pcap ({m:#x})", file.display()),
    };
    let linktype = u32at(20);
    let mut at = 24;
    let mut out = Vec::new();
    while at + 16 <= b.len() {
        let (sec, frac, caplen) = (u32at(at), u32at(at + 4), u32at(at + 8) as usize);
        let frac_us = if nanos { frac / 1000 } else { frac };
        out.push((
            u64::from(sec) * 1_000_000 + u64::from(frac_us),
            b[at + 16..at + 16 + caplen].to_vec(),
        ));
        at += 16 + caplen;
    }
    (linktype, out)
}

/// One pcapng with an interface per pcap file (microsecond timestamps), packets in time order.
fn merge_pcapng(inputs: &[(&str, &Path)], out: &Path) {
    fn block(buf: &mut Vec<u8>, kind: u32, body: &[u8]) {
        let padded = body.len().div_ceil(4) * 4;
        let len = (12 + padded) as u32;
        buf.extend_from_slice(&kind.to_le_bytes());
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(body);
        buf.resize(buf.len() + padded - body.len(), 0);
        buf.extend_from_slice(&len.to_le_bytes());
    }
    let mut buf = Vec::new();
    let mut shb = 0x1a2b_3c4du32.to_le_bytes().to_vec();
    shb.extend_from_slice(&[1, 0, 0, 0]);
    shb.extend_from_slice(&u64::MAX.to_le_bytes());
    block(&mut buf, 0x0a0d_0d0a, &shb);
    let mut packets = Vec::new();
    for (i, (name, file)) in inputs.iter().enumerate() {
        let (linktype, records) = pcap_records(file);
        let mut idb = (linktype as u16).to_le_bytes().to_vec();
        idb.extend_from_slice(&[0, 0]);
        idb.extend_from_slice(&0u32.to_le_bytes());
        idb.extend_from_slice(&2u16.to_le_bytes());
        idb.extend_from_slice(&(name.len() as u16).to_le_bytes());
        idb.extend_from_slice(name.as_bytes());
        idb.resize(idb.len().div_ceil(4) * 4, 0);
        idb.extend_from_slice(&[0; 4]);
        block(&mut buf, 1, &idb);
        packets.extend(records.into_iter().map(|(ts, p)| (ts, i as u32, p)));
    }
    packets.sort_by_key(|(ts, i, _)| (*ts, *i));
    for (ts, iface, p) in packets {
        let mut epb = iface.to_le_bytes().to_vec();
        epb.extend_from_slice(&((ts >> 32) as u32).to_le_bytes());
        epb.extend_from_slice(&(ts as u32).to_le_bytes());
        epb.extend_from_slice(&(p.len() as u32).to_le_bytes());
        epb.extend_from_slice(&(p.len() as u32).to_le_bytes());
        epb.extend_from_slice(&p);
        block(&mut buf, 6, &epb);
    }
    std::fs::write(out, buf).unwrap();
}

struct Captured {
    watched: NetraceOutput,
    truth: Truth,
    counts: TcpCounts,
    syn_timeout: Duration,
    uplink: PathBuf,
    pod_side: PathBuf,
    any: PathBuf,
}

/// Runs the client with `watch` on the uplink and three captures: the uplink, the pod side of
/// the node, and `-i any` on the node.
fn capture_run(lab: &Lab, family: Family, tag: &str) -> Captured {
    let node = lab.node_ns();
    let n = lab.names();
    let uplink = Tcpdump::start(
        node,
        lab.node_uplink(),
        scratch(&format!("{tag}-uplink.pcap")),
    );
    let pod_side = Tcpdump::start(node, &n.node_pod_if, scratch(&format!("{tag}-pod.pcap")));
    let any = Tcpdump::start(node, "any", scratch(&format!("{tag}-any.pcap")));
    let bin = netrace_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let watch = NetraceRun::start(&NetraceOptions::for_lab(lab, bin))
        .unwrap_or_else(|e| panic!("starting netrace: {e:#}"));
    let server = lab.server_addr(family);
    let attempts: Vec<TcpAttempt> = lab
        .client()
        .tcp(server, TCP, &|_, _| {})
        .unwrap_or_else(|e| panic!("TCP client to {server}: {e:#}"));
    let counts = TcpCounts::of(&attempts);
    if let Some(s) = lab.server() {
        s.wait_accepted(counts.connected, Duration::from_secs(3));
    }
    let truth = truth::collect(lab, family, &attempts)
        .unwrap_or_else(|e| panic!("collecting ground truth: {e:#}"));
    watch.settle();
    // A capture knows time only from its packets: one more (UDP, ignored by both) after the
    // SYN timeout, as a capture left running sees, lets analyze decide the last lost ones.
    lab.client()
        .udp(server, 1, &|_, _| {})
        .unwrap_or_else(|e| panic!("UDP client to {server}: {e:#}"));
    let syn_timeout = watch.syn_timeout();
    let watched = watch
        .stop()
        .unwrap_or_else(|e| panic!("stopping netrace: {e:#}"));
    // libpcap hands packets over in blocks, at the latest after its 1 s buffer timeout: wait
    // for the last block before stopping tcpdump, or the capture ends early.
    std::thread::sleep(Duration::from_millis(1500));
    Captured {
        watched,
        truth,
        counts,
        syn_timeout,
        uplink: uplink.stop(),
        pod_side: pod_side.stop(),
        any: any.stop(),
    }
}

fn seed(family: Family) {
    require_root();
    let lab = Lab::new(LabOptions::seed()).unwrap_or_else(|e| panic!("{e:#}"));
    let tag = format!("seed-{}", family.name());
    let run = capture_run(&lab, family, &tag);
    assert!(
        run.counts.timed_out > 0 && run.counts.connected > 0,
        "the seed lab should lose about half: {:?}",
        run.counts
    );
    assert_eq!(
        summary_str(&run.watched, "/verdict/kind"),
        "range_problem",
        "{}",
        run.watched.describe()
    );
    let t = run.syn_timeout;
    let uplink = analyze(&[&run.uplink], t, &[]);
    assert_same_answer("uplink capture", &uplink, &run.watched, &run.truth);

    let any = analyze(&[&run.any], t, &[]);
    assert_same_answer("-i any (cooked) capture", &any, &run.watched, &run.truth);
    assert_pod_linked("-i any", &any, &lab, family);

    let merged = scratch(&format!("{tag}-two.pcapng"));
    merge_pcapng(
        &[
            ("pod-side", &run.pod_side),
            (lab.node_uplink(), &run.uplink),
        ],
        &merged,
    );
    let two = analyze(&[&merged], t, &[]);
    assert_same_answer("pcapng with two interfaces", &two, &run.watched, &run.truth);
    assert_pod_linked("pcapng with two interfaces", &two, &lab, family);

    let both = analyze(&[&run.uplink, &run.pod_side], t, &[]);
    assert_same_answer("uplink and pod-side files", &both, &run.watched, &run.truth);
    assert_pod_linked("two files", &both, &lab, family);

    let gz = scratch(&format!("{tag}-uplink.pcap.gz"));
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gzip -c '{}' > '{}'",
            run.uplink.display(),
            gz.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let zipped = analyze(&[&gz], t, &[]);
    assert_same_answer("gzip capture", &zipped, &run.watched, &run.truth);
    for f in [&run.uplink, &run.pod_side, &run.any, &merged, &gz] {
        let _ = std::fs::remove_file(f);
    }
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn analyze_seed_ipv4() {
    seed(Family::V4);
}

#[test]
fn analyze_seed_ipv6() {
    seed(Family::V6);
}

/// An open firewall: nothing lost, and `analyze` must not cry wolf either.
#[test]
fn analyze_control_open_firewall() {
    require_root();
    let lab =
        Lab::new(LabOptions::seed().firewall_min_port(1024)).unwrap_or_else(|e| panic!("{e:#}"));
    let run = capture_run(&lab, Family::V4, "control");
    assert_eq!(run.counts.connected, TCP, "{:?}", run.counts);
    let uplink = analyze(&[&run.uplink], run.syn_timeout, &[]);
    assert_same_answer("control, uplink", &uplink, &run.watched, &run.truth);
    assert_eq!(summary_str(&uplink, "/verdict/kind"), "no_range_problem");
    assert_eq!(uplink.code(), Some(0));
    let any = analyze(&[&run.any], run.syn_timeout, &[]);
    assert_same_answer("control, -i any", &any, &run.watched, &run.truth);
    for f in [&run.uplink, &run.pod_side, &run.any] {
        let _ = std::fs::remove_file(f);
    }
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

/// A capture of one direction only is named for what it is.
#[test]
fn analyze_one_direction_only() {
    require_root();
    let lab = Lab::new(LabOptions::seed()).unwrap_or_else(|e| panic!("{e:#}"));
    let file = scratch("outbound-only.pcap");
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            lab.node_ns(),
            "tcpdump",
            "-n",
            "-Q",
            "out",
            "-i",
        ])
        .arg(lab.node_uplink())
        .arg("-w")
        .arg(&file)
        .arg("tcp")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening on") {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "tcpdump did not start"
        );
    }
    let server = lab.server_addr(Family::V4);
    lab.client().tcp(server, 20, &|_, _| {}).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGINT) };
    assert!(child.wait().unwrap().success());
    let out = analyze(&[&file], Duration::from_secs(1), &[]);
    assert!(
        out.stderr.contains("no SYN-ACKs at all"),
        "{}",
        out.describe()
    );
    let _ = std::fs::remove_file(&file);
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}
