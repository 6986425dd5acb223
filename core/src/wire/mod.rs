//! Versioned wire frames for the control plane (and the host data plane's `Data` frames).
//!
//! Frame: `magic u32 | version u8 | kind u8 | reserved u16 | length u32 | crc32c u32 | body`,
//! all big-endian. `length` counts the body only; `reserved` must be zero. The CRC32C covers
//! the first 12 header bytes (magic .. length) followed by the body, so a flipped kind or
//! length byte is caught as surely as a flipped body byte. Decoding any byte string returns a
//! frame or a typed error: it never panics and never allocates past the decoder's maximum frame
//! size, because the length is checked against that bound before the body is awaited, and every
//! count inside the body is checked against the bytes actually present before allocating.
//!
//! Kinds (values are part of the format) and bodies:
//!
//! | kind | message | body |
//! | --- | --- | --- |
//! | 1 | RequestInfo | request u64, token u128, layout (9 x u32 in field order, mla u8 0/1), ctx block count u32 + ids u32, gen block count u32 + (id u32, epoch u64) |
//! | 2, 3 | retired (version 2's `Ready` and `Done`): decoded as an unknown kind |
//! | 4 | Cancel | request u64, token u128 (the request's transfer token: the authority to end it) |
//! | 5 | Error | request u64, code u16, detail length u16 (<= MAX_DETAIL_BYTES), UTF-8 detail |
//! | 6 | Heartbeat | seq u64 (0: an answer to a heartbeat, never answered itself) |
//! | 7 | Data | request u64, ctx_rank u32, offset u64, payload (rest of the body) |
//!
//! Block counts are bounded by `MAX_BLOCKS_PER_REQUEST`. Layout fields travel raw: the plan
//! builder validates them, not the decoder.

use crate::blocks::BlockRef;
use crate::layout::CacheLayout;
use crate::{RequestId, TransferToken};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

mod crc;
mod data;
pub use crc::{crc32c, Crc32c};
pub use data::{DataHead, DataSeal, DATA_HEAD_LEN};

pub const MAGIC: u32 = 0x4B56_4652; // "KVFR"
/// Version 2: `Cancel` carries the request's token. Version 3: no `Ready` or `Done` (kinds 2
/// and 3): no receiver acted on them, and on a small request they were two of its five
/// control frames (BENCHMARKS.md, "control frames per request"). A transfer's end is its
/// receive job's completion on the generation side, an `Error`/`Cancel` when it fails.
pub const VERSION: u8 = 3;
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
    /// The generation side gives the request up. Only a `token` equal to the request's own
    /// ends it: a peer that never held the token cannot end another's request (I9).
    Cancel {
        request: RequestId,
        token: TransferToken,
    },
    Error {
        request: RequestId,
        code: ErrorCode,
        detail: String,
    },
    /// A sign of life (`transceiver::liveness`); `seq` 0 answers one and is never answered.
    Heartbeat {
        seq: u64,
    },
    /// Host data plane: `payload` lands at `offset` of the bytes `ctx_rank` sends for `request`.
    Data {
        request: RequestId,
        ctx_rank: u32,
        offset: u64,
        #[cfg_attr(feature = "arbitrary", arbitrary(with = arbitrary_payload))]
        payload: Bytes,
    },
}

/// `bytes` has no `Arbitrary` impl; build the payload from an arbitrary byte vector.
#[cfg(feature = "arbitrary")]
fn arbitrary_payload(u: &mut arbitrary::Unstructured<'_>) -> arbitrary::Result<Bytes> {
    Ok(Bytes::from(<Vec<u8> as arbitrary::Arbitrary>::arbitrary(
        u,
    )?))
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

/// Frame kinds on the wire. Values are part of the format: never renumber, only append.
mod kind {
    pub const REQUEST_INFO: u8 = 1;
    // 2 and 3 were `Ready` and `Done` (version 2); not reused, so an old frame is refused.
    pub const CANCEL: u8 = 4;
    pub const ERROR: u8 = 5;
    pub const HEARTBEAT: u8 = 6;
    pub const DATA: u8 = 7;
}

/// Encoded size of a `CacheLayout`: nine `u32` fields and the MLA flag byte.
const LAYOUT_LEN: usize = 9 * 4 + 1;
/// Encoded size of a `BlockRef`: id `u32`, epoch `u64`.
const BLOCK_REF_LEN: usize = 4 + 8;
/// Fixed fields in front of a `Data` payload: request `u64`, ctx rank `u32`, offset `u64`.
const DATA_PREFIX_LEN: usize = 8 + 4 + 8;

impl ErrorCode {
    fn from_u16(v: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match v {
            1 => BadToken,
            2 => ForeignBlocks,
            3 => UnknownRequest,
            4 => Layout,
            5 => Cancelled,
            6 => Timeout,
            7 => Busy,
            8 => Malformed,
            9 => Internal,
            _ => return None,
        })
    }
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::RequestInfo(_) => kind::REQUEST_INFO,
            Message::Cancel { .. } => kind::CANCEL,
            Message::Error { .. } => kind::ERROR,
            Message::Heartbeat { .. } => kind::HEARTBEAT,
            Message::Data { .. } => kind::DATA,
        }
    }
}

/// The longest prefix of `s` that fits in `max` bytes and ends on a char boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    // A char is at most 4 bytes, so this loop runs at most 3 times.
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Appends one frame for `msg` to `out`.
///
/// An `Error` detail longer than [`MAX_DETAIL_BYTES`] is cut at a char boundary: the detail is
/// diagnostic, and an over-long one must not cost the peer its connection. Block lists longer
/// than [`MAX_BLOCKS_PER_REQUEST`] are encoded as given and rejected by the receiving decoder,
/// like any other frame past its bounds.
///
/// Panics if the body exceeds `u32::MAX` bytes (a `Data` payload of 4 GiB): the length field
/// cannot express it, and such a payload is a caller bug, not peer input.
pub fn encode(msg: &Message, out: &mut BytesMut) {
    let start = put_header(out, msg.kind(), body_len_hint(msg));
    match msg {
        Message::RequestInfo(info) => {
            out.put_u64(info.request.0);
            out.put_u128(info.token.0);
            put_layout(out, &info.gen_layout);
            out.put_u32(count_u32(info.ctx_blocks.len()));
            for &b in &info.ctx_blocks {
                out.put_u32(b);
            }
            out.put_u32(count_u32(info.gen_blocks.len()));
            for b in &info.gen_blocks {
                out.put_u32(b.id);
                out.put_u64(b.epoch);
            }
        }
        Message::Cancel { request, token } => {
            out.put_u64(request.0);
            out.put_u128(token.0);
        }
        Message::Error {
            request,
            code,
            detail,
        } => {
            let detail = truncate_utf8(detail, MAX_DETAIL_BYTES);
            out.put_u64(request.0);
            out.put_u16(*code as u16);
            // MAX_DETAIL_BYTES < u16::MAX, so the cast is exact.
            out.put_u16(detail.len() as u16);
            out.put_slice(detail.as_bytes());
        }
        Message::Heartbeat { seq } => out.put_u64(*seq),
        Message::Data {
            request,
            ctx_rank,
            offset,
            payload,
        } => {
            out.put_u64(request.0);
            out.put_u32(*ctx_rank);
            out.put_u64(*offset);
            out.put_slice(payload);
        }
    }
    seal(out, start);
}

/// Appends a header whose length and checksum are zero (patched by `seal`); returns where the
/// frame starts.
fn put_header(out: &mut BytesMut, kind: u8, body_hint: usize) -> usize {
    let start = out.len();
    out.reserve(HEADER_LEN + body_hint);
    out.put_u32(MAGIC);
    out.put_u8(VERSION);
    out.put_u8(kind);
    out.put_u16(0);
    out.put_u32(0);
    out.put_u32(0);
    start
}

/// Patches the length and CRC of the frame at `start`, whose body runs to the end of `out`.
fn seal(out: &mut BytesMut, start: usize) {
    let body_len = out.len() - start - HEADER_LEN;
    let len = u32::try_from(body_len).expect("wire frame body exceeds u32::MAX bytes");
    out[start + 8..start + 12].copy_from_slice(&len.to_be_bytes());
    let crc = frame_crc(&out[start..start + 12], &out[start + HEADER_LEN..]);
    out[start + 12..start + 16].copy_from_slice(&crc.to_be_bytes());
}

/// Body size, so `encode` reserves once (exact except for a truncated detail).
fn body_len_hint(msg: &Message) -> usize {
    match msg {
        Message::RequestInfo(i) => {
            8 + 16
                + LAYOUT_LEN
                + 4
                + 4 * i.ctx_blocks.len()
                + 4
                + BLOCK_REF_LEN * i.gen_blocks.len()
        }
        Message::Cancel { .. } => 24,
        Message::Heartbeat { .. } => 8,
        Message::Error { detail, .. } => 12 + detail.len().min(MAX_DETAIL_BYTES),
        Message::Data { payload, .. } => DATA_PREFIX_LEN + payload.len(),
    }
}

/// Vector lengths travel as `u32`. A longer vector cannot be a valid request (the decoder
/// caps it far lower), so saturate and let the receiver reject it rather than panic here.
fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn put_layout(out: &mut BytesMut, l: &CacheLayout) {
    for v in [
        l.num_layers,
        l.num_kv_heads,
        l.head_dim,
        l.tokens_per_block,
        l.dtype_bytes,
        l.tp_size,
        l.tp_rank,
        l.pp_size,
        l.pp_rank,
    ] {
        out.put_u32(v);
    }
    out.put_u8(u8::from(l.mla));
}

/// CRC32C over the header's first 12 bytes (magic .. length) and the body. The header is
/// covered too: otherwise a flipped kind byte could turn e.g. a valid `Cancel` body into a
/// valid `Heartbeat` of the same size, undetected.
fn frame_crc(header12: &[u8], body: &[u8]) -> u32 {
    crc32c(&[header12, body])
}

/// Bounds-checked big-endian reads over a frame body. Every read checks the remaining length
/// first, so no input can index out of range.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        self.array(what).map(u16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        self.array(what).map(u64::from_be_bytes)
    }

    fn u128(&mut self, what: &'static str) -> Result<u128, WireError> {
        self.array(what).map(u128::from_be_bytes)
    }

    /// A `u32` element count, checked against `max` and against the bytes actually left
    /// (`elem_len` each) before the caller allocates: a lying count costs nothing.
    fn count(
        &mut self,
        what: &'static str,
        elem_len: usize,
        max: usize,
    ) -> Result<usize, WireError> {
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(WireError::Invalid {
                field: what,
                reason: format!("{n} entries exceed the limit {max}"),
            });
        }
        if n.saturating_mul(elem_len) > self.buf.len() {
            return Err(WireError::Truncated(what));
        }
        Ok(n)
    }

    fn finish(&self) -> Result<(), WireError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }
}

fn read_layout(r: &mut Reader<'_>) -> Result<CacheLayout, WireError> {
    const W: &str = "gen_layout";
    // Raw fields, no `validate()`: layout validity is the plan builder's call, and it answers
    // with a precise `PlanError` the peer can be told about.
    let layout = CacheLayout {
        num_layers: r.u32(W)?,
        num_kv_heads: r.u32(W)?,
        head_dim: r.u32(W)?,
        tokens_per_block: r.u32(W)?,
        dtype_bytes: r.u32(W)?,
        tp_size: r.u32(W)?,
        tp_rank: r.u32(W)?,
        pp_size: r.u32(W)?,
        pp_rank: r.u32(W)?,
        mla: match r.u8(W)? {
            0 => false,
            1 => true,
            v => {
                return Err(WireError::Invalid {
                    field: "gen_layout.mla",
                    reason: format!("flag byte {v} is neither 0 nor 1"),
                })
            }
        },
    };
    Ok(layout)
}

fn decode_body(frame_kind: u8, body: BytesMut) -> Result<Message, WireError> {
    if frame_kind == kind::DATA {
        return decode_data(body);
    }
    let mut r = Reader { buf: &body };
    let msg = match frame_kind {
        kind::REQUEST_INFO => Message::RequestInfo(read_request_info(&mut r)?),
        kind::CANCEL => Message::Cancel {
            request: RequestId(r.u64("request")?),
            token: TransferToken(r.u128("token")?),
        },
        kind::ERROR => read_error(&mut r)?,
        kind::HEARTBEAT => Message::Heartbeat { seq: r.u64("seq")? },
        // The header check admits only the kinds above.
        other => return Err(WireError::UnknownKind(other)),
    };
    r.finish()?;
    Ok(msg)
}

fn read_request_info(r: &mut Reader<'_>) -> Result<RequestInfo, WireError> {
    let request = RequestId(r.u64("request")?);
    let token = TransferToken(r.u128("token")?);
    let gen_layout = read_layout(r)?;
    let n = r.count("ctx_blocks", 4, MAX_BLOCKS_PER_REQUEST)?;
    let mut ctx_blocks = Vec::with_capacity(n);
    for _ in 0..n {
        ctx_blocks.push(r.u32("ctx_blocks")?);
    }
    let n = r.count("gen_blocks", BLOCK_REF_LEN, MAX_BLOCKS_PER_REQUEST)?;
    let mut gen_blocks = Vec::with_capacity(n);
    for _ in 0..n {
        gen_blocks.push(BlockRef {
            id: r.u32("gen_blocks")?,
            epoch: r.u64("gen_blocks")?,
        });
    }
    Ok(RequestInfo {
        request,
        token,
        gen_layout,
        ctx_blocks,
        gen_blocks,
    })
}

fn read_error(r: &mut Reader<'_>) -> Result<Message, WireError> {
    let request = RequestId(r.u64("request")?);
    let raw = r.u16("code")?;
    let code = ErrorCode::from_u16(raw).ok_or_else(|| WireError::Invalid {
        field: "code",
        reason: format!("unknown error code {raw}"),
    })?;
    let n = r.u16("detail")? as usize;
    if n > MAX_DETAIL_BYTES {
        return Err(WireError::Invalid {
            field: "detail",
            reason: format!("{n} bytes exceed the limit {MAX_DETAIL_BYTES}"),
        });
    }
    let detail = std::str::from_utf8(r.take(n, "detail")?)
        .map_err(|e| WireError::Invalid {
            field: "detail",
            reason: e.to_string(),
        })?
        .to_owned();
    Ok(Message::Error {
        request,
        code,
        detail,
    })
}

/// `Data` keeps its payload in the receive buffer's allocation: the body is split off, not
/// copied, so a 64 KiB chunk costs a refcount, not a memcpy.
fn decode_data(mut body: BytesMut) -> Result<Message, WireError> {
    let mut r = Reader { buf: &body };
    let request = RequestId(r.u64("request")?);
    let ctx_rank = r.u32("ctx_rank")?;
    let offset = r.u64("offset")?;
    body.advance(DATA_PREFIX_LEN);
    Ok(Message::Data {
        request,
        ctx_rank,
        offset,
        payload: body.freeze(),
    })
}

fn known_kind(k: u8) -> bool {
    (kind::REQUEST_INFO..=kind::DATA).contains(&k)
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
        let Some(len) = self.check_header(buf)? else {
            return Ok(None);
        };
        if buf.len() - HEADER_LEN < len {
            return Ok(None);
        }
        let expected = u32::from_be_bytes([buf[12], buf[13], buf[14], buf[15]]);
        let actual = frame_crc(&buf[..12], &buf[HEADER_LEN..HEADER_LEN + len]);
        if expected != actual {
            return Err(WireError::Checksum { expected, actual });
        }
        let frame_kind = buf[5];
        // `split_to` hands over the frame without copying; the rest of `buf` stays for the
        // next call.
        let mut frame = buf.split_to(HEADER_LEN + len);
        frame.advance(HEADER_LEN);
        decode_body(frame_kind, frame).map(Some)
    }

    /// Checks the header at the front of `buf` as far as its bytes have arrived; returns the
    /// body length once the whole header is in.
    fn check_header(&self, buf: &[u8]) -> Result<Option<usize>, WireError> {
        // Header fields are checked as soon as their bytes arrive, so a stream of garbage fails
        // on its first bytes instead of after a header's worth.
        if buf.len() >= 4 {
            let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            if magic != MAGIC {
                return Err(WireError::BadMagic(magic));
            }
        }
        if buf.len() >= 5 && buf[4] != VERSION {
            return Err(WireError::Version(buf[4]));
        }
        if buf.len() >= 6 && !known_kind(buf[5]) {
            return Err(WireError::UnknownKind(buf[5]));
        }
        if buf.len() >= 8 && (buf[6], buf[7]) != (0, 0) {
            return Err(WireError::Invalid {
                field: "reserved",
                reason: format!("{:#06x} is not zero", u16::from_be_bytes([buf[6], buf[7]])),
            });
        }
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
        // Before waiting for the body: a peer claiming a huge frame is cut off here, so the
        // caller never buffers (or reserves) more than `max_frame` on its word.
        if len > self.max_frame {
            return Err(WireError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        Ok(Some(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::unit_layout;

    fn one_of_each() -> Vec<Message> {
        let request = RequestId(7);
        vec![
            Message::RequestInfo(RequestInfo {
                request,
                token: TransferToken(9),
                gen_layout: unit_layout(),
                ctx_blocks: vec![1, 2, 3],
                gen_blocks: vec![BlockRef { id: 4, epoch: 5 }, BlockRef { id: 6, epoch: 8 }],
            }),
            Message::Cancel {
                request,
                token: TransferToken(9),
            },
            Message::Error {
                request,
                code: ErrorCode::BadToken,
                detail: "no".into(),
            },
            Message::Heartbeat { seq: 11 },
            Message::Data {
                request,
                ctx_rank: 1,
                offset: 2,
                payload: Bytes::from_static(b"kv"),
            },
        ]
    }

    #[test]
    fn the_reserved_size_is_the_encoded_size() {
        // `encode` reserves once from the hint; a short hint would reallocate per frame.
        for m in one_of_each() {
            let mut out = BytesMut::new();
            encode(&m, &mut out);
            assert_eq!(out.len(), HEADER_LEN + body_len_hint(&m), "{m:?}");
        }
    }

    #[cfg(feature = "arbitrary")]
    #[test]
    fn an_arbitrary_payload_carries_the_input_bytes() {
        let raw = [3u8, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 1];
        let mut u = arbitrary::Unstructured::new(&raw);
        let p = arbitrary_payload(&mut u).expect("enough input");
        assert!(!p.is_empty(), "fuzzing needs payloads with bytes in them");
    }
}
