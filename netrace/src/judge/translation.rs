//! Translation out of sight: the signature of a program that rewrites addresses after netrace
//! sees the SYN (a BPF SNAT on the uplink's tc/TCX egress, after netrace's classifier), or of
//! SYNs that leave without netrace seeing them at all (such a program first in line, returning
//! a final verdict). Then the histogram's ports are not the ones the firewall sees, and most
//! SYNs would look lost: netrace says so instead of judging the range.
//!
//! The evidence:
//! - answers paired with their SYN only by (remote address, remote port, ISN), coming back to
//!   another local address or port than the SYN left from (translation keeps the ISN). With
//!   the tc hook the SYN's port is then the untranslated one; with the device hook it is the
//!   port on the wire (an answer translated back before netrace's ingress), so only the tc
//!   hook counts these;
//! - SYN-ACKs for 4-tuples never seen leaving that no SYN explains, with either hook.

use serde::Serialize;

use crate::{
    judge::{
        advice,
        verdict::{Verdict, VerdictKind},
    },
    kernel::{egress_hook::Hook, events::addrs},
    ports::PortRange,
    track::tracker::TrackerStats,
};

/// Fewer signs than this are not evidence (a SYN-ACK for a connection opened just before
/// netrace started is unmatched too).
const MIN_SIGNS: u64 = 3;
/// Signs must be at least this share of the attempts (1 in 20).
const SHARE_DIVISOR: u64 = 20;

/// What a run saw of translation it could not follow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TranslationSigns {
    /// The egress hook in use.
    pub hook: Hook,
    /// Answers that came back to another 4-tuple than their SYN left from.
    pub translated_answers: u64,
    /// SYN-ACKs for 4-tuples never seen leaving, unexplained.
    pub unmatched_synacks: u64,
    /// One translated pair, e.g. "SYN from 198.18.1.2:40001, SYN-ACK to 198.18.2.1:8257".
    pub example: Option<String>,
}

impl TranslationSigns {
    pub fn new(hook: Hook, stats: &TrackerStats) -> Self {
        let example = stats.translated_example.map(|(syn, answer)| {
            let (s, _) = addrs(&syn);
            let (a, _) = addrs(&answer);
            format!(
                "SYN left from {}, its SYN-ACK came back to {}",
                sock(s, syn.src_port),
                sock(a, answer.src_port)
            )
        });
        Self {
            hook,
            translated_answers: stats.translated_answers,
            unmatched_synacks: stats.unmatched_synacks,
            example,
        }
    }

    /// Signs that count against the hook in use.
    pub fn count(&self) -> u64 {
        let translated = match self.hook {
            Hook::Tc => self.translated_answers,
            Hook::Xmit => 0,
        };
        translated + self.unmatched_synacks
    }

    /// Whether the run's SYNs were seen before translation (or not at all), given `attempts`.
    pub fn out_of_sight(&self, attempts: u64) -> bool {
        let n = self.count();
        n >= MIN_SIGNS && n.saturating_mul(SHARE_DIVISOR) >= attempts
    }

    /// The verdict when [`TranslationSigns::out_of_sight`] holds.
    pub fn verdict(
        &self,
        ifaces: &[String],
        allowed: PortRange,
        attempts: u64,
        lost: u64,
    ) -> Verdict {
        let iface = ifaces.join(", ");
        let headline = match self.hook {
            Hook::Tc => format!(
                "translation out of sight: a program on {iface} rewrites addresses after \
                 netrace sees the SYN; the ports here are not the ones the firewall sees, and \
                 the loss is not judged. Use --egress-hook xmit"
            ),
            Hook::Xmit => format!(
                "translation out of sight: SYN-ACKs arrive on {iface} for connections whose SYN \
                 netrace never saw leaving; the loss is not judged"
            ),
        };
        let mut details = vec![format!(
            "{attempts} SYNs seen leaving ({lost} unanswered); {} answers came back to another \
             address or port than their SYN left from; {} SYN-ACKs answered SYNs never seen",
            self.translated_answers, self.unmatched_synacks
        )];
        if let Some(e) = &self.example {
            details.push(format!("for example: {e}"));
        }
        if self.hook == Hook::Tc {
            details.push(
                "a BPF SNAT on the uplink's tc/TCX egress (Cilium's BPF masquerading, GKE \
                 Dataplane V2, Calico's eBPF dataplane) runs after netrace's classifier, or \
                 first in line with a final verdict that hides the SYN from it"
                    .into(),
            );
        }
        Verdict::not_judged(
            VerdictKind::TranslationOutOfSight,
            headline,
            details,
            allowed,
            true,
        )
    }

    /// The fix for the report.
    pub fn fix(&self) -> Vec<String> {
        advice::out_of_sight(self.hook == Hook::Tc)
    }
}

fn sock(ip: std::net::IpAddr, port: u16) -> String {
    match ip {
        std::net::IpAddr::V4(a) => format!("{a}:{port}"),
        std::net::IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signs(hook: Hook, translated: u64, unmatched: u64) -> TranslationSigns {
        TranslationSigns {
            hook,
            translated_answers: translated,
            unmatched_synacks: unmatched,
            example: None,
        }
    }

    #[test]
    fn translated_answers_count_only_with_the_tc_hook() {
        assert!(signs(Hook::Tc, 100, 0).out_of_sight(200));
        assert!(!signs(Hook::Xmit, 100, 0).out_of_sight(200));
    }

    #[test]
    fn unmatched_synacks_count_with_either_hook() {
        assert!(signs(Hook::Tc, 0, 90).out_of_sight(0));
        assert!(signs(Hook::Xmit, 0, 90).out_of_sight(200));
    }

    #[test]
    fn a_few_stragglers_are_not_evidence() {
        assert!(!signs(Hook::Tc, 0, 2).out_of_sight(0));
        assert!(!signs(Hook::Xmit, 0, 5).out_of_sight(1000));
    }
}
