//! One seed: the cluster, the client, the fault injector, and the run to quiescence.
//!
//! Time line of a seed (simulated): the client issues every request of the workload (the load
//! phase, which may outlast the faults); faults strike until the heal time (the scenario's
//! `Horizon`: the horizon's heal time (`Horizon::heal_at`) on the short one) when every partition, clog and spike heals (crashed
//! instances restart within `MAX_RESTART_MS`, before it). Liveness bound (I7): every request
//! that was not lost with a crashed instance reaches a terminal state on every instance it
//! was started on within the drain bound (`DRAIN` on the short horizon) after the later of
//! the heal and the client's last request. Quiescence is only looked for once the client has
//! issued every request: before, a lull between arrivals looks idle and would end the seed with
//! part of the workload never simulated.

use crate::agent::AgentRegistry;
use crate::attribution::{self, Reach, Refusal};
use crate::checker::Checker;
use crate::coverage::Window;
use crate::faults::{FaultKind, FaultMix, MAX_RESTART_MS};
use crate::gray;
use crate::horizon::Horizon;
use crate::mailbox::Command;
use crate::rank::{run_rank, Instance, RankShared};
use crate::report::{Invariant, SeedReport};
use crate::router::Outcomes;
use crate::scenario::Scenario;
use crate::schedule::{RequestSpec, Schedule, Script};
use crate::world::{World, ROGUE_INSTANCE};
use kvferry_core::blocks::BlockPool;
use kvferry_core::blocks::BlockRef;
use kvferry_core::layout::CacheLayout;
use kvferry_core::transceiver::Side;
use kvferry_core::wire::{ErrorCode, Message, RequestInfo};
use kvferry_core::{PeerId, RequestId, TransferToken};
use madsim::rand::Rng;
use std::collections::BTreeMap;
use std::future::Future;
use std::ops::Deref;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// KV blocks per instance.
pub const BLOCKS_PER_INSTANCE: u32 = 192;
/// Blocks of one request (prompt length / tokens per block), drawn in 1..=this.
pub const MAX_REQUEST_BLOCKS: usize = 8;
/// Prefill time before the generation side is asked.
pub const PREFILL_US: (u64, u64) = (200, 3000);
/// Liveness bound after the horizon's heal time (`Horizon::heal_at`) (see the module docs), on the short horizon.
pub const DRAIN: Duration = Duration::from_millis(Horizon::SHORT.drain_ms);
/// How often the end-of-seed watcher looks for quiescence.
pub const SETTLE_POLL: Duration = Duration::from_millis(5);
/// How long an executor recycle counts as acting on its instance (I10): the rank swaps its
/// agent as soon as it runs, and the old agent's jobs end soon after.
pub const RECYCLE_REACH: Duration = Duration::from_millis(2);
/// Grace after quiescence (and after the stop) for every rank to run once more.
pub const GRACE: Duration = Duration::from_millis(1);

/// One seed's cluster: the world (the leaves every task shares) and, above it, the live
/// instances and the agents' registry. Only the seed's own tasks hold it; nothing it owns
/// points back to it, so it is freed when the seed's runtime ends.
#[derive(Debug)]
pub struct Sim {
    pub world: Arc<World>,
    pub instances: Mutex<BTreeMap<u32, Arc<Instance>>>,
    pub registry: Arc<AgentRegistry>,
    next_uid: Mutex<u32>,
    /// When the client issued its last request (simulated microseconds); `None` while it runs.
    client_done_us: Mutex<Option<u64>>,
}

/// The cluster is the world plus its instances: world methods read plainly on it.
impl Deref for Sim {
    type Target = World;

    fn deref(&self) -> &World {
        &self.world
    }
}

impl Sim {
    pub fn instance(&self, uid: u32) -> Option<Arc<Instance>> {
        self.instances
            .lock()
            .expect("instances lock")
            .get(&uid)
            .cloned()
    }

    fn live_instances(&self) -> Vec<Arc<Instance>> {
        let m = self.instances.lock().expect("instances lock");
        m.values().cloned().collect()
    }

    /// Starts a fresh incarnation of instance `index` of `side`.
    fn start_instance(self: &Arc<Self>, side: Side, index: u32) -> Arc<Instance> {
        let uid = {
            let mut n = self.next_uid.lock().expect("uid lock");
            *n += 1;
            *n
        };
        // Checked by `Scenario::check` before the seed started.
        let layout = self.scenario.layout(side);
        let k = if side == Side::Context { "ctx" } else { "gen" };
        let ranks = (0..layout.world_size())
            .map(|r| {
                Arc::new(RankShared::new(
                    PeerId {
                        instance: uid,
                        rank: r,
                    },
                    format!("{k}{index}/r{r}"),
                    layout.with_rank(r),
                    BLOCKS_PER_INSTANCE,
                ))
            })
            .collect::<Vec<_>>();
        let pool = BlockPool::with_bugs(BLOCKS_PER_INSTANCE, self.scenario.bugs);
        let inst = Arc::new(Instance::new(
            (side, index, uid),
            layout,
            Arc::new(Mutex::new(pool)),
            ranks,
        ));
        let mailboxes = inst.ranks.iter().map(|r| r.mailbox.clone()).collect();
        self.world.join(uid, mailboxes);
        self.instances
            .lock()
            .expect("instances lock")
            .insert(uid, inst.clone());
        self.router
            .lock()
            .expect("router lock")
            .set_slot(side, index, Some(uid));
        for r in &inst.ranks {
            madsim::task::spawn(run_rank(
                self.world.clone(),
                self.registry.clone(),
                inst.clone(),
                r.clone(),
            ));
        }
        self.trace(&format!("{k}{index}"), format!("incarnation {uid} up"));
        inst
    }

    /// Crash: the whole instance loses its state; peers see their transfers reset.
    fn crash(self: &Arc<Self>, uid: u32) {
        let Some(inst) = self.instances.lock().expect("instances lock").remove(&uid) else {
            return;
        };
        if inst.round_open() {
            self.window(Window::CrashDuringCollective);
        }
        self.world.leave(uid);
        self.registry.forget(uid);
        inst.kill();
        self.fault(
            FaultKind::Crash,
            u64::MAX,
            Reach::Instances(vec![uid]),
            format!("{} (incarnation {uid})", inst.name()),
        );
        self.router
            .lock()
            .expect("router lock")
            .set_slot(inst.side, inst.index, None);
        let others: Vec<Arc<Instance>> = self.live_instances();
        for o in &others {
            for r in &o.ranks {
                let agents = r.agents.lock().expect("agents lock").clone();
                for a in agents {
                    a.peer_crashed(uid);
                }
            }
        }
        let now = self.now_us();
        let cancels = self
            .router
            .lock()
            .expect("router lock")
            .instance_lost(uid, now);
        for (ctx_uid, id) in cancels {
            self.command_all(ctx_uid, |_| Command::Cancel(id));
        }
        self.restart_later(inst.side, inst.index);
    }

    /// Silent death: the instance stops, but nothing resets. It stays joined, so what peers
    /// send it is accepted and vanishes (`Fabric::silence`), and no peer's transfer fails
    /// for it: only heartbeats tell them. The scheduler stops routing to it and counts its
    /// requests lost, as for a crash, but tells no peer (no cancels). A fresh incarnation
    /// comes up later, as after a crash.
    fn silent_death(self: &Arc<Self>, uid: u32) {
        let Some(inst) = self.instances.lock().expect("instances lock").remove(&uid) else {
            return;
        };
        if inst.round_open() {
            self.window(Window::CrashDuringCollective);
        }
        self.fabric.lock().expect("fabric lock").silence(uid);
        inst.kill();
        self.fault(
            FaultKind::SilentDeath,
            u64::MAX,
            Reach::Instances(vec![uid]),
            format!("{} (incarnation {uid})", inst.name()),
        );
        let now = self.now_us();
        let mut router = self.router.lock().expect("router lock");
        router.set_slot(inst.side, inst.index, None);
        // The cancels a crash would send are exactly what a silent death never gives.
        let _untold = router.instance_lost(uid, now);
        drop(router);
        self.restart_later(inst.side, inst.index);
    }

    /// A fresh incarnation of (`side`, `index`) within `MAX_RESTART_MS`.
    fn restart_later(self: &Arc<Self>, side: Side, index: u32) {
        // Held weakly, as by every timed fault task (see `later`).
        let sim = Arc::downgrade(self);
        madsim::task::spawn(async move {
            let ms = madsim::rand::thread_rng().gen_range(1..MAX_RESTART_MS);
            madsim::time::sleep(Duration::from_millis(ms)).await;
            if let Some(sim) = sim.upgrade().filter(|s| !s.stopped()) {
                sim.start_instance(side, index);
            }
        });
    }
}

fn rand_range(lo: u64, hi: u64) -> u64 {
    madsim::rand::thread_rng().gen_range(lo..hi)
}

/// Blocks for request `id` on an instance of `side`, or why the client could not get them.
fn admit(
    sim: &Sim,
    side: Side,
    id: RequestId,
    n: usize,
) -> Result<(Arc<Instance>, Vec<BlockRef>), Refusal> {
    let uid = sim.router.lock().expect("router lock").pick(side);
    let inst = uid
        .and_then(|u| sim.instance(u))
        .ok_or(Refusal::NoInstance)?;
    if sim.strike(FaultKind::AllocFail, sim.mix.alloc_fail) {
        sim.fault(
            FaultKind::AllocFail,
            sim.now_us(),
            Reach::Request(id),
            format!("{id} on {}", inst.name()),
        );
        return Err(Refusal::AllocFail);
    }
    let blocks = inst.pool.lock().expect("block pool lock").allocate(id, n);
    match blocks {
        Ok(blocks) => Ok((inst, blocks)),
        Err(_) => {
            sim.trace("client", format!("{id}: no blocks on {}", inst.name()));
            Err(Refusal::NoBlocks)
        }
    }
}

fn refuse(sim: &Sim, id: RequestId, side: Side, why: Refusal) {
    let now = sim.now_us();
    sim.router
        .lock()
        .expect("router lock")
        .rejected(id, side, why, now);
}

/// The client: submits requests, prefills them, asks a generation instance for them. Its
/// random numbers are taken in the same order with or without a given workload (`schedule`).
async fn client(sim: Arc<Sim>) {
    for k in 0..sim.script.request_count(sim.scenario.requests) {
        let gap = rand_range(0, 2 * sim.scenario.horizon.arrival_gap_us);
        let at = sim.script.arrival_us(k, sim.now_us() + gap);
        madsim::time::sleep(Duration::from_micros(at.saturating_sub(sim.now_us()))).await;
        let token = TransferToken(madsim::rand::thread_rng().gen::<u128>());
        let drawn = RequestSpec {
            id: u64::from(k) + 1,
            // The time it was due, not the time the client woke (a sleeper may wake a little
            // later): a replay sleeps toward the same due time, from the same instant.
            at_us: at,
            blocks: rand_range(1, MAX_REQUEST_BLOCKS as u64 + 1) as u32,
            prefill_us: 0,
        };
        let spec = sim.script.request(k, drawn);
        let (id, n) = (RequestId(spec.id), spec.blocks as usize);
        let now = sim.now_us();
        sim.router
            .lock()
            .expect("router lock")
            .add(id, token, n, now);
        let (inst, blocks) = match admit(&sim, Side::Context, id, n) {
            Ok(got) => got,
            Err(why) => {
                refuse(&sim, id, Side::Context, why);
                continue;
            }
        };
        let ids: Vec<u32> = blocks.iter().map(|b| b.id).collect();
        for r in &inst.ranks {
            r.memory.lock().expect("memory lock").fill(id.0, &ids);
            let req = kvferry_core::request::Request::new_context(id, token, blocks.clone());
            r.mailbox.command(Command::Start(Arc::new(req)));
        }
        crate::evict::maybe_evict(&sim.world, &inst, id, blocks);
        sim.router
            .lock()
            .expect("router lock")
            .started_ctx(id, inst.uid, ids, inst.layout);
        sim.trace("client", format!("{id}: {n} blocks on {}", inst.name()));
        let s = sim.clone();
        madsim::task::spawn(async move {
            let drawn = rand_range(PREFILL_US.0, PREFILL_US.1);
            let prefill = s.script.prefill_us(id.0, drawn);
            madsim::time::sleep(Duration::from_micros(prefill)).await;
            start_gen(&s, id);
        });
    }
    *sim.client_done_us.lock().expect("client lock") = Some(sim.now_us());
}

fn start_gen(sim: &Arc<Sim>, id: RequestId) {
    let Some((ctx_uid, ctx_ids, ctx_layout, token, n)) =
        sim.router.lock().expect("router lock").gen_ready(id)
    else {
        return;
    };
    let (inst, blocks) = match admit(sim, Side::Generation, id, n) {
        Ok(got) => got,
        Err(why) => {
            if why != Refusal::NoInstance {
                // The context side already holds its blocks and serves them.
                sim.window(Window::AllocationFailureMidPlan);
            }
            refuse(sim, id, Side::Generation, why);
            sim.command_all(ctx_uid, |_| Command::Cancel(id));
            return;
        }
    };
    let source = kvferry_core::request::ContextSource {
        instance: ctx_uid,
        layout: ctx_layout,
        blocks: ctx_ids,
    };
    for r in &inst.ranks {
        let req = kvferry_core::request::Request::new_generation(
            id,
            token,
            blocks.clone(),
            source.clone(),
        );
        r.mailbox.command(Command::Start(Arc::new(req)));
    }
    sim.router
        .lock()
        .expect("router lock")
        .started_gen(id, inst.uid);
}

/// The span of the partition, clog or latency spike of `kind` that just struck: drawn from
/// the horizon (log-uniform in a soak), or the given schedule's.
fn fault_span(sim: &Sim, kind: FaultKind) -> Duration {
    let h = &sim.scenario.horizon;
    let drawn = if h.log_spans {
        h.log_span(madsim::rand::thread_rng().gen())
    } else {
        Duration::from_millis(rand_range(1, h.max_fault_span_ms))
    };
    sim.span(kind, drawn)
}

/// Strikes faults until the horizon's heal time, then heals everything.
async fn injector(sim: Arc<Sim>) {
    while sim.faults_on() {
        madsim::time::sleep(sim.scenario.horizon.fault_tick()).await;
        if !sim.faults_on() {
            break;
        }
        let m = sim.mix;
        let live: Vec<Arc<Instance>> = sim.live_instances();
        let pick_inst = |side: Option<Side>| -> Option<Arc<Instance>> {
            let c: Vec<&Arc<Instance>> = live
                .iter()
                .filter(|i| side.is_none_or(|s| i.side == s))
                .collect();
            (!c.is_empty()).then(|| c[rand_range(0, c.len() as u64) as usize].clone())
        };
        let heal_at = sim.scenario.horizon.heal_at().as_micros() as u64;
        let restart_room = sim.now_us() + (MAX_RESTART_MS + 2) * 1000 < heal_at;
        if sim.strike(FaultKind::Crash, m.crash) && restart_room {
            if let Some(i) = pick_inst(None) {
                sim.crash(i.uid);
            }
        }
        if sim.strike(FaultKind::Partition, m.partition) {
            if let (Some(a), Some(b)) = (
                pick_inst(Some(Side::Context)),
                pick_inst(Some(Side::Generation)),
            ) {
                partition(&sim, &a, &b);
            }
        }
        if sim.strike(FaultKind::Clog, m.clog) {
            if let Some(i) = pick_inst(None) {
                clog(&sim, &i);
            }
        }
        if sim.strike(FaultKind::Latency, m.latency) {
            latency_spike(&sim);
        }
        if sim.strike(FaultKind::Recycle, m.recycle) {
            if let Some(i) = pick_inst(None) {
                let r = &i.ranks[rand_range(0, i.ranks.len() as u64) as usize];
                r.mailbox.recycle();
                let until = sim.now_us() + RECYCLE_REACH.as_micros() as u64;
                sim.fault(
                    FaultKind::Recycle,
                    until,
                    Reach::Instances(vec![i.uid]),
                    r.track.clone(),
                );
            }
        }
        if sim.strike(FaultKind::ClientCancel, m.client_cancel) {
            client_cancel(&sim);
        }
        if sim.strike(FaultKind::RoguePeer, m.rogue_peer) {
            rogue(&sim);
        }
        strike_gray(&sim, &pick_inst, restart_room);
    }
    sim.fabric.lock().expect("fabric lock").heal_all();
    sim.trace("faults", "all faults healed".to_string());
}

/// The gray faults of this tick (`gray`; a silent death is the cluster's, like a crash).
fn strike_gray(
    sim: &Arc<Sim>,
    pick_inst: &dyn Fn(Option<Side>) -> Option<Arc<Instance>>,
    restart_room: bool,
) {
    let m = sim.mix;
    if sim.strike(FaultKind::OneWay, m.one_way) {
        let pair = (
            pick_inst(Some(Side::Context)),
            pick_inst(Some(Side::Generation)),
        );
        if let (Some(c), Some(g)) = pair {
            let (from, to) = if sim.draw(0.5) { (&c, &g) } else { (&g, &c) };
            gray::one_way(&sim.world, from, to);
        }
    }
    if sim.strike(FaultKind::Stall, m.stall) {
        if let Some(i) = pick_inst(None) {
            gray::stall(&sim.world, &i);
        }
    }
    if sim.strike(FaultKind::SilentDeath, m.silent_death) && restart_room {
        if let Some(i) = pick_inst(None) {
            sim.silent_death(i.uid);
        }
    }
}

fn partition(sim: &Arc<Sim>, a: &Instance, b: &Instance) {
    let span = fault_span(sim, FaultKind::Partition);
    let (ua, ub) = (a.uid, b.uid);
    sim.fabric.lock().expect("fabric lock").partition(ua, ub);
    sim.fault(
        FaultKind::Partition,
        sim.until(span),
        Reach::Pair(ua, ub),
        format!("{} | {}", a.name(), b.name()),
    );
    let names = format!("{} | {}", a.name(), b.name());
    later(sim, span, move |w| {
        w.fabric.lock().expect("fabric lock").heal(ua, ub);
        w.trace("faults", format!("heal {names}"));
    });
}

/// Runs `f` on the world after `span`, unless the seed is over by then. The task holds the
/// world weakly, so a fault due after the seed's end finds no world and acts on nothing (its
/// task is dropped when the seed's node is killed: `on_own_node`).
fn later(sim: &Sim, span: Duration, f: impl FnOnce(&World) + Send + 'static) {
    let world = Arc::downgrade(&sim.world);
    madsim::task::spawn(async move {
        madsim::time::sleep(span).await;
        if let Some(w) = world.upgrade() {
            f(&w);
        }
    });
}

fn clog(sim: &Arc<Sim>, i: &Instance) {
    let span = fault_span(sim, FaultKind::Clog);
    let r = &i.ranks[rand_range(0, i.ranks.len() as u64) as usize];
    sim.fabric.lock().expect("fabric lock").clog(r.me);
    sim.fault(
        FaultKind::Clog,
        sim.until(span),
        Reach::Instances(vec![i.uid]),
        r.track.clone(),
    );
    let (me, track) = (r.me, r.track.clone());
    later(sim, span, move |w| {
        w.fabric.lock().expect("fabric lock").unclog(me);
        w.trace("faults", format!("unclog {track}"));
    });
}

fn latency_spike(sim: &Arc<Sim>) {
    let span = fault_span(sim, FaultKind::Latency);
    let us = rand_range(500, 5000);
    sim.fabric.lock().expect("fabric lock").spike_us = us;
    sim.fault(
        FaultKind::Latency,
        sim.until(span),
        Reach::All,
        format!("+{us} us"),
    );
    later(sim, span, |w| {
        w.fabric.lock().expect("fabric lock").spike_us = 0
    });
}

fn client_cancel(sim: &Arc<Sim>) {
    let pick = sim
        .router
        .lock()
        .expect("router lock")
        .pick_live(rand_range(0, 1 << 20));
    if let Some((id, ctx, gen)) = pick {
        sim.fault(
            FaultKind::ClientCancel,
            sim.now_us(),
            Reach::Request(id),
            format!("{id}"),
        );
        sim.coverage(|c| c.client_cancel(id));
        sim.router.lock().expect("router lock").client_cancel(id);
        for uid in [ctx, gen].into_iter().flatten() {
            sim.command_all(uid, |_| Command::Cancel(id));
        }
    }
}

/// The rogue peer's identity: an instance no real incarnation ever gets.
const ROGUE: PeerId = PeerId {
    instance: ROGUE_INSTANCE,
    rank: 7,
};

/// A peer that never got any token tries its luck: it asks for a live request's blocks, or
/// tries to end a live request, or one not registered yet, with a `Cancel` that guesses the
/// token or an `Error`. Without a bug switch none of it may serve a byte or end a request (I9).
fn rogue(sim: &Arc<Sim>) {
    match rand_range(0, 4) {
        0 => rogue_request_info(sim),
        1 => rogue_abort_live(sim),
        _ => rogue_abort_early(sim),
    }
}

/// A forged abort: a `Cancel` with a guessed token, or an `Error` (which carries none).
fn forged_abort(request: RequestId) -> Message {
    if madsim::rand::thread_rng().gen_bool(0.5) {
        Message::Cancel {
            request,
            token: TransferToken(madsim::rand::thread_rng().gen::<u128>()),
        }
    } else {
        Message::Error {
            request,
            code: ErrorCode::Cancelled,
            detail: "rogue abort".into(),
        }
    }
}

fn deliver_all(sim: &Sim, uids: &[u32], msg: &Message) {
    for uid in uids {
        if let Some(inst) = sim.instance(*uid) {
            for r in &inst.ranks {
                r.mailbox.deliver(ROGUE, msg.clone());
            }
        }
    }
}

/// Tries to end a live request on every rank of its instances.
fn rogue_abort_live(sim: &Arc<Sim>) {
    let pick = sim
        .router
        .lock()
        .expect("router lock")
        .pick_live(rand_range(0, 1 << 20));
    let Some((id, ctx, gen)) = pick else {
        return;
    };
    let msg = forged_abort(id);
    sim.fault(
        FaultKind::RoguePeer,
        sim.now_us(),
        Reach::Nobody,
        format!("{msg:?} to the instances of live {id}"),
    );
    let uids: Vec<u32> = [ctx, gen].into_iter().flatten().collect();
    deliver_all(sim, &uids, &msg);
}

/// Tries to end a request before it registers: the next few ids the client will issue, on
/// every live instance (a context rank parks an abort for an unknown id).
fn rogue_abort_early(sim: &Arc<Sim>) {
    let next = sim.router.lock().expect("router lock").issued() + 1;
    let id = RequestId(next + rand_range(0, 3));
    let msg = forged_abort(id);
    sim.fault(
        FaultKind::RoguePeer,
        sim.now_us(),
        Reach::Nobody,
        format!("{msg:?} before {id} registers"),
    );
    let uids: Vec<u32> = sim
        .instances
        .lock()
        .expect("instances lock")
        .keys()
        .copied()
        .collect();
    deliver_all(sim, &uids, &msg);
}

/// Asks a context instance for a live request's blocks with a guessed token.
fn rogue_request_info(sim: &Arc<Sim>) {
    let pick = sim
        .router
        .lock()
        .expect("router lock")
        .pick_ctx_live(rand_range(0, 1 << 20));
    let Some((id, ctx_uid, ctx_ids)) = pick else {
        return;
    };
    let Some(inst) = sim.instance(ctx_uid) else {
        return;
    };
    let foreign = madsim::rand::thread_rng().gen_bool(0.3);
    let ctx_blocks: Vec<u32> = if foreign {
        ctx_ids
            .iter()
            .map(|b| (b + 1) % BLOCKS_PER_INSTANCE)
            .collect()
    } else {
        ctx_ids.clone()
    };
    // A layout no real generation rank uses (TP4 x PP2, last rank), so its leg is new.
    let gen_layout = CacheLayout {
        tp_size: 4,
        tp_rank: 3,
        pp_size: 2,
        pp_rank: 1,
        ..inst.layout
    };
    let info = RequestInfo {
        request: id,
        token: TransferToken(madsim::rand::thread_rng().gen::<u128>()),
        gen_layout,
        ctx_blocks,
        gen_blocks: (0..ctx_ids.len() as u32)
            .map(|i| kvferry_core::blocks::BlockRef { id: i, epoch: 1 })
            .collect(),
    };
    sim.fault(
        FaultKind::RoguePeer,
        sim.now_us(),
        Reach::Nobody,
        format!(
            "request info for {id} on {}{}",
            inst.name(),
            if foreign { " (foreign blocks)" } else { "" }
        ),
    );
    deliver_all(sim, &[ctx_uid], &Message::RequestInfo(info));
}

/// Every request settled and every live rank idle (no agent job, no registered request).
fn quiescent(sim: &Sim) -> bool {
    if !sim
        .router
        .lock()
        .expect("router lock")
        .unsettled()
        .is_empty()
    {
        return false;
    }
    let live: Vec<Arc<Instance>> = sim
        .instances
        .lock()
        .expect("instances lock")
        .values()
        .cloned()
        .collect();
    live.iter().all(|i| {
        i.ranks
            .iter()
            .all(|r| r.agent_jobs() == 0 && r.active.load(Ordering::Relaxed) == 0)
    })
}

/// I2 at quiescence: every staging slot of every live rank is free again.
fn check_staging(sim: &Sim) {
    let live: Vec<Arc<Instance>> = sim
        .instances
        .lock()
        .expect("instances lock")
        .values()
        .cloned()
        .collect();
    for i in &live {
        for r in &i.ranks {
            let c = *r.staging.lock().expect("staging lock");
            if c.in_use != 0 || c.poisoned != 0 || c.fallbacks_live != 0 {
                sim.violate(
                    Invariant::I2,
                    format!(
                        "{} at quiescence: {} staging slots in use, {} poisoned, {} fallbacks \
                         live",
                        r.track, c.in_use, c.poisoned, c.fallbacks_live
                    ),
                );
            }
        }
    }
}

/// Waits until the client has issued every request and faults have healed, then for
/// quiescence, bounded by the horizon's drain bound after the later of the two; reports I7 and
/// I2. Returns the convergence time (two-phase liveness): from the later of the two to
/// quiescence, or the bound itself when the seed never got there.
async fn settle(sim: &Arc<Sim>) -> u64 {
    let (heal_at, drain) = (sim.scenario.horizon.heal_at(), sim.scenario.horizon.drain());
    madsim::time::sleep(heal_at + GRACE).await;
    let client_done = loop {
        if let Some(at) = *sim.client_done_us.lock().expect("client lock") {
            break at;
        }
        madsim::time::sleep(SETTLE_POLL).await;
    };
    let calm = client_done.max(heal_at.as_micros() as u64);
    let deadline = calm + drain.as_micros() as u64;
    loop {
        if quiescent(sim) {
            let converged = sim.now_us().saturating_sub(calm);
            // Every rank publishes its counters after each pass; a grace lets the last pass
            // of a rank woken at the quiescent instant finish.
            madsim::time::sleep(GRACE).await;
            check_staging(sim);
            crate::reclaim::check_blocks(sim, &sim.live_instances());
            return converged;
        }
        if sim.now_us() >= deadline {
            let stuck = sim.router.lock().expect("router lock").unsettled();
            crate::hang::report_pending_jobs(sim, &sim.live_instances(), &stuck);
            for (id, what) in stuck.iter().take(4) {
                sim.violate(
                    Invariant::I7,
                    format!(
                        "{id} not terminal {} ms after faults healed and the last request \
                         arrived: {what}",
                        drain.as_millis()
                    ),
                );
            }
            if stuck.is_empty() {
                sim.violate(
                    Invariant::I7,
                    "ranks still busy after the drain bound".to_string(),
                );
            }
            return drain.as_micros() as u64;
        }
        madsim::time::sleep(SETTLE_POLL).await;
    }
}

/// Samples the sizes of every live rank and instance every `every` until the seed stops (I11).
async fn sample_sizes(sim: Arc<Sim>, every: Duration) {
    while !sim.stopped() {
        crate::sampler::observe(&sim.world, &sim.live_instances());
        madsim::time::sleep(every).await;
    }
}

async fn run(
    seed: u64,
    scenario: Scenario,
    checker: Arc<Mutex<Checker>>,
    script: Arc<Script>,
) -> SeedReport {
    let mix = if scenario.fault_rate > 0.0 {
        FaultMix::draw(&scenario)
    } else {
        FaultMix::none()
    };
    let sim = Arc::new(Sim {
        world: Arc::new(World::new(scenario, mix, checker, script)),
        instances: Mutex::new(BTreeMap::new()),
        registry: Arc::new(AgentRegistry::default()),
        next_uid: Mutex::new(0),
        client_done_us: Mutex::new(None),
    });
    sim.trace("faults", format!("mix {:?}", sim.mix));
    sim.trace("faults", format!("transfer mode {:?}", sim.mode));
    for i in 0..sim.scenario.ctx_instances {
        sim.start_instance(Side::Context, i);
    }
    for i in 0..sim.scenario.gen_instances {
        sim.start_instance(Side::Generation, i);
    }
    madsim::task::spawn(client(sim.clone()));
    madsim::task::spawn(injector(sim.clone()));
    let sampling = sim.scenario.horizon.sample_every();
    if let Some(every) = sampling {
        madsim::task::spawn(sample_sizes(sim.clone(), every));
    }
    let converged_us = settle(&sim).await;
    if sampling.is_some() && quiescent(&sim) {
        // The growth rule's second half (I11): after the tail, everything is back.
        madsim::time::sleep(crate::sampler::tail(&sim.tx_config)).await;
        crate::sampler::settled(&sim.world, &sim.live_instances());
    }
    let sim_time_us = sim.now_us();
    sim.world.stop();
    // Let every rank, rung by the stop, exit.
    madsim::time::sleep(GRACE).await;
    let (mut outcomes, lives) = {
        let r = sim.router.lock().expect("router lock");
        (r.outcomes(), r.lifetimes())
    };
    let planned = u64::from(sim.scenario.requests);
    let mut checker = std::mem::take(&mut *sim.checker.lock().expect("checker lock"));
    let found = attribution::attribute(&lives, &checker.footprints);
    for (at, detail) in found.unattributed {
        checker.violate(Invariant::I10, at, detail);
    }
    outcomes.failures_by_cause = found.by_cause;
    outcomes.failures_by_core_cause = found.by_core_cause;
    let mut r = report(seed, sim_time_us, planned, outcomes, checker);
    r.convergence_us = converged_us;
    r
}

fn report(
    seed: u64,
    sim_time_us: u64,
    planned: u64,
    outcomes: Outcomes,
    checker: Checker,
) -> SeedReport {
    let peaks = checker.growth.peaks();
    let rec = checker.into_parts();
    SeedReport {
        seed,
        sim_time_us,
        events: rec.events,
        requests_planned: planned,
        requests_issued: outcomes.issued,
        requests_completed: outcomes.completed,
        requests_failed: outcomes.failed,
        requests_cancelled: outcomes.cancelled,
        faults: rec.faults,
        failures_by_cause: outcomes.failures_by_cause,
        failures_by_core_cause: outcomes.failures_by_core_cause,
        violations: rec.violations,
        trace_hash: rec.trace_hash,
        trace: rec.trace,
        convergence_us: 0,
        coverage: rec.coverage,
        peaks,
    }
}

/// Runs a seed's body on a node of its own and kills that node when the body returns.
///
/// madsim keeps a task alive for as long as the task is pending (its bookkeeping holds the
/// task's own waker) and drops nothing when the runtime goes, so a task still waiting at the
/// end of a seed (a rank on its doorbell, a pump on an empty link, a heal scheduled after the
/// end) would leak with everything it holds. Killing the node wakes each of them, and the
/// executor drops a killed task's future instead of polling it.
async fn on_own_node<T: Send + 'static>(body: impl Future<Output = T> + Send + 'static) -> T {
    let handle = madsim::runtime::Handle::current();
    let node = handle.create_node().name("cluster").build();
    let out = node
        .spawn(body)
        .await
        .expect("a seed's body is never cancelled before it returns");
    handle.kill(node.id());
    // The killed tasks are queued now; one more executor pass drops them.
    madsim::task::yield_now().await;
    out
}

/// Simulates one seed of `scenario` to quiescence and checks every invariant. The scenario
/// must pass `Scenario::check` (the CLI checks it once per campaign).
///
/// A panic inside the simulation (a core assertion tripped by a state that an earlier
/// violation created, e.g. a bug switch freeing pinned blocks) ends the seed: if the checker
/// had already reported a violation, the report is returned with it (the panic is its
/// consequence, noted in the trace); otherwise the panic propagates, a simulator bug.
pub fn run_seed(seed: u64, scenario: &Scenario, keep_trace: bool) -> SeedReport {
    run_schedule(seed, scenario, None, keep_trace).0
}

/// Simulates one seed as `run_seed` does, its faults and workload decided by `schedule` when
/// one is given (see `schedule`). Returns the report and the schedule the seed followed: its
/// own draws recorded, or what of `schedule` struck, with the times it struck.
pub fn run_schedule(
    seed: u64,
    scenario: &Scenario,
    schedule: Option<&Schedule>,
    keep_trace: bool,
) -> (SeedReport, Schedule) {
    let checker = Arc::new(Mutex::new(Checker::new(keep_trace)));
    let script = Arc::new(Script::new(schedule.cloned()));
    let mut scenario = scenario.clone();
    scenario.requests = script.request_count(scenario.requests);
    let scenario_requests = scenario.requests;
    let (c, s) = (checker.clone(), script.clone());
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let rt = madsim::runtime::Runtime::with_seed_and_config(seed, madsim::Config::default());
        rt.block_on(on_own_node(run(seed, scenario, c, s)))
    }));
    (
        settled(seed, res, checker, scenario_requests),
        script.take(),
    )
}

/// The report of a seed whose body returned `res` (see `run_seed` for a panic's).
fn settled(
    seed: u64,
    res: std::thread::Result<SeedReport>,
    checker: Arc<Mutex<Checker>>,
    scenario_requests: u32,
) -> SeedReport {
    match res {
        Ok(r) => r,
        Err(payload) => {
            let mut c = std::mem::take(&mut *checker.lock().unwrap_or_else(|e| e.into_inner()));
            if c.violations.is_empty() {
                std::panic::resume_unwind(payload);
            }
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let at = c.violations.iter().map(|v| v.at_us).max().unwrap_or(0);
            c.instant(
                at,
                "violations",
                format!("simulation panicked after the violation: {msg}"),
            );
            let planned = u64::from(scenario_requests);
            report(seed, at, planned, Outcomes::default(), c)
        }
    }
}
