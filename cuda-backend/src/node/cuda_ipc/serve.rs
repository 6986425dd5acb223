//! Ctx side: a `TransferAgent` whose send jobs move no bytes themselves. Each is parked in the
//! CUDA agent (no gen pool is registered here, so the gen pulls), announced to the gen with a
//! `PullReady`, and completed when the gen's `PullFinished` comes back, or failed when its
//! connection is lost. The core unpins the blocks only on that completion, so no gen read can
//! land on blocks already freed and reused here.

use super::super::frame::{Frame, NodeFrame};
use super::super::link::Links;
use crate::cuda::CudaAgent;
use kvferry_core::agent::{
    AgentError, CompletionQueue, Direction, TransferAgent, TransferId, TransferJob,
};
use kvferry_core::{PeerId, RequestId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

#[derive(Debug, Clone, Copy)]
struct Parked {
    id: TransferId,
    bytes: u64,
}

#[derive(Debug)]
pub struct ServeAgent {
    cuda: Arc<CudaAgent>,
    links: Links,
    rank: u32,
    wake: Arc<Notify>,
    /// Parked sends by request and the gen peer pulling it.
    parked: Mutex<HashMap<(RequestId, PeerId), Parked>>,
}

impl ServeAgent {
    pub fn new(cuda: Arc<CudaAgent>, links: Links, rank: u32, wake: Arc<Notify>) -> ServeAgent {
        ServeAgent {
            cuda,
            links,
            rank,
            wake,
            parked: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(RequestId, PeerId), Parked>> {
        self.parked.lock().expect("serve agent state poisoned")
    }

    /// The gen `from` finished pulling `request` (or gave up): completes the parked send.
    /// Returns false when no such send is parked (e.g. a stale or forged frame).
    pub fn on_finished(
        &self,
        from: PeerId,
        request: RequestId,
        ctx_rank: u32,
        error: Option<String>,
    ) -> bool {
        if ctx_rank != self.rank {
            return false;
        }
        let Some(p) = self.lock().remove(&(request, from)) else {
            return false;
        };
        let result = match error {
            None => Ok(p.bytes),
            Some(e) => Err(AgentError::Backend(format!("gen pull failed: {e}"))),
        };
        self.cuda.peer_finished(p.id, result)
    }

    /// The gen's connection is gone: its parked sends fail instead of waiting forever. The gen
    /// cancels every request of a lost connection, so bytes it may still read are never used.
    pub fn peer_lost(&self, peer: PeerId) {
        let lost: Vec<Parked> = {
            let mut parked = self.lock();
            let keys: Vec<_> = parked.keys().filter(|(_, p)| *p == peer).copied().collect();
            keys.iter().filter_map(|k| parked.remove(k)).collect()
        };
        for p in &lost {
            self.cuda
                .peer_finished(p.id, Err(AgentError::PeerUnreachable(peer)));
        }
        if !lost.is_empty() {
            self.wake.notify_one();
        }
    }
}

impl TransferAgent for ServeAgent {
    fn submit(&self, job: TransferJob, done: CompletionQueue) -> Result<(), AgentError> {
        let Direction::Send { to } = job.direction else {
            return Err(AgentError::Backend("a CUDA ctx node only sends".into()));
        };
        let key = (job.request, to);
        let parked = Parked {
            id: job.id,
            bytes: job.bytes,
        };
        if self.lock().insert(key, parked).is_some() {
            return Err(AgentError::Backend(format!(
                "a send of {} to {to} is already parked",
                job.request
            )));
        }
        if let Err(e) = self.cuda.submit(job, done) {
            self.lock().remove(&key);
            return Err(e);
        }
        let ready = NodeFrame::PullReady {
            request: key.0,
            ctx_rank: self.rank,
        };
        if let Err(e) = self.links.send_frame(to, Frame::Node(ready)) {
            // Nobody will pull: end the job now rather than leave its blocks pinned.
            self.lock().remove(&key);
            self.cuda.peer_finished(
                parked.id,
                Err(AgentError::Backend(format!("pull-ready not sent: {e}"))),
            );
            self.wake.notify_one();
        }
        Ok(())
    }

    /// A parked send is only marked (it ends as `Cancelled` when the gen's pull is over): the
    /// gen may be reading its blocks right now.
    fn cancel(&self, id: TransferId) {
        self.cuda.cancel(id);
    }
}
