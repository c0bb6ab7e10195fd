//! Writers for the finished report and for live progress. They compute nothing.

pub mod live;
pub mod probe_json;
pub mod probe_text;
pub mod svg;
pub mod text;
