//! I5 in the reading direction: a transfer reads a block (a push sender's gather, a pull
//! reader's READ) only while the block is still the allocation of the request it serves. A
//! block freed or reassigned under a read hands stale or foreign bytes on as valid.

use super::*;

impl AgentInner {
    /// I5: every block `frags` reads from this rank's memory is still `request`'s allocation
    /// among `blocks` (the pins the transfer took). `reader` names the reading rank.
    pub(super) fn check_read(
        &self,
        reader: &str,
        (id, request): (TransferId, RequestId),
        blocks: &[BlockRef],
        frags: &[Fragment],
    ) {
        let bad = {
            let pool = self.pool.lock().expect("block pool lock");
            frags.iter().find_map(|f| {
                let block = (f.src_offset / self.block_bytes) as u32;
                match blocks.iter().find(|b| b.id == block) {
                    None => Some(format!("block {block} is not among the transfer's blocks")),
                    Some(b) => pool.check_owner(b, request).err().map(|e| e.to_string()),
                }
            })
        };
        if let Some(e) = bad {
            let at = self.world.now_us();
            self.world.checker.lock().expect("checker lock").violate(
                Invariant::I5,
                at,
                format!(
                    "{reader}: transfer {} for {request} read a block of {} it does not own: {e}",
                    id.0, self.track
                ),
            );
        }
    }
}
