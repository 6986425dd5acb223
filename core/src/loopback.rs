//! In-memory network and agent for tests and fuzzing: no threads, no sockets, no clock.
//! The test moves each transceiver's outbox into the net (`flush`), delivers messages, and
//! decides when (and how) each transfer job completes.

use crate::agent::{
    AgentError, Completion, CompletionQueue, Direction, TransferAgent, TransferId, TransferJob,
};
use crate::transceiver::Transceiver;
use crate::wire::Message;
use crate::PeerId;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Bound on messages queued in a loopback net; a test that overflows it has a livelock.
pub const MAX_QUEUED_MESSAGES: usize = 1 << 16;

/// A message in flight between two peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub from: PeerId,
    pub to: PeerId,
    pub msg: Message,
}

/// A hub that every loopback transport of a test sends into.
#[derive(Clone, Debug, Default)]
pub struct LoopbackNet {
    queue: Arc<Mutex<VecDeque<Envelope>>>,
}

impl LoopbackNet {
    pub fn new() -> LoopbackNet {
        LoopbackNet::default()
    }

    /// Moves every message `tx` wants sent into the net; returns how many.
    pub fn flush(&self, tx: &mut Transceiver) -> usize {
        let me = tx.me();
        let mut q = self.queue.lock().expect("loopback lock");
        let mut n = 0;
        while let Some(t) = tx.poll_transmit() {
            assert!(
                q.len() < MAX_QUEUED_MESSAGES,
                "loopback net overflow: a livelock of control messages"
            );
            q.push_back(Envelope {
                from: me,
                to: t.to,
                msg: t.msg,
            });
            n += 1;
        }
        n
    }

    /// Oldest undelivered message.
    pub fn pop(&self) -> Option<Envelope> {
        self.queue.lock().expect("loopback lock").pop_front()
    }

    pub fn len(&self) -> usize {
        self.queue.lock().expect("loopback lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug)]
struct Pending {
    job: TransferJob,
    done: CompletionQueue,
    cancel_requested: bool,
}

/// An agent whose jobs complete only when the test says so. Moves no bytes.
#[derive(Debug, Default)]
pub struct ManualAgent {
    pending: Mutex<BTreeMap<TransferId, Pending>>,
    /// When set, `submit` refuses jobs (an agent that cannot start work).
    refuse: Mutex<bool>,
}

impl ManualAgent {
    pub fn new() -> Arc<ManualAgent> {
        Arc::new(ManualAgent::default())
    }

    pub fn set_refuse(&self, refuse: bool) {
        *self.refuse.lock().expect("agent lock") = refuse;
    }

    /// Jobs submitted and not completed, in id order.
    pub fn pending(&self) -> Vec<TransferJob> {
        self.pending
            .lock()
            .expect("agent lock")
            .values()
            .map(|p| p.job.clone())
            .collect()
    }

    pub fn pending_count(&self) -> usize {
        self.pending.lock().expect("agent lock").len()
    }

    pub fn cancel_requested(&self, id: TransferId) -> bool {
        self.pending
            .lock()
            .expect("agent lock")
            .get(&id)
            .is_some_and(|p| p.cancel_requested)
    }

    /// Completes one job with `result`. Returns false if it was not pending.
    pub fn complete(&self, id: TransferId, result: Result<u64, AgentError>) -> bool {
        let Some(p) = self.pending.lock().expect("agent lock").remove(&id) else {
            return false;
        };
        p.done.push(Completion { id, result });
        true
    }

    /// Completes every pending job successfully with its full byte count.
    pub fn complete_all(&self) -> usize {
        self.complete_oldest(usize::MAX)
    }

    /// Completes the `n` oldest pending jobs successfully; returns how many there were.
    /// Costs O(n), so benches can complete a few jobs out of many thousands in flight.
    pub fn complete_oldest(&self, n: usize) -> usize {
        let oldest: Vec<(TransferId, u64)> = self
            .pending
            .lock()
            .expect("agent lock")
            .values()
            .take(n)
            .map(|p| (p.job.id, p.job.bytes))
            .collect();
        for (id, bytes) in &oldest {
            self.complete(*id, Ok(*bytes));
        }
        oldest.len()
    }

    /// Jobs sending to `to`.
    pub fn sends_to(&self, to: PeerId) -> usize {
        self.pending
            .lock()
            .expect("agent lock")
            .values()
            .filter(|p| p.job.direction == Direction::Send { to })
            .count()
    }
}

impl TransferAgent for ManualAgent {
    fn submit(&self, job: TransferJob, done: CompletionQueue) -> Result<(), AgentError> {
        if *self.refuse.lock().expect("agent lock") {
            return Err(AgentError::Backend("manual agent refuses jobs".into()));
        }
        let mut p = self.pending.lock().expect("agent lock");
        assert!(!p.contains_key(&job.id), "job {:?} submitted twice", job.id);
        p.insert(
            job.id,
            Pending {
                job,
                done,
                cancel_requested: false,
            },
        );
        Ok(())
    }

    fn cancel(&self, id: TransferId) {
        if let Some(p) = self.pending.lock().expect("agent lock").get_mut(&id) {
            p.cancel_requested = true;
        }
    }
}
