//! A seed's fault schedule and workload as a value: which fault draws strike, and which
//! requests the client issues with what sizes and times. `run_schedule` (in `cluster`) runs
//! a seed under one; `shrink` reduces one.
//!
//! Every fault decision of a seed is a Bernoulli draw of one kind (`World::strike`): a timed
//! fault draws once per the horizon's fault tick, an aimed one once per job, allocation, request or pull.
//! An event names a draw by its kind and ordinal (`nth`), so a timed event's ordinal is its
//! tick. Without a schedule a seed records what it drew; with one, the schedule decides every
//! draw, but the random number is still taken, so that replaying a seed's own recorded schedule
//! consumes the seed's randomness exactly as the seed did and reproduces it event for event.
//! Requests work the same way: the client takes its random arrival gap, token and size as
//! always, and a recorded request overrides them.

use crate::faults::FaultKind;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

/// One fault: the `nth` draw (from 0) of `kind` strikes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FaultEvent {
    pub kind: FaultKind,
    pub nth: u32,
    /// When it struck in the run that produced this schedule (informational: replay keys on
    /// `nth`).
    #[serde(default)]
    pub at_us: u64,
    /// How long a partition, clog, latency spike, one-way partition or stall lasts; taken
    /// from the draw when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_ms: Option<u64>,
}

/// One request of the workload.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestSpec {
    pub id: u64,
    /// Arrival, simulated microseconds since the seed started.
    pub at_us: u64,
    /// KV blocks of its prompt.
    pub blocks: u32,
    /// Prefill time before the generation side is asked.
    pub prefill_us: u64,
}

/// A seed's faults and workload, in the order they happened.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Schedule {
    pub faults: Vec<FaultEvent>,
    pub requests: Vec<RequestSpec>,
}

impl Schedule {
    pub fn read(path: &Path) -> Result<Schedule> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read schedule {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a kvferry schedule", path.display()))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write schedule {}", path.display()))
    }
}

/// A seed's side of a schedule: what decides its draws and what it records as it runs.
#[derive(Debug, Default)]
pub struct Script {
    /// The schedule being replayed; `None` records the seed's own draws.
    given: Option<Schedule>,
    state: Mutex<Ran>,
}

/// What a seed did so far.
#[derive(Debug, Default)]
struct Ran {
    /// Draws taken per kind.
    draws: BTreeMap<FaultKind, u32>,
    /// The events that struck and the requests issued: the schedule of this run.
    ran: Schedule,
}

impl Script {
    pub fn new(given: Option<Schedule>) -> Script {
        Script {
            given,
            state: Mutex::default(),
        }
    }

    /// Requests the client issues: the given workload's, or the scenario's count.
    pub fn request_count(&self, scenario_requests: u32) -> u32 {
        self.given
            .as_ref()
            .map_or(scenario_requests, |g| g.requests.len() as u32)
    }

    /// Decides a draw of `kind` taken while faults are `on`, whose random outcome was
    /// `drawn`.
    pub fn decide(&self, kind: FaultKind, on: bool, drawn: bool, now_us: u64) -> bool {
        if !on {
            return false;
        }
        let mut s = self.state.lock().expect("script lock");
        let counter = s.draws.entry(kind).or_default();
        let nth = *counter;
        *counter += 1;
        let event = match &self.given {
            None => drawn.then_some(FaultEvent {
                kind,
                nth,
                at_us: now_us,
                span_ms: None,
            }),
            Some(g) => g
                .faults
                .iter()
                .find(|e| e.kind == kind && e.nth == nth)
                .map(|e| FaultEvent {
                    at_us: now_us,
                    ..e.clone()
                }),
        };
        let struck = event.is_some();
        s.ran.faults.extend(event);
        struck
    }

    /// The span of the fault of `kind` that just struck: the schedule's, else `drawn_ms`.
    pub fn span_ms(&self, kind: FaultKind, drawn_ms: u64) -> u64 {
        let mut s = self.state.lock().expect("script lock");
        let last = s.ran.faults.iter_mut().rev().find(|e| e.kind == kind);
        let Some(event) = last else {
            return drawn_ms;
        };
        *event.span_ms.get_or_insert(drawn_ms)
    }

    /// When the `k`th request (from 0) arrives: the given time, or `drawn_us`.
    pub fn arrival_us(&self, k: u32, drawn_us: u64) -> u64 {
        self.given
            .as_ref()
            .map_or(drawn_us, |g| g.requests[k as usize].at_us)
    }

    /// The `k`th request: the given one, or the drawn one, recorded.
    pub fn request(&self, k: u32, drawn: RequestSpec) -> RequestSpec {
        let spec = self
            .given
            .as_ref()
            .map_or(drawn, |g| g.requests[k as usize].clone());
        let mut s = self.state.lock().expect("script lock");
        s.ran.requests.push(spec.clone());
        spec
    }

    /// The prefill time of request `id`: the given one, or `drawn_us` recorded.
    pub fn prefill_us(&self, id: u64, drawn_us: u64) -> u64 {
        let given = self.given.as_ref().and_then(|g| {
            let spec = g.requests.iter().find(|r| r.id == id)?;
            Some(spec.prefill_us)
        });
        let us = given.unwrap_or(drawn_us);
        let mut s = self.state.lock().expect("script lock");
        if let Some(spec) = s.ran.requests.iter_mut().find(|r| r.id == id) {
            spec.prefill_us = us;
        }
        us
    }

    /// The schedule this run followed (what struck, what was issued).
    pub fn take(&self) -> Schedule {
        std::mem::take(&mut self.state.lock().expect("script lock").ran)
    }
}
