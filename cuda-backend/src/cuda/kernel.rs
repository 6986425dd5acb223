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
__device__ __forceinline__ void gather(const Piece* __restrict__ pieces, unsigned long long n) {
  for (unsigned long long p = blockIdx.x; p < n; p += gridDim.x) {
    const Piece pc = pieces[p];
    const unsigned char* s = (const unsigned char*)pc.src;
    unsigned char* d = (unsigned char*)pc.dst;
    const unsigned long long mis = pc.src ^ pc.dst;
    if ((mis & 15) == 0) copy_piece<uint4, U>(s, d, pc.len);
    else if ((mis & 7) == 0) copy_piece<uint2, U>(s, d, pc.len);
    else if ((mis & 3) == 0) copy_piece<unsigned int, U>(s, d, pc.len);
    else if ((mis & 1) == 0) copy_piece<unsigned short, U>(s, d, pc.len);
    else copy_piece<unsigned char, U>(s, d, pc.len);
  }
}

extern "C" __global__ void kvferry_gather_u4(const Piece* __restrict__ p, unsigned long long n) {
  gather<4>(p, n);
}
extern "C" __global__ void kvferry_gather_u8(const Piece* __restrict__ p, unsigned long long n) {
  gather<8>(p, n);
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

impl KernelConfig {
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
        if n == 0 {
            return Ok(());
        }
        let f = if cfg.unroll == 8 { self.u8 } else { self.u4 };
        let grid = (u64::from(self.sms) * u64::from(cfg.ctas_per_sm)).min(n) as u32;
        let mut p_pieces = pieces;
        let mut p_n = n;
        let mut params: [*mut c_void; 2] = [
            (&mut p_pieces as *mut u64).cast(),
            (&mut p_n as *mut u64).cast(),
        ];
        // SAFETY: `f` comes from this module; params match the kernel's (pointer, u64)
        // signature and are read by the driver during the call.
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
