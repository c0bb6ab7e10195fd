//! What the kernel holds, read independently of netrace and without `bpftool` (Debian 12's
//! bpftool 7.1 does not know TCX links): the one place tests read attached BPF state.
//!
//! - What is attached to an interface ([`snapshot`]): its qdiscs and clsact filters (`tc`), its
//!   TCX programs (`BPF_PROG_QUERY`).
//! - What a process holds ([`held_by`]): the BPF programs, maps and links it has open
//!   (`/proc/PID/fdinfo`), whether those ids still exist, a map of it by name
//!   ([`process_map`]) walked with `BPF_MAP_GET_NEXT_KEY`, its memory ([`memory`]).
//! - Pinned objects under `/sys/fs/bpf`, and a Prometheus scrape from inside a namespace.
//!
//! Needs root. A *foreign* TCX program, for tests that check netrace leaves other tools
//! alone, is in [`crate::foreign_tcx`].

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

use crate::{cmd, netns};

pub(crate) const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
pub(crate) const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
/// Larger than every `union bpf_attr` member used here; unused bytes stay zero.
const ATTR_SIZE: usize = 128;

/// A traffic direction on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Packets arriving.
    Ingress,
    /// Packets leaving.
    Egress,
}

impl Dir {
    pub(crate) fn tc(self) -> &'static str {
        match self {
            Dir::Ingress => "ingress",
            Dir::Egress => "egress",
        }
    }

    pub(crate) fn tcx(self) -> u32 {
        match self {
            Dir::Ingress => BPF_TCX_INGRESS,
            Dir::Egress => BPF_TCX_EGRESS,
        }
    }
}

/// A zeroed `union bpf_attr` with native-endian field setters.
pub(crate) struct Attr([u8; ATTR_SIZE]);

impl Attr {
    pub(crate) fn new() -> Self {
        Self([0; ATTR_SIZE])
    }
    pub(crate) fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    pub(crate) fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn get_u32(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[off..off + 4]);
        u32::from_ne_bytes(b)
    }
    pub(crate) fn bytes(&mut self, off: usize, v: &[u8]) -> &mut Self {
        self.0[off..off + v.len()].copy_from_slice(v);
        self
    }
    pub(crate) fn call(&mut self, cmd: libc::c_long) -> std::io::Result<i64> {
        // SAFETY: the attribute buffer is ATTR_SIZE live, writable, initialised bytes, and the
        // kernel reads and writes at most the size passed. Pointers stored inside it (ids,
        // instructions, names) are set by the callers to buffers that outlive this call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                self.0.as_mut_ptr().cast::<libc::c_void>(),
                ATTR_SIZE as libc::c_uint,
            )
        };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }
}

/// `BPF_OBJ_GET_INFO_BY_FD`: the start of a program's or map's info (`struct bpf_prog_info`,
/// `struct bpf_map_info`); bytes the kernel does not fill stay zero.
pub(crate) fn obj_info(fd: &OwnedFd) -> Result<[u8; 256]> {
    let mut info = [0u8; 256];
    let mut attr = Attr::new();
    attr.u32(0, fd.as_raw_fd() as u32)
        .u32(4, info.len() as u32)
        .u64(8, info.as_mut_ptr() as u64);
    attr.call(BPF_OBJ_GET_INFO_BY_FD)
        .context("BPF_OBJ_GET_INFO_BY_FD")?;
    Ok(info)
}

pub(crate) fn fd_from(rc: i64) -> Result<OwnedFd> {
    let fd = i32::try_from(rc).map_err(|_| anyhow!("bpf returned fd {rc}"))?;
    // SAFETY: on success these bpf commands return a new file descriptor that nothing else
    // owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs `f` on a fresh thread inside namespace `ns` (per-thread namespaces: the caller's
/// thread stays where it is) and returns its result.
pub(crate) fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    netns::spawn_in(ns, "lab-inspect", f)?
        .join()
        .map_err(|_| anyhow!("a thread inside namespace {ns} panicked"))?
}

pub(crate) fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name)?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!("no interface {name} here");
    }
    Ok(idx)
}

/// Ids of the programs on the TCX hook of `dev` in `dir`, in run order (namespace `ns`).
pub fn tcx_programs(ns: &str, dev: &str, dir: Dir) -> Result<Vec<u32>> {
    let dev = dev.to_owned();
    in_ns(ns, move || query_tcx(&dev, dir))
}

/// [`tcx_programs`] from a thread already inside the namespace.
fn query_tcx(dev: &str, dir: Dir) -> Result<Vec<u32>> {
    let idx = ifindex(dev)?;
    let mut ids = vec![0u32; 64];
    let mut attr = Attr::new();
    attr.u32(0, idx)
        .u32(4, dir.tcx())
        .u64(16, ids.as_mut_ptr() as u64)
        .u32(24, ids.len() as u32);
    attr.call(BPF_PROG_QUERY)
        .with_context(|| format!("BPF_PROG_QUERY tcx {} on {dev}", dir.tc()))?;
    let n = attr.get_u32(24) as usize;
    ids.truncate(n.min(64));
    Ok(ids)
}

/// Whether BPF program `id` still exists.
pub fn prog_exists(id: u32) -> bool {
    by_id_exists(BPF_PROG_GET_FD_BY_ID, id)
}

/// Whether BPF map `id` still exists.
pub fn map_exists(id: u32) -> bool {
    by_id_exists(BPF_MAP_GET_FD_BY_ID, id)
}

/// Whether BPF link `id` still exists.
pub fn link_exists(id: u32) -> bool {
    by_id_exists(BPF_LINK_GET_FD_BY_ID, id)
}

fn by_id_exists(cmd: libc::c_long, id: u32) -> bool {
    let mut attr = Attr::new();
    attr.u32(0, id);
    match attr.call(cmd) {
        Ok(rc) => {
            drop(fd_from(rc));
            true
        }
        // ENOENT: gone. Anything else (EPERM...) cannot tell; say it exists, so that a check
        // for leftovers fails loudly rather than passing blindly.
        Err(e) => e.raw_os_error() != Some(libc::ENOENT),
    }
}

/// The name of BPF program `id` (at most 15 characters, as the kernel keeps it), if it exists.
pub fn prog_name(id: u32) -> Option<String> {
    let mut attr = Attr::new();
    attr.u32(0, id);
    let fd = fd_from(attr.call(BPF_PROG_GET_FD_BY_ID).ok()?).ok()?;
    let info = obj_info(&fd).ok()?;
    // struct bpf_prog_info: name[16] at offset 64.
    let name = &info[64..80];
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    Some(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// BPF objects a process holds open (programs also through its links).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    /// Program ids.
    pub progs: BTreeSet<u32>,
    /// Of those, the tracing programs (`BPF_PROG_TYPE_TRACING`: the sweep's iterator, which
    /// a kernel may refuse; netrace then walks the map instead).
    pub tracing: BTreeSet<u32>,
    /// Map ids.
    pub maps: BTreeSet<u32>,
    /// Link ids.
    pub links: BTreeSet<u32>,
}

impl Held {
    /// The ids among these that still exist in the kernel, as `["prog 12", "map 7", ...]`.
    pub fn still_existing(&self) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(
            self.progs
                .iter()
                .filter(|id| prog_exists(**id))
                .map(|id| format!("prog {id}")),
        );
        out.extend(
            self.maps
                .iter()
                .filter(|id| map_exists(**id))
                .map(|id| format!("map {id}")),
        );
        out.extend(
            self.links
                .iter()
                .filter(|id| link_exists(**id))
                .map(|id| format!("link {id}")),
        );
        out
    }

    /// Waits up to `timeout` until none of these objects exists any more (the kernel frees
    /// them a moment after the last reference goes); returns those still there.
    pub fn wait_gone(&self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.still_existing();
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `enum bpf_prog_type`'s value for tracing programs (iterators among them).
const BPF_PROG_TYPE_TRACING: u32 = 26;

/// The BPF programs, maps and links process `pid` has open, from `/proc/PID/fdinfo`.
pub fn held_by(pid: u32) -> Result<Held> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut held = Held::default();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(entry) = entry else { continue };
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| -> Option<u32> {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        if let Some(id) = field("link_id:") {
            held.links.insert(id);
        }
        if let Some(id) = field("prog_id:") {
            held.progs.insert(id);
            if field("prog_type:") == Some(BPF_PROG_TYPE_TRACING) {
                held.tracing.insert(id);
            }
        }
        if let Some(id) = field("map_id:") {
            held.maps.insert(id);
        }
    }
    Ok(held)
}

/// Files and directories under `/sys/fs/bpf` (empty if bpffs is not mounted there).
pub fn pinned() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            out.push(p.display().to_string());
            if p.is_dir() {
                walk(&p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/bpf"), &mut out);
    out.sort();
    out
}

/// A qdisc as `tc -j qdisc show` lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Qdisc {
    /// `noqueue`, `clsact`, ...
    pub kind: String,
    /// `0:`, `ffff:`, ...
    pub handle: String,
}

/// Everything attached to one interface: qdiscs, clsact filters (as `tc filter show` prints
/// them), TCX programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The qdiscs.
    pub qdiscs: Vec<Qdisc>,
    /// `tc filter show dev DEV ingress`.
    pub tc_ingress: String,
    /// `tc filter show dev DEV egress`.
    pub tc_egress: String,
    /// TCX ingress program ids, in order.
    pub tcx_ingress: Vec<u32>,
    /// TCX egress program ids, in order.
    pub tcx_egress: Vec<u32>,
}

impl Snapshot {
    /// Nothing on any hook: no clsact qdisc, no filter, no TCX program.
    pub fn is_empty(&self) -> bool {
        !self.has_clsact()
            && self.tc_ingress.trim().is_empty()
            && self.tc_egress.trim().is_empty()
            && self.tcx_ingress.is_empty()
            && self.tcx_egress.is_empty()
    }

    /// Whether a clsact qdisc is present.
    pub fn has_clsact(&self) -> bool {
        self.qdiscs.iter().any(|q| q.kind == "clsact")
    }

    /// Lines of the clsact filter listings that name one of netrace's programs.
    pub fn netrace_filters(&self) -> Vec<String> {
        self.tc_ingress
            .lines()
            .chain(self.tc_egress.lines())
            .filter(|l| l.contains("netrace_"))
            .map(str::to_owned)
            .collect()
    }

    /// Names of the TCX programs (`?` for a program that vanished meanwhile).
    pub fn tcx_names(&self) -> Vec<String> {
        self.tcx_ingress
            .iter()
            .chain(&self.tcx_egress)
            .map(|id| prog_name(*id).unwrap_or_else(|| "?".into()))
            .collect()
    }
}

/// Reads what is attached to `dev` in namespace `ns`.
pub fn snapshot(ns: &str, dev: &str) -> Result<Snapshot> {
    let qd = cmd::ns_exec(ns, &["tc", "-j", "qdisc", "show", "dev", dev])?;
    let json: Value =
        serde_json::from_str(&qd).with_context(|| format!("parsing `tc -j qdisc show`: {qd}"))?;
    let mut qdiscs: Vec<Qdisc> = json
        .as_array()
        .into_iter()
        .flatten()
        .map(|q| Qdisc {
            kind: q.get("kind").and_then(Value::as_str).unwrap_or("?").into(),
            handle: q
                .get("handle")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .into(),
        })
        .collect();
    qdiscs.sort();
    let filters = |dir: Dir| cmd::ns_exec(ns, &["tc", "filter", "show", "dev", dev, dir.tc()]);
    Ok(Snapshot {
        qdiscs,
        tc_ingress: filters(Dir::Ingress)?,
        tc_egress: filters(Dir::Egress)?,
        tcx_ingress: tcx_programs(ns, dev, Dir::Ingress)?,
        tcx_egress: tcx_programs(ns, dev, Dir::Egress)?,
    })
}

/// `bpftool` on the PATH, if installed (the checks that use it are extra, never required).
pub fn bpftool() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("bpftool"))
            .find(|p| p.is_file())
    })
}

/// Program ids `bpftool -j prog show` lists, if bpftool is installed.
pub fn bpftool_prog_ids() -> Option<Result<BTreeSet<u32>>> {
    let tool = bpftool()?;
    let tool = tool.to_string_lossy().into_owned();
    Some((|| {
        let out = cmd::run(&tool, &["-j", "prog", "show"])?;
        let json: Value = serde_json::from_str(&out).context("parsing bpftool -j prog show")?;
        Ok(json
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.get("id").and_then(Value::as_u64))
            .filter_map(|id| u32::try_from(id).ok())
            .collect())
    })())
}

/// TCX program counts (ingress, egress) for each of `ifaces` in namespace `ns`, in order, read
/// on one thread (cheap for hundreds of interfaces).
pub fn tcx_counts(ns: &str, ifaces: &[String]) -> Result<Vec<(usize, usize)>> {
    let ifaces = ifaces.to_vec();
    in_ns(ns, move || {
        ifaces
            .iter()
            .map(|dev| {
                Ok((
                    query_tcx(dev, Dir::Ingress)?.len(),
                    query_tcx(dev, Dir::Egress)?.len(),
                ))
            })
            .collect()
    })
}

/// A BPF map found among a process's descriptors.
#[derive(Debug)]
pub struct MapHandle {
    fd: OwnedFd,
    /// The map's name (as the object file named it, at most 15 bytes).
    pub name: String,
    /// Size of a key in bytes.
    pub key_size: u32,
    /// Size of a value in bytes.
    pub value_size: u32,
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
            let mut attr = Attr::new();
            attr.u32(0, self.fd.as_raw_fd() as u32)
                .u64(8, if first { 0 } else { key.as_ptr() as u64 })
                .u64(16, next.as_mut_ptr() as u64);
            match attr.call(BPF_MAP_GET_NEXT_KEY) {
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

impl MapHandle {
    /// Entries of the IPv4 pending table (`TABLE_V4`, an array of bucket heads): its used
    /// slots, read bucket by bucket (entries may change meanwhile).
    pub fn table_entries(&self) -> Result<usize> {
        use netrace_common::table::{HeadV4, WAYS};
        let tags = std::mem::offset_of!(HeadV4, tags);
        if self.value_size as usize != size_of::<HeadV4>() {
            bail!(
                "map {} holds {}-byte values, not bucket heads",
                self.name,
                self.value_size
            );
        }
        let mut value = vec![0u8; self.value_size as usize];
        let mut n = 0;
        for i in 0..self.max_entries {
            let mut attr = Attr::new();
            attr.u32(0, self.fd.as_raw_fd() as u32)
                .u64(8, &i as *const u32 as u64)
                .u64(16, value.as_mut_ptr() as u64);
            attr.call(BPF_MAP_LOOKUP_ELEM)
                .context("BPF_MAP_LOOKUP_ELEM")?;
            n += value[tags..tags + WAYS].iter().filter(|t| **t != 0).count();
        }
        Ok(n)
    }
}

/// The BPF map named `name` that process `pid` holds open.
pub fn process_map(pid: u32, name: &str) -> Result<MapHandle> {
    for id in held_by(pid)?.maps {
        let mut attr = Attr::new();
        attr.u32(0, id);
        let Ok(rc) = attr.call(BPF_MAP_GET_FD_BY_ID) else {
            continue;
        };
        let fd = fd_from(rc)?;
        // struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags,
        // name[16] at offset 24.
        let info = obj_info(&fd)?;
        let word = |off: usize| {
            u32::from_ne_bytes([info[off], info[off + 1], info[off + 2], info[off + 3]])
        };
        let raw_name = &info[24..40];
        let end = raw_name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(raw_name.len());
        let found = String::from_utf8_lossy(&raw_name[..end]).into_owned();
        if found == name {
            return Ok(MapHandle {
                fd,
                name: found,
                key_size: word(8),
                value_size: word(12),
                max_entries: word(16),
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
    /// `VmHWM`: the peak resident size so far.
    pub peak_kib: u64,
}

/// Reads `VmRSS`, `RssAnon` and `VmHWM` of `pid`.
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
        peak_kib: field("VmHWM:")?,
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
