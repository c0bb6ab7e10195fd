//! `netrace probe HOST:PORT`: find which source ports get their SYN-ACK back, from the outside.

use clap::Args;

/// Arguments of `netrace probe` (placeholder; filled in by the probe implementation).
#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// The server to probe, as HOST:PORT.
    pub target: Option<String>,
}

/// Runs `netrace probe`; returns the exit status.
pub fn run(_args: &ProbeArgs) -> anyhow::Result<u8> {
    anyhow::bail!("netrace probe is not implemented yet")
}
