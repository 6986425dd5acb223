//! The context parameters of one request: what a context instance hands its engine after
//! `respond_and_send` (on every rank), and the engine's router hands the generation side (the
//! reference system's disaggregated params). Encoded so they can cross processes, and checked on the
//! way back in: bytes that are not a ticket of this version, or that were damaged, are refused
//! before anything is registered. A well-formed ticket with a forged token is refused by the
//! context rank (I9): it serves no byte without the request's token.

use crate::node::frame::parse_token;
use crate::node::instance::MAX_LOCAL_RANKS;
use kvferry_core::layout::CacheLayout;
use kvferry_core::{RequestId, TransferToken};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use thiserror::Error;

/// First bytes of an encoded ticket; the last one is the format version (2: one address per
/// context rank).
pub const MAGIC: &[u8; 8] = b"KVFERRY\x02";
/// Blocks one ticket may name (a 16M-token context at 16 tokens per block).
pub const MAX_TICKET_BLOCKS: usize = 1 << 20;
/// Bytes an encoded ticket may take: its blocks at most 11 JSON bytes each, its addresses at
/// most 56 (a bracketed IPv6 address with scope, port and quotes), plus the rest.
pub const MAX_TICKET_BYTES: usize = 12 * MAX_TICKET_BLOCKS + 64 * MAX_LOCAL_RANKS + 4096;

/// Where and how a generation rank fetches one request's KV cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContextTicket {
    /// The context ranks' listening addresses, in rank order: one per rank of `layout`'s
    /// instance (a context instance is one process, `instance::MAX_LOCAL_RANKS` ranks at most).
    pub addrs: Vec<SocketAddr>,
    pub request: RequestId,
    pub token: TransferToken,
    /// The context instance's layout (rank 0's; `with_rank` gives the others).
    pub layout: CacheLayout,
    /// The request's blocks, the same ids on every context rank, in token order.
    pub blocks: Vec<u32>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    addrs: Vec<SocketAddr>,
    request: u64,
    /// Hex, so JSON carries all 128 bits.
    token: String,
    layout: CacheLayout,
    blocks: Vec<u32>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TicketError {
    #[error("not kvferry context parameters (wrong magic or version)")]
    Foreign,
    #[error("context parameters of {0} bytes exceed {MAX_TICKET_BYTES}")]
    TooLarge(usize),
    #[error("context parameters are damaged (checksum mismatch)")]
    Damaged,
    #[error("context parameters are malformed: {0}")]
    Malformed(String),
}

impl ContextTicket {
    pub fn encode(&self) -> Vec<u8> {
        let body = Body {
            addrs: self.addrs.clone(),
            request: self.request.0,
            token: format!("{:032x}", self.token.0),
            layout: self.layout,
            blocks: self.blocks.clone(),
        };
        let json = serde_json::to_vec(&body).expect("a ticket serializes");
        let mut out = Vec::with_capacity(MAGIC.len() + 4 + json.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
        out.extend_from_slice(&json);
        out
    }

    /// Checks and decodes `bytes`; never panics on any input.
    pub fn decode(bytes: &[u8]) -> Result<ContextTicket, TicketError> {
        if bytes.len() > MAX_TICKET_BYTES {
            return Err(TicketError::TooLarge(bytes.len()));
        }
        let Some(rest) = bytes.strip_prefix(MAGIC.as_slice()) else {
            return Err(TicketError::Foreign);
        };
        if rest.len() < 4 {
            return Err(TicketError::Damaged);
        }
        let (crc, json) = rest.split_at(4);
        if crc32c::crc32c(json).to_le_bytes() != crc {
            return Err(TicketError::Damaged);
        }
        let bad = |e: String| TicketError::Malformed(e);
        let b: Body = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
        b.layout
            .validate()
            .map_err(|e| bad(format!("layout: {e}")))?;
        if b.blocks.is_empty() || b.blocks.len() > MAX_TICKET_BLOCKS {
            return Err(bad(format!(
                "{} blocks, must be 1..={MAX_TICKET_BLOCKS}",
                b.blocks.len()
            )));
        }
        let world = b.layout.world_size() as usize;
        if b.addrs.is_empty() || b.addrs.len() > MAX_LOCAL_RANKS || b.addrs.len() != world {
            return Err(bad(format!(
                "{} context addresses for a layout of {world} ranks (1..={MAX_LOCAL_RANKS})",
                b.addrs.len()
            )));
        }
        let token = parse_token(&b.token).map_err(|e| bad(e.to_string()))?;
        Ok(ContextTicket {
            addrs: b.addrs,
            request: RequestId(b.request),
            token,
            layout: b.layout,
            blocks: b.blocks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{sharded, single_rank};

    fn ticket() -> ContextTicket {
        ContextTicket {
            addrs: vec!["127.0.0.1:7000".parse().unwrap()],
            request: RequestId(42),
            token: TransferToken(u128::MAX - 5),
            layout: single_rank(2, 4, 64, 16, 2),
            blocks: vec![3, 1, 2],
        }
    }

    #[test]
    fn round_trips() {
        let t = ticket();
        assert_eq!(ContextTicket::decode(&t.encode()), Ok(t));
    }

    #[test]
    fn refuses_foreign_damaged_and_malformed_bytes() {
        let good = ticket().encode();
        assert_eq!(ContextTicket::decode(b"hello"), Err(TicketError::Foreign));
        assert_eq!(ContextTicket::decode(&[]), Err(TicketError::Foreign));
        assert_eq!(ContextTicket::decode(MAGIC), Err(TicketError::Damaged));
        // Every single-byte change past the magic is caught.
        for i in MAGIC.len()..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x20;
            assert!(ContextTicket::decode(&b).is_err(), "byte {i}");
        }
        // A checksum that matches a body that is not a ticket.
        let json = br#"{"addrs":["127.0.0.1:1"],"request":1}"#;
        assert!(matches!(
            ContextTicket::decode(&framed(json)),
            Err(TicketError::Malformed(_))
        ));
        // The previous format (one `addr`) is foreign: its version byte differs.
        let mut v1 = good.clone();
        v1[MAGIC.len() - 1] = 1;
        assert_eq!(ContextTicket::decode(&v1), Err(TicketError::Foreign));
    }

    /// `json` as an encoded ticket: magic, its checksum, itself.
    fn framed(json: &[u8]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&crc32c::crc32c(json).to_le_bytes());
        b.extend_from_slice(json);
        b
    }

    /// A TP `tp` context instance's ticket with `addrs` listening ports.
    fn sharded_ticket(tp: u32, addrs: usize) -> ContextTicket {
        ContextTicket {
            addrs: (0..addrs)
                .map(|r| SocketAddr::from(([127, 0, 0, 1], 7000 + r as u16)))
                .collect(),
            layout: sharded(2, 8, 64, 16, 2, tp),
            ..ticket()
        }
    }

    #[test]
    fn round_trips_one_address_per_context_rank() {
        for tp in [2, 4, 16] {
            let t = sharded_ticket(tp, tp as usize);
            let back = ContextTicket::decode(&t.encode()).unwrap();
            assert_eq!(back.addrs.len(), tp as usize);
            assert_eq!(back, t);
        }
        let v6 = ContextTicket {
            addrs: vec![
                "[fe80::1%3]:7000".parse().unwrap(),
                "[::1]:7001".parse().unwrap(),
            ],
            ..sharded_ticket(2, 2)
        };
        assert_eq!(ContextTicket::decode(&v6.encode()), Ok(v6));
    }

    #[test]
    fn refuses_address_counts_that_disagree_with_the_layout() {
        // None, one short, one too many, and past the per-process bound (a layout of 32 ranks
        // is valid, an instance of one process cannot have them).
        for (tp, n) in [
            (1, 0),
            (2, 1),
            (2, 3),
            (4, 2),
            (32, 32),
            (1, MAX_LOCAL_RANKS + 1),
        ] {
            let bytes = sharded_ticket(tp, n).encode();
            let got = ContextTicket::decode(&bytes);
            assert!(
                matches!(&got, Err(TicketError::Malformed(m)) if m.contains("context addresses")),
                "tp {tp}, {n} addresses: {got:?}"
            );
        }
    }
}
