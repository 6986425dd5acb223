//! One TCP connection: a reader that decodes frames (data chunks go straight to the host
//! agent, everything else to the driver) and a writer that drains the link's queues.
//!
//! A peer that breaks the protocol (garbage, truncated or oversized frames, data for a request
//! it does not serve) gets an `Error` frame when possible, a WARN naming it, and a closed
//! connection; nobody else notices.

use super::frame::{self, Frame};
use super::link::{LinkQueues, Outgoing};
use super::OwnedTask;
use crate::host::{DataError, HostAgent};
use bytes::{BufMut, BytesMut};
use kvferry_core::wire::{ErrorCode, Message};
use kvferry_core::{PeerId, RequestId};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Bytes asked of the socket per read (at most).
const READ_CHUNK: usize = 256 << 10;
/// Size of a connection's receive buffer: several data frames long. A read usually ends
/// inside a frame; that partial frame is moved to the front only when the room behind it runs
/// out, once per several frames, instead of on every read as a buffer of one read's size does
/// (which copied about a third of all received bytes once more).
const READ_BUFFER: usize = 1 << 20;
/// The writer coalesces queued frames up to this many bytes per write.
const WRITE_BATCH: usize = 1 << 20;
/// How long a closing connection may take to flush its last Error frame.
const FLUSH_ON_CLOSE: Duration = Duration::from_secs(1);

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

#[derive(Debug)]
enum Closed {
    /// The peer hung up cleanly between frames.
    Eof,
    Io(std::io::Error),
    /// The peer broke the protocol: it is told why, then cut off.
    Violation(String),
}

/// Who is on the other end and where its frames go.
#[derive(Clone, Debug)]
pub struct ConnCtx {
    pub peer: PeerId,
    pub addr: SocketAddr,
    /// Lands `Data` frames; `None` on a CUDA node, where a `Data` frame breaks the protocol.
    pub agent: Option<Arc<HostAgent>>,
    pub inbox: mpsc::Sender<Inbound>,
    pub control: mpsc::Sender<Outgoing>,
}

/// Runs the connection until it ends; returns why, for the driver's `Down`.
pub async fn serve(stream: TcpStream, ctx: ConnCtx, queues: LinkQueues) -> String {
    // Control frames are small and latency-bound; batching happens in the writer.
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    // Owned: if this future is dropped (its connection task aborted), the writer goes too.
    let mut writer = OwnedTask(tokio::spawn(write_loop(wr, queues)));
    let closed = tokio::select! {
        c = read_loop(rd, &ctx) => c,
        w = &mut writer.0 => match w {
            Ok(Ok(())) => Closed::Eof,
            Ok(Err(e)) => Closed::Io(e),
            Err(e) => Closed::Io(std::io::Error::other(e)),
        },
    };
    match closed {
        Closed::Eof => "peer closed the connection".into(),
        Closed::Io(e) => format!("connection error: {e}"),
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

async fn read_loop(mut rd: OwnedReadHalf, ctx: &ConnCtx) -> Closed {
    let mut buf = BytesMut::with_capacity(READ_BUFFER);
    loop {
        loop {
            match frame::decode(&mut buf) {
                Ok(Some(f)) => {
                    if let Err(c) = on_frame(ctx, f).await {
                        return c;
                    }
                }
                Ok(None) => break,
                Err(e) => return Closed::Violation(e.to_string()),
            }
        }
        make_room(&mut buf);
        match rd.read_buf(&mut (&mut buf).limit(READ_CHUNK)).await {
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

async fn on_frame(ctx: &ConnCtx, f: Frame) -> Result<(), Closed> {
    if let Frame::Core(Message::Data {
        request,
        ctx_rank,
        offset,
        payload,
    }) = &f
    {
        let Some(agent) = &ctx.agent else {
            return Err(Closed::Violation(format!(
                "data frame for {request} on a CUDA connection (bytes move over CUDA IPC)"
            )));
        };
        return match agent.on_data(ctx.peer, *request, *ctx_rank, *offset, payload) {
            Ok(true) => Ok(()),
            Ok(false) => {
                tracing::debug!(%request, peer = %ctx.peer, "data for a request no longer expected, dropped");
                Ok(())
            }
            Err(e @ DataError::OutOfOrder { .. }) => {
                tracing::warn!(%request, peer = %ctx.peer, addr = %ctx.addr, error = %e, "transfer failed on bad data");
                Ok(())
            }
            Err(e) => Err(Closed::Violation(e.to_string())),
        };
    }
    ctx.inbox
        .send(Inbound::Frame {
            peer: ctx.peer,
            frame: f,
        })
        .await
        .map_err(|_| Closed::Io(std::io::Error::other("node is shutting down")))
}

enum Item {
    Control(Outgoing),
    /// An encoded data frame, written as is.
    Data(BytesMut),
}

async fn write_loop(mut wr: OwnedWriteHalf, mut q: LinkQueues) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(WRITE_BATCH);
    loop {
        let first = tokio::select! {
            biased;
            c = q.control.recv() => c.map(Item::Control),
            d = q.data.recv() => d.map(Item::Data),
        };
        let Some(mut item) = first else {
            return Ok(()); // the link is gone
        };
        loop {
            match item {
                Item::Control(Outgoing::Frame(f)) => frame::encode(&f, &mut out),
                Item::Control(Outgoing::Close) => {
                    wr.write_all(&out).await?;
                    return wr.shutdown().await;
                }
                Item::Data(bytes) => {
                    // Queued control frames go first; the data frame is not copied again.
                    if !out.is_empty() {
                        wr.write_all(&out).await?;
                        out.clear();
                    }
                    wr.write_all(&bytes).await?;
                    q.frames.give(bytes);
                }
            }
            if out.len() >= WRITE_BATCH {
                break;
            }
            item = match q.control.try_recv() {
                Ok(c) => Item::Control(c),
                Err(_) => match q.data.try_recv() {
                    Ok(d) => Item::Data(d),
                    Err(_) => break,
                },
            };
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
            out.clear();
        }
    }
}
