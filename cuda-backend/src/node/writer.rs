//! A connection's writer: drains the link's control queue (coalescing frames into one write)
//! and its data queue, sending each data frame straight from KV memory.

use super::frame;
use super::link::{DataOut, LinkQueues, Outgoing};
use bytes::{Buf, BytesMut};
use std::io::{self, IoSlice};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;

/// The writer coalesces queued control frames up to this many bytes per write.
const WRITE_BATCH: usize = 1 << 20;

enum Item {
    Control(Outgoing),
    Data(DataOut),
}

pub async fn write_loop(mut wr: OwnedWriteHalf, mut q: LinkQueues) -> io::Result<()> {
    let mut out = BytesMut::with_capacity(WRITE_BATCH);
    loop {
        let first = tokio::select! {
            biased;
            c = q.control.recv() => c.map(Item::Control),
            d = q.data.recv() => d.map(Item::Data),
        };
        let Some(mut item) = first else {
            return Ok(()); // the link is gone
        };
        loop {
            match item {
                Item::Control(Outgoing::Frame(f)) => frame::encode(&f, &mut out),
                Item::Control(Outgoing::Close) => {
                    wr.write_all(&out).await?;
                    return wr.shutdown().await;
                }
                // Queued control frames go out with the frame's head, in front of it.
                Item::Data(d) => write_data(&wr, &mut out, d).await?,
            }
            if out.len() >= WRITE_BATCH {
                break;
            }
            item = match q.control.try_recv() {
                Ok(c) => Item::Control(c),
                Err(_) => match q.data.try_recv() {
                    Ok(d) => Item::Data(d),
                    Err(_) => break,
                },
            };
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
            out.clear();
        }
    }
}

/// Writes `out`, then data frame `d` from KV memory: control bytes, head and payload go to
/// the socket in one vectored write, with the payload's blocks locked only while the kernel
/// copies out of them, never across an await.
async fn write_data(wr: &OwnedWriteHalf, out: &mut BytesMut, d: DataOut) -> io::Result<()> {
    out.extend_from_slice(&d.head);
    let mut rest = d.pieces;
    let mut first = 0;
    while !out.is_empty() || first < rest.len() {
        let wrote = d.kv.with_ranges(&rest[first..], |payload| {
            let mut all = Vec::with_capacity(payload.len() + 1);
            all.push(IoSlice::new(out));
            all.extend_from_slice(payload);
            wr.try_write_vectored(&all)
        });
        match wrote {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => {
                let from_out = k.min(out.len());
                out.advance(from_out);
                let mut k = (k - from_out) as u64;
                while k > 0 {
                    let r = &mut rest[first];
                    let n = k.min(r.1);
                    (r.0, r.1, k) = (r.0 + n, r.1 - n, k - n);
                    if r.1 == 0 {
                        first += 1;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wr.writable().await?,
            Err(e) => return Err(e),
        }
    }
    // Every payload byte is in the kernel: the sender may let its blocks go.
    let _ = d.written.send(());
    Ok(())
}
