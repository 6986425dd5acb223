//! Progress (I10): the cause of every request that did not complete. The rule is stated in the
//! `checker` module docs; this module applies it to what a seed recorded (pure, no madsim).

use crate::faults::FaultKind;
use kvferry_core::transceiver::FailCause;
use kvferry_core::RequestId;
use std::collections::BTreeMap;

/// Whom a fault reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Requests started on any of these incarnations (a crash, a clog, an executor recycle).
    Instances(Vec<u32>),
    /// Requests started on both incarnations (a partition cuts the links between the two).
    Pair(u32, u32),
    /// Every request (a latency spike slows the whole fabric).
    All,
    /// One request (a client cancel, an injected allocation failure or agent error).
    Request(RequestId),
    /// Nobody: a rogue peer has no authority over any request (I9).
    Nobody,
}

/// A fault as the progress check sees it: what, when, whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footprint {
    pub kind: FaultKind,
    pub from_us: u64,
    /// Last moment it acts, inclusive: `from_us` for an instant fault, `u64::MAX` for a crash
    /// (the incarnation never comes back, so it reaches its requests however long they live).
    pub until_us: u64,
    pub reach: Reach,
}

impl Footprint {
    /// Did this fault act anywhere in the cluster while `l` lived (rogues act on nothing)?
    pub fn acts_during(&self, l: &Lifetime) -> bool {
        self.reach != Reach::Nobody && self.from_us <= l.ended_us && l.arrived_us <= self.until_us
    }

    /// Did this fault reach `l`: aimed at it, or acting on its instances while it lived?
    pub fn reaches(&self, l: &Lifetime) -> bool {
        let during = self.from_us <= l.ended_us && l.arrived_us <= self.until_us;
        match &self.reach {
            Reach::Request(id) => *id == l.id,
            Reach::All => during,
            Reach::Instances(uids) => during && uids.iter().any(|u| l.instances.contains(u)),
            Reach::Pair(a, b) => during && l.instances.contains(a) && l.instances.contains(b),
            Reach::Nobody => false,
        }
    }
}

/// Why the client did not admit a request on one of its sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No incarnation of that side was up (they had all crashed).
    NoInstance,
    /// The instance had no free KV blocks: admission control, not a fault.
    NoBlocks,
    /// An injected allocation failure (its footprint names the request).
    AllocFail,
}

/// How a request ended, as the client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Completed,
    Failed,
    Cancelled,
    /// A side still live at the end of the seed (I7 reports it).
    Unsettled,
}

/// One request's life, as the progress check needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lifetime {
    pub id: RequestId,
    pub end: End,
    pub arrived_us: u64,
    /// Last state change of any of its sides (terminal state, loss, refusal).
    pub ended_us: u64,
    /// Incarnations any of its sides started on.
    pub instances: Vec<u32>,
    pub refusal: Option<Refusal>,
    /// The first failure a rank reported for it, preferring any cause to `cancelled` (see
    /// `Router::failed_on`): (time, rank, the core's cause).
    pub first_failure: Option<(u64, String, FailCause)>,
    /// A rank ended it on an abort no real peer sent: a rogue's (reported as I9).
    pub rogue_ended: bool,
}

/// Counts of a seed or campaign, and the I10 findings of a seed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attribution {
    /// Requests that failed or were cancelled, by attributed cause: a fault kind's name,
    /// `deadline`, `no-capacity`, `contention`, or `unattributed` (each of those is an I10
    /// violation).
    pub by_cause: BTreeMap<String, u64>,
    /// The same requests by the core's `FailCause` of the first rank that failed them, or
    /// `lost` (every rank it ran on crashed first) or `not-admitted`.
    pub by_core_cause: BTreeMap<String, u64>,
    /// I10 violations: (time of the first failure, detail).
    pub unattributed: Vec<(u64, String)>,
}

/// The cause of a request that did not complete, by the rule of the checker's docs.
pub fn cause_of(l: &Lifetime, faults: &[Footprint]) -> Option<&'static str> {
    if l.rogue_ended {
        return Some(FaultKind::RoguePeer.name());
    }
    // Instances only ever vanish by crashing or dying silently: a refusal for want of one is
    // the doing of such a fault struck before it.
    let no_instance = l.refusal == Some(Refusal::NoInstance);
    let fault = faults
        .iter()
        .filter(|f| {
            f.reaches(l) || (no_instance && f.kind.removes_instance() && f.from_us <= l.ended_us)
        })
        .map(|f| f.kind)
        .min();
    let first_cause = l.first_failure.as_ref().map(|f| f.2);
    let timed_out = first_cause == Some(FailCause::Timeout);
    // Staging slots held past `staging_wait_ms` by legs that a fault elsewhere stalled (a
    // receive waiting on a silent peer keeps its slot until the heartbeats' silence limit).
    let contended =
        first_cause == Some(FailCause::NoSlot) && faults.iter().any(|f| f.acts_during(l));
    match (fault, l.refusal) {
        (Some(kind), _) => Some(kind.name()),
        // A configured deadline evicted it (`inflight_cancel`, the sender budget): a policy
        // the scenario opted into, not a fault.
        (None, _) if timed_out => Some("deadline"),
        (None, Some(Refusal::NoBlocks)) => Some("no-capacity"),
        (None, _) if contended => Some("contention"),
        (None, _) => None,
    }
}

fn core_cause(l: &Lifetime) -> &'static str {
    match (&l.first_failure, l.refusal) {
        (Some((_, _, cause)), _) => cause.name(),
        (None, Some(_)) => "not-admitted",
        (None, None) => "lost",
    }
}

fn describe(l: &Lifetime) -> (u64, String) {
    let end = if l.end == End::Cancelled {
        "was cancelled"
    } else {
        "failed"
    };
    let first = match &l.first_failure {
        Some((at, track, cause)) => {
            format!("first failed on {track} at {at} us ({})", cause.name())
        }
        None => format!("refused: {:?}", l.refusal),
    };
    let at = l.first_failure.as_ref().map_or(l.ended_us, |f| f.0);
    let detail = format!(
        "{} {end} with no fault or cancel reaching it (lived {}..{} us on incarnations {:?}); {first}",
        l.id, l.arrived_us, l.ended_us, l.instances
    );
    (at, detail)
}

/// Attributes every request that failed or was cancelled.
pub fn attribute(lives: &[Lifetime], faults: &[Footprint]) -> Attribution {
    let mut a = Attribution::default();
    for l in lives {
        if matches!(l.end, End::Completed | End::Unsettled) {
            continue;
        }
        *a.by_core_cause
            .entry(core_cause(l).to_string())
            .or_default() += 1;
        let cause = cause_of(l, faults);
        *a.by_cause
            .entry(cause.unwrap_or("unattributed").to_string())
            .or_default() += 1;
        if cause.is_none() {
            a.unattributed.push(describe(l));
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn life(id: u64, instances: &[u32], from: u64, to: u64) -> Lifetime {
        Lifetime {
            id: RequestId(id),
            end: End::Failed,
            arrived_us: from,
            ended_us: to,
            instances: instances.to_vec(),
            refusal: None,
            first_failure: Some((to, "gen0/r0".to_string(), FailCause::PeerAborted)),
            rogue_ended: false,
        }
    }

    fn fault(kind: FaultKind, from: u64, until: u64, reach: Reach) -> Footprint {
        Footprint {
            kind,
            from_us: from,
            until_us: until,
            reach,
        }
    }

    #[test]
    fn a_fault_reaches_only_its_instances_while_the_request_lives() {
        let l = life(1, &[1, 2], 100, 200);
        let clog =
            |uid, from, until| fault(FaultKind::Clog, from, until, Reach::Instances(vec![uid]));
        assert!(clog(1, 150, 160).reaches(&l));
        assert!(clog(2, 50, 100).reaches(&l), "ends as the request arrives");
        assert!(!clog(3, 150, 160).reaches(&l), "another instance");
        assert!(!clog(1, 10, 99).reaches(&l), "over before it arrived");
        assert!(!clog(1, 201, 300).reaches(&l), "struck after it ended");
        let part = |a, b| fault(FaultKind::Partition, 120, 130, Reach::Pair(a, b));
        assert!(part(2, 1).reaches(&l));
        assert!(!part(1, 3).reaches(&l), "a link the request does not use");
        assert!(fault(FaultKind::Latency, 0, 100, Reach::All).reaches(&l));
        assert!(!fault(FaultKind::RoguePeer, 150, 150, Reach::Nobody).reaches(&l));
    }

    #[test]
    fn request_faults_come_first_and_rogues_are_never_a_cause() {
        let l = life(7, &[1, 2], 100, 200);
        let faults = [
            fault(FaultKind::Latency, 0, 1000, Reach::All),
            fault(FaultKind::Crash, 150, u64::MAX, Reach::Instances(vec![2])),
            fault(
                FaultKind::AgentError,
                120,
                120,
                Reach::Request(RequestId(7)),
            ),
            fault(FaultKind::RoguePeer, 110, 110, Reach::Nobody),
        ];
        assert_eq!(cause_of(&l, &faults), Some("agent-error"));
        assert_eq!(cause_of(&l, &faults[..2]), Some("crash"));
        assert_eq!(cause_of(&l, &faults[3..]), None);
    }

    #[test]
    fn a_deadline_eviction_is_attributed_only_without_a_fault() {
        let mut l = life(8, &[1, 2], 100, 200);
        assert_eq!(cause_of(&l, &[]), None);
        l.first_failure = Some((150, "ctx0/r0".to_string(), FailCause::Timeout));
        assert_eq!(cause_of(&l, &[]), Some("deadline"));
        let cancel = [fault(
            FaultKind::ClientCancel,
            120,
            120,
            Reach::Request(RequestId(8)),
        )];
        assert_eq!(cause_of(&l, &cancel), Some("client-cancel"));
    }

    #[test]
    fn an_unreached_failure_is_reported_and_counted() {
        let lives = [
            life(1, &[1, 2], 100, 200),
            Lifetime {
                end: End::Completed,
                ..life(2, &[1, 2], 100, 200)
            },
            Lifetime {
                refusal: Some(Refusal::NoBlocks),
                first_failure: None,
                ..life(3, &[1], 300, 300)
            },
        ];
        let crash_after = [fault(
            FaultKind::Crash,
            250,
            u64::MAX,
            Reach::Instances(vec![2]),
        )];
        let a = attribute(&lives, &crash_after);
        assert_eq!(a.unattributed.len(), 1);
        assert_eq!(a.unattributed[0].0, 200);
        assert!(
            a.unattributed[0].1.contains("req#1"),
            "{}",
            a.unattributed[0].1
        );
        assert_eq!(a.by_cause["unattributed"], 1);
        assert_eq!(a.by_cause["no-capacity"], 1);
        assert_eq!(a.by_core_cause["peer-aborted"], 1);
        assert_eq!(a.by_core_cause["not-admitted"], 1);
    }

    #[test]
    fn a_slot_starved_request_is_contention_only_while_a_fault_acts_elsewhere() {
        let starved = Lifetime {
            first_failure: Some((150, "gen0/r0".to_string(), FailCause::NoSlot)),
            ..life(5, &[1, 2], 100, 200)
        };
        let elsewhere = [fault(FaultKind::Partition, 50, 180, Reach::Pair(3, 4))];
        assert_eq!(cause_of(&starved, &elsewhere), Some("contention"));
        assert_eq!(cause_of(&starved, &[]), None, "no fault anywhere: I10");
        let healed = [fault(FaultKind::Partition, 10, 90, Reach::Pair(3, 4))];
        assert_eq!(
            cause_of(&starved, &healed),
            None,
            "healed before it arrived"
        );
    }

    #[test]
    fn no_instance_is_a_crash_only_after_one() {
        let l = Lifetime {
            refusal: Some(Refusal::NoInstance),
            first_failure: None,
            ..life(4, &[], 100, 100)
        };
        let crash = |at| {
            [fault(
                FaultKind::Crash,
                at,
                u64::MAX,
                Reach::Instances(vec![9]),
            )]
        };
        assert_eq!(cause_of(&l, &crash(90)), Some("crash"));
        assert_eq!(cause_of(&l, &crash(110)), None);
    }

    #[test]
    fn no_instance_is_a_silent_death_only_after_one() {
        let l = Lifetime {
            refusal: Some(Refusal::NoInstance),
            first_failure: None,
            ..life(5, &[], 100, 100)
        };
        let death = |at| {
            [fault(
                FaultKind::SilentDeath,
                at,
                u64::MAX,
                Reach::Instances(vec![9]),
            )]
        };
        assert_eq!(cause_of(&l, &death(90)), Some("silent-death"));
        assert_eq!(cause_of(&l, &death(110)), None);
        let clog = [fault(FaultKind::Clog, 90, 200, Reach::Instances(vec![9]))];
        assert_eq!(cause_of(&l, &clog), None, "a clog takes no instance away");
    }
}
