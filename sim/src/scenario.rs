//! Scenarios: the cluster shape, the workload and the fault mix of a campaign.
//! Named scenarios are starting points; CLI knobs override single fields.

use kvferry_core::bugs::BugSet;
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Scenario {
    pub name: String,
    pub ctx_instances: u32,
    pub gen_instances: u32,
    pub ctx_tp: u32,
    pub ctx_pp: u32,
    pub gen_tp: u32,
    pub gen_pp: u32,
    pub mla: bool,
    /// Requests per seed.
    pub requests: u32,
    /// Scales every fault probability (0 = no faults). Each seed draws its own mix (swarm).
    pub fault_rate: f64,
    pub inflight_cancel: bool,
    /// `kv_transfer_timeout_ms`; `None` leaves the WARN unconfigured.
    pub timeout_ms: Option<u64>,
    /// Bug switches to turn on (tests only; empty without the `bug-switches` feature).
    #[serde(skip)]
    pub bugs: BugSet,
}

/// Names accepted by `--scenario`.
pub const SCENARIOS: [&str; 5] = ["default", "crashy", "partition-heavy", "hetero-tp", "mla"];
