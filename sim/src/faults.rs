//! Swarm fault mixes: each seed draws which fault kinds are on and how often they strike,
//! scaled by the scenario's `fault_rate`. A seed with few kinds on reaches deep states that a
//! uniform mix of everything never would.

use crate::hazard::Forced;
use crate::scenario::Scenario;
use madsim::rand::Rng;
use serde::{Deserialize, Serialize};

/// A crashed instance restarts within this.
pub const MAX_RESTART_MS: u64 = 20;

/// Probabilities: per the horizon's fault tick for timed faults, per event for the others.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct FaultMix {
    pub crash: f64,
    pub partition: f64,
    pub clog: f64,
    pub latency: f64,
    /// Per submitted job.
    pub agent_error: f64,
    /// Per block allocation.
    pub alloc_fail: f64,
    pub recycle: f64,
    pub client_cancel: f64,
    pub rogue_peer: f64,
    /// One direction of a context-generation pair blocked (`asymmetric-partition`).
    pub one_way: f64,
    /// An instance dies without resetting anything (`silent-death`).
    pub silent_death: f64,
    /// Per submitted job: it neither completes nor fails until cancelled (`wedged-agent`).
    pub wedge: f64,
    /// A rank stops reading its control messages for a while (`stalled-reader`).
    pub stall: f64,
    /// Per request: the context side's scheduler evicts its blocks before or during its send.
    pub evict: f64,
    /// Per pull: the reader's "finished" notification to the context side is lost.
    pub lost_notification: f64,
}

impl FaultMix {
    /// Draws this seed's mix. Each kind is on with probability one half (always on where the
    /// scenario is about it), at a rate up to its base rate times `fault_rate`.
    pub fn draw(s: &Scenario) -> FaultMix {
        let rng = &mut madsim::rand::thread_rng();
        let scale = s.fault_rate.clamp(0.0, 10.0);
        let mut pick = |base: f64, forced: bool| -> f64 {
            let on = rng.gen_bool(0.5) || forced;
            let level: f64 = rng.gen_range(0.2..1.0);
            if on && scale > 0.0 {
                (base * level * scale).min(0.95)
            } else {
                0.0
            }
        };
        // A gray fault: always on (at `base` times a level) in its own scenario, off elsewhere.
        let only = |pick: &mut dyn FnMut(f64, bool) -> f64, name: &str, base: f64| {
            if s.name == name {
                pick(base, true)
            } else {
                0.0
            }
        };
        let h = Forced::of(&s.name);
        let crashy = s.name == "crashy" || h.crash;
        let parts = s.name == "partition-heavy";
        FaultMix {
            crash: pick(if crashy { 0.05 } else { 0.012 }, crashy),
            partition: pick(if parts { 0.15 } else { 0.04 }, parts || h.partition),
            clog: pick(if parts { 0.15 } else { 0.04 }, parts),
            latency: pick(0.05, h.latency),
            agent_error: pick(0.08, h.agent_error),
            alloc_fail: pick(0.05, false),
            recycle: pick(0.08, false),
            client_cancel: pick(0.25, h.client_cancel),
            rogue_peer: pick(0.15, false),
            // Drawn only in their own scenarios, so the others' seeds draw what they always did.
            one_way: only(&mut pick, "asymmetric-partition", 0.05),
            silent_death: only(&mut pick, "silent-death", 0.01),
            // Only eviction past a deadline ends a wedged job: without it (the scenario's
            // default is on) a wedge hangs its request by design, which proves nothing.
            wedge: if s.inflight_cancel {
                only(&mut pick, "wedged-agent", 0.05)
            } else {
                0.0
            },
            stall: only(&mut pick, "stalled-reader", 0.03),
            // Drawn only where a hazard is about them, so other scenarios' seeds are unchanged.
            evict: if h.evict { pick(0.3, true) } else { 0.0 },
            lost_notification: if h.lost_notification {
                pick(0.2, true)
            } else {
                0.0
            },
        }
    }

    pub fn none() -> FaultMix {
        FaultMix::default()
    }
}

/// The kinds of fault the simulator injects. The order is the precedence of the progress check
/// (I10, see `checker`): when several faults reached a request that failed, the first in this
/// order is named its cause (one aimed at the request itself before one on its instances, and
/// a fault that stops an instance before one that only slows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FaultKind {
    ClientCancel,
    AllocFail,
    AgentError,
    Crash,
    Partition,
    Clog,
    Recycle,
    Latency,
    /// A peer without the token; never the cause of a failure (I9: it can end nothing).
    RoguePeer,
    /// One direction of a pair blocked: one side hears the other, not the reverse.
    OneWay,
    /// An instance gone without a reset: only heartbeats tell its peers.
    SilentDeath,
    /// A transfer job that neither completes nor fails until cancelled.
    Wedge,
    /// A rank that stops reading its control messages.
    Stall,
    /// The context side's scheduler evicted a request's blocks (aimed at the request).
    Evict,
    /// A pull's "finished" notification was lost (aimed at the request).
    LostNotification,
}

impl FaultKind {
    /// Does this fault take an instance out of the scheduler's choice (until a fresh
    /// incarnation comes up)? Only these can leave a side with no instance to admit on.
    pub fn removes_instance(self) -> bool {
        matches!(self, FaultKind::Crash | FaultKind::SilentDeath)
    }

    /// The name in summaries (`faults`, `failures_by_cause`).
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::ClientCancel => "client-cancel",
            FaultKind::AllocFail => "alloc-fail",
            FaultKind::AgentError => "agent-error",
            FaultKind::Crash => "crash",
            FaultKind::Partition => "partition",
            FaultKind::Clog => "clog",
            FaultKind::Recycle => "recycle",
            FaultKind::Latency => "latency",
            FaultKind::RoguePeer => "rogue-peer",
            FaultKind::OneWay => "one-way-partition",
            FaultKind::SilentDeath => "silent-death",
            FaultKind::Wedge => "wedge",
            FaultKind::Stall => "stalled-reader",
            FaultKind::Evict => "evict",
            FaultKind::LostNotification => "lost-notification",
        }
    }
}
