//! The outbox: control messages the transceiver wants sent, in order, until the driver takes
//! them (`Transceiver::poll_transmit`). Drivers drain it after every call into the
//! transceiver, so it holds at most what one call produces; the bound only catches a driver
//! that never drains.

use crate::wire::Message;
use crate::PeerId;
use std::collections::VecDeque;
use thiserror::Error;

/// Control messages queued for the driver, at most this many.
pub const MAX_OUTBOX: usize = 65536;

/// One control message to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub to: PeerId,
    pub msg: Message,
}

/// The outbox is full: the driver is not draining `poll_transmit`.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error("outbox full ({MAX_OUTBOX} messages): the driver is not draining poll_transmit")]
pub struct OutboxFull;

#[derive(Debug, Default)]
pub(crate) struct Outbox {
    queue: VecDeque<Transmit>,
}

impl Outbox {
    pub fn push(&mut self, to: PeerId, msg: Message) -> Result<(), OutboxFull> {
        if self.queue.len() >= MAX_OUTBOX {
            return Err(OutboxFull);
        }
        self.queue.push_back(Transmit { to, msg });
        Ok(())
    }

    /// Messages waiting for the driver.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn pop(&mut self) -> Option<Transmit> {
        self.queue.pop_front()
    }
}
