//! The per-rank transceiver: the cache transceiver of one rank of a context or generation
//! instance, as a sans-IO state machine.
//!
//! Drivers feed it requests (`respond_and_send`, `request_and_receive`, `cancel`), control
//! messages (`handle_message`) and time (`poll`); it drives a [`TransferAgent`] and a
//! [`Transport`] through non-blocking calls and reports what finished through the completion
//! collective (`check_context_status` / `check_gen_status`, then `apply_agreed`).
//!
//! A request is carried in *legs*: one per (context rank, generation rank) pair. A generation
//! rank asks a context rank it reads from (its `RequestInfo`) only once its receive job from
//! that rank is posted, and asks the others at once, so each context rank learns how many
//! generation ranks to expect (I10). A context rank checks the token and the block list before
//! it serves a byte (I9), then submits a send job for the ranks it serves. Only a peer with
//! authority ends a request early: one presenting the token (`Cancel`), or one the request is
//! bound to (I9). A context rank remembers the requests that ended on it (bounded), so a
//! `RequestInfo` that arrives too late gets an error at once rather than parking.
//!
//! Resource rules, each owned here:
//! - a leg in flight holds a staging slot guard and pins on its blocks; both go back when the
//!   agent's completion (the fence) arrives, never before (I1, I2, I5);
//! - an evicted leg (opt-in `inflight_cancel`) poisons its slot and keeps its pins until the
//!   fence, so the request can end at once without a late writer touching reused memory (I6);
//! - a request is reported finished to the collective only when no leg is in flight or every
//!   such leg is fenced by poison and pins (I1), and ends only when every rank agrees (I7);
//! - everything a peer can make this rank hold before proving a token is bounded in total
//!   and per peer, and expires (`early`).
//!
//! One concept per file: `admission` (registering, asking, checking a `RequestInfo`),
//! `early` (input parked for unregistered requests), `abort` (cancel, peer aborts, the one
//! failure path), `legs` (slot, pins, job, fence), `timeouts` (WARN, sender budget,
//! eviction), `heartbeats` (a peer silent without a reset; `liveness` is its table), `status` (local finish,
//! contribution, agreement), `tombstones` (ended requests), `sizes` (what each table holds, and
//! its bound),
//! `entry` (per-request state) and `events` (what drivers observe).

use crate::agent::{
    Completion, CompletionQueue, Direction, TransferAgent, TransferId, TransferJob, TransferStatus,
};
use crate::blocks::{BlockPool, BlockRef};
use crate::bugs::{Bug, BugSet};
use crate::collective::{Agreed, Contribution};
use crate::config::TransceiverConfig;
use crate::layout::CacheLayout;
use crate::plan::TransferPlan;
use crate::request::{Request, RequestState, Role};
use crate::staging::{Fence, SlotGuard, StagingCounters, StagingPool};
use crate::wire::{ErrorCode, Message, RequestInfo};
use crate::{PeerId, RequestId, TransferToken};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

mod abort;
mod admission;
mod early;
mod entry;
mod events;
mod heartbeats;
mod legs;
mod liveness;
mod outbox;
mod sizes;
mod status;
mod timeouts;
mod tombstones;

use tombstones::Tombstones;
pub use tombstones::MAX_TOMBSTONES;

pub use early::{
    EarlyCounts, MAX_EARLY_ABORTS, MAX_EARLY_ABORTS_PER_PEER, MAX_EARLY_INFOS,
    MAX_EARLY_INFO_BYTES, MAX_EARLY_INFO_BYTES_PER_PEER,
};
use early::{EarlyQueue, Parked, Refused};
use entry::{is_bound, needs, Entry, Leg, LegState};
pub use events::{FailCause, Finished, Side, StatusCheck, TxCounters, TxEvent};
use liveness::Liveness;
pub use liveness::MAX_WATCHED_PEERS;
use outbox::Outbox;
pub use outbox::{OutboxFull, Transmit, MAX_OUTBOX};
pub use sizes::{TxSizes, MAX_TIMERS_PER_REQUEST};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;

/// Legs waiting for a staging slot, at most this many per rank.
pub const MAX_SLOT_WAITERS: usize = 4096;
/// Events buffered for the driver between drains; older ones are dropped (and counted).
pub const MAX_EVENTS: usize = 65536;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TransceiverError {
    #[error("{0}: request has role {1:?}, this call needs the other role")]
    WrongRole(RequestId, Role),
    #[error("{0}: already registered")]
    Duplicate(RequestId),
    #[error("{0}: generation request has no context source")]
    NoSource(RequestId),
    #[error("{request}: {in_flight} transfers in flight, limit {limit}")]
    TooManyInFlight {
        request: RequestId,
        in_flight: usize,
        limit: usize,
    },
    #[error("{0}: request is already in a terminal state")]
    Terminal(RequestId),
}

/// Why a transceiver could not be built.
#[derive(Debug, Error)]
pub enum SetupError {
    #[error("invalid layout: {0}")]
    Layout(#[from] crate::layout::LayoutError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// Per-rank transceiver. See the module docs for the protocol and the resource rules.
#[derive(Debug)]
pub struct Transceiver {
    me: PeerId,
    layout: CacheLayout,
    config: TransceiverConfig,
    bugs: BugSet,
    agent: Arc<dyn TransferAgent>,
    outbox: Outbox,
    blocks: Arc<Mutex<BlockPool>>,
    staging: StagingPool,
    completions: CompletionQueue,
    /// Jobs in flight at most, evicted ones until their fence included: the completion
    /// queue's capacity. A leg that would exceed it waits as if for a staging slot.
    job_bound: usize,
    next_transfer: u64,
    entries: BTreeMap<RequestId, Entry>,
    transfers: HashMap<TransferId, (RequestId, u32)>,
    /// Evicted jobs until their fence: the status keeps the agent alive under the still-running
    /// writer (I3), the pins keep its blocks from reuse (I5).
    abandoned: HashMap<TransferId, (TransferStatus, Vec<BlockRef>)>,
    /// RequestInfos and aborts for requests not registered here yet.
    early: EarlyQueue,
    /// Context requests that ended here, with their tokens (bounded).
    ended: Tombstones,
    slot_waiters: VecDeque<(RequestId, u32)>,
    /// (warn time, request): the timeout wheel, popped in time order.
    timeouts: BTreeSet<(Duration, RequestId)>,
    /// Locally finished, not yet agreed: (request, ok).
    finished_local: BTreeMap<RequestId, bool>,
    /// A request finished locally since this rank's last contribution: a completion step is
    /// due now (`poll_timeout` says so), whatever the timers say.
    step_due: bool,
    step: u64,
    events: VecDeque<TxEvent>,
    counters: TxCounters,
    scratch: Vec<Completion>,
    /// Heartbeats: when each peer a live request depends on was last heard from.
    liveness: Liveness,
}

/// Everything a transceiver needs from its rank.
#[derive(Debug)]
pub struct TransceiverParts {
    pub me: PeerId,
    pub layout: CacheLayout,
    pub config: TransceiverConfig,
    pub bugs: BugSet,
    pub agent: Arc<dyn TransferAgent>,
    pub blocks: Arc<Mutex<BlockPool>>,
}

impl Transceiver {
    /// A transceiver for one rank; refuses a layout or config that does not validate, or a
    /// staging slot size they cannot make.
    pub fn new(p: TransceiverParts) -> Result<Transceiver, SetupError> {
        p.layout.validate()?;
        p.config.validate()?;
        let slot_bytes = p
            .config
            .slot_bytes_for(p.layout.block_bytes(), p.layout.tokens_per_block)?;
        let staging = StagingPool::with_bugs(p.config.staging_slots, slot_bytes, p.bugs);
        // Every job completes once, so the queue never holds more than the jobs in flight:
        // `try_start_leg` keeps those (evicted ones awaiting their fence included) under
        // `job_bound`.
        let job_bound = sizes::job_bound(&p.config);
        let completions = CompletionQueue::new(job_bound);
        Ok(Transceiver {
            me: p.me,
            layout: p.layout,
            config: p.config,
            bugs: p.bugs,
            agent: p.agent,
            outbox: Outbox::default(),
            blocks: p.blocks,
            staging,
            completions,
            job_bound,
            next_transfer: 1,
            entries: BTreeMap::new(),
            transfers: HashMap::new(),
            abandoned: HashMap::new(),
            early: EarlyQueue::default(),
            ended: Tombstones::default(),
            slot_waiters: VecDeque::new(),
            timeouts: BTreeSet::new(),
            finished_local: BTreeMap::new(),
            step_due: false,
            step: 0,
            events: VecDeque::new(),
            counters: TxCounters::default(),
            scratch: Vec::new(),
            liveness: Liveness::default(),
        })
    }

    pub fn me(&self) -> PeerId {
        self.me
    }

    pub fn layout(&self) -> &CacheLayout {
        &self.layout
    }

    pub fn staging_counters(&self) -> StagingCounters {
        self.staging.counters()
    }

    pub fn counters(&self) -> TxCounters {
        self.counters
    }

    /// Executor recycle: new jobs go to `agent`. Jobs already submitted keep their old agent
    /// alive through their statuses; it is torn down (dropped) when the last one completes.
    pub fn replace_agent(&mut self, agent: Arc<dyn TransferAgent>) {
        self.agent = agent;
    }

    /// The block pool this transceiver pins in.
    pub fn blocks(&self) -> &Arc<Mutex<BlockPool>> {
        &self.blocks
    }

    /// Requests registered and not yet ended by the collective.
    pub fn active(&self) -> usize {
        self.entries.len()
    }

    /// What is parked for requests not registered here yet (bounded: see `early`).
    pub fn early_counts(&self) -> EarlyCounts {
        self.early.counts()
    }

    /// Jobs submitted to the agent whose completion has not arrived (evicted ones included).
    pub fn jobs_in_flight(&self) -> usize {
        self.transfers.len()
    }

    /// Takes the buffered events.
    pub fn drain_events(&mut self) -> impl Iterator<Item = TxEvent> + '_ {
        self.events.drain(..)
    }

    fn emit(&mut self, e: TxEvent) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
            self.counters.events_dropped += 1;
        }
        self.events.push_back(e);
    }

    /// Feeds one control message from `from`.
    pub fn handle_message(&mut self, now: Duration, from: PeerId, msg: Message) {
        self.on_frame_from(now, from, &msg);
        match msg {
            Message::RequestInfo(info) => self.on_request_info(now, from, info),
            Message::Cancel { request, token } => {
                self.on_peer_abort(now, from, request, Some(token))
            }
            Message::Error { request, code, .. } => {
                tracing::debug!(request = %request, peer = %from, ?code, "peer reported an error");
                self.on_peer_abort(now, from, request, None)
            }
            Message::Heartbeat { .. } => {}
            Message::Data { request, .. } => {
                // Data frames belong to the host data plane, not the control plane.
                tracing::warn!(request = %request, peer = %from, "data frame on the control plane");
            }
        }
    }

    /// Time has passed (and the agent may have completed jobs): drains agent completions,
    /// then handles what is due at `now` (timeouts, expired early input, slot waits). Call it
    /// at `poll_timeout()` at the latest, and whenever the agent signals a completion.
    /// Readiness is always checked before elapsed time, so a ready transfer is never warned.
    pub fn handle_timeout(&mut self, now: Duration) {
        if self.bugs.has(Bug::WarnBeforeReady) {
            self.check_timeouts(now);
            self.drain_completions(now);
        } else {
            self.drain_completions(now);
            self.check_timeouts(now);
        }
        self.expire_early(now);
        self.serve_slot_waiters(now);
        self.check_liveness(now);
    }

    /// The connection to `peer` is gone (reset, closed, or silent past the driver's liveness
    /// bound): every request that still needs it fails now instead of waiting out a timeout:
    /// every request with an open leg to `peer` (on a generation rank, bytes still to come
    /// from that context rank; on a context rank, bytes still to go to that generation rank).
    /// A peer whose part is done ends nothing (`entry::needs`). What `peer` parked here is dropped, so a peer
    /// that reconnects under a new id cannot hold two shares.
    pub fn handle_peer_lost(&mut self, now: Duration, peer: PeerId) {
        // Completions the agent already queued count: a leg whose bytes landed before the
        // loss was heard of is done, not open.
        self.drain_completions(now);
        self.early.forget_peer(peer);
        let bound: Vec<RequestId> = self
            .entries
            .iter()
            .filter(|(_, e)| e.cause.is_none() && needs(e, peer))
            .map(|(id, _)| *id)
            .collect();
        for id in bound {
            self.abort_entry(now, id, FailCause::Unreachable);
        }
    }

    /// The driver could not send the `RequestInfo` of `request` (no connection to its context
    /// rank, or its control queue full). An info that never left means that context rank
    /// never learns of this generation rank, so the request cannot end well: it fails here
    /// now, as it does when the outbox refuses the info (`ask`), and the abort's `Cancel`
    /// tells every context rank it can still reach. (Under the lost-peer rule a context rank
    /// holding no bytes for this rank has no open leg, so its loss alone would not fail it.)
    /// A context rank the `Cancel` cannot reach either ends the request at its sender budget.
    pub fn handle_info_unsent(&mut self, now: Duration, request: RequestId) {
        let live = (self.entries.get(&request)).is_some_and(|e| e.cause.is_none());
        if live {
            self.abort_entry(now, request, FailCause::Unreachable);
        }
    }

    /// The next control message to send, oldest first. Drain it after every call.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.pop()
    }

    /// The latest instant by which `handle_timeout` (or a completion step, which runs it) must
    /// be called, if anything is waiting on time: a timeout WARN, sender budget or deadline;
    /// parked early input expiring; a leg's staging wait running out; the next heartbeat tick
    /// (`liveness`). A request finished
    /// locally since the last contribution makes a step due at once (`Duration::ZERO`), so a
    /// cancel or a lost peer handled between steps is agreed without waiting for a timer.
    /// Agent completions are not here: the agent wakes the driver.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if self.step_due {
            return Some(Duration::ZERO);
        }
        let wheel = self.timeouts.first().map(|(at, _)| *at);
        let ttl = Duration::from_millis(self.config.early_info_ttl_ms);
        let early = self.early.oldest().map(|since| since + ttl);
        let slot = self.next_slot_deadline();
        // An idle rank needs no tick: the next registration runs one (`Liveness::arm`).
        let tick = self
            .liveness
            .next_tick()
            .filter(|_| !self.entries.is_empty());
        [wheel, early, slot, tick].into_iter().flatten().min()
    }

    /// Queues a control message; a full outbox drops it (counted).
    fn transmit(&mut self, to: PeerId, msg: Message) -> Result<(), OutboxFull> {
        let r = self.outbox.push(to, msg);
        if r.is_err() {
            self.counters.transmits_dropped += 1;
        }
        r
    }
}
