//! netrace's kernel programs: two tc classifiers that pair outbound SYNs with their answers.
//!
//! Egress: a SYN (without ACK) creates or refreshes a pending entry keyed by the 4-tuple.
//! Ingress: a SYN-ACK or RST acknowledging `isn + 1`, or an ICMP/ICMPv6 destination-unreachable
//! quoting the SYN, resolves the entry and sends an outcome to user space. Nothing here ever
//! changes a packet's fate: both programs always return `TC_ACT_UNSPEC` (`TCX_NEXT`).
#![no_std]
#![no_main]
// The BPF target has no `AtomicU64::fetch_add`; the intrinsic lowers to BPF's atomic add.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod parse;

use core::intrinsics::{atomic_xadd, AtomicOrdering};

mod sock;

use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_RB_RING_SIZE, TC_ACT_UNSPEC,
    },
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
// Debug messages through aya-log: off unless user space asks (`-vv`), by setting the
// library's AYA_LOG_LEVEL global before load; each call site then costs one global read.
use aya_log_ebpf::debug;
use netrace_common::{
    Counter, EventKind, FlowKey, KernelFilter, OutcomeEvent, PendingSyn, TpOffsets, COUNTER_SLOTS,
    DEFAULT_MAX_PENDING, DEFAULT_RINGBUF_BYTES, PORT_SLOTS,
};
use parse::{Answer, Parsed};

/// Unanswered SYNs. Not preallocated: memory follows the live entries, and a full map is an
/// insert failure that is counted, never a silent eviction.
#[map]
static PENDING: HashMap<FlowKey, PendingSyn> =
    HashMap::with_max_entries(DEFAULT_MAX_PENDING, BPF_F_NO_PREALLOC);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RINGBUF_BYTES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// SYN packets (first and retransmitted) by source port, an independent tally of what left.
#[map]
static SYN_PORTS: Array<u64> = Array::with_max_entries(PORT_SLOTS, 0);

#[map]
static FILTER: Array<KernelFilter> = Array::with_max_entries(1, 0);

/// Field offsets of `sock:inet_sock_set_state`, from the running kernel's format file.
#[map]
static TP_OFFSETS: Array<TpOffsets> = Array::with_max_entries(1, 0);

const EEXIST: i32 = 17;

#[classifier]
pub fn netrace_egress(ctx: TcContext) -> i32 {
    if let Some(Parsed::Syn { key, isn }) = parse::parse(&ctx, true) {
        on_syn(&ctx, key, isn);
    }
    TC_ACT_UNSPEC
}

#[classifier]
pub fn netrace_ingress(ctx: TcContext) -> i32 {
    if let Some(Parsed::Answer { key, ack, answer }) = parse::parse(&ctx, false) {
        on_answer(&ctx, key, ack, answer);
    }
    TC_ACT_UNSPEC
}

/// Pod side (ingress of the host end of a pod's veth): a SYN in the pod's own address space,
/// reported so user space can link it to its post-SNAT twin on the uplink. No pending entry.
#[classifier]
pub fn netrace_pod_ingress(ctx: TcContext) -> i32 {
    if let Some(Parsed::Syn { key, isn }) = parse::parse(&ctx, true) {
        if passes_filter(&key) {
            count(Counter::PodSynSeen);
            // SAFETY: a helper without arguments or side effects.
            let now = unsafe { bpf_ktime_get_ns() };
            let seen = PendingSyn::first(now, isn, ifindex(&ctx));
            emit(&ctx, EventKind::PodSyn, &key, &seen, now, 0, 0);
        }
    }
    TC_ACT_UNSPEC
}

/// Does nothing: the baseline the benchmarks compare the real programs against.
#[classifier]
pub fn netrace_noop(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[inline(always)]
pub(crate) fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU array, so it is valid
        // and only this CPU writes it; programs are not preempted mid-update on the same CPU.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn passes_filter(key: &FlowKey) -> bool {
    let Some(f) = FILTER.get(0) else {
        return true;
    };
    if f.dst_port != 0 && f.dst_port != key.dst_port {
        return false;
    }
    if f.dst_family == 0 {
        return true;
    }
    if f.dst_family != key.family {
        return false;
    }
    let mut bits = f.dst_prefix_len as u32;
    let mut i = 0;
    while i < 16 {
        if bits == 0 {
            break;
        }
        let mask: u8 = if bits >= 8 {
            0xff
        } else {
            0xffu8 << (8 - bits)
        };
        if (key.dst_addr[i] ^ f.dst_net[i]) & mask != 0 {
            return false;
        }
        bits = bits.saturating_sub(8);
        i += 1;
    }
    true
}

#[inline(always)]
fn on_syn(ctx: &TcContext, key: FlowKey, isn: u32) {
    if !passes_filter(&key) {
        count(Counter::Filtered);
        debug!(
            ctx,
            "SYN to port {} skipped: outside --filter-dst/--filter-dport", key.dst_port
        );
        return;
    }
    count(Counter::SynSeen);
    if let Some(slot) = SYN_PORTS.get_ptr_mut(key.src_port as u32) {
        // SAFETY: a valid array slot shared by all CPUs, updated only through an atomic add.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1) };
    }
    // SAFETY: a helper without arguments or side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(entry) = PENDING.get_ptr_mut(key) {
        // SAFETY: the pointer comes from a successful lookup. Retransmissions of one SYN are
        // a second or more apart, so two CPUs never update the same entry at once in practice;
        // a lost increment would only undercount retransmissions.
        let old = unsafe { *entry };
        if old.isn == isn {
            // SAFETY: as above.
            unsafe {
                (*entry).syns = old.syns.saturating_add(1);
                (*entry).last_ns = now;
            }
            count(Counter::SynRetransmit);
            return;
        }
        // Same 4-tuple, new ISN: the old attempt was abandoned without an answer.
        emit(ctx, EventKind::Superseded, &key, &old, now, 0, 0);
        let fresh = PendingSyn::first(now, isn, ifindex(ctx));
        // SAFETY: as above; the whole entry is replaced in place.
        unsafe { *entry = fresh };
        emit(ctx, EventKind::Syn, &key, &fresh, now, 0, 0);
        return;
    }
    let fresh = PendingSyn::first(now, isn, ifindex(ctx));
    match PENDING.insert(key, fresh, BPF_NOEXIST as u64) {
        Ok(()) => emit(ctx, EventKind::Syn, &key, &fresh, now, 0, 0),
        // Another CPU inserted the same SYN a moment ago; it reported it.
        Err(e) if e == -EEXIST => {}
        Err(_) => {
            count(Counter::PendingMapFull);
            debug!(
                ctx,
                "SYN from port {} not tracked: the pending map is full", key.src_port
            );
        }
    }
}

#[inline(always)]
fn on_answer(ctx: &TcContext, key: FlowKey, ack: u32, answer: Answer) {
    let Some(entry) = PENDING.get_ptr(key) else {
        return;
    };
    // SAFETY: the pointer comes from a successful lookup and is copied out at once.
    let pending = unsafe { *entry };
    // A SYN-ACK or RST acknowledges isn + 1; an ICMP error quotes the SYN's own sequence number.
    let expected = match answer {
        Answer::Unreachable { .. } => pending.isn,
        _ => pending.isn.wrapping_add(1),
    };
    if ack != expected {
        if let Answer::SynAck = answer {
            count(Counter::SynAckMismatch);
            debug!(
                ctx,
                "SYN-ACK to port {} skipped: acknowledges {} instead of {}",
                key.src_port,
                ack,
                expected
            );
        }
        return;
    }
    // Whoever removes the entry reports it, so a duplicated answer is reported once.
    if PENDING.remove(key).is_err() {
        return;
    }
    // SAFETY: a helper without arguments or side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    match answer {
        Answer::SynAck => {
            count(Counter::SynAckMatched);
            emit(ctx, EventKind::Answered, &key, &pending, now, 0, 0);
        }
        Answer::Rst => {
            count(Counter::RstMatched);
            emit(ctx, EventKind::Refused, &key, &pending, now, 0, 0);
        }
        Answer::Unreachable { icmp_type, code } => {
            count(Counter::IcmpMatched);
            emit(
                ctx,
                EventKind::Unreachable,
                &key,
                &pending,
                now,
                icmp_type,
                code,
            );
        }
    }
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` points at the program's context, valid for the whole run.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
fn emit(
    ctx: &TcContext,
    kind: EventKind,
    key: &FlowKey,
    pending: &PendingSyn,
    now: u64,
    icmp_type: u8,
    icmp_code: u8,
) {
    let Some(mut slot) = EVENTS.reserve::<OutcomeEvent>(0) else {
        count(Counter::RingbufFull);
        return;
    };
    slot.write(OutcomeEvent {
        kind: kind as u32,
        ifindex: ifindex(ctx),
        key: *key,
        pending: *pending,
        ts_ns: now,
        icmp_type,
        icmp_code,
        _pad: [0; 6],
    });
    slot.submit(wakeup());
}

/// Wakes the reader only once a quarter of the ring is full: user space also drains on a
/// short timer, so a wake-up per event (a context switch per connection) buys nothing.
#[inline(always)]
pub(crate) fn wakeup() -> u64 {
    let size = EVENTS.query(BPF_RB_RING_SIZE as u64);
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= size / 4 {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The license the kernel reads: GPL-compatible, as GPL-only helpers require; one of the
/// strings the kernel accepts (`license_is_gpl_compatible`). Keep it equal to the `license`
/// field of this crate's Cargo.toml ("MIT OR GPL-2.0-only").
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
