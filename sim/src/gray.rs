//! Gray failures: faults that reset nothing, so a peer sees only silence or slowness, never a
//! lost connection. What recovers from them is the transceiver's own: heartbeats
//! (`heartbeat_interval_ms`, `heartbeat_missed_limit`), deadlines and in-flight cancel.
//!
//! - an asymmetric partition blocks one direction of a context-generation pair: one side keeps
//!   hearing the other, which hears nothing (messages are held, as TCP would, until it heals);
//! - a stalled reader is a rank that stops reading its control messages for a while (they
//!   queue in its mailbox) but still runs its timers and writes;
//! - a silent death (in `cluster`, beside the crash) and a wedged job (in `agent`) are the
//!   other two.
//!
//! Both faults here last up to [`MAX_GRAY_SPAN_MS`], longer than the gray scenarios' silence
//! limit, so that heartbeats sometimes give up on a peer, and all end at the heal.

use crate::attribution::Reach;
use crate::faults::FaultKind;
use crate::rank::Instance;
use crate::world::World;
use madsim::rand::Rng;
use std::sync::Arc;
use std::time::Duration;

/// Longest asymmetric partition or reader stall.
pub const MAX_GRAY_SPAN_MS: u64 = 200;

fn gray_span(world: &World, kind: FaultKind) -> Duration {
    let drawn = madsim::rand::thread_rng().gen_range(1..MAX_GRAY_SPAN_MS);
    world.span(kind, Duration::from_millis(drawn))
}

/// Runs `f` after `span` unless the seed is over by then (the world is held weakly, as by
/// every timed fault).
fn later(world: &Arc<World>, span: Duration, f: impl FnOnce(&World) + Send + 'static) {
    let weak = Arc::downgrade(world);
    madsim::task::spawn(async move {
        madsim::time::sleep(span).await;
        if let Some(w) = weak.upgrade() {
            f(&w);
        }
    });
}

/// Blocks the direction `from` → `to` for a while.
pub fn one_way(world: &Arc<World>, from: &Instance, to: &Instance) {
    let span = gray_span(world, FaultKind::OneWay);
    let (f, t) = (from.uid, to.uid);
    world
        .fabric
        .lock()
        .expect("fabric lock")
        .block_one_way(f, t);
    let names = format!("{} -> {}", from.name(), to.name());
    world.fault(
        FaultKind::OneWay,
        world.until(span),
        Reach::Pair(f, t),
        names.clone(),
    );
    later(world, span, move |w| {
        w.fabric.lock().expect("fabric lock").unblock_one_way(f, t);
        w.trace("faults", format!("heal {names}"));
    });
}

/// One rank of `inst` stops reading its control messages for a while.
pub fn stall(world: &Arc<World>, inst: &Instance) {
    let span = gray_span(world, FaultKind::Stall);
    let i = madsim::rand::thread_rng().gen_range(0..inst.ranks.len());
    let r = &inst.ranks[i];
    let until = world.until(span);
    r.mailbox.stall_until(until);
    world.fault(
        FaultKind::Stall,
        until,
        Reach::Instances(vec![inst.uid]),
        r.track.clone(),
    );
    // The rank sleeps on its doorbell: ring it when it may read again.
    let mailbox = r.mailbox.clone();
    let wait = Duration::from_micros(until.saturating_sub(world.now_us()));
    later(world, wait, move |_| mailbox.wake.ring());
}
