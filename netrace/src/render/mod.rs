//! Writers for the finished report, for live progress, and the man pages. They compute
//! nothing.

pub mod live;
pub mod man;
pub mod probe_json;
pub mod probe_text;
pub mod svg;
pub mod text;
