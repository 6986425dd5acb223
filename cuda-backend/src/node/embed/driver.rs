//! The embedded rank's loop, for either side: the program's commands, connection events and
//! agent completions in; the rank's completion step every turn; a terminal status out for
//! each request once it has ended *and* its blocks are the engine's again (a block that a
//! fencing transfer still pins is not, I1/I5), so the engine may reuse a block the moment it
//! sees its request's status.

use super::command::{Command, CommandError};
use super::dialers::Dialers;
use super::outcomes::{Outcome, Outcomes, MAX_UNCLAIMED};
use super::ticket::ContextTicket;
use crate::node::conn::{Delivery, Inbound};
use crate::node::frame::{Answer, Frame, NodeFrame, MAX_PREPARE_ASKS};
use crate::node::instance::Instance;
use crate::node::link::Outgoing;
use crate::node::{drain_inbox, sleep_until, NodeError, OwnedTask};
use kvferry_core::request::{ContextSource, Request, RequestState};
use kvferry_core::transceiver::{FailCause, Finished, TxEvent};
use kvferry_core::wire::Message;
use kvferry_core::{PeerId, RequestId, TransferToken};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long `close` waits for cancelled transfers to reach their fences.
pub const CLOSE_DRAIN: Duration = Duration::from_secs(2);
/// Bytes of a peer's error text kept for a status (the peer is not trusted to be brief).
const MAX_DETAIL: usize = 256;

/// Which side the rank serves, with what only that side has.
#[derive(Debug)]
pub enum Role {
    /// The address tickets name, and the accept loop (ends with the driver).
    Context {
        addr: SocketAddr,
        _accept: OwnedTask<()>,
    },
    Generation(Dialers),
}

#[derive(Debug)]
pub struct Driver {
    inst: Instance,
    role: Role,
    out: Arc<Outcomes>,
    /// Core request id to engine request id, for every request not reported yet (on the
    /// generation side the core id is the context's, the engine's may differ).
    engine: HashMap<RequestId, RequestId>,
    /// The reverse: engine id to core id.
    core: HashMap<RequestId, RequestId>,
    /// Why requests failed: the core's cause, and what the driver learnt (known requests only).
    causes: HashMap<RequestId, FailCause>,
    details: HashMap<RequestId, String>,
    /// Ended requests whose blocks are still pinned by a fencing transfer.
    fencing: Vec<Finished>,
    lost: Vec<PeerId>,
}

impl Driver {
    pub fn new(inst: Instance, role: Role, out: Arc<Outcomes>) -> Driver {
        Driver {
            inst,
            role,
            out,
            engine: HashMap::new(),
            core: HashMap::new(),
            causes: HashMap::new(),
            details: HashMap::new(),
            fencing: Vec::new(),
            lost: Vec::new(),
        }
    }

    /// Runs until the program drops its command sender (close), then cancels what is left
    /// and waits (bounded) for the fences.
    pub async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Delivery>,
        mut commands: mpsc::Receiver<Command>,
    ) -> Result<(), NodeError> {
        let wake = self.inst.wake.clone();
        loop {
            tokio::select! {
                ev = inbox.recv() => {
                    if let Some(ev) = ev {
                        self.on_inbound(ev);
                    }
                    drain_inbox(&mut inbox, |ev| self.on_inbound(ev));
                }
                cmd = commands.recv() => match cmd {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                _ = wake.notified() => {}
                _ = sleep_until(self.inst.next_deadline()) => {}
            }
            self.step()?;
        }
        self.shut_down(&mut inbox).await
    }

    async fn shut_down(&mut self, inbox: &mut mpsc::Receiver<Delivery>) -> Result<(), NodeError> {
        let now = self.inst.ranks[0].now();
        let ids: Vec<RequestId> = self.engine.keys().copied().collect();
        for id in ids {
            self.cancel(now, id);
        }
        let wake = self.inst.wake.clone();
        let until = Instant::now() + CLOSE_DRAIN;
        while !(self.engine.is_empty() && self.fencing.is_empty()) && Instant::now() < until {
            tokio::select! {
                Some(ev) = inbox.recv() => self.on_inbound(ev),
                _ = wake.notified() => {}
                _ = sleep_until(self.inst.next_deadline().map(|t| t.min(until))) => {}
                _ = tokio::time::sleep_until(until.into()) => {}
            }
            self.step()?;
        }
        for peer in self.inst.ranks[0].links.peers() {
            if let Some(l) = self.inst.ranks[0].links.get(peer) {
                let _ = l.control.try_send(Outgoing::Close);
            }
        }
        self.out.close();
        Ok(())
    }

    fn step(&mut self) -> Result<(), NodeError> {
        let stepped = self.inst.step()?;
        let finished = stepped.finished.into_iter().map(|(_, f)| f);
        for (_, e) in stepped.events {
            if let TxEvent::LocallyFinished {
                request,
                cause: Some(c),
                ..
            } = e
            {
                self.causes.entry(request).or_insert(c);
            }
        }
        for f in finished {
            self.inst.ranks[0].release(&f);
            self.fencing.push(f);
        }
        self.report_fenced();
        let now = self.inst.ranks[0].now();
        for peer in std::mem::take(&mut self.lost) {
            self.inst.ranks[0].tx.handle_peer_lost(now, peer);
            self.inst.ranks[0].backend.peer_lost(peer);
        }
        self.inst.update_metrics();
        Ok(())
    }

    /// Reports every ended request none of whose blocks is still pinned.
    fn report_fenced(&mut self) {
        let pool = self.inst.ranks[0].pool.clone();
        let pool = pool.lock().expect("pool lock");
        let (free, held): (Vec<Finished>, Vec<Finished>) = std::mem::take(&mut self.fencing)
            .into_iter()
            .partition(|f| {
                f.request
                    .blocks
                    .iter()
                    .all(|b| pool.current(b.id).is_none_or(|(_, now)| now != *b))
            });
        drop(pool);
        self.fencing = held;
        for f in free {
            self.report(f.request.id, f.state);
        }
    }

    fn report(&mut self, core: RequestId, state: RequestState) {
        let Some(id) = self.engine.remove(&core) else {
            return;
        };
        self.core.remove(&id);
        self.out.push(Outcome {
            id,
            state,
            cause: self.causes.remove(&core),
            detail: self.details.remove(&core),
        });
    }

    fn on_inbound(&mut self, d: Delivery) {
        let now = self.inst.ranks[0].now();
        match d.event {
            Inbound::Frame {
                peer,
                frame: Frame::Core(msg),
            } => {
                if let Message::Error {
                    request,
                    code,
                    detail,
                } = &msg
                {
                    self.note(*request, format!("peer refused ({code:?}): {detail}"));
                }
                self.inst.ranks[0].tx.handle_message(now, peer, msg);
            }
            Inbound::Frame {
                peer,
                frame: Frame::Node(f),
            } => self.on_node_frame(peer, f),
            Inbound::Up { peer } => self.on_up(peer),
            Inbound::Down { peer, reason } => {
                tracing::info!(%peer, %reason, "peer disconnected");
                if let Role::Generation(d) = &mut self.role {
                    d.down(peer);
                }
                self.lost.push(peer);
            }
            Inbound::GaveUp { peer, reason } => {
                let parked = match &mut self.role {
                    Role::Generation(d) => d.gave_up(peer),
                    Role::Context { .. } => Vec::new(),
                };
                for req in parked {
                    self.note(req.id, format!("context rank unreachable: {reason}"));
                    self.causes.insert(req.id, FailCause::Unreachable);
                    self.drop_unregistered(&req, RequestState::TransferError);
                }
            }
        }
    }

    /// Keeps the first thing learnt about a known request's failure, bounded.
    fn note(&mut self, request: RequestId, mut detail: String) {
        if !self.engine.contains_key(&request) {
            return;
        }
        if detail.len() > MAX_DETAIL {
            let mut cut = MAX_DETAIL;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        self.details.entry(request).or_insert(detail);
    }

    fn on_node_frame(&mut self, peer: PeerId, f: NodeFrame) {
        if let (NodeFrame::Prepare { asks }, Role::Context { .. }) = (&f, &self.role) {
            let reason = "this ctx serves its engine's requests, not synthetic ones";
            let answers = asks
                .iter()
                .take(MAX_PREPARE_ASKS)
                .map(|a| Answer::Failed {
                    tag: a.tag,
                    reason: reason.to_string(),
                })
                .collect();
            let layout = *self.inst.ranks[0].tx.layout();
            let reply = Frame::Node(NodeFrame::Prepared { layout, answers });
            let _ = self.inst.ranks[0].links.send_frame(peer, reply);
            return;
        }
        let pool = matches!(f, NodeFrame::CudaPool { .. });
        match self.inst.ranks[0].backend.on_backend_frame(peer, f) {
            // A CUDA generation rank launches once it has mapped the context's pool.
            Ok(()) if pool => self.launch_parked(peer),
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(peer = %self.inst.ranks[0].links.describe(peer), error = %e, "closing");
                if let Some(l) = self.inst.ranks[0].links.get(peer) {
                    let _ = l.control.try_send(Outgoing::Close);
                }
            }
        }
    }

    /// A connection is up: a context rank greets it with what its backend needs the peer to
    /// know first (a CUDA pool's IPC handle); a generation rank launches what was parked for
    /// it, unless its backend must first hear that greeting.
    fn on_up(&mut self, peer: PeerId) {
        if let Some(hello) = self.inst.ranks[0].backend.greeting() {
            if let Err(e) = self.inst.ranks[0]
                .links
                .send_frame(peer, Frame::Node(hello))
            {
                tracing::warn!(%peer, error = %e, "greeting not sent, closing");
                if let Some(l) = self.inst.ranks[0].links.get(peer) {
                    let _ = l.control.try_send(Outgoing::Close);
                }
            }
        }
        if self.inst.ranks[0].backend.ready_on_connect() {
            self.launch_parked(peer);
        }
    }

    fn launch_parked(&mut self, peer: PeerId) {
        let Role::Generation(d) = &mut self.role else {
            return;
        };
        let now = self.inst.ranks[0].now();
        for req in d.up(peer) {
            if let Err(e) = self.inst.ranks[0].tx.request_and_receive(now, req.clone()) {
                self.note(req.id, e.to_string());
                self.drop_unregistered(&req, RequestState::TransferError);
            }
        }
    }

    /// Ends a request the core never registered (parked, then failed or cancelled).
    fn drop_unregistered(&mut self, req: &Request, state: RequestState) {
        self.inst.ranks[0]
            .pool
            .lock()
            .expect("pool lock")
            .free(&req.blocks);
        self.report(req.id, state);
    }

    /// Cancels core request `core`, parked or registered; false if it is neither.
    fn cancel(&mut self, now: Duration, core: RequestId) -> bool {
        if let Role::Generation(d) = &mut self.role {
            if let Some(req) = d.unpark(core) {
                self.causes.insert(core, FailCause::Cancelled);
                self.drop_unregistered(&req, RequestState::Cancelled);
                return true;
            }
        }
        self.inst.ranks[0].tx.cancel(now, core)
    }

    fn on_command(&mut self, c: Command) {
        match c {
            Command::Send { id, blocks, reply } => {
                let _ = reply.send(self.send(id, blocks));
            }
            Command::Receive {
                id,
                blocks,
                ticket,
                reply,
            } => {
                let _ = reply.send(self.receive(id, blocks, ticket));
            }
            Command::Cancel { id, reply } => {
                let now = self.inst.ranks[0].now();
                let done = self
                    .core
                    .get(&id)
                    .copied()
                    .is_some_and(|c| self.cancel(now, c));
                let _ = reply.send(done);
            }
            Command::Occupancy { reply } => {
                let _ = reply.send(self.inst.ranks[0].occupancy());
            }
        }
    }

    /// What every new request must pass first.
    fn admissible(
        &self,
        id: RequestId,
        core: RequestId,
        blocks: &[u32],
    ) -> Result<(), CommandError> {
        if blocks.is_empty() {
            return Err(CommandError::NoBlocks);
        }
        let unclaimed = self.out.unclaimed();
        if unclaimed >= MAX_UNCLAIMED {
            return Err(CommandError::Unclaimed(unclaimed));
        }
        if self.core.contains_key(&id) {
            return Err(CommandError::IdInUse(id));
        }
        if self.engine.contains_key(&core) {
            return Err(CommandError::IdInUse(core));
        }
        Ok(())
    }

    fn register(&mut self, id: RequestId, core: RequestId) {
        self.engine.insert(core, id);
        self.core.insert(id, core);
        self.out.expect_one();
    }

    fn send(&mut self, id: RequestId, blocks: Vec<u32>) -> Result<ContextTicket, CommandError> {
        let Role::Context { addr, .. } = &self.role else {
            return Err(CommandError::WrongSide("generation"));
        };
        let addr = *addr;
        self.admissible(id, id, &blocks)?;
        let refs = self.inst.ranks[0]
            .pool
            .lock()
            .expect("pool lock")
            .allocate_ids(id, &blocks)?;
        let token = TransferToken(rand::random());
        let req = Arc::new(Request::new_context(id, token, refs.clone()));
        let now = self.inst.ranks[0].now();
        if let Err(e) = self.inst.ranks[0].tx.respond_and_send(now, req) {
            self.inst.ranks[0]
                .pool
                .lock()
                .expect("pool lock")
                .free(&refs);
            return Err(e.into());
        }
        self.register(id, id);
        Ok(ContextTicket {
            addr,
            request: id,
            token,
            layout: *self.inst.ranks[0].tx.layout(),
            blocks,
        })
    }

    fn receive(
        &mut self,
        id: RequestId,
        blocks: Vec<u32>,
        t: ContextTicket,
    ) -> Result<(), CommandError> {
        let Role::Generation(dialers) = &mut self.role else {
            return Err(CommandError::WrongSide("context"));
        };
        let core = t.request;
        if t.blocks.len() != blocks.len() {
            return Err(CommandError::BlockCount {
                ctx: t.blocks.len(),
                gen: blocks.len(),
            });
        }
        let mine = self.inst.ranks[0].tx.layout();
        if !t.layout.same_model(mine) || t.layout.world_size() != 1 {
            return Err(CommandError::OtherModel(format!(
                "context {:?}, this rank {:?} (one context rank per instance is supported)",
                t.layout, mine
            )));
        }
        let peer = dialers.peer_for(t.addr).ok_or(CommandError::TooManyPeers)?;
        self.admissible(id, core, &blocks)?;
        let refs = self.inst.ranks[0]
            .pool
            .lock()
            .expect("pool lock")
            .allocate_ids(core, &blocks)?;
        let source = ContextSource {
            instance: peer.instance,
            layout: t.layout,
            blocks: t.blocks,
        };
        let req = Arc::new(Request::new_generation(core, t.token, refs.clone(), source));
        let Role::Generation(dialers) = &mut self.role else {
            unreachable!("checked above");
        };
        if dialers.is_up(peer) {
            let now = self.inst.ranks[0].now();
            if let Err(e) = self.inst.ranks[0].tx.request_and_receive(now, req) {
                self.inst.ranks[0]
                    .pool
                    .lock()
                    .expect("pool lock")
                    .free(&refs);
                return Err(e.into());
            }
        } else {
            dialers.park(peer, req);
        }
        self.register(id, core);
        Ok(())
    }
}
