//! The live one-line summary on a terminal, redrawn about once a second.

use std::io::{self, IsTerminal, Write};

use crate::track::stats::Counts;

pub struct Live {
    enabled: bool,
    drawn: bool,
}

impl Live {
    /// Draws on standard error, and only when it is a terminal.
    pub fn new() -> Self {
        Self {
            enabled: io::stderr().is_terminal(),
            drawn: false,
        }
    }

    pub fn draw(&mut self, c: &Counts, waiting: usize, dropped: u64, elapsed_s: f64) {
        if !self.enabled {
            return;
        }
        let mut e = io::stderr().lock();
        let _ = write!(
            e,
            "\r\x1b[K[{elapsed_s:>5.0}s] attempts {}  answered {}  lost {}  refused {}  \
             unreachable {}  waiting {waiting}  events dropped {dropped}",
            c.attempts, c.answered, c.lost, c.refused, c.unreachable
        );
        let _ = e.flush();
        self.drawn = true;
    }

    pub fn clear(&mut self) {
        if self.drawn {
            let _ = write!(io::stderr(), "\r\x1b[K");
            self.drawn = false;
        }
    }
}

impl Default for Live {
    fn default() -> Self {
        Self::new()
    }
}
