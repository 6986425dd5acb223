//! Landing one `Data` frame's payload as it comes off the socket. The connection decodes the
//! frame's head first; the payload then goes straight from the kernel into the receive job's
//! KV blocks (no copy through the receive buffer), and its CRC is computed over each piece just
//! after it lands, while it is still in cache.
//!
//! Every write happens under the agent's `recv` lock with the job still in the table, the same
//! rule as `HostAgent::land`: a job cancelled between two reads of one frame gets no byte after
//! its completion is pushed, and the rest of the frame is read, checked and dropped. Bytes are
//! counted as received only once the frame's CRC verifies, so a corrupt frame never completes
//! a job (the connection is closed, which fails it).

use super::agent::{Cursor, DataError, HostAgent};
use super::early::Key;
use bytes::Bytes;
use kvferry_core::agent::TransferId;
use kvferry_core::wire::{DataHead, WireError};
use kvferry_core::PeerId;
use std::io::{self, IoSliceMut};
use thiserror::Error;

/// Largest piece of a dropped payload read at once.
const DISCARD_CHUNK: usize = 64 << 10;
/// Fragments one read may land in (one `readv`; Linux takes up to 1024 slices).
const MAX_RANGES_PER_FILL: usize = 64;

/// Feeds the first `n` bytes of `bufs` (just read into them) to the frame's checksum.
fn checksum(head: &mut DataHead, bufs: &[IoSliceMut<'_>], mut n: usize) {
    for b in bufs {
        let k = n.min(b.len());
        head.update(&b[..k]);
        n -= k;
    }
}

#[derive(Debug, Error)]
pub enum LandError {
    /// The frame is corrupt: the stream cannot be trusted any more.
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Data(#[from] DataError),
}

#[derive(Debug)]
enum Sink {
    /// Into receive job `id`: `cursor` (fragment, bytes of it written) runs ahead of the job's
    /// own until the frame verifies.
    Job {
        key: Key,
        id: TransferId,
        cursor: Cursor,
    },
    /// No receive posted yet: kept whole, then landed or parked by `on_data`.
    Early(Vec<u8>),
    /// Nobody wants it (cancelled, failed, refused): read, checked, forgotten.
    Discard(Vec<u8>),
}

/// One data frame's payload on its way in; see the module docs.
#[derive(Debug)]
pub struct Landing<'a> {
    agent: &'a HostAgent,
    from: PeerId,
    head: DataHead,
    sink: Sink,
    refused: Option<DataError>,
}

impl HostAgent {
    /// Starts landing the payload of `head`, sent by `from`. If the frame is refused (see
    /// `refused`), its payload must still be consumed (it is then dropped) unless the caller
    /// closes the connection.
    pub fn land_from(&self, from: PeerId, head: DataHead) -> Landing<'_> {
        let key = (head.request, head.ctx_rank);
        let mut refused = None;
        let sink = match self.check_chunk(key, from, head.offset, head.payload_len as u64) {
            Ok(Some((id, cursor))) => Sink::Job { key, id, cursor },
            Ok(None) => Sink::Early(Vec::new()),
            Err(e) => {
                refused = Some(e);
                Sink::Discard(Vec::new())
            }
        };
        Landing {
            agent: self,
            from,
            head,
            sink,
            refused,
        }
    }
}

impl Landing<'_> {
    /// Why the frame is being dropped rather than landed, if it was refused outright.
    pub fn refused(&self) -> Option<&DataError> {
        self.refused.as_ref()
    }

    /// Payload bytes still to come.
    pub fn left(&self) -> usize {
        self.head.left()
    }

    /// Lands the next payload bytes: `read` fills the slices it is given (in order, never all
    /// empty) and returns how many bytes it wrote, as `Read::read_vectored` does. Returns that
    /// count; `Ok(0)` means `read` had nothing (end of stream). Panics with nothing `left`.
    pub fn fill(
        &mut self,
        read: impl FnOnce(&mut [IoSliceMut<'_>]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let left = self.head.left();
        assert!(left > 0, "fill past the end of the payload");
        let (agent, head) = (self.agent, &mut self.head);
        match &mut self.sink {
            Sink::Job { key, id, cursor } => {
                let recv = agent.recv_jobs();
                let Some(job) = recv.get(key).filter(|j| j.id == *id) else {
                    // Completed (cancelled, its peer lost) since the last piece.
                    drop(recv);
                    self.sink = Sink::Discard(Vec::new());
                    return self.fill(read);
                };
                let ranges = job.ranges(*cursor, left as u64, MAX_RANGES_PER_FILL);
                let n = agent.kv().with_ranges_mut(&ranges, |bufs| {
                    let n = read(bufs)?;
                    checksum(head, bufs, n);
                    io::Result::Ok(n)
                })?;
                *cursor = job.advance(*cursor, n as u64);
                Ok(n)
            }
            Sink::Early(kept) => {
                if kept.is_empty() {
                    kept.resize(left, 0);
                }
                let at = kept.len() - left;
                let n = read(&mut [IoSliceMut::new(&mut kept[at..])])?;
                head.update(&kept[at..at + n]);
                Ok(n)
            }
            Sink::Discard(scratch) => {
                if scratch.is_empty() {
                    scratch.resize(left.min(DISCARD_CHUNK), 0);
                }
                let max = left.min(scratch.len());
                let n = read(&mut [IoSliceMut::new(&mut scratch[..max])])?;
                head.update(&scratch[..n]);
                Ok(n)
            }
        }
    }

    /// Checks the CRC once the whole payload is in, then counts the bytes as received (which
    /// completes the job on its last byte). `Ok(false)`: the payload was dropped or parked.
    pub fn finish(self) -> Result<bool, LandError> {
        let Landing {
            agent,
            from,
            head,
            sink,
            ..
        } = self;
        let (request, ctx_rank, offset, len) =
            (head.request, head.ctx_rank, head.offset, head.payload_len);
        head.verify()?;
        Ok(match sink {
            Sink::Job { key, id, cursor } => agent.commit_chunk(key, id, cursor, len as u64),
            Sink::Early(kept) => {
                agent.on_data(from, request, ctx_rank, offset, &Bytes::from(kept))?
            }
            Sink::Discard(_) => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::iov::copy_into;
    use crate::host::kv::HostKv;
    use crate::host::route::DataOut;
    use crate::layout::single_rank;
    use bytes::BytesMut;
    use kvferry_core::agent::{
        Completion, CompletionQueue, Direction, TransferAgent, TransferId, TransferJob,
    };
    use kvferry_core::layout::CacheLayout;
    use kvferry_core::plan::TransferPlan;
    use kvferry_core::wire::{encode, Decoder, Message};
    use kvferry_core::{RequestId, TransferToken};
    use std::collections::HashMap;
    use std::sync::Arc;
    use tokio::sync::{mpsc, Notify};

    const FROM: PeerId = PeerId {
        instance: 0,
        rank: 0,
    };

    fn layout() -> CacheLayout {
        single_rank(2, 1, 32, 4, 2)
    }

    struct Rig {
        agent: HostAgent,
        kv: Arc<HostKv>,
        done: CompletionQueue,
        /// The request's bytes in send order: gen blocks 3 then 1.
        bytes: Vec<u8>,
        /// Keeps the peer's data queue open: a receive needs its peer connected.
        _queue: mpsc::Receiver<DataOut>,
    }

    impl Rig {
        fn new() -> Rig {
            let block = layout().block_bytes();
            let kv = Arc::new(HostKv::new(4, block));
            let (tx, rx) = mpsc::channel(1);
            let routes = HashMap::from([(FROM, tx)]);
            let agent = HostAgent::new(0, kv.clone(), routes, Arc::new(Notify::new()));
            let bytes = (0..2 * block).map(|i| (i * 13 + 5) as u8).collect();
            Rig {
                agent,
                kv,
                done: CompletionQueue::new(8),
                bytes,
                _queue: rx,
            }
        }

        fn post(&self) {
            let l = layout();
            let plan = TransferPlan::new(&l, &l, &[(0, 3), (2, 1)]).unwrap();
            let job = TransferJob {
                id: TransferId(7),
                request: RequestId(1),
                token: TransferToken(1),
                direction: Direction::Receive { from: FROM },
                plan: Arc::new(plan),
                local_blocks: Vec::new(),
                remote_blocks: Vec::new(),
                bytes: self.bytes.len() as u64,
                staging: Default::default(),
            };
            self.agent.submit(job, self.done.clone()).unwrap();
        }

        /// The head of a data frame carrying `bytes[range]`, and its payload.
        fn frame(&self, at: usize, len: usize) -> (DataHead, BytesMut) {
            let mut buf = BytesMut::new();
            encode(
                &Message::Data {
                    request: RequestId(1),
                    ctx_rank: 0,
                    offset: at as u64,
                    payload: Bytes::copy_from_slice(&self.bytes[at..at + len]),
                },
                &mut buf,
            );
            let head = Decoder::default()
                .decode_data_head(&mut buf)
                .unwrap()
                .unwrap();
            (head, buf)
        }

        /// Lands `payload` through `fill` in pieces of at most `step` bytes.
        fn land(&self, head: DataHead, payload: &[u8], step: usize) -> Result<bool, LandError> {
            let mut l = self.agent.land_from(FROM, head);
            assert!(l.refused().is_none());
            let mut at = 0;
            while l.left() > 0 {
                let end = (at + step).min(payload.len());
                let n = l
                    .fill(|bufs| Ok(copy_into(bufs, &payload[at..end])))
                    .unwrap();
                at += n;
            }
            l.finish()
        }

        fn landed(&self) -> Vec<u8> {
            let block = layout().block_bytes() as usize;
            let mut v = self.kv.block(3).to_vec();
            v.extend_from_slice(&self.kv.block(1));
            assert_eq!(v.len(), 2 * block);
            v
        }

        fn completions(&self) -> Vec<Completion> {
            let mut v = Vec::new();
            self.done.drain_into(&mut v);
            v
        }
    }

    #[tokio::test]
    async fn payload_lands_across_blocks_and_completes_on_the_last_byte() {
        let r = Rig::new();
        r.post();
        let half = r.bytes.len() / 2 + 100; // the first frame ends inside the second block
        let (head, payload) = r.frame(0, half);
        assert!(r.land(head, &payload, 333).unwrap());
        assert!(r.completions().is_empty(), "not all bytes are in yet");
        let (head, payload) = r.frame(half, r.bytes.len() - half);
        assert!(r.land(head, &payload, 4096).unwrap());
        assert_eq!(r.landed(), r.bytes);
        let c = r.completions();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].result, Ok(r.bytes.len() as u64));
    }

    #[tokio::test]
    async fn a_cancel_between_pieces_stops_writes_and_the_rest_is_dropped() {
        let r = Rig::new();
        r.post();
        let (head, payload) = r.frame(0, r.bytes.len());
        let mut l = r.agent.land_from(FROM, head);
        let first = l.fill(|bufs| Ok(copy_into(bufs, &payload[..100]))).unwrap();
        assert_eq!(first, 100);
        r.agent.cancel(TransferId(7));
        let before = r.landed();
        while l.left() > 0 {
            let at = payload.len() - l.left();
            l.fill(|bufs| Ok(copy_into(bufs, &payload[at..]))).unwrap();
        }
        assert!(!l.finish().unwrap(), "a cancelled job takes nothing");
        assert_eq!(
            r.landed(),
            before,
            "no byte written after the cancel's completion"
        );
        assert_eq!(&before[..100], &r.bytes[..100]);
        let c = r.completions();
        assert_eq!(c.len(), 1, "completed once, by the cancel");
        assert!(c[0].result.is_err());
    }

    #[tokio::test]
    async fn a_corrupt_payload_fails_the_frame_and_never_completes_the_job() {
        let r = Rig::new();
        r.post();
        let (head, mut payload) = r.frame(0, r.bytes.len());
        payload[77] ^= 0x40;
        assert!(matches!(
            r.land(head, &payload, 1000),
            Err(LandError::Wire(WireError::Checksum { .. }))
        ));
        assert!(r.completions().is_empty());
        assert_eq!(
            r.agent.receives_pending(),
            1,
            "the job waits for the connection's loss"
        );
    }

    #[tokio::test]
    async fn early_payload_is_held_then_landed_when_the_receive_is_posted() {
        let r = Rig::new();
        let (head, payload) = r.frame(0, r.bytes.len());
        assert!(!r.land(head, &payload, 500).unwrap(), "held, not landed");
        assert_eq!(r.landed(), vec![0; r.bytes.len()]);
        r.post();
        assert_eq!(r.landed(), r.bytes);
        assert_eq!(r.completions().len(), 1);
    }

    #[tokio::test]
    async fn out_of_order_and_foreign_frames_are_refused() {
        let r = Rig::new();
        r.post();
        let (head, _) = r.frame(64, 64);
        let l = r.agent.land_from(FROM, head);
        assert!(matches!(l.refused(), Some(DataError::OutOfOrder { .. })));
        drop(l);
        assert_eq!(
            r.completions().len(),
            1,
            "the out-of-order chunk failed the job"
        );

        r.post();
        let (head, _) = r.frame(0, 64);
        let stranger = PeerId {
            instance: 5,
            ..FROM
        };
        let l = r.agent.land_from(stranger, head);
        assert!(matches!(l.refused(), Some(DataError::ForeignPeer { .. })));
    }
}
