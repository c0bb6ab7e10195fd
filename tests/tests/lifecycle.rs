//! End to end: the failure matrix of `netrace watch`'s life — killed with SIGKILL, its
//! interface or the namespace behind it deleted, other tools' tc filters and TCX programs on
//! the same interface, a second netrace on the same interface, SYN floods that fill the
//! pending map, ring-buffer overflow, SIGTERM/SIGINT during attach and during output, and a
//! closed standard output.
//!
//! Every check is against what the test observes itself: the clients' results, `tc` listings,
//! the kernel's TCX program lists (`BPF_PROG_QUERY`), the BPF objects the netrace process held
//! (`/proc/PID/fdinfo`) and whether they still exist, `ip link`, and the SYNs the test sent.
//!
//! Needs root. `cargo test -p netrace-lab --test lifecycle`; the million-SYN flood is
//! `#[ignore]`d (run by `cargo xtask test --long`).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netrace_lab::foreign_tcx::ForeignTcx;
use netrace_lab::inspect::{self, Dir, Held, Snapshot};
use netrace_lab::netrace_run::catches_signals;
use netrace_lab::star::Star;
use netrace_lab::synflood::{SynFlood, SynTuple};
use netrace_lab::{
    netrace_bin, require_root, truth, Family, Lab, NetraceOptions, NetraceOutput, NetraceRun,
    Output, TcpAttempt, TcpCounts, TcpOutcome,
};
use serde_json::Value;

const PORT: u16 = 8080;

fn bin() -> PathBuf {
    netrace_bin().unwrap_or_else(|e| panic!("{e:#}"))
}

/// A star with a server on [`PORT`] in every spoke.
fn star(spokes: usize) -> Star {
    require_root();
    let mut s = Star::new(spokes).unwrap_or_else(|e| panic!("{e:#}"));
    for i in 0..spokes {
        s.start_server(i, PORT).unwrap_or_else(|e| panic!("{e:#}"));
    }
    s
}

fn spec(s: &Star, dev: &str) -> NetraceOptions {
    NetraceOptions::new(bin(), s.hub_ns(), dev)
}

fn start(spec: &NetraceOptions) -> NetraceRun {
    NetraceRun::start(spec).unwrap_or_else(|e| panic!("starting netrace: {e:#}"))
}

fn snapshot(ns: &str, dev: &str) -> Snapshot {
    inspect::snapshot(ns, dev).unwrap_or_else(|e| panic!("{e:#}"))
}

fn held(w: &NetraceRun) -> Held {
    inspect::held_by(w.pid()).unwrap_or_else(|e| panic!("{e:#}"))
}

/// `n` connections from the hub to spoke `i`.
fn connect(s: &Star, i: usize, port: u16, n: usize) -> Vec<TcpAttempt> {
    s.client()
        .tcp(s.spoke_addr(i, Family::V4, port), n, &|_, _| {})
        .unwrap_or_else(|e| panic!("client: {e:#}"))
}

fn ports_where(attempts: &[TcpAttempt], o: &TcpOutcome) -> BTreeSet<u16> {
    attempts
        .iter()
        .filter(|a| &a.outcome == o)
        .map(|a| a.pod_port)
        .collect()
}

fn ports(v: &[u16]) -> BTreeSet<u16> {
    let s: BTreeSet<u16> = v.iter().copied().collect();
    assert_eq!(s.len(), v.len(), "ports reported twice: {v:?}");
    s
}

fn summaries(out: &NetraceOutput) -> usize {
    out.json.iter().filter(|v| v["type"] == "summary").count()
}

/// Standard error without the lines netrace always prints; nothing that looks like a crash.
fn assert_quiet_stderr(out: &NetraceOutput) {
    let lower = out.stderr.to_lowercase();
    for bad in ["panick", "broken pipe", "error", "backtrace", "os error"] {
        assert!(
            !lower.contains(bad),
            "standard error mentions {bad:?}\n{}",
            out.describe()
        );
    }
}

/// The JSON run ended with exactly one summary, as its last line, and printed nothing else.
fn assert_one_summary_last(out: &NetraceOutput) {
    let ctx = out.describe();
    assert!(out.unparsed.is_empty(), "non-JSON lines\n{ctx}");
    assert_eq!(summaries(out), 1, "summaries\n{ctx}");
    assert_eq!(
        out.json.last().map(|v| v["type"].clone()),
        Some(Value::from("summary")),
        "the summary is not last\n{ctx}"
    );
}

/// After netrace is gone: `dev` looks exactly as `before`, and none of the BPF objects the
/// process held exists any more.
fn assert_nothing_left(ns: &str, dev: &str, before: &Snapshot, held: &Held) {
    let left = held.wait_gone(Duration::from_secs(10));
    assert!(
        left.is_empty(),
        "BPF objects of netrace still exist: {left:?}"
    );
    let after = snapshot(ns, dev);
    assert_eq!(&after, before, "{dev} differs from before netrace ran");
    if let Some(ids) = inspect::bpftool_prog_ids() {
        let ids = ids.unwrap_or_else(|e| panic!("{e:#}"));
        let listed: Vec<&u32> = held.progs.iter().filter(|p| ids.contains(p)).collect();
        assert!(listed.is_empty(), "bpftool still lists programs {listed:?}");
    }
}

fn summary_u64(out: &NetraceOutput, pointer: &str) -> u64 {
    out.summary_at(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no number at {pointer}\n{}", out.describe()))
}

// ---- 1. kill -9 ----

/// SIGKILL mid-traffic: the TCX links die with the process's file descriptors, so no program,
/// link, map, filter, qdisc or pinned object of netrace remains.
#[test]
fn kill_9_leaves_nothing_behind() {
    let s = star(1);
    let dev = s.hub_if(0).to_owned();
    let before = snapshot(s.hub_ns(), &dev);
    assert!(
        before.tcx_egress.is_empty() && !before.has_clsact(),
        "{before:?}"
    );
    let pinned_before = inspect::pinned();
    let w = start(&spec(&s, &dev));
    let held = held(&w);
    // The iterator's link exists where the kernel loaded it (some refuse tracing programs:
    // netrace then walks the map, and says so in its debug log).
    assert_eq!(
        held.links.len(),
        2 + held.tracing.len(),
        "two TCX links (auto mode on 6.6+) and the sweep's iterator over the IPv6 map if it \
         loaded: {held:?}"
    );
    let during = snapshot(s.hub_ns(), &dev);
    assert_eq!(during.tcx_names(), ["netrace_ingress", "netrace_egress"]);
    assert!(during.tcx_egress.iter().all(|id| held.progs.contains(id)));

    // Kill it while connections flow.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (client, addr, stop) = (s.client(), s.spoke_addr(0, Family::V4, PORT), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += client.tcp(addr, 20, &|_, _| {}).unwrap().len();
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    let out = w.kill().unwrap_or_else(|e| panic!("{e:#}"));
    stop.store(true, Ordering::Relaxed);
    assert!(traffic.join().unwrap() > 0, "no traffic flowed");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "{}",
        out.describe()
    );
    assert_nothing_left(s.hub_ns(), &dev, &before, &held);
    assert_eq!(inspect::pinned(), pinned_before, "pinned BPF objects");
    // Traffic flows as before.
    let after = connect(&s, 0, PORT, 20);
    assert_eq!(TcpCounts::of(&after).connected, 20);
    s.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

// ---- 2. and 3. the interface goes away ----

/// Deleting the only watched interface ends the run: a note on standard error, the report of
/// what was seen before, exit status 2. A second netrace watching the same interface plus
/// another one keeps watching the other one.
#[test]
fn watched_interface_deleted() {
    let s = star(2);
    let (h0, h1) = (s.hub_if(0).to_owned(), s.hub_if(1).to_owned());
    let only = start(&spec(&s, &h1));
    let text = start(&spec(&s, &h1).output(Output::Text));
    let mut both = start(&spec(&s, &h0).iface(&h1));
    let before1 = connect(&s, 1, PORT, 30);
    let before0 = connect(&s, 0, PORT, 10);
    assert_eq!(TcpCounts::of(&before1).connected, 30);
    std::thread::sleep(Duration::from_millis(500));

    s.delete_hub_link(1).unwrap_or_else(|e| panic!("{e:#}"));
    let gone_at = Instant::now();
    let only = only.wait(Duration::from_secs(10)).unwrap_or_else(|e| {
        panic!("netrace kept running after its only interface was deleted: {e:#}")
    });
    assert!(gone_at.elapsed() < Duration::from_secs(5));
    let text = text
        .wait(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    for out in [&only, &text] {
        let ctx = out.describe();
        assert_eq!(out.code(), Some(2), "exit status\n{ctx}");
        assert!(
            out.stderr
                .contains(&format!("netrace: interface {h1} went away after ")),
            "{ctx}"
        );
        assert!(
            out.stderr
                .contains("netrace: every watched interface went away; the report above covers the time before"),
            "{ctx}"
        );
        assert_quiet_stderr_except_gone(out);
    }
    // JSON: the report covers the connections before.
    assert_one_summary_last(&only);
    assert_eq!(
        ports(&only.answered_ports()),
        ports_where(&before1, &TcpOutcome::Connected)
    );
    assert_eq!(summary_u64(&only, "/totals/answered"), 30);
    let notes = only.summary_at("/notes").unwrap().to_string();
    assert!(
        notes.contains(&format!("interface {h1} went away")),
        "{notes}"
    );
    // Text: the report and the note.
    assert!(
        text.stdout
            .starts_with(&format!("netrace: 30 connection attempts on {h1} in ")),
        "{}",
        text.describe()
    );
    assert!(
        text.stdout
            .contains(&format!("note: interface {h1} went away after ")),
        "{}",
        text.describe()
    );

    // The netrace on both interfaces goes on with the one left.
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        both.try_wait().unwrap().is_none(),
        "the two-interface netrace exited"
    );
    let after0 = connect(&s, 0, PORT, 15);
    std::thread::sleep(Duration::from_millis(300));
    let both = both.stop().unwrap_or_else(|e| panic!("{e:#}"));
    let ctx = both.describe();
    assert_eq!(both.code(), Some(0), "{ctx}");
    assert_one_summary_last(&both);
    let mut want = ports_where(&before1, &TcpOutcome::Connected);
    want.extend(ports_where(&before0, &TcpOutcome::Connected));
    want.extend(ports_where(&after0, &TcpOutcome::Connected));
    assert_eq!(ports(&both.answered_ports()), want, "{ctx}");
    assert_eq!(summary_u64(&both, "/totals/answered"), 55, "{ctx}");
    assert!(
        both.stderr
            .contains(&format!("netrace: interface {h1} went away after ")),
        "{ctx}"
    );
    let by_iface: HashMap<u16, String> = both
        .connections()
        .map(|c| {
            (
                c["src_port"].as_u64().unwrap() as u16,
                c["iface"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for a in &before1 {
        assert_eq!(
            by_iface[&a.pod_port], h1,
            "records of the deleted interface keep its name"
        );
    }
    for a in &after0 {
        assert_eq!(by_iface[&a.pod_port], h0);
    }
    s.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

fn assert_quiet_stderr_except_gone(out: &NetraceOutput) {
    let lower = out.stderr.to_lowercase();
    for bad in ["panick", "backtrace", "error"] {
        assert!(
            !lower.contains(bad),
            "{bad:?} on stderr\n{}",
            out.describe()
        );
    }
}

/// The namespace at the far end of the watched veth is deleted (`ip netns del`): the kernel
/// destroys the pair, and netrace behaves as when the interface itself is deleted.
#[test]
fn peer_namespace_deleted() {
    let mut s = star(2);
    let (h0, h1) = (s.hub_if(0).to_owned(), s.hub_if(1).to_owned());
    let only = start(&spec(&s, &h1));
    let mut both = start(&spec(&s, &h0).iface(&h1));
    let before1 = connect(&s, 1, PORT, 20);
    assert_eq!(TcpCounts::of(&before1).connected, 20);
    std::thread::sleep(Duration::from_millis(300));

    s.delete_spoke_ns(1).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        s.wait_hub_link_gone(&h1, Duration::from_secs(10)),
        "{h1} outlived its peer's namespace"
    );
    let only = only
        .wait(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let ctx = only.describe();
    assert_eq!(only.code(), Some(2), "{ctx}");
    assert!(
        only.stderr
            .contains(&format!("netrace: interface {h1} went away after ")),
        "{ctx}"
    );
    assert!(
        only.stderr.contains("every watched interface went away"),
        "{ctx}"
    );
    assert_quiet_stderr_except_gone(&only);
    assert_one_summary_last(&only);
    assert_eq!(
        ports(&only.answered_ports()),
        ports_where(&before1, &TcpOutcome::Connected)
    );

    assert!(
        both.try_wait().unwrap().is_none(),
        "the two-interface netrace exited"
    );
    let after0 = connect(&s, 0, PORT, 10);
    std::thread::sleep(Duration::from_millis(300));
    let both = both.stop().unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(both.code(), Some(0), "{}", both.describe());
    assert_one_summary_last(&both);
    let mut want = ports_where(&before1, &TcpOutcome::Connected);
    want.extend(ports_where(&after0, &TcpOutcome::Connected));
    assert_eq!(ports(&both.answered_ports()), want, "{}", both.describe());
    s.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

// ---- 4. other tools' tc filters and TCX programs ----

const REDIRECTED: u16 = 8081;
const TCX_DROPPED: u16 = 8082;

/// (priority, is netrace's) of each filter in a `tc filter show` listing, in order.
fn prefs(listing: &str) -> Vec<(u32, bool)> {
    let mut out: Vec<(u32, bool)> = Vec::new();
    for l in listing.lines().filter(|l| l.starts_with("filter ")) {
        let words: Vec<&str> = l.split_whitespace().collect();
        let Some(i) = words.iter().position(|w| *w == "pref") else {
            continue;
        };
        let p: u32 = words[i + 1].parse().unwrap();
        let ours = l.contains("netrace_");
        match out.last_mut() {
            Some(last) if last.0 == p => last.1 |= ours,
            _ => out.push((p, ours)),
        }
    }
    out
}

/// What the foreign filters do to each server port, seen by the client.
fn decisions(s: &Star, foreign_tc: bool) -> [(u16, usize); 3] {
    let answered = connect(s, 0, PORT, 10);
    let redirected = connect(s, 0, REDIRECTED, 6);
    let dropped = connect(s, 0, TCX_DROPPED, 6);
    let c = |a: &[TcpAttempt]| TcpCounts::of(a).connected;
    let r = [
        (PORT, c(&answered)),
        (REDIRECTED, c(&redirected)),
        (TCX_DROPPED, c(&dropped)),
    ];
    let want_redirected = if foreign_tc { 0 } else { 6 };
    assert_eq!(
        r,
        [(PORT, 10), (REDIRECTED, want_redirected), (TCX_DROPPED, 0)],
        "connected per server port"
    );
    r
}

/// Received packets on `dev` in the hub (`ip -s link`).
fn rx_packets(s: &Star, dev: &str) -> u64 {
    let out = s
        .hub_exec(&["ip", "-s", "-j", "link", "show", "dev", dev])
        .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    v[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
}

/// A hub with a sink veth pair (`k0` → `k1`), servers on the three ports, a foreign TCX
/// program dropping TCP to [`TCX_DROPPED`] on egress and, with `foreign_tc`, a clsact qdisc
/// whose egress u32 filter redirects TCP to [`REDIRECTED`] into the sink and whose ingress
/// filter mirrors everything into it.
fn foreign_setup(foreign_tc: bool) -> (Star, ForeignTcx, String) {
    let mut s = star(1);
    s.start_server(0, REDIRECTED).unwrap();
    s.start_server(0, TCX_DROPPED).unwrap();
    let dev = s.hub_if(0).to_owned();
    let (k0, k1) = (format!("{}k0", s.stem()), format!("{}k1", s.stem()));
    for args in [
        vec!["ip", "link", "add", &k0, "type", "veth", "peer", &k1],
        vec!["ip", "link", "set", &k0, "up"],
        vec!["ip", "link", "set", &k1, "up"],
    ] {
        s.hub_exec(&args).unwrap_or_else(|e| panic!("{e:#}"));
    }
    if foreign_tc {
        let port = REDIRECTED.to_string();
        for args in [
            vec!["tc", "qdisc", "add", "dev", &dev, "clsact"],
            vec![
                "tc", "filter", "add", "dev", &dev, "egress", "protocol", "ip", "prio", "1", "u32",
                "match", "ip", "protocol", "6", "0xff", "match", "ip", "dport", &port, "0xffff",
                "action", "mirred", "egress", "redirect", "dev", &k0,
            ],
            vec![
                "tc", "filter", "add", "dev", &dev, "ingress", "protocol", "all", "prio", "7",
                "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "mirror", "dev",
                &k0,
            ],
        ] {
            s.hub_exec(&args).unwrap_or_else(|e| panic!("{e:#}"));
        }
    }
    let tcx = ForeignTcx::drop_tcp_port(s.hub_ns(), &dev, Dir::Egress, TCX_DROPPED)
        .unwrap_or_else(|e| panic!("{e:#}"));
    (s, tcx, k1)
}

/// netrace beside other tools: their decisions stand while it runs, and afterwards the
/// interface's qdiscs, filters and TCX programs are exactly as before.
fn foreign_case(mode: &str, foreign_tc: bool) {
    foreign_case_env(mode, foreign_tc, false);
}

/// [`foreign_case`], with netrace in an empty environment (`env -i`) when `empty_env`.
fn foreign_case_env(mode: &str, foreign_tc: bool, empty_env: bool) {
    let (s, tcx, sink) = foreign_setup(foreign_tc);
    let dev = s.hub_if(0).to_owned();
    let before = snapshot(s.hub_ns(), &dev);
    assert_eq!(before.tcx_egress, [tcx.prog_id]);
    assert_eq!(before.has_clsact(), foreign_tc);
    decisions(&s, foreign_tc);

    // The tc egress hook explicitly: with a foreign program on egress, `auto` would watch
    // SYNs at the device instead (after the foreign programs), and this is about tc.
    let mut watch = spec(&s, &dev).args(["--attach", mode, "--egress-hook", "tc"]);
    if empty_env {
        watch = watch.empty_environment();
    }
    let w = start(&watch);
    let held = held(&w);
    let during = snapshot(s.hub_ns(), &dev);
    if mode == "clsact" {
        assert_eq!(during.tcx_egress, before.tcx_egress, "TCX untouched");
        assert_eq!(during.tcx_ingress, before.tcx_ingress);
        assert!(during.has_clsact());
        let netrace = during.netrace_filters();
        assert_eq!(netrace.len(), 2, "netrace's two filters: {during:?}");
        if foreign_tc {
            // Ingress: a free priority below the foreign filter's 7, so netrace runs first.
            let order = prefs(&during.tc_ingress);
            assert_eq!(order.first(), Some(&(6, true)), "{}", during.tc_ingress);
        }
        for l in before.tc_egress.lines().chain(before.tc_ingress.lines()) {
            assert!(
                during.tc_egress.contains(l) || during.tc_ingress.contains(l),
                "foreign filter line {l:?} changed while netrace runs: {during:?}"
            );
        }
    } else {
        // First in line, so that a program that drops cannot hide a SYN from netrace.
        assert_eq!(during.tcx_egress.len(), 2, "{during:?}");
        assert_eq!(during.tcx_egress[1], tcx.prog_id);
        assert!(held.progs.contains(&during.tcx_egress[0]));
        assert_eq!(
            inspect::prog_name(during.tcx_egress[0]).as_deref(),
            Some("netrace_egress")
        );
        assert_eq!(
            (&during.tc_egress, &during.tc_ingress, &during.qdiscs),
            (&before.tc_egress, &before.tc_ingress, &before.qdiscs),
            "TCX mode must not touch clsact"
        );
    }
    let sink_before = rx_packets(&s, &sink);
    decisions(&s, foreign_tc);
    if foreign_tc {
        assert!(
            rx_packets(&s, &sink) >= sink_before + 6,
            "the foreign filters' redirected/mirrored packets did not reach the sink"
        );
    }
    std::thread::sleep(Duration::from_millis(1800));
    let out = w.stop().unwrap_or_else(|e| panic!("{e:#}"));
    let ctx = out.describe();
    assert_one_summary_last(&out);
    // What netrace saw is consistent with the decisions: 8080 answered, the others never.
    let by_port: HashMap<u64, Vec<String>> = out.connections().fold(HashMap::new(), |mut m, c| {
        m.entry(c["dst_port"].as_u64().unwrap())
            .or_default()
            .push(c["outcome"].as_str().unwrap().to_owned());
        m
    });
    assert_eq!(by_port[&u64::from(PORT)], vec!["answered"; 10], "{ctx}");
    if !foreign_tc {
        assert_eq!(
            by_port[&u64::from(REDIRECTED)],
            vec!["answered"; 6],
            "{ctx}"
        );
    }
    // What netrace sees of the SYNs the foreign programs take depends on the order the
    // kernel runs things in, and is exact in both modes:
    // - TCX, first in line: every SYN is seen before the foreign programs decide, and lost.
    // - clsact: the TCX hook runs before any clsact filter, so SYNs the foreign TCX program
    //   drops never reach netrace's filter; the foreign egress filter has priority 1 and
    //   redirects before netrace's filter runs (netrace warns about it, below). netrace
    //   reports none of them, rather than inventing records.
    let expected_seen = if mode == "clsact" { 0 } else { 6 };
    for p in [REDIRECTED, TCX_DROPPED] {
        if p == REDIRECTED && !foreign_tc {
            continue;
        }
        let seen = by_port.get(&u64::from(p)).cloned().unwrap_or_default();
        assert_eq!(
            seen.len(),
            expected_seen,
            "records for port {p} ({mode} mode): {seen:?}\n{ctx}"
        );
        assert!(
            seen.iter().all(|o| o == "lost"),
            "port {p}: {seen:?}\n{ctx}"
        );
    }
    if mode == "clsact" && foreign_tc {
        // The foreign egress filter has priority 1: nothing can run before it, and netrace
        // says so. (Its u32 match takes only port 8081; netrace still sees the rest.)
        let warning = format!(
            "netrace: warning: a tc filter with priority 1 on {dev} egress runs before netrace's"
        );
        assert!(out.stderr.contains(&warning), "{ctx}");
    } else {
        assert_quiet_stderr(&out);
    }
    assert_nothing_left(s.hub_ns(), &dev, &before, &held);
    decisions(&s, foreign_tc);
    drop(tcx);
    assert!(inspect::tcx_programs(s.hub_ns(), &dev, Dir::Egress)
        .unwrap()
        .is_empty());
    s.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn foreign_filters_untouched_attach_tcx() {
    foreign_case("tcx", true);
}

#[test]
fn foreign_filters_untouched_attach_clsact_keeps_their_qdisc() {
    foreign_case("clsact", true);
}

/// No external programs at run time: with an empty environment (no PATH, so no `tc` it could
/// run), clsact mode still puts netrace's filters before the foreign ones, leaves those and
/// their qdisc untouched, and warns about the one filter it cannot get ahead of.
#[test]
fn clsact_with_empty_environment_next_to_foreign_filters() {
    foreign_case_env("clsact", true, true);
}

/// With an empty environment, the clsact qdisc netrace added is still removed at exit.
#[test]
fn clsact_with_empty_environment_removes_its_qdisc() {
    foreign_case_env("clsact", false, true);
}

/// In clsact mode on an interface without a clsact qdisc, netrace adds one and removes it at
/// exit (the foreign TCX program stays).
#[test]
fn clsact_qdisc_netrace_added_is_removed() {
    foreign_case("clsact", false);
}

/// netrace added the qdisc, then another tool put a filter on it: at exit netrace removes its
/// own filters only, and the qdisc stays for the other tool.
#[test]
fn clsact_qdisc_netrace_added_stays_for_a_later_foreign_filter() {
    let s = star(1);
    let dev = s.hub_if(0).to_owned();
    let w = start(&spec(&s, &dev).args(["--attach", "clsact"]));
    let held = held(&w);
    assert!(snapshot(s.hub_ns(), &dev).has_clsact());
    // After netrace's filter (priority 49152, the kernel's choice on an empty chain): one
    // before it would end the classification before netrace sees the packets.
    s.hub_exec(&[
        "tc", "filter", "add", "dev", &dev, "ingress", "protocol", "all", "prio", "50000", "u32",
        "match", "u32", "0", "0", "classid", "1:1",
    ])
    .unwrap_or_else(|e| panic!("{e:#}"));
    let answered = connect(&s, 0, PORT, 10);
    std::thread::sleep(Duration::from_millis(300));
    let out = w.stop().unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        ports(&out.answered_ports()),
        ports_where(&answered, &TcpOutcome::Connected)
    );
    let left = held.wait_gone(Duration::from_secs(10));
    assert!(left.is_empty(), "{left:?}");
    let after = snapshot(s.hub_ns(), &dev);
    assert!(
        after.has_clsact(),
        "the qdisc with a foreign filter was removed"
    );
    assert!(after.netrace_filters().is_empty(), "{after:?}");
    assert!(after.tc_ingress.contains("u32"), "{after:?}");
    s.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

// ---- 5. two netrace on one interface ----

fn two_watchers_case(first: &str, second: &str) {
    require_root();
    let lab = Lab::seed().unwrap_or_else(|e| panic!("{e:#}"));
    let (ns, dev) = (lab.node_ns().to_owned(), lab.node_uplink().to_owned());
    let before = snapshot(&ns, &dev);
    let spec = |mode: &str| NetraceOptions::new(bin(), &ns, &dev).args(["--attach", mode]);
    let a = start(&spec(first));
    let b = start(&spec(second));
    let (held_a, held_b) = (held(&a), held(&b));
    assert!(
        held_a.progs.is_disjoint(&held_b.progs),
        "two processes, two program sets"
    );
    let attempts = lab
        .client()
        .tcp(lab.server_addr(Family::V4), 120, &|_, _| {})
        .unwrap_or_else(|e| panic!("{e:#}"));
    let c = TcpCounts::of(&attempts);
    lab.server()
        .unwrap()
        .wait_accepted(c.connected, Duration::from_secs(3));
    let truth = truth::collect(&lab, Family::V4, &attempts).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(c.timed_out > 0 && c.connected > 0, "{c:?}");
    std::thread::sleep(Duration::from_millis(2500));
    // The second one stops first: with clsact the first added the qdisc and removes it last.
    let b = b.stop().unwrap_or_else(|e| panic!("{e:#}"));
    let a = a.stop().unwrap_or_else(|e| panic!("{e:#}"));
    for (name, out) in [("first", &a), ("second", &b)] {
        let ctx = format!("{name} netrace ({first} then {second})\n{}", out.describe());
        assert_one_summary_last(out);
        assert_eq!(
            ports(&out.lost_ports()),
            truth.snat_ports_where(&TcpOutcome::TimedOut),
            "{ctx}"
        );
        assert_eq!(
            ports(&out.answered_ports()),
            truth.snat_ports_where(&TcpOutcome::Connected),
            "{ctx}"
        );
        assert_eq!(out.code(), Some(1), "{ctx}");
    }
    let mut held_all = held_a;
    held_all.progs.extend(held_b.progs);
    held_all.maps.extend(held_b.maps);
    held_all.links.extend(held_b.links);
    assert_nothing_left(&ns, &dev, &before, &held_all);
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn two_watchers_one_interface_tcx() {
    two_watchers_case("tcx", "tcx");
}

#[test]
fn two_watchers_one_interface_clsact() {
    two_watchers_case("clsact", "clsact");
}

#[test]
fn two_watchers_one_interface_tcx_and_clsact() {
    two_watchers_case("tcx", "clsact");
}

// ---- 6. and 7. floods ----

const BLACKHOLE: &str = "198.18.250.0/24";

fn blackhole_dsts(n: u8) -> Vec<Ipv4Addr> {
    (1..=n).map(|i| Ipv4Addr::new(198, 18, 250, i)).collect()
}

fn hub_v4(s: &Star) -> Ipv4Addr {
    match s.hub_ip(0, Family::V4) {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!(),
    }
}

/// (dst, src_port) of every lost record.
fn lost_tuples(out: &NetraceOutput) -> Vec<SynTuple> {
    out.connections()
        .filter(|c| c["outcome"] == "lost")
        .map(|c| SynTuple {
            dst: c["dst"].as_str().unwrap().parse().unwrap(),
            src_port: c["src_port"].as_u64().unwrap() as u16,
        })
        .collect()
}

/// `count` SYNs into a black hole behind the watched interface with `--max-pending 1000`: the
/// table takes at least 1000 (at most its slots), every other SYN is counted as untracked, none silently disappears, and
/// memory stays bounded.
fn flood_case(count: usize, max_rss_mib: u64) {
    let s = star(1);
    s.blackhole(0, BLACKHOLE)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let dev = s.hub_if(0).to_owned();
    let w = start(
        &spec(&s, &dev)
            .syn_timeout(Duration::from_millis(1000))
            .args(["--max-pending", "1000"]),
    );
    // Room for at least the 1000 asked for: twice as many slots, in buckets.
    let table = inspect::process_map(w.pid(), "TABLE_V4").unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        table.max_entries,
        netrace_common::table::Regions::for_max_pending(1000).buckets()
    );
    let capacity = u64::from(table.max_entries) * netrace_common::table::WAYS as u64;
    let flood = SynFlood {
        src: hub_v4(&s),
        dsts: blackhole_dsts(32),
        dport: 80,
        first_port: 1024,
        count,
    };
    let started = Instant::now();
    let sent = flood.send(s.hub_ns()).unwrap_or_else(|e| panic!("{e:#}"));
    let took = started.elapsed();
    assert!(
        sent.len() >= count * 99 / 100,
        "sent only {} of {count}",
        sent.len()
    );
    std::thread::sleep(Duration::from_millis(2500));
    let rss_kib = inspect::memory(w.pid())
        .unwrap_or_else(|e| panic!("{e:#}"))
        .peak_kib;
    let out = w.stop().unwrap_or_else(|e| panic!("{e:#}"));
    let ctx = format!(
        "{} SYNs sent in {took:?}; netrace peak RSS {} MiB\n{}",
        sent.len(),
        rss_kib / 1024,
        out.describe()
    );
    assert_one_summary_last(&out);
    let n = sent.len() as u64;
    assert_eq!(summary_u64(&out, "/counters/syn_seen"), n, "{ctx}");
    let full = summary_u64(&out, "/drops/pending_map_full");
    let lost = summary_u64(&out, "/totals/lost");
    let events_lost = summary_u64(&out, "/drops/events_lost");
    assert!(full > 0, "a full map was not reported\n{ctx}");
    assert!(
        (1000..=capacity).contains(&lost),
        "lost {lost}, room for 1000 to {capacity}\n{ctx}"
    );
    assert_eq!(
        lost + full,
        n,
        "every SYN is either tracked (and lost) or counted as untracked\n{ctx}"
    );
    assert_eq!(events_lost, 0, "{ctx}");
    let tuples = lost_tuples(&out);
    let sent_set: BTreeSet<SynTuple> = sent.iter().copied().collect();
    let unique: BTreeSet<SynTuple> = tuples.iter().copied().collect();
    assert_eq!(unique.len(), tuples.len(), "a lost tuple twice\n{ctx}");
    assert_eq!(tuples.len() as u64, lost);
    assert!(
        unique.is_subset(&sent_set),
        "lost tuples the test never sent\n{ctx}"
    );
    assert!(
        rss_kib / 1024 <= max_rss_mib,
        "netrace used {} MiB for {count} SYNs\n{ctx}",
        rss_kib / 1024
    );
    assert_eq!(out.code(), Some(1), "{ctx}");
    println!("{count} SYNs: {lost} tracked and lost, {full} untracked, peak RSS {} MiB, sent in {took:?}", rss_kib / 1024);
    s.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn syn_flood_fills_the_pending_map_and_is_counted() {
    flood_case(20_000, 100);
}

/// Run by `cargo xtask test --long`.
#[test]
#[ignore = "a million SYNs; run with --include-ignored (cargo xtask test --long)"]
fn syn_flood_one_million() {
    flood_case(1_000_000, 100);
}

/// A burst of unanswered SYNs far larger than a 4 KiB ring buffer while netrace cannot read
/// (stopped with SIGSTOP, a consumer that falls behind): no SYN takes a record, so nothing is
/// dropped, and every SYN is reported lost from the kernel map. Then a burst of refused
/// connections (an RST each, always an event): the overflow is counted in the summary, the
/// text report warns, and every attempt is either reported or counted as dropped.
#[test]
fn ring_buffer_overflow_is_counted() {
    let s = star(1);
    s.blackhole(0, BLACKHOLE)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let dev = s.hub_if(0).to_owned();
    let base = spec(&s, &dev)
        .syn_timeout(Duration::from_millis(1000))
        .args(["--ringbuf-kib", "4"]);

    // Unanswered: the kernel keeps them, the ring is not involved.
    let json = start(&base);
    json.signal(libc::SIGSTOP).unwrap();
    let flood = SynFlood {
        src: hub_v4(&s),
        dsts: blackhole_dsts(1),
        dport: 80,
        first_port: 20_000,
        count: 3000,
    };
    let sent = flood.send(s.hub_ns()).unwrap_or_else(|e| panic!("{e:#}"));
    json.signal(libc::SIGCONT).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let json = json.stop().unwrap_or_else(|e| panic!("{e:#}"));
    let ctx = format!("{} SYNs sent\n{}", sent.len(), json.describe());
    assert_one_summary_last(&json);
    let n = sent.len() as u64;
    assert_eq!(summary_u64(&json, "/counters/syn_seen"), n, "{ctx}");
    assert_eq!(summary_u64(&json, "/drops/events_lost"), 0, "{ctx}");
    assert_eq!(summary_u64(&json, "/totals/lost"), n, "{ctx}");
    let tuples = lost_tuples(&json);
    let reported: BTreeSet<SynTuple> = tuples.iter().copied().collect();
    assert_eq!(reported.len(), tuples.len(), "{ctx}");
    let sent_set: BTreeSet<SynTuple> = sent.iter().copied().collect();
    assert_eq!(reported, sent_set, "every SYN is reported lost\n{ctx}");

    // Refused: one event each, into a ring that holds about 39.
    let json = start(&base);
    let text = start(&base.clone().output(Output::Text));
    for w in [&json, &text] {
        w.signal(libc::SIGSTOP).unwrap();
    }
    let spoke = match s.spoke_ip(0, Family::V4) {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!(),
    };
    let flood = SynFlood {
        src: hub_v4(&s),
        dsts: vec![spoke],
        // Nothing listens there: the spoke answers every SYN with a RST.
        dport: 9,
        first_port: 20_000,
        count: 3000,
    };
    let sent = flood.send(s.hub_ns()).unwrap_or_else(|e| panic!("{e:#}"));
    std::thread::sleep(Duration::from_millis(500));
    for w in [&json, &text] {
        w.signal(libc::SIGCONT).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1500));
    let json = json.stop().unwrap_or_else(|e| panic!("{e:#}"));
    let text = text.stop().unwrap_or_else(|e| panic!("{e:#}"));
    let ctx = format!("{} SYNs sent\n{}", sent.len(), json.describe());
    assert_one_summary_last(&json);
    let n = sent.len() as u64;
    let events_lost = summary_u64(&json, "/drops/events_lost");
    assert!(events_lost > 0, "a 4 KiB ring took {n} events?\n{ctx}");
    assert_eq!(summary_u64(&json, "/counters/ringbuf_full"), events_lost);
    assert_eq!(summary_u64(&json, "/counters/syn_seen"), n, "{ctx}");
    assert_eq!(summary_u64(&json, "/counters/rst_matched"), n, "{ctx}");
    let refused = summary_u64(&json, "/totals/refused");
    assert_eq!(
        refused + events_lost,
        n,
        "every attempt is reported refused or counted as a dropped event\n{ctx}"
    );
    assert_eq!(summary_u64(&json, "/totals/lost"), 0, "{ctx}");
    // The text report says so too.
    let warn = text
        .stdout
        .lines()
        .find(|l| l.starts_with("WARNING: netrace missed events: "))
        .unwrap_or_else(|| panic!("no warning\n{}", text.describe()));
    let text_lost: u64 = warn
        .trim_start_matches("WARNING: netrace missed events: ")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(text_lost > 0, "{warn}");
    s.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

// ---- 12. signals ----

/// Sends `sig` once netrace has its handlers installed but before it is attached (no ready
/// file yet); it must finish attaching, detach, report once and exit 0.
fn signal_during_attach(sig: i32) {
    let s = star(1);
    let dev = s.hub_if(0).to_owned();
    let before = snapshot(s.hub_ns(), &dev);
    let mut hit = false;
    for tries in 0..20 {
        let w = NetraceRun::spawn(&spec(&s, &dev)).unwrap_or_else(|e| panic!("{e:#}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !catches_signals(w.pid(), &[libc::SIGINT, libc::SIGTERM]) && Instant::now() < deadline
        {
            std::hint::spin_loop();
        }
        let early = !w.is_ready();
        w.signal(sig).unwrap();
        let out = w
            .wait(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e:#}"));
        let ctx = out.describe();
        assert_eq!(out.code(), Some(0), "{ctx}");
        assert_one_summary_last(&out);
        assert_quiet_stderr(&out);
        let after = snapshot(s.hub_ns(), &dev);
        assert_eq!(after, before, "left attached after a signal during attach");
        if early {
            println!(
                "signal {sig}: sent before the ready file on try {}",
                tries + 1
            );
            hit = true;
            break;
        }
    }
    assert!(
        hit,
        "never managed to signal netrace before it was attached"
    );
    s.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn sigterm_during_attach() {
    signal_during_attach(libc::SIGTERM);
}

#[test]
fn sigint_during_attach() {
    signal_during_attach(libc::SIGINT);
}

/// A signal the moment the process starts (maybe before netrace installed its handlers):
/// it either dies of the signal before touching the kernel or exits cleanly with one
/// report; either way nothing stays attached.
#[test]
fn signal_right_after_spawn() {
    let s = star(1);
    let dev = s.hub_if(0).to_owned();
    let before = snapshot(s.hub_ns(), &dev);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGTERM, libc::SIGINT] {
        let w = NetraceRun::spawn(&spec(&s, &dev)).unwrap_or_else(|e| panic!("{e:#}"));
        w.signal(sig).unwrap();
        let out = w
            .wait(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e:#}"));
        println!("signal {sig} right after spawn: {}", out.status);
        match out.status.signal() {
            Some(got) => {
                assert_eq!(got, sig, "{}", out.describe());
                assert!(out.stdout.is_empty(), "{}", out.describe());
            }
            None => {
                assert_eq!(out.code(), Some(0), "{}", out.describe());
                assert_one_summary_last(&out);
            }
        }
        assert_eq!(snapshot(s.hub_ns(), &dev), before);
    }
    s.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

/// `sig` while connections flow and records are being written: one complete report, every
/// line whole, every record a connection the client made, nothing left attached.
fn signal_during_output(sig: i32, output: Output) {
    let s = star(1);
    let dev = s.hub_if(0).to_owned();
    let before = snapshot(s.hub_ns(), &dev);
    let w = start(&spec(&s, &dev).output(output));
    let held = held(&w);
    let client = s.client();
    let addr = s.spoke_addr(0, Family::V4, PORT);
    let traffic = std::thread::spawn(move || client.tcp(addr, 3000, &|_, _| {}).unwrap());
    std::thread::sleep(Duration::from_millis(800));
    w.signal(sig).unwrap();
    let out = w
        .wait(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let attempts = traffic.join().unwrap();
    let ctx = out.describe();
    assert_eq!(out.code(), Some(0), "{ctx}");
    assert_quiet_stderr(&out);
    let connected = ports_where(&attempts, &TcpOutcome::Connected);
    match output {
        Output::Json => {
            assert_one_summary_last(&out);
            assert!(out.stdout.ends_with("}\n"), "the last line is cut\n{ctx}");
            let answered = ports(&out.answered_ports());
            assert!(
                !answered.is_empty(),
                "no connection reported before the signal\n{ctx}"
            );
            assert!(answered.is_subset(&connected), "{ctx}");
            assert_eq!(
                summary_u64(&out, "/totals/answered"),
                answered.len() as u64,
                "{ctx}"
            );
        }
        Output::Text => {
            assert_eq!(
                out.stdout.matches("connection attempts on").count(),
                1,
                "one report\n{ctx}"
            );
            assert_eq!(out.stdout.matches("\nverdict: ").count(), 1, "{ctx}");
        }
    }
    assert_nothing_left(s.hub_ns(), &dev, &before, &held);
    s.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn sigterm_during_output_json() {
    signal_during_output(libc::SIGTERM, Output::Json);
}

#[test]
fn sigint_during_output_json() {
    signal_during_output(libc::SIGINT, Output::Json);
}

#[test]
fn sigterm_during_output_text() {
    signal_during_output(libc::SIGTERM, Output::Text);
}

#[test]
fn sigint_during_output_text() {
    signal_during_output(libc::SIGINT, Output::Text);
}

// ---- 13. a closed standard output ----

/// `netrace watch --output json | head -1` with connections flowing: head takes one line and
/// exits; netrace's next write fails and it ends by itself, quietly (no panic, no
/// "Broken pipe"), with status 0 and nothing left attached.
#[test]
fn closed_pipe_json_exits_quietly() {
    let s = star(1);
    let dev = s.hub_if(0).to_owned();
    let before = snapshot(s.hub_ns(), &dev);
    let mut w = start(&spec(&s, &dev).uncaptured_stdout());
    let held = held(&w);
    let stdout = w.take_stdout().unwrap();
    let head = Command::new("head")
        .arg("-1")
        .stdin(Stdio::from(stdout))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (client, addr, stop) = (s.client(), s.spoke_addr(0, Family::V4, PORT), stop.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                client.tcp(addr, 10, &|_, _| {}).unwrap();
            }
        })
    };
    let head = head.wait_with_output().unwrap();
    let line = String::from_utf8_lossy(&head.stdout).into_owned();
    let first: Value = serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(first["type"], "connection");
    let out = w
        .wait(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("netrace did not end after its reader went away: {e:#}"));
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(out.stderr.trim().is_empty(), "{}", out.describe());
    assert_nothing_left(s.hub_ns(), &dev, &before, &held);
    s.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

/// Text output goes out only at the end; if the reader is gone by then, the report is
/// dropped quietly: status 0, nothing on standard error but the start line.
#[test]
fn closed_pipe_text_exits_quietly() {
    let s = star(1);
    let dev = s.hub_if(0).to_owned();
    let before = snapshot(s.hub_ns(), &dev);
    let mut w = start(&spec(&s, &dev).output(Output::Text).uncaptured_stdout());
    let held = held(&w);
    drop(w.take_stdout());
    connect(&s, 0, PORT, 10);
    let out = w.stop().unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", out.describe());
    assert!(
        lines[0].starts_with("netrace: watching "),
        "{}",
        out.describe()
    );
    assert_nothing_left(s.hub_ns(), &dev, &before, &held);
    s.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}
