//! One rank of a node, the part both roles share: its transceiver with its backend (host or
//! CUDA), pools, links and metrics, and the completion step that every loop iteration runs.

use super::backend::{Backend, BackendError, BackendSpec};
use super::backend_parts::{BackendParts, LentKv};
use super::frame::Frame;
use super::link::{LinkError, Links};
use super::metrics::{Metrics, RankSample};
use super::spec::{NodeLimits, NodeSpec};
use kvferry_core::blocks::BlockPool;
use kvferry_core::bugs::BugSet;
use kvferry_core::collective::{Agreed, Contribution};
use kvferry_core::request::Request;
use kvferry_core::transceiver::{
    Finished, Side, Transceiver, TransceiverError, TransceiverParts, TxEvent,
};
use kvferry_core::wire::Message;
use kvferry_core::PeerId;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

#[derive(Debug)]
pub struct Rank {
    pub tx: Transceiver,
    pub side: Side,
    pub pool: Arc<Mutex<BlockPool>>,
    pub backend: Backend,
    pub links: Links,
    /// The instance's metrics (shared by its ranks).
    pub metrics: Arc<Metrics>,
    /// Notified by the agent on every completion (shared by the ranks of an instance).
    pub wake: Arc<Notify>,
    /// Per-peer bounds of this node (`spec::NodeLimits`).
    pub limits: NodeLimits,
    start: Instant,
    timeout_ms: u64,
}

/// Occupancy of the pools, for summaries and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Occupancy {
    pub staging_slots: usize,
    pub staging_free: usize,
    pub staging_poisoned: usize,
    pub blocks_total: usize,
    pub blocks_free: usize,
}

impl Rank {
    /// A host-memory rank. Must run inside a tokio runtime (the agent spawns its send tasks).
    /// Rank `me.rank` of `spec`'s instance layout on `backend`, or on the memory the embedding
    /// program lent (`lent`: host memory from `HostKv::lent`, or device memory from
    /// `DeviceBuffer::adopt`, which picks the CUDA backend on that buffer's device; its size
    /// must be the spec's). Its agent rings `wake`. Must run inside a tokio runtime.
    pub fn build(
        me: PeerId,
        side: Side,
        spec: &NodeSpec,
        (backend, lent): (BackendSpec, Option<LentKv>),
        (wake, metrics): (Arc<Notify>, Arc<Metrics>),
    ) -> Result<Rank, BackendError> {
        let backend = lent.as_ref().map_or(backend, BackendSpec::for_lent);
        let layout = spec.layout.with_rank(me.rank);
        let links = Links::default();
        let pool = Arc::new(Mutex::new(BlockPool::new(spec.pool_blocks)));
        let (backend, agent) = Backend::new(
            backend,
            BackendParts {
                side,
                rank: me.rank,
                blocks: spec.pool_blocks,
                block_bytes: layout.block_bytes(),
                max_jobs: spec.config.max_in_flight,
                links: links.clone(),
                wake: wake.clone(),
                pool: pool.clone(),
                lent,
            },
        )?;
        let tx = Transceiver::new(TransceiverParts {
            me,
            layout,
            config: spec.config.clone(),
            bugs: BugSet::NONE,
            agent,
            blocks: pool.clone(),
        })?;
        Ok(Rank {
            tx,
            side,
            pool,
            backend,
            links,
            metrics,
            wake,
            limits: spec.limits,
            start: Instant::now(),
            timeout_ms: spec.config.kv_transfer_timeout_ms.unwrap_or(0),
        })
    }

    /// Registers a context request on this rank, now.
    pub fn respond_and_send(&mut self, req: Arc<Request>) -> Result<(), TransceiverError> {
        let now = self.now();
        self.tx.respond_and_send(now, req)
    }

    /// Registers a generation request on this rank, now.
    pub fn request_and_receive(&mut self, req: Arc<Request>) -> Result<(), TransceiverError> {
        let now = self.now();
        self.tx.request_and_receive(now, req)
    }

    /// The transceiver's clock: time since the node started.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// When the transceiver next needs a step, if anything waits on time: its
    /// `poll_timeout()` on the node's clock.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.tx.poll_timeout().map(|d| self.start + d)
    }

    /// Sends what the transceiver wants sent. A peer with no connection left is lost, and a
    /// `RequestInfo` that could not leave, for want of a connection or of room in its queue,
    /// fails its request (`handle_info_unsent`).
    pub fn flush(&mut self) {
        while let Some(t) = self.tx.poll_transmit() {
            // A `RequestInfo` is the one message whose loss the core must hear of.
            let info = match &t.msg {
                Message::RequestInfo(i) => Some(i.request),
                _ => None,
            };
            let sent = self.links.send_frame(t.to, Frame::Core(t.msg));
            let now = self.now();
            if let (Err(_), Some(request)) = (&sent, info) {
                self.tx.handle_info_unsent(now, request);
            }
            match sent {
                Ok(()) => {}
                Err(LinkError::Unreachable(peer)) => self.tx.handle_peer_lost(now, peer),
                Err(e @ LinkError::Backpressure(_)) => {
                    tracing::warn!(error = %e, "control frame dropped");
                }
            }
        }
    }

    /// The first half of a completion step: the backend's completions in, the transmits
    /// out, and this rank's contribution to the instance's gather (`Instance::step`).
    pub fn begin_step(&mut self) -> Contribution {
        self.backend.pump();
        self.flush();
        let now = self.now();
        self.tx.check_status(now, self.side, 0).contribution
    }

    /// The second half: what the instance agreed ends here, the transmits it caused, then the
    /// step's events.
    pub fn end_step(&mut self, agreed: &Agreed) -> (Vec<Finished>, Vec<TxEvent>) {
        let finished = self.tx.apply_agreed(agreed);
        self.flush();
        let events: Vec<TxEvent> = self.tx.drain_events().collect();
        for e in &events {
            if let TxEvent::Rejected {
                peer,
                request,
                code,
            } = e
            {
                tracing::warn!(peer = %self.links.describe(*peer), %request, ?code, "refused a peer's request info");
            }
        }
        (finished, events)
    }

    /// Frees a finished request's blocks (deferred by the pool while pins remain) and updates
    /// the gauges.
    pub fn release(&self, f: &Finished) {
        self.pool.lock().expect("pool lock").free(&f.request.blocks);
    }

    pub fn occupancy(&self) -> Occupancy {
        let s = self.tx.staging_counters();
        let p = self.pool.lock().expect("pool lock");
        Occupancy {
            staging_slots: s.slots,
            staging_free: s.free,
            staging_poisoned: s.poisoned,
            blocks_total: p.capacity(),
            blocks_free: p.free_count(),
        }
    }

    /// What this rank reports to its instance's metrics.
    pub fn sample(&self) -> RankSample {
        let o = self.occupancy();
        RankSample {
            tx: self.tx.counters(),
            staging: self.tx.staging_counters(),
            early: self.tx.early_counts(),
            blocks_free: o.blocks_free,
            blocks: o.blocks_total,
        }
    }
}

impl Rank {
    /// The configured `kv_transfer_timeout_ms`, 0 when unset (for messages).
    pub fn tx_timeout_ms(&self) -> u64 {
        self.timeout_ms
    }
}
