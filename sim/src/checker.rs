//! The invariant checker and the trace of one seed.
//!
//! Safety invariants are checked as events happen (the simulator calls in at each event that
//! could break one); liveness (I7) and staging (I2) are checked at quiescence by the cluster.
//! The checker is a leaf: it never calls out, so any task may lock it while holding nothing else.

use crate::report::{Invariant, TraceEvent, TraceKind, Violation};
use kvferry_core::request::RequestState;
use kvferry_core::RequestId;
use std::collections::{BTreeMap, HashMap};

/// Violations kept per seed; the first of each invariant is what matters, the rest are noise.
pub const MAX_VIOLATIONS: usize = 64;

/// Where a rank is: instance incarnation id and rank.
pub type RankKey = (u32, u32);

#[derive(Debug, Default)]
struct JobTrack {
    submitted: u32,
    pushed: u32,
    last_push_us: u64,
}

#[derive(Debug, Default)]
pub struct Checker {
    pub violations: Vec<Violation>,
    pub trace: Vec<TraceEvent>,
    keep: bool,
    hash: u64,
    pub events: u64,
    pub faults: BTreeMap<String, u64>,
    /// TimeoutWarns seen per (rank, request): a second one is I4.
    warned: HashMap<(RankKey, RequestId), u64>,
    /// Terminal states applied per (rank, request): a second one is I7.
    terminal: HashMap<(RankKey, RequestId), RequestState>,
    jobs: HashMap<(RankKey, RequestId), JobTrack>,
}

/// FNV-1a, 64 bit: the trace hash must not depend on process-random hasher seeds.
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Checker {
    pub fn new(keep: bool) -> Checker {
        Checker {
            keep,
            hash: 0xcbf2_9ce4_8422_2325,
            ..Checker::default()
        }
    }

    pub fn hash(&self) -> u64 {
        self.hash
    }

    pub fn event(&mut self, at_us: u64, track: &str, kind: TraceKind, name: String) {
        self.events += 1;
        let (tag, id) = match kind {
            TraceKind::Begin { id } => (1u8, id),
            TraceKind::End { id } => (2, id),
            TraceKind::Instant => (3, 0),
        };
        let mut h = fnv(self.hash, &at_us.to_le_bytes());
        h = fnv(h, track.as_bytes());
        h = fnv(h, &[tag]);
        h = fnv(h, &id.to_le_bytes());
        self.hash = fnv(h, name.as_bytes());
        if self.keep {
            self.trace.push(TraceEvent {
                at_us,
                track: track.to_string(),
                kind,
                name,
            });
        }
    }

    pub fn instant(&mut self, at_us: u64, track: &str, name: String) {
        self.event(at_us, track, TraceKind::Instant, name);
    }

    pub fn fault(&mut self, at_us: u64, kind: &str, detail: String) {
        *self.faults.entry(kind.to_string()).or_default() += 1;
        self.instant(at_us, "faults", format!("{kind}: {detail}"));
    }

    pub fn violate(&mut self, invariant: Invariant, at_us: u64, detail: String) {
        self.instant(at_us, "violations", format!("{} {detail}", invariant.id()));
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(Violation {
                invariant,
                at_us,
                detail,
            });
        }
    }

    pub fn job_submitted(&mut self, rank: RankKey, request: RequestId) {
        self.jobs.entry((rank, request)).or_default().submitted += 1;
    }

    pub fn job_pushed(&mut self, rank: RankKey, request: RequestId, at_us: u64) {
        let j = self.jobs.entry((rank, request)).or_default();
        j.pushed += 1;
        j.last_push_us = at_us;
    }

    /// I4. `finished_after`: the same poll went on to finish the request locally, which means
    /// its completions were already queued when the warn fired.
    pub fn timeout_warn(
        &mut self,
        rank: RankKey,
        request: RequestId,
        at_us: u64,
        configured: bool,
        finished_after: bool,
        track: &str,
    ) {
        self.instant(at_us, track, format!("timeout warn {request}"));
        if !configured {
            self.violate(
                Invariant::I4,
                at_us,
                format!("{request} on {track}: timeout WARN with no timeout configured"),
            );
        }
        let n = self.warned.entry((rank, request)).or_default();
        *n += 1;
        if *n == 2 {
            self.violate(
                Invariant::I4,
                at_us,
                format!("{request} on {track}: second timeout WARN for one enqueue"),
            );
        }
        let ready = self
            .jobs
            .get(&(rank, request))
            .is_some_and(|j| j.submitted > 0 && j.pushed == j.submitted && j.last_push_us <= at_us);
        if ready && finished_after {
            self.violate(
                Invariant::I4,
                at_us,
                format!("{request} on {track}: timeout WARN for a transfer already complete"),
            );
        }
    }

    /// I7 (safety half): exactly one terminal state per request per rank.
    pub fn terminal(
        &mut self,
        rank: RankKey,
        request: RequestId,
        state: RequestState,
        at_us: u64,
        track: &str,
    ) {
        self.instant(at_us, track, format!("{request} {state:?}"));
        if let Some(prev) = self.terminal.insert((rank, request), state) {
            self.violate(
                Invariant::I7,
                at_us,
                format!("{request} on {track}: second terminal state {state:?} after {prev:?}"),
            );
        }
    }

    pub fn into_parts(
        self,
    ) -> (
        Vec<Violation>,
        Vec<TraceEvent>,
        u64,
        u64,
        BTreeMap<String, u64>,
    ) {
        (
            self.violations,
            self.trace,
            self.hash,
            self.events,
            self.faults,
        )
    }
}
