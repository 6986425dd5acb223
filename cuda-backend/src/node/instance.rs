//! The ranks of one instance in one process (`tp_size * pp_size` of them, each with its own
//! pool, backend, transceiver and connections), driven by one loop.
//!
//! Why one process per instance: the completion collective (I7: a request ends on an instance
//! only when every rank has finished it) is then a plain gather of the ranks' contributions,
//! and the driver registers a request on every rank in the same call, so the ranks' tables
//! move in lockstep. Ranks of one instance in separate processes would need the engine's own
//! collective, which the node does not have.

use super::backend::{BackendError, BackendSpec};
use super::backend_parts::LentKv;
use super::conn::{Delivery, Inbound};
use super::link::Outgoing;
use super::metrics::Metrics;
use super::rank::{Occupancy, Rank};
use super::spec::NodeSpec;
use kvferry_core::blocks::{BlockPool, BlockRef};
use kvferry_core::collective::{agree, CollectiveError};
use kvferry_core::request::Request;
use kvferry_core::transceiver::{Finished, Side, TransceiverError, TxEvent};
use kvferry_core::PeerId;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

/// Ranks one process serves at most (the layout's own bound on TP × PP is larger).
pub const MAX_LOCAL_RANKS: usize = 16;

#[derive(Debug)]
pub struct Instance {
    pub ranks: Vec<Rank>,
    /// Rung by every rank's agent: the loop wakes for any rank's completion.
    pub wake: Arc<Notify>,
    /// One registry for the instance: its counters and gauges are the sums over its ranks.
    pub metrics: Arc<Metrics>,
}

/// One completion step's output, each item with the local rank (its index) it came from.
/// A request agreed in a step finishes on every rank of the instance in that step.
#[derive(Debug, Default)]
pub struct Stepped {
    pub finished: Vec<(usize, Finished)>,
    pub events: Vec<(usize, TxEvent)>,
}

impl Instance {
    /// Every rank of `spec`'s layout, as `instance`, each on its entry of `backends` (one per
    /// rank, in rank order). Must run inside a tokio runtime.
    pub fn build(
        instance: u32,
        side: Side,
        spec: &NodeSpec,
        backends: Vec<(BackendSpec, Option<LentKv>)>,
    ) -> Result<Instance, BackendError> {
        let world = spec.layout.world_size() as usize;
        assert_eq!(backends.len(), world, "one backend per rank of the layout");
        assert!(world <= MAX_LOCAL_RANKS, "{world} ranks in one process");
        let wake = Arc::new(Notify::new());
        let metrics = Metrics::new();
        let ranks = backends
            .into_iter()
            .enumerate()
            .map(|(r, b)| {
                let me = PeerId {
                    instance,
                    rank: r as u32,
                };
                Rank::build(me, side, spec, b, (wake.clone(), metrics.clone()))
            })
            .collect::<Result<Vec<Rank>, BackendError>>()?;
        Ok(Instance {
            ranks,
            wake,
            metrics,
        })
    }

    /// As `build`, every rank on the same backend.
    pub fn uniform(
        instance: u32,
        side: Side,
        spec: &NodeSpec,
        backend: BackendSpec,
    ) -> Result<Instance, BackendError> {
        let world = spec.layout.world_size() as usize;
        Instance::build(
            instance,
            side,
            spec,
            (0..world).map(|_| (backend, None)).collect(),
        )
    }

    /// One completion step of the whole instance: every rank's contribution, gathered and
    /// agreed, then applied on every rank.
    pub fn step(&mut self) -> Result<Stepped, CollectiveError> {
        let all: Vec<_> = self.ranks.iter_mut().map(Rank::begin_step).collect();
        let agreed = agree(&all, self.ranks.len())?;
        let mut out = Stepped::default();
        for (i, rank) in self.ranks.iter_mut().enumerate() {
            let (finished, events) = rank.end_step(&agreed);
            out.finished.extend(finished.into_iter().map(|f| (i, f)));
            out.events.extend(events.into_iter().map(|e| (i, e)));
        }
        Ok(out)
    }

    /// One request's blocks on every rank, each taken by `take(rank index, its pool)` in rank
    /// order; all or nothing: on a refusal, what the earlier ranks took is freed.
    pub fn allocate_each<E>(
        &self,
        mut take: impl FnMut(usize, &mut BlockPool) -> Result<Vec<BlockRef>, E>,
    ) -> Result<Vec<Vec<BlockRef>>, E> {
        let mut refs = Vec::with_capacity(self.ranks.len());
        for (r, rank) in self.ranks.iter().enumerate() {
            let taken = take(r, &mut rank.pool.lock().expect("pool lock"));
            match taken {
                Ok(blocks) => refs.push(blocks),
                Err(e) => {
                    self.free_each(refs.iter().map(Vec::as_slice));
                    return Err(e);
                }
            }
        }
        Ok(refs)
    }

    /// Frees one request's blocks on every rank (`refs` in rank order).
    pub fn free_each<'a>(&self, refs: impl IntoIterator<Item = &'a [BlockRef]>) {
        for (rank, blocks) in self.ranks.iter().zip(refs) {
            rank.pool.lock().expect("pool lock").free(blocks);
        }
    }

    /// Registers one request on every rank (`reqs`: its `Request` on each, in rank order)
    /// with `register` (`Rank::respond_and_send` or `Rank::request_and_receive`). The ranks'
    /// tables move in lockstep (a request reaches all of them in one call and ends on all of
    /// them in one step), so only rank 0 can refuse, and then nothing is registered.
    pub fn register_each(
        &mut self,
        reqs: &[Arc<Request>],
        mut register: impl FnMut(&mut Rank, Arc<Request>) -> Result<(), TransceiverError>,
    ) -> Result<(), TransceiverError> {
        for (r, (rank, req)) in self.ranks.iter_mut().zip(reqs).enumerate() {
            if let Err(e) = register(rank, req.clone()) {
                assert_eq!(r, 0, "rank {r} refused what rank 0 took: {e}");
                return Err(e);
            }
        }
        Ok(())
    }

    /// Bytes of one block over every rank: what one block of a request moves.
    pub fn block_bytes(&self) -> u64 {
        self.ranks.iter().map(|r| r.backend.block_bytes()).sum()
    }

    /// The earliest deadline of any rank.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.ranks.iter().filter_map(Rank::next_deadline).min()
    }

    /// Transfers in flight on any rank.
    pub fn jobs_in_flight(&self) -> usize {
        self.ranks.iter().map(|r| r.tx.jobs_in_flight()).sum()
    }

    /// The ranks' pools together.
    pub fn occupancy(&self) -> Occupancy {
        let mut sum = Occupancy {
            staging_slots: 0,
            staging_free: 0,
            staging_poisoned: 0,
            blocks_total: 0,
            blocks_free: 0,
        };
        for o in self.ranks.iter().map(Rank::occupancy) {
            sum.staging_slots += o.staging_slots;
            sum.staging_free += o.staging_free;
            sum.staging_poisoned += o.staging_poisoned;
            sum.blocks_total += o.blocks_total;
            sum.blocks_free += o.blocks_free;
        }
        sum
    }

    pub fn update_metrics(&self) {
        let samples: Vec<_> = self.ranks.iter().map(Rank::sample).collect();
        self.metrics.update(&samples);
    }
}

impl Instance {
    /// Closes every connection of every rank and waits, within `within` (the sends included:
    /// a peer that stopped reading fills its queue), for each one's own `Down`: its writer
    /// has flushed what it owed the peer and its reader has seen the peer's FIN (`conn`), so
    /// no socket is dropped with bytes unread, which would reset it and cost the peer the
    /// tail it had not read yet. `on_closed` hears each (local rank, peer) that ended in time.
    /// Other events are read and dropped: the caller has handled those queued before.
    pub async fn hang_up(
        &self,
        inbox: &mut mpsc::Receiver<Delivery>,
        within: Duration,
        mut on_closed: impl FnMut(usize, PeerId),
    ) {
        let until = tokio::time::Instant::now() + within;
        let mut open = HashSet::new();
        for (g, rank) in self.ranks.iter().enumerate() {
            for peer in rank.links.peers() {
                // A link gone from the table since has ended; its `Down` is not awaited.
                let Some(link) = rank.links.get(peer) else {
                    continue;
                };
                let sent = tokio::time::timeout_at(until, link.control.send(Outgoing::Close));
                if matches!(sent.await, Ok(Ok(()))) {
                    open.insert((g, peer));
                }
            }
        }
        let closed = async {
            while !open.is_empty() {
                let Some(d) = inbox.recv().await else { return };
                if let Inbound::Down { peer, .. } = d.event {
                    if open.remove(&(d.rank, peer)) {
                        on_closed(d.rank, peer);
                    }
                }
            }
        };
        if tokio::time::timeout_at(until, closed).await.is_err() {
            tracing::warn!("connections did not close in time, dropping them");
        }
    }
}
