//! The invariant checker and the trace of one seed.
//!
//! Safety invariants are checked as events happen (the simulator calls in at each event that
//! could break one); liveness (I7), staging (I2) and progress (I10) are checked at quiescence
//! by the cluster. The checker is a leaf: it never calls out, so any task may lock it while
//! holding nothing else.
//!
//! # Progress (I10): which fault may fail which request
//!
//! Every injected fault leaves a footprint ([`Footprint`]): its kind, the span of simulated
//! time it acts in, and whom it reaches. A request's *lifetime* runs from its arrival at the
//! client to the last state change of any of its sides (terminal state on an instance, loss
//! with a crashed instance, refusal at admission); its *instances* are the incarnations its
//! context and generation sides were started on. A fault reaches a request when
//!
//! - it is aimed at the request itself: a client cancel of it, an injected allocation failure
//!   of its blocks, an injected agent error on one of its transfer jobs; or
//! - it acts on one of the request's instances at some moment of its lifetime: the crash of one
//!   of them (a crash acts from the crash on, for good), a clog of a rank of one of them, an
//!   executor recycle on a rank of one of them; or a partition *between two of them*; or
//! - it acts on the whole fabric during its lifetime (a latency spike).
//!
//! A request that was not admitted because no incarnation of a side was up is reached by the
//! crashes and silent deaths before its refusal (instances only vanish by one or the other).
//! A rogue peer reaches nobody:
//! without the token it has no authority over any request (I9).
//!
//! A request that failed or was cancelled is attributed to the first fault that reached it in
//! [`FaultKind`] order (faults aimed at the request first). Without one, three causes that are
//! policies rather than faults remain: `deadline`, when the first rank to fail it did so
//! because a configured deadline passed (core cause `timeout`: deadline eviction with
//! `inflight_cancel`, or the sender-future budget); `no-capacity`, when the client found no
//! free KV blocks for it (admission control under load); and `contention`, when the first rank
//! to fail it found no staging slot within `staging_wait_ms` (core cause `no-slot`) while a
//! fault acted anywhere in the cluster during its lifetime (slots held by legs the fault
//! stalled: a receive waiting on a silent peer keeps its slot up to the heartbeats' silence
//! limit, longer than the production `staging_wait_ms`). Any other failed or cancelled request
//! is a violation of I10, reported at its first failure with the core's
//! [`FailCause`](kvferry_core::transceiver::FailCause). With faults off there are no
//! footprints, so every request must complete unless a configured deadline or the pool's size
//! turned it away. Requests still live at the end are I7's; one whose transfer job never
//! completed is I10's too (`hang`: no progress, and nothing timed it out).
//!
//! A rank that fails a request as `peer-aborted` although no real rank had sent it an abort
//! (`Cancel` or `Error`) for that request before the rank decided to end it was ended by a
//! rogue peer: that is I9, and the request's cause is `rogue-peer`. The decision's time is when
//! the rank first sends an abort of its own for the request (a transceiver tells its peers
//! once, at the decision), or when it reports the failure if it tells nobody.

use crate::attribution::{Footprint, Reach};
use crate::coverage::Coverage;
use crate::faults::FaultKind;
use crate::growth::Growth;
use crate::report::{Invariant, TraceEvent, TraceKind, Violation};
use kvferry_core::request::RequestState;
use kvferry_core::{PeerId, RequestId};
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
    /// Every fault injected, for the progress check (I10).
    pub footprints: Vec<Footprint>,
    /// Earliest abort (`Cancel` or `Error`) a real rank sent for a request to a rank, and by a
    /// rank: what the I9 check of a peer-aborted request compares.
    aborts_to: HashMap<(RequestId, PeerId), u64>,
    aborts_by: HashMap<(RequestId, PeerId), u64>,
    /// The dangerous windows this seed reached (observed here, beside the invariants, so
    /// that counting them touches neither the trace nor the random stream).
    pub coverage: Coverage,
    /// The sampled sizes' baseline and peaks (I11).
    pub growth: Growth,
}

/// What the checker recorded of a seed, for its report.
pub struct Recorded {
    pub violations: Vec<Violation>,
    pub trace: Vec<TraceEvent>,
    pub trace_hash: u64,
    pub events: u64,
    pub faults: BTreeMap<String, u64>,
    pub coverage: BTreeMap<String, u64>,
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

    /// A fault struck at `at_us`, acting until `until_us` on whom `reach` says.
    pub fn fault(
        &mut self,
        at_us: u64,
        kind: FaultKind,
        (until_us, reach): (u64, Reach),
        detail: String,
    ) {
        let name = kind.name();
        *self.faults.entry(name.to_string()).or_default() += 1;
        self.instant(at_us, "faults", format!("{name}: {detail}"));
        self.footprints.push(Footprint {
            kind,
            from_us: at_us,
            until_us: until_us.max(at_us),
            reach,
        });
    }

    /// A real rank `from` sent an abort (`Cancel`, or `Error`) for `request` to rank `to`;
    /// `gives_up`: it is the abort a rank tells its peers when it gives the request up.
    pub fn abort_sent(
        &mut self,
        request: RequestId,
        (from, gives_up): (PeerId, bool),
        to: PeerId,
        at_us: u64,
    ) {
        self.aborts_to.entry((request, to)).or_insert(at_us);
        if gives_up {
            self.aborts_by.entry((request, from)).or_insert(at_us);
        }
    }

    /// I9: `rank` failed `request` as aborted by a peer, noticed at `at_us`. It decided so when
    /// it first told its peers (the abort it sends once, at the decision), or at `at_us` if it
    /// told nobody; unless a real rank had sent it an abort before that, only a rogue peer's
    /// can have ended it. True if so (then reported).
    pub fn peer_aborted(
        &mut self,
        request: RequestId,
        rank: PeerId,
        at_us: u64,
        track: &str,
    ) -> bool {
        let decided = self
            .aborts_by
            .get(&(request, rank))
            .map_or(at_us, |sent| (*sent).min(at_us));
        // Strictly before: a message takes at least `net::LATENCY_US.0` to arrive.
        let real = self
            .aborts_to
            .get(&(request, rank))
            .is_some_and(|sent| *sent < decided);
        if !real {
            self.violate(
                Invariant::I9,
                at_us,
                format!(
                    "{request} on {track} ended as peer-aborted, but no real peer had sent it an \
                     abort: a peer without the token ended it"
                ),
            );
        }
        !real
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

    /// What a seed's report takes from the checker.
    pub fn into_parts(self) -> Recorded {
        Recorded {
            violations: self.violations,
            trace: self.trace,
            trace_hash: self.hash,
            events: self.events,
            faults: self.faults,
            coverage: self.coverage.counts(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(instance: u32, rank: u32) -> PeerId {
        PeerId { instance, rank }
    }

    #[test]
    fn a_peer_abort_needs_a_real_abort_before_the_decision() {
        let (ctx, gen) = (peer(1, 0), peer(2, 0));
        let id = RequestId(5);
        let mut c = Checker::new(false);
        // The generation rank gave up at 100; the context rank, told at 100, gave up at 300.
        c.abort_sent(id, (gen, true), ctx, 100);
        c.abort_sent(id, (ctx, true), gen, 300);
        assert!(!c.peer_aborted(id, ctx, 400, "ctx"));
        // The generation rank reports peer-aborted, but it had decided first (at 100): the
        // context rank's abort came after, in answer to its own.
        assert!(c.peer_aborted(id, gen, 500, "gen"));
        // A rank that told nobody decided when it reported: nothing real reached it.
        assert!(c.peer_aborted(RequestId(6), ctx, 50, "ctx"));
        assert_eq!(
            c.violations
                .iter()
                .filter(|v| v.invariant == Invariant::I9)
                .count(),
            2
        );
    }

    #[test]
    fn an_error_refusing_a_request_info_ends_but_is_no_decision() {
        let (ctx, gen) = (peer(1, 0), peer(2, 0));
        let id = RequestId(7);
        let mut c = Checker::new(false);
        // The context rank refuses with an Error (not a give-up) at 10: the generation rank's
        // later peer-aborted is explained, and the context rank has decided nothing.
        c.abort_sent(id, (ctx, false), gen, 10);
        assert!(!c.peer_aborted(id, gen, 40, "gen"));
        assert!(c.peer_aborted(id, ctx, 40, "ctx"));
    }
}
