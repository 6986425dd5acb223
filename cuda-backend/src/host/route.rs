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
    pub written: Written,
}

/// What a data frame's writer reports once the frame is whole in the kernel (`fire`), or
/// that it never will be (dropped unfired). A send's last frame completes its job through it
/// directly, so a send that fits its data queue needs no task and no channel of its own.
pub struct Written(Option<Box<dyn FnOnce(bool) + Send>>);

impl Written {
    /// Calls `f(true)` when fired, `f(false)` when dropped unfired; exactly once either way.
    pub fn new(f: impl FnOnce(bool) + Send + 'static) -> Written {
        Written(Some(Box::new(f)))
    }

    /// Nobody waits on this frame (a send's frames before its last).
    pub fn ignored() -> Written {
        Written(None)
    }

    /// Through a oneshot: it resolves when the frame is written, errs when it is dropped.
    pub fn signal() -> (Written, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let w = Written::new(move |ok| {
            if ok {
                let _ = tx.send(());
            }
        });
        (w, rx)
    }

    pub fn fire(mut self) {
        if let Some(f) = self.0.take() {
            f(true);
        }
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(false);
        }
    }
}

impl Debug for Written {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Written(waited)"
        } else {
            "Written(ignored)"
        })
    }
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
