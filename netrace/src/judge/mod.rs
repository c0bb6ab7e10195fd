//! Judging: what the counts mean (`verdict`; `translation`: whether the ports seen are the ones
//! the firewall sees) and what to change (`advice`, the one place for fix text). Pure
//! functions, unit-tested without a kernel.

pub mod advice;
pub mod translation;
pub mod verdict;
