//! The IPv4 pending table: unanswered SYNs in buckets of [`WAYS`] slots, one array map that
//! user space maps into its memory.
//!
//! A BPF hash map costs most of a new SYN's time (hash, two locks, a free list, an element
//! far from its bucket), and its entries lie in hash order all over its memory, so finding
//! the expired ones means a cache miss per entry. Here a 4-tuple hashes to one bucket, its
//! slots sit next to each other, and user space finds the due entries by reading the mapped
//! table front to back.
//!
//! Every change happens in the kernel under the bucket's lock (a word taken with
//! compare-and-swap): by the classifiers and the device hook, and for user space by the table's
//! control program (`netrace_table_ctl`, run with `BPF_PROG_TEST_RUN` on a [`TableCmd`]). The
//! holders run with preemption off for a few dozen instructions, so a lock that stays taken
//! for [`LOCK_TRIES`] tries is not expected; an insert that meets one counts as a full map,
//! never a silent loss. User space only reads the mapped table, and takes nothing on the
//! strength of that read alone: a take names its key and checks what it got.
//!
//! The buckets are in two regions of the same arrays ([`Regions`]): a large far one sized by
//! `--max-pending`, then a small near one that holds the SYNs in flight.

use crate::{PendingSlot, V4Key};

/// Slots per bucket. A lookup reads the bucket's head (the lock and a tag per slot) and only
/// the slots whose tag matches, so a new SYN touches two cache lines.
pub const WAYS: usize = 8;

/// How many buckets after its own a key may live in when its own is full.
pub const SPILL: usize = 6;

/// Compare-and-swap attempts on a bucket's lock before giving up.
pub const LOCK_TRIES: u32 = 64;

/// One slot: a pending SYN when its tag is not zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SlotV4 {
    pub key: V4Key,
    pub _pad: u32,
    pub slot: PendingSlot,
}

/// A bucket's head (16 bytes, four to a cache line): the lock word and the slots' tags. The
/// heads are an array of their own (`TABLE_V4`), the slots another (`SLOTS_V4`, [`SlotsV4`]
/// at the same index): a lookup reads one head and only the slots whose tag matches, and
/// user space finds the used slots by reading the heads front to back, a twentieth of the
/// slots' size. A new SYN's time is mostly its head's cache miss, and the smaller the heads
/// the likelier that is a hit: 16-byte heads instead of 64-byte ones cut a new SYN's time by
/// about a third (interleaved runs of `cargo xtask bench`'s per-packet probe).
///
/// A key lives in its own bucket, or when that is full, in one of the [`SPILL`] next ones
/// (the word's spill counts say how many of this bucket's keys live there, so a lookup reads a
/// next bucket only when it may hold the key: rarely). At `max_pending` entries about one
/// bucket in fifty is full; a key is refused only if the next ones are full too (a million
/// keys in a table for 2^20: none refused, with each of 40 seeds tried; filled to its last
/// 2^20 a handful: the unit test `a_million_flows_fit`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadV4 {
    /// Bit 0 ([`LOCKED`]): the lock, taken with compare-and-swap of the whole word (a u64
    /// because the BPF target's default CPU has 64-bit compare-and-swap only). The bits from
    /// [`SPILL_SHIFT`], four per distance: how many of this bucket's keys live in the bucket
    /// at that distance ([`spill_count`]; at most [`WAYS`]). Only the lock's holder changes
    /// them, so a word without spills, the common case, is 0 when free. In a near bucket, the
    /// bits from [`FAR_SHIFT`]: its keys in the far region (see [`Regions`]).
    pub word: u64,
    /// Per slot: 0 when free, else [`tag_v4`] of its key.
    pub tags: [u8; WAYS],
}

/// The lock bit of [`HeadV4::word`].
pub const LOCKED: u64 = 1;

/// Where the spill counts start in [`HeadV4::word`].
pub const SPILL_SHIFT: u32 = 8;

/// Bits per spill count: enough for [`WAYS`].
const SPILL_BITS: usize = 4;

/// The spill counts' bits in [`HeadV4::word`].
pub const SPILL_MASK: u64 = ((1 << (SPILL_BITS * SPILL)) - 1) << SPILL_SHIFT;

/// Where the spill count of distance `dist` (1 to [`SPILL`]) lies in a head's word.
#[inline(always)]
fn spill_shift(dist: usize) -> usize {
    SPILL_SHIFT as usize + SPILL_BITS * (dist - 1)
}

/// One key at distance `dist` (1 to [`SPILL`]) in a head's word.
#[inline(always)]
pub fn spill_unit(dist: usize) -> u64 {
    1 << spill_shift(dist)
}

/// How many of a bucket's keys live at distance `dist` (1 to [`SPILL`]), from its word.
#[inline(always)]
pub fn spill_count(word: u64, dist: usize) -> u64 {
    (word >> spill_shift(dist)) & ((1 << SPILL_BITS) - 1)
}

/// Where the far count starts in a near bucket's [`HeadV4::word`]: how many of the keys whose
/// near bucket this is live in the far region ([`far_count`]). 32 bits: at most the table's
/// size.
pub const FAR_SHIFT: u32 = 32;

/// One key in the far region, in its near bucket's word.
pub const FAR_UNIT: u64 = 1 << FAR_SHIFT;

/// How many of a near bucket's keys live in the far region, from its word.
#[inline(always)]
pub fn far_count(word: u64) -> u64 {
    word >> FAR_SHIFT
}

/// A bucket's slots (320 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotsV4 {
    pub slots: [SlotV4; WAYS],
}

/// Buckets of the far region for a table with room for `max_pending` entries: twice as many
/// slots, so that at `max_pending` entries a bucket holds four on average (see [`HeadV4`] for
/// the rest).
pub fn buckets_for(max_pending: u32) -> u32 {
    let want = (u64::from(max_pending) * 2).div_ceil(WAYS as u64).max(1);
    u32::try_from(want.next_power_of_two()).unwrap_or(1 << 30)
}

/// Most buckets of the near region: 336 KiB, room for the SYNs in flight of a busy node
/// (4096 slots).
pub const NEAR_BUCKETS: u32 = 1024;

/// The table's two regions, far first: `far` buckets sized by `max_pending`, then `near`
/// buckets (as many as the far region has, up to [`NEAR_BUCKETS`]).
///
/// Why two: a key's bucket is where its hash says, anywhere in the table. The far region is
/// sized for a storm of unanswered SYNs (21 MiB by default), so a new SYN placed in it touches
/// two random pages of that much memory: a TLB and cache miss for the SYN and again for its
/// answer, and it pushes the node's own network stack out of the caches. On a veth pair at
/// about 90 k connections/s that cost netrace 13 points of the connection rate with the default
/// table against 4 with a table of 1024 buckets (interleaved rounds). So a new SYN goes to its
/// bucket in the small near region, and only when that is full to its bucket (or one of the
/// [`SPILL`] next ones) in the far region. The near region does not spill: during a storm it
/// stays full, and an insert that had to lock the next buckets too would hold seven locks
/// there, which other CPUs' SYNs then meet taken. The near bucket counts its keys in the far
/// region ([`far_count`]), so that looking a key up reads the far region only when the key may
/// be there. User space puts the entries
/// it decided lost back into the far region first: they stay until their late window closes
/// and would otherwise crowd out the SYNs in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Regions {
    pub far: u32,
    pub near: u32,
}

impl Regions {
    pub fn for_max_pending(max_pending: u32) -> Self {
        let far = buckets_for(max_pending);
        Self {
            far,
            near: far.min(NEAR_BUCKETS),
        }
    }

    /// Buckets in all: the length of both arrays.
    pub fn buckets(self) -> u32 {
        self.far + self.near
    }
}

/// The bucket index of `key` before masking: murmur3 (32-bit) of its three words with a
/// per-run `seed`. Every input bit reaches every output bit, so keys that differ only in a
/// port or in an address's high byte still spread over all buckets.
#[inline(always)]
pub fn hash_v4(key: &V4Key, seed: u32) -> u32 {
    #[inline(always)]
    fn round(h: u32, w: u32) -> u32 {
        let k = w
            .wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593);
        (h ^ k)
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64)
    }
    let mut h = seed;
    h = round(h, u32::from_ne_bytes(key.src_addr));
    h = round(h, u32::from_ne_bytes(key.dst_addr));
    h = round(h, ((key.src_port as u32) << 16) | key.dst_port as u32);
    h ^= 12;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// A used slot's tag: bits of the key's hash that did not choose its bucket (below 2^24
/// buckets), never zero: another key's tag matches one time in 128, and then its slot is read.
#[inline(always)]
pub fn tag_v4(hash: u32) -> u8 {
    (hash >> 24) as u8 | 1
}

/// Whether two keys are equal, word by word.
#[inline(always)]
pub fn same_key(a: &V4Key, b: &V4Key) -> bool {
    u32::from_ne_bytes(a.src_addr) == u32::from_ne_bytes(b.src_addr)
        && u32::from_ne_bytes(a.dst_addr) == u32::from_ne_bytes(b.dst_addr)
        && a.src_port == b.src_port
        && a.dst_port == b.dst_port
}

/// User space's request to the table's control program, in the test packet after an
/// Ethernet header's worth of bytes; the program writes `result` (and for a take, `slot`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TableCmd {
    pub op: u32,
    pub result: u32,
    pub key: V4Key,
    pub _pad: u32,
    pub slot: PendingSlot,
}

/// Where the command starts in the test packet.
pub const TABLE_CMD_OFFSET: u32 = 14;

/// Remove the entry for `key` and return it.
pub const TABLE_TAKE: u32 = 1;
/// Insert `slot` for `key` unless the key has an entry: in the far region, or when that has no
/// room, in the near one.
pub const TABLE_PUT_BACK: u32 = 2;

/// The command did what it was asked (taken, or put back).
pub const TABLE_DONE: u32 = 1;
/// Take: no entry for the key. Put back: the key has an entry again.
pub const TABLE_PRESENT_OR_ABSENT: u32 = 2;
/// Put back: no free slot in the key's bucket.
pub const TABLE_FULL: u32 = 3;
/// The bucket's lock stayed taken.
pub const TABLE_BUSY: u32 = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        assert_eq!(core::mem::size_of::<SlotV4>(), 40);
        assert_eq!(core::mem::size_of::<HeadV4>(), 16);
        assert_eq!(core::mem::size_of::<SlotsV4>(), 40 * WAYS);
        assert_eq!(core::mem::size_of::<TableCmd>(), 48);
    }

    #[test]
    fn spill_counts_stay_in_their_bits() {
        let mut w = LOCKED;
        for d in 1..=SPILL {
            for _ in 0..WAYS {
                w += spill_unit(d);
            }
        }
        for d in 1..=SPILL {
            assert_eq!(spill_count(w, d), WAYS as u64);
        }
        assert_eq!(w & !SPILL_MASK, LOCKED);
        assert_eq!(spill_count(spill_unit(3), 3), 1);
        assert_eq!(spill_count(spill_unit(3), 2), 0);
        // A near bucket's far count sits above them.
        assert_eq!(far_count(w), 0);
        let far = w + 3 * FAR_UNIT;
        assert_eq!(far_count(far), 3);
        assert_eq!(far & SPILL_MASK, w & SPILL_MASK);
    }

    #[test]
    fn sizes() {
        assert_eq!(buckets_for(1000), 256);
        assert_eq!(buckets_for(1 << 18), 1 << 16);
        assert_eq!(buckets_for(1 << 20), 1 << 18);
        assert_eq!(buckets_for(1), 1);
        let r = Regions::for_max_pending(1 << 18);
        assert_eq!(
            (r.far, r.near, r.buckets()),
            (1 << 16, 1024, (1 << 16) + 1024)
        );
        let r = Regions::for_max_pending(64);
        assert_eq!((r.far, r.near), (16, 16));
    }

    /// Keys that differ in the source port and the address's last bytes (as SNAT and the
    /// benchmarks make them): how many of `n` a table sized for `max_pending` refuses.
    fn refused(n: u32, max_pending: u32) -> u32 {
        let buckets = buckets_for(max_pending);
        let mut load = std::vec![0u8; buckets as usize];
        let mut full = 0;
        for i in 0..n {
            let host = i / 64512 + 1;
            let k = V4Key {
                src_addr: [198, 18, (host >> 8) as u8, host as u8],
                dst_addr: [198, 19, 0, 1],
                src_port: (1024 + i % 64512) as u16,
                dst_port: 443,
            };
            // As the kernel places it: its bucket, else the first of the next ones with room.
            let home = (hash_v4(&k, 0x5eed) & (buckets - 1)) as usize;
            let room = (0..=SPILL)
                .map(|d| (home + d) % buckets as usize)
                .find(|&b| usize::from(load[b]) < WAYS);
            match room {
                Some(b) => load[b] += 1,
                None => full += 1,
            }
        }
        full
    }

    /// A million pending SYNs (the benchmark's) fit a table sized for 2^20; filled to the
    /// last of its 2^20, a handful are refused (counted as a full map).
    #[test]
    fn a_million_flows_fit() {
        assert_eq!(refused(1_000_000, 1 << 20), 0);
        let at_capacity = refused(1 << 20, 1 << 20);
        assert!(at_capacity <= 32, "{at_capacity} of 2^20 refused");
    }

    #[test]
    fn spreads_sequential_ports() {
        let mut seen = [0u32; 64];
        for port in 0..6400u16 {
            let k = V4Key {
                src_addr: [198, 18, 0, 1],
                dst_addr: [198, 19, 0, 1],
                src_port: 1024 + port,
                dst_port: 443,
            };
            seen[(hash_v4(&k, 7) & 63) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (60..=140).contains(&n)), "{seen:?}");
    }
}
