//! The node's SNAT done by a BPF program instead of netfilter, as Cilium's BPF masquerading,
//! GKE Dataplane V2 and Calico's eBPF dataplane do it: two TCX classifiers on the node's
//! uplink, assembled here (no compiler needed), that translate the pod's TCP in place and
//! return `TC_ACT_OK` (`TCX_PASS`), a final verdict: no tc program after them runs.
//!
//! - egress: source `POD4:P` becomes `NODE_UP4:Q` with `Q = `[`translate`]`(P)` (IPv6 alike:
//!   `POD6` becomes `NODE_UP6`);
//! - ingress: a packet from the server to `NODE_UP4:Q` becomes one to `POD4:P`.
//!
//! The mapping is stateless: an even pod port keeps its number, an odd one in 32768-65535 moves
//! down by 31744 (into 1025-33791, below 32768 for every port the lab's client uses). With the
//! seed's firewall (SYN-ACKs back only to 32768-65535) about half the connections lose their
//! SYN-ACK, as with `MASQUERADE --random-fully`. Build the lab with [`SnatMode::None`] (routes
//! only, no netfilter SNAT) and attach [`BpfSnat`] to its uplink.
//!
//! [`SnatMode::None`]: crate::SnatMode::None

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use anyhow::{anyhow, Result};

use crate::foreign_tcx::{insn, link_tcx, load_classifier, BPF_F_BEFORE};
use crate::inspect::Dir;
use crate::lab::{addr, Lab};

/// How far an odd pod port moves down.
const SHIFT: u16 = 31744;

/// The node port the test SNAT gives pod port `pod_port` (the firewall and server see it).
pub fn translate(pod_port: u16) -> u16 {
    if pod_port & 1 == 1 && pod_port >= 32768 {
        pod_port - SHIFT
    } else {
        pod_port
    }
}

/// The pod port behind node port `node_port` (inverse of [`translate`]).
pub fn untranslate(node_port: u16) -> u16 {
    if node_port & 1 == 1 && node_port < 32768 && node_port > 1024 {
        node_port + SHIFT
    } else {
        node_port
    }
}

/// Where the SNAT programs go on the uplink's TCX hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Appended after the programs already attached (netrace's, when it runs already).
    Last,
    /// First in line, before everything attached so far (before netrace's).
    First,
}

/// Names the programs carry (`bpftool prog show`, netrace's foreign-program report).
pub const EGRESS_NAME: &str = "nrt_snat_eg";
/// See [`EGRESS_NAME`].
pub const INGRESS_NAME: &str = "nrt_snat_in";

const MOV64_IMM: u8 = 0xb7;
const MOV64_REG: u8 = 0xbf;
const ADD64_IMM: u8 = 0x07;
const AND64_IMM: u8 = 0x57;
const LDX_B: u8 = 0x71;
const LDX_H: u8 = 0x69;
const LDX_W: u8 = 0x61;
const STX_H: u8 = 0x6b;
const STX_W: u8 = 0x63;
const JEQ_IMM: u8 = 0x15;
const JNE_IMM: u8 = 0x55;
const JLT_IMM: u8 = 0xa5;
const JGE_IMM: u8 = 0x35;
/// `BPF_ALU | BPF_END | BPF_TO_BE`: on a little-endian machine, a byte swap.
const TO_BE: u8 = 0xdc;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;

const SKB_STORE_BYTES: i32 = 9;
const L3_CSUM_REPLACE: i32 = 10;
const L4_CSUM_REPLACE: i32 = 11;
const SKB_LOAD_BYTES: i32 = 26;
const BPF_F_PSEUDO_HDR: i32 = 0x10;
const TC_ACT_OK: i32 = 0;
const TCX_NEXT: i32 = -1;

/// Frame offsets for an untagged IPv4 packet without options, or an IPv6 packet without
/// extension headers (the lab's).
const IP: i32 = 14;
const IP_CSUM: i32 = IP + 10;
const IP4_SRC: i32 = IP + 12;
const IP4_DST: i32 = IP + 16;
const IP6_SRC: i32 = IP + 8;
const IP6_DST: i32 = IP + 24;

/// Stack slots: 8 scratch bytes at fp-8, the IP header at fp-56 (40 bytes for IPv6, 20 for
/// IPv4), a new IPv6 address at fp-72.
const SCRATCH: i16 = -8;
const HDR: i16 = -56;
const ADDR6: i16 = -72;

/// `BPF_JMP32 | BPF_JNE | BPF_K`: compares the low 32 bits (an address word read with
/// `LDX_W` is zero-extended, an immediate sign-extended).
const JNE32_IMM: u8 = 0x56;

/// A tiny assembler with forward labels.
#[derive(Default)]
struct Asm {
    code: Vec<[u8; 8]>,
    labels: HashMap<&'static str, usize>,
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.code.push(insn(code, dst, src, off, imm));
    }
    fn jump(&mut self, code: u8, dst: u8, imm: i32, label: &'static str) {
        self.fixups.push((self.code.len(), label));
        self.op(code, dst, 0, 0, imm);
    }
    fn label(&mut self, name: &'static str) {
        self.labels.insert(name, self.code.len());
    }
    /// `bpf_skb_load_bytes(ctx, off, fp + slot, len)`; jumps to `pass` on failure.
    fn load(&mut self, off: i32, slot: i16, len: i32) {
        self.op(MOV64_REG, 1, 6, 0, 0);
        self.op(MOV64_IMM, 2, 0, 0, off);
        self.op(MOV64_REG, 3, 10, 0, 0);
        self.op(ADD64_IMM, 3, 0, 0, i32::from(slot));
        self.op(MOV64_IMM, 4, 0, 0, len);
        self.op(CALL, 0, 0, 0, SKB_LOAD_BYTES);
        self.jump(JNE_IMM, 0, 0, "pass");
    }
    fn finish(mut self) -> Result<Vec<u8>> {
        for (at, label) in std::mem::take(&mut self.fixups) {
            let to = *self
                .labels
                .get(label)
                .ok_or_else(|| anyhow!("no label {label}"))?;
            let off = i16::try_from(to as i64 - at as i64 - 1)?;
            self.code[at][2..4].copy_from_slice(&off.to_le_bytes());
        }
        Ok(self.code.concat())
    }
}

/// The 32-bit words of an address as `LDX_W` reads them from the packet on this machine.
fn words(octets: &[u8]) -> Vec<i32> {
    octets
        .chunks(4)
        .map(|w| i32::from_ne_bytes([w[0], w[1], w[2], w[3]]))
        .collect()
}

fn raw16(v: u16) -> i32 {
    i32::from(u16::from_ne_bytes(v.to_be_bytes()))
}

/// Jumps to `pass` unless the address at `hdr_off` in the saved header is `addr`.
fn expect_addr(a: &mut Asm, hdr_off: i16, addr: &[u8]) {
    for (i, w) in words(addr).into_iter().enumerate() {
        a.op(LDX_W, 2, 10, hdr_off + 4 * i as i16, 0);
        a.jump(JNE32_IMM, 2, w, "pass");
    }
}

/// The translation of one family: checks, port, checksums, address; then `TC_ACT_OK`.
fn family(a: &mut Asm, dir: Dir, v6: bool) {
    let tcp = if v6 { IP + 40 } else { IP + 20 };
    let tcp_csum = tcp + 16;
    a.load(IP, HDR, if v6 { 40 } else { 20 });
    if v6 {
        a.op(LDX_B, 2, 10, HDR, 0);
        a.op(AND64_IMM, 2, 0, 0, 0xf0);
        a.jump(JNE_IMM, 2, 0x60, "pass");
        a.op(LDX_B, 2, 10, HDR + 6, 0);
        a.jump(JNE_IMM, 2, 6, "pass"); // TCP, no extension headers
    } else {
        a.op(LDX_B, 2, 10, HDR, 0);
        a.jump(JNE_IMM, 2, 0x45, "pass"); // IPv4 without options
        a.op(LDX_B, 2, 10, HDR + 9, 0);
        a.jump(JNE_IMM, 2, 6, "pass"); // TCP
    }
    let (src_off, dst_off) = if v6 {
        (HDR + 8, HDR + 24)
    } else {
        (HDR + 12, HDR + 16)
    };
    let (pod, node, srv): (Vec<u8>, Vec<u8>, Vec<u8>) = if v6 {
        (
            addr::POD6.octets().to_vec(),
            addr::NODE_UP6.octets().to_vec(),
            addr::SRV6.octets().to_vec(),
        )
    } else {
        (
            addr::POD4.octets().to_vec(),
            addr::NODE_UP4.octets().to_vec(),
            addr::SRV4.octets().to_vec(),
        )
    };
    // (old address in the saved header, new address, where it goes in the frame, port)
    let (old_off, new, addr_off, port_off) = match dir {
        Dir::Egress => {
            expect_addr(a, src_off, &pod);
            (src_off, node, if v6 { IP6_SRC } else { IP4_SRC }, tcp)
        }
        Dir::Ingress => {
            expect_addr(a, src_off, &srv);
            expect_addr(a, dst_off, &node);
            (dst_off, pod, if v6 { IP6_DST } else { IP4_DST }, tcp + 2)
        }
    };
    let address = if v6 { "address6" } else { "address4" };
    a.load(port_off, SCRATCH, 2);
    a.op(LDX_H, 8, 10, SCRATCH, 0); // r8 = port as in the packet
    a.op(MOV64_REG, 9, 8, 0, 0);
    a.op(TO_BE, 9, 0, 0, 16); // r9 = port number
    a.op(MOV64_REG, 2, 9, 0, 0);
    a.op(AND64_IMM, 2, 0, 0, 1);
    a.jump(JEQ_IMM, 2, 0, address); // even ports keep their number
    match dir {
        Dir::Egress => {
            a.jump(JLT_IMM, 9, 32768, address);
            a.op(ADD64_IMM, 9, 0, 0, -i32::from(SHIFT));
        }
        Dir::Ingress => {
            a.jump(JGE_IMM, 9, 32768, address);
            a.jump(JLT_IMM, 9, 1025, address);
            a.op(ADD64_IMM, 9, 0, 0, i32::from(SHIFT));
        }
    }
    a.op(TO_BE, 9, 0, 0, 16);
    a.op(STX_H, 10, 9, SCRATCH, 0);
    // l4_csum_replace(skb, tcp_csum, old port, new port, 2)
    a.op(MOV64_REG, 1, 6, 0, 0);
    a.op(MOV64_IMM, 2, 0, 0, tcp_csum);
    a.op(MOV64_REG, 3, 8, 0, 0);
    a.op(MOV64_REG, 4, 9, 0, 0);
    a.op(MOV64_IMM, 5, 0, 0, 2);
    a.op(CALL, 0, 0, 0, L4_CSUM_REPLACE);
    // skb_store_bytes(skb, port_off, fp-8, 2, 0)
    a.op(MOV64_REG, 1, 6, 0, 0);
    a.op(MOV64_IMM, 2, 0, 0, port_off);
    a.op(MOV64_REG, 3, 10, 0, 0);
    a.op(ADD64_IMM, 3, 0, 0, i32::from(SCRATCH));
    a.op(MOV64_IMM, 4, 0, 0, 2);
    a.op(MOV64_IMM, 5, 0, 0, 0);
    a.op(CALL, 0, 0, 0, SKB_STORE_BYTES);
    a.label(address);
    // The address is in the pseudo-header the TCP checksum covers, word by word; IPv4's
    // header checksum covers it too.
    let new_words = words(&new);
    for (i, w) in new_words.iter().enumerate() {
        a.op(MOV64_REG, 1, 6, 0, 0);
        a.op(MOV64_IMM, 2, 0, 0, tcp_csum);
        a.op(LDX_W, 3, 10, old_off + 4 * i as i16, 0);
        a.op(MOV64_IMM, 4, 0, 0, *w);
        a.op(MOV64_IMM, 5, 0, 0, BPF_F_PSEUDO_HDR | 4);
        a.op(CALL, 0, 0, 0, L4_CSUM_REPLACE);
        if !v6 {
            a.op(MOV64_REG, 1, 6, 0, 0);
            a.op(MOV64_IMM, 2, 0, 0, IP_CSUM);
            a.op(LDX_W, 3, 10, old_off + 4 * i as i16, 0);
            a.op(MOV64_IMM, 4, 0, 0, *w);
            a.op(MOV64_IMM, 5, 0, 0, 4);
            a.op(CALL, 0, 0, 0, L3_CSUM_REPLACE);
        }
    }
    // skb_store_bytes(skb, addr_off, new address on the stack, len, 0)
    for (i, w) in new_words.iter().enumerate() {
        a.op(MOV64_IMM, 2, 0, 0, *w);
        a.op(STX_W, 10, 2, ADDR6 + 4 * i as i16, 0);
    }
    a.op(MOV64_REG, 1, 6, 0, 0);
    a.op(MOV64_IMM, 2, 0, 0, addr_off);
    a.op(MOV64_REG, 3, 10, 0, 0);
    a.op(ADD64_IMM, 3, 0, 0, i32::from(ADDR6));
    a.op(MOV64_IMM, 4, 0, 0, 4 * new_words.len() as i32);
    a.op(MOV64_IMM, 5, 0, 0, 0);
    a.op(CALL, 0, 0, 0, SKB_STORE_BYTES);
    // A final verdict, as a CNI's datapath returns: nothing after this program runs.
    a.op(MOV64_IMM, 0, 0, 0, TC_ACT_OK);
    a.op(EXIT, 0, 0, 0, 0);
}

/// The translating classifier for one direction, IPv4 and IPv6.
fn program(dir: Dir) -> Result<Vec<u8>> {
    let mut a = Asm::default();
    a.op(MOV64_REG, 6, 1, 0, 0); // r6 = ctx
    a.load(12, SCRATCH, 2);
    a.op(LDX_H, 2, 10, SCRATCH, 0);
    a.jump(JEQ_IMM, 2, raw16(0x86dd), "v6");
    a.jump(JNE_IMM, 2, raw16(0x0800), "pass");
    family(&mut a, dir, false);
    a.label("v6");
    family(&mut a, dir, true);
    a.label("pass");
    a.op(MOV64_IMM, 0, 0, 0, TCX_NEXT);
    a.op(EXIT, 0, 0, 0, 0);
    a.finish()
}

/// The two SNAT classifiers attached to a lab's uplink. Dropping the value detaches them.
pub struct BpfSnat {
    /// Program ids (egress, ingress).
    pub prog_ids: (u32, u32),
    _links: Vec<OwnedFd>,
    _progs: Vec<OwnedFd>,
}

impl std::fmt::Debug for BpfSnat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfSnat")
            .field("prog_ids", &self.prog_ids)
            .finish_non_exhaustive()
    }
}

impl BpfSnat {
    /// Attaches egress translation at `egress` in the uplink's TCX egress chain, and the
    /// reverse translation at the end of its ingress chain (after netrace's, which must see
    /// the answer before it is translated back; a final verdict before it would hide it).
    pub fn attach(lab: &Lab, egress: Order) -> Result<Self> {
        let (eg, eg_id) = load_classifier(EGRESS_NAME, &program(Dir::Egress)?)?;
        let (ing, ing_id) = load_classifier(INGRESS_NAME, &program(Dir::Ingress)?)?;
        let flags = match egress {
            Order::Last => 0,
            Order::First => BPF_F_BEFORE,
        };
        let up = lab.node_uplink();
        let eg_link = link_tcx(lab.node_ns(), up, Dir::Egress, &eg, flags)?;
        let ing_link = link_tcx(lab.node_ns(), up, Dir::Ingress, &ing, 0)?;
        Ok(Self {
            prog_ids: (eg_id, ing_id),
            _links: vec![eg_link, ing_link],
            _progs: vec![eg, ing],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_is_invertible_and_splits_the_client_range() {
        let mut below = 0;
        for p in 32768..=60999u16 {
            let q = translate(p);
            assert_eq!(untranslate(q), p, "port {p}");
            if q < 32768 {
                below += 1;
                assert!(q > 1024, "port {p} -> {q}");
            }
        }
        assert_eq!(below, (60999 - 32768 + 1) / 2);
    }

    #[test]
    fn programs_assemble_with_every_jump_resolved() {
        for dir in [Dir::Egress, Dir::Ingress] {
            let code = program(dir).unwrap_or_default();
            assert!(!code.is_empty(), "{dir:?} did not assemble");
            assert_eq!(code.len() % 8, 0);
            let n = code.len() / 8;
            for i in 0..n {
                let op = code[i * 8];
                if matches!(op, JEQ_IMM | JNE_IMM | JLT_IMM | JGE_IMM | JNE32_IMM) {
                    let off = i16::from_le_bytes([code[i * 8 + 2], code[i * 8 + 3]]);
                    let to = i as i64 + 1 + i64::from(off);
                    assert!(to > i as i64 && to < n as i64, "jump at {i} to {to}");
                }
            }
        }
    }
}
