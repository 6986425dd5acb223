//! `CudaAgent`: the core's `TransferAgent` over NVLink peer memory.
//!
//! Data path: a job's fragments become kernel pieces (absolute device addresses), uploaded from
//! pinned memory and copied by one launch of the gather kernel on the agent's stream; an event
//! recorded after the launch is the job's fence. Completions are found by querying events without
//! blocking, from an agent-owned poller thread (or from `poll()` by a driver that prefers its own
//! loop). Jobs share one stream, so they finish in submission order and a poll stops at the first
//! unfinished one: O(completed), not O(in flight).
//!
//! Roles, one GPU per process as in production: the generation rank maps each context rank's
//! pool (`IpcMapping`, registered with `register_peer`) and *pulls* on `Receive`. The context
//! rank has no peer region registered, so its `Send` job is parked until the control plane
//! reports that the peer's pull finished (`peer_finished`): until then its blocks stay pinned,
//! which is what keeps a late reader off freed blocks. If a context rank registers the
//! generation pool instead, its `Send` *pushes* with the same kernel; register on one side only.

use super::device::{Event, Gpu, Stream};
use super::error::CudaError;
use super::kernel::PIECE_BYTES;
use super::kernel::{encode_pieces, split_into_pieces, CopyKernel, CopyPiece, KernelConfig};
use super::memory::{DeviceBuffer, PinnedBuffer, Region};
use kvferry_core::agent::{
    AgentError, Completion, CompletionQueue, Direction, TransferAgent, TransferId, TransferJob,
};
use kvferry_core::PeerId;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct CudaAgentConfig {
    pub kernel: KernelConfig,
    /// Jobs on the GPU at once; more is refused at submit (never queued unboundedly).
    pub max_in_flight: usize,
    /// Poller sleep between event queries while jobs are in flight. Zero spins (yielding).
    pub poll_interval: Duration,
    /// Start the poller thread. Without it the owner must call `poll()`.
    pub poller_thread: bool,
}

impl Default for CudaAgentConfig {
    fn default() -> CudaAgentConfig {
        CudaAgentConfig {
            kernel: KernelConfig::default(),
            max_in_flight: 256,
            poll_interval: Duration::from_micros(5),
            poller_thread: true,
        }
    }
}

/// Descriptor staging of one job: pinned host copy and the device copy the kernel reads.
struct DescBuf {
    host: PinnedBuffer,
    dev: DeviceBuffer,
    cap: usize,
}

struct InFlight {
    id: TransferId,
    done: CompletionQueue,
    bytes: u64,
    event: Event,
    desc: DescBuf,
    cancelled: bool,
    /// Keeps both pools mapped until the kernel finished, even if a peer is unregistered.
    _regions: [Region; 2],
}

struct Parked {
    done: CompletionQueue,
    cancelled: bool,
}

#[derive(Default)]
struct State {
    peers: HashMap<PeerId, Region>,
    in_flight: VecDeque<InFlight>,
    parked: HashMap<TransferId, Parked>,
    free_descs: Vec<DescBuf>,
    /// Sticky: a failed event query means the context is broken; later submits fail fast.
    failed: Option<String>,
    scratch: Vec<CopyPiece>,
}

struct Inner {
    gpu: Arc<Gpu>,
    kernel: CopyKernel,
    stream: Stream,
    config: CudaAgentConfig,
    local_rank: u32,
    local: Region,
    state: Mutex<State>,
    wake: Condvar,
    shutdown: AtomicBool,
    /// Told after the poller pushed completions, so an event-driven owner (the tokio node)
    /// wakes at once instead of at its next timer tick.
    on_complete: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

pub struct CudaAgent {
    inner: Arc<Inner>,
    poller: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for CudaAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaAgent")
            .field("device", &self.inner.gpu.ordinal())
            .field("local_rank", &self.inner.local_rank)
            .field("local_bytes", &self.inner.local.len())
            .finish()
    }
}

impl CudaAgent {
    /// An agent for the rank `local_rank` whose KV pool is `local`, on `gpu`. Compiles the
    /// copy kernel with NVRTC.
    pub fn new(
        gpu: Arc<Gpu>,
        local_rank: u32,
        local: Region,
        config: CudaAgentConfig,
    ) -> Result<Arc<CudaAgent>, CudaError> {
        let kernel = CopyKernel::new(&gpu)?;
        CudaAgent::with_kernel(gpu, kernel, local_rank, local, config)
    }

    /// As `new`, with a kernel loaded from PTX compiled once per process.
    pub fn with_kernel(
        gpu: Arc<Gpu>,
        kernel: CopyKernel,
        local_rank: u32,
        local: Region,
        config: CudaAgentConfig,
    ) -> Result<Arc<CudaAgent>, CudaError> {
        config.kernel.validate()?;
        if kernel.gpu().ordinal() != gpu.ordinal() {
            return Err(CudaError::Invalid("kernel loaded on another device".into()));
        }
        let stream = Stream::new(&gpu)?;
        let inner = Arc::new(Inner {
            gpu,
            kernel,
            stream,
            config,
            local_rank,
            local,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            on_complete: OnceLock::new(),
        });
        let poller = if inner.config.poller_thread {
            let inner = inner.clone();
            Some(
                std::thread::Builder::new()
                    .name("kvferry-backends-poll".into())
                    .spawn(move || inner.run_poller())
                    .map_err(|e| CudaError::Invalid(format!("poller thread: {e}")))?,
            )
        } else {
            None
        };
        Ok(Arc::new(CudaAgent {
            inner,
            poller: Mutex::new(poller),
        }))
    }

    /// Registers (or replaces) the pool of `peer`. Jobs already in flight keep the old one
    /// mapped until they finish.
    pub fn register_peer(&self, peer: PeerId, region: Region) {
        self.inner.lock().peers.insert(peer, region);
    }

    /// Forgets `peer`'s pool; later jobs naming it fail with `PeerUnreachable`.
    pub fn unregister_peer(&self, peer: PeerId) -> bool {
        self.inner.lock().peers.remove(&peer).is_some()
    }

    /// Completes a parked `Send` job once the control plane learns the peer's pull ended (its
    /// Done or Error frame, or the peer's loss). Returns false for an unknown id.
    pub fn peer_finished(&self, id: TransferId, result: Result<u64, AgentError>) -> bool {
        let parked = self.inner.lock().parked.remove(&id);
        match parked {
            Some(p) => {
                let result = match result {
                    Ok(_) if p.cancelled => Err(AgentError::Cancelled),
                    r => r,
                };
                p.done.push(Completion { id, result });
                true
            }
            None => false,
        }
    }

    /// Sets the callback run after completions are pushed by `poll` (at most once per poll).
    /// Returns false if one was set already.
    pub fn set_on_complete(&self, f: impl Fn() + Send + Sync + 'static) -> bool {
        self.inner.on_complete.set(Box::new(f)).is_ok()
    }

    /// Queries finished jobs and pushes their completions. Never blocks on the GPU. Returns the
    /// number of jobs still on the GPU.
    pub fn poll(&self) -> usize {
        self.inner.poll()
    }

    /// Jobs on the GPU plus parked sends.
    pub fn pending(&self) -> usize {
        let st = self.inner.lock();
        st.in_flight.len() + st.parked.len()
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.inner.gpu
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("cuda agent state poisoned")
    }

    fn run_poller(self: Arc<Self>) {
        if self.gpu.bind().is_err() {
            return;
        }
        while !self.shutdown.load(Ordering::Acquire) {
            if self.poll() > 0 {
                if self.config.poll_interval.is_zero() {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(self.config.poll_interval);
                }
                continue;
            }
            // Idle: sleep until a submit wakes us. Emptiness is checked under the lock that
            // submit holds while pushing, so a wake-up cannot be lost.
            let st = self.lock();
            if st.in_flight.is_empty() && !self.shutdown.load(Ordering::Acquire) {
                let _ = self.wake.wait_timeout(st, Duration::from_millis(50));
            }
        }
    }

    fn poll(&self) -> usize {
        let mut st = self.lock();
        let before = st.in_flight.len();
        let left = self.poll_locked(&mut st);
        drop(st);
        if left < before {
            if let Some(f) = self.on_complete.get() {
                f();
            }
        }
        left
    }

    fn poll_locked(&self, st: &mut State) -> usize {
        if st.in_flight.is_empty() {
            return 0;
        }
        if let Err(e) = self.gpu.bind() {
            Self::fail_all(st, e.to_string());
            return 0;
        }
        while let Some(front) = st.in_flight.front() {
            match front.event.query() {
                Ok(true) => {
                    let job = st.in_flight.pop_front().expect("front exists");
                    let result = if job.cancelled {
                        Err(AgentError::Cancelled)
                    } else {
                        Ok(job.bytes)
                    };
                    job.done.push(Completion { id: job.id, result });
                    st.free_descs.push(job.desc);
                }
                Ok(false) => break,
                Err(e) => {
                    Self::fail_all(st, e.to_string());
                    break;
                }
            }
        }
        st.in_flight.len()
    }

    /// The context is unusable: every job on it ends with the error (once each).
    fn fail_all(st: &mut State, msg: String) {
        for job in st.in_flight.drain(..) {
            job.done.push(Completion {
                id: job.id,
                result: Err(AgentError::Backend(msg.clone())),
            });
        }
        st.failed = Some(msg);
    }

    fn desc_buf(&self, st: &mut State, n: usize) -> Result<DescBuf, CudaError> {
        if let Some(i) = st.free_descs.iter().position(|d| d.cap >= n) {
            return Ok(st.free_descs.swap_remove(i));
        }
        let cap = n.next_power_of_two().max(1024);
        Ok(DescBuf {
            host: PinnedBuffer::alloc(&self.gpu, cap * PIECE_BYTES)?,
            dev: DeviceBuffer::alloc(&self.gpu, cap * PIECE_BYTES)?,
            cap,
        })
    }

    fn start(
        &self,
        st: &mut State,
        job: &TransferJob,
        src: &Region,
        dst: &Region,
        src_rank: u32,
    ) -> Result<(u64, Option<(Event, DescBuf)>), CudaError> {
        let mut pieces = std::mem::take(&mut st.scratch);
        pieces.clear();
        let piece = self.config.kernel.piece_bytes;
        let mut bytes = 0u64;
        for (index, f) in job.plan.fragments_from(src_rank).enumerate() {
            for (side, offset, size) in [
                ("source", f.src_offset, src.len()),
                ("destination", f.dst_offset, dst.len()),
            ] {
                if offset.checked_add(f.len).is_none_or(|end| end > size) {
                    st.scratch = pieces;
                    return Err(CudaError::OutOfBounds {
                        index,
                        side,
                        offset,
                        len: f.len,
                        size,
                    });
                }
            }
            split_into_pieces(
                src.base() + f.src_offset,
                dst.base() + f.dst_offset,
                f.len,
                piece,
                &mut pieces,
            );
            bytes += f.len;
        }
        let launched = if pieces.is_empty() {
            None
        } else {
            let r = self.launch(st, &pieces);
            match r {
                Ok(x) => Some(x),
                Err(e) => {
                    st.scratch = pieces;
                    return Err(e);
                }
            }
        };
        st.scratch = pieces;
        Ok((bytes, launched))
    }

    fn launch(&self, st: &mut State, pieces: &[CopyPiece]) -> Result<(Event, DescBuf), CudaError> {
        self.gpu.bind()?;
        let mut desc = self.desc_buf(st, pieces.len())?;
        let len = pieces.len() * PIECE_BYTES;
        encode_pieces(pieces, &mut desc.host.as_mut_slice()[..len]);
        let event = Event::new(&self.gpu, false)?;
        let r = desc
            .host
            .upload(desc.dev.ptr(), len, &self.stream)
            .and_then(|_| {
                self.kernel.launch(
                    &self.stream,
                    desc.dev.ptr(),
                    pieces.len() as u64,
                    &self.config.kernel,
                )
            })
            .and_then(|_| event.record(&self.stream));
        match r {
            Ok(()) => Ok((event, desc)),
            Err(e) => {
                // The upload may be queued: this buffer is not reusable until the stream passes.
                let _ = self.stream.synchronize();
                st.free_descs.push(desc);
                Err(e)
            }
        }
    }
}

impl TransferAgent for CudaAgent {
    fn submit(&self, job: TransferJob, done: CompletionQueue) -> Result<(), AgentError> {
        let inner = &self.inner;
        if inner.shutdown.load(Ordering::Acquire) {
            return Err(AgentError::ShutDown);
        }
        let mut st = inner.lock();
        if let Some(msg) = &st.failed {
            return Err(AgentError::Backend(format!("agent failed earlier: {msg}")));
        }
        let (peer, push) = match job.direction {
            Direction::Receive { from } => (from, false),
            Direction::Send { to } => (to, true),
        };
        let remote = match st.peers.get(&peer) {
            Some(r) => r.clone(),
            None if push => {
                // Pull mode: the peer copies out of our pool; we only keep the job open.
                if st.parked.contains_key(&job.id) {
                    return Err(AgentError::Backend(format!("duplicate {:?}", job.id)));
                }
                st.parked.insert(
                    job.id,
                    Parked {
                        done,
                        cancelled: false,
                    },
                );
                return Ok(());
            }
            None => return Err(CudaError::UnknownPeer(peer).into()),
        };
        if st.in_flight.len() >= inner.config.max_in_flight {
            return Err(AgentError::Backend(format!(
                "{} jobs in flight (limit)",
                st.in_flight.len()
            )));
        }
        let local = inner.local.clone();
        let (src, dst, src_rank) = if push {
            (&local, &remote, inner.local_rank)
        } else {
            (&remote, &local, peer.rank)
        };
        let (bytes, launched) = inner.start(&mut st, &job, src, dst, src_rank)?;
        match launched {
            None => done.push(Completion {
                id: job.id,
                result: Ok(0),
            }),
            Some((event, desc)) => {
                st.in_flight.push_back(InFlight {
                    id: job.id,
                    done,
                    bytes,
                    event,
                    desc,
                    cancelled: false,
                    _regions: [local.clone(), remote],
                });
                inner.wake.notify_one();
            }
        }
        Ok(())
    }

    /// A launched kernel cannot be stopped: the job is marked and completes as `Cancelled` when
    /// its event fires, which is also the proof that it no longer writes.
    fn cancel(&self, id: TransferId) {
        let mut st = self.inner.lock();
        if let Some(j) = st.in_flight.iter_mut().find(|j| j.id == id) {
            j.cancelled = true;
        } else if let Some(p) = st.parked.get_mut(&id) {
            p.cancelled = true;
        }
    }
}

impl Drop for CudaAgent {
    /// Teardown waits for the GPU: every launched job completes (with its real result) before
    /// the pools and descriptors it uses are released; parked sends end with `ShutDown`.
    fn drop(&mut self) {
        let inner = &self.inner;
        inner.shutdown.store(true, Ordering::Release);
        inner.wake.notify_all();
        if let Some(h) = self.poller.lock().ok().and_then(|mut p| p.take()) {
            let _ = h.join();
        }
        let _ = inner.stream.synchronize();
        inner.poll();
        let mut st = inner.lock();
        if !st.in_flight.is_empty() {
            // Only reachable if synchronising failed: the context is gone.
            Inner::fail_all(&mut st, "agent torn down with a failed stream".into());
        }
        for (id, p) in st.parked.drain() {
            p.done.push(Completion {
                id,
                result: Err(AgentError::ShutDown),
            });
        }
    }
}
