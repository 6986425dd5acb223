//! The ctx (prefill) role: accepts gen peers, prepares synthetic requests on their demand
//! (blocks allocated and filled from a seed, `respond_and_send` registered), and serves their
//! `RequestInfo`s. A request whose gen peer disconnects is cancelled; one never asked for
//! fails after `kv_transfer_sender_future_timeout_ms`.
//!
//! Peers are not trusted to share: seats in the connection table are shared out by source IP
//! (`admit`), the blocks of prepared requests too (`NodeLimits::max_blocks_per_ip`), and a
//! connection silent past its deadline is closed (`conn`), which cancels what it held.

use super::admit::{Admission, Admit, SeatGuard, SeatSignals};
use super::backend::BackendSpec;
use super::conn::{Attach, Delivery, Inbound, ReadDeadlines};
use super::frame::{
    Answer, Ask, Frame, NodeFrame, MAX_NODE_BODY, MAX_PREPARE_ASKS, MAX_PREPARE_BLOCKS,
};
use super::instance::Instance;
use super::link::Outgoing;
use super::rank::Rank;
use super::spec::{NodeSpec, CTX_INSTANCE, GEN_INSTANCE_BASE};
use super::{drain_inbox, sleep_until, NodeError, OwnedTask, INBOX};
use kvferry_core::blocks::BlockRef;
use kvferry_core::layout::CacheLayout;
use kvferry_core::request::{Request, RequestState};
use kvferry_core::transceiver::{Finished, Side};
use kvferry_core::{PeerId, RequestId, TransferToken};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Span;

/// Gen peers connected at once. A newcomer past it takes the seat of the oldest connection that
/// has not sent a frame yet, or is refused with a WARN when there is none (`admit`).
pub const MAX_CONNECTIONS: usize = 256;
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Bytes of answers per `Prepared` frame: half the node frame bound, so the estimate in
/// `answer_bytes` has room to spare.
const REPLY_BYTES: usize = MAX_NODE_BODY / 2;

/// An upper bound on an answer's encoded size (bincode varints: at most 17 bytes for a
/// u128, 9 for a u64, 5 for a u32 or a length).
fn answer_bytes(a: &Answer) -> usize {
    match a {
        Answer::Prepared { ctx_blocks, .. } => 1 + 9 + 9 + 17 + 9 + 5 * ctx_blocks.len(),
        Answer::Failed { reason, .. } | Answer::Busy { reason, .. } => 1 + 9 + 9 + reason.len(),
    }
}

/// A connection of the instance: the local rank it reaches and the peer id that rank gave it.
type ConnId = (usize, PeerId);

/// Why an ask was not prepared: `Busy` may pass once requests end, `Failed` will not.
enum Refusal {
    Busy(String),
    Failed(String),
}

#[derive(Debug)]
struct Owned {
    /// The connection whose `Prepare` made the request.
    conn: ConnId,
    /// The host whose block share the request counts against, and its blocks.
    ip: IpAddr,
    blocks: usize,
    span: Span,
}

#[derive(Debug)]
struct CtxNode {
    inst: Instance,
    owned: HashMap<RequestId, Owned>,
    next_id: u64,
    /// Gen connections that ended, handled after the next completion step: the
    /// completions they sent before hanging up (a host send task's end, a CUDA pull's
    /// `PullFinished`) are drained first, so requests that did finish are not cancelled.
    lost: Vec<ConnId>,
    /// Source IP of each connected gen peer (from `Up` until it is forgotten).
    peer_ips: HashMap<ConnId, IpAddr>,
    /// Blocks held by each host's prepared requests; a host holding none has no entry.
    held: HashMap<IpAddr, usize>,
    /// `NodeLimits::blocks_per_ip` for this pool.
    blocks_per_ip: usize,
}

/// Runs a host-memory ctx instance, one rank per listener, until the process ends (or the
/// task is aborted).
pub async fn run(listeners: Vec<TcpListener>, spec: NodeSpec) -> Result<(), NodeError> {
    let inst = Instance::uniform(CTX_INSTANCE, Side::Context, &spec, BackendSpec::Host)
        .expect("the host backend cannot fail to build");
    run_with(listeners, inst).await
}

/// As `run`, with an instance built by the caller (to share its metrics, or on another
/// backend): rank `r` accepts its gen peers on `listeners[r]`.
pub async fn run_with(listeners: Vec<TcpListener>, inst: Instance) -> Result<(), NodeError> {
    assert_eq!(listeners.len(), inst.ranks.len(), "one listener per rank");
    let (inbox_tx, mut inbox) = mpsc::channel(INBOX);
    // Owned: aborting this role stops its accept loops and, with them, their connections.
    let _accept: Vec<OwnedTask<()>> = listeners
        .into_iter()
        .zip(&inst.ranks)
        .map(|(l, r)| {
            OwnedTask(tokio::spawn(accept_loop(
                l,
                Attach::new(r, inbox_tx.clone()),
            )))
        })
        .collect();
    drop(inbox_tx);
    let rank0 = &inst.ranks[0];
    let pool_blocks = rank0.pool.lock().expect("pool lock").capacity() as u32;
    let mut node = CtxNode {
        peer_ips: HashMap::new(),
        held: HashMap::new(),
        blocks_per_ip: rank0.limits.blocks_per_ip(pool_blocks) as usize,
        inst,
        owned: HashMap::new(),
        // Ids from a fresh random base: a restarted ctx never reuses ids a gen still knows.
        next_id: rand::random::<u64>() >> 2,
        lost: Vec::new(),
    };
    let wake = node.inst.wake.clone();
    loop {
        tokio::select! {
            ev = inbox.recv() => {
                let Some(ev) = ev else { return Ok(()) };
                node.on_inbound(ev);
                drain_inbox(&mut inbox, |ev| node.on_inbound(ev));
            }
            _ = wake.notified() => {}
            _ = sleep_until(node.inst.next_deadline()) => {}
        }
        let stepped = node.inst.step()?;
        for (r, f) in stepped.finished {
            node.on_finished(r, f);
        }
        node.forget_lost_peers();
        node.inst.update_metrics();
    }
}

/// Accepts gen peers on `listener` for the driver behind `a`, seated by `admit`, until aborted.
pub async fn accept_loop(listener: TcpListener, a: Attach) {
    let table = Arc::new(Mutex::new(Admission::new(
        MAX_CONNECTIONS,
        a.limits.max_conns_per_ip,
    )));
    let mut n: u32 = 0;
    // The connection tasks: aborted when this loop is (dropping a `JoinSet` aborts its tasks).
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {} // reap the ended ones
        let (stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let peer = PeerId {
            instance: GEN_INSTANCE_BASE + n,
            rank: 0,
        };
        n = n.wrapping_add(1);
        let seat = SeatSignals::default();
        let admitted =
            table
                .lock()
                .expect("connection table lock")
                .admit(peer, addr.ip(), seat.clone());
        match admitted {
            Admit::Refused { reason } => {
                a.metrics.connections_refused.inc();
                tracing::warn!(%addr, limit = MAX_CONNECTIONS, per_ip = a.limits.max_conns_per_ip, reason, "refusing a connection");
                continue;
            }
            Admit::Seated { evicted: Some(old) } => {
                tracing::info!(evicted = %a.links.describe(old), %addr, "seat of a connection that sent no frame given to a newcomer");
            }
            Admit::Seated { evicted: None } => {}
        }
        let guard = SeatGuard {
            table: table.clone(),
            peer,
        };
        let Some(task) = connect(&a, stream, addr, peer, seat).await else {
            return;
        };
        conns.spawn(async move {
            let _seat = guard; // freed however the task ends
            task.await
        });
    }
}

/// Attaches a seated connection; returns its task (`None` when the driver is gone).
async fn connect(
    a: &Attach,
    stream: tokio::net::TcpStream,
    addr: SocketAddr,
    peer: PeerId,
    seat: SeatSignals,
) -> Option<impl std::future::Future<Output = ()>> {
    let deadlines = ReadDeadlines {
        first_frame: a.limits.first_frame,
        idle: a.limits.idle(),
    };
    let conn = a.up(stream, (peer, addr), deadlines, seat).await?;
    tracing::info!(%peer, %addr, "gen peer connected");
    Some(async move {
        conn.run().await;
    })
}

impl CtxNode {
    fn rank(&self, r: usize) -> &Rank {
        &self.inst.ranks[r]
    }

    fn describe(&self, (r, peer): ConnId) -> String {
        self.rank(r).links.describe(peer)
    }

    fn on_inbound(&mut self, d: Delivery) {
        let r = d.rank;
        match d.event {
            Inbound::Frame {
                peer,
                frame: Frame::Core(msg),
            } => {
                let rank = &mut self.inst.ranks[r];
                let now = rank.now();
                rank.tx.handle_message(now, peer, msg)
            }
            Inbound::Frame {
                peer,
                frame: Frame::Node(NodeFrame::Prepare { asks }),
            } => self.on_prepare((r, peer), asks),
            Inbound::Frame {
                peer,
                frame:
                    Frame::Node(
                        f @ (NodeFrame::PullFinished { .. }
                        | NodeFrame::NixlFailed { .. }
                        | NodeFrame::NixlAgent { .. }),
                    ),
            } => {
                if let Err(e) = self.rank(r).backend.on_backend_frame(peer, f) {
                    tracing::warn!(peer = %self.describe((r, peer)), error = %e, "closing");
                    self.close((r, peer));
                }
            }
            Inbound::Frame {
                peer,
                frame: Frame::Node(other),
            } => {
                tracing::warn!(peer = %self.describe((r, peer)), frame = ?other, "unexpected node frame, closing");
                self.close((r, peer));
            }
            Inbound::Down { peer, reason } => {
                tracing::info!(%peer, rank = r, %reason, "gen peer disconnected");
                self.lost.push((r, peer));
            }
            Inbound::Up { peer } => {
                if let Some(l) = self.rank(r).links.get(peer) {
                    self.peer_ips.insert((r, peer), l.addr.ip());
                }
                self.greet((r, peer));
            }
            Inbound::GaveUp { .. } => {}
        }
    }

    /// Answers one `Prepare`: every ask in order, in as few `Prepared` frames as fit the node
    /// frame bound (one, unless many asks name many blocks or fail with long reasons).
    fn on_prepare(&mut self, conn: ConnId, asks: Vec<Ask>) {
        if asks.len() > MAX_PREPARE_ASKS {
            tracing::warn!(peer = %self.describe(conn), asks = asks.len(), limit = MAX_PREPARE_ASKS, "prepare over its ask bound, closing");
            self.close(conn);
            return;
        }
        // Rank 0's layout: its world size tells the gen how many ctx ranks serve a request.
        let layout = *self.rank(0).tx.layout();
        let mut answers = Vec::with_capacity(asks.len());
        let mut bytes = 0;
        for Ask { tag, blocks, seed } in asks {
            let answer = match self.prepare(conn, blocks, seed) {
                Ok((id, token, ctx_blocks)) => Answer::prepared(tag, id, token, ctx_blocks),
                Err(Refusal::Busy(reason)) => Answer::Busy { tag, reason },
                Err(Refusal::Failed(reason)) => Answer::Failed { tag, reason },
            };
            let size = answer_bytes(&answer);
            if bytes + size > REPLY_BYTES {
                self.reply(conn, layout, std::mem::take(&mut answers));
                bytes = 0;
            }
            bytes += size;
            answers.push(answer);
        }
        self.reply(conn, layout, answers);
    }

    fn reply(&self, (r, peer): ConnId, layout: CacheLayout, answers: Vec<Answer>) {
        let reply = Frame::Node(NodeFrame::Prepared { layout, answers });
        if let Err(e) = self.rank(r).links.send_frame(peer, reply) {
            tracing::warn!(%peer, error = %e, "prepare reply not sent");
        }
    }

    /// Allocates and fills a synthetic request on every rank and registers it for sending.
    fn prepare(
        &mut self,
        conn: ConnId,
        n: u32,
        seed: Option<u64>,
    ) -> Result<(RequestId, TransferToken, Vec<u32>), Refusal> {
        let most = MAX_PREPARE_BLOCKS.min(self.blocks_per_ip as u32);
        if n == 0 || n > most {
            // Past the host's share no wait helps: `Failed`, not `Busy`.
            return Err(Refusal::Failed(format!(
                "block count {n} outside 1..={most} (this host's share of the pool)"
            )));
        }
        let ip = self.share_left(conn, n)?;
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let refs = self.allocate(id, n, seed)?;
        let ids: Vec<u32> = refs[0].iter().map(|b| b.id).collect();
        let token = TransferToken(rand::random());
        let reqs: Vec<Arc<Request>> = (refs.into_iter())
            .map(|blocks| Arc::new(Request::new_context(id, token, blocks)))
            .collect();
        if let Err(e) = self.inst.register_each(&reqs, Rank::respond_and_send) {
            self.inst.free_each(reqs.iter().map(|r| &r.blocks[..]));
            return Err(Refusal::Failed(e.to_string()));
        }
        let bytes = u64::from(n) * self.inst.block_bytes();
        // DEBUG, not INFO: a span the default filter lets through is formatted on creation,
        // some µs a request (BENCHMARKS.md, "per-request cost").
        let span = tracing::debug_span!("transfer", request = %id, side = "ctx", bytes, outcome = tracing::field::Empty);
        self.owned.insert(
            id,
            Owned {
                conn,
                ip,
                blocks: n as usize,
                span,
            },
        );
        *self.held.entry(ip).or_default() += n as usize;
        Ok((id, token, ids))
    }

    /// The same block ids for request `id` on every rank (a `RequestInfo` names one list for
    /// the instance: rank 0 picks them), filled with the request's seeded bytes when `seed` is
    /// given; each rank's references, in rank order. On failure nothing stays allocated.
    fn allocate(
        &self,
        id: RequestId,
        n: u32,
        seed: Option<u64>,
    ) -> Result<Vec<Vec<BlockRef>>, Refusal> {
        let mut ids = Vec::new();
        let refs = (self.inst)
            .allocate_each(|r, pool| {
                if r > 0 {
                    return pool.allocate_ids(id, &ids);
                }
                let blocks = pool.allocate(id, n as usize)?;
                ids = blocks.iter().map(|b| b.id).collect();
                Ok(blocks)
            })
            .map_err(|e| Refusal::Busy(format!("busy: {e}")))?;
        let Some(seed) = seed else {
            return Ok(refs);
        };
        let filled =
            (self.inst.ranks.iter()).try_for_each(|r| r.backend.fill(seed, &ids, r.tx.layout()));
        if let Err(e) = filled {
            self.inst.free_each(refs.iter().map(Vec::as_slice));
            return Err(Refusal::Failed(format!("filling blocks: {e}")));
        }
        Ok(refs)
    }

    /// The asking connection's host, if `n` more blocks stay within its share
    /// (`NodeLimits::max_blocks_per_ip`); else why not, for its `Answer::Busy`.
    fn share_left(&self, conn: ConnId, n: u32) -> Result<IpAddr, Refusal> {
        let Some(&ip) = self.peer_ips.get(&conn) else {
            return Err(Refusal::Failed("the connection is closing".into()));
        };
        let held = self.held.get(&ip).copied().unwrap_or(0);
        if held + n as usize > self.blocks_per_ip {
            self.inst.metrics.prepares_refused.inc();
            // DEBUG, not WARN: a gen load at its share asks again (`Answer::Busy`) as its
            // requests end, so this is backpressure; the counter shows a host that hoards.
            tracing::debug!(peer = %self.describe(conn), held, asked = n, share = self.blocks_per_ip, "prepare refused: host over its block share");
            return Err(Refusal::Busy(format!(
                "over this host's block share: {ip} holds {held} of {} blocks, asked {n} more (--max-blocks-per-ip)",
                self.blocks_per_ip
            )));
        }
        Ok(ip)
    }

    /// Cancels what lost connections still own and fails their transfers (see `lost`).
    fn forget_lost_peers(&mut self) {
        for conn @ (r, peer) in std::mem::take(&mut self.lost) {
            let ids: Vec<RequestId> = self
                .owned
                .iter()
                .filter(|(_, o)| o.conn == conn)
                .map(|(id, _)| *id)
                .collect();
            for rank in &mut self.inst.ranks {
                let now = rank.now();
                for id in &ids {
                    rank.tx.cancel(now, *id);
                }
            }
            // Requests it asked for but did not prepare, and what it parked, end with it too.
            let rank = &mut self.inst.ranks[r];
            let now = rank.now();
            rank.tx.handle_peer_lost(now, peer);
            rank.backend.peer_lost(peer);
            self.peer_ips.remove(&conn);
        }
    }

    fn close(&self, (r, peer): ConnId) {
        if let Some(l) = self.rank(r).links.get(peer) {
            let _ = l.control.try_send(Outgoing::Close);
        }
    }

    /// Sends a new gen peer what the backend needs it to know first (a CUDA pool's handle).
    fn greet(&self, conn @ (r, peer): ConnId) {
        let Some(hello) = self.rank(r).backend.greeting() else {
            return;
        };
        if let Err(e) = self.rank(r).links.send_frame(peer, Frame::Node(hello)) {
            tracing::warn!(%peer, error = %e, "greeting not sent, closing");
            self.close(conn);
        }
    }

    /// A request finished on rank `r`; agreement ends it on every rank in the same step, so
    /// rank 0's is the instance's.
    fn on_finished(&mut self, r: usize, f: Finished) {
        self.rank(r).release(&f);
        if r != 0 {
            return;
        }
        let id = f.request.id;
        let metrics = &self.inst.metrics;
        let counter = if f.state == RequestState::ContextComplete {
            &metrics.requests_done
        } else {
            &metrics.requests_failed
        };
        counter.inc();
        if let Some(o) = self.owned.remove(&id) {
            let held = self
                .held
                .get_mut(&o.ip)
                .expect("a request's host is counted");
            *held -= o.blocks;
            if *held == 0 {
                self.held.remove(&o.ip);
            }
            o.span.record("outcome", tracing::field::debug(f.state));
            o.span
                .in_scope(|| tracing::debug!(state = ?f.state, "request finished"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::single_rank;
    use tokio::net::TcpStream;

    /// An aborted ctx stops accepting: its listener is closed, not left to a detached accept
    /// loop (which would also keep its connections and KV pool alive).
    #[tokio::test]
    async fn aborted_ctx_closes_its_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spec = NodeSpec {
            layout: single_rank(1, 1, 64, 16, 2),
            pool_blocks: 4,
            config: Default::default(),
            limits: Default::default(),
        };
        let ctx_task = tokio::spawn(run(vec![listener], spec));
        let _conn = TcpStream::connect(addr)
            .await
            .expect("ctx accepts while running");
        ctx_task.abort();
        let _ = ctx_task.await;
        // The accept loop's abort lands when it is next polled; give it a few turns.
        let mut refused = false;
        for _ in 0..50 {
            if TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            refused,
            "the aborted ctx still accepts connections on {addr}"
        );
    }
}
