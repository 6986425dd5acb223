//! kvferry-node: the core's state machines driven by tokio over TCP, one process per
//! instance (`instance`: its TP ranks, each with its own pool and connections).
//!
//! Each gen rank dials each ctx rank. One connection carries the core's wire frames (control and
//! `Data` chunks) and the node's own load-setup frames (`frame::NodeFrame`). With feature
//! `cuda` and `--backend cuda` the KV pools live on GPUs instead and the bytes move over CUDA
//! IPC, not the connection (`gpu`). Each node runs one driver task that owns its ranks'
//! `Transceiver`s; connection tasks feed it frames, the agent wakes it on completions, and it
//! sleeps until the transceiver's `poll_timeout()` otherwise: there is no fixed tick.

pub mod admit;
pub mod backend;
pub mod backend_parts;
pub mod bench;
pub mod conn;
pub mod cpu;
pub mod ctx;
#[cfg(feature = "cuda")]
pub mod cuda_ipc;
pub mod embed;
pub mod frame;
pub mod gen;
pub mod instance;
pub mod link;
pub mod metrics;
#[cfg(feature = "nixl")]
pub mod nixl_host;
pub mod rank;
pub mod spec;
pub mod writer;

use kvferry_core::collective::CollectiveError;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Driver inbox bound: connection readers wait when the driver falls behind.
pub const INBOX: usize = 4096;
/// Inbox events handled per completion step.
pub const INBOX_BATCH: usize = 256;

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("completion collective: {0}")]
    Collective(#[from] CollectiveError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

/// A tokio runtime of `threads` threads: one is a current-thread runtime (a node's tasks then
/// hand work to each other without waking another thread), 0 is one per core.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if threads > 1 {
        b.worker_threads(threads);
    }
    b.enable_all().build()
}

/// A spawned task that lives no longer than its owner. Dropping a tokio `JoinHandle` detaches
/// the task; dropping this aborts it, so a role that is aborted (the bench ends each round's
/// ctx that way) takes its accept loop, connections and their writers with it instead of
/// leaking them, their sockets and their KV pool for the rest of the process.
#[derive(Debug)]
pub struct OwnedTask<T>(pub JoinHandle<T>);

impl<T> Drop for OwnedTask<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Hands `on` up to `INBOX_BATCH` events already waiting in `inbox`, without waiting: the
/// driver then runs its completion step, which a busy connection must not hold off.
pub fn drain_inbox<T>(inbox: &mut mpsc::Receiver<T>, mut on: impl FnMut(T)) {
    for _ in 0..INBOX_BATCH {
        match inbox.try_recv() {
            Ok(ev) => on(ev),
            Err(_) => break,
        }
    }
}

/// Sleeps until `at`, or for ever when nothing waits on time (input or the agent wakes the
/// driver then).
pub async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
