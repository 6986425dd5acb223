//! One TCP connection: a reader that decodes frames (data payloads land straight in the host
//! agent's KV memory, everything else goes to the driver) and a writer (`writer`) that drains
//! the link's queues.
//!
//! A peer that breaks the protocol (garbage, truncated or oversized frames, data for a request
//! it does not serve) gets an `Error` frame when possible, a WARN naming it, and a closed
//! connection; nobody else notices.
//!
//! A peer that says nothing is cut off too: a connection must bring its first whole frame
//! within `first_frame` and then one at least every `idle` (heartbeats count: every writer
//! sends one when it has been quiet for `NodeLimits::heartbeat`), else it is closed as silent.
//! "Whole frame" is what counts, not bytes, so a peer that trickles a frame byte by byte is as
//! silent as one that sends nothing. The writer's own bound (`WRITE_STALL`) covers the other
//! direction: a peer that stops reading.

use super::admit::SeatSignals;
use super::frame::{self, Frame};
use super::link::{Link, LinkQueues, Links, Outgoing};
use super::metrics::Metrics;
use super::rank::Rank;
use super::spec::NodeLimits;
use super::writer;
use super::OwnedTask;
use crate::host::agent::{DataError, HostAgent};
use crate::host::copy_into;
use crate::host::landing::{LandError, Landing};
use bytes::{Buf, BufMut, BytesMut};
use kvferry_core::wire::{DataHead, ErrorCode, Message, DATA_HEAD_LEN};
use kvferry_core::{PeerId, RequestId};
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};

/// Bytes asked of the socket per buffered read (at most). Small: a data frame's payload is
/// read straight into KV memory once its head is in (`land`), and every payload byte that a
/// buffered read pulls in with the head costs a copy out of the buffer again.
const READ_CHUNK: usize = 8 << 10;
/// Size of a connection's receive buffer: many reads long. A read usually ends inside a frame;
/// that partial frame is moved to the front only when the room behind it runs out, once per
/// several reads, instead of on every read.
const READ_BUFFER: usize = 128 << 10;
/// Bytes a payload's last read also takes into the buffer: a data frame's head, so that back
/// to back data frames cost one `readv` each (payload and the next head) instead of a
/// buffered read for the head, with payload bytes to copy out of it, and a `readv`.
const NEXT_HEAD: usize = DATA_HEAD_LEN;
/// How long the socket may take no byte before the connection is given up (see `writer`).
pub const WRITE_STALL: Duration = Duration::from_secs(30);
/// How long a closing connection may take to flush its last frames.
pub const FLUSH_ON_CLOSE: Duration = Duration::from_secs(1);

/// What a connection hands its node's driver.
#[derive(Debug)]
pub enum Inbound {
    /// A connection to `peer` is up, before any of its frames (a ctx greets its gen peers
    /// on it; a gen starts launching).
    Up {
        peer: PeerId,
    },
    Frame {
        peer: PeerId,
        frame: Frame,
    },
    Down {
        peer: PeerId,
        reason: String,
    },
    /// The dialer stopped retrying.
    GaveUp {
        peer: PeerId,
        reason: String,
    },
}

/// An inbound event with the local rank (`Instance::ranks` index) whose connection it came
/// from: the ranks of an instance share one inbox, and the same peer id (ctx rank 0, say)
/// names a different connection on each of them.
#[derive(Debug)]
pub struct Delivery {
    pub rank: usize,
    pub event: Inbound,
}

/// The sending end of an instance's inbox, tagged with one local rank.
#[derive(Clone, Debug)]
pub struct InboxTx {
    rank: usize,
    tx: mpsc::Sender<Delivery>,
}

impl InboxTx {
    pub fn new(rank: usize, tx: mpsc::Sender<Delivery>) -> InboxTx {
        InboxTx { rank, tx }
    }

    /// Waits for room; `Err` when the driver is gone.
    pub async fn send(&self, event: Inbound) -> Result<(), ()> {
        let d = Delivery {
            rank: self.rank,
            event,
        };
        self.tx.send(d).await.map_err(|_| ())
    }
}

#[derive(Debug)]
enum Closed {
    /// The peer hung up cleanly between frames.
    Eof,
    /// This side closed the connection (`Outgoing::Close`).
    Here,
    Io(std::io::Error),
    /// The peer broke the protocol: it is told why, then cut off.
    Violation(String),
    /// No whole frame within the deadline (`ReadDeadlines`).
    Silent(String),
    /// The connection table gave this seat to a newcomer (`admit`).
    Evicted,
}

/// How long a connection's reader waits for whole frames (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadDeadlines {
    pub first_frame: Duration,
    pub idle: Duration,
}

/// Who is on the other end and where its frames go.
#[derive(Clone, Debug)]
pub struct ConnCtx {
    pub peer: PeerId,
    pub addr: SocketAddr,
    /// Lands `Data` frames; `None` on a CUDA node, where a `Data` frame breaks the protocol.
    pub agent: Option<Arc<HostAgent>>,
    pub inbox: InboxTx,
    pub control: mpsc::Sender<Outgoing>,
    pub deadlines: ReadDeadlines,
    /// The writer sends a `Heartbeat` after this long without writing anything.
    pub heartbeat: Duration,
    /// Marked proven on the first whole frame; eviction closes the connection.
    pub seat: SeatSignals,
    pub metrics: Arc<Metrics>,
}

/// What a role's connections share, taken from its rank once: the ctx's accept loop and the
/// gen's dial loop attach each new connection with it.
#[derive(Clone, Debug)]
pub struct Attach {
    pub links: Links,
    pub agent: Option<Arc<HostAgent>>,
    pub inbox: InboxTx,
    pub limits: NodeLimits,
    pub metrics: Arc<Metrics>,
}

/// A connection whose link is in the table and whose driver knows it is up.
#[derive(Debug)]
pub struct Attached {
    stream: TcpStream,
    ctx: ConnCtx,
    queues: LinkQueues,
    links: Links,
}

impl Attach {
    /// The attachment of `rank`'s connections; their events reach `inbox` tagged with the
    /// rank's index in its instance (its rank number).
    pub fn new(rank: &Rank, inbox: mpsc::Sender<Delivery>) -> Attach {
        Attach {
            links: rank.links.clone(),
            agent: rank.backend.data_agent(),
            inbox: InboxTx::new(rank.tx.me().rank as usize, inbox),
            limits: rank.limits,
            metrics: rank.metrics.clone(),
        }
    }

    /// Puts the link of a new connection to `peer` in the table and tells the driver, before
    /// the connection's task starts, so the driver may greet the peer before any frame.
    /// `None` when the driver is gone.
    pub async fn up(
        &self,
        stream: TcpStream,
        (peer, addr): (PeerId, SocketAddr),
        deadlines: ReadDeadlines,
        seat: SeatSignals,
    ) -> Option<Attached> {
        let (link, queues) = Link::new(addr);
        let ctx = ConnCtx {
            peer,
            addr,
            agent: self.agent.clone(),
            inbox: self.inbox.clone(),
            control: link.control.clone(),
            deadlines,
            heartbeat: self.limits.heartbeat,
            seat,
            metrics: self.metrics.clone(),
        };
        self.links.insert(peer, link);
        if self.inbox.send(Inbound::Up { peer }).await.is_err() {
            self.links.remove(peer);
            return None;
        }
        Some(Attached {
            stream,
            ctx,
            queues,
            links: self.links.clone(),
        })
    }
}

impl Attached {
    /// Serves the connection until it ends, then takes its link out of the table and tells
    /// the driver why; false when the driver is gone.
    pub async fn run(self) -> bool {
        let (peer, inbox) = (self.ctx.peer, self.ctx.inbox.clone());
        let reason = serve(self.stream, self.ctx, self.queues).await;
        self.links.remove(peer);
        inbox.send(Inbound::Down { peer, reason }).await.is_ok()
    }
}

/// Runs the connection until it ends; returns why, for the driver's `Down`.
pub async fn serve(stream: TcpStream, ctx: ConnCtx, queues: LinkQueues) -> String {
    // Control frames are small and latency-bound; batching happens in the writer.
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    // Owned: if this future is dropped (its connection task aborted), the writer goes too.
    let mut writer = OwnedTask(tokio::spawn(writer::write_loop(
        wr,
        queues,
        WRITE_STALL,
        Some(ctx.heartbeat),
    )));
    // Boxed, to be dropped (giving `rd` back) when this side closes.
    let mut read = Box::pin(read_loop(&mut rd, &ctx));
    let closed = tokio::select! {
        c = &mut read => c,
        _ = ctx.seat.evict.notified() => Closed::Evicted,
        w = &mut writer.0 => match w {
            Ok(Ok(())) => Closed::Here,
            Ok(Err(e)) => Closed::Io(e),
            Err(e) => Closed::Io(std::io::Error::other(e)),
        },
    };
    drop(read);
    if let Closed::Here = closed {
        linger(&mut rd).await;
    }
    match closed {
        Closed::Eof => "peer closed the connection".into(),
        Closed::Here => "closed here".into(),
        Closed::Io(e) => format!("connection error: {e}"),
        Closed::Evicted => {
            ctx.metrics.connections_evicted.inc();
            "evicted: its seat went to a new connection (it had sent no frame)".into()
        }
        Closed::Silent(why) => {
            ctx.metrics.connections_silent.inc();
            tracing::info!(peer = %ctx.peer, addr = %ctx.addr, %why, "closing a silent connection");
            format!("silent: {why}")
        }
        Closed::Violation(why) => {
            tracing::warn!(peer = %ctx.peer, addr = %ctx.addr, error = %why, "protocol violation, closing the connection");
            let bye = Message::Error {
                request: RequestId(0),
                code: ErrorCode::Malformed,
                detail: why.clone(),
            };
            let _ = ctx.control.try_send(Outgoing::Frame(Frame::Core(bye)));
            let _ = ctx.control.try_send(Outgoing::Close);
            // Past the timeout the writer is aborted when `writer` drops.
            let _ = tokio::time::timeout(FLUSH_ON_CLOSE, &mut writer.0).await;
            format!("protocol violation: {why}")
        }
    }
}

/// This side closed the connection (its FIN is out): reads, and drops, what the peer still
/// sends until its FIN, for at most `FLUSH_ON_CLOSE`. A socket dropped with inbound bytes
/// unread is reset, not closed, and the peer loses what it had not read yet of ours (the
/// tail of a send it is still taking in).
async fn linger(rd: &mut OwnedReadHalf) {
    let mut sink = vec![0u8; READ_CHUNK];
    let until_fin = async {
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(FLUSH_ON_CLOSE, until_fin).await;
}

/// When the reader next needs a whole frame by.
#[derive(Debug)]
struct Deadline {
    at: Instant,
    first: bool,
}

impl Deadline {
    fn new(d: ReadDeadlines) -> Deadline {
        Deadline {
            at: Instant::now() + d.first_frame,
            first: true,
        }
    }

    /// A whole frame came: the peer is proven and has `idle` until its next one.
    fn frame(&mut self, ctx: &ConnCtx) {
        if self.first {
            self.first = false;
            ctx.seat.proven.store(true, Ordering::Relaxed);
        }
        self.at = Instant::now() + ctx.deadlines.idle;
    }

    fn missed(&self, ctx: &ConnCtx) -> Closed {
        Closed::Silent(if self.first {
            format!(
                "no frame within {:?} of connecting",
                ctx.deadlines.first_frame
            )
        } else {
            format!("no frame for {:?}", ctx.deadlines.idle)
        })
    }
}

async fn read_loop(rd: &mut OwnedReadHalf, ctx: &ConnCtx) -> Closed {
    let mut buf = BytesMut::with_capacity(READ_BUFFER);
    let mut due = Deadline::new(ctx.deadlines);
    loop {
        loop {
            if let Some(agent) = &ctx.agent {
                match frame::decode_data_head(&mut buf) {
                    Ok(Some(head)) => {
                        if let Err(c) = land(rd, &mut buf, ctx, agent, head, &due).await {
                            return c;
                        }
                        due.frame(ctx);
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => return Closed::Violation(e.to_string()),
                }
            }
            match frame::decode(&mut buf) {
                Ok(Some(f)) => {
                    due.frame(ctx);
                    if let Err(c) = on_frame(ctx, f).await {
                        return c;
                    }
                }
                Ok(None) => break,
                Err(e) => return Closed::Violation(e.to_string()),
            }
        }
        make_room(&mut buf);
        let read = timeout_at(due.at, rd.read_buf(&mut (&mut buf).limit(READ_CHUNK))).await;
        let Ok(read) = read else {
            return due.missed(ctx);
        };
        match read {
            Ok(0) if buf.is_empty() => return Closed::Eof,
            Ok(0) => {
                return Closed::Violation(format!(
                    "connection closed inside a frame ({} bytes of a truncated frame)",
                    buf.len()
                ))
            }
            Ok(_) => {}
            Err(e) => return Closed::Io(e),
        }
    }
}

/// Ensures room for one read behind the buffered bytes (see `READ_BUFFER`).
fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK {
        // Once the frames split off earlier are dropped, this reuses the same allocation.
        buf.reserve(READ_CHUNK.max(READ_BUFFER.saturating_sub(buf.len())));
    }
}

/// Lands the payload of the data frame whose head was just taken off `buf`: first the bytes
/// already buffered, then the rest straight from the socket into KV memory.
async fn land(
    rd: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    ctx: &ConnCtx,
    agent: &HostAgent,
    head: DataHead,
    due: &Deadline,
) -> Result<(), Closed> {
    let request = head.request;
    let mut landing = agent.land_from(ctx.peer, head);
    if let Some(e) = landing.refused() {
        refused(ctx, request, e)?;
    }
    while landing.left() > 0 {
        if !buf.is_empty() {
            let n = landing
                .fill(|bufs| Ok(copy_into(bufs, buf)))
                .map_err(Closed::Io)?;
            buf.advance(n);
            continue;
        }
        match fill_from_socket(&mut landing, rd, buf) {
            Ok(0) => {
                return Err(Closed::Violation(format!(
                    "connection closed inside a data frame ({} payload bytes missing)",
                    landing.left()
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                match timeout_at(due.at, rd.readable()).await {
                    Ok(r) => r.map_err(Closed::Io)?,
                    Err(_) => return Err(due.missed(ctx)),
                }
            }
            Err(e) => return Err(Closed::Io(e)),
        }
    }
    match landing.finish() {
        Ok(true) => Ok(()),
        Ok(false) => {
            tracing::debug!(%request, peer = %ctx.peer, "data for a request not receiving here, dropped or held");
            Ok(())
        }
        Err(LandError::Wire(e)) => Err(Closed::Violation(e.to_string())),
        Err(LandError::Data(e)) => refused(ctx, request, &e),
    }
}

/// Lands payload bytes straight from the socket, and with them up to `NEXT_HEAD` bytes of what
/// follows into `buf` (empty here), where the read loop finds the next frame's head. Returns
/// the payload bytes landed, as `Landing::fill`.
fn fill_from_socket(
    landing: &mut Landing<'_>,
    rd: &OwnedReadHalf,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    debug_assert!(buf.is_empty(), "buffered bytes are landed first");
    buf.resize(NEXT_HEAD, 0);
    let mut after = 0;
    let landed = landing.fill(|bufs| {
        let payload: usize = bufs.iter().map(|b| b.len()).sum();
        let mut all: Vec<IoSliceMut<'_>> = Vec::with_capacity(bufs.len() + 1);
        all.extend(bufs.iter_mut().map(|b| IoSliceMut::new(&mut b[..])));
        all.push(IoSliceMut::new(&mut buf[..]));
        let n = rd.try_read_vectored(&mut all)?;
        after = n.saturating_sub(payload);
        Ok(n - after)
    });
    buf.truncate(after);
    landed
}

/// A data frame the agent would not land: out of order fails only its transfer; data for a
/// request this peer does not serve breaks the protocol.
fn refused(ctx: &ConnCtx, request: RequestId, e: &DataError) -> Result<(), Closed> {
    match e {
        DataError::OutOfOrder { .. } => {
            tracing::warn!(%request, peer = %ctx.peer, addr = %ctx.addr, error = %e, "transfer failed on bad data");
            Ok(())
        }
        DataError::ForeignPeer { .. } => Err(Closed::Violation(e.to_string())),
    }
}

async fn on_frame(ctx: &ConnCtx, f: Frame) -> Result<(), Closed> {
    // A `Heartbeat` has reset this connection's read deadline and goes on to the driver too:
    // the transceiver watches the peers its requests depend on (`liveness`) and answers the
    // heartbeats of peers it does not watch.
    if let Frame::Core(Message::Data { request, .. }) = &f {
        // A host connection lands data frames head first (`land`), so one decoded whole is on
        // a CUDA connection, where bytes move over CUDA IPC.
        return Err(Closed::Violation(format!(
            "data frame for {request} on a CUDA connection (bytes move over CUDA IPC)"
        )));
    }
    ctx.inbox
        .send(Inbound::Frame {
            peer: ctx.peer,
            frame: f,
        })
        .await
        .map_err(|_| Closed::Io(std::io::Error::other("node is shutting down")))
}
