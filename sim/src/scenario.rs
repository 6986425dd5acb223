//! Scenarios: the cluster shape, the workload and the fault mix of a campaign.
//! Named scenarios are starting points; CLI knobs override single fields.

use crate::horizon::Horizon;
use crate::transfer_mode::TransferMode;
use kvferry_core::bugs::BugSet;
use kvferry_core::config::{
    ConfigError, TransceiverConfig, DEFAULT_HEARTBEAT_INTERVAL_MS, DEFAULT_HEARTBEAT_MISSED_LIMIT,
    DEFAULT_SENDER_FUTURE_TIMEOUT_MS,
};
use kvferry_core::layout::{CacheLayout, LayoutError};
use kvferry_core::plan::{PlanError, TransferPlan};
use kvferry_core::transceiver::Side;
use serde::Serialize;
use thiserror::Error;

/// Why a scenario cannot be simulated: caught before any seed runs, so that a bad flag is one
/// error line instead of a panic in every seed.
#[derive(Debug, Error)]
pub enum ScenarioError {
    #[error("{flags} give an invalid layout")]
    Layout {
        flags: &'static str,
        source: LayoutError,
    },
    #[error("no transfer plan from the context layout to generation rank {gen_rank}")]
    Plan { gen_rank: u32, source: PlanError },
    #[error("no transceiver config fits the layout of {flags}")]
    Config {
        flags: &'static str,
        source: ConfigError,
    },
}

/// The flags that shape each side's layout, for error messages.
fn side_flags(side: Side) -> &'static str {
    match side {
        Side::Context => "--ctx-tp / --ctx-pp",
        Side::Generation => "--gen-tp / --gen-pp",
    }
}

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
    /// `heartbeat_interval_ms` of every rank.
    pub heartbeat_ms: u64,
    /// `heartbeat_missed_limit` of every rank.
    pub heartbeat_missed: u32,
    /// `kv_transfer_sender_future_timeout_ms` of every rank (the production default, 60 s,
    /// is longer than a seed's drain bound).
    pub sender_timeout_ms: Option<u64>,
    /// Push, pull, or drawn per seed.
    pub transfer_mode: TransferMode,
    /// `staging_wait_ms` of every rank.
    pub staging_wait_ms: u64,
    /// How long faults strike and last, how fast requests arrive, the drain bound, and
    /// whether sizes are sampled (I11).
    pub horizon: Horizon,
}

/// Names accepted by `--scenario`.
pub const SCENARIOS: [&str; 17] = [
    "default",
    "crashy",
    "partition-heavy",
    "hetero-tp",
    "mla",
    "asymmetric-partition",
    "silent-death",
    "wedged-agent",
    "stalled-reader",
    "abort-during-write",
    "failed-transfer-served",
    "timeout-frees-while-reading",
    "lost-notification",
    "evicted-before-send",
    "stale-endpoint",
    "abort-never-reclaimed",
    "soak",
];

/// The gray-failure scenarios (`gray`): faults that reset nothing. Their ranks heartbeat every
/// `GRAY_HEARTBEAT_MS` and lose a peer after `GRAY_HEARTBEAT_MISSED` silent intervals (100
/// ms: longer than any ordinary partition or clog, the horizon's longest fault span, shorter than a gray
/// fault can last, `gray::MAX_GRAY_SPAN_MS`), and a sender gives up after
/// `GRAY_SENDER_TIMEOUT_MS` (a generation side that died silently before asking is noticed
/// by nothing else), so that all of it plays out well inside the drain bound.
pub const GRAY_SCENARIOS: [&str; 4] = [
    "asymmetric-partition",
    "silent-death",
    "wedged-agent",
    "stalled-reader",
];
pub const GRAY_HEARTBEAT_MS: u64 = 20;
pub const GRAY_HEARTBEAT_MISSED: u32 = 5;
pub const GRAY_SENDER_TIMEOUT_MS: u64 = 1000;
/// `wedged-agent`: the deadline past which a wedged transfer is evicted (`inflight_cancel`).
pub const WEDGE_TIMEOUT_MS: u64 = 50;

/// The deadline of the field-hazard scenarios that evict transfers in flight
/// (`kv_transfer_timeout_ms` with `inflight_cancel`): short, so that faults push transfers
/// past it.
pub const HAZARD_TIMEOUT_MS: u64 = 20;

/// The sender budget of `lost-notification`: the core's own recovery from a lost "finished"
/// when no `kv_transfer_timeout_ms` evicts the parked send (the fuzzer turns it off), shrunk
/// from the production 60 s to fit well within the seed's drain bound (`cluster::DRAIN`).
pub const LOST_NOTIFICATION_BUDGET_MS: u64 = 500;

/// `staging_wait_ms` of every scenario but the soak (which runs the production default).
pub const SHORT_STAGING_WAIT_MS: u64 = 500;

/// Requests of one soak seed: thousands, arriving over about three simulated minutes
/// (`Horizon::SOAK`), so that every table turns over many times.
pub const SOAK_REQUESTS: u32 = 3000;

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
            heartbeat_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            heartbeat_missed: DEFAULT_HEARTBEAT_MISSED_LIMIT,
            sender_timeout_ms: Some(DEFAULT_SENDER_FUTURE_TIMEOUT_MS),
            transfer_mode: TransferMode::Mixed,
            staging_wait_ms: SHORT_STAGING_WAIT_MS,
            horizon: Horizon::SHORT,
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
            "soak" => Scenario::soak(base),
            _ => return Scenario::gray(base.clone()).or_else(|| Scenario::hazard(base)),
        })
    }

    /// The gray-failure scenarios (`GRAY_SCENARIOS`), from `base` of the same name.
    fn gray(base: Scenario) -> Option<Scenario> {
        let name = base.name.clone();
        let gray = Scenario {
            ctx_instances: 2,
            gen_instances: 2,
            heartbeat_ms: GRAY_HEARTBEAT_MS,
            heartbeat_missed: GRAY_HEARTBEAT_MISSED,
            sender_timeout_ms: Some(GRAY_SENDER_TIMEOUT_MS),
            ..base
        };
        Some(match name.as_str() {
            "asymmetric-partition" | "silent-death" | "stalled-reader" => gray,
            // Only a deadline ends a job that neither completes nor fails.
            "wedged-agent" => Scenario {
                timeout_ms: Some(WEDGE_TIMEOUT_MS),
                inflight_cancel: true,
                ..gray
            },
            _ => return None,
        })
    }

    /// The production horizon: the default config's timers (sender budget, heartbeats,
    /// staging wait, early-input TTL: `TransceiverConfig::default()`), two instances a side,
    /// thousands of requests over simulated minutes, faults lasting up to minutes, and the
    /// sizes sampled every second (I11, `growth`).
    fn soak(base: Scenario) -> Scenario {
        let production = TransceiverConfig::default();
        Scenario {
            ctx_instances: 2,
            gen_instances: 2,
            requests: SOAK_REQUESTS,
            timeout_ms: production.kv_transfer_timeout_ms,
            inflight_cancel: production.inflight_cancel,
            heartbeat_ms: production.heartbeat_interval_ms,
            heartbeat_missed: production.heartbeat_missed_limit,
            sender_timeout_ms: production.kv_transfer_sender_future_timeout_ms,
            staging_wait_ms: production.staging_wait_ms,
            horizon: Horizon::SOAK,
            ..base
        }
    }

    /// The field-hazard scenarios, from `base` of the same name.
    fn hazard(base: Scenario) -> Option<Scenario> {
        let name = base.name.clone();
        // Field hazards (`hazard` forces their fault kinds on): aborts and deadlines that
        // evict transfers in flight, and the mode each hazard lives in.
        let evicting = |base: Scenario, transfer_mode| Scenario {
            inflight_cancel: true,
            timeout_ms: Some(HAZARD_TIMEOUT_MS),
            transfer_mode,
            ..base
        };
        Some(match name.as_str() {
            "abort-during-write" | "abort-never-reclaimed" => evicting(base, TransferMode::Push),
            "timeout-frees-while-reading" => evicting(base, TransferMode::Pull),
            "lost-notification" => Scenario {
                sender_timeout_ms: Some(LOST_NOTIFICATION_BUDGET_MS),
                ..evicting(base, TransferMode::Pull)
            },
            "failed-transfer-served" => base,
            "evicted-before-send" => Scenario {
                transfer_mode: TransferMode::Push,
                ..base
            },
            "stale-endpoint" => Scenario {
                transfer_mode: TransferMode::Pull,
                ..base
            },
            _ => return None,
        })
    }

    /// Rank 0's cache layout of an instance of `side` (tiny model: 8 layers, head dim 4, 4
    /// tokens per block, 2-byte dtype). Not validated: see `check`.
    pub fn layout(&self, side: Side) -> CacheLayout {
        let (tp, pp) = match side {
            Side::Context => (self.ctx_tp, self.ctx_pp),
            Side::Generation => (self.gen_tp, self.gen_pp),
        };
        CacheLayout {
            num_layers: 8,
            num_kv_heads: self.kv_heads(),
            head_dim: 4,
            tokens_per_block: 4,
            dtype_bytes: 2,
            tp_size: tp,
            tp_rank: 0,
            pp_size: pp,
            pp_rank: 0,
            mla: self.mla,
        }
    }

    /// The transceiver config of every simulated rank: small buffers and slots, so that
    /// transfers queue for slots and take several chunks.
    pub fn tx_config(&self) -> TransceiverConfig {
        TransceiverConfig {
            max_tokens_in_buffer: 16,
            kv_transfer_timeout_ms: self.timeout_ms,
            inflight_cancel: self.inflight_cancel,
            staging_slots: 4,
            staging_wait_ms: self.staging_wait_ms,
            heartbeat_interval_ms: self.heartbeat_ms,
            heartbeat_missed_limit: self.heartbeat_missed,
            kv_transfer_sender_future_timeout_ms: self.sender_timeout_ms,
            ..TransceiverConfig::default()
        }
    }

    /// Everything a seed relies on: both layouts valid, a transfer plan from the context
    /// instance to every generation rank, and a transceiver for every rank of either side.
    pub fn check(&self) -> Result<(), ScenarioError> {
        let config = self.tx_config();
        for side in [Side::Context, Side::Generation] {
            let flags = side_flags(side);
            let layout = self.layout(side);
            layout
                .validate()
                .map_err(|source| ScenarioError::Layout { flags, source })?;
            config
                .validate()
                .and_then(|()| config.slot_bytes_for(layout.block_bytes(), layout.tokens_per_block))
                .map_err(|source| ScenarioError::Config { flags, source })?;
        }
        let (ctx, gen) = (self.layout(Side::Context), self.layout(Side::Generation));
        for gen_rank in 0..gen.world_size() {
            TransferPlan::new(&ctx, &gen.with_rank(gen_rank), &[(0, 0)])
                .map_err(|source| ScenarioError::Plan { gen_rank, source })?;
        }
        Ok(())
    }

    /// A gray-failure scenario (see [`GRAY_SCENARIOS`]).
    pub fn is_gray(&self) -> bool {
        GRAY_SCENARIOS.contains(&self.name.as_str())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_scenario_passes_its_check() {
        for name in SCENARIOS {
            let s = Scenario::named(name).expect("named");
            s.check().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn a_tp_that_splits_no_head_is_refused() {
        let s = Scenario {
            ctx_tp: 3,
            ..Scenario::named("default").expect("named")
        };
        assert!(matches!(s.check(), Err(ScenarioError::Layout { .. })));
    }
}
