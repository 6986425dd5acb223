//! Node metrics in Prometheus text format, served by a minimal HTTP/1.1 `GET /metrics`
//! responder (one request per connection).

use kvferry_core::staging::StagingCounters;
use kvferry_core::transceiver::{EarlyCounts, TxCounters};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Upper bounds (ms) of the transfer latency histogram buckets.
pub const LATENCY_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];
/// Bound on an HTTP request head; anything longer is answered 431 and closed.
const MAX_HTTP_HEAD: usize = 8 << 10;
/// A scraper that does not finish its request head within this is dropped.
const HTTP_READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct Metrics {
    tx: [AtomicU64; 7],
    pub requests_done: AtomicU64,
    pub requests_failed: AtomicU64,
    /// Connections refused a seat (their host's share and the table full of proven peers).
    pub connections_refused: AtomicU64,
    /// Unproven connections that gave their seat to a newcomer.
    pub connections_evicted: AtomicU64,
    /// Connections closed for bringing no frame in time (first frame or idle deadline).
    pub connections_silent: AtomicU64,
    /// `Prepare`s refused because the asking host holds its block share.
    pub prepares_refused: AtomicU64,
    early: [AtomicU64; 3],
    staging: [AtomicU64; 4],
    blocks: [AtomicU64; 2],
    buckets: [AtomicU64; LATENCY_BUCKETS_MS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
}

fn set(a: &AtomicU64, v: u64) {
    a.store(v, Ordering::Relaxed)
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// Copies the transceiver's lifetime counters and the pools' occupancy.
    pub fn update(&self, c: &TxCounters, s: &StagingCounters, blocks_free: usize, blocks: usize) {
        let tx = [
            c.transfers_started,
            c.transfers_completed,
            c.transfers_failed,
            c.timeouts_warned,
            c.evictions,
            c.rejected,
            c.bytes,
        ];
        for (a, v) in self.tx.iter().zip(tx) {
            set(a, v);
        }
        let st = [s.slots, s.free, s.in_use, s.poisoned];
        for (a, v) in self.staging.iter().zip(st) {
            set(a, v as u64);
        }
        set(&self.blocks[0], blocks as u64);
        set(&self.blocks[1], blocks_free as u64);
    }

    /// What the transceiver holds for requests not registered yet (bounded in the core).
    pub fn set_early(&self, e: &EarlyCounts) {
        set(&self.early[0], e.infos as u64);
        set(&self.early[1], e.info_bytes as u64);
        set(&self.early[2], e.aborts as u64);
    }

    pub fn observe_latency(&self, d: Duration) {
        let ms = d.as_millis() as u64;
        for (b, le) in self.buckets.iter().zip(LATENCY_BUCKETS_MS) {
            if ms <= le {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let counters = [
            (
                "kvferry_transfers_started_total",
                "Transfer jobs submitted",
                &self.tx[0],
            ),
            (
                "kvferry_transfers_completed_total",
                "Transfer jobs completed",
                &self.tx[1],
            ),
            (
                "kvferry_transfers_failed_total",
                "Transfer jobs failed",
                &self.tx[2],
            ),
            (
                "kvferry_transfers_timed_out_total",
                "Requests past kv_transfer_timeout_ms",
                &self.tx[3],
            ),
            (
                "kvferry_transfers_evicted_total",
                "Transfers evicted past their deadline",
                &self.tx[4],
            ),
            (
                "kvferry_requests_rejected_total",
                "Peer requests refused (token, blocks, layout)",
                &self.tx[5],
            ),
            (
                "kvferry_bytes_total",
                "Bytes moved by completed transfers",
                &self.tx[6],
            ),
            (
                "kvferry_requests_done_total",
                "Requests completed",
                &self.requests_done,
            ),
            (
                "kvferry_requests_failed_total",
                "Requests failed or cancelled",
                &self.requests_failed,
            ),
            (
                "kvferry_connections_refused_total",
                "Connections refused a seat (host share or table full of proven peers)",
                &self.connections_refused,
            ),
            (
                "kvferry_connections_evicted_total",
                "Connections evicted before their first frame to seat a newcomer",
                &self.connections_evicted,
            ),
            (
                "kvferry_connections_silent_total",
                "Connections closed for no frame within the first-frame or idle deadline",
                &self.connections_silent,
            ),
            (
                "kvferry_prepares_refused_total",
                "Prepares refused: the asking host holds its block share",
                &self.prepares_refused,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                get(v)
            );
        }
        let gauges = [
            ("kvferry_staging_slots", "Staging slots", &self.staging[0]),
            (
                "kvferry_staging_free",
                "Staging slots free",
                &self.staging[1],
            ),
            (
                "kvferry_staging_in_use",
                "Staging slots in use",
                &self.staging[2],
            ),
            (
                "kvferry_staging_poisoned",
                "Staging slots poisoned, waiting for their fence",
                &self.staging[3],
            ),
            (
                "kvferry_blocks_total",
                "KV blocks in the pool",
                &self.blocks[0],
            ),
            ("kvferry_blocks_free", "KV blocks free", &self.blocks[1]),
            (
                "kvferry_early_infos",
                "RequestInfos parked for requests not registered yet",
                &self.early[0],
            ),
            (
                "kvferry_early_info_bytes",
                "Bytes of parked RequestInfos (bounded in total and per peer)",
                &self.early[1],
            ),
            (
                "kvferry_early_aborts",
                "Aborts parked for requests not registered yet",
                &self.early[2],
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                get(v)
            );
        }
        let h = "kvferry_transfer_latency_seconds";
        let _ = writeln!(
            o,
            "# HELP {h} Request transfer latency\n# TYPE {h} histogram"
        );
        for (b, le) in self.buckets.iter().zip(LATENCY_BUCKETS_MS) {
            let _ = writeln!(o, "{h}_bucket{{le=\"{}\"}} {}", le as f64 / 1000.0, get(b));
        }
        let count = get(&self.latency_count);
        let _ = writeln!(o, "{h}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(o, "{h}_sum {}", get(&self.latency_sum_us) as f64 / 1e6);
        let _ = writeln!(o, "{h}_count {count}");
        o
    }
}

/// Serves `GET /metrics` on `listener` until the runtime stops.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, addr)) = listener.accept().await else {
            continue;
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = respond(stream, &m).await {
                tracing::debug!(%addr, error = %e, "metrics scrape failed");
            }
        });
    }
}

async fn respond(mut s: TcpStream, m: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let complete = tokio::time::timeout(HTTP_READ_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() <= MAX_HTTP_HEAD {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        std::io::Result::Ok(())
    })
    .await;
    if !matches!(complete, Ok(Ok(()))) {
        return Ok(());
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let (status, body) = if head.len() > MAX_HTTP_HEAD {
        ("431 Request Header Fields Too Large", String::new())
    } else if line.starts_with(b"GET /metrics ") {
        ("200 OK", m.render())
    } else {
        ("404 Not Found", "try GET /metrics\n".into())
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await
}
