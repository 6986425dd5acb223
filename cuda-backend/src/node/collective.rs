//! The completion collective of a one-rank instance: the gather is this rank's own
//! contribution. It still goes through `CompletionCollective` so a node keeps the same step
//! structure as a multi-rank instance.

use kvferry_core::collective::{CollectiveError, CompletionCollective, Contribution};

#[derive(Debug, Default)]
pub struct SoloCollective;

impl CompletionCollective for SoloCollective {
    async fn all_gather(
        &mut self,
        mine: Contribution,
    ) -> Result<Vec<Contribution>, CollectiveError> {
        Ok(vec![mine])
    }
}
