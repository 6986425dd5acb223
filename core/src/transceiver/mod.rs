//! The per-rank transceiver: the cache transceiver of one rank of a context or generation
//! instance, as a sans-IO state machine.
//!
//! Drivers feed it requests (`respond_and_send`, `request_and_receive`, `cancel`), control
//! messages (`handle_message`) and time (`poll`); it drives a [`TransferAgent`] and a
//! [`Transport`] through non-blocking calls and reports what finished through the completion
//! collective (`check_context_status` / `check_gen_status`, then `apply_agreed`).
//!
//! A request is carried in *legs*: one per (context rank, generation rank) pair. The
//! generation rank sends a `RequestInfo` to every context rank of the source instance (so each
//! context rank learns how many generation ranks to expect), after it has posted the receive
//! jobs for the ranks its plan reads from. A context rank checks the token and the block list
//! before it serves a byte (I9), then submits a send job for the ranks it serves. A context
//! rank remembers the requests that ended on it (bounded), so a `RequestInfo` that arrives too
//! late gets an error at once rather than parking until a timeout.
//!
//! Resource rules, each owned here:
//! - a leg in flight holds a staging slot guard and pins on its blocks; both go back when the
//!   agent's completion (the fence) arrives, never before (I1, I2, I5);
//! - an evicted leg (opt-in `inflight_cancel`) poisons its slot and keeps its pins until the
//!   fence, so the request can end at once without a late writer touching reused memory (I6);
//! - a request is reported finished to the collective only when no leg is in flight or every
//!   such leg is fenced by poison and pins (I1), and ends only when every rank agrees (I7).

use crate::agent::{
    Completion, CompletionQueue, Direction, TransferAgent, TransferId, TransferJob, TransferStatus,
};
use crate::blocks::{BlockPool, BlockRef};
use crate::bugs::{Bug, BugSet};
use crate::collective::{agree, Agreed, CollectiveError, CompletionCollective, Contribution};
use crate::config::TransceiverConfig;
use crate::layout::CacheLayout;
use crate::plan::TransferPlan;
use crate::request::{Request, RequestState, Role};
use crate::staging::{Fence, SlotGuard, StagingCounters, StagingPool};
use crate::transport::Transport;
use crate::wire::{ErrorCode, Message, RequestInfo};
use crate::{PeerId, RequestId, TransferToken};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

mod early;
pub use early::{
    EarlyCounts, MAX_EARLY_ABORTS, MAX_EARLY_ABORTS_PER_PEER, MAX_EARLY_INFOS,
    MAX_EARLY_INFO_BYTES, MAX_EARLY_INFO_BYTES_PER_PEER,
};
use early::{EarlyQueue, Parked, Refused};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;

/// Legs waiting for a staging slot, at most this many per rank.
pub const MAX_SLOT_WAITERS: usize = 4096;
/// Events buffered for the driver between drains; older ones are dropped (and counted).
pub const MAX_EVENTS: usize = 65536;
/// Context requests remembered after they ended, so a late `RequestInfo` is answered with an
/// error instead of waiting in the early queue for a registration that never comes.
pub const MAX_TOMBSTONES: usize = 4096;

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

/// Which side of a transfer a request is on here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Context,
    Generation,
}

/// Why a request failed on this rank: the first thing that ended it. A driver's summary and the
/// simulator's progress check (I10) name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailCause {
    /// The caller cancelled it here (`cancel`).
    Cancelled,
    /// A peer ended it: a `Cancel` with the request's token, or an `Error` from a peer the
    /// request is bound to.
    PeerAborted,
    /// The agent failed a job, or refused to start one.
    Agent,
    /// No staging slot within `staging_wait_ms`, or the slot wait queue was full.
    NoSlot,
    /// The request's blocks were freed or reassigned before the transfer could pin them.
    BlocksGone,
    /// The generation side's plan or layout does not fit this rank's (no bytes can move).
    NoPlan,
    /// Past `kv_transfer_sender_future_timeout_ms`, or evicted past its deadline
    /// (`inflight_cancel`).
    Timeout,
    /// A control message the request depends on could not be sent.
    Unreachable,
}

impl FailCause {
    /// A short name for summaries and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            FailCause::Cancelled => "cancelled",
            FailCause::PeerAborted => "peer-aborted",
            FailCause::Agent => "agent",
            FailCause::NoSlot => "no-slot",
            FailCause::BlocksGone => "blocks-gone",
            FailCause::NoPlan => "no-plan",
            FailCause::Timeout => "timeout",
            FailCause::Unreachable => "unreachable",
        }
    }
}

/// What a driver may observe: for logs, metrics, traces and the simulator's checker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxEvent {
    Submitted {
        transfer: TransferId,
        request: RequestId,
        peer: PeerId,
        bytes: u64,
    },
    TransferDone {
        transfer: TransferId,
        request: RequestId,
        ok: bool,
    },
    /// The timeout WARN (I4): one per request per enqueue.
    TimeoutWarn {
        request: RequestId,
        side: Side,
        elapsed: Duration,
    },
    /// A transfer abandoned past its deadline: slot poisoned, pins kept until the fence.
    Evicted {
        transfer: TransferId,
        request: RequestId,
    },
    /// A peer's request was refused before any byte was served (I9).
    Rejected {
        peer: PeerId,
        request: RequestId,
        code: ErrorCode,
    },
    /// Finished on this rank; waits for the collective. `cause` is why it failed (None: ok).
    LocallyFinished {
        request: RequestId,
        ok: bool,
        cause: Option<FailCause>,
    },
    /// Agreed by every rank: the request is terminal and its resources may be released.
    Finished {
        request: RequestId,
        state: RequestState,
    },
}

/// Lifetime counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxCounters {
    pub transfers_started: u64,
    pub transfers_completed: u64,
    pub transfers_failed: u64,
    pub timeouts_warned: u64,
    pub evictions: u64,
    pub rejected: u64,
    pub bytes: u64,
    pub events_dropped: u64,
}

/// What `check_*_status` hands the driver for this step's collective.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusCheck {
    pub contribution: Contribution,
    /// Locally finished count reached `at_least`. The driver may wait for more events before
    /// entering the collective, but it must enter it every step either way.
    pub satisfied: bool,
}

/// A request the collective ended, with its terminal state.
#[derive(Clone, Debug)]
pub struct Finished {
    pub request: Arc<Request>,
    pub state: RequestState,
}

#[derive(Debug)]
enum LegState {
    /// Known, waiting for a staging slot since the given time; `queued` once in the wait queue.
    WaitingSlot {
        since: Duration,
        queued: bool,
    },
    InFlight {
        status: TransferStatus,
        slot: SlotGuard,
        pinned: Vec<BlockRef>,
    },
    Done,
    Failed,
    /// Evicted: slot poisoned, pins held until the agent's completion fences the job.
    Abandoned,
}

#[derive(Debug)]
struct Leg {
    peer: PeerId,
    bytes: u64,
    plan: Arc<TransferPlan>,
    remote_blocks: Vec<BlockRef>,
    state: LegState,
}

impl Leg {
    fn is_open(&self) -> bool {
        matches!(
            self.state,
            LegState::WaitingSlot { .. } | LegState::InFlight { .. }
        )
    }
}

#[derive(Debug)]
struct Entry {
    req: Arc<Request>,
    side: Side,
    enqueued_at: Duration,
    /// Legs keyed by the peer rank (generation rank on the context side and vice versa).
    legs: BTreeMap<u32, Leg>,
    /// Context side: how many generation ranks will ask (known from the first RequestInfo).
    expected_legs: Option<usize>,
    /// Set by the first abort: the request fails (or is cancelled) once no leg is open.
    cause: Option<FailCause>,
    cancelled: bool,
    reported: bool,
    /// The timeout WARN fired for this enqueue (I4 dedup).
    warned: bool,
    /// Keys of this entry in the timeout wheel, removed when it finishes.
    timeout_keys: Vec<Duration>,
}

/// Per-rank transceiver. See the module docs for the protocol and the resource rules.
#[derive(Debug)]
pub struct Transceiver {
    me: PeerId,
    layout: CacheLayout,
    config: TransceiverConfig,
    bugs: BugSet,
    agent: Arc<dyn TransferAgent>,
    transport: Arc<dyn Transport>,
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
    /// Context requests that ended here (oldest first) and their tokens: see `MAX_TOMBSTONES`.
    tombstones: VecDeque<RequestId>,
    ended: HashMap<RequestId, TransferToken>,
    slot_waiters: VecDeque<(RequestId, u32)>,
    /// (warn time, request): the timeout wheel, popped in time order.
    timeouts: BTreeSet<(Duration, RequestId)>,
    /// Locally finished, not yet agreed: (request, ok).
    finished_local: BTreeMap<RequestId, bool>,
    step: u64,
    events: VecDeque<TxEvent>,
    counters: TxCounters,
    scratch: Vec<Completion>,
}

/// Everything a transceiver needs from its rank.
#[derive(Debug)]
pub struct TransceiverParts {
    pub me: PeerId,
    pub layout: CacheLayout,
    pub config: TransceiverConfig,
    pub bugs: BugSet,
    pub agent: Arc<dyn TransferAgent>,
    pub transport: Arc<dyn Transport>,
    pub blocks: Arc<Mutex<BlockPool>>,
}

/// What a side tells its peer when it gives a request up.
fn abort_message(side: Side, id: RequestId, token: TransferToken) -> Message {
    match side {
        Side::Generation => Message::Cancel { request: id, token },
        Side::Context => Message::Error {
            request: id,
            code: ErrorCode::Cancelled,
            detail: "context side aborted the transfer".into(),
        },
    }
}

/// A peer the request is bound to may end it without presenting the token: a context rank the
/// generation side chose to read from (any rank of its source instance), or a generation rank
/// that proved the token in its `RequestInfo` (a leg's peer).
fn is_bound(e: &Entry, from: PeerId) -> bool {
    let source = e.req.source.as_ref().map(|s| s.instance);
    source == Some(from.instance) || e.legs.values().any(|l| l.peer == from)
}

fn tokens_equal(a: u128, b: u128) -> bool {
    // No early exit on the first differing byte: the comparison time says nothing.
    let x = a ^ b;
    x.to_le_bytes().iter().fold(0u8, |acc, b| acc | b) == 0
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
        let job_bound = 2 * p.config.max_in_flight + MAX_SLOT_WAITERS;
        let completions = CompletionQueue::new(job_bound);
        Ok(Transceiver {
            me: p.me,
            layout: p.layout,
            config: p.config,
            bugs: p.bugs,
            agent: p.agent,
            transport: p.transport,
            blocks: p.blocks,
            staging,
            completions,
            job_bound,
            next_transfer: 1,
            entries: BTreeMap::new(),
            transfers: HashMap::new(),
            abandoned: HashMap::new(),
            early: EarlyQueue::default(),
            tombstones: VecDeque::new(),
            ended: HashMap::new(),
            slot_waiters: VecDeque::new(),
            timeouts: BTreeSet::new(),
            finished_local: BTreeMap::new(),
            step: 0,
            events: VecDeque::new(),
            counters: TxCounters::default(),
            scratch: Vec::new(),
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

    fn register(&mut self, now: Duration, req: Arc<Request>, side: Side) {
        // An id registered again is live again (its old tombstone ages out of the queue).
        self.ended.remove(&req.id);
        let mut timeout_keys = Vec::new();
        if let Some(ms) = self.config.kv_transfer_timeout_ms {
            timeout_keys.push(now + Duration::from_millis(ms));
        }
        if side == Side::Context {
            if let Some(ms) = self.config.kv_transfer_sender_future_timeout_ms {
                // The sender's budget rides the same wheel; `check_timeouts` tells them apart.
                timeout_keys.push(now + Duration::from_millis(ms));
            }
        }
        if self.config.inflight_cancel {
            if let Some(d) = req.deadline {
                timeout_keys.push(d.max(now));
            }
        }
        for at in &timeout_keys {
            self.timeouts.insert((*at, req.id));
        }
        self.entries.insert(
            req.id,
            Entry {
                req,
                side,
                enqueued_at: now,
                legs: BTreeMap::new(),
                expected_legs: None,
                cause: None,
                cancelled: false,
                reported: false,
                warned: false,
                timeout_keys,
            },
        );
    }

    fn admit(&self, req: &Request) -> Result<(), TransceiverError> {
        if req.is_terminal() {
            return Err(TransceiverError::Terminal(req.id));
        }
        let in_flight = self.entries.len();
        if in_flight >= self.config.max_in_flight {
            return Err(TransceiverError::TooManyInFlight {
                request: req.id,
                in_flight,
                limit: self.config.max_in_flight,
            });
        }
        Ok(())
    }

    /// Context side: serve `req`'s blocks to the generation ranks that ask for them.
    pub fn respond_and_send(
        &mut self,
        now: Duration,
        req: Arc<Request>,
    ) -> Result<(), TransceiverError> {
        if req.role != Role::Context {
            return Err(TransceiverError::WrongRole(req.id, req.role));
        }
        if self.entries.contains_key(&req.id) {
            return Err(TransceiverError::Duplicate(req.id));
        }
        self.admit(&req)?;
        req.advance(RequestState::ContextTransferring)
            .map_err(|_| TransceiverError::Terminal(req.id))?;
        let (id, token) = (req.id, req.token);
        self.register(now, req, Side::Context);
        let mut aborted = false;
        for parked in self.early.take(id) {
            match parked {
                Parked::Info { from, info } => self.on_request_info(now, from, info),
                Parked::Abort { token: t, .. } => {
                    aborted |= self.bugs.has(Bug::AcceptAnyAbort)
                        || t.is_some_and(|t| tokens_equal(t.0, token.0));
                }
            }
        }
        if aborted {
            self.abort_entry(now, id, FailCause::PeerAborted);
        }
        Ok(())
    }

    /// Generation side: post receives for `req` and ask every context rank for it.
    /// Calling it again for a request that is still registered does nothing (idempotent retry).
    pub fn request_and_receive(
        &mut self,
        now: Duration,
        req: Arc<Request>,
    ) -> Result<(), TransceiverError> {
        if req.role != Role::Generation {
            return Err(TransceiverError::WrongRole(req.id, req.role));
        }
        if self.entries.contains_key(&req.id) {
            return Ok(());
        }
        let source = req
            .source
            .clone()
            .ok_or(TransceiverError::NoSource(req.id))?;
        self.admit(&req)?;
        req.advance(RequestState::GenTransferring)
            .map_err(|_| TransceiverError::Terminal(req.id))?;
        let id = req.id;
        self.register(now, req.clone(), Side::Generation);
        let pairs: Vec<(u32, u32)> = source
            .blocks
            .iter()
            .zip(&req.blocks)
            .map(|(c, g)| (*c, g.id))
            .collect();
        let plan = if source.blocks.len() != req.blocks.len() {
            None
        } else {
            TransferPlan::new(&source.layout, &self.layout, &pairs).ok()
        };
        let Some(plan) = plan else {
            tracing::warn!(request = %id, "no transfer plan between the context and this layout");
            self.abort_entry(now, id, FailCause::NoPlan);
            return Ok(());
        };
        let plan = Arc::new(plan);
        let ctx_world = source.layout.world_size();
        let sources = plan.sources();
        let entry = self.entries.get_mut(&id).expect("just registered");
        entry.expected_legs = Some(sources.len());
        for &src in &sources {
            entry.legs.insert(
                src,
                Leg {
                    peer: PeerId {
                        instance: source.instance,
                        rank: src,
                    },
                    bytes: plan.bytes_from(src),
                    plan: plan.clone(),
                    remote_blocks: source
                        .blocks
                        .iter()
                        .map(|b| BlockRef { id: *b, epoch: 0 })
                        .collect(),
                    state: LegState::WaitingSlot {
                        since: now,
                        queued: false,
                    },
                },
            );
        }
        // A context rank this rank reads from is asked only once the receive from it is posted
        // (`try_start_leg`), so no byte can arrive before there is a job to land it; the
        // others are asked now, so that each context rank learns how many ranks to expect.
        let ask_early = self.bugs.has(Bug::AskBeforePosted);
        for rank in 0..ctx_world {
            if ask_early || !sources.contains(&rank) {
                self.ask(now, id, rank);
            }
        }
        for &src in &sources {
            self.try_start_leg(now, id, src);
        }
        self.check_finished(id);
        Ok(())
    }

    /// Generation side: sends the request's `RequestInfo` to context rank `ctx_rank`. A request
    /// whose info cannot be sent fails: that context rank would never serve it.
    fn ask(&mut self, now: Duration, id: RequestId, ctx_rank: u32) {
        let Some(e) = self.entries.get(&id) else {
            return;
        };
        let source = e
            .req
            .source
            .as_ref()
            .expect("a generation request has a source");
        let to = PeerId {
            instance: source.instance,
            rank: ctx_rank,
        };
        let info = RequestInfo {
            request: id,
            token: e.req.token,
            gen_layout: self.layout,
            ctx_blocks: source.blocks.clone(),
            gen_blocks: e.req.blocks.clone(),
        };
        if let Err(err) = self.transport.send(to, Message::RequestInfo(info)) {
            tracing::warn!(request = %id, peer = %to, error = %err, "request info not sent");
            self.abort_entry(now, id, FailCause::Unreachable);
        }
    }

    /// Cancels a request. Legs not started end at once; legs in flight are asked to stop and
    /// end at their fence, or at once with `inflight_cancel` (slot poisoned, pins kept).
    /// Returns false if the request is unknown here.
    pub fn cancel(&mut self, now: Duration, id: RequestId) -> bool {
        let Some(e) = self.entries.get_mut(&id) else {
            return false;
        };
        e.cancelled = true;
        self.abort_entry(now, id, FailCause::Cancelled);
        true
    }

    /// Feeds one control message from `from`.
    pub fn handle_message(&mut self, now: Duration, from: PeerId, msg: Message) {
        match msg {
            Message::RequestInfo(info) => self.on_request_info(now, from, info),
            Message::Cancel { request, token } => {
                self.on_peer_abort(now, from, request, Some(token))
            }
            Message::Error { request, code, .. } => {
                tracing::warn!(request = %request, peer = %from, ?code, "peer reported an error");
                self.on_peer_abort(now, from, request, None)
            }
            Message::Ready { .. } | Message::Done { .. } | Message::Heartbeat { .. } => {}
            Message::Data { request, .. } => {
                // Data frames belong to the host data plane, not the control plane.
                tracing::warn!(request = %request, peer = %from, "data frame on the control plane");
            }
        }
    }

    /// Answers early infos whose request has not registered within `early_info_ttl_ms`: the
    /// asking ranks fail now instead of waiting for a request this rank may never see. Early
    /// aborts of the same age are dropped.
    fn expire_early(&mut self, now: Duration) {
        let ttl = Duration::from_millis(self.config.early_info_ttl_ms);
        for (id, parked) in self.early.expire(now, ttl) {
            for p in parked {
                if let Parked::Info { from, .. } = p {
                    self.reject(
                        from,
                        id,
                        ErrorCode::UnknownRequest,
                        "not registered here within early_info_ttl_ms",
                    );
                }
            }
        }
    }

    /// Refuses the RequestInfo of a peer that presented the request's token, and fails the
    /// request: see `on_request_info`.
    fn refuse_and_fail(
        &mut self,
        now: Duration,
        from: PeerId,
        id: RequestId,
        code: ErrorCode,
        detail: &str,
    ) {
        self.reject(from, id, code, detail);
        self.abort_entry(now, id, FailCause::NoPlan);
    }

    fn reject(&mut self, from: PeerId, request: RequestId, code: ErrorCode, detail: &str) {
        tracing::warn!(request = %request, peer = %from, ?code, detail, "refusing request info");
        self.counters.rejected += 1;
        self.emit(TxEvent::Rejected {
            peer: from,
            request,
            code,
        });
        let _ = self.transport.send(
            from,
            Message::Error {
                request,
                code,
                detail: detail.to_string(),
            },
        );
    }

    fn on_request_info(&mut self, now: Duration, from: PeerId, info: RequestInfo) {
        let id = info.request;
        let Some(entry) = self.entries.get(&id) else {
            if let Some(token) = self.ended.get(&id) {
                // The request ended before this peer asked (e.g. cancelled first): say so, so
                // the generation side fails now instead of waiting out its timeout. A peer
                // without the token learns nothing more than for any other request.
                let (code, detail) = if tokens_equal(info.token.0, token.0) {
                    (ErrorCode::Cancelled, "request already ended here")
                } else {
                    (ErrorCode::BadToken, "transfer token mismatch")
                };
                self.reject(from, id, code, detail);
                return;
            }
            let detail = match self.early.park_info(now, from, info) {
                Ok(()) => return,
                Err(Refused::Full) => "too many early requests",
                Err(Refused::PeerShare) => "this peer's early requests exceed its share",
            };
            self.reject(from, id, ErrorCode::Busy, detail);
            return;
        };
        if entry.side != Side::Context {
            self.reject(from, id, ErrorCode::UnknownRequest, "not a context request");
            return;
        }
        if !self.bugs.has(Bug::SkipTokenCheck) && !tokens_equal(info.token.0, entry.req.token.0) {
            self.reject(from, id, ErrorCode::BadToken, "transfer token mismatch");
            return;
        }
        // Past the token check the asker is the request's own generation rank: if its info
        // cannot be served, that rank never gets its bytes, so the request fails here too
        // (it would otherwise wait for a leg that never comes; the asker, told why, fails).
        let own: Vec<u32> = entry.req.blocks.iter().map(|b| b.id).collect();
        if info.ctx_blocks != own || info.gen_blocks.len() != own.len() {
            self.refuse_and_fail(
                now,
                from,
                id,
                ErrorCode::ForeignBlocks,
                "blocks are not the request's",
            );
            return;
        }
        // The layout came off the wire: validate it before any arithmetic on its fields.
        if let Err(e) = info.gen_layout.validate() {
            let detail = format!("invalid generation layout: {e}");
            self.refuse_and_fail(now, from, id, ErrorCode::Layout, &detail);
            return;
        }
        let gen_rank = info.gen_layout.rank();
        if entry.legs.contains_key(&gen_rank) {
            return; // a retried RequestInfo: already known
        }
        if entry.cause.is_some() || entry.cancelled {
            self.reject(
                from,
                id,
                ErrorCode::Cancelled,
                "request already failed here",
            );
            return;
        }
        let pairs: Vec<(u32, u32)> = own
            .iter()
            .zip(&info.gen_blocks)
            .map(|(c, g)| (*c, g.id))
            .collect();
        let plan = match TransferPlan::new(&self.layout, &info.gen_layout, &pairs) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                self.refuse_and_fail(now, from, id, ErrorCode::Layout, &e.to_string());
                return;
            }
        };
        let bytes = plan.bytes_from(self.me.rank);
        let entry = self.entries.get_mut(&id).expect("checked");
        entry.expected_legs = Some(info.gen_layout.world_size() as usize);
        let state = if bytes == 0 {
            LegState::Done
        } else {
            LegState::WaitingSlot {
                since: now,
                queued: false,
            }
        };
        entry.legs.insert(
            gen_rank,
            Leg {
                peer: from,
                bytes,
                plan,
                remote_blocks: info.gen_blocks,
                state,
            },
        );
        if bytes > 0 {
            let _ = self.transport.send(
                from,
                Message::Ready {
                    request: id,
                    ctx_rank: self.me.rank,
                },
            );
            self.try_start_leg(now, id, gen_rank);
        }
        self.check_finished(id);
    }

    /// A peer asks to end `id`. Only a peer with authority over the request can (I9): one that
    /// presents its token (`Cancel`), or, for an `Error` (no token), a peer the request is
    /// bound to (see `is_bound`). Aborts for requests not registered yet are parked, bounded and
    /// expiring, and end the request on registration only if their token is its own.
    fn on_peer_abort(
        &mut self,
        now: Duration,
        from: PeerId,
        id: RequestId,
        token: Option<TransferToken>,
    ) {
        if self.ended.contains_key(&id) {
            return; // already over here: nothing to stop, nothing to remember
        }
        let any = self.bugs.has(Bug::AcceptAnyAbort);
        let Some(e) = self.entries.get(&id) else {
            if token.is_some() || any {
                if let Err(why) = self.early.park_abort(now, from, id, token) {
                    tracing::warn!(request = %id, peer = %from, ?why, "early abort dropped");
                }
            }
            return;
        };
        let proven = match token {
            Some(t) => tokens_equal(t.0, e.req.token.0),
            None => is_bound(e, from),
        };
        if !proven && !any {
            tracing::warn!(request = %id, peer = %from, "abort without authority ignored");
            return;
        }
        self.abort_entry(now, id, FailCause::PeerAborted);
    }

    /// Fails or cancels an entry: stops its open legs (evicting them with inflight_cancel).
    fn abort_entry(&mut self, _now: Duration, id: RequestId, cause: FailCause) {
        let evict = self.config.inflight_cancel;
        let release_early = self.bugs.has(Bug::ReleaseEarly);
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        // Peers hear of an abort once. Telling them again on every echo would make two sides
        // whose legs are both still fencing bounce Cancel and Error at each other forever.
        let first_abort = e.cause.is_none();
        e.cause.get_or_insert(cause);
        if cause == FailCause::Cancelled {
            e.cancelled = true;
        }
        let side = e.side;
        let token = e.req.token;
        let source = e
            .req
            .source
            .as_ref()
            .map(|s| (s.instance, s.layout.world_size()));
        let mut notify: Vec<PeerId> = Vec::new();
        let mut evicted: Vec<(TransferStatus, Vec<BlockRef>)> = Vec::new();
        for leg in e.legs.values_mut() {
            match std::mem::replace(&mut leg.state, LegState::Failed) {
                LegState::WaitingSlot { .. } => notify.push(leg.peer),
                LegState::InFlight {
                    status,
                    slot,
                    pinned,
                } => {
                    status.cancel();
                    notify.push(leg.peer);
                    if evict {
                        slot.poison(Fence(status.id().0));
                        evicted.push((status, pinned));
                        leg.state = LegState::Abandoned;
                    } else if release_early {
                        // The historical bug: resources go back while the transfer runs.
                        self.blocks.lock().expect("block pool lock").unpin(&pinned);
                        drop(slot);
                        leg.state = LegState::Abandoned;
                    } else {
                        leg.state = LegState::InFlight {
                            status,
                            slot,
                            pinned,
                        };
                    }
                }
                other => leg.state = other,
            }
        }
        for (status, pinned) in evicted {
            let tid = status.id();
            self.counters.evictions += 1;
            self.abandoned.insert(tid, (status, pinned));
            self.emit(TxEvent::Evicted {
                transfer: tid,
                request: id,
            });
        }
        if release_early {
            // Forget the jobs: their fences will find nothing to release.
            self.transfers.retain(|_, (r, _)| *r != id);
        }
        self.slot_waiters.retain(|(r, _)| *r != id);
        if let Some(source) = source {
            // A generation rank tells every context rank of its source, asked or not yet
            // asked: its Cancel carries the token, so each can end the request at once.
            notify = (0..source.1)
                .map(|rank| PeerId {
                    instance: source.0,
                    rank,
                })
                .collect();
        }
        if first_abort {
            for peer in notify {
                let _ = self.transport.send(peer, abort_message(side, id, token));
            }
        }
        self.check_finished(id);
    }

    fn try_start_leg(&mut self, now: Duration, id: RequestId, key: u32) {
        let Some(e) = self.entries.get(&id) else {
            return;
        };
        let leg = &e.legs[&key];
        let LegState::WaitingSlot { queued, .. } = leg.state else {
            return;
        };
        let want = leg.bytes.min(self.staging.slot_bytes());
        let slot = if self.transfers.len() >= self.job_bound {
            None
        } else if self.config.staging_fallback {
            Some(self.staging.acquire_or_fallback(want))
        } else {
            self.staging.try_acquire(want).ok()
        };
        let Some(slot) = slot else {
            if !queued {
                if self.slot_waiters.len() >= MAX_SLOT_WAITERS {
                    tracing::warn!(request = %id, "staging wait queue full");
                    self.abort_entry(now, id, FailCause::NoSlot);
                } else {
                    self.slot_waiters.push_back((id, key));
                    let e = self.entries.get_mut(&id).expect("checked");
                    if let Some(LegState::WaitingSlot { queued, .. }) =
                        e.legs.get_mut(&key).map(|l| &mut l.state)
                    {
                        *queued = true;
                    }
                }
            }
            return;
        };
        let local = e.req.blocks.clone();
        let pinned = {
            let mut pool = self.blocks.lock().expect("block pool lock");
            match pool.pin(&local) {
                Ok(()) => local.clone(),
                Err(err) => {
                    drop(pool);
                    tracing::warn!(request = %id, error = %err, "blocks gone before transfer");
                    drop(slot);
                    self.abort_entry(now, id, FailCause::BlocksGone);
                    return;
                }
            }
        };
        let tid = TransferId(self.next_transfer);
        self.next_transfer += 1;
        let leg = &e.legs[&key];
        let side = e.side;
        let direction = match e.side {
            Side::Context => Direction::Send { to: leg.peer },
            Side::Generation => Direction::Receive { from: leg.peer },
        };
        let job = TransferJob {
            id: tid,
            request: id,
            token: e.req.token,
            direction,
            plan: leg.plan.clone(),
            local_blocks: local,
            remote_blocks: leg.remote_blocks.clone(),
            bytes: leg.bytes,
            staging: slot.buffer().clone(),
        };
        let (peer, bytes) = (leg.peer, leg.bytes);
        match TransferStatus::submit(&self.agent, job, &self.completions) {
            Ok(status) => {
                self.transfers.insert(tid, (id, key));
                self.counters.transfers_started += 1;
                let e = self.entries.get_mut(&id).expect("checked");
                e.legs.get_mut(&key).expect("checked").state = LegState::InFlight {
                    status,
                    slot,
                    pinned,
                };
                self.emit(TxEvent::Submitted {
                    transfer: tid,
                    request: id,
                    peer,
                    bytes,
                });
                if side == Side::Generation && !self.bugs.has(Bug::AskBeforePosted) {
                    self.ask(now, id, key);
                }
            }
            Err(err) => {
                tracing::warn!(request = %id, peer = %peer, error = %err, "agent refused the job");
                self.blocks.lock().expect("block pool lock").unpin(&pinned);
                drop(slot);
                let e = self.entries.get_mut(&id).expect("checked");
                e.legs.get_mut(&key).expect("checked").state = LegState::Failed;
                self.abort_entry(now, id, FailCause::Agent);
            }
        }
    }

    /// Drains agent completions, starts legs waiting for slots, then handles timeouts.
    /// Readiness is always checked before elapsed time, so a ready transfer is never warned.
    pub fn poll(&mut self, now: Duration) {
        if self.bugs.has(Bug::WarnBeforeReady) {
            self.check_timeouts(now);
            self.drain_completions(now);
        } else {
            self.drain_completions(now);
            self.check_timeouts(now);
        }
        self.expire_early(now);
        self.serve_slot_waiters(now);
    }

    fn drain_completions(&mut self, now: Duration) {
        let mut done = std::mem::take(&mut self.scratch);
        self.completions.drain_into(&mut done);
        for c in done.drain(..) {
            self.on_completion(now, c);
        }
        self.scratch = done;
    }

    fn on_completion(&mut self, now: Duration, c: Completion) {
        if let Some((_status, pinned)) = self.abandoned.remove(&c.id) {
            // The fence of an evicted job: its writer is gone, so its agent may go too.
            self.transfers.remove(&c.id);
            self.staging.fence_passed(Fence(c.id.0));
            self.blocks.lock().expect("block pool lock").unpin(&pinned);
            self.serve_slot_waiters(now);
            return;
        }
        let Some((id, key)) = self.transfers.remove(&c.id) else {
            return; // forgotten by the release-early bug
        };
        let ok = c.result.is_ok();
        self.emit(TxEvent::TransferDone {
            transfer: c.id,
            request: id,
            ok,
        });
        let leak = !ok && self.bugs.has(Bug::LeakSlotOnError);
        let e = self.entries.get_mut(&id).expect("transfer of a live entry");
        let leg = e.legs.get_mut(&key).expect("transfer of a live leg");
        let prev = std::mem::replace(
            &mut leg.state,
            if ok && e.cause.is_none() {
                LegState::Done
            } else {
                LegState::Failed
            },
        );
        let LegState::InFlight { slot, pinned, .. } = prev else {
            panic!("completion for leg in state {prev:?}");
        };
        self.blocks.lock().expect("block pool lock").unpin(&pinned);
        if leak {
            #[cfg(feature = "bug-switches")]
            slot.leak();
            #[cfg(not(feature = "bug-switches"))]
            drop(slot);
        } else {
            drop(slot);
        }
        let side = e.side;
        let token = e.req.token;
        let peer = leg.peer;
        match c.result {
            Ok(bytes) => {
                self.counters.transfers_completed += 1;
                self.counters.bytes += bytes;
                if side == Side::Context {
                    let _ = self.transport.send(
                        peer,
                        Message::Done {
                            request: id,
                            ctx_rank: self.me.rank,
                            bytes,
                            crc: 0,
                        },
                    );
                }
            }
            Err(err) => {
                self.counters.transfers_failed += 1;
                tracing::warn!(request = %id, peer = %peer, error = %err, "transfer failed");
                // The peer of the failed leg must hear it: its side cannot tell a slow sender
                // from a dead one. Peers of still-open legs are told by `abort_entry`.
                let _ = self.transport.send(peer, abort_message(side, id, token));
                self.abort_entry(now, id, FailCause::Agent);
            }
        }
        self.serve_slot_waiters(now);
        self.check_finished(id);
    }

    fn serve_slot_waiters(&mut self, now: Duration) {
        let wait = Duration::from_millis(self.config.staging_wait_ms);
        while let Some(&(id, key)) = self.slot_waiters.front() {
            let since = match self.entries.get(&id).and_then(|e| e.legs.get(&key)) {
                Some(Leg {
                    state: LegState::WaitingSlot { since, .. },
                    ..
                }) => *since,
                _ => {
                    self.slot_waiters.pop_front();
                    continue;
                }
            };
            if now.saturating_sub(since) > wait {
                self.slot_waiters.pop_front();
                tracing::warn!(request = %id, "no staging slot within staging_wait_ms");
                self.abort_entry(now, id, FailCause::NoSlot);
                continue;
            }
            if !self.can_start_job() {
                return;
            }
            self.slot_waiters.pop_front();
            self.try_start_leg(now, id, key);
        }
    }

    /// A job could start now: under the job bound, with a staging slot (or the fallback).
    fn can_start_job(&self) -> bool {
        self.transfers.len() < self.job_bound
            && (self.config.staging_fallback || self.staging.counters().free > 0)
    }

    fn check_timeouts(&mut self, now: Duration) {
        while let Some(&(at, id)) = self.timeouts.first() {
            if at > now {
                break;
            }
            self.timeouts.pop_first();
            let Some(e) = self.entries.get_mut(&id) else {
                continue;
            };
            // Pending until locally finished: a context rank whose known legs are done but
            // which still expects another generation rank is waiting too.
            if e.reported {
                continue;
            }
            let side = e.side;
            let elapsed = now.saturating_sub(e.enqueued_at);
            let deadline_passed = e.req.deadline.is_some_and(|d| now >= d);
            let already_warned = std::mem::replace(&mut e.warned, true);
            let sender_budget = self
                .config
                .kv_transfer_sender_future_timeout_ms
                .map(Duration::from_millis);
            let warn_budget = self
                .config
                .kv_transfer_timeout_ms
                .map(Duration::from_millis);
            let warn_due = warn_budget.is_some_and(|b| elapsed >= b);
            if !warn_due {
                // Not this entry's warn key (a deadline or the sender budget): keep the flag.
                self.entries.get_mut(&id).expect("checked").warned = already_warned;
            }
            if warn_due && (!already_warned || self.bugs.has(Bug::WarnNoDedup)) {
                tracing::warn!(
                    request = %id,
                    side = ?side,
                    elapsed_ms = elapsed.as_millis() as u64,
                    "KV cache transfer still pending past kv_transfer_timeout_ms"
                );
                self.counters.timeouts_warned += 1;
                self.emit(TxEvent::TimeoutWarn {
                    request: id,
                    side,
                    elapsed,
                });
                if self.bugs.has(Bug::WarnNoDedup) {
                    // The historical bug: warn again at every later poll.
                    self.timeouts.insert((now + Duration::from_millis(1), id));
                }
            }
            let sender_expired =
                side == Side::Context && sender_budget.is_some_and(|b| elapsed >= b);
            if (self.config.inflight_cancel && (warn_due || deadline_passed)) || sender_expired {
                self.abort_entry(now, id, FailCause::Timeout);
            }
        }
    }

    /// Marks the entry locally finished when no leg is open and every expected leg is known.
    fn check_finished(&mut self, id: RequestId) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        if e.reported {
            return;
        }
        let open = e.legs.values().any(|l| l.is_open());
        let all_known = e.expected_legs.is_some_and(|n| e.legs.len() >= n);
        let done = !open && (all_known || e.cause.is_some());
        if !done {
            return;
        }
        let ok = e.cause.is_none() && e.legs.values().all(|l| matches!(l.state, LegState::Done));
        let cause = if ok {
            None
        } else {
            // Every failed leg set a cause on the way (abort_entry); a leg cannot fail alone.
            Some(e.cause.expect("a failed request has a cause"))
        };
        e.reported = true;
        for at in std::mem::take(&mut e.timeout_keys) {
            self.timeouts.remove(&(at, id));
        }
        self.finished_local.insert(id, ok);
        self.emit(TxEvent::LocallyFinished {
            request: id,
            ok,
            cause,
        });
    }

    fn status(&mut self, now: Duration, side: Side, at_least: usize) -> StatusCheck {
        self.poll(now);
        self.step += 1;
        let mut c = Contribution {
            rank: self.me.rank,
            step: self.step,
            done: Vec::new(),
            failed: Vec::new(),
        };
        for (id, ok) in &self.finished_local {
            if self.entries.get(id).is_some_and(|e| e.side == side) {
                if *ok {
                    c.done.push(*id);
                } else {
                    c.failed.push(*id);
                }
            }
        }
        let satisfied = c.done.len() + c.failed.len() >= at_least;
        StatusCheck {
            contribution: c,
            satisfied,
        }
    }

    /// Context side: progress, then this rank's contribution to the step's collective.
    pub fn check_context_status(&mut self, now: Duration, at_least: usize) -> StatusCheck {
        self.status(now, Side::Context, at_least)
    }

    /// Generation side: progress, then this rank's contribution to the step's collective.
    pub fn check_gen_status(&mut self, now: Duration, at_least: usize) -> StatusCheck {
        self.status(now, Side::Generation, at_least)
    }

    fn bury(&mut self, id: RequestId, token: TransferToken) {
        if self.tombstones.len() >= MAX_TOMBSTONES {
            if let Some(old) = self.tombstones.pop_front() {
                self.ended.remove(&old);
            }
        }
        self.tombstones.push_back(id);
        self.ended.insert(id, token);
    }

    /// Applies what every rank agreed: those requests reach their terminal state here.
    pub fn apply_agreed(&mut self, agreed: &Agreed) -> Vec<Finished> {
        let mut out = Vec::new();
        let ids = agreed
            .completed
            .iter()
            .map(|id| (*id, true))
            .chain(agreed.failed.iter().map(|id| (*id, false)));
        for (id, ok) in ids {
            let Some(e) = self.entries.remove(&id) else {
                continue;
            };
            assert!(
                self.finished_local.remove(&id).is_some(),
                "{id} agreed before this rank finished it"
            );
            let state = match (ok, e.side, e.cancelled) {
                (true, Side::Context, _) => RequestState::ContextComplete,
                (true, Side::Generation, _) => RequestState::GenComplete,
                (false, _, true) => RequestState::Cancelled,
                (false, _, false) => RequestState::TransferError,
            };
            e.req
                .advance(state)
                .expect("a request reaches exactly one terminal state");
            if e.side == Side::Context {
                self.bury(id, e.req.token);
            }
            self.emit(TxEvent::Finished { request: id, state });
            out.push(Finished {
                request: e.req,
                state,
            });
        }
        out
    }

    /// One whole completion step for `side`: status check, collective, agreement.
    /// Every rank must call this every step, with or without anything to report (I7).
    pub async fn completion_step<C: CompletionCollective>(
        &mut self,
        now: Duration,
        side: Side,
        world: usize,
        collective: &mut C,
    ) -> Result<Vec<Finished>, CollectiveError> {
        let check = self.status(now, side, 0);
        if self.bugs.has(Bug::SkipIdleCollective)
            && check.contribution.done.is_empty()
            && check.contribution.failed.is_empty()
        {
            // The historical bug: an idle rank returns before the collective.
            return Ok(Vec::new());
        }
        let all = collective.all_gather(check.contribution).await?;
        let agreed = agree(&all, world)?;
        Ok(self.apply_agreed(&agreed))
    }
}
