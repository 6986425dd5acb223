//! The time line of a seed: how long faults strike, how long each lasts, how fast requests
//! arrive, how long the seed may take to converge, and whether its sizes are sampled. The
//! short horizon of every test scenario fits a seed in a fraction of a simulated second; the
//! soak's runs for simulated minutes under the production timers.

use kvferry_core::config::{
    DEFAULT_HEARTBEAT_INTERVAL_MS, DEFAULT_HEARTBEAT_MISSED_LIMIT, DEFAULT_SENDER_FUTURE_TIMEOUT_MS,
};
use serde::Serialize;
use std::time::Duration;

/// Slack on the soak's drain bound past the longest production timer a request may wait on.
pub const SOAK_DRAIN_MARGIN_MS: u64 = 5_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Horizon {
    /// Faults strike until here, then every one heals.
    pub heal_at_ms: u64,
    /// How often the injector considers each kind of timed fault.
    pub fault_tick_ms: u64,
    /// Longest partition, clog or latency spike (all end at the heal anyway).
    pub max_fault_span_ms: u64,
    /// Spans drawn log-uniformly in 1..max (most short, a few lasting nearly the max) rather
    /// than uniformly: a soak wants minute-long faults without every fault being one.
    pub log_spans: bool,
    /// Mean gap between request arrivals.
    pub arrival_gap_us: u64,
    /// Liveness bound (I7): every request terminal within this after the later of the heal
    /// and the last arrival.
    pub drain_ms: u64,
    /// Table and queue sizes sampled this often (I11); 0: not sampled, no sampler task.
    pub sample_every_ms: u64,
}

impl Horizon {
    /// Every scenario but the soak: 65 fault ticks, faults of up to 30 ms, 3 s to drain.
    pub const SHORT: Horizon = Horizon {
        heal_at_ms: 260,
        fault_tick_ms: 4,
        max_fault_span_ms: 30,
        log_spans: false,
        arrival_gap_us: 3000,
        drain_ms: 3000,
        sample_every_ms: 0,
    };

    /// The soak: faults for two and a half simulated minutes, each up to two minutes long,
    /// considered every half second (the per-tick probabilities of `FaultMix` then give a few
    /// crashes and partitions per seed, not hundreds); a request every 60 ms on average; a
    /// drain bound past the longest production timer a request can wait on (the sender budget,
    /// then the heartbeats' silence limit); sizes sampled every simulated second.
    pub const SOAK: Horizon = Horizon {
        heal_at_ms: 150_000,
        fault_tick_ms: 500,
        max_fault_span_ms: 120_000,
        log_spans: true,
        arrival_gap_us: 60_000,
        drain_ms: DEFAULT_SENDER_FUTURE_TIMEOUT_MS
            + DEFAULT_HEARTBEAT_INTERVAL_MS * DEFAULT_HEARTBEAT_MISSED_LIMIT as u64
            + SOAK_DRAIN_MARGIN_MS,
        sample_every_ms: 1000,
    };

    pub fn heal_at(&self) -> Duration {
        Duration::from_millis(self.heal_at_ms)
    }

    pub fn fault_tick(&self) -> Duration {
        Duration::from_millis(self.fault_tick_ms)
    }

    pub fn drain(&self) -> Duration {
        Duration::from_millis(self.drain_ms)
    }

    /// The sampling period, if sizes are sampled.
    pub fn sample_every(&self) -> Option<Duration> {
        (self.sample_every_ms > 0).then(|| Duration::from_millis(self.sample_every_ms))
    }

    /// A log-uniform fault span from a uniform draw `u` in [0, 1): in 1..max ms.
    pub fn log_span(&self, u: f64) -> Duration {
        let max = self.max_fault_span_ms.max(2);
        let ms = (max as f64).powf(u) as u64;
        Duration::from_millis(ms.clamp(1, max - 1))
    }
}
