//! The IPv4 pending table from user space (layout and rules: `netrace_common::table`): mapped
//! read-only into this process, read front to back to find the expired entries; taken from and
//! put back into through the kernel's control program, which holds the bucket's lock as the
//! classifiers do.

use std::{
    io,
    os::fd::{AsFd as _, BorrowedFd},
};

use aya::{maps::MapData, programs::ProgramFd};
use netrace_common::{
    table::{
        far_count, spill_count, HeadV4, SlotV4, SlotsV4, TableCmd, SPILL, TABLE_BUSY,
        TABLE_CMD_OFFSET, TABLE_DONE, TABLE_FULL, TABLE_PRESENT_OR_ABSENT, TABLE_PUT_BACK,
        TABLE_TAKE, WAYS,
    },
    PendingSlot, V4Key,
};

use super::{batch, mapped::Mapped};
use crate::track::tracker::PutBack;

// `used` reads a head's tags as one u64.
const _: () = assert!(WAYS == 8 && std::mem::offset_of!(HeadV4, tags) % 8 == 0);

/// The table: its heads and slots mapped, and the control program.
pub struct TableV4 {
    heads: Mapped<HeadV4>,
    slots: Mapped<SlotsV4>,
    ctl: ProgramFd,
    buckets: usize,
}

// SAFETY: the mappings are owned by this value alone and only read through volatile reads;
// the kernel is the only writer. Moving it to another thread changes nothing.
unsafe impl Send for TableV4 {}

impl TableV4 {
    /// Maps `heads` and `slots` (arrays of `buckets` values made with `BPF_F_MMAPABLE`)
    /// read-only.
    pub fn new(heads: MapData, slots: MapData, ctl: ProgramFd, buckets: u32) -> io::Result<Self> {
        let buckets = buckets as usize;
        Ok(Self {
            heads: Mapped::new(heads, buckets, false)?,
            slots: Mapped::new(slots, buckets, false)?,
            ctl,
            buckets,
        })
    }

    /// The heads' map: a test holds a bucket's lock through a writable mapping of it, as a
    /// CPU held up inside a program would.
    #[doc(hidden)]
    pub fn heads_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        self.heads.map.fd().as_fd()
    }

    /// How many buckets the table has.
    pub fn buckets(&self) -> usize {
        self.buckets
    }

    /// How many entries it can hold at most.
    pub fn capacity(&self) -> usize {
        self.buckets * WAYS
    }

    /// The heads' map (for inspection).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.heads.map.fd().as_fd()
    }

    /// Bucket `bucket`'s slot tags and, for each used slot, the slot, as they are at this
    /// moment (the kernel may be changing them: a hint, confirmed by a take).
    fn used(&self, bucket: usize, mut f: impl FnMut(SlotV4)) {
        if bucket >= self.buckets {
            return;
        }
        // SAFETY: the bucket is inside both mappings (checked above), which live as long as
        // `self`; tags and slots are plain integers, so any bytes read are valid values, and
        // the reads are volatile because the kernel writes the memory.
        let (h, s) = unsafe {
            (
                self.heads.base.as_ptr().add(bucket),
                self.slots.base.as_ptr().add(bucket),
            )
        };
        // One load for the eight tags: most buckets of a sweep are empty, and a per-byte
        // volatile read made the sweep's pass over the heads most of its cost.
        // SAFETY: as above; `tags` is 8 bytes at offset 8 of a 16-byte #[repr(C)] head, so
        // 8-aligned, and any 8 bytes are a valid u64.
        let packed = unsafe { std::ptr::read_volatile((&raw const (*h).tags).cast::<u64>()) };
        if packed == 0 {
            return;
        }
        let tags = packed.to_ne_bytes();
        for (w, t) in tags.iter().enumerate() {
            if *t != 0 {
                // SAFETY: as above; `w` is below WAYS.
                f(unsafe { std::ptr::read_volatile(&raw const (*s).slots[w]) });
            }
        }
    }

    /// The buckets' spill and far counts summed: keys living in a bucket after their own or in
    /// the far region (zero in an empty table, or a removal missed its count).
    pub fn spilled(&self) -> u64 {
        (0..self.buckets)
            .map(|b| {
                // SAFETY: as in `used`: the bucket is inside the mapping; a volatile read of
                // plain integers.
                let w = unsafe {
                    std::ptr::read_volatile(&raw const (*self.heads.base.as_ptr().add(b)).word)
                };
                (1..=SPILL).map(|d| spill_count(w, d)).sum::<u64>() + far_count(w)
            })
            .sum()
    }

    /// Calls `f` on each used slot of buckets `range` (clamped to the table).
    pub fn for_each(&self, range: std::ops::Range<usize>, mut f: impl FnMut(&V4Key, &PendingSlot)) {
        for b in range.start.min(self.buckets)..range.end.min(self.buckets) {
            self.used(b, |s| f(&s.key, &s.slot));
        }
    }

    fn run(&self, mut cmd: TableCmd) -> io::Result<TableCmd> {
        let mut packet = [0u8; TABLE_CMD_OFFSET as usize + size_of::<TableCmd>()];
        // The control program reads the command after an Ethernet header's worth of bytes.
        let at = TABLE_CMD_OFFSET as usize;
        cmd.result = 0;
        packet[at..].copy_from_slice(pod_bytes(&cmd));
        batch::test_run(self.ctl.as_fd(), &mut packet)?;
        // SAFETY: the slice holds exactly size_of::<TableCmd>() bytes written by the program
        // from such a value, a plain #[repr(C)] type of integers; read unaligned.
        Ok(unsafe { std::ptr::read_unaligned(packet[at..].as_ptr().cast::<TableCmd>()) })
    }

    /// Removes the entry for `key` and returns it; `None` when there was none.
    pub fn take(&self, key: &V4Key) -> io::Result<Option<PendingSlot>> {
        let r = self.run(TableCmd {
            op: TABLE_TAKE,
            key: *key,
            ..TableCmd::default()
        })?;
        match r.result {
            TABLE_DONE => Ok(Some(r.slot)),
            TABLE_PRESENT_OR_ABSENT => Ok(None),
            other => Err(io::Error::other(outcome(other))),
        }
    }

    /// Puts `slot` back for `key` unless the key has an entry again.
    pub fn put_back(&self, key: &V4Key, slot: &PendingSlot) -> io::Result<PutBack> {
        let r = self.run(TableCmd {
            op: TABLE_PUT_BACK,
            key: *key,
            slot: *slot,
            ..TableCmd::default()
        })?;
        match r.result {
            TABLE_DONE => Ok(PutBack::Done),
            TABLE_PRESENT_OR_ABSENT => Ok(PutBack::Taken),
            TABLE_FULL | TABLE_BUSY => Ok(PutBack::Refused),
            other => Err(io::Error::other(outcome(other))),
        }
    }
}

fn outcome(code: u32) -> String {
    match code {
        TABLE_BUSY => "the bucket's lock stayed taken".into(),
        0 => "the table's control program did not answer".into(),
        c => format!("the table's control program answered {c}"),
    }
}

fn pod_bytes(cmd: &TableCmd) -> &[u8] {
    // SAFETY: TableCmd is #[repr(C)], made of integers with every padding byte an explicit
    // field, so all of its bytes are initialised; the slice borrows it.
    unsafe {
        std::slice::from_raw_parts((cmd as *const TableCmd).cast::<u8>(), size_of::<TableCmd>())
    }
}
