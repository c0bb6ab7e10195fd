//! netrace: which outbound TCP connections never got their SYN-ACK back, and was their source
//! port outside the range the firewall lets back in?
//!
//! Data flows one way: `loader` + `attach` put the kernel programs in place; `events` decodes
//! what they report; `tracker` decides each connection's outcome; `stats` and `verdict` turn
//! outcomes into a histogram and a conclusion; `render` writes them. `watch` runs the loop.

pub mod cli;
pub mod error;
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
