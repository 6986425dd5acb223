//! A context instance and a generation instance of loopback ranks, driven like an executor
//! would drive them, with a reference model of what the fuzz target asserts.
//!
//! The model is deliberately dumb: it records what the driver did (allocations, frees,
//! registrations) and what the transceivers reported (`Finished`, events), and checks the
//! lifecycle promises from the outside, never by reading transceiver internals.

use kvferry_core::agent::{AgentError, TransferAgent, TransferJob};
use kvferry_core::blocks::{BlockPool, BlockRef};
use kvferry_core::bugs::{Bug, BugSet};
use kvferry_core::collective::agree;
use kvferry_core::config::TransceiverConfig;
use kvferry_core::layout::CacheLayout;
use kvferry_core::loopback::{LoopbackNet, ManualAgent};
use kvferry_core::request::{ContextSource, Request, RequestState};
use kvferry_core::transceiver::{Side, Transceiver, TransceiverParts, TxEvent};
use kvferry_core::{PeerId, RequestId, TransferToken};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub const CTX: u32 = 0;
pub const GEN: u32 = 1;
/// KV blocks per rank: small, so that frees and reallocations of the same id are common.
pub const BLOCKS: u32 = 12;
/// A handful of requests exchange a few dozen control messages; more in one pump is a storm.
pub const MAX_PUMP: usize = 10_000;

/// Environment variable naming one core bug switch to turn on (e.g. `release-early`). Unset in
/// every normal run; `fuzz/scripts/bug-switch-check` sets it to show that the model's checks
/// catch each historical bug the core can re-introduce.
pub const BUG_ENV: &str = "KVFERRY_FUZZ_BUG";

/// The switches of this process, read once. An unknown name is a usage error: fail loudly.
fn injected_bugs() -> BugSet {
    static BUGS: OnceLock<BugSet> = OnceLock::new();
    *BUGS.get_or_init(|| match std::env::var(BUG_ENV) {
        Ok(name) => {
            let bug: Bug = name.parse().unwrap_or_else(|e| panic!("{BUG_ENV}: {e}"));
            BugSet::NONE.with(bug)
        }
        Err(_) => BugSet::NONE,
    })
}

pub struct Rank {
    pub tx: Transceiver,
    /// Every agent this rank ever had, the current one last. Old ones still finish the jobs
    /// they were given before a recycle.
    pub agents: Vec<Arc<ManualAgent>>,
    pub pool: Arc<Mutex<BlockPool>>,
    /// Block id -> epoch of the driver's latest allocation of it.
    latest: HashMap<u32, u64>,
    /// Allocations the driver freed, latest per id: must never be writable once reallocated.
    freed: HashMap<u32, BlockRef>,
    /// Requests registered here and not yet `Finished` here.
    open: BTreeSet<RequestId>,
    /// `Finished` reports per request (must end at exactly one).
    finished: HashMap<RequestId, u32>,
    warns: HashMap<RequestId, u32>,
}

/// Per request: what the driver did with it.
#[derive(Clone, Copy, Debug)]
pub struct ReqInfo {
    pub token_match: bool,
}

pub struct Cluster {
    pub net: LoopbackNet,
    pub ctx: Vec<Rank>,
    pub gen: Vec<Rank>,
    pub now: Duration,
    pub config: TransceiverConfig,
    pub requests: BTreeMap<RequestId, ReqInfo>,
    next_id: u64,
}

fn side_of(instance: u32) -> Side {
    if instance == CTX {
        Side::Context
    } else {
        Side::Generation
    }
}

impl Rank {
    fn new(instance: u32, layout: CacheLayout, c: &TransceiverConfig) -> Rank {
        let agent = ManualAgent::new();
        let bugs = injected_bugs();
        let pool = Arc::new(Mutex::new(BlockPool::with_bugs(BLOCKS, bugs)));
        let me = PeerId {
            instance,
            rank: layout.rank(),
        };
        let dyn_agent: Arc<dyn TransferAgent> = agent.clone();
        let tx = Transceiver::new(TransceiverParts {
            me,
            layout,
            config: c.clone(),
            bugs,
            agent: dyn_agent,
            blocks: pool.clone(),
        })
        .expect("the fuzz cluster's layout and config are valid");
        Rank {
            tx,
            agents: vec![agent],
            pool,
            latest: HashMap::new(),
            freed: HashMap::new(),
            open: BTreeSet::new(),
            finished: HashMap::new(),
            warns: HashMap::new(),
        }
    }

    fn allocate(&mut self, id: RequestId, n: usize) -> Option<Vec<BlockRef>> {
        let blocks = self.pool.lock().unwrap().allocate(id, n).ok()?;
        for b in &blocks {
            self.latest.insert(b.id, b.epoch);
        }
        Some(blocks)
    }

    fn free(&mut self, blocks: &[BlockRef]) {
        self.pool.lock().unwrap().free(blocks);
        for b in blocks {
            self.freed.insert(b.id, *b);
        }
    }

    /// Every job not yet completed, with the index of the agent that holds it.
    pub fn pending(&self) -> Vec<(usize, TransferJob)> {
        let mut out = Vec::new();
        for (i, a) in self.agents.iter().enumerate() {
            out.extend(a.pending().into_iter().map(|j| (i, j)));
        }
        out
    }

    /// I5 from the writer's side: a job still running may write its local blocks, and those
    /// must still be the allocation it was given (pinned blocks are never reallocated).
    fn check_job_writable(&self, job: &TransferJob) {
        let pool = self.pool.lock().unwrap();
        for b in &job.local_blocks {
            if let Err(e) = pool.check_write(b) {
                panic!(
                    "{:?}: pending job {:?} may not write {b:?}: {e}",
                    self.tx.me(),
                    job.id
                );
            }
            assert_eq!(
                self.latest.get(&b.id),
                Some(&b.epoch),
                "{:?}: job {:?} writes block {} of an allocation the driver replaced",
                self.tx.me(),
                job.id,
                b.id
            );
        }
    }

    /// I5 from the pool's side: a freed allocation whose block was given out again is stale.
    fn check_stale_refused(&self) {
        let pool = self.pool.lock().unwrap();
        for (id, old) in &self.freed {
            if self.latest.get(id).is_some_and(|e| *e != old.epoch) {
                assert!(
                    pool.check_write(old).is_err(),
                    "{:?}: pool accepts a write into {old:?}, freed and reallocated",
                    self.tx.me()
                );
            }
        }
    }

    /// Completes (ok or with `err`) the `pick`-th pending job, if any.
    pub fn complete(&mut self, pick: usize, err: Option<AgentError>) {
        let pending = self.pending();
        if pending.is_empty() {
            return;
        }
        let (agent, job) = &pending[pick % pending.len()];
        self.check_job_writable(job);
        let result = match err {
            None => Ok(job.bytes),
            Some(e) => Err(e),
        };
        assert!(self.agents[*agent].complete(job.id, result));
    }

    pub fn complete_all(&mut self) {
        while !self.pending().is_empty() {
            self.complete(0, None);
        }
    }

    /// Executor recycle: new jobs go to a fresh agent.
    pub fn recycle(&mut self) {
        let fresh = ManualAgent::new();
        let dyn_agent: Arc<dyn TransferAgent> = fresh.clone();
        self.tx.replace_agent(dyn_agent);
        self.agents.push(fresh);
    }

    /// I3: an agent with jobs pending is kept alive by the transceiver's statuses.
    fn check_agents(&self) {
        let current = self.agents.len() - 1;
        for (i, a) in self.agents.iter().enumerate() {
            // Our handle, plus the transceiver's for the current agent.
            let ours = if i == current { 2 } else { 1 };
            if a.pending_count() > 0 {
                assert!(
                    Arc::strong_count(a) > ours,
                    "{:?}: agent {i} has pending jobs but no status holds it (I3)",
                    self.tx.me()
                );
            }
        }
    }

    /// Events since the last call come from one operation, so at most one poll of this rank.
    /// A poll drains completions before it looks at elapsed time: a request that finishes
    /// well in the same poll was ready, and must not have been warned first (I4).
    fn take_events(&mut self, warn_configured: bool) {
        let mut warned_now = BTreeSet::new();
        for e in self.tx.drain_events() {
            match e {
                TxEvent::TimeoutWarn { request, .. } => {
                    assert!(
                        warn_configured,
                        "timeout WARN with no timeout configured (I4)"
                    );
                    let n = self.warns.entry(request).or_default();
                    *n += 1;
                    assert_eq!(*n, 1, "{request}: second timeout WARN for one enqueue (I4)");
                    warned_now.insert(request);
                }
                TxEvent::LocallyFinished {
                    request, ok: true, ..
                } => assert!(
                    !warned_now.contains(&request),
                    "{request}: timeout WARN for a transfer that was already complete (I4)"
                ),
                _ => {}
            }
        }
    }

    /// I6: a staging buffer serves one writer at a time. An evicted job's slot stays poisoned
    /// until its fence, so no pending job may share a buffer with another.
    fn check_staging_exclusive(&self) {
        let pending = self.pending();
        for (i, (_, a)) in pending.iter().enumerate() {
            for (_, b) in &pending[i + 1..] {
                assert!(
                    !Arc::ptr_eq(&a.staging, &b.staging),
                    "{:?}: jobs {:?} ({}) and {:?} ({}) share a staging buffer (I6)",
                    self.tx.me(),
                    a.id,
                    a.request,
                    b.id,
                    b.request
                );
            }
        }
    }
}

impl Cluster {
    pub fn new(ctx: CacheLayout, gen: CacheLayout, config: TransceiverConfig) -> Cluster {
        let net = LoopbackNet::new();
        let ctx = (0..ctx.world_size())
            .map(|r| Rank::new(CTX, ctx.with_rank(r), &config))
            .collect();
        let gen = (0..gen.world_size())
            .map(|r| Rank::new(GEN, gen.with_rank(r), &config))
            .collect();
        Cluster {
            net,
            ctx,
            gen,
            now: Duration::ZERO,
            config,
            requests: BTreeMap::new(),
            next_id: 1,
        }
    }

    pub fn instance(&mut self, i: u32) -> &mut Vec<Rank> {
        if i == CTX {
            &mut self.ctx
        } else {
            &mut self.gen
        }
    }

    pub fn ranks(&self) -> impl Iterator<Item = &Rank> {
        self.ctx.iter().chain(&self.gen)
    }

    fn ranks_mut(&mut self) -> impl Iterator<Item = &mut Rank> {
        self.ctx.iter_mut().chain(self.gen.iter_mut())
    }

    /// Allocates `n` blocks on every rank of both instances, then registers the request on
    /// every rank, as a scheduler would: all ranks of an instance or none.
    pub fn submit(&mut self, n: usize, token_match: bool, deadline: Option<Duration>) {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let now = self.now;
        let mut blocks = Vec::new();
        for r in self.ranks_mut() {
            blocks.push(r.allocate(id, n));
        }
        if blocks.iter().any(Option::is_none) {
            // Not admitted: give back what was taken.
            for (r, b) in self.ranks_mut().zip(blocks) {
                if let Some(b) = b {
                    r.free(&b);
                }
            }
            return;
        }
        let mut blocks: Vec<Vec<BlockRef>> = blocks.into_iter().map(Option::unwrap).collect();
        let gen_blocks = blocks.split_off(self.ctx.len());
        let token = TransferToken(u128::from(id.0) * 0x9e37_79b9_7f4a_7c15);
        let gen_token = if token_match {
            token
        } else {
            TransferToken(token.0 ^ 1)
        };
        let with_deadline = |r: Request| match deadline {
            Some(d) => r.with_deadline(now + d),
            None => r,
        };
        let ctx_ids: Vec<u32> = blocks[0].iter().map(|b| b.id).collect();
        let mut admitted = Vec::new();
        for (r, b) in self.ctx.iter_mut().zip(&blocks) {
            let req = Arc::new(with_deadline(Request::new_context(id, token, b.clone())));
            admitted.push(r.tx.respond_and_send(now, req).is_ok());
        }
        let ctx_ok = all_or_none(&admitted, "context");
        let source = ContextSource {
            instance: CTX,
            layout: self.ctx[0].tx.layout().with_rank(0),
            blocks: ctx_ids,
        };
        admitted.clear();
        if ctx_ok {
            for (r, b) in self.gen.iter_mut().zip(&gen_blocks) {
                let req = Request::new_generation(id, gen_token, b.clone(), source.clone());
                admitted.push(
                    r.tx.request_and_receive(now, Arc::new(with_deadline(req)))
                        .is_ok(),
                );
            }
        }
        let gen_ok = ctx_ok && all_or_none(&admitted, "generation");
        self.requests.insert(id, ReqInfo { token_match });
        if ctx_ok {
            self.ctx.iter_mut().for_each(|r| _ = r.open.insert(id));
        }
        if gen_ok {
            self.gen.iter_mut().for_each(|r| _ = r.open.insert(id));
        } else if ctx_ok {
            // The router gives the context side up when the generation side cannot take it.
            for r in &mut self.ctx {
                assert!(r.tx.cancel(now, id));
            }
        }
        for (r, b) in self.ctx.iter_mut().zip(&blocks).filter(|_| !ctx_ok) {
            r.free(b);
        }
        for (r, b) in self.gen.iter_mut().zip(&gen_blocks).filter(|_| !gen_ok) {
            r.free(b);
        }
    }

    /// Cancels the `pick`-th request on one rank, or on every rank of the instance.
    pub fn cancel(&mut self, instance: u32, rank: Option<u8>, pick: usize) {
        let Some(id) = nth(&self.requests, pick) else {
            return;
        };
        let now = self.now;
        let ranks = self.instance(instance);
        let n = ranks.len();
        for (i, r) in ranks.iter_mut().enumerate() {
            if rank.is_none_or(|k| usize::from(k) % n == i) {
                let known = r.tx.cancel(now, id);
                assert_eq!(
                    known,
                    r.open.contains(&id),
                    "{id}: cancel disagrees with model"
                );
            }
        }
    }

    /// Moves every rank's outbox into the net: a driver drains the outbox after every call.
    pub fn flush(&mut self) {
        for r in self.ctx.iter_mut().chain(self.gen.iter_mut()) {
            self.net.flush(&mut r.tx);
        }
    }

    /// Delivers control messages, all or at most `limit`.
    pub fn pump(&mut self, limit: Option<usize>) {
        let now = self.now;
        let mut delivered = 0;
        while limit.is_none_or(|l| delivered < l) {
            self.flush();
            let Some(env) = self.net.pop() else {
                break;
            };
            delivered += 1;
            assert!(
                delivered <= MAX_PUMP,
                "message storm: {MAX_PUMP} messages in one pump"
            );
            let inst = self.instance(env.to.instance);
            if let Some(r) = inst.get_mut(env.to.rank as usize) {
                r.tx.handle_message(now, env.from, env.msg);
            }
        }
    }

    /// One collective step on an instance; frees the blocks of what finished.
    pub fn step(&mut self, instance: u32) {
        let now = self.now;
        let side = side_of(instance);
        let warn_configured = self.config.kv_transfer_timeout_ms.is_some();
        let ranks = self.instance(instance);
        let all: Vec<_> = ranks
            .iter_mut()
            .map(|r| match side {
                Side::Context => r.tx.check_context_status(now, 0).contribution,
                Side::Generation => r.tx.check_gen_status(now, 0).contribution,
            })
            .collect();
        let agreed = agree(&all, ranks.len()).expect("every rank contributes every step");
        let mut outcome: Option<Vec<(RequestId, bool)>> = None;
        for r in ranks.iter_mut() {
            let fin = r.tx.apply_agreed(&agreed);
            let mut mine = Vec::new();
            for f in &fin {
                let id = f.request.id;
                let n = r.finished.entry(id).or_default();
                *n += 1;
                assert_eq!(*n, 1, "{id} finished twice on {:?} (I7)", r.tx.me());
                assert!(
                    r.open.remove(&id),
                    "{id} finished on {:?}, never registered",
                    r.tx.me()
                );
                assert_eq!(f.request.state(), f.state);
                let ok = matches!(
                    f.state,
                    RequestState::ContextComplete | RequestState::GenComplete
                );
                mine.push((id, ok));
                r.free(&f.request.blocks);
            }
            // Every rank of an instance ends the same requests with the same success.
            match &outcome {
                None => outcome = Some(mine),
                Some(first) => assert_eq!(first, &mine, "ranks of instance {instance} disagree"),
            }
            r.take_events(warn_configured);
        }
    }

    /// Invariants that hold between any two operations.
    pub fn check(&mut self) {
        let warn_configured = self.config.kv_transfer_timeout_ms.is_some();
        let requests = &self.requests;
        for r in self.ctx.iter_mut().chain(self.gen.iter_mut()) {
            r.take_events(warn_configured);
            r.check_agents();
            r.check_stale_refused();
            r.check_staging_exclusive();
            assert_eq!(r.tx.active(), r.open.len(), "{:?}: active count", r.tx.me());
            for (_, job) in r.pending() {
                // I9: nothing is served to a peer that did not present the token.
                let info = requests[&job.request];
                assert!(
                    info.token_match || r.tx.me().instance == GEN,
                    "{}: send job without a matching token (I9)",
                    job.request
                );
            }
        }
    }

    /// Nothing left to do. `jobs_in_flight` counts completions the agent pushed but the
    /// transceiver has not polled yet (e.g. the late fence of an evicted job).
    fn quiet(&self) -> bool {
        self.net.is_empty()
            && self
                .ranks()
                .all(|r| r.pending().is_empty() && r.open.is_empty() && r.tx.jobs_in_flight() == 0)
    }

    /// Completes every job, delivers every message and steps both instances until nothing is
    /// left, then checks that every request ended once everywhere and every resource is back.
    pub fn drain(&mut self) {
        for round in 0..64 {
            self.flush();
            if self.quiet() {
                break;
            }
            self.ranks_mut().for_each(Rank::complete_all);
            self.pump(None);
            self.step(CTX);
            self.step(GEN);
            self.check();
            if round == 8 {
                self.give_up_unanswerable();
            }
        }
        self.flush();
        assert!(
            self.quiet(),
            "not quiet after the drain: {}",
            self.describe_open()
        );
        for r in self.ranks() {
            let s = r.tx.staging_counters();
            assert_eq!(
                (s.in_use, s.poisoned, s.fallbacks_live),
                (0, 0, 0),
                "{:?}: staging not back at quiescence (I2): {s:?}",
                r.tx.me()
            );
            let pool = r.pool.lock().unwrap();
            assert_eq!(
                pool.free_count(),
                BLOCKS as usize,
                "{:?}: blocks leaked",
                r.tx.me()
            );
            assert_eq!(pool.pinned_count(), 0);
            assert_eq!(r.tx.jobs_in_flight(), 0);
            for (i, a) in r.agents.iter().enumerate().rev().skip(1) {
                assert_eq!(
                    Arc::strong_count(a),
                    1,
                    "{:?}: old agent {i} kept alive",
                    r.tx.me()
                );
            }
        }
        // Quiet means nothing registered is still open: every registration ended, once.
        for r in self.ranks() {
            assert!(r.finished.values().all(|n| *n == 1));
        }
    }

    /// A context request whose generation side showed the wrong token is never asked for by
    /// a valid peer: nothing in the core ends it but the executor (or a sender timeout).
    /// Every other request must have ended on its own by now.
    fn give_up_unanswerable(&mut self) {
        let now = self.now;
        let requests = self.requests.clone();
        for r in &mut self.ctx {
            for id in r.open.clone() {
                if !requests[&id].token_match {
                    r.tx.cancel(now, id);
                }
            }
        }
    }

    fn describe_open(&self) -> String {
        let mut s = format!("{} messages queued;", self.net.len());
        for r in self.ranks() {
            s += &format!(
                " {:?}: open {:?}, {} jobs pending;",
                r.tx.me(),
                r.open,
                r.pending().len()
            );
        }
        s
    }
}

fn nth(requests: &BTreeMap<RequestId, ReqInfo>, pick: usize) -> Option<RequestId> {
    if requests.is_empty() {
        return None;
    }
    requests.keys().nth(pick % requests.len()).copied()
}

/// Ranks of one instance share config and history, so admission must agree across them.
fn all_or_none(admitted: &[bool], what: &str) -> bool {
    let ok = admitted.iter().all(|a| *a);
    assert!(
        ok || admitted.iter().all(|a| !a),
        "{what} ranks disagree on admission"
    );
    ok
}
