use super::*;
use crate::probe::infer::{infer, Plan};
use crate::probe::udp::{compare_udp, udp_ports, UdpKind};
use crate::render::{probe_json::json_lines, probe_text::write_text};

fn setup(primary: Proto) -> Setup {
    Setup {
        target: "server:8080".into(),
        address: SocketAddr::from(([198, 18, 3, 2], 8080)),
        family: "ipv4",
        local_addr: Some(IpAddr::from([198, 18, 2, 1])),
        primary,
        compare_udp: primary == Proto::Tcp,
        ports: PortRange::new(1024, 65535),
        samples: 128,
        max_extra: 40,
        timeout_ms: 300,
        rate: 50.0,
    }
}

fn node(lo: u16, hi: u16) -> NodePorts {
    NodePorts {
        ip_local_port_range: Some((lo, hi)),
        ip_local_reserved_ports: String::new(),
        tcp_syn_retries: Some(6),
    }
}

/// The records a network oracle would have kept for `inf`.
fn records(proto: Proto, inf: &Inference) -> Vec<Record> {
    inf.probes
        .iter()
        .map(|p| Record {
            proto,
            port: p.port,
            outcome: p.outcome,
            rtt_us: None,
            detail: None,
        })
        .collect()
}

/// Runs the inference against `oracle` and turns its outcomes into records.
fn probe(proto: Proto, oracle: &mut impl FnMut(u16) -> Outcome) -> (Inference, Vec<Record>) {
    let plan = Plan {
        range: PortRange::new(1024, 65535),
        samples: 128,
        max_extra: 40,
    };
    let inf = infer(&plan, oracle).unwrap_or_else(|e| panic!("{e:#}"));
    let records = records(proto, &inf);
    (inf, records)
}

fn threshold(min: u16) -> impl FnMut(u16) -> Outcome {
    move |p| {
        if p >= min {
            Outcome::Answered
        } else {
            Outcome::Timeout
        }
    }
}

fn udp_records(ports: &[u16], mut f: impl FnMut(u16) -> Outcome) -> Vec<Record> {
    ports
        .iter()
        .map(|&port| Record {
            proto: Proto::Udp,
            port,
            outcome: f(port),
            rtt_us: None,
            detail: None,
        })
        .collect()
}

fn text(s: &Summary) -> String {
    let mut out = Vec::new();
    write_text(&mut out, s).unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn the_seed_case_reads_like_the_article() {
    let (inf, recs) = probe(Proto::Tcp, &mut threshold(32768));
    let ports = udp_ports(PortRange::new(1024, 65535), 128, &inf.analysis);
    assert!(
        ports.contains(&32767) && ports.contains(&32768),
        "{ports:?}"
    );
    let udp = udp_records(&ports, |_| Outcome::Answered);
    let s = build(
        setup(Proto::Tcp),
        &inf,
        &recs,
        Some(&udp),
        &node(32768, 60999),
    );
    assert_eq!(s.inference.kind, Kind::Range);
    assert_eq!(s.inference.allowed, Some(PortRange::new(32768, 65535)));
    assert!(s.inference.exact);
    assert!(s
        .inference
        .headline
        .contains("SYN-ACKs come back only to source ports 32768-65535"));
    let u = s.udp.as_ref().unwrap_or_else(|| panic!("no UDP"));
    assert_eq!(u.kind, UdpKind::TcpOnlyFilter);
    assert!(u.where_tcp_silent > 0 && u.where_tcp_silent == u.where_tcp_silent_came_back);
    assert_eq!(s.node.local_range_inside_allowed, Some(true));
    assert!(!s.fix.iter().any(|f| f.contains("sysctl")), "{:?}", s.fix);
    assert!(s.fix.iter().any(|f| f.contains("--to-ports 32768-65535")));
    assert!(!s.snat_warning);
    assert_eq!(s.exit_code, 1);
    // Buckets split at the edge: every bucket below is silent, every bucket above answers.
    for b in &s.buckets {
        let expect = if b.end < 32768 { "silent" } else { "answers" };
        assert_eq!(b.result, expect, "{b:?}");
    }
    let t = text(&s);
    assert!(
        t.contains("lower edge 32768: exact (port 32767 got no answer, port 32768 did)"),
        "{t}"
    );
    assert!(t.contains("32768-49151"), "{t}");
    assert!(
        t.contains("note: this assumes the firewall sees the source port bound here"),
        "{t}"
    );
    assert!(t.contains("netrace watch"), "{t}");
    let json = json_lines(&s, &inf, &recs, &udp).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(json.len(), recs.len() + udp.len() + 1);
    let v: serde_json::Value =
        serde_json::from_str(json.last().map_or("", |s| s.as_str())).unwrap_or_default();
    assert_eq!(v["type"], "summary");
    assert_eq!(v["inference"]["allowed"]["start"], 32768);
    assert_eq!(v["inference"]["lower"]["status"], "exact");
    assert_eq!(v["udp"]["kind"], "tcp_only_filter");
    assert_eq!(v["primary"], "tcp");
    let first: serde_json::Value = serde_json::from_str(&json[0]).unwrap_or_default();
    assert_eq!(first["type"], "probe");
    assert_eq!(first["port"], 1024);
    assert_eq!(first["outcome"], "timeout");
    assert_eq!(first["phase"], "sample");
}

#[test]
fn a_local_range_outside_gets_a_sysctl() {
    let (inf, recs) = probe(Proto::Tcp, &mut threshold(40000));
    let s = build(setup(Proto::Tcp), &inf, &recs, None, &node(32768, 60999));
    assert_eq!(s.node.local_range_inside_allowed, Some(false));
    assert!(
        s.fix
            .iter()
            .any(|f| f.contains("net.ipv4.ip_local_port_range=\"40000 60999\"")),
        "{:?}",
        s.fix
    );
    let t = text(&s);
    assert!(
        t.contains("does NOT fit inside 40000-65535; this host's own connections that draw a port in 32768-39999 will hang"),
        "{t}"
    );
    // Nothing of the current range fits: the whole allowed range, from 1024 up.
    let mut st = setup(Proto::Tcp);
    st.ports = PortRange::new(1, 65535);
    let plan = Plan {
        range: st.ports,
        samples: 128,
        max_extra: 40,
    };
    let inf = infer(&plan, &mut |p: u16| {
        if (500..=30000).contains(&p) {
            Outcome::Answered
        } else {
            Outcome::Timeout
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    let recs = records(Proto::Tcp, &inf);
    let s = build(st, &inf, &recs, None, &node(32768, 60999));
    assert_eq!(s.inference.allowed, Some(PortRange::new(500, 30000)));
    assert!(
        s.fix
            .iter()
            .any(|f| f.contains("net.ipv4.ip_local_port_range=\"1024 30000\"")),
        "{:?}",
        s.fix
    );
    assert!(s.fix.iter().any(|f| f.contains("--to-ports 500-30000")));
}

#[test]
fn udp_comparisons() {
    let (inf, _) = probe(Proto::Tcp, &mut threshold(32768));
    let ports = udp_ports(PortRange::new(1024, 65535), 128, &inf.analysis);
    let a = &inf.analysis;
    let r = compare_udp(a, &udp_records(&ports, |_| Outcome::Timeout), 8080);
    assert_eq!(r.kind, UdpKind::NoReply);
    assert!(r.text.contains("no reply expected"), "{}", r.text);
    let r = compare_udp(a, &udp_records(&ports, |_| Outcome::Refused), 8080);
    assert_eq!(r.kind, UdpKind::UdpClosed);
    // ICMP errors are rate-limited: some refused, the rest silent is still "closed".
    let mut n = 0;
    let r = compare_udp(
        a,
        &udp_records(&ports, |_| {
            n += 1;
            if n <= 6 {
                Outcome::Refused
            } else {
                Outcome::Timeout
            }
        }),
        8080,
    );
    assert_eq!(r.kind, UdpKind::UdpClosed);
    let r = compare_udp(a, &udp_records(&ports, threshold(32768)), 8080);
    assert_eq!(r.kind, UdpKind::SameAsTcp);
    let (all, _) = probe(Proto::Tcp, &mut |_| Outcome::Answered);
    let r = compare_udp(
        &all.analysis,
        &udp_records(&ports, |_| Outcome::Answered),
        8080,
    );
    assert_eq!(r.kind, UdpKind::BothThrough);
}

#[test]
fn random_results_warn_about_snat() {
    let (inf, recs) = probe(Proto::Tcp, &mut |p| {
        if (u32::from(p).wrapping_mul(2_654_435_761) >> 16) % 2 == 0 {
            Outcome::Answered
        } else {
            Outcome::Timeout
        }
    });
    let s = build(setup(Proto::Tcp), &inf, &recs, None, &node(32768, 60999));
    assert_eq!(s.inference.kind, Kind::NotARange);
    assert!(s.snat_warning);
    assert!(s.fix.is_empty());
    let t = text(&s);
    assert!(
        t.contains("does not look like a source-port range filter"),
        "{t}"
    );
    assert!(
        t.contains("WARNING: the firewall may not see the source port bound here"),
        "{t}"
    );
}

#[test]
fn a_private_source_towards_a_public_server_is_a_snat_hint() {
    let (inf, recs) = probe(Proto::Tcp, &mut threshold(32768));
    let mut st = setup(Proto::Tcp);
    st.local_addr = Some(IpAddr::from([10, 1, 2, 3]));
    st.address = SocketAddr::from(([203, 0, 113, 10], 443));
    let s = build(st, &inf, &recs, None, &node(32768, 60999));
    assert!(s.snat_warning);
    assert!(s.notes.iter().any(|n| n.contains("10.1.2.3 is private")));
    assert!(is_private(IpAddr::from([100, 64, 0, 1])));
    assert!(!is_private(IpAddr::from([100, 128, 0, 1])));
    assert!(is_private(
        "fd00::1".parse().unwrap_or(IpAddr::from([0; 4]))
    ));
    assert!(!is_private(
        "2001:db8::1".parse().unwrap_or(IpAddr::from([10, 0, 0, 1]))
    ));
}

#[test]
fn all_none_and_udp_only() {
    let (inf, recs) = probe(Proto::Tcp, &mut |_| Outcome::Answered);
    let s = build(setup(Proto::Tcp), &inf, &recs, None, &node(32768, 60999));
    assert_eq!(s.exit_code, 0);
    assert!(s.fix.is_empty());
    assert!(s.inference.headline.contains("no source-port filter"));
    assert!(text(&s).contains("lower edge: open"));
    let (inf, recs) = probe(Proto::Udp, &mut |_| Outcome::Timeout);
    let s = build(setup(Proto::Udp), &inf, &recs, None, &node(32768, 60999));
    assert_eq!(s.inference.kind, Kind::NoneAnswered);
    assert!(s.inference.headline.contains("no reply expected"));
    assert_eq!(s.exit_code, 1);
    let (inf, recs) = probe(Proto::Tcp, &mut |_| Outcome::Skipped);
    let s = build(setup(Proto::Tcp), &inf, &recs, None, &node(32768, 60999));
    assert_eq!(s.exit_code, 2);
}

#[test]
fn bounded_edges_are_worded_as_ranges() {
    let plan = Plan {
        range: PortRange::new(1024, 65535),
        samples: 128,
        max_extra: 2,
    };
    let inf = infer(&plan, &mut threshold(40000)).unwrap_or_else(|e| panic!("{e:#}"));
    let recs = records(Proto::Tcp, &inf);
    let s = build(setup(Proto::Tcp), &inf, &recs, None, &node(32768, 60999));
    assert!(!s.inference.exact);
    assert!(
        s.inference.headline.contains("somewhere in"),
        "{}",
        s.inference.headline
    );
    let lower = s
        .inference
        .lower
        .as_ref()
        .unwrap_or_else(|| panic!("no edge"));
    assert!(lower.candidates.contains(40000));
    assert!(text(&s).contains("--max-extra"));
}
