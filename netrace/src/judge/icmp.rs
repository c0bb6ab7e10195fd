//! ICMP and ICMPv6 errors by name, for the report: an attempt ended by one is *unreachable*,
//! and the name says what the network answered.

/// What an ICMP (`v6` false) or ICMPv6 error of `kind`/`code` means.
pub fn name(v6: bool, kind: u8, code: u8) -> &'static str {
    if v6 {
        return match (kind, code) {
            (1, 0) => "no route to destination",
            (1, 1) => "communication administratively prohibited",
            (1, 2) => "beyond scope of source address",
            (1, 3) => "address unreachable",
            (1, 4) => "port unreachable",
            (1, 5) => "source address failed policy",
            (1, 6) => "reject route",
            (1, _) => "destination unreachable",
            (2, _) => "packet too big",
            (3, 0) => "time exceeded (hop limit)",
            (3, 1) => "time exceeded (fragment reassembly)",
            (3, _) => "time exceeded",
            (4, 0) => "parameter problem (erroneous header field)",
            (4, 1) => "parameter problem (unrecognized next header)",
            (4, 2) => "parameter problem (unrecognized option)",
            (4, _) => "parameter problem",
            _ => "ICMPv6 error",
        };
    }
    match (kind, code) {
        (3, 0) => "network unreachable",
        (3, 1) => "host unreachable",
        (3, 2) => "protocol unreachable",
        (3, 3) => "port unreachable",
        (3, 4) => "fragmentation needed",
        (3, 5) => "source route failed",
        (3, 6) => "destination network unknown",
        (3, 7) => "destination host unknown",
        (3, 9) => "network administratively prohibited",
        (3, 10) => "host administratively prohibited",
        (3, 13) => "communication administratively prohibited",
        (3, _) => "destination unreachable",
        (11, 0) => "time exceeded (TTL)",
        (11, 1) => "time exceeded (fragment reassembly)",
        (11, _) => "time exceeded",
        (12, 0) => "parameter problem (pointer)",
        (12, 1) => "parameter problem (missing option)",
        (12, 2) => "parameter problem (bad length)",
        (12, _) => "parameter problem",
        _ => "ICMP error",
    }
}

/// One line: "25 port unreachable (ICMP 3/3), 2 time exceeded (TTL) (ICMP 11/0)".
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
        assert_eq!(name(false, 11, 0), "time exceeded (TTL)");
        assert_eq!(name(false, 12, 0), "parameter problem (pointer)");
        assert_eq!(name(true, 3, 0), "time exceeded (hop limit)");
        assert_eq!(name(true, 1, 4), "port unreachable");
        assert_eq!(
            summary(&[((false, 3, 3), 25), ((true, 4, 0), 1)]),
            "25 port unreachable (ICMP 3/3), 1 parameter problem (erroneous header field) (ICMPv6 4/0)"
        );
    }
}
