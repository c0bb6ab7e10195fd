#![no_std]
// Intentionally empty: the programs live in main.rs; this keeps `cargo test` on the host quiet.
