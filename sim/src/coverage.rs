//! Coverage of the dangerous windows: the moments where a transfer protocol is most likely to
//! be wrong (bytes landing in blocks being taken back, a step open when its instance dies, …).
//! A campaign that never reached one proved nothing about it, so each window is counted per
//! seed and summed per campaign, and `kvferry sim --require-coverage` fails a campaign that
//! missed one.
//!
//! Windows are observed, never provoked: counting one draws no random number and writes no
//! trace event, so traces and their hashes are what they were without counting.

use crate::scenario::Scenario;
use crate::transfer_mode::TransferMode;
use kvferry_core::RequestId;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// The gray scenarios whose faults silence a peer without a reset (see `gray`).
pub const SILENCING_SCENARIOS: [&str; 3] =
    ["asymmetric-partition", "silent-death", "stalled-reader"];

/// A dangerous window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Window {
    /// A transfer job is cancelled (its request's blocks are being taken back: client or
    /// peer cancel, deadline eviction, scheduler eviction, a lost peer) while a chunk of it
    /// is in flight into or out of those blocks.
    EvictionWhileBytesLand,
    /// An instance crashes or dies silently while one of its completion rounds is open
    /// (wanted by a rank, or gathered from some ranks but not all).
    CrashDuringCollective,
    /// The client cancels a request after a generation rank sent its `RequestInfo` and
    /// before any of its bytes landed.
    CancelBeforeFirstByte,
    /// A rank's agent is replaced (executor recycle) while jobs of the old one still owe the
    /// transceiver their completion status.
    AgentRecycleUnderPendingStatus,
    /// A frame carrying a wrong token (a rogue's `RequestInfo` or `Cancel`) reaches a
    /// transceiver.
    RogueToken,
    /// A request's allocation fails part way through its plan: the generation side's blocks
    /// (an injected failure or a full pool) after its context side already holds and serves
    /// its own.
    AllocationFailureMidPlan,
    /// A transceiver declares a peer dead for its silence (heartbeats), not for a reset.
    HeartbeatDeclaredDead,
    /// A pull's READ is held by a partition between the reader and its source.
    PartitionDuringPull,
}

impl Window {
    pub const ALL: [Window; 8] = [
        Window::EvictionWhileBytesLand,
        Window::CrashDuringCollective,
        Window::CancelBeforeFirstByte,
        Window::AgentRecycleUnderPendingStatus,
        Window::RogueToken,
        Window::AllocationFailureMidPlan,
        Window::HeartbeatDeclaredDead,
        Window::PartitionDuringPull,
    ];

    /// The name in summaries, `--json` and `--require-coverage` messages.
    pub fn name(self) -> &'static str {
        match self {
            Window::EvictionWhileBytesLand => "eviction-while-bytes-land",
            Window::CrashDuringCollective => "crash-during-collective",
            Window::CancelBeforeFirstByte => "cancel-before-first-byte",
            Window::AgentRecycleUnderPendingStatus => "agent-recycle-under-pending-status",
            Window::RogueToken => "rogue-token",
            Window::AllocationFailureMidPlan => "allocation-failure-mid-plan",
            Window::HeartbeatDeclaredDead => "heartbeat-declared-dead",
            Window::PartitionDuringPull => "partition-during-pull",
        }
    }

    /// Whether a campaign of `s` must reach this window: every one that can open in it.
    /// Heartbeats declare a peer dead only where a fault silences one without a reset and
    /// their silence limit is shorter than a seed: in [`SILENCING_SCENARIOS`] (the default's
    /// limit is 5 s, and a wedged job leaves its peer talking). No pull runs under `push`.
    pub fn required_in(self, s: &Scenario) -> bool {
        match self {
            Window::HeartbeatDeclaredDead => SILENCING_SCENARIOS.contains(&s.name.as_str()),
            Window::PartitionDuringPull => s.transfer_mode != TransferMode::Push,
            _ => true,
        }
    }
}

/// Every window at zero: the shape of a seed's or a campaign's `coverage`.
pub fn zero() -> BTreeMap<String, u64> {
    Window::ALL
        .iter()
        .map(|w| (w.name().to_string(), 0))
        .collect()
}

/// The windows `s` requires that `counts` shows unreached, in `Window::ALL` order.
pub fn missed(counts: &BTreeMap<String, u64>, s: &Scenario) -> Vec<&'static str> {
    Window::ALL
        .iter()
        .filter(|w| w.required_in(s) && counts.get(w.name()).copied().unwrap_or(0) == 0)
        .map(|w| w.name())
        .collect()
}

/// One seed's counts, and what the request-scoped windows need to know.
#[derive(Debug, Default)]
pub struct Coverage {
    counts: BTreeMap<Window, u64>,
    /// Requests a generation rank sent a `RequestInfo` for.
    asked: BTreeSet<RequestId>,
    /// Requests some of whose bytes landed.
    landed: BTreeSet<RequestId>,
}

impl Coverage {
    pub fn hit(&mut self, w: Window) {
        *self.counts.entry(w).or_default() += 1;
    }

    pub fn asked(&mut self, id: RequestId) {
        self.asked.insert(id);
    }

    pub fn landed(&mut self, id: RequestId) {
        self.landed.insert(id);
    }

    /// The client cancels `id`: inside `CancelBeforeFirstByte` if it was asked for and no
    /// byte of it landed yet.
    pub fn client_cancel(&mut self, id: RequestId) {
        if self.asked.contains(&id) && !self.landed.contains(&id) {
            self.hit(Window::CancelBeforeFirstByte);
        }
    }

    /// Every window by name, unreached ones at zero.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        let mut out = zero();
        for (w, n) in &self.counts {
            out.insert(w.name().to_string(), *n);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_is_before_the_first_byte_only_between_the_ask_and_a_landing() {
        let mut c = Coverage::default();
        let (early, asked, late) = (RequestId(1), RequestId(2), RequestId(3));
        c.client_cancel(early);
        c.asked(asked);
        c.client_cancel(asked);
        c.asked(late);
        c.landed(late);
        c.client_cancel(late);
        assert_eq!(c.counts()["cancel-before-first-byte"], 1);
        assert_eq!(c.counts().len(), Window::ALL.len());
    }

    #[test]
    fn names_are_distinct_and_missed_windows_follow_the_scenario() {
        let mut names: Vec<&str> = Window::ALL.iter().map(|w| w.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Window::ALL.len());
        let default = Scenario::named("default").expect("default");
        let gray = Scenario::named("silent-death").expect("silent-death");
        let mut counts = zero();
        for n in counts.values_mut() {
            *n = 1;
        }
        counts.insert("heartbeat-declared-dead".into(), 0);
        assert!(missed(&counts, &default).is_empty(), "not required there");
        assert_eq!(missed(&counts, &gray), vec!["heartbeat-declared-dead"]);
        counts.insert("rogue-token".into(), 0);
        assert_eq!(missed(&counts, &default), vec!["rogue-token"]);
        counts.insert("partition-during-pull".into(), 0);
        let push = Scenario {
            transfer_mode: TransferMode::Push,
            ..default.clone()
        };
        assert_eq!(missed(&counts, &push), vec!["rogue-token"], "no pull runs");
        assert_eq!(
            missed(&counts, &default),
            vec!["rogue-token", "partition-during-pull"]
        );
    }
}
