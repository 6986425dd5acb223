//! `CudaAgent` against the core's plans: heterogeneous TP legs compared with a host copy made
//! by the plan, typed errors, cancel, parked sends and teardown with work in flight.
//! Skips (with a printed reason) where there is no GPU.
#![cfg(feature = "cuda")]

mod common;

use common::gpus;
use kvferry_backends::cuda::verify::{apply_fragments, compare, fill_pattern, POISON};
use kvferry_backends::cuda::{CudaAgent, CudaAgentConfig, DeviceBuffer, Gpu, Region};
use kvferry_backends::layout::single_rank;
use kvferry_core::agent::{
    AgentError, Completion, CompletionQueue, Direction, TransferAgent, TransferId, TransferJob,
};
use kvferry_core::layout::CacheLayout;
use kvferry_core::plan::TransferPlan;
use kvferry_core::{PeerId, RequestId, TransferToken};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn layout(tp: u32, rank: u32) -> CacheLayout {
    CacheLayout {
        tp_size: tp,
        ..single_rank(4, 4, 64, 16, 2)
    }
    .with_rank(rank)
}

const POOL_BLOCKS: u32 = 24;

fn blocks() -> Vec<(u32, u32)> {
    (0..16u32)
        .map(|i| ((i * 7 + 3) % POOL_BLOCKS, (i * 5 + 1) % POOL_BLOCKS))
        .collect()
}

fn job(id: u64, direction: Direction, plan: &Arc<TransferPlan>, bytes: u64) -> TransferJob {
    TransferJob {
        id: TransferId(id),
        request: RequestId(9),
        token: TransferToken(1),
        direction,
        plan: plan.clone(),
        local_blocks: Vec::new(),
        remote_blocks: Vec::new(),
        bytes,
        staging: Default::default(),
    }
}

fn wait(q: &CompletionQueue, n: usize) -> Vec<Completion> {
    let mut got = Vec::new();
    let t0 = Instant::now();
    while got.len() < n {
        q.drain_into(&mut got);
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "completions missing"
        );
        std::thread::sleep(Duration::from_micros(50));
    }
    std::thread::sleep(Duration::from_millis(20));
    q.drain_into(&mut got);
    assert_eq!(got.len(), n, "a job completed more than once");
    got
}

struct Setup {
    ctx_gpu: Arc<Gpu>,
    gen_gpu: Arc<Gpu>,
}

fn setup() -> Option<Setup> {
    let n = gpus()?;
    let ctx_gpu = Gpu::open(0).unwrap();
    let gen_gpu = Gpu::open(if n > 1 { 1 } else { 0 }).unwrap();
    ctx_gpu.enable_peer_access(&gen_gpu).unwrap();
    gen_gpu.enable_peer_access(&ctx_gpu).unwrap();
    Some(Setup { ctx_gpu, gen_gpu })
}

fn ctx_pools(s: &Setup, tp: u32) -> (Vec<Arc<DeviceBuffer>>, Vec<Vec<u8>>) {
    let bytes = layout(tp, 0).block_bytes() as usize * POOL_BLOCKS as usize;
    let (mut dev, mut host) = (Vec::new(), Vec::new());
    for r in 0..tp {
        let mut h = vec![0u8; bytes];
        fill_pattern(100 + u64::from(r), &mut h);
        let d = DeviceBuffer::alloc(&s.ctx_gpu, bytes).unwrap();
        d.write(0, &h).unwrap();
        dev.push(Arc::new(d));
        host.push(h);
    }
    (dev, host)
}

/// Every generation rank pulls its legs from the context pools, one launch per leg, or with
/// `batched` all legs of a rank in one launch (`CudaAgent::batch`).
fn pull_case(ctx_tp: u32, gen_tp: u32, batched: bool) {
    let Some(s) = setup() else { return };
    let (ctx_dev, ctx_host) = ctx_pools(&s, ctx_tp);
    for g in 0..gen_tp {
        let gl = layout(gen_tp, g);
        let plan = Arc::new(TransferPlan::new(&layout(ctx_tp, 0), &gl, &blocks()).unwrap());
        let pool_bytes = gl.block_bytes() as usize * POOL_BLOCKS as usize;
        let pool = Arc::new(DeviceBuffer::alloc(&s.gen_gpu, pool_bytes).unwrap());
        pool.fill_byte(POISON).unwrap();
        let agent = CudaAgent::new(
            s.gen_gpu.clone(),
            g,
            Region::from_buffer(pool.clone()),
            CudaAgentConfig::default(),
        )
        .unwrap();
        let q = CompletionQueue::new(16);
        let mut expected = vec![POISON; pool_bytes];
        let sources = plan.sources();
        let batch = batched.then(|| agent.batch());
        for &c in &sources {
            let peer = PeerId {
                instance: 0,
                rank: c,
            };
            agent.register_peer(peer, Region::from_buffer(ctx_dev[c as usize].clone()));
            apply_fragments(&ctx_host[c as usize], &mut expected, plan.fragments_from(c));
            let j = job(u64::from(c), Direction::Receive { from: peer }, &plan, 0);
            agent.submit(j, q.clone()).unwrap();
        }
        if batched {
            std::thread::sleep(Duration::from_millis(20));
            assert!(q.is_empty(), "a held batch launched before it was released");
        }
        drop(batch);
        for c in wait(&q, sources.len()) {
            let want = plan.bytes_from(c.id.0 as u32);
            assert_eq!(c.result, Ok(want));
        }
        let mut got = vec![0u8; pool_bytes];
        pool.read(0, &mut got).unwrap();
        if let Err(m) = compare(&expected, &got) {
            panic!("ctx TP{ctx_tp} -> gen TP{gen_tp} rank {g}: {m}");
        }
    }
}

#[test]
fn gpu_agent_same_tp() {
    pull_case(1, 1, false);
}

#[test]
fn gpu_agent_concat_heads_ctx_tp2_to_gen_tp1() {
    pull_case(2, 1, false);
}

#[test]
fn gpu_agent_split_heads_ctx_tp1_to_gen_tp2() {
    pull_case(1, 2, false);
}

#[test]
fn gpu_agent_replicated_heads_ctx_tp8_to_gen_tp2() {
    pull_case(8, 2, false);
}

#[test]
fn gpu_agent_all_legs_in_one_launch_ctx_tp4_to_gen_tp1() {
    pull_case(4, 1, true);
}

#[test]
fn gpu_agent_all_legs_in_one_launch_replicated_ctx_tp8_to_gen_tp2() {
    pull_case(8, 2, true);
}

/// ctx rank 0 as a peer, and the generation side as the context's peer for pull-mode sends.
const CTX0: PeerId = PeerId {
    instance: 0,
    rank: 0,
};
const GEN0: PeerId = PeerId {
    instance: 1,
    rank: 0,
};

/// A generation agent on a fresh pool of `s`'s generation device, with ctx rank 0's pool as
/// its peer `CTX0` (the returned buffers must outlive it), and a TP1 -> TP1 plan.
fn gen_agent(s: &Setup) -> (Arc<CudaAgent>, Vec<Arc<DeviceBuffer>>, Arc<TransferPlan>) {
    let (ctx_dev, _) = ctx_pools(s, 1);
    let gl = layout(1, 0);
    let bytes = gl.block_bytes() as usize * POOL_BLOCKS as usize;
    let pool = Arc::new(DeviceBuffer::alloc(&s.gen_gpu, bytes).unwrap());
    let region = Region::from_buffer(pool);
    let config = CudaAgentConfig::default();
    let agent = CudaAgent::new(s.gen_gpu.clone(), 0, region, config).unwrap();
    let plan = Arc::new(TransferPlan::new(&layout(1, 0), &gl, &blocks()).unwrap());
    (agent, ctx_dev, plan)
}

/// An unknown peer and a plan naming blocks beyond the pool: typed refusals, nothing queued,
/// no byte moved.
#[test]
fn gpu_agent_refuses_an_unknown_peer_and_foreign_blocks() {
    let Some(s) = setup() else { return };
    let (agent, ctx_dev, plan) = gen_agent(&s);
    let dyn_agent: Arc<dyn TransferAgent> = agent.clone();
    let q = CompletionQueue::new(64);
    let receive = Direction::Receive { from: CTX0 };
    let r = dyn_agent.submit(job(1, receive.clone(), &plan, 0), q.clone());
    assert_eq!(r, Err(AgentError::PeerUnreachable(CTX0)));
    agent.register_peer(CTX0, Region::from_buffer(ctx_dev[0].clone()));
    let far = [(0, POOL_BLOCKS + 5)];
    let far = Arc::new(TransferPlan::new(&layout(1, 0), &layout(1, 0), &far).unwrap());
    let r = dyn_agent.submit(job(2, receive, &far, 0), q.clone());
    assert!(matches!(r, Err(AgentError::Rejected(_))), "{r:?}");
    assert!(q.is_empty());
}

/// `gen_agent` with ctx rank 0's pool registered and a pull of the plan from it submitted as
/// job `id`: the agent, its completion queue, the plan and the ctx buffers.
fn pulling(
    s: &Setup,
    id: u64,
) -> (
    Arc<CudaAgent>,
    CompletionQueue,
    Arc<TransferPlan>,
    Vec<Arc<DeviceBuffer>>,
) {
    let (agent, ctx_dev, plan) = gen_agent(s);
    agent.register_peer(CTX0, Region::from_buffer(ctx_dev[0].clone()));
    let q = CompletionQueue::new(64);
    let receive = Direction::Receive { from: CTX0 };
    agent.submit(job(id, receive, &plan, 0), q.clone()).unwrap();
    (agent, q, plan, ctx_dev)
}

/// A cancel after launch completes the job exactly once (the kernel's end is the fence); a
/// pull-mode send stays parked until the control plane reports the peer's end, once.
#[test]
fn gpu_agent_cancel_after_launch_and_a_parked_send_complete_once() {
    let Some(s) = setup() else { return };
    let (agent, q, plan, _ctx) = pulling(&s, 3);
    agent.cancel(TransferId(3));
    let c = wait(&q, 1);
    assert!(
        c[0].result == Err(AgentError::Cancelled) || c[0].result.is_ok(),
        "{c:?}"
    );
    let send = Direction::Send { to: GEN0 };
    agent.submit(job(4, send, &plan, 0), q.clone()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(q.is_empty(), "a parked send must not complete on its own");
    assert!(agent.peer_finished(TransferId(4), Ok(77)));
    assert_eq!(wait(&q, 1)[0].result, Ok(77));
    assert!(!agent.peer_finished(TransferId(4), Ok(77)));
}

/// Teardown with a launched job and a parked send: both complete exactly once, the launch
/// with its bytes, the parked send as shut down.
#[test]
fn gpu_agent_teardown_completes_launched_and_parked_jobs_once() {
    let Some(s) = setup() else { return };
    let (agent, q, plan, _ctx) = pulling(&s, 5);
    let send = Direction::Send { to: GEN0 };
    agent.submit(job(6, send, &plan, 0), q.clone()).unwrap();
    drop(agent);
    let mut c = wait(&q, 2);
    c.sort_by_key(|c| c.id);
    assert_eq!(c[0].id, TransferId(5));
    assert!(c[0].result.is_ok(), "{c:?}");
    assert_eq!(c[1].result, Err(AgentError::ShutDown));
}
