//! The kernel side, seen from user space: loading the object and its maps (`loader`),
//! attaching and detaching the programs (`attach`), decoding ring-buffer records (`events`),
//! the filesystems the tracepoint needs (`tracefs`, `mounts`), and every netlink request
//! (`netlink`: tc filters, the clsact qdisc, conntrack); where outbound SYNs are observed
//! (`egress_hook`: tc egress or the device hook), the kernel's BTF offsets the device hook
//! needs (`btf`), and the IPv4 pending table as user space reads and changes it (`table`). Everything that touches the kernel lives here.

pub mod attach;
pub mod batch;
pub mod btf;
pub mod egress_hook;
pub mod events;
pub mod loader;
pub mod logs;
mod mapped;
pub mod mounts;
pub mod netlink;
pub mod table;
pub mod tracefs;
