//! Judging: what the counts mean (`verdict`; `translation`: whether the ports seen are the ones
//! the firewall sees) and what to change (`advice`, the one place for fix text). `evidence`
//! weighs the per-destination outcomes: `edge` learns the firewall's range from answered and
//! lost ports, `exact` tests inside vs outside within destinations; `icmp` names ICMP errors.
//! Pure functions, unit-tested without a kernel.

pub mod advice;
pub mod edge;
pub mod evidence;
pub mod exact;
pub mod icmp;
pub mod translation;
pub mod verdict;
