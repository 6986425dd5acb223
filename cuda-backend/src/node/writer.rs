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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostKv;
    use crate::node::frame::Frame;
    use crate::node::link::Link;
    use kvferry_core::wire::{DataSeal, Decoder, Message};
    use kvferry_core::RequestId;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpSocket};
    use tokio::sync::oneshot;

    /// Control frames and a data frame whose payload spans blocks and lies out of address
    /// order arrive as the bytes `encode` would write, through a send buffer far smaller than
    /// the frame (so the vectored write is resumed part way many times), and the frame's
    /// `written` fires.
    #[tokio::test]
    async fn data_frame_goes_out_whole_through_partial_writes() {
        let kv = Arc::new(HostKv::new(4, 64 << 10));
        for b in 0..4u32 {
            for (i, x) in kv.block(b).iter_mut().enumerate() {
                *x = (i as u32 ^ (b << 5)).wrapping_mul(7) as u8;
            }
        }
        let pieces = vec![(2 * (64 << 10) + 100, 70_000), (5, 3000)];
        let mut payload = Vec::new();
        for &(at, n) in &pieces {
            kv.for_each_piece(at, n, |s| payload.extend_from_slice(s));
        }
        let mut seal = DataSeal::new(RequestId(3), 1, 4096, payload.len());
        seal.update(&payload);

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sock = TcpSocket::new_v4().unwrap();
        sock.set_send_buffer_size(4096).unwrap();
        let stream = sock.connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut peer, _) = listener.accept().await.unwrap();
        let (_rd, wr) = stream.into_split();

        let (link, queues) = Link::new(listener.local_addr().unwrap());
        let hb = Message::Heartbeat { seq: 9 };
        link.control
            .try_send(Outgoing::Frame(Frame::Core(hb.clone())))
            .unwrap();
        let (tx, written) = oneshot::channel();
        link.data
            .try_send(DataOut {
                head: seal.finish(),
                pieces,
                kv: kv.clone(),
                written: tx,
            })
            .unwrap();
        let writer = tokio::spawn(write_loop(wr, queues));

        // Read slowly at first, so the writer meets a full send buffer.
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1024];
        while got.len() < 16 << 10 {
            let n = peer.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        link.control.try_send(Outgoing::Close).unwrap();
        peer.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap().unwrap();
        tokio::time::timeout(Duration::from_secs(1), written)
            .await
            .expect("written fires")
            .expect("not dropped");

        let mut wire = BytesMut::from(&got[..]);
        let d = Decoder::default();
        assert_eq!(d.decode(&mut wire), Ok(Some(hb)));
        let Ok(Some(Message::Data {
            request,
            ctx_rank,
            offset,
            payload: landed,
        })) = d.decode(&mut wire)
        else {
            panic!("no data frame")
        };
        assert_eq!((request, ctx_rank, offset), (RequestId(3), 1, 4096));
        assert_eq!(&landed[..], &payload[..]);
        assert!(wire.is_empty(), "nothing after the close");
    }
}
