//! Reliability: cases 8-11, 14 and 15 of the failure matrix (docs/reliability.md), against the
//! real `netrace` binary in the lab, checked against ground truth netrace has no part in: the
//! client's own results, the lab's conntrack / firewall / server, what the kernel itself says is
//! attached (`BPF_PROG_QUERY`, `tc`), the pending map read by `bpf(2)`, and `/proc`.
//!
//! Needs root. Run with `cargo test -p netrace-lab --test robustness`; the 10-minute run is
//! `#[ignore]`d and runs under `cargo xtask test --long`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use netrace_lab::inspect;
use netrace_lab::lab::addr;
use netrace_lab::wire::{
    self, icmp_error, tcp4, tcp6, Ext, Injector, Ipv4, Ipv6, Tcp, ETH_P_8021AD, ETH_P_8021Q,
    ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IP_MF, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};
use netrace_lab::{
    cmd, netns, netrace_bin, netrace_run::run_once, require_root, truth, ClientOptions, Family,
    Lab, LabOptions, NetraceOptions, NetraceOutput, NetraceRun, TcpAttempt, TcpCounts, TcpOutcome,
};
use serde_json::Value;

fn bin() -> PathBuf {
    netrace_bin().unwrap_or_else(|e| panic!("{e:#}"))
}

fn lab(opts: LabOptions) -> Lab {
    Lab::new(opts).unwrap_or_else(|e| panic!("building the lab: {e:#}"))
}

fn start(lab: &Lab, extra: &[&str]) -> NetraceRun {
    NetraceRun::start(&NetraceOptions::for_lab(lab, bin()).args(extra.iter().copied()))
        .unwrap_or_else(|e| panic!("starting netrace: {e:#}"))
}

fn stop(run: NetraceRun) -> NetraceOutput {
    let out = run
        .stop()
        .unwrap_or_else(|e| panic!("stopping netrace: {e:#}"));
    assert!(
        out.summary().is_some(),
        "no summary object\n{}",
        out.describe()
    );
    assert!(
        out.unparsed.is_empty(),
        "non-JSON output {:?}\n{}",
        out.unparsed,
        out.describe()
    );
    out
}

fn summary_u64(out: &NetraceOutput, pointer: &str) -> u64 {
    out.summary_at(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("summary has no number at {pointer}\n{}", out.describe()))
}

fn counter(out: &NetraceOutput, name: &str) -> u64 {
    summary_u64(out, &format!("/counters/{name}"))
}

/// `syn_packets_by_port`: the kernel's own tally of SYN packets per source port.
fn syn_packets(out: &NetraceOutput) -> BTreeMap<u16, u64> {
    out.summary_at("/syn_packets_by_port")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|pair| {
            let p = pair.get(0)?.as_u64()?;
            let n = pair.get(1)?.as_u64()?;
            Some((u16::try_from(p).ok()?, n))
        })
        .collect()
}

fn field<'a>(c: &'a Value, k: &str) -> &'a Value {
    c.get(k).unwrap_or(&Value::Null)
}

/// Connection records towards `dst`.
fn records_to(out: &NetraceOutput, dst: IpAddr) -> Vec<&Value> {
    let dst = dst.to_string();
    out.connections()
        .filter(|c| field(c, "dst").as_str() == Some(dst.as_str()))
        .collect()
}

fn src_port(c: &Value) -> u16 {
    field(c, "src_port")
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("no src_port in {c}"))
}

/// Source ports of `records` with `outcome`, failing on duplicates.
fn ports_with(records: &[&Value], outcomes: &[&str]) -> BTreeSet<u16> {
    let ports: Vec<u16> = records
        .iter()
        .filter(|c| {
            field(c, "outcome")
                .as_str()
                .is_some_and(|o| outcomes.contains(&o))
        })
        .map(|c| src_port(c))
        .collect();
    let set: BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(
        set.len(),
        ports.len(),
        "{outcomes:?} reported twice for a port: {ports:?}"
    );
    set
}

/// Runs `n` TCP connections of `family` from the pod.
fn connect(lab: &Lab, family: Family, n: usize) -> Vec<TcpAttempt> {
    let server = lab.server_addr(family);
    lab.client()
        .tcp(server, n, &|_, _| {})
        .unwrap_or_else(|e| panic!("TCP client to {server}: {e:#}"))
}

/// netrace's records towards the lab's server are exactly the client's connections: answered
/// on the ports the server accepted, lost on the ports whose connect timed out (both as the
/// node's conntrack maps them). Returns (connected, timed out).
fn check_against_truth(
    lab: &Lab,
    family: Family,
    attempts: &[TcpAttempt],
    out: &NetraceOutput,
) -> (usize, usize) {
    let c = TcpCounts::of(attempts);
    if let Some(s) = lab.server() {
        s.wait_accepted(c.connected, Duration::from_secs(3));
    }
    let t = truth::collect(lab, family, attempts)
        .unwrap_or_else(|e| panic!("collecting ground truth: {e:#}"));
    assert!(
        t.unmapped().is_empty(),
        "{family:?}: attempts without a conntrack entry: {}",
        t.unmapped().len()
    );
    assert_eq!(
        (c.refused, c.unreachable, c.other),
        (0, 0, 0),
        "{family:?}: unexpected client outcomes {c:?}"
    );
    let server = lab.server_addr(family);
    let records: Vec<&Value> = records_to(out, server.ip())
        .into_iter()
        .filter(|c| field(c, "dst_port").as_u64() == Some(u64::from(server.port())))
        .collect();
    let ctx = out.describe();
    let answered = ports_with(&records, &["answered"]);
    let lost = ports_with(&records, &["lost", "abandoned"]);
    let others: Vec<_> = records
        .iter()
        .filter(|r| {
            !matches!(
                field(r, "outcome").as_str(),
                Some("answered" | "lost" | "abandoned")
            )
        })
        .collect();
    assert!(
        others.is_empty(),
        "{family:?}: unexpected outcomes {others:?}\n{ctx}"
    );
    let truth_answered = t.snat_ports_where(&TcpOutcome::Connected);
    let truth_lost = t.snat_ports_where(&TcpOutcome::TimedOut);
    assert_eq!(
        answered,
        truth_answered,
        "{family:?}: answered ports differ from the server's accepted ports (missing {:?}, \
         extra {:?})\n{ctx}",
        truth_answered.difference(&answered).collect::<Vec<_>>(),
        answered.difference(&truth_answered).collect::<Vec<_>>()
    );
    assert_eq!(
        lost,
        truth_lost,
        "{family:?}: lost ports differ from the client's timed-out ports (missing {:?}, extra \
         {:?})\n{ctx}",
        truth_lost.difference(&lost).collect::<Vec<_>>(),
        lost.difference(&truth_lost).collect::<Vec<_>>()
    );
    assert_eq!(answered.len(), c.connected, "{ctx}");
    assert_eq!(lost.len(), c.timed_out, "{ctx}");
    (c.connected, c.timed_out)
}

fn assert_nothing_attached(ns: &str, iface: &str, ctx: &str) {
    let a = inspect::snapshot(ns, iface).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        a.is_empty(),
        "{iface} still has something attached: {a:?}\n{ctx}"
    );
}

// ---- 8. Malformed traffic on the wire --------------------------------------------------------

/// Destination of every crafted connection: nothing in the lab routes it, and no real
/// connection goes there, so netrace's records for it are exactly the crafted ones.
const INJ4: Ipv4Addr = Ipv4Addr::new(198, 18, 99, 1);
const INJ6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 1);
const INJ_PORT: u16 = 7000;
/// netrace_common::MAX_IPV6_EXT_HEADERS: the parser walks at most this many.
const IPV6_WALK_BOUND: usize = 8;

fn isn_for(sport: u16) -> u32 {
    0x3000_0000 ^ u32::from(sport).wrapping_mul(2_654_435_761)
}

fn syn4_frame(tags: &[(u16, u16)], ip: Ipv4, tcp: &Tcp) -> Vec<u8> {
    tcp4(tags, &ip, tcp)
}

fn out4() -> Ipv4 {
    Ipv4::new(addr::NODE_UP4, INJ4, IPPROTO_TCP)
}

fn in4() -> Ipv4 {
    Ipv4::new(INJ4, addr::NODE_UP4, IPPROTO_TCP)
}

fn out6() -> Ipv6 {
    Ipv6::new(addr::NODE_UP6, INJ6, IPPROTO_TCP)
}

fn in6() -> Ipv6 {
    Ipv6::new(INJ6, addr::NODE_UP6, IPPROTO_TCP)
}

fn syn(sport: u16) -> Tcp {
    Tcp::syn(sport, INJ_PORT, isn_for(sport))
}

fn synack(sport: u16) -> Tcp {
    Tcp::answer(
        sport,
        INJ_PORT,
        TCP_SYN | TCP_ACK,
        isn_for(sport).wrapping_add(1),
    )
}

/// What the crafted frames should do to netrace.
#[derive(Default)]
struct Plan {
    /// Unusual but well-formed SYNs, each answered by a well-formed SYN-ACK: `answered`.
    answered: BTreeSet<u16>,
    /// Well-formed SYNs answered only by malformed or non-matching frames: `lost`.
    lost: BTreeSet<u16>,
    /// Source ports of malformed "SYNs" that must never be tracked.
    never: BTreeSet<u16>,
    /// Expected kernel counters moved by the crafted frames alone.
    counters: BTreeMap<&'static str, u64>,
}

struct Wire {
    egress: Injector,
    ingress: Injector,
}

impl Wire {
    fn open(lab: &Lab) -> Self {
        let egress = Injector::open(lab.node_ns(), lab.node_uplink())
            .unwrap_or_else(|e| panic!("AF_PACKET on the uplink: {e:#}"));
        let ingress = Injector::open(lab.firewall_ns(), &lab.names().fw_node_if)
            .unwrap_or_else(|e| panic!("AF_PACKET on the uplink's peer: {e:#}"));
        Self { egress, ingress }
    }

    /// A frame leaving through the uplink (netrace's egress program).
    fn out(&self, frame: &[u8]) {
        self.egress
            .send(frame)
            .unwrap_or_else(|e| panic!("sending {} bytes on egress: {e}", frame.len()));
    }

    /// A frame arriving on the uplink (netrace's ingress program).
    fn inn(&self, frame: &[u8]) {
        self.ingress
            .send(frame)
            .unwrap_or_else(|e| panic!("sending {} bytes on ingress: {e}", frame.len()));
        // Ingress frames are processed from the backlog; keep the order of SYN and answer.
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Well-formed SYNs netrace must track and pair: IPv4 options, a first fragment, 802.1Q,
/// QinQ, an IPv6 chain exactly at the walk bound, an IPv6 first fragment, ECN, 40 bytes of
/// TCP options. Each gets a SYN-ACK (VLAN-tagged ones a tagged one).
fn inject_unusual_but_valid(w: &Wire, plan: &mut Plan) {
    let q = [(ETH_P_8021Q, 42)];
    let qinq = [(ETH_P_8021AD, 100), (ETH_P_8021Q, 42)];
    let at_bound: Vec<Ext> = (0..IPV6_WALK_BOUND)
        .map(|i| match i % 3 {
            0 => Ext::DestOpts { len8: 0 },
            1 => Ext::Routing { len8: 1 },
            _ => Ext::DestOpts { len8: 2 },
        })
        .collect();
    let mut ecn = syn(107);
    ecn.flags |= 0x40 | 0x80;
    let mut big_options = syn(108);
    big_options.options.resize(40, 1);

    let cases: Vec<(u16, Vec<u8>, Vec<u8>)> = vec![
        (
            101,
            syn4_frame(&[], out4().option_bytes(40), &syn(101)),
            tcp4(&[], &in4().option_bytes(12), &synack(101)),
        ),
        (
            102,
            syn4_frame(&[], out4().flags_frag(IP_MF), &syn(102)),
            tcp4(&[], &in4(), &synack(102)),
        ),
        (
            103,
            syn4_frame(&q, out4(), &syn(103)),
            tcp4(&q, &in4(), &synack(103)),
        ),
        (
            104,
            syn4_frame(&qinq, out4(), &syn(104)),
            tcp4(&qinq, &in4(), &synack(104)),
        ),
        (
            105,
            tcp6(&[], &out6().exts(&at_bound), &syn(105)),
            tcp6(
                &[],
                &in6().exts(&[Ext::HopByHop { len8: 0 }, Ext::DestOpts { len8: 1 }]),
                &synack(105),
            ),
        ),
        (
            106,
            tcp6(
                &[],
                &out6().exts(&[Ext::Fragment {
                    offset: 0,
                    more: true,
                }]),
                &syn(106),
            ),
            tcp6(&[], &in6(), &synack(106)),
        ),
        (
            107,
            syn4_frame(&[], out4(), &ecn),
            tcp4(&[], &in4(), &synack(107)),
        ),
        (
            108,
            syn4_frame(&[], out4(), &big_options),
            tcp4(&[], &in4(), &synack(108)),
        ),
    ];
    for (port, syn_frame, answer) in cases {
        w.out(&syn_frame);
        w.inn(&answer);
        plan.answered.insert(port);
    }
}

/// Well-formed SYNs followed by answers that must not count: malformed, fragments, chains
/// beyond the bound, wrong ack, SYN without ACK, RST without ACK, ICMP quoting another
/// sequence number. If netrace misread any of them the SYN would come out answered.
fn inject_decoys(w: &Wire, plan: &mut Plan) {
    let bump = |plan: &mut Plan, name: &'static str| {
        *plan.counters.entry(name).or_default() += 1;
    };
    let too_long: Vec<Ext> = (0..=IPV6_WALK_BOUND)
        .map(|_| Ext::DestOpts { len8: 0 })
        .collect();
    for port in 301..=312u16 {
        let v6 = matches!(port, 306 | 307);
        if v6 {
            w.out(&tcp6(&[], &out6(), &syn(port)));
        } else {
            w.out(&tcp4(&[], &out4(), &syn(port)));
        }
        plan.lost.insert(port);
        let ack = isn_for(port).wrapping_add(1);
        match port {
            301 => {
                let mut f = tcp4(&[], &in4(), &synack(port));
                f.truncate(14 + 20 + 14);
                w.inn(&f);
                bump(plan, "truncated");
            }
            302 => {
                // A later fragment whose payload happens to look like the SYN-ACK.
                w.inn(&tcp4(&[], &in4().flags_frag(185), &synack(port)));
                bump(plan, "fragment");
            }
            303 => {
                w.inn(&tcp4(&[], &in4().ihl(4), &synack(port)));
                bump(plan, "malformed");
            }
            304 => {
                w.inn(&tcp4(&[], &in4(), &synack(port).data_offset(3)));
                bump(plan, "malformed");
            }
            305 => {
                // Data offset 15 without the 40 bytes of options: cut inside its options.
                w.inn(&tcp4(&[], &in4(), &synack(port).data_offset(15)));
                bump(plan, "truncated");
            }
            306 => {
                w.inn(&tcp6(&[], &in6().exts(&too_long), &synack(port)));
                bump(plan, "ipv6_chain_too_long");
            }
            307 => {
                w.inn(&tcp6(
                    &[],
                    &in6().exts(&[Ext::Fragment {
                        offset: 1,
                        more: false,
                    }]),
                    &synack(port),
                ));
                bump(plan, "fragment");
            }
            308 => {
                w.inn(&tcp4(
                    &[],
                    &in4(),
                    &Tcp::answer(port, INJ_PORT, TCP_SYN | TCP_ACK, ack.wrapping_add(1)),
                ));
                bump(plan, "synack_mismatch");
            }
            309 => w.inn(&tcp4(
                &[],
                &in4(),
                &Tcp::answer(port, INJ_PORT, TCP_SYN, ack),
            )),
            310 => w.inn(&tcp4(
                &[],
                &in4(),
                &Tcp::answer(port, INJ_PORT, TCP_RST, ack),
            )),
            311 => w.inn(&icmp_error(
                addr::FW_NODE4.into(),
                (
                    SocketAddr::from((addr::NODE_UP4, port)),
                    SocketAddr::from((INJ4, INJ_PORT)),
                ),
                isn_for(port) ^ 1,
                3,
                1,
            )),
            312 => {
                // IHL 15 with no options: the TCP header would lie beyond the packet.
                w.inn(&tcp4(&[], &in4().ihl(15), &synack(port)));
                bump(plan, "truncated");
            }
            _ => unreachable!(),
        }
    }
}

/// Malformed, truncated and out-of-scope frames in both directions, none of which may be
/// tracked or answer anything. One round; the counters they move are added to `plan`.
fn inject_garbage(w: &Wire, plan: &mut Plan) {
    let mut bump = |name: &'static str| *plan.counters.entry(name).or_default() += 1;
    let too_long: Vec<Ext> = (0..=IPV6_WALK_BOUND)
        .map(|_| Ext::HopByHop { len8: 0 })
        .collect();
    let mut syn_ack = syn(211);
    syn_ack.flags = TCP_SYN | TCP_ACK;
    let mut syn_rst = syn(212);
    syn_rst.flags = TCP_SYN | TCP_RST;
    let mut syn_fin = syn(213);
    syn_fin.flags = TCP_SYN | TCP_FIN;

    // Egress "SYNs" that must not be tracked.
    w.out(&tcp4(&[], &out4(), &syn(201).data_offset(15)));
    let mut cut = tcp4(&[], &out4(), &syn(201));
    cut.truncate(14 + 20 + 24); // inside the TCP options
    w.out(&cut);
    bump("truncated");
    bump("truncated");
    w.out(&tcp4(&[], &out4().ihl(15), &syn(202).without_options()));
    bump("truncated");
    w.out(&tcp4(&[], &out4().ihl(4), &syn(203)));
    bump("malformed");
    w.out(&tcp4(&[], &out4().version(6), &syn(204)));
    bump("malformed");
    w.out(&tcp4(&[], &out4(), &syn(205).data_offset(4)));
    bump("malformed");
    w.out(&tcp6(&[], &out6().version(4), &syn(206)));
    bump("malformed");
    w.out(&tcp4(&[], &out4().flags_frag(IP_MF | 7), &syn(207)));
    bump("fragment");
    w.out(&tcp6(
        &[],
        &out6().exts(&[Ext::Fragment {
            offset: 3,
            more: true,
        }]),
        &syn(208),
    ));
    bump("fragment");
    w.out(&tcp6(&[], &out6().exts(&too_long), &syn(209)));
    bump("ipv6_chain_too_long");
    // Three tags: beyond the parser, ignored without a counter.
    w.out(&tcp4(
        &[(ETH_P_8021AD, 1), (ETH_P_8021Q, 2), (ETH_P_8021Q, 3)],
        &out4(),
        &syn(210),
    ));
    w.out(&tcp4(&[], &out4(), &syn_ack));
    w.out(&tcp4(&[], &out4(), &syn_rst));
    w.out(&tcp4(&[], &out4(), &syn_fin));

    // Truncated at every layer (the kernel refuses frames shorter than an Ethernet header).
    let full4 = tcp4(&[], &out4(), &syn(214));
    w.out(&full4[..14]);
    w.out(&full4[..14 + 10]);
    w.out(&full4[..14 + 20 + 12]);
    for _ in 0..3 {
        bump("truncated");
    }
    let tagged = tcp4(&[(ETH_P_8021Q, 5)], &out4(), &syn(215));
    w.out(&tagged[..16]);
    bump("truncated");
    let full6 = tcp6(&[], &out6().exts(&[Ext::HopByHop { len8: 1 }]), &syn(216));
    w.out(&full6[..14 + 30]);
    w.out(&full6[..14 + 40]);
    w.out(&full6[..14 + 40 + 12]);
    for _ in 0..3 {
        bump("truncated");
    }
    for port in 201..=216 {
        plan.never.insert(port);
    }
    let short = wire::ethernet(&[], ETH_P_IP, &[])[..13].to_vec();
    let err = w
        .egress
        .send(&short)
        .expect_err("a 13-byte frame cannot be sent");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");

    // Ingress: truncated and malformed answers to nothing.
    let answer = tcp4(&[], &in4(), &synack(217));
    w.inn(&answer[..14 + 10]);
    w.inn(&answer[..14 + 20 + 10]);
    bump("truncated");
    bump("truncated");
    w.inn(&tcp4(&[], &in4().ihl(2), &synack(217)));
    bump("malformed");
    let v6 = tcp6(&[], &in6(), &synack(218));
    w.inn(&v6[..14 + 39]);
    bump("truncated");
    w.inn(&wire::ethernet(&[], ETH_P_IPV6, &[0x40; 48]));
    bump("malformed");
}

#[test]
fn malformed_traffic_on_the_wire() {
    require_root();
    let lab = lab(LabOptions::seed());
    let run = start(&lab, &[]);
    let w = Wire::open(&lab);
    let mut plan = Plan::default();
    const ROUNDS: usize = 5;
    let (v4, v6) = std::thread::scope(|s| {
        let v4 = s.spawn(|| connect(&lab, Family::V4, 200));
        let v6 = s.spawn(|| connect(&lab, Family::V6, 100));
        inject_unusual_but_valid(&w, &mut plan);
        inject_decoys(&w, &mut plan);
        for _ in 0..ROUNDS {
            inject_garbage(&w, &mut plan);
            std::thread::sleep(Duration::from_millis(200));
        }
        (v4.join().unwrap(), v6.join().unwrap())
    });
    run.settle();
    let out = stop(run);
    let ctx = out.describe();

    // Real connections: exactly the ground truth, per family.
    let (ok4, lost4) = check_against_truth(&lab, Family::V4, &v4, &out);
    let (ok6, lost6) = check_against_truth(&lab, Family::V6, &v6, &out);

    // Crafted connections: the well-formed ones answered, the decoys lost, nothing else.
    let mut crafted = records_to(&out, INJ4.into());
    crafted.extend(records_to(&out, INJ6.into()));
    assert_eq!(
        ports_with(&crafted, &["answered"]),
        plan.answered,
        "unusual but valid SYNs\n{ctx}"
    );
    assert_eq!(
        ports_with(&crafted, &["lost"]),
        plan.lost,
        "SYNs whose only answers were malformed\n{ctx}"
    );
    assert_eq!(
        crafted.len(),
        plan.answered.len() + plan.lost.len(),
        "other records for crafted traffic: {crafted:?}"
    );
    for c in &crafted {
        let port = src_port(c);
        assert_eq!(
            field(c, "isn").as_u64(),
            Some(u64::from(isn_for(port))),
            "{c}"
        );
        assert_eq!(field(c, "syns").as_u64(), Some(1), "{c}");
        assert_eq!(field(c, "iface").as_str(), Some(lab.node_uplink()), "{c}");
        assert_eq!(
            field(c, "dst_port").as_u64(),
            Some(u64::from(INJ_PORT)),
            "{c}"
        );
    }
    let by_port = syn_packets(&out);
    for p in plan.answered.iter().chain(&plan.lost) {
        assert_eq!(by_port.get(p), Some(&1), "SYN packets from port {p}\n{ctx}");
    }
    for p in &plan.never {
        assert_eq!(
            by_port.get(p),
            None,
            "a malformed SYN from port {p} was counted\n{ctx}"
        );
    }

    // The summary adds up, and the kernel counted each kind of bad frame exactly.
    assert_eq!(
        summary_u64(&out, "/totals/answered"),
        (ok4 + ok6 + plan.answered.len()) as u64,
        "{ctx}"
    );
    assert_eq!(
        summary_u64(&out, "/totals/lost"),
        (lost4 + lost6 + plan.lost.len()) as u64,
        "{ctx}"
    );
    for name in ["refused", "unreachable", "late", "pending_at_exit"] {
        assert_eq!(
            summary_u64(&out, &format!("/totals/{name}")),
            0,
            "{name}\n{ctx}"
        );
    }
    for name in [
        "truncated",
        "malformed",
        "fragment",
        "ipv6_chain_too_long",
        "synack_mismatch",
        "rst_matched",
        "icmp_matched",
        "pending_map_full",
        "ringbuf_full",
    ] {
        assert_eq!(
            counter(&out, name),
            plan.counters.get(name).copied().unwrap_or(0),
            "counter {name} (expected {:?})\n{ctx}",
            plan.counters
        );
    }
    assert_eq!(
        counter(&out, "synack_matched"),
        (ok4 + ok6 + plan.answered.len()) as u64,
        "{ctx}"
    );
    assert_eq!(out.code(), Some(1), "{ctx}");
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

/// Link statistics of `iface` in `ns`: (tx packets, tx bytes, rx packets, rx bytes).
fn link_stats(ns: &str, iface: &str) -> [u64; 4] {
    let out = cmd::run("ip", &["-n", ns, "-s", "-j", "link", "show", "dev", iface])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let n = |p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    [
        n("/0/stats64/tx/packets"),
        n("/0/stats64/tx/bytes"),
        n("/0/stats64/rx/packets"),
        n("/0/stats64/rx/bytes"),
    ]
}

const SINK_PORT: u16 = 9000;

/// A bulk transfer from the node itself (TCP segmentation offload on the veth: the uplink's tc
/// egress sees 64 KiB GSO packets) to a sink in the server namespace, both ways, while pod
/// connections flow: the transfer is one answered connection with one SYN, and the big
/// packets move no counter.
#[test]
fn gso_sized_segments_are_not_syns() {
    require_root();
    let lab = lab(LabOptions::seed().firewall_min_port(1024));
    let run = start(&lab, &[]);
    const UP: usize = 48 << 20;
    const DOWN: usize = 16 << 20;
    let listener = netns::spawn_in(lab.server_ns(), "nrt-sink-bind", || {
        Ok(TcpListener::bind(("0.0.0.0", SINK_PORT))?)
    })
    .unwrap()
    .join()
    .unwrap()
    .unwrap_or_else(|e| panic!("sink: {e:#}"));
    let before = link_stats(lab.node_ns(), lab.node_uplink());
    let ((peer, got), sent, pod) = std::thread::scope(|s| {
        let sink = s.spawn(move || {
            let (mut conn, peer) = listener.accept().expect("accept");
            let mut buf = vec![0u8; 1 << 16];
            let mut got = 0usize;
            loop {
                match conn.read(&mut buf).expect("sink read") {
                    0 => break,
                    n => got += n,
                }
            }
            let chunk = vec![0x5a_u8; 1 << 16];
            for _ in 0..DOWN / chunk.len() {
                conn.write_all(&chunk).expect("sink write");
            }
            (peer, got)
        });
        let node = lab.node_ns().to_owned();
        let sender = netns::spawn_in(&node, "nrt-bulk", move || {
            let mut c = TcpStream::connect_timeout(
                &SocketAddr::new(addr::SRV4.into(), SINK_PORT),
                Duration::from_secs(5),
            )?;
            let chunk = vec![0xa5_u8; 1 << 16];
            for _ in 0..UP / chunk.len() {
                c.write_all(&chunk)?;
            }
            c.shutdown(std::net::Shutdown::Write)?;
            let mut back = Vec::new();
            c.read_to_end(&mut back)?;
            Ok(back.len())
        })
        .unwrap();
        let pod = connect(&lab, Family::V4, 100);
        let sent = sender.join().unwrap().unwrap_or_else(|e| panic!("{e:#}"));
        (sink.join().unwrap(), sent, pod)
    });
    let after = link_stats(lab.node_ns(), lab.node_uplink());
    assert_eq!((got, sent), (UP, DOWN), "the transfer did not complete");
    let d: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let (tx_each, rx_each) = (d[1] / d[0].max(1), d[3] / d[2].max(1));
    eprintln!(
        "uplink: {} packets out ({tx_each} B each), {} packets in ({rx_each} B each)",
        d[0], d[2]
    );
    assert!(
        tx_each > 1514,
        "the uplink sent {} packets for {} bytes ({tx_each} B each): no GSO packets, so this \
         test tests nothing",
        d[0],
        d[1]
    );
    run.settle();
    let out = stop(run);
    let ctx = out.describe();
    let (ok, lost) = check_against_truth(&lab, Family::V4, &pod, &out);
    assert_eq!(lost, 0, "{ctx}");
    let bulk: Vec<_> = records_to(&out, addr::SRV4.into())
        .into_iter()
        .filter(|c| field(c, "dst_port").as_u64() == Some(u64::from(SINK_PORT)))
        .collect();
    assert_eq!(
        bulk.len(),
        1,
        "records of the bulk transfer: {bulk:?}\n{ctx}"
    );
    assert_eq!(
        field(bulk[0], "outcome").as_str(),
        Some("answered"),
        "{ctx}"
    );
    assert_eq!(
        u64::from(src_port(bulk[0])),
        u64::from(peer.port()),
        "{ctx}"
    );
    assert_eq!(field(bulk[0], "syns").as_u64(), Some(1), "{ctx}");
    assert_eq!(syn_packets(&out).get(&peer.port()), Some(&1), "{ctx}");
    assert_eq!(
        summary_u64(&out, "/totals/answered"),
        ok as u64 + 1,
        "{ctx}"
    );
    assert_eq!(summary_u64(&out, "/totals/lost"), 0, "{ctx}");
    for name in [
        "truncated",
        "malformed",
        "fragment",
        "ipv6_chain_too_long",
        "synack_mismatch",
    ] {
        assert_eq!(counter(&out, name), 0, "{name}\n{ctx}");
    }
    assert_eq!(out.code(), Some(0), "{ctx}");
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

// ---- 9. Invalid command lines ----------------------------------------------------------------

/// Runs `prefix... netrace args...` inside `ns`, killing it after `limit`.
fn run_in(ns: &str, prefix: &[&str], args: &[String], limit: Duration) -> NetraceOutput {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_once(&bin(), ns, prefix, &args, limit).unwrap_or_else(|e| panic!("{e:#}"))
}

fn ready_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("nrt-robustness-{}-{tag}.ready", std::process::id()))
}

/// Exit 2, one non-empty line on standard error containing `needle`, nothing on standard
/// output, no ready file, nothing attached to the uplink.
fn assert_refused(lab: &Lab, what: &str, o: &NetraceOutput, needle: &str, ready: &Path) {
    let ctx = format!(
        "{what}: exit {:?}\nstderr: {:?}\nstdout: {:?}",
        o.code(),
        o.stderr,
        o.stdout
    );
    assert_eq!(o.code(), Some(2), "{ctx}");
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not exactly one line on stderr: {ctx}");
    assert!(!lines[0].trim().is_empty(), "{ctx}");
    assert!(o.stderr.ends_with('\n'), "{ctx}");
    assert!(
        lines[0].contains(needle),
        "stderr does not name {needle:?}: {ctx}"
    );
    assert!(o.stdout.is_empty(), "{ctx}");
    assert!(!ready.exists(), "ready file written: {ctx}");
    assert_nothing_attached(lab.node_ns(), lab.node_uplink(), &ctx);
}

#[test]
fn invalid_command_lines() {
    require_root();
    let lab = lab(LabOptions::seed().ipv6(false));
    let ready = ready_path("cli");
    let _ = std::fs::remove_file(&ready);
    let uplink = lab.node_uplink().to_owned();
    let base = |duration: bool| -> Vec<String> {
        let mut v: Vec<String> = vec![
            "watch".into(),
            "--iface".into(),
            uplink.clone(),
            "--ready-file".into(),
            ready.to_string_lossy().into_owned(),
        ];
        if duration {
            v.extend(["--duration".into(), "3s".into()]);
        }
        v
    };

    // The control: good options attach (so "nothing attached" below means something).
    let good = {
        let args = base(true);
        let ns = lab.node_ns().to_owned();
        std::thread::spawn(move || run_in(&ns, &[], &args, Duration::from_secs(30)))
    };
    let t0 = Instant::now();
    while !ready.exists() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ready.exists(), "the control run never became ready");
    let during = inspect::snapshot(lab.node_ns(), &uplink).unwrap();
    assert_eq!(
        (during.tcx_ingress.len(), during.tcx_egress.len()),
        (1, 1),
        "{during:?}"
    );
    let good = good.join().unwrap();
    assert_eq!(good.code(), Some(0), "control run: {}", good.stderr);
    assert_nothing_attached(lab.node_ns(), &uplink, "after the control run");
    std::fs::remove_file(&ready).unwrap();

    let no_procfs = std::env::temp_dir();
    let s = |v: &str| v.to_string();
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("--iface", vec![s("--iface"), s("nrtnosuchif0")]),
        ("--iface", vec![s("--iface"), s("nrtnosuch*")]),
        ("--iface", vec![s("--iface")]),
        ("--allowed-ports", vec![s("--allowed-ports"), s("70000-1")]),
        ("--allowed-ports", vec![s("--allowed-ports"), s("a-b")]),
        ("--allowed-ports", vec![s("--allowed-ports"), s("")]),
        (
            "--allowed-ports",
            vec![s("--allowed-ports"), s("2000-1000")],
        ),
        ("--allowed-ports", vec![s("--allowed-ports"), s("0-10")]),
        ("--buckets", vec![s("--buckets"), s("a,b")]),
        ("--buckets", vec![s("--buckets"), s("1024,70000")]),
        ("--buckets", vec![s("--buckets"), s("0")]),
        ("--buckets", vec![s("--buckets"), s("-5")]),
        ("--syn-timeout", vec![s("--syn-timeout"), s("0s")]),
        ("--syn-timeout", vec![s("--syn-timeout"), s("abc")]),
        ("--syn-timeout", vec![s("--syn-timeout"), s("-1")]),
        ("--syn-timeout", vec![s("--syn-timeout=-1s")]),
        ("--syn-timeout", vec![s("--syn-timeout"), s("--list-lost")]),
        ("--duration", vec![s("--duration"), s("0s")]),
        ("--duration", vec![s("--duration"), s("forever")]),
        ("--duration", vec![s("--duration"), s("3 parsecs")]),
        ("--duration", vec![s("--duration"), s("-5")]),
        ("--filter-dst", vec![s("--filter-dst"), s("nonsense/8")]),
        ("--filter-dst", vec![s("--filter-dst"), s("198.18.0.0/33")]),
        ("--filter-dst", vec![s("--filter-dst"), s("2001:db8::/129")]),
        ("--filter-dport", vec![s("--filter-dport"), s("0")]),
        ("--filter-dport", vec![s("--filter-dport"), s("70000")]),
        ("--filter-dport", vec![s("--filter-dport"), s("http")]),
        ("--filter-dport", vec![s("--filter-dport"), s("-1")]),
        ("--output", vec![s("--output"), s("xml")]),
        ("--attach", vec![s("--attach"), s("ebpf")]),
        ("--max-pending", vec![s("--max-pending"), s("0")]),
        ("--max-pending", vec![s("--max-pending"), s("20000000")]),
        ("--max-pending", vec![s("--max-pending"), s("99999999999")]),
        ("--max-pending", vec![s("--max-pending"), s("lots")]),
        ("--max-pending", vec![s("--max-pending"), s("-1")]),
        ("--ringbuf-kib", vec![s("--ringbuf-kib"), s("3")]),
        ("--ringbuf-kib", vec![s("--ringbuf-kib"), s("5")]),
        ("--ringbuf-kib", vec![s("--ringbuf-kib"), s("2097152")]),
        ("--ringbuf-kib", vec![s("--ringbuf-kib"), s("-4")]),
        (
            "--svg",
            vec![s("--svg"), s("/nonexistent-nrt/dir/loss.svg")],
        ),
        (
            "--procfs",
            vec![s("--procfs"), no_procfs.to_string_lossy().into_owned()],
        ),
        ("--procfs", vec![s("--procfs"), s("/nonexistent-nrt")]),
        ("--metrics-addr", vec![s("--metrics-addr"), s("bad")]),
        (
            "--metrics-addr",
            vec![s("--metrics-addr"), s("127.0.0.1:99999")],
        ),
        (
            "--ready-file",
            vec![s("--ready-file"), s("/nonexistent-nrt/dir/ready")],
        ),
        ("--bogus", vec![s("--bogus")]),
        ("--ifac", vec![s("--ifac"), s("lo")]),
        ("--list-lost", vec![s("--list-lost=yes")]),
        ("-Z", vec![s("-Z")]),
    ];
    let mut failures = Vec::new();
    for (option, bad) in &cases {
        let mut args = base(*option != "--duration");
        args.extend(bad.iter().cloned());
        let o = run_in(lab.node_ns(), &[], &args, Duration::from_secs(20));
        let what = format!("{bad:?}");
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert_refused(&lab, &what, &o, option, &ready)
        })) {
            failures.push(
                e.downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| what.clone()),
            );
        }
        let _ = std::fs::remove_file(&ready);
    }

    // A metrics port somebody else already listens on.
    let busy = netns::spawn_in(lab.node_ns(), "nrt-busy-port", || {
        Ok(TcpListener::bind("127.0.0.1:0")?)
    })
    .unwrap()
    .join()
    .unwrap()
    .unwrap();
    let mut args = base(true);
    args.extend([
        "--metrics-addr".into(),
        busy.local_addr().unwrap().to_string(),
    ]);
    let o = run_in(lab.node_ns(), &[], &args, Duration::from_secs(20));
    if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_refused(&lab, "--metrics-addr in use", &o, "--metrics-addr", &ready)
    })) {
        failures.push(e.downcast_ref::<String>().cloned().unwrap_or_default());
    }
    drop(busy);
    // An unknown subcommand.
    let o = run_in(
        lab.node_ns(),
        &[],
        &["wach".into(), "--iface".into(), uplink.clone()],
        Duration::from_secs(20),
    );
    if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_refused(&lab, "unknown subcommand", &o, "wach", &ready)
    })) {
        failures.push(e.downcast_ref::<String>().cloned().unwrap_or_default());
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad command lines were not refused properly:\n{}",
        failures.len(),
        cases.len() + 2,
        failures.join("\n")
    );
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

// ---- 10. No privileges -----------------------------------------------------------------------

/// The names inside "(missing ...)" of the privilege message.
fn missing_caps(line: &str) -> Vec<String> {
    let Some(start) = line.find("(missing ") else {
        return Vec::new();
    };
    let rest = &line[start + "(missing ".len()..];
    let end = rest.find(')').unwrap_or(rest.len());
    rest[..end].split(", ").map(str::to_owned).collect()
}

#[test]
fn no_privileges() {
    require_root();
    let lab = lab(LabOptions::seed().ipv6(false));
    let ready = ready_path("privs");
    let _ = std::fs::remove_file(&ready);
    let args: Vec<String> = vec![
        "watch".into(),
        "--iface".into(),
        lab.node_uplink().into(),
        "--ready-file".into(),
        ready.to_string_lossy().into_owned(),
        "--duration".into(),
        "3s".into(),
    ];
    let all = ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"];
    let drop_caps = |set: &str| {
        let list: Vec<String> = set.split(',').map(|c| format!("-{c}")).collect();
        format!("--bounding-set={}", list.join(","))
    };
    let variants: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "nobody",
            vec![
                "setpriv".into(),
                "--reuid=65534".into(),
                "--regid=65534".into(),
                "--clear-groups".into(),
            ],
            all.to_vec(),
        ),
        (
            "root without bpf, net_admin, perfmon, sys_admin",
            vec![
                "setpriv".into(),
                "--inh-caps=-all".into(),
                drop_caps("bpf,net_admin,perfmon,sys_admin"),
            ],
            all.to_vec(),
        ),
        (
            "root without bpf, sys_admin",
            vec![
                "setpriv".into(),
                "--inh-caps=-all".into(),
                drop_caps("bpf,sys_admin"),
            ],
            vec!["CAP_BPF"],
        ),
        (
            "root without net_admin",
            vec![
                "setpriv".into(),
                "--inh-caps=-all".into(),
                drop_caps("net_admin"),
            ],
            vec!["CAP_NET_ADMIN"],
        ),
        (
            "root without perfmon, sys_admin",
            vec![
                "setpriv".into(),
                "--inh-caps=-all".into(),
                drop_caps("perfmon,sys_admin"),
            ],
            vec!["CAP_PERFMON"],
        ),
    ];
    for (what, prefix, missing) in &variants {
        let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
        let o = run_in(lab.node_ns(), &prefix, &args, Duration::from_secs(20));
        assert_refused(&lab, what, &o, "privileges", &ready);
        assert_eq!(
            missing_caps(o.stderr.trim()),
            missing.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            "{what}: {}",
            o.stderr
        );
    }
    // The same through capsh, as an operator would try it.
    let line = std::iter::once("exec".to_string())
        .chain(std::iter::once(bin().to_string_lossy().into_owned()))
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let o = run_in_shell(
        lab.node_ns(),
        &[
            "capsh",
            "--drop=cap_bpf,cap_sys_admin,cap_net_admin",
            "--",
            "-c",
            &line,
        ],
    );
    assert_refused(&lab, "capsh --drop", &o, "privileges", &ready);
    assert_eq!(
        missing_caps(o.stderr.trim()),
        vec!["CAP_BPF".to_string(), "CAP_NET_ADMIN".to_string()],
        "{}",
        o.stderr
    );
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

/// Runs `args` (a full command, not netrace itself) inside `ns`.
fn run_in_shell(ns: &str, args: &[&str]) -> NetraceOutput {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running capsh");
    NetraceOutput::from_captured(
        format!("ip netns exec {ns} {}", args.join(" ")),
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---- 11. Many interfaces ---------------------------------------------------------------------

/// 100 veth pairs (200 interfaces) in the node namespace, named after the lab; deleted with it.
fn add_veths(lab: &Lab, pairs: usize) -> Vec<String> {
    let stem = &lab.names().stem;
    let mut batch = String::new();
    let mut names = Vec::new();
    for i in 0..pairs {
        let (a, b) = (format!("{stem}{i:02}a"), format!("{stem}{i:02}b"));
        assert!(a.len() <= 15, "{a} is too long for an interface name");
        batch.push_str(&format!("link add {a} type veth peer name {b}\n"));
        batch.push_str(&format!("link set {a} up\nlink set {b} up\n"));
        names.push(a);
        names.push(b);
    }
    cmd::run_with_input("ip", &["-n", lab.node_ns(), "-batch", "-"], Some(&batch))
        .unwrap_or_else(|e| panic!("{e:#}"));
    names
}

/// Qdiscs of every interface in `ns` that carry filters netrace might have added.
fn classifier_qdiscs(ns: &str) -> Vec<String> {
    cmd::run("tc", &["-n", ns, "qdisc", "show"])
        .unwrap_or_else(|e| panic!("{e:#}"))
        .lines()
        .filter(|l| l.contains("clsact") || l.contains("ingress"))
        .map(str::to_owned)
        .collect()
}

fn many_interfaces_case(lab: &Lab, ifaces: &[String], extra: &[String], clsact: bool) {
    let mut args: Vec<&str> = extra.iter().map(String::as_str).collect();
    if clsact {
        args.extend(["--attach", "clsact"]);
    }
    let run = start(lab, &args);
    let t = inspect::tcx_counts(lab.node_ns(), ifaces).unwrap_or_else(|e| panic!("{e:#}"));
    if clsact {
        assert!(
            t.iter().all(|c| *c == (0, 0)),
            "TCX programs with clsact: {t:?}"
        );
        let q = classifier_qdiscs(lab.node_ns());
        assert_eq!(q.len(), ifaces.len(), "clsact qdiscs while attached: {q:?}");
    } else {
        let missing: Vec<_> = ifaces
            .iter()
            .zip(&t)
            .filter(|(_, c)| **c != (1, 1))
            .collect();
        assert!(
            missing.is_empty(),
            "not attached (ingress, egress): {missing:?}"
        );
    }
    let attempts = connect(lab, Family::V4, 100);
    run.settle();
    let out = stop(run);
    let ctx = out.describe();
    let listed = out
        .summary_at("/interfaces")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    assert_eq!(listed, ifaces.len(), "{ctx}");
    let (ok, lost) = check_against_truth(lab, Family::V4, &attempts, &out);
    assert_eq!((ok, lost), (attempts.len(), 0), "{ctx}");
    assert_eq!(out.code(), Some(0), "{ctx}");
    let after = inspect::tcx_counts(lab.node_ns(), ifaces).unwrap_or_else(|e| panic!("{e:#}"));
    let left: Vec<_> = ifaces
        .iter()
        .zip(&after)
        .filter(|(_, c)| **c != (0, 0))
        .collect();
    assert!(left.is_empty(), "TCX programs left after exit: {left:?}");
    let q = classifier_qdiscs(lab.node_ns());
    assert!(q.is_empty(), "qdiscs left after exit: {q:?}");
}

#[test]
fn many_interfaces() {
    require_root();
    let lab = lab(LabOptions::seed().firewall_min_port(1024).ipv6(false));
    let veths = add_veths(&lab, 100);
    assert_eq!(veths.len(), 200);
    let mut all = veths.clone();
    all.push(lab.node_uplink().to_owned());
    all.push(lab.names().node_pod_if.clone());
    all.sort();

    // A glob: the 200 veths, the uplink and the pod-side interface.
    let glob = vec!["--iface".to_string(), format!("{}*", lab.names().stem)];
    many_interfaces_case(&lab, &all, &glob, false);
    // 200 explicit --iface options (plus the uplink).
    let mut explicit: Vec<String> = Vec::new();
    for v in &veths {
        explicit.extend(["--iface".to_string(), v.clone()]);
    }
    let mut with_uplink = veths.clone();
    with_uplink.push(lab.node_uplink().to_owned());
    with_uplink.sort();
    many_interfaces_case(&lab, &with_uplink, &explicit, false);
    // The glob again with legacy clsact filters.
    many_interfaces_case(&lab, &all, &glob, true);
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

// ---- 14. A long run --------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Sample {
    at_unix_ms: u64,
    memory: inspect::Memory,
    pending_metric: f64,
    kernel_entries: usize,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Steady connections for `length` with netrace watching: its memory stays flat, the pending
/// gauge and the kernel's pending map stay bounded by what is really in flight (plus lost
/// connections inside the 60 s late window), and the summary matches the client.
fn steady_run(length: Duration) {
    require_root();
    // The firewall drops 1024-2047: about 1.6 % of connections are lost, so the lost and
    // late-window paths run too.
    let lab = lab(LabOptions::seed().firewall_min_port(2048).ipv6(false));
    const METRICS: &str = "127.0.0.1:19478";
    const WORKERS: usize = 8;
    let run = start(&lab, &["--metrics-addr", METRICS, "--ringbuf-kib", "256"]);
    let pid = run.pid();
    let map = inspect::process_map(pid, "TABLE_V4").unwrap_or_else(|e| panic!("{e:#}"));
    let metrics: SocketAddr = METRICS.parse().unwrap();
    let client = lab.client_with(ClientOptions {
        workers: WORKERS,
        ..ClientOptions::default()
    });
    let server = lab.server_addr(Family::V4);
    let stop_at = Instant::now() + length;
    let sample = || Sample {
        at_unix_ms: unix_ms(),
        memory: inspect::memory(pid).unwrap_or_else(|e| panic!("{e:#}")),
        pending_metric: inspect::http_get(lab.node_ns(), metrics, "/metrics")
            .ok()
            .and_then(|t| inspect::metric(&t, "netrace_pending_connections"))
            .unwrap_or(f64::NAN),
        kernel_entries: map.table_entries().unwrap_or_else(|e| panic!("{e:#}")),
    };
    let (attempts, mut samples) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut v = Vec::new();
            while Instant::now() < stop_at {
                v.push(sample());
                std::thread::sleep(Duration::from_secs(1));
            }
            v
        });
        let mut attempts: Vec<TcpAttempt> = Vec::new();
        while Instant::now() < stop_at {
            let slot = Instant::now();
            let batch = client
                .tcp(server, 16, &|_, _| {})
                .unwrap_or_else(|e| panic!("{e:#}"));
            attempts.extend(batch);
            std::thread::sleep(Duration::from_millis(250).saturating_sub(slot.elapsed()));
        }
        (attempts, sampler.join().unwrap())
    });
    run.settle();
    let settled = sample();
    samples.push(settled);
    let out = stop(run);
    let ctx = out.describe();
    let c = TcpCounts::of(&attempts);
    eprintln!(
        "steady run of {length:?}: {} connections ({} timed out), {} samples, RssAnon {} -> {} \
         KiB, max pending gauge {}, max kernel entries {}",
        c.attempts,
        c.timed_out,
        samples.len(),
        samples.first().map_or(0, |s| s.memory.anon_kib),
        settled.memory.anon_kib,
        samples.iter().map(|s| s.pending_metric).fold(0.0, f64::max),
        samples.iter().map(|s| s.kernel_entries).max().unwrap_or(0)
    );
    assert_eq!((c.refused, c.unreachable, c.other), (0, 0, 0), "{c:?}");

    // The summary matches the client.
    assert_eq!(
        summary_u64(&out, "/totals/attempts"),
        c.attempts as u64,
        "{ctx}"
    );
    assert_eq!(
        summary_u64(&out, "/totals/answered"),
        c.connected as u64,
        "{ctx}"
    );
    assert_eq!(
        summary_u64(&out, "/totals/lost"),
        c.timed_out as u64,
        "{ctx}"
    );
    assert_eq!(summary_u64(&out, "/totals/pending_at_exit"), 0, "{ctx}");
    for d in ["events_lost", "pending_map_full", "decode_errors"] {
        assert_eq!(summary_u64(&out, &format!("/drops/{d}")), 0, "{d}\n{ctx}");
    }
    assert_eq!(out.code(), Some(i32::from(c.timed_out > 0)), "{ctx}");

    // Bounded state: the gauge by what is in flight, the kernel map by that plus the lost
    // connections still inside the late window (60 s after their first SYN, plus slack).
    let in_flight = (4 * WORKERS + 16) as f64;
    for s in &samples {
        assert!(
            s.pending_metric.is_nan() || s.pending_metric <= in_flight,
            "pending gauge {} > {in_flight}: {s:?}",
            s.pending_metric
        );
        let lost_in_window = attempts
            .iter()
            .filter(|a| a.outcome == TcpOutcome::TimedOut)
            .filter(|a| {
                a.started_unix_ms + 70_000 >= s.at_unix_ms && a.started_unix_ms <= s.at_unix_ms
            })
            .count();
        let bound = 4 * WORKERS + 16 + lost_in_window;
        assert!(
            s.kernel_entries <= bound,
            "kernel pending map holds {} entries, more than {bound} in flight or in the late \
             window: {s:?}",
            s.kernel_entries
        );
    }
    assert!(
        samples
            .iter()
            .filter(|s| !s.pending_metric.is_nan())
            .count()
            >= samples.len() / 2,
        "most /metrics scrapes failed"
    );
    assert_eq!(
        settled.pending_metric, 0.0,
        "pending gauge after settling: {settled:?}"
    );

    // Flat memory: after a warm-up third, the median of the last quarter is within 1 MiB + 5 %
    // of the median of the second third.
    let n = samples.len();
    let anon =
        |r: std::ops::Range<usize>| median(samples[r].iter().map(|s| s.memory.anon_kib).collect());
    let early = anon(n / 3..(2 * n / 3).max(n / 3 + 1));
    let late = anon((3 * n / 4).min(n - 1)..n);
    assert!(
        late <= early + 1024 + early / 20,
        "RssAnon grew from {early} KiB to {late} KiB over the run: {:?}",
        samples
            .iter()
            .map(|s| s.memory.anon_kib)
            .collect::<Vec<_>>()
    );
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn steady_run_30s() {
    steady_run(Duration::from_secs(30));
}

#[test]
#[ignore = "10 minutes; run with `cargo xtask test --long`"]
fn long_run_10min() {
    steady_run(Duration::from_secs(600));
}

// ---- 15. Sequence-number wrap ----------------------------------------------------------------

#[test]
fn sequence_number_wrap() {
    require_root();
    let lab = lab(LabOptions::seed());
    let run = start(&lab, &[]);
    let w = Wire::open(&lab);
    let syn_isn = |sport: u16, isn: u32| Tcp::syn(sport, INJ_PORT, isn);
    let answer = |sport: u16, flags: u8, ack: u32| Tcp::answer(sport, INJ_PORT, flags, ack);
    let sa = TCP_SYN | TCP_ACK;
    let max = u32::MAX;
    // (port, isn, answer ack): SYN-ACKs acknowledging isn + 1 across the wrap.
    for (port, isn, ack) in [
        (401u16, max, 0u32),
        (402, max - 1, max),
        (403, 0, 1),
        (404, 0x7fff_ffff, 0x8000_0000),
    ] {
        w.out(&tcp4(&[], &out4(), &syn_isn(port, isn)));
        w.inn(&tcp4(&[], &in4(), &answer(port, sa, ack)));
    }
    // IPv6.
    w.out(&tcp6(&[], &out6(), &syn_isn(408, max)));
    w.inn(&tcp6(&[], &in6(), &answer(408, sa, 0)));
    // RST acknowledging the wrapped ISN: refused.
    w.out(&tcp4(&[], &out4(), &syn_isn(405, max)));
    w.inn(&tcp4(&[], &in4(), &answer(405, TCP_RST | TCP_ACK, 0)));
    // ICMP host unreachable quoting sequence number 0xffffffff: unreachable.
    w.out(&tcp4(&[], &out4(), &syn_isn(406, max)));
    w.inn(&icmp_error(
        addr::FW_NODE4.into(),
        (
            SocketAddr::from((addr::NODE_UP4, 406)),
            SocketAddr::from((INJ4, INJ_PORT)),
        ),
        max,
        3,
        1,
    ));
    // Off by one on either side of the wrap: no answer, lost.
    w.out(&tcp4(&[], &out4(), &syn_isn(407, max)));
    w.inn(&tcp4(&[], &in4(), &answer(407, sa, max)));
    w.inn(&tcp4(&[], &in4(), &answer(407, sa, 1)));
    // A retransmission of the wrapped ISN, then its answer.
    w.out(&tcp4(&[], &out4(), &syn_isn(409, max)));
    w.out(&tcp4(&[], &out4(), &syn_isn(409, max)));
    w.inn(&tcp4(&[], &in4(), &answer(409, sa, 0)));
    // A new ISN (0) on the same 4-tuple replaces the wrapped one: abandoned, then answered.
    w.out(&tcp4(&[], &out4(), &syn_isn(410, max)));
    w.out(&tcp4(&[], &out4(), &syn_isn(410, 0)));
    w.inn(&tcp4(&[], &in4(), &answer(410, sa, 1)));
    run.settle();
    let out = stop(run);
    let ctx = out.describe();

    let mut got: Vec<(u16, String, u64, u64, Option<u64>)> = records_to(&out, INJ4.into())
        .into_iter()
        .chain(records_to(&out, INJ6.into()))
        .map(|c| {
            (
                src_port(c),
                field(c, "outcome").as_str().unwrap_or("?").to_owned(),
                field(c, "isn").as_u64().unwrap_or(u64::MAX),
                field(c, "syns").as_u64().unwrap_or(0),
                field(c, "icmp_code").as_u64(),
            )
        })
        .collect();
    got.sort();
    let m = u64::from(max);
    let s = |o: &str| o.to_string();
    let want: Vec<(u16, String, u64, u64, Option<u64>)> = vec![
        (401, s("answered"), m, 1, None),
        (402, s("answered"), m - 1, 1, None),
        (403, s("answered"), 0, 1, None),
        (404, s("answered"), 0x7fff_ffff, 1, None),
        (405, s("refused"), m, 1, None),
        (406, s("unreachable"), m, 1, Some(1)),
        (407, s("lost"), m, 1, None),
        (408, s("answered"), m, 1, None),
        (409, s("answered"), m, 2, None),
        (410, s("abandoned"), m, 1, None),
        (410, s("answered"), 0, 1, None),
    ];
    assert_eq!(got, want, "{ctx}");
    for (name, n) in [
        ("synack_matched", 7),
        ("rst_matched", 1),
        ("icmp_matched", 1),
        ("synack_mismatch", 2),
        ("syn_retransmit", 1),
    ] {
        assert_eq!(counter(&out, name), n, "{name}\n{ctx}");
    }
    for c in records_to(&out, INJ4.into()) {
        if field(c, "outcome") == "answered" {
            assert!(
                field(c, "rtt_us").as_u64().is_some_and(|r| r < 5_000_000),
                "an implausible rtt: {c}"
            );
        }
    }
    assert_eq!(out.code(), Some(1), "{ctx}");
    lab.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}
