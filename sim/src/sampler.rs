//! The sampler of the growth rule (I11, `growth`): what every live rank's transceiver and
//! every live instance's KV pool hold, each with its bound, read from what the ranks publish
//! after each pass (`RankShared::sizes`: during the run the high-water marks since the last
//! sample, at the end the sizes now). The cluster calls it every
//! `Horizon::sample_every_ms`, and once more after convergence and the tail.

use crate::growth::Size;
use crate::rank::Instance;
use crate::report::Invariant;
use crate::world::World;
use kvferry_core::config::TransceiverConfig;
use kvferry_core::transceiver::TxSizes;
use std::sync::Arc;
use std::time::Duration;

/// Slack past the early-input TTL before the last sample, for the expiring rank's pass.
pub const TAIL_MARGIN: Duration = Duration::from_secs(1);

/// How long after convergence the last sample waits: the early-input TTL, the one timer that
/// may still hold state on an idle rank (input parked for a request that never registers
/// there), and a margin.
pub fn tail(config: &TransceiverConfig) -> Duration {
    Duration::from_millis(config.early_info_ttl_ms) + TAIL_MARGIN
}

/// Every size of every live rank and instance: each rank's high-water marks since the last
/// sample (`high`), or its sizes now.
fn sample(world: &World, live: &[Arc<Instance>], high: bool) -> Vec<Size> {
    let bounds = TxSizes::bounds(&world.tx_config).named();
    let mut out = Vec::new();
    for i in live {
        let (capacity, free) = {
            let p = i.pool.lock().expect("block pool lock");
            (p.capacity(), p.free_count())
        };
        out.push(Size {
            at: i.name(),
            name: "kv_blocks_in_use",
            value: capacity - free,
            bound: capacity,
        });
        for r in &i.ranks {
            let sizes = {
                let mut marks = r.sizes.lock().expect("sizes lock");
                if high {
                    marks.take_high()
                } else {
                    marks.now
                }
            };
            for ((name, value), (_, bound)) in sizes.named().into_iter().zip(bounds) {
                out.push(Size {
                    at: r.track.clone(),
                    name,
                    value,
                    bound,
                });
            }
        }
    }
    out
}

/// A sample during the run: every size within its bound; peaks updated.
pub fn observe(world: &World, live: &[Arc<Instance>]) {
    let sample = sample(world, live, true);
    let broken = world
        .checker
        .lock()
        .expect("checker lock")
        .growth
        .observe(&sample);
    for detail in broken {
        world.violate(Invariant::I11, detail);
    }
}

/// The last sample, after convergence and the tail: every size back at its baseline.
pub fn settled(world: &World, live: &[Arc<Instance>]) {
    let sample = sample(world, live, false);
    let broken = world
        .checker
        .lock()
        .expect("checker lock")
        .growth
        .settled(&sample);
    for detail in broken {
        world.violate(Invariant::I11, detail);
    }
}
