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
mod floor;
mod micro;
mod two_process;

use bidir::bidir;
use micro::micro;
use two_process::two_process;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use cudarc::driver::sys;
use kvferry_backends::cuda::verify::fill_pattern;
use kvferry_backends::cuda::{compile_ptx, CudaAgentConfig, DeviceBuffer, Gpu, KernelConfig};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;

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
    #[arg(long, default_value_t = 7, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000))]
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
    /// Launch shape of the two-process rows as THREADSxCTAS_PER_SMxUNROLL (e.g. 512x4x4), to
    /// compare shapes on the production path (default: the production agent's).
    #[arg(long, value_parser = parse_shape)]
    two_process_kernel: Option<KernelConfig>,
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

/// `THREADSxCTAS_PER_SMxUNROLL`, on the default's piece size, validated.
fn parse_shape(s: &str) -> Result<KernelConfig, String> {
    let n: Vec<u32> = (s.split('x').map(str::parse))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{s:?}: {e}"))?;
    let [threads, ctas_per_sm, unroll] = n[..] else {
        return Err(format!("{s:?}: want THREADSxCTAS_PER_SMxUNROLL"));
    };
    let c = KernelConfig {
        threads,
        ctas_per_sm,
        unroll,
        ..KernelConfig::default()
    };
    c.validate().map_err(|e| e.to_string())?;
    Ok(c)
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
    /// Median host time from the first submit to the last one's return. The copy starts
    /// with the first launch, so this overlaps it and can exceed `fixed_us` (several ranks
    /// submitted one after another).
    submit_us: f64,
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
    /// The fixed cost's floor: a 512-byte request through the agent (`floor.rs`).
    floor: Option<floor::Floor>,
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

fn cu(r: sys::CUresult, what: &str) -> Result<()> {
    r.result().map_err(|e| anyhow!("{what}: {e}"))
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
        "Kernel launch shapes chosen by the sweep (the micro rows; the two-process rows run the \
         production agent's default shape): push {}, pull {}\n\n",
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
    if let Some(f) = &rep.floor {
        s += &format!(
            "\nFloor of the fixed cost (a 512-byte request through the agent, submit to completion seen): {:.1} µs, of which {:.1} µs inside submit\n",
            f.total_us, f.submit_us
        );
    }
    s += &two_process_table(&rep.two_process);
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

/// The two-process rows as a markdown table (nothing when there are none).
fn two_process_table(rows: &[CaseRow]) -> String {
    let mut s = String::new();
    if rows.is_empty() {
        return s;
    }
    s += "\n| two-process case | fragments | fragment KiB | MiB | median ms | best ms | GB/s | of ceiling | fixed µs | submit µs | bytes checked |\n";
    s += "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |\n";
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.1} | {:.1}% | {:.1} | {:.1} | {} |\n",
            r.case,
            r.fragments,
            r.fragment_kib,
            r.bytes as f64 / (1 << 20) as f64,
            r.median_ms,
            r.best_ms,
            r.gbps,
            100.0 * r.of_ceiling,
            r.fixed_us,
            r.submit_us,
            if r.verified { "yes" } else { "no" }
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
        let f = floor::floor(&a).context("the fixed cost's floor")?;
        println!(
            "floor: a 512-byte request through the agent, device {} -> {}, submit to completion seen {:.1} µs (submit {:.1} µs), median of {}",
            a.src_device, a.dst_device, f.total_us, f.submit_us, floor::FLOOR_ITERS
        );
        rep.floor = Some(f);
        // The production agent's shape, not the sweep's pick: these rows measure what a node
        // runs, and the sweep's 16 KiB micro cannot tell shapes apart that differ by 13 points
        // on a TP4 -> TP1 request (BENCHMARKS.md, "Re-measured on one H200").
        let production = (a.two_process_kernel).unwrap_or(CudaAgentConfig::default().kernel);
        for &tokens in &a.tokens {
            for case in &a.cases {
                let row = two_process(&a, (case, tokens), production, rep.ceiling_gbps, &ptx)
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
