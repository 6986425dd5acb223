//! kvferry-bench: NVLink copy methods for KV fragments, and the two-process CUDA IPC path.
//!
//! `kvferry-bench` (no subcommand = `run`) measures, on one pair of GPUs and in one run:
//! the contiguous 1 GiB `cuMemcpyPeerAsync` ceiling; per-fragment `cuMemcpyPeerAsync`, one
//! `cuMemcpyBatchAsync` and the gather kernel (push and pull) for fragments of every other block;
//! then the production shape: context ranks as child processes exporting their KV pools through
//! CUDA IPC, the generation rank mapping them and pulling through `CudaAgent`. Every measured
//! result is checked byte for byte against a host reference (random source, poisoned
//! destination). With `--bidir CASE` it also measures both directions at once: two contiguous
//! peer copies together (the bidirectional ceiling) beside one two-process CASE each way.

mod bidir;
mod two_process;

use bidir::bidir;
use two_process::two_process;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use cudarc::driver::sys;
use kvferry_backends::cuda::kernel::{encode_pieces, split_into_pieces, PIECE_BYTES};
use kvferry_backends::cuda::verify::{compare, fill_pattern, POISON};
use kvferry_backends::cuda::{
    compile_ptx, CopyKernel, CopyPiece, DeviceBuffer, Event, Gpu, KernelConfig, PinnedBuffer,
    Stream,
};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(about = "NVLink KV-transfer benchmark (needs 2 GPUs)")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Internal: a context rank that exports its KV pool over CUDA IPC (spawned by `run`).
    #[command(hide = true)]
    CtxChild(ChildArgs),
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Device of the context (source) side.
    #[arg(long, default_value_t = 0)]
    src_device: usize,
    /// Device of the generation (destination) side.
    #[arg(long, default_value_t = 1)]
    dst_device: usize,
    /// Timed iterations per measurement (after one verified warm-up).
    #[arg(long, default_value_t = 7)]
    iters: usize,
    /// Fragment sizes in KiB for the fragmented copies.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256,1024")]
    sizes_kib: Vec<u64>,
    /// Buffer size in MiB of the fragmented copies (half of it is copied: every other block).
    #[arg(long, default_value_t = 1024)]
    buffer_mib: u64,
    /// Two-process cases as ctx_tp:gen_tp.
    #[arg(long, value_delimiter = ',', default_value = "1:1,2:1,4:1,1:2")]
    cases: Vec<String>,
    /// Tokens per request of the two-process cases, one run of every case per value: 2,048
    /// tokens are 640 MiB with the Llama-70B layout, 192 are 60 MiB (six 10 MiB blocks, the
    /// whole-block size nearest 64 MiB).
    #[arg(long, value_delimiter = ',', default_value = "2048,192")]
    tokens: Vec<u32>,
    /// Blocks in each pool (more than a request uses, so untouched blocks are checked too).
    #[arg(long, default_value_t = 80)]
    pool_blocks: u32,
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    #[arg(long)]
    skip_micro: bool,
    #[arg(long)]
    skip_two_process: bool,
    /// Also measure both directions at once with this two-process case (ctx_tp:gen_tp) each
    /// way, at the first `--tokens`, beside the bidirectional ceiling.
    #[arg(long)]
    bidir: Option<String>,
    /// Skip the kernel launch-shape sweep (use the defaults).
    #[arg(long)]
    no_sweep: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the result tables as Markdown here.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

#[derive(Args)]
struct ChildArgs {
    #[arg(long)]
    device: usize,
    #[arg(long)]
    pool_bytes: usize,
    #[arg(long)]
    seed: u64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::CtxChild(a)) => ctx_child(a),
        None => run(cli.run),
    }
}

/// Context rank: allocate and fill the pool, print its IPC export as one JSON line, hold the
/// pool until the parent closes our stdin (the mapping's lifetime contract).
fn ctx_child(a: ChildArgs) -> Result<()> {
    let gpu = Gpu::open(a.device).context("open context device")?;
    let buf = DeviceBuffer::alloc(&gpu, a.pool_bytes).context("allocate context KV pool")?;
    let mut host = vec![0u8; a.pool_bytes];
    fill_pattern(a.seed, &mut host);
    buf.write(0, &host).context("fill context KV pool")?;
    drop(host);
    let export = buf.export().context("export KV pool")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&export)?)?;
    out.flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(())
}

#[derive(Serialize, Clone)]
struct Row {
    method: String,
    fragment_kib: u64,
    fragments: usize,
    bytes: u64,
    median_ms: f64,
    gbps: f64,
    of_ceiling: f64,
    verified: bool,
    note: String,
}

#[derive(Serialize, Clone)]
struct CaseRow {
    case: String,
    ctx_processes: u32,
    gen_ranks: u32,
    fragments: usize,
    fragment_kib: String,
    bytes: u64,
    median_ms: f64,
    best_ms: f64,
    gbps: f64,
    of_ceiling: f64,
    /// The fixed cost per request: median wall time beyond a copy of its bytes at the ceiling.
    fixed_us: f64,
    verified: bool,
}

#[derive(Serialize, Default)]
struct Report {
    devices: Vec<String>,
    driver_version: i32,
    ceiling_gbps: f64,
    kernel_push: Option<String>,
    kernel_pull: Option<String>,
    sweep: Vec<(String, String, f64)>,
    micro: Vec<Row>,
    two_process: Vec<CaseRow>,
    bidir: Option<BidirReport>,
}

/// Both directions at once (`--bidir`).
#[derive(Serialize)]
struct BidirReport {
    /// Two contiguous peer copies at once, one per direction: bytes of both over wall time.
    ceiling_gbps: f64,
    /// The gather kernel alone both ways at once (pull, fragments of the first `--sizes-kib`,
    /// every other block of `--buffer-mib`), over the same ceiling: what the path can reach.
    kernel_gbps: f64,
    kernel_of_ceiling: f64,
    /// The same with the kernel on the source device (stores cross the link), for comparison:
    /// the agent pulls.
    kernel_push_gbps: f64,
    case: String,
    /// Bytes of both requests.
    bytes: u64,
    median_ms: f64,
    gbps: f64,
    of_ceiling: f64,
    /// The same requests with the generation process launching on each context's device.
    push_gbps: f64,
    push_of_ceiling: f64,
    verified: bool,
}

fn gbps(bytes: u64, ms: f64) -> f64 {
    bytes as f64 / (ms / 1e3) / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times `op` on `stream` with events, `iters` times; returns per-iteration milliseconds.
fn time_gpu(stream: &Stream, iters: usize, mut op: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    let gpu = stream.gpu().clone();
    let mut out = Vec::with_capacity(iters);
    for _ in 0..iters {
        let (a, b) = (Event::new(&gpu, true)?, Event::new(&gpu, true)?);
        a.record(stream)?;
        op()?;
        b.record(stream)?;
        b.synchronize()?;
        out.push(f64::from(a.elapsed_ms(&b)?));
    }
    Ok(out)
}

type BatchFn = unsafe extern "C" fn(
    *mut sys::CUdeviceptr,
    *mut sys::CUdeviceptr,
    *mut usize,
    usize,
    *mut sys::CUmemcpyAttributes,
    *mut usize,
    usize,
    *mut usize,
    sys::CUstream,
) -> sys::CUresult;

/// `cuMemcpyBatchAsync` with its CUDA 12.8 ABI (with `failIdx`), looked up through
/// `cuGetProcAddress` so a driver without it is reported instead of panicking in the loader.
fn batch_fn() -> Result<BatchFn, String> {
    let mut pfn: *mut std::ffi::c_void = std::ptr::null_mut();
    let mut status = sys::CUdriverProcAddressQueryResult::CU_GET_PROC_ADDRESS_SUCCESS;
    // SAFETY: out-pointers to locals, NUL-terminated symbol name.
    let r = unsafe {
        sys::cuGetProcAddress_v2(
            c"cuMemcpyBatchAsync".as_ptr(),
            &mut pfn,
            12080,
            sys::CUdriverProcAddress_flags::CU_GET_PROC_ADDRESS_DEFAULT as u64,
            &mut status,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS || pfn.is_null() {
        return Err(format!("cuGetProcAddress: {r:?} / {status:?}"));
    }
    // SAFETY: the driver returned the 12.8 ABI of this symbol, whose signature is `BatchFn`.
    Ok(unsafe { std::mem::transmute::<*mut std::ffi::c_void, BatchFn>(pfn) })
}

fn cu(r: sys::CUresult, what: &str) -> Result<()> {
    r.result().map_err(|e| anyhow!("{what}: {e}"))
}

/// Everything on one pair of devices in this process.
struct Micro {
    g0: Arc<Gpu>,
    g1: Arc<Gpu>,
    s0: Stream,
    s1: Stream,
    k0: CopyKernel,
    k1: CopyKernel,
    src: DeviceBuffer,
    dst: DeviceBuffer,
    host_src: Vec<u8>,
    /// Interior mutability so `measure` can borrow `self` shared while `op` borrows kernels.
    readback: std::cell::RefCell<Vec<u8>>,
    iters: usize,
}

impl Micro {
    /// Poisons the destination, runs `op` once on `stream`, checks the bytes, then times it.
    fn measure(
        &self,
        on_dst: bool,
        frag: Option<u64>,
        mut op: impl FnMut(&Stream) -> Result<()>,
    ) -> Result<(f64, bool)> {
        self.dst.fill_byte(POISON)?;
        let stream = if on_dst { &self.s1 } else { &self.s0 };
        op(stream)?;
        stream.synchronize()?;
        let mut back = self.readback.borrow_mut();
        self.dst.read(0, &mut back)?;
        let ok = match frag {
            None => compare(&self.host_src, &back).map_err(|m| anyhow!("{m}")),
            Some(f) => check_every_other(&self.host_src, &back, f as usize),
        };
        drop(back);
        ok.context("copied bytes differ from the host reference")?;
        let stream = if on_dst { &self.s1 } else { &self.s0 };
        let ms = median(time_gpu(stream, self.iters, || op(stream))?);
        Ok((ms, true))
    }
}

/// Fragments at every other block: [0,f) copied, [f,2f) untouched (poison), and so on.
fn check_every_other(src: &[u8], got: &[u8], f: usize) -> Result<()> {
    for (i, (s, g)) in src.chunks(2 * f).zip(got.chunks(2 * f)).enumerate() {
        let n = f.min(s.len());
        compare(&s[..n], &g[..n]).map_err(|m| anyhow!("fragment {i}: {m}"))?;
        if let Some(p) = g[n..].iter().position(|&b| b != POISON) {
            bail!("gap after fragment {i} written at +{p}");
        }
    }
    Ok(())
}

fn kernel_pieces(m: &Micro, f: u64, piece: u64) -> Vec<CopyPiece> {
    every_other_pieces((&m.src, &m.dst), f, piece)
}

/// Kernel pieces copying fragments of `f` bytes at every other block of `src` into `dst`.
fn every_other_pieces(
    (src, dst): (&DeviceBuffer, &DeviceBuffer),
    f: u64,
    piece: u64,
) -> Vec<CopyPiece> {
    let mut pieces = Vec::new();
    let n = src.len() as u64 / (2 * f);
    for i in 0..n {
        let off = 2 * i * f;
        split_into_pieces(src.ptr() + off, dst.ptr() + off, f, piece, &mut pieces);
    }
    pieces
}

/// The kernel path as the agent runs it: upload descriptors from pinned memory, one launch.
fn kernel_op<'a>(
    k: &'a CopyKernel,
    host: &'a PinnedBuffer,
    dev: &'a DeviceBuffer,
    n: usize,
    cfg: KernelConfig,
) -> impl FnMut(&Stream) -> Result<()> + 'a {
    move |s: &Stream| {
        host.upload(dev.ptr(), n * PIECE_BYTES, s)?;
        k.launch(s, dev.ptr(), n as u64, &cfg)?;
        Ok(())
    }
}

fn stage_pieces(gpu: &Arc<Gpu>, pieces: &[CopyPiece]) -> Result<(PinnedBuffer, DeviceBuffer)> {
    let len = pieces.len() * PIECE_BYTES;
    let mut host = PinnedBuffer::alloc(gpu, len)?;
    encode_pieces(pieces, host.as_mut_slice());
    let dev = DeviceBuffer::alloc(gpu, len)?;
    Ok((host, dev))
}

fn micro(a: &RunArgs, rep: &mut Report) -> Result<(KernelConfig, KernelConfig)> {
    let g0 = Gpu::open(a.src_device)?;
    let g1 = Gpu::open(a.dst_device)?;
    g0.enable_peer_access(&g1)?;
    g1.enable_peer_access(&g0)?;
    let ptx = compile_ptx(g0.compute_capability()?).context("NVRTC compile")?;
    let n = (a.buffer_mib << 20) as usize;
    let mut host_src = vec![0u8; n];
    fill_pattern(a.seed, &mut host_src);
    let src = DeviceBuffer::alloc(&g0, n)?;
    src.write(0, &host_src)?;
    let m = Micro {
        s0: Stream::new(&g0)?,
        s1: Stream::new(&g1)?,
        k0: CopyKernel::load(&g0, &ptx)?,
        k1: CopyKernel::load(&g1, &ptx)?,
        dst: DeviceBuffer::alloc(&g1, n)?,
        src,
        host_src,
        readback: std::cell::RefCell::new(vec![0u8; n]),
        iters: a.iters,
        g0,
        g1,
    };
    let (c0, c1) = (m.g0.raw_context(), m.g1.raw_context());
    let (sp, dp) = (m.src.ptr(), m.dst.ptr());
    // Ceiling: one contiguous peer copy of the whole buffer.
    let (ms, ok) = m.measure(false, None, |s| {
        // SAFETY: both buffers are n bytes on their devices; contexts retained.
        cu(
            unsafe { sys::cuMemcpyPeerAsync(dp, c1, sp, c0, n, s.raw()) },
            "cuMemcpyPeerAsync",
        )
    })?;
    let ceiling = gbps(n as u64, ms);
    rep.ceiling_gbps = ceiling;
    println!(
        "ceiling: contiguous {} MiB cuMemcpyPeerAsync {:.1} GB/s",
        a.buffer_mib, ceiling
    );
    rep.micro.push(Row {
        method: "contiguous cuMemcpyPeerAsync (ceiling)".into(),
        fragment_kib: n as u64 >> 10,
        fragments: 1,
        bytes: n as u64,
        median_ms: ms,
        gbps: ceiling,
        of_ceiling: 1.0,
        verified: ok,
        note: String::new(),
    });

    // Launch-shape sweep at the smallest fragment, push and pull; unverified here, the chosen
    // shapes are verified in the table below.
    let mut best_push = (KernelConfig::default(), 0.0);
    let mut best_pull = (KernelConfig::default(), 0.0);
    let f0 = a.sizes_kib[0] << 10;
    if !a.no_sweep {
        let pieces = kernel_pieces(&m, f0, 64 << 10);
        let bytes = (n as u64 / (2 * f0)) * f0;
        for on_dst in [false, true] {
            let (k, s, g) = if on_dst {
                (&m.k1, &m.s1, &m.g1)
            } else {
                (&m.k0, &m.s0, &m.g0)
            };
            let (host, dev) = stage_pieces(g, &pieces)?;
            for threads in [256, 512, 1024] {
                for ctas in [1, 2, 4, 8] {
                    for unroll in [4, 8] {
                        if threads * ctas > 2048 {
                            continue;
                        }
                        let cfg = KernelConfig {
                            threads,
                            ctas_per_sm: ctas,
                            unroll,
                            piece_bytes: 64 << 10,
                        };
                        let mut op = kernel_op(k, &host, &dev, pieces.len(), cfg);
                        // A shape can exceed the register file (launch refused, not sticky):
                        // note it and go on.
                        let timed = op(s).and_then(|_| time_gpu(s, a.iters, || op(s)));
                        let ms = match timed {
                            Ok(t) => median(t),
                            Err(e) => {
                                println!("sweep {cfg:?}: {e:#}");
                                continue;
                            }
                        };
                        let r = gbps(bytes, ms);
                        let dir = if on_dst { "pull" } else { "push" };
                        rep.sweep.push((dir.into(), format!("{cfg:?}"), r));
                        let best = if on_dst {
                            &mut best_pull
                        } else {
                            &mut best_push
                        };
                        if r > best.1 {
                            *best = (cfg, r);
                        }
                    }
                }
            }
        }
        println!("sweep best push {:?} {:.1} GB/s", best_push.0, best_push.1);
        println!("sweep best pull {:?} {:.1} GB/s", best_pull.0, best_pull.1);
    }
    rep.kernel_push = Some(format!("{:?}", best_push.0));
    rep.kernel_pull = Some(format!("{:?}", best_pull.0));

    let batch = batch_fn();
    for &kib in &a.sizes_kib {
        let f = kib << 10;
        let count = (n as u64 / (2 * f)) as usize;
        let bytes = count as u64 * f;
        let offs: Vec<u64> = (0..count as u64).map(|i| 2 * i * f).collect();
        let mut row = |method: &str, r: Result<(f64, bool)>, note: String| {
            let row = match r {
                Ok((ms, ok)) => Row {
                    method: method.into(),
                    fragment_kib: kib,
                    fragments: count,
                    bytes,
                    median_ms: ms,
                    gbps: gbps(bytes, ms),
                    of_ceiling: gbps(bytes, ms) / ceiling,
                    verified: ok,
                    note,
                },
                Err(e) => Row {
                    method: method.into(),
                    fragment_kib: kib,
                    fragments: count,
                    bytes,
                    median_ms: f64::NAN,
                    gbps: f64::NAN,
                    of_ceiling: f64::NAN,
                    verified: false,
                    note: format!("{e:#}"),
                },
            };
            println!(
                "{:>5} KiB  {:<34} {:>8.1} GB/s  {:>5.1}% {}",
                kib,
                row.method,
                row.gbps,
                100.0 * row.of_ceiling,
                row.note
            );
            rep.micro.push(row);
        };
        let r = m.measure(false, Some(f), |s| {
            for &o in &offs {
                // SAFETY: fragments inside both buffers.
                cu(
                    unsafe { sys::cuMemcpyPeerAsync(dp + o, c1, sp + o, c0, f as usize, s.raw()) },
                    "cuMemcpyPeerAsync",
                )?;
            }
            Ok(())
        });
        row("per-fragment cuMemcpyPeerAsync", r, String::new());
        match &batch {
            Ok(bf) => {
                let mut dsts: Vec<u64> = offs.iter().map(|o| dp + o).collect();
                let mut srcs: Vec<u64> = offs.iter().map(|o| sp + o).collect();
                let mut sizes = vec![f as usize; count];
                let loc = |id: usize| sys::CUmemLocation {
                    type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                    id: id as i32,
                };
                let mut attr = sys::CUmemcpyAttributes {
                    srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
                    srcLocHint: loc(a.src_device),
                    dstLocHint: loc(a.dst_device),
                    flags: 0,
                };
                let mut idx = 0usize;
                let mut fail = 0usize;
                let r = m.measure(false, Some(f), |s| {
                    // SAFETY: arrays of `count` entries, one attribute applying from index 0.
                    cu(
                        unsafe {
                            bf(
                                dsts.as_mut_ptr(),
                                srcs.as_mut_ptr(),
                                sizes.as_mut_ptr(),
                                count,
                                &mut attr,
                                &mut idx,
                                1,
                                &mut fail,
                                s.raw(),
                            )
                        },
                        "cuMemcpyBatchAsync",
                    )
                });
                row("one cuMemcpyBatchAsync", r, String::new());
            }
            Err(e) => row(
                "one cuMemcpyBatchAsync",
                Err(anyhow!("not available: {e}")),
                String::new(),
            ),
        }
        for (on_dst, cfg) in [(false, best_push.0), (true, best_pull.0)] {
            let g = if on_dst { m.g1.clone() } else { m.g0.clone() };
            let pieces = kernel_pieces(&m, f, cfg.piece_bytes);
            let (host, dev) = stage_pieces(&g, &pieces)?;
            let k = if on_dst { &m.k1 } else { &m.k0 };
            let mut op = kernel_op(k, &host, &dev, pieces.len(), cfg);
            let r = m.measure(on_dst, Some(f), &mut op);
            let name = if on_dst {
                "gather kernel, pull (runs on dst)"
            } else {
                "gather kernel, push (runs on src)"
            };
            row(name, r, format!("{} pieces", pieces.len()));
        }
    }
    Ok((best_push.0, best_pull.0))
}

fn markdown(rep: &Report) -> String {
    let mut s = String::new();
    s += &format!(
        "Devices: {}; driver API version {}\n\n",
        rep.devices.join(", "),
        rep.driver_version
    );
    s += &format!(
        "Ceiling (contiguous peer copy, same run): {:.1} GB/s\n\n",
        rep.ceiling_gbps
    );
    s += &format!(
        "Kernel launch shapes chosen by the sweep: push {}, pull {}\n\n",
        rep.kernel_push.as_deref().unwrap_or("-"),
        rep.kernel_pull.as_deref().unwrap_or("-")
    );
    s += "| method | fragment | fragments | GB/s | of ceiling | bytes checked | note |\n";
    s += "| --- | ---: | ---: | ---: | ---: | :---: | --- |\n";
    for r in &rep.micro {
        s += &format!(
            "| {} | {} KiB | {} | {:.1} | {:.1}% | {} | {} |\n",
            r.method,
            r.fragment_kib,
            r.fragments,
            r.gbps,
            100.0 * r.of_ceiling,
            if r.verified { "yes" } else { "no" },
            r.note
        );
    }
    if !rep.two_process.is_empty() {
        s += "\n| two-process case | fragments | fragment KiB | MiB | median ms | best ms | GB/s | of ceiling | fixed µs | bytes checked |\n";
        s += "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |\n";
        for r in &rep.two_process {
            s += &format!(
                "| {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.1} | {:.1}% | {:.1} | {} |\n",
                r.case,
                r.fragments,
                r.fragment_kib,
                r.bytes as f64 / (1 << 20) as f64,
                r.median_ms,
                r.best_ms,
                r.gbps,
                100.0 * r.of_ceiling,
                r.fixed_us,
                if r.verified { "yes" } else { "no" }
            );
        }
    }
    if let Some(b) = &rep.bidir {
        s += &format!(
            "\nBoth directions at once: bidirectional ceiling (two contiguous peer copies together) {:.1} GB/s; gather kernel alone both ways: pull {:.1} GB/s ({:.1}%), push {:.1} GB/s ({:.1}%); {} : {:.0} MiB in {:.3} ms, {:.1} GB/s, **{:.1}%** of the ceiling; the same pushing (launched on each ctx's device) {:.1} GB/s, **{:.1}%**; bytes checked: {}\n",
            b.ceiling_gbps,
            b.kernel_gbps,
            100.0 * b.kernel_of_ceiling,
            b.kernel_push_gbps,
            100.0 * b.kernel_push_gbps / b.ceiling_gbps,
            b.case,
            b.bytes as f64 / (1 << 20) as f64,
            b.median_ms,
            b.gbps,
            100.0 * b.of_ceiling,
            b.push_gbps,
            100.0 * b.push_of_ceiling,
            if b.verified { "yes" } else { "no" }
        );
    }
    s
}

fn run(a: RunArgs) -> Result<()> {
    let n = kvferry_backends::cuda::probe().context("no usable GPU")?;
    if n <= a.src_device.max(a.dst_device) {
        bail!(
            "need devices {} and {}, found {n}",
            a.src_device,
            a.dst_device
        );
    }
    let mut rep = Report::default();
    let mut v = 0;
    // SAFETY: out-pointer to a local.
    cu(
        unsafe { sys::cuDriverGetVersion(&mut v) },
        "cuDriverGetVersion",
    )?;
    rep.driver_version = v;
    for d in [a.src_device, a.dst_device] {
        rep.devices.push(format!("{d}: {}", Gpu::open(d)?.name()?));
    }
    println!("devices {:?}, driver {}", rep.devices, v);
    let (push, pull) = if a.skip_micro {
        (KernelConfig::default(), KernelConfig::default())
    } else {
        micro(&a, &mut rep)?
    };
    if rep.ceiling_gbps == 0.0 {
        bail!("the two-process path needs the ceiling: do not skip the micro bench");
    }
    let ptx = compile_ptx(Gpu::open(a.dst_device)?.compute_capability()?)?;
    if !a.skip_two_process {
        for &tokens in &a.tokens {
            for case in &a.cases {
                let row = two_process(&a, (case, tokens), pull, rep.ceiling_gbps, &ptx)
                    .with_context(|| format!("two-process case {case}, {tokens} tokens"))?;
                rep.two_process.push(row);
            }
        }
    }
    if let Some(case) = &a.bidir {
        let tokens = a.tokens[0];
        let r = bidir(&a, (case, tokens), (push, pull), &ptx)
            .with_context(|| format!("both directions, case {case}, {tokens} tokens"))?;
        rep.bidir = Some(r);
    }
    let md = markdown(&rep);
    println!("\n{md}");
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&rep)?)?;
    }
    if let Some(p) = &a.markdown {
        std::fs::write(p, &md)?;
    }
    Ok(())
}
