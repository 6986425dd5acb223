//! kvferry-sim: deterministic madsim simulation of kvferry clusters.

pub mod agent;
pub mod attribution;
pub mod campaign;
pub mod checker;
pub mod cli;
pub mod cluster;
pub mod evict;
pub mod fabric;
pub mod faults;
pub mod hang;
pub mod hazard;
pub mod mailbox;
pub mod memory;
pub mod net;
pub mod plan_cmd;
pub mod progress;
pub mod rank;
pub mod reclaim;
pub mod render;
pub mod report;
pub mod router;
pub mod scenario;
pub mod trace;
pub mod transfer_mode;
pub mod wake;
pub mod world;
