//! The gather/scatter copy kernel: one launch copies every fragment of a plan leg.
//!
//! Why NVRTC at run time rather than shipped PTX: the build machines have no CUDA toolkit (no
//! nvcc to produce PTX at build time) and a checked-in PTX blob would be an unreviewable
//! artifact pinned to one PTX ISA. NVRTC is present wherever the driver is installed with the
//! toolkit or a framework wheel, compiles for the exact compute capability of the device found,
//! and costs one compilation (~0.1–0.3 s) per process, done before the first transfer.
//!
//! Shape: the host cuts fragments into pieces of at most `piece_bytes`, cut at multiples of
//! `piece_bytes` in source address so only a fragment's first piece has an unaligned head. Each
//! CTA walks pieces grid-stride; within a piece its threads copy with the widest word that
//! source and destination share alignment for (16 bytes for KV offsets), `U` independent loads
//! in flight per thread before the stores, so remote (NVLink) latency is hidden. Heads and tails
//! shorter than a word are copied bytewise by the first threads.

use super::device::{Gpu, Stream};
use super::error::{check, CudaError, DriverResultExt};
use cudarc::driver::{result, sys};
use std::ffi::{c_void, CString};
use std::sync::Arc;

pub const KERNEL_SRC: &str = r#"
struct Piece { unsigned long long src; unsigned long long dst; unsigned long long len; };

template <typename T, int U>
__device__ __forceinline__ void copy_words(const T* __restrict__ s, T* __restrict__ d,
                                           unsigned long long count) {
  const unsigned long long n = blockDim.x;
  for (unsigned long long base = threadIdx.x; base < count; base += U * n) {
    T r[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const unsigned long long i = base + u * n;
      if (i < count) r[u] = s[i];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const unsigned long long i = base + u * n;
      if (i < count) d[i] = r[u];
    }
  }
}

template <typename T, int U>
__device__ __forceinline__ void copy_piece(const unsigned char* s, unsigned char* d,
                                           unsigned long long len) {
  const unsigned long long w = sizeof(T);
  unsigned long long head = (w - ((unsigned long long)s & (w - 1))) & (w - 1);
  if (head > len) head = len;
  if (threadIdx.x < head) d[threadIdx.x] = s[threadIdx.x];
  const unsigned long long body = (len - head) & ~(w - 1);
  copy_words<T, U>((const T*)(s + head), (T*)(d + head), body / w);
  const unsigned long long tail = len - head - body;
  if (threadIdx.x < tail) d[head + body + threadIdx.x] = s[head + body + threadIdx.x];
}

template <int U>
__device__ __forceinline__ void copy_any(unsigned long long src, unsigned long long dst,
                                         unsigned long long len) {
  const unsigned char* s = (const unsigned char*)src;
  unsigned char* d = (unsigned char*)dst;
  const unsigned long long mis = src ^ dst;
  if ((mis & 15) == 0) copy_piece<uint4, U>(s, d, len);
  else if ((mis & 7) == 0) copy_piece<uint2, U>(s, d, len);
  else if ((mis & 3) == 0) copy_piece<unsigned int, U>(s, d, len);
  else if ((mis & 1) == 0) copy_piece<unsigned short, U>(s, d, len);
  else copy_piece<unsigned char, U>(s, d, len);
}

template <int U>
__device__ __forceinline__ void gather(const Piece* __restrict__ pieces, unsigned long long n) {
  for (unsigned long long p = blockIdx.x; p < n; p += gridDim.x) {
    const Piece pc = pieces[p];
    copy_any<U>(pc.src, pc.dst, pc.len);
  }
}

// One leg of a device-expanded launch (see expand.rs): its work items are every (block pair,
// template piece), pair-major; `items_end` is the running total over the legs so far.
struct Leg {
  unsigned long long src_base; unsigned long long dst_base;
  unsigned long long src_block; unsigned long long dst_block;
  unsigned long long items_end;
  unsigned int tmpl_start; unsigned int tmpl_count; unsigned int pair_start; unsigned int pad;
};

template <int U>
__device__ __forceinline__ void expand(const Leg* __restrict__ legs, unsigned int n_legs,
                                       const Piece* __restrict__ tmpl,
                                       const uint2* __restrict__ pairs,
                                       unsigned long long items) {
  for (unsigned long long i = blockIdx.x; i < items; i += gridDim.x) {
    unsigned int l = 0;
    while (l + 1 < n_legs && i >= legs[l].items_end) ++l;
    const Leg g = legs[l];
    const unsigned long long local = i - (l == 0 ? 0ull : legs[l - 1].items_end);
    const unsigned long long p = local / g.tmpl_count;
    const Piece t = tmpl[g.tmpl_start + (local - p * g.tmpl_count)];
    const uint2 b = pairs[g.pair_start + p];
    copy_any<U>(g.src_base + (unsigned long long)b.x * g.src_block + t.src,
                g.dst_base + (unsigned long long)b.y * g.dst_block + t.dst, t.len);
  }
}

extern "C" __global__ void kvferry_gather_u4(const Piece* __restrict__ p, unsigned long long n) {
  gather<4>(p, n);
}
extern "C" __global__ void kvferry_gather_u8(const Piece* __restrict__ p, unsigned long long n) {
  gather<8>(p, n);
}
extern "C" __global__ void kvferry_expand_u4(const Leg* __restrict__ legs, unsigned int n_legs,
                                             const Piece* __restrict__ tmpl,
                                             const uint2* __restrict__ pairs,
                                             unsigned long long items) {
  expand<4>(legs, n_legs, tmpl, pairs, items);
}
extern "C" __global__ void kvferry_expand_u8(const Leg* __restrict__ legs, unsigned int n_legs,
                                             const Piece* __restrict__ tmpl,
                                             const uint2* __restrict__ pairs,
                                             unsigned long long items) {
  expand<8>(legs, n_legs, tmpl, pairs, items);
}
"#;

/// One contiguous copy as the kernel reads it (must match `struct Piece`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyPiece {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

pub const PIECE_BYTES: usize = std::mem::size_of::<CopyPiece>();

/// Appends `[src, src+len) -> [dst, ...)` cut at multiples of `piece` in source address.
pub fn split_into_pieces(src: u64, dst: u64, len: u64, piece: u64, out: &mut Vec<CopyPiece>) {
    let piece = piece.max(1);
    let mut done = 0;
    while done < len {
        let s = src + done;
        let n = (piece - s % piece).min(len - done);
        out.push(CopyPiece {
            src: s,
            dst: dst + done,
            len: n,
        });
        done += n;
    }
}

/// Launch shape. The defaults were chosen from the sweep `kvferry-bench` prints (see
/// BENCHMARKS.md); they are a starting point, not a law.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelConfig {
    /// Threads per CTA (≥ 32; heads/tails need 16).
    pub threads: u32,
    /// CTAs per SM in the grid (the grid is capped by the piece count).
    pub ctas_per_sm: u32,
    /// Loads in flight per thread: 4 or 8.
    pub unroll: u32,
    /// Largest piece a CTA copies at once; smaller balances better, larger means fewer
    /// descriptors.
    pub piece_bytes: u64,
}

impl Default for KernelConfig {
    fn default() -> KernelConfig {
        KernelConfig {
            threads: 512,
            ctas_per_sm: 4,
            unroll: 4,
            piece_bytes: 64 << 10,
        }
    }
}

/// Fewest threads `KernelConfig::fitted` gives a CTA.
const MIN_FITTED_THREADS: u32 = 128;
/// Resident CTAs per SM on Ampere and Hopper: `fitted` never asks for more.
const MAX_CTAS_PER_SM: u32 = 32;
/// Bytes one thread loads per word (`uint4`, the word of every 16-byte aligned KV fragment).
const WORD_BYTES: u64 = 16;

impl KernelConfig {
    /// This shape with CTAs sized to pieces of `largest` bytes: a CTA of `threads` threads
    /// with `unroll` loads each covers `threads × unroll × 16` bytes per round, so on smaller
    /// pieces threads idle and fewer loads are in flight (16 KiB pieces at 512 × 4: half).
    /// Halves the threads (down to 128) until one round fits the piece, and multiplies the
    /// CTAs per SM by as much, so as many threads stay resident.
    pub fn fitted(self, largest: u64) -> KernelConfig {
        let mut c = self;
        while c.threads / 2 >= MIN_FITTED_THREADS
            && c.threads.is_multiple_of(64)
            && c.ctas_per_sm * 2 <= MAX_CTAS_PER_SM
            && u64::from(c.threads) * u64::from(c.unroll) * WORD_BYTES > largest
        {
            c.threads /= 2;
            c.ctas_per_sm *= 2;
        }
        c
    }

    pub fn validate(&self) -> Result<(), CudaError> {
        if !(32..=1024).contains(&self.threads) || self.threads & 31 != 0 {
            return Err(CudaError::Invalid(format!(
                "threads = {} (want a multiple of 32 in 32..=1024)",
                self.threads
            )));
        }
        if self.unroll != 4 && self.unroll != 8 {
            return Err(CudaError::Invalid(format!("unroll = {}", self.unroll)));
        }
        if self.ctas_per_sm == 0 || self.piece_bytes == 0 {
            return Err(CudaError::Invalid("zero ctas_per_sm or piece_bytes".into()));
        }
        Ok(())
    }
}

/// Compiles the kernel for compute capability `cc` and returns the PTX text.
pub fn compile_ptx(cc: (i32, i32)) -> Result<String, CudaError> {
    // SAFETY: only tries to dlopen libnvrtc; cudarc would panic on first use otherwise.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::Unavailable(
            "libnvrtc could not be loaded: put the CUDA toolkit's lib64 (with a libnvrtc.so) \
             on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![
            format!("--gpu-architecture=compute_{}{}", cc.0, cc.1),
            "--std=c++17".into(),
        ],
        name: Some("kvferry_gather.cu".into()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNEL_SRC, opts)
        .map_err(|e| CudaError::Compile(format!("{e:?}")))?;
    Ok(ptx.to_src())
}

/// The kernel loaded into one device's context.
#[derive(Debug)]
pub struct CopyKernel {
    gpu: Arc<Gpu>,
    module: sys::CUmodule,
    u4: sys::CUfunction,
    u8: sys::CUfunction,
    expand_u4: sys::CUfunction,
    expand_u8: sys::CUfunction,
    sms: u32,
}

// SAFETY: module and function handles are immutable driver objects, usable from any thread.
unsafe impl Send for CopyKernel {}
unsafe impl Sync for CopyKernel {}

impl CopyKernel {
    /// Compiles (NVRTC) and loads the kernel on `gpu`.
    pub fn new(gpu: &Arc<Gpu>) -> Result<CopyKernel, CudaError> {
        let ptx = compile_ptx(gpu.compute_capability()?)?;
        CopyKernel::load(gpu, &ptx)
    }

    /// Loads already compiled PTX (compile once per process, load per device).
    pub fn load(gpu: &Arc<Gpu>, ptx: &str) -> Result<CopyKernel, CudaError> {
        gpu.bind()?;
        let image = CString::new(ptx).map_err(|e| CudaError::Compile(e.to_string()))?;
        // SAFETY: NUL-terminated PTX image.
        let module =
            unsafe { result::module::load_data(image.as_ptr().cast()) }.op("cuModuleLoadData")?;
        let get = |name: &str| {
            let name = CString::new(name).expect("static name");
            // SAFETY: live module.
            unsafe { result::module::get_function(module, name) }.op("cuModuleGetFunction")
        };
        Ok(CopyKernel {
            gpu: gpu.clone(),
            module,
            u4: get("kvferry_gather_u4")?,
            u8: get("kvferry_gather_u8")?,
            expand_u4: get("kvferry_expand_u4")?,
            expand_u8: get("kvferry_expand_u8")?,
            sms: gpu.sm_count()?,
        })
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Enqueues one launch over `n` pieces stored at device address `pieces`. Every address in
    /// the pieces must be accessible from this device (local, peer-enabled or IPC-mapped).
    pub fn launch(
        &self,
        stream: &Stream,
        pieces: u64,
        n: u64,
        cfg: &KernelConfig,
    ) -> Result<(), CudaError> {
        let f = if cfg.unroll == 8 { self.u8 } else { self.u4 };
        let (mut p_pieces, mut p_n) = (pieces, n);
        let mut params: [*mut c_void; 2] = [
            (&mut p_pieces as *mut u64).cast(),
            (&mut p_n as *mut u64).cast(),
        ];
        self.enqueue(stream, f, n, cfg, &mut params)
    }

    /// Enqueues one launch of the expanding kernel over the legs of `d` (see `expand`): the
    /// device computes every piece's addresses from block ids and templates. The same
    /// accessibility rule as `launch` holds for every address the legs name.
    pub fn launch_expand(
        &self,
        stream: &Stream,
        d: &ExpandArgs,
        cfg: &KernelConfig,
    ) -> Result<(), CudaError> {
        let f = if cfg.unroll == 8 {
            self.expand_u8
        } else {
            self.expand_u4
        };
        let (mut legs, mut n_legs, mut tmpl, mut pairs, mut items) =
            (d.legs, d.n_legs, d.tmpl, d.pairs, d.items);
        let mut params: [*mut c_void; 5] = [
            (&mut legs as *mut u64).cast(),
            (&mut n_legs as *mut u32).cast(),
            (&mut tmpl as *mut u64).cast(),
            (&mut pairs as *mut u64).cast(),
            (&mut items as *mut u64).cast(),
        ];
        self.enqueue(stream, f, d.items, cfg, &mut params)
    }

    /// Launches `f` over `work` grid-stride items (no launch for none) with `params`, which
    /// must match `f`'s signature.
    fn enqueue(
        &self,
        stream: &Stream,
        f: sys::CUfunction,
        work: u64,
        cfg: &KernelConfig,
        params: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        if work == 0 {
            return Ok(());
        }
        let grid = (u64::from(self.sms) * u64::from(cfg.ctas_per_sm)).min(work) as u32;
        // SAFETY: `f` comes from this module; the callers' params match its signature and are
        // read by the driver during the call.
        check(
            unsafe {
                sys::cuLaunchKernel(
                    f,
                    grid,
                    1,
                    1,
                    cfg.threads,
                    1,
                    1,
                    0,
                    stream.raw(),
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            },
            "cuLaunchKernel",
        )
    }
}

/// Device addresses and counts of an uploaded expansion (`expand::Expansion::args`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpandArgs {
    pub legs: u64,
    pub n_legs: u32,
    pub tmpl: u64,
    pub pairs: u64,
    pub items: u64,
}

impl Drop for CopyKernel {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: unloaded once; launches that used it were waited for by their owners.
            let _ = unsafe { result::module::unload(self.module) };
        }
    }
}

/// Writes pieces into a byte buffer in the kernel's layout.
pub fn encode_pieces(pieces: &[CopyPiece], out: &mut [u8]) {
    for (p, chunk) in pieces.iter().zip(out.chunks_exact_mut(PIECE_BYTES)) {
        chunk[0..8].copy_from_slice(&p.src.to_ne_bytes());
        chunk[8..16].copy_from_slice(&p.dst.to_ne_bytes());
        chunk[16..24].copy_from_slice(&p.len.to_ne_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 16 KiB pieces get 256-thread CTAs, twice as many; pieces as large as a round keep the
    /// shape; the resident thread count never changes, and 128 threads is the floor.
    #[test]
    fn fitted_shapes_size_ctas_to_the_pieces() {
        let base = KernelConfig::default(); // 512 threads, 4 per SM, 4 loads: 32 KiB a round
        let f = base.fitted(16 << 10);
        assert_eq!((f.threads, f.ctas_per_sm), (256, 8));
        assert_eq!(base.fitted(32 << 10), base);
        assert_eq!(base.fitted(10 << 20), base);
        let tiny = base.fitted(256);
        assert_eq!((tiny.threads, tiny.ctas_per_sm), (128, 16));
        for c in [f, tiny] {
            assert_eq!(c.threads * c.ctas_per_sm, base.threads * base.ctas_per_sm);
            c.validate().unwrap();
        }
    }

    #[test]
    fn pieces_cover_the_fragment_and_cut_on_source_multiples() {
        let mut out = Vec::new();
        split_into_pieces(100, 7, 300, 128, &mut out);
        assert_eq!(out.iter().map(|p| p.len).sum::<u64>(), 300);
        assert_eq!(
            out[0],
            CopyPiece {
                src: 100,
                dst: 7,
                len: 28
            }
        );
        assert!(out[1..].iter().all(|p| p.src % 128 == 0));
        for w in out.windows(2) {
            assert_eq!(w[0].src + w[0].len, w[1].src);
            assert_eq!(w[0].dst + w[0].len, w[1].dst);
        }
    }
}
