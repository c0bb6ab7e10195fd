//! The per-CPU logs' writing side (layout and rules: `netrace_common::log`).

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE, helpers::bpf_get_smp_processor_id, macros::map, maps::Array,
};
use core::{
    intrinsics::{atomic_xchg, AtomicOrdering},
    sync::atomic::{compiler_fence, Ordering},
};
use netrace_common::{
    log::{AnswerRecord, LogPos, PortLine, PORT_LANES},
    BookKey, FlowKey,
};

/// Records per CPU in each log (a power of two; `netrace_common::log::log_slots`), set by the
/// loader; 0 turns the logs off (every answer and SYN is then counted in place).
#[unsafe(no_mangle)]
static LOG_SLOTS: u32 = 0;

/// The answer logs: CPU `c`'s records at `c * LOG_SLOTS ..`. Sized by the loader.
#[map]
static ANSWER_LOG: Array<AnswerRecord> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The port logs: CPU `c`'s lines at `c * LOG_SLOTS / PORT_LANES ..`. Sized by the loader.
#[map]
static PORT_LOG: Array<PortLine> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Per CPU, what the kernel has written (user space reads it).
#[map]
static LOG_HEADS: Array<LogPos> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Per CPU, what user space has read (the kernel reads it).
#[map]
static LOG_TAILS: Array<LogPos> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Where the next record of this CPU's log goes, the log picked by `pick` (its answers or its
/// ports, out of a [`LogPos`]): the CPU, the records per log, the head, and where to publish
/// the next head; `None` when that log is full or the logs are off.
#[inline(always)]
fn next(pick: impl Fn(*mut LogPos) -> *mut u64) -> Option<(u32, u32, u64, *mut u64)> {
    // SAFETY: a read-only global, set before load.
    let slots = unsafe { core::ptr::read_volatile(&LOG_SLOTS) };
    if slots == 0 {
        return None;
    }
    // SAFETY: a helper without arguments or side effects.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let head = pick(LOG_HEADS.get_ptr_mut(cpu)?);
    let tail = pick(LOG_TAILS.get_ptr_mut(cpu)?);
    // SAFETY: this CPU's positions, valid for the run; the head is written only by the program
    // running on this CPU, the tail only by user space (a stale tail only makes the log look
    // fuller).
    let (h, t) = unsafe { (*head, core::ptr::read_volatile(tail)) };
    if h.wrapping_sub(t) >= u64::from(slots) {
        return None;
    }
    Some((cpu, slots, h, head))
}

/// Publishes a new head once the record below it is written.
#[inline(always)]
fn publish(at: *mut u64, value: u64) {
    if crate::table::tso() {
        // The compiler keeps the record's stores above this one; the CPU (total store order)
        // makes them visible first.
        compiler_fence(Ordering::Release);
        // SAFETY: this CPU's head, written only by the program running on it; aligned.
        unsafe { core::ptr::write_volatile(at, value) };
    } else {
        // SAFETY: as above; the exchange orders the record's stores before it.
        unsafe { atomic_xchg::<u64, { AtomicOrdering::Release }>(at, value) };
    }
}

/// Appends `key`'s answer (a SYN that left through `ifindex`) to this CPU's answer log;
/// `false` when the log is full or off (the caller counts it in the book instead).
#[inline(always)]
pub(crate) fn answer(key: &FlowKey, ifindex: u32) -> bool {
    // SAFETY: only a place projection of a valid value of the map; nothing is read here.
    let Some((cpu, slots, h, head)) = next(|p| unsafe { &raw mut (*p).answers }) else {
        return false;
    };
    let at = cpu.wrapping_mul(slots).wrapping_add(h as u32 & (slots - 1));
    let Some(rec) = ANSWER_LOG.get_ptr_mut(at) else {
        return false;
    };
    // SAFETY: a slot of this CPU's log past the tail: user space does not read it until the
    // head moves past it.
    unsafe {
        *rec = AnswerRecord {
            book: BookKey::of(key, ifindex),
            src_port: key.src_port,
            _pad: 0,
        };
    }
    publish(head, h + 1);
    true
}

/// Appends a SYN's source port to this CPU's port log; `false` when the log is full or off
/// (the caller counts it in the shared tally instead).
#[inline(always)]
pub(crate) fn port(port: u16) -> bool {
    // SAFETY: as in `answer`.
    let Some((cpu, slots, h, head)) = next(|p| unsafe { &raw mut (*p).ports }) else {
        return false;
    };
    let lines = slots / PORT_LANES as u32;
    let at = cpu
        .wrapping_mul(lines)
        .wrapping_add((h as u32 / PORT_LANES as u32) & (lines - 1));
    let Some(line) = PORT_LOG.get_ptr_mut(at) else {
        return false;
    };
    // SAFETY: as in `answer`; the lane is below PORT_LANES.
    unsafe { (*line).ports[h as usize % PORT_LANES] = port };
    publish(head, h + 1);
    true
}
