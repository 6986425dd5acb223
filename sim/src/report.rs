//! What one simulated seed produces: the interface between the simulator (`cluster`, `rank`,
//! `agent`, …) and the campaign tooling (`campaign`, `trace`, the CLI).

use serde::Serialize;
use std::collections::BTreeMap;

/// The invariants of DESIGN.md. `I8` (determinism) is checked by running a seed twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Invariant {
    I1,
    I2,
    I3,
    I4,
    I5,
    I6,
    I7,
    I8,
    /// A peer without the right token, or asking for foreign blocks, receives nothing and can
    /// end nothing.
    I9,
    /// Progress: with faults off every request completes; with faults on a request fails or is
    /// cancelled only if a fault or a cancel reached it. Each failure is attributed to its
    /// cause; the rule (which fault reaches which request, and when) is in the `checker`
    /// module docs. An unattributed failure is a violation, and so is a transfer job still
    /// waiting for its completion at the drain bound (`hang`).
    I10,
    /// Bounded memory: every sampled table and queue size stays within its bound, and once
    /// the seed has converged each returns to its baseline; the rule is in the `growth`
    /// module docs.
    I11,
}

impl Invariant {
    pub fn id(self) -> &'static str {
        match self {
            Invariant::I1 => "I1",
            Invariant::I2 => "I2",
            Invariant::I3 => "I3",
            Invariant::I4 => "I4",
            Invariant::I5 => "I5",
            Invariant::I6 => "I6",
            Invariant::I7 => "I7",
            Invariant::I8 => "I8",
            Invariant::I9 => "I9",
            Invariant::I10 => "I10",
            Invariant::I11 => "I11",
        }
    }
}

/// One broken invariant, with the first event that broke it.
#[derive(Clone, Debug, Serialize)]
pub struct Violation {
    pub invariant: Invariant,
    /// Simulated time of the breaking event, microseconds since the seed started.
    pub at_us: u64,
    /// Human-readable: which request, rank, block, and what happened.
    pub detail: String,
}

/// A timeline event, for the Chrome/Perfetto trace and the trace hash.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct TraceEvent {
    /// Simulated microseconds since the seed started.
    pub at_us: u64,
    /// Track: e.g. "ctx0/r1", "gen0/r0", "client", "faults".
    pub track: String,
    pub kind: TraceKind,
    /// Free text (request id, peer, bytes, fault kind…).
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum TraceKind {
    /// A transfer span starts (`id` pairs it with its end).
    Begin {
        id: u64,
    },
    End {
        id: u64,
    },
    /// A point event: fault, warning, violation, request state change.
    Instant,
}

/// Outcome of one seed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SeedReport {
    pub seed: u64,
    pub sim_time_us: u64,
    pub events: u64,
    /// Requests of the workload (`Scenario::requests`).
    pub requests_planned: u64,
    /// Requests the client issued: all of them once the seed ran to quiescence.
    pub requests_issued: u64,
    pub requests_completed: u64,
    pub requests_failed: u64,
    pub requests_cancelled: u64,
    /// Faults injected, by kind name ("crash", "partition", "clog", "latency", "agent-error",
    /// "alloc-fail", "recycle", "client-cancel", "rogue-peer").
    pub faults: BTreeMap<String, u64>,
    /// Requests that failed or were cancelled, by attributed cause (I10): a fault kind name,
    /// "deadline", "no-capacity", "contention", or "unattributed".
    pub failures_by_cause: BTreeMap<String, u64>,
    /// The same requests by the core's `FailCause` name on the first rank that failed them,
    /// or "lost" (its instances crashed before any rank failed it), or "not-admitted".
    pub failures_by_core_cause: BTreeMap<String, u64>,
    pub violations: Vec<Violation>,
    /// Hash of the trace; the same seed must give the same hash (I8).
    pub trace_hash: u64,
    /// Only filled when asked for (replay with --trace).
    #[serde(skip)]
    pub trace: Vec<TraceEvent>,
    /// Two-phase liveness: simulated microseconds from the later of the heal and the last
    /// request's arrival until every request was terminal and every rank idle (the drain
    /// bound itself when that never happened: then I7 is reported too).
    pub convergence_us: u64,
    /// Dangerous windows reached, by name (`coverage`), every window listed.
    pub coverage: BTreeMap<String, u64>,
    /// The largest value of each sampled size over the seed, over every rank or instance
    /// (I11; empty when the scenario samples nothing).
    pub peaks: BTreeMap<String, u64>,
}
