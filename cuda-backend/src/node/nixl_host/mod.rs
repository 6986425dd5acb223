//! The node over NIXL (feature `nixl`): KV pools in host memory or (with feature `cuda`,
//! `--backend nixl-cuda`) in GPU memory registered as VRAM (`pool`), bytes moved by NIXL over
//! UCX (TCP, shared memory, CUDA IPC or RDMA, as `UCX_TLS` allows), not over the node's
//! connection.
//!
//! ```text
//! UCX_TLS=tcp UCX_NET_DEVICES=lo kvferry-node ctx --backend nixl --listen 127.0.0.1:7000
//! UCX_TLS=tcp UCX_NET_DEVICES=lo kvferry-node gen --backend nixl --peer 127.0.0.1:7000 --requests 200
//! ```
//!
//! The control connection is the host node's (the core's wire frames plus node frames). Per
//! request and (ctx rank, gen rank):
//!
//! 1. The core's `RequestInfo` / `Ready`, as on the host path: the ctx proves the token.
//! 2. The ctx's send job parks in [`NixlServe`] with its blocks pinned, and the ctx sends
//!    `NixlReady` (the first on a connection carries its agent's metadata: the KV pool only).
//! 3. The gen ([`NixlPull`]) checks its blocks' epochs and posts a NIXL READ from the ctx's
//!    pool, with a notification naming (request, token, transfer). At the READ's terminal
//!    status its receive completes; the notification completes the ctx's send, or a
//!    `NixlFailed` frame fails it when the READ fails.
//!
//! The runtime is found without `LD_LIBRARY_PATH` (`nixl::runtime`).

pub mod notice;
pub mod parked;
pub mod pool;
pub mod pull;
pub mod serve;

pub use pull::NixlPull;
pub use serve::NixlServe;

use super::backend_parts::BackendParts;
use super::frame::NodeFrame;
use crate::host::pattern;
use crate::nixl::ucx::UcxEngine;
use crate::nixl::{Driver, NixlError};
use kvferry_core::agent::TransferAgent;
use kvferry_core::layout::CacheLayout;
use kvferry_core::transceiver::Side;
use kvferry_core::{PeerId, RequestId};
use pool::KvPool;
use pull::Offer;
use serve::PoolOffer;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NixlNodeError {
    #[error(transparent)]
    Nixl(#[from] NixlError),
    #[error("a pool of {blocks} blocks of {block_bytes} bytes is too large")]
    PoolSize { blocks: u32, block_bytes: u64 },
    #[error("{0} frame not expected by a NIXL {1} node")]
    Unexpected(&'static str, &'static str),
    #[error("NixlReady from {peer}: {why}")]
    BadOffer { peer: PeerId, why: String },
    #[error("NixlAgent from {peer}: {why}")]
    BadAgent { peer: PeerId, why: String },
    #[error(transparent)]
    Pool(#[from] pool::PoolError),
}

#[derive(Debug)]
enum Role {
    Serve(Arc<NixlServe>),
    Pull(Arc<NixlPull>),
}

/// One rank's KV pool (host or device memory) and the NIXL agent that moves it.
#[derive(Debug)]
pub struct NixlBackend {
    pool: KvPool,
    block_bytes: u64,
    /// This rank's NIXL agent.
    name: String,
    role: Role,
}

impl NixlBackend {
    /// Allocates the pool (on CUDA device `device`, else in host memory), registers it and
    /// starts the agent's driver thread.
    pub fn new(
        p: BackendParts,
        device: Option<usize>,
    ) -> Result<(NixlBackend, Arc<dyn TransferAgent>), NixlNodeError> {
        let too_large = NixlNodeError::PoolSize {
            blocks: p.blocks,
            block_bytes: p.block_bytes,
        };
        let bytes = u64::from(p.blocks)
            .checked_mul(p.block_bytes)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or(too_large)?;
        let pool = KvPool::new(bytes, device)?;
        let side = if p.side == Side::Context {
            "ctx"
        } else {
            "gen"
        };
        // Unique per process and start: a restarted peer is a new agent to NIXL.
        let name = format!(
            "kvferry-{side}{}-{}-{:x}",
            p.rank,
            std::process::id(),
            rand::random::<u32>()
        );
        let (engine_name, engine_pool) = (name.clone(), pool.clone());
        let wake = p.wake.clone();
        let (driver, md) = Driver::spawn(
            move || {
                engine_pool
                    .bind()
                    .map_err(|e| NixlError::Invalid(format!("pool's device: {e}")))?;
                UcxEngine::new(&engine_name, engine_pool.memory())
            },
            move || wake.notify_one(),
        )?;
        let memory = pool.memory();
        let (role, agent): (Role, Arc<dyn TransferAgent>) = match p.side {
            Side::Context => {
                let offer = PoolOffer {
                    rank: p.rank,
                    base: memory.base(),
                    bytes: memory.size(),
                    md_hex: hex(&md),
                };
                let a = Arc::new(NixlServe::new(driver, offer, p.links, p.wake));
                (Role::Serve(a.clone()), a)
            }
            Side::Generation => {
                let a = Arc::new(NixlPull::new(driver, memory, p.pool, p.links, p.wake));
                (Role::Pull(a.clone()), a)
            }
        };
        let backend = NixlBackend {
            pool,
            block_bytes: p.block_bytes,
            name,
            role,
        };
        Ok((backend, agent))
    }

    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    /// A gen's first frame to its ctx: its agent's name, which the ctx's notifications must
    /// come from.
    pub fn greeting(&self) -> Option<NodeFrame> {
        let name = self.name.clone();
        matches!(self.role, Role::Pull(_)).then_some(NodeFrame::NixlAgent { name })
    }

    /// Writes the seeded pattern of each block (`index` = position in the request).
    pub fn fill(
        &self,
        seed: u64,
        blocks: &[u32],
        layout: &CacheLayout,
    ) -> Result<(), NixlNodeError> {
        let mut buf = vec![0u8; self.block_bytes as usize];
        for (i, b) in blocks.iter().enumerate() {
            pattern::fill(seed, i as u32, layout, &mut buf);
            self.pool.write(u64::from(*b) * self.block_bytes, &buf)?;
        }
        Ok(())
    }

    /// True if `blocks` hold exactly the seeded pattern.
    pub fn verify(
        &self,
        seed: u64,
        blocks: &[u32],
        layout: &CacheLayout,
        scratch: &mut Vec<u8>,
    ) -> Result<bool, NixlNodeError> {
        let mut buf = vec![0u8; self.block_bytes as usize];
        for (i, b) in blocks.iter().enumerate() {
            self.pool.read(u64::from(*b) * self.block_bytes, &mut buf)?;
            if !pattern::verify(seed, i as u32, layout, &buf, scratch) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Handles a NIXL node frame from `peer`.
    pub fn on_frame(&self, peer: PeerId, frame: NodeFrame) -> Result<(), NixlNodeError> {
        match (&self.role, frame) {
            (
                Role::Pull(pull),
                NodeFrame::NixlReady {
                    request,
                    ctx_rank,
                    transfer,
                    pool_base,
                    pool_bytes,
                    md,
                },
            ) => {
                if ctx_rank != peer.rank {
                    let why = format!("announced rank {ctx_rank}");
                    return Err(NixlNodeError::BadOffer { peer, why });
                }
                let md = md
                    .map(|h| unhex(&h))
                    .transpose()
                    .map_err(|why| NixlNodeError::BadOffer { peer, why })?;
                let offer = Offer {
                    from: peer,
                    transfer,
                    pool_base,
                    pool_bytes,
                };
                pull.on_ready(request, ctx_rank, offer, md);
                Ok(())
            }
            (
                Role::Serve(serve),
                NodeFrame::NixlFailed {
                    request,
                    transfer,
                    error,
                    ..
                },
            ) => {
                if !serve.on_failed(peer, request, transfer, &error) {
                    tracing::debug!(%peer, %request, "nixl-failed for no parked send");
                }
                Ok(())
            }
            (Role::Serve(serve), NodeFrame::NixlAgent { name }) => serve
                .on_agent(peer, name)
                .map_err(|why| NixlNodeError::BadAgent { peer, why }),
            (Role::Serve(_), f) => Err(NixlNodeError::Unexpected(f.name(), "ctx")),
            (Role::Pull(_), f) => Err(NixlNodeError::Unexpected(f.name(), "gen")),
        }
    }

    /// Moves NIXL's ends and notifications into the core; call before every completion step.
    pub fn pump(&self) {
        match &self.role {
            Role::Serve(serve) => serve.pump(),
            Role::Pull(pull) => pull.pump(),
        }
    }

    /// A gen's request is over (see `NixlPull::request_ended`).
    pub fn request_ended(&self, request: RequestId) {
        if let Role::Pull(pull) = &self.role {
            pull.request_ended(request);
        }
    }

    /// A gen's READ counters, by name (a ctx keeps none).
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let Role::Pull(pull) = &self.role else {
            return Vec::new();
        };
        let c = pull.counters();
        vec![
            ("nixl_reads_posted", c.posted),
            ("nixl_cancelled_in_flight", c.cancelled_in_flight),
            ("nixl_cancelled_ended", c.cancelled_ended),
            ("nixl_reused_in_flight", c.reused_in_flight),
        ]
    }

    pub fn peer_lost(&self, peer: PeerId) {
        match &self.role {
            Role::Serve(serve) => serve.peer_lost(peer),
            Role::Pull(pull) => pull.peer_lost(peer),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes hex from the network (the frame's size bound already limits its length).
fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err("odd-length metadata".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(|| "metadata is not hex".to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_hex_round_trips_and_garbage_is_refused() {
        let md = vec![0u8, 1, 0xab, 0xff];
        assert_eq!(unhex(&hex(&md)).unwrap(), md);
        assert!(unhex("abc").is_err());
        assert!(unhex("zz").is_err());
        assert!(unhex("é1").is_err());
    }
}
