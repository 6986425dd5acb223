//! What the driver needs from NIXL, as a trait so the job table and the drain run against a
//! fake in unit tests (`ucx::UcxEngine` is the real one).

use super::error::NixlError;

/// Where a transfer request stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XferState {
    InProgress,
    Done,
    Failed(String),
}

/// One READ: `(local address, remote address, len)` triples from the remote agent's pool into
/// this agent's, and the notification NIXL delivers to the remote agent after the last byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadSpec {
    pub remote: String,
    pub pieces: Vec<(u64, u64, u64)>,
    pub notif: Vec<u8>,
}

/// A NIXL agent, used from the driver thread only. Any call may block.
pub trait Engine {
    type Xfer;

    /// The metadata a peer loads to read this agent's KV pool (the pool only).
    fn local_md(&mut self) -> Result<Vec<u8>, NixlError>;
    /// Loads a peer's metadata; returns its agent name.
    fn load_remote(&mut self, md: &[u8]) -> Result<String, NixlError>;
    fn invalidate_remote(&mut self, agent: &str);
    /// Creates and posts a READ. The copy may be done when this returns.
    fn post_read(&mut self, read: &ReadSpec) -> Result<Self::Xfer, NixlError>;
    fn state(&mut self, xfer: &Self::Xfer) -> XferState;
    /// Appends the notifications received since the last call: (sender agent, message).
    fn notifications(&mut self, out: &mut Vec<(String, Vec<u8>)>);
}
