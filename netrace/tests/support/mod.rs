//! Shared helpers for netrace's integration tests. Packets come from the lab's builder,
//! `netrace_lab::wire`.
#![allow(dead_code)]

pub mod bpf;
