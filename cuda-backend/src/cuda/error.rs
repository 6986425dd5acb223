//! Typed errors of the CUDA backend and their mapping onto the core's [`AgentError`].

use cudarc::driver::DriverError;
use kvferry_core::agent::AgentError;
use kvferry_core::PeerId;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CudaError {
    /// No driver library, `cuInit` failed or no device: the caller may skip GPU work.
    #[error("CUDA unavailable: {0}")]
    Unavailable(String),
    /// A driver call failed; `op` names the call so a log line says where.
    #[error("{op} failed: {source}")]
    Driver {
        op: &'static str,
        #[source]
        source: DriverError,
    },
    #[error("NVRTC could not compile the copy kernel: {0}")]
    Compile(String),
    #[error("device {0} cannot access device {1} as a peer (no NVLink/PCIe P2P path)")]
    NoPeerAccess(usize, usize),
    /// A plan fragment points outside a registered region. Raised before any byte moves.
    #[error("fragment {index}: {side} range {offset}+{len} exceeds the region of {size} bytes")]
    OutOfBounds {
        index: usize,
        side: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("no KV region registered for peer {0}")]
    UnknownPeer(PeerId),
    #[error("malformed or foreign IPC handle: {0}")]
    BadHandle(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Memory offered for adoption (`DeviceBuffer::adopt`) is not a device range of this GPU
    /// inside one allocation.
    #[error("device memory cannot be adopted: {0}")]
    NotAdoptable(String),
    #[error("not supported by this driver: {0}")]
    Unsupported(String),
}

impl CudaError {
    /// True when the error says "there is no usable GPU here" (tests skip on it).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, CudaError::Unavailable(_))
    }
}

impl From<CudaError> for AgentError {
    fn from(e: CudaError) -> AgentError {
        match e {
            CudaError::UnknownPeer(p) => AgentError::PeerUnreachable(p),
            // A plan naming bytes outside the pools is refused as a whole (I9: zero bytes move).
            e @ CudaError::OutOfBounds { .. } => AgentError::Rejected(e.to_string()),
            e => AgentError::Backend(e.to_string()),
        }
    }
}

/// Attaches the driver call's name to a cudarc result.
pub(crate) trait DriverResultExt<T> {
    fn op(self, op: &'static str) -> Result<T, CudaError>;
}

impl<T> DriverResultExt<T> for Result<T, DriverError> {
    fn op(self, op: &'static str) -> Result<T, CudaError> {
        self.map_err(|source| CudaError::Driver { op, source })
    }
}

/// Same for a raw `CUresult` from the `sys` layer.
pub(crate) fn check(r: cudarc::driver::sys::CUresult, op: &'static str) -> Result<(), CudaError> {
    r.result().op(op)
}
