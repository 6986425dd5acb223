//! I10 at the drain bound: a request that is still not terminal while one of its transfer
//! jobs has been waiting for a completion since before the faults healed made no progress and
//! never will: nothing completes the job, and nothing timed the request out (TensorRT-LLM
//! #17665: one lost completion notification hangs a request forever). Reported before I7's
//! "not terminal", which names the hang but not the job it waits on.

use crate::rank::Instance;
use crate::report::Invariant;
use crate::world::World;
use kvferry_core::RequestId;
use std::sync::Arc;

/// Stuck requests whose jobs are reported: the first few say what hangs.
pub const MAX_HANGS_REPORTED: usize = 4;

pub fn report_pending_jobs(world: &World, live: &[Arc<Instance>], stuck: &[(RequestId, String)]) {
    for (id, _) in stuck.iter().take(MAX_HANGS_REPORTED) {
        for r in live.iter().flat_map(|i| i.ranks.iter()) {
            let pending = r.agent_jobs_for(*id);
            if pending > 0 {
                world.violate(
                    Invariant::I10,
                    format!(
                        "{id} made no progress: {pending} transfer jobs on {} never completed \
                         and nothing timed the request out",
                        r.track
                    ),
                );
            }
        }
    }
}
