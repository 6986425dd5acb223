//! kvferry-sim: deterministic madsim simulation of kvferry clusters.

pub mod campaign;
pub mod cli;
pub mod plan_cmd;
pub mod progress;
pub mod render;
pub mod report;
pub mod scenario;
pub mod trace;
pub mod agent;
pub mod checker;
pub mod cluster;
pub mod faults;
pub mod memory;
pub mod net;
pub mod rank;
pub mod router;
