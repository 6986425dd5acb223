//! Node metrics: one `prometheus_client` registry per node (the bench runs a ctx and a gen in
//! one process, so nothing is global), rendered as Prometheus text (0.0.4) and served at
//! `GET /metrics` by hyper over HTTP/1.1, one request per connection.
//!
//! Counters are registered without their `_total` suffix: the encoder appends it, so the
//! exposed names are the `kvferry_*_total` ones (the tests list them all).

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use kvferry_core::staging::StagingCounters;
use kvferry_core::transceiver::{EarlyCounts, TxCounters};
use prometheus_client::encoding::{prometheus_text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// What one rank of an instance reports to the instance's metrics.
#[derive(Clone, Copy, Debug)]
pub struct RankSample {
    pub tx: TxCounters,
    pub staging: StagingCounters,
    /// What the transceiver holds for requests not registered yet (bounded in the core).
    pub early: EarlyCounts,
    pub blocks_free: usize,
    pub blocks: usize,
}

/// Upper bounds (ms) of the transfer latency histogram buckets.
pub const LATENCY_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];
/// Bound on an HTTP request head (hyper's smallest read buffer); longer is answered 431.
const MAX_HTTP_HEAD: usize = 8 << 10;
/// A scraper that does not finish its request head within this is dropped.
const HTTP_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole scrape, response included: a client that stops reading cannot hold a task.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed accept (out of descriptors): retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

type U64Gauge = Gauge<u64, AtomicU64>;

/// The core's lifetime transfer counters, mirrored at every completion step.
#[derive(Debug)]
struct TxMirror {
    started: Counter,
    completed: Counter,
    failed: Counter,
    timed_out: Counter,
    evicted: Counter,
    rejected: Counter,
    bytes: Counter,
}

/// The `rank` label of the per-rank series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RankLabel {
    rank: u32,
}

/// Per-rank occupancy and outcomes: the instance's sums hide which of its ranks holds the
/// blocks or slots, or fails the transfers. One series per rank (an instance's ranks are few).
#[derive(Debug, Default)]
struct PerRank {
    blocks_free: Family<RankLabel, U64Gauge>,
    staging_free: Family<RankLabel, U64Gauge>,
    transfers_completed: Family<RankLabel, Counter>,
    transfers_failed: Family<RankLabel, Counter>,
}

impl PerRank {
    fn register(r: &mut Registry) -> PerRank {
        let p = PerRank::default();
        let (blocks, staging) = (p.blocks_free.clone(), p.staging_free.clone());
        r.register(
            "kvferry_rank_blocks_free",
            "KV blocks free, per rank",
            blocks,
        );
        r.register(
            "kvferry_rank_staging_free",
            "Staging slots free, per rank",
            staging,
        );
        // Counters: the encoder appends `_total`, as for the instance's own.
        let (done, failed) = (p.transfers_completed.clone(), p.transfers_failed.clone());
        r.register(
            "kvferry_rank_transfers_completed",
            "Transfers completed, per rank",
            done,
        );
        r.register(
            "kvferry_rank_transfers_failed",
            "Transfers failed, per rank",
            failed,
        );
        p
    }

    fn copy(&self, rank: u32, s: &RankSample) {
        let l = RankLabel { rank };
        self.blocks_free.get_or_create(&l).set(s.blocks_free as u64);
        self.staging_free
            .get_or_create(&l)
            .set(s.staging.free as u64);
        let counters = [
            (&self.transfers_completed, s.tx.transfers_completed),
            (&self.transfers_failed, s.tx.transfers_failed),
        ];
        for (family, v) in counters {
            family.get_or_create(&l).inner().store(v, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
struct Pools {
    staging_slots: U64Gauge,
    staging_free: U64Gauge,
    staging_in_use: U64Gauge,
    staging_poisoned: U64Gauge,
    blocks_total: U64Gauge,
    blocks_free: U64Gauge,
    early_infos: U64Gauge,
    early_info_bytes: U64Gauge,
    early_aborts: U64Gauge,
}

/// One node's metrics; the node's tasks bump the public counters directly.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    tx: TxMirror,
    pools: Pools,
    per_rank: PerRank,
    pub requests_done: Counter,
    pub requests_failed: Counter,
    /// Connections refused a seat (their host's share and the table full of proven peers).
    pub connections_refused: Counter,
    /// Unproven connections that gave their seat to a newcomer.
    pub connections_evicted: Counter,
    /// Connections closed for bringing no frame in time (first frame or idle deadline).
    pub connections_silent: Counter,
    /// `Prepare`s refused because the asking host holds its block share.
    pub prepares_refused: Counter,
    latency: Histogram,
}

/// Registers a metric under `name` and hands back the caller's handle to it.
fn reg<M: prometheus_client::registry::Metric + Clone>(
    r: &mut Registry,
    name: &str,
    help: &str,
    m: M,
) -> M {
    r.register(name, help, m.clone());
    m
}

fn counter(r: &mut Registry, name: &str, help: &str) -> Counter {
    reg(r, name, help, Counter::default())
}

fn gauge(r: &mut Registry, name: &str, help: &str) -> U64Gauge {
    reg(r, name, help, U64Gauge::default())
}

impl TxMirror {
    fn register(r: &mut Registry) -> TxMirror {
        TxMirror {
            started: counter(r, "kvferry_transfers_started", "Transfer jobs submitted"),
            completed: counter(r, "kvferry_transfers_completed", "Transfer jobs completed"),
            failed: counter(r, "kvferry_transfers_failed", "Transfer jobs failed"),
            timed_out: counter(
                r,
                "kvferry_transfers_timed_out",
                "Requests past kv_transfer_timeout_ms",
            ),
            evicted: counter(
                r,
                "kvferry_transfers_evicted",
                "Transfers evicted past their deadline",
            ),
            rejected: counter(
                r,
                "kvferry_requests_rejected",
                "Peer requests refused (token, blocks, layout)",
            ),
            bytes: counter(r, "kvferry_bytes", "Bytes moved by completed transfers"),
        }
    }

    /// The core owns these counts (they only grow); a prometheus `Counter` can only add, so
    /// its atomic is set to the core's figure instead.
    fn copy(&self, c: &TxCounters) {
        let pairs = [
            (&self.started, c.transfers_started),
            (&self.completed, c.transfers_completed),
            (&self.failed, c.transfers_failed),
            (&self.timed_out, c.timeouts_warned),
            (&self.evicted, c.evictions),
            (&self.rejected, c.rejected),
            (&self.bytes, c.bytes),
        ];
        for (m, v) in pairs {
            m.inner().store(v, Ordering::Relaxed);
        }
    }
}

impl Pools {
    fn register(r: &mut Registry) -> Pools {
        Pools {
            staging_slots: gauge(r, "kvferry_staging_slots", "Staging slots"),
            staging_free: gauge(r, "kvferry_staging_free", "Staging slots free"),
            staging_in_use: gauge(r, "kvferry_staging_in_use", "Staging slots in use"),
            staging_poisoned: gauge(
                r,
                "kvferry_staging_poisoned",
                "Staging slots poisoned, waiting for their fence",
            ),
            // A gauge, so the encoder adds no suffix: the name is the one it always had.
            blocks_total: gauge(r, "kvferry_blocks_total", "KV blocks in the pool"),
            blocks_free: gauge(r, "kvferry_blocks_free", "KV blocks free"),
            early_infos: gauge(
                r,
                "kvferry_early_infos",
                "RequestInfos parked for requests not registered yet",
            ),
            early_info_bytes: gauge(
                r,
                "kvferry_early_info_bytes",
                "Bytes of parked RequestInfos (bounded in total and per peer)",
            ),
            early_aborts: gauge(
                r,
                "kvferry_early_aborts",
                "Aborts parked for requests not registered yet",
            ),
        }
    }
}

fn node_counters(r: &mut Registry) -> [Counter; 6] {
    [
        counter(r, "kvferry_requests_done", "Requests completed"),
        counter(r, "kvferry_requests_failed", "Requests failed or cancelled"),
        counter(
            r,
            "kvferry_connections_refused",
            "Connections refused a seat (host share or table full of proven peers)",
        ),
        counter(
            r,
            "kvferry_connections_evicted",
            "Connections evicted before their first frame to seat a newcomer",
        ),
        counter(
            r,
            "kvferry_connections_silent",
            "Connections closed for no frame within the first-frame or idle deadline",
        ),
        counter(
            r,
            "kvferry_prepares_refused",
            "Prepares refused: the asking host holds its block share",
        ),
    ]
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut r = Registry::default();
        let tx = TxMirror::register(&mut r);
        let [done, failed, refused, evicted, silent, prepares] = node_counters(&mut r);
        let pools = Pools::register(&mut r);
        let per_rank = PerRank::register(&mut r);
        let buckets = LATENCY_BUCKETS_MS.map(|ms| ms as f64 / 1000.0);
        let latency = reg(
            &mut r,
            "kvferry_transfer_latency_seconds",
            "Request transfer latency",
            Histogram::new(buckets),
        );
        Arc::new(Metrics {
            registry: r,
            tx,
            pools,
            per_rank,
            requests_done: done,
            requests_failed: failed,
            connections_refused: refused,
            connections_evicted: evicted,
            connections_silent: silent,
            prepares_refused: prepares,
            latency,
        })
    }

    /// Copies the instance's lifetime counters and occupancy: the sums over its ranks, and
    /// each rank's own series.
    pub fn update(&self, ranks: &[RankSample]) {
        let mut c = TxCounters::default();
        let mut st = StagingCounters::default();
        let mut early = EarlyCounts::default();
        let (mut blocks, mut blocks_free) = (0, 0);
        for (i, r) in ranks.iter().enumerate() {
            c += r.tx;
            st.slots += r.staging.slots;
            st.free += r.staging.free;
            st.in_use += r.staging.in_use;
            st.poisoned += r.staging.poisoned;
            early.infos += r.early.infos;
            early.info_bytes += r.early.info_bytes;
            early.aborts += r.early.aborts;
            (blocks, blocks_free) = (blocks + r.blocks, blocks_free + r.blocks_free);
            self.per_rank.copy(i as u32, r);
        }
        self.tx.copy(&c);
        let p = &self.pools;
        for (g, v) in [
            (&p.staging_slots, st.slots),
            (&p.staging_free, st.free),
            (&p.staging_in_use, st.in_use),
            (&p.staging_poisoned, st.poisoned),
            (&p.blocks_total, blocks),
            (&p.blocks_free, blocks_free),
            (&p.early_infos, early.infos),
            (&p.early_info_bytes, early.info_bytes),
            (&p.early_aborts, early.aborts),
        ] {
            g.set(v as u64);
        }
    }

    pub fn observe_latency(&self, d: Duration) {
        self.latency.observe(d.as_secs_f64());
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut o = String::new();
        prometheus_text::encode(&mut o, &self.registry).expect("writing to a String cannot fail");
        o
    }
}

/// Serves `GET /metrics` on `listener` until the runtime stops.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(SCRAPE_TIMEOUT, scrape(stream, m)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "metrics scrape failed"),
                Err(_) => tracing::debug!(%addr, "metrics scrape timed out"),
            }
        });
    }
}

/// One connection, one request: no keep-alive, a bounded head read in bounded time.
async fn scrape(stream: TcpStream, m: Arc<Metrics>) -> hyper::Result<()> {
    let svc = service_fn(move |req| {
        let resp = respond(&m, &req);
        async move { Ok::<_, Infallible>(resp) }
    });
    http1::Builder::new()
        .keep_alive(false)
        .max_buf_size(MAX_HTTP_HEAD)
        .timer(TokioTimer::new())
        .header_read_timeout(HTTP_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), svc)
        .await
}

fn respond(m: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body, kind) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, m.render(), prometheus_text::CONTENT_TYPE),
        _ => (
            StatusCode::NOT_FOUND,
            "try GET /metrics\n".into(),
            "text/plain; charset=utf-8",
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Name -> value of every sample line.
    fn samples(text: &str) -> std::collections::HashMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    #[test]
    fn every_name_is_exposed_with_its_value() {
        let m = Metrics::new();
        // Two ranks: the instance exposes their sums, and each rank its own series.
        let sample = |started, bytes, (slots, free, in_use), (blocks, blocks_free)| RankSample {
            tx: TxCounters {
                transfers_started: started,
                transfers_completed: started - 1,
                bytes,
                ..Default::default()
            },
            staging: StagingCounters {
                slots,
                free,
                in_use,
                ..Default::default()
            },
            early: EarlyCounts::default(),
            blocks_free,
            blocks,
        };
        m.update(&[
            sample(5, 4000, (3, 2, 1), (10, 6)),
            sample(2, 96, (1, 1, 0), (6, 4)),
        ]);
        m.connections_refused.inc();
        m.observe_latency(Duration::from_micros(1500));
        m.observe_latency(Duration::from_secs(9));
        let s = samples(&m.render());
        let expect = [
            ("kvferry_transfers_started_total", 7.0),
            ("kvferry_transfers_completed_total", 5.0),
            ("kvferry_transfers_failed_total", 0.0),
            ("kvferry_transfers_timed_out_total", 0.0),
            ("kvferry_transfers_evicted_total", 0.0),
            ("kvferry_requests_rejected_total", 0.0),
            ("kvferry_bytes_total", 4096.0),
            ("kvferry_requests_done_total", 0.0),
            ("kvferry_requests_failed_total", 0.0),
            ("kvferry_connections_refused_total", 1.0),
            ("kvferry_connections_evicted_total", 0.0),
            ("kvferry_connections_silent_total", 0.0),
            ("kvferry_prepares_refused_total", 0.0),
            ("kvferry_staging_slots", 4.0),
            ("kvferry_staging_free", 3.0),
            ("kvferry_staging_in_use", 1.0),
            ("kvferry_staging_poisoned", 0.0),
            ("kvferry_blocks_total", 16.0),
            ("kvferry_blocks_free", 10.0),
            ("kvferry_early_infos", 0.0),
            ("kvferry_early_info_bytes", 0.0),
            ("kvferry_early_aborts", 0.0),
            ("kvferry_rank_blocks_free{rank=\"0\"}", 6.0),
            ("kvferry_rank_blocks_free{rank=\"1\"}", 4.0),
            ("kvferry_rank_staging_free{rank=\"0\"}", 2.0),
            ("kvferry_rank_staging_free{rank=\"1\"}", 1.0),
            ("kvferry_rank_transfers_completed_total{rank=\"0\"}", 4.0),
            ("kvferry_rank_transfers_completed_total{rank=\"1\"}", 1.0),
            ("kvferry_rank_transfers_failed_total{rank=\"0\"}", 0.0),
            ("kvferry_transfer_latency_seconds_count", 2.0),
            ("kvferry_transfer_latency_seconds_bucket{le=\"0.001\"}", 0.0),
            ("kvferry_transfer_latency_seconds_bucket{le=\"0.002\"}", 1.0),
            ("kvferry_transfer_latency_seconds_bucket{le=\"5\"}", 1.0),
            ("kvferry_transfer_latency_seconds_bucket{le=\"+Inf\"}", 2.0),
        ];
        for (name, v) in expect {
            assert_eq!(s.get(name), Some(&v), "{name} in {s:?}");
        }
        let sum = s["kvferry_transfer_latency_seconds_sum"];
        assert!((sum - 9.0015).abs() < 1e-9, "{sum}");
    }

    async fn ask(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = String::new();
        // Ends only because the server closes: one request per connection.
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .expect("the server closes after one response")
            .unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_refuses_anything_else() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let m = Metrics::new();
        m.requests_done.inc_by(3);
        tokio::spawn(serve(l, m));
        let ok = ask(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("\nkvferry_requests_done_total 3\n"), "{ok}");
        let other = ask(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let post = ask(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 404"), "{post}");
        let big = format!(
            "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HTTP_HEAD)
        );
        let big = ask(addr, big.as_bytes()).await;
        assert!(big.starts_with("HTTP/1.1 431"), "{big}");
    }
}
