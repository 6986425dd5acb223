//! kvferry-sim: deterministic madsim simulation of kvferry clusters.

pub mod report;
pub mod scenario;
