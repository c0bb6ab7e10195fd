//! netrace's kernel programs: two tc classifiers that pair outbound SYNs with their answers.
//!
//! Egress: a SYN (without ACK) creates or refreshes a pending entry keyed by the 4-tuple.
//! Ingress: a SYN-ACK or RST acknowledging the SYN, or an ICMP/ICMPv6 error quoting it that
//! ends the attempt, resolves the entry and sends an outcome to user space. The parsing and
//! pairing rules live in `netrace_common::{parse, pairing}`, shared with `netrace analyze`;
//! this crate supplies the maps, the ring buffer and the skb. Nothing here ever changes a
//! packet's fate: every program always returns `TC_ACT_UNSPEC` (`TCX_NEXT`).
#![no_std]
#![no_main]
// The BPF target has no `AtomicU64::fetch_add`; the intrinsic lowers to BPF's atomic add.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod parse;

use core::intrinsics::{atomic_xadd, AtomicOrdering};

mod expire;
mod log;
mod sock;
mod table;
mod xmit;

use aya_ebpf::{
    bindings::{
        BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP,
        BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE, TC_ACT_UNSPEC,
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
    pairing::{
        busy_event, on_packet, on_pod_syn, take_if_in_two_steps, EventSink, Insert, Note,
        PendingTable, Take,
    },
    parse::{Answer, Direction, Link, Parsed},
    rtt_slot, AnswerBook, BookKey, Counter, EventKind, FlowKey, KernelFilter, OutcomeEvent,
    PendingSlot, PendingSyn, TpOffsets, COUNTER_SLOTS, DEFAULT_MAX_BOOKS, DEFAULT_MAX_PENDING,
    DEFAULT_RINGBUF_BYTES, FAMILY_V4, PORT_SLOTS, RTT_SLOTS, SEND_ANSWERS, SEND_SYNS,
};

/// Unanswered IPv4 SYNs: the bucketed table (`table.rs`), heads here and slots in
/// `SLOTS_V4` at the same index, both sized by the loader and mapped read-only by user space to
/// find the expired entries. A key that finds its bucket and the next ones full is an insert
/// failure that is counted, never a silent eviction.
#[map]
static TABLE_V4: Array<netrace_common::table::HeadV4> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The IPv4 table's slots (see `TABLE_V4`).
#[map]
static SLOTS_V4: Array<netrace_common::table::SlotsV4> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Unanswered IPv6 SYNs (a quarter of the IPv4 map's capacity). Not preallocated: most
/// nodes connect out over IPv4, and a preallocated IPv6 map would cost a third more memory
/// than the IPv4 one for entries that are rarely used; an insert allocates instead.
#[map]
static PENDING_V6: HashMap<netrace_common::V6Key, PendingSlot> =
    HashMap::with_max_entries(DEFAULT_MAX_PENDING / 4, BPF_F_NO_PREALLOC);

/// Answered attempts counted here instead of sent one by one, per interface, destination and
/// source port (cumulative; user space reads the differences): those the CPU's answer log
/// (`log.rs`) had no room for. Allocated as used.
#[map]
static BOOKS: HashMap<BookKey, AnswerBook> =
    HashMap::with_max_entries(DEFAULT_MAX_BOOKS, BPF_F_NO_PREALLOC);

/// One zeroed book, the value a new book is created from (1 KiB does not fit the stack).
#[map]
static ZERO_BOOK: Array<AnswerBook> = Array::with_max_entries(1, 0);

/// What the sweep's iterators report as due, written by user space before each pass.
#[map]
static EXPIRE_CUTOFFS: Array<netrace_common::ExpireCutoffs> = Array::with_max_entries(1, 0);

/// The iterators' count of waiting and lost entries during a pass.
#[map]
static EXPIRE_TALLY: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Booked answers by connect round trip (`netrace_common::RTT_BOUNDS_US`). Per CPU: a few
/// slots take every answer of every CPU, and one shared cache line written by all of them would
/// bounce between the CPUs on every connection.
#[map]
static RTT: PerCpuArray<u64> = PerCpuArray::with_max_entries(RTT_SLOTS, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RINGBUF_BYTES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// SYN packets (first and retransmitted) by source port, an independent tally of what left:
/// those the CPU's port log (`log.rs`) had no room for; user space adds the logged ones.
#[map]
static SYN_PORTS: Array<u64> = Array::with_max_entries(PORT_SLOTS, 0);

#[map]
static FILTER: Array<KernelFilter> = Array::with_max_entries(1, 0);

/// Field offsets of `sock:inet_sock_set_state`, from the running kernel's format file.
#[map]
static TP_OFFSETS: Array<TpOffsets> = Array::with_max_entries(1, 0);

const EEXIST: i32 = 17;

/// The pending maps as the shared pairing rules see them (for every program in this object).
pub(crate) struct KernelTable;

impl PendingTable for KernelTable {
    #[inline(always)]
    fn modify<R, F: FnOnce(&mut PendingSyn) -> R>(&mut self, key: &FlowKey, f: F) -> Option<R> {
        if key.family == FAMILY_V4 {
            let k = key.v4();
            let mut b = table::Entry::of(&k)?;
            let s = b.find(&k)?;
            let mut entry = s.to_pending();
            let r = f(&mut entry);
            *s = entry.to_slot();
            return Some(r);
        }
        let slot = PENDING_V6.get_ptr_mut(key.v6())?;
        // SAFETY: the pointer comes from a successful lookup and stays valid for this run of
        // the program (an entry removed meanwhile by another CPU is freed only after an RCU
        // grace period). Retransmissions of one SYN are a second or more apart, so two CPUs
        // never update the same entry at once in practice; a lost update would only
        // undercount retransmissions.
        let slot = unsafe { &mut *slot };
        let mut entry = slot.to_pending();
        let r = f(&mut entry);
        *slot = entry.to_slot();
        Some(r)
    }

    #[inline(always)]
    fn get(&self, key: &FlowKey) -> Option<PendingSyn> {
        if key.family == FAMILY_V4 {
            let k = key.v4();
            let mut b = table::Entry::of(&k)?;
            return b.find(&k).map(|s| s.to_pending());
        }
        let slot = PENDING_V6.get_ptr(key.v6())?;
        // SAFETY: the pointer comes from a successful lookup and is copied out at once.
        Some(unsafe { *slot }.to_pending())
    }

    #[inline(always)]
    fn insert_new(&mut self, key: &FlowKey, value: &PendingSyn) -> Insert {
        let slot = value.to_slot();
        if key.family == FAMILY_V4 {
            let k = key.v4();
            // A lock that stays taken (its holder held up) is told apart from a full table.
            return match table::Entry::of(&k).map(|mut b| b.insert_new(&k, &slot, false)) {
                Some(Ok(true)) => Insert::Inserted,
                Some(Ok(false)) => Insert::Exists,
                Some(Err(table::Refused::Full)) => Insert::Full,
                Some(Err(table::Refused::Busy)) | None => Insert::Busy,
            };
        }
        match PENDING_V6.insert(key.v6(), slot, BPF_NOEXIST as u64) {
            Ok(()) => Insert::Inserted,
            Err(e) if e == -EEXIST => Insert::Exists,
            Err(_) => Insert::Full,
        }
    }

    /// IPv4: looked at and removed under one hold of the bucket's lock.
    #[inline(always)]
    fn take_if<F: FnOnce(&PendingSyn) -> bool>(&mut self, key: &FlowKey, accept: F) -> Take {
        if key.family != FAMILY_V4 {
            return take_if_in_two_steps(self, key, accept);
        }
        let k = key.v4();
        // A lock that stays taken is told apart from no entry: the answer is then sent for
        // user space to pair (`EventKind::BusyAnswer`); as unmatched, its attempt would be
        // decided lost.
        let Some(mut b) = table::Entry::of(&k) else {
            return Take::Busy;
        };
        match b.take_if(&k, |s| accept(&s.to_pending())) {
            Err(_) => Take::Busy,
            Ok(None) => Take::Absent,
            Ok(Some(Ok(s))) => Take::Taken(s.to_pending()),
            Ok(Some(Err(s))) => Take::Kept(s.to_pending()),
        }
    }

    #[inline(always)]
    fn remove(&mut self, key: &FlowKey) -> bool {
        if key.family == FAMILY_V4 {
            let k = key.v4();
            let Some(mut b) = table::Entry::of(&k) else {
                return false;
            };
            return matches!(b.remove(&k), Ok(Some(_)));
        }
        PENDING_V6.remove(key.v6()).is_ok()
    }
}

/// What user space asked the kernel to send one by one ([`KernelFilter::send`]).
#[inline(always)]
fn sends(flag: u32) -> bool {
    FILTER.get(0).is_some_and(|f| f.send & flag != 0)
}

/// Counts an answered attempt in its book; `false` when the book could not be created (the
/// books are full): the caller sends the event instead, so nothing is lost.
#[inline(always)]
fn book(key: &FlowKey, ifindex: u32) -> bool {
    let bk = BookKey::of(key, ifindex);
    let mut page = BOOKS.get_ptr_mut(bk);
    if page.is_none() {
        let Some(zero) = ZERO_BOOK.get(0) else {
            return false;
        };
        // Another CPU creating the same book at once is fine (BPF_NOEXIST fails, the lookup
        // below finds theirs).
        let _ = BOOKS.insert(bk, zero, BPF_NOEXIST as u64);
        page = BOOKS.get_ptr_mut(bk);
    }
    let Some(page) = page else {
        return false;
    };
    let port = BookKey::cell(key.src_port);
    // SAFETY: a valid map value shared by all CPUs; the index is below BOOK_PORTS, and the
    // counter is updated only through an atomic add.
    unsafe {
        let cell = (*page).answered.as_mut_ptr().add(port);
        atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(cell, 1);
    }
    true
}

/// The ring buffer, counters and clock as the shared pairing rules see them, for a packet on
/// interface `ifindex` (for every program in this object: tc, or a device hook that reads the
/// interface from the skb).
pub(crate) struct KernelSink {
    pub(crate) ifindex: u32,
}

impl EventSink for KernelSink {
    #[inline(always)]
    fn now(&mut self) -> u64 {
        // SAFETY: a helper without arguments or side effects.
        unsafe { bpf_ktime_get_ns() }
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ifindex
    }

    #[inline(always)]
    fn count(&mut self, counter: Counter) {
        count(counter);
    }

    #[inline(always)]
    fn syn_port(&mut self, port: u16) {
        if log::port(port) {
            return;
        }
        if let Some(slot) = SYN_PORTS.get_ptr_mut(port as u32) {
            // SAFETY: a valid array slot shared by all CPUs, updated only through an atomic add.
            unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1) };
        }
    }

    #[inline(always)]
    fn note(&mut self, note: Note) {
        match note {
            Note::Filtered { dst_port } => debug!(
                self,
                "SYN to port {} skipped: outside --filter-dst/--filter-dport", dst_port
            ),
            Note::PendingMapFull { src_port } => debug!(
                self,
                "SYN from port {} not tracked: the pending map is full", src_port
            ),
            Note::SynAckMismatch {
                src_port,
                ack,
                expected,
            } => debug!(
                self,
                "SYN-ACK to port {} skipped: acknowledges {} instead of {}",
                src_port,
                ack,
                expected
            ),
        }
    }

    #[inline(always)]
    fn sends_syns(&self) -> bool {
        sends(SEND_SYNS)
    }

    #[inline(always)]
    fn book_answer(&mut self, key: &FlowKey, pending: &PendingSyn, now: u64) -> bool {
        if sends(SEND_ANSWERS) {
            return false;
        }
        // The CPU's answer log, else (a full log) the book.
        let logged = log::answer(key, pending.ifindex);
        if !logged && !book(key, pending.ifindex) {
            count(Counter::BooksFull);
            return false;
        }
        count(Counter::AnsweredBooked);
        if logged {
            count(Counter::AnsweredLogged);
        }
        if let Some(slot) = RTT.get_ptr_mut(rtt_slot(now.saturating_sub(pending.first_ns))) {
            // SAFETY: a valid slot of a per-CPU array: only this CPU writes it, and programs
            // are not preempted mid-update on the same CPU.
            unsafe { *slot += 1 };
        }
        true
    }

    #[inline(always)]
    fn emit(
        &mut self,
        kind: EventKind,
        key: &FlowKey,
        pending: &PendingSyn,
        now: u64,
        icmp_type: u8,
        icmp_code: u8,
    ) {
        emit(self.ifindex, kind, key, pending, now, icmp_type, icmp_code);
    }

    #[inline(always)]
    fn busy(&mut self, key: &FlowKey, ack: u32, answer: Answer) {
        let now = self.now();
        let (seen, icmp_type, icmp_code) = busy_event(now, ack, answer, self.ifindex);
        emit(
            self.ifindex,
            EventKind::BusyAnswer,
            key,
            &seen,
            now,
            icmp_type,
            icmp_code,
        );
    }

    /// A SYN-ACK for a 4-tuple never seen leaving: reported with the ISN it acknowledges, so
    /// user space can pair it with a SYN seen under another source (translated after netrace
    /// saw it). Only SYN-ACKs: RST+ACK also ends established connections.
    #[inline(always)]
    fn unmatched(&mut self, key: &FlowKey, ack: u32, answer: Answer) {
        if answer != Answer::SynAck || FILTER.get(0).is_some_and(|f| !f.matches(key)) {
            return;
        }
        // The books hold no ISN: a 4-tuple with a booked answer is taken as that connection's
        // SYN-ACK repeated (the server did not get the ACK), as the tracker recognises repeats
        // of answers it was sent.
        if let Some(book) = BOOKS.get_ptr(BookKey::of(key, self.ifindex)) {
            // SAFETY: a valid map value; a racy read of a counter only decides between two
            // counted outcomes.
            if unsafe { (*book).answered[BookKey::cell(key.src_port)] } > 0 {
                count(Counter::SynAckRepeated);
                return;
            }
        }
        count(Counter::SynAckUnmatched);
        let now = self.now();
        let seen = PendingSyn::first(now, ack.wrapping_sub(1), self.ifindex);
        emit(
            self.ifindex,
            EventKind::UnmatchedSynAck,
            key,
            &seen,
            now,
            0,
            0,
        );
    }
}

/// An outbound packet the device hook (`xmit`) saw on watched interface `ifindex`: a SYN goes
/// through the same parser and pairing rules as on tc egress, into the same pending map.
#[inline(always)]
pub(crate) fn xmit_packet(pkt: &xmit::SkbBytes, link: Link, ifindex: u32) {
    match netrace_common::parse::parse(pkt, link, Direction::Egress) {
        Ok(parsed @ Parsed::Syn { .. }) => {
            on_packet(
                &mut KernelTable,
                &mut KernelSink { ifindex },
                FILTER.get(0),
                &parsed,
            );
        }
        Ok(_) => {}
        Err(skip) => {
            if let Some(c) = skip.counter() {
                count(c);
            }
        }
    }
}

#[inline(always)]
fn uplink(ctx: &TcContext, link: Link, dir: Direction) {
    if let Some(parsed) = parse::parse(ctx, link, dir) {
        let mut sink = KernelSink {
            ifindex: ifindex(ctx),
        };
        on_packet(&mut KernelTable, &mut sink, FILTER.get(0), &parsed);
    }
}

// Every program's body is inlined into the entry the macro generates (`#[inline(always)]`
// after the macro reaches its inner function): LLVM otherwise keeps a large body as a
// BPF-to-BPF call, and with return-stack mitigations (AMD's SRSO) the return alone cost the
// egress path a third of its time on every packet (`cargo xtask bench`'s per-packet probe).
#[classifier]
#[inline(always)]
pub fn netrace_egress(ctx: TcContext) -> i32 {
    uplink(&ctx, Link::Ethernet, Direction::Egress);
    TC_ACT_UNSPEC
}

#[classifier]
#[inline(always)]
pub fn netrace_ingress(ctx: TcContext) -> i32 {
    uplink(&ctx, Link::Ethernet, Direction::Ingress);
    TC_ACT_UNSPEC
}

/// Egress of an interface without a link-layer header (WireGuard, tun, ipip, ppp).
#[classifier]
#[inline(always)]
pub fn netrace_egress_l3(ctx: TcContext) -> i32 {
    uplink(&ctx, Link::RawIp, Direction::Egress);
    TC_ACT_UNSPEC
}

/// Ingress of an interface without a link-layer header.
#[classifier]
#[inline(always)]
pub fn netrace_ingress_l3(ctx: TcContext) -> i32 {
    uplink(&ctx, Link::RawIp, Direction::Ingress);
    TC_ACT_UNSPEC
}

/// Pod side (ingress of the host end of a pod's veth): a SYN in the pod's own address space,
/// reported so user space can link it to its post-SNAT twin on the uplink. No pending entry.
#[classifier]
#[inline(always)]
pub fn netrace_pod_ingress(ctx: TcContext) -> i32 {
    if let Some(Parsed::Syn { key, isn, data_len }) =
        parse::parse(&ctx, Link::Ethernet, Direction::Egress)
    {
        let mut sink = KernelSink {
            ifindex: ifindex(&ctx),
        };
        on_pod_syn(&mut sink, FILTER.get(0), &key, isn, data_len);
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
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` points at the program's context, valid for the whole run.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
fn emit(
    ifindex: u32,
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
        ifindex,
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
