//! netrace: which outbound TCP connections never got their SYN-ACK back, and was their source
//! port outside the range the firewall lets back in?
//!
//! The data path, one way, one folder per step:
//!
//! ```text
//! kernel programs ─▶ maps / ring buffer ─▶ pump ─▶ tracker ─▶ verdict ─▶ renderers
//! (netrace-ebpf)     kernel::loader        watch::  track::   judge::    render::
//!                    kernel::events        pump     tracker   verdict,   text, svg, live,
//!                                                    stats     advice     probe_text, probe_json
//! ```
//!
//! - [`kernel`]: loads the object (`loader`), attaches and detaches the programs (`attach`),
//!   decodes ring-buffer records (`events`); `tracefs` and `mounts` serve the tracepoint;
//!   `netlink` makes every netlink request (tc filters, the clsact qdisc, conntrack).
//! - [`track`]: events in, outcomes out (`tracker`), the histogram by port range (`stats`),
//!   outcomes by destination (`destinations`), pods and processes behind connections
//!   (`correlate`), what SNAT does to ports (`natmode`).
//! - [`judge`]: the verdict from the evidence (`evidence`: the learned edge, `edge`; dead
//!   destinations; the stratified test, `exact`), and the fix text (`advice`, the one place
//!   for it).
//! - [`report`]: the finished results; [`render`] writes them, [`metrics`] exports them.
//! - [`node`]: facts about the node (port settings, interfaces, privileges, cgroups, pod
//!   names) and the `netrace check` preflight. [`files`]: files written without following
//!   symlinks.
//! - Subcommands wire the steps: [`watch`] (live, from the kernel) and [`probe`] (from outside,
//!   no kernel); [`fleet`] reads every node's metrics back from Prometheus. [`cli`] holds the
//!   clap structs only, [`options`] the types they share, and each subcommand's `config` checks
//!   the arguments before anything runs.

pub mod analyze;
pub mod capture;
pub mod cli;
pub mod error;
pub mod files;
pub mod fleet;
pub mod judge;
pub mod kernel;
pub mod metrics;
pub mod node;
pub mod options;
pub mod ports;
pub mod probe;
pub mod render;
pub mod report;
pub mod track;
pub mod watch;
