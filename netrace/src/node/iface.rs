//! Interface names: globs, existence, and the default-route interface.

use std::{ffi::CString, fs, path::Path};

use netrace_common::parse::Link;

/// The kernel's index for `name`, or `None` when no such interface exists (in this namespace).
pub fn index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Whether interface `name` (index `index` when netrace attached to it) is gone: no interface
/// of that name, or one with another index. When the kernel cannot tell (e.g. netrace is out
/// of file descriptors), the interface is not gone.
pub fn gone(name: &str, index: u32) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx != 0 {
        return idx != index;
    }
    std::io::Error::last_os_error().raw_os_error() == Some(libc::ENODEV)
}

/// The name of interface `index`, if it still exists.
pub fn name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let s = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(s.to_string_lossy().into_owned())
}

/// What frames on interface `name` start with, from its kernel type
/// (`/sys/class/net/NAME/type`); an error naming the type when netrace cannot parse them.
pub fn link(name: &str) -> Result<Link, String> {
    let path = Path::new("/sys/class/net").join(name).join("type");
    let raw = fs::read_to_string(&path).map_err(|e| {
        format!(
            "cannot read the link type of '{name}' ({}): {e}",
            path.display()
        )
    })?;
    let arphrd: u16 = raw
        .trim()
        .parse()
        .map_err(|_| format!("'{name}' has an unreadable link type '{}'", raw.trim()))?;
    Link::from_arphrd(arphrd).ok_or_else(|| {
        format!(
            "interface '{name}' has link type {arphrd}{}, whose headers netrace cannot read \
             (it reads Ethernet, and bare IP as on WireGuard, tun, ipip and ppp); watch the \
             interface its packets leave through instead",
            arphrd_name(arphrd)
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        )
    })
}

/// Names of common link types netrace does not parse, for error messages.
fn arphrd_name(arphrd: u16) -> Option<&'static str> {
    Some(match arphrd {
        32 => "infiniband",
        776 => "sit",
        778 => "gre",
        780 => "ip6 in ip6",
        783 => "irda",
        801 => "ieee802.11",
        803 => "ieee802.11 radiotap",
        823 => "ip6gre",
        824 => "netlink",
        280 => "can",
        _ => return None,
    })
}

/// Every interface in this network namespace, sorted.
pub fn all_interfaces() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir("/sys/class/net")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Shell-style match with `*` and `?`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Turns `--iface` arguments into existing interface names (globs expanded, duplicates
/// dropped); with none given, the interface of the default route.
pub fn resolve(args: &[String], procfs: &Path) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for arg in args {
        if arg.contains(['*', '?']) {
            let matched: Vec<String> = all_interfaces()
                .into_iter()
                .filter(|n| glob_match(arg, n))
                .collect();
            if matched.is_empty() {
                return Err(format!("no interface matches '{arg}' (see `ip link`)"));
            }
            out.extend(matched);
        } else if index(arg).is_some() {
            out.push(arg.clone());
        } else {
            return Err(format!("no interface named '{arg}' here (see `ip link`)"));
        }
    }
    if args.is_empty() {
        out.push(default_route_iface(procfs).ok_or_else(|| {
            "no default route to find the uplink by; name it with --iface".to_string()
        })?);
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|n| seen.insert(n.clone()));
    Ok(out)
}

/// The interface of the IPv4 default route, else of the IPv6 one.
pub fn default_route_iface(procfs: &Path) -> Option<String> {
    use procfs::FromRead as _;
    let v4 = procfs::net::RouteEntries::from_file(procfs.join("net/route"))
        .map(|r| r.0)
        .unwrap_or_default();
    let from_v4 = v4
        .into_iter()
        .find(|r| r.destination.is_unspecified() && r.mask.is_unspecified())
        .map(|r| r.iface);
    if from_v4.is_some() {
        return from_v4;
    }
    // procfs has no parser for the IPv6 table; its lines are plain columns.
    let v6 = fs::read_to_string(procfs.join("net/ipv6_route")).unwrap_or_default();
    v6.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() == 10 && f[0].bytes().all(|b| b == b'0') && f[1] == "00" && f[9] != "lo")
            .then(|| f[9].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("veth*", "veth0"));
        assert!(glob_match("veth*", "veth"));
        assert!(glob_match("e?h0", "eth0"));
        assert!(glob_match("*", "lo"));
        assert!(!glob_match("veth*", "eth0"));
        assert!(!glob_match("eth?", "eth10"));
        assert!(glob_match("*up0", "nrtabcup0"));
    }

    #[test]
    fn loopback_exists_and_nonsense_does_not() {
        assert!(index("lo").is_some());
        assert_eq!(index("lo").and_then(name).as_deref(), Some("lo"));
        assert!(index("nrt-no-such-if").is_none());
        let err = resolve(&["nrt-no-such-if".into()], Path::new("/proc"));
        assert!(err.is_err());
    }

    #[test]
    fn link_types() {
        // Loopback carries a zeroed Ethernet header.
        assert_eq!(link("lo"), Ok(Link::Ethernet));
        assert!(link("nrt-no-such-if").is_err());
        assert_eq!(arphrd_name(778), Some("gre"));
        assert_eq!(Link::from_arphrd(778), None);
    }
}
