//! Who may talk to whom: partitions, clogs, latency spikes, and the control-message links'
//! queues. Plain data, a leaf: the network (`net`) and the agents' data path read it, the fault
//! injector writes it.

use kvferry_core::wire::Message;
use kvferry_core::PeerId;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

/// How often a message (or a data chunk) held by a partition re-checks its link (TCP
/// retransmit, coarsely).
pub const PARTITION_POLL: Duration = Duration::from_micros(500);

/// One control-message link: its queue, whether a task delivers it, its last delivery time.
#[derive(Debug, Default)]
pub struct Link {
    pub queue: VecDeque<(u64, Message)>,
    pub pumping: bool,
    pub last_at: u64,
}

/// Who may talk to whom, and the messages on their way.
#[derive(Debug, Default)]
pub struct Fabric {
    /// Blocked instance pairs (by incarnation id, both directions).
    partitions: BTreeSet<(u32, u32)>,
    /// Ranks whose every link is clogged.
    clogged: BTreeSet<PeerId>,
    /// Extra latency of a latency spike, microseconds.
    pub spike_us: u64,
    pub links: BTreeMap<(PeerId, PeerId), Link>,
    /// Blocked directions (from incarnation, to incarnation): an asymmetric partition.
    one_way: BTreeSet<(u32, u32)>,
    /// Incarnations that died silently: everything to or from them vanishes, for good, and
    /// nothing resets (the heal does not bring them back).
    silent: BTreeSet<u32>,
}

fn pair(a: u32, b: u32) -> (u32, u32) {
    (a.min(b), a.max(b))
}

impl Fabric {
    pub fn blocked(&self, from: PeerId, to: PeerId) -> bool {
        self.partitions.contains(&pair(from.instance, to.instance))
            || self.clogged.contains(&from)
            || self.clogged.contains(&to)
            || self.one_way.contains(&(from.instance, to.instance))
            || self.silenced(from, to)
    }

    /// Whether what goes from `from` to `to` vanishes (one end died silently).
    pub fn silenced(&self, from: PeerId, to: PeerId) -> bool {
        self.silent.contains(&from.instance) || self.silent.contains(&to.instance)
    }

    pub fn block_one_way(&mut self, from: u32, to: u32) {
        self.one_way.insert((from, to));
    }

    pub fn unblock_one_way(&mut self, from: u32, to: u32) {
        self.one_way.remove(&(from, to));
    }

    pub fn silence(&mut self, uid: u32) {
        self.silent.insert(uid);
    }

    pub fn partition(&mut self, a: u32, b: u32) {
        self.partitions.insert(pair(a, b));
    }

    pub fn heal(&mut self, a: u32, b: u32) {
        self.partitions.remove(&pair(a, b));
    }

    pub fn clog(&mut self, p: PeerId) {
        self.clogged.insert(p);
    }

    pub fn unclog(&mut self, p: PeerId) {
        self.clogged.remove(&p);
    }

    pub fn heal_all(&mut self) {
        self.partitions.clear();
        self.clogged.clear();
        self.one_way.clear();
        self.spike_us = 0;
    }
}
