//! Struct member offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`), for the
//! device hook, which reads `struct sk_buff` and `struct net_device` through kernel pointers.
//! aya's `Btf` does not expose member offsets, and Rust BPF programs get no CO-RE
//! relocations, so user space reads the offsets here and hands them to the kernel side.
//!
//! Only what is needed: the type section is walked once, structs and unions are kept with
//! their members, and a member is found by name, descending into anonymous structs and unions
//! (`struct_group`, the unions inside `sk_buff`).

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context as _};
use netrace_common::SkbOffsets;

/// Where the running kernel publishes its BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Debug)]
struct Member {
    name: String,
    type_id: u32,
    /// Offset in bits from the start of the enclosing struct or union.
    bit_offset: u32,
}

#[derive(Clone, Debug)]
enum Ty {
    /// A struct or union with its members.
    Composite {
        members: Vec<Member>,
    },
    /// typedef, const, volatile, restrict, type tag: points at another type.
    Alias(u32),
    Other,
}

/// The parsed types of one BTF blob (only what offsets need).
pub struct Btf {
    /// Indexed by type id; id 0 is `void`.
    types: Vec<Ty>,
    by_name: HashMap<String, u32>,
}

fn u32_at(b: &[u8], at: usize) -> anyhow::Result<u32> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| anyhow!("BTF cut short at byte {at}"))
}

fn string_at(strings: &[u8], off: u32) -> String {
    let tail = strings.get(off as usize..).unwrap_or_default();
    let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
    String::from_utf8_lossy(&tail[..end]).into_owned()
}

impl Btf {
    /// Reads and parses the running kernel's BTF.
    pub fn from_sys_fs() -> anyhow::Result<Self> {
        let data = std::fs::read(VMLINUX)
            .with_context(|| format!("reading the kernel's BTF {VMLINUX}"))?;
        Self::parse(&data)
    }

    /// Parses a little-endian BTF blob (the only byte order of the machines netrace runs on).
    pub fn parse(data: &[u8]) -> anyhow::Result<Self> {
        let magic = data
            .get(..2)
            .map(|m| u16::from_le_bytes([m[0], m[1]]))
            .ok_or_else(|| anyhow!("BTF shorter than its header"))?;
        if magic != MAGIC {
            bail!("not BTF (magic {magic:#06x})");
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let types_data = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or_else(|| anyhow!("BTF type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or_else(|| anyhow!("BTF string section out of bounds"))?;
        let mut types = vec![Ty::Other];
        let mut by_name = HashMap::new();
        let mut at = 0;
        while at < types_data.len() {
            let name_off = u32_at(types_data, at)?;
            let info = u32_at(types_data, at + 4)?;
            let size_or_type = u32_at(types_data, at + 8)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            at += 12;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let raw_offset = u32_at(types_data, m + 8)?;
                        members.push(Member {
                            name: string_at(strings, u32_at(types_data, m)?),
                            type_id: u32_at(types_data, m + 4)?,
                            // With kind_flag, the top 8 bits are a bitfield's size.
                            bit_offset: if kind_flag {
                                raw_offset & 0x00ff_ffff
                            } else {
                                raw_offset
                            },
                        });
                    }
                    at += vlen * 12;
                    let name = string_at(strings, name_off);
                    if kind == KIND_STRUCT && !name.is_empty() {
                        // The first definition wins; vmlinux has one per name.
                        by_name.entry(name).or_insert(types.len() as u32);
                    }
                    Ty::Composite { members }
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Ty::Alias(size_or_type)
                }
                KIND_INT | KIND_VAR | KIND_DECL_TAG => {
                    at += 4;
                    Ty::Other
                }
                KIND_ARRAY => {
                    at += 12;
                    Ty::Other
                }
                KIND_ENUM | KIND_FUNC_PROTO => {
                    at += vlen * 8;
                    Ty::Other
                }
                KIND_DATASEC | KIND_ENUM64 => {
                    at += vlen * 12;
                    Ty::Other
                }
                KIND_PTR | KIND_FWD | KIND_FUNC | KIND_FLOAT => Ty::Other,
                other => bail!("unknown BTF kind {other}"),
            };
            types.push(ty);
        }
        Ok(Self { types, by_name })
    }

    fn resolve(&self, mut id: u32) -> Option<&Ty> {
        for _ in 0..32 {
            match self.types.get(id as usize)? {
                Ty::Alias(next) => id = *next,
                ty => return Some(ty),
            }
        }
        None
    }

    /// Bit offset of `member` in the composite `id`, looking into anonymous members.
    fn find(&self, id: u32, member: &str, depth: u32) -> Option<(u32, u32)> {
        let Some(Ty::Composite { members, .. }) = self.resolve(id) else {
            return None;
        };
        if depth > 8 {
            return None;
        }
        if let Some(m) = members.iter().find(|m| m.name == member) {
            return Some((m.bit_offset, m.type_id));
        }
        members.iter().filter(|m| m.name.is_empty()).find_map(|m| {
            self.find(m.type_id, member, depth + 1)
                .map(|(off, ty)| (m.bit_offset + off, ty))
        })
    }

    /// Byte offset of a member path such as `nd_net.net` in `struct name`.
    pub fn offset(&self, name: &str, path: &str) -> anyhow::Result<u32> {
        let mut id = *self
            .by_name
            .get(name)
            .ok_or_else(|| anyhow!("the kernel's BTF has no struct {name}"))?;
        let mut bits = 0;
        for part in path.split('.') {
            let (off, ty) = self
                .find(id, part, 0)
                .ok_or_else(|| anyhow!("the kernel's struct {name} has no member {path}"))?;
            bits += off;
            id = ty;
        }
        if bits % 8 != 0 {
            bail!("{name}.{path} is a bitfield");
        }
        Ok(bits / 8)
    }

    /// Whether `name` is a struct here.
    #[cfg(test)]
    fn composite(&self, name: &str) -> bool {
        self.by_name
            .get(name)
            .and_then(|id| self.types.get(*id as usize))
            .is_some_and(|t| matches!(t, Ty::Composite { .. }))
    }
}

fn small(name: &str, off: u32) -> anyhow::Result<u16> {
    u16::try_from(off).map_err(|_| anyhow!("{name} at offset {off} is beyond what the hook reads"))
}

/// The offsets the device hook needs, from the running kernel's BTF.
pub fn skb_offsets(btf: &Btf) -> anyhow::Result<SkbOffsets> {
    // Without network namespaces, `possible_net_t` is empty: every device is in the one
    // namespace, and the hook skips the namespace check.
    let (dev_net, net_inum) = match (
        btf.offset("net_device", "nd_net.net"),
        btf.offset("net", "ns.inum"),
    ) {
        (Ok(d), Ok(n)) => (small("net_device.nd_net", d)?, small("net.ns.inum", n)?),
        _ => (0, 0),
    };
    Ok(SkbOffsets {
        skb_len: small("sk_buff.len", btf.offset("sk_buff", "len")?)?,
        skb_data_len: small("sk_buff.data_len", btf.offset("sk_buff", "data_len")?)?,
        skb_data: small("sk_buff.data", btf.offset("sk_buff", "data")?)?,
        dev_ifindex: small("net_device.ifindex", btf.offset("net_device", "ifindex")?)?,
        dev_net,
        net_inum,
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made blob: struct outer { int a; union { struct { int b; int c; }; }; int d; }.
    fn blob() -> Vec<u8> {
        let strings = b"\0outer\0a\0b\0c\0d\0int\0".to_vec();
        let s = |name: &str| {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .map(|p| p as u32 + 1)
                .unwrap_or(0)
        };
        let mut t = Vec::new();
        let mut push = |v: u32| t.extend_from_slice(&v.to_le_bytes());
        // 1: int
        push(s("int"));
        push(KIND_INT << 24);
        push(4);
        push(32);
        // 2: anonymous struct { b @0, c @32 }
        push(0);
        push((KIND_STRUCT << 24) | 2);
        push(8);
        for (n, off) in [("b", 0), ("c", 32)] {
            push(s(n));
            push(1);
            push(off);
        }
        // 3: anonymous union { struct 2 }
        push(0);
        push((KIND_UNION << 24) | 1);
        push(8);
        push(0);
        push(2);
        push(0);
        // 4: struct outer { a @0, <anon 3> @32, d @96 }
        push(s("outer"));
        push((KIND_STRUCT << 24) | 3);
        push(16);
        for (n, ty, off) in [("a", 1, 0), ("", 3, 32), ("d", 1, 96)] {
            push(if n.is_empty() { 0 } else { s(n) });
            push(ty);
            push(off);
        }
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        b.extend_from_slice(&24u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(t.len() as u32).to_le_bytes());
        b.extend_from_slice(&(t.len() as u32).to_le_bytes());
        b.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        b.extend_from_slice(&t);
        b.extend_from_slice(&strings);
        b
    }

    #[test]
    fn finds_members_inside_anonymous_unions() -> anyhow::Result<()> {
        let btf = Btf::parse(&blob())?;
        assert!(btf.composite("outer"));
        assert_eq!(btf.offset("outer", "a")?, 0);
        assert_eq!(btf.offset("outer", "b")?, 4);
        assert_eq!(btf.offset("outer", "c")?, 8);
        assert_eq!(btf.offset("outer", "d")?, 12);
        assert!(btf.offset("outer", "e").is_err());
        assert!(btf.offset("inner", "a").is_err());
        Ok(())
    }

    #[test]
    fn rejects_what_is_not_btf() {
        assert!(Btf::parse(b"not btf at all, not at all").is_err());
        assert!(Btf::parse(&blob()[..30]).is_err());
    }

    #[test]
    fn running_kernel_offsets_are_plausible() -> anyhow::Result<()> {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("skipped: {VMLINUX} is not readable on this machine");
            return Ok(());
        };
        let o = skb_offsets(&btf)?;
        // Order within sk_buff has been stable for years: len before data_len, both before
        // the head/data pointers near the end.
        assert!(o.skb_len > 0 && o.skb_data_len == o.skb_len + 4, "{o:?}");
        assert!(o.skb_data > o.skb_data_len, "{o:?}");
        assert!(o.dev_ifindex > 0, "{o:?}");
        Ok(())
    }
}
