//! An instance and the executor loop of each of its ranks, modelled on the reference
//! scheduler's step: take new work and cancels, feed control messages, let time pass, run the
//! completion step (status check + collective + agreement), then release what ended.
//!
//! # Stepping: no tick
//!
//! A rank sleeps until something is due: an input (a message, a command, a recycle order, an
//! agent completion: each rings the rank's doorbell), its transceiver's `poll_timeout()`, a
//! retry of a failed collective round, or a round its instance wants. Every rank of an
//! instance must enter every completion round (I7, rank symmetry), so rounds are decided per
//! instance: a rank that has something to agree (`poll_timeout()` is due now: a request
//! finished locally) asks its instance for the next round and rings every rank of it, and
//! each rank takes each round its instance wants, in order, idle or not. The ranks thus enter
//! the same rounds without a clock of their own; an idle instance sleeps.

use crate::agent::{AgentInner, AgentParts, AgentRegistry, SimAgent};
use crate::coverage::Window;
use crate::growth::Marks;
use crate::mailbox::{Command, Mailbox};
use crate::memory::RankMemory;
use crate::net::{self, Barrier, SendError, SimCollective};
use crate::report::Invariant;
use crate::world::{World, ROGUE_INSTANCE};
use kvferry_core::blocks::BlockPool;
use kvferry_core::bugs::Bug;
use kvferry_core::collective::{agree, CollectiveError};
use kvferry_core::layout::CacheLayout;
use kvferry_core::request::RequestState;
use kvferry_core::staging::StagingCounters;
use kvferry_core::transceiver::{
    FailCause, Finished, Side, Transceiver, TransceiverParts, TxEvent,
};
use kvferry_core::wire::Message;
use kvferry_core::{PeerId, RequestId};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A failed completion round (a rank missing past the collective's timeout) is retried after
/// this, while the rank still has requests to agree: nothing else would ask for a round.
pub const ROUND_RETRY: Duration = Duration::from_millis(1);

/// One incarnation of a context or generation instance.
#[derive(Debug)]
pub struct Instance {
    pub side: Side,
    pub index: u32,
    pub uid: u32,
    /// Rank 0's layout; `with_rank` gives the others.
    pub layout: CacheLayout,
    pub alive: Arc<AtomicBool>,
    pub pool: Arc<Mutex<BlockPool>>,
    pub barrier: Arc<Mutex<Barrier>>,
    pub ranks: Vec<Arc<RankShared>>,
    /// Completion rounds the instance wants: every rank takes rounds `0..wanted`, in order.
    rounds_wanted: Mutex<u64>,
}

impl Instance {
    pub fn new(
        (side, index, uid): (Side, u32, u32),
        layout: CacheLayout,
        pool: Arc<Mutex<BlockPool>>,
        ranks: Vec<Arc<RankShared>>,
    ) -> Instance {
        Instance {
            side,
            index,
            uid,
            layout,
            alive: Arc::new(AtomicBool::new(true)),
            pool,
            barrier: Arc::new(Mutex::new(Barrier::new(ranks.len()))),
            ranks,
            rounds_wanted: Mutex::new(0),
        }
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    pub fn name(&self) -> String {
        let k = if self.side == Side::Context {
            "ctx"
        } else {
            "gen"
        };
        format!("{k}{}", self.index)
    }

    /// Crashed: every rank wakes, sees it and exits.
    pub fn kill(&self) {
        self.alive.store(false, Ordering::Relaxed);
        for r in &self.ranks {
            r.mailbox.wake.ring();
        }
    }

    /// A rank that has taken `taken` rounds wants one more: every rank will take it.
    fn want_round(&self, taken: u64) {
        {
            let mut w = self.rounds_wanted.lock().expect("rounds lock");
            if *w > taken {
                return; // already wanted: its ranks were rung then
            }
            *w = taken + 1;
        }
        for r in &self.ranks {
            r.mailbox.wake.ring();
        }
    }

    /// Whether a completion round is open: wanted by a rank and not decided yet.
    pub fn round_open(&self) -> bool {
        let wanted = *self.rounds_wanted.lock().expect("rounds lock");
        self.barrier.lock().expect("barrier lock").open(wanted)
    }

    /// Whether a rank that has taken `taken` rounds has another one to take.
    fn round_wanted(&self, taken: u64) -> bool {
        *self.rounds_wanted.lock().expect("rounds lock") > taken
    }
}

/// What the rest of the simulation sees of a rank.
#[derive(Debug)]
pub struct RankShared {
    pub me: PeerId,
    pub track: String,
    pub layout: CacheLayout,
    pub mailbox: Arc<Mailbox>,
    pub memory: Arc<Mutex<RankMemory>>,
    /// Every agent of this incarnation: receives may still sit in an old one after a recycle.
    pub agents: Mutex<Vec<Arc<AgentInner>>>,
    pub staging: Mutex<StagingCounters>,
    pub active: AtomicUsize,
    /// What each table of the transceiver held after its last pass, and at most since the
    /// last sample (the growth rule, I11).
    pub sizes: Mutex<Marks>,
}

impl RankShared {
    pub fn new(me: PeerId, track: String, layout: CacheLayout, blocks: u32) -> RankShared {
        RankShared {
            me,
            mailbox: Arc::new(Mailbox::new(me, track.clone())),
            track,
            layout,
            memory: Arc::new(Mutex::new(RankMemory::new(layout, blocks))),
            agents: Mutex::new(Vec::new()),
            staging: Mutex::new(StagingCounters::default()),
            active: AtomicUsize::new(0),
            sizes: Mutex::new(Marks::default()),
        }
    }

    pub fn agent_jobs(&self) -> usize {
        let agents = self.agents.lock().expect("agents lock");
        agents.iter().map(|a| a.in_flight()).sum()
    }

    pub fn agent_jobs_for(&self, request: RequestId) -> usize {
        let agents = self.agents.lock().expect("agents lock");
        agents.iter().map(|a| a.in_flight_for(request)).sum()
    }
}

/// One rank's executor: its transceiver and its place in the instance's rounds.
struct Executor {
    world: Arc<World>,
    registry: Arc<AgentRegistry>,
    inst: Arc<Instance>,
    rank: Arc<RankShared>,
    tx: Transceiver,
    coll: SimCollective,
    agent_no: u32,
    current: Arc<AgentInner>,
    /// Rounds of the instance this rank has taken (entered, or skipped under the
    /// `skip-idle-collective` bug, which leaves `coll` behind its peers).
    rounds: u64,
    /// When a failed round is retried, if one failed.
    retry_at: Option<Duration>,
    last_err: Option<String>,
}

impl Executor {
    fn new(
        world: Arc<World>,
        registry: Arc<AgentRegistry>,
        inst: Arc<Instance>,
        rank: Arc<RankShared>,
    ) -> Executor {
        let first = new_agent(&world, &registry, &inst, &rank, 0);
        let current = first.inner().clone();
        let tx = Transceiver::new(TransceiverParts {
            me: rank.me,
            layout: rank.layout,
            config: world.tx_config.clone(),
            bugs: world.scenario.bugs,
            agent: Arc::new(first),
            blocks: inst.pool.clone(),
        })
        .expect("the scenario's layout and config are valid");
        let coll = SimCollective {
            world: world.clone(),
            barrier: inst.barrier.clone(),
            next_round: 0,
        };
        Executor {
            world,
            registry,
            inst,
            rank,
            tx,
            coll,
            agent_no: 0,
            current,
            rounds: 0,
            retry_at: None,
            last_err: None,
        }
    }

    fn gone(&self) -> bool {
        !self.inst.is_alive() || self.world.stopped()
    }

    /// Takes every input that arrived, and lets time pass in the transceiver (agent
    /// completions, timers).
    fn take_inputs(&mut self, now: Duration) {
        for c in self.rank.mailbox.take_commands() {
            match c {
                Command::Start(req) => {
                    let id = req.id;
                    let r = match self.inst.side {
                        Side::Context => self.tx.respond_and_send(now, req),
                        Side::Generation => self.tx.request_and_receive(now, req),
                    };
                    if let Err(e) = r {
                        self.world
                            .trace(&self.rank.track, format!("{id} refused: {e}"));
                    }
                }
                Command::Cancel(id) => {
                    self.tx.cancel(now, id);
                }
            }
        }
        if self.rank.mailbox.take_recycle() {
            self.recycle();
        }
        // A stalled reader (`gray`) leaves them queued; its timers still run.
        if !self.rank.mailbox.stalled(self.world.now_us()) {
            for (from, msg) in self.rank.mailbox.take_messages() {
                let token = matches!(msg, Message::RequestInfo(_) | Message::Cancel { .. });
                if from.instance == ROGUE_INSTANCE && token {
                    // A rogue's token is a guess: wrong (I9 says what must come of it).
                    self.world.window(Window::RogueToken);
                }
                self.tx.handle_message(now, from, msg);
            }
        }
        self.tx.handle_timeout(now);
        flush(&self.world, &mut self.tx, now);
    }

    /// An executor recycle: a fresh agent; the old one lives on while its jobs run.
    fn recycle(&mut self) {
        self.agent_no += 1;
        let fresh = new_agent(
            &self.world,
            &self.registry,
            &self.inst,
            &self.rank,
            self.agent_no,
        );
        if self.current.in_flight() > 0 {
            self.world.window(Window::AgentRecycleUnderPendingStatus);
        }
        let old = std::mem::replace(&mut self.current, fresh.inner().clone());
        self.tx.replace_agent(Arc::new(fresh));
        if self.world.scenario.bugs.has(Bug::DropAgentEarly) {
            // The historical bug: the old agent is torn down at recycle, pending or not.
            old.teardown();
        }
    }

    /// Asks the instance for a round if this rank has something to agree now.
    fn ask_round(&mut self, now: Duration) {
        let step_due = self.tx.poll_timeout().is_some_and(|at| at <= now);
        let retry_due = self.retry_at.is_some_and(|at| at <= now);
        if step_due || retry_due {
            self.retry_at = None;
            self.inst.want_round(self.rounds);
        }
    }

    /// Takes the instance's next round; false if the instance died or the seed stopped in it.
    async fn take_round(&mut self, now: Duration) -> bool {
        self.rounds += 1;
        let res = completion_step(
            &self.world,
            &mut self.tx,
            self.inst.side,
            &mut self.coll,
            now,
        )
        .await;
        flush(&self.world, &mut self.tx, now);
        if self.gone() {
            return false;
        }
        handle_events(&self.world, &self.rank, &mut self.tx);
        match res {
            Ok(finished) => {
                self.last_err = None;
                for f in finished {
                    on_finished(&self.world, &self.inst, &self.rank, f);
                }
            }
            Err(e) => {
                if self.tx.active() > 0 {
                    self.retry_at = Some(self.world.now() + ROUND_RETRY);
                }
                // Logged once per kind of error in a row, not once per round.
                let s = format!("collective: {e}");
                let kind: String = s.chars().take(30).collect();
                if self.last_err.as_deref() != Some(kind.as_str()) {
                    self.world.trace(&self.rank.track, s);
                    self.last_err = Some(kind);
                }
            }
        }
        true
    }

    /// After every pass: I1, and the counters the cluster reads at quiescence.
    fn publish(&mut self) {
        handle_events(&self.world, &self.rank, &mut self.tx);
        // I1, continuously: the agent never runs a job the transceiver no longer accounts for
        // (whose pins and slot it has therefore already given back).
        let agent_jobs = self.rank.agent_jobs();
        if agent_jobs > self.tx.jobs_in_flight() {
            self.world.violate(
                Invariant::I1,
                format!(
                    "{}: agent runs {agent_jobs} jobs, transceiver accounts for {}: resources \
                     released under a running transfer",
                    self.rank.track,
                    self.tx.jobs_in_flight()
                ),
            );
        }
        *self.rank.staging.lock().expect("staging lock") = self.tx.staging_counters();
        self.rank.active.store(self.tx.active(), Ordering::Relaxed);
        let sizes = self.tx.sizes();
        self.rank.sizes.lock().expect("sizes lock").publish(sizes);
    }

    /// When this rank must run next if nothing rings it.
    fn deadline(&self) -> Option<Duration> {
        [self.tx.poll_timeout(), self.retry_at]
            .into_iter()
            .flatten()
            .min()
    }
}

fn new_agent(
    world: &Arc<World>,
    registry: &Arc<AgentRegistry>,
    inst: &Instance,
    rank: &RankShared,
    number: u32,
) -> SimAgent {
    let a = SimAgent::new(AgentParts {
        world: world.clone(),
        registry: registry.clone(),
        wake: rank.mailbox.wake.clone(),
        me: rank.me,
        track: rank.track.clone(),
        number,
        alive: inst.alive.clone(),
        memory: rank.memory.clone(),
        pool: inst.pool.clone(),
        block_bytes: rank.layout.block_bytes(),
    });
    rank.agents
        .lock()
        .expect("agents lock")
        .push(a.inner().clone());
    a
}

/// Sends what the transceiver wants sent. A message for an instance that is gone tells the
/// transceiver the peer is lost, so what still needs it fails now; a `RequestInfo` that could
/// not leave fails its request (`handle_info_unsent`), as in the node's driver.
fn flush(world: &Arc<World>, tx: &mut Transceiver, now: Duration) {
    while let Some(t) = tx.poll_transmit() {
        let to = t.to;
        let info = match &t.msg {
            Message::RequestInfo(i) => Some(i.request),
            _ => None,
        };
        let sent = net::send(world, tx.me(), t);
        if let (Err(_), Some(request)) = (&sent, info) {
            tx.handle_info_unsent(now, request);
        }
        match sent {
            Ok(()) => {}
            Err(SendError::Unreachable) => tx.handle_peer_lost(now, to),
            Err(SendError::Backpressure) => {
                world.trace(
                    "net",
                    format!("{} -> {to}: link full, message dropped", tx.me()),
                );
            }
        }
    }
}

/// One completion step: this rank's contribution, the instance's gather, the agreement. An
/// idle rank enters the gather too (I7), unless the `skip-idle-collective` bug is on.
async fn completion_step(
    world: &World,
    tx: &mut Transceiver,
    side: Side,
    coll: &mut SimCollective,
    now: Duration,
) -> Result<Vec<Finished>, CollectiveError> {
    let mine = tx.check_status(now, side, 0).contribution;
    let idle = mine.done.is_empty() && mine.failed.is_empty();
    if idle && world.scenario.bugs.has(Bug::SkipIdleCollective) {
        // The historical bug: an idle rank returns before the collective.
        return Ok(Vec::new());
    }
    let world_size = coll.world_size();
    let all = coll.all_gather(mine).await?;
    Ok(tx.apply_agreed(&agree(&all, world_size)?))
}

/// The executor of one rank, until its instance crashes or the seed stops. Each pass takes
/// the inputs, asks for a round if one is due, takes every round the instance wants, then
/// sleeps until rung or until its next deadline.
pub async fn run_rank(
    world: Arc<World>,
    registry: Arc<AgentRegistry>,
    inst: Arc<Instance>,
    rank: Arc<RankShared>,
) {
    let mut ex = Executor::new(world, registry, inst, rank);
    loop {
        if ex.gone() {
            return;
        }
        let now = ex.world.now();
        ex.take_inputs(now);
        ex.ask_round(now);
        while ex.inst.round_wanted(ex.rounds) {
            let now = ex.world.now();
            flush(&ex.world, &mut ex.tx, now);
            if !ex.take_round(now).await {
                return;
            }
            ex.ask_round(ex.world.now());
        }
        ex.publish();
        let now = ex.world.now();
        let wait = ex.rank.mailbox.wake.clone();
        wait.wait_until(now, ex.deadline()).await;
    }
}

fn handle_events(sim: &World, rank: &RankShared, tx: &mut Transceiver) {
    let events: Vec<TxEvent> = tx.drain_events().collect();
    for (i, e) in events.iter().enumerate() {
        match e {
            TxEvent::TimeoutWarn { request, .. } => {
                let finished_after = events[i + 1..].iter().any(|l| {
                    matches!(l, TxEvent::LocallyFinished { request: r, ok: true, .. } if r == request)
                });
                let at = sim.now_us();
                sim.checker.lock().expect("checker lock").timeout_warn(
                    (rank.me.instance, rank.me.rank),
                    *request,
                    at,
                    sim.scenario.timeout_ms.is_some(),
                    finished_after,
                    &rank.track,
                );
            }
            TxEvent::PeerSilent { .. } => sim.window(Window::HeartbeatDeclaredDead),
            TxEvent::Evicted { transfer, request } => {
                sim.trace(
                    &rank.track,
                    format!("evicted transfer {} of {request}", transfer.0),
                );
            }
            TxEvent::LocallyFinished {
                request,
                ok: false,
                cause: Some(cause),
            } => failed_here(sim, rank, *request, *cause),
            TxEvent::Rejected {
                peer,
                request,
                code,
            } => {
                sim.trace(
                    &rank.track,
                    format!("rejected {request} from {peer}: {code:?}"),
                );
            }
            _ => {}
        }
    }
}

/// A request failed on this rank: its core cause, for the progress check (I10); one ended as
/// peer-aborted although no real rank had sent this rank an abort for it before it decided
/// was ended by a rogue peer (I9, see `Checker::peer_aborted`).
fn failed_here(sim: &World, rank: &RankShared, id: RequestId, cause: FailCause) {
    let at = sim.now_us();
    let rogue = cause == FailCause::PeerAborted
        && sim
            .checker
            .lock()
            .expect("checker lock")
            .peer_aborted(id, rank.me, at, &rank.track);
    let mut router = sim.router.lock().expect("router lock");
    router.failed_on(id, at, &rank.track, cause);
    if rogue {
        router.rogue_ended(id);
    }
}

fn on_finished(sim: &World, inst: &Instance, rank: &RankShared, f: Finished) {
    let id = f.request.id;
    let at = sim.now_us();
    sim.checker.lock().expect("checker lock").terminal(
        (rank.me.instance, rank.me.rank),
        id,
        f.state,
        at,
        &rank.track,
    );
    let ids: Vec<u32> = f.request.blocks.iter().map(|b| b.id).collect();
    if f.state == RequestState::GenComplete {
        if let Some(bad) = rank.memory.lock().expect("memory lock").verify(id.0, &ids) {
            sim.violate(
                Invariant::I6,
                format!("{}: {id} received wrong bytes: {bad}", rank.track),
            );
        }
    }
    // Release: deferred by the pool while any rank's transfer pins the blocks.
    let (before, outcome, after) = {
        let mut pool = inst.pool.lock().expect("block pool lock");
        let before = pool.pinned_count();
        let outcome = pool.free(&f.request.blocks);
        (before, outcome, pool.pinned_count())
    };
    if after < before {
        // Pins held by running transfers were dropped by the free: their writers will land in
        // a freed (soon reassigned) block. Reported here because the next write or unpin may
        // never come, or trip a core assertion first.
        sim.violate(
            Invariant::I5,
            format!(
                "{}: {id} freed {} blocks still pinned by running transfers",
                rank.track,
                before - after
            ),
        );
    }
    if outcome.freed > 0 && before == after {
        let running: usize = inst.ranks.iter().map(|r| r.agent_jobs_for(id)).sum();
        if running > 0 {
            sim.violate(
                Invariant::I1,
                format!(
                    "{}: {id} freed {} blocks, unpinned, while {running} of its transfers run",
                    rank.track, outcome.freed
                ),
            );
        }
    }
    sim.on_terminal((inst.side, inst.uid, rank.me.rank), id, f.state);
}
