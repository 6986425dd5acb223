//! The live connections of a node, keyed by the peer id the node gave each one; the node's
//! driver sends the core's transmits through them. Control frames and data frames queue separately (both bounded)
//! so a bulk transfer cannot starve a Cancel or an Error. A data frame queues as a
//! description of where its payload lies in KV memory (`host::DataOut`); the connection's writer
//! sends it from there (see `writer`), so payload bytes are never copied in user space.

use super::frame::Frame;
use crate::host::route::{DataOut, DataRoutes};
use kvferry_core::PeerId;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use thiserror::Error;
use tokio::sync::mpsc::{self, error::TrySendError};

/// Control frames queued per connection before `send` reports backpressure.
pub const CONTROL_QUEUE: usize = 1024;
/// Data frames queued per connection; senders wait. Each pins no memory of its own (the
/// payload stays in KV memory), so this only bounds how far sends run ahead of the socket.
pub const DATA_QUEUE: usize = 32;

/// Why a frame was not queued on a connection.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("peer {0} has no connection")]
    Unreachable(PeerId),
    #[error("control queue to {0} is full")]
    Backpressure(PeerId),
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
    pub data: mpsc::Sender<DataOut>,
}

/// Receiving ends of a link, owned by its connection task.
#[derive(Debug)]
pub struct LinkQueues {
    pub control: mpsc::Receiver<Outgoing>,
    pub data: mpsc::Receiver<DataOut>,
}

impl Link {
    pub fn new(addr: SocketAddr) -> (Link, LinkQueues) {
        let (ctl_tx, ctl_rx) = mpsc::channel(CONTROL_QUEUE);
        let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
        (
            Link {
                addr,
                control: ctl_tx,
                data: data_tx,
            },
            LinkQueues {
                control: ctl_rx,
                data: data_rx,
            },
        )
    }

    /// Queues a control frame without waiting.
    pub fn send_frame(&self, peer: PeerId, frame: Frame) -> Result<(), LinkError> {
        self.control
            .try_send(Outgoing::Frame(frame))
            .map_err(|e| match e {
                TrySendError::Full(_) => LinkError::Backpressure(peer),
                TrySendError::Closed(_) => LinkError::Unreachable(peer),
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

    /// The peers with a connection now.
    pub fn peers(&self) -> Vec<PeerId> {
        self.lock().keys().copied().collect()
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

    /// Queues under the table's lock, without cloning the link: a clone is two channel-sender
    /// clones and drops (atomic counts) for every control frame.
    pub fn send_frame(&self, peer: PeerId, frame: Frame) -> Result<(), LinkError> {
        self.lock()
            .get(&peer)
            .ok_or(LinkError::Unreachable(peer))?
            .send_frame(peer, frame)
    }
}

/// The host agent's view of the table: the data queue of each connected peer.
impl DataRoutes for Links {
    fn data_queue(&self, peer: PeerId) -> Option<mpsc::Sender<DataOut>> {
        self.get(peer).map(|l| l.data)
    }
}
