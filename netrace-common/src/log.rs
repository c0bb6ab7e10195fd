//! The per-CPU logs: answered attempts and SYN source ports on their way from the kernel to
//! user space, written in order instead of counted in place.
//!
//! Counting an answer in its book, or a SYN in the per-port tally, writes a counter picked by
//! the source port: a random cache line among hundreds of kilobytes, nearly always a miss.
//! Under a connection load that was most of netrace's kernel time (about 170 ns per answer and
//! 160 ns per SYN, `netrace watch` on a veth pair, run-time statistics). Appending to the
//! CPU's own log writes its lines in order, and user space does the counting, a few
//! nanoseconds a record.
//!
//! Each CPU's log is a ring with one writer and one reader. The writer is whichever of
//! netrace's programs runs on that CPU: they run to completion with bottom halves off and never
//! inside one another, so there is one at a time. The kernel advances the head ([`LogPos`] in
//! `LOG_HEADS`), user space the tail (in `LOG_TAILS`, a map of its own so the two sides never
//! write the same cache line). A log that is full is never a loss: the kernel then counts in
//! the book or the shared per-port tally, as it did before the logs, and user space reads
//! those too.

use crate::BookKey;

/// One answered attempt, counted by user space: its book and source port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AnswerRecord {
    pub book: BookKey,
    pub src_port: u16,
    pub _pad: u16,
}

/// Source ports per line of the port log (one cache line).
pub const PORT_LANES: usize = 32;

/// A line of the port log: the source ports of [`PORT_LANES`] SYN packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortLine {
    pub ports: [u16; PORT_LANES],
}

/// Where a CPU's logs stand (records written, or read), one cache line per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LogPos {
    /// Answer records.
    pub answers: u64,
    /// SYN source ports.
    pub ports: u64,
    pub _pad: [u64; 6],
}

/// Records per CPU and log for `cpus` possible CPUs: a power of two, at least a line of ports,
/// about 64 Ki records over all CPUs (2 MiB of answer records) and at most 8 Ki per CPU (at
/// the drain's 50 ms, 160 k answers a second on one CPU before it falls back to the books).
pub const fn log_slots(cpus: u32) -> u32 {
    let per = 65536 / if cpus == 0 { 1 } else { cpus };
    let mut s = 1024;
    while s * 2 <= per && s < 8192 {
        s *= 2;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        assert_eq!(core::mem::size_of::<AnswerRecord>(), 32);
        assert_eq!(core::mem::size_of::<PortLine>(), 64);
        assert_eq!(core::mem::size_of::<LogPos>(), 64);
    }

    #[test]
    fn slots_are_powers_of_two_in_range() {
        for cpus in [0, 1, 2, 3, 8, 64, 100, 4096] {
            let s = log_slots(cpus);
            assert!(
                s.is_power_of_two() && (1024..=8192).contains(&s),
                "{cpus}: {s}"
            );
            assert!((s as usize).is_multiple_of(PORT_LANES));
        }
        assert_eq!(log_slots(2), 8192);
        assert_eq!(log_slots(16), 4096);
        assert_eq!(log_slots(512), 1024);
    }
}
