//! A *foreign* TCX program for tests that check netrace leaves other tools alone: a tiny
//! classifier, assembled here, that drops IPv4 TCP packets to one destination port, attached
//! by the test (not by netrace). Needs root.

use std::ffi::CString;
use std::os::fd::{AsRawFd as _, OwnedFd};

use anyhow::{bail, Context as _, Result};

use crate::inspect::{
    fd_from, ifindex, in_ns, obj_info, Attr, Dir, BPF_LINK_CREATE, BPF_PROG_LOAD,
};

const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

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
    // struct bpf_prog_info: type, then id.
    let info = obj_info(&prog)?;
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
