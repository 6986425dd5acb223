//! Transceiver configuration. Field names follow the reference system (`backend`,
//! `max_tokens_in_buffer`, `kv_transfer_timeout_ms`, `kv_transfer_sender_future_timeout_ms`)
//! plus kvferry's own. Unknown fields are rejected so a typo is an error, not a default.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Bounds on configured values: anything outside is a typo, not a deployment.
pub const MAX_STAGING_SLOTS: usize = crate::staging::MAX_SLOTS;
pub const MAX_STAGING_SLOT_BYTES: u64 = 1 << 34;
pub const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
pub const MAX_IN_FLIGHT: usize = 1 << 20;
/// A staging slot of more tokens than this is a typo (a million-token context is 2^20).
pub const MAX_TOKENS_IN_BUFFER: u64 = 1 << 24;
/// The default `kv_transfer_sender_future_timeout_ms`: see that field.
pub const DEFAULT_SENDER_FUTURE_TIMEOUT_MS: u64 = 60_000;
/// The default `heartbeat_interval_ms`: see that field.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 1000;
/// The default `heartbeat_missed_limit`: see that field.
pub const DEFAULT_HEARTBEAT_MISSED_LIMIT: u32 = 5;
/// More missed heartbeats than this is a typo (at the longest interval, years of silence).
pub const MAX_HEARTBEAT_MISSED_LIMIT: u32 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Host memory over TCP (the GPU-less node) or the simulator's agent.
    Host,
    /// CUDA IPC and NVLink peer copies.
    Cuda,
    /// Host memory moved by NIXL over UCX (the node's feature `nixl`).
    Nixl,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransceiverConfig {
    pub backend: Backend,
    /// Tokens a staging slot holds; with the layout it sizes `staging_slot_bytes` when that is 0.
    pub max_tokens_in_buffer: u64,
    /// Warn once per request per enqueue when a transfer is still pending past this. Unset: never.
    pub kv_transfer_timeout_ms: Option<u64>,
    /// Budget for a sender's whole job (serve every generation rank) before it fails and its
    /// blocks go back. Default 60 s ([`DEFAULT_SENDER_FUTURE_TIMEOUT_MS`]): a context request
    /// holds KV blocks that only its generation side can release, so a generation side that
    /// asks for nothing (crashed, hung, hostile) must not keep them for ever. 60 s is long
    /// enough for a decode instance's admission queue under load and short enough that a
    /// silent peer's blocks come back within a minute. (The reference system ships a 1 s
    /// default for a related knob that only bounds one idle wait; here the budget is the
    /// whole send.) `None` disables it: then only a lost connection or a cancel frees them.
    pub kv_transfer_sender_future_timeout_ms: Option<u64>,
    /// Opt-in: evict transfers past their deadline (poison the slot, fail closed).
    pub inflight_cancel: bool,
    pub staging_slots: usize,
    /// 0 = derive from `max_tokens_in_buffer` and the layout.
    pub staging_slot_bytes: u64,
    /// When every slot is busy: use a one-off buffer (true) or queue with `staging_wait_ms`.
    pub staging_fallback: bool,
    /// Longest a transfer waits for a staging slot before it fails.
    pub staging_wait_ms: u64,
    /// Bound on transfers in flight on one rank; beyond it new requests fail at once.
    pub max_in_flight: usize,
    /// How long a context rank holds a `RequestInfo` for a request not registered there yet;
    /// past it the asking rank is told `UnknownRequest` instead of waiting on.
    pub early_info_ttl_ms: u64,
    /// How often this rank sends a `Heartbeat` to each peer a live request depends on (the
    /// peer it reads from or serves), and checks when it last heard from each. Default 1 s
    /// ([`DEFAULT_HEARTBEAT_INTERVAL_MS`]): one 17-byte frame per second per busy peer pair
    /// costs nothing next to KV traffic, and it makes a silent peer's detection a matter of
    /// seconds where the sender budget (60 s) and the early-info TTL (30 s) take a minute.
    pub heartbeat_interval_ms: u64,
    /// A peer that a live request depends on and that has sent no frame (of any kind) for this
    /// many intervals is lost, exactly as if its connection had reset (`handle_peer_lost`).
    /// Default 5 ([`DEFAULT_HEARTBEAT_MISSED_LIMIT`]): 5 s of silence at the default interval,
    /// which rides out a stop-the-world pause or TCP's first retransmits (RTO 200 ms, doubling)
    /// and still frees a silent peer's requests an order of magnitude sooner than the sender
    /// budget. At least 2: one late heartbeat must never cut a live peer.
    pub heartbeat_missed_limit: u32,
}

impl Default for TransceiverConfig {
    fn default() -> Self {
        TransceiverConfig {
            backend: Backend::Host,
            max_tokens_in_buffer: 8192,
            kv_transfer_timeout_ms: None,
            kv_transfer_sender_future_timeout_ms: Some(DEFAULT_SENDER_FUTURE_TIMEOUT_MS),
            inflight_cancel: false,
            staging_slots: 16,
            staging_slot_bytes: 0,
            staging_fallback: false,
            staging_wait_ms: 1000,
            max_in_flight: 4096,
            early_info_ttl_ms: 30_000,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            heartbeat_missed_limit: DEFAULT_HEARTBEAT_MISSED_LIMIT,
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("config is not valid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("config is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

impl TransceiverConfig {
    pub fn from_toml_str(s: &str) -> Result<Self, ConfigError> {
        let c: TransceiverConfig = toml::from_str(s)?;
        c.validate()?;
        Ok(c)
    }

    pub fn from_json_str(s: &str) -> Result<Self, ConfigError> {
        let c: TransceiverConfig = serde_json::from_str(s)?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_tokens_in_buffer == 0 || self.max_tokens_in_buffer > MAX_TOKENS_IN_BUFFER {
            return Err(invalid(
                "max_tokens_in_buffer",
                format!(
                    "must be in 1..={MAX_TOKENS_IN_BUFFER}, got {}",
                    self.max_tokens_in_buffer
                ),
            ));
        }
        self.validate_timeouts()?;
        if self.staging_slots == 0 || self.staging_slots > MAX_STAGING_SLOTS {
            return Err(invalid(
                "staging_slots",
                format!(
                    "must be in 1..={MAX_STAGING_SLOTS}, got {}",
                    self.staging_slots
                ),
            ));
        }
        if self.staging_slot_bytes > MAX_STAGING_SLOT_BYTES {
            return Err(invalid(
                "staging_slot_bytes",
                format!("exceeds {MAX_STAGING_SLOT_BYTES}"),
            ));
        }
        if self.early_info_ttl_ms == 0 || self.early_info_ttl_ms > MAX_TIMEOUT_MS {
            return Err(invalid(
                "early_info_ttl_ms",
                format!("must be in 1..={MAX_TIMEOUT_MS} ms"),
            ));
        }
        if self.staging_wait_ms > MAX_TIMEOUT_MS {
            return Err(invalid(
                "staging_wait_ms",
                format!("exceeds {MAX_TIMEOUT_MS} ms"),
            ));
        }
        if self.max_in_flight == 0 || self.max_in_flight > MAX_IN_FLIGHT {
            return Err(invalid(
                "max_in_flight",
                format!("must be in 1..={MAX_IN_FLIGHT}, got {}", self.max_in_flight),
            ));
        }
        self.validate_heartbeats()?;
        if self.inflight_cancel && self.kv_transfer_timeout_ms.is_none() {
            return Err(invalid(
                "inflight_cancel",
                "needs kv_transfer_timeout_ms: it evicts transfers past that budget",
            ));
        }
        Ok(())
    }

    fn validate_heartbeats(&self) -> Result<(), ConfigError> {
        if self.heartbeat_interval_ms == 0 || self.heartbeat_interval_ms > MAX_TIMEOUT_MS {
            return Err(invalid(
                "heartbeat_interval_ms",
                format!("must be in 1..={MAX_TIMEOUT_MS} ms"),
            ));
        }
        if !(2..=MAX_HEARTBEAT_MISSED_LIMIT).contains(&self.heartbeat_missed_limit) {
            return Err(invalid(
                "heartbeat_missed_limit",
                format!(
                    "must be in 2..={MAX_HEARTBEAT_MISSED_LIMIT} (one late heartbeat must not \
                     cut a live peer), got {}",
                    self.heartbeat_missed_limit
                ),
            ));
        }
        Ok(())
    }

    /// How long a peer a live request depends on may stay silent before it is lost.
    pub fn silence_limit(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.heartbeat_interval_ms) * self.heartbeat_missed_limit
    }

    fn validate_timeouts(&self) -> Result<(), ConfigError> {
        for (field, v) in [
            ("kv_transfer_timeout_ms", self.kv_transfer_timeout_ms),
            (
                "kv_transfer_sender_future_timeout_ms",
                self.kv_transfer_sender_future_timeout_ms,
            ),
        ] {
            match v {
                Some(0) => {
                    return Err(invalid(field, "must be at least 1 ms (omit it to disable)"))
                }
                Some(ms) if ms > MAX_TIMEOUT_MS => {
                    return Err(invalid(
                        field,
                        format!("{ms} ms exceeds {MAX_TIMEOUT_MS} ms"),
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Staging slot size for a rank whose blocks are `block_bytes` and hold `tokens_per_block`:
    /// `staging_slot_bytes`, or enough whole blocks for `max_tokens_in_buffer`. An error names
    /// the field when the derived size exceeds `MAX_STAGING_SLOT_BYTES`.
    pub fn slot_bytes_for(
        &self,
        block_bytes: u64,
        tokens_per_block: u32,
    ) -> Result<u64, ConfigError> {
        if self.staging_slot_bytes > 0 {
            return Ok(self.staging_slot_bytes);
        }
        let blocks = self
            .max_tokens_in_buffer
            .div_ceil(u64::from(tokens_per_block.max(1)))
            .max(1);
        match blocks.checked_mul(block_bytes) {
            Some(b) if b <= MAX_STAGING_SLOT_BYTES => Ok(b),
            _ => Err(invalid(
                "max_tokens_in_buffer",
                format!(
                    "{} tokens in blocks of {block_bytes} bytes exceed a slot of {MAX_STAGING_SLOT_BYTES} bytes",
                    self.max_tokens_in_buffer
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_with_reference_names_parses() {
        let c = TransceiverConfig::from_toml_str(
            "backend = \"host\"\nmax_tokens_in_buffer = 4096\nkv_transfer_timeout_ms = 500\ninflight_cancel = true\n",
        )
        .unwrap();
        assert_eq!(c.kv_transfer_timeout_ms, Some(500));
        assert!(c.inflight_cancel);
    }

    #[test]
    fn errors_name_the_field() {
        let e = TransceiverConfig::from_json_str(r#"{"staging_slots": 0}"#).unwrap_err();
        assert!(e.to_string().contains("staging_slots"), "{e}");
        let e = TransceiverConfig::from_toml_str("kv_transfer_timeout_ms = 0").unwrap_err();
        assert!(e.to_string().contains("kv_transfer_timeout_ms"), "{e}");
        let e = TransceiverConfig::from_toml_str("inflight_cancel = true").unwrap_err();
        assert!(e.to_string().contains("inflight_cancel"), "{e}");
        let e = TransceiverConfig::from_toml_str("early_info_ttl_ms = 0").unwrap_err();
        assert!(e.to_string().contains("early_info_ttl_ms"), "{e}");
        let e = TransceiverConfig::from_toml_str("heartbeat_missed_limit = 1").unwrap_err();
        assert!(e.to_string().contains("heartbeat_missed_limit"), "{e}");
        let e = TransceiverConfig::from_toml_str("stagin_slots = 3").unwrap_err();
        assert!(e.to_string().contains("stagin_slots"), "{e}");
    }

    /// Fix: `max_tokens_in_buffer = u64::MAX` passed validation, then overflowed the slot
    /// size (0-byte slots in release builds).
    #[test]
    fn huge_token_buffers_are_refused_with_the_field_named() {
        let e = TransceiverConfig::from_toml_str("max_tokens_in_buffer = 18446744073709551615")
            .unwrap_err();
        assert!(e.to_string().contains("max_tokens_in_buffer"), "{e}");
        let c = TransceiverConfig {
            max_tokens_in_buffer: MAX_TOKENS_IN_BUFFER,
            ..TransceiverConfig::default()
        };
        c.validate().unwrap();
        let e = c.slot_bytes_for(1 << 30, 1).unwrap_err();
        assert!(e.to_string().contains("max_tokens_in_buffer"), "{e}");
        assert_eq!(c.slot_bytes_for(1024, 16).unwrap(), (1 << 20) * 1024);
    }

    type Edit = fn(&mut TransceiverConfig);

    /// Every limit at its last valid value (each field at both ends where it has two).
    fn valid_edges() -> [(&'static str, Edit); 17] {
        [
            ("heartbeat_interval_ms", |c| c.heartbeat_interval_ms = 1),
            ("heartbeat_interval_ms", |c| {
                c.heartbeat_interval_ms = MAX_TIMEOUT_MS
            }),
            ("heartbeat_missed_limit", |c| c.heartbeat_missed_limit = 2),
            ("heartbeat_missed_limit", |c| {
                c.heartbeat_missed_limit = MAX_HEARTBEAT_MISSED_LIMIT
            }),
            ("max_tokens_in_buffer", |c| c.max_tokens_in_buffer = 1),
            ("max_tokens_in_buffer", |c| {
                c.max_tokens_in_buffer = MAX_TOKENS_IN_BUFFER
            }),
            ("kv_transfer_timeout_ms", |c| {
                c.kv_transfer_timeout_ms = Some(1)
            }),
            ("kv_transfer_timeout_ms", |c| {
                c.kv_transfer_timeout_ms = Some(MAX_TIMEOUT_MS)
            }),
            ("kv_transfer_sender_future_timeout_ms", |c| {
                c.kv_transfer_sender_future_timeout_ms = Some(MAX_TIMEOUT_MS)
            }),
            ("kv_transfer_sender_future_timeout_ms", |c| {
                c.kv_transfer_sender_future_timeout_ms = None
            }),
            ("staging_slots", |c| c.staging_slots = MAX_STAGING_SLOTS),
            ("staging_slot_bytes", |c| {
                c.staging_slot_bytes = MAX_STAGING_SLOT_BYTES
            }),
            ("early_info_ttl_ms", |c| {
                c.early_info_ttl_ms = MAX_TIMEOUT_MS
            }),
            ("staging_wait_ms", |c| c.staging_wait_ms = MAX_TIMEOUT_MS),
            ("staging_wait_ms", |c| c.staging_wait_ms = 0),
            ("max_in_flight", |c| c.max_in_flight = MAX_IN_FLIGHT),
            ("inflight_cancel", |c| {
                c.inflight_cancel = true;
                c.kv_transfer_timeout_ms = Some(1);
            }),
        ]
    }

    /// Every limit at its first invalid value.
    fn invalid_edges() -> [(&'static str, Edit); 18] {
        [
            ("heartbeat_interval_ms", |c| c.heartbeat_interval_ms = 0),
            ("heartbeat_interval_ms", |c| {
                c.heartbeat_interval_ms = MAX_TIMEOUT_MS + 1
            }),
            ("heartbeat_missed_limit", |c| c.heartbeat_missed_limit = 1),
            ("heartbeat_missed_limit", |c| {
                c.heartbeat_missed_limit = MAX_HEARTBEAT_MISSED_LIMIT + 1
            }),
            ("max_tokens_in_buffer", |c| c.max_tokens_in_buffer = 0),
            ("max_tokens_in_buffer", |c| {
                c.max_tokens_in_buffer = MAX_TOKENS_IN_BUFFER + 1
            }),
            ("kv_transfer_timeout_ms", |c| {
                c.kv_transfer_timeout_ms = Some(MAX_TIMEOUT_MS + 1)
            }),
            ("kv_transfer_sender_future_timeout_ms", |c| {
                c.kv_transfer_sender_future_timeout_ms = Some(0)
            }),
            ("kv_transfer_sender_future_timeout_ms", |c| {
                c.kv_transfer_sender_future_timeout_ms = Some(MAX_TIMEOUT_MS + 1)
            }),
            ("staging_slots", |c| c.staging_slots = 0),
            ("staging_slots", |c| c.staging_slots = MAX_STAGING_SLOTS + 1),
            ("staging_slot_bytes", |c| {
                c.staging_slot_bytes = MAX_STAGING_SLOT_BYTES + 1
            }),
            ("early_info_ttl_ms", |c| c.early_info_ttl_ms = 0),
            ("early_info_ttl_ms", |c| {
                c.early_info_ttl_ms = MAX_TIMEOUT_MS + 1
            }),
            ("staging_wait_ms", |c| {
                c.staging_wait_ms = MAX_TIMEOUT_MS + 1
            }),
            ("max_in_flight", |c| c.max_in_flight = 0),
            ("max_in_flight", |c| c.max_in_flight = MAX_IN_FLIGHT + 1),
            ("inflight_cancel", |c| {
                c.inflight_cancel = true;
                c.kv_transfer_timeout_ms = None;
            }),
        ]
    }

    /// Every limit is inclusive: its last valid value passes.
    #[test]
    fn every_limit_is_inclusive() {
        for (field, edit) in valid_edges() {
            let mut c = TransceiverConfig::default();
            edit(&mut c);
            c.validate()
                .unwrap_or_else(|e| panic!("{field} at its edge refused: {e}"));
        }
    }

    /// The first value past every limit fails and names its field.
    #[test]
    fn every_limit_past_its_edge_names_its_field() {
        for (field, edit) in invalid_edges() {
            let mut c = TransceiverConfig::default();
            edit(&mut c);
            match c.validate() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field} past its edge: {other:?}"),
            }
        }
    }

    /// The longest timeout is a day, written out: the edge test above reads the constant, so
    /// a wrong constant would pass it.
    #[test]
    fn a_timeout_of_a_day_is_the_longest() {
        let day = TransceiverConfig::from_toml_str("kv_transfer_timeout_ms = 86400000").unwrap();
        assert_eq!(day.kv_transfer_timeout_ms, Some(86_400_000));
        let e = TransceiverConfig::from_toml_str("kv_transfer_timeout_ms = 86400001").unwrap_err();
        assert!(e.to_string().contains("kv_transfer_timeout_ms"), "{e}");
    }

    #[test]
    fn slot_bytes_come_from_the_field_or_whole_blocks_of_tokens() {
        let set = TransceiverConfig {
            staging_slot_bytes: 12_345,
            ..TransceiverConfig::default()
        };
        assert_eq!(set.slot_bytes_for(1 << 20, 16).unwrap(), 12_345);
        let derived = TransceiverConfig {
            max_tokens_in_buffer: 10,
            ..TransceiverConfig::default()
        };
        // 10 tokens in blocks of 4: 3 whole blocks.
        assert_eq!(derived.slot_bytes_for(100, 4).unwrap(), 300);
        assert_eq!(derived.slot_bytes_for(100, 10).unwrap(), 100);
        assert_eq!(
            derived.slot_bytes_for(100, 64).unwrap(),
            100,
            "at least one block"
        );
        assert_eq!(
            derived.slot_bytes_for(100, 0).unwrap(),
            1000,
            "0 reads as 1"
        );
        // Exactly the largest slot is fine; one byte more is not.
        let one = TransceiverConfig {
            max_tokens_in_buffer: 1,
            ..TransceiverConfig::default()
        };
        assert_eq!(
            one.slot_bytes_for(MAX_STAGING_SLOT_BYTES, 1).unwrap(),
            MAX_STAGING_SLOT_BYTES
        );
        assert!(one.slot_bytes_for(MAX_STAGING_SLOT_BYTES + 1, 1).is_err());
        assert!(derived.slot_bytes_for(u64::MAX, 1).is_err(), "overflow");
    }

    #[test]
    fn json_parses_like_toml() {
        let c =
            TransceiverConfig::from_json_str(r#"{"backend": "cuda", "staging_slots": 3}"#).unwrap();
        assert_eq!((c.backend, c.staging_slots), (Backend::Cuda, 3));
        assert!(matches!(
            TransceiverConfig::from_json_str("{"),
            Err(ConfigError::Json(_))
        ));
        assert!(matches!(
            TransceiverConfig::from_toml_str("= 3"),
            Err(ConfigError::Toml(_))
        ));
    }

    /// The defaults of the doc comments: a silent peer is lost after 5 s.
    #[test]
    fn a_silent_peer_is_lost_after_five_seconds_by_default() {
        let c = TransceiverConfig::default();
        assert_eq!(
            (c.heartbeat_interval_ms, c.heartbeat_missed_limit),
            (1000, 5)
        );
        assert_eq!(c.silence_limit(), std::time::Duration::from_secs(5));
    }

    #[test]
    fn the_default_releases_what_a_silent_peer_holds() {
        let c = TransceiverConfig::default();
        assert_eq!(
            c.kv_transfer_sender_future_timeout_ms,
            Some(DEFAULT_SENDER_FUTURE_TIMEOUT_MS)
        );
        c.validate().unwrap();
    }
}
