//! kvferry-sim: deterministic madsim simulation of kvferry clusters.

pub mod campaign;
pub mod plan_cmd;
pub mod progress;
pub mod render;
pub mod report;
pub mod scenario;
pub mod trace;
