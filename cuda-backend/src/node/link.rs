//! The live connections of a node, keyed by the peer id the node gave each one, and the core
//! `Transport` on top of them. Control frames and data frames queue separately (both bounded)
//! so a bulk transfer cannot starve a Cancel or an Error. Data frames queue already encoded:
//! the send tasks pay for the copy and the checksum in parallel, the writer only writes, then
//! hands the frame's buffer back to the link's `FramePool` for the next chunk.

use super::frame::Frame;
use bytes::BytesMut;
use kvferry_core::transport::{Transport, TransportError};
use kvferry_core::wire::Message;
use kvferry_core::PeerId;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::{self, error::TrySendError};

/// Control frames queued per connection before `send` reports backpressure.
pub const CONTROL_QUEUE: usize = 1024;
/// Data frames queued per connection; senders wait (bounded memory: this x `DATA_CHUNK`).
pub const DATA_QUEUE: usize = 32;
/// Idle frame buffers a link keeps for reuse (bounded memory: this x `DATA_CHUNK`). Buffers in
/// flight are bounded by the data queue and the send tasks; the pool only holds the surplus
/// between a write and the next gather, so a few suffice.
pub const POOLED_FRAMES: usize = 8;

/// Recycled data frame buffers. A fresh quarter-MiB allocation is served by `mmap` and costs
/// page faults to fill and an `munmap` (TLB shootdown) to free; reused ones cost neither.
#[derive(Debug, Default)]
pub struct FramePool {
    free: Mutex<Vec<BytesMut>>,
}

impl FramePool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<BytesMut>> {
        self.free.lock().expect("frame pool lock poisoned")
    }

    /// An empty buffer, with the capacity of an earlier frame when one is idle.
    pub fn take(&self) -> BytesMut {
        self.lock().pop().unwrap_or_default()
    }

    /// Returns a written frame's buffer; dropped when the pool already holds enough.
    pub fn give(&self, mut buf: BytesMut) {
        buf.clear();
        let mut free = self.lock();
        if free.len() < POOLED_FRAMES {
            free.push(buf);
        }
    }
}

#[derive(Debug)]
pub enum Outgoing {
    Frame(Frame),
    /// Flush what is queued, then close the connection.
    Close,
}

#[derive(Clone, Debug)]
pub struct Link {
    pub addr: SocketAddr,
    pub control: mpsc::Sender<Outgoing>,
    /// Encoded `Data` frames, written as they are.
    pub data: mpsc::Sender<BytesMut>,
    /// Where data frame buffers come from and go back to once written.
    pub frames: Arc<FramePool>,
}

/// Receiving ends of a link, owned by its connection task.
#[derive(Debug)]
pub struct LinkQueues {
    pub control: mpsc::Receiver<Outgoing>,
    pub data: mpsc::Receiver<BytesMut>,
    pub frames: Arc<FramePool>,
}

impl Link {
    pub fn new(addr: SocketAddr) -> (Link, LinkQueues) {
        let (ctl_tx, ctl_rx) = mpsc::channel(CONTROL_QUEUE);
        let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
        let frames = Arc::new(FramePool::default());
        (
            Link {
                addr,
                control: ctl_tx,
                data: data_tx,
                frames: frames.clone(),
            },
            LinkQueues {
                control: ctl_rx,
                data: data_rx,
                frames,
            },
        )
    }

    /// Queues a control frame without waiting.
    pub fn send_frame(&self, peer: PeerId, frame: Frame) -> Result<(), TransportError> {
        self.control
            .try_send(Outgoing::Frame(frame))
            .map_err(|e| match e {
                TrySendError::Full(_) => TransportError::Backpressure(peer),
                TrySendError::Closed(_) => TransportError::Unreachable(peer),
            })
    }
}

#[derive(Clone, Debug, Default)]
pub struct Links {
    inner: Arc<Mutex<HashMap<PeerId, Link>>>,
}

impl Links {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Link>> {
        self.inner.lock().expect("links lock poisoned")
    }

    pub fn insert(&self, peer: PeerId, link: Link) {
        self.lock().insert(peer, link);
    }

    pub fn remove(&self, peer: PeerId) -> Option<Link> {
        self.lock().remove(&peer)
    }

    pub fn get(&self, peer: PeerId) -> Option<Link> {
        self.lock().get(&peer).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// "i1r0 (127.0.0.1:5000)" when connected, else the bare id: for logs.
    pub fn describe(&self, peer: PeerId) -> String {
        match self.get(peer) {
            Some(l) => format!("{peer} ({})", l.addr),
            None => peer.to_string(),
        }
    }

    pub fn send_frame(&self, peer: PeerId, frame: Frame) -> Result<(), TransportError> {
        self.get(peer)
            .ok_or(TransportError::Unreachable(peer))?
            .send_frame(peer, frame)
    }
}

/// The core's `Transport` over the node's connections.
#[derive(Clone, Debug)]
pub struct NetTransport {
    pub links: Links,
}

impl Transport for NetTransport {
    fn send(&self, to: PeerId, msg: Message) -> Result<(), TransportError> {
        self.links.send_frame(to, Frame::Core(msg))
    }
}
