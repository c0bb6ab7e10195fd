//! `netrace check`: whether this node can run `netrace watch`, and how, in one screen. Reads
//! only; loads and attaches nothing.

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
};

use aya::programs::{SchedClassifier, TcAttachType};

use crate::{
    cli::CheckArgs,
    error::exit,
    kernel::netlink::{self, Hook},
    node::{cgroups, iface, privileges},
};

/// How one check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mark {
    Ok,
    /// Works, with a limit.
    Warn,
    /// `netrace watch` cannot run.
    Fail,
}

struct Line {
    mark: Mark,
    what: &'static str,
    text: String,
}

fn line(mark: Mark, what: &'static str, text: impl Into<String>) -> Line {
    Line {
        mark,
        what,
        text: text.into(),
    }
}

/// (major, minor) of a kernel release such as `6.1.0-18-amd64`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

fn release() -> String {
    // SAFETY: an all-zero utsname is valid for uname to fill in.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    // SAFETY: uname NUL-terminates the release field.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn default_procfs() -> PathBuf {
    let host = Path::new("/host/proc");
    if host.join("sys/net").is_dir() {
        host.to_path_buf()
    } else {
        PathBuf::from("/proc")
    }
}

/// Runs the checks and prints them; exit 0 when `netrace watch` can run, 2 when it cannot.
pub fn run(args: &CheckArgs) -> anyhow::Result<u8> {
    let mut lines = Vec::new();
    let release = release();
    let version = kernel_version(&release);
    let at_least = |maj: u32, min: u32| version.is_some_and(|v| v >= (maj, min));
    lines.push(match version {
        Some(_) if at_least(5, 8) => line(Mark::Ok, "kernel", release.clone()),
        Some(_) => line(
            Mark::Fail,
            "kernel",
            format!("{release}: ring buffers need 5.8 or newer"),
        ),
        None => line(
            Mark::Warn,
            "kernel",
            format!("cannot tell the version of '{release}'"),
        ),
    });
    lines.push(if at_least(6, 6) {
        line(
            Mark::Ok,
            "TCX",
            "available (6.6+): links vanish with the process, even on SIGKILL",
        )
    } else {
        line(
            Mark::Warn,
            "TCX",
            "not available (before 6.6): clsact filters, which kill -9 would leave behind",
        )
    });
    lines.push(if Path::new("/sys/kernel/btf/vmlinux").exists() {
        line(
            Mark::Ok,
            "BTF",
            "present: the sweep's map iterators find due SYNs in the kernel",
        )
    } else {
        line(
            Mark::Ok,
            "BTF",
            "absent (not required: the sweep walks the pending map in batches instead of \
             running map iterators)",
        )
    });
    lines.push(if at_least(5, 8) {
        line(
            Mark::Ok,
            "ring buffer",
            "BPF_MAP_TYPE_RINGBUF supported (5.8+)",
        )
    } else {
        line(Mark::Fail, "ring buffer", "needs kernel 5.8")
    });
    let caps = procfs::process::Process::myself()
        .and_then(|p| p.status())
        .map(|s| s.capeff);
    lines.push(match caps {
        Ok(eff) => {
            let missing = privileges::missing_from(eff);
            if missing.is_empty() {
                line(
                    Mark::Ok,
                    "capabilities",
                    "CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON",
                )
            } else {
                line(
                    Mark::Fail,
                    "capabilities",
                    format!("missing {} (run as root or grant them)", missing.join(", ")),
                )
            }
        }
        Err(e) => line(Mark::Warn, "capabilities", format!("cannot read: {e}")),
    });
    let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .map(Path::new)
        .find(|p| p.join("events/sock/inet_sock_set_state/format").exists());
    lines.push(match tracefs {
        Some(p) => line(
            Mark::Ok,
            "tracefs",
            format!(
                "{}: sock:inet_sock_set_state found (process attribution)",
                p.display()
            ),
        ),
        None => line(
            Mark::Warn,
            "tracefs",
            "not mounted here; netrace mounts it privately for process attribution",
        ),
    });
    let cgroup = args.cgroup_root.clone().or_else(cgroups::cgroup2_root);
    lines.push(match cgroup {
        Some(root) => {
            let pods = ["kubepods.slice", "kubepods"]
                .iter()
                .any(|d| root.join(d).is_dir());
            let text = if pods {
                format!("{}: the node's pods are visible", root.display())
            } else {
                format!(
                    "{}: no kubepods directory (not a Kubernetes node, or a pod's own view: \
                     mount the host's tree and pass --cgroup-root)",
                    root.display()
                )
            };
            line(
                if pods { Mark::Ok } else { Mark::Warn },
                "cgroup view",
                text,
            )
        }
        None => line(
            Mark::Warn,
            "cgroup view",
            "no cgroup2 mount; netrace mounts it privately to name processes' cgroups",
        ),
    });
    let procfs = args.procfs.clone().unwrap_or_else(default_procfs);
    let uplink = args
        .iface
        .clone()
        .or_else(|| iface::default_route_iface(&procfs));
    lines.push(match &uplink {
        Some(name) if args.iface.is_some() && iface::index(name).is_some() => line(
            Mark::Ok,
            "default route",
            format!("not looked at: --iface names {name}"),
        ),
        Some(name) if iface::index(name).is_some() => line(
            Mark::Ok,
            "default route",
            format!("via {name} (netrace watch's default interface)"),
        ),
        Some(name) => line(
            Mark::Fail,
            "default route",
            format!("via {name}, which is not in this network namespace (use the host network)"),
        ),
        None => line(
            Mark::Fail,
            "default route",
            "none found; name the uplink with --iface",
        ),
    });
    if let Some(name) = uplink.as_deref().filter(|n| iface::index(n).is_some()) {
        lines.push(foreign_programs(name, at_least(6, 6)));
    }

    let mut out = io::stdout().lock();
    let can_run = lines.iter().all(|l| l.mark != Mark::Fail);
    for l in &lines {
        let mark = match l.mark {
            Mark::Ok => "ok  ",
            Mark::Warn => "note",
            Mark::Fail => "FAIL",
        };
        writeln!(out, "{mark}  {:<14} {}", l.what, l.text)?;
    }
    let how = if at_least(6, 6) { "TCX" } else { "clsact" };
    if can_run {
        writeln!(
            out,
            "\nthis node can run netrace watch (attaching with {how})"
        )?;
        Ok(exit::CLEAN)
    } else {
        writeln!(
            out,
            "\nnetrace watch cannot run here as it is: see FAIL above"
        )?;
        Ok(exit::ERROR)
    }
}

/// tc filters and TCX programs of other tools on `iface`: they run beside netrace's.
fn foreign_programs(iface_name: &str, tcx: bool) -> Line {
    let mut found = Vec::new();
    if let Some(idx) = iface::index(iface_name) {
        for hook in [Hook::Ingress, Hook::Egress] {
            let dir = if hook == Hook::Ingress {
                "ingress"
            } else {
                "egress"
            };
            if let Ok(filters) = netlink::filters(idx, hook) {
                let mut seen = std::collections::BTreeSet::new();
                for f in filters {
                    let name = f.bpf_name.clone().unwrap_or_else(|| f.kind.clone());
                    if name.starts_with("netrace_") || !seen.insert((f.priority, name.clone())) {
                        continue;
                    }
                    found.push(format!("tc {dir} {name} (priority {})", f.priority));
                }
            }
        }
    }
    if tcx {
        for (ty, dir) in [
            (TcAttachType::Ingress, "ingress"),
            (TcAttachType::Egress, "egress"),
        ] {
            if let Ok((_, progs)) = SchedClassifier::query_tcx(iface_name, ty) {
                for p in progs {
                    let name = p.name_as_str().unwrap_or("?").to_string();
                    if !name.starts_with("netrace_") {
                        found.push(format!("TCX {dir} {name} (id {})", p.id()));
                    }
                }
            }
        }
    }
    if found.is_empty() {
        line(
            Mark::Ok,
            "uplink",
            format!("{iface_name}: no other tc or TCX programs"),
        )
    } else {
        line(
            Mark::Warn,
            "uplink",
            format!(
                "{iface_name}: {} (netrace goes first in line; a clsact filter at priority 1 \
                 runs before it)",
                found.join(", ")
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("6.12.9"), Some((6, 12)));
        assert_eq!(kernel_version("5.4"), Some((5, 4)));
        assert_eq!(kernel_version("garbage"), None);
    }
}
