//! The transfer agent (backend) interface and the completion queue.
//!
//! An agent moves bytes: the simulator's agent through madsim's network, the node's through
//! TCP, the CUDA agent over NVLink. The transceiver submits a [`TransferJob`] and learns of its
//! end through a [`CompletionQueue`], so a status poll costs O(completed), not O(in flight).
//!
//! A [`TransferStatus`] holds an `Arc` of its agent: an agent cannot be torn down while a status
//! that refers to it is alive (invariant I3), because teardown is the agent's `Drop`.

use crate::blocks::BlockRef;
use crate::plan::TransferPlan;
use crate::staging::SlotBuffer;
use crate::{PeerId, RequestId, TransferToken};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use thiserror::Error;

/// Unique per transceiver (rank) for its lifetime. Doubles as the poison fence of the job's
/// staging slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransferId(pub u64);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Context side: read `local_blocks` per the plan's fragments of this rank and ship them.
    Send { to: PeerId },
    /// Generation side: land bytes from `from` into `local_blocks` per the plan.
    Receive { from: PeerId },
}

/// One side of one (context rank, generation rank) transfer of one request.
#[derive(Clone, Debug)]
pub struct TransferJob {
    pub id: TransferId,
    pub request: RequestId,
    pub token: TransferToken,
    pub direction: Direction,
    /// The plan of the generation rank; a sender uses the fragments whose `src_rank` is its own.
    pub plan: Arc<TransferPlan>,
    /// This rank's blocks of the request at their current epochs (pinned by the transceiver
    /// until the job completes).
    pub local_blocks: Vec<BlockRef>,
    /// The peer's blocks of the request, in the same order (ids on the peer's pool).
    pub remote_blocks: Vec<BlockRef>,
    /// Bytes this job moves.
    pub bytes: u64,
    /// Bounce buffer the agent may stage through (chunked if `bytes` exceeds its length).
    pub staging: SlotBuffer,
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum AgentError {
    #[error("peer {0} unreachable")]
    PeerUnreachable(PeerId),
    #[error("transfer aborted by the backend: {0}")]
    Backend(String),
    #[error("write refused: {0}")]
    StaleBlock(String),
    #[error("cancelled")]
    Cancelled,
    #[error("agent is shut down")]
    ShutDown,
    #[error("peer rejected the transfer: {0}")]
    Rejected(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub id: TransferId,
    /// Bytes moved, or why not.
    pub result: Result<u64, AgentError>,
}

/// Bounded multi-producer queue of completions. Agents push from any thread; the transceiver
/// drains. Each submitted job completes exactly once, so the bound (jobs in flight) holds.
#[derive(Clone, Debug)]
pub struct CompletionQueue {
    inner: Arc<Mutex<VecDeque<Completion>>>,
    capacity: usize,
}

impl CompletionQueue {
    pub fn new(capacity: usize) -> CompletionQueue {
        CompletionQueue {
            inner: Arc::new(Mutex::new(VecDeque::with_capacity(capacity.min(1024)))),
            capacity,
        }
    }

    /// Called by agents. Overflow means some job completed twice: a backend bug, loudly.
    pub fn push(&self, c: Completion) {
        let mut q = self.inner.lock().expect("completion queue lock poisoned");
        assert!(
            q.len() < self.capacity,
            "completion queue overflow ({}): a job completed twice",
            self.capacity
        );
        q.push_back(c);
    }

    /// Moves every queued completion into `out`.
    pub fn drain_into(&self, out: &mut Vec<Completion>) {
        let mut q = self.inner.lock().expect("completion queue lock poisoned");
        out.extend(q.drain(..));
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .expect("completion queue lock poisoned")
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A backend that moves bytes. Calls never block: they start work and return.
pub trait TransferAgent: Send + Sync + std::fmt::Debug {
    /// Starts a job. Exactly one `Completion` for `job.id` is pushed to `done` later, also when
    /// the job is cancelled or fails; that completion is the fence proving no writer of this
    /// job remains. An `Err` here means the job never started (nothing will be pushed).
    fn submit(&self, job: TransferJob, done: CompletionQueue) -> Result<(), AgentError>;

    /// Asks the backend to stop a job early. Best effort; its completion still arrives.
    fn cancel(&self, id: TransferId);
}

/// A submitted job. Holding it keeps the agent alive.
#[derive(Debug)]
pub struct TransferStatus {
    agent: Arc<dyn TransferAgent>,
    id: TransferId,
}

impl TransferStatus {
    pub fn submit(
        agent: &Arc<dyn TransferAgent>,
        job: TransferJob,
        done: &CompletionQueue,
    ) -> Result<TransferStatus, AgentError> {
        let id = job.id;
        agent.submit(job, done.clone())?;
        Ok(TransferStatus {
            agent: agent.clone(),
            id,
        })
    }

    pub fn id(&self) -> TransferId {
        self.id
    }

    pub fn cancel(&self) {
        self.agent.cancel(self.id);
    }

    /// The agent this status keeps alive.
    pub fn agent(&self) -> &Arc<dyn TransferAgent> {
        &self.agent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(id: u64) -> Completion {
        Completion {
            id: TransferId(id),
            result: Ok(id),
        }
    }

    #[test]
    fn completions_drain_in_push_order_and_the_queue_counts_them() {
        let q = CompletionQueue::new(4);
        assert!(q.is_empty());
        assert_eq!(q.len(), 0);
        let agent_side = q.clone();
        agent_side.push(done(1));
        agent_side.push(done(2));
        assert!(!q.is_empty(), "clones share the queue");
        assert_eq!(q.len(), 2);
        let mut out = vec![done(0)];
        q.drain_into(&mut out);
        assert_eq!(
            out,
            vec![done(0), done(1), done(2)],
            "appended, oldest first"
        );
        assert!(q.is_empty());
        assert_eq!(q.len(), 0);
    }

    #[test]
    #[should_panic(expected = "completion queue overflow")]
    fn a_job_completing_twice_past_the_bound_is_loud() {
        let q = CompletionQueue::new(2);
        q.push(done(1));
        q.push(done(2));
        q.push(done(2));
    }

    /// Records what it was asked.
    #[derive(Debug, Default)]
    struct Recorder {
        submitted: Mutex<Vec<TransferId>>,
        cancelled: Mutex<Vec<TransferId>>,
        refuse: bool,
    }

    impl TransferAgent for Recorder {
        fn submit(&self, job: TransferJob, _done: CompletionQueue) -> Result<(), AgentError> {
            if self.refuse {
                return Err(AgentError::ShutDown);
            }
            self.submitted.lock().unwrap().push(job.id);
            Ok(())
        }

        fn cancel(&self, id: TransferId) {
            self.cancelled.lock().unwrap().push(id);
        }
    }

    fn job(id: u64) -> TransferJob {
        let layout = crate::layout::unit_layout();
        TransferJob {
            id: TransferId(id),
            request: RequestId(1),
            token: TransferToken(1),
            direction: Direction::Receive {
                from: PeerId {
                    instance: 0,
                    rank: 0,
                },
            },
            plan: Arc::new(TransferPlan::new(&layout, &layout, &[(0, 0)]).unwrap()),
            local_blocks: Vec::new(),
            remote_blocks: Vec::new(),
            bytes: 1,
            staging: SlotBuffer::default(),
        }
    }

    #[test]
    fn a_status_names_its_job_cancels_it_and_holds_its_agent() {
        let rec = Arc::new(Recorder::default());
        let agent: Arc<dyn TransferAgent> = rec.clone();
        let q = CompletionQueue::new(4);
        let status = TransferStatus::submit(&agent, job(7), &q).unwrap();
        assert_eq!(status.id(), TransferId(7));
        assert_eq!(*rec.submitted.lock().unwrap(), vec![TransferId(7)]);
        status.cancel();
        assert_eq!(*rec.cancelled.lock().unwrap(), vec![TransferId(7)]);
        assert!(Arc::ptr_eq(status.agent(), &agent));
        drop(agent);
        assert_eq!(
            Arc::strong_count(&rec),
            2,
            "the status keeps the agent (I3)"
        );
        drop(status);
        assert_eq!(Arc::strong_count(&rec), 1);

        let refusing: Arc<dyn TransferAgent> = Arc::new(Recorder {
            refuse: true,
            ..Recorder::default()
        });
        assert_eq!(
            TransferStatus::submit(&refusing, job(8), &q).unwrap_err(),
            AgentError::ShutDown
        );
    }
}
