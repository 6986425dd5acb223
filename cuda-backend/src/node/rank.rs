//! One rank of a node, the part both roles share: its transceiver with its backend (host or
//! CUDA), pools, links and metrics, and the completion step that every loop iteration runs.

use super::backend::{Backend, BackendError, BackendSpec};
use super::backend_parts::{BackendParts, LentKv};
use super::frame::Frame;
use super::link::{LinkError, Links};
use super::metrics::Metrics;
use super::spec::{NodeLimits, NodeSpec};
use kvferry_core::blocks::BlockPool;
use kvferry_core::bugs::BugSet;
use kvferry_core::collective::{agree, CollectiveError};
use kvferry_core::transceiver::{Finished, Side, Transceiver, TransceiverParts, TxEvent};
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
    pub metrics: Arc<Metrics>,
    /// Notified by the agent on every completion.
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
    pub fn new(me: PeerId, side: Side, spec: &NodeSpec) -> Rank {
        Rank::with_backend(me, side, spec, BackendSpec::Host)
            .expect("the host backend cannot fail to build")
    }

    /// A rank on the given backend. Must run inside a tokio runtime.
    pub fn with_backend(
        me: PeerId,
        side: Side,
        spec: &NodeSpec,
        backend: BackendSpec,
    ) -> Result<Rank, BackendError> {
        Rank::build(me, side, spec, backend, None)
    }

    /// A rank whose KV pool is memory its embedding program lent (host memory from
    /// `HostKv::lent`, or device memory from `DeviceBuffer::adopt`, which picks the CUDA
    /// backend on that buffer's device); its size must be the spec's. Must run inside a
    /// tokio runtime.
    pub fn with_lent_kv(
        me: PeerId,
        side: Side,
        spec: &NodeSpec,
        kv: LentKv,
    ) -> Result<Rank, BackendError> {
        Rank::build(me, side, spec, BackendSpec::for_lent(&kv), Some(kv))
    }

    fn build(
        me: PeerId,
        side: Side,
        spec: &NodeSpec,
        backend: BackendSpec,
        lent: Option<LentKv>,
    ) -> Result<Rank, BackendError> {
        let layout = spec.layout.with_rank(me.rank);
        let links = Links::default();
        let wake = Arc::new(Notify::new());
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
            metrics: Metrics::new(),
            wake,
            limits: spec.limits,
            start: Instant::now(),
            timeout_ms: spec.config.kv_transfer_timeout_ms.unwrap_or(0),
        })
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

    /// Sends what the transceiver wants sent. A peer with no connection left is lost: what
    /// depended on it fails now.
    pub fn flush(&mut self) {
        while let Some(t) = self.tx.poll_transmit() {
            match self.links.send_frame(t.to, Frame::Core(t.msg)) {
                Ok(()) => {}
                Err(LinkError::Unreachable(peer)) => {
                    let now = self.now();
                    self.tx.handle_peer_lost(now, peer);
                }
                Err(e @ LinkError::Backpressure(_)) => {
                    tracing::warn!(error = %e, "control frame dropped");
                }
            }
        }
    }

    /// One completion step of a one-rank instance (its own contribution is the whole
    /// gather), with the transmits before and after it, then the step's events.
    pub fn step(&mut self) -> Result<(Vec<Finished>, Vec<TxEvent>), CollectiveError> {
        self.backend.pump();
        self.flush();
        let now = self.now();
        let mine = self.tx.check_status(now, self.side, 0).contribution;
        let finished = self.tx.apply_agreed(&agree(&[mine], 1)?);
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
        Ok((finished, events))
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

    pub fn update_metrics(&self) {
        let o = self.occupancy();
        self.metrics.update(
            &self.tx.counters(),
            &self.tx.staging_counters(),
            o.blocks_free,
            o.blocks_total,
        );
        self.metrics.set_early(&self.tx.early_counts());
    }
}

impl Rank {
    /// The configured `kv_transfer_timeout_ms`, 0 when unset (for messages).
    pub fn tx_timeout_ms(&self) -> u64 {
        self.timeout_ms
    }
}
