//! `CudaAgent`: the core's `TransferAgent` over NVLink peer memory.
//!
//! Data path: a job's leg goes into an `Expansion` (its template pieces and block pairs, a few
//! KiB whatever the request's length), uploaded from pinned memory and copied by one launch of
//! the expanding kernel on the agent's stream; an event recorded after the launch is the fence
//! of every job in it. Jobs submitted while a `Batch` is held share one upload and one launch
//! (all legs of a request: one launch). Completions are found by a poller thread that spins on
//! the oldest launch's event for `spin`, then sleeps in the driver until that event fires (a
//! blocking-sync event: no timer wakeups, no sleep granularity added to short jobs), or by
//! `poll()` from a driver that prefers its own loop. Launches share one stream, so they finish
//! in submission order and a poll stops at the first unfinished one: O(completed).
//!
//! Roles, one GPU per process as in production: the generation rank maps each context rank's
//! pool (`IpcMapping`, registered with `register_peer`) and *pulls* on `Receive`. The context
//! rank has no peer region registered, so its `Send` job is parked until the control plane
//! reports that the peer's pull finished (`peer_finished`): until then its blocks stay pinned,
//! which is what keeps a late reader off freed blocks. If a context rank registers the
//! generation pool instead, its `Send` *pushes* with the same kernel; register on one side only.

use super::device::{Event, Gpu, Stream};
use super::error::CudaError;
use super::expand::Expansion;
use super::kernel::{CopyKernel, KernelConfig};
use super::memory::{DeviceBuffer, PinnedBuffer, Region};
use kvferry_core::agent::{
    AgentError, Completion, CompletionQueue, Direction, TransferAgent, TransferId, TransferJob,
};
use kvferry_core::PeerId;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Smallest descriptor buffer: the legs of a typical request fit (a 2,048-token TP4 → TP1
/// request needs about 6 KiB).
const MIN_DESC_BYTES: usize = 16 << 10;

#[derive(Clone, Debug)]
pub struct CudaAgentConfig {
    pub kernel: KernelConfig,
    /// Jobs on the GPU at once; more is refused at submit (never queued unboundedly).
    pub max_in_flight: usize,
    /// How long the poller spins on the oldest launch's event before it sleeps in the driver
    /// until the event fires. Spinning finds a completion within about a microsecond but holds
    /// a core; the blocking wait frees it at the cost of a wakeup (BENCHMARKS.md).
    pub spin: Duration,
    /// Start the poller thread. Without it the owner must call `poll()`.
    pub poller_thread: bool,
}

impl Default for CudaAgentConfig {
    fn default() -> CudaAgentConfig {
        CudaAgentConfig {
            kernel: KernelConfig::default(),
            max_in_flight: 256,
            spin: Duration::from_millis(2),
            poller_thread: true,
        }
    }
}

/// Descriptor staging of one launch: pinned host copy and the device copy the kernel reads.
struct DescBuf {
    host: PinnedBuffer,
    dev: DeviceBuffer,
    cap: usize,
}

/// A job accepted into a launch (or into the batch of the next one).
struct Job {
    id: TransferId,
    done: CompletionQueue,
    bytes: u64,
    cancelled: bool,
    /// Keeps both pools mapped until the kernel finished, even if a peer is unregistered.
    _regions: [Region; 2],
}

/// One launch on the GPU: its event fences every job in it.
struct InFlight {
    jobs: Vec<Job>,
    /// Shared with the poller while it sleeps on it outside the lock.
    event: Arc<Event>,
    desc: DescBuf,
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
    /// Legs accepted but not launched yet: while a `Batch` is held, or within one submit.
    next: Expansion,
    next_jobs: Vec<Job>,
    /// `Batch` guards alive; the launch happens when the last one drops.
    holds: usize,
}

impl State {
    /// Jobs accepted and not completed (parked sends aside).
    fn jobs(&self) -> usize {
        self.next_jobs.len() + self.in_flight.iter().map(|l| l.jobs.len()).sum::<usize>()
    }
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

    /// Jobs accepted and not completed, parked sends included.
    pub fn pending(&self) -> usize {
        let st = self.inner.lock();
        st.jobs() + st.parked.len()
    }

    /// Holds launches back while the returned guard lives: jobs submitted meanwhile (the legs
    /// of one request from several context ranks, say) go to the GPU as one upload and one
    /// launch when the last guard drops. A launch that fails then ends its jobs with the error.
    pub fn batch(&self) -> Batch<'_> {
        self.inner.lock().holds += 1;
        Batch { agent: self }
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.inner.gpu
    }
}

/// See `CudaAgent::batch`.
#[must_use = "jobs are launched when the batch drops"]
pub struct Batch<'a> {
    agent: &'a CudaAgent,
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        let inner = &self.agent.inner;
        let mut st = inner.lock();
        st.holds -= 1;
        if st.holds == 0 {
            inner.launch_or_fail(&mut st);
        }
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
            if self.poll() == 0 {
                // Idle: sleep until a submit wakes us. Emptiness is checked under the lock
                // that submit holds while pushing, so a wake-up cannot be lost.
                let st = self.lock();
                if st.in_flight.is_empty() && !self.shutdown.load(Ordering::Acquire) {
                    let _ = self.wake.wait_timeout(st, Duration::from_millis(50));
                }
                continue;
            }
            let oldest = self.lock().in_flight.front().map(|l| l.event.clone());
            if let Some(event) = oldest {
                self.await_event(&event);
            }
        }
    }

    /// Waits for `event` outside the lock (submits and polls go on meanwhile): spins on it for
    /// `spin`, then sleeps in the driver until it fires. An error shows in the next poll.
    fn await_event(&self, event: &Event) {
        let start = Instant::now();
        while start.elapsed() < self.config.spin {
            if !matches!(event.query(), Ok(false)) || self.shutdown.load(Ordering::Acquire) {
                return;
            }
            std::hint::spin_loop();
        }
        let _ = event.synchronize();
    }

    /// Completes finished launches; returns the launches still on the GPU.
    fn poll(&self) -> usize {
        let mut st = self.lock();
        let (completed, left) = self.poll_locked(&mut st);
        drop(st);
        if completed > 0 {
            if let Some(f) = self.on_complete.get() {
                f();
            }
        }
        left
    }

    fn poll_locked(&self, st: &mut State) -> (usize, usize) {
        if st.in_flight.is_empty() {
            return (0, 0);
        }
        if let Err(e) = self.gpu.bind() {
            let n = Self::fail_all(st, e.to_string());
            return (n, 0);
        }
        let mut completed = 0;
        while let Some(front) = st.in_flight.front() {
            match front.event.query() {
                Ok(true) => {
                    let launch = st.in_flight.pop_front().expect("front exists");
                    completed += launch.jobs.len();
                    for job in launch.jobs {
                        let result = if job.cancelled {
                            Err(AgentError::Cancelled)
                        } else {
                            Ok(job.bytes)
                        };
                        job.done.push(Completion { id: job.id, result });
                    }
                    st.free_descs.push(launch.desc);
                }
                Ok(false) => break,
                Err(e) => {
                    completed += Self::fail_all(st, e.to_string());
                    break;
                }
            }
        }
        (completed, st.in_flight.len())
    }

    /// The context is unusable: every job on it ends with the error (once each). Returns how
    /// many ended.
    fn fail_all(st: &mut State, msg: String) -> usize {
        let mut n = 0;
        for launch in st.in_flight.drain(..) {
            for job in launch.jobs {
                job.done.push(Completion {
                    id: job.id,
                    result: Err(AgentError::Backend(msg.clone())),
                });
                n += 1;
            }
        }
        st.failed = Some(msg);
        n
    }

    fn desc_buf(&self, st: &mut State, n: usize) -> Result<DescBuf, CudaError> {
        if let Some(i) = st.free_descs.iter().position(|d| d.cap >= n) {
            return Ok(st.free_descs.swap_remove(i));
        }
        let cap = n.next_power_of_two().max(MIN_DESC_BYTES);
        Ok(DescBuf {
            host: PinnedBuffer::alloc(&self.gpu, cap)?,
            dev: DeviceBuffer::alloc(&self.gpu, cap)?,
            cap,
        })
    }

    /// Launches the accepted legs (`next`) unless a batch holds them; a failed launch ends
    /// their jobs with its error (they were accepted, so they complete, never vanish).
    fn launch_or_fail(&self, st: &mut State) {
        if st.holds > 0 {
            return;
        }
        if let Err(e) = self.launch_next(st) {
            let err = AgentError::from(e);
            for job in st.next_jobs.drain(..) {
                job.done.push(Completion {
                    id: job.id,
                    result: Err(err.clone()),
                });
            }
            st.next.clear();
        }
    }

    /// One upload and one launch for every leg in `next`; its event fences their jobs.
    fn launch_next(&self, st: &mut State) -> Result<(), CudaError> {
        if st.next_jobs.is_empty() {
            return Ok(());
        }
        self.gpu.bind()?;
        let len = st.next.encoded_len();
        let mut desc = self.desc_buf(st, len)?;
        let args = st
            .next
            .encode(&mut desc.host.as_mut_slice()[..len], desc.dev.ptr());
        let event = Arc::new(Event::blocking(&self.gpu)?);
        let r = desc
            .host
            .upload(desc.dev.ptr(), len, &self.stream)
            .and_then(|_| {
                let shape = self.config.kernel.fitted(st.next.largest_piece());
                self.kernel.launch_expand(&self.stream, &args, &shape)
            })
            .and_then(|_| event.record(&self.stream));
        if let Err(e) = r {
            // The upload may be queued: this buffer is not reusable until the stream passes.
            let _ = self.stream.synchronize();
            st.free_descs.push(desc);
            return Err(e);
        }
        st.next.clear();
        let jobs = std::mem::take(&mut st.next_jobs);
        st.in_flight.push_back(InFlight { jobs, event, desc });
        self.wake.notify_one();
        Ok(())
    }

    /// Parks a pull-mode `Send` (the peer copies out of our pool; we keep the job open).
    fn park(st: &mut State, id: TransferId, done: CompletionQueue) -> Result<(), AgentError> {
        if st.parked.contains_key(&id) {
            return Err(AgentError::Backend(format!("duplicate {id:?}")));
        }
        let parked = Parked {
            done,
            cancelled: false,
        };
        st.parked.insert(id, parked);
        Ok(())
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
            None if push => return Inner::park(&mut st, job.id, done),
            None => return Err(CudaError::UnknownPeer(peer).into()),
        };
        if st.jobs() >= inner.config.max_in_flight {
            return Err(AgentError::Backend(format!(
                "{} jobs in flight (limit)",
                st.jobs()
            )));
        }
        let local = inner.local.clone();
        let (src, dst, src_rank) = if push {
            (&local, &remote, inner.local_rank)
        } else {
            (&remote, &local, peer.rank)
        };
        let piece = inner.config.kernel.piece_bytes;
        let bytes = st.next.add_leg(&job.plan, src_rank, (src, dst), piece)?;
        if bytes == 0 {
            done.push(Completion {
                id: job.id,
                result: Ok(0),
            });
            return Ok(());
        }
        st.next_jobs.push(Job {
            id: job.id,
            done,
            bytes,
            cancelled: false,
            _regions: [local.clone(), remote],
        });
        if st.holds == 0 {
            // Unbatched: this job alone, and its launch error is the submit's.
            if let Err(e) = inner.launch_next(&mut st) {
                st.next_jobs.clear();
                st.next.clear();
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// A launched kernel cannot be stopped: the job is marked and completes as `Cancelled` when
    /// its event fires, which is also the proof that it no longer writes.
    fn cancel(&self, id: TransferId) {
        let mut st = self.inner.lock();
        let st = &mut *st;
        let launched = st.in_flight.iter_mut().flat_map(|l| l.jobs.iter_mut());
        if let Some(j) = st.next_jobs.iter_mut().chain(launched).find(|j| j.id == id) {
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
