//! Shared helpers for netrace's integration tests.
#![allow(dead_code)]

pub mod bpf;
pub mod packets;
