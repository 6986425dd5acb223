//! One process, one pair of devices: the contiguous peer-copy ceiling, the kernel's
//! launch-shape sweep, and fragmented copies by every method (per-fragment
//! `cuMemcpyPeerAsync`, one `cuMemcpyBatchAsync`, the gather kernel pushing and pulling),
//! each checked byte for byte before it is timed.

use crate::{cu, gbps, median, Report, Row, RunArgs};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::sys;
use kvferry_backends::cuda::kernel::{encode_pieces, split_into_pieces, PIECE_BYTES};
use kvferry_backends::cuda::verify::{compare, fill_pattern, POISON};
use kvferry_backends::cuda::{
    compile_ptx, CopyKernel, CopyPiece, DeviceBuffer, Event, Gpu, KernelConfig, PinnedBuffer,
    Stream,
};
use std::sync::Arc;

/// Times `op` on `stream` with events, `iters` times; returns per-iteration milliseconds.
pub fn time_gpu(
    stream: &Stream,
    iters: usize,
    mut op: impl FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
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
pub fn check_every_other(src: &[u8], got: &[u8], f: usize) -> Result<()> {
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
pub fn every_other_pieces(
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
pub fn kernel_op<'a>(
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

pub fn stage_pieces(gpu: &Arc<Gpu>, pieces: &[CopyPiece]) -> Result<(PinnedBuffer, DeviceBuffer)> {
    let len = pieces.len() * PIECE_BYTES;
    let mut host = PinnedBuffer::alloc(gpu, len)?;
    encode_pieces(pieces, host.as_mut_slice());
    let dev = DeviceBuffer::alloc(gpu, len)?;
    Ok((host, dev))
}

impl Micro {
    fn new(a: &RunArgs) -> Result<Micro> {
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
        Ok(Micro {
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
        })
    }

    /// `cuMemcpyPeerAsync` of `len` bytes at `off` in both buffers, on `s`.
    fn peer_copy(&self, off: u64, len: usize, s: &Stream) -> Result<()> {
        peer_copy((&self.src, &self.dst), off, len, s)
    }
}

/// `cuMemcpyPeerAsync` of `len` bytes at `off` from `src` to the same offset of `dst` (each on
/// its own device), on `s`.
pub fn peer_copy(
    (src, dst): (&DeviceBuffer, &DeviceBuffer),
    off: u64,
    len: usize,
    s: &Stream,
) -> Result<()> {
    assert!(off + len as u64 <= src.len().min(dst.len()) as u64);
    let (sc, dc) = (src.gpu().raw_context(), dst.gpu().raw_context());
    let (sp, dp) = (src.ptr() + off, dst.ptr() + off);
    // SAFETY: `off + len` lies inside both buffers (asserted); contexts retained.
    cu(
        unsafe { sys::cuMemcpyPeerAsync(dp, dc, sp, sc, len, s.raw()) },
        "cuMemcpyPeerAsync",
    )
}

/// The whole micro bench; returns the (push, pull) launch shapes the sweep chose.
pub fn micro(a: &RunArgs, rep: &mut Report) -> Result<(KernelConfig, KernelConfig)> {
    let m = Micro::new(a)?;
    let n = m.src.len();
    // Ceiling: one contiguous peer copy of the whole buffer.
    let (ms, ok) = m.measure(false, None, |s| m.peer_copy(0, n, s))?;
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
    let (push, pull) = if a.no_sweep {
        (KernelConfig::default(), KernelConfig::default())
    } else {
        (sweep(&m, a, rep, false)?, sweep(&m, a, rep, true)?)
    };
    rep.kernel_push = Some(format!("{push:?}"));
    rep.kernel_pull = Some(format!("{pull:?}"));
    for &kib in &a.sizes_kib {
        fragmented(&m, a, kib, (push, pull), rep)?;
    }
    Ok((push, pull))
}

/// Launch-shape sweep at the smallest fragment, pushing or pulling (`on_dst`); unverified
/// here, the chosen shape is verified in the fragmented rows.
fn sweep(m: &Micro, a: &RunArgs, rep: &mut Report, on_dst: bool) -> Result<KernelConfig> {
    let f0 = a.sizes_kib[0] << 10;
    let pieces = kernel_pieces(m, f0, 64 << 10);
    let bytes = (m.src.len() as u64 / (2 * f0)) * f0;
    let (k, s, g) = if on_dst {
        (&m.k1, &m.s1, &m.g1)
    } else {
        (&m.k0, &m.s0, &m.g0)
    };
    let (host, dev) = stage_pieces(g, &pieces)?;
    let dir = if on_dst { "pull" } else { "push" };
    let mut best = (KernelConfig::default(), 0.0);
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
                // A shape can exceed the register file (launch refused, not sticky): note
                // it and go on.
                let ms = match op(s).and_then(|_| time_gpu(s, a.iters, || op(s))) {
                    Ok(t) => median(t),
                    Err(e) => {
                        println!("sweep {cfg:?}: {e:#}");
                        continue;
                    }
                };
                let r = gbps(bytes, ms);
                rep.sweep.push((dir.into(), format!("{cfg:?}"), r));
                if r > best.1 {
                    best = (cfg, r);
                }
            }
        }
    }
    println!("sweep best {dir} {:?} {:.1} GB/s", best.0, best.1);
    Ok(best.0)
}

/// Every method on fragments of `kib` KiB at every other block: one table row each.
fn fragmented(
    m: &Micro,
    a: &RunArgs,
    kib: u64,
    (push, pull): (KernelConfig, KernelConfig),
    rep: &mut Report,
) -> Result<()> {
    let f = kib << 10;
    let count = (m.src.len() as u64 / (2 * f)) as usize;
    let offs: Vec<u64> = (0..count as u64).map(|i| 2 * i * f).collect();
    let mut row = |method: &str, r: Result<(f64, bool)>, note: String| {
        let row = fragment_row((method, kib, count), r, note, rep.ceiling_gbps);
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
        offs.iter().try_for_each(|&o| m.peer_copy(o, f as usize, s))
    });
    row("per-fragment cuMemcpyPeerAsync", r, String::new());
    let r = batch_copy(m, a, &offs, f);
    row("one cuMemcpyBatchAsync", r, String::new());
    for (on_dst, cfg) in [(false, push), (true, pull)] {
        let g = if on_dst { &m.g1 } else { &m.g0 };
        let pieces = kernel_pieces(m, f, cfg.piece_bytes);
        let (host, dev) = stage_pieces(g, &pieces)?;
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
    Ok(())
}

/// A fragmented row: the measured time against `ceiling`, or the error in its note.
fn fragment_row(
    (method, kib, count): (&str, u64, usize),
    r: Result<(f64, bool)>,
    note: String,
    ceiling: f64,
) -> Row {
    let bytes = count as u64 * (kib << 10);
    let (ms, ok, note) = match r {
        Ok((ms, ok)) => (ms, ok, note),
        Err(e) => (f64::NAN, false, format!("{e:#}")),
    };
    Row {
        method: method.into(),
        fragment_kib: kib,
        fragments: count,
        bytes,
        median_ms: ms,
        gbps: gbps(bytes, ms),
        of_ceiling: gbps(bytes, ms) / ceiling,
        verified: ok,
        note,
    }
}

/// One `cuMemcpyBatchAsync` of every fragment, or why the driver has none.
fn batch_copy(m: &Micro, a: &RunArgs, offs: &[u64], f: u64) -> Result<(f64, bool)> {
    let bf = batch_fn().map_err(|e| anyhow!("not available: {e}"))?;
    let count = offs.len();
    let mut dsts: Vec<u64> = offs.iter().map(|o| m.dst.ptr() + o).collect();
    let mut srcs: Vec<u64> = offs.iter().map(|o| m.src.ptr() + o).collect();
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
    let (mut idx, mut fail) = (0usize, 0usize);
    m.measure(false, Some(f), |s| {
        // SAFETY: arrays of `count` entries, one attribute applying from index 0.
        let r = unsafe {
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
        };
        cu(r, "cuMemcpyBatchAsync")
    })
}
