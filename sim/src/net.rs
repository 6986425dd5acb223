//! The simulated network: control-message links between ranks and the completion collective.
//!
//! Links behave like TCP connections: per-link FIFO, a latency drawn per message from madsim's
//! RNG, messages held (not lost) while a partition or clog blocks the link and delivered once it
//! heals, and dropped when either end's instance incarnation is gone (connection reset).
//! Time, tasks and randomness are madsim's, so a seed replays exactly.

use crate::fabric::PARTITION_POLL;
use crate::world::{World, ROGUE_INSTANCE};
use kvferry_core::collective::{CollectiveError, Contribution};
use kvferry_core::transceiver::Transmit;
use kvferry_core::wire::{ErrorCode, Message};
use kvferry_core::PeerId;
use madsim::rand::Rng;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Messages queued on one link; a full link refuses (backpressure), it never grows.
pub const LINK_QUEUE_MAX: usize = 4096;
/// Base one-way latency range of a control message, microseconds.
pub const LATENCY_US: (u64, u64) = (20, 200);
/// A collective step fails if some rank has not contributed within this (a rank is missing).
pub const COLLECTIVE_TIMEOUT_US: u64 = 400;
/// How often a rank waiting in the collective looks for the step's outcome.
pub const COLLECTIVE_POLL: Duration = Duration::from_micros(40);
/// Collective rounds remembered behind the newest one.
pub const COLLECTIVE_HISTORY: u64 = 64;

/// Why a control message was not queued on its link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendError {
    /// The receiving instance incarnation is gone (a crash resets its connections).
    Unreachable,
    /// The link holds `LINK_QUEUE_MAX` messages already.
    Backpressure,
}

/// Puts one of `from`'s transmits on its link, behind the link's latency.
pub fn send(world: &Arc<World>, from: PeerId, t: Transmit) -> Result<(), SendError> {
    let Transmit { to, msg } = t;
    if !world.is_alive(to.instance) {
        return Err(SendError::Unreachable);
    }
    let now = world.now_us();
    let lat = madsim::rand::thread_rng().gen_range(LATENCY_US.0..LATENCY_US.1);
    let mut f = world.fabric.lock().expect("fabric lock");
    let at = now + lat + f.spike_us;
    let link = f.links.entry((from, to)).or_default();
    if link.queue.len() >= LINK_QUEUE_MAX {
        return Err(SendError::Backpressure);
    }
    let at = at.max(link.last_at + 1);
    link.last_at = at;
    // Any Cancel or Error may end a request on a peer bound to it; only a Cancel or an Error
    // `Cancelled` is what a rank tells its peers when it gives a request up (other codes
    // refuse a RequestInfo).
    if let Message::RequestInfo(info) = &msg {
        let id = info.request;
        world.coverage(|c| c.asked(id));
    }
    let abort = match &msg {
        Message::Cancel { request, .. } => Some((*request, true)),
        Message::Error { request, code, .. } => Some((*request, *code == ErrorCode::Cancelled)),
        _ => None,
    };
    link.queue.push_back((at, msg));
    if !link.pumping {
        link.pumping = true;
        madsim::task::spawn(pump(world.clone(), from, to));
    }
    drop(f);
    if let Some((request, gives_up)) = abort {
        // What the I9 check of a peer-aborted request looks for (see `checker`).
        world
            .checker
            .lock()
            .expect("checker lock")
            .abort_sent(request, (from, gives_up), to, now);
    }
    Ok(())
}

/// Delivers one link's messages in order.
async fn pump(world: Arc<World>, from: PeerId, to: PeerId) {
    loop {
        let next = {
            let mut f = world.fabric.lock().expect("fabric lock");
            let link = f.links.get_mut(&(from, to)).expect("pumped link exists");
            match link.queue.pop_front() {
                Some(m) => m,
                None => {
                    link.pumping = false;
                    return;
                }
            }
        };
        let (at, msg) = next;
        let now = world.now_us();
        if at > now {
            madsim::time::sleep(Duration::from_micros(at - now)).await;
        }
        if !wait_unblocked(&world, from, to).await {
            continue; // one end died silently: the message vanishes, nobody is told
        }
        // A reset connection loses what was in flight: either end gone drops the message.
        if world.is_alive(from.instance) || from.instance == ROGUE_INSTANCE {
            if let Some(mailbox) = world.mailbox(to) {
                mailbox.deliver(from, msg);
            }
        }
    }
}

/// Holds a message while its link is blocked; false if it is silenced instead (then it never
/// arrives: polling on would only burn time).
async fn wait_unblocked(world: &World, from: PeerId, to: PeerId) -> bool {
    loop {
        {
            let f = world.fabric.lock().expect("fabric lock");
            if f.silenced(from, to) {
                return false;
            }
            if !f.blocked(from, to) {
                return true;
            }
        }
        madsim::time::sleep(PARTITION_POLL).await;
    }
}

#[derive(Debug)]
struct Round {
    got: Vec<Option<Contribution>>,
    deadline_us: u64,
    outcome: Option<Result<Vec<Contribution>, CollectiveError>>,
}

/// Per-instance rendezvous of the completion collective. A round's outcome is decided once,
/// for every rank alike: all contributions, or a timeout naming the missing ranks. Deciding
/// once is what keeps ranks from disagreeing on which requests ended.
#[derive(Debug)]
pub struct Barrier {
    world: usize,
    rounds: BTreeMap<u64, Round>,
}

impl Barrier {
    pub fn new(world: usize) -> Barrier {
        Barrier {
            world,
            rounds: BTreeMap::new(),
        }
    }

    /// Whether a round is open: some rank entered it and it is undecided, or the last of the
    /// `wanted` rounds (rounds are taken in order) has no outcome yet.
    pub fn open(&self, wanted: u64) -> bool {
        let undecided = |r: &Round| r.outcome.is_none();
        let last = wanted
            .checked_sub(1)
            .is_some_and(|n| self.rounds.get(&n).is_none_or(undecided));
        last || self.rounds.values().any(undecided)
    }
}

/// One rank's handle on its instance's barrier. Rounds are counted per rank: a rank that
/// skips a collective falls out of step with its peers for good, as with a real collective.
#[derive(Debug)]
pub struct SimCollective {
    pub world: Arc<World>,
    pub barrier: Arc<Mutex<Barrier>>,
    pub next_round: u64,
}

impl SimCollective {
    /// Ranks of the instance.
    pub fn world_size(&self) -> usize {
        self.barrier.lock().expect("barrier lock").world
    }

    /// Gathers every rank's contribution to this rank's next round, in rank order, or fails
    /// when a rank is missing past `COLLECTIVE_TIMEOUT_US`.
    pub fn all_gather(
        &mut self,
        mine: Contribution,
    ) -> impl std::future::Future<Output = Result<Vec<Contribution>, CollectiveError>> + Send {
        let round = self.next_round;
        self.next_round += 1;
        let barrier = self.barrier.clone();
        let clock = self.world.clone();
        async move {
            let now = clock.now_us();
            {
                let mut b = barrier.lock().expect("barrier lock");
                let world = b.world;
                let r = b.rounds.entry(round).or_insert_with(|| Round {
                    got: vec![None; world],
                    deadline_us: now + COLLECTIVE_TIMEOUT_US,
                    outcome: None,
                });
                let rank = mine.rank as usize;
                assert!(rank < world, "rank {rank} outside a world of {world}");
                if r.outcome.is_none() {
                    r.got[rank] = Some(mine);
                    if r.got.iter().all(Option::is_some) {
                        r.outcome = Some(Ok(r.got.iter().flatten().cloned().collect()));
                    }
                }
                let newest = *b.rounds.keys().next_back().expect("just inserted");
                while b
                    .rounds
                    .first_key_value()
                    .is_some_and(|(k, _)| k + COLLECTIVE_HISTORY < newest)
                {
                    b.rounds.pop_first();
                }
            }
            loop {
                {
                    let mut b = barrier.lock().expect("barrier lock");
                    let now = clock.now_us();
                    let Some(r) = b.rounds.get_mut(&round) else {
                        return Err(CollectiveError::Aborted(format!("round {round} forgotten")));
                    };
                    if r.outcome.is_none() && now >= r.deadline_us {
                        let missing = (0..r.got.len() as u32)
                            .filter(|i| r.got[*i as usize].is_none())
                            .collect();
                        r.outcome = Some(Err(CollectiveError::Timeout {
                            step: round,
                            missing,
                        }));
                    }
                    if let Some(o) = &r.outcome {
                        return o.clone();
                    }
                }
                madsim::time::sleep(COLLECTIVE_POLL).await;
            }
        }
    }
}
