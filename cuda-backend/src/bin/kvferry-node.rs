// kvferry-node: a ctx (prefill) or gen (decode) instance over TCP, one process for all its TP
// ranks, its KV pools in host memory or (built with `--features cuda`, `--backend cuda`) on a
// GPU over CUDA IPC.
//
//   kvferry-node ctx --listen 127.0.0.1:0
//   kvferry-node gen --peer 127.0.0.1:PORT --requests 1000
//   kvferry-node ctx --tp 2            (prints `listening A0,A1`: one address per rank)
//   kvferry-node gen --tp 1 --peer A0,A1
//   kvferry-node ctx --backend cuda --device 0          (gen likewise, --device 1)
//   kvferry-node ctx --backend nixl-cuda --device 0     (NIXL over UCX, pools in GPU memory)
//   kvferry-node bench
//
// Machine-readable lines on stdout: `listening ADDR[,ADDR...]`, `metrics ADDR`,
// `summary {json}`.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kvferry_backends::layout::sharded;
use kvferry_backends::node::backend::BackendSpec;
use kvferry_backends::node::bench::{self, BenchOptions};
use kvferry_backends::node::instance::{Instance, MAX_LOCAL_RANKS};
use kvferry_backends::node::spec::{self, NodeLimits, NodeSpec, MAX_POOL_BLOCKS};
use kvferry_backends::node::{ctx, gen, metrics, runtime};
use kvferry_core::config::{self, TransceiverConfig};
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    version,
    about = "kvferry node: KV cache transfer between a ctx and a gen rank over TCP"
)]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Context (prefill) instance: serves KV blocks to gen peers.
    Ctx {
        /// Address rank 0 listens on; rank r on port + r (port 0 picks a free one for each).
        /// Printed as `listening ADDR,...`, one per rank, the list `gen --peer` takes.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[command(flatten)]
        common: Common,
    },
    /// Generation (decode) instance: runs a synthetic load against a ctx instance.
    Gen {
        /// The ctx instance's addresses, one per ctx rank in rank order (what the ctx printed
        /// after `listening`).
        #[arg(long, value_delimiter = ',', required = true)]
        peer: Vec<SocketAddr>,
        #[command(flatten)]
        load: Load,
        #[command(flatten)]
        common: Common,
    },
    /// Loopback throughput and latency of the node path against a raw TCP copy.
    Bench {
        #[arg(long, default_value_t = 400)]
        requests: u64,
        /// Blocks per request (64 KiB each with the default layout).
        #[arg(long, default_value_t = 16)]
        blocks_per_request: u32,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Also verify every received byte (costs gen CPU the raw copy does not pay).
        #[arg(long)]
        verify: bool,
        /// Gen instances against the one ctx, each on its own thread and runtime as separate
        /// processes would be, started together; `--requests` is each one's.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        gens: u16,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args)]
struct Common {
    /// TransceiverConfig as TOML (field names as in the config reference).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (printed as `metrics ADDR`).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// KV blocks in each rank's pool.
    #[arg(long, default_value_t = 1024)]
    blocks: u32,
    /// Tensor-parallel ranks of this instance, all served by this process (`--kv-heads` is
    /// the whole model's and is split between them).
    #[arg(long, default_value_t = 1)]
    tp: u32,
    #[arg(long, default_value_t = 4)]
    layers: u32,
    #[arg(long, default_value_t = 2)]
    kv_heads: u32,
    #[arg(long, default_value_t = 128)]
    head_dim: u32,
    #[arg(long, default_value_t = 16)]
    tokens_per_block: u32,
    #[arg(long, default_value_t = 2)]
    dtype_bytes: u32,
    /// Where the KV pool lives (default: the config's `backend`, else host).
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// CUDA device ordinal of the pool (with `--backend cuda` or `nixl-cuda`).
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Runtime threads (0: one per core). Default: a ctx 2 on a machine of 4 or more cores,
    /// else 1; a gen 1. A ctx's connection writers copy into the kernel on the second thread
    /// while its driver works; a gen's work per request is a chain of handoffs (reader,
    /// driver, writer) that cost more across threads than they save, so one thread moves more
    /// and spends half the CPU (BENCHMARKS.md, "Where the fixed cost ends"). `bench` gives its
    /// ctx and gen sides the same defaults, or both this many.
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Per-peer bounds (defaults in `kvferry_backends::node::spec`; README "Per-peer bounds").
#[derive(Args)]
struct LimitArgs {
    /// Close a connection that sends no whole frame within this many ms of connecting.
    #[arg(long, default_value_t = spec::DEFAULT_FIRST_FRAME.as_millis() as u64)]
    first_frame_ms: u64,
    /// Send a Heartbeat after this many ms without writing anything.
    #[arg(long, default_value_t = spec::DEFAULT_HEARTBEAT.as_millis() as u64)]
    heartbeat_ms: u64,
    /// Close a connection silent for this many heartbeat intervals (its requests are cancelled).
    #[arg(long, default_value_t = spec::DEFAULT_HEARTBEAT_MISSES)]
    heartbeat_misses: u32,
    /// ctx: connections one source IP may hold (unproven ones give way to newcomers).
    #[arg(long, default_value_t = spec::DEFAULT_MAX_CONNS_PER_IP)]
    max_conns_per_ip: usize,
    /// ctx: KV blocks one source IP's prepared requests may hold (default: half of --blocks).
    #[arg(long)]
    max_blocks_per_ip: Option<u32>,
}

impl LimitArgs {
    fn limits(&self) -> Result<NodeLimits> {
        let l = NodeLimits {
            first_frame: Duration::from_millis(self.first_frame_ms),
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            heartbeat_misses: self.heartbeat_misses,
            max_conns_per_ip: self.max_conns_per_ip,
            max_blocks_per_ip: self.max_blocks_per_ip,
        };
        l.validate().context("invalid limit flags")?;
        Ok(l)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    /// Host memory, bytes over the TCP connection.
    Host,
    /// A GPU pool; the gen maps the ctx's pool with CUDA IPC and pulls over NVLink.
    Cuda,
    /// Host memory; the gen READs the ctx's pool with NIXL over UCX (feature `nixl`).
    Nixl,
    /// GPU memory on `--device`, registered with NIXL as VRAM; the gen READs the ctx's pool
    /// with NIXL over UCX's CUDA transports (features `cuda,nixl`). A config file's `nixl`
    /// means host memory: the pool's place is a flag of this process, not of the config.
    NixlCuda,
}

#[derive(Args)]
struct Load {
    #[arg(long, default_value_t = 100)]
    requests: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[arg(long, default_value_t = 1)]
    min_blocks: u32,
    #[arg(long, default_value_t = 16)]
    max_blocks: u32,
    /// Seed of block counts and request bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skip the byte-for-byte check of received blocks.
    #[arg(long)]
    no_verify: bool,
    /// No progress line on stderr.
    #[arg(long)]
    quiet: bool,
    /// Progress period in ms (default: 200 on a terminal, 1000 otherwise).
    #[arg(long)]
    progress_ms: Option<u64>,
}

impl Role {
    /// Threads of the process's runtime: `--threads`, else this role's default (see
    /// `--threads`). `bench` only waits on this runtime: its sides have their own.
    fn threads(&self) -> usize {
        match self {
            Role::Ctx { common, .. } => common.ctx_threads(),
            Role::Gen { common, .. } | Role::Bench { common, .. } => common.gen_threads(),
        }
    }
}

impl Common {
    /// A ctx's runtime threads: `--threads`, else 2 where there are 4 cores or more.
    fn ctx_threads(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.threads.unwrap_or(if cores >= 4 { 2 } else { 1 })
    }

    /// A gen's runtime threads: `--threads`, else 1.
    fn gen_threads(&self) -> usize {
        self.threads.unwrap_or(1)
    }

    fn spec(&self) -> Result<NodeSpec> {
        let mut config = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config {}", p.display()))?;
                TransceiverConfig::from_toml_str(&text)
                    .with_context(|| format!("parsing config {}", p.display()))?
            }
            None => TransceiverConfig::default(),
        };
        if self.blocks == 0 || self.blocks > MAX_POOL_BLOCKS {
            bail!("--blocks must be in 1..={MAX_POOL_BLOCKS}");
        }
        if self.tp == 0 || self.tp as usize > MAX_LOCAL_RANKS {
            bail!("--tp must be in 1..={MAX_LOCAL_RANKS}");
        }
        let layout = sharded(
            self.layers,
            self.kv_heads,
            self.head_dim,
            self.tokens_per_block,
            self.dtype_bytes,
            self.tp,
        );
        layout.validate().context("invalid layout flags")?;
        if let Some(b) = self.backend {
            config.backend = match b {
                BackendArg::Host => config::Backend::Host,
                BackendArg::Cuda => config::Backend::Cuda,
                BackendArg::Nixl | BackendArg::NixlCuda => config::Backend::Nixl,
            };
        }
        Ok(NodeSpec {
            layout,
            pool_blocks: self.blocks,
            config,
            limits: self.limits.limits()?,
        })
    }
}

/// The backend `spec.config.backend` names, on `--device`.
fn backend(spec: &NodeSpec, common: &Common) -> Result<BackendSpec> {
    match spec.config.backend {
        config::Backend::Host => Ok(BackendSpec::Host),
        config::Backend::Cuda => cuda_backend(common.device),
        config::Backend::Nixl => {
            let vram = matches!(common.backend, Some(BackendArg::NixlCuda));
            nixl_backend(vram.then_some(common.device))
        }
    }
}

/// A device without feature `cuda` is refused when the pool is made (`PoolError::NoCuda`).
#[cfg(feature = "nixl")]
fn nixl_backend(device: Option<usize>) -> Result<BackendSpec> {
    Ok(BackendSpec::Nixl { device })
}

#[cfg(not(feature = "nixl"))]
fn nixl_backend(_device: Option<usize>) -> Result<BackendSpec> {
    bail!("the NIXL backend is not in this build: rebuild with `--features nixl` (cargo build -p kvferry-backends --features nixl; needs .ci/install-nixl)")
}

#[cfg(feature = "cuda")]
fn cuda_backend(device: usize) -> Result<BackendSpec> {
    Ok(BackendSpec::Cuda { device })
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend(_device: usize) -> Result<BackendSpec> {
    bail!("the CUDA backend is not in this build: rebuild with `--features cuda` (cargo build -p kvferry-backends --features cuda)")
}

/// Prints a machine-readable line on stdout at once (tests wait for it).
fn announce(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Serves the instance's metrics (sums over its ranks).
async fn start_metrics(addr: Option<SocketAddr>, inst: &Instance) -> Result<()> {
    if let Some(addr) = addr {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics on {addr}"))?;
        announce(&format!("metrics {}", l.local_addr()?));
        tokio::spawn(metrics::serve(l, inst.metrics.clone()));
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let rt = runtime(cli.role.threads()).context("starting the tokio runtime")?;
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.role {
        Role::Ctx { listen, common } => run_ctx(listen, common).await,
        Role::Gen { peer, load, common } => run_gen(peer, load, common).await,
        Role::Bench {
            requests,
            blocks_per_request,
            concurrency,
            rounds,
            verify,
            gens,
            common,
        } => {
            let o = (requests, blocks_per_request, concurrency, rounds, verify);
            run_bench(o, usize::from(gens), common).await
        }
    }
}

/// One listener per rank: rank r on `listen`'s port + r, or a free port each for port 0.
async fn bind_ranks(listen: SocketAddr, ranks: u32) -> Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for r in 0..ranks {
        let mut addr = listen;
        if listen.port() != 0 {
            let port = u16::try_from(u32::from(listen.port()) + r)
                .with_context(|| format!("rank {r}'s port past 65535"))?;
            addr.set_port(port);
        }
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr} (rank {r})"))?;
        out.push(l);
    }
    Ok(out)
}

async fn run_ctx(listen: SocketAddr, common: Common) -> Result<()> {
    let spec = common.spec()?;
    let listeners = bind_ranks(listen, spec.layout.world_size()).await?;
    let side = kvferry_core::transceiver::Side::Context;
    let inst = Instance::uniform(spec::CTX_INSTANCE, side, &spec, backend(&spec, &common)?)
        .context("building the ctx instance")?;
    start_metrics(common.metrics, &inst).await?;
    let addrs = (listeners.iter())
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<std::io::Result<Vec<String>>>()?;
    announce(&format!("listening {}", addrs.join(",")));
    ctx::run_with(listeners, inst).await.context("ctx node")
}

async fn run_gen(peers: Vec<SocketAddr>, load: Load, common: Common) -> Result<()> {
    let spec = common.spec()?;
    if load.min_blocks == 0 || load.min_blocks > load.max_blocks {
        bail!("need 1 <= --min-blocks <= --max-blocks");
    }
    if load.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if peers.len() > MAX_LOCAL_RANKS {
        bail!(
            "--peer names {} ctx ranks, at most {MAX_LOCAL_RANKS}",
            peers.len()
        );
    }
    let side = kvferry_core::transceiver::Side::Generation;
    let inst = Instance::uniform(
        spec::GEN_INSTANCE_BASE,
        side,
        &spec,
        backend(&spec, &common)?,
    )
    .context("building the gen instance")?;
    start_metrics(common.metrics, &inst).await?;
    let opts = gen::LoadOptions {
        peers,
        requests: load.requests,
        concurrency: load.concurrency,
        min_blocks: load.min_blocks,
        max_blocks: load.max_blocks,
        seed: load.seed,
        verify: !load.no_verify,
        progress: progress_period(&load),
    };
    let s = gen::run_with(inst, opts).await.context("gen node")?;
    print_summary(&s)?;
    if let Some(cause) = &s.gave_up {
        eprintln!("kvferry-node gen: gave the ctx up: {cause}");
    }
    if s.failed > 0 || s.skipped > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// `bench` with (requests, blocks per request, concurrency, rounds, verify) and `gens` loads.
async fn run_bench(
    (requests, blocks_per_request, concurrency, rounds, verify): (u64, u32, usize, usize, bool),
    gens: usize,
    common: Common,
) -> Result<()> {
    let spec = common.spec()?;
    if spec.config.backend == config::Backend::Cuda {
        bail!("bench runs the host and NIXL backends (kvferry-bench measures the CUDA paths)");
    }
    if common.tp != 1 {
        bail!("bench runs one rank a side, against a raw copy of the same bytes: leave out --tp (ctx and gen take it)");
    }
    // All gens dial from 127.0.0.1, so they share one host's block share of the ctx's pool:
    // past it the ctx answers busy and the bench would measure the waiting.
    let share = spec.limits.blocks_per_ip(spec.pool_blocks);
    let want = gens as u64 * concurrency as u64 * u64::from(blocks_per_request);
    if want > u64::from(share) {
        bail!(
            "{gens} gen(s) x {concurrency} in flight x {blocks_per_request} blocks = {want} blocks, over the \
             {share} one host may hold of the ctx's {} (raise --blocks or --max-blocks-per-ip)",
            spec.pool_blocks
        );
    }
    let backend = backend(&spec, &common)?;
    let o = BenchOptions {
        requests,
        blocks_per_request,
        concurrency,
        rounds: rounds.max(1),
        verify,
        ctx_threads: common.ctx_threads(),
        gens,
        gen_threads: common.gen_threads(),
        backend,
    };
    let rows = bench::run(&spec, &o).await.context("bench")?;
    print_bench(&spec, &o, &rows);
    Ok(())
}

fn progress_period(load: &Load) -> Option<Duration> {
    if load.quiet {
        return None;
    }
    let default_ms = if std::io::stderr().is_terminal() {
        200
    } else {
        1000
    };
    Some(Duration::from_millis(
        load.progress_ms.unwrap_or(default_ms),
    ))
}

fn print_summary(s: &gen::Summary) -> Result<()> {
    let latency = match (s.p50_ms, s.p99_ms) {
        (Some(p50), Some(p99)) => format!("latency p50 {p50:.2} ms p99 {p99:.2} ms"),
        _ => "no request completed".to_string(),
    };
    println!(
        "requests {} done {} failed {} skipped {} | {:.1} MiB in {:.2} s = {:.1} MiB/s | {latency}",
        s.requests,
        s.done,
        s.failed,
        s.skipped,
        s.bytes as f64 / (1 << 20) as f64,
        s.seconds,
        s.throughput_mib_s,
    );
    for (cause, n) in &s.errors {
        println!("  failed {n}: {cause}");
    }
    println!(
        "staging free {}/{} (poisoned {}) | blocks free {}/{} | reconnects {}",
        s.staging_free,
        s.staging_slots,
        s.staging_poisoned,
        s.blocks_free,
        s.blocks_total,
        s.reconnects
    );
    announce(&format!("summary {}", serde_json::to_string(s)?));
    Ok(())
}

/// With a backend other than host: the host node measured in the same rounds, beside it.
fn print_host_beside(rows: &[bench::Round]) {
    if rows.iter().all(|r| r.host_mib_s.is_none()) {
        return;
    }
    println!(
        "round  node MiB/s  host node MiB/s  NIXL alone MiB/s  raw MiB/s  node/raw  host/raw  NIXL alone/raw"
    );
    for (i, r) in rows.iter().enumerate() {
        let host = r.host_mib_s.unwrap_or(f64::NAN);
        let nixl = r.nixl_mib_s.unwrap_or(f64::NAN);
        let raw = r.raw_mib_s.max(1e-9);
        println!(
            "{:>5}  {:>10.1}  {:>15.1}  {:>16.1}  {:>9.1}  {:>8.2}  {:>8.2}  {:>14.2}",
            i + 1,
            r.node_mib_s,
            host,
            nixl,
            r.raw_mib_s,
            r.node_mib_s / raw,
            host / raw,
            nixl / raw
        );
    }
}

fn print_bench(spec: &NodeSpec, o: &BenchOptions, rows: &[bench::Round]) {
    println!("machine {}", bench::machine());
    println!(
        "block {} KiB, {} gen(s) x {} requests x {} blocks, concurrency {} each, verify {}, pool {} blocks, runtime threads: ctx {}, gen {}",
        spec.layout.block_bytes() >> 10,
        o.gens,
        o.requests,
        o.blocks_per_request,
        o.concurrency,
        o.verify,
        spec.pool_blocks,
        o.ctx_threads,
        o.gen_threads
    );
    println!("node path: {:?}", o.backend);
    print_host_beside(rows);
    println!("round  node MiB/s  raw MiB/s  ratio  raw pool MiB/s  ratio  p50 ms  p99 ms  failed  cpu s/GiB node  raw  requests/s  cpu µs/req  fixed µs/req");
    for (i, r) in rows.iter().enumerate() {
        println!(
            "{:>5}  {:>10.1}  {:>9.1}  {:>5.2}  {:>14.1}  {:>5.2}  {:>6.2}  {:>6.2}  {:>6}  {:>14.2}  {:>4.2}  {:>10.0}  {:>10.1}  {:>12.1}",
            i + 1,
            r.node_mib_s,
            r.raw_mib_s,
            r.node_mib_s / r.raw_mib_s.max(1e-9),
            r.raw_pool_mib_s,
            r.node_mib_s / r.raw_pool_mib_s.max(1e-9),
            r.p50_ms,
            r.p99_ms,
            r.failed,
            r.node_cpu_s_per_gib,
            r.raw_cpu_s_per_gib,
            r.requests_s,
            r.node_cpu_us_per_request,
            r.fixed_us_per_request,
        );
    }
    let med = |f: fn(&bench::Round) -> f64| bench::median(rows.iter().map(f).collect());
    let (node, raw, raw_pool) = (
        med(|r| r.node_mib_s),
        med(|r| r.raw_mib_s),
        med(|r| r.raw_pool_mib_s),
    );
    println!(
        "median node {:.1} MiB/s, raw {:.1} MiB/s, ratio {:.2}, raw pool {:.1} MiB/s, ratio {:.2}, p50 {:.2} ms, p99 {:.2} ms, cpu s/GiB node {:.2} raw {:.2}",
        node,
        raw,
        node / raw.max(1e-9),
        raw_pool,
        node / raw_pool.max(1e-9),
        med(|r| r.p50_ms),
        med(|r| r.p99_ms),
        med(|r| r.node_cpu_s_per_gib),
        med(|r| r.raw_cpu_s_per_gib),
    );
    let done: Vec<String> = rows.iter().map(|r| r.done.to_string()).collect();
    println!(
        "requests done per round: {} of {}",
        done.join(", "),
        o.requests * o.gens as u64
    );
    println!(
        "median {:.0} requests/s, cpu {:.1} µs/request, fixed {:.1} µs/request (beyond the raw copy's cpu for the same bytes)",
        med(|r| r.requests_s),
        med(|r| r.node_cpu_us_per_request),
        med(|r| r.fixed_us_per_request),
    );
}
