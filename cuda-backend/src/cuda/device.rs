//! Devices, primary contexts, streams and events on the raw driver API.
//!
//! We use cudarc's `sys`/`result` layers rather than its safe `CudaContext`: the safe layer
//! allocates from the stream-ordered pool (`cuMemAllocAsync`), which DESIGN.md measured at 38 GB/s
//! for peer copies instead of 396, and it adds event tracking we do not want on the copy path.

use super::error::{check, CudaError, DriverResultExt};
use cudarc::driver::{result, sys};
use std::sync::Arc;

/// Checks that a driver and at least one device exist. Never panics: cudarc's loader panics on
/// a missing library, so the library's presence is tested first.
pub fn probe() -> Result<usize, CudaError> {
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaError::Unavailable(
            "libcuda could not be loaded (no NVIDIA driver)".into(),
        ));
    }
    result::init().map_err(|e| CudaError::Unavailable(format!("cuInit failed: {e}")))?;
    let n = result::device::get_count()
        .map_err(|e| CudaError::Unavailable(format!("cuDeviceGetCount failed: {e}")))?;
    if n <= 0 {
        return Err(CudaError::Unavailable("zero CUDA devices".into()));
    }
    Ok(n as usize)
}

/// One device and its retained primary context (shared with any other library in the process,
/// e.g. a framework that owns the KV pool).
#[derive(Debug)]
pub struct Gpu {
    ordinal: usize,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
}

// SAFETY: a CUcontext is a process-wide driver handle usable from any thread once made current;
// `Gpu` holds no thread-affine state.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

impl Gpu {
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>, CudaError> {
        let n = probe()?;
        if ordinal >= n {
            return Err(CudaError::Invalid(format!(
                "device {ordinal} requested, {n} present"
            )));
        }
        let dev = result::device::get(ordinal as i32).op("cuDeviceGet")?;
        // SAFETY: `dev` is a valid device; the retain is balanced by `Drop`.
        let ctx = unsafe { result::primary_ctx::retain(dev) }.op("cuDevicePrimaryCtxRetain")?;
        let gpu = Gpu { ordinal, dev, ctx };
        gpu.bind()?;
        Ok(Arc::new(gpu))
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn raw_context(&self) -> sys::CUcontext {
        self.ctx
    }

    /// Makes this device's context current on the calling thread. Cheap; every entry point
    /// that touches the driver calls it because callers may hop threads (tokio, poller).
    pub fn bind(&self) -> Result<(), CudaError> {
        // SAFETY: `ctx` stays retained while `self` lives.
        unsafe { result::ctx::set_current(self.ctx) }.op("cuCtxSetCurrent")
    }

    pub fn attribute(&self, a: sys::CUdevice_attribute) -> Result<i32, CudaError> {
        // SAFETY: valid device handle.
        unsafe { result::device::get_attribute(self.dev, a) }.op("cuDeviceGetAttribute")
    }

    pub fn sm_count(&self) -> Result<u32, CudaError> {
        self.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map(|n| n as u32)
    }

    pub fn compute_capability(&self) -> Result<(i32, i32), CudaError> {
        let major =
            self.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor =
            self.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        Ok((major, minor))
    }

    pub fn name(&self) -> Result<String, CudaError> {
        result::device::get_name(self.dev).op("cuDeviceGetName")
    }

    /// Lets kernels and copies in this context address `peer`'s `cuMemAlloc` memory directly.
    /// Idempotent. Memory opened through IPC does not need it (the open enables it lazily).
    pub fn enable_peer_access(&self, peer: &Gpu) -> Result<(), CudaError> {
        if peer.ordinal == self.ordinal {
            return Ok(());
        }
        let mut can = 0;
        // SAFETY: out-pointer to a local.
        check(
            unsafe { sys::cuDeviceCanAccessPeer(&mut can, self.dev, peer.dev) },
            "cuDeviceCanAccessPeer",
        )?;
        if can == 0 {
            return Err(CudaError::NoPeerAccess(self.ordinal, peer.ordinal));
        }
        self.bind()?;
        // SAFETY: both contexts are retained.
        let r = unsafe { sys::cuCtxEnablePeerAccess(peer.ctx, 0) };
        if r == sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
            return Ok(());
        }
        check(r, "cuCtxEnablePeerAccess")
    }

    /// Waits for all work of this context (bench and test set-up only; never on the copy path).
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.bind()?;
        result::ctx::synchronize().op("cuCtxSynchronize")
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `open`.
        let _ = unsafe { result::primary_ctx::release(self.dev) };
    }
}

/// A non-blocking stream: it does not serialise with the legacy default stream, so a framework's
/// work on stream 0 does not stall transfers.
#[derive(Debug)]
pub struct Stream {
    gpu: Arc<Gpu>,
    raw: sys::CUstream,
}

// SAFETY: stream handles may be used from any thread; ordering is the caller's (the agent
// serialises submissions under a mutex).
unsafe impl Send for Stream {}
unsafe impl Sync for Stream {}

impl Stream {
    pub fn new(gpu: &Arc<Gpu>) -> Result<Stream, CudaError> {
        gpu.bind()?;
        let raw =
            result::stream::create(result::stream::StreamKind::NonBlocking).op("cuStreamCreate")?;
        Ok(Stream {
            gpu: gpu.clone(),
            raw,
        })
    }

    pub fn raw(&self) -> sys::CUstream {
        self.raw
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.gpu.bind()?;
        // SAFETY: live stream.
        unsafe { result::stream::synchronize(self.raw) }.op("cuStreamSynchronize")
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: live stream, destroyed once.
            let _ = unsafe { result::stream::destroy(self.raw) };
        }
    }
}

/// A CUDA event. Completion events are created without timing (cheaper record and query).
#[derive(Debug)]
pub struct Event {
    gpu: Arc<Gpu>,
    raw: sys::CUevent,
}

// SAFETY: event handles are thread-safe driver objects.
unsafe impl Send for Event {}
unsafe impl Sync for Event {}

impl Event {
    pub fn new(gpu: &Arc<Gpu>, timing: bool) -> Result<Event, CudaError> {
        gpu.bind()?;
        let flags = if timing {
            sys::CUevent_flags::CU_EVENT_DEFAULT
        } else {
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING
        };
        let raw = result::event::create(flags).op("cuEventCreate")?;
        Ok(Event {
            gpu: gpu.clone(),
            raw,
        })
    }

    /// A completion event a thread can sleep on: `synchronize` blocks in the driver until it
    /// fires (`CU_EVENT_BLOCKING_SYNC`) instead of spinning a core; no timing.
    pub fn blocking(gpu: &Arc<Gpu>) -> Result<Event, CudaError> {
        gpu.bind()?;
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32
            | sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32;
        let mut raw = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; flags are a valid combination.
        check(
            unsafe { sys::cuEventCreate(&mut raw, flags) },
            "cuEventCreate",
        )?;
        Ok(Event {
            gpu: gpu.clone(),
            raw,
        })
    }

    pub fn record(&self, stream: &Stream) -> Result<(), CudaError> {
        // SAFETY: live event and stream.
        unsafe { result::event::record(self.raw, stream.raw) }.op("cuEventRecord")
    }

    /// Non-blocking: `Ok(true)` once the captured work finished, `Ok(false)` while it runs, `Err`
    /// if the work failed (sticky context error).
    pub fn query(&self) -> Result<bool, CudaError> {
        // SAFETY: live event.
        let r = unsafe { sys::cuEventQuery(self.raw) };
        match r {
            sys::CUresult::CUDA_SUCCESS => Ok(true),
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            e => check(e, "cuEventQuery").map(|_| false),
        }
    }

    pub fn synchronize(&self) -> Result<(), CudaError> {
        // SAFETY: live event.
        unsafe { result::event::synchronize(self.raw) }.op("cuEventSynchronize")
    }

    /// Milliseconds from `self` to `end` (both timing events, both complete).
    pub fn elapsed_ms(&self, end: &Event) -> Result<f32, CudaError> {
        // SAFETY: live events.
        unsafe { result::event::elapsed(self.raw, end.raw) }.op("cuEventElapsedTime")
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: destroyed once; the driver defers the release if still pending.
            let _ = unsafe { result::event::destroy(self.raw) };
        }
    }
}
