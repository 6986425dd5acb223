//! The thread that owns a NIXL agent: every NIXL call (load metadata, post, poll, fetch
//! notifications) happens here, never inside a core call, because posting may do the whole
//! copy in the call and every agent method takes the agent's lock for writing.
//!
//! Callers hand it commands through a bounded queue and collect what ended and what was
//! notified from its outbox (the node's driver does this before each completion step; `wake`
//! tells it there is something). Stopping drains posted READs to a terminal status within
//! `DRAIN_BOUND`, invalidates every peer's metadata, and then frees the agent, its
//! registration and the pool it holds, unless a READ is still unproven over or the owner says
//! a peer may still read the pool: then all of it is leaked on purpose.

use super::engine::{Engine, ReadSpec};
use super::error::NixlError;
use super::jobs::{Ended, JobTable, MAX_IN_FLIGHT};
use kvferry_core::agent::{AgentError, TransferId};
use kvferry_core::PeerId;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Commands queued to the driver before callers are told it is busy.
pub const COMMANDS: usize = 1024;
/// How long teardown waits for posted READs to reach a terminal status.
pub const DRAIN_BOUND: Duration = Duration::from_secs(5);
/// Notifications kept for the owner; past this the newest are dropped (a flooding peer loses
/// its own, the owner's parked sends then end by timeout or peer loss).
pub const MAX_NOTIFS: usize = 4096;
/// Pause between polls while READs are in flight or notifications awaited. A yield-spin
/// instead measured no faster on a loaded 2-core host and burned more CPU (BENCHMARKS.md).
const BUSY_PAUSE: Duration = Duration::from_micros(20);
/// How long a failed READ is held before its owner hears of it. NIXL's errors carry no cause
/// (it is only logged), and a peer's death fails its READs as soon as UCX sees it, often
/// before the node sees its control connection drop, which names the cause; held this long,
/// the failure reaches a node that already knows why. The READ is over: nothing it touches
/// is at risk meanwhile, only its blocks are freed later.
const FAIL_GRACE: Duration = Duration::from_millis(200);
/// Pause between notification fetches when nothing is in flight.
const IDLE_PAUSE: Duration = Duration::from_millis(1);

/// One READ to post for the core's job `id` from `peer`'s pool.
#[derive(Debug)]
pub struct Read {
    pub id: TransferId,
    pub peer: PeerId,
    pub bytes: u64,
    pub pieces: Vec<(u64, u64, u64)>,
    pub notif: Vec<u8>,
}

#[derive(Debug)]
enum Command {
    Load {
        peer: PeerId,
        md: Vec<u8>,
    },
    Read(Read),
    Cancel(TransferId),
    Forget(PeerId),
    /// Wakes an idle thread: the owner began awaiting notifications.
    Nudge,
    Stop {
        leak: bool,
    },
}

type Wake = Box<dyn Fn() + Send + Sync>;

/// What the thread hands its owner.
struct Outbox {
    ended: Mutex<Vec<Ended>>,
    notifs: Mutex<VecDeque<(String, Vec<u8>)>>,
    /// Notifications the owner awaits (its parked sends).
    awaiting: AtomicUsize,
    wake: Wake,
}

pub struct Driver {
    tx: SyncSender<Command>,
    out: Arc<Outbox>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("nixl::Driver").finish_non_exhaustive()
    }
}

impl Driver {
    /// Starts the thread, which builds its engine with `make`; returns the engine's metadata.
    pub fn spawn<E: Engine + 'static>(
        make: impl FnOnce() -> Result<E, NixlError> + Send + 'static,
        wake: impl Fn() + Send + Sync + 'static,
    ) -> Result<(Driver, Vec<u8>), NixlError> {
        let (tx, rx) = mpsc::sync_channel(COMMANDS);
        let out = Arc::new(Outbox {
            ended: Mutex::default(),
            notifs: Mutex::default(),
            awaiting: AtomicUsize::new(0),
            wake: Box::new(wake),
        });
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let thread_out = out.clone();
        let thread = std::thread::Builder::new()
            .name("kvferry-nixl".into())
            .spawn(move || {
                let started = make().and_then(|mut e| e.local_md().map(|md| (e, md)));
                match started {
                    Ok((engine, md)) => {
                        let _ = ready_tx.send(Ok(md));
                        Worker::new(engine, thread_out).run(rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| NixlError::Invalid(format!("driver thread: {e}")))?;
        let md = ready_rx.recv().map_err(|_| NixlError::DriverGone)??;
        let driver = Driver {
            tx,
            out,
            thread: Some(thread),
        };
        Ok((driver, md))
    }

    /// Loads `peer`'s metadata before its next READ (commands run in order).
    pub fn load(&self, peer: PeerId, md: Vec<u8>) -> Result<(), NixlError> {
        self.send(Command::Load { peer, md })
    }

    /// Posts a READ; its end comes back through `take_ended`.
    pub fn read(&self, read: Read) -> Result<(), NixlError> {
        self.send(Command::Read(read))
    }

    /// Best effort (a full queue drops it): the READ then ends with its real result.
    pub fn cancel(&self, id: TransferId) {
        let _ = self.send(Command::Cancel(id));
    }

    /// The owner now awaits `n` notifications. While it awaits any, the thread progresses UCX
    /// as busily as for its own READs: over TCP a peer's READ of this agent's memory moves
    /// only as fast as this side's worker is progressed (it serves the READ's data).
    pub fn awaiting(&self, n: usize) {
        if self.out.awaiting.swap(n, Ordering::Relaxed) == 0 && n > 0 {
            // Best effort: a full queue wakes the thread anyway.
            let _ = self.send(Command::Nudge);
        }
    }

    /// Invalidates `peer`'s metadata once no READ from it is in flight.
    pub fn forget(&self, peer: PeerId) {
        let _ = self.send(Command::Forget(peer));
    }

    pub fn take_ended(&self, out: &mut Vec<Ended>) {
        out.append(&mut self.out.ended.lock().expect("nixl outbox poisoned"));
    }

    pub fn take_notifs(&self, out: &mut Vec<(String, Vec<u8>)>) {
        out.extend(
            self.out
                .notifs
                .lock()
                .expect("nixl outbox poisoned")
                .drain(..),
        );
    }

    /// Drains and stops the thread (see the module doc); `leak` when a peer may still read
    /// the pool. Idempotent.
    pub fn stop(&mut self, leak: bool) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        // Blocking is right here: teardown must not skip the drain.
        if self.tx.send(Command::Stop { leak }).is_ok() {
            let _ = thread.join();
        }
    }

    fn send(&self, c: Command) -> Result<(), NixlError> {
        self.tx.try_send(c).map_err(|e| match e {
            TrySendError::Full(_) => NixlError::Invalid(format!("{COMMANDS} commands queued")),
            TrySendError::Disconnected(_) => NixlError::DriverGone,
        })
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stop(false);
    }
}

struct Worker<E: Engine> {
    engine: E,
    jobs: JobTable<E::Xfer>,
    names: HashMap<PeerId, String>,
    forgetting: Vec<PeerId>,
    /// Failed READs held for `FAIL_GRACE`, oldest first.
    failing: VecDeque<(Instant, Ended)>,
    out: Arc<Outbox>,
}

impl<E: Engine> Worker<E> {
    fn new(engine: E, out: Arc<Outbox>) -> Worker<E> {
        Worker {
            engine,
            jobs: JobTable::new(MAX_IN_FLIGHT),
            names: HashMap::new(),
            forgetting: Vec::new(),
            failing: VecDeque::new(),
            out,
        }
    }

    fn run(mut self, rx: Receiver<Command>) {
        loop {
            match self.next(&rx) {
                Ok(Command::Stop { leak }) => return self.stop(leak),
                Ok(c) => self.command(c),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return self.stop(false),
            }
            while let Ok(c) = rx.try_recv() {
                if let Command::Stop { leak } = c {
                    return self.stop(leak);
                }
                self.command(c);
            }
            self.progress();
        }
    }

    /// The next command, or a timeout when it is time to progress: soon while this agent's
    /// READs or a peer's READs of this agent (awaited notifications) are under way.
    fn next(&self, rx: &Receiver<Command>) -> Result<Command, RecvTimeoutError> {
        let busy = !self.jobs.is_empty() || self.out.awaiting.load(Ordering::Relaxed) > 0;
        rx.recv_timeout(if busy { BUSY_PAUSE } else { IDLE_PAUSE })
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Load { peer, md } => match self.engine.load_remote(&md) {
                Ok(name) => {
                    self.forgetting.retain(|p| *p != peer);
                    self.names.insert(peer, name);
                }
                Err(e) => tracing::warn!(%peer, error = %e, "NIXL metadata not loaded"),
            },
            Command::Read(r) => self.post(r),
            Command::Cancel(id) => {
                self.jobs.cancel(id);
            }
            Command::Forget(peer) => self.forgetting.push(peer),
            Command::Nudge => {}
            Command::Stop { .. } => unreachable!("handled by run"),
        }
    }

    fn post(&mut self, r: Read) {
        let posted = self.jobs.admit(r.id).and_then(|()| {
            let remote = self
                .names
                .get(&r.peer)
                .ok_or(AgentError::PeerUnreachable(r.peer))?;
            let spec = ReadSpec {
                remote: remote.clone(),
                pieces: r.pieces,
                notif: r.notif,
            };
            (self.engine.post_read(&spec)).map_err(|e| AgentError::Backend(e.to_string()))
        });
        match posted {
            Ok(xfer) => self.jobs.insert(r.id, xfer, r.peer, r.bytes),
            Err(e) => self.ended(vec![(r.id, Err(e))]),
        }
    }

    /// Holds new failures back (`FAIL_GRACE`) and lets through those held long enough.
    fn hold_failures(&mut self, ended: Vec<Ended>) -> Vec<Ended> {
        let now = Instant::now();
        let (failed, mut ended): (Vec<Ended>, Vec<Ended>) =
            (ended.into_iter()).partition(|(_, r)| matches!(r, Err(AgentError::Backend(_))));
        self.failing.extend(failed.into_iter().map(|f| (now, f)));
        while let Some((at, _)) = self.failing.front() {
            if now.duration_since(*at) < FAIL_GRACE {
                break;
            }
            ended.extend(self.failing.pop_front().map(|(_, f)| f));
        }
        ended
    }

    /// Polls READs, invalidates peers nothing reads from any more, fetches notifications.
    fn progress(&mut self) {
        let mut ended = Vec::new();
        let engine = &mut self.engine;
        self.jobs.poll(|x| engine.state(x), &mut ended);
        let ended = self.hold_failures(ended);
        self.ended(ended);
        let (jobs, names, engine) = (&self.jobs, &mut self.names, &mut self.engine);
        self.forgetting.retain(|peer| {
            if jobs.reads_from(*peer) {
                return true;
            }
            if let Some(name) = names.remove(peer) {
                engine.invalidate_remote(&name);
            }
            false
        });
        let mut got = Vec::new();
        self.engine.notifications(&mut got);
        if got.is_empty() {
            return;
        }
        let mut q = self.out.notifs.lock().expect("nixl outbox poisoned");
        let room = MAX_NOTIFS.saturating_sub(q.len());
        if got.len() > room {
            tracing::warn!(dropped = got.len() - room, "NIXL notification queue full");
        }
        q.extend(got.into_iter().take(room));
        drop(q);
        (self.out.wake)();
    }

    fn ended(&self, ended: Vec<Ended>) {
        if ended.is_empty() {
            return;
        }
        self.out
            .ended
            .lock()
            .expect("nixl outbox poisoned")
            .extend(ended);
        (self.out.wake)();
    }

    fn stop(mut self, leak: bool) {
        let mut ended: Vec<Ended> = self.failing.drain(..).map(|(_, f)| f).collect();
        let engine = &mut self.engine;
        let stuck = self
            .jobs
            .drain(DRAIN_BOUND, BUSY_PAUSE, |x| engine.state(x), &mut ended);
        self.ended(ended);
        for name in self.names.values() {
            self.engine.invalidate_remote(name);
        }
        if leak || !stuck.is_empty() {
            tracing::warn!(
                stuck = stuck.len(),
                leak,
                "NIXL teardown: leaking the registration and its pool (a peer may still touch it)"
            );
            std::mem::forget(stuck);
            std::mem::forget(self.engine);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nixl::engine::XferState;

    /// A NIXL whose READs end at once: failed when their notification says "fail".
    struct Fake;

    impl Engine for Fake {
        type Xfer = bool;

        fn local_md(&mut self) -> Result<Vec<u8>, NixlError> {
            Ok(b"md".to_vec())
        }
        fn load_remote(&mut self, _md: &[u8]) -> Result<String, NixlError> {
            Ok("peer".into())
        }
        fn invalidate_remote(&mut self, _agent: &str) {}
        fn post_read(&mut self, read: &ReadSpec) -> Result<bool, NixlError> {
            Ok(read.notif == b"fail")
        }
        fn state(&mut self, fails: &bool) -> XferState {
            if *fails {
                XferState::Failed("peer died".into())
            } else {
                XferState::Done
            }
        }
        fn notifications(&mut self, _out: &mut Vec<(String, Vec<u8>)>) {}
    }

    fn read(id: u64, notif: &[u8]) -> Read {
        Read {
            id: TransferId(id),
            peer: PeerId {
                instance: 0,
                rank: 0,
            },
            bytes: 10,
            pieces: Vec::new(),
            notif: notif.to_vec(),
        }
    }

    #[test]
    fn a_failed_read_reaches_the_owner_only_after_the_grace_and_a_good_one_at_once() {
        let (mut driver, md) = Driver::spawn(|| Ok(Fake), || {}).unwrap();
        driver.load(read(0, b"").peer, md).unwrap();
        let posted = Instant::now();
        driver.read(read(1, b"fail")).unwrap();
        driver.read(read(2, b"ok")).unwrap();
        let (mut good_at, mut failed_at) = (None, None);
        let mut out = Vec::new();
        while failed_at.is_none() && posted.elapsed() < DRAIN_BOUND {
            driver.take_ended(&mut out);
            for (id, r) in out.drain(..) {
                let at = Some(posted.elapsed());
                match (id.0, r) {
                    (1, Err(AgentError::Backend(why))) => {
                        assert!(why.contains("peer died"), "{why}");
                        failed_at = at;
                    }
                    (2, Ok(10)) => good_at = at,
                    other => panic!("unexpected end {other:?}"),
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let failed_at = failed_at.expect("the failure was never reported");
        assert!(failed_at >= FAIL_GRACE, "failure held only {failed_at:?}");
        assert!(good_at.expect("the success was never reported") < failed_at);
        driver.stop(false);
    }
}
