//! Two processes as in production: a child (this test binary re-run with an env marker)
//! exports its KV pool through CUDA IPC; this process maps it and pulls a TP2 -> TP1 leg plus a
//! TP1 leg through `CudaAgent`, compared with a host copy made by the plan.
//! Skips (with a printed reason) where there is no GPU.
#![cfg(feature = "cuda")]

mod common;

use common::gpus;
use kvferry_backends::cuda::verify::{apply_fragments, compare, fill_pattern, POISON};
use kvferry_backends::cuda::{
    CudaAgent, CudaAgentConfig, DeviceBuffer, Gpu, IpcMapping, PoolExport, Region,
};
use kvferry_backends::layout::single_rank;
use kvferry_core::agent::{CompletionQueue, Direction, TransferAgent, TransferId, TransferJob};
use kvferry_core::layout::CacheLayout;
use kvferry_core::plan::TransferPlan;
use kvferry_core::{PeerId, RequestId, TransferToken};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "KVFERRY_IPC_CHILD";

fn layout(tp: u32, rank: u32) -> CacheLayout {
    CacheLayout {
        tp_size: tp,
        ..single_rank(8, 8, 128, 32, 2)
    }
    .with_rank(rank)
}

const POOL_BLOCKS: u32 = 12;

/// Child role: runs only when spawned by the parent test with the env marker.
#[test]
fn ipc_child_role() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (rank, tp): (u32, u32) = {
        let (a, b) = spec.split_once(':').unwrap();
        (a.parse().unwrap(), b.parse().unwrap())
    };
    let gpu = Gpu::open(0).unwrap();
    let bytes = layout(tp, rank).block_bytes() as usize * POOL_BLOCKS as usize;
    let mut h = vec![0u8; bytes];
    fill_pattern(500 + u64::from(rank), &mut h);
    let buf = DeviceBuffer::alloc(&gpu, bytes).unwrap();
    buf.write(0, &h).unwrap();
    let export = buf.export().unwrap();
    println!("EXPORT {}", serde_json::to_string(&export).unwrap());
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
}

/// A context process per rank, each holding its pool (exported, printed) until its stdin
/// closes; with the pipes kept open, since each child's libtest still writes its result line.
fn spawn_ctx_children(ctx_tp: u32) -> (Vec<(Child, BufReader<ChildStdout>)>, Vec<PoolExport>) {
    let mut children = Vec::new();
    let mut exports = Vec::new();
    for r in 0..ctx_tp {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "ipc_child_role",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{r}:{ctx_tp}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let export: PoolExport = loop {
            let mut line = String::new();
            assert!(out.read_line(&mut line).unwrap() > 0, "child ended early");
            // libtest prints "test ipc_child_role ... " without a newline before our line.
            if let Some(at) = line.find("EXPORT ") {
                break serde_json::from_str(line[at + 7..].trim()).unwrap();
            }
        };
        children.push((child, out));
        exports.push(export);
    }
    (children, exports)
}

/// Pulls every context rank's leg of `plan` through a `CudaAgent` into a fresh pool on `gpu`,
/// mapping each child's export; returns the pool and the host plan copy it must equal.
fn pull_every_leg(
    gpu: &Arc<Gpu>,
    plan: &Arc<TransferPlan>,
    exports: &[PoolExport],
) -> (Arc<DeviceBuffer>, Vec<u8>) {
    let ctx_tp = exports.len() as u32;
    let pool_bytes = layout(1, 0).block_bytes() as usize * POOL_BLOCKS as usize;
    let pool = Arc::new(DeviceBuffer::alloc(gpu, pool_bytes).unwrap());
    pool.fill_byte(POISON).unwrap();
    let region = Region::from_buffer(pool.clone());
    let agent = CudaAgent::new(gpu.clone(), 0, region, CudaAgentConfig::default()).unwrap();
    let q = CompletionQueue::new(8);
    let mut expected = vec![POISON; pool_bytes];
    for (c, export) in (0..ctx_tp).zip(exports) {
        let map = IpcMapping::open(gpu, export).unwrap();
        let peer = PeerId {
            instance: 0,
            rank: c,
        };
        agent.register_peer(peer, Region::from_ipc(Arc::new(map)));
        let mut h = vec![0u8; layout(ctx_tp, c).block_bytes() as usize * POOL_BLOCKS as usize];
        fill_pattern(500 + u64::from(c), &mut h);
        apply_fragments(&h, &mut expected, plan.fragments_from(c));
        let job = TransferJob {
            id: TransferId(u64::from(c)),
            request: RequestId(1),
            token: TransferToken(2),
            direction: Direction::Receive { from: peer },
            plan: plan.clone(),
            local_blocks: Vec::new(),
            remote_blocks: Vec::new(),
            bytes: plan.bytes_from(c),
            staging: Default::default(),
        };
        agent.submit(job, q.clone()).unwrap();
    }
    let mut got = Vec::new();
    let t0 = Instant::now();
    while got.len() < ctx_tp as usize {
        q.drain_into(&mut got);
        assert!(t0.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_micros(50));
    }
    for c in &got {
        assert_eq!(c.result, Ok(plan.bytes_from(c.id.0 as u32)));
    }
    (pool, expected)
}

#[test]
fn gpu_ipc_two_process_pull_matches_host_plan_copy() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let Some(n) = gpus() else { return };
    let ctx_tp = 2;
    let (children, exports) = spawn_ctx_children(ctx_tp);
    let gpu = Gpu::open(if n > 1 { 1 } else { 0 }).unwrap();
    let blocks: Vec<(u32, u32)> = (0..8u32)
        .map(|i| (11 - i, (i * 5 + 2) % POOL_BLOCKS))
        .collect();
    let plan = Arc::new(TransferPlan::new(&layout(ctx_tp, 0), &layout(1, 0), &blocks).unwrap());
    let (pool, expected) = pull_every_leg(&gpu, &plan, &exports);
    let mut back = vec![0u8; expected.len()];
    pool.read(0, &mut back).unwrap();
    if let Err(m) = compare(&expected, &back) {
        panic!("IPC pull differs from host plan copy: {m}");
    }
    for (mut c, _out) in children {
        drop(c.stdin.take());
        assert!(c.wait().unwrap().success());
    }
}

/// A forged handle is refused with a typed error, not a crash.
#[test]
fn a_forged_ipc_handle_is_refused() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let Some(_) = gpus() else { return };
    let bad = PoolExport {
        device: 0,
        len: 1 << 20,
        offset: 0,
        handle: "00".repeat(64),
    };
    assert!(IpcMapping::open(&Gpu::open(0).unwrap(), &bad).is_err());
}
