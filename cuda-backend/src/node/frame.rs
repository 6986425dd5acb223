//! The node's own control frames (load setup between a gen node and a ctx node), and a reader
//! that tells them apart from the core's wire frames on the same connection.
//!
//! Node frames live in a separate namespace so the core's wire format stays untouched:
//! `magic "KVFN" u32 | version u8 | reserved u8 x3 | length u32 | body`, big-endian header;
//! the body is the frame in bincode (version 2; version 1 was JSON, whose encoding and
//! parsing cost several µs of every small request's CPU, BENCHMARKS.md "per-request cost";
//! version 3 batches `Prepare`/`Prepared` and carries tokens as integers, not hex; version 4
//! tells a refusal that may pass (`Answer::Busy`) from one that will not).
//! A connection carries both kinds; the first four bytes of each frame pick the decoder.

use bytes::{Buf, BufMut, BytesMut};
use kvferry_core::layout::CacheLayout;
use kvferry_core::wire::{self, DataHead, Decoder, Message, WireError};
use kvferry_core::{RequestId, TransferToken};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const NODE_MAGIC: u32 = 0x4B56_464E; // "KVFN"
pub const NODE_VERSION: u8 = 4;
pub const NODE_HEADER_LEN: usize = 12;
/// Bound on a node frame body: a `Prepared` naming `MAX_PREPARE_BLOCKS` ids fits easily.
pub const MAX_NODE_BODY: usize = 64 << 10;
/// Bound on the asks of one `Prepare` (a gen asks for at most its free launch slots at once).
pub const MAX_PREPARE_ASKS: usize = 256;
/// Bound on the blocks one synthetic request may ask for.
pub const MAX_PREPARE_BLOCKS: u32 = 1024;
/// Bound on a core frame on a node connection: data chunks are far smaller.
pub const MAX_CORE_FRAME: usize = 2 << 20;

/// Load setup: the gen node asks the ctx node for synthetic requests, all it launches in one
/// driver step in one frame, and the ctx answers them all in one (version 3: one frame each
/// way per step, not per request; BENCHMARKS.md, "control frames per request").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeFrame {
    /// At most `MAX_PREPARE_ASKS` asks; a peer that sends more is cut off.
    Prepare { asks: Vec<Ask> },
    /// The answers to one `Prepare`, in its order; `layout` is the ctx rank's.
    Prepared {
        layout: CacheLayout,
        answers: Vec<Answer>,
    },
    /// CUDA backend, ctx to gen on connect: the ctx rank's KV pool as a CUDA IPC handle, so
    /// the gen maps it and pulls fragments itself (no `Data` frames on this connection).
    CudaPool {
        ctx_rank: u32,
        /// Exporting device ordinal (informational: the handle names the allocation).
        device: u32,
        pool_bytes: u64,
        /// Where the pool starts in the allocation the handle names (an adopted pool may be
        /// a sub-allocation of an engine's caching allocator).
        pool_offset: u64,
        block_bytes: u64,
        /// `cuIpcGetMemHandle` bytes as 128 hex digits.
        handle: String,
    },
    /// CUDA backend, ctx to gen: the ctx's send job for the request is parked, so the
    /// request's blocks are pinned and its token checked; only now may the gen read them.
    PullReady { request: RequestId, ctx_rank: u32 },
    /// CUDA backend, gen to ctx: the gen's reads of the request's blocks are over (its kernel
    /// fence passed, or it never launched). Answers every `PullReady` exactly once; the ctx
    /// completes its parked send on it, which is what lets the blocks be unpinned.
    PullFinished {
        request: RequestId,
        ctx_rank: u32,
        /// Why the pull did not complete; `None` when every byte arrived.
        error: Option<String>,
    },
    /// NIXL backend, ctx to gen: the ctx's send job `transfer` of the request is parked (its
    /// blocks pinned, the gen's token proven), so the gen may READ them from the ctx's pool at
    /// `pool_base` (`pool_bytes` long). The first one on a connection carries the ctx agent's
    /// metadata (its KV pool only) as hex: it is sent only after a token was proven.
    NixlReady {
        request: RequestId,
        ctx_rank: u32,
        transfer: u64,
        pool_base: u64,
        pool_bytes: u64,
        md: Option<String>,
    },
    /// NIXL backend, gen to ctx: the gen's READ for `transfer` will send no NIXL notification
    /// (it failed, was refused or never posted), so the ctx ends its parked send with `error`.
    /// A READ that succeeds is announced by NIXL's own notification, not by a frame.
    NixlFailed {
        request: RequestId,
        ctx_rank: u32,
        transfer: u64,
        error: String,
    },
    /// NIXL backend, gen to ctx, first on a connection: the name of the gen's NIXL agent.
    /// The ctx ends a parked send only on a notification from that agent.
    NixlAgent { name: String },
}

/// "Prepare a request of `blocks` blocks filled from `seed`; answer with `tag`." Without a
/// seed the contents are left as they are (the asker will not verify them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ask {
    pub tag: u64,
    pub blocks: u32,
    pub seed: Option<u64>,
}

/// The ctx's answer to one `Ask`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// The disaggregated params of a prepared request.
    Prepared {
        tag: u64,
        request: RequestId,
        token: u128,
        ctx_blocks: Vec<u32>,
    },
    /// Refused for good: asking again gets the same answer.
    Failed { tag: u64, reason: String },
    /// Nothing prepared for now: the ctx's pool or the asker's host share is full until
    /// requests end. The asker may ask again later (a gen load does, bounded).
    Busy { tag: u64, reason: String },
}

impl Answer {
    pub fn prepared(
        tag: u64,
        request: RequestId,
        token: TransferToken,
        ctx_blocks: Vec<u32>,
    ) -> Answer {
        Answer::Prepared {
            tag,
            request,
            token: token.0,
            ctx_blocks,
        }
    }
}

impl NodeFrame {
    /// The variant's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            NodeFrame::Prepare { .. } => "Prepare",
            NodeFrame::Prepared { .. } => "Prepared",
            NodeFrame::CudaPool { .. } => "CudaPool",
            NodeFrame::PullReady { .. } => "PullReady",
            NodeFrame::PullFinished { .. } => "PullFinished",
            NodeFrame::NixlReady { .. } => "NixlReady",
            NodeFrame::NixlFailed { .. } => "NixlFailed",
            NodeFrame::NixlAgent { .. } => "NixlAgent",
        }
    }
}

/// Parses a token written as hex (an embedding program's ticket).
pub fn parse_token(hex: &str) -> Result<TransferToken, FrameError> {
    u128::from_str_radix(hex, 16)
        .map(TransferToken)
        .map_err(|e| FrameError::Body(format!("token: {e}")))
}

/// Anything a node connection carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Core(Message),
    Node(NodeFrame),
}

#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum FrameError {
    #[error("core frame: {0}")]
    Wire(#[from] WireError),
    #[error("node frame version {0} unsupported")]
    Version(u8),
    #[error("node frame of {len} bytes exceeds the limit {MAX_NODE_BODY}")]
    TooLarge { len: usize },
    #[error("node frame body: {0}")]
    Body(String),
}

/// The body codec: bincode, its reads bounded by the body's length (a length prefix inside
/// that claims more than the body holds fails before anything is allocated for it), and
/// trailing bytes refused, so one frame has one encoding.
fn body_codec() -> impl bincode::Options + Copy {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_limit(MAX_NODE_BODY as u64)
        .reject_trailing_bytes()
}

pub fn encode_node(frame: &NodeFrame, out: &mut BytesMut) {
    use bincode::Options;
    let codec = body_codec();
    let len = codec
        .serialized_size(frame)
        .expect("node frames always serialize") as usize;
    assert!(len <= MAX_NODE_BODY, "node frame over its own bound");
    out.reserve(NODE_HEADER_LEN + len);
    out.put_u32(NODE_MAGIC);
    out.put_u8(NODE_VERSION);
    out.put_slice(&[0; 3]);
    out.put_u32(len as u32);
    codec
        .serialize_into(out.writer(), frame)
        .expect("node frames always serialize");
}

pub fn encode(frame: &Frame, out: &mut BytesMut) {
    match frame {
        Frame::Core(m) => wire::encode(m, out),
        Frame::Node(n) => encode_node(n, out),
    }
}

/// The length of the whole frame at the front of `buf` (either namespace), once its header
/// is in; the length is checked against its bound first, so a lying header is never buffered.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let (header, max) = match magic {
        NODE_MAGIC => (NODE_HEADER_LEN, MAX_NODE_BODY),
        wire::MAGIC => (wire::HEADER_LEN, MAX_CORE_FRAME),
        other => return Err(WireError::BadMagic(other).into()),
    };
    if buf.len() < header {
        return Ok(None);
    }
    // Both headers keep the body length at bytes 8..12.
    let len = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    if len > max {
        return Err(match magic {
            NODE_MAGIC => FrameError::TooLarge { len },
            _ => WireError::TooLarge { len, max }.into(),
        });
    }
    Ok(Some(header + len))
}

/// If `buf` starts with a core `Data` frame whose head is in, takes the head off (see
/// `Decoder::decode_data_head`); `Ok(None)` for anything else, which `decode` then takes.
pub fn decode_data_head(buf: &mut BytesMut) -> Result<Option<DataHead>, FrameError> {
    if buf.len() < 4 || u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) == NODE_MAGIC {
        return Ok(None);
    }
    let d = Decoder {
        max_frame: MAX_CORE_FRAME,
    };
    Ok(d.decode_data_head(buf)?)
}

/// Takes one whole frame of either namespace off the front of `buf`; `Ok(None)` when more
/// bytes are needed. After an error the stream is unusable: close the connection.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    if u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) != NODE_MAGIC {
        let d = Decoder {
            max_frame: MAX_CORE_FRAME,
        };
        return Ok(d.decode(buf)?.map(Frame::Core));
    }
    if buf.len() < NODE_HEADER_LEN {
        return Ok(None);
    }
    if buf[4] != NODE_VERSION {
        return Err(FrameError::Version(buf[4]));
    }
    let len = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    // Checked before waiting for the body, so a lying length never makes us buffer it.
    if len > MAX_NODE_BODY {
        return Err(FrameError::TooLarge { len });
    }
    if buf.len() < NODE_HEADER_LEN + len {
        return Ok(None);
    }
    buf.advance(NODE_HEADER_LEN);
    let body = buf.split_to(len);
    use bincode::Options;
    body_codec()
        .deserialize(&body)
        .map(|f| Some(Frame::Node(f)))
        .map_err(|e| FrameError::Body(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::single_rank;

    #[test]
    fn node_frame_round_trips_and_bounds_length() {
        let ask = |tag| Ask {
            tag,
            blocks: 3,
            seed: Some(9),
        };
        let f = NodeFrame::Prepare {
            asks: vec![ask(7), ask(8)],
        };
        let mut b = BytesMut::new();
        encode_node(&f, &mut b);
        let mut half = b.split_to(5);
        assert_eq!(decode(&mut half), Ok(None));
        half.unsplit(b);
        assert_eq!(decode(&mut half), Ok(Some(Frame::Node(f))));
        assert!(half.is_empty());

        let mut lie = BytesMut::new();
        lie.put_u32(NODE_MAGIC);
        lie.put_u8(NODE_VERSION);
        lie.put_slice(&[0; 3]);
        lie.put_u32(u32::MAX);
        assert!(matches!(decode(&mut lie), Err(FrameError::TooLarge { .. })));
    }

    /// Wraps `body` in a node frame header of the current version.
    fn framed(body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32(NODE_MAGIC);
        b.put_u8(NODE_VERSION);
        b.put_slice(&[0; 3]);
        b.put_u32(body.len() as u32);
        b.put_slice(body);
        b
    }

    /// Hostile bodies fail as `Body` errors without allocating what they claim: a block list
    /// whose length prefix says 2^60 ids, a body with bytes after its frame, an unknown variant.
    #[test]
    fn hostile_bodies_are_refused() {
        let prepared = NodeFrame::Prepared {
            layout: test_layout(),
            answers: vec![Answer::prepared(
                1,
                RequestId(2),
                TransferToken(3),
                vec![4, 5],
            )],
        };
        let mut whole = BytesMut::new();
        encode_node(&prepared, &mut whole);
        let body = whole.split_off(NODE_HEADER_LEN);
        // Varint encoding: the block count follows the variant (1 byte), the layout (9 x 1 + 1
        // for mla), the answer count (1), the answer's variant, tag, request and token (1 each).
        let count_at = 1 + 10 + 1 + 1 + 1 + 1 + 1;
        assert_eq!(
            body[count_at], 2,
            "the block count sits where this test lies about it"
        );
        let mut lying = body[..count_at].to_vec();
        lying.push(0xFD); // u64 follows
        lying.extend_from_slice(&(1u64 << 60).to_le_bytes());
        lying.extend_from_slice(&body[count_at + 1..]);
        assert!(matches!(
            decode(&mut framed(&lying)),
            Err(FrameError::Body(_))
        ));

        let mut trailing = body.to_vec();
        trailing.push(0);
        assert!(matches!(
            decode(&mut framed(&trailing)),
            Err(FrameError::Body(_))
        ));
        assert!(matches!(
            decode(&mut framed(&[200])),
            Err(FrameError::Body(_))
        ));
        assert_eq!(decode(&mut framed(&body)), Ok(Some(Frame::Node(prepared))));
    }

    #[test]
    fn cuda_frames_round_trip() {
        let frames = [
            NodeFrame::CudaPool {
                ctx_rank: 0,
                device: 1,
                pool_bytes: 64 << 20,
                pool_offset: 512,
                block_bytes: 64 << 10,
                handle: "ab".repeat(64),
            },
            NodeFrame::PullReady {
                request: RequestId(u64::MAX),
                ctx_rank: 3,
            },
            NodeFrame::PullFinished {
                request: RequestId(7),
                ctx_rank: 0,
                error: Some("cancelled".into()),
            },
        ];
        let mut b = BytesMut::new();
        for f in &frames {
            encode_node(f, &mut b);
        }
        for f in frames {
            assert_eq!(decode(&mut b), Ok(Some(Frame::Node(f))));
        }
        assert!(b.is_empty());
    }

    #[test]
    fn nixl_frames_round_trip() {
        let frames = [
            NodeFrame::NixlAgent {
                name: "kvferry-gen0-1-ab".into(),
            },
            NodeFrame::NixlReady {
                request: RequestId(9),
                ctx_rank: 1,
                transfer: 3,
                pool_base: 1 << 40,
                pool_bytes: 64 << 20,
                md: Some("00ff".into()),
            },
            NodeFrame::NixlFailed {
                request: RequestId(9),
                ctx_rank: 1,
                transfer: 3,
                error: "refused".into(),
            },
        ];
        let mut b = BytesMut::new();
        for f in &frames {
            encode_node(f, &mut b);
        }
        for f in frames {
            assert_eq!(decode(&mut b), Ok(Some(Frame::Node(f))));
        }
        assert!(b.is_empty());
    }

    #[test]
    fn token_survives_hex() {
        let t = TransferToken(u128::MAX - 5);
        assert_eq!(parse_token(&format!("{:032x}", t.0)).unwrap(), t);
    }

    fn test_layout() -> CacheLayout {
        single_rank(1, 1, 1, 1, 1)
    }
}
