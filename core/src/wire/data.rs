//! `Data` frames in pieces, for the host data plane's bulk path, where the payload never sits in
//! a frame buffer: a sender computes the head over the payload where it lies and writes both to
//! the socket ([`DataSeal`]); a receiver decodes the head first
//! ([`Decoder::decode_data_head`]), lands the payload wherever it belongs as it comes off the
//! socket, and checks the CRC over the landed bytes ([`DataHead`]). Both produce and accept
//! exactly the bytes `encode` and `decode` do.

use super::{kind, put_header, Crc32c, Decoder, WireError, DATA_PREFIX_LEN, HEADER_LEN};
use crate::RequestId;
use bytes::{Buf, BufMut, BytesMut};

/// Header plus fixed fields: what a receiver needs before it can place a payload.
pub const DATA_HEAD_LEN: usize = HEADER_LEN + DATA_PREFIX_LEN;

/// The frame CRC's running state over a `Data` head (`DATA_HEAD_LEN` bytes): the header's
/// first 12 bytes and the fixed fields, as `frame_crc` covers them; the payload follows.
fn head_crc(head: &[u8]) -> Crc32c {
    let mut crc = Crc32c::new();
    crc.update(&head[..12]);
    crc.update(&head[HEADER_LEN..DATA_HEAD_LEN]);
    crc
}

/// The head of a `Data` frame whose payload is sent from elsewhere: a sender that writes the
/// payload to the socket straight from scattered memory feeds it through [`DataSeal::update`]
/// first (the CRC goes in the header, in front of the payload), then sends the head that
/// [`DataSeal::finish`] returns and the same bytes behind it.
#[derive(Debug)]
#[must_use = "a frame needs its head"]
pub struct DataSeal {
    head: [u8; DATA_HEAD_LEN],
    crc: Crc32c,
    left: usize,
}

impl DataSeal {
    /// Panics if the body would exceed `u32::MAX` bytes, as `encode` does.
    pub fn new(request: RequestId, ctx_rank: u32, offset: u64, payload_len: usize) -> DataSeal {
        let body = payload_len
            .checked_add(DATA_PREFIX_LEN)
            .and_then(|b| u32::try_from(b).ok())
            .expect("wire frame body exceeds u32::MAX bytes");
        let mut out = BytesMut::with_capacity(DATA_HEAD_LEN);
        put_header(&mut out, kind::DATA, DATA_PREFIX_LEN);
        out.put_u64(request.0);
        out.put_u32(ctx_rank);
        out.put_u64(offset);
        out[8..12].copy_from_slice(&body.to_be_bytes());
        let mut head = [0; DATA_HEAD_LEN];
        head.copy_from_slice(&out);
        DataSeal {
            crc: head_crc(&head),
            head,
            left: payload_len,
        }
    }

    /// Feeds the next payload bytes, in order. Panics past the payload's length.
    pub fn update(&mut self, payload: &[u8]) {
        assert!(
            payload.len() <= self.left,
            "{} payload bytes fed to a data frame with {} left",
            payload.len(),
            self.left
        );
        self.crc.update(payload);
        self.left -= payload.len();
    }

    /// The frame's head, once the whole payload has been fed.
    pub fn finish(mut self) -> [u8; DATA_HEAD_LEN] {
        assert_eq!(self.left, 0, "finish before the whole payload was fed");
        self.head[12..16].copy_from_slice(&self.crc.value().to_be_bytes());
        self.head
    }
}

/// The header and fixed fields of a `Data` frame whose payload has not been consumed yet.
/// The payload is fed through [`DataHead::update`] as it lands (in order, each byte once), and
/// [`DataHead::verify`] accepts it only if the frame's CRC matches: until then the landed bytes
/// are unchecked, so a receiver must not report them complete before `verify` passes.
#[derive(Debug)]
#[must_use = "a payload is unchecked until `verify`"]
pub struct DataHead {
    pub request: RequestId,
    pub ctx_rank: u32,
    pub offset: u64,
    pub payload_len: usize,
    expected: u32,
    /// CRC over the header's first 12 bytes, the fixed fields and the payload seen so far.
    crc: Crc32c,
    seen: usize,
}

impl DataHead {
    /// Payload bytes not fed to `update` yet.
    pub fn left(&self) -> usize {
        self.payload_len - self.seen
    }

    /// Feeds the next payload bytes, in order. Panics past the payload's length: the caller
    /// reads exactly `left()` more bytes of this frame off the stream, never the next frame's.
    pub fn update(&mut self, payload: &[u8]) {
        assert!(
            payload.len() <= self.left(),
            "{} payload bytes fed to a data frame with {} left",
            payload.len(),
            self.left()
        );
        self.crc.update(payload);
        self.seen += payload.len();
    }

    /// Checks the frame's CRC once the whole payload has been fed.
    pub fn verify(self) -> Result<(), WireError> {
        assert_eq!(self.left(), 0, "verify before the whole payload was fed");
        let actual = self.crc.value();
        if actual != self.expected {
            return Err(WireError::Checksum {
                expected: self.expected,
                actual,
            });
        }
        Ok(())
    }
}

impl Decoder {
    /// If `buf` starts with a `Data` frame whose header and fixed fields are in, takes those
    /// `DATA_HEAD_LEN` bytes off and returns them decoded; the payload follows in `buf` and on
    /// the stream. `Ok(None)` when the front is another kind of frame (take it with `decode`)
    /// or too little of it is in to tell. Header errors are the ones `decode` reports.
    pub fn decode_data_head(&self, buf: &mut BytesMut) -> Result<Option<DataHead>, WireError> {
        let Some(len) = self.check_header(buf)? else {
            return Ok(None);
        };
        if buf[5] != kind::DATA {
            return Ok(None);
        }
        if len < DATA_PREFIX_LEN {
            // Reported as `decode` would, once the (short) body is in.
            if buf.len() - HEADER_LEN < len {
                return Ok(None);
            }
            return Err(WireError::Truncated("data frame fixed fields"));
        }
        if buf.len() < DATA_HEAD_LEN {
            return Ok(None);
        }
        let mut r = super::Reader {
            buf: &buf[HEADER_LEN..DATA_HEAD_LEN],
        };
        let request = RequestId(r.u64("request")?);
        let ctx_rank = r.u32("ctx_rank")?;
        let offset = r.u64("offset")?;
        let head = DataHead {
            request,
            ctx_rank,
            offset,
            payload_len: len - DATA_PREFIX_LEN,
            expected: u32::from_be_bytes([buf[12], buf[13], buf[14], buf[15]]),
            crc: head_crc(&buf[..DATA_HEAD_LEN]),
            seen: 0,
        };
        buf.advance(DATA_HEAD_LEN);
        Ok(Some(head))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{encode, Message};
    use bytes::Bytes;

    #[test]
    fn data_seal_head_and_payload_match_encode() {
        let (msg, expected) = data_frame(1000);
        let Message::Data { payload, .. } = msg else {
            unreachable!()
        };
        let mut seal = DataSeal::new(RequestId(9), 2, 1 << 20, payload.len());
        for piece in payload.chunks(300) {
            seal.update(piece);
        }
        let mut out = BytesMut::from(&seal.finish()[..]);
        out.extend_from_slice(&payload);
        assert_eq!(out, expected);
    }

    fn data_frame(payload_len: usize) -> (Message, BytesMut) {
        let payload = Bytes::from((0..payload_len).map(|i| (i * 7) as u8).collect::<Vec<u8>>());
        let msg = Message::Data {
            request: RequestId(9),
            ctx_rank: 2,
            offset: 1 << 20,
            payload,
        };
        let mut out = BytesMut::new();
        encode(&msg, &mut out);
        (msg, out)
    }

    #[test]
    fn data_head_then_payload_in_pieces_verifies() {
        let (msg, mut buf) = data_frame(5000);
        let Message::Data { payload, .. } = msg else {
            unreachable!()
        };
        let d = Decoder::default();
        let mut short = BytesMut::from(&buf[..DATA_HEAD_LEN - 1]);
        assert_eq!(
            d.decode_data_head(&mut short).map(|h| h.is_some()),
            Ok(false)
        );
        let mut head = d.decode_data_head(&mut buf).unwrap().unwrap();
        assert_eq!(
            (head.request, head.ctx_rank, head.offset, head.payload_len),
            (RequestId(9), 2, 1 << 20, 5000)
        );
        assert_eq!(&buf[..], &payload[..], "only the head was taken");
        for piece in payload.chunks(777) {
            head.update(piece);
        }
        assert_eq!(head.left(), 0);
        assert_eq!(head.verify(), Ok(()));
    }

    #[test]
    fn data_head_catches_a_flipped_payload_byte() {
        let (_, mut buf) = data_frame(300);
        let mut head = Decoder::default()
            .decode_data_head(&mut buf)
            .unwrap()
            .unwrap();
        buf[123] ^= 0x10;
        head.update(&buf);
        assert!(matches!(head.verify(), Err(WireError::Checksum { .. })));
    }

    #[test]
    fn data_head_leaves_other_frames_and_rejects_what_decode_rejects() {
        let d = Decoder::default();
        let mut hb = BytesMut::new();
        encode(&Message::Heartbeat { seq: 1 }, &mut hb);
        assert_eq!(d.decode_data_head(&mut hb).map(|h| h.is_some()), Ok(false));
        assert_eq!(hb.len(), HEADER_LEN + 8, "a non-data frame is left whole");

        let (_, mut bad) = data_frame(10);
        bad[0] ^= 1;
        assert!(matches!(
            d.decode_data_head(&mut bad),
            Err(WireError::BadMagic(_))
        ));

        // A data frame whose body is too short for the fixed fields.
        let (_, good) = data_frame(0);
        let mut short = BytesMut::from(&good[..HEADER_LEN]);
        short[8..12].copy_from_slice(&4u32.to_be_bytes());
        short.extend_from_slice(&[0; 4]);
        assert!(matches!(
            d.decode_data_head(&mut short),
            Err(WireError::Truncated(_))
        ));
        assert!(matches!(
            d.decode(&mut short),
            Err(WireError::Checksum { .. } | WireError::Truncated(_))
        ));

        let tight = Decoder { max_frame: 100 };
        let (_, mut big) = data_frame(200);
        assert!(matches!(
            tight.decode_data_head(&mut big),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    #[should_panic(expected = "payload bytes fed")]
    fn data_head_refuses_bytes_past_its_payload() {
        let (_, mut buf) = data_frame(10);
        let mut head = Decoder::default()
            .decode_data_head(&mut buf)
            .unwrap()
            .unwrap();
        head.update(&[0; 11]);
    }
}
