//! Loopback benchmark: the node path (ctx + gen in this process, TCP on 127.0.0.1) against a
//! plain TCP copy of the same bytes, measured in the same run, round after round. With another
//! backend (`--backend nixl`) each round also runs the host node, so all three are side by side.
//!
//! Both are set up alike: each side (the ctx and every gen; raw sender and raw receiver) runs on
//! its own OS thread with its own runtime, as node processes would, and the raw copy reads and
//! writes `DATA_CHUNK` at a time, the node's frame size. With several gens (`gens`) the node
//! moves their requests over as many connections; the raw copy stays one socket, so its CPU per
//! byte is what the fixed cost is measured beyond.

use super::backend::BackendSpec;
use super::instance::Instance;
use super::spec::{NodeSpec, CTX_INSTANCE, GEN_INSTANCE_BASE};
use super::{cpu, ctx, gen, NodeError};
use crate::host::kv::prefaulted;
use crate::host::DATA_CHUNK;
use kvferry_core::transceiver::Side;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub requests: u64,
    pub blocks_per_request: u32,
    pub concurrency: usize,
    pub rounds: usize,
    pub verify: bool,
    /// Runtime threads of the ctx side and of the raw copy's sender (see `node::runtime`).
    pub ctx_threads: usize,
    /// Gen instances against the one ctx, each on its own thread and runtime.
    pub gens: usize,
    /// Runtime threads of each gen side and of the raw copy's receiver.
    pub gen_threads: usize,
    /// The node path measured (the host node is measured beside any other).
    pub backend: BackendSpec,
}

#[derive(Clone, Debug)]
pub struct Round {
    pub node_mib_s: f64,
    /// The host node in the same round, when `node_mib_s` is another backend's.
    pub host_mib_s: Option<f64>,
    /// With `--backend nixl`: NIXL's own READs of the same bytes, request-sized, without the
    /// node (`nixl::probe`): the ceiling of the node's NIXL path.
    pub nixl_mib_s: Option<f64>,
    /// The plain raw copy: one buffer per side, always in cache. The target is against this.
    pub raw_mib_s: f64,
    /// A raw copy that cycles through KV-pool-sized buffers, touching as much memory as the
    /// node: what is left between it and the node is the node's own cost.
    pub raw_pool_mib_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Requests completed, over all gens.
    pub done: u64,
    /// Requests failed, over all gens.
    pub failed: u64,
    /// CPU seconds per GiB of each path (this process: both ends of each).
    pub node_cpu_s_per_gib: f64,
    pub raw_cpu_s_per_gib: f64,
    /// Requests completed per second of the node round.
    pub requests_s: f64,
    /// CPU µs per request of the node path, both ends.
    pub node_cpu_us_per_request: f64,
    /// The fixed cost: CPU µs per request beyond what the raw copy spends on the same bytes
    /// (control frames, driver steps, wakeups, allocations).
    pub fixed_us_per_request: f64,
}

/// CPU µs that `s_per_gib` CPU seconds per GiB spend on `bytes` bytes.
fn cpu_us(s_per_gib: f64, bytes: f64) -> f64 {
    s_per_gib * bytes / f64::from(1u32 << 30) * 1e6
}

fn io(context: &str) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |source| NodeError::Io {
        context: context.to_string(),
        source,
    }
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64().max(1e-9)
}

/// What the raw copy measured.
#[derive(Clone, Copy, Debug)]
pub struct RawCopy {
    pub mib_s: f64,
    pub cpu_s_per_gib: f64,
}

/// Runs `side` on a new OS thread, on its own runtime of `threads` threads; its result comes
/// back through the returned receiver (an error if it panicked).
fn spawn_side<T, F>(
    threads: usize,
    side: impl FnOnce() -> F + Send + 'static,
) -> oneshot::Receiver<Result<T, NodeError>>
where
    T: Send + 'static,
    F: Future<Output = Result<T, NodeError>>,
{
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let result = match super::runtime(threads) {
            Ok(rt) => rt.block_on(side()),
            Err(e) => Err(io("bench side runtime")(e)),
        };
        let _ = tx.send(result);
    });
    rx
}

/// Waits for a side spawned by `spawn_side`.
async fn joined<T>(
    rx: oneshot::Receiver<Result<T, NodeError>>,
    what: &str,
) -> Result<T, NodeError> {
    rx.await
        .map_err(|_| io(what)(std::io::Error::other("the side's thread panicked")))?
}

/// Streams `bytes` over one loopback socket in `DATA_CHUNK` writes, sender and receiver each
/// on its own thread and runtime (`threads`: the sender's, as the ctx's; the receiver's, as
/// the gen's); measured from the sender's start to the receiver's last byte. Each side
/// cycles through a buffer of `span` bytes: `DATA_CHUNK` is the plain copy (one buffer, always
/// in cache); the KV pool's size touches as much memory as the node does.
pub async fn raw_copy(
    bytes: u64,
    (send_threads, recv_threads): (usize, usize),
    span: usize,
) -> Result<RawCopy, NodeError> {
    let span = span.max(DATA_CHUNK);
    let (addr_tx, addr_rx) = oneshot::channel();
    let receiver = spawn_side(recv_threads, move || async move {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(io("bind raw"))?;
        let mut buf = prefaulted(span);
        let _ = addr_tx.send(listener.local_addr().map_err(io("raw addr"))?);
        let (mut s, _) = listener.accept().await.map_err(io("raw accept"))?;
        let mut got = 0u64;
        let mut at = 0;
        while got < bytes {
            let end = (at + DATA_CHUNK).min(span);
            let n = s.read(&mut buf[at..end]).await.map_err(io("raw read"))?;
            if n == 0 {
                return Err(io("raw read")(std::io::Error::other(
                    "raw sender hung up early",
                )));
            }
            got += n as u64;
            at = (at + n) % span;
        }
        Ok(Instant::now())
    });
    let addr = addr_rx
        .await
        .map_err(|_| io("raw receiver")(std::io::Error::other("no address")))?;
    let source = prefaulted(span);
    let start = Instant::now();
    let cpu_start = cpu::process_cpu();
    let sender = spawn_side(send_threads, move || async move {
        let mut s = TcpStream::connect(addr).await.map_err(io("raw connect"))?;
        let mut sent = 0u64;
        let mut at = 0;
        while sent < bytes {
            let n = (bytes - sent)
                .min(DATA_CHUNK as u64)
                .min((span - at) as u64) as usize;
            s.write_all(&source[at..at + n])
                .await
                .map_err(io("raw write"))?;
            sent += n as u64;
            at = (at + n) % span;
        }
        Ok(())
    });
    joined(sender, "raw sender").await?;
    let end = joined(receiver, "raw receiver").await?;
    let cpu_time = cpu::process_cpu() - cpu_start;
    Ok(RawCopy {
        mib_s: mib_s(bytes, end - start),
        cpu_s_per_gib: cpu::s_per_gib(cpu_time, bytes).unwrap_or(f64::NAN),
    })
}

fn instance(spec: &NodeSpec, side: Side, backend: BackendSpec) -> Result<Instance, NodeError> {
    let instance = match side {
        Side::Context => CTX_INSTANCE,
        Side::Generation => GEN_INSTANCE_BASE,
    };
    Instance::uniform(instance, side, spec, backend)
        .map_err(|e| io("backend")(std::io::Error::other(e.to_string())))
}

/// What the gen loads of one node round did together.
#[derive(Clone, Debug)]
pub struct Loads {
    pub done: u64,
    pub failed: u64,
    pub bytes: u64,
    /// The longest load's time: the loads start together.
    pub seconds: f64,
    /// CPU seconds of this process (ctx and gens) per GiB moved, over the longest load's
    /// window, which holds the others; NaN when nothing moved.
    pub cpu_s_per_gib: f64,
    /// With one load its p50 and p99; with several, the loads' median p50 and largest p99
    /// (not percentiles of all requests together). NaN when none completed a request.
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Loads {
    fn merge(all: &[gen::Summary]) -> Loads {
        let bytes: u64 = all.iter().map(|s| s.bytes).sum();
        let cpu = all.iter().map(|s| s.cpu_seconds).fold(0.0, f64::max);
        let p50s: Vec<f64> = all.iter().filter_map(|s| s.p50_ms).collect();
        let p99 = all.iter().filter_map(|s| s.p99_ms).reduce(f64::max);
        Loads {
            done: all.iter().map(|s| s.done).sum(),
            failed: all.iter().map(|s| s.failed).sum(),
            bytes,
            seconds: all.iter().map(|s| s.seconds).fold(0.0, f64::max),
            cpu_s_per_gib: cpu::s_per_gib(Duration::from_secs_f64(cpu), bytes).unwrap_or(f64::NAN),
            p50_ms: if p50s.is_empty() {
                f64::NAN
            } else {
                median(p50s)
            },
            p99_ms: p99.unwrap_or(f64::NAN),
        }
    }

    pub fn throughput_mib_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.seconds.max(1e-9)
    }
}

/// One node round on `backend`: a ctx node and `o.gens` gen loads against it, each on its own
/// thread and runtime as separate processes would be, the loads released together.
pub async fn node_round(
    spec: &NodeSpec,
    o: &BenchOptions,
    backend: BackendSpec,
) -> Result<Loads, NodeError> {
    let (addr_tx, addr_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let ctx_spec = spec.clone();
    let ctx_side = spawn_side(o.ctx_threads, move || async move {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(io("bind ctx"))?;
        // Built before the loads start: each gen's clock starts after its own rank is built,
        // so the ctx's (its KV pool above all) is kept out of the measurement the same way.
        let inst = instance(&ctx_spec, Side::Context, backend)?;
        let _ = addr_tx.send(listener.local_addr().map_err(io("ctx addr"))?);
        tokio::select! {
            r = ctx::run_with(vec![listener], inst) => r,
            _ = stop_rx => Ok(()),
        }
        // The runtime goes with the thread: listener, connections and KV pool with it.
    });
    let Ok(peer) = addr_rx.await else {
        // The ctx side ended before it listened: its own error says why (a NIXL backend
        // that would not start, say), not the missing address.
        joined(ctx_side, "ctx side").await?;
        return Err(io("ctx side")(std::io::Error::other(
            "ended before listening",
        )));
    };
    let loads = gen_loads(spec, o, backend, peer).await;
    // Wait for the ctx to be gone so the next measurement does not share the CPU with its
    // teardown, and no round leaks into the next.
    let _ = stop_tx.send(());
    joined(ctx_side, "ctx side").await?;
    Ok(Loads::merge(&loads?))
}

/// Runs `o.gens` gen loads against `peer`, released together once every instance is built.
/// A side that cannot build (or whose thread or runtime fails) aborts the others instead of
/// leaving them waiting: each reports ready, and only then do all get the go.
async fn gen_loads(
    spec: &NodeSpec,
    o: &BenchOptions,
    backend: BackendSpec,
    peer: SocketAddr,
) -> Result<Vec<gen::Summary>, NodeError> {
    let (go_tx, go_rx) = watch::channel(false);
    let (mut ready, mut sides) = (Vec::new(), Vec::new());
    for i in 0..o.gens {
        let (spec, mut go) = (spec.clone(), go_rx.clone());
        let (ready_tx, ready_rx) = oneshot::channel();
        let load = gen::LoadOptions {
            peers: vec![peer],
            requests: o.requests,
            concurrency: o.concurrency,
            min_blocks: o.blocks_per_request,
            max_blocks: o.blocks_per_request,
            seed: 1 + i as u64,
            verify: o.verify,
            progress: None,
        };
        sides.push(spawn_side(o.gen_threads, move || async move {
            let inst = instance(&spec, Side::Generation, backend)?;
            let _ = ready_tx.send(());
            if go.wait_for(|&g| g).await.is_err() {
                return Ok(None); // another side failed: its error is the one to report
            }
            gen::run_with(inst, load).await.map(Some)
        }));
        ready.push(ready_rx);
    }
    let mut all_ready = true;
    for r in ready {
        all_ready &= r.await.is_ok();
    }
    if all_ready {
        let _ = go_tx.send(true);
    }
    drop(go_tx);
    let mut out = Vec::with_capacity(sides.len());
    let mut first_err = None;
    for side in sides {
        match joined(side, "gen side").await {
            Ok(Some(s)) => out.push(s),
            Ok(None) => {}
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None if out.len() < o.gens => Err(io("gen side")(std::io::Error::other(
            "a gen side ended before it was ready",
        ))),
        None => Ok(out),
    }
}

pub async fn run(spec: &NodeSpec, o: &BenchOptions) -> Result<Vec<Round>, NodeError> {
    let mut rounds = Vec::with_capacity(o.rounds);
    for _ in 0..o.rounds {
        let s = node_round(spec, o, o.backend).await?;
        let host = match o.backend {
            BackendSpec::Host => None,
            #[allow(unreachable_patterns)]
            _ => Some(
                node_round(spec, o, BackendSpec::Host)
                    .await?
                    .throughput_mib_s(),
            ),
        };
        let pool_bytes = spec.layout.block_bytes() as usize * spec.pool_blocks as usize;
        let nixl = nixl_probe(spec, o, s.bytes, pool_bytes).await?;
        let threads = (o.ctx_threads, o.gen_threads);
        let raw = raw_copy(s.bytes.max(1), threads, DATA_CHUNK).await?;
        let raw_pool = raw_copy(s.bytes.max(1), threads, pool_bytes).await?;
        let node_cpu_s_per_gib = s.cpu_s_per_gib;
        // Per request: the bytes one request moved, at each path's CPU cost per byte.
        let per_request = s.bytes as f64 / s.done.max(1) as f64;
        let node_us = cpu_us(node_cpu_s_per_gib, per_request);
        rounds.push(Round {
            node_mib_s: s.throughput_mib_s(),
            host_mib_s: host,
            nixl_mib_s: nixl,
            raw_mib_s: raw.mib_s,
            raw_pool_mib_s: raw_pool.mib_s,
            // A round that moved nothing shows NaN, not a made-up figure.
            node_cpu_s_per_gib,
            raw_cpu_s_per_gib: raw.cpu_s_per_gib,
            requests_s: s.done as f64 / s.seconds.max(1e-9),
            node_cpu_us_per_request: node_us,
            fixed_us_per_request: node_us - cpu_us(raw.cpu_s_per_gib, per_request),
            p50_ms: s.p50_ms,
            p99_ms: s.p99_ms,
            done: s.done,
            failed: s.failed,
        });
    }
    Ok(rounds)
}

/// NIXL's READs alone (`nixl::probe`), one per request of the node round, as many at once.
#[cfg_attr(not(feature = "nixl"), allow(unused_variables))]
async fn nixl_probe(
    spec: &NodeSpec,
    o: &BenchOptions,
    bytes: u64,
    pool_bytes: usize,
) -> Result<Option<f64>, NodeError> {
    #[cfg(feature = "nixl")]
    // The probe's pools are host memory: beside a node round over host memory only.
    if o.backend == (BackendSpec::Nixl { device: None }) {
        let shape = crate::nixl::probe::ProbeShape {
            bytes: bytes.max(1),
            read_bytes: spec.layout.block_bytes() * u64::from(o.blocks_per_request),
            // As many READs in flight as the node's gens had requests.
            concurrency: o.concurrency * o.gens,
            pool_bytes: pool_bytes as u64,
        };
        let probe = tokio::task::spawn_blocking(move || crate::nixl::probe::read_mib_s(shape));
        let mib_s = (probe.await)
            .map_err(|e| io("nixl probe")(std::io::Error::other(e.to_string())))?
            .map_err(|e| io("nixl probe")(std::io::Error::other(e.to_string())))?;
        return Ok(Some(mib_s));
    }
    Ok(None)
}

/// What the bench ran on, for its header: CPU model, cores, kernel.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    format!("{cpu}, {cores} cores, Linux {kernel}")
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
