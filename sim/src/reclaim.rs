//! I2 at quiescence, for KV blocks: once every request is terminal and every rank idle, every
//! block of every live instance is free again, none pinned and none waiting for a last unpin.
//! A block still held then was never reclaimed (vLLM #46283: an aborted push's blocks).

use crate::rank::Instance;
use crate::report::Invariant;
use crate::world::World;
use std::sync::Arc;

pub fn check_blocks(world: &World, live: &[Arc<Instance>]) {
    for i in live {
        let (capacity, free, pinned, deferred) = {
            let p = i.pool.lock().expect("block pool lock");
            (
                p.capacity(),
                p.free_count(),
                p.pinned_count(),
                p.deferred_count(),
            )
        };
        if free != capacity {
            world.violate(
                Invariant::I2,
                format!(
                    "{} at quiescence: {} of {capacity} KV blocks not free ({pinned} pinned, \
                     {deferred} freed under pins): never reclaimed",
                    i.name(),
                    capacity - free
                ),
            );
        }
    }
}
