//! The embedded instance's loop, for either side: the program's commands, connection events
//! (tagged with the local rank whose connection it is) and agent completions in; the
//! instance's completion step every turn; a terminal status out for each request once it has
//! ended on every rank *and* none of its blocks on any rank is still pinned (a block that a
//! fencing transfer still pins is not the engine's, I1/I5), so the engine may reuse a block
//! the moment it sees its request's status.
//!
//! Every request is registered on every rank in one call (the same engine block ids and, on
//! the context side, one token), cancelled on every rank together, and ended by
//! `Instance::step` on every rank in the same step (I7): the ranks' tables move in lockstep,
//! so only rank 0 can refuse a request and the others are asserted to take it.

use super::command::{Command, CommandError};
use super::dialers::{Dialers, Parked};
use super::outcomes::{Outcome, Outcomes, MAX_UNCLAIMED};
use super::ticket::ContextTicket;
use crate::node::conn::{Delivery, Inbound};
use crate::node::frame::{Answer, Frame, NodeFrame, MAX_PREPARE_ASKS};
use crate::node::instance::Instance;
use crate::node::link::Outgoing;
use crate::node::rank::Rank;
use crate::node::{drain_inbox, sleep_until, NodeError, OwnedTask};
use kvferry_core::blocks::{BlockError, BlockRef};
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
/// How long `close` then waits for its connections to end: each flushes what it owes, then
/// reads for at most `conn::FLUSH_ON_CLOSE` until the peer's FIN; one more second for the
/// flush (loopback or LAN: a peer that reads takes a tail of queued frames well within it).
const HANG_UP: Duration = Duration::from_secs(2);
/// Bytes of a peer's error text kept for a status (the peer is not trusted to be brief).
const MAX_DETAIL: usize = 256;

/// Which side the instance serves, with what only that side has.
#[derive(Debug)]
pub enum Role {
    /// The addresses tickets name (one per rank, in rank order), and the accept loops (end
    /// with the driver).
    Context {
        addrs: Vec<SocketAddr>,
        _accept: Vec<OwnedTask<()>>,
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
    /// Ended requests not reported yet: each rank's end so far, with its local rank. Reported
    /// once every rank's is here and none of their blocks is pinned.
    fencing: HashMap<RequestId, Vec<(usize, Finished)>>,
    /// Connections lost (local rank, peer), handled after the step.
    lost: Vec<(usize, PeerId)>,
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
            fencing: HashMap::new(),
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
        let ids: Vec<RequestId> = self.engine.keys().copied().collect();
        for id in ids {
            self.cancel(id);
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
        // What came before the close (an old connection's `Down`) is not the closed links'.
        drain_inbox(inbox, |ev| self.on_inbound(ev));
        self.step()?;
        self.hang_up(inbox).await;
        self.out.close();
        Ok(())
    }

    /// Closes every connection and waits (bounded by `HANG_UP`) for each to end
    /// (`Instance::hang_up`): a context rank's writer flushes the tail of a send its status
    /// already called sent, and dropping the runtime at once would reset the sockets. A
    /// generation rank's dialer is stopped as its connection ends, so it does not redial.
    async fn hang_up(&mut self, inbox: &mut mpsc::Receiver<Delivery>) {
        let Driver { inst, role, .. } = self;
        inst.hang_up(inbox, HANG_UP, |g, peer| {
            if let Role::Generation(d) = role {
                d.stop(g, peer);
            }
        })
        .await;
    }

    fn step(&mut self) -> Result<(), NodeError> {
        let stepped = self.inst.step()?;
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
        for (r, f) in stepped.finished {
            self.inst.ranks[r].release(&f);
            self.fencing.entry(f.request.id).or_default().push((r, f));
        }
        self.report_fenced();
        for (r, peer) in std::mem::take(&mut self.lost) {
            let rank = &mut self.inst.ranks[r];
            let now = rank.now();
            rank.tx.handle_peer_lost(now, peer);
            rank.backend.peer_lost(peer);
        }
        self.inst.update_metrics();
        Ok(())
    }

    /// Reports every request that has ended on every rank and none of whose blocks, on any
    /// rank, is still pinned. Its state is the first rank's that did not complete, if any.
    fn report_fenced(&mut self) {
        let ranks = self.inst.ranks.len();
        let free: Vec<RequestId> = (self.fencing.iter())
            .filter(|(_, ends)| {
                ends.len() == ranks && ends.iter().all(|(r, f)| self.unpinned(*r, f))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in free {
            let ends = self.fencing.remove(&id).expect("just seen");
            let state = (ends.iter().map(|(_, f)| f.state))
                .find(|s| !matches!(s, RequestState::ContextComplete | RequestState::GenComplete))
                .unwrap_or(ends[0].1.state);
            self.report(id, state);
        }
    }

    /// None of `f`'s blocks on rank `r` is pinned by a transfer still fencing.
    fn unpinned(&self, r: usize, f: &Finished) -> bool {
        let pool = self.inst.ranks[r].pool.lock().expect("pool lock");
        (f.request.blocks.iter()).all(|b| pool.current(b.id).is_none_or(|(_, now)| now != *b))
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
        let g = d.rank;
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
                let rank = &mut self.inst.ranks[g];
                let now = rank.now();
                rank.tx.handle_message(now, peer, msg);
            }
            Inbound::Frame {
                peer,
                frame: Frame::Node(f),
            } => self.on_node_frame(g, peer, f),
            Inbound::Up { peer } => self.on_up(g, peer),
            Inbound::Down { peer, reason } => {
                tracing::info!(%peer, rank = g, %reason, "peer disconnected");
                if let Role::Generation(d) = &mut self.role {
                    d.down(g, peer);
                }
                self.lost.push((g, peer));
            }
            Inbound::GaveUp { peer, reason } => {
                let parked = match &mut self.role {
                    Role::Generation(d) => d.gave_up(g, peer),
                    Role::Context { .. } => Vec::new(),
                };
                for reqs in parked {
                    let id = reqs[0].id;
                    self.note(
                        id,
                        format!("context rank {} unreachable: {reason}", peer.rank),
                    );
                    self.causes.insert(id, FailCause::Unreachable);
                    self.drop_unregistered(&reqs, RequestState::TransferError);
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

    fn close_link(&self, g: usize, peer: PeerId) {
        if let Some(l) = self.inst.ranks[g].links.get(peer) {
            let _ = l.control.try_send(Outgoing::Close);
        }
    }

    fn on_node_frame(&mut self, g: usize, peer: PeerId, f: NodeFrame) {
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
            let _ = self.inst.ranks[g].links.send_frame(peer, reply);
            return;
        }
        let pool = matches!(f, NodeFrame::CudaPool { .. });
        match self.inst.ranks[g].backend.on_backend_frame(peer, f) {
            // A CUDA generation rank launches once it has mapped the context's pool.
            Ok(()) if pool => self.launch_parked(g, peer),
            Ok(()) => {}
            Err(e) => {
                let who = self.inst.ranks[g].links.describe(peer);
                tracing::warn!(peer = %who, rank = g, error = %e, "closing");
                self.close_link(g, peer);
            }
        }
    }

    /// Local rank `g`'s connection is up: a context rank greets it with what its backend
    /// needs the peer to know first (a CUDA pool's IPC handle); a generation rank launches
    /// what was parked for it, unless its backend must first hear that greeting.
    fn on_up(&mut self, g: usize, peer: PeerId) {
        if let Some(hello) = self.inst.ranks[g].backend.greeting() {
            let sent = self.inst.ranks[g]
                .links
                .send_frame(peer, Frame::Node(hello));
            if let Err(e) = sent {
                tracing::warn!(%peer, rank = g, error = %e, "greeting not sent, closing");
                self.close_link(g, peer);
            }
        }
        if self.inst.ranks[g].backend.ready_on_connect() {
            self.launch_parked(g, peer);
        }
    }

    /// Submits what waited for local rank `g`'s connection to `peer`, if that was the last
    /// connection it waited for.
    fn launch_parked(&mut self, g: usize, peer: PeerId) {
        let Role::Generation(d) = &mut self.role else {
            return;
        };
        for reqs in d.up(g, peer) {
            if let Err(e) = self.inst.register_each(&reqs, Rank::request_and_receive) {
                self.note(reqs[0].id, e.to_string());
                self.drop_unregistered(&reqs, RequestState::TransferError);
            }
        }
    }

    /// The engine's `blocks` for core request `id` on every rank, each rank's references in
    /// rank order; all or nothing.
    fn allocate_ids(
        &self,
        id: RequestId,
        blocks: &[u32],
    ) -> Result<Vec<Vec<BlockRef>>, BlockError> {
        self.inst
            .allocate_each(|_, pool| pool.allocate_ids(id, blocks))
    }

    /// Frees a request's blocks on every rank (it was never registered, or refused).
    fn free(&self, reqs: &[Arc<Request>]) {
        self.inst.free_each(reqs.iter().map(|r| &r.blocks[..]));
    }

    /// Ends a request the core never registered (parked, then failed or cancelled).
    fn drop_unregistered(&mut self, reqs: &Parked, state: RequestState) {
        self.free(reqs);
        self.report(reqs[0].id, state);
    }

    /// Cancels core request `core` on every rank, parked or registered; false if it is
    /// neither.
    fn cancel(&mut self, core: RequestId) -> bool {
        if let Role::Generation(d) = &mut self.role {
            if let Some(reqs) = d.unpark(core) {
                self.causes.insert(core, FailCause::Cancelled);
                self.drop_unregistered(&reqs, RequestState::Cancelled);
                return true;
            }
        }
        let mut any = false;
        for rank in &mut self.inst.ranks {
            let now = rank.now();
            any |= rank.tx.cancel(now, core);
        }
        any
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
                let done = (self.core.get(&id).copied()).is_some_and(|c| self.cancel(c));
                let _ = reply.send(done);
            }
            Command::Occupancy { reply } => {
                let _ = reply.send(self.inst.occupancy());
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

    /// Context side: the engine's `blocks` of request `id`, registered on every rank with one
    /// token (I9: each rank serves them only to a peer that presents it).
    fn send(&mut self, id: RequestId, blocks: Vec<u32>) -> Result<ContextTicket, CommandError> {
        let Role::Context { addrs, .. } = &self.role else {
            return Err(CommandError::WrongSide("generation"));
        };
        let addrs = addrs.clone();
        self.admissible(id, id, &blocks)?;
        let token = TransferToken(rand::random());
        let reqs: Vec<Arc<Request>> = (self.allocate_ids(id, &blocks)?.into_iter())
            .map(|refs| Arc::new(Request::new_context(id, token, refs)))
            .collect();
        if let Err(e) = self.inst.register_each(&reqs, Rank::respond_and_send) {
            self.free(&reqs);
            return Err(e.into());
        }
        self.register(id, id);
        Ok(ContextTicket {
            addrs,
            request: id,
            token,
            layout: *self.inst.ranks[0].tx.layout(),
            blocks,
        })
    }

    /// Generation side: `t`'s request into the engine's `blocks` on every rank, each rank
    /// reading its share from the context ranks that hold it (the core splits by heads).
    /// Every check comes before the dialers start: a refused ticket dials nothing.
    fn receive(
        &mut self,
        id: RequestId,
        blocks: Vec<u32>,
        t: ContextTicket,
    ) -> Result<(), CommandError> {
        if !matches!(self.role, Role::Generation(_)) {
            return Err(CommandError::WrongSide("context"));
        }
        let core = t.request;
        self.fits(&blocks, &t)?;
        self.admissible(id, core, &blocks)?;
        let refs = self.allocate_ids(core, &blocks)?;
        let Role::Generation(dialers) = &mut self.role else {
            unreachable!("checked above");
        };
        let instance = match dialers.instance_for(&t.addrs) {
            Ok(i) => i,
            Err(e) => {
                self.inst.free_each(refs.iter().map(Vec::as_slice));
                return Err(e.into());
            }
        };
        let source = ContextSource {
            instance,
            layout: t.layout,
            blocks: t.blocks,
        };
        let reqs: Parked = (refs.into_iter())
            .map(|refs| Arc::new(Request::new_generation(core, t.token, refs, source.clone())))
            .collect();
        if dialers.is_up(instance) {
            if let Err(e) = self.inst.register_each(&reqs, Rank::request_and_receive) {
                self.free(&reqs);
                return Err(e.into());
            }
        } else {
            dialers.park(instance, reqs);
        }
        self.register(id, core);
        Ok(())
    }

    /// Ticket `t` describes this model's cache and as many blocks as `blocks`.
    fn fits(&self, blocks: &[u32], t: &ContextTicket) -> Result<(), CommandError> {
        if t.blocks.len() != blocks.len() {
            return Err(CommandError::BlockCount {
                ctx: t.blocks.len(),
                gen: blocks.len(),
            });
        }
        let mine = self.inst.ranks[0].tx.layout();
        let world = t.layout.world_size() as usize;
        if !t.layout.same_model(mine) || t.addrs.len() != world {
            return Err(CommandError::OtherModel(format!(
                "context {:?} at {} addresses, this instance {mine:?}",
                t.layout,
                t.addrs.len()
            )));
        }
        Ok(())
    }
}
