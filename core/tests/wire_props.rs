//! Properties of the wire codec: round trips, streaming, and that no byte string (random,
//! truncated or corrupted) makes the decoder panic or hand back a message that was not sent.
//!
//! Fuzz findings that were fixed land at the bottom as plain regression tests, so they run on
//! stable in `cargo test` without cargo-fuzz.

use bytes::{Bytes, BytesMut};
use kvferry_core::blocks::BlockRef;
use kvferry_core::layout::CacheLayout;
use kvferry_core::wire::{
    encode, Decoder, ErrorCode, Message, RequestInfo, WireError, HEADER_LEN, MAGIC,
    MAX_BLOCKS_PER_REQUEST, MAX_DETAIL_BYTES, VERSION,
};
use kvferry_core::{RequestId, TransferToken};
use proptest::prelude::*;

/// Raw layouts, valid or not: the codec must carry any field values unchanged.
fn layout() -> impl Strategy<Value = CacheLayout> {
    (any::<[u32; 9]>(), any::<bool>()).prop_map(|(f, mla)| CacheLayout {
        num_layers: f[0],
        num_kv_heads: f[1],
        head_dim: f[2],
        tokens_per_block: f[3],
        dtype_bytes: f[4],
        tp_size: f[5],
        tp_rank: f[6],
        pp_size: f[7],
        pp_rank: f[8],
        mla,
    })
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    use ErrorCode::*;
    prop::sample::select(vec![
        BadToken,
        ForeignBlocks,
        UnknownRequest,
        Layout,
        Cancelled,
        Timeout,
        Busy,
        Malformed,
        Internal,
    ])
}

/// Every message kind with field values drawn across their whole range. Vectors stay short so
/// the per-byte corruption sweep stays fast; length limits have their own tests.
fn message() -> impl Strategy<Value = Message> {
    let req = any::<u64>().prop_map(RequestId);
    prop_oneof![
        (
            req.clone(),
            any::<u128>(),
            layout(),
            prop::collection::vec(any::<u32>(), 0..24),
            prop::collection::vec((any::<u32>(), any::<u64>()), 0..24),
        )
            .prop_map(|(request, token, gen_layout, ctx_blocks, gen)| {
                Message::RequestInfo(RequestInfo {
                    request,
                    token: TransferToken(token),
                    gen_layout,
                    ctx_blocks,
                    gen_blocks: gen
                        .into_iter()
                        .map(|(id, epoch)| BlockRef { id, epoch })
                        .collect(),
                })
            }),
        (req.clone(), any::<u128>()).prop_map(|(request, t)| Message::Cancel {
            request,
            token: TransferToken(t)
        }),
        // Up to 64 chars of any plane: multi-byte UTF-8 included, always under the limit.
        (req.clone(), error_code(), "\\PC{0,64}").prop_map(|(request, code, detail)| {
            Message::Error {
                request,
                code,
                detail,
            }
        }),
        any::<u64>().prop_map(|seq| Message::Heartbeat { seq }),
        (
            req,
            any::<u32>(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..256)
        )
            .prop_map(|(request, ctx_rank, offset, payload)| Message::Data {
                request,
                ctx_rank,
                offset,
                payload: Bytes::from(payload),
            }),
    ]
}

fn encoded(msg: &Message) -> BytesMut {
    let mut buf = BytesMut::new();
    encode(msg, &mut buf);
    buf
}

/// Decodes frames until the decoder wants more bytes or fails; panics are the only failure
/// this helper itself can observe.
fn drain(d: &Decoder, buf: &mut BytesMut) -> Result<Vec<Message>, WireError> {
    let mut out = Vec::new();
    while let Some(m) = d.decode(buf)? {
        out.push(m);
    }
    Ok(out)
}

/// Bound used by the corruption sweep, so a corrupted length either fails at once or asks for
/// a padding the test can afford to supply.
const SWEEP_MAX: usize = 1 << 20;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn round_trip(msg in message()) {
        let mut buf = encoded(&msg);
        let got = Decoder::default().decode(&mut buf);
        prop_assert_eq!(got, Ok(Some(msg)));
        prop_assert!(buf.is_empty(), "{} bytes left after one frame", buf.len());
    }

    /// Several frames in one stream, delivered in arbitrary chunks: each decode consumes
    /// exactly one frame, and the messages come out in order.
    #[test]
    fn streaming_in_chunks(
        msgs in prop::collection::vec(message(), 1..6),
        cuts in prop::collection::vec(1usize..64, 1..40),
    ) {
        let mut stream = BytesMut::new();
        for m in &msgs {
            encode(m, &mut stream);
        }
        let d = Decoder::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut cut = cuts.iter().cycle();
        while !stream.is_empty() {
            let n = (*cut.next().unwrap()).min(stream.len());
            buf.extend_from_slice(&stream.split_to(n));
            got.extend(drain(&d, &mut buf).expect("valid stream"));
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, msgs);
    }

    /// A receiver that takes `Data` frames head first and lands their payloads piece by piece
    /// (as the node's bulk path does) sees the same stream as one using `decode` alone, and
    /// a flipped byte anywhere in a data frame fails it one way or the other.
    #[test]
    fn data_heads_agree_with_decode(
        msgs in prop::collection::vec(message(), 1..6),
        cuts in prop::collection::vec(1usize..64, 1..40),
        flip in prop::option::of((any::<prop::sample::Index>(), 1u8..=255)),
    ) {
        let mut stream = BytesMut::new();
        for m in &msgs {
            encode(m, &mut stream);
        }
        if let Some((at, bits)) = flip {
            let i = at.index(stream.len());
            stream[i] ^= bits;
        }
        let by_decode = drain(&Decoder::default(), &mut stream.clone());
        let by_heads = drain_by_heads(&mut stream, &cuts);
        match (by_decode, by_heads) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            (a, b) => prop_assert!(false, "decode {:?} but heads {:?}", a, b),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        max in prop_oneof![Just(0usize), 0usize..4096, Just(usize::MAX)],
    ) {
        let d = Decoder { max_frame: max };
        let _ = drain(&d, &mut BytesMut::from(&bytes[..]));
    }

    /// Garbage behind a valid header: the header passes, so the body parsers see it. The
    /// checksum is recomputed so the body is parsed rather than rejected by the CRC.
    #[test]
    fn arbitrary_bodies_never_panic(
        kind in 0u8..10,
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut buf = frame_with_body(kind, &body);
        match Decoder::default().decode(&mut buf) {
            Ok(Some(m)) => {
                // Whatever decoded must be what its own encoding says.
                let re = encoded(&m);
                prop_assert_eq!(&re[HEADER_LEN..], &body[..]);
            }
            Ok(None) => prop_assert!(false, "complete frame reported as partial"),
            Err(_) => {}
        }
    }

    /// Every proper prefix of a valid frame asks for more bytes and consumes nothing.
    #[test]
    fn truncation_waits(msg in message()) {
        let full = encoded(&msg);
        let d = Decoder::default();
        for n in 0..full.len() {
            let mut buf = BytesMut::from(&full[..n]);
            prop_assert_eq!(d.decode(&mut buf), Ok(None), "prefix of {} bytes", n);
            prop_assert_eq!(buf.len(), n);
        }
    }

    /// Flipping any bits of any single byte is detected, with the error naming what broke.
    #[test]
    fn corruption_detected(msg in message(), flip in 1u8..=255) {
        let full = encoded(&msg);
        let d = Decoder { max_frame: SWEEP_MAX };
        for i in 0..full.len() {
            let mut buf = full.clone();
            buf[i] ^= flip;
            let mut got = d.decode(&mut buf);
            if got == Ok(None) {
                // Only a grown length can leave a complete frame looking partial; feed the
                // bytes it claims and the checksum must then catch it.
                prop_assert!((8..12).contains(&i), "byte {} made the frame partial", i);
                let claimed = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
                buf.resize(HEADER_LEN + claimed, 0);
                got = d.decode(&mut buf);
            }
            let err = match got {
                Err(e) => e,
                other => return Err(TestCaseError::fail(format!("byte {i}: {other:?}"))),
            };
            let expected_kind = match i {
                0..=3 => matches!(err, WireError::BadMagic(_)),
                4 => matches!(err, WireError::Version(_)),
                5 => matches!(err, WireError::UnknownKind(_) | WireError::Checksum { .. }),
                6 | 7 => matches!(err, WireError::Invalid { field: "reserved", .. }),
                8..=11 => matches!(err, WireError::TooLarge { .. } | WireError::Checksum { .. }),
                _ => matches!(err, WireError::Checksum { .. }),
            };
            prop_assert!(expected_kind, "byte {}: unexpected {:?}", i, err);
        }
    }
}

/// Decodes `stream` taking each `Data` frame head first and its payload in pieces of the
/// `cuts` sizes (the way the node lands payloads from the socket); stops at the first error,
/// or when the rest is a partial frame.
fn drain_by_heads(stream: &mut BytesMut, cuts: &[usize]) -> Result<Vec<Message>, WireError> {
    let d = Decoder::default();
    let mut cut = cuts.iter().cycle();
    let mut got = Vec::new();
    loop {
        if let Some(mut head) = d.decode_data_head(stream)? {
            if stream.len() < head.payload_len {
                return Ok(got);
            }
            let mut payload = BytesMut::new();
            while head.left() > 0 {
                let n = (*cut.next().expect("cycle")).min(head.left());
                let piece = stream.split_to(n);
                head.update(&piece);
                payload.extend_from_slice(&piece);
            }
            let (request, ctx_rank, offset) = (head.request, head.ctx_rank, head.offset);
            head.verify()?;
            got.push(Message::Data {
                request,
                ctx_rank,
                offset,
                payload: payload.freeze(),
            });
            continue;
        }
        match d.decode(stream)? {
            Some(m) => got.push(m),
            None => return Ok(got),
        }
    }
}

/// A frame with a valid header (any kind byte) and checksum around `body`.
fn frame_with_body(kind: u8, body: &[u8]) -> BytesMut {
    let mut f = BytesMut::new();
    f.extend_from_slice(&MAGIC.to_be_bytes());
    f.extend_from_slice(&[VERSION, kind, 0, 0]);
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&f[..12]), body);
    f.extend_from_slice(&crc.to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn cancel() -> Message {
    Message::Cancel {
        request: RequestId(7),
        token: TransferToken(0x5eed),
    }
}

#[test]
fn length_checked_before_the_body_arrives() {
    let mut buf = encoded(&Message::Data {
        request: RequestId(1),
        ctx_rank: 0,
        offset: 0,
        payload: Bytes::from(vec![0u8; 100]),
    });
    // Only the header is there: the bound must trip now, not once 100 bytes were buffered.
    buf.truncate(HEADER_LEN);
    let d = Decoder { max_frame: 64 };
    assert_eq!(
        d.decode(&mut buf),
        Err(WireError::TooLarge { len: 120, max: 64 })
    );
}

#[test]
fn max_frame_is_inclusive() {
    // A Cancel's body is 24 bytes (request u64, token u128): exactly at the bound it decodes.
    let msg = cancel();
    let d = Decoder { max_frame: 24 };
    assert_eq!(d.decode(&mut encoded(&msg)), Ok(Some(msg.clone())));
    let d = Decoder { max_frame: 23 };
    assert!(d.decode(&mut encoded(&msg)).is_err());
}

#[test]
fn garbage_fails_on_its_first_word() {
    let mut buf = BytesMut::from(&b"GET "[..]);
    assert_eq!(
        Decoder::default().decode(&mut buf),
        Err(WireError::BadMagic(u32::from_be_bytes(*b"GET ")))
    );
}

#[test]
fn kind_flip_between_same_size_bodies_is_caught() {
    // Cancel and Heartbeat both carry one u64: only the header checksum tells them apart.
    let mut buf = encoded(&cancel());
    buf[5] = 6;
    assert!(matches!(
        Decoder::default().decode(&mut buf),
        Err(WireError::Checksum { .. })
    ));
}

/// Version 3 retired `Ready` (kind 2) and `Done` (kind 3): a well-formed frame of either kind,
/// with its version-2 body, is refused as an unknown kind, not decoded or skipped.
#[test]
fn retired_ready_and_done_kinds_are_refused() {
    let ready_body = [0u8; 12];
    let done_body = [0u8; 24];
    for (kind, body) in [(2u8, &ready_body[..]), (3, &done_body[..])] {
        let mut buf = frame_with_body(kind, body);
        assert_eq!(
            Decoder::default().decode(&mut buf),
            Err(WireError::UnknownKind(kind))
        );
    }
}

#[test]
fn block_count_over_the_limit_is_rejected_before_allocating() {
    // Claims u32::MAX ctx blocks with no bytes behind the count.
    let mut body = vec![0u8; 8 + 16 + 37];
    body.extend_from_slice(&u32::MAX.to_be_bytes());
    let err = Decoder::default()
        .decode(&mut frame_with_body(1, &body))
        .unwrap_err();
    assert!(
        matches!(
            err,
            WireError::Invalid {
                field: "ctx_blocks",
                ..
            }
        ),
        "{err:?}"
    );
    // Under the limit but more than the bytes present: truncated, still nothing allocated.
    let mut body = vec![0u8; 8 + 16 + 37];
    body.extend_from_slice(&(MAX_BLOCKS_PER_REQUEST as u32).to_be_bytes());
    let err = Decoder::default()
        .decode(&mut frame_with_body(1, &body))
        .unwrap_err();
    assert_eq!(err, WireError::Truncated("ctx_blocks"));
}

#[test]
fn block_lists_at_the_limit_round_trip_and_one_more_is_rejected() {
    let mut info = RequestInfo {
        request: RequestId(3),
        token: TransferToken(u128::MAX),
        gen_layout: CacheLayout {
            num_layers: 0,
            num_kv_heads: 0,
            head_dim: 0,
            tokens_per_block: 0,
            dtype_bytes: 0,
            tp_size: 0,
            tp_rank: 9,
            pp_size: 0,
            pp_rank: 9,
            mla: true,
        },
        ctx_blocks: (0..MAX_BLOCKS_PER_REQUEST as u32).collect(),
        gen_blocks: vec![BlockRef { id: 1, epoch: 2 }; MAX_BLOCKS_PER_REQUEST],
    };
    let msg = Message::RequestInfo(info.clone());
    assert_eq!(Decoder::default().decode(&mut encoded(&msg)), Ok(Some(msg)));
    info.gen_blocks.push(BlockRef { id: 0, epoch: 0 });
    let err = Decoder::default()
        .decode(&mut encoded(&Message::RequestInfo(info)))
        .unwrap_err();
    assert!(
        matches!(
            err,
            WireError::Invalid {
                field: "gen_blocks",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn long_detail_is_cut_on_a_char_boundary() {
    // 'é' is two bytes and the limit is even: one leading 'x' puts a boundary mid-char.
    let detail = format!("x{}", "é".repeat(MAX_DETAIL_BYTES));
    let msg = Message::Error {
        request: RequestId(1),
        code: ErrorCode::Internal,
        detail,
    };
    match Decoder::default().decode(&mut encoded(&msg)) {
        Ok(Some(Message::Error { detail, .. })) => {
            assert_eq!(detail.len(), MAX_DETAIL_BYTES - 1);
            assert!(detail.starts_with("xé"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_detail_and_code_are_rejected() {
    let mut body = 1u64.to_be_bytes().to_vec();
    body.extend_from_slice(&9u16.to_be_bytes());
    body.extend_from_slice(&2u16.to_be_bytes());
    body.extend_from_slice(&[0xC3, 0x28]); // invalid UTF-8
    let err = Decoder::default()
        .decode(&mut frame_with_body(5, &body))
        .unwrap_err();
    assert!(
        matches!(
            err,
            WireError::Invalid {
                field: "detail",
                ..
            }
        ),
        "{err:?}"
    );

    body[8..10].copy_from_slice(&0u16.to_be_bytes());
    let err = Decoder::default()
        .decode(&mut frame_with_body(5, &body))
        .unwrap_err();
    assert!(
        matches!(err, WireError::Invalid { field: "code", .. }),
        "{err:?}"
    );

    let mut body = 1u64.to_be_bytes().to_vec();
    body.extend_from_slice(&9u16.to_be_bytes());
    body.extend_from_slice(&(MAX_DETAIL_BYTES as u16 + 1).to_be_bytes());
    body.resize(body.len() + MAX_DETAIL_BYTES + 1, b'a');
    let err = Decoder::default()
        .decode(&mut frame_with_body(5, &body))
        .unwrap_err();
    assert!(
        matches!(
            err,
            WireError::Invalid {
                field: "detail",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn mla_flag_must_be_zero_or_one() {
    let mut buf = encoded(&Message::RequestInfo(RequestInfo {
        request: RequestId(1),
        token: TransferToken(2),
        gen_layout: CacheLayout {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 1,
            tokens_per_block: 1,
            dtype_bytes: 1,
            tp_size: 1,
            tp_rank: 0,
            pp_size: 1,
            pp_rank: 0,
            mla: false,
        },
        ctx_blocks: vec![],
        gen_blocks: vec![],
    }));
    let body = buf.split_off(HEADER_LEN);
    let mut body = body.to_vec();
    body[8 + 16 + 36] = 2;
    let err = Decoder::default()
        .decode(&mut frame_with_body(1, &body))
        .unwrap_err();
    assert!(
        matches!(
            err,
            WireError::Invalid {
                field: "gen_layout.mla",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn trailing_bytes_are_rejected() {
    // A Cancel body (request u64, token u128) and one byte more.
    let mut body = 7u64.to_be_bytes().to_vec();
    body.extend_from_slice(&5u128.to_be_bytes());
    body.push(0);
    assert_eq!(
        Decoder::default().decode(&mut frame_with_body(4, &body)),
        Err(WireError::Trailing(1))
    );
}

#[test]
fn data_payload_is_not_copied() {
    let payload = Bytes::from(vec![0xAB; 64 << 10]);
    let mut buf = encoded(&Message::Data {
        request: RequestId(1),
        ctx_rank: 2,
        offset: 3,
        payload: payload.clone(),
    });
    let body_start = buf.as_ptr() as usize + HEADER_LEN + 20;
    match Decoder::default().decode(&mut buf) {
        Ok(Some(Message::Data { payload: got, .. })) => {
            assert_eq!(got, payload);
            assert_eq!(
                got.as_ptr() as usize,
                body_start,
                "payload must point into the receive buffer"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn frames_append_to_existing_buffer() {
    let mut buf = BytesMut::from(&b"\xFFprefix"[..]);
    encode(&cancel(), &mut buf);
    let mut tail = buf.split_off(7);
    assert_eq!(Decoder::default().decode(&mut tail), Ok(Some(cancel())));
}

// ---- Fuzz regressions (cargo fuzz run wire_decode / plan) ------------------------------------
// None so far: the campaigns run for this change found no crash. Add one test per fixed finding,
// feeding the minimised input (`cargo fuzz tmin`) as a byte literal; see fuzz/README.md.

/// The seeds' layout: a rank of a TP4 x PP2 instance of an 80-layer model.
fn seed_layout() -> CacheLayout {
    CacheLayout {
        num_layers: 80,
        num_kv_heads: 8,
        head_dim: 128,
        tokens_per_block: 32,
        dtype_bytes: 2,
        tp_size: 4,
        tp_rank: 1,
        pp_size: 2,
        pp_rank: 1,
        mla: false,
    }
}

/// One `RequestInfo` with blocks and one empty MLA one.
fn request_info_seeds(req: RequestId) -> Vec<(&'static str, Message)> {
    let layout = seed_layout();
    let full = RequestInfo {
        request: req,
        token: TransferToken(0xfeed_beef_0000_1111_2222_3333_4444_5555),
        gen_layout: layout,
        ctx_blocks: vec![3, 1, 4, 1],
        gen_blocks: (0..4)
            .map(|i| BlockRef {
                id: 10 + i,
                epoch: 7,
            })
            .collect(),
    };
    let empty_mla = RequestInfo {
        request: req,
        token: TransferToken(1),
        gen_layout: CacheLayout {
            num_kv_heads: 1,
            mla: true,
            ..layout
        },
        ctx_blocks: vec![],
        gen_blocks: vec![],
    };
    vec![
        ("request_info", Message::RequestInfo(full)),
        ("request_info_empty_mla", Message::RequestInfo(empty_mla)),
    ]
}

/// One frame of every other kind.
fn other_seeds(req: RequestId) -> Vec<(&'static str, Message)> {
    let cancel = Message::Cancel {
        request: req,
        token: TransferToken(u128::MAX - 1),
    };
    let error = Message::Error {
        request: req,
        code: ErrorCode::ForeignBlocks,
        detail: "block 9 is not owned by req#16909060 (épocha 3)".into(),
    };
    let error_empty = Message::Error {
        request: req,
        code: ErrorCode::Busy,
        detail: String::new(),
    };
    let data = Message::Data {
        request: req,
        ctx_rank: 1,
        offset: 4096,
        payload: Bytes::from((0..64u8).collect::<Vec<_>>()),
    };
    vec![
        ("cancel", cancel),
        ("error", error),
        ("error_empty", error_empty),
        ("heartbeat", Message::Heartbeat { seq: 42 }),
        ("data", data),
    ]
}

/// Writes the `wire_decode` fuzz seed corpus: one valid frame of each kind, a multi-frame
/// stream, and a few near misses. Run once after a format change:
/// `cargo test -p kvferry-core --test wire_props -- --ignored write_fuzz_seeds`
#[test]
#[ignore = "writes fuzz/corpus/wire_decode; run by hand"]
fn write_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/wire_decode");
    std::fs::create_dir_all(&dir).unwrap();
    let req = RequestId(0x0102_0304);
    let mut seeds = request_info_seeds(req);
    seeds.extend(other_seeds(req));
    let mut stream = BytesMut::new();
    for (name, msg) in &seeds {
        std::fs::write(dir.join(name), encoded(msg)).unwrap();
        encode(msg, &mut stream);
    }
    std::fs::write(dir.join("stream_all_kinds"), &stream).unwrap();
    // Near misses the mutator can grow from: a frame cut short, and a header only.
    std::fs::write(dir.join("truncated_request_info"), &stream[..40]).unwrap();
    std::fs::write(dir.join("header_only"), &stream[..HEADER_LEN]).unwrap();
}
