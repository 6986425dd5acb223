//! What a backend is built from: shared by `backend` (which picks one) and `cuda_ipc` (which
//! builds the GPU one), so that neither imports the other for it; with the memory an
//! embedding program lends (`LentKv`).

use super::link::Links;
use crate::host::kv::HostKv;
use kvferry_core::blocks::BlockPool;
use kvferry_core::transceiver::Side;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// What building a backend needs from its node.
#[derive(Debug)]
pub struct BackendParts {
    pub side: Side,
    pub rank: u32,
    pub blocks: u32,
    pub block_bytes: u64,
    pub max_jobs: usize,
    pub links: Links,
    pub wake: Arc<Notify>,
    /// The rank's block pool, for backends that check block epochs before bytes land.
    pub pool: Arc<Mutex<BlockPool>>,
    /// The pool when a program that embeds the rank lends its own memory; `None`: the
    /// backend allocates its pool.
    pub lent: Option<LentKv>,
}

/// KV memory a program that embeds a rank lends it (the program keeps ownership).
#[derive(Clone, Debug)]
pub enum LentKv {
    /// Host memory (`HostKv::lent`), for the host backend.
    Host(Arc<HostKv>),
    /// Device memory (`DeviceBuffer::adopt`), for the CUDA backend on the buffer's device.
    #[cfg(feature = "cuda")]
    Cuda(Arc<crate::cuda::DeviceBuffer>),
}

impl LentKv {
    /// True while something other than this handle still points into the memory (a rank
    /// that has not been dropped, an agent region, a mapping export).
    pub fn is_shared(&self) -> bool {
        match self {
            LentKv::Host(kv) => Arc::strong_count(kv) > 1,
            #[cfg(feature = "cuda")]
            LentKv::Cuda(buf) => Arc::strong_count(buf) > 1,
        }
    }
}
