//! Heartbeats (`transceiver::liveness`): a peer that goes silent without a reset is lost after
//! `heartbeat_missed_limit` intervals; a live peer, busy or idle, never is; and nothing is
//! kept for a peer no request depends on.

mod common;

use common::*;
use kvferry_core::config::TransceiverConfig;
use kvferry_core::request::RequestState;
use kvferry_core::transceiver::{FailCause, TxEvent};
use kvferry_core::wire::Message;
use kvferry_core::PeerId;
use std::time::Duration;

const INTERVAL_MS: u64 = 10;
const MISSED: u32 = 3;

fn config() -> TransceiverConfig {
    TransceiverConfig {
        heartbeat_interval_ms: INTERVAL_MS,
        heartbeat_missed_limit: MISSED,
        ..TransceiverConfig::default()
    }
}

/// Advances time by whole intervals, delivering (`deliver`) or dropping every message.
fn run_for(c: &mut Cluster, ms: u64, deliver: bool) {
    for _ in 0..ms / INTERVAL_MS {
        c.now += Duration::from_millis(INTERVAL_MS);
        for r in c.ctx.iter_mut().chain(c.gen.iter_mut()) {
            r.tx.handle_timeout(c.now);
        }
        if deliver {
            c.pump();
        } else {
            while c.pop().is_some() {}
        }
    }
}

fn silent_losses(c: &mut Cluster) -> Vec<PeerId> {
    c.gen[0]
        .tx
        .drain_events()
        .filter_map(|e| match e {
            TxEvent::PeerSilent { peer } => Some(peer),
            _ => None,
        })
        .collect()
}

/// The context rank's bytes never come (its job never completes) but it stays live: the
/// generation rank waits on; the context rank answers or sends heartbeats all along.
#[test]
fn a_live_peer_is_never_lost_however_long_the_wait() {
    let mut c = Cluster::new(1, 1, config());
    c.submit(1, 1, 3, 3);
    c.pump();
    run_for(&mut c, 50 * INTERVAL_MS, true);
    assert!(silent_losses(&mut c).is_empty());
    assert_eq!(
        c.gen[0].tx.watched_peers(),
        1,
        "the context rank it reads from"
    );
    assert!(c.step(GEN).is_empty(), "still waiting, not failed");
}

/// A context rank that has not registered the request yet knows nothing of the generation
/// rank, yet answers its heartbeats: a slow prefill is not a dead peer.
#[test]
fn an_idle_peer_answers_heartbeats() {
    let mut c = Cluster::new(1, 1, config());
    c.submit(1, 1, 3, 3);
    // Forget the context side's request: it now waits on nothing and watches nobody.
    c.ctx[0].tx.cancel(c.now, kvferry_core::RequestId(1));
    c.ctx[0].agent.complete_all();
    c.pump();
    c.step(CTX);
    assert_eq!(c.ctx[0].tx.active(), 0);
    let gen = c.gen[0].tx.me();
    c.ctx[0]
        .tx
        .handle_message(c.now, gen, Message::Heartbeat { seq: 4 });
    let answer = c.ctx[0].tx.poll_transmit().expect("an answer");
    assert_eq!(
        (answer.to, answer.msg),
        (gen, Message::Heartbeat { seq: 0 })
    );
    c.ctx[0]
        .tx
        .handle_message(c.now, gen, Message::Heartbeat { seq: 0 });
    assert_eq!(
        c.ctx[0].tx.poll_transmit(),
        None,
        "an answer is never answered"
    );
}

/// The context rank goes silent (nothing it sends arrives, nothing resets): after
/// `heartbeat_missed_limit` intervals, one more at most, the generation rank loses it and
/// fails the request as if the connection had reset; then it watches nobody.
#[test]
fn a_silent_peer_is_lost_within_the_bound_and_forgotten() {
    let mut c = Cluster::new(1, 1, config());
    c.submit(1, 1, 3, 3);
    c.pump();
    run_for(&mut c, 2 * INTERVAL_MS, true);
    let silent_from = c.now;
    let mut lost_at = None;
    for _ in 0..2 * MISSED {
        run_for(&mut c, INTERVAL_MS, false);
        if !silent_losses(&mut c).is_empty() {
            lost_at = Some(c.now);
            break;
        }
    }
    let lost_at = lost_at.expect("the silent peer is lost");
    let limit = Duration::from_millis(INTERVAL_MS) * MISSED;
    assert!(
        lost_at >= silent_from + limit,
        "not before the limit: {lost_at:?}"
    );
    assert!(
        lost_at <= silent_from + limit + Duration::from_millis(INTERVAL_MS),
        "at most one interval late: {lost_at:?}"
    );
    assert_eq!(c.gen[0].tx.counters().peers_silent, 1);
    c.gen[0].agent.complete_all(); // the fence of the cancelled receive
    let fin = c.step(GEN);
    assert_eq!(states(&fin), vec![RequestState::TransferError]);
    run_for(&mut c, INTERVAL_MS, false);
    assert_eq!(
        c.gen[0].tx.watched_peers(),
        0,
        "nothing kept for the lost peer"
    );
    assert_eq!(
        c.gen[0].tx.poll_timeout(),
        None,
        "an idle rank needs no tick"
    );
}

/// Regression (found by the simulator's `soak`, under the production heartbeats): a rank that
/// went idle between two ticks kept its watched peers with their last-heard times, and the
/// first request to depend on one of them again after an idle spell longer than the silence
/// limit lost it at the first tick, alive as it was.
#[test]
fn a_peer_watched_before_an_idle_spell_is_not_lost_when_needed_again() {
    let mut c = Cluster::new(1, 1, config());
    c.submit(1, 1, 3, 3);
    c.pump();
    run_for(&mut c, 2 * INTERVAL_MS, true);
    assert_eq!(c.gen[0].tx.watched_peers(), 1);
    // Request 1 completes between two ticks; the rank goes idle.
    c.now += Duration::from_millis(INTERVAL_MS / 2);
    let fin = c.run_until_quiet();
    assert_eq!(fin.len(), 2, "{:?}", states(&fin));
    assert_eq!(
        c.gen[0].tx.watched_peers(),
        0,
        "an idle rank watches nobody"
    );
    assert_eq!(c.gen[0].tx.poll_timeout(), None, "and needs no tick");
    // Idle for many silence limits, then the same context rank serves request 2.
    c.now += Duration::from_millis(INTERVAL_MS) * MISSED * 10;
    c.submit(2, 1, 5, 5);
    c.pump();
    run_for(&mut c, 2 * INTERVAL_MS, true);
    assert!(silent_losses(&mut c).is_empty());
    assert_eq!(c.gen[0].tx.counters().peers_silent, 0);
}

/// The failure is the one of a lost connection (the same path as `handle_peer_lost`).
#[test]
fn a_silent_peer_fails_its_requests_as_unreachable() {
    let mut c = Cluster::new(1, 1, config());
    c.submit(1, 1, 3, 3);
    c.pump();
    run_for(&mut c, (u64::from(MISSED) + 2) * INTERVAL_MS, false);
    c.gen[0].agent.complete_all(); // the fence of the cancelled receive
    c.gen[0].tx.handle_timeout(c.now);
    let causes: Vec<_> = c.gen[0]
        .tx
        .drain_events()
        .filter_map(|e| match e {
            TxEvent::LocallyFinished { cause, .. } => cause,
            _ => None,
        })
        .collect();
    assert_eq!(causes, vec![FailCause::Unreachable]);
}

/// Finishes request 1 (the ranks watched each other for it), then leaves both ranks idle for
/// far longer than the silence limit, with no call into either: an idle rank runs no tick.
fn idle_after_one_request() -> Cluster {
    let mut c = Cluster::new(1, 1, config());
    c.submit(1, 1, 3, 3);
    c.pump();
    run_for(&mut c, 2 * INTERVAL_MS, true);
    let fin = c.run_until_quiet();
    assert_eq!(fin.len(), 2, "both sides finished request 1");
    assert_eq!(c.gen[0].tx.active(), 0);
    c.now += Duration::from_millis(INTERVAL_MS) * MISSED * 10;
    silent_losses(&mut c);
    c
}

/// Seed 272 of `asymmetric-partition` (pull): a generation rank idle for a while registered
/// a request from a context rank it had served before; the tick left over from before the
/// idle spell was overdue at once and found that peer silent for the whole spell, so the
/// request failed as unreachable with no fault near it.
#[test]
fn an_idle_spell_is_not_silence() {
    let mut c = idle_after_one_request();
    c.submit(2, 1, 5, 5);
    c.pump();
    c.gen[0].tx.handle_timeout(c.now);
    assert!(silent_losses(&mut c).is_empty(), "the peer was just heard");
    assert_eq!(c.gen[0].tx.counters().peers_silent, 0);
    run_for(&mut c, 2 * INTERVAL_MS, true);
    let fin = c.run_until_quiet();
    assert_eq!(
        states(&fin),
        vec![RequestState::ContextComplete, RequestState::GenComplete]
    );
}

/// An idle context rank keeps answering the heartbeats of a peer it watched for an earlier
/// request: that peer waits on a request this rank has not registered yet.
#[test]
fn an_idle_rank_answers_a_peer_it_watched_before() {
    let mut c = idle_after_one_request();
    assert_eq!(
        c.ctx[0].tx.watched_peers(),
        0,
        "an idle rank watches nobody"
    );
    let gen = c.gen[0].tx.me();
    c.ctx[0]
        .tx
        .handle_message(c.now, gen, Message::Heartbeat { seq: 9 });
    let answer = c.ctx[0].tx.poll_transmit().expect("an answer");
    assert_eq!(
        (answer.to, answer.msg),
        (gen, Message::Heartbeat { seq: 0 })
    );
}
