//! The NIXL notification a gen's READ carries to the ctx: `kvf1 <request> <token> <transfer>`
//! (decimal, 32 hex digits, decimal). Any agent can send the ctx a notification, so it is
//! parsed as hostile input: bounded, exact, and it ends a parked send only if its token is the
//! request's (checked by `serve`).

use kvferry_core::agent::TransferId;
use kvferry_core::{RequestId, TransferToken};

const TAG: &str = "kvf1";
/// Longer notifications are not ours and are not parsed.
pub const MAX_NOTICE: usize = 96;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Notice {
    pub request: RequestId,
    pub token: TransferToken,
    /// The ctx's send job, as its `NixlReady` named it.
    pub transfer: TransferId,
}

impl Notice {
    pub fn encode(&self) -> Vec<u8> {
        format!(
            "{TAG} {} {:032x} {}",
            self.request.0, self.token.0, self.transfer.0
        )
        .into_bytes()
    }

    /// `None` for anything that is not exactly an encoded notice.
    pub fn parse(bytes: &[u8]) -> Option<Notice> {
        if bytes.len() > MAX_NOTICE {
            return None;
        }
        let text = std::str::from_utf8(bytes).ok()?;
        let mut parts = text.split(' ');
        let (tag, request, token, transfer) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if tag != TAG || parts.next().is_some() || token.len() != 32 {
            return None;
        }
        let notice = Notice {
            request: RequestId(request.parse().ok()?),
            token: TransferToken(u128::from_str_radix(token, 16).ok()?),
            transfer: TransferId(transfer.parse().ok()?),
        };
        // Canonical form only: "+1" or "01" would parse but are not what a gen sends.
        (notice.encode() == bytes).then_some(notice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_round_trips_and_anything_else_is_refused() {
        let n = Notice {
            request: RequestId(u64::MAX),
            token: TransferToken(u128::MAX - 3),
            transfer: TransferId(42),
        };
        assert_eq!(Notice::parse(&n.encode()), Some(n));
        for bad in [
            &b""[..],
            b"kvf1",
            b"kvf2 1 00000000000000000000000000000001 2",
            b"kvf1 1 1 2",
            b"kvf1 +1 00000000000000000000000000000001 2",
            b"kvf1 1 00000000000000000000000000000001 2 3",
            b"kvf1 1 0000000000000000000000000000000g 2",
            b"\xff\xfe",
        ] {
            assert_eq!(Notice::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Notice::parse(&[b'1'; MAX_NOTICE + 1]), None);
    }
}
