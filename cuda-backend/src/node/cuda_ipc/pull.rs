//! Gen side: a `TransferAgent` that pulls a request's fragments out of the ctx's mapped pool,
//! but only once the ctx said its send job is parked (`PullReady`). Before that the ctx has not
//! checked the transfer token nor pinned the blocks, so reading them could race a free on the
//! ctx. Every `PullReady` is answered with exactly one `PullFinished`, sent after the kernel's
//! fence (or at once when nothing was launched): the ctx's blocks stay pinned until then.

use super::super::frame::{Frame, NodeFrame};
use super::super::link::Links;
use crate::cuda::{CudaAgent, Region};
use kvferry_core::agent::{
    AgentError, Completion, CompletionQueue, Direction, TransferAgent, TransferId, TransferJob,
};
use kvferry_core::{PeerId, RequestId};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// `PullReady`s that came before their receive job, plus receives that ended before theirs:
/// bounded, the oldest are forgotten first (a forgotten early `PullReady` is answered with an
/// error, so the ctx's send never waits for it).
pub const MAX_MARKS: usize = 4096;

/// A request and the ctx rank it is pulled from.
type Key = (RequestId, u32);

#[derive(Debug)]
enum Slot {
    /// The receive job is posted; the ctx is not ready yet, nothing is launched.
    Waiting {
        job: TransferJob,
        done: CompletionQueue,
        from: PeerId,
    },
    /// The ctx is ready but the receive is not posted yet (it waited for a staging slot).
    Ready { from: PeerId },
    /// The receive ended unlaunched; a late `PullReady` is answered at once.
    Ended,
}

#[derive(Debug)]
struct Launched {
    done: CompletionQueue,
    key: Key,
    from: PeerId,
}

#[derive(Debug, Default)]
struct State {
    slots: HashMap<Key, Slot>,
    /// Insertion order of `Ready` and `Ended` slots, to bound them.
    marks: VecDeque<Key>,
    launched: HashMap<TransferId, Launched>,
}

#[derive(Debug)]
pub struct PullAgent {
    cuda: Arc<CudaAgent>,
    links: Links,
    /// Where the CUDA agent reports kernel fences; `pump` forwards them to the core.
    fences: CompletionQueue,
    wake: Arc<Notify>,
    state: Mutex<State>,
}

impl PullAgent {
    /// `max_jobs` bounds the fences queued between two pumps (the core's `max_in_flight`).
    pub fn new(
        cuda: Arc<CudaAgent>,
        links: Links,
        wake: Arc<Notify>,
        max_jobs: usize,
    ) -> PullAgent {
        PullAgent {
            cuda,
            links,
            fences: CompletionQueue::new(max_jobs.max(1)),
            wake,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("pull agent state poisoned")
    }

    /// Maps `peer`'s pool for later pulls (replacing an earlier one after a reconnect).
    pub fn register(&self, peer: PeerId, region: Region) {
        self.cuda.register_peer(peer, region);
    }

    /// The ctx `from` parked its send of `request`: launch the pull, or remember it.
    pub fn on_ready(&self, from: PeerId, request: RequestId, ctx_rank: u32) {
        let key = (request, ctx_rank);
        let mut st = self.lock();
        match st.slots.remove(&key) {
            Some(Slot::Waiting { job, done, from }) => self.launch(&mut st, job, done, from),
            Some(Slot::Ended) => {
                drop(st);
                self.finished(
                    from,
                    key,
                    Some("the request ended here before the pull".into()),
                );
            }
            Some(Slot::Ready { .. }) | None => {
                st.slots.insert(key, Slot::Ready { from });
                self.mark(&mut st, key);
            }
        }
    }

    /// Forwards kernel fences to the core and tells each ctx its pull is over. The driver
    /// calls this before every completion step.
    pub fn pump(&self) {
        let mut fences = Vec::new();
        self.fences.drain_into(&mut fences);
        for c in fences {
            let Some(l) = self.lock().launched.remove(&c.id) else {
                continue;
            };
            let error = c.result.as_ref().err().map(ToString::to_string);
            l.done.push(c);
            self.finished(l.from, l.key, error);
        }
    }

    /// The ctx connection is gone: its pool is forgotten (kernels in flight keep their
    /// mapping) and receives it never got ready for fail now.
    pub fn peer_lost(&self, peer: PeerId) {
        self.cuda.unregister_peer(peer);
        let mut st = self.lock();
        let gone: Vec<Key> = st
            .slots
            .iter()
            .filter(|(_, s)| match s {
                Slot::Waiting { from, .. } | Slot::Ready { from } => *from == peer,
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

    /// Launches a pull whose ctx is ready. A refused launch completes the job at once.
    fn launch(&self, st: &mut State, job: TransferJob, done: CompletionQueue, from: PeerId) {
        let (id, key) = (job.id, (job.request, from.rank));
        match self.cuda.submit(job, self.fences.clone()) {
            Ok(()) => {
                st.launched.insert(id, Launched { done, key, from });
            }
            Err(e) => {
                self.finished(from, key, Some(e.to_string()));
                self.complete(&done, id, Err(e));
            }
        }
    }

    fn complete(&self, done: &CompletionQueue, id: TransferId, result: Result<u64, AgentError>) {
        done.push(Completion { id, result });
        self.wake.notify_one();
    }

    /// Tells the ctx its pull of `key` is over. If its connection is gone, so is the send
    /// waiting for this (the ctx fails parked sends of a lost peer).
    fn finished(&self, to: PeerId, key: Key, error: Option<String>) {
        let frame = NodeFrame::PullFinished {
            request: key.0,
            ctx_rank: key.1,
            error,
        };
        if let Err(e) = self.links.send_frame(to, Frame::Node(frame)) {
            tracing::debug!(request = %key.0, error = %e, "pull-finished not sent");
        }
    }

    fn mark(&self, st: &mut State, key: Key) {
        st.marks.push_back(key);
        while st.marks.len() > MAX_MARKS {
            let old = st.marks.pop_front().expect("non-empty");
            match st.slots.get(&old) {
                Some(Slot::Ready { from }) => {
                    let from = *from;
                    st.slots.remove(&old);
                    self.finished(from, old, Some("too many early pulls".into()));
                }
                Some(Slot::Ended) => {
                    st.slots.remove(&old);
                }
                // Re-used key now waiting or launched: not ours to forget.
                Some(Slot::Waiting { .. }) | None => {}
            }
        }
    }
}

impl TransferAgent for PullAgent {
    fn submit(&self, job: TransferJob, done: CompletionQueue) -> Result<(), AgentError> {
        let Direction::Receive { from } = job.direction else {
            return Err(AgentError::Backend("a CUDA gen node only receives".into()));
        };
        let key = (job.request, from.rank);
        let mut st = self.lock();
        match st.slots.remove(&key) {
            Some(Slot::Ready { .. }) => self.launch(&mut st, job, done, from),
            Some(waiting @ Slot::Waiting { .. }) => {
                // The core posts one receive per leg: a second one is a core bug, refuse it.
                st.slots.insert(key, waiting);
                return Err(AgentError::Backend(format!(
                    "duplicate receive of {} from {from}",
                    job.request
                )));
            }
            Some(Slot::Ended) | None => {
                st.slots.insert(key, Slot::Waiting { job, done, from });
            }
        }
        Ok(())
    }

    /// A launched pull ends at its fence (the CUDA agent marks it); one still waiting for the
    /// ctx ends now, since nothing of it reads the ctx's pool.
    fn cancel(&self, id: TransferId) {
        let mut st = self.lock();
        if st.launched.contains_key(&id) {
            drop(st);
            self.cuda.cancel(id);
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
