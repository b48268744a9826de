//! Where the hypervisor has put the two vCPUs, read off the time one cache line takes to go
//! from CPU 0 to CPU 1 and back.
//!
//! The hosts of bench/PROFILING.md move the vCPUs while the benchmark runs: on the AMD EPYC
//! host of 2026-12-04 the round trip read either about 60 ns (the two vCPUs share a cache) or
//! about 350 ns (they do not), and the servers' CPU per request followed it, unpinned most
//! (bare hyper 6.6 µs per request near, 8.4 µs far). A pair of runs that straddles a move
//! compares two machines. The harness probes before and after every run and reports which runs
//! saw one placement throughout; it never drops a run for it.
//!
//! Both threads are pinned with `taskset -p` on their thread ids (this crate has no unsafe
//! code and no affinity binding), and the round trips are timed in batches, the median kept.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context, bail};

/// Round trips per batch, and batches per probe (the median batch is kept): about 10 ms in all
/// on either placement.
const ROUND_TRIPS: u64 = 4_000;
const BATCHES: usize = 5;

/// The round trip above which the two vCPUs do not share a cache. That host read 51–81 ns on
/// one side and 320–412 ns on the other; the threshold sits where neither comes near.
pub const FAR_NS: f64 = 150.0;

/// Whether a round trip of `ns` says the two vCPUs do not share a cache.
pub fn far(ns: f64) -> bool {
    ns >= FAR_NS
}

/// Pins the calling thread to `cpu`.
fn pin_self(cpu: usize) -> anyhow::Result<()> {
    // "/proc/thread-self" links to "PID/task/TID".
    let link = std::fs::read_link("/proc/thread-self").context("reading /proc/thread-self")?;
    let tid = link
        .file_name()
        .and_then(|t| t.to_str())
        .context("no thread id in /proc/thread-self")?
        .to_owned();
    let status = Command::new("taskset")
        .args(["-p", "-c", &cpu.to_string(), &tid])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running taskset")?;
    if !status.success() {
        bail!("taskset -p -c {cpu} {tid} failed: {status}");
    }
    Ok(())
}

/// A value no round trip writes: tells a thread whose partner could not be pinned to stop.
const STOP: u64 = u64::MAX;

/// Waits until `line` holds `want`; false if it was told to stop.
fn await_value(line: &AtomicU64, want: u64) -> bool {
    loop {
        match line.load(Ordering::Acquire) {
            v if v == want => return true,
            STOP => return false,
            _ => std::hint::spin_loop(),
        }
    }
}

/// Tells the other thread to stop when dropped, however the thread that holds it ends (a
/// panic included), so that neither is left spinning for a partner that is gone.
struct StopOnDrop(Arc<AtomicU64>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(STOP, Ordering::Release);
    }
}

/// Nanoseconds for one cache line to go from CPU 0 to CPU 1 and back (the median batch).
/// Both threads are spawned for the probe, so the caller's own affinity is left alone (the
/// harness's children inherit it).
pub fn round_trip_ns() -> anyhow::Result<f64> {
    let line = Arc::new(AtomicU64::new(0));
    let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<()>>();
    let answer = {
        let line = Arc::clone(&line);
        std::thread::spawn(move || {
            let _stop = StopOnDrop(Arc::clone(&line));
            let pinned = pin_self(1);
            let ok = pinned.is_ok();
            let _ = ready_tx.send(pinned);
            // Answers each odd value with the next even one.
            let mut i = 0;
            while ok && await_value(&line, 2 * i + 1) {
                line.store(2 * i + 2, Ordering::Release);
                i += 1;
            }
        })
    };
    let ask = {
        let line = Arc::clone(&line);
        std::thread::spawn(move || -> anyhow::Result<f64> {
            let _stop = StopOnDrop(Arc::clone(&line));
            let other = ready_rx
                .recv()
                .context("the probe's answering thread ended")?;
            other.and_then(|()| pin_self(0))?;
            let mut batches = Vec::with_capacity(BATCHES);
            let mut k = 0;
            for _ in 0..BATCHES {
                let start = Instant::now();
                for _ in 0..ROUND_TRIPS {
                    line.store(2 * k + 1, Ordering::Release);
                    if !await_value(&line, 2 * k + 2) {
                        bail!("the probe's answering thread stopped");
                    }
                    k += 1;
                }
                batches.push(start.elapsed().as_nanos() as f64 / ROUND_TRIPS as f64);
            }
            crate::harness::median(batches).context("no batch")
        })
    };
    let result = ask
        .join()
        .map_err(|_| anyhow::anyhow!("the probe's asking thread panicked"))?;
    let _ = answer.join();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this process may run on CPUs 0 and 1 (`Cpus_allowed_list`, e.g. `0-1` or
    /// `0,2-3`) and `taskset` is there.
    fn can_pin_0_and_1() -> bool {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let Some(list) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        else {
            return false;
        };
        let allowed = |cpu: u32| {
            list.trim().split(',').any(|part| {
                let mut ends = part.split('-').map(|n| n.trim().parse::<u32>().ok());
                match (ends.next().flatten(), ends.next()) {
                    (Some(a), None) => a == cpu,
                    (Some(a), Some(Some(b))) => (a..=b).contains(&cpu),
                    _ => false,
                }
            })
        };
        let taskset = Command::new("taskset")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        allowed(0) && allowed(1) && taskset
    }

    /// Where CPUs 0 and 1 can be pinned the probe reads a plausible round trip; elsewhere it
    /// says that it could not pin (and does not hang).
    #[test]
    fn the_probe_reads_a_round_trip_or_says_why_not() {
        let two = can_pin_0_and_1();
        match round_trip_ns() {
            Ok(ns) => {
                assert!(two, "pinned to CPUs 0 and 1 where it cannot");
                assert!(ns > 1.0 && ns < 1_000_000.0, "{ns} ns");
            }
            Err(e) => {
                assert!(!two, "{e:#}");
                assert!(format!("{e:#}").contains("taskset"), "{e:#}");
            }
        }
    }
}
