//! What the host agent needs from the connections that carry its bytes: a queue of outgoing
//! `Data` frames per peer. The node's link table (`node::link::Links`) provides it; the host
//! data plane only names this trait, so it never imports the node.

use super::kv::HostKv;
use kvferry_core::wire::DATA_HEAD_LEN;
use kvferry_core::PeerId;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// A `Data` frame whose payload is written to the socket straight from KV memory.
#[derive(Debug)]
pub struct DataOut {
    /// Header and fixed fields, CRC included (`wire::DataSeal` over the payload).
    pub head: [u8; DATA_HEAD_LEN],
    /// Pool ranges (offset, length) of the payload, in order.
    pub pieces: Vec<(u64, u64)>,
    pub kv: Arc<HostKv>,
    /// Fired once the whole frame is in the kernel; dropped unfired if the connection ends
    /// first. Until then the payload's blocks are still being read.
    pub written: oneshot::Sender<()>,
}

/// Where the data frames for each connected peer go.
pub trait DataRoutes: Debug + Send + Sync {
    /// The data queue of `peer`'s connection; `None` when it has none (any more).
    fn data_queue(&self, peer: PeerId) -> Option<mpsc::Sender<DataOut>>;
}

/// A fixed table of peers (tests, and anything that needs no connection management).
impl DataRoutes for HashMap<PeerId, mpsc::Sender<DataOut>> {
    fn data_queue(&self, peer: PeerId) -> Option<mpsc::Sender<DataOut>> {
        self.get(&peer).cloned()
    }
}
