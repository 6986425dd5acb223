//! Versioned wire frames for the control plane (and the host data plane's `Data` frames).
//!
//! Frame: `magic u32 | version u8 | kind u8 | reserved u16 | length u32 | crc32c u32 | body`,
//! all big-endian, CRC over the body. Decoding any byte string returns a frame or a typed
//! error: it never panics and never allocates past the decoder's maximum frame size, because
//! the length is checked against that bound before the body is read.

use crate::blocks::BlockRef;
use crate::layout::CacheLayout;
use crate::{RequestId, TransferToken};
use bytes::{Bytes, BytesMut};
use thiserror::Error;

pub const MAGIC: u32 = 0x4B56_4652; // "KVFR"
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 16;
/// Default bound on a frame body; a peer claiming more is cut off, not buffered.
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;
/// Bound on blocks named by one RequestInfo.
pub const MAX_BLOCKS_PER_REQUEST: usize = crate::plan::MAX_PLAN_BLOCKS;
/// Bound on an error frame's detail text.
pub const MAX_DETAIL_BYTES: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[repr(u16)]
pub enum ErrorCode {
    /// The transfer token did not match the request's.
    BadToken = 1,
    /// The peer named blocks that are not the request's.
    ForeignBlocks = 2,
    /// No such request (never known, or already finished).
    UnknownRequest = 3,
    /// Layouts cannot be planned against each other.
    Layout = 4,
    Cancelled = 5,
    Timeout = 6,
    /// Out of staging slots or blocks.
    Busy = 7,
    /// The frame could not be decoded.
    Malformed = 8,
    Internal = 9,
}

/// Generation rank → context rank: "send me this request's blocks".
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct RequestInfo {
    pub request: RequestId,
    pub token: TransferToken,
    /// The asking generation rank's layout (its rank fields identify it).
    pub gen_layout: CacheLayout,
    /// The request's blocks on the context instance, in token order.
    pub ctx_blocks: Vec<u32>,
    /// The asking rank's blocks for the request, same order, with epochs.
    pub gen_blocks: Vec<BlockRef>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Message {
    RequestInfo(RequestInfo),
    /// Context rank accepted the request info; the transfer starts.
    Ready { request: RequestId, ctx_rank: u32 },
    /// Context rank finished sending `bytes` with body checksum `crc`.
    Done {
        request: RequestId,
        ctx_rank: u32,
        bytes: u64,
        crc: u32,
    },
    Cancel { request: RequestId },
    Error {
        request: RequestId,
        code: ErrorCode,
        detail: String,
    },
    Heartbeat { seq: u64 },
    /// Host data plane: `payload` lands at `offset` of the bytes `ctx_rank` sends for `request`.
    Data {
        request: RequestId,
        ctx_rank: u32,
        offset: u64,
        payload: Bytes,
    },
}

#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum WireError {
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported version {0}")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame of {len} bytes exceeds the limit {max}")]
    TooLarge { len: usize, max: usize },
    #[error("checksum mismatch: header {expected:#010x}, body {actual:#010x}")]
    Checksum { expected: u32, actual: u32 },
    #[error("truncated frame body: {0}")]
    Truncated(&'static str),
    #[error("invalid field {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{0} trailing bytes after the frame body")]
    Trailing(usize),
}

/// Appends one frame for `msg` to `out`.
pub fn encode(msg: &Message, out: &mut BytesMut) {
    let _ = (msg, out);
    todo!("wire codec")
}

/// Streaming decoder with a bound on the frame size.
#[derive(Clone, Copy, Debug)]
pub struct Decoder {
    pub max_frame: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

impl Decoder {
    /// Takes one whole frame off the front of `buf`: `Ok(None)` if more bytes are needed.
    /// After an error the stream is unusable (framing is lost): close the connection.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Message>, WireError> {
        let _ = buf;
        todo!("wire codec")
    }
}
