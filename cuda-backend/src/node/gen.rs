//! The gen (decode) role in load mode: each of its ranks dials each rank of the ctx node
//! (reconnecting with bounded backoff), rank 0 asks ctx rank 0 for synthetic requests, every
//! rank receives its share of each through `request_and_receive`, every byte is verified, and
//! a summary comes back.

use super::admit::SeatSignals;
use super::backend::BackendSpec;
use super::conn::{Attach, Delivery, Inbound, ReadDeadlines};
use super::cpu;
use super::frame::{Answer, Ask, Frame, NodeFrame, MAX_PREPARE_ASKS};
use super::instance::Instance;
use super::rank::{Occupancy, Rank};
use super::spec::{NodeSpec, CTX_INSTANCE};
use super::{drain_inbox, sleep_until, NodeError, OwnedTask, INBOX};
use kvferry_core::layout::CacheLayout;
use kvferry_core::request::{ContextSource, Request, RequestState};
use kvferry_core::transceiver::{Finished, Side, TxEvent};
use kvferry_core::wire::Message;
use kvferry_core::{PeerId, RequestId, TransferToken};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::Span;

/// Consecutive failed connects before the gen gives the ctx up, once it had been connected
/// (a restarting ctx gets about half a minute).
pub const MAX_RECONNECT_ATTEMPTS: u32 = 40;
/// Failed connects before the first connection succeeds: an address where nothing listens is
/// a mistake to report in seconds, not a restart to wait out.
pub const MAX_FIRST_CONNECT_ATTEMPTS: u32 = 6;
/// First reconnect delay; doubles per failure up to `RECONNECT_MAX`.
const RECONNECT_BASE: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// Distinct error causes kept in a summary; the rest are counted as "other".
const MAX_ERROR_KINDS: usize = 16;
/// After the last request ends, how long to wait for late fences before summarising.
const FINAL_DRAIN: Duration = Duration::from_secs(5);
/// How long hanging up may take: the writer's flush, then the reader's wait for the ctx's FIN
/// (`conn::FLUSH_ON_CLOSE` each).
const HANG_UP: Duration = Duration::from_secs(2);
/// How long a CUDA gen waits for its ctx's pool after connecting. A ctx sends it first thing,
/// so only a ctx on another backend (or not a kvferry ctx) keeps it waiting.
const POOL_WAIT: Duration = Duration::from_secs(15);
/// After a busy answer (`Answer::Busy`), the gen asks again when one of its requests ends, or
/// after this long when none does (the ctx's room may be held by other gens).
const BUSY_BACKOFF: Duration = Duration::from_millis(5);
/// A launch the ctx keeps answering busy for this long fails with the ctx's reason: a ctx
/// that is always busy cannot hold a load forever.
const MAX_BUSY_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The ctx instance's ranks' addresses, in rank order.
    pub peers: Vec<SocketAddr>,
    pub requests: u64,
    pub concurrency: usize,
    pub min_blocks: u32,
    pub max_blocks: u32,
    pub seed: u64,
    /// Recompute and compare every received byte.
    pub verify: bool,
    /// Print progress on stderr this often (None: never).
    pub progress: Option<Duration>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub requests: u64,
    pub done: u64,
    pub failed: u64,
    /// Never started because the ctx was given up.
    pub skipped: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub throughput_mib_s: f64,
    /// CPU seconds this process spent per GiB moved, over the same window (in `bench`, both
    /// nodes live in this process); `None` when no byte moved.
    pub cpu_s_per_gib: Option<f64>,
    /// The same CPU time in seconds, whatever moved.
    pub cpu_seconds: f64,
    /// Latency percentiles of the requests that completed; `None` when none did.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Failure causes and how many requests each ended.
    pub errors: BTreeMap<String, u64>,
    pub reconnects: u64,
    pub done_after_reconnect: u64,
    /// Why the gen gave the ctx up, if it did (then `skipped` counts what never started).
    pub gave_up: Option<String>,
    pub staging_slots: usize,
    pub staging_free: usize,
    pub staging_poisoned: usize,
    pub blocks_total: usize,
    pub blocks_free: usize,
    /// The backend's own counters (`Backend::counters`).
    pub backend: BTreeMap<String, u64>,
    /// Asks the ctx answered busy (each asked again, or failed past `MAX_BUSY_WAIT`).
    pub busy_answers: u64,
    /// Asks unanswered when their connection was lost, asked again after the reconnect.
    pub asks_repeated: u64,
}

#[derive(Debug)]
struct Launch {
    blocks: u32,
    seed: u64,
    /// The first ask: latency counts from here, busy answers included.
    at: Instant,
    /// The first busy answer, if the ctx gave one.
    busy_since: Option<Instant>,
}

#[derive(Debug)]
struct Active {
    seed: u64,
    at: Instant,
    span: Span,
    cause: Option<String>,
    /// The ranks that registered the request (all of them, or it was not started).
    ranks: usize,
    /// Its end on each rank so far; agreement ends it on every rank in one step.
    ended: Vec<(usize, Finished)>,
}

/// A connection of the instance: the local (gen) rank and the ctx rank it reaches.
type ConnId = (usize, u32);

#[derive(Debug)]
struct GenNode {
    inst: Instance,
    opts: LoadOptions,
    rng: StdRng,
    /// Connections up and ready to carry requests (a CUDA gen's: with the ctx's pool mapped).
    ready: HashSet<ConnId>,
    /// Connections up and waiting for their ctx rank's CUDA pool, since when.
    pool_wait: HashMap<ConnId, Instant>,
    /// A connection went down since the last one came up: the next `Up` is a reconnect.
    lost_since_up: bool,
    launched: u64,
    next_tag: u64,
    pending: HashMap<u64, Launch>,
    /// Launches to ask again before new ones: answered busy, or their `Prepare` not sent (at
    /// most `concurrency` with `pending` and `active`).
    retry: VecDeque<Launch>,
    /// No asks before this (set by a busy answer, cleared when a request ends).
    busy_until: Option<Instant>,
    active: HashMap<RequestId, Active>,
    /// Blocks promised to pending launches, so a `Prepared` always finds its blocks.
    reserved: usize,
    s: Summary,
    latencies_us: Vec<u64>,
    scratch: Vec<u8>,
}

/// Runs the load with a host-memory instance and returns its summary once every request has
/// ended.
pub async fn run(spec: NodeSpec, opts: LoadOptions) -> Result<Summary, NodeError> {
    let instance = super::spec::GEN_INSTANCE_BASE;
    let inst = Instance::uniform(instance, Side::Generation, &spec, BackendSpec::Host)
        .expect("the host backend cannot fail to build");
    run_with(inst, opts).await
}

impl GenNode {
    fn new(inst: Instance, opts: LoadOptions) -> GenNode {
        GenNode {
            rng: StdRng::seed_from_u64(opts.seed),
            s: Summary {
                requests: opts.requests,
                ..Summary::default()
            },
            inst,
            opts,
            ready: HashSet::new(),
            pool_wait: HashMap::new(),
            lost_since_up: false,
            launched: 0,
            next_tag: 0,
            pending: HashMap::new(),
            retry: VecDeque::new(),
            busy_until: None,
            active: HashMap::new(),
            reserved: 0,
            latencies_us: Vec::new(),
            scratch: Vec::new(),
        }
    }
}

/// The peer id of ctx rank `rank`.
fn ctx_peer(rank: u32) -> PeerId {
    PeerId {
        instance: CTX_INSTANCE,
        rank,
    }
}

/// As `run`, with an instance built by the caller (to share its metrics, or on another
/// backend).
pub async fn run_with(inst: Instance, opts: LoadOptions) -> Result<Summary, NodeError> {
    let (inbox_tx, mut inbox) = mpsc::channel(INBOX);
    // Owned: the dialers and their connections end with this load, however it ends.
    let mut dialers = Vec::new();
    for rank in &inst.ranks {
        for (r, addr) in opts.peers.iter().enumerate() {
            let a = Attach::new(rank, inbox_tx.clone());
            let task = dial_loop(*addr, ctx_peer(r as u32), a);
            dialers.push(OwnedTask(tokio::spawn(task)));
        }
    }
    drop(inbox_tx);
    let mut node = GenNode::new(inst, opts);
    let started = Instant::now();
    let cpu_started = cpu::process_cpu();
    let mut progress = Progress::new(node.opts.progress);
    let wake = node.inst.wake.clone();
    let mut drain_until: Option<Instant> = None;
    loop {
        tokio::select! {
            ev = inbox.recv() => {
                if let Some(ev) = ev {
                    node.on_inbound(ev);
                }
                drain_inbox(&mut inbox, |ev| node.on_inbound(ev));
            }
            _ = wake.notified() => {}
            _ = sleep_until(node.next_wake(&progress, drain_until)) => {}
        }
        let stepped = node.inst.step()?;
        node.on_events(&stepped.events);
        for (r, f) in stepped.finished {
            node.on_finished(r, f);
        }
        node.check_pool_wait();
        node.launch_more();
        node.inst.update_metrics();
        progress.maybe_print(&node.s, node.pending.len() + node.active.len());
        if node.all_ended() {
            let deadline = *drain_until.get_or_insert_with(|| Instant::now() + FINAL_DRAIN);
            let o = node.inst.occupancy();
            let quiet = node.inst.jobs_in_flight() == 0 && o.staging_poisoned == 0;
            if quiet || Instant::now() >= deadline {
                break;
            }
        }
    }
    let (elapsed, cpu_time) = (started.elapsed(), cpu::process_cpu() - cpu_started);
    node.hang_up(&mut inbox).await;
    drop(dialers);
    progress.finish(&node.s);
    Ok(node.summarize(elapsed, cpu_time))
}

/// Dials `addr` (the ctx `peer`) for the driver behind `a`, reconnecting with bounded backoff;
/// tells the driver `GaveUp` when the attempts run out.
pub async fn dial_loop(addr: SocketAddr, peer: PeerId, a: Attach) {
    let mut failures: u32 = 0;
    let mut ever_connected = false;
    loop {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                failures = 0;
                ever_connected = true;
                // A host ctx says nothing until asked (or its first heartbeat): the gen holds
                // it to the idle deadline from the start.
                let deadlines = ReadDeadlines {
                    first_frame: a.limits.idle(),
                    idle: a.limits.idle(),
                };
                let seat = SeatSignals::default();
                let Some(conn) = a.up(stream, (peer, addr), deadlines, seat).await else {
                    return;
                };
                if !conn.run().await {
                    return;
                }
                tokio::time::sleep(RECONNECT_BASE).await;
            }
            Err(e) => {
                failures += 1;
                let budget = if ever_connected {
                    MAX_RECONNECT_ATTEMPTS
                } else {
                    MAX_FIRST_CONNECT_ATTEMPTS
                };
                if failures >= budget {
                    let reason = format!("{addr}: {e} ({failures} attempts)");
                    let _ = a.inbox.send(Inbound::GaveUp { peer, reason }).await;
                    return;
                }
                let backoff = RECONNECT_BASE * 2u32.saturating_pow(failures.min(16));
                tokio::time::sleep(backoff.min(RECONNECT_MAX)).await;
            }
        }
    }
}

impl GenNode {
    fn rank(&self, g: usize) -> &Rank {
        &self.inst.ranks[g]
    }

    fn all_ended(&self) -> bool {
        (self.launched == self.opts.requests || self.s.gave_up.is_some())
            && self.pending.is_empty()
            && self.retry.is_empty()
            && self.active.is_empty()
    }

    /// Every gen rank is connected to every ctx rank, ready for requests.
    fn connected(&self) -> bool {
        self.ready.len() == self.inst.ranks.len() * self.opts.peers.len()
    }

    fn record_error(&mut self, cause: String) {
        self.s.failed += 1;
        self.inst.metrics.requests_failed.inc();
        let key = if self.s.errors.len() >= MAX_ERROR_KINDS && !self.s.errors.contains_key(&cause) {
            "other".to_string()
        } else {
            cause
        };
        *self.s.errors.entry(key).or_default() += 1;
    }

    /// Asks ctx rank 0 for as many requests as the concurrency and the pools allow, all in
    /// one `Prepare` frame (at most `MAX_PREPARE_ASKS` asks): launches answered busy first,
    /// then new ones.
    fn launch_more(&mut self) {
        if !self.connected() || self.s.gave_up.is_some() {
            return;
        }
        if self.busy_until.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let free = (self.inst.ranks.iter())
            .map(|r| r.pool.lock().expect("pool lock").free_count())
            .min()
            .unwrap_or(0);
        let asks = self.next_asks(free);
        if asks.is_empty() {
            return;
        }
        let verify = self.opts.verify;
        let frame = Frame::Node(NodeFrame::Prepare {
            asks: (asks.iter().enumerate())
                .map(|(i, l)| Ask {
                    tag: self.next_tag + i as u64,
                    blocks: l.blocks,
                    seed: verify.then_some(l.seed),
                })
                .collect(),
        });
        if let Err(e) = self.rank(0).links.send_frame(ctx_peer(0), frame) {
            tracing::debug!(error = %e, "prepare not sent; retrying after reconnect");
            self.retry.extend(asks);
            return;
        }
        for l in asks {
            self.reserved += l.blocks as usize;
            self.pending.insert(self.next_tag, l);
            self.next_tag += 1;
        }
        assert!(self.pending.len() + self.active.len() + self.retry.len() <= self.opts.concurrency);
    }

    /// The launches of the next `Prepare`: busy ones first, then new ones (counted in
    /// `launched`), while the concurrency, the ask bound and the `free` blocks of the
    /// smallest pool allow.
    fn next_asks(&mut self, free: usize) -> Vec<Launch> {
        let max = self.opts.max_blocks as usize;
        let mut asks = Vec::new();
        let mut reserved = self.reserved;
        let at = Instant::now();
        while asks.len() < MAX_PREPARE_ASKS && free >= reserved + max {
            let l = if let Some(l) = self.retry.pop_front() {
                l
            } else if self.launched < self.opts.requests
                && self.pending.len() + self.active.len() + asks.len() < self.opts.concurrency
            {
                self.launched += 1;
                let blocks = (self.rng).random_range(self.opts.min_blocks..=self.opts.max_blocks);
                let seed = self.rng.random();
                Launch {
                    blocks,
                    seed,
                    at,
                    busy_since: None,
                }
            } else {
                break;
            };
            reserved += l.blocks as usize;
            asks.push(l);
        }
        asks
    }

    fn on_inbound(&mut self, d: Delivery) {
        let g = d.rank;
        match d.event {
            Inbound::Up { peer } => self.on_up((g, peer.rank)),
            Inbound::Down { peer, reason } => {
                tracing::warn!(%peer, rank = g, %reason, "lost a ctx connection");
                self.ready.remove(&(g, peer.rank));
                self.pool_wait.remove(&(g, peer.rank));
                self.lost_since_up = true;
                self.on_link_lost((g, peer.rank), &format!("ctx connection lost: {reason}"));
                self.inst.ranks[g].backend.peer_lost(peer);
            }
            Inbound::GaveUp { peer, reason } => {
                self.give_up(peer, &format!("ctx unreachable: {reason}"))
            }
            Inbound::Frame {
                peer,
                frame: Frame::Core(msg),
            } => {
                if let Message::Error {
                    request,
                    code,
                    detail,
                } = &msg
                {
                    if let Some(a) = self.active.get_mut(request) {
                        a.cause
                            .get_or_insert_with(|| format!("ctx refused ({code:?}): {detail}"));
                    }
                }
                let rank = &mut self.inst.ranks[g];
                let now = rank.now();
                rank.tx.handle_message(now, peer, msg);
            }
            Inbound::Frame {
                peer,
                frame: Frame::Node(f),
            } => self.on_node_frame(g, peer, f),
        }
    }

    fn on_up(&mut self, conn @ (g, r): ConnId) {
        // One reconnect per loss, however many of the instance's links it took down.
        if std::mem::take(&mut self.lost_since_up) && self.s.done + self.s.failed > 0 {
            self.s.reconnects += 1;
        }
        tracing::info!(rank = g, ctx_rank = r, "connected to ctx");
        self.greet(conn);
        // A CUDA gen launches once it has mapped the ctx's pool (its first frame).
        if self.rank(g).backend.ready_on_connect() {
            self.ready.insert(conn);
        } else {
            self.pool_wait.insert(conn, Instant::now());
        }
    }

    /// The earliest instant anything of this gen waits on: the transceivers' next deadline,
    /// asking again after a busy answer, the CUDA pool wait, the next progress line, the
    /// final drain.
    fn next_wake(&self, progress: &Progress, drain_until: Option<Instant>) -> Option<Instant> {
        let pool =
            (self.pool_wait.values().min()).map(|t| *t + POOL_WAIT + Duration::from_millis(1));
        [
            self.inst.next_deadline(),
            self.busy_until.filter(|_| !self.retry.is_empty()),
            pool.filter(|_| self.s.gave_up.is_none()),
            progress.next(),
            drain_until,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Sends the ctx rank what the backend needs it to know before any request (a NIXL gen's
    /// agent name): sent first, so the ctx holds it before it parks a send for this gen.
    fn greet(&mut self, (g, r): ConnId) {
        let Some(hello) = self.rank(g).backend.greeting() else {
            return;
        };
        if let Err(e) = self
            .rank(g)
            .links
            .send_frame(ctx_peer(r), Frame::Node(hello))
        {
            self.give_up(ctx_peer(r), &format!("greeting not sent: {e}"));
        }
    }

    fn check_pool_wait(&mut self) {
        let overdue = self.pool_wait.values().any(|t| t.elapsed() > POOL_WAIT);
        if self.s.gave_up.is_some() || !overdue {
            return;
        }
        let cause = format!(
            "the ctx sent no CUDA pool within {} s (is it running with --backend cuda?)",
            POOL_WAIT.as_secs()
        );
        self.give_up(ctx_peer(0), &cause);
    }

    /// Stops the load: what is in flight fails with `cause`, what is not launched is skipped.
    fn give_up(&mut self, peer: PeerId, cause: &str) {
        tracing::error!(%peer, %cause, "giving up on the ctx");
        self.s.gave_up = Some(cause.to_string());
        self.abandon_all(cause);
        self.s.skipped = self.opts.requests - self.launched;
    }

    /// Fails every pending or retried launch and cancels every active request with `cause`.
    fn abandon_all(&mut self, cause: &str) {
        let unanswered = self.take_pending();
        for _ in unanswered
            .into_iter()
            .chain(std::mem::take(&mut self.retry))
        {
            self.record_error(cause.to_string());
        }
        self.cancel_active(cause);
    }

    /// A connection to the ctx is gone: active requests end with `cause`. Asks sent over it
    /// (the `Prepare`s go gen rank 0 → ctx rank 0) and not answered are asked again after the
    /// reconnect: the ctx cancels whatever a lost connection owned, so nothing of theirs is
    /// left there, and they had started nothing here. Launches waiting to be asked again stay.
    fn on_link_lost(&mut self, conn: ConnId, cause: &str) {
        let unanswered = self.take_pending();
        if conn == (0, 0) {
            self.s.asks_repeated += unanswered.len() as u64;
            self.retry.extend(unanswered);
        } else {
            for _ in unanswered {
                self.record_error(cause.to_string());
            }
        }
        self.cancel_active(cause);
    }

    /// Every pending launch, its blocks no longer reserved: their answers will not come.
    fn take_pending(&mut self) -> Vec<Launch> {
        let unanswered: Vec<Launch> = std::mem::take(&mut self.pending).into_values().collect();
        self.reserved -= unanswered.iter().map(|l| l.blocks as usize).sum::<usize>();
        unanswered
    }

    /// Cancels every active request, its failure cause `cause` unless it has one.
    fn cancel_active(&mut self, cause: &str) {
        let ids: Vec<RequestId> = self.active.keys().copied().collect();
        for id in ids {
            if let Some(a) = self.active.get_mut(&id) {
                a.cause.get_or_insert_with(|| cause.to_string());
            }
            for rank in &mut self.inst.ranks {
                let now = rank.now();
                rank.tx.cancel(now, id);
            }
        }
    }

    fn on_node_frame(&mut self, g: usize, peer: PeerId, f: NodeFrame) {
        match f {
            NodeFrame::Prepared { layout, answers } => {
                for a in answers {
                    self.on_answer(a, layout);
                }
            }
            NodeFrame::Prepare { .. } => {
                tracing::warn!("ctx sent a prepare request to a gen node, ignored");
            }
            f @ NodeFrame::CudaPool { .. } => {
                match self.rank(g).backend.on_backend_frame(peer, f) {
                    Ok(()) => {
                        tracing::info!(%peer, rank = g, "mapped the ctx's KV pool");
                        self.ready.insert((g, peer.rank));
                        self.pool_wait.remove(&(g, peer.rank));
                    }
                    // The ctx cannot be read from: nothing would ever complete, so give up now.
                    Err(e) => self.give_up(peer, &format!("ctx pool not usable: {e}")),
                }
            }
            f @ (NodeFrame::PullReady { .. }
            | NodeFrame::PullFinished { .. }
            | NodeFrame::NixlReady { .. }
            | NodeFrame::NixlFailed { .. }
            | NodeFrame::NixlAgent { .. }) => {
                if let Err(e) = self.rank(g).backend.on_backend_frame(peer, f) {
                    tracing::warn!(%peer, error = %e, "node frame refused");
                }
            }
        }
    }

    /// Starts the request the ctx prepared for a pending launch, or fails the launch. A
    /// prepared request this gen will not receive (its launch was abandoned, or it cannot
    /// start) is cancelled on every ctx rank, so the ctx frees it now, not at its sender budget.
    fn on_answer(&mut self, a: Answer, layout: CacheLayout) {
        let tag = match &a {
            Answer::Prepared { tag, .. }
            | Answer::Failed { tag, .. }
            | Answer::Busy { tag, .. } => *tag,
        };
        let Some(l) = self.pending.remove(&tag) else {
            tracing::warn!(tag, "prepare answer for no pending launch");
            match a {
                // Not a live request's id (an answer repeated): that one stays.
                Answer::Prepared { request, token, .. } if !self.active.contains_key(&request) => {
                    self.release_prepared(request, TransferToken(token))
                }
                _ => {}
            }
            return;
        };
        self.reserved -= l.blocks as usize;
        if let Err(cause) = ctx_ranks_match(&layout, self.opts.peers.len()) {
            self.record_error(cause.clone());
            self.give_up(ctx_peer(0), &cause);
            return;
        }
        let started = match a {
            Answer::Prepared {
                request,
                token,
                ctx_blocks,
                ..
            } => {
                let token = TransferToken(token);
                let r = self.start(l, request, token, ctx_blocks, layout);
                // Not a live request's id (a ctx naming one twice): that one stays.
                if r.is_err() && !self.active.contains_key(&request) {
                    self.release_prepared(request, token);
                }
                r
            }
            Answer::Failed { reason, .. } => Err(format!("ctx could not prepare: {reason}")),
            Answer::Busy { reason, .. } => return self.on_busy(l, reason),
        };
        if let Err(cause) = started {
            self.record_error(cause);
        }
    }

    /// The ctx had no room for `l` yet: it is asked again once one of this gen's requests
    /// ends, or after `BUSY_BACKOFF`; past `MAX_BUSY_WAIT` of busy answers it fails.
    fn on_busy(&mut self, l: Launch, reason: String) {
        self.s.busy_answers += 1;
        let now = Instant::now();
        let since = l.busy_since.unwrap_or(now);
        if now.duration_since(since) > MAX_BUSY_WAIT {
            self.record_error(format!("ctx stayed busy for {MAX_BUSY_WAIT:?}: {reason}"));
            return;
        }
        self.retry.push_back(Launch {
            busy_since: Some(since),
            ..l
        });
        self.busy_until = Some(now + BUSY_BACKOFF);
    }

    /// Cancels, with its token, a request the ctx prepared for this gen on every ctx rank.
    fn release_prepared(&self, request: RequestId, token: TransferToken) {
        for r in 0..self.opts.peers.len() as u32 {
            let cancel = Frame::Core(Message::Cancel { request, token });
            if let Err(e) = self.rank(0).links.send_frame(ctx_peer(r), cancel) {
                tracing::debug!(%request, ctx_rank = r, error = %e, "cancel not sent");
            }
        }
    }

    fn start(
        &mut self,
        l: Launch,
        id: RequestId,
        token: TransferToken,
        ctx_blocks: Vec<u32>,
        layout: CacheLayout,
    ) -> Result<(), String> {
        if self.active.contains_key(&id) {
            // A ctx that names a live request again is not to be believed: the first keeps
            // its blocks and its seed.
            return Err(format!("ctx prepared request {id} twice"));
        }
        if ctx_blocks.len() != l.blocks as usize {
            return Err(format!(
                "ctx prepared {} blocks, {} asked",
                ctx_blocks.len(),
                l.blocks
            ));
        }
        // Each rank names its own blocks in its `RequestInfo`: any free ones will do.
        let refs = (self.inst)
            .allocate_each(|_, pool| pool.allocate(id, l.blocks as usize))
            .map_err(|e| e.to_string())?;
        let source = ContextSource {
            instance: CTX_INSTANCE,
            layout,
            blocks: ctx_blocks,
        };
        let reqs: Vec<Arc<Request>> = (refs.into_iter())
            .map(|blocks| Arc::new(Request::new_generation(id, token, blocks, source.clone())))
            .collect();
        if let Err(e) = self.inst.register_each(&reqs, Rank::request_and_receive) {
            self.inst.free_each(reqs.iter().map(|r| &r.blocks[..]));
            return Err(e.to_string());
        }
        let bytes = u64::from(l.blocks) * self.inst.block_bytes();
        // DEBUG, not INFO: a span the default filter lets through is formatted on creation,
        // some µs a request (BENCHMARKS.md, "per-request cost").
        let span = tracing::debug_span!("transfer", request = %id, side = "gen", bytes, outcome = tracing::field::Empty);
        self.active.insert(
            id,
            Active {
                seed: l.seed,
                at: l.at,
                span,
                cause: None,
                ranks: self.inst.ranks.len(),
                ended: Vec::new(),
            },
        );
        Ok(())
    }

    fn on_events(&mut self, events: &[(usize, TxEvent)]) {
        let budget = self.rank(0).tx_timeout_ms();
        for (_, e) in events {
            if let TxEvent::Evicted { request, .. } = e {
                if let Some(a) = self.active.get_mut(request) {
                    a.cause.get_or_insert_with(|| {
                        format!("transfer timed out after {budget} ms (kv_transfer_timeout_ms)")
                    });
                }
            }
        }
    }

    /// Compares the blocks every rank received with the ctx's pattern; `Err` names why they
    /// differ or could not be read.
    fn verify(&mut self, ended: &[(usize, Finished)], seed: u64) -> Result<(), String> {
        if !self.opts.verify {
            return Ok(());
        }
        for (g, f) in ended {
            let rank = &self.inst.ranks[*g];
            let ids: Vec<u32> = f.request.blocks.iter().map(|b| b.id).collect();
            let layout = *rank.tx.layout();
            match rank.backend.verify(seed, &ids, &layout, &mut self.scratch) {
                Ok(true) => {}
                Ok(false) => return Err(format!("rank {g}: received bytes differ from the ctx's")),
                Err(e) => return Err(format!("rank {g}: verification failed: {e}")),
            }
        }
        Ok(())
    }

    /// Request `f` ended on rank `g`; once it has on every rank that took it, its outcome.
    fn on_finished(&mut self, g: usize, f: Finished) {
        let id = f.request.id;
        self.rank(g).backend.request_ended(id);
        let Some(a) = self.active.get_mut(&id) else {
            self.rank(g).release(&f);
            return;
        };
        a.ended.push((g, f));
        if a.ended.len() < a.ranks {
            return;
        }
        let a = self.active.remove(&id).expect("just seen");
        // Its ctx blocks are being freed: launches answered busy may fit now.
        self.busy_until = None;
        let outcome = match a
            .ended
            .iter()
            .find(|(_, f)| f.state != RequestState::GenComplete)
        {
            Some((_, f)) => Err(a
                .cause
                .clone()
                .unwrap_or_else(|| format!("transfer ended {:?}", f.state))),
            None => self.verify(&a.ended, a.seed),
        };
        for (g, f) in &a.ended {
            self.rank(*g).release(f);
        }
        a.span
            .record("outcome", tracing::field::debug(a.ended[0].1.state));
        self.record_outcome(id, &a, outcome);
    }

    fn record_outcome(&mut self, id: RequestId, a: &Active, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => {
                let bytes: u64 = (a.ended.iter())
                    .map(|(g, f)| {
                        f.request.blocks.len() as u64 * self.rank(*g).backend.block_bytes()
                    })
                    .sum();
                let lat = a.at.elapsed();
                self.s.done += 1;
                self.s.bytes += bytes;
                if self.s.reconnects > 0 {
                    self.s.done_after_reconnect += 1;
                }
                self.latencies_us.push(lat.as_micros() as u64);
                self.inst.metrics.requests_done.inc();
                self.inst.metrics.observe_latency(lat);
                a.span.in_scope(|| {
                    tracing::debug!(latency_us = lat.as_micros() as u64, "request done")
                });
            }
            Err(cause) => {
                // The span is DEBUG: the WARN names the request itself.
                a.span
                    .in_scope(|| tracing::warn!(request = %id, %cause, "request failed"));
                self.record_error(cause);
            }
        }
    }

    /// Hangs up cleanly: whatever the connections still owe the ctx is written before they
    /// close (a CUDA gen's last `PullFinished` frames above all: the ctx's parked sends wait
    /// for them, and would fail on the disconnect instead). The events already queued are
    /// dropped first, so an older connection's `Down` is not taken for one of these.
    async fn hang_up(&self, inbox: &mut mpsc::Receiver<Delivery>) {
        while inbox.try_recv().is_ok() {}
        self.inst.hang_up(inbox, HANG_UP, |_, _| {}).await;
    }

    fn summarize(mut self, elapsed: Duration, cpu_time: Duration) -> Summary {
        let Occupancy {
            staging_slots,
            staging_free,
            staging_poisoned,
            blocks_total,
            blocks_free,
        } = self.inst.occupancy();
        self.latencies_us.sort_unstable();
        let pct = |p: f64| -> Option<f64> {
            let v = &self.latencies_us;
            if v.is_empty() {
                return None;
            }
            let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
            Some(v[i] as f64 / 1000.0)
        };
        let mut backend = BTreeMap::new();
        for rank in &self.inst.ranks {
            for (k, v) in rank.backend.counters() {
                *backend.entry(k.to_string()).or_default() += v;
            }
        }
        let secs = elapsed.as_secs_f64();
        Summary {
            seconds: secs,
            throughput_mib_s: self.s.bytes as f64 / (1 << 20) as f64 / secs.max(1e-9),
            cpu_s_per_gib: cpu::s_per_gib(cpu_time, self.s.bytes),
            cpu_seconds: cpu_time.as_secs_f64(),
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            staging_slots,
            staging_free,
            staging_poisoned,
            blocks_total,
            blocks_free,
            backend,
            ..self.s
        }
    }
}

/// `Ok` when the ctx's layout (from the wire: not trusted) is valid and has as many ranks as
/// `--peer` names addresses; else why not. Never multiplies an unvalidated layout's fields.
fn ctx_ranks_match(layout: &CacheLayout, peers: usize) -> Result<(), String> {
    if let Err(e) = layout.validate() {
        return Err(format!("the ctx sent an invalid layout: {e}"));
    }
    let ranks = layout.world_size() as usize;
    if ranks != peers {
        return Err(format!(
            "the ctx serves {ranks} ranks (layout {layout:?}), --peer names {peers}"
        ));
    }
    Ok(())
}

/// Progress on stderr: a rewritten line on a terminal, plain lines otherwise.
#[derive(Debug)]
struct Progress {
    enabled: bool,
    tty: bool,
    last: Instant,
    every: Duration,
}

impl Progress {
    fn new(every: Option<Duration>) -> Progress {
        Progress {
            enabled: every.is_some(),
            tty: std::io::stderr().is_terminal(),
            last: Instant::now(),
            every: every.unwrap_or_default(),
        }
    }

    fn line(s: &Summary, in_flight: usize) -> String {
        format!(
            "progress done={} failed={} in_flight={} of={} MiB={:.1}",
            s.done,
            s.failed,
            in_flight,
            s.requests,
            s.bytes as f64 / (1 << 20) as f64
        )
    }

    /// When the next line is due, if progress is on.
    fn next(&self) -> Option<Instant> {
        self.enabled.then(|| self.last + self.every)
    }

    fn maybe_print(&mut self, s: &Summary, in_flight: usize) {
        if !self.enabled || self.last.elapsed() < self.every {
            return;
        }
        self.last = Instant::now();
        let mut err = std::io::stderr().lock();
        let line = Self::line(s, in_flight);
        let _ = if self.tty {
            write!(err, "\r{line}\x1b[K")
        } else {
            writeln!(err, "{line}")
        };
    }

    fn finish(&self, s: &Summary) {
        if self.enabled && self.tty {
            let _ = writeln!(std::io::stderr(), "\r{}\x1b[K", Self::line(s, 0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::sharded;

    /// A ctx's layout comes off the wire: one whose rank count overflows is refused as
    /// invalid, not multiplied (which panics where overflow checks are on).
    #[test]
    fn a_layout_from_the_wire_is_validated_before_its_ranks_are_counted() {
        let mut l = sharded(1, 2, 16, 4, 2, 2);
        assert_eq!(ctx_ranks_match(&l, 2), Ok(()));
        let e = ctx_ranks_match(&l, 1).unwrap_err();
        assert!(e.contains("serves 2 ranks") && e.contains("names 1"), "{e}");
        (l.tp_size, l.pp_size) = (1 << 16, 1 << 16);
        let e = ctx_ranks_match(&l, 2).unwrap_err();
        assert!(e.contains("invalid layout"), "{e}");
    }
}
