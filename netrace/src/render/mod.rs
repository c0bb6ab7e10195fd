//! Writers for the finished report and for live progress. They compute nothing.

pub mod live;
pub mod svg;
pub mod text;
