//! Where a node's KV bytes live and how they move: host memory over the TCP connection (the
//! default, always built), a GPU pool over CUDA IPC (feature `cuda`, see `node::cuda_ipc`) or
//! host memory moved by NIXL (feature `nixl`, see `node::nixl_host`).

use super::backend_parts::{BackendParts, LentKv};
#[cfg(feature = "cuda")]
use super::cuda_ipc::GpuBackend;
use super::frame::NodeFrame;
#[cfg(feature = "nixl")]
use super::nixl_host::NixlBackend;
use crate::host::agent::HostAgent;
use crate::host::kv::HostKv;
use crate::host::pattern;
use kvferry_core::agent::TransferAgent;
use kvferry_core::layout::CacheLayout;
use kvferry_core::{PeerId, RequestId};
use std::sync::Arc;
use thiserror::Error;

/// Which backend a node is built with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendSpec {
    #[default]
    Host,
    /// The KV pool on this CUDA device ordinal.
    #[cfg(feature = "cuda")]
    Cuda { device: usize },
    /// Memory moved by NIXL over UCX: host memory, or GPU memory on this CUDA device
    /// ordinal (registered as VRAM; needs feature `cuda` too).
    #[cfg(feature = "nixl")]
    Nixl { device: Option<usize> },
}

impl BackendSpec {
    /// The backend that lent memory is for (a CUDA pool: on its buffer's device).
    pub fn for_lent(lent: &LentKv) -> BackendSpec {
        match lent {
            LentKv::Host(_) => BackendSpec::Host,
            #[cfg(feature = "cuda")]
            LentKv::Cuda(buf) => BackendSpec::Cuda {
                device: buf.gpu().ordinal(),
            },
        }
    }
}

#[derive(Debug, Error)]
pub enum BackendError {
    #[cfg(feature = "cuda")]
    #[error("CUDA backend: {0}")]
    Gpu(#[from] super::cuda_ipc::GpuError),
    #[cfg(feature = "nixl")]
    #[error("NIXL backend: {0}")]
    Nixl(#[from] super::nixl_host::NixlNodeError),
    #[error("{0} frame on a node whose backend does not take it")]
    NotCuda(&'static str),
    #[error("lent {lent} memory for a {backend} backend")]
    LentKind {
        lent: &'static str,
        backend: &'static str,
    },
    #[error("lent pool of {blocks} blocks of {block_bytes} bytes; the spec says {want_blocks} of {want_block_bytes}")]
    LentPool {
        blocks: u32,
        block_bytes: u64,
        want_blocks: u32,
        want_block_bytes: u64,
    },
    #[error("transceiver setup: {0}")]
    Setup(#[from] kvferry_core::transceiver::SetupError),
}

#[derive(Debug)]
pub enum Backend {
    Host {
        kv: Arc<HostKv>,
        agent: Arc<HostAgent>,
    },
    #[cfg(feature = "cuda")]
    Gpu(GpuBackend),
    #[cfg(feature = "nixl")]
    Nixl(NixlBackend),
}

impl Backend {
    /// Must run inside a tokio runtime (the host agent spawns its send tasks on it).
    pub fn new(
        spec: BackendSpec,
        p: BackendParts,
    ) -> Result<(Backend, Arc<dyn TransferAgent>), BackendError> {
        match spec {
            BackendSpec::Host => {
                let kv = match p.lent.clone().map(host_memory).transpose()? {
                    Some(kv) if kv.blocks() != p.blocks || kv.block_bytes() != p.block_bytes => {
                        return Err(BackendError::LentPool {
                            blocks: kv.blocks(),
                            block_bytes: kv.block_bytes(),
                            want_blocks: p.blocks,
                            want_block_bytes: p.block_bytes,
                        })
                    }
                    Some(kv) => kv,
                    None => Arc::new(HostKv::new(p.blocks, p.block_bytes)),
                };
                let agent = Arc::new(HostAgent::new(p.rank, kv.clone(), p.links, p.wake));
                Ok((
                    Backend::Host {
                        kv,
                        agent: agent.clone(),
                    },
                    agent,
                ))
            }
            #[cfg(feature = "cuda")]
            BackendSpec::Cuda { device } => {
                let (gpu, agent) = GpuBackend::new(device, p)?;
                Ok((Backend::Gpu(gpu), agent))
            }
            #[cfg(feature = "nixl")]
            BackendSpec::Nixl { device } => {
                let (nixl, agent) = NixlBackend::new(p, device)?;
                Ok((Backend::Nixl(nixl), agent))
            }
        }
    }

    /// The host agent that lands `Data` frames; `None` where bytes do not cross the connection.
    pub fn data_agent(&self) -> Option<Arc<HostAgent>> {
        match self {
            Backend::Host { agent, .. } => Some(agent.clone()),
            #[cfg(feature = "cuda")]
            Backend::Gpu(_) => None,
            #[cfg(feature = "nixl")]
            Backend::Nixl(_) => None,
        }
    }

    pub fn block_bytes(&self) -> u64 {
        match self {
            Backend::Host { kv, .. } => kv.block_bytes(),
            #[cfg(feature = "cuda")]
            Backend::Gpu(g) => g.block_bytes(),
            #[cfg(feature = "nixl")]
            Backend::Nixl(n) => n.block_bytes(),
        }
    }

    /// False while a gen must wait for its ctx's pool before launching requests.
    pub fn ready_on_connect(&self) -> bool {
        match self {
            Backend::Host { .. } => true,
            #[cfg(feature = "cuda")]
            Backend::Gpu(g) => !g.awaits_pool(),
            // The ctx's metadata comes with its first `NixlReady`, after a token check.
            #[cfg(feature = "nixl")]
            Backend::Nixl(_) => true,
        }
    }

    /// The node frame sent first on a new connection, if any: a ctx's to every gen that
    /// connects (a CUDA pool), a gen's to its ctx (a NIXL agent's name).
    pub fn greeting(&self) -> Option<NodeFrame> {
        match self {
            Backend::Host { .. } => None,
            #[cfg(feature = "cuda")]
            Backend::Gpu(g) => g.greeting(),
            #[cfg(feature = "nixl")]
            Backend::Nixl(n) => n.greeting(),
        }
    }

    /// Writes the seeded pattern into `blocks` (a request's blocks, in order) of the rank
    /// `layout` describes.
    pub fn fill(
        &self,
        seed: u64,
        blocks: &[u32],
        layout: &CacheLayout,
    ) -> Result<(), BackendError> {
        match self {
            Backend::Host { kv, .. } => {
                for (i, b) in blocks.iter().enumerate() {
                    pattern::fill(seed, i as u32, layout, &mut kv.block(*b));
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Backend::Gpu(g) => Ok(g.fill(seed, blocks, layout)?),
            #[cfg(feature = "nixl")]
            Backend::Nixl(n) => Ok(n.fill(seed, blocks, layout)?),
        }
    }

    /// True if `blocks` of the rank `layout` describes hold exactly the seeded pattern.
    pub fn verify(
        &self,
        seed: u64,
        blocks: &[u32],
        layout: &CacheLayout,
        scratch: &mut Vec<u8>,
    ) -> Result<bool, BackendError> {
        match self {
            Backend::Host { kv, .. } => Ok(blocks
                .iter()
                .enumerate()
                .all(|(i, b)| pattern::verify(seed, i as u32, layout, &kv.block(*b), scratch))),
            #[cfg(feature = "cuda")]
            Backend::Gpu(g) => Ok(g.verify(seed, blocks, layout, scratch)?),
            #[cfg(feature = "nixl")]
            Backend::Nixl(n) => Ok(n.verify(seed, blocks, layout, scratch)?),
        }
    }

    /// Handles a backend's node frame (CUDA: `CudaPool`, `PullReady`, `PullFinished`; NIXL:
    /// `NixlReady`, `NixlFailed`) from `peer`.
    #[cfg_attr(not(any(feature = "cuda", feature = "nixl")), allow(unused_variables))]
    pub fn on_backend_frame(&self, peer: PeerId, frame: NodeFrame) -> Result<(), BackendError> {
        match self {
            Backend::Host { .. } => Err(BackendError::NotCuda(frame.name())),
            #[cfg(feature = "cuda")]
            Backend::Gpu(g) => Ok(g.on_frame(peer, frame)?),
            #[cfg(feature = "nixl")]
            Backend::Nixl(n) => Ok(n.on_frame(peer, frame)?),
        }
    }

    /// Moves backend completions into the core's queue; call before every completion step.
    pub fn pump(&self) {
        #[cfg(feature = "cuda")]
        if let Backend::Gpu(g) = self {
            g.pump();
        }
        #[cfg(feature = "nixl")]
        if let Backend::Nixl(n) = self {
            n.pump();
        }
    }

    /// A gen's request is over: a NIXL gen refuses its ctx's offers from now on.
    #[cfg_attr(not(feature = "nixl"), allow(unused_variables))]
    pub fn request_ended(&self, request: RequestId) {
        #[cfg(feature = "nixl")]
        if let Backend::Nixl(n) = self {
            n.request_ended(request);
        }
    }

    /// The backend's own counters, by name (the NIXL gen's READs); empty for the others.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        match self {
            Backend::Host { .. } => Vec::new(),
            #[cfg(feature = "cuda")]
            Backend::Gpu(_) => Vec::new(),
            #[cfg(feature = "nixl")]
            Backend::Nixl(n) => n.counters(),
        }
    }

    /// Ends every transfer that depends on `peer`'s connection.
    pub fn peer_lost(&self, peer: PeerId) {
        match self {
            Backend::Host { agent, .. } => agent.peer_lost(peer),
            #[cfg(feature = "cuda")]
            Backend::Gpu(g) => g.peer_lost(peer),
            #[cfg(feature = "nixl")]
            Backend::Nixl(n) => n.peer_lost(peer),
        }
    }
}

/// Lent memory the host backend can use.
fn host_memory(lent: LentKv) -> Result<Arc<HostKv>, BackendError> {
    match lent {
        LentKv::Host(kv) => Ok(kv),
        #[cfg(feature = "cuda")]
        LentKv::Cuda(_) => Err(BackendError::LentKind {
            lent: "device",
            backend: "host",
        }),
    }
}
