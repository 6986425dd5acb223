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

impl Scenario {
    /// The named starting points of `--scenario`. All use tiny layouts (head dim 4, 4 tokens
    /// per block, 2-byte dtype, 8 layers) so that a seed of 64 requests runs in well under a
    /// second of wall time.
    pub fn named(name: &str) -> Option<Scenario> {
        let base = Scenario {
            name: name.to_string(),
            ctx_instances: 1,
            gen_instances: 1,
            ctx_tp: 2,
            ctx_pp: 1,
            gen_tp: 1,
            gen_pp: 1,
            mla: false,
            requests: 64,
            fault_rate: 1.0,
            inflight_cancel: false,
            timeout_ms: None,
            bugs: BugSet::NONE,
        };
        Some(match name {
            "default" => base,
            "crashy" => Scenario {
                ctx_instances: 2,
                gen_instances: 2,
                ..base
            },
            "partition-heavy" => Scenario {
                ctx_instances: 2,
                gen_instances: 1,
                timeout_ms: Some(20),
                ..base
            },
            "hetero-tp" => Scenario {
                ctx_tp: 2,
                ctx_pp: 2,
                gen_tp: 4,
                gen_pp: 1,
                ..base
            },
            "mla" => Scenario {
                mla: true,
                ctx_tp: 2,
                gen_tp: 2,
                ..base
            },
            _ => return None,
        })
    }

    /// KV heads of the simulated model: MLA has its single latent head.
    pub fn kv_heads(&self) -> u32 {
        if self.mla {
            1
        } else {
            4
        }
    }
}
