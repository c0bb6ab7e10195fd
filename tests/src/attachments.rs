//! What is attached to an interface and what a process holds in the kernel, read without
//! netrace and without `bpftool` (Debian 12's bpftool 7.1 does not know TCX links): TCX
//! programs through `BPF_PROG_QUERY`, clsact qdiscs and filters through `tc`, the BPF
//! programs, maps and links a process has open through `/proc/PID/fdinfo`, whether an object
//! id still exists, and pinned objects under `/sys/fs/bpf`.
//!
//! Also a *foreign* TCX program for tests that check netrace leaves other tools alone: a tiny
//! classifier, assembled here, that drops IPv4 TCP packets to one destination port. Needs root.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

use crate::{cmd, netns};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
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
    fn tc(self) -> &'static str {
        match self {
            Dir::Ingress => "ingress",
            Dir::Egress => "egress",
        }
    }

    fn tcx(self) -> u32 {
        match self {
            Dir::Ingress => BPF_TCX_INGRESS,
            Dir::Egress => BPF_TCX_EGRESS,
        }
    }
}

/// A zeroed `union bpf_attr` with little-endian field setters.
struct Attr([u8; ATTR_SIZE]);

impl Attr {
    fn new() -> Self {
        Self([0; ATTR_SIZE])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn get_u32(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[off..off + 4]);
        u32::from_ne_bytes(b)
    }
    fn bytes(&mut self, off: usize, v: &[u8]) -> &mut Self {
        self.0[off..off + v.len()].copy_from_slice(v);
        self
    }
    fn call(&mut self, cmd: libc::c_long) -> std::io::Result<i64> {
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

fn fd_from(rc: i64) -> Result<OwnedFd> {
    let fd = i32::try_from(rc).map_err(|_| anyhow!("bpf returned fd {rc}"))?;
    // SAFETY: on success these bpf commands return a new file descriptor that nothing else
    // owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs `f` on a fresh thread inside namespace `ns` (per-thread namespaces: the caller's
/// thread stays where it is).
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        netns::enter(&ns)?;
        f()
    })
    .join()
    .map_err(|_| anyhow!("a thread inside the namespace panicked"))?
}

fn ifindex(name: &str) -> Result<u32> {
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
    in_ns(ns, move || {
        let idx = ifindex(&dev)?;
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
    })
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
    let mut info = [0u8; 256];
    let mut attr = Attr::new();
    attr.u32(0, fd.as_raw_fd() as u32)
        .u32(4, info.len() as u32)
        .u64(8, info.as_mut_ptr() as u64);
    attr.call(BPF_OBJ_GET_INFO_BY_FD).ok()?;
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

// ---- a foreign TCX program ----

/// One BPF instruction.
pub(crate) fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let o = off.to_le_bytes();
    let i = imm.to_le_bytes();
    [code, (src << 4) | dst, o[0], o[1], i[0], i[1], i[2], i[3]]
}

const MOV64_IMM: u8 = 0xb7;
const MOV64_REG: u8 = 0xbf;
const ADD64_IMM: u8 = 0x07;
const AND64_IMM: u8 = 0x57;
const LSH64_IMM: u8 = 0x67;
const LDX_B: u8 = 0x71;
const LDX_H: u8 = 0x69;
const JNE_IMM: u8 = 0x55;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const HELPER_SKB_LOAD_BYTES: i32 = 26;
const TCX_NEXT: i32 = -1;
const TCX_DROP: i32 = 2;

/// `skb_load_bytes(ctx, OFF-in-r2, fp-8, len)`; r2 must hold the offset already.
fn load_to_stack(prog: &mut Vec<[u8; 8]>, jumps: &mut Vec<usize>, len: i32) {
    prog.push(insn(MOV64_REG, 1, 6, 0, 0)); // r1 = ctx
    prog.push(insn(MOV64_REG, 3, 10, 0, 0)); // r3 = fp
    prog.push(insn(ADD64_IMM, 3, 0, 0, -8)); // r3 -= 8
    prog.push(insn(MOV64_IMM, 4, 0, 0, len)); // r4 = len
    prog.push(insn(CALL, 0, 0, 0, HELPER_SKB_LOAD_BYTES));
    jumps.push(prog.len());
    prog.push(insn(JNE_IMM, 0, 0, 0, 0)); // if r0 != 0 goto pass
}

/// A classifier returning `TCX_DROP` for IPv4 TCP packets to `port` and `TCX_NEXT` for the rest.
fn drop_port_program(port: u16) -> Vec<[u8; 8]> {
    let mut p = Vec::new();
    let mut jumps = Vec::new();
    p.push(insn(MOV64_REG, 6, 1, 0, 0)); // r6 = ctx
                                         // Ethertype (2 bytes at 12) must be IPv4.
    p.push(insn(MOV64_IMM, 2, 0, 0, 12));
    load_to_stack(&mut p, &mut jumps, 2);
    p.push(insn(LDX_H, 2, 10, -8, 0));
    jumps.push(p.len());
    p.push(insn(
        JNE_IMM,
        2,
        0,
        0,
        i32::from(u16::from_ne_bytes(0x0800u16.to_be_bytes())),
    ));
    // IPv4 protocol (byte 14 + 9) must be TCP.
    p.push(insn(MOV64_IMM, 2, 0, 0, 23));
    load_to_stack(&mut p, &mut jumps, 1);
    p.push(insn(LDX_B, 2, 10, -8, 0));
    jumps.push(p.len());
    p.push(insn(JNE_IMM, 2, 0, 0, 6));
    // Header length, then the destination port at 14 + ihl * 4 + 2.
    p.push(insn(MOV64_IMM, 2, 0, 0, 14));
    load_to_stack(&mut p, &mut jumps, 1);
    p.push(insn(LDX_B, 2, 10, -8, 0));
    p.push(insn(AND64_IMM, 2, 0, 0, 0x0f));
    p.push(insn(LSH64_IMM, 2, 0, 0, 2));
    p.push(insn(ADD64_IMM, 2, 0, 0, 16));
    load_to_stack(&mut p, &mut jumps, 2);
    p.push(insn(LDX_H, 2, 10, -8, 0));
    jumps.push(p.len());
    p.push(insn(
        JNE_IMM,
        2,
        0,
        0,
        i32::from(u16::from_ne_bytes(port.to_be_bytes())),
    ));
    p.push(insn(MOV64_IMM, 0, 0, 0, TCX_DROP));
    p.push(insn(EXIT, 0, 0, 0, 0));
    let pass = p.len();
    p.push(insn(MOV64_IMM, 0, 0, 0, TCX_NEXT));
    p.push(insn(EXIT, 0, 0, 0, 0));
    for j in jumps {
        let off = i16::try_from(pass - j - 1).unwrap_or(i16::MAX);
        p[j][2..4].copy_from_slice(&off.to_le_bytes());
    }
    p
}

/// A foreign TCX program attached by the test (not by netrace): drops IPv4 TCP packets to
/// one port. The link is an fd of this process; dropping the value detaches it.
pub struct ForeignTcx {
    /// The program's id.
    pub prog_id: u32,
    _link: OwnedFd,
    _prog: OwnedFd,
}

impl std::fmt::Debug for ForeignTcx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForeignTcx")
            .field("prog_id", &self.prog_id)
            .finish_non_exhaustive()
    }
}

/// The name the foreign program carries (`bpftool prog show` lists it).
pub const FOREIGN_PROG_NAME: &str = "nrt_foreign";

impl ForeignTcx {
    /// Loads the dropper for TCP port `port` and appends it to the TCX hook of `dev` in `dir`
    /// (namespace `ns`), after whatever is there.
    pub fn drop_tcp_port(ns: &str, dev: &str, dir: Dir, port: u16) -> Result<Self> {
        let insns: Vec<u8> = drop_port_program(port).concat();
        let (prog, prog_id) = load_classifier(FOREIGN_PROG_NAME, &insns)?;
        let link = link_tcx(ns, dev, dir, &prog, 0)?;
        Ok(Self {
            prog_id,
            _link: link,
            _prog: prog,
        })
    }
}

/// Loads a classifier assembled by a test (`insns`: 8-byte instructions), named `name` (at
/// most 15 bytes); returns its fd and id. The verifier's log is in the error.
pub(crate) fn load_classifier(name: &str, insns: &[u8]) -> Result<(OwnedFd, u32)> {
    let license = CString::new("GPL")?;
    let mut log = vec![0u8; 64 * 1024];
    let mut prog_name = [0u8; 16];
    let n = name.len().min(15);
    prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let mut attr = Attr::new();
    attr.u32(0, BPF_PROG_TYPE_SCHED_CLS)
        .u32(4, (insns.len() / 8) as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .bytes(48, &prog_name);
    let prog = match attr.call(BPF_PROG_LOAD) {
        Ok(rc) => fd_from(rc)?,
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            bail!(
                "loading the test classifier {name}: {e}\n{}",
                String::from_utf8_lossy(&log[..end])
            );
        }
    };
    let mut info = [0u8; 256];
    let mut attr = Attr::new();
    attr.u32(0, prog.as_raw_fd() as u32)
        .u32(4, info.len() as u32)
        .u64(8, info.as_mut_ptr() as u64);
    attr.call(BPF_OBJ_GET_INFO_BY_FD)
        .context("BPF_OBJ_GET_INFO_BY_FD")?;
    let prog_id = u32::from_ne_bytes([info[4], info[5], info[6], info[7]]);
    Ok((prog, prog_id))
}

/// `BPF_F_BEFORE`: with no relative program, first in line on the TCX hook.
pub(crate) const BPF_F_BEFORE: u32 = 1 << 3;

/// Links `prog` to the TCX hook of `dev` in `dir` (namespace `ns`): appended after whatever is
/// there with `flags` 0, first in line with [`BPF_F_BEFORE`]. The link lives as long as its fd.
pub(crate) fn link_tcx(
    ns: &str,
    dev: &str,
    dir: Dir,
    prog: &OwnedFd,
    flags: u32,
) -> Result<OwnedFd> {
    let prog_fd = prog.as_raw_fd() as u32;
    let dev = dev.to_owned();
    in_ns(ns, move || {
        let idx = ifindex(&dev)?;
        let mut attr = Attr::new();
        attr.u32(0, prog_fd)
            .u32(4, idx)
            .u32(8, dir.tcx())
            .u32(12, flags);
        let rc = attr
            .call(BPF_LINK_CREATE)
            .with_context(|| format!("BPF_LINK_CREATE tcx {} on {dev}", dir.tc()))?;
        fd_from(rc)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropper_jumps_land_on_the_pass_branch() {
        let p = drop_port_program(8082);
        let pass = p.len() - 2;
        for (i, ins) in p.iter().enumerate() {
            if ins[0] == JNE_IMM {
                let off = i16::from_le_bytes([ins[2], ins[3]]);
                assert_eq!(i as i64 + 1 + i64::from(off), pass as i64, "jump at {i}");
            }
        }
        assert_eq!(p[pass][0], MOV64_IMM);
        assert_eq!(
            i32::from_le_bytes([p[pass][4], p[pass][5], p[pass][6], p[pass][7]]),
            -1
        );
    }
}
