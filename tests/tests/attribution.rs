//! End to end: who lost the connection. Two pods behind the node's SNAT; netrace watches the
//! uplink and both pod-side interfaces, links every lost uplink connection to its pod and
//! process, and names the NAT mode. Ground truth: the clients' own records (pod, port,
//! outcome), conntrack's pod-port → SNAT-port table, and this process's pid.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{collections::HashMap, net::IpAddr, time::Duration};

use netrace_lab::{
    extra_pod::{ExtraPod, POD2_4},
    is_root, netrace_bin, truth, Family, Lab, LabOptions, NetraceOptions, NetraceOutput,
    NetraceRun, SnatMode, TcpAttempt, TcpOutcome,
};

fn start(lab: &Lab, pod_ifaces: &[&str]) -> NetraceRun {
    let mut args = vec!["--list-lost".to_string()];
    for p in pod_ifaces {
        args.push("--pod-iface".into());
        args.push((*p).to_string());
    }
    let opts = NetraceOptions::for_lab(lab, netrace_bin().expect("the netrace binary"))
        .syn_timeout(Duration::from_millis(1500))
        .args(args);
    NetraceRun::start(&opts).expect("starting netrace")
}

/// (pod address, pod port) → post-SNAT port, from the node's conntrack table.
fn snat_table(lab: &Lab) -> HashMap<(IpAddr, u16), u16> {
    truth::conntrack(lab, "tcp", Family::V4)
        .expect("conntrack in the node")
        .into_iter()
        .map(|e| ((e.orig_src, e.orig_sport), e.reply_dport))
        .collect()
}

fn check_lost_are_attributed(
    out: &NetraceOutput,
    clients: &[(IpAddr, &[TcpAttempt])],
    table: &HashMap<(IpAddr, u16), u16>,
) -> usize {
    // Expected: for every attempt the client saw time out, the uplink port it left with.
    let mut expected: HashMap<u16, (IpAddr, u16)> = HashMap::new();
    for (pod, attempts) in clients {
        for a in attempts
            .iter()
            .filter(|a| a.outcome == TcpOutcome::TimedOut)
        {
            let snat = table
                .get(&(*pod, a.pod_port))
                .unwrap_or_else(|| panic!("no conntrack entry for {pod}:{}", a.pod_port));
            expected.insert(*snat, (*pod, a.pod_port));
        }
    }
    let lost: Vec<_> = out
        .connections()
        .filter(|c| c["outcome"] == "lost")
        .collect();
    assert_eq!(lost.len(), expected.len(), "{}", out.describe());
    let unlinked: Vec<String> = lost
        .iter()
        .filter(|c| c["link_method"].is_null())
        .map(|c| {
            format!(
                "{}:{} syns={} isn={}",
                c["src"], c["src_port"], c["syns"], c["isn"]
            )
        })
        .collect();
    assert!(
        unlinked.is_empty(),
        "{} of {} lost connections not linked: {unlinked:?}\nstderr: {}",
        unlinked.len(),
        lost.len(),
        out.stderr
    );
    let me = std::process::id();
    for c in &lost {
        let port = c["src_port"].as_u64().unwrap() as u16;
        let (pod, pod_port) = expected
            .get(&port)
            .unwrap_or_else(|| panic!("netrace lost {port}, no client timed out there"));
        assert_eq!(
            c["pod_src"].as_str(),
            Some(pod.to_string().as_str()),
            "{c}\nstderr: {}\ncounters: {}\nnotes: {}",
            out.stderr,
            out.summary()
                .map(|s| s["counters"].clone())
                .unwrap_or_default(),
            out.summary()
                .map(|s| s["notes"].clone())
                .unwrap_or_default()
        );
        assert_eq!(
            c["pod_src_port"].as_u64(),
            Some(u64::from(*pod_port)),
            "{c}"
        );
        assert_eq!(c["link_method"], "isn", "{c}");
        assert_eq!(
            c["pid"].as_u64(),
            Some(u64::from(me)),
            "the client runs in this process: {c}"
        );
        assert!(c["comm"].as_str().is_some_and(|s| !s.is_empty()), "{c}");
        assert!(c["cgroup"].as_str().is_some(), "{c}");
    }
    lost.len()
}

#[test]
fn lost_connections_are_linked_to_their_pod_and_process() {
    assert!(is_root(), "needs root: run it through `cargo xtask test`");
    let lab = Lab::seed().expect("the seed lab");
    let pod2 = ExtraPod::add(&lab, 50000, 60000).expect("a second pod");
    let pod1_if = lab.names().node_pod_if.clone();
    let run = start(&lab, &[&pod1_if, &pod2.node_if]);
    let server = lab.server_addr(Family::V4);
    let a1 = lab
        .client()
        .tcp(server, 80, &|_, _| {})
        .expect("pod 1 client");
    let a2 = pod2
        .client()
        .tcp(server, 80, &|_, _| {})
        .expect("pod 2 client");
    run.settle();
    let table = snat_table(&lab);
    let out = run.stop().expect("stopping netrace");
    let pod1 = lab.pod_ip(Family::V4);
    let n = check_lost_are_attributed(
        &out,
        &[(pod1, a1.as_slice()), (IpAddr::V4(POD2_4), a2.as_slice())],
        &table,
    );
    assert!(n > 0, "the seed lab loses connections");

    let summary = out.summary().expect("a summary");
    assert_eq!(summary["nat"]["mode"], "random-fully", "{summary}");
    assert_eq!(summary["nat"]["range"]["start"], 1024, "{summary}");
    assert_eq!(summary["nat"]["range"]["end"], 65535, "{summary}");
    let groups = summary["lost_by_pod"].as_array().expect("lost_by_pod");
    let by_pod: HashMap<String, u64> = groups
        .iter()
        .map(|g| {
            (
                g["pod_src"].as_str().unwrap_or("").to_string(),
                g["lost"].as_u64().unwrap(),
            )
        })
        .collect();
    let timed_out = |a: &[TcpAttempt]| {
        a.iter()
            .filter(|a| a.outcome == TcpOutcome::TimedOut)
            .count() as u64
    };
    assert_eq!(
        by_pod.get(&pod1.to_string()).copied().unwrap_or(0),
        timed_out(&a1)
    );
    assert_eq!(
        by_pod.get(&POD2_4.to_string()).copied().unwrap_or(0),
        timed_out(&a2)
    );
    drop(pod2);
}

/// The NAT report of a run with `connections` from the pod.
fn nat_mode_of(opts: LabOptions, connections: usize) -> serde_json::Value {
    let lab = Lab::new(opts).expect("the lab");
    let pod_if = lab.names().node_pod_if.clone();
    let run = start(&lab, &[&pod_if]);
    lab.client()
        .tcp(lab.server_addr(Family::V4), connections, &|_, _| {})
        .expect("the client");
    run.settle();
    let out = run.stop().expect("stopping netrace");
    out.summary().expect("a summary")["nat"].clone()
}

#[test]
fn nat_mode_plain_masquerade_keeps_ports() {
    assert!(is_root(), "needs root");
    let nat = nat_mode_of(LabOptions::seed().snat_mode(SnatMode::Plain), 60);
    assert_eq!(nat["mode"], "keeps-ports", "{nat}");
}

#[test]
fn nat_mode_random_fully_with_to_ports() {
    assert!(is_root(), "needs root");
    // Enough connections to tell the lower edge 32768 from the common 30000 (with 60, all
    // ports stay above 32767 by chance once in 130 runs even if the range began at 30000,
    // so the range cannot be named) and the upper edge 65535 from 60999.
    let nat = nat_mode_of(LabOptions::seed().snat_ports(32768, 65535), 200);
    assert_eq!(nat["mode"], "random-fully", "{nat}");
    assert_eq!(nat["to_ports"], true, "{nat}");
    assert_eq!(nat["range"]["start"], 32768, "{nat}");
    assert_eq!(nat["range"]["end"], 65535, "{nat}");
}

#[test]
fn nat_mode_none_without_snat() {
    assert!(is_root(), "needs root");
    let nat = nat_mode_of(LabOptions::seed().snat_mode(SnatMode::None), 60);
    assert_eq!(nat["mode"], "none", "{nat}");
}
