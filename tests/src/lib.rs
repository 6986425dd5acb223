//! Shared helpers for the integration tests: node child processes that die with their guard,
//! line capture of their output, raw frames over real sockets, and metrics scrapes.
//!
//! Every wait is bounded and generous: these tests must pass on a loaded 2-core CI machine.

use bytes::BytesMut;
use kvferry_backends::node::frame::{self, Frame};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a node may take to print its address.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Poll period of every bounded wait.
pub const POLL: Duration = Duration::from_millis(20);
/// Small blocks (4 KiB) keep debug builds fast.
pub const SMALL_LAYOUT: [&str; 10] = [
    "--layers",
    "1",
    "--kv-heads",
    "1",
    "--head-dim",
    "64",
    "--tokens-per-block",
    "16",
    "--dtype-bytes",
    "2",
];
/// Four kv heads, so TP 1, 2 and 4 split them; 8 KiB blocks at TP1 (heterogeneous TP tests).
pub const HETERO_LAYOUT: [&str; 10] = [
    "--layers",
    "2",
    "--kv-heads",
    "4",
    "--head-dim",
    "64",
    "--tokens-per-block",
    "4",
    "--dtype-bytes",
    "2",
];
/// 256 KiB blocks: a request of 32 (8 MiB) moves for long enough that the copy, not the
/// per-request control round trips, decides its time (and a kill or cancel lands mid-READ).
pub const BIG_LAYOUT: [&str; 10] = [
    "--layers",
    "4",
    "--kv-heads",
    "1",
    "--head-dim",
    "64",
    "--tokens-per-block",
    "256",
    "--dtype-bytes",
    "2",
];
/// A gen over `BIG_LAYOUT`: 32-block requests, 4 at once, in a pool of exactly those 4.
pub const BIG_GEN: [&str; 8] = [
    "--blocks",
    "128",
    "--concurrency",
    "4",
    "--min-blocks",
    "32",
    "--max-blocks",
    "32",
];
/// A ctx over `BIG_LAYOUT`: room for 16 such requests, all of them for one host.
pub const BIG_CTX: [&str; 4] = ["--blocks", "512", "--max-blocks-per-ip", "512"];

type Lines = Arc<Mutex<Vec<String>>>;

/// A node child process, SIGKILLed and reaped when dropped.
pub struct NodeProc {
    child: Child,
    stdout: Lines,
    stderr: Lines,
}

fn capture(r: impl Read + Send + 'static, echo: bool) -> Lines {
    let lines: Lines = Arc::default();
    let out = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if echo {
                eprintln!("  | {line}");
            }
            out.lock().unwrap().push(line);
        }
    });
    lines
}

impl NodeProc {
    pub fn spawn(bin: &str, args: &[&str]) -> NodeProc {
        NodeProc::spawn_env(bin, args, &[])
    }

    /// `spawn` with extra environment variables (e.g. UCX's transport for a NIXL node).
    pub fn spawn_env(bin: &str, args: &[&str], env: &[(&str, &str)]) -> NodeProc {
        let mut child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {bin}: {e}"));
        let stdout = capture(child.stdout.take().expect("piped"), false);
        let stderr = capture(child.stderr.take().expect("piped"), false);
        NodeProc {
            child,
            stdout,
            stderr,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The first stdout line starting with `prefix` (the rest of it), within `timeout`.
    pub fn wait_line(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .stdout
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.starts_with(prefix))
            {
                return l[prefix.len()..].trim().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no `{prefix}` line within {timeout:?}; stderr:\n{}",
                self.stderr_text()
            );
            std::thread::sleep(POLL);
        }
    }

    pub fn addr(&self, prefix: &str) -> SocketAddr {
        self.wait_line(prefix, START_TIMEOUT)
            .parse()
            .expect("node printed a socket address")
    }

    /// Waits until some stderr line satisfies `pred`.
    pub fn wait_stderr(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.stderr.lock().unwrap().iter().any(|l| pred(l)) {
                return true;
            }
            std::thread::sleep(POLL);
        }
        false
    }

    /// A ctx node: waits (60 s) until it logs that a gen peer went away.
    pub fn assert_gen_disconnect_seen(&self) {
        assert!(
            self.wait_stderr(Duration::from_secs(60), |l| l
                .contains("gen peer disconnected")),
            "ctx did not notice the gen go away:\n{}",
            self.stderr_text()
        );
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "node did not exit within {timeout:?}; stderr tail:\n{}",
                tail(&self.stderr_text(), 40)
            );
            std::thread::sleep(POLL);
        }
    }

    /// The gen's `summary {json}` line after it exited.
    pub fn summary(&self) -> serde_json::Value {
        let json = self.wait_line("summary ", Duration::from_secs(10));
        serde_json::from_str(&json).expect("summary line is JSON")
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A gen's summary says every staging slot and KV block is free again, none poisoned.
pub fn assert_pools_free(s: &serde_json::Value) {
    assert_eq!(s["staging_free"], s["staging_slots"], "{s}");
    assert_eq!(s["staging_poisoned"], 0, "{s}");
    assert_eq!(s["blocks_free"], s["blocks_total"], "{s}");
}

/// A gen's summary after its ctx was killed mid-run and restarted on the same address: the
/// kill caught some requests (those started failed, each naming the lost connection; those
/// asked and not answered were asked again); some completed after the reconnect; each of the
/// `requests` ended exactly once; and its pools are free.
pub fn assert_survived_ctx_restart(s: &serde_json::Value, requests: u64) {
    let failed = s["failed"].as_u64().unwrap();
    // A request the kill caught either failed (it had started) or, asked but not answered,
    // was asked again of the ctx that came back.
    let asked_again = s["asks_repeated"].as_u64().unwrap();
    assert!(
        failed + asked_again >= 1,
        "no request was caught by the kill: {s}"
    );
    let errors = s["errors"].as_object().unwrap();
    assert!(
        errors.keys().all(|k| k.contains("ctx connection lost")),
        "unclear errors: {s}"
    );
    assert!(s["done_after_reconnect"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(
        s["done"].as_u64().unwrap() + failed,
        requests,
        "every request ends exactly once: {s}"
    );
    assert_pools_free(s);
}

pub fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// Writes `toml` to a fresh file under the temp dir.
pub fn write_config(toml: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let p = std::env::temp_dir().join(format!(
        "kvferry-test-{}-{}.toml",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&p, toml).expect("writing a temp config");
    p
}

/// Scrapes `GET /metrics` into name -> value (histogram buckets keep their labels).
pub fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("metrics up");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).expect("metrics response");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Waits (60 s) until a node's metrics show every block and staging slot free again and no
/// slot poisoned.
pub fn wait_released(metrics: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = scrape(metrics);
        if m["kvferry_blocks_free"] == m["kvferry_blocks_total"]
            && m["kvferry_staging_free"] == m["kvferry_staging_slots"]
            && m["kvferry_staging_poisoned"] == 0.0
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node still holds resources: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A raw client socket speaking the node's frames.
pub struct RawPeer {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl RawPeer {
    pub fn connect(addr: SocketAddr) -> RawPeer {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
        RawPeer::wrap(stream)
    }

    /// Either end of a connection to a node (one this test dialed or accepted); a node that
    /// stops answering fails the test instead of hanging it.
    pub fn wrap(stream: TcpStream) -> RawPeer {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        RawPeer {
            stream,
            buf: BytesMut::new(),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().unwrap()
    }

    pub fn send(&mut self, f: &Frame) {
        let mut b = BytesMut::new();
        frame::encode(f, &mut b);
        self.stream.write_all(&b).expect("write frame");
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write bytes");
    }

    /// The next frame, or None once the node closed the connection.
    pub fn recv(&mut self) -> Option<Frame> {
        let mut chunk = [0u8; 64 << 10];
        loop {
            if let Some(f) = frame::decode(&mut self.buf).expect("node sends valid frames") {
                return Some(f);
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("reading from the node: {e}"),
            }
        }
    }

    /// Reads frames until `pred` matches one (returned) or the connection closes (None).
    pub fn recv_until(&mut self, pred: impl Fn(&Frame) -> bool) -> Option<Frame> {
        while let Some(f) = self.recv() {
            if pred(&f) {
                return Some(f);
            }
        }
        None
    }
}

impl RawPeer {
    /// As `connect`, with the source address bound to `src` (a loopback address: every address
    /// of 127.0.0.0/8 is local, so a test can play several hosts).
    pub fn connect_from(src: IpAddr, addr: SocketAddr) -> RawPeer {
        RawPeer::wrap(connect_from(src, addr, 1).pop().expect("one connection"))
    }
}

/// Connections opened at once by `connect_from`.
const CONNECT_BATCH: usize = 64;
/// Bound on one connect (a full accept backlog makes the kernel retry the SYN).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens `n` connections to `to` from source address `src` (loopback only), `CONNECT_BATCH`
/// at a time; returns them as blocking std sockets.
pub fn connect_from(src: IpAddr, to: SocketAddr, n: usize) -> Vec<TcpStream> {
    assert!(
        src.is_loopback() && to.ip().is_loopback(),
        "tests use loopback addresses only"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for connects");
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let batch = CONNECT_BATCH.min(n - out.len());
        let conns = rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..batch {
                set.spawn(async move {
                    let s = tokio::net::TcpSocket::new_v4()?;
                    s.bind(SocketAddr::new(src, 0))?;
                    let c = tokio::time::timeout(CONNECT_TIMEOUT, s.connect(to)).await??;
                    c.into_std()
                });
            }
            set.join_all().await
        });
        for c in conns {
            let c = c.unwrap_or_else(|e| panic!("connecting {src} -> {to}: {e}"));
            c.set_nonblocking(false).unwrap();
            out.push(c);
        }
    }
    out
}

/// (VmRSS, VmHWM) of process `pid` in KiB, from /proc/PID/status.
pub fn proc_mem_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Raises this process's open-file soft limit to its hard limit (children inherit it) and
/// returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid, owned struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        r.rlim_cur = r.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
    }
    r.rlim_cur
}

/// Reads and discards whatever `s` receives until it closes, on a thread of its own (a peer
/// that never reads would be cut off by the node's write-stall bound instead).
pub fn drain(s: &TcpStream) {
    let mut s = s.try_clone().expect("clone socket");
    std::thread::spawn(move || {
        let mut sink = [0u8; 64 << 10];
        let _ = s.set_read_timeout(None);
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    });
}

/// Scrapes `metrics` until `pred` holds (returned), for at most `timeout`.
pub fn wait_metrics(
    metrics: SocketAddr,
    timeout: Duration,
    pred: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let deadline = Instant::now() + timeout;
    loop {
        let m = scrape(metrics);
        if pred(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never satisfied the condition: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
