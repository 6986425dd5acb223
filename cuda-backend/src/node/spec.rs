//! What a node is: its KV layout, pool size and transceiver configuration.

use kvferry_core::config::TransceiverConfig;
use kvferry_core::layout::CacheLayout;
use std::time::Duration;

/// Upper bound on `--blocks`: the pool lives in host memory.
pub const MAX_POOL_BLOCKS: u32 = 1 << 20;
/// The ctx node is instance 0, rank 0 (one process = one rank).
pub const CTX_INSTANCE: u32 = 0;
/// A ctx node names each accepted connection `GEN_INSTANCE_BASE + n`, rank 0.
pub const GEN_INSTANCE_BASE: u32 = 1;

#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub layout: CacheLayout,
    pub pool_blocks: u32,
    pub config: TransceiverConfig,
    pub limits: NodeLimits,
}

/// Default `NodeLimits::first_frame`: a gen's first frame (a `Prepare` or a `RequestInfo`)
/// follows its connect at once, so 5 s is generous for a live peer and short enough that a
/// connection that never speaks cannot keep its seat for long.
pub const DEFAULT_FIRST_FRAME: Duration = Duration::from_secs(5);
/// Default `NodeLimits::heartbeat`: a writer that has sent nothing for this long sends a
/// `Heartbeat`, so a live but idle peer is never mistaken for a silent one.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// Default `NodeLimits::heartbeat_misses`: 6 missed heartbeats (30 s at the default interval)
/// close a connection. Equal to the writer's stall bound (`conn::WRITE_STALL`, 30 s), so a
/// peer that stops reading and one that stops writing are both cut within the same time.
pub const DEFAULT_HEARTBEAT_MISSES: u32 = 6;
/// Default `NodeLimits::max_conns_per_ip`: a quarter of the ctx's connection table
/// (`ctx::MAX_CONNECTIONS`), so at least four hosts always find a seat; a gen host's ranks
/// (8 GPUs, a connection each per ctx rank) fit many times over.
pub const DEFAULT_MAX_CONNS_PER_IP: usize = 64;
/// Bounds on the limits themselves (anything outside is a typo).
pub const MAX_LIMIT: Duration = Duration::from_secs(3600);
pub const MAX_HEARTBEAT_MISSES: u32 = 1000;

/// Per-peer bounds of a node, so no one peer (or one host) can take what all peers share:
/// seats in the ctx's connection table, KV blocks, and the time a connection may stay silent.
///
/// Two heartbeats run, for two different things. These limits are the *connection's*: a
/// connection that brings no frame for `heartbeat * heartbeat_misses` loses its seat, whether
/// or not any request uses it (a hoarder that holds blocks but never asks, a half-open
/// socket). The transceiver's (`TransceiverConfig::heartbeat_interval_ms` and
/// `heartbeat_missed_limit`, in the node's `--config`) are the *requests'*: it fails what
/// depends on a peer that stops answering while the connection itself may still look fine
/// (its frames go to the driver, which feeds them to the transceiver). The connection-level
/// one stays because the transceiver knows nothing of connections without requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeLimits {
    /// A connection that has sent no whole frame this long after it was accepted is closed.
    /// Until its first frame a connection is "unproven": it is the one evicted when the
    /// table (or its host's share of it) is full and a new peer arrives.
    pub first_frame: Duration,
    /// How often a connection's writer sends a `Heartbeat` when it has sent nothing else.
    pub heartbeat: Duration,
    /// A connection that brings no whole frame for `heartbeat * heartbeat_misses` is closed
    /// (`idle`); the ctx then cancels what that peer held, as for any lost gen.
    pub heartbeat_misses: u32,
    /// Connections one source IP may hold on a ctx (connections are free to open; a cap per
    /// connection would be no cap at all).
    pub max_conns_per_ip: usize,
    /// KV blocks the prepared requests of one source IP may hold on a ctx; `None`: half the
    /// pool (`default_blocks_per_ip`), so one host can never take the whole pool.
    pub max_blocks_per_ip: Option<u32>,
}

impl Default for NodeLimits {
    fn default() -> Self {
        NodeLimits {
            first_frame: DEFAULT_FIRST_FRAME,
            heartbeat: DEFAULT_HEARTBEAT,
            heartbeat_misses: DEFAULT_HEARTBEAT_MISSES,
            max_conns_per_ip: DEFAULT_MAX_CONNS_PER_IP,
            max_blocks_per_ip: None,
        }
    }
}

/// Why a `NodeLimits` is unusable; names the CLI flag.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{flag}: {reason}")]
pub struct LimitError {
    pub flag: &'static str,
    pub reason: String,
}

/// Half the pool, at least one block: the default share of one source IP.
pub fn default_blocks_per_ip(pool_blocks: u32) -> u32 {
    (pool_blocks / 2).max(1)
}

impl NodeLimits {
    /// Silence past which a connection is closed.
    pub fn idle(&self) -> Duration {
        self.heartbeat * self.heartbeat_misses
    }

    /// The block share of one source IP on a pool of `pool_blocks`; never more than the pool,
    /// so an ask within the share can be met once requests end (`Answer::Busy`).
    pub fn blocks_per_ip(&self, pool_blocks: u32) -> u32 {
        self.max_blocks_per_ip
            .unwrap_or_else(|| default_blocks_per_ip(pool_blocks))
            .min(pool_blocks)
    }

    pub fn validate(&self) -> Result<(), LimitError> {
        let bad = |flag, reason: &str| {
            Err(LimitError {
                flag,
                reason: reason.into(),
            })
        };
        for (flag, d) in [
            ("--first-frame-ms", self.first_frame),
            ("--heartbeat-ms", self.heartbeat),
        ] {
            if d.is_zero() || d > MAX_LIMIT {
                return bad(flag, "must be in 1 ms..=1 h");
            }
        }
        // Two misses at least: one late heartbeat must not cut a live peer.
        if self.heartbeat_misses < 2 || self.heartbeat_misses > MAX_HEARTBEAT_MISSES {
            return bad("--heartbeat-misses", "must be in 2..=1000");
        }
        if self.max_conns_per_ip == 0 {
            return bad("--max-conns-per-ip", "must be at least 1");
        }
        if self.max_blocks_per_ip == Some(0) {
            return bad("--max-blocks-per-ip", "must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A share set past the pool is the pool: the ctx answers busy only what can be met.
    #[test]
    fn a_hosts_share_is_never_more_than_the_pool() {
        let mut l = NodeLimits::default();
        assert_eq!(l.blocks_per_ip(1024), 512);
        l.max_blocks_per_ip = Some(300);
        assert_eq!(l.blocks_per_ip(1024), 300);
        l.max_blocks_per_ip = Some(5000);
        assert_eq!(l.blocks_per_ip(1024), 1024);
    }
}
