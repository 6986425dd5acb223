//! The gen (decode) role in load mode: dials the ctx node (reconnecting with bounded backoff),
//! asks it for synthetic requests, receives each through `request_and_receive`, verifies every
//! byte, and returns a summary.

use super::admit::SeatSignals;
use super::conn::{self, Attach, Inbound, ReadDeadlines};
use super::cpu;
use super::frame::{Answer, Ask, Frame, NodeFrame, MAX_PREPARE_ASKS};
use super::link::Outgoing;
use super::rank::{Occupancy, Rank};
use super::spec::{NodeSpec, CTX_INSTANCE};
use super::{drain_inbox, sleep_until, NodeError, OwnedTask, INBOX};
use kvferry_core::request::{ContextSource, Request, RequestState};
use kvferry_core::transceiver::{Finished, Side, TxEvent};
use kvferry_core::wire::Message;
use kvferry_core::{PeerId, RequestId, TransferToken};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
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
/// How long a CUDA gen waits for its ctx's pool after connecting. A ctx sends it first thing,
/// so only a ctx on another backend (or not a kvferry ctx) keeps it waiting.
const POOL_WAIT: Duration = Duration::from_secs(15);

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub peer: SocketAddr,
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
}

#[derive(Debug)]
struct Launch {
    blocks: u32,
    seed: u64,
    at: Instant,
}

#[derive(Debug)]
struct Active {
    seed: u64,
    at: Instant,
    span: Span,
    cause: Option<String>,
}

#[derive(Debug)]
struct GenNode {
    rank: Rank,
    opts: LoadOptions,
    ctx: PeerId,
    rng: StdRng,
    connected: bool,
    /// Connected, waiting for the ctx's CUDA pool since then.
    pool_wait: Option<Instant>,
    launched: u64,
    next_tag: u64,
    pending: HashMap<u64, Launch>,
    active: HashMap<RequestId, Active>,
    /// Blocks promised to pending launches, so a `Prepared` always finds its blocks.
    reserved: usize,
    s: Summary,
    latencies_us: Vec<u64>,
    scratch: Vec<u8>,
}

/// Runs the load and returns its summary once every request has ended.
pub async fn run(spec: NodeSpec, opts: LoadOptions) -> Result<Summary, NodeError> {
    let me = PeerId {
        instance: super::spec::GEN_INSTANCE_BASE,
        rank: 0,
    };
    let rank = Rank::new(me, Side::Generation, &spec);
    run_with(rank, opts).await
}

impl GenNode {
    fn new(rank: Rank, opts: LoadOptions, ctx: PeerId) -> GenNode {
        GenNode {
            rng: StdRng::seed_from_u64(opts.seed),
            s: Summary {
                requests: opts.requests,
                ..Summary::default()
            },
            rank,
            opts,
            ctx,
            connected: false,
            pool_wait: None,
            launched: 0,
            next_tag: 0,
            pending: HashMap::new(),
            active: HashMap::new(),
            reserved: 0,
            latencies_us: Vec::new(),
            scratch: Vec::new(),
        }
    }
}

/// As `run`, with a rank built by the caller (to share its metrics).
pub async fn run_with(rank: Rank, opts: LoadOptions) -> Result<Summary, NodeError> {
    let ctx = PeerId {
        instance: CTX_INSTANCE,
        rank: 0,
    };
    let (inbox_tx, mut inbox) = mpsc::channel(INBOX);
    // Owned: the dialer and its connection end with this load, however it ends.
    let dialer = OwnedTask(tokio::spawn(dial_loop(
        opts.peer,
        ctx,
        Attach::new(&rank, inbox_tx),
    )));
    let mut node = GenNode::new(rank, opts, ctx);
    let started = Instant::now();
    let cpu_started = cpu::process_cpu();
    let mut progress = Progress::new(node.opts.progress);
    let wake = node.rank.wake.clone();
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
        let (finished, events) = node.rank.step()?;
        node.on_events(&events);
        for f in finished {
            node.on_finished(f);
        }
        node.check_pool_wait();
        node.launch_more();
        node.rank.update_metrics();
        progress.maybe_print(&node.s, node.pending.len() + node.active.len());
        if node.all_ended() {
            let deadline = *drain_until.get_or_insert_with(|| Instant::now() + FINAL_DRAIN);
            let o = node.rank.occupancy();
            let quiet = node.rank.tx.jobs_in_flight() == 0 && o.staging_poisoned == 0;
            if quiet || Instant::now() >= deadline {
                break;
            }
        }
    }
    let (elapsed, cpu_time) = (started.elapsed(), cpu::process_cpu() - cpu_started);
    node.hang_up(&mut inbox).await;
    drop(dialer);
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
    fn all_ended(&self) -> bool {
        (self.launched == self.opts.requests || self.s.gave_up.is_some())
            && self.pending.is_empty()
            && self.active.is_empty()
    }

    fn record_error(&mut self, cause: String) {
        self.s.failed += 1;
        self.rank.metrics.requests_failed.inc();
        let key = if self.s.errors.len() >= MAX_ERROR_KINDS && !self.s.errors.contains_key(&cause) {
            "other".to_string()
        } else {
            cause
        };
        *self.s.errors.entry(key).or_default() += 1;
    }

    /// Asks the ctx for as many requests as the concurrency and the pool allow, all in one
    /// `Prepare` frame (at most `MAX_PREPARE_ASKS` asks).
    fn launch_more(&mut self) {
        if !self.connected || self.s.gave_up.is_some() {
            return;
        }
        let max = self.opts.max_blocks as usize;
        let free = self.rank.pool.lock().expect("pool lock").free_count();
        let mut asks = Vec::new();
        let mut reserved = self.reserved;
        while self.launched + (asks.len() as u64) < self.opts.requests
            && self.pending.len() + self.active.len() + asks.len() < self.opts.concurrency
            && asks.len() < MAX_PREPARE_ASKS
            && free >= reserved + max
        {
            let blocks = self
                .rng
                .random_range(self.opts.min_blocks..=self.opts.max_blocks);
            let seed = self.rng.random();
            reserved += blocks as usize;
            asks.push((self.next_tag + asks.len() as u64, blocks, seed));
        }
        if asks.is_empty() {
            return;
        }
        let verify = self.opts.verify;
        let frame = Frame::Node(NodeFrame::Prepare {
            asks: asks
                .iter()
                .map(|&(tag, blocks, seed)| Ask {
                    tag,
                    blocks,
                    seed: verify.then_some(seed),
                })
                .collect(),
        });
        if let Err(e) = self.rank.links.send_frame(self.ctx, frame) {
            // The asks' seeds were drawn: a retry draws new ones, which only the seed's
            // stream, not correctness, depends on.
            tracing::debug!(error = %e, "prepare not sent; retrying after reconnect");
            return;
        }
        let at = Instant::now();
        for (tag, blocks, seed) in asks {
            self.next_tag += 1;
            self.launched += 1;
            self.reserved += blocks as usize;
            self.pending.insert(tag, Launch { blocks, seed, at });
        }
    }

    fn on_inbound(&mut self, ev: Inbound) {
        let now = self.rank.now();
        match ev {
            Inbound::Up { peer } => {
                if self.s.done + self.s.failed > 0 {
                    self.s.reconnects += 1;
                }
                tracing::info!(%peer, "connected to ctx");
                self.greet(peer);
                // A CUDA gen launches once it has mapped the ctx's pool (its first frame).
                self.connected = self.rank.backend.ready_on_connect();
                self.pool_wait = (!self.connected).then(Instant::now);
            }
            Inbound::Down { peer, reason } => {
                tracing::warn!(%peer, %reason, "lost the ctx connection");
                self.connected = false;
                self.pool_wait = None;
                self.abandon_all(&format!("ctx connection lost: {reason}"));
                self.rank.backend.peer_lost(peer);
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
                self.rank.tx.handle_message(now, peer, msg);
            }
            Inbound::Frame {
                peer,
                frame: Frame::Node(f),
            } => self.on_node_frame(peer, f),
        }
    }

    /// The earliest instant anything of this gen waits on: the transceiver's next deadline,
    /// the CUDA pool wait, the next progress line, the final drain.
    fn next_wake(&self, progress: &Progress, drain_until: Option<Instant>) -> Option<Instant> {
        let pool = self
            .pool_wait
            .map(|t| t + POOL_WAIT + Duration::from_millis(1));
        [
            self.rank.next_deadline(),
            pool.filter(|_| self.s.gave_up.is_none()),
            progress.next(),
            drain_until,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Sends the ctx what the backend needs it to know before any request (a NIXL gen's
    /// agent name): sent first, so the ctx holds it before it parks a send for this gen.
    fn greet(&mut self, peer: PeerId) {
        let Some(hello) = self.rank.backend.greeting() else {
            return;
        };
        if let Err(e) = self.rank.links.send_frame(peer, Frame::Node(hello)) {
            self.give_up(peer, &format!("greeting not sent: {e}"));
        }
    }

    fn check_pool_wait(&mut self) {
        if self.s.gave_up.is_some() || self.pool_wait.is_none_or(|t| t.elapsed() <= POOL_WAIT) {
            return;
        }
        let cause = format!(
            "the ctx sent no CUDA pool within {} s (is it running with --backend cuda?)",
            POOL_WAIT.as_secs()
        );
        self.give_up(self.ctx, &cause);
    }

    /// Stops the load: what is in flight fails with `cause`, what is not launched is skipped.
    fn give_up(&mut self, peer: PeerId, cause: &str) {
        tracing::error!(%peer, %cause, "giving up on the ctx");
        self.s.gave_up = Some(cause.to_string());
        self.abandon_all(cause);
        self.s.skipped = self.opts.requests - self.launched;
    }

    /// Fails every pending launch and cancels every active request with `cause`.
    fn abandon_all(&mut self, cause: &str) {
        let now = self.rank.now();
        for (_, l) in std::mem::take(&mut self.pending) {
            self.reserved -= l.blocks as usize;
            self.record_error(cause.to_string());
        }
        let ids: Vec<RequestId> = self.active.keys().copied().collect();
        for id in ids {
            if let Some(a) = self.active.get_mut(&id) {
                a.cause.get_or_insert_with(|| cause.to_string());
            }
            self.rank.tx.cancel(now, id);
        }
    }

    fn on_node_frame(&mut self, peer: PeerId, f: NodeFrame) {
        match f {
            NodeFrame::Prepared { layout, answers } => {
                for a in answers {
                    self.on_answer(a, layout);
                }
            }
            NodeFrame::Prepare { .. } => {
                tracing::warn!("ctx sent a prepare request to a gen node, ignored");
            }
            f @ NodeFrame::CudaPool { .. } => match self.rank.backend.on_backend_frame(peer, f) {
                Ok(()) => {
                    tracing::info!(%peer, "mapped the ctx's KV pool");
                    self.connected = true;
                    self.pool_wait = None;
                }
                // The ctx cannot be read from: nothing would ever complete, so give up now.
                Err(e) => self.give_up(peer, &format!("ctx pool not usable: {e}")),
            },
            f @ (NodeFrame::PullReady { .. }
            | NodeFrame::PullFinished { .. }
            | NodeFrame::NixlReady { .. }
            | NodeFrame::NixlFailed { .. }
            | NodeFrame::NixlAgent { .. }) => {
                if let Err(e) = self.rank.backend.on_backend_frame(peer, f) {
                    tracing::warn!(%peer, error = %e, "node frame refused");
                }
            }
        }
    }

    /// Starts the request the ctx prepared for a pending launch, or fails the launch.
    fn on_answer(&mut self, a: Answer, layout: kvferry_core::layout::CacheLayout) {
        let tag = match &a {
            Answer::Prepared { tag, .. } | Answer::Failed { tag, .. } => *tag,
        };
        let Some(l) = self.pending.remove(&tag) else {
            tracing::warn!(tag, "prepare answer for no pending launch");
            return;
        };
        self.reserved -= l.blocks as usize;
        let started = match a {
            Answer::Prepared {
                request,
                token,
                ctx_blocks,
                ..
            } => self.start(l, request, TransferToken(token), ctx_blocks, layout),
            Answer::Failed { reason, .. } => Err(format!("ctx could not prepare: {reason}")),
        };
        if let Err(cause) = started {
            self.record_error(cause);
        }
    }

    fn start(
        &mut self,
        l: Launch,
        id: RequestId,
        token: TransferToken,
        ctx_blocks: Vec<u32>,
        layout: kvferry_core::layout::CacheLayout,
    ) -> Result<(), String> {
        if ctx_blocks.len() != l.blocks as usize {
            return Err(format!(
                "ctx prepared {} blocks, {} asked",
                ctx_blocks.len(),
                l.blocks
            ));
        }
        let blocks = self
            .rank
            .pool
            .lock()
            .expect("pool lock")
            .allocate(id, l.blocks as usize)
            .map_err(|e| e.to_string())?;
        let source = ContextSource {
            instance: CTX_INSTANCE,
            layout,
            blocks: ctx_blocks,
        };
        let req = Arc::new(Request::new_generation(id, token, blocks.clone(), source));
        let bytes = u64::from(l.blocks) * self.rank.backend.block_bytes();
        if let Err(e) = self.rank.tx.request_and_receive(self.rank.now(), req) {
            self.rank.pool.lock().expect("pool lock").free(&blocks);
            return Err(e.to_string());
        }
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
            },
        );
        Ok(())
    }

    fn on_events(&mut self, events: &[TxEvent]) {
        let budget = self.rank.tx_timeout_ms();
        for e in events {
            if let TxEvent::Evicted { request, .. } = e {
                if let Some(a) = self.active.get_mut(request) {
                    a.cause.get_or_insert_with(|| {
                        format!("transfer timed out after {budget} ms (kv_transfer_timeout_ms)")
                    });
                }
            }
        }
    }

    /// Compares the received blocks with the ctx's pattern; `Err` names why they differ or
    /// could not be read.
    fn verify(&mut self, f: &Finished, seed: u64) -> Result<(), String> {
        if !self.opts.verify {
            return Ok(());
        }
        let ids: Vec<u32> = f.request.blocks.iter().map(|b| b.id).collect();
        match self.rank.backend.verify(seed, &ids, &mut self.scratch) {
            Ok(true) => Ok(()),
            Ok(false) => Err("received bytes differ from the ctx's".to_string()),
            Err(e) => Err(format!("verification failed: {e}")),
        }
    }

    fn on_finished(&mut self, f: Finished) {
        let id = f.request.id;
        self.rank.backend.request_ended(id);
        let Some(a) = self.active.remove(&id) else {
            self.rank.release(&f);
            return;
        };
        let outcome = if f.state != RequestState::GenComplete {
            Err(a
                .cause
                .unwrap_or_else(|| format!("transfer ended {:?}", f.state)))
        } else {
            self.verify(&f, a.seed)
        };
        self.rank.release(&f);
        a.span.record("outcome", tracing::field::debug(f.state));
        match outcome {
            Ok(()) => {
                let bytes = f.request.blocks.len() as u64 * self.rank.backend.block_bytes();
                let lat = a.at.elapsed();
                self.s.done += 1;
                self.s.bytes += bytes;
                if self.s.reconnects > 0 {
                    self.s.done_after_reconnect += 1;
                }
                self.latencies_us.push(lat.as_micros() as u64);
                self.rank.metrics.requests_done.inc();
                self.rank.metrics.observe_latency(lat);
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

    /// Hangs up cleanly: whatever the connection still owes the ctx is written before it
    /// closes (a CUDA gen's last `PullFinished` frames above all: the ctx's parked sends wait
    /// for them, and would fail on the disconnect instead).
    async fn hang_up(&self, inbox: &mut mpsc::Receiver<Inbound>) {
        let Some(link) = self.rank.links.get(self.ctx) else {
            return;
        };
        let closed = async {
            if link.control.send(Outgoing::Close).await.is_err() {
                return;
            }
            while let Some(ev) = inbox.recv().await {
                if matches!(ev, Inbound::Down { .. } | Inbound::GaveUp { .. }) {
                    return;
                }
            }
        };
        if tokio::time::timeout(conn::FLUSH_ON_CLOSE, closed)
            .await
            .is_err()
        {
            tracing::warn!(peer = %self.ctx, "connection did not close in time, dropping it");
        }
    }

    fn summarize(mut self, elapsed: Duration, cpu_time: Duration) -> Summary {
        let Occupancy {
            staging_slots,
            staging_free,
            staging_poisoned,
            blocks_total,
            blocks_free,
        } = self.rank.occupancy();
        self.latencies_us.sort_unstable();
        let pct = |p: f64| -> Option<f64> {
            let v = &self.latencies_us;
            if v.is_empty() {
                return None;
            }
            let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
            Some(v[i] as f64 / 1000.0)
        };
        let secs = elapsed.as_secs_f64();
        Summary {
            seconds: secs,
            throughput_mib_s: self.s.bytes as f64 / (1 << 20) as f64 / secs.max(1e-9),
            cpu_s_per_gib: cpu::s_per_gib(cpu_time, self.s.bytes),
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            staging_slots,
            staging_free,
            staging_poisoned,
            blocks_total,
            blocks_free,
            backend: (self.rank.backend.counters().into_iter())
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            ..self.s
        }
    }
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
