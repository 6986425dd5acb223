//! What a backend is built from: shared by `backend` (which picks one) and `cuda_ipc` (which
//! builds the GPU one), so that neither imports the other for it.

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
    /// The host backend's pool when a program that embeds the rank lends its own memory
    /// (`HostKv::lent`); `None`: the backend allocates its pool.
    pub lent: Option<Arc<HostKv>>,
}
