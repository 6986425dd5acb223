//! The metadata an agent hands a peer: its UCX connection info and the section of its KV pool,
//! and nothing of any other registration.
//!
//! nixl-sys 1.5.1 cannot ask for both in one partial metadata: NIXL includes connection info
//! in a partial metadata only for an empty descriptor list or with `includeConnInfo`, which
//! its C API does not expose (a pool-only partial metadata alone is refused by the loading
//! peer with NOT_FOUND: it knows no connection to the agent). So the agent sends two partial
//! metadata, connection info first, and the peer loads them in that order. Ahead of them goes
//! the pool's CUDA device ordinal: a READ names the remote pool by address *and* device, and
//! the peer's pool may be on another GPU than ours (two GPUs of one host: ctx on 0, gen on 1).
//! `u32 big-endian device | u32 big-endian length of the first | first | second`.

use super::error::NixlError;

/// Splits off at most what a node frame can carry; the frame's own bound comes first.
pub const MAX_MD: usize = 64 << 10;

/// A peer's metadata, split: where its pool is and the two parts to load.
#[derive(Debug, PartialEq)]
pub struct PeerMd<'a> {
    /// The CUDA device of the peer's pool (0 for host memory). Unchecked here: NIXL refuses
    /// a READ whose device matches no section the peer sent.
    pub device: u32,
    pub conns: &'a [u8],
    pub section: &'a [u8],
}

pub fn join(device: u32, conns: &[u8], section: &[u8]) -> Vec<u8> {
    let len = u32::try_from(conns.len()).expect("NIXL connection info under 4 GiB");
    let mut out = Vec::with_capacity(8 + conns.len() + section.len());
    out.extend_from_slice(&device.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(conns);
    out.extend_from_slice(section);
    out
}

/// The two parts of a peer's metadata (bytes from the network: checked, never trusted).
pub fn split(md: &[u8]) -> Result<PeerMd<'_>, NixlError> {
    let bad = |why: &str| NixlError::Invalid(format!("peer metadata: {why}"));
    if md.len() > MAX_MD {
        return Err(bad("too long"));
    }
    let (device, rest) = md
        .split_first_chunk::<4>()
        .ok_or_else(|| bad("truncated"))?;
    let (head, rest) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| bad("truncated"))?;
    let len = u32::from_be_bytes(*head) as usize;
    if len == 0 || len >= rest.len() {
        return Err(bad("connection info length out of bounds"));
    }
    let (conns, section) = rest.split_at(len);
    Ok(PeerMd {
        device: u32::from_be_bytes(*device),
        conns,
        section,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_parts_round_trip_and_lies_are_refused() {
        let md = join(7, b"conns", b"pool");
        let want = PeerMd {
            device: 7,
            conns: b"conns",
            section: b"pool",
        };
        assert_eq!(split(&md).unwrap(), want);
        for bad in [
            &b""[..],
            b"\0\0\0\x01\0\0\0",
            b"\0\0\0\x01\0\0\0\0pool",
            b"\0\0\0\x01\0\0\0\x05conns",
            b"\0\0\0\x01\xff\xff\xff\xffconnspool",
            b"\0\0\0\x05connspool",
        ] {
            assert!(split(bad).is_err(), "{bad:?}");
        }
        assert!(split(&join(0, &[1; MAX_MD], b"pool")).is_err());
    }
}
