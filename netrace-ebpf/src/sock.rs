//! The `sock:inet_sock_set_state` tracepoint: who connects. A TCP socket entering SYN_SENT
//! runs in the connecting task, so its pid, command and cgroup are the owner's; when it leaves
//! SYN_SENT its 4-tuple is complete. User space joins the two by the socket's address.
//! Field offsets come from user space (read from the running kernel's format file).

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use netrace_common::{Counter, EventKind, FlowKey, SockEvent, FAMILY_V4, FAMILY_V6};

use crate::{count, EVENTS, TP_OFFSETS};

const TCP_SYN_SENT: i32 = 2;
const TCP_CLOSE: i32 = 7;
const IPPROTO_TCP: u16 = 6;

#[tracepoint]
pub fn netrace_sock_state(ctx: TracePointContext) -> u32 {
    let _ = on_state(&ctx);
    0
}

#[inline(always)]
fn read<T>(ctx: &TracePointContext, off: u16) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address; the offsets come from the kernel's own
    // description of this tracepoint's record.
    unsafe { ctx.read_at::<T>(off as usize) }.ok()
}

#[inline(always)]
fn on_state(ctx: &TracePointContext) -> Option<()> {
    let off = TP_OFFSETS.get(0)?;
    if off.newstate == 0 {
        return None; // Not configured by user space.
    }
    if read::<u16>(ctx, off.protocol)? != IPPROTO_TCP {
        return None;
    }
    let old: i32 = read(ctx, off.oldstate)?;
    let new: i32 = read(ctx, off.newstate)?;
    let kind = if old == TCP_CLOSE && new == TCP_SYN_SENT {
        EventKind::SockConnect
    } else if old == TCP_SYN_SENT {
        EventKind::SockLeftSynSent
    } else {
        return None;
    };
    let family = read::<u16>(ctx, off.family)? as u8;
    let mut key = FlowKey {
        family,
        src_port: read(ctx, off.sport)?,
        dst_port: read(ctx, off.dport)?,
        ..Default::default()
    };
    if family == FAMILY_V4 {
        let s: [u8; 4] = read(ctx, off.saddr)?;
        let d: [u8; 4] = read(ctx, off.daddr)?;
        key.src_addr[..4].copy_from_slice(&s);
        key.dst_addr[..4].copy_from_slice(&d);
    } else if family == FAMILY_V6 {
        key.src_addr = read(ctx, off.saddr_v6)?;
        key.dst_addr = read(ctx, off.daddr_v6)?;
    } else {
        return None;
    }
    let skaddr: u64 = read(ctx, off.skaddr)?;
    count(Counter::SockEvents);
    let id = bpf_get_current_pid_tgid();
    let Some(mut slot) = EVENTS.reserve::<SockEvent>(0) else {
        count(Counter::RingbufFull);
        return None;
    };
    slot.write(SockEvent {
        kind: kind as u32,
        tgid: (id >> 32) as u32,
        key,
        skaddr,
        // SAFETY: helpers without arguments; valid in tracepoint context.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        // SAFETY: as above.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        new_state: new as u32,
        pid: id as u32,
    });
    slot.submit(crate::wakeup());
    Some(())
}
