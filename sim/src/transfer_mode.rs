//! How a seed's agents move bytes: the context side pushes (one-sided writes, the host node),
//! or the generation side pulls (the CUDA IPC and NIXL nodes: the context side checks the
//! token, pins and parks its send until the reader's "finished" notification or the reader's
//! loss), or each seed draws one of the two.

use serde::Serialize;
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferMode {
    Push,
    Pull,
    /// Each seed draws push or pull from its own RNG (deterministic per seed).
    #[default]
    Mixed,
}

/// The mode a seed runs in, once `Mixed` is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeedMode {
    Push,
    Pull,
}

impl TransferMode {
    pub const NAMES: [&'static str; 3] = ["push", "pull", "mixed"];

    pub fn name(self) -> &'static str {
        match self {
            TransferMode::Push => "push",
            TransferMode::Pull => "pull",
            TransferMode::Mixed => "mixed",
        }
    }

    /// This seed's mode; `Mixed` draws from the seed's RNG, so call it inside the seed.
    pub fn draw(self) -> SeedMode {
        match self {
            TransferMode::Push => SeedMode::Push,
            TransferMode::Pull => SeedMode::Pull,
            TransferMode::Mixed => {
                if madsim::rand::Rng::gen_bool(&mut madsim::rand::thread_rng(), 0.5) {
                    SeedMode::Pull
                } else {
                    SeedMode::Push
                }
            }
        }
    }
}

impl fmt::Display for TransferMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TransferMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [TransferMode::Push, TransferMode::Pull, TransferMode::Mixed]
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("{s:?} is not a transfer mode (push, pull or mixed)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for n in TransferMode::NAMES {
            assert_eq!(n.parse::<TransferMode>().map(|m| m.name()), Ok(n));
        }
        assert!("both".parse::<TransferMode>().is_err());
        assert_eq!(TransferMode::default(), TransferMode::Mixed);
    }
}
