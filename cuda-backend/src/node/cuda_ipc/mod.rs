//! The node over CUDA IPC (feature `cuda`): two processes, one GPU each, as in production.
//!
//! ```text
//! kvferry-node ctx --backend cuda --device 0 --listen 127.0.0.1:7000
//! kvferry-node gen --backend cuda --device 1 --peer 127.0.0.1:7000 --requests 200 --max-blocks 16
//! ```
//!
//! (`--backend` defaults to the config file's `backend`, else `host`; both processes may use
//! the same device, since CUDA IPC works between processes on one GPU.) Put the toolkit's `lib`
//! directory on `LD_LIBRARY_PATH`: the copy kernel is compiled with NVRTC at start.
//!
//! The control connection is the host node's (TCP, the core's wire frames plus node frames);
//! no `Data` frame crosses it. Per connection and request:
//!
//! 1. ctx → gen `CudaPool` on connect: the ctx's `cuMemAlloc` pool as an IPC handle. The gen
//!    maps it (`cuIpcOpenMemHandle`) and registers it as that ctx rank's pool; it launches no
//!    request before that.
//! 2. The core's `RequestInfo` / `Ready` as on the host path. The ctx's send job parks in the
//!    CUDA agent ([`ServeAgent`]) with its blocks pinned, and the ctx sends `PullReady`.
//! 3. The gen ([`PullAgent`]) launches the gather kernel reading the ctx pool over NVLink (or
//!    HBM on one device) into its own pool; at the kernel's fence its receive completes and it
//!    sends `PullFinished`, on which the ctx completes the parked send and the core unpins.
//!
//! Bounds: at most `CudaAgentConfig::max_in_flight` (256) pulls on the GPU at once; more fail
//! at launch rather than queue. Verification (the default; `--no-verify` skips it) fills and
//! reads back every block with synchronous copies on the driver thread: it measures the
//! pattern, not the link.
//!
//! A node frame and not the core's `Done` carries step 3's answer: `Done` means "the ctx
//! finished sending" (ctx → gen), and this is the opposite direction and meaning.

pub mod pull;
pub mod serve;

pub use pull::PullAgent;
pub use serve::ServeAgent;

use super::backend_parts::{BackendParts, LentKv};
use super::frame::NodeFrame;
use crate::cuda::{CudaAgent, CudaAgentConfig, CudaError, DeviceBuffer, Gpu};
use crate::cuda::{IpcMapping, PoolExport, Region};
use crate::host::pattern;
use kvferry_core::agent::TransferAgent;
use kvferry_core::layout::CacheLayout;
use kvferry_core::transceiver::Side;
use kvferry_core::PeerId;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum GpuError {
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error("a pool of {blocks} blocks of {block_bytes} bytes is too large")]
    PoolSize { blocks: u32, block_bytes: u64 },
    #[error("the lent KV pool does not fit: {0}")]
    Lent(String),
    #[error("the ctx's pool: {0}")]
    Pool(String),
    #[error("{0} frame not expected by a CUDA {1} node")]
    Unexpected(&'static str, &'static str),
}

#[derive(Debug)]
enum Role {
    /// ctx: the pool's export, sent to every gen on connect.
    Serve(Arc<ServeAgent>, PoolExport),
    Pull(Arc<PullAgent>),
}

/// One rank's KV pool on a GPU and the agent that moves it.
#[derive(Debug)]
pub struct GpuBackend {
    rank: u32,
    pool: Arc<DeviceBuffer>,
    block_bytes: u64,
    role: Role,
}

impl GpuBackend {
    /// Allocates the pool on `device` (or takes the device memory the embedding program
    /// lent, `BackendParts::lent`) and builds the role's agent (compiling the kernel).
    pub fn new(
        device: usize,
        p: BackendParts,
    ) -> Result<(GpuBackend, Arc<dyn TransferAgent>), GpuError> {
        let gpu = Gpu::open(device)?;
        let bytes = u64::from(p.blocks)
            .checked_mul(p.block_bytes)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or(GpuError::PoolSize {
                blocks: p.blocks,
                block_bytes: p.block_bytes,
            })?;
        let pool = match p.lent.clone() {
            None => Arc::new(DeviceBuffer::alloc(&gpu, bytes)?),
            Some(LentKv::Cuda(buf)) if buf.len() == bytes && buf.gpu().ordinal() == device => buf,
            Some(LentKv::Cuda(buf)) => {
                return Err(GpuError::Lent(format!(
                    "{} bytes on device {}; the spec needs {bytes} on device {device}",
                    buf.len(),
                    buf.gpu().ordinal()
                )))
            }
            Some(LentKv::Host(_)) => return Err(GpuError::Lent("host memory".into())),
        };
        let local = Region::from_buffer(pool.clone());
        let cuda = CudaAgent::new(gpu, p.rank, local, CudaAgentConfig::default())?;
        let wake = p.wake.clone();
        cuda.set_on_complete(move || wake.notify_one());
        let (role, agent): (Role, Arc<dyn TransferAgent>) = match p.side {
            Side::Context => {
                let export = pool.export()?;
                let a = Arc::new(ServeAgent::new(cuda, p.links, p.rank, p.wake));
                (Role::Serve(a.clone(), export), a)
            }
            Side::Generation => {
                let a = Arc::new(PullAgent::new(cuda, p.links, p.wake, p.max_jobs));
                (Role::Pull(a.clone()), a)
            }
        };
        let backend = GpuBackend {
            rank: p.rank,
            pool,
            block_bytes: p.block_bytes,
            role,
        };
        Ok((backend, agent))
    }

    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    /// A gen node launches nothing before it has mapped its ctx's pool.
    pub fn awaits_pool(&self) -> bool {
        matches!(self.role, Role::Pull(_))
    }

    /// The frame a ctx sends each gen on connect.
    pub fn greeting(&self) -> Option<NodeFrame> {
        let Role::Serve(_, export) = &self.role else {
            return None;
        };
        Some(NodeFrame::CudaPool {
            ctx_rank: self.rank,
            device: export.device,
            pool_bytes: export.len,
            pool_offset: export.offset,
            block_bytes: self.block_bytes,
            handle: export.handle.clone(),
        })
    }

    /// Uploads the seeded pattern of each block (`index` = position in the request).
    pub fn fill(&self, seed: u64, blocks: &[u32], layout: &CacheLayout) -> Result<(), GpuError> {
        let mut buf = vec![0u8; self.block_bytes as usize];
        for (i, b) in blocks.iter().enumerate() {
            pattern::fill(seed, i as u32, layout, &mut buf);
            self.pool.write(self.offset(*b), &buf)?;
        }
        Ok(())
    }

    /// Downloads each block and compares it with the recomputed pattern.
    pub fn verify(
        &self,
        seed: u64,
        blocks: &[u32],
        layout: &CacheLayout,
        scratch: &mut Vec<u8>,
    ) -> Result<bool, GpuError> {
        let mut buf = vec![0u8; self.block_bytes as usize];
        for (i, b) in blocks.iter().enumerate() {
            self.pool.read(self.offset(*b), &mut buf)?;
            if !pattern::verify(seed, i as u32, layout, &buf, scratch) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn offset(&self, block: u32) -> usize {
        (u64::from(block) * self.block_bytes) as usize
    }

    /// Handles one CUDA node frame from `peer`.
    pub fn on_frame(&self, peer: PeerId, frame: NodeFrame) -> Result<(), GpuError> {
        match (&self.role, frame) {
            (
                Role::Pull(pull),
                NodeFrame::CudaPool {
                    ctx_rank,
                    device,
                    pool_bytes,
                    pool_offset,
                    handle,
                    ..
                },
            ) => {
                if ctx_rank != peer.rank {
                    return Err(GpuError::Pool(format!(
                        "announced as rank {ctx_rank}, connected as {peer}"
                    )));
                }
                let export = PoolExport {
                    device,
                    len: pool_bytes,
                    offset: pool_offset,
                    handle,
                };
                let map = IpcMapping::open(self.pool.gpu(), &export)?;
                pull.register(peer, Region::from_ipc(Arc::new(map)));
                Ok(())
            }
            (Role::Pull(pull), NodeFrame::PullReady { request, ctx_rank }) => {
                pull.on_ready(peer, request, ctx_rank);
                Ok(())
            }
            (
                Role::Serve(serve, _),
                NodeFrame::PullFinished {
                    request,
                    ctx_rank,
                    error,
                },
            ) => {
                if !serve.on_finished(peer, request, ctx_rank, error) {
                    tracing::debug!(%peer, %request, "pull-finished for no parked send");
                }
                Ok(())
            }
            (Role::Serve(..), f) => Err(GpuError::Unexpected(f.name(), "ctx")),
            (Role::Pull(_), f) => Err(GpuError::Unexpected(f.name(), "gen")),
        }
    }

    /// Forwards finished pulls to the core (gen); nothing to do on a ctx.
    pub fn pump(&self) {
        if let Role::Pull(pull) = &self.role {
            pull.pump();
        }
    }

    pub fn peer_lost(&self, peer: PeerId) {
        match &self.role {
            Role::Serve(serve, _) => serve.peer_lost(peer),
            Role::Pull(pull) => pull.peer_lost(peer),
        }
    }
}
