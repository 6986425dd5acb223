//! Both directions at once: a ctx → gen request each way over the same pair of devices.
//!
//! The ceiling is two contiguous peer copies started together, one per direction, each on a
//! stream of its source device; the path is one two-process TP1 → TP1 case each way, submitted
//! together by [`timed_rounds`]. Both are wall clock from the first submit to the last byte,
//! so the ratio compares like with like. Between them, the gather kernel alone both ways
//! (no processes, no agent) says how much of a shortfall is the kernel's and how much the path's.

use crate::micro::{check_every_other, every_other_pieces, kernel_op, peer_copy, stage_pieces};
use crate::two_process::{parse_case, timed_rounds, Case, Shape};
use crate::{gbps, median, BidirReport, RunArgs};
use anyhow::{anyhow, Context, Result};
use kvferry_backends::cuda::verify::{compare, fill_pattern, POISON};
use kvferry_backends::cuda::{CopyKernel, DeviceBuffer, Gpu, KernelConfig, PinnedBuffer, Stream};
use std::sync::Arc;
use std::time::Instant;

/// One direction of the ceiling: a source buffer on one device, its destination on the other.
struct Way {
    src: DeviceBuffer,
    dst: DeviceBuffer,
    stream: Stream,
    host: Vec<u8>,
}

impl Way {
    fn new(from: &Arc<Gpu>, to: &Arc<Gpu>, n: usize, seed: u64) -> Result<Way> {
        let mut host = vec![0u8; n];
        fill_pattern(seed, &mut host);
        let src = DeviceBuffer::alloc(from, n)?;
        src.write(0, &host)?;
        Ok(Way {
            src,
            dst: DeviceBuffer::alloc(to, n)?,
            stream: Stream::new(from)?,
            host,
        })
    }

    fn launch(&self) -> Result<()> {
        peer_copy((&self.src, &self.dst), 0, self.host.len(), &self.stream)
    }
}

/// The gather kernel copying one way's fragments, launched on the destination device (pull:
/// loads cross the link) or on the source device (push: stores cross it).
struct Gather {
    kernel: CopyKernel,
    stream: Stream,
    host: PinnedBuffer,
    dev: DeviceBuffer,
    pieces: usize,
}

impl Gather {
    fn new(w: &Way, on_dst: bool, f: u64, cfg: KernelConfig, ptx: &str) -> Result<Gather> {
        let gpu = if on_dst { w.dst.gpu() } else { w.src.gpu() };
        let pieces = every_other_pieces((&w.src, &w.dst), f, cfg.piece_bytes);
        let (host, dev) = stage_pieces(gpu, &pieces)?;
        Ok(Gather {
            kernel: CopyKernel::load(gpu, ptx)?,
            stream: Stream::new(gpu)?,
            host,
            dev,
            pieces: pieces.len(),
        })
    }
}

/// Both ways of the ceiling: buffers of `--buffer-mib` on each device, seeded sources.
fn ways(a: &RunArgs) -> Result<[Way; 2]> {
    let (g0, g1) = (Gpu::open(a.src_device)?, Gpu::open(a.dst_device)?);
    g0.enable_peer_access(&g1)?;
    g1.enable_peer_access(&g0)?;
    let n = (a.buffer_mib << 20) as usize;
    Ok([
        Way::new(&g0, &g1, n, a.seed)?,
        Way::new(&g1, &g0, n, a.seed + 1)?,
    ])
}

/// Median wall milliseconds of `launch` on both ways at once (after one warm-up, checked by
/// `check`), from the first launch to both streams drained.
fn both_at_once(
    ways: &[Way; 2],
    streams: [&Stream; 2],
    iters: usize,
    mut launch: impl FnMut(usize) -> Result<()>,
    check: impl Fn(&Way, &[u8]) -> Result<()>,
) -> Result<f64> {
    let mut times = Vec::new();
    for it in 0..=iters {
        for w in ways {
            w.dst.fill_byte(POISON)?;
        }
        let t0 = Instant::now();
        launch(0)?;
        launch(1)?;
        for s in streams {
            s.synchronize()?;
        }
        if it > 0 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        } else {
            let mut back = vec![0u8; ways[0].host.len()];
            for w in ways {
                w.dst.read(0, &mut back)?;
                check(w, &back)?;
            }
        }
    }
    Ok(median(times))
}

/// GB/s of both contiguous copies at once (bytes of both over wall time), bytes checked.
fn ceiling(ways: &[Way; 2], iters: usize) -> Result<f64> {
    let streams = [&ways[0].stream, &ways[1].stream];
    let whole = |w: &Way, back: &[u8]| {
        compare(&w.host, back).map_err(|m| anyhow!("bidirectional ceiling: {m}"))
    };
    let ms = both_at_once(ways, streams, iters, |i| ways[i].launch(), whole)?;
    Ok(gbps(2 * ways[0].host.len() as u64, ms))
}

/// GB/s of the gather kernel copying fragments of `f` bytes both ways at once, pulling
/// (`on_dst`) or pushing, bytes checked.
fn kernel_both_ways(
    ways: &[Way; 2],
    on_dst: bool,
    (f, cfg): (u64, KernelConfig),
    ptx: &str,
    iters: usize,
) -> Result<f64> {
    let g = [
        Gather::new(&ways[0], on_dst, f, cfg, ptx)?,
        Gather::new(&ways[1], on_dst, f, cfg, ptx)?,
    ];
    let mut ops = [0, 1].map(|i| kernel_op(&g[i].kernel, &g[i].host, &g[i].dev, g[i].pieces, cfg));
    let streams = [&g[0].stream, &g[1].stream];
    let fragments = |w: &Way, back: &[u8]| check_every_other(&w.host, back, f as usize);
    let ms = both_at_once(ways, streams, iters, |i| ops[i](&g[i].stream), fragments)?;
    let n = ways[0].host.len() as u64;
    Ok(gbps(2 * (n / (2 * f)) * f, ms))
}

/// The bidirectional ceiling, the kernel alone both ways (pull and push) and one `case` each way at `tokens`, measured together.
pub fn bidir(
    a: &RunArgs,
    (case, tokens): (&str, u32),
    (push, cfg): (KernelConfig, KernelConfig),
    ptx: &str,
) -> Result<BidirReport> {
    let f = a.sizes_kib[0] << 10;
    let ways = ways(a)?;
    let ceiling = ceiling(&ways, a.iters).context("bidirectional ceiling")?;
    let kernel = kernel_both_ways(&ways, true, (f, cfg), ptx, a.iters)?;
    let kernel_push = kernel_both_ways(&ways, false, (f, push), ptx, a.iters)?;
    drop(ways);
    println!(
        "bidirectional ceiling: two contiguous {} MiB peer copies at once {ceiling:.1} GB/s; \
         gather kernel alone at {} KiB both ways: pull {kernel:.1} GB/s ({:.1}%), push \
         {kernel_push:.1} GB/s ({:.1}%)",
        a.buffer_mib,
        f >> 10,
        100.0 * kernel / ceiling,
        100.0 * kernel_push / ceiling
    );
    let pull = each_way(a, case, tokens, false, (cfg, ptx), ceiling)?;
    let push = each_way(a, case, tokens, true, (push, ptx), ceiling)?;
    let rep = BidirReport {
        ceiling_gbps: ceiling,
        kernel_gbps: kernel,
        kernel_of_ceiling: kernel / ceiling,
        kernel_push_gbps: kernel_push,
        case: pull.0,
        bytes: pull.1,
        median_ms: pull.2,
        gbps: gbps(pull.1, pull.2),
        of_ceiling: gbps(pull.1, pull.2) / ceiling,
        push_gbps: gbps(push.1, push.2),
        push_of_ceiling: gbps(push.1, push.2) / ceiling,
        verified: true,
    };
    Ok(rep)
}

/// One two-process `case` each way at once, pulling or pushing: (label, bytes of both, median
/// ms), bytes checked, printed against `ceiling`.
fn each_way(
    a: &RunArgs,
    case: &str,
    tokens: u32,
    launch_on_src: bool,
    (cfg, ptx): (KernelConfig, &str),
    ceiling: f64,
) -> Result<(String, u64, f64)> {
    let (ctx_tp, gen_tp) = parse_case(case)?;
    let shape = |src_device, dst_device, seed| Shape {
        ctx_tp,
        gen_tp,
        tokens,
        src_device,
        dst_device,
        seed,
        launch_on_src,
    };
    let fwd = shape(a.src_device, a.dst_device, a.seed);
    let back = shape(a.dst_device, a.src_device, a.seed + 100);
    let cases = [
        Case::new(a, &fwd, cfg, ptx)?,
        Case::new(a, &back, cfg, ptx)?,
    ];
    let times = timed_rounds(&[&cases[0], &cases[1]], a.iters)?;
    for c in &cases {
        c.verify()?;
    }
    let bytes: u64 = cases.iter().map(|c| c.total).sum();
    let med = median(times.wall_ms);
    let label = format!("{} each way", cases[0].label);
    println!(
        "bidirectional {label}: {:.1} MiB in {med:.3} ms, {:.1} GB/s, {:.1}% of the bidirectional ceiling",
        bytes as f64 / (1 << 20) as f64,
        gbps(bytes, med),
        100.0 * gbps(bytes, med) / ceiling
    );
    Ok((label, bytes, med))
}
