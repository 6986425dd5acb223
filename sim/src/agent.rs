//! The simulated transfer agent: moves real bytes between ranks' simulated KV memories.
//!
//! The sender drives a job like a one-sided write engine: per chunk it gathers fragments into
//! its staging slot, waits (copy time), ships the slot's bytes over the wire (latency and
//! bandwidth, held while partitioned), and lands them in the receive job's staging slot, from
//! which the receiver scatters into its blocks after another copy delay, checking every block's
//! owner epoch (I5). The gaps between staging writes and reads are where a late writer into a
//! reused slot corrupts bytes (I6), which is the point.
//!
//! Every submitted job completes exactly once (`finish` removes it from the table first), also
//! on cancel, injected error and peer crash; cancel completes only once no chunk of the job is
//! being scattered, so the completion really is a fence. Teardown (the agent's `Drop`, or the
//! `drop-agent-early` bug) sets `torn_down`; a job that writes or completes after it is I3.

mod pull;
mod read_check;

use crate::attribution::Reach;
use crate::checker::RankKey;
use crate::coverage::Window;
use crate::fabric::PARTITION_POLL;
use crate::faults::FaultKind;
use crate::memory::RankMemory;
use crate::report::{Invariant, TraceKind};
use crate::transfer_mode::SeedMode;
use crate::wake::Wake;
use crate::world::{World, ROGUE_INSTANCE};
use kvferry_core::agent::{
    AgentError, Completion, CompletionQueue, Direction, TransferAgent, TransferId, TransferJob,
};
use kvferry_core::blocks::{BlockPool, BlockRef};
use kvferry_core::bugs::Bug;
use kvferry_core::plan::Fragment;
use kvferry_core::staging::SlotBuffer;
use kvferry_core::{PeerId, RequestId};
use madsim::rand::Rng;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// Copy time of a gather or scatter, microseconds.
pub const COPY_US: (u64, u64) = (50, 400);
/// Wire time per chunk beyond latency: nanoseconds per byte (about 100 MB/s: slow on purpose,
/// so transfers overlap ticks, cancels and faults).
pub const NS_PER_BYTE: u64 = 10;
/// One-way data latency, microseconds.
pub const DATA_LATENCY_US: (u64, u64) = (50, 300);
/// Time a backend takes to stop a cancelled job, microseconds.
pub const CANCEL_US: (u64, u64) = (100, 3000);
/// Jobs one agent holds at once; beyond it `submit` refuses (the core fails the leg).
pub const MAX_AGENT_JOBS: usize = 4096;

#[derive(Debug)]
struct JobRec {
    request: RequestId,
    direction: Direction,
    done: CompletionQueue,
    staging: SlotBuffer,
    local: Vec<BlockRef>,
    expected: u64,
    landed: u64,
    chunks: u32,
    /// Injected error: fail after this many chunks.
    fail_after: Option<u32>,
    cancelling: bool,
    /// The peer crashed while a chunk of this send was mid-flight: the send task completes the
    /// job once the chunk stops touching the staging slot, so the completion stays a fence.
    peer_lost: bool,
    /// Chunks landed and not yet scattered (receive) or mid-flight (send).
    busy: u32,
    trace_id: u64,
    /// Injected wedge (`wedged-agent`): the job neither completes nor fails until cancelled.
    wedged: bool,
}

/// Every live rank's agents, held weakly (the rank owns them): how an agent finds its own
/// rank's other agents (the I6 slot check) and a receiving rank's agents (to land bytes)
/// without a reference back up to the cluster.
#[derive(Debug, Default)]
pub struct AgentRegistry {
    by_rank: Mutex<BTreeMap<PeerId, Vec<Weak<AgentInner>>>>,
    /// Each rank's endpoint (its slot and rank, the same across incarnations), kept after a
    /// crash: what a cached endpoint reaches (`pull`, the `stale-endpoint` bug).
    endpoints: Mutex<BTreeMap<PeerId, String>>,
}

impl AgentRegistry {
    fn register(&self, a: &Arc<AgentInner>) {
        let mut m = self.by_rank.lock().expect("registry lock");
        let v = m.entry(a.me).or_default();
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(a));
        drop(m);
        self.remember_endpoint(a.me, &a.track);
    }

    /// Every agent of rank `p` of a live incarnation, oldest first.
    pub fn agents_of(&self, p: PeerId) -> Vec<Arc<AgentInner>> {
        let m = self.by_rank.lock().expect("registry lock");
        let v = m.get(&p).map(Vec::as_slice).unwrap_or_default();
        v.iter().filter_map(Weak::upgrade).collect()
    }

    /// Incarnation `uid` crashed: its agents can no longer be reached.
    pub fn forget(&self, uid: u32) {
        let mut m = self.by_rank.lock().expect("registry lock");
        m.retain(|p, _| p.instance != uid);
    }

    /// A sender's chunk arrives at rank `to`: only one of its agents holds the receive for
    /// `request` from `from`, and the bytes go to it. False if none does.
    fn land(
        &self,
        to: PeerId,
        request: RequestId,
        from: PeerId,
        frags: Vec<Fragment>,
        bytes: Vec<u8>,
    ) -> bool {
        let mut bytes = Some(bytes);
        for a in self.agents_of(to) {
            if a.in_flight_for(request) > 0 {
                let b = bytes.take().expect("landed once");
                if a.land(request, from, frags.clone(), b.clone()) {
                    return true;
                }
                bytes = Some(b);
            }
        }
        false
    }
}

/// The agent's state, shared with its job tasks.
#[derive(Debug)]
pub struct AgentInner {
    world: Arc<World>,
    registry: Arc<AgentRegistry>,
    /// The rank's doorbell, rung on every completion: the driver drains them when it wakes.
    wake: Arc<Wake>,
    pub me: PeerId,
    rank_key: RankKey,
    track: String,
    number: u32,
    alive: Arc<AtomicBool>,
    torn_down: AtomicBool,
    memory: Arc<Mutex<RankMemory>>,
    pool: Arc<Mutex<BlockPool>>,
    block_bytes: u64,
    jobs: Mutex<BTreeMap<TransferId, JobRec>>,
}

/// What the transceiver holds. Its `Drop` is the agent's teardown.
#[derive(Debug)]
pub struct SimAgent {
    inner: Arc<AgentInner>,
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        self.inner.teardown();
    }
}

pub struct AgentParts {
    pub world: Arc<World>,
    pub registry: Arc<AgentRegistry>,
    pub wake: Arc<Wake>,
    pub me: PeerId,
    pub track: String,
    pub number: u32,
    pub alive: Arc<AtomicBool>,
    pub memory: Arc<Mutex<RankMemory>>,
    pub pool: Arc<Mutex<BlockPool>>,
    pub block_bytes: u64,
}

impl SimAgent {
    /// A new agent of rank `p.me`, registered so senders can reach it.
    pub fn new(p: AgentParts) -> SimAgent {
        let registry = p.registry.clone();
        let a = SimAgent {
            inner: Arc::new(AgentInner {
                rank_key: (p.me.instance, p.me.rank),
                world: p.world,
                registry: p.registry,
                wake: p.wake,
                me: p.me,
                track: p.track,
                number: p.number,
                alive: p.alive,
                torn_down: AtomicBool::new(false),
                memory: p.memory,
                pool: p.pool,
                block_bytes: p.block_bytes,
                jobs: Mutex::new(BTreeMap::new()),
            }),
        };
        registry.register(&a.inner);
        a
    }

    pub fn inner(&self) -> &Arc<AgentInner> {
        &self.inner
    }
}

fn rand_us(r: (u64, u64)) -> Duration {
    Duration::from_micros(madsim::rand::thread_rng().gen_range(r.0..r.1))
}

impl AgentInner {
    fn alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed) && !self.world.stopped()
    }

    pub fn is_torn_down(&self) -> bool {
        self.torn_down.load(Ordering::Relaxed)
    }

    pub fn teardown(&self) {
        if !self.torn_down.swap(true, Ordering::Relaxed) && self.alive() {
            let at = self.world.now_us();
            let mut c = self.world.checker.lock().expect("checker lock");
            c.instant(at, &self.track, format!("agent {} torn down", self.number));
        }
    }

    /// Jobs submitted and not completed.
    pub fn in_flight(&self) -> usize {
        self.jobs.lock().expect("agent jobs lock").len()
    }

    pub fn in_flight_for(&self, request: RequestId) -> usize {
        let jobs = self.jobs.lock().expect("agent jobs lock");
        jobs.values().filter(|j| j.request == request).count()
    }

    /// I3: something of this agent touched memory or completed after teardown.
    fn check_alive_agent(&self, what: &str, id: TransferId) {
        if self.is_torn_down() {
            let at = self.world.now_us();
            self.world.checker.lock().expect("checker lock").violate(
                Invariant::I3,
                at,
                format!(
                    "{}: agent {} torn down, then transfer {} {what}",
                    self.track, self.number, id.0
                ),
            );
        }
    }

    /// The one place a completion is pushed: exactly once per job.
    fn finish(&self, id: TransferId, result: Result<u64, AgentError>) {
        if !self.alive() {
            return; // the instance crashed: its queue is gone with it
        }
        let Some(job) = self.jobs.lock().expect("agent jobs lock").remove(&id) else {
            return;
        };
        self.check_alive_agent("pushed its completion", id);
        let at = self.world.now_us();
        {
            let mut c = self.world.checker.lock().expect("checker lock");
            c.job_pushed(self.rank_key, job.request, at);
            let name = match &result {
                Ok(b) => format!("ok {b} B"),
                Err(e) => format!("{e}"),
            };
            c.event(at, &self.track, TraceKind::End { id: job.trace_id }, name);
        }
        job.done.push(Completion { id, result });
        self.wake.ring();
    }

    /// A peer instance crashed: its jobs fail like a reset connection.
    pub fn peer_crashed(&self, instance: u32) {
        let ids: Vec<(TransferId, PeerId)> = {
            let mut jobs = self.jobs.lock().expect("agent jobs lock");
            let mut now = Vec::new();
            for (id, j) in jobs.iter_mut() {
                let peer = peer_of(&j.direction);
                if peer.instance != instance {
                    continue;
                }
                if self.world.mode == SeedMode::Pull {
                    // A pull's other side is gone: a parked send's reader is dead, a reader's
                    // source is (but a reader behind a stale endpoint does not notice).
                    if !(self.stale_endpoint() && matches!(j.direction, Direction::Receive { .. }))
                    {
                        now.push((*id, peer));
                    }
                    continue;
                }
                // A send's chunk in flight still reads its slot: completing it now would let the
                // slot go to another job under that read (I6). Its task completes it instead.
                if j.busy > 0 && matches!(j.direction, Direction::Send { .. }) {
                    j.peer_lost = true;
                } else {
                    now.push((*id, peer));
                }
            }
            now
        };
        for (id, p) in ids {
            self.finish(id, Err(AgentError::PeerUnreachable(p)));
        }
    }

    /// For a send task between steps of a chunk: whether its job is over (completed meanwhile,
    /// or its peer crashed mid-chunk, which completes it now). The task stops if so.
    fn send_over(&self, id: TransferId, to: PeerId) -> bool {
        let lost = match self.jobs.lock().expect("agent jobs lock").get(&id) {
            None => return true,
            Some(j) => j.peer_lost,
        };
        if lost {
            self.set_idle(id);
            self.finish(id, Err(AgentError::PeerUnreachable(to)));
        }
        lost
    }

    /// Another job of this rank's agents holding `staging`, if any.
    fn other_holder(
        &self,
        id: TransferId,
        staging: &SlotBuffer,
    ) -> Option<(TransferId, RequestId)> {
        let agents = self.registry.agents_of(self.me);
        agents.iter().find_map(|a| {
            let jobs = a.jobs.lock().expect("agent jobs lock");
            jobs.iter()
                .find(|(other, j)| {
                    !(std::ptr::eq(a.as_ref(), self) && **other == id)
                        && Arc::ptr_eq(&j.staging, staging)
                })
                .map(|(other, j)| (*other, j.request))
        })
    }

    /// I6, where it starts: job `id` touches its staging slot while another job holds it too.
    /// A slot goes to a new job only once every earlier writer is fenced, so two jobs in flight
    /// on one slot mean a poisoned slot was reused under a late writer: its bytes cross
    /// requests, whether or not a later check of the blocks catches them.
    fn check_slot_owner(
        &self,
        id: TransferId,
        request: RequestId,
        staging: &SlotBuffer,
        what: &str,
    ) {
        if let Some((other, other_request)) = self.other_holder(id, staging) {
            let at = self.world.now_us();
            self.world.checker.lock().expect("checker lock").violate(
                Invariant::I6,
                at,
                format!(
                    "{}: transfer {} of {request} {what} its staging slot while transfer {} of \
                     {other_request} holds it: a poisoned slot was reused under a late writer",
                    self.track, id.0, other.0
                ),
            );
        }
    }

    /// Receiver side: a chunk from `from` for `request` arrives. Lands it in the job's staging
    /// slot at once and scatters it into blocks after a copy delay.
    fn land(
        self: &Arc<Self>,
        request: RequestId,
        from: PeerId,
        frags: Vec<Fragment>,
        bytes: Vec<u8>,
    ) -> bool {
        let (id, staging) = {
            let mut jobs = self.jobs.lock().expect("agent jobs lock");
            let Some((id, job)) = jobs
                .iter_mut()
                .find(|(_, j)| j.request == request && j.direction == Direction::Receive { from })
            else {
                return false;
            };
            job.busy += 1;
            (*id, job.staging.clone())
        };
        self.world.coverage(|c| c.landed(request));
        self.check_alive_agent("landed bytes", id);
        self.check_slot_owner(id, request, &staging, "wrote");
        {
            let mut s = staging.lock().expect("slot buffer lock");
            if s.len() < bytes.len() {
                s.resize(bytes.len(), 0);
            }
            s[..bytes.len()].copy_from_slice(&bytes);
        }
        let me = self.clone();
        let len = bytes.len();
        madsim::task::spawn(async move {
            madsim::time::sleep(rand_us(COPY_US)).await;
            me.scatter(id, staging, frags, len);
        });
        true
    }

    fn scatter(&self, id: TransferId, staging: SlotBuffer, frags: Vec<Fragment>, len: usize) {
        if !self.alive() {
            return;
        }
        let (request, local) = {
            let jobs = self.jobs.lock().expect("agent jobs lock");
            let Some(job) = jobs.get(&id) else {
                return; // failed meanwhile (peer crash): the copy never lands
            };
            (job.request, job.local.clone())
        };
        self.check_alive_agent("scattered into blocks", id);
        let data: Vec<u8> = staging.lock().expect("slot buffer lock")[..len].to_vec();
        let mut at = 0usize;
        {
            let pool = self.pool.lock().expect("block pool lock");
            let mut mem = self.memory.lock().expect("memory lock");
            for f in &frags {
                let block = (f.dst_offset / self.block_bytes) as u32;
                let n = f.len as usize;
                let bref = local.iter().find(|b| b.id == block).copied();
                let ok = match bref {
                    None => Err(format!("block {block} is not among the job's blocks")),
                    Some(b) => pool
                        .check_write(&b)
                        .and_then(|_| pool.check_owner(&b, request))
                        .map_err(|e| e.to_string()),
                };
                match ok {
                    Ok(()) => mem.write(f.dst_offset, &data[at..at + n]),
                    Err(e) => {
                        let now = self.world.now_us();
                        self.world.checker.lock().expect("checker lock").violate(
                            Invariant::I5,
                            now,
                            format!(
                                "{}: transfer {} for {request} wrote a block it does not own: {e}",
                                self.track, id.0
                            ),
                        );
                    }
                }
                at += n;
            }
        }
        let outcome = {
            let mut jobs = self.jobs.lock().expect("agent jobs lock");
            let Some(job) = jobs.get_mut(&id) else {
                return;
            };
            job.busy -= 1;
            job.landed += len as u64;
            job.chunks += 1;
            if job.cancelling {
                None
            } else if job.fail_after.is_some_and(|k| job.chunks > k) {
                Some(Err(AgentError::Backend(
                    "injected failure after a partial write".into(),
                )))
            } else if job.landed >= job.expected && !job.wedged {
                Some(Ok(job.expected))
            } else {
                None
            }
        };
        if let Some(r) = outcome {
            self.finish(id, r);
        }
    }

    /// Sender side: the whole job, chunk by chunk.
    async fn run_send(self: Arc<Self>, id: TransferId, job: TransferJob, to: PeerId) {
        let chunks = chunks_of(&job, self.me.rank);
        let mut sent = 0u64;
        for (k, chunk) in chunks.into_iter().enumerate() {
            let fail = {
                let mut jobs = self.jobs.lock().expect("agent jobs lock");
                let Some(j) = jobs.get_mut(&id) else {
                    return;
                };
                if j.cancelling {
                    return; // its cancel task completes it
                }
                j.busy += 1;
                j.fail_after.is_some_and(|n| k as u32 >= n)
            };
            if !self.alive() {
                return;
            }
            if fail {
                self.set_idle(id);
                self.finish(
                    id,
                    Err(AgentError::Backend("injected failure mid-transfer".into())),
                );
                return;
            }
            // Gather into the staging slot, wait the copy, then ship what the slot holds then.
            let len: usize = chunk.iter().map(|f| f.len as usize).sum();
            self.check_alive_agent("gathered into staging", id);
            self.check_read(&self.track, (id, job.request), &job.local_blocks, &chunk);
            self.gather(&job.staging, &chunk);
            madsim::time::sleep(rand_us(COPY_US)).await;
            if self.send_over(id, to) {
                return;
            }
            self.check_slot_owner(id, job.request, &job.staging, "read");
            let bytes: Vec<u8> = job.staging.lock().expect("slot buffer lock")[..len].to_vec();
            let spike = self.world.fabric.lock().expect("fabric lock").spike_us;
            let wire = rand_us(DATA_LATENCY_US)
                + Duration::from_micros(spike + len as u64 * NS_PER_BYTE / 1000);
            madsim::time::sleep(wire).await;
            if !self.wait_link(id, to).await {
                return;
            }
            if !self.alive() || self.send_over(id, to) {
                return;
            }
            let landed = self.registry.land(to, job.request, self.me, chunk, bytes);
            self.set_idle(id);
            if !landed {
                let err = if self.world.is_alive(to.instance) {
                    AgentError::Rejected("no receive posted for this request".into())
                } else {
                    AgentError::PeerUnreachable(to)
                };
                self.finish(id, Err(err));
                return;
            }
            sent += len as u64;
        }
        self.finish(id, Ok(sent));
    }

    /// Copies `chunk`'s fragments from this rank's blocks into the staging slot.
    fn gather(&self, staging: &SlotBuffer, chunk: &[Fragment]) {
        let mem = self.memory.lock().expect("memory lock");
        let mut s = staging.lock().expect("slot buffer lock");
        let mut at = 0usize;
        for f in chunk {
            let n = f.len as usize;
            mem.read(f.src_offset, &mut s[at..at + n]);
            at += n;
        }
    }

    /// Waits while the link to `to` is blocked. False if send `id` was cancelled meanwhile: a
    /// write parked on a stalled link is abandoned (the chunk is a copy by now, the slot is no
    /// longer read, so the cancel may complete the job).
    async fn wait_link(&self, id: TransferId, to: PeerId) -> bool {
        while self
            .world
            .fabric
            .lock()
            .expect("fabric lock")
            .blocked(self.me, to)
        {
            if self.cancelling(id) {
                self.set_idle(id);
                return false;
            }
            madsim::time::sleep(PARTITION_POLL).await;
        }
        true
    }

    fn cancelling(&self, id: TransferId) -> bool {
        let jobs = self.jobs.lock().expect("agent jobs lock");
        jobs.get(&id).is_none_or(|j| j.cancelling)
    }

    /// Records a submitted job: the checker's count, its trace span, an injected error or
    /// wedge (faults aimed at its request) and a send towards the rogue peer (I9).
    fn record_submit(&self, job: &TransferJob, trace_id: u64, failing: bool, wedged: bool) {
        let (at, id, peer) = (self.world.now_us(), job.id, peer_of(&job.direction));
        let mut c = self.world.checker.lock().expect("checker lock");
        c.job_submitted(self.rank_key, job.request);
        if wedged {
            c.fault(
                at,
                FaultKind::Wedge,
                (at, Reach::Request(job.request)),
                format!("{} transfer {} of {}", self.track, id.0, job.request),
            );
        }
        let dir = if matches!(job.direction, Direction::Send { .. }) {
            "send"
        } else {
            "recv"
        };
        c.event(
            at,
            &self.track,
            TraceKind::Begin { id: trace_id },
            format!("{dir} {} {} B peer {peer}", job.request, job.bytes),
        );
        if failing {
            c.fault(
                at,
                FaultKind::AgentError,
                (at, Reach::Request(job.request)),
                format!("{} transfer {} of {}", self.track, id.0, job.request),
            );
        }
        if peer.instance == ROGUE_INSTANCE && matches!(job.direction, Direction::Send { .. }) {
            c.violate(
                Invariant::I9,
                at,
                format!(
                    "{}: send job for {} submitted towards rogue peer {peer}",
                    self.track, job.request
                ),
            );
        }
    }

    /// Starts a recorded job: a send pushes (or parks, in pull mode), a receive waits for
    /// pushed chunks (or reads, in pull mode); towards a peer that is gone it fails soon. A
    /// wedged send never starts: it never pushes, and parked it is never readable
    /// (`parked_send`); only its cancel completes it.
    fn start(
        self: &Arc<Self>,
        id: TransferId,
        job: TransferJob,
        fail_after: Option<u32>,
        wedged: bool,
    ) {
        let peer = peer_of(&job.direction);
        let me = self.clone();
        let pull = self.world.mode == SeedMode::Pull;
        // A reader behind a stale endpoint finds whoever answers there now.
        let reachable = self.world.is_alive(peer.instance)
            || (self.stale_endpoint() && matches!(job.direction, Direction::Receive { .. }));
        if !reachable {
            // Connection refused: the peer is gone; fail soon, not inside submit.
            madsim::task::spawn(async move {
                madsim::time::sleep(rand_us(DATA_LATENCY_US)).await;
                me.finish(id, Err(AgentError::PeerUnreachable(peer)));
            });
            return;
        }
        match job.direction.clone() {
            // Parked: pinned until the reader's "finished", the reader's loss, or a cancel.
            Direction::Send { .. } if pull => {}
            Direction::Send { to } if !wedged => {
                madsim::task::spawn(me.run_send(id, job, to));
            }
            Direction::Send { .. } => {}
            Direction::Receive { from } if pull => {
                madsim::task::spawn(me.run_pull(id, job, from));
            }
            Direction::Receive { .. } => {
                if fail_after == Some(0) {
                    // Fails before any byte lands (e.g. registration error), a bit later.
                    madsim::task::spawn(async move {
                        madsim::time::sleep(rand_us(COPY_US)).await;
                        me.finish(id, Err(AgentError::Backend("injected failure".into())));
                    });
                }
            }
        }
    }

    fn set_idle(&self, id: TransferId) {
        if let Some(j) = self.jobs.lock().expect("agent jobs lock").get_mut(&id) {
            j.busy = j.busy.saturating_sub(1);
        }
    }

    async fn run_cancel(self: Arc<Self>, id: TransferId) {
        madsim::time::sleep(rand_us(CANCEL_US)).await;
        loop {
            let busy = match self.jobs.lock().expect("agent jobs lock").get(&id) {
                None => return,
                Some(j) => j.busy,
            };
            if busy == 0 || !self.alive() || self.cancel_skips_reads(id) {
                break;
            }
            madsim::time::sleep(rand_us(COPY_US)).await;
        }
        self.finish(id, Err(AgentError::Cancelled));
    }
}

/// The fragments context rank `src` moves for `job`, in chunks that each fit its staging slot.
fn chunks_of(job: &TransferJob, src: u32) -> Vec<Vec<Fragment>> {
    let cap = job.staging.lock().expect("slot buffer lock").len().max(1);
    let mut chunks: Vec<Vec<Fragment>> = Vec::new();
    let mut cur: Vec<Fragment> = Vec::new();
    let mut cur_len = 0usize;
    for f in job.plan.fragments_from(src) {
        assert!(
            f.len as usize <= cap,
            "a fragment of {} B exceeds the {cap} B staging slot",
            f.len
        );
        if cur_len + f.len as usize > cap {
            chunks.push(std::mem::take(&mut cur));
            cur_len = 0;
        }
        cur_len += f.len as usize;
        cur.push(f);
    }
    if !cur.is_empty() {
        chunks.push(cur);
    }
    chunks
}

fn peer_of(d: &Direction) -> PeerId {
    match d {
        Direction::Send { to } => *to,
        Direction::Receive { from } => *from,
    }
}

impl TransferAgent for SimAgent {
    fn submit(&self, job: TransferJob, done: CompletionQueue) -> Result<(), AgentError> {
        let inner = &self.inner;
        let sim = &inner.world;
        if inner.in_flight() >= MAX_AGENT_JOBS {
            return Err(AgentError::Backend("agent job table full".into()));
        }
        let id = job.id;
        let trace_id = (u64::from(inner.me.instance) << 48)
            ^ (u64::from(inner.me.rank) << 40)
            ^ (u64::from(inner.number) << 32)
            ^ id.0;
        let fail_after = sim.draw_agent_error().then(|| {
            let chunks = job
                .bytes
                .div_ceil(job.staging.lock().expect("slot buffer lock").len().max(1) as u64);
            madsim::rand::thread_rng().gen_range(0..chunks.max(1)) as u32
        });
        let wedged = sim.strike(FaultKind::Wedge, sim.mix.wedge);
        inner.record_submit(&job, trace_id, fail_after.is_some(), wedged);
        inner.jobs.lock().expect("agent jobs lock").insert(
            id,
            JobRec {
                request: job.request,
                direction: job.direction.clone(),
                done,
                staging: job.staging.clone(),
                local: job.local_blocks.clone(),
                expected: job.bytes,
                landed: 0,
                chunks: 0,
                fail_after,
                cancelling: false,
                peer_lost: false,
                busy: 0,
                trace_id,
                wedged,
            },
        );
        inner.start(id, job, fail_after, wedged);
        Ok(())
    }

    fn cancel(&self, id: TransferId) {
        let inner = &self.inner;
        let mut jobs = inner.jobs.lock().expect("agent jobs lock");
        if let Some(j) = jobs.get_mut(&id) {
            if !j.cancelling {
                j.cancelling = true;
                let in_flight = j.busy > 0;
                drop(jobs);
                if in_flight {
                    // Its blocks are being taken back while a chunk moves into or out of them.
                    inner.world.window(Window::EvictionWhileBytesLand);
                }
                madsim::task::spawn(inner.clone().run_cancel(id));
            }
        }
    }
}
