//! The kernel side, seen from user space: loading the object and its maps (`loader`),
//! attaching and detaching the programs (`attach`), decoding ring-buffer records (`events`),
//! the filesystems the tracepoint needs (`tracefs`, `mounts`), and every netlink request
//! (`netlink`: tc filters, the clsact qdisc, conntrack). Everything that touches the
//! kernel lives here.

pub mod attach;
pub mod events;
pub mod loader;
pub mod mounts;
pub mod netlink;
pub mod tracefs;
