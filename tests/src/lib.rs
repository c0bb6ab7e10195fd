//! netrace's lab: the seed failure (a pod whose connections are SNATed by its node into ports
//! a stateless firewall does not let back) built from network namespaces, with a client, a
//! server, ground truth from every vantage point, and a runner for the real `netrace` binary.
//! Used by the end-to-end tests, `cargo xtask demo` and benchmarks. Needs root.
//!
//! ```no_run
//! use netrace_lab::{Family, Lab, LabOptions};
//! let lab = Lab::new(LabOptions::default())?;
//! let attempts = lab.client().tcp(lab.server_addr(Family::V4), 200, &|_, _| {})?;
//! let truth = netrace_lab::truth::collect(&lab, Family::V4, &attempts)?;
//! lab.teardown()?;
//! # anyhow::Ok(())
//! ```

pub mod bpf_snat;
pub mod client;
pub mod cmd;
pub mod extra_pod;
pub mod foreign_tcx;
pub mod inspect;
pub mod lab;
pub mod names;
pub mod netns;
pub mod netrace_run;
pub mod probe_lab;
pub mod prometheus;
pub mod server;
pub mod star;
pub mod synflood;
pub mod truth;
pub mod wire;
pub mod xml;

pub use client::{
    Client, ClientOptions, PortAllocator, TcpAttempt, TcpCounts, TcpOutcome, UdpExchange,
    UdpOutcome,
};
pub use cmd::{is_root, require_root};
pub use lab::{Family, Lab, LabOptions, SnatBackend, SnatMode};
pub use names::{leftovers, leftovers_any, remove_stale, stale_leftovers};
pub use netrace_run::{netrace_bin, NetraceOptions, NetraceOutput, NetraceRun, Output};
pub use server::{Accepted, Server, UdpMode};
pub use truth::{TcpTruth, Truth};
