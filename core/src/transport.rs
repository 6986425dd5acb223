//! Framed control messages to peers. Sends never block: a transport queues (bounded) or fails.

use crate::wire::Message;
use crate::PeerId;
use thiserror::Error;

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum TransportError {
    #[error("peer {0} unreachable")]
    Unreachable(PeerId),
    #[error("outbox to {0} is full")]
    Backpressure(PeerId),
    #[error("transport closed")]
    Closed,
}

pub trait Transport: Send + Sync + std::fmt::Debug {
    /// Queues `msg` for `to`. Delivery is not guaranteed (a peer may crash); the protocol relies
    /// on timeouts, never on a send succeeding.
    fn send(&self, to: PeerId, msg: Message) -> Result<(), TransportError>;
}
