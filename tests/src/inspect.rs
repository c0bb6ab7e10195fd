//! What the kernel holds, read independently of netrace: programs attached to an interface
//! (TCX links through `BPF_PROG_QUERY`, clsact filters through `tc`), the entries of a BPF map
//! a process has open (by `BPF_MAP_GET_NEXT_KEY`), a process's memory (`/proc/PID/status`), and
//! a Prometheus scrape from inside a namespace. Needs root.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{cmd, netns};

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// `bpf(cmd, attr, size)`; the attribute is any plain `repr(C)` struct.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` points to a live, writable, fully initialised value of the size passed;
    // the kernel reads and writes at most that many bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<libc::c_void>(),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

#[repr(C)]
#[derive(Default)]
struct ProgQuery {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    count: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Programs attached to one interface, seen from its namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attached {
    /// Programs on the TCX ingress hook.
    pub tcx_ingress: u32,
    /// Programs on the TCX egress hook.
    pub tcx_egress: u32,
    /// `tc filter show dev IF ingress` / `egress` lines (clsact filters), if any.
    pub tc_filters: Vec<String>,
    /// Whether the interface has a clsact qdisc.
    pub clsact: bool,
}

impl Attached {
    /// Nothing on any hook.
    pub fn is_empty(&self) -> bool {
        self.tcx_ingress == 0 && self.tcx_egress == 0 && self.tc_filters.is_empty() && !self.clsact
    }
}

fn tcx_count(ifindex: u32, attach_type: u32) -> std::io::Result<u32> {
    let mut q = ProgQuery {
        target_ifindex: ifindex,
        attach_type,
        ..Default::default()
    };
    bpf(BPF_PROG_QUERY, &mut q)?;
    Ok(q.count)
}

/// TCX program counts (ingress, egress) for each of `ifaces` in namespace `ns`, in order.
pub fn tcx_programs(ns: &str, ifaces: &[String]) -> Result<Vec<(u32, u32)>> {
    let ifaces = ifaces.to_vec();
    netns::spawn_in(ns, "lab-tcx-query", move || {
        let mut out = Vec::with_capacity(ifaces.len());
        for name in &ifaces {
            let c = std::ffi::CString::new(name.as_str())?;
            // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
            let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
            if idx == 0 {
                bail!("no interface {name}");
            }
            let ingress = tcx_count(idx, BPF_TCX_INGRESS)
                .with_context(|| format!("BPF_PROG_QUERY tcx ingress {name}"))?;
            let egress = tcx_count(idx, BPF_TCX_EGRESS)
                .with_context(|| format!("BPF_PROG_QUERY tcx egress {name}"))?;
            out.push((ingress, egress));
        }
        Ok(out)
    })?
    .join()
    .map_err(|_| anyhow!("the query thread panicked"))?
}

/// Everything attached to `iface` in `ns`: TCX programs, clsact filters and qdisc.
pub fn attached(ns: &str, iface: &str) -> Result<Attached> {
    let (tcx_ingress, tcx_egress) = tcx_programs(ns, &[iface.to_owned()])?
        .first()
        .copied()
        .unwrap_or_default();
    let mut tc_filters = Vec::new();
    for dir in ["ingress", "egress"] {
        let out = cmd::ns_exec(ns, &["tc", "filter", "show", "dev", iface, dir])?;
        tc_filters.extend(
            out.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| format!("{dir}: {l}")),
        );
    }
    let qdiscs = cmd::ns_exec(ns, &["tc", "qdisc", "show", "dev", iface])?;
    Ok(Attached {
        tcx_ingress,
        tcx_egress,
        tc_filters,
        clsact: qdiscs.lines().any(|l| l.contains("clsact")),
    })
}

#[repr(C)]
#[derive(Default)]
struct GetFdById {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoByFd {
    fd: u32,
    info_len: u32,
    info: u64,
}

#[repr(C)]
struct MapInfo {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    name: [u8; 16],
    _rest: [u8; 64],
}

#[repr(C)]
#[derive(Default)]
struct NextKey {
    fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

/// A BPF map found among a process's descriptors.
#[derive(Debug)]
pub struct MapHandle {
    fd: OwnedFd,
    /// The map's name (as the object file named it, at most 15 bytes).
    pub name: String,
    /// Size of a key in bytes.
    pub key_size: u32,
    /// Capacity.
    pub max_entries: u32,
}

impl MapHandle {
    /// Number of entries right now (walks every key; entries may change meanwhile).
    pub fn entries(&self) -> Result<usize> {
        let mut key = vec![0u8; self.key_size as usize];
        let mut next = vec![0u8; self.key_size as usize];
        let mut n = 0usize;
        let mut first = true;
        loop {
            let mut a = NextKey {
                fd: self.fd.as_raw_fd() as u32,
                key: if first { 0 } else { key.as_ptr() as u64 },
                next_key: next.as_mut_ptr() as u64,
                ..Default::default()
            };
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut a) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
                Err(e) => return Err(e).context("BPF_MAP_GET_NEXT_KEY"),
            }
            first = false;
            std::mem::swap(&mut key, &mut next);
            n += 1;
            if n > self.max_entries as usize * 2 + 16 {
                bail!("map {} walked past twice its capacity", self.name);
            }
        }
    }
}

/// The BPF map named `name` that process `pid` holds open.
pub fn process_map(pid: u32, name: &str) -> Result<MapHandle> {
    let dir = format!("/proc/{pid}/fdinfo");
    let entries = std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))?;
    let mut ids = Vec::new();
    for e in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        if let Some(id) = text
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        let mut a = GetFdById {
            id,
            ..Default::default()
        };
        let Ok(raw) = bpf(BPF_MAP_GET_FD_BY_ID, &mut a) else {
            continue;
        };
        // SAFETY: the kernel returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut info = MapInfo {
            map_type: 0,
            id: 0,
            key_size: 0,
            value_size: 0,
            max_entries: 0,
            map_flags: 0,
            name: [0; 16],
            _rest: [0; 64],
        };
        let mut q = InfoByFd {
            fd: fd.as_raw_fd() as u32,
            info_len: std::mem::size_of::<MapInfo>() as u32,
            info: (&mut info as *mut MapInfo) as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut q).context("BPF_OBJ_GET_INFO_BY_FD")?;
        let end = info.name.iter().position(|b| *b == 0).unwrap_or(16);
        let found = String::from_utf8_lossy(&info.name[..end]).into_owned();
        if found == name {
            return Ok(MapHandle {
                fd,
                name: found,
                key_size: info.key_size,
                max_entries: info.max_entries,
            });
        }
    }
    bail!("process {pid} holds no BPF map named {name}")
}

/// A process's memory, from `/proc/PID/status`, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`.
    pub rss_kib: u64,
    /// `RssAnon` (heap and stacks: where a leak shows).
    pub anon_kib: u64,
}

/// Reads `VmRSS` and `RssAnon` of `pid`.
pub fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("{path} has no {name}"))
    };
    Ok(Memory {
        rss_kib: field("VmRSS:")?,
        anon_kib: field("RssAnon:")?,
    })
}

/// `GET path` over HTTP/1.0 to `addr` from inside namespace `ns`; returns the body.
pub fn http_get(ns: &str, addr: SocketAddr, path: &str) -> Result<String> {
    let path = path.to_owned();
    netns::spawn_in(ns, "lab-http-get", move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("no HTTP header end in {text:?}"))?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
        }
        Ok(body.to_owned())
    })?
    .join()
    .map_err(|_| anyhow!("the HTTP thread panicked"))?
}

/// The value of an unlabelled sample `name` in a Prometheus exposition text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}
