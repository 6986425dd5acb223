//! Each bug switch of the transceiver, turned on, breaks what it names at the core's level
//! (the simulator proves its checker catches each; these prove the switch is wired where it
//! is meant to be). Built only with the `bug-switches` feature.
#![cfg(feature = "bug-switches")]

mod common;

use common::*;
use kvferry_core::agent::AgentError;
use kvferry_core::bugs::{Bug, BugSet};
use kvferry_core::config::TransceiverConfig;
use kvferry_core::request::RequestState;
use kvferry_core::transceiver::TxEvent;
use kvferry_core::wire::{ErrorCode, Message};
use kvferry_core::{PeerId, RequestId, TransferToken};
use std::time::Duration;

fn with(bug: Bug, config: TransceiverConfig) -> Cluster {
    Cluster::with_bugs(1, 1, config, BugSet::NONE.with(bug))
}

fn stranger() -> PeerId {
    PeerId {
        instance: 9,
        rank: 0,
    }
}

fn warns(r: &mut Rank) -> usize {
    r.tx.drain_events()
        .filter(|e| matches!(e, TxEvent::TimeoutWarn { .. }))
        .count()
}

fn timeout_config(ms: u64) -> TransceiverConfig {
    TransceiverConfig {
        kv_transfer_timeout_ms: Some(ms),
        ..TransceiverConfig::default()
    }
}

/// I1: a cancelled request ends while its transfer still runs, its slot and pins gone.
#[test]
fn release_early_ends_a_request_under_its_running_transfer() {
    let mut c = with(Bug::ReleaseEarly, TransceiverConfig::default());
    let rid = c.submit(1, 2, 5, 5);
    c.pump();
    assert_eq!(c.gen[0].agent.pending_count(), 1);
    assert!(c.gen[0].tx.cancel(c.now, rid));
    assert_eq!(states(&c.step(GEN)), vec![RequestState::Cancelled]);
    assert_eq!(c.gen[0].agent.pending_count(), 1, "the writer still runs");
    assert_eq!(c.gen[0].tx.staging_counters().in_use, 0, "its slot is back");
    assert_eq!(c.gen[0].pool.lock().unwrap().pinned_count(), 0);
    // Its fence finds nothing to release.
    c.gen[0].agent.complete_all();
    c.gen[0].tx.handle_timeout(c.now);
    assert_eq!(c.gen[0].tx.jobs_in_flight(), 0);
}

/// The switch forgets only the cancelled request's jobs: another request's fence still
/// finishes it.
#[test]
fn release_early_forgets_only_the_cancelled_requests_jobs() {
    let mut c = with(Bug::ReleaseEarly, TransceiverConfig::default());
    let first = c.submit(1, 1, 5, 5);
    c.submit(2, 1, 6, 6);
    c.pump();
    assert!(c.gen[0].tx.cancel(c.now, first));
    let fin = c.run_until_quiet();
    let other: Vec<_> = fin
        .iter()
        .filter(|f| f.request.id == RequestId(2))
        .collect();
    assert_eq!(other.len(), 2, "request 2 ends on both sides");
    assert!(other.iter().all(|f| matches!(
        f.state,
        RequestState::ContextComplete | RequestState::GenComplete
    )));
}

/// I2: a failed transfer's slot never comes back.
#[test]
fn leak_slot_on_error_keeps_a_failed_transfers_slot() {
    let mut c = with(Bug::LeakSlotOnError, TransceiverConfig::default());
    c.submit(1, 2, 5, 5);
    c.pump();
    let job = c.gen[0].agent.pending()[0].clone();
    c.gen[0]
        .agent
        .complete(job.id, Err(AgentError::Backend("boom".into())));
    assert_eq!(states(&c.step(GEN)), vec![RequestState::TransferError]);
    assert_eq!(c.gen[0].tx.staging_counters().in_use, 1, "leaked");
    // A transfer that succeeds still gives its slot back.
    let mut c = with(Bug::LeakSlotOnError, TransceiverConfig::default());
    c.submit(1, 2, 5, 5);
    c.run_until_quiet();
    c.assert_pools_full();
}

/// I4: warned at every poll past the timeout, not once per enqueue.
#[test]
fn warn_no_dedup_warns_at_every_poll() {
    let mut c = with(Bug::WarnNoDedup, timeout_config(100));
    c.submit(1, 2, 1, 1);
    c.pump();
    for ms in [150, 200, 300] {
        c.now = Duration::from_millis(ms);
        c.gen[0].tx.handle_timeout(c.now);
    }
    assert_eq!(warns(&mut c.gen[0]), 3);
}

/// I4: a transfer whose completion is already queued is warned.
#[test]
fn warn_before_ready_warns_a_ready_transfer() {
    let mut c = with(Bug::WarnBeforeReady, timeout_config(100));
    c.submit(1, 2, 1, 1);
    c.pump();
    c.gen[0].agent.complete_all();
    c.now = Duration::from_millis(500);
    c.gen[0].tx.handle_timeout(c.now);
    assert_eq!(warns(&mut c.gen[0]), 1);
}

/// I6: an evicted transfer's slot goes straight back under its late writer.
#[test]
fn reuse_poisoned_slot_frees_an_evicted_slot_at_once() {
    let config = TransceiverConfig {
        inflight_cancel: true,
        ..timeout_config(100)
    };
    let mut c = with(Bug::ReusePoisonedSlot, config);
    c.submit(1, 2, 1, 1);
    c.pump();
    c.now = Duration::from_millis(150);
    assert_eq!(states(&c.step(GEN)), vec![RequestState::TransferError]);
    let s = c.gen[0].tx.staging_counters();
    assert_eq!((s.in_use, s.poisoned, s.free), (0, 0, s.slots));
    assert_eq!(c.gen[0].agent.pending_count(), 1, "while its writer runs");
}

/// I9: a RequestInfo with the wrong token is served.
#[test]
fn skip_token_check_serves_a_wrong_token() {
    let mut c = with(Bug::SkipTokenCheck, TransceiverConfig::default());
    c.submit(7, 2, 42, 666);
    c.pump();
    assert_eq!(c.ctx[0].agent.pending_count(), 1, "served");
    assert!(!c.ctx[0].tx.drain_events().any(|e| matches!(
        e,
        TxEvent::Rejected {
            code: ErrorCode::BadToken,
            ..
        }
    )));
}

/// I9: any peer's abort ends a live request, and a parked one ends it on registration.
#[test]
fn accept_any_abort_lets_a_stranger_end_requests() {
    let mut c = with(Bug::AcceptAnyAbort, TransceiverConfig::default());
    let rid = c.submit(1, 1, 5, 5);
    let forged = Message::Cancel {
        request: rid,
        token: TransferToken(666),
    };
    c.ctx[0].tx.handle_message(c.now, stranger(), forged);
    assert_eq!(states(&c.step(CTX)), vec![RequestState::TransferError]);

    // An `Error` (no token) from a stranger, parked before the request registers.
    let future = RequestId(2);
    let error = Message::Error {
        request: future,
        code: ErrorCode::Cancelled,
        detail: String::new(),
    };
    c.ctx[0].tx.handle_message(c.now, stranger(), error);
    assert_eq!(c.ctx[0].tx.early_counts().aborts, 1);
    c.submit(2, 1, 5, 5);
    assert_eq!(states(&c.step(CTX)), vec![RequestState::TransferError]);
}
