//! The driver's table of posted READs: a state machine over NIXL's transfer states, kept apart
//! from NIXL so it is tested against a fake.
//!
//! A job leaves the table only at a terminal NIXL status (`Done` or `Failed`): that status is
//! the fence the core's completion stands for. Cancelling marks a job and nothing else,
//! because releasing an in-flight NIXL request does not stop its bytes landing.

use super::engine::XferState;
use kvferry_core::agent::{AgentError, TransferId};
use kvferry_core::PeerId;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// READs posted and not yet terminal, per agent; more are refused (the core's own bound on
/// jobs in flight is the same default).
pub const MAX_IN_FLIGHT: usize = 256;

/// A job's end, for the core.
pub type Ended = (TransferId, Result<u64, AgentError>);

#[derive(Debug)]
struct Job<X> {
    xfer: X,
    peer: PeerId,
    bytes: u64,
    cancelled: bool,
}

#[derive(Debug)]
pub struct JobTable<X> {
    jobs: HashMap<TransferId, Job<X>>,
    cap: usize,
}

impl<X> JobTable<X> {
    pub fn new(cap: usize) -> JobTable<X> {
        JobTable {
            jobs: HashMap::new(),
            cap,
        }
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Refuses before posting when full or when the id is already in flight.
    pub fn admit(&self, id: TransferId) -> Result<(), AgentError> {
        if self.jobs.contains_key(&id) {
            return Err(AgentError::Backend(format!("{id:?} already in flight")));
        }
        if self.jobs.len() >= self.cap {
            return Err(AgentError::Backend(format!(
                "{} NIXL transfers in flight (limit)",
                self.cap
            )));
        }
        Ok(())
    }

    /// Records a posted READ (after `admit`).
    pub fn insert(&mut self, id: TransferId, xfer: X, peer: PeerId, bytes: u64) {
        let job = Job {
            xfer,
            peer,
            bytes,
            cancelled: false,
        };
        assert!(self.jobs.insert(id, job).is_none(), "admitted twice");
    }

    /// Marks a job; it still ends only at its terminal status. False if unknown.
    pub fn cancel(&mut self, id: TransferId) -> bool {
        self.jobs.get_mut(&id).map(|j| j.cancelled = true).is_some()
    }

    /// True while a job reads from `peer`.
    pub fn reads_from(&self, peer: PeerId) -> bool {
        self.jobs.values().any(|j| j.peer == peer)
    }

    /// Removes every job at a terminal status and appends its end to `out`.
    pub fn poll(&mut self, mut state: impl FnMut(&X) -> XferState, out: &mut Vec<Ended>) {
        let before = out.len();
        for (id, job) in &self.jobs {
            let result = match state(&job.xfer) {
                XferState::InProgress => continue,
                XferState::Done if job.cancelled => Err(AgentError::Cancelled),
                XferState::Done => Ok(job.bytes),
                XferState::Failed(why) => Err(AgentError::Backend(why)),
            };
            out.push((*id, result));
        }
        for (id, _) in &out[before..] {
            self.jobs.remove(id);
        }
    }

    /// Polls until every job is terminal or `bound` passes, pausing `pause` between polls.
    /// Jobs still in flight then end as `ShutDown` and their transfers are returned: the
    /// caller must leak them and the memory they touch, since nothing proves them over.
    pub fn drain(
        &mut self,
        bound: Duration,
        pause: Duration,
        mut state: impl FnMut(&X) -> XferState,
        out: &mut Vec<Ended>,
    ) -> Vec<X> {
        let until = Instant::now() + bound;
        loop {
            self.poll(&mut state, out);
            if self.jobs.is_empty() {
                return Vec::new();
            }
            if Instant::now() >= until {
                let left: Vec<(TransferId, Job<X>)> = self.jobs.drain().collect();
                out.extend(left.iter().map(|(id, _)| (*id, Err(AgentError::ShutDown))));
                return left.into_iter().map(|(_, j)| j.xfer).collect();
            }
            std::thread::sleep(pause);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    const PEER: PeerId = PeerId {
        instance: 0,
        rank: 0,
    };

    /// A fake NIXL: each transfer's state is what the test says it is.
    #[derive(Default)]
    struct Fake(RefCell<HashMap<u32, XferState>>);

    impl Fake {
        fn set(&self, x: u32, s: XferState) {
            self.0.borrow_mut().insert(x, s);
        }
        fn state(&self, x: &u32) -> XferState {
            self.0
                .borrow()
                .get(x)
                .cloned()
                .unwrap_or(XferState::InProgress)
        }
    }

    fn ended(t: &mut JobTable<u32>, fake: &Fake) -> Vec<Ended> {
        let mut out = Vec::new();
        t.poll(|x| fake.state(x), &mut out);
        out.sort_by_key(|e| e.0);
        out
    }

    #[test]
    fn a_job_ends_once_at_its_terminal_status_with_its_bytes_or_why_not() {
        let fake = Fake::default();
        let mut t = JobTable::new(4);
        t.insert(TransferId(1), 1, PEER, 100);
        t.insert(TransferId(2), 2, PEER, 200);
        assert!(ended(&mut t, &fake).is_empty(), "in progress: nothing ends");
        fake.set(1, XferState::Done);
        fake.set(2, XferState::Failed("peer died".into()));
        assert_eq!(
            ended(&mut t, &fake),
            vec![
                (TransferId(1), Ok(100)),
                (TransferId(2), Err(AgentError::Backend("peer died".into())))
            ]
        );
        assert!(
            ended(&mut t, &fake).is_empty(),
            "each job ends exactly once"
        );
        assert!(t.is_empty());
    }

    #[test]
    fn a_cancelled_job_stays_until_nixl_says_it_is_over_then_ends_cancelled() {
        let fake = Fake::default();
        let mut t = JobTable::new(4);
        t.insert(TransferId(7), 7, PEER, 64);
        assert!(t.cancel(TransferId(7)));
        assert!(!t.cancel(TransferId(8)), "unknown id");
        assert!(
            ended(&mut t, &fake).is_empty(),
            "no fence yet: still a writer"
        );
        assert!(t.reads_from(PEER));
        fake.set(7, XferState::Done);
        assert_eq!(
            ended(&mut t, &fake),
            vec![(TransferId(7), Err(AgentError::Cancelled))]
        );
        assert!(!t.reads_from(PEER));
    }

    #[test]
    fn admission_refuses_duplicates_and_past_the_bound() {
        let mut t = JobTable::new(1);
        assert!(t.admit(TransferId(1)).is_ok());
        t.insert(TransferId(1), 1, PEER, 1);
        assert!(t.admit(TransferId(1)).is_err(), "duplicate");
        assert!(t.admit(TransferId(2)).is_err(), "full");
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn drain_waits_for_terminal_statuses_within_its_bound() {
        let fake = Fake::default();
        let mut t = JobTable::new(4);
        t.insert(TransferId(1), 1, PEER, 10);
        let mut polls = 0;
        let mut out = Vec::new();
        let left = t.drain(
            Duration::from_secs(10),
            Duration::ZERO,
            |x| {
                polls += 1;
                if polls < 3 {
                    fake.state(x)
                } else {
                    XferState::Done
                }
            },
            &mut out,
        );
        assert!(left.is_empty());
        assert_eq!(out, vec![(TransferId(1), Ok(10))]);
        assert_eq!(polls, 3, "drained as soon as the job was terminal");
    }

    #[test]
    fn drain_past_its_bound_ends_the_stuck_jobs_and_hands_them_back_to_leak() {
        let fake = Fake::default();
        let mut t = JobTable::new(4);
        t.insert(TransferId(1), 1, PEER, 10);
        t.insert(TransferId(2), 2, PEER, 20);
        fake.set(2, XferState::Done);
        let mut out = Vec::new();
        let start = Instant::now();
        let left = t.drain(
            Duration::from_millis(20),
            Duration::from_millis(1),
            |x| fake.state(x),
            &mut out,
        );
        assert!(start.elapsed() >= Duration::from_millis(20));
        assert_eq!(left, vec![1], "the stuck transfer is handed back");
        out.sort_by_key(|e| e.0);
        assert_eq!(
            out,
            vec![
                (TransferId(1), Err(AgentError::ShutDown)),
                (TransferId(2), Ok(20))
            ]
        );
        assert!(t.is_empty());
    }
}
