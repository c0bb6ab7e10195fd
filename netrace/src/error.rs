//! Errors that decide the exit status.

use std::fmt;

/// A problem with how netrace was invoked or with what it was asked to watch: exit status 2,
/// one line, nothing attached.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Exit statuses, as ripgrep and grep use them.
pub mod exit {
    /// Nothing lost.
    pub const CLEAN: u8 = 0;
    /// At least one connection lost.
    pub const LOSS: u8 = 1;
    /// Bad arguments, missing privileges, or a failure while running.
    pub const ERROR: u8 = 2;
    /// The run saw SYNs before a translation it could not follow (translation out of sight):
    /// the loss was not judged; run again with `--egress-hook xmit`.
    pub const OUT_OF_SIGHT: u8 = 3;
}
