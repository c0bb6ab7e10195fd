//! The sweep's finder for the IPv6 pending map (the IPv4 table is mapped into user space and
//! read there): a BPF iterator (`iter/bpf_map_elem`) that writes out only the entries user
//! space must decide (waiting past the SYN timeout, or lost past the
//! late window), and at the end a summary of what the map holds. The rest never leaves the
//! kernel, so finding the expired entries costs a pass in the kernel instead of a copy of the
//! whole map to user space. Read-only: user space takes what it decides, as before.

use core::ffi::c_void;

use aya_ebpf::{bindings::seq_file, helpers::bpf_seq_write};
use netrace_common::{ExpireCutoffs, ExpireSummary, Expired, PendingSlot, V6Key, STATE_LOST};

use crate::{EXPIRE_CUTOFFS, EXPIRE_TALLY};

/// `struct bpf_iter_meta`.
#[repr(C)]
struct IterMeta {
    seq: *mut seq_file,
    session_id: u64,
    seq_num: u64,
}

/// `struct bpf_iter__bpf_map_elem`: key and value are NULL on the last call.
#[repr(C)]
struct MapElemCtx {
    meta: *const IterMeta,
    map: *const c_void,
    key: *const c_void,
    value: *const PendingSlot,
}

/// Tally slots: entries waiting, entries held lost (not due).
const WAITING: u32 = 0;
const LOST: u32 = 1;

#[inline(always)]
fn tally(slot: u32) -> Option<*mut u64> {
    EXPIRE_TALLY.get_ptr_mut(slot)
}

#[inline(always)]
fn write<T>(seq: *mut seq_file, rec: &T) {
    // SAFETY: `seq` is the iterator's seq_file from its meta; the record is a plain value on
    // the stack of the size passed.
    unsafe {
        bpf_seq_write(
            seq,
            rec as *const T as *const c_void,
            core::mem::size_of::<T>() as u32,
        )
    };
}

/// One element (or the end, `None`): returns the record to write, if any.
#[inline(always)]
fn visit(ctx: *const MapElemCtx) -> Option<(*mut seq_file, PendingSlot, *const c_void)> {
    // SAFETY: the kernel passes a valid context for the whole call; its meta pointer is valid
    // and its seq_file too (the verifier types both from the kernel's BTF).
    let (meta, key, value) = unsafe { ((*ctx).meta, (*ctx).key, (*ctx).value) };
    // SAFETY: as above.
    let (seq, seq_num) = unsafe { ((*meta).seq, (*meta).seq_num) };
    if seq_num == 0 {
        for s in [WAITING, LOST] {
            if let Some(p) = tally(s) {
                // SAFETY: a valid per-CPU slot; an iterator runs on one CPU for its whole
                // pass, without migrating.
                unsafe { *p = 0 };
            }
        }
    }
    if key.is_null() || value.is_null() {
        let summary = ExpireSummary {
            magic: ExpireSummary::MAGIC,
            _pad: 0,
            // SAFETY: valid per-CPU slots, as above.
            waiting: tally(WAITING).map_or(0, |p| unsafe { *p }),
            // SAFETY: as above.
            lost: tally(LOST).map_or(0, |p| unsafe { *p }),
        };
        write(seq, &summary);
        return None;
    }
    // SAFETY: a non-NULL value of this map: a PendingSlot, readable for the call.
    let slot = unsafe { *value };
    let cut: ExpireCutoffs = EXPIRE_CUTOFFS.get(0).copied().unwrap_or_default();
    if cut.due(slot.state, slot.first_ns)? {
        return Some((seq, slot, key));
    }
    let kind = if slot.state == STATE_LOST {
        LOST
    } else {
        WAITING
    };
    // Counted: what stays in the map after the pass (the due ones are decided by user space).
    if let Some(p) = tally(kind) {
        // SAFETY: a valid per-CPU slot, as above.
        unsafe { *p += 1 };
    }
    None
}

/// One element of the pending map keyed by `K`: the record of a due entry, written out.
#[inline(always)]
fn expire<K: Copy>(ctx: *mut c_void) -> i32 {
    if let Some((seq, slot, key)) = visit(ctx as *const MapElemCtx) {
        // SAFETY: a non-NULL key of the map this iterator is linked to, whose keys are `K`
        // (each entry point below is linked to its own map), readable for the call.
        let key = unsafe { *(key as *const K) };
        write(
            seq,
            &Expired {
                key,
                _pad: [0; 4],
                slot,
            },
        );
    }
    0
}

/// The IPv6 pending map's iterator.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/bpf_map_elem")]
pub extern "C" fn netrace_expire_v6(ctx: *mut c_void) -> i32 {
    expire::<V6Key>(ctx)
}
