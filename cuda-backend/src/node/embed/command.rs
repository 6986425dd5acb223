//! What the embedding program asks of its instance's driver, and why the driver can refuse.

use super::dialers::DialError;
use super::ticket::ContextTicket;
use crate::node::rank::Occupancy;
use kvferry_core::blocks::BlockError;
use kvferry_core::transceiver::TransceiverError;
use kvferry_core::RequestId;
use thiserror::Error;
use tokio::sync::oneshot;

/// Commands queued to the driver at most; the program's call waits for room (the driver
/// takes them at once, so this is reached only under a burst of calls).
pub const COMMAND_QUEUE: usize = 1024;

/// One call of the program. `id` is the engine's request id.
#[derive(Debug)]
pub enum Command {
    /// Context side: serve `blocks` (the engine's block ids) of request `id`.
    Send {
        id: RequestId,
        blocks: Vec<u32>,
        reply: oneshot::Sender<Result<ContextTicket, CommandError>>,
    },
    /// Generation side: receive `ticket`'s request into `blocks`.
    Receive {
        id: RequestId,
        blocks: Vec<u32>,
        ticket: ContextTicket,
        reply: oneshot::Sender<Result<(), CommandError>>,
    },
    /// Cancel request `id`; answers whether it was still active.
    Cancel {
        id: RequestId,
        reply: oneshot::Sender<bool>,
    },
    /// The pools' occupancy now.
    Occupancy { reply: oneshot::Sender<Occupancy> },
}

/// Why a command was refused; nothing of it was registered.
#[derive(Debug, Error)]
pub enum CommandError {
    #[error("this is a {0} transceiver; that call belongs to the other side")]
    WrongSide(&'static str),
    #[error("request id {0} is still in use (ended requests are reusable once their status was reported)")]
    IdInUse(RequestId),
    #[error("a request needs at least one block")]
    NoBlocks,
    #[error("blocks: {0}")]
    Blocks(#[from] BlockError),
    #[error("the context parameters name {ctx} blocks, this request {gen}")]
    BlockCount { ctx: usize, gen: usize },
    #[error("the context parameters describe another model: {0}")]
    OtherModel(String),
    #[error("transceiver: {0}")]
    Refused(#[from] TransceiverError),
    #[error("{0} unclaimed statuses: poll the transfer status before adding requests")]
    Unclaimed(usize),
    #[error(transparent)]
    Dials(#[from] DialError),
    #[error("the transceiver is closed")]
    Closed,
}

impl CommandError {
    /// A stable short name for the reason, for programs that branch on it.
    pub fn reason(&self) -> &'static str {
        match self {
            CommandError::WrongSide(_) => "wrong-side",
            CommandError::IdInUse(_) => "id-in-use",
            CommandError::NoBlocks => "no-blocks",
            CommandError::Blocks(_) => "blocks",
            CommandError::BlockCount { .. } => "block-count",
            CommandError::OtherModel(_) => "other-model",
            CommandError::Refused(_) => "refused",
            CommandError::Unclaimed(_) => "unclaimed",
            CommandError::Dials(DialError::TooManyPeers) => "too-many-peers",
            CommandError::Dials(DialError::TooManyConnections { .. }) => "too-many-connections",
            CommandError::Closed => "closed",
        }
    }
}
