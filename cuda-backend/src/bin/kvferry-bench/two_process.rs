//! The production shape: context ranks as child processes exporting their KV pools over CUDA
//! IPC, generation ranks in this process mapping them and pulling through `CudaAgent`.
//!
//! A [`Case`] is one request set up on a pair of devices; [`timed_rounds`] submits any number of
//! cases at once and times them together, so the one-way rows and the bidirectional row (one
//! case each way) are measured by the same code.

use crate::{gbps, median, CaseRow, RunArgs};
use anyhow::{anyhow, bail, Context, Result};
use kvferry_backends::cuda::verify::{apply_fragments, compare, fill_pattern, POISON};
use kvferry_backends::cuda::{
    CopyKernel, CudaAgent, CudaAgentConfig, DeviceBuffer, Gpu, IpcMapping, KernelConfig,
    PoolExport, Region,
};
use kvferry_backends::layout::single_rank;
use kvferry_core::agent::{
    Completion, CompletionQueue, Direction, TransferAgent, TransferId, TransferJob,
};
use kvferry_core::layout::CacheLayout;
use kvferry_core::plan::TransferPlan;
use kvferry_core::{PeerId, RequestId, TransferToken};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bound on one timed round: a round that takes longer has lost a completion.
const ROUND_TIMEOUT: Duration = Duration::from_secs(30);

pub fn llama70b(tp: u32, rank: u32) -> CacheLayout {
    CacheLayout {
        tp_size: tp,
        ..single_rank(80, 8, 128, 32, 2)
    }
    .with_rank(rank)
}

/// Children that exit (and free their pools) when dropped.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            drop(c.stdin.take());
            let _ = c.wait();
        }
    }
}

fn spawn_ctx(device: usize, pool_bytes: usize, seed: u64) -> Result<(Child, PoolExport)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args([
            "ctx-child",
            "--device",
            &device.to_string(),
            "--pool-bytes",
            &pool_bytes.to_string(),
            "--seed",
            &seed.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("spawn context child")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .context("read child export")?;
    let export: PoolExport = serde_json::from_str(line.trim())
        .with_context(|| format!("child sent {line:?} instead of a pool export"))?;
    Ok((child, export))
}

/// "ctx_tp:gen_tp" as two numbers.
pub fn parse_case(case: &str) -> Result<(u32, u32)> {
    case.split_once(':')
        .and_then(|(c, g)| Some((c.parse::<u32>().ok()?, g.parse::<u32>().ok()?)))
        .ok_or_else(|| anyhow!("case {case:?} is not ctx_tp:gen_tp"))
}

/// What one case asks for: TP sizes, request length, devices, and the seed of its bytes.
pub struct Shape {
    pub ctx_tp: u32,
    pub gen_tp: u32,
    pub tokens: u32,
    pub src_device: usize,
    pub dst_device: usize,
    pub seed: u64,
    /// The generation process launches its kernels on the context's device (same host, so it
    /// can open that device): loads stay in the context GPU's memory and stores cross the
    /// link (push), instead of loads crossing it (pull, the agent's default).
    pub launch_on_src: bool,
}

/// One generation rank: its agent, its pool, its legs and the bytes its pool must end with.
struct GenRank {
    agent: Arc<CudaAgent>,
    pool: Arc<DeviceBuffer>,
    jobs: Vec<TransferJob>,
    expected: Vec<u8>,
}

/// One request set up end to end. Field order is drop order: agents before the mappings they
/// read, mappings before the children that own the memory.
pub struct Case {
    ranks: Vec<GenRank>,
    _mapped: Vec<Region>,
    _children: Children,
    pub label: String,
    /// Bytes one round moves.
    pub total: u64,
    pub fragments: usize,
    pub fragment_kib: String,
}

impl Case {
    pub fn new(a: &RunArgs, s: &Shape, cfg: KernelConfig, ptx: &str) -> Result<Case> {
        let ctx = llama70b(s.ctx_tp, 0);
        let blocks = block_pairs(a, s, ctx.tokens_per_block);
        let ctx_pool = ctx.block_bytes() as usize * a.pool_blocks as usize;
        let (children, exports) = spawn_ctx_ranks(s, ctx_pool)?;
        let pool_gpu = Gpu::open(s.dst_device)?;
        let gpu = if s.launch_on_src {
            let g = Gpu::open(s.src_device)?;
            g.enable_peer_access(&pool_gpu)?;
            g
        } else {
            pool_gpu.clone()
        };
        let mut mapped = Vec::new();
        for e in &exports {
            mapped.push(Region::from_ipc(Arc::new(IpcMapping::open(&gpu, e)?)));
        }
        let host_ctx = host_pools(s, ctx_pool);
        let mut case = Case {
            ranks: Vec::new(),
            _mapped: Vec::new(),
            _children: children,
            label: format!(
                "ctx TP{} -> gen TP{}{}",
                s.ctx_tp,
                s.gen_tp,
                if s.launch_on_src { " (push)" } else { "" }
            ),
            total: 0,
            fragments: 0,
            fragment_kib: String::new(),
        };
        let mut sizes = BTreeSet::new();
        let config = CudaAgentConfig {
            kernel: cfg,
            ..CudaAgentConfig::default()
        };
        for g in 0..s.gen_tp {
            let plan = Arc::new(TransferPlan::new(&ctx, &llama70b(s.gen_tp, g), &blocks)?);
            let gpus = (&gpu, &pool_gpu);
            let (agent, pool) = gen_agent(gpus, ptx, g, &plan, a.pool_blocks, &config)?;
            let mut expected = vec![POISON; pool.len()];
            let mut jobs = Vec::new();
            for c in plan.sources() {
                let peer = PeerId {
                    instance: 0,
                    rank: c,
                };
                agent.register_peer(peer, mapped[c as usize].clone());
                apply_fragments(&host_ctx[c as usize], &mut expected, plan.fragments_from(c));
                case.fragments += plan.fragments_from(c).count();
                let from_c = plan.template().iter().filter(|f| f.src_rank == c);
                sizes.extend(from_c.map(|f| f.len));
                case.total += plan.bytes_from(c);
                // Numbered across the case's ranks, as one agent would see them.
                let id = case.ranks.iter().map(|r| r.jobs.len()).sum::<usize>() + jobs.len();
                jobs.push(receive_job(&plan, peer, id));
            }
            case.ranks.push(GenRank {
                agent,
                pool,
                jobs,
                expected,
            });
        }
        case._mapped = mapped;
        let kib: Vec<String> = sizes.iter().map(|s| format!("{}", s >> 10)).collect();
        case.fragment_kib = kib.join("/");
        Ok(case)
    }

    /// Poisons every generation pool, so a round that skips a byte is caught.
    fn poison(&self) -> Result<()> {
        for r in &self.ranks {
            r.pool.fill_byte(POISON)?;
        }
        Ok(())
    }

    /// Submits every leg, all legs of one generation rank in one launch; returns how many.
    fn submit(&self, done: &CompletionQueue) -> Result<usize> {
        let mut n = 0;
        for r in &self.ranks {
            let _batch = r.agent.batch();
            for j in &r.jobs {
                r.agent
                    .submit(j.clone(), done.clone())
                    .map_err(|e| anyhow!("submit: {e}"))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Every generation pool against the host plan copy (written over fresh poison).
    pub fn verify(&self) -> Result<()> {
        let mut back = Vec::new();
        for (g, r) in self.ranks.iter().enumerate() {
            back.resize(r.pool.len(), 0);
            r.pool.read(0, &mut back)?;
            compare(&r.expected, &back).map_err(|m| anyhow!("{} gen rank {g}: {m}", self.label))?;
        }
        Ok(())
    }
}

/// One child process per context rank on the source device, each with its exported pool.
fn spawn_ctx_ranks(s: &Shape, pool_bytes: usize) -> Result<(Children, Vec<PoolExport>)> {
    let mut children = Children(Vec::new());
    let mut exports = Vec::new();
    for r in 0..s.ctx_tp {
        let (child, export) = spawn_ctx(s.src_device, pool_bytes, s.seed + u64::from(r))?;
        children.0.push(child);
        exports.push(export);
    }
    Ok((children, exports))
}

/// The context ranks' pools as the children filled them (same seeds), for the expected bytes.
fn host_pools(s: &Shape, pool_bytes: usize) -> Vec<Vec<u8>> {
    (0..s.ctx_tp)
        .map(|r| {
            let mut h = vec![0u8; pool_bytes];
            fill_pattern(s.seed + u64::from(r), &mut h);
            h
        })
        .collect()
}

/// The request's (ctx block, gen block) pairs: shuffled, different ids on each side.
fn block_pairs(a: &RunArgs, s: &Shape, tokens_per_block: u32) -> Vec<(u32, u32)> {
    let nblocks = (s.tokens / tokens_per_block) as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(s.seed ^ 0xb10c);
    let mut ids: Vec<u32> = (0..a.pool_blocks).collect();
    ids.shuffle(&mut rng);
    let ctx_ids = ids[..nblocks].to_vec();
    ids.shuffle(&mut rng);
    ctx_ids.into_iter().zip(ids.iter().copied()).collect()
}

/// A generation rank's agent launching on `gpu`, its pool on `pool_gpu` (the same device
/// unless the case pushes).
fn gen_agent(
    (gpu, pool_gpu): (&Arc<Gpu>, &Arc<Gpu>),
    ptx: &str,
    rank: u32,
    plan: &TransferPlan,
    pool_blocks: u32,
    config: &CudaAgentConfig,
) -> Result<(Arc<CudaAgent>, Arc<DeviceBuffer>)> {
    let pool_bytes = plan.gen_layout().block_bytes() as usize * pool_blocks as usize;
    let pool = Arc::new(DeviceBuffer::alloc(pool_gpu, pool_bytes)?);
    let agent = CudaAgent::with_kernel(
        gpu.clone(),
        CopyKernel::load(gpu, ptx)?,
        rank,
        Region::from_buffer(pool.clone()),
        config.clone(),
    )?;
    Ok((agent, pool))
}

pub fn receive_job(plan: &Arc<TransferPlan>, from: PeerId, id: usize) -> TransferJob {
    let src = from.rank;
    TransferJob {
        id: TransferId(id as u64),
        request: RequestId(1),
        token: TransferToken(0x1234),
        direction: Direction::Receive { from },
        plan: plan.clone(),
        local_blocks: Vec::new(),
        remote_blocks: Vec::new(),
        bytes: plan.bytes_from(src),
        staging: Default::default(),
    }
}

/// Spins on `done` until `want` completions came (a poller's latency is what is measured, so
/// no sleep), or fails at `deadline`: a completion that never comes is lost.
pub fn spin_for(done: &CompletionQueue, want: usize, deadline: Instant) -> Result<Vec<Completion>> {
    let mut got = Vec::with_capacity(want);
    while got.len() < want {
        done.drain_into(&mut got);
        if Instant::now() > deadline {
            bail!("{} of {want} completions by the deadline", got.len());
        }
        std::hint::spin_loop();
    }
    Ok(got)
}

/// What [`timed_rounds`] measured, one entry per timed round.
pub struct Timed {
    /// Wall clock from the first submit to the last completion, in milliseconds.
    pub wall_ms: Vec<f64>,
    /// Host time from the first submit to the last one's return (expansion, descriptor
    /// upload, launch, event record), in microseconds. The copy runs from the first launch
    /// on, so with several generation ranks this overlaps it and is not a part of the fixed
    /// cost.
    pub submit_us: Vec<f64>,
}

/// One warm-up and `iters` timed rounds of every case submitted together.
pub fn timed_rounds(cases: &[&Case], iters: usize) -> Result<Timed> {
    let total: u64 = cases.iter().map(|c| c.total).sum();
    let done = CompletionQueue::new(1024);
    let mut times = Timed {
        wall_ms: Vec::new(),
        submit_us: Vec::new(),
    };
    for it in 0..=iters {
        for c in cases {
            c.poison()?;
        }
        let t0 = Instant::now();
        let mut want = 0;
        for c in cases {
            want += c.submit(&done)?;
        }
        let submitted = t0.elapsed().as_secs_f64() * 1e6;
        let got = spin_for(&done, want, t0 + ROUND_TIMEOUT)?;
        let dt = t0.elapsed().as_secs_f64() * 1e3;
        let moved: u64 = got
            .iter()
            .map(|c| c.result.clone().map_err(|e| anyhow!("job {:?}: {e}", c.id)))
            .sum::<Result<u64>>()?;
        if moved != total {
            bail!("moved {moved} bytes, the plans say {total}");
        }
        if it > 0 {
            times.wall_ms.push(dt);
            times.submit_us.push(submitted);
        }
    }
    Ok(times)
}

/// The table row of `times` for `bytes` against `ceiling` (GB/s).
pub fn case_row(case: &Case, shape: &Shape, times: &Timed, ceiling: f64) -> CaseRow {
    let med = median(times.wall_ms.clone());
    let best = times.wall_ms.iter().copied().fold(f64::INFINITY, f64::min);
    CaseRow {
        case: case.label.clone(),
        ctx_processes: shape.ctx_tp,
        gen_ranks: shape.gen_tp,
        fragments: case.fragments,
        fragment_kib: case.fragment_kib.clone(),
        bytes: case.total,
        median_ms: med,
        best_ms: best,
        gbps: gbps(case.total, med),
        of_ceiling: gbps(case.total, med) / ceiling,
        fixed_us: med * 1e3 - case.total as f64 / (ceiling * 1e3),
        submit_us: median(times.submit_us.clone()),
        verified: true,
    }
}

/// One case on the run's devices: set up, timed, checked byte for byte, printed.
pub fn two_process(
    a: &RunArgs,
    (case, tokens): (&str, u32),
    cfg: KernelConfig,
    ceiling: f64,
    ptx: &str,
) -> Result<CaseRow> {
    let (ctx_tp, gen_tp) = parse_case(case)?;
    let shape = Shape {
        ctx_tp,
        gen_tp,
        tokens,
        src_device: a.src_device,
        dst_device: a.dst_device,
        seed: a.seed,
        launch_on_src: false,
    };
    let c = Case::new(a, &shape, cfg, ptx)?;
    let times = timed_rounds(&[&c], a.iters)?;
    c.verify()?;
    let row = case_row(&c, &shape, &times, ceiling);
    println!(
        "two-process {:<22} {:>6} frags of {:>6} KiB  {:>7.1} MiB  {:>7.3} ms  {:>6.1} GB/s  {:>5.1}%  fixed {:>7.1} µs (submit {:>5.1} µs)",
        row.case,
        row.fragments,
        row.fragment_kib,
        row.bytes as f64 / (1 << 20) as f64,
        row.median_ms,
        row.gbps,
        100.0 * row.of_ceiling,
        row.fixed_us,
        row.submit_us
    );
    Ok(row)
}
