//! Wire decoder against arbitrary input, three ways from one input:
//!
//! 1. the bytes as a stream, fed whole and then in small chunks: no panic, the same frames and
//!    the same outcome either way, no allocation beyond the input's size;
//! 2. the same bytes with each frame's checksum recomputed, so mutations reach the body parsers
//!    instead of dying at the CRC (libFuzzer cannot solve a CRC32C);
//! 3. the bytes read as a structured `Message` (via `arbitrary`): encode then decode must give
//!    the message back;
//! 4. the stream taken the host data plane's way (each `Data` frame head first, its payload fed
//!    in pieces, the CRC checked at the end): the same frames, and an error where `decode`
//!    has one.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use bytes::BytesMut;
use kvferry_core::wire::{
    encode, Decoder, Message, WireError, HEADER_LEN, MAX_BLOCKS_PER_REQUEST, MAX_DETAIL_BYTES,
};
use libfuzzer_sys::fuzz_target;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Records the largest single allocation while armed, to check "never allocates past the
/// frame bound" directly rather than trusting libFuzzer's RSS limit to notice.
struct PeakAlloc;

static ARMED: AtomicBool = AtomicBool::new(false);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            PEAK.fetch_max(layout.size(), Ordering::Relaxed);
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            PEAK.fetch_max(new_size, Ordering::Relaxed);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: PeakAlloc = PeakAlloc;

/// Small enough that lengths around the bound are reachable by mutation.
const MAX_FRAME: usize = 4096;

/// Decodes until the decoder wants more bytes or fails. The allocation probe is armed around
/// each `decode` call only, so the harness's own vectors do not count.
fn drain(d: &Decoder, buf: &mut BytesMut) -> (Vec<Message>, Option<WireError>) {
    let mut out = Vec::new();
    loop {
        ARMED.store(true, Ordering::Relaxed);
        let got = d.decode(buf);
        ARMED.store(false, Ordering::Relaxed);
        match got {
            Ok(Some(m)) => out.push(m),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

/// Decodes `data` as a stream with the allocation probe armed; the decoder may allocate a
/// block list (16 bytes per 12 on the wire) or a detail string, never more than that.
fn decode_bounded(d: &Decoder, data: &[u8]) -> (Vec<Message>, Option<WireError>) {
    let mut buf = BytesMut::from(data);
    PEAK.store(0, Ordering::Relaxed);
    let got = drain(d, &mut buf);
    let peak = PEAK.load(Ordering::Relaxed);
    // Error messages format a short `String`; 256 bytes covers them.
    let bound = 2 * data.len().min(d.max_frame) + MAX_DETAIL_BYTES + 256;
    assert!(
        peak <= bound,
        "decode of {} bytes allocated {peak} at once (bound {bound})",
        data.len()
    );
    got
}

/// The same stream delivered a few bytes at a time must yield the same frames and the same
/// final outcome: `Ok(None)` may never hide a frame or an error.
fn decode_chunked(d: &Decoder, data: &[u8], chunk: usize) -> (Vec<Message>, Option<WireError>) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        let (mut msgs, err) = drain(d, &mut buf);
        out.append(&mut msgs);
        if err.is_some() {
            return (out, err);
        }
    }
    (out, None)
}

/// Rewrites each complete frame's checksum so its body gets parsed.
fn fix_crcs(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    let mut at = 0;
    while v.len() - at >= HEADER_LEN {
        let len = u32::from_be_bytes([v[at + 8], v[at + 9], v[at + 10], v[at + 11]]) as usize;
        let end = match (at + HEADER_LEN).checked_add(len) {
            Some(end) if end <= v.len() => end,
            _ => break,
        };
        let crc = crc32c::crc32c_append(crc32c::crc32c(&v[at..at + 12]), &v[at + HEADER_LEN..end]);
        v[at + 12..at + 16].copy_from_slice(&crc.to_be_bytes());
        at = end;
    }
    v
}

/// Decodes as the node's reader does: a `Data` frame's head first (`decode_data_head`), its
/// payload in pieces of `piece` bytes, then `verify`; anything else with `decode`. Returns
/// the frames and whether it stopped on an error.
fn decode_by_heads(d: &Decoder, data: &[u8], piece: usize) -> (Vec<Message>, bool) {
    let mut buf = BytesMut::from(data);
    let mut out = Vec::new();
    loop {
        match d.decode_data_head(&mut buf) {
            Err(_) => return (out, true),
            Ok(Some(mut head)) => {
                if buf.len() < head.payload_len {
                    return (out, false);
                }
                let payload = buf.split_to(head.payload_len);
                for p in payload.chunks(piece) {
                    head.update(p);
                }
                let (request, ctx_rank, offset) = (head.request, head.ctx_rank, head.offset);
                if head.verify().is_err() {
                    return (out, true);
                }
                out.push(Message::Data {
                    request,
                    ctx_rank,
                    offset,
                    payload: payload.freeze(),
                });
            }
            Ok(None) => match d.decode(&mut buf) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => return (out, false),
                Err(_) => return (out, true),
            },
        }
    }
}

fn check_stream(d: &Decoder, data: &[u8]) {
    let whole = decode_bounded(d, data);
    let piece = 1 + data.last().map_or(0, |b| usize::from(*b));
    assert_eq!(
        decode_by_heads(d, data, piece),
        (whole.0.clone(), whole.1.is_some()),
        "head-first decode differs"
    );
    let chunk = 1 + data.first().map_or(0, |b| usize::from(b % 7));
    assert_eq!(
        whole,
        decode_chunked(d, data, chunk),
        "chunked decode differs"
    );
    // Everything that decoded must re-encode to exactly the bytes it came from: the format
    // has one encoding per message, so a decoder accepting two spellings would be a bug.
    let mut re = BytesMut::new();
    for m in &whole.0 {
        encode(m, &mut re);
    }
    assert!(
        re.len() <= data.len(),
        "re-encoding is longer than the input"
    );
    assert_eq!(
        &re[..],
        &data[..re.len()],
        "re-encoding differs from the input"
    );
}

/// What a message looks like after a trip through the wire (details are cut to the limit).
fn normalised(m: &Message) -> Message {
    match m {
        Message::Error {
            request,
            code,
            detail,
        } if detail.len() > MAX_DETAIL_BYTES => {
            let mut end = MAX_DETAIL_BYTES;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            Message::Error {
                request: *request,
                code: *code,
                detail: detail[..end].to_owned(),
            }
        }
        other => other.clone(),
    }
}

fn check_round_trip(data: &[u8]) {
    let Ok(msg) = Message::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let mut buf = BytesMut::new();
    encode(&msg, &mut buf);
    let got = Decoder::default().decode(&mut buf);
    let over_limit = matches!(&msg, Message::RequestInfo(i)
        if i.ctx_blocks.len() > MAX_BLOCKS_PER_REQUEST || i.gen_blocks.len() > MAX_BLOCKS_PER_REQUEST);
    if over_limit {
        assert!(matches!(got, Err(WireError::Invalid { .. })), "{got:?}");
    } else {
        assert_eq!(got, Ok(Some(normalised(&msg))));
        assert!(buf.is_empty(), "decode left {} bytes", buf.len());
    }
}

fuzz_target!(|data: &[u8]| {
    let d = Decoder {
        max_frame: MAX_FRAME,
    };
    check_stream(&d, data);
    check_stream(&d, &fix_crcs(data));
    check_round_trip(data);
});
