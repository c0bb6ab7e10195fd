//! Judging: what the counts mean (`verdict`) and what to change (`advice`, the one place for
//! fix text). Pure functions, unit-tested without a kernel.

pub mod advice;
pub mod verdict;
