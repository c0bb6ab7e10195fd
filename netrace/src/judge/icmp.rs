//! ICMP and ICMPv6 errors by name, for the report: an attempt ended by one is *unreachable*,
//! and the name says what the network answered.

/// What an ICMP (`v6` false) or ICMPv6 error of `kind`/`code` means: the names the kernel
/// rules' crate gives them, so every report says the same.
pub fn name(v6: bool, kind: u8, code: u8) -> &'static str {
    netrace_common::parse::icmp_name(v6, kind, code)
}

/// One line: "25 port unreachable (ICMP 3/3), 2 time to live exceeded in transit (ICMP 11/0)".
pub fn summary(counts: &[((bool, u8, u8), u64)]) -> String {
    counts
        .iter()
        .map(|((v6, t, c), n)| {
            let proto = if *v6 { "ICMPv6" } else { "ICMP" };
            format!("{n} {} ({proto} {t}/{c})", name(*v6, *t, *c))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(name(false, 11, 0), "time to live exceeded in transit");
        assert_eq!(name(true, 1, 4), "port unreachable");
        assert_eq!(
            summary(&[((false, 3, 3), 25), ((true, 4, 0), 1)]),
            "25 port unreachable (ICMP 3/3), 1 parameter problem (ICMPv6 4/0)"
        );
    }
}
