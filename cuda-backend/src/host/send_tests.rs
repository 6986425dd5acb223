//! The host send path's lifecycle promise: a send job's blocks are read until its last frame
//! is in the kernel, so the job completes only then, and fails if the connection drops its
//! frames unwritten. A send that fits its data queue is queued whole at submit (no task); one
//! that does not runs as a task, and a cancel is honoured between its frames.

use super::agent::HostAgent;
use super::kv::HostKv;
use super::route::DataOut;
use crate::layout::single_rank;
use bytes::BytesMut;
use kvferry_core::agent::{
    AgentError, Completion, CompletionQueue, Direction, TransferAgent, TransferId, TransferJob,
};
use kvferry_core::layout::CacheLayout;
use kvferry_core::plan::TransferPlan;
use kvferry_core::wire::{Decoder, Message};
use kvferry_core::{PeerId, RequestId, TransferToken};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

const TO: PeerId = PeerId {
    instance: 1,
    rank: 0,
};

/// 256 KiB blocks: one block is one `DATA_CHUNK` frame.
fn layout() -> CacheLayout {
    single_rank(4, 2, 128, 64, 2)
}

struct Rig {
    agent: HostAgent,
    kv: Arc<HostKv>,
    /// The peer's data queue, as its connection's writer would drain it.
    queue: mpsc::Receiver<DataOut>,
    done: CompletionQueue,
    plan: Arc<TransferPlan>,
}

fn rig() -> Rig {
    rig_with_queue(32)
}

/// A rig whose data queue holds `frames` frames.
fn rig_with_queue(frames: usize) -> Rig {
    let l = layout();
    let kv = Arc::new(HostKv::new(4, l.block_bytes()));
    for b in 0..4u32 {
        for (i, x) in kv.block(b).iter_mut().enumerate() {
            *x = (i as u32).wrapping_mul(31).wrapping_add(b) as u8;
        }
    }
    let (tx, queue) = mpsc::channel(frames);
    let routes = HashMap::from([(TO, tx)]);
    Rig {
        agent: HostAgent::new(0, kv.clone(), routes, Arc::new(Notify::new())),
        kv,
        queue,
        done: CompletionQueue::new(8),
        // Context blocks 2 then 0: two frames, out of address order.
        plan: Arc::new(TransferPlan::new(&l, &l, &[(2, 1), (0, 3)]).unwrap()),
    }
}

impl Rig {
    fn send(&self) {
        let job = TransferJob {
            id: TransferId(5),
            request: RequestId(8),
            token: TransferToken(1),
            direction: Direction::Send { to: TO },
            plan: self.plan.clone(),
            local_blocks: Vec::new(),
            remote_blocks: Vec::new(),
            bytes: 2 * layout().block_bytes(),
            staging: Default::default(),
        };
        self.agent.submit(job, self.done.clone()).unwrap();
    }

    async fn frame(&mut self) -> DataOut {
        tokio::time::timeout(Duration::from_secs(5), self.queue.recv())
            .await
            .expect("a frame is queued")
            .expect("link open")
    }

    /// The frame as the writer would put it on the wire, decoded by the core.
    fn decode(&self, d: &DataOut) -> Message {
        let mut wire = BytesMut::from(&d.head[..]);
        for &(at, n) in &d.pieces {
            self.kv.for_each_piece(at, n, |s| wire.extend_from_slice(s));
        }
        Decoder::default().decode(&mut wire).unwrap().unwrap()
    }

    async fn completion(&self) -> Option<Completion> {
        for _ in 0..200 {
            let mut v = Vec::new();
            self.done.drain_into(&mut v);
            if let Some(c) = v.pop() {
                assert!(v.is_empty(), "completed more than once");
                return Some(c);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }
}

#[tokio::test]
async fn a_send_completes_only_once_its_last_frame_is_written() {
    let mut r = rig();
    r.send();
    let first = r.frame().await;
    let second = r.frame().await;
    let block = layout().block_bytes();
    for (d, (src, offset)) in [(&first, (2, 0)), (&second, (0, block))] {
        let Message::Data {
            request,
            offset: at,
            payload,
            ..
        } = r.decode(d)
        else {
            panic!("not a data frame")
        };
        assert_eq!((request, at), (RequestId(8), offset));
        assert_eq!(
            &payload[..],
            &r.kv.block(src)[..],
            "frame at {offset} carries block {src}"
        );
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut none = Vec::new();
    r.done.drain_into(&mut none);
    assert!(none.is_empty(), "completed while its frames were unwritten");
    first.written.fire();
    tokio::time::sleep(Duration::from_millis(30)).await;
    r.done.drain_into(&mut none);
    assert!(
        none.is_empty(),
        "completed while its last frame was unwritten"
    );
    second.written.fire();
    let c = r.completion().await.expect("completes once written");
    assert_eq!(c.result, Ok(2 * block));
}

/// A send whose frames all fit its data queue has queued them when `submit` returns, with no
/// task to wait for; one that does not fit queues them from a task, as the queue drains.
#[tokio::test]
async fn a_send_that_fits_its_queue_is_queued_at_submit() {
    let mut r = rig();
    r.send();
    assert!(r.queue.try_recv().is_ok(), "first frame queued at submit");
    assert!(r.queue.try_recv().is_ok(), "second frame queued at submit");
    let mut r = rig_with_queue(1);
    r.send();
    assert!(
        r.queue.try_recv().is_err(),
        "a queue of one frame: the task queues"
    );
    let first = r.frame().await;
    let second = r.frame().await;
    first.written.fire();
    second.written.fire();
    let c = r.completion().await.expect("completes once written");
    assert_eq!(c.result, Ok(2 * layout().block_bytes()));
}

#[tokio::test]
async fn a_send_cancelled_before_its_first_frame_queues_nothing() {
    // Its two frames do not fit a queue of one: it runs as a task.
    let mut r = rig_with_queue(1);
    r.send();
    // The send task has not run yet (this test's runtime has one thread): it sees the flag
    // before queueing anything.
    r.agent.cancel(TransferId(5));
    let c = r.completion().await.expect("completes");
    assert_eq!(c.result, Err(AgentError::Cancelled));
    assert!(r.queue.try_recv().is_err(), "nothing was queued");
}

#[tokio::test]
async fn frames_dropped_unwritten_fail_the_send() {
    let mut r = rig();
    r.send();
    let first = r.frame().await;
    // The connection's writer is gone: the frame it held and the ones still queued are
    // dropped unwritten.
    r.queue.close();
    drop(first);
    while let Ok(d) = r.queue.try_recv() {
        drop(d);
    }
    let c = r
        .completion()
        .await
        .expect("completes when its frames are dropped");
    assert_eq!(c.result, Err(AgentError::PeerUnreachable(TO)));
}
