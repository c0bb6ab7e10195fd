//! The IPv4 pending table's operations (layout and rules: `netrace_common::table`). Every
//! change is made under the bucket's lock; the lock guards release them on every path.

use core::{
    intrinsics::{atomic_cxchg, atomic_xchg, AtomicOrdering},
    sync::atomic::{compiler_fence, Ordering},
};

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use netrace_common::{
    table::{
        far_count, hash_v4, same_key, spill_count, spill_unit, tag_v4, HeadV4, SlotsV4, TableCmd,
        FAR_UNIT, LOCKED, LOCK_TRIES, SPILL, SPILL_MASK, TABLE_BUSY, TABLE_CMD_OFFSET, TABLE_DONE,
        TABLE_FULL, TABLE_PRESENT_OR_ABSENT, TABLE_PUT_BACK, TABLE_TAKE, WAYS,
    },
    PendingSlot, V4Key,
};

use crate::{SLOTS_V4, TABLE_V4};

/// The far region's buckets - 1 (a power of two less one), set by the loader. The near region
/// starts after the far one (`netrace_common::table::Regions`).
#[unsafe(no_mangle)]
static TABLE_V4_MASK: u32 = 0;

/// The near region's buckets - 1 (a power of two less one), set by the loader.
#[unsafe(no_mangle)]
static TABLE_V4_NEAR_MASK: u32 = 0;

/// The hash seed of this run, set by the loader.
#[unsafe(no_mangle)]
static TABLE_V4_SEED: u32 = 0;

/// 1 when the CPU keeps stores in program order and never moves a store before an earlier
/// load (x86-64's total store order), set by the loader from the architecture it was built
/// for. A plain store then releases a lock, as the kernel's own x86 spinlocks do; an atomic
/// exchange would also wait for every earlier store to reach the cache, and the slot a new SYN
/// writes is usually a cache miss (a third of its time in `cargo xtask bench`). Elsewhere
/// (arm64) the exchange stays: a plain store there may become visible before the slot's.
#[unsafe(no_mangle)]
static TABLE_V4_TSO: u32 = 0;

/// Whether a plain store publishes what was written before it (see `TABLE_V4_TSO`).
#[inline(always)]
pub(crate) fn tso() -> bool {
    // SAFETY: a read-only global, set before load.
    unsafe { core::ptr::read_volatile(&TABLE_V4_TSO) != 0 }
}

/// Takes a bucket's lock; `false` when it stayed taken.
#[inline(always)]
fn lock(b: *mut HeadV4) -> bool {
    // A free bucket's word is 0 unless it has spill counts: try that first, without a read
    // before the compare-and-swap; a failed one returns the word to try next.
    let mut expect = 0;
    let mut tries = 0;
    while tries < LOCK_TRIES {
        // SAFETY: `b` points at a bucket of the array map, valid for this run of the program;
        // the word is changed only by compare-and-swap or by the lock's holder.
        let (old, won) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Acquire }, { AtomicOrdering::Relaxed }>(
                &raw mut (*b).word,
                expect,
                expect | LOCKED,
            )
        };
        if won {
            return true;
        }
        expect = old & !LOCKED;
        tries += 1;
    }
    false
}

/// Changes the spill count at distance `dist` of a bucket this program has locked: one more,
/// or one fewer (never below 0).
#[inline(always)]
fn spill(b: *mut HeadV4, dist: usize, more: bool) {
    if dist == 0 || dist > SPILL {
        return;
    }
    change(b, spill_unit(dist), |w| spill_count(w, dist), more);
}

/// Changes the far count of a near bucket this program has locked: one more, or one fewer
/// (never below 0).
#[inline(always)]
fn far(b: *mut HeadV4, more: bool) {
    change(b, FAR_UNIT, far_count, more);
}

/// Adds `unit` to the word of a bucket this program has locked, or takes it away when its
/// count (`count` of the word) is above 0.
#[inline(always)]
fn change(b: *mut HeadV4, unit: u64, count: impl Fn(u64) -> u64, more: bool) {
    // SAFETY: a valid bucket whose lock this program holds: no one else changes its word,
    // and the store keeps the lock bit; an aligned word store.
    unsafe {
        let w = core::ptr::read_volatile(&raw const (*b).word);
        let w = if more {
            w + unit
        } else if count(w) > 0 {
            w - unit
        } else {
            w
        };
        core::ptr::write_volatile(&raw mut (*b).word, w);
    }
}

/// Where a key's entry is: the distance from its own bucket, and the way.
#[derive(Clone, Copy)]
pub(crate) struct At {
    dist: usize,
    way: usize,
}

/// A region's buckets: `mask + 1` of them from index `base`; a key lives in its own bucket or
/// up to `reach` buckets after it.
#[derive(Clone, Copy)]
struct Region {
    base: u32,
    mask: u32,
    reach: usize,
}

/// A key's own bucket in one region, locked, and the next ones once they are needed (locked in
/// order, so two programs never wait for each other in a circle short of the whole region).
struct Locked {
    /// The own bucket's index within the region.
    home: u32,
    region: Region,
    tag: u8,
    /// The own bucket (distance 0).
    own: *mut HeadV4,
    /// Bit `d`: the bucket at distance `d` is locked. (Pointers are looked up again rather
    /// than kept in an array: the verifier loses their type behind a variable index.)
    held: u32,
}

impl Locked {
    /// The bucket of the key with hash `h` in `region`, locked; `None` when the lock stayed
    /// taken (or the table is missing, which the loader prevents).
    #[inline(always)]
    fn of(h: u32, region: Region) -> Option<Self> {
        let home = h & region.mask;
        let b = TABLE_V4.get_ptr_mut(region.base.wrapping_add(home))?;
        if !lock(b) {
            return None;
        }
        Some(Self {
            home,
            region,
            tag: tag_v4(h),
            own: b,
            held: 1,
        })
    }

    /// The index of the bucket at distance `dist`.
    #[inline(always)]
    fn index(&self, dist: usize) -> u32 {
        self.region
            .base
            .wrapping_add(self.home.wrapping_add(dist as u32) & self.region.mask)
    }

    /// Locks the next buckets (all of them, in order, the first time): `false` when a lock
    /// stayed taken. All or none, so the verifier follows two cases, not one per bucket.
    #[inline(always)]
    fn neighbours(&mut self) -> bool {
        let mut dist = 1;
        while dist <= SPILL {
            // A table of fewer buckets than that distance has no such neighbour.
            if self.held & (1 << dist) == 0 && dist as u32 <= self.region.mask {
                let Some(b) = TABLE_V4.get_ptr_mut(self.index(dist)) else {
                    return false;
                };
                if !lock(b) {
                    return false;
                }
                self.held |= 1 << dist;
            }
            dist += 1;
        }
        true
    }

    /// The slots of the bucket at distance `dist` (valid to change while it is locked).
    #[inline(always)]
    fn slots(&self, dist: usize) -> Option<*mut SlotsV4> {
        SLOTS_V4.get_ptr_mut(self.index(dist))
    }

    /// The bucket at distance `dist`, if locked.
    #[inline(always)]
    fn bucket(&self, dist: usize) -> Option<*mut HeadV4> {
        if dist == 0 {
            return Some(self.own);
        }
        if dist > SPILL || self.held & (1 << dist) == 0 {
            return None;
        }
        TABLE_V4.get_ptr_mut(self.index(dist))
    }

    /// The way of bucket `b` (at distance `dist`) holding `key`.
    #[inline(always)]
    fn way_of(&self, dist: usize, b: *mut HeadV4, key: &V4Key) -> Option<usize> {
        let mut way = 0;
        while way < WAYS {
            // SAFETY: `b` is valid and locked by this program: no one else changes it; `way`
            // is below WAYS.
            if unsafe { (*b).tags[way] } == self.tag {
                let slots = self.slots(dist)?;
                // SAFETY: the bucket's slots, locked with its head; `way` is below WAYS.
                if same_key(unsafe { &(*slots).slots[way].key }, key) {
                    return Some(way);
                }
            }
            way += 1;
        }
        None
    }

    /// Where `key`'s entry is; `Err` when a bucket that may hold it could not be locked.
    #[inline(always)]
    fn locate(&mut self, key: &V4Key) -> Result<Option<At>, ()> {
        if let Some(way) = self.way_of(0, self.own, key) {
            return Ok(Some(At { dist: 0, way }));
        }
        // SAFETY: the own bucket is valid and locked (see `of`): its spill counts are stable.
        if unsafe { core::ptr::read_volatile(&raw const (*self.own).word) } & SPILL_MASK == 0 {
            return Ok(None);
        }
        if !self.neighbours() {
            return Err(());
        }
        let mut dist = 1;
        while dist <= SPILL {
            if let Some(b) = self.bucket(dist) {
                if let Some(way) = self.way_of(dist, b, key) {
                    return Ok(Some(At { dist, way }));
                }
            }
            dist += 1;
        }
        Ok(None)
    }

    #[inline(always)]
    fn slot(&mut self, at: At) -> Option<&mut PendingSlot> {
        self.bucket(at.dist)?;
        let s = self.slots(at.dist)?;
        // SAFETY: the slots of a bucket this program has locked; `at.way` is below WAYS.
        Some(unsafe { &mut (*s).slots[at.way % WAYS].slot })
    }

    /// Removes the entry at `at` if `accept` takes it: `Ok` the entry removed, `Err` the
    /// entry left in place.
    #[inline(always)]
    fn take_at<F: FnOnce(&PendingSlot) -> bool>(
        &mut self,
        at: At,
        accept: F,
    ) -> Option<Result<PendingSlot, PendingSlot>> {
        let b = self.bucket(at.dist)?;
        let s = self.slots(at.dist)?;
        // SAFETY: `b` (with its slots `s`) and the own bucket are valid and locked; the
        // indices are in range.
        unsafe {
            let slot = (*s).slots[at.way % WAYS].slot;
            if !accept(&slot) {
                return Some(Err(slot));
            }
            (*b).tags[at.way % WAYS] = 0;
            spill(self.own, at.dist, false);
            Some(Ok(slot))
        }
    }

    /// Stores `slot` for `key` (which has no entry) in the first free slot of its bucket or
    /// the next ones in reach; refused when none is free, or a lock stayed taken.
    #[inline(always)]
    fn place(&mut self, key: &V4Key, slot: &PendingSlot) -> Result<(), Refused> {
        let mut dist = 0;
        while dist <= SPILL && dist <= self.region.reach {
            if dist == 1 && !self.neighbours() {
                return Err(Refused::Busy);
            }
            if let (Some(b), Some(s)) = (self.bucket(dist), self.slots(dist)) {
                let mut way = 0;
                while way < WAYS {
                    // SAFETY: `b` (with its slots `s`) and the own bucket are valid and locked
                    // by this program; the indices are in range.
                    unsafe {
                        if (*b).tags[way] == 0 {
                            (*s).slots[way].key = *key;
                            (*s).slots[way].slot = *slot;
                            (*b).tags[way] = self.tag;
                            spill(self.own, dist, true);
                            return Ok(());
                        }
                    }
                    way += 1;
                }
            }
            dist += 1;
        }
        Err(Refused::Full)
    }
}

/// Why an insert stored nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Every slot the key may use is taken.
    Full,
    /// A lock the insert needed stayed taken (its holder was held up): the table may have
    /// had room.
    Busy,
}

/// Where a key's entry was found.
#[derive(Clone, Copy)]
struct Found {
    far: bool,
    at: At,
}

/// A key's buckets: its near bucket, locked, and its far one once it is needed (always locked
/// after the near one). See `netrace_common::table::Regions`.
pub(crate) struct Entry {
    near: Locked,
    far: Option<Locked>,
    hash: u32,
    far_mask: u32,
}

impl Entry {
    /// The buckets of `key`, its near one locked; `None` when the lock stayed taken (or the
    /// table is missing, which the loader prevents).
    #[inline(always)]
    pub(crate) fn of(key: &V4Key) -> Option<Self> {
        // SAFETY: read-only globals, set before load.
        let (far_mask, near_mask, seed) = unsafe {
            (
                core::ptr::read_volatile(&TABLE_V4_MASK),
                core::ptr::read_volatile(&TABLE_V4_NEAR_MASK),
                core::ptr::read_volatile(&TABLE_V4_SEED),
            )
        };
        let hash = hash_v4(key, seed);
        // No spilling in the near region: a key whose near bucket is full goes far, so that an
        // insert there never holds the next buckets' locks too (a storm keeps the near region
        // full, and every SYN would then lock seven of its buckets).
        let near = Region {
            base: far_mask.wrapping_add(1),
            mask: near_mask,
            reach: 0,
        };
        Some(Self {
            near: Locked::of(hash, near)?,
            far: None,
            hash,
            far_mask,
        })
    }

    /// The key's far bucket, locked now if it is not yet; `None` when the lock stayed taken.
    #[inline(always)]
    fn far(&mut self) -> Option<&mut Locked> {
        if self.far.is_none() {
            let region = Region {
                base: 0,
                mask: self.far_mask,
                reach: SPILL,
            };
            self.far = Some(Locked::of(self.hash, region)?);
        }
        self.far.as_mut()
    }

    /// Where `key`'s entry is; `Err` when a bucket that may hold it could not be locked.
    #[inline(always)]
    fn locate(&mut self, key: &V4Key) -> Result<Option<Found>, ()> {
        if let Some(at) = self.near.locate(key)? {
            return Ok(Some(Found { far: false, at }));
        }
        // SAFETY: the near bucket is valid and locked (see `of`): its far count is stable.
        if far_count(unsafe { core::ptr::read_volatile(&raw const (*self.near.own).word) }) == 0 {
            return Ok(None);
        }
        let far = self.far().ok_or(())?;
        Ok(far.locate(key)?.map(|at| Found { far: true, at }))
    }

    /// The entry for `key` (`None` too when a bucket that may hold it could not be locked).
    #[inline(always)]
    pub(crate) fn find(&mut self, key: &V4Key) -> Option<&mut PendingSlot> {
        let found = self.locate(key).ok()??;
        if found.far {
            self.far.as_mut()?.slot(found.at)
        } else {
            self.near.slot(found.at)
        }
    }

    /// Removes the entry for `key` if `accept` takes it: `Ok(Some(Ok))` the entry removed,
    /// `Ok(Some(Err))` the entry left in place, `Ok(None)` no entry; `Err` when a bucket that
    /// may hold it could not be locked. One look-up for both.
    #[inline(always)]
    pub(crate) fn take_if<F: FnOnce(&PendingSlot) -> bool>(
        &mut self,
        key: &V4Key,
        accept: F,
    ) -> Result<Option<Result<PendingSlot, PendingSlot>>, Refused> {
        let Some(found) = self.locate(key).map_err(|()| Refused::Busy)? else {
            return Ok(None);
        };
        if !found.far {
            return Ok(self.near.take_at(found.at, accept));
        }
        let own = self.near.own;
        let Some(far_bucket) = self.far.as_mut() else {
            return Err(Refused::Busy);
        };
        let r = far_bucket.take_at(found.at, accept);
        if let Some(Ok(_)) = r {
            far(own, false);
        }
        Ok(r)
    }

    /// Removes the entry for `key` and returns it (`Ok(None)`: there is none).
    #[inline(always)]
    pub(crate) fn remove(&mut self, key: &V4Key) -> Result<Option<PendingSlot>, Refused> {
        Ok(self.take_if(key, |_| true)?.and_then(Result::ok))
    }

    /// Stores `slot` for `key`: in the near region, else in the far one (`far_first`: the
    /// other way round). `Ok(true)` stored, `Ok(false)` the key has an entry; refused `Busy`
    /// when a lock it needed stayed taken, else `Full`.
    #[inline(always)]
    pub(crate) fn insert_new(
        &mut self,
        key: &V4Key,
        slot: &PendingSlot,
        far_first: bool,
    ) -> Result<bool, Refused> {
        if self.locate(key).map_err(|()| Refused::Busy)?.is_some() {
            return Ok(false);
        }
        let mut refused = Refused::Full;
        if !far_first {
            match self.near.place(key, slot) {
                Ok(()) => return Ok(true),
                Err(r) => refused = r,
            }
        }
        let own = self.near.own;
        match self.far() {
            Some(f) => match f.place(key, slot) {
                Ok(()) => {
                    far(own, true);
                    return Ok(true);
                }
                Err(Refused::Busy) => refused = Refused::Busy,
                Err(Refused::Full) => {}
            },
            None => refused = Refused::Busy,
        }
        if far_first {
            match self.near.place(key, slot) {
                Ok(()) => return Ok(true),
                Err(Refused::Busy) => refused = Refused::Busy,
                Err(Refused::Full) => {}
            }
        }
        Err(refused)
    }
}

/// Releases a bucket's lock, publishing the changes made under it first.
#[inline(always)]
fn unlock(b: *mut HeadV4, tso: bool) {
    // SAFETY: a valid bucket whose lock this program holds: no one else changes its word.
    let free = unsafe { core::ptr::read_volatile(&raw const (*b).word) } & !LOCKED;
    if tso {
        // The compiler keeps every access above this line above the store; the CPU (total
        // store order, see TABLE_V4_TSO) makes them visible before it.
        compiler_fence(Ordering::Release);
        // SAFETY: as above; an aligned word store.
        unsafe { core::ptr::write_volatile(&raw mut (*b).word, free) };
    } else {
        // SAFETY: as above; the exchange publishes the changes before the lock is seen free.
        unsafe { atomic_xchg::<u64, { AtomicOrdering::Release }>(&raw mut (*b).word, free) };
    }
}

impl Drop for Locked {
    #[inline(always)]
    fn drop(&mut self) {
        let tso = tso();
        let mut dist = SPILL;
        while dist > 0 {
            // Only those this program holds.
            if let Some(b) = self.bucket(dist) {
                unlock(b, tso);
            }
            dist -= 1;
        }
        unlock(self.own, tso);
    }
}

/// User space's take and put-back (`netrace_common::table::TableCmd`), run with
/// `BPF_PROG_TEST_RUN`: the answer is written over the command in the packet.
#[classifier]
pub fn netrace_table_ctl(ctx: TcContext) -> i32 {
    let off = TABLE_CMD_OFFSET as usize;
    let Ok(mut cmd) = ctx.load::<TableCmd>(off) else {
        return TC_ACT_UNSPEC;
    };
    cmd.result = match Entry::of(&cmd.key) {
        None => TABLE_BUSY,
        Some(mut b) => match cmd.op {
            TABLE_TAKE => match b.remove(&cmd.key) {
                Ok(Some(s)) => {
                    cmd.slot = s;
                    TABLE_DONE
                }
                Ok(None) => TABLE_PRESENT_OR_ABSENT,
                Err(_) => TABLE_BUSY,
            },
            // Decided lost, kept for the late window: in the far region, out of the way of
            // the SYNs in flight.
            TABLE_PUT_BACK => match b.insert_new(&cmd.key, &cmd.slot, true) {
                Ok(true) => TABLE_DONE,
                Ok(false) => TABLE_PRESENT_OR_ABSENT,
                Err(Refused::Full) => TABLE_FULL,
                Err(Refused::Busy) => TABLE_BUSY,
            },
            _ => 0,
        },
    };
    let _ = ctx.store(off, &cmd, 0);
    TC_ACT_UNSPEC
}
