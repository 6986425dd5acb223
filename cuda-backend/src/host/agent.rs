//! The host `TransferAgent`: a send job queues this rank's fragments as `Message::Data` chunks
//! on the peer's link; a receive job lands incoming chunks in order at the plan's destination
//! offsets and completes when every byte has arrived.
//!
//! Payload bytes are never copied in user space: the link's writer hands them to the kernel
//! straight from the sender's KV blocks (`node::writer`), and the connection's reader has the
//! kernel copy them straight into the receiver's (`landing`). So a send job completes only
//! once its last frame is written: until then its blocks are still being read, and they stay
//! pinned exactly as long as that.
//!
//! Every job completes exactly once (its completion is the fence the transceiver waits for):
//! a send when its task ends, a receive when its last byte lands, when it is cancelled, or when
//! its peer's connection is lost. A receive job is removed from the table under the same lock
//! that writes land under, so no byte is written after its completion is pushed.

use super::early::{Early, EarlyData, Key};
use super::iov::copy_into;
use super::kv::HostKv;
use super::route::{DataOut, DataRoutes, Written};
use bytes::Bytes;
use kvferry_core::agent::{
    AgentError, Completion, CompletionQueue, Direction, TransferAgent, TransferId, TransferJob,
};
use kvferry_core::plan::Fragment;
use kvferry_core::wire::DataSeal;
use kvferry_core::{PeerId, RequestId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use thiserror::Error;
use tokio::sync::mpsc::{self, PermitIterator};
use tokio::sync::{oneshot, Notify};

/// Payload bytes per `Data` frame: large enough to amortise framing and CRC setup, small
/// enough that a cancel or a control frame waits for little.
pub const DATA_CHUNK: usize = 256 << 10;

fn finish(wake: &Notify, done: &CompletionQueue, id: TransferId, result: Result<u64, AgentError>) {
    done.push(Completion { id, result });
    wake.notify_one();
}

/// Why an incoming data frame was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DataError {
    #[error("{request} is received from {expected}, not from this peer")]
    ForeignPeer {
        request: RequestId,
        expected: PeerId,
    },
    #[error("{request}: chunk at offset {offset} (+{len}) but {received} of {total} bytes landed")]
    OutOfOrder {
        request: RequestId,
        offset: u64,
        len: usize,
        received: u64,
        total: u64,
    },
}

/// Where a receive job's next byte goes: its fragment, and the bytes of it already written.
pub(super) type Cursor = (usize, u64);

#[derive(Debug)]
pub(super) struct RecvJob {
    pub(super) id: TransferId,
    from: PeerId,
    frags: Vec<Fragment>,
    total: u64,
    received: u64,
    cursor: Cursor,
    done: CompletionQueue,
}

impl RecvJob {
    /// Pool ranges of the next `len` bytes from `cursor` on (fewer bytes if `max` ranges come
    /// first). Panics past the last fragment: callers check a chunk against `total` first.
    pub(super) fn ranges(&self, mut cursor: Cursor, mut len: u64, max: usize) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        while len > 0 && out.len() < max {
            let f = self.frags[cursor.0];
            let n = (f.len - cursor.1).min(len);
            if n > 0 {
                out.push((f.dst_offset + cursor.1, n));
            }
            len -= n;
            cursor = (cursor.0 + 1, 0);
        }
        out
    }

    /// The cursor `n` bytes further on.
    pub(super) fn advance(&self, mut cursor: Cursor, mut n: u64) -> Cursor {
        while n > 0 {
            let f = self.frags[cursor.0];
            let step = (f.len - cursor.1).min(n);
            n -= step;
            cursor = if cursor.1 + step == f.len {
                (cursor.0 + 1, 0)
            } else {
                (cursor.0, cursor.1 + step)
            };
        }
        cursor
    }
}

#[derive(Debug)]
pub struct HostAgent {
    rank: u32,
    kv: Arc<HostKv>,
    /// The peers' connections (the node's link table).
    routes: Box<dyn DataRoutes>,
    recv: Mutex<HashMap<Key, RecvJob>>,
    /// Chunks that arrived before their receive was posted. Lock order: `recv`, then `early`.
    early: Mutex<EarlyData>,
    /// Cancel flags of running send tasks.
    sends: Arc<Mutex<HashMap<TransferId, Arc<AtomicBool>>>>,
    /// Wakes the driver when a completion is pushed.
    wake: Arc<Notify>,
    rt: tokio::runtime::Handle,
}

impl HostAgent {
    /// Must be created inside a tokio runtime: send jobs run as tasks on it.
    pub fn new(
        rank: u32,
        kv: Arc<HostKv>,
        routes: impl DataRoutes + 'static,
        wake: Arc<Notify>,
    ) -> HostAgent {
        HostAgent {
            rank,
            kv,
            routes: Box::new(routes),
            recv: Mutex::new(HashMap::new()),
            early: Mutex::default(),
            sends: Arc::default(),
            wake,
            rt: tokio::runtime::Handle::current(),
        }
    }

    fn finish(&self, done: &CompletionQueue, id: TransferId, result: Result<u64, AgentError>) {
        finish(&self.wake, done, id, result);
    }

    /// Receive jobs not completed yet.
    pub fn receives_pending(&self) -> usize {
        self.recv_jobs().len()
    }

    /// Lands one data chunk from `from`. Chunks for a request no longer expected here (it was
    /// cancelled or timed out) are dropped: `Ok(false)`.
    pub fn on_data(
        &self,
        from: PeerId,
        request: RequestId,
        ctx_rank: u32,
        offset: u64,
        payload: &Bytes,
    ) -> Result<bool, DataError> {
        let mut recv = self.recv_jobs();
        let key = (request, ctx_rank);
        let landed = self.land(&mut recv, key, from, offset, payload)?;
        if !landed {
            self.early.lock().expect("early lock").push(Early {
                key,
                from,
                offset,
                payload: payload.clone(),
            });
        }
        Ok(landed)
    }

    /// Writes one chunk into its receive job; `Ok(false)` if there is no such job.
    fn land(
        &self,
        recv: &mut HashMap<Key, RecvJob>,
        key: Key,
        from: PeerId,
        offset: u64,
        payload: &Bytes,
    ) -> Result<bool, DataError> {
        let len = payload.len() as u64;
        let Some((id, mut cursor)) = self.check_locked(recv, key, from, offset, len)? else {
            return Ok(false);
        };
        let job = recv.get(&key).expect("checked");
        let ranges = job.ranges(cursor, len, usize::MAX);
        let n = self
            .kv
            .with_ranges_mut(&ranges, |bufs| copy_into(bufs, payload));
        assert_eq!(n, payload.len(), "ranges cover the chunk");
        cursor = job.advance(cursor, len);
        Ok(self.commit_locked(recv, key, id, cursor, len))
    }

    /// Whether a chunk of `len` bytes at `offset` from `from` may land in job `key`: the job's
    /// id and its write cursor if so; `Ok(None)` if there is no such job (yet, or any more).
    /// A chunk out of order fails the job.
    pub(super) fn check_chunk(
        &self,
        key: Key,
        from: PeerId,
        offset: u64,
        len: u64,
    ) -> Result<Option<(TransferId, Cursor)>, DataError> {
        self.check_locked(&mut self.recv_jobs(), key, from, offset, len)
    }

    fn check_locked(
        &self,
        recv: &mut HashMap<Key, RecvJob>,
        key: Key,
        from: PeerId,
        offset: u64,
        len: u64,
    ) -> Result<Option<(TransferId, Cursor)>, DataError> {
        let request = key.0;
        let Some(job) = recv.get(&key) else {
            return Ok(None);
        };
        if job.from != from {
            return Err(DataError::ForeignPeer {
                request,
                expected: job.from,
            });
        }
        if offset != job.received || job.received + len > job.total {
            let err = DataError::OutOfOrder {
                request,
                offset,
                len: len as usize,
                received: job.received,
                total: job.total,
            };
            let job = recv.remove(&key).expect("present");
            self.finish(
                &job.done,
                job.id,
                Err(AgentError::Rejected(err.to_string())),
            );
            return Err(err);
        }
        Ok(Some((job.id, job.cursor)))
    }

    /// Counts `len` bytes written up to `cursor` as received by job `id` (completing it on its
    /// last byte); `false` if that job is gone.
    pub(super) fn commit_chunk(&self, key: Key, id: TransferId, cursor: Cursor, len: u64) -> bool {
        self.commit_locked(&mut self.recv_jobs(), key, id, cursor, len)
    }

    fn commit_locked(
        &self,
        recv: &mut HashMap<Key, RecvJob>,
        key: Key,
        id: TransferId,
        cursor: Cursor,
        len: u64,
    ) -> bool {
        let Some(job) = recv.get_mut(&key).filter(|j| j.id == id) else {
            return false;
        };
        job.cursor = cursor;
        job.received += len;
        if job.received == job.total {
            let job = recv.remove(&key).expect("present");
            self.finish(&job.done, job.id, Ok(job.total));
        }
        true
    }

    /// The receive jobs; writes into their blocks happen under this lock (see the module docs).
    pub(super) fn recv_jobs(&self) -> MutexGuard<'_, HashMap<Key, RecvJob>> {
        self.recv.lock().expect("recv lock")
    }

    pub(super) fn kv(&self) -> &HostKv {
        &self.kv
    }

    /// The connection to `peer` is gone: its receive jobs fail now (send jobs fail when their
    /// next frame finds the link closed, or their queued frames are dropped unwritten).
    pub fn peer_lost(&self, peer: PeerId) {
        let mut recv = self.recv_jobs();
        let lost: Vec<_> = recv
            .iter()
            .filter(|(_, j)| j.from == peer)
            .map(|(k, _)| *k)
            .collect();
        for k in lost {
            let job = recv.remove(&k).expect("present");
            self.finish(&job.done, job.id, Err(AgentError::PeerUnreachable(peer)));
        }
        self.early.lock().expect("early lock").forget_peer(peer);
    }

    fn submit_receive(
        &self,
        job: TransferJob,
        from: PeerId,
        done: CompletionQueue,
    ) -> Result<(), AgentError> {
        // A receive from a peer already gone would wait forever: `peer_lost` has swept.
        if self.routes.data_queue(from).is_none() {
            return Err(AgentError::PeerUnreachable(from));
        }
        let frags: Vec<Fragment> = job.plan.fragments_from(from.rank).collect();
        if let Some(f) = frags
            .iter()
            .find(|f| !self.kv.contains(f.dst_offset, f.len))
        {
            return Err(AgentError::StaleBlock(format!(
                "fragment at {} (+{}) is outside the KV pool",
                f.dst_offset, f.len
            )));
        }
        let total: u64 = frags.iter().map(|f| f.len).sum();
        let mut recv = self.recv_jobs();
        let key = (job.request, from.rank);
        if recv.contains_key(&key) {
            return Err(AgentError::Backend(format!(
                "{} already has a receive from rank {}",
                job.request, from.rank
            )));
        }
        if total == 0 {
            drop(recv);
            self.finish(&done, job.id, Ok(0));
            return Ok(());
        }
        recv.insert(
            key,
            RecvJob {
                id: job.id,
                from,
                frags,
                total,
                received: 0,
                cursor: (0, 0),
                done,
            },
        );
        let early = self.early.lock().expect("early lock").take(key);
        for e in early {
            // Chunks of this request from another peer are foreign: drop them.
            if e.from == from {
                if let Err(err) = self.land(&mut recv, key, e.from, e.offset, &e.payload) {
                    tracing::warn!(request = %key.0, peer = %from, error = %err, "early data refused");
                }
            }
        }
        Ok(())
    }

    fn submit_send(
        &self,
        job: TransferJob,
        to: PeerId,
        done: CompletionQueue,
    ) -> Result<(), AgentError> {
        let queue = self
            .routes
            .data_queue(to)
            .ok_or(AgentError::PeerUnreachable(to))?;
        let frags: Vec<Fragment> = job.plan.fragments_from(self.rank).collect();
        if let Some(f) = frags
            .iter()
            .find(|f| !self.kv.contains(f.src_offset, f.len))
        {
            return Err(AgentError::StaleBlock(format!(
                "fragment at {} (+{}) is outside the KV pool",
                f.src_offset, f.len
            )));
        }
        let frames = frames(&frags, DATA_CHUNK as u64);
        if let Ok(permits) = queue.try_reserve_many(frames.len().max(1)) {
            self.queue_all(permits, frames, &job, to, done);
            return Ok(());
        }
        let cancel = Arc::new(AtomicBool::new(false));
        self.sends
            .lock()
            .expect("sends lock")
            .insert(job.id, cancel.clone());
        let (kv, sends, wake, rank) = (
            self.kv.clone(),
            self.sends.clone(),
            self.wake.clone(),
            self.rank,
        );
        self.rt.spawn(async move {
            let sender = ChunkSender {
                kv: &kv,
                queue: &queue,
                request: job.request,
                rank,
                to,
                cancel: &cancel,
            };
            let result = sender.run(frames).await;
            sends.lock().expect("sends lock").remove(&job.id);
            finish(&wake, &done, job.id, result);
        });
        Ok(())
    }
}

impl HostAgent {
    /// Queues every frame of a send whose data queue had room for all of them (`permits`):
    /// the last frame's `Written` completes the job, so the send needs no task, and the only
    /// wakeup between submit and completion is the writer's. A cancel cannot take back frames
    /// already queued (nor can it on the task path), so this path has no cancel flag.
    fn queue_all(
        &self,
        permits: PermitIterator<'_, DataOut>,
        frames: Vec<Vec<(u64, u64)>>,
        job: &TransferJob,
        to: PeerId,
        done: CompletionQueue,
    ) {
        let total: u64 = frames.iter().flatten().map(|p| p.1).sum();
        if frames.is_empty() {
            self.finish(&done, job.id, Ok(0));
            return;
        }
        let (n, id, wake) = (frames.len(), job.id, self.wake.clone());
        let mut last = Some(Written::new(move |ok| {
            let result = if ok {
                Ok(total)
            } else {
                Err(AgentError::PeerUnreachable(to))
            };
            finish(&wake, &done, id, result);
        }));
        let mut offset = 0;
        for (i, (permit, pieces)) in permits.zip(frames).enumerate() {
            let written = if i + 1 == n {
                last.take().expect("one last frame")
            } else {
                Written::ignored()
            };
            let frame = sealed(&self.kv, (job.request, self.rank, offset), pieces, written);
            offset += frame.pieces.iter().map(|p| p.1).sum::<u64>();
            permit.send(frame);
        }
    }
}

/// A data frame of `pieces` at `offset` of what `rank` sends for `request`, its CRC computed
/// here, not by the connection's writer: on a runtime of several threads, senders checksum
/// their next frames while the writer copies earlier ones.
fn sealed(
    kv: &Arc<HostKv>,
    (request, rank, offset): (RequestId, u32, u64),
    pieces: Vec<(u64, u64)>,
    written: Written,
) -> DataOut {
    let len: u64 = pieces.iter().map(|p| p.1).sum();
    let len = usize::try_from(len).expect("a data chunk fits in memory");
    let mut seal = DataSeal::new(request, rank, offset, len);
    for &(at, n) in &pieces {
        kv.for_each_piece(at, n, |s| seal.update(s));
    }
    DataOut {
        head: seal.finish(),
        pieces,
        kv: kv.clone(),
        written,
    }
}

/// The fragments' source ranges, in order, cut into frames of `chunk` bytes (the last one
/// shorter): each frame's (pool offset, length) pieces.
fn frames(frags: &[Fragment], chunk: u64) -> Vec<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut frame = Vec::new();
    let mut len = 0;
    for f in frags {
        let mut pos = 0;
        while pos < f.len {
            let take = (f.len - pos).min(chunk - len);
            frame.push((f.src_offset + pos, take));
            (pos, len) = (pos + take, len + take);
            if len == chunk {
                out.push(std::mem::take(&mut frame));
                len = 0;
            }
        }
    }
    if len > 0 {
        out.push(frame);
    }
    out
}

struct ChunkSender<'a> {
    kv: &'a Arc<HostKv>,
    queue: &'a mpsc::Sender<DataOut>,
    request: RequestId,
    rank: u32,
    to: PeerId,
    cancel: &'a AtomicBool,
}

impl ChunkSender<'_> {
    /// Queues the fragments as `DATA_CHUNK`-sized frames, then waits until the last one is in
    /// the kernel: the writer sends them in order, so then every byte is out of the blocks.
    async fn run(&self, frames: Vec<Vec<(u64, u64)>>) -> Result<u64, AgentError> {
        let mut sent = 0u64;
        let mut last = None;
        let mut result = Ok(());
        for pieces in frames {
            let len: u64 = pieces.iter().map(|p| p.1).sum();
            match self.queue(pieces, sent).await {
                Ok(written) => last = Some(written),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            sent += len;
        }
        // Even a failed or cancelled send waits: its queued frames still read its blocks.
        if let Some(written) = last {
            if written.await.is_err() && result.is_ok() {
                result = Err(AgentError::PeerUnreachable(self.to));
            }
        }
        result.map(|()| sent)
    }

    /// Queues one frame of `pieces` at `offset`; returns what fires once it is written.
    async fn queue(
        &self,
        pieces: Vec<(u64, u64)>,
        offset: u64,
    ) -> Result<oneshot::Receiver<()>, AgentError> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(AgentError::Cancelled);
        }
        let (written, rx) = Written::signal();
        let frame = sealed(self.kv, (self.request, self.rank, offset), pieces, written);
        self.queue
            .send(frame)
            .await
            .map_err(|_| AgentError::PeerUnreachable(self.to))?;
        Ok(rx)
    }
}

impl TransferAgent for HostAgent {
    fn submit(&self, job: TransferJob, done: CompletionQueue) -> Result<(), AgentError> {
        match job.direction.clone() {
            Direction::Send { to } => self.submit_send(job, to, done),
            Direction::Receive { from } => self.submit_receive(job, from, done),
        }
    }

    fn cancel(&self, id: TransferId) {
        if let Some(flag) = self.sends.lock().expect("sends lock").get(&id) {
            flag.store(true, Ordering::Relaxed);
            return;
        }
        let mut recv = self.recv_jobs();
        let key = recv.iter().find(|(_, j)| j.id == id).map(|(k, _)| *k);
        if let Some(job) = key.and_then(|k| recv.remove(&k)) {
            self.finish(&job.done, job.id, Err(AgentError::Cancelled));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frag(src_offset: u64, len: u64) -> Fragment {
        Fragment {
            src_rank: 0,
            src_offset,
            dst_offset: 0,
            len,
        }
    }

    #[test]
    fn fragments_are_cut_into_frames_in_order() {
        let frags = [frag(100, 7), frag(0, 0), frag(50, 3), frag(200, 12)];
        assert_eq!(
            frames(&frags, 8),
            vec![
                vec![(100, 7), (50, 1)],
                vec![(51, 2), (200, 6)],
                vec![(206, 6)],
            ]
        );
        assert!(frames(&[], 8).is_empty());
    }
}
