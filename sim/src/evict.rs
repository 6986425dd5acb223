//! The `evict` fault: the context side's scheduler frees a request's KV blocks while the
//! request still waits for (or runs) its send, the window of TensorRT-LLM #12542. The pool
//! defers a free under pins, and a leg that starts after the free finds its blocks gone (the
//! core fails it as `blocks-gone`); a send that read the evicted blocks anyway breaks I5.

use crate::attribution::Reach;
use crate::faults::FaultKind;
use crate::rank::Instance;
use crate::world::World;
use kvferry_core::blocks::BlockRef;
use kvferry_core::RequestId;
use madsim::rand::Rng;
use std::sync::Arc;
use std::time::Duration;

/// An eviction strikes within this of the request's blocks being filled: before the
/// generation side asks (prefill takes up to `cluster::PREFILL_US`) or while it is served.
pub const EVICT_WITHIN_US: u64 = 4000;

/// With the seed's eviction rate, frees `blocks` of `id` on `inst` a little later.
pub fn maybe_evict(world: &Arc<World>, inst: &Instance, id: RequestId, blocks: Vec<BlockRef>) {
    if !world.strike(FaultKind::Evict, world.mix.evict) {
        return;
    }
    let delay = madsim::rand::thread_rng().gen_range(0..EVICT_WITHIN_US);
    // Held weakly, as by every timed fault task: a seed may end before it strikes.
    let w = Arc::downgrade(world);
    let pool = inst.pool.clone();
    let name = inst.name();
    madsim::task::spawn(async move {
        madsim::time::sleep(Duration::from_micros(delay)).await;
        let Some(world) = w.upgrade().filter(|w| !w.stopped()) else {
            return;
        };
        let out = pool.lock().expect("block pool lock").free(&blocks);
        if out.freed + out.deferred == 0 {
            return; // the request had already given its blocks back
        }
        world.fault(
            FaultKind::Evict,
            world.now_us(),
            Reach::Request(id),
            format!(
                "{id} on {name}: {} blocks freed, {} deferred under pins",
                out.freed, out.deferred
            ),
        );
    });
}
