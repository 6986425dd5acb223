//! What reaches a rank from outside its executor: control messages, scheduler commands and
//! recycle orders, each ringing the rank's doorbell. A leaf below the world, so the network
//! and the client can reach a rank without knowing the rank's executor.

use crate::wake::Wake;
use kvferry_core::request::Request;
use kvferry_core::wire::Message;
use kvferry_core::{PeerId, RequestId};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Control messages buffered for one rank between steps.
pub const MAX_INBOX: usize = 8192;
/// Scheduler commands buffered for one rank between steps.
pub const MAX_COMMANDS: usize = 8192;

#[derive(Debug)]
pub enum Command {
    Start(Arc<Request>),
    Cancel(RequestId),
}

/// One rank's inputs and doorbell.
#[derive(Debug)]
pub struct Mailbox {
    pub me: PeerId,
    pub track: String,
    inbox: Mutex<VecDeque<(PeerId, Message)>>,
    cmds: Mutex<VecDeque<Command>>,
    recycle: AtomicBool,
    /// Until when (simulated microseconds) the rank leaves its control messages unread: a
    /// stalled reader (`gray`).
    stalled_until_us: AtomicU64,
    /// Rung by every input above, by the rank's agents on a completion, and by a peer rank
    /// that wants a collective round.
    pub wake: Arc<Wake>,
}

impl Mailbox {
    pub fn new(me: PeerId, track: String) -> Mailbox {
        Mailbox {
            me,
            track,
            inbox: Mutex::new(VecDeque::new()),
            cmds: Mutex::new(VecDeque::new()),
            recycle: AtomicBool::new(false),
            stalled_until_us: AtomicU64::new(0),
            wake: Arc::new(Wake::default()),
        }
    }

    pub fn deliver(&self, from: PeerId, msg: Message) {
        {
            let mut q = self.inbox.lock().expect("inbox lock");
            // A full inbox drops, as a full socket buffer would; the protocol tolerates loss.
            if q.len() >= MAX_INBOX {
                return;
            }
            q.push_back((from, msg));
        }
        self.wake.ring();
    }

    pub fn command(&self, c: Command) {
        {
            let mut q = self.cmds.lock().expect("commands lock");
            assert!(
                q.len() < MAX_COMMANDS,
                "{}: command queue overflow",
                self.track
            );
            q.push_back(c);
        }
        self.wake.ring();
    }

    /// Orders an executor recycle: the rank swaps its agent when it next runs.
    pub fn recycle(&self) {
        self.recycle.store(true, Ordering::Relaxed);
        self.wake.ring();
    }

    pub fn take_commands(&self) -> Vec<Command> {
        self.cmds.lock().expect("commands lock").drain(..).collect()
    }

    pub fn take_messages(&self) -> Vec<(PeerId, Message)> {
        self.inbox.lock().expect("inbox lock").drain(..).collect()
    }

    /// The rank reads no control message before `until_us`.
    pub fn stall_until(&self, until_us: u64) {
        self.stalled_until_us.fetch_max(until_us, Ordering::Relaxed);
    }

    /// Whether the rank leaves its control messages unread at `now_us`.
    pub fn stalled(&self, now_us: u64) -> bool {
        now_us < self.stalled_until_us.load(Ordering::Relaxed)
    }

    pub fn take_recycle(&self) -> bool {
        self.recycle.swap(false, Ordering::Relaxed)
    }
}
