//! Runs crafted packets through netrace's kernel programs with `BPF_PROG_TEST_RUN` and reads
//! back what they did through the maps.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, OwnedFd},
};

use aya::{programs::ProgramError, sys::SyscallError, TestRun as _, TestRunOptions};
pub use netrace::kernel::events::Event;
use netrace::{
    kernel::attach::Attachments,
    kernel::loader::{
        self, Maps, EGRESS_L3_PROGRAM, EGRESS_PROGRAM, INGRESS_L3_PROGRAM, INGRESS_PROGRAM,
    },
};
use netrace_common::{
    log::AnswerRecord, Counter, FlowKey, KernelFilter, PendingSyn, FAMILY_V4, FAMILY_V6,
    SEND_ANSWERS, SEND_SYNS,
};

/// `TC_ACT_UNSPEC`, the only verdict netrace's programs may return.
pub const TC_ACT_UNSPEC: i32 = -1;

const MAX_PENDING: u32 = 1024;
const RINGBUF_BYTES: u32 = 1 << 16;

/// A freshly loaded kernel object: both programs loaded (not attached), maps empty.
pub struct Bpf {
    attachments: Attachments,
    pub maps: Maps,
    /// Answer records read from the logs (while tallying ports) and not yet asked for.
    answers_logged: Vec<AnswerRecord>,
}

impl Bpf {
    /// Loads a fresh object without a destination filter, sending every SYN and answer as an
    /// event (as `watch` does with attribution), so each packet's effect is visible. Panics,
    /// with the reason, when the kernel refuses (typically: not running as root).
    pub fn load() -> Self {
        Self::load_with_filter(KernelFilter {
            send: SEND_SYNS | SEND_ANSWERS,
            ..KernelFilter::default()
        })
    }

    /// Loads a fresh object as `watch` runs by default: no SYN events, answers counted in the
    /// kernel's books.
    pub fn load_books() -> Self {
        Self::load_with_filter(KernelFilter::default())
    }

    pub fn load_with_filter(filter: KernelFilter) -> Self {
        Self::load_sized(filter, MAX_PENDING)
    }

    /// With `max_pending` entries in the IPv4 pending map (a quarter in the IPv6 one).
    pub fn load_sized(filter: KernelFilter, max_pending: u32) -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        let hint = if euid == 0 {
            String::new()
        } else {
            format!(
                " (running as uid {euid}: these tests need root, or CAP_BPF + CAP_NET_ADMIN + \
                 CAP_PERFMON, to load programs and use BPF_PROG_TEST_RUN)"
            )
        };
        let (ebpf, maps) = loader::load(max_pending, RINGBUF_BYTES, filter)
            .unwrap_or_else(|e| panic!("cannot load netrace's kernel object{hint}: {e:#}"));
        let attachments = Attachments::new(ebpf)
            .unwrap_or_else(|e| panic!("cannot load netrace's kernel programs{hint}: {e:#}"));
        Self {
            attachments,
            maps,
            answers_logged: Vec::new(),
        }
    }

    /// Runs `packet` through the egress classifier.
    pub fn egress(&mut self, packet: &[u8]) {
        self.run(EGRESS_PROGRAM, packet);
    }

    /// Runs `packet` through the ingress classifier.
    pub fn ingress(&mut self, packet: &[u8]) {
        self.run(INGRESS_PROGRAM, packet);
    }

    /// Runs a bare IP `packet` (no Ethernet header: WireGuard, tun) through the egress
    /// classifier for such interfaces.
    pub fn egress_l3(&mut self, packet: &[u8]) {
        self.run(EGRESS_L3_PROGRAM, packet);
    }

    /// Runs a bare IP `packet` through the ingress classifier for such interfaces.
    pub fn ingress_l3(&mut self, packet: &[u8]) {
        self.run(INGRESS_L3_PROGRAM, packet);
    }

    /// Runs `packet` through egress (`true`) or ingress (`false`); `Err(errno)` when the
    /// kernel refuses to run the program on it at all (see [`Bpf::try_run`]).
    pub fn try_direction(&mut self, egress: bool, packet: &[u8]) -> Result<(), i32> {
        let program = if egress {
            EGRESS_PROGRAM
        } else {
            INGRESS_PROGRAM
        };
        self.try_run(program, packet)
    }

    /// Runs one packet and checks the program left its fate alone: the verdict is
    /// `TC_ACT_UNSPEC` and the packet comes out byte for byte as it went in.
    fn run(&mut self, program: &str, packet: &[u8]) {
        if let Err(errno) = self.try_run(program, packet) {
            panic!(
                "BPF_PROG_TEST_RUN of {program} on a {}-byte packet failed: {} ({})",
                packet.len(),
                std::io::Error::from_raw_os_error(errno),
                hex(packet)
            );
        }
    }

    /// `program`, loaded (the programs for interfaces without Ethernet load when first needed).
    fn loaded(&mut self, program: &str) -> &mut aya::programs::SchedClassifier {
        let prog = self
            .attachments
            .program(program)
            .unwrap_or_else(|e| panic!("{e:#}"));
        if prog.fd().is_err() {
            prog.load()
                .unwrap_or_else(|e| panic!("the kernel refused {program}: {e:#}"));
        }
        prog
    }

    /// An owned descriptor of `program` (loaded), for running it from several threads at once
    /// with `netrace::kernel::batch::test_run`.
    #[allow(dead_code)] // Not every test binary runs programs concurrently.
    pub fn program_fd(&mut self, program: &str) -> OwnedFd {
        let fd = self
            .loaded(program)
            .fd()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        fd.as_fd()
            .try_clone_to_owned()
            .unwrap_or_else(|e| panic!("duplicating {program}'s descriptor: {e}"))
    }

    /// Like [`Bpf::run`], but returns the errno when `BPF_PROG_TEST_RUN` itself fails (the
    /// program never ran). Since Linux 6.x the kernel refuses, with `EINVAL`, a frame whose
    /// ethertype is IPv4 or IPv6 but which is too short for the IP header.
    pub fn try_run(&mut self, program: &str, packet: &[u8]) -> Result<(), i32> {
        assert!(
            packet.len() >= 14,
            "BPF_PROG_TEST_RUN needs at least an Ethernet header's worth of bytes"
        );
        let prog = self.loaded(program);
        let mut out = vec![0u8; packet.len() + 256];
        let result = match prog.test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        }) {
            Ok(r) => r,
            Err(ProgramError::SyscallError(SyscallError { io_error, .. })) => {
                return Err(io_error.raw_os_error().unwrap_or(0));
            }
            Err(e) => panic!(
                "BPF_PROG_TEST_RUN of {program} on a {}-byte packet failed: {e}",
                packet.len()
            ),
        };
        assert_eq!(
            result.return_value as i32,
            TC_ACT_UNSPEC,
            "{program} returned {:#x} for a {}-byte packet {}, not TC_ACT_UNSPEC",
            result.return_value,
            packet.len(),
            hex(packet)
        );
        let n = result.data_size_out as usize;
        assert_eq!(
            &out[..n],
            packet,
            "{program} changed the packet it was given"
        );
        Ok(())
    }

    pub fn counter(&self, c: Counter) -> u64 {
        Maps::counters_view(&self.maps.counters, &self.maps.syn_ports).counter(c)
    }

    /// Every counter, by name, in [`loader::COUNTERS`] order.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        loader::COUNTERS
            .iter()
            .map(|(c, name)| (*name, self.counter(*c)))
            .collect()
    }

    /// Asserts every counter equals its value in `expected`, and every counter not listed
    /// is zero.
    #[track_caller]
    pub fn assert_counters(&self, expected: &[(Counter, u64)]) {
        let want: Vec<(&'static str, u64)> = loader::COUNTERS
            .iter()
            .map(|(c, name)| {
                let v = expected.iter().find(|(e, _)| e == c).map_or(0, |(_, v)| *v);
                (*name, v)
            })
            .collect();
        assert_eq!(self.counters(), want, "kernel counters");
    }

    /// SYN packets counted for source port `port` (the port logs read first, as `watch` does,
    /// plus the kernel's shared tally).
    pub fn syn_port(&mut self, port: u16) -> u64 {
        self.syn_ports()
            .into_iter()
            .find(|(p, _)| *p == port)
            .map_or(0, |(_, n)| n)
    }

    /// Every port with a non-zero SYN tally (the port logs read first).
    pub fn syn_ports(&mut self) -> Vec<(u16, u64)> {
        let read = self.read_answer_logs();
        self.answers_logged.extend(read);
        Maps::counters_view(&self.maps.counters, &self.maps.syn_ports)
            .syn_ports(self.maps.logs.syn_ports())
    }

    /// The answers the CPUs' answer logs hold (read, so the next call returns only new ones;
    /// the port logs are read into the tally at the same time).
    pub fn answer_logs(&mut self) -> Vec<AnswerRecord> {
        let mut all = std::mem::take(&mut self.answers_logged);
        all.extend(self.read_answer_logs());
        all
    }

    fn read_answer_logs(&mut self) -> Vec<AnswerRecord> {
        let mut out = Vec::new();
        self.maps.logs.drain(|r| out.push(*r));
        out
    }

    pub fn pending(&mut self, key: &FlowKey) -> Option<PendingSyn> {
        self.pending_all()
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, p)| p)
    }

    /// Every pending entry, IPv4 and IPv6 maps together (a batched walk, as `watch` does).
    pub fn pending_all(&mut self) -> Vec<(FlowKey, PendingSyn)> {
        let mut all = Vec::new();
        self.maps.pending.walk_into(&mut all);
        assert_eq!(self.maps.pending.errors, 0, "walking the pending maps");
        all
    }

    /// Drains the ring buffer.
    pub fn events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = self.maps.events.next() {
            out.push(
                Event::try_from(&*item)
                    .unwrap_or_else(|e| panic!("undecodable ring-buffer record: {e}")),
            );
        }
        out
    }

    /// Asserts nothing is pending and no event is waiting.
    #[track_caller]
    pub fn assert_untouched(&mut self) {
        assert_eq!(self.pending_all(), Vec::new(), "pending entries");
        assert_eq!(self.events(), Vec::new(), "ring-buffer events");
    }
}

/// The kernel's key for the connection `src -> dst`: addresses in network order (IPv4 in the
/// first 4 bytes, the rest zero), ports in host order. Panics on mixed families.
pub fn key(src: SocketAddr, dst: SocketAddr) -> FlowKey {
    let mut k = FlowKey {
        src_port: src.port(),
        dst_port: dst.port(),
        ..Default::default()
    };
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            k.family = FAMILY_V4;
            k.src_addr[..4].copy_from_slice(&s.octets());
            k.dst_addr[..4].copy_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            k.family = FAMILY_V6;
            k.src_addr = s.octets();
            k.dst_addr = d.octets();
        }
        _ => panic!("a key from {src} to {dst} mixes address families"),
    }
    k
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs the calling thread on CPU `n` modulo the CPUs it may use.
pub fn pin_to_cpu(n: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only read and write it.
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of_val(&allowed), &mut allowed),
            0
        );
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|c| libc::CPU_ISSET(*c, &allowed))
            .collect();
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpus[n % cpus.len()], &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set),
            0
        );
    }
}
