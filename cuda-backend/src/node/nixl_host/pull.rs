//! Gen side: a `TransferAgent` that READs a request's fragments out of the ctx's pool with
//! NIXL, but only once the ctx said its send job is parked (`NixlReady`): before that the ctx
//! has not proven the token nor pinned the blocks. The READ carries the notification that
//! completes the ctx's send; a READ that will not notify (refused, failed, never posted) is
//! answered with `NixlFailed` instead, so every `NixlReady` gets exactly one answer.
//!
//! Before posting, the job's own blocks are checked at their epochs: a block freed or
//! reassigned here since the job was built is never written by NIXL. They are also checked
//! against the blocks of READs not yet terminal (a cancelled READ's bytes still land): a READ
//! into one of those is refused and counted (`PullCounters::reused_in_flight`), which the core
//! never causes, since it keeps a cancelled job's pins until its completion, which comes only
//! at the READ's terminal status.

use super::super::frame::{Frame, NodeFrame};
use super::super::link::Links;
use super::notice::Notice;
use crate::nixl::{Driver, PoolMemory, Read};
use kvferry_core::agent::{
    AgentError, Completion, CompletionQueue, Direction, TransferAgent, TransferId, TransferJob,
};
use kvferry_core::blocks::BlockPool;
use kvferry_core::{PeerId, RequestId};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// `NixlReady`s that came before their receive job, plus receives that ended before theirs:
/// bounded, the oldest forgotten first (a forgotten offer is answered with `NixlFailed`).
pub const MAX_MARKS: usize = 4096;

/// A request and the ctx rank it is read from.
type Key = (RequestId, u32);

/// What a `NixlReady` offers: the ctx's send job and where its pool lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    pub from: PeerId,
    pub transfer: u64,
    pub pool_base: u64,
    pub pool_bytes: u64,
}

#[derive(Debug)]
enum Slot {
    Waiting {
        job: TransferJob,
        done: CompletionQueue,
        from: PeerId,
    },
    Ready(Offer),
    /// The receive ended unposted; a late offer is refused at once.
    Ended,
}

#[derive(Debug)]
struct Posted {
    done: CompletionQueue,
    request: RequestId,
    offer: Offer,
    blocks: Vec<u32>,
    cancelled: bool,
}

/// What the pull did with READs in flight, for the node's summary and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PullCounters {
    pub posted: u64,
    /// Cancels that found their READ posted and not yet terminal.
    pub cancelled_in_flight: u64,
    /// Cancelled READs that then reached their terminal status (only then did they end).
    pub cancelled_ended: u64,
    /// READs refused because a block of theirs was still the target of a READ in flight.
    pub reused_in_flight: u64,
}

#[derive(Debug, Default)]
struct State {
    slots: HashMap<Key, Slot>,
    marks: VecDeque<Key>,
    posted: HashMap<TransferId, Posted>,
    /// Each block posted READs land in, until they are terminal: the request they are for
    /// and how many (a request's READs from several ctx ranks share its blocks). Bounded by
    /// the pool.
    landing: HashMap<u32, (RequestId, usize)>,
    /// Requests over here (`request_ended`), newest last, bounded by `MAX_MARKS`: an offer of
    /// one is refused at once, since no receive job of it will come.
    over: VecDeque<RequestId>,
    over_set: HashSet<RequestId>,
    counters: PullCounters,
}

#[derive(Debug)]
pub struct NixlPull {
    driver: Mutex<Driver>,
    local: Arc<dyn PoolMemory>,
    blocks: Arc<Mutex<BlockPool>>,
    links: Links,
    wake: Arc<Notify>,
    state: Mutex<State>,
}

impl NixlPull {
    pub fn new(
        driver: Driver,
        local: Arc<dyn PoolMemory>,
        blocks: Arc<Mutex<BlockPool>>,
        links: Links,
        wake: Arc<Notify>,
    ) -> NixlPull {
        NixlPull {
            driver: Mutex::new(driver),
            local,
            blocks,
            links,
            wake,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("nixl pull state poisoned")
    }

    fn driver(&self) -> MutexGuard<'_, Driver> {
        self.driver.lock().expect("nixl driver lock poisoned")
    }

    /// The ctx parked the send of `request`: load its metadata if it came along, then post the
    /// READ or remember the offer.
    pub fn on_ready(&self, request: RequestId, ctx_rank: u32, offer: Offer, md: Option<Vec<u8>>) {
        if let Some(md) = md {
            if let Err(e) = self.driver().load(offer.from, md) {
                self.failed(offer, request, &format!("metadata not loaded: {e}"));
                return;
            }
        }
        let key = (request, ctx_rank);
        let mut st = self.lock();
        if st.over_set.contains(&request) {
            drop(st);
            self.failed(offer, request, "the request ended here before the READ");
            return;
        }
        match st.slots.remove(&key) {
            Some(Slot::Waiting { job, done, .. }) => self.post(&mut st, job, done, offer),
            Some(Slot::Ended) => {
                drop(st);
                self.failed(offer, request, "the request ended here before the READ");
            }
            Some(Slot::Ready(_)) | None => {
                st.slots.insert(key, Slot::Ready(offer));
                self.mark(&mut st, key);
            }
        }
    }

    /// Forwards READs that reached a terminal status to the core, and tells the ctx of those
    /// that failed. Call before every completion step.
    pub fn pump(&self) {
        let mut ended = Vec::new();
        self.driver().take_ended(&mut ended);
        for (id, result) in ended {
            let Some(p) = self.landed(id) else {
                continue;
            };
            if let Err(e) = &result {
                self.failed(p.offer, p.request, &e.to_string());
            }
            p.done.push(Completion { id, result });
        }
    }

    /// The gen's request is over (completed, failed or cancelled, possibly before its receive
    /// job was ever submitted here): its offers, here or still to come, are refused, so the
    /// ctx's sends fail instead of pinning their blocks until the connection ends.
    pub fn request_ended(&self, request: RequestId) {
        let mut st = self.lock();
        let offered: Vec<Key> = (st.slots.iter())
            .filter(|(k, s)| k.0 == request && matches!(s, Slot::Ready(_)))
            .map(|(k, _)| *k)
            .collect();
        for key in offered {
            if let Some(Slot::Ready(offer)) = st.slots.remove(&key) {
                self.failed(offer, request, "the request ended here before the READ");
            }
        }
        if st.over_set.insert(request) {
            st.over.push_back(request);
        }
        while st.over.len() > MAX_MARKS {
            let old = st.over.pop_front().expect("non-empty");
            st.over_set.remove(&old);
        }
    }

    pub fn counters(&self) -> PullCounters {
        self.lock().counters
    }

    /// Forgets a READ at its terminal status: its blocks may be reused from now on.
    fn landed(&self, id: TransferId) -> Option<Posted> {
        let mut st = self.lock();
        let p = st.posted.remove(&id)?;
        for b in &p.blocks {
            if let Some((_, n)) = st.landing.get_mut(b) {
                *n -= 1;
                if *n == 0 {
                    st.landing.remove(b);
                }
            }
        }
        if p.cancelled {
            st.counters.cancelled_ended += 1;
        }
        Some(p)
    }

    /// The ctx's connection is gone: its metadata is invalidated once its READs end, and
    /// receives it never offered fail now.
    pub fn peer_lost(&self, peer: PeerId) {
        self.driver().forget(peer);
        let mut st = self.lock();
        let gone: Vec<Key> = st
            .slots
            .iter()
            .filter(|(_, s)| match s {
                Slot::Waiting { from, .. } => *from == peer,
                Slot::Ready(o) => o.from == peer,
                Slot::Ended => false,
            })
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            if let Some(Slot::Waiting { job, done, .. }) = st.slots.remove(&key) {
                self.complete(&done, job.id, Err(AgentError::PeerUnreachable(peer)));
            }
        }
    }

    /// Checks the job's blocks and the offer's bounds, then hands the READ to the driver. A
    /// refused READ completes the job at once and tells the ctx.
    fn post(&self, st: &mut State, job: TransferJob, done: CompletionQueue, offer: Offer) {
        let (id, request) = (job.id, job.request);
        let blocks: Vec<u32> = job.local_blocks.iter().map(|b| b.id).collect();
        let read = Self::not_landing(st, request, &blocks)
            .and_then(|()| self.read_of(&job, offer))
            .and_then(|read| {
                self.driver()
                    .read(read)
                    .map_err(|e| AgentError::Backend(e.to_string()))
            });
        match read {
            Ok(()) => {
                st.counters.posted += 1;
                for b in &blocks {
                    st.landing.entry(*b).or_insert((request, 0)).1 += 1;
                }
                let p = Posted {
                    done,
                    request,
                    offer,
                    blocks,
                    cancelled: false,
                };
                st.posted.insert(id, p);
            }
            Err(e) => {
                self.failed(offer, request, &e.to_string());
                self.complete(&done, id, Err(e));
            }
        }
    }

    /// Refuses blocks a READ for another request, not yet terminal, may still write.
    fn not_landing(st: &mut State, request: RequestId, blocks: &[u32]) -> Result<(), AgentError> {
        let Some((b, other)) = blocks.iter().find_map(|b| {
            let (other, _) = st.landing.get(b)?;
            (*other != request).then_some((*b, *other))
        }) else {
            return Ok(());
        };
        st.counters.reused_in_flight += 1;
        Err(AgentError::StaleBlock(format!(
            "block {b} is still the target of a READ for {other}, not yet terminal"
        )))
    }

    fn read_of(&self, job: &TransferJob, offer: Offer) -> Result<Read, AgentError> {
        {
            let pool = self.blocks.lock().expect("block pool lock poisoned");
            for b in &job.local_blocks {
                pool.check_owner(b, job.request)
                    .map_err(|e| AgentError::StaleBlock(e.to_string()))?;
            }
        }
        let mut pieces = Vec::new();
        for f in job.plan.fragments_from(offer.from.rank) {
            let remote_ok = f
                .src_offset
                .checked_add(f.len)
                .is_some_and(|e| e <= offer.pool_bytes);
            if !remote_ok || !self.local.contains(f.dst_offset, f.len) {
                return Err(AgentError::Rejected(format!(
                    "fragment {}+{} -> {} outside a pool",
                    f.src_offset, f.len, f.dst_offset
                )));
            }
            let local = self.local.base() + f.dst_offset;
            pieces.push((local, offer.pool_base + f.src_offset, f.len));
        }
        let notice = Notice {
            request: job.request,
            token: job.token,
            transfer: TransferId(offer.transfer),
        };
        Ok(Read {
            id: job.id,
            peer: offer.from,
            bytes: job.bytes,
            pieces,
            notif: notice.encode(),
        })
    }

    fn complete(&self, done: &CompletionQueue, id: TransferId, result: Result<u64, AgentError>) {
        done.push(Completion { id, result });
        self.wake.notify_one();
    }

    /// Tells the ctx that its send `offer` gets no notification. If the connection is gone,
    /// so is the send (the ctx fails the parked sends of a lost peer).
    fn failed(&self, offer: Offer, request: RequestId, error: &str) {
        let frame = NodeFrame::NixlFailed {
            request,
            ctx_rank: offer.from.rank,
            transfer: offer.transfer,
            error: error.to_string(),
        };
        if let Err(e) = self.links.send_frame(offer.from, Frame::Node(frame)) {
            tracing::debug!(%request, error = %e, "nixl-failed not sent");
        }
    }

    fn mark(&self, st: &mut State, key: Key) {
        st.marks.push_back(key);
        while st.marks.len() > MAX_MARKS {
            let old = st.marks.pop_front().expect("non-empty");
            match st.slots.get(&old) {
                Some(Slot::Ready(offer)) => {
                    let offer = *offer;
                    st.slots.remove(&old);
                    self.failed(offer, old.0, "too many early offers");
                }
                Some(Slot::Ended) => {
                    st.slots.remove(&old);
                }
                Some(Slot::Waiting { .. }) | None => {}
            }
        }
    }
}

impl TransferAgent for NixlPull {
    fn submit(&self, job: TransferJob, done: CompletionQueue) -> Result<(), AgentError> {
        let Direction::Receive { from } = job.direction else {
            return Err(AgentError::Backend("a NIXL gen node only receives".into()));
        };
        let key = (job.request, from.rank);
        let mut st = self.lock();
        match st.slots.remove(&key) {
            Some(Slot::Ready(offer)) if offer.from == from => self.post(&mut st, job, done, offer),
            Some(waiting @ Slot::Waiting { .. }) => {
                st.slots.insert(key, waiting);
                return Err(AgentError::Backend(format!(
                    "duplicate receive of {} from {from}",
                    job.request
                )));
            }
            Some(Slot::Ready(_) | Slot::Ended) | None => {
                st.slots.insert(key, Slot::Waiting { job, done, from });
            }
        }
        Ok(())
    }

    /// A posted READ ends at its terminal status (the driver marks it); one still waiting for
    /// the ctx ends now, since nothing of it touches memory.
    fn cancel(&self, id: TransferId) {
        let mut st = self.lock();
        if let Some(p) = st.posted.get_mut(&id) {
            if !std::mem::replace(&mut p.cancelled, true) {
                st.counters.cancelled_in_flight += 1;
            }
            drop(st);
            self.driver().cancel(id);
            return;
        }
        let key = st.slots.iter().find_map(|(k, s)| match s {
            Slot::Waiting { job, .. } if job.id == id => Some(*k),
            _ => None,
        });
        if let Some(key) = key {
            if let Some(Slot::Waiting { done, .. }) = st.slots.insert(key, Slot::Ended) {
                self.mark(&mut st, key);
                self.complete(&done, id, Err(AgentError::Cancelled));
            }
        }
    }
}

impl Drop for NixlPull {
    /// Stops the driver (draining posted READs within its bound), then hands their ends to
    /// whoever still holds the queues.
    fn drop(&mut self) {
        self.driver().stop(false);
        self.pump();
    }
}
