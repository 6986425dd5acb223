//! One rank's executor loop, modelled on the reference scheduler's step: take new work and
//! cancels, feed control messages, run the completion step (status check + collective +
//! agreement) every step whether or not there is anything to report, then release what ended.

use crate::agent::{AgentInner, AgentParts, SimAgent};
use crate::cluster::{Instance, Sim};
use crate::memory::RankMemory;
use crate::net::{self, SendError, SimCollective};
use crate::report::Invariant;
use kvferry_core::bugs::Bug;
use kvferry_core::collective::{agree, CollectiveError};
use kvferry_core::layout::CacheLayout;
use kvferry_core::plan::Fragment;
use kvferry_core::request::{Request, RequestState};
use kvferry_core::staging::StagingCounters;
use kvferry_core::transceiver::{
    FailCause, Finished, Side, Transceiver, TransceiverParts, TxEvent,
};
use kvferry_core::wire::Message;
use kvferry_core::{PeerId, RequestId};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Step period of every executor.
pub const TICK: Duration = Duration::from_millis(1);
/// Control messages buffered for one rank between steps.
pub const MAX_INBOX: usize = 8192;
/// Scheduler commands buffered for one rank between steps.
pub const MAX_COMMANDS: usize = 8192;

#[derive(Debug)]
pub enum Command {
    Start(Arc<Request>),
    Cancel(RequestId),
}

/// What the rest of the simulation sees of a rank.
#[derive(Debug)]
pub struct RankShared {
    pub me: PeerId,
    pub track: String,
    pub layout: CacheLayout,
    pub inbox: Mutex<VecDeque<(PeerId, Message)>>,
    pub cmds: Mutex<VecDeque<Command>>,
    pub memory: Arc<Mutex<RankMemory>>,
    /// Every agent of this incarnation: receives may still sit in an old one after a recycle.
    pub agents: Mutex<Vec<Arc<AgentInner>>>,
    pub recycle: AtomicBool,
    pub staging: Mutex<StagingCounters>,
    pub active: AtomicUsize,
}

impl RankShared {
    pub fn new(me: PeerId, track: String, layout: CacheLayout, blocks: u32) -> RankShared {
        RankShared {
            me,
            track,
            layout,
            inbox: Mutex::new(VecDeque::new()),
            cmds: Mutex::new(VecDeque::new()),
            memory: Arc::new(Mutex::new(RankMemory::new(layout, blocks))),
            agents: Mutex::new(Vec::new()),
            recycle: AtomicBool::new(false),
            staging: Mutex::new(StagingCounters::default()),
            active: AtomicUsize::new(0),
        }
    }

    pub fn deliver(&self, from: PeerId, msg: Message) {
        let mut q = self.inbox.lock().expect("inbox lock");
        // A full inbox drops, as a full socket buffer would; the protocol tolerates loss.
        if q.len() < MAX_INBOX {
            q.push_back((from, msg));
        }
    }

    pub fn command(&self, c: Command) {
        let mut q = self.cmds.lock().expect("commands lock");
        assert!(
            q.len() < MAX_COMMANDS,
            "{}: command queue overflow",
            self.track
        );
        q.push_back(c);
    }

    pub fn land(
        &self,
        request: RequestId,
        from: PeerId,
        frags: Vec<Fragment>,
        bytes: Vec<u8>,
    ) -> bool {
        let agents: Vec<Arc<AgentInner>> = self.agents.lock().expect("agents lock").clone();
        // Only one agent holds the receive; the bytes go to it.
        let mut bytes = Some(bytes);
        for a in agents {
            if a.in_flight_for(request) > 0 {
                let b = bytes.take().expect("landed once");
                if a.try_land(request, from, frags.clone(), b.clone()) {
                    return true;
                }
                bytes = Some(b);
            }
        }
        false
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

fn new_agent(sim: &Arc<Sim>, inst: &Instance, rank: &RankShared, number: u32) -> SimAgent {
    let a = SimAgent::new(AgentParts {
        sim: sim.clone(),
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
/// transceiver the peer is lost, so what depended on it fails now.
fn flush(sim: &Arc<Sim>, tx: &mut Transceiver, now: Duration) {
    while let Some(t) = tx.poll_transmit() {
        let to = t.to;
        match net::send(sim, tx.me(), t) {
            Ok(()) => {}
            Err(SendError::Unreachable) => tx.handle_peer_lost(now, to),
            Err(SendError::Backpressure) => {
                sim.trace(
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
    sim: &Arc<Sim>,
    tx: &mut Transceiver,
    side: Side,
    world: usize,
    coll: &mut SimCollective,
    now: Duration,
) -> Result<Vec<Finished>, CollectiveError> {
    let mine = tx.check_status(now, side, 0).contribution;
    let idle = mine.done.is_empty() && mine.failed.is_empty();
    if idle && sim.scenario.bugs.has(Bug::SkipIdleCollective) {
        // The historical bug: an idle rank returns before the collective.
        return Ok(Vec::new());
    }
    let all = coll.all_gather(mine).await?;
    Ok(tx.apply_agreed(&agree(&all, world)?))
}

/// The executor of one rank, until its instance crashes or the seed stops.
pub async fn run_rank(sim: Arc<Sim>, inst: Arc<Instance>, rank: Arc<RankShared>) {
    let mut agent_no = 0u32;
    let first = new_agent(&sim, &inst, &rank, agent_no);
    let mut current: Arc<AgentInner> = first.inner().clone();
    let mut tx = Transceiver::new(TransceiverParts {
        me: rank.me,
        layout: rank.layout,
        config: sim.tx_config.clone(),
        bugs: sim.scenario.bugs,
        agent: Arc::new(first),
        blocks: inst.pool.clone(),
    })
    .expect("the scenario's layout and config are valid");
    let mut coll = SimCollective {
        sim: sim.clone(),
        barrier: inst.barrier.clone(),
        next_round: 0,
    };
    let world = inst.ranks.len();
    let mut next = Duration::from_micros(inst.started_us);
    let mut last_err: Option<String> = None;
    loop {
        next += TICK;
        let now_us = sim.now_us();
        if next.as_micros() as u64 > now_us {
            madsim::time::sleep(next - Duration::from_micros(now_us)).await;
        }
        if !inst.is_alive() || sim.stopped() {
            return;
        }
        let now = Duration::from_micros(sim.now_us());
        let cmds: Vec<Command> = rank.cmds.lock().expect("commands lock").drain(..).collect();
        for c in cmds {
            match c {
                Command::Start(req) => {
                    let id = req.id;
                    let r = match inst.side {
                        Side::Context => tx.respond_and_send(now, req),
                        Side::Generation => tx.request_and_receive(now, req),
                    };
                    if let Err(e) = r {
                        sim.trace(&rank.track, format!("{id} refused: {e}"));
                    }
                }
                Command::Cancel(id) => {
                    tx.cancel(now, id);
                }
            }
        }
        if rank.recycle.swap(false, Ordering::Relaxed) {
            agent_no += 1;
            let fresh = new_agent(&sim, &inst, &rank, agent_no);
            let old = std::mem::replace(&mut current, fresh.inner().clone());
            tx.replace_agent(Arc::new(fresh));
            if sim.scenario.bugs.has(Bug::DropAgentEarly) {
                // The historical bug: the old agent is torn down at recycle, pending or not.
                old.teardown();
            }
        }
        let msgs: Vec<(PeerId, Message)> =
            rank.inbox.lock().expect("inbox lock").drain(..).collect();
        for (from, msg) in msgs {
            tx.handle_message(now, from, msg);
        }
        flush(&sim, &mut tx, now);
        let res = completion_step(&sim, &mut tx, inst.side, world, &mut coll, now).await;
        flush(&sim, &mut tx, now);
        if !inst.is_alive() || sim.stopped() {
            return;
        }
        handle_events(&sim, &rank, &mut tx);
        match res {
            Ok(finished) => {
                last_err = None;
                for f in finished {
                    on_finished(&sim, &inst, &rank, f);
                }
            }
            Err(e) => {
                // Logged once per kind of error in a row, not once per step.
                let s = format!("collective: {e}");
                let kind: String = s.chars().take(30).collect();
                if last_err.as_deref() != Some(kind.as_str()) {
                    sim.trace(&rank.track, s);
                    last_err = Some(kind);
                }
            }
        }
        // I1, continuously: the agent never runs a job the transceiver no longer accounts for
        // (whose pins and slot it has therefore already given back).
        let agent_jobs = rank.agent_jobs();
        if agent_jobs > tx.jobs_in_flight() {
            sim.violate(
                Invariant::I1,
                format!(
                    "{}: agent runs {agent_jobs} jobs, transceiver accounts for {}: resources \
                     released under a running transfer",
                    rank.track,
                    tx.jobs_in_flight()
                ),
            );
        }
        *rank.staging.lock().expect("staging lock") = tx.staging_counters();
        rank.active.store(tx.active(), Ordering::Relaxed);
    }
}

fn handle_events(sim: &Arc<Sim>, rank: &RankShared, tx: &mut Transceiver) {
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
fn failed_here(sim: &Sim, rank: &RankShared, id: RequestId, cause: FailCause) {
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

fn on_finished(sim: &Arc<Sim>, inst: &Instance, rank: &RankShared, f: Finished) {
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
    sim.on_terminal(inst, rank.me.rank, id, f.state);
}
