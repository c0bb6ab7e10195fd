//! Tracking: events in, outcomes out. `tracker` decides each connection's outcome,
//! `correlate` links uplink connections to pods and processes, `natmode` tells what SNAT does
//! to ports, `stats` keeps the histogram by source-port range, `destinations` the outcomes by
//! destination (bounded). Pure state, no kernel.

pub mod correlate;
pub mod destinations;
pub mod natmode;
pub mod port_cells;
pub mod stats;
pub mod tracker;
