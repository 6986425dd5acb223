//! Each bug switch must be caught: a fail-fast campaign of at most 200 seeds finds a violation
//! of the bug's invariant, and the failing seed comes with a replay command that turns the same
//! switch back on.
#![cfg(feature = "bug-switches")]

use kvferry_core::bugs::Bug;
use kvferry_sim::campaign::Campaign;
use kvferry_sim::cli::{ScenarioArgs, TimeoutMs};
use kvferry_sim::cluster::run_seed;

const MAX_SEEDS: u64 = 200;
/// Short enough that faults push transfers past it.
const TIMEOUT_MS: u64 = 20;

fn catches(bug: Bug, args: ScenarioArgs) {
    let args = ScenarioArgs {
        inject_bug: vec![bug],
        ..args
    };
    let campaign = Campaign {
        scenario: args.build().expect("valid scenario"),
        seeds: 0..MAX_SEEDS,
        jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
        fail_fast: true,
        recheck_every: 0,
        replay_flags: args.to_flags(),
    };
    let summary = campaign.run(&run_seed, &mut |_| {});
    let found: Vec<_> = summary.failing_seeds.iter().collect();
    assert!(
        !found.is_empty(),
        "{bug}: no violation in {MAX_SEEDS} seeds"
    );
    let seed = found[0].seed;
    assert!(
        found.iter().any(|f| f.invariant.id() == bug.invariant()),
        "{bug}: seed {seed} broke {:?}, expected {}",
        found.iter().map(|f| f.invariant.id()).collect::<Vec<_>>(),
        bug.invariant()
    );
    let replay = &found[0].replay;
    for needle in [
        format!("replay {seed} "),
        format!("--inject-bug {bug}"),
        "--features bug-switches".to_string(),
    ] {
        assert!(
            replay.contains(&needle),
            "{bug}: {replay:?} lacks {needle:?}"
        );
    }
}

fn default_args() -> ScenarioArgs {
    ScenarioArgs {
        scenario: "default".to_string(),
        ..ScenarioArgs::default()
    }
}

/// The default scenario with `kv_transfer_timeout_ms` set: the timeout WARN (I4) only exists
/// with it, and deadline eviction (`inflight_cancel`) is what poisons slots (I6) and fails
/// transfers while their blocks are still being written (I5).
fn with_timeout(ms: u64, inflight_cancel: bool) -> ScenarioArgs {
    ScenarioArgs {
        timeout_ms: Some(TimeoutMs(Some(ms))),
        inflight_cancel: Some(inflight_cancel),
        ..default_args()
    }
}

#[test]
fn release_early_breaks_i1() {
    catches(Bug::ReleaseEarly, default_args());
}

#[test]
fn leak_slot_on_error_breaks_i2() {
    catches(Bug::LeakSlotOnError, default_args());
}

#[test]
fn drop_agent_early_breaks_i3() {
    catches(Bug::DropAgentEarly, default_args());
}

#[test]
fn warn_no_dedup_breaks_i4() {
    catches(Bug::WarnNoDedup, with_timeout(TIMEOUT_MS, false));
}

#[test]
fn warn_before_ready_breaks_i4() {
    catches(Bug::WarnBeforeReady, with_timeout(TIMEOUT_MS, false));
}

#[test]
fn free_blocks_during_transfer_breaks_i5() {
    catches(
        Bug::FreeBlocksDuringTransfer,
        with_timeout(TIMEOUT_MS, true),
    );
}

#[test]
fn reuse_poisoned_slot_breaks_i6() {
    catches(Bug::ReusePoisonedSlot, with_timeout(TIMEOUT_MS, true));
}

#[test]
fn skip_idle_collective_breaks_i7() {
    catches(Bug::SkipIdleCollective, default_args());
}

#[test]
fn skip_token_check_breaks_i9() {
    catches(Bug::SkipTokenCheck, default_args());
}

/// The rogue peer's forged `Cancel`s (guessed token) and `Error`s, for live requests and for
/// ids not registered yet, end requests once any abort is accepted.
#[test]
fn accept_any_abort_breaks_i9() {
    catches(Bug::AcceptAnyAbort, default_args());
}

/// Asking before the receive is posted lets a send start first and be refused: requests fail
/// that no fault reached.
#[test]
fn ask_before_posted_breaks_i10() {
    catches(Bug::AskBeforePosted, default_args());
}

/// Without heartbeats, a generation rank whose context instance died silently (no reset, so
/// no peer-lost) waits for its bytes for ever: a stuck request (I7).
#[test]
fn ignore_heartbeats_breaks_i7() {
    catches(
        Bug::IgnoreHeartbeats,
        ScenarioArgs {
            scenario: "silent-death".to_string(),
            ..ScenarioArgs::default()
        },
    );
}

/// A field-hazard scenario by name: it forces on the faults that open its bug's window.
fn hazard(name: &str) -> ScenarioArgs {
    ScenarioArgs {
        scenario: name.to_string(),
        ..ScenarioArgs::default()
    }
}

/// SGLang #24527: the aborted write's pages go back at once and the late write lands in them.
#[test]
fn abort_during_write_breaks_i5() {
    catches(Bug::AbortDuringWrite, hazard("abort-during-write"));
}

/// vLLM #52234: the request whose receive failed is served, with the bytes it never got.
#[test]
fn failed_transfer_served_breaks_i6() {
    catches(Bug::FailedTransferServed, hazard("failed-transfer-served"));
}

/// vLLM #21570: in pull mode the context side's deadline frees blocks under a read in flight.
#[test]
fn timeout_frees_while_reading_breaks_i5() {
    catches(
        Bug::TimeoutFreesWhileReading,
        hazard("timeout-frees-while-reading"),
    );
}

/// TensorRT-LLM #17665: without a timeout over the parked send, one lost "finished" hangs the
/// context side forever, and the progress check names the job that never completed.
#[test]
fn lost_notification_breaks_i10() {
    catches(Bug::LostNotification, hazard("lost-notification"));
}

/// TensorRT-LLM #12542: the pin error of evicted blocks is swallowed and the send reads them.
#[test]
fn evicted_before_send_breaks_i5() {
    catches(Bug::EvictedBeforeSend, hazard("evicted-before-send"));
}

/// vLLM #49238: a reader reaches the restarted context instance at its old endpoint and
/// serves what that incarnation holds there.
#[test]
fn stale_endpoint_breaks_i6() {
    catches(Bug::StaleEndpoint, hazard("stale-endpoint"));
}

/// vLLM #46283: an aborted push's blocks stay pinned after its fence, never reclaimed.
#[test]
fn abort_never_reclaimed_breaks_i2() {
    catches(Bug::AbortNeverReclaimed, hazard("abort-never-reclaimed"));
}

/// A transfer table that keeps every completed job: only the soak's sampler sees it (I11),
/// on a soak of a hundred requests.
#[test]
fn transfer_table_leak_breaks_i11() {
    catches(
        Bug::TransferTableLeak,
        ScenarioArgs {
            scenario: "soak".to_string(),
            requests: Some(100),
            ..ScenarioArgs::default()
        },
    );
}
