//! A connection's writer: drains the link's control queue (coalescing frames into one write)
//! and its data queue, sending each data frame straight from KV memory.
//!
//! A peer that stops reading stalls the writer, and a send job waits for its frames to be
//! written: so a socket that takes no byte for `stall` ends the connection (its frames are
//! dropped, its sends fail, its transfers' fences pass) instead of wedging them for as long
//! as TCP would keep a silent connection open.
//!
//! A writer that has written nothing for its heartbeat interval sends a `Heartbeat`, so the
//! peer's reader (which closes a connection silent past its idle deadline, see `conn`) can
//! tell a live but idle node from a dead one.

use super::frame;
use super::link::{LinkQueues, Outgoing};
use crate::host::route::DataOut;
use bytes::{Buf, BytesMut};
use kvferry_core::wire::Message;
use std::io::{self, IoSlice};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;

/// The writer coalesces queued control frames up to this many bytes per write.
const WRITE_BATCH: usize = 1 << 20;

enum Item {
    Control(Outgoing),
    Data(DataOut),
}

/// Runs until the link is gone (`Ok`), it is closed, or a write fails or stalls past `stall`.
/// With `heartbeat`, a `Heartbeat` goes out whenever nothing else has for that long.
pub async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut q: LinkQueues,
    stall: Duration,
    heartbeat: Option<Duration>,
) -> io::Result<()> {
    let mut out = BytesMut::with_capacity(WRITE_BATCH);
    let mut seq: u64 = 0;
    loop {
        // Far in the future without heartbeats: the branch never fires.
        let beat = tokio::time::sleep(heartbeat.unwrap_or(Duration::from_secs(86_400)));
        let first = tokio::select! {
            biased;
            c = q.control.recv() => c.map(Item::Control),
            d = q.data.recv() => d.map(Item::Data),
            _ = beat => {
                seq += 1;
                let hb = frame::Frame::Core(Message::Heartbeat { seq });
                Some(Item::Control(Outgoing::Frame(hb)))
            }
        };
        let Some(mut item) = first else {
            return Ok(()); // the link is gone
        };
        loop {
            match item {
                Item::Control(Outgoing::Frame(f)) => frame::encode(&f, &mut out),
                Item::Control(Outgoing::Close) => {
                    write_out(&wr, &mut out, stall).await?;
                    return wr.shutdown().await;
                }
                // Queued control frames go out with the frame's head, in front of it.
                Item::Data(d) => write_data(&wr, &mut out, d, stall).await?,
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
        write_out(&wr, &mut out, stall).await?;
    }
}

/// Waits until the socket takes bytes again, for at most `stall`.
async fn writable(wr: &OwnedWriteHalf, stall: Duration) -> io::Result<()> {
    match tokio::time::timeout(stall, wr.writable()).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the peer took no byte for {stall:?}"),
        )),
    }
}

/// Writes all of `out` (and empties it).
async fn write_out(wr: &OwnedWriteHalf, out: &mut BytesMut, stall: Duration) -> io::Result<()> {
    while !out.is_empty() {
        match wr.try_write(out) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => out.advance(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => writable(wr, stall).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes `out`, then data frame `d` from KV memory: control bytes, head and payload go to
/// the socket in one vectored write, with the payload's blocks locked only while the kernel
/// copies out of them, never across an await.
async fn write_data(
    wr: &OwnedWriteHalf,
    out: &mut BytesMut,
    d: DataOut,
    stall: Duration,
) -> io::Result<()> {
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
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => writable(wr, stall).await?,
            Err(e) => return Err(e),
        }
    }
    // Every payload byte is in the kernel: the sender may let its blocks go.
    d.written.fire();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::kv::HostKv;
    use crate::host::route::Written;
    use crate::node::frame::Frame;
    use crate::node::link::Link;
    use kvferry_core::wire::{DataSeal, Decoder, Message};
    use kvferry_core::RequestId;
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpSocket};

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
        let (tx, written) = Written::signal();
        link.data
            .try_send(DataOut {
                head: seal.finish(),
                pieces,
                kv: kv.clone(),
                written: tx,
            })
            .unwrap();
        let writer = tokio::spawn(write_loop(wr, queues, Duration::from_secs(10), None));

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

    /// A writer with nothing to send sends numbered heartbeats, so the peer's idle deadline
    /// does not cut a live node; without a heartbeat interval it sends nothing.
    #[tokio::test]
    async fn an_idle_writer_sends_heartbeats() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut peer, _) = listener.accept().await.unwrap();
        let (_rd, wr) = stream.into_split();
        let (link, queues) = Link::new(addr);
        let beat = Duration::from_millis(20);
        let _writer = tokio::spawn(write_loop(wr, queues, Duration::from_secs(10), Some(beat)));
        let mut wire = BytesMut::new();
        let d = Decoder::default();
        let mut got = Vec::new();
        while got.len() < 2 {
            if let Some(m) = d.decode(&mut wire).unwrap() {
                got.push(m);
                continue;
            }
            let mut buf = [0u8; 256];
            let n = tokio::time::timeout(Duration::from_secs(10), peer.read(&mut buf))
                .await
                .expect("a heartbeat within 10 s")
                .unwrap();
            assert!(n > 0, "the writer hung up");
            wire.extend_from_slice(&buf[..n]);
        }
        assert_eq!(
            got,
            [Message::Heartbeat { seq: 1 }, Message::Heartbeat { seq: 2 }]
        );
        drop(link);

        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut quiet, _) = listener.accept().await.unwrap();
        let (_rd, wr) = stream.into_split();
        let (link, queues) = Link::new(addr);
        let _writer = tokio::spawn(write_loop(wr, queues, Duration::from_secs(10), None));
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(beat * 10, quiet.read(&mut buf)).await;
        assert!(r.is_err(), "no heartbeat configured, yet bytes came: {r:?}");
        drop(link);
    }

    /// A peer that accepts and never reads: the writer gives up after `stall` without
    /// progress, and the frame it could not finish is dropped unwritten (its send fails).
    #[tokio::test]
    async fn a_peer_that_reads_nothing_ends_the_connection_after_the_stall() {
        let kv = Arc::new(HostKv::new(64, 64 << 10));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sock = TcpSocket::new_v4().unwrap();
        sock.set_send_buffer_size(4096).unwrap();
        let stream = sock.connect(listener.local_addr().unwrap()).await.unwrap();
        let (_silent, _) = listener.accept().await.unwrap();
        let (_rd, wr) = stream.into_split();
        let (link, queues) = Link::new(listener.local_addr().unwrap());
        // 4 MiB: more than loopback buffers hold.
        let pieces = vec![(0, 4 << 20)];
        let mut seal = DataSeal::new(RequestId(1), 0, 0, 4 << 20);
        kv.for_each_piece(0, 4 << 20, |s| seal.update(s));
        let (tx, written) = Written::signal();
        link.data
            .try_send(DataOut {
                head: seal.finish(),
                pieces,
                kv,
                written: tx,
            })
            .unwrap();
        let stall = Duration::from_millis(200);
        let t0 = std::time::Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), write_loop(wr, queues, stall, None))
            .await
            .expect("the writer gives up");
        let e = r.expect_err("a stalled peer is an error");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(t0.elapsed() >= stall);
        assert!(
            written.await.is_err(),
            "the unfinished frame is dropped unwritten"
        );
        drop(link);
    }
}
