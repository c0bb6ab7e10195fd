//! The per-CPU logs from user space (layout and rules: `netrace_common::log`): answered
//! attempts and SYN source ports, read where they lie (mapped into this process) and counted
//! here; this process moves each CPU's tail once it has read up to the head.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::MapData;
use netrace_common::{
    log::{AnswerRecord, LogPos, PortLine, PORT_LANES},
    PORT_SLOTS,
};

use super::mapped::Mapped;

/// The logs of every CPU, and the SYN source ports read from them so far.
pub struct Logs {
    answers: Mapped<AnswerRecord>,
    ports: Mapped<PortLine>,
    heads: Mapped<LogPos>,
    tails: Mapped<LogPos>,
    cpus: usize,
    /// Records per CPU and log (a power of two, a multiple of PORT_LANES).
    slots: usize,
    /// SYN packets by source port, read from the port logs.
    syn_ports: Vec<u64>,
}

// SAFETY: the mappings are owned by this value alone; the kernel writes the logs and heads,
// this value alone the tails. Moving it to another thread changes nothing.
unsafe impl Send for Logs {}

impl Logs {
    /// Maps the four maps of `cpus` CPUs with `slots` records each (as the loader sized them).
    pub fn new(
        answers: MapData,
        ports: MapData,
        heads: MapData,
        tails: MapData,
        cpus: usize,
        slots: usize,
    ) -> io::Result<Self> {
        if !slots.is_power_of_two() || !slots.is_multiple_of(PORT_LANES) {
            return Err(io::Error::other(format!("{slots} records per log")));
        }
        let all = cpus
            .checked_mul(slots)
            .ok_or_else(|| io::Error::other("the logs are too large to map"))?;
        Ok(Self {
            answers: Mapped::new(answers, all, false)?,
            ports: Mapped::new(ports, all / PORT_LANES, false)?,
            heads: Mapped::new(heads, cpus, false)?,
            tails: Mapped::new(tails, cpus, true)?,
            cpus,
            slots,
            syn_ports: vec![0; PORT_SLOTS as usize],
        })
    }

    /// Reads what every CPU wrote since the last drain: each answer through `on_answer`, the
    /// SYN source ports into the tally. Returns how many answers.
    pub fn drain(&mut self, mut on_answer: impl FnMut(&AnswerRecord)) -> usize {
        let mut answered = 0;
        let lines = self.slots / PORT_LANES;
        for cpu in 0..self.cpus {
            // SAFETY: `cpu` is below `cpus`, inside both position mappings, which live as long
            // as `self`. The heads are only read (atomically: the kernel publishes them with a
            // release store after the records); the tails are written by this process alone.
            let (head, tail) = unsafe {
                (
                    &*self.heads.base.as_ptr().add(cpu),
                    self.tails.base.as_ptr().add(cpu),
                )
            };
            // SAFETY: aligned u64s of the mappings above, accessed only atomically here.
            let (h_answers, h_ports, t_answers, t_ports) = unsafe {
                (
                    AtomicU64::from_ptr((&raw const head.answers).cast_mut()),
                    AtomicU64::from_ptr((&raw const head.ports).cast_mut()),
                    AtomicU64::from_ptr(&raw mut (*tail).answers),
                    AtomicU64::from_ptr(&raw mut (*tail).ports),
                )
            };
            let (from, to) = self.window(t_answers, h_answers);
            for i in from..to {
                let at = cpu * self.slots + (i as usize & (self.slots - 1));
                // SAFETY: `at` is inside the answer mapping (below cpus * slots); a record
                // between tail and head is complete and left alone by the kernel until the
                // tail moves past it.
                let rec = unsafe { std::ptr::read_volatile(self.answers.base.as_ptr().add(at)) };
                on_answer(&rec);
                answered += 1;
            }
            t_answers.store(to, Ordering::Release);
            let (from, to) = self.window(t_ports, h_ports);
            for i in from..to {
                let at = cpu * lines + ((i as usize / PORT_LANES) & (lines - 1));
                // SAFETY: as above, in the port mapping (below cpus * lines), lane below
                // PORT_LANES.
                let port = unsafe {
                    std::ptr::read_volatile(
                        &raw const (*self.ports.base.as_ptr().add(at)).ports
                            [i as usize % PORT_LANES],
                    )
                };
                self.syn_ports[usize::from(port)] += 1;
            }
            t_ports.store(to, Ordering::Release);
        }
        answered
    }

    /// The records to read between a tail and a head: never more than a log holds (a head
    /// further on than that would be the kernel's error; the rest is skipped, not misread).
    fn window(&self, tail: &AtomicU64, head: &AtomicU64) -> (u64, u64) {
        let t = tail.load(Ordering::Relaxed);
        let h = head.load(Ordering::Acquire);
        let n = h.wrapping_sub(t).min(self.slots as u64);
        (h.wrapping_sub(n), h)
    }

    /// SYN packets by source port read from the port logs so far (indexed by port).
    pub fn syn_ports(&self) -> &[u64] {
        &self.syn_ports
    }
}
