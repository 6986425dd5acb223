//! The completion collective: every rank of an instance enters it every step, including steps
//! where it has nothing to report (invariant I7). A rank that returns early before a collective
//! leaves its peers waiting forever. The core only says what a rank contributes
//! (`Transceiver::check_status`) and what a set of contributions means (`agree`); the driver
//! does the exchange (a barrier in the simulator, nothing for a one-rank node).
//!
//! A request is finished on an instance only when every rank has finished it locally; it
//! completes if every rank succeeded and fails if any rank failed. Until then its blocks stay
//! held (invariant I1).

use crate::RequestId;
use std::collections::BTreeMap;
use thiserror::Error;

/// What one rank reports in one step: every request it has finished locally and not yet seen
/// agreed. Bounded by the transfers a rank may hold in flight.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contribution {
    pub rank: u32,
    pub step: u64,
    pub done: Vec<RequestId>,
    pub failed: Vec<RequestId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum CollectiveError {
    #[error("collective step {step} timed out waiting for ranks {missing:?}")]
    Timeout { step: u64, missing: Vec<u32> },
    #[error("rank {rank} contributed to step {got}, expected step {expected}")]
    StepMismatch { rank: u32, expected: u64, got: u64 },
    #[error("collective aborted: {0}")]
    Aborted(String),
}

/// The outcome agreed by one step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Agreed {
    pub completed: Vec<RequestId>,
    pub failed: Vec<RequestId>,
}

/// Requests every rank reported finished; failed if any rank reported failure. Deterministic
/// (sorted) output. Contributions must all be of the same step.
pub fn agree(all: &[Contribution], world: usize) -> Result<Agreed, CollectiveError> {
    let step = all.first().map(|c| c.step).unwrap_or(0);
    if let Some(bad) = all.iter().find(|c| c.step != step) {
        return Err(CollectiveError::StepMismatch {
            rank: bad.rank,
            expected: step,
            got: bad.step,
        });
    }
    if all.len() != world {
        let present: Vec<u32> = all.iter().map(|c| c.rank).collect();
        let missing = (0..world as u32).filter(|r| !present.contains(r)).collect();
        return Err(CollectiveError::Timeout { step, missing });
    }
    // request -> (ranks finished, any failed)
    let mut seen: BTreeMap<RequestId, (usize, bool)> = BTreeMap::new();
    for c in all {
        for id in &c.done {
            seen.entry(*id).or_default().0 += 1;
        }
        for id in &c.failed {
            let e = seen.entry(*id).or_default();
            e.0 += 1;
            e.1 = true;
        }
    }
    let mut out = Agreed::default();
    for (id, (n, failed)) in seen {
        if n == world {
            if failed {
                out.failed.push(id);
            } else {
                out.completed.push(id);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(rank: u32, done: &[u64], failed: &[u64]) -> Contribution {
        Contribution {
            rank,
            step: 3,
            done: done.iter().map(|i| RequestId(*i)).collect(),
            failed: failed.iter().map(|i| RequestId(*i)).collect(),
        }
    }

    #[test]
    fn finished_only_when_every_rank_finished() {
        let a = agree(&[c(0, &[1, 2], &[]), c(1, &[2], &[1])], 2).unwrap();
        assert_eq!(a.completed, vec![RequestId(2)]);
        assert_eq!(a.failed, vec![RequestId(1)]);
        let b = agree(&[c(0, &[1], &[]), c(1, &[], &[])], 2).unwrap();
        assert_eq!(b, Agreed::default());
    }

    #[test]
    fn a_contribution_of_another_step_is_refused() {
        let mut late = c(1, &[], &[]);
        late.step = 2;
        assert_eq!(
            agree(&[c(0, &[], &[]), late], 2).unwrap_err(),
            CollectiveError::StepMismatch {
                rank: 1,
                expected: 3,
                got: 2
            }
        );
    }

    #[test]
    fn failed_everywhere_fails_and_one_rank_of_one_completes() {
        let a = agree(&[c(0, &[], &[5]), c(1, &[], &[5])], 2).unwrap();
        assert_eq!(a.failed, vec![RequestId(5)]);
        assert!(a.completed.is_empty());
        let a = agree(&[c(0, &[3, 1], &[])], 1).unwrap();
        assert_eq!(a.completed, vec![RequestId(1), RequestId(3)], "sorted");
        assert_eq!(agree(&[], 0).unwrap(), Agreed::default());
    }

    #[test]
    fn missing_rank_is_reported() {
        let e = agree(&[c(0, &[], &[])], 2).unwrap_err();
        assert_eq!(
            e,
            CollectiveError::Timeout {
                step: 3,
                missing: vec![1]
            }
        );
    }
}
