//! Requests and their lifecycle states.
//!
//! A request is shared as `Arc<Request>` between the scheduler, the transceiver and the
//! executor; its state lives behind a mutex and moves only along the edges of
//! [`RequestState::can_advance_to`]. Reaching a second terminal state is a bug in the caller and
//! fails loudly (`advance` returns an error that callers `expect`).

use crate::blocks::BlockRef;
use crate::layout::CacheLayout;
use crate::{RequestId, TransferToken};
use std::sync::Mutex;
use std::time::Duration;
use thiserror::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Prefill side: computed the KV cache and serves it.
    Context,
    /// Decode side: receives the KV cache and continues the request.
    Generation,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestState {
    ContextInit,
    ContextTransferring,
    ContextComplete,
    GenInit,
    GenTransferring,
    GenComplete,
    TransferError,
    Cancelled,
}

impl RequestState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RequestState::ContextComplete
                | RequestState::GenComplete
                | RequestState::TransferError
                | RequestState::Cancelled
        )
    }

    /// The only legal edges: forward along the role's chain, or to an error/cancel from any
    /// non-terminal state.
    pub fn can_advance_to(self, next: RequestState) -> bool {
        use RequestState::*;
        if self.is_terminal() {
            return false;
        }
        matches!(
            (self, next),
            (ContextInit, ContextTransferring)
                | (ContextTransferring, ContextComplete)
                | (GenInit, GenTransferring)
                | (GenTransferring, GenComplete)
                | (_, TransferError)
                | (_, Cancelled)
        )
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StateError {
    #[error("{id}: illegal transition {from:?} -> {to:?}")]
    Illegal {
        id: RequestId,
        from: RequestState,
        to: RequestState,
    },
}

/// Where a generation request fetches its cache from: filled in from the context instance's
/// first response (disaggregated params in the reference system).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContextSource {
    pub instance: u32,
    /// The context instance's layout (any rank; sizes are what matters).
    pub layout: CacheLayout,
    /// Block ids of the request on the context instance, in token order.
    pub blocks: Vec<u32>,
}

#[derive(Debug)]
pub struct Request {
    pub id: RequestId,
    pub role: Role,
    pub token: TransferToken,
    /// This rank's blocks for the request, in token order, with the epoch of their allocation.
    pub blocks: Vec<BlockRef>,
    /// Generation role only.
    pub source: Option<ContextSource>,
    /// Absolute time (driver clock) after which an opt-in in-flight cancel may evict the transfer.
    pub deadline: Option<Duration>,
    state: Mutex<RequestState>,
}

impl Request {
    pub fn new_context(id: RequestId, token: TransferToken, blocks: Vec<BlockRef>) -> Request {
        Request {
            id,
            role: Role::Context,
            token,
            blocks,
            source: None,
            deadline: None,
            state: Mutex::new(RequestState::ContextInit),
        }
    }

    pub fn new_generation(
        id: RequestId,
        token: TransferToken,
        blocks: Vec<BlockRef>,
        source: ContextSource,
    ) -> Request {
        Request {
            id,
            role: Role::Generation,
            token,
            blocks,
            source: Some(source),
            deadline: None,
            state: Mutex::new(RequestState::GenInit),
        }
    }

    pub fn with_deadline(mut self, deadline: Duration) -> Request {
        self.deadline = Some(deadline);
        self
    }

    pub fn state(&self) -> RequestState {
        *self.state.lock().expect("request state lock poisoned")
    }

    pub fn is_terminal(&self) -> bool {
        self.state().is_terminal()
    }

    /// Moves to `next` if the edge is legal; returns the previous state.
    pub fn advance(&self, next: RequestState) -> Result<RequestState, StateError> {
        let mut s = self.state.lock().expect("request state lock poisoned");
        let from = *s;
        if !from.can_advance_to(next) {
            return Err(StateError::Illegal {
                id: self.id,
                from,
                to: next,
            });
        }
        *s = next;
        Ok(from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_terminal_state() {
        let r = Request::new_context(RequestId(1), TransferToken(7), vec![]);
        r.advance(RequestState::ContextTransferring).unwrap();
        r.advance(RequestState::ContextComplete).unwrap();
        assert!(r.advance(RequestState::Cancelled).is_err());
        assert!(r.advance(RequestState::TransferError).is_err());
        assert_eq!(r.state(), RequestState::ContextComplete);
    }

    #[test]
    fn roles_cannot_cross() {
        let r = Request::new_context(RequestId(1), TransferToken(7), vec![]);
        assert!(r.advance(RequestState::GenTransferring).is_err());
        assert!(r.advance(RequestState::ContextComplete).is_err());
        r.advance(RequestState::Cancelled).unwrap();
    }
}
