//! The floor of a request's fixed cost: a one-block request of 512 bytes (K and V, 256 bytes
//! each) through the production `CudaAgent` (descriptor upload, one launch, its event, the
//! poller's spin, the completion), from submit until the completion is seen. What a request of any size pays
//! beyond its copy can be no less than this; on one H200 it decides which request sizes can
//! reach a given share of the ceiling at all (BENCHMARKS.md, "Per-request cost").

use crate::two_process::{receive_job, spin_for};
use crate::{median, RunArgs};
use anyhow::{anyhow, bail, Result};
use kvferry_backends::cuda::{CudaAgent, CudaAgentConfig, DeviceBuffer, Gpu, Region};
use kvferry_backends::layout::single_rank;
use kvferry_core::agent::{CompletionQueue, TransferAgent};
use kvferry_core::plan::TransferPlan;
use kvferry_core::PeerId;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Timed requests (after as many untimed ones).
pub const FLOOR_ITERS: usize = 2_000;
/// Bound on one request: longer means a lost completion.
const FLOOR_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Serialize, Clone, Copy, Debug)]
pub struct Floor {
    /// Median host time inside `submit`.
    pub submit_us: f64,
    /// Median time from submit to the completion seen by the submitter.
    pub total_us: f64,
}

/// One layer, one head of 64 two-byte values, two tokens a block: K and V of a block are 256
/// bytes each, and a one-block request moves 512.
fn tiny_plan() -> Result<Arc<TransferPlan>> {
    let layout = single_rank(1, 1, 64, 2, 2);
    let plan = TransferPlan::new(&layout, &layout, &[(1, 2)])?;
    Ok(Arc::new(plan))
}

pub fn floor(a: &RunArgs) -> Result<Floor> {
    let src_gpu = Gpu::open(a.src_device)?;
    let dst_gpu = Gpu::open(a.dst_device)?;
    if a.src_device != a.dst_device {
        dst_gpu.enable_peer_access(&src_gpu)?;
    }
    let src = Arc::new(DeviceBuffer::alloc(&src_gpu, 4 << 10)?);
    let dst = Arc::new(DeviceBuffer::alloc(&dst_gpu, 4 << 10)?);
    let config = CudaAgentConfig::default();
    let agent = CudaAgent::new(dst_gpu, 0, Region::from_buffer(dst), config)?;
    let peer = PeerId {
        instance: 0,
        rank: 0,
    };
    agent.register_peer(peer, Region::from_buffer(src));
    let plan = tiny_plan()?;
    let bytes = plan.bytes_from(0);
    let done = CompletionQueue::new(4);
    let (mut submit, mut total) = (Vec::new(), Vec::new());
    for i in 0..2 * FLOOR_ITERS {
        let job = receive_job(&plan, peer, i);
        let t0 = Instant::now();
        agent
            .submit(job, done.clone())
            .map_err(|e| anyhow!("submit: {e}"))?;
        let t1 = Instant::now();
        let c = spin_for(&done, 1, t0 + FLOOR_TIMEOUT)?;
        let t2 = Instant::now();
        if c[0].result != Ok(bytes) {
            bail!("floor request {i}: {:?}", c[0].result);
        }
        if i >= FLOOR_ITERS {
            submit.push((t1 - t0).as_secs_f64() * 1e6);
            total.push((t2 - t0).as_secs_f64() * 1e6);
        }
    }
    Ok(Floor {
        submit_us: median(submit),
        total_us: median(total),
    })
}
