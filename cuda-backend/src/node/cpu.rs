//! CPU time of this process, for the load summary and the bench: on a loopback run both sides
//! share the machine's cores, so CPU seconds per GiB tell what the path costs where
//! throughput alone only tells who won the cores.

use std::time::Duration;

/// User plus system CPU time of all threads of this process so far.
pub fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(
        rc, 0,
        "CLOCK_PROCESS_CPUTIME_ID is always available on Linux"
    );
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU seconds per GiB, for `cpu` spent moving `bytes`; none when nothing moved (a figure
/// per zero bytes would mean nothing).
pub fn s_per_gib(cpu: Duration, bytes: u64) -> Option<f64> {
    (bytes > 0).then(|| cpu.as_secs_f64() / (bytes as f64 / (1u64 << 30) as f64))
}
