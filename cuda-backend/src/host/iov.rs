//! Copying into scattered KV ranges: shared by the agent (early chunks landed from memory) and
//! the socket path (`landing`), which must not import each other.

use std::io::IoSliceMut;

/// Copies the front of `src` into `bufs`, in order; returns how many bytes fit.
pub fn copy_into(bufs: &mut [IoSliceMut<'_>], src: &[u8]) -> usize {
    let mut done = 0;
    for b in bufs.iter_mut() {
        let n = b.len().min(src.len() - done);
        b[..n].copy_from_slice(&src[done..done + n]);
        done += n;
    }
    done
}
