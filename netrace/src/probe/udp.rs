//! UDP next to TCP: which ports to send datagrams from, and what their replies say about the
//! filter (TCP-only, the same as TCP, or nothing to compare because nothing answers UDP).

use serde::Serialize;

use super::infer::{sample_ports, Analysis, Kind};
use super::net::Record;
use super::summary::Tally;
use crate::ports::PortRange;

/// How UDP fared next to TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UdpKind {
    /// UDP replies come back to ports where TCP answers do not: the filter is TCP-only.
    TcpOnlyFilter,
    /// UDP replies come back only where TCP answers do.
    SameAsTcp,
    /// TCP and UDP both come back everywhere probed.
    BothThrough,
    /// Nothing listens on the UDP port (ICMP port unreachable came back).
    UdpClosed,
    /// No reply at all: the service does not answer UDP, so none was expected.
    NoReply,
    /// Replies and silence with no pattern against TCP.
    Mixed,
}

/// The UDP side of the comparison.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UdpReport {
    pub kind: UdpKind,
    #[serde(flatten)]
    pub tally: Tally,
    /// Probes from ports where TCP gets no answer back, and how many of them came back.
    pub where_tcp_silent: u32,
    pub where_tcp_silent_came_back: u32,
    /// Probes from ports where TCP answers come back, and how many of them came back.
    pub where_tcp_answers: u32,
    pub where_tcp_answers_came_back: u32,
    pub text: String,
}

/// The UDP ports that go with a TCP inference: spread over the range, plus the ports on
/// both sides of each edge, where the comparison says the most.
pub fn udp_ports(range: PortRange, samples: u32, analysis: &Analysis) -> Vec<u16> {
    let mut ports = sample_ports(range, samples.min(16));
    for e in [analysis.lower, analysis.upper].into_iter().flatten() {
        ports.push(e.inside);
        if let Some(o) = e.outside {
            ports.push(o);
        }
    }
    ports.retain(|&p| range.contains(p));
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Whether TCP answers come back to `port`, as far as the inference knows.
fn tcp_comes_back(a: &Analysis, port: u16) -> Option<bool> {
    match a.kind {
        Kind::AllAnswered => Some(true),
        Kind::NoneAnswered => Some(false),
        Kind::Range => {
            let (l, u) = (a.lower?, a.upper?);
            if (l.inside..=u.inside).contains(&port) {
                Some(true)
            } else if l.outside.is_some_and(|o| port <= o) || u.outside.is_some_and(|o| port >= o) {
                Some(false)
            } else {
                None
            }
        }
        Kind::NotARange | Kind::NothingUsable => None,
    }
}

/// Compares UDP with the TCP inference.
pub fn compare_udp(tcp: &Analysis, udp: &[Record], server_port: u16) -> UdpReport {
    let tally = Tally::of(udp.iter().map(|r| &r.outcome));
    let (mut ts, mut ts_back, mut ta, mut ta_back) = (0, 0, 0, 0);
    for r in udp {
        let Some(back) = r.outcome.came_back() else {
            continue;
        };
        match tcp_comes_back(tcp, r.port) {
            Some(false) => {
                ts += 1;
                ts_back += u32::from(back);
            }
            Some(true) => {
                ta += 1;
                ta_back += u32::from(back);
            }
            None => {}
        }
    }
    let usable = tally.came_back() + tally.timeout;
    let (kind, text) = if tally.answered == 0 && tally.refused > 0 {
        let outside = if ts_back > 0 {
            format!(", {ts_back} of them from ports where TCP gets no SYN-ACK")
        } else {
            String::new()
        };
        (
            UdpKind::UdpClosed,
            format!(
                "UDP: nothing listens on UDP port {server_port} (ICMP port unreachable came back \
                 to {} of {usable} ports{outside}); no reply expected, so UDP cannot be compared \
                 with TCP",
                tally.refused
            ),
        )
    } else if tally.answered == 0 {
        (
            UdpKind::NoReply,
            format!(
                "UDP: no reply to any of {usable} datagrams: the service does not answer UDP (no \
                 reply expected), so UDP says nothing here; `nc -vvu` would still call the port \
                 open"
            ),
        )
    } else if ts > 0 && ts_back > 0 {
        (
            UdpKind::TcpOnlyFilter,
            format!(
                "UDP: replies came back to {ts_back} of {ts} source ports where TCP gets no \
                 SYN-ACK (and to {ta_back} of {ta} where it does): the filter drops only TCP \
                 return traffic. This is the article's symptom: `nc -vvu` always works, `nc -vv` \
                 fails whenever the connection draws a blocked port"
            ),
        )
    } else if ts > 0 && ta_back > 0 {
        (
            UdpKind::SameAsTcp,
            format!(
                "UDP: replies came back only where TCP answers do ({ta_back} of {ta}), none to \
                 the {ts} ports where TCP gets no SYN-ACK: UDP is filtered the same way"
            ),
        )
    } else if ts == 0 && ta > 0 && ta_back == ta && tcp.kind == Kind::AllAnswered {
        (
            UdpKind::BothThrough,
            format!("UDP: replies came back to all {ta} probed ports, like TCP: both get through"),
        )
    } else {
        (
            UdpKind::Mixed,
            format!(
                "UDP: replies came back to {} of {usable} probed ports, with no clear pattern \
                 against TCP",
                tally.answered
            ),
        )
    };
    UdpReport {
        kind,
        tally,
        where_tcp_silent: ts,
        where_tcp_silent_came_back: ts_back,
        where_tcp_answers: ta,
        where_tcp_answers_came_back: ta_back,
        text,
    }
}
