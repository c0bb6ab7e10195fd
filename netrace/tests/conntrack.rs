//! The conntrack fallback of attribution, over ctnetlink, against the kernel's own table: in
//! the seed lab (pod → SNAT `--random-fully` → firewall → server), every TCP entry that
//! `conntrack -L` lists for the pod is found by its reply tuple, and the original tuple netrace
//! reads is the one conntrack(8) prints. A reply tuple no entry has gives `None`.
//!
//! Needs root (network namespaces); `cargo xtask test` runs it as root.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use netrace::kernel::netlink::{conntrack_original, Tuple};
use netrace_lab::{is_root, netns, truth, Family, Lab};

#[test]
fn original_tuples_by_reply_tuple_match_conntrack() {
    assert!(is_root(), "needs root: run it through `cargo xtask test`");
    let lab = Lab::seed().expect("building the seed lab");
    let attempts = lab
        .client()
        .tcp(lab.server_addr(Family::V4), 40, &|_, _| {})
        .expect("the client");
    assert!(!attempts.is_empty());
    let pod = lab.pod_ip(Family::V4);
    let entries: Vec<_> = truth::conntrack(&lab, "tcp", Family::V4)
        .expect("conntrack -L")
        .into_iter()
        .filter(|e| e.orig_src == pod)
        .collect();
    assert!(
        entries.len() >= 20,
        "conntrack lists {} entries",
        entries.len()
    );
    let replies: Vec<(Tuple, Tuple)> = entries
        .iter()
        .map(|e| {
            (
                Tuple {
                    src: e.reply_src,
                    dst: e.reply_dst,
                    sport: e.reply_sport,
                    dport: e.reply_dport,
                },
                Tuple {
                    src: e.orig_src,
                    dst: e.orig_dst,
                    sport: e.orig_sport,
                    dport: e.orig_dport,
                },
            )
        })
        .collect();
    let found = netns::spawn_in(lab.node_ns(), "nrt-ctnl", move || {
        let mut out = Vec::new();
        for (reply, _) in &replies {
            out.push(conntrack_original(reply)?);
        }
        // A reply tuple nobody has.
        let nobody = Tuple {
            sport: 9,
            ..replies[0].0
        };
        out.push(conntrack_original(&nobody)?);
        Ok((replies, out))
    })
    .expect("spawning in the node namespace")
    .join()
    .expect("the lookup thread")
    .expect("ctnetlink lookups");
    let (replies, out) = found;
    let (last, looked_up) = out.split_last().expect("results");
    assert_eq!(*last, None, "an unknown reply tuple was found");
    for ((reply, want), got) in replies.iter().zip(looked_up) {
        assert_eq!(got.as_ref(), Some(want), "reply tuple {reply:?}");
    }
    lab.teardown().expect("teardown");
}
