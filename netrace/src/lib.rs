//! netrace: which outbound TCP connections never got their SYN-ACK back, and was their source
//! port outside the range the firewall lets back in?
//!
//! Data flows one way: `loader` + `attach` put the kernel programs in place; `events` decodes
//! what they report; `tracker` decides each connection's outcome; `stats` and `verdict` turn
//! outcomes into a histogram and a conclusion; `render` writes them. `watch` runs the loop.

pub mod attach;
pub mod cgroups;
pub mod cli;
pub mod correlate;
pub mod error;
pub mod events;
pub mod iface;
pub mod loader;
pub mod metrics;
pub mod mounts;
pub mod natmode;
pub mod node;
pub mod ports;
pub mod privileges;
pub mod probe;
pub mod render;
pub mod report;
pub mod stats;
pub mod tracefs;
pub mod tracker;
pub mod verdict;
pub mod watch;
