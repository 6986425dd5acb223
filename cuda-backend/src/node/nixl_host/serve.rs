//! Ctx side: a `TransferAgent` whose send jobs move no bytes themselves. Each is parked, its
//! blocks pinned by the core, and offered to the gen with a `NixlReady`; the gen READs the
//! blocks with NIXL and its READ's notification (request, token, transfer), from the agent
//! that gen announced (`NixlAgent`, see `parked`), completes the send.
//! A `NixlFailed` from that gen, or the loss of its connection, fails it instead. The core
//! unpins only on that completion, so no READ of the gen reads blocks already reused here.

use super::super::frame::{Frame, NodeFrame};
use super::super::link::Links;
use super::parked::{Parked, ParkedSends};
use crate::nixl::Driver;
use kvferry_core::agent::{
    AgentError, Completion, CompletionQueue, Direction, TransferAgent, TransferId, TransferJob,
};
use kvferry_core::{PeerId, RequestId};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

#[derive(Debug, Default)]
struct State {
    parked: ParkedSends,
    /// Connections that were sent this agent's metadata.
    told: HashSet<PeerId>,
}

/// Where the ctx's pool lies, and the metadata a gen needs to READ it.
#[derive(Debug, Clone)]
pub struct PoolOffer {
    pub rank: u32,
    pub base: u64,
    pub bytes: u64,
    pub md_hex: String,
}

#[derive(Debug)]
pub struct NixlServe {
    driver: Mutex<Driver>,
    offer: PoolOffer,
    links: Links,
    wake: Arc<Notify>,
    state: Mutex<State>,
}

impl NixlServe {
    pub fn new(driver: Driver, offer: PoolOffer, links: Links, wake: Arc<Notify>) -> NixlServe {
        NixlServe {
            driver: Mutex::new(driver),
            offer,
            links,
            wake,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("nixl serve state poisoned")
    }

    /// Completes parked sends whose READ notified. Call before every completion step.
    pub fn pump(&self) {
        let mut notes = Vec::new();
        self.driver().take_notifs(&mut notes);
        if notes.is_empty() {
            return;
        }
        let mut st = self.lock();
        for (agent, bytes) in notes {
            let (id, p) = match st.parked.on_notification(&agent, &bytes) {
                Ok(ended) => ended,
                // Debug, not warn: any agent could otherwise flood the log at will.
                Err(why) => {
                    tracing::debug!(agent, ?why, "NIXL notification ignored");
                    continue;
                }
            };
            let result = if p.cancelled {
                Err(AgentError::Cancelled)
            } else {
                Ok(p.bytes)
            };
            p.done.push(Completion { id, result });
        }
        self.driver().awaiting(st.parked.count());
    }

    /// The gen `peer` announced its NIXL agent.
    pub fn on_agent(&self, peer: PeerId, name: String) -> Result<(), String> {
        self.lock().parked.bind_agent(peer, name)
    }

    /// The gen `from` says its READ of `transfer` will not notify: the send fails.
    pub fn on_failed(&self, from: PeerId, request: RequestId, transfer: u64, error: &str) -> bool {
        let id = TransferId(transfer);
        let mut st = self.lock();
        let Some(p) = st.parked.take_failed(id, from, request) else {
            return false;
        };
        self.driver().awaiting(st.parked.count());
        let why = AgentError::Backend(format!("gen READ failed: {error}"));
        p.done.push(Completion {
            id,
            result: Err(why),
        });
        self.wake.notify_one();
        true
    }

    /// The gen's connection is gone: its parked sends fail instead of waiting forever, and a
    /// reconnect is sent the metadata again (and must announce its agent again).
    pub fn peer_lost(&self, peer: PeerId) {
        let mut st = self.lock();
        st.told.remove(&peer);
        let lost = st.parked.take_peer(peer);
        self.driver().awaiting(st.parked.count());
        let any = !lost.is_empty();
        for (id, p) in lost {
            let result = Err(AgentError::PeerUnreachable(peer));
            p.done.push(Completion { id, result });
        }
        if any {
            self.wake.notify_one();
        }
    }

    fn driver(&self) -> MutexGuard<'_, Driver> {
        self.driver.lock().expect("nixl driver lock poisoned")
    }

    fn ready_frame(&self, st: &mut State, to: PeerId, request: RequestId, id: TransferId) -> Frame {
        let md = st.told.insert(to).then(|| self.offer.md_hex.clone());
        Frame::Node(NodeFrame::NixlReady {
            request,
            ctx_rank: self.offer.rank,
            transfer: id.0,
            pool_base: self.offer.base,
            pool_bytes: self.offer.bytes,
            md,
        })
    }
}

impl TransferAgent for NixlServe {
    fn submit(&self, job: TransferJob, done: CompletionQueue) -> Result<(), AgentError> {
        let Direction::Send { to } = job.direction else {
            return Err(AgentError::Backend("a NIXL ctx node only sends".into()));
        };
        let mut st = self.lock();
        let parked = Parked {
            request: job.request,
            token: job.token,
            to,
            bytes: job.bytes,
            done,
            cancelled: false,
        };
        // Parked before the gen is told, so its notification cannot come first.
        st.parked.park(job.id, parked)?;
        let frame = self.ready_frame(&mut st, to, job.request, job.id);
        if let Err(e) = self.links.send_frame(to, frame) {
            // Nobody will READ: refuse now rather than leave the blocks pinned.
            st.told.remove(&to);
            st.parked.take_failed(job.id, to, job.request);
            return Err(AgentError::Backend(format!("nixl-ready not sent: {e}")));
        }
        self.driver().awaiting(st.parked.count());
        Ok(())
    }

    /// Only marks: the gen may be reading the blocks right now, so the send still ends at the
    /// READ's notification (as `Cancelled`), its failure, or the gen's loss.
    fn cancel(&self, id: TransferId) {
        self.lock().parked.cancel(id);
    }
}

impl Drop for NixlServe {
    /// Parked sends end with `ShutDown`; their gens may still be reading, so the pool and its
    /// registration are leaked rather than freed under them.
    fn drop(&mut self) {
        let parked = self.lock().parked.take_all();
        let leak = !parked.is_empty();
        for (id, p) in parked {
            p.done.push(Completion {
                id,
                result: Err(AgentError::ShutDown),
            });
        }
        self.driver().stop(leak);
    }
}
