//! The device hook: the `net_dev_start_xmit` raw tracepoint, which runs as a packet is handed
//! to the device driver, after every tc/TCX program and so after any BPF SNAT (Cilium's BPF
//! masquerading, Calico's eBPF dataplane). The packet is read through the skb with
//! `bpf_probe_read_kernel`, at offsets user space took from the running kernel's BTF; an
//! outbound SYN on a watched device goes through the same parser and pairing rules as the tc
//! egress classifier, into the same pending map. Answers are still paired on tc ingress.
//!
//! A raw tracepoint needs no BTF to attach and no tracefs; only the offsets come from BTF.

use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap},
    programs::RawTracePointContext,
};
use netrace_common::{
    parse::{Link, Packet},
    SkbOffsets, XmitIface, MAX_XMIT_IFACES, XMIT_LINK_RAW_IP,
};

/// Offsets in `sk_buff`, `net_device` and `net`, from the running kernel's BTF.
#[map]
static SKB_OFFSETS: Array<SkbOffsets> = Array::with_max_entries(1, 0);

/// The watched devices, by interface index.
#[map]
static XMIT_IFACES: HashMap<u32, XmitIface> = HashMap::with_max_entries(MAX_XMIT_IFACES, 0);

/// The packet's linear data, read with `bpf_probe_read_kernel`. On transmit `skb->data` is the
/// start of the frame (the link-layer header, or the IP header on devices without one).
pub struct SkbBytes {
    data: *const u8,
    linear: usize,
}

impl SkbBytes {
    /// The `N` bytes at `off`, or `None` past the linear data (headers of a packet netrace
    /// cares about are always there) or when the kernel refuses the read.
    #[inline(always)]
    pub fn read<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        if off + N > self.linear {
            return None;
        }
        // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting; the
        // range is inside the skb's linear data by the check above.
        unsafe { bpf_probe_read_kernel(self.data.wrapping_add(off) as *const [u8; N]) }.ok()
    }
}

impl Packet for SkbBytes {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        self.read(off)
    }
}

#[inline(always)]
fn field<T>(base: *const u8, off: u16) -> Option<T> {
    // SAFETY: `base` is a kernel pointer handed to the tracepoint (or read from one) and `off`
    // a member offset from the running kernel's BTF; the helper checks the address.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize) as *const T) }.ok()
}

#[raw_tracepoint(tracepoint = "net_dev_start_xmit")]
#[inline(always)]
pub fn netrace_xmit(ctx: RawTracePointContext) -> i32 {
    let _ = on_xmit(&ctx);
    0
}

#[inline(always)]
fn on_xmit(ctx: &RawTracePointContext) -> Option<()> {
    let off = SKB_OFFSETS.get(0)?;
    if off.skb_data == 0 {
        return None; // Not configured by user space.
    }
    // TP_PROTO(const struct sk_buff *skb, const struct net_device *dev)
    let skb: *const u8 = ctx.arg(0);
    let dev: *const u8 = ctx.arg(1);
    let ifindex: u32 = field(dev, off.dev_ifindex)?;
    // SAFETY: the value is copied out at once; user space only adds entries before attaching.
    let watched = unsafe { XMIT_IFACES.get(ifindex) }.copied()?;
    if off.dev_net != 0 {
        let net: *const u8 = field(dev, off.dev_net)?;
        let inum: u32 = field(net, off.net_inum)?;
        if inum != watched.netns {
            return None;
        }
    }
    // `len` and `data_len` are neighbours in every kernel netrace knows: one read for both.
    let (len, data_len) = if off.skb_data_len == off.skb_len + 4 {
        let both: [u32; 2] = field(skb, off.skb_len)?;
        (both[0], both[1])
    } else {
        (field(skb, off.skb_len)?, field(skb, off.skb_data_len)?)
    };
    let data: *const u8 = field(skb, off.skb_data)?;
    let pkt = SkbBytes {
        data,
        linear: len.saturating_sub(data_len) as usize,
    };
    let link = if watched.link == XMIT_LINK_RAW_IP {
        Link::RawIp
    } else {
        Link::Ethernet
    };
    crate::xmit_packet(&pkt, link, ifindex);
    Some(())
}
