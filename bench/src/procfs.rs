//! What the harness reads from `/proc`: a process's CPU time (all threads, user + system),
//! its resident set (current and peak) and the machine's steal time.

use std::collections::HashMap;
use std::sync::OnceLock;

/// Clock ticks per second of `/proc/PID/stat` times (`getconf CLK_TCK`, 100 on Linux).
fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime of process `pid`, in microseconds (0 if it is gone).
pub fn cpu_us(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / clk_tck() * 1e6
}

/// A process's CPU time at one instant: each thread's run time in nanoseconds from the
/// scheduler (`/proc/PID/task/TID/schedstat`), and the tick-counted total of `/proc/PID/stat`
/// for kernels without it. Ticks are 10 ms: over a window of a few seconds that is a percent,
/// as much as the side-by-side runs are asked to resolve.
#[derive(Clone, Debug, Default)]
pub struct CpuSample {
    threads_ns: HashMap<u32, u64>,
    ticks_us: f64,
}

impl CpuSample {
    pub fn of(pid: u32) -> CpuSample {
        let mut threads_ns = HashMap::new();
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for entry in dir.flatten() {
                let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
                    continue;
                };
                let ns = std::fs::read_to_string(entry.path().join("schedstat"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse().ok());
                if let Some(ns) = ns {
                    threads_ns.insert(tid, ns);
                }
            }
        }
        CpuSample {
            threads_ns,
            ticks_us: cpu_us(pid),
        }
    }

    /// Microseconds of CPU from `start` to `self`, summed per thread: a thread started in
    /// between counts from zero, and one that exited in between is left out (its run time
    /// in the window with it) instead of taking its whole life's time off the total. Where
    /// that sum reads more than two ticks below the tick-counted total (schedstat reading
    /// zeros on a kernel without scheduler statistics, or a thread that exited after working
    /// in the window), the tick-counted figure is returned instead.
    pub fn us_since(&self, start: &CpuSample) -> f64 {
        let ticks = self.ticks_us - start.ticks_us;
        let ns: u64 = self
            .threads_ns
            .iter()
            .map(|(tid, &ns)| ns.saturating_sub(start.threads_ns.get(tid).copied().unwrap_or(0)))
            .sum();
        let per_thread = ns as f64 / 1000.0;
        if per_thread + 2.0 * 1e6 / clk_tck() < ticks {
            ticks
        } else {
            per_thread
        }
    }
}

/// A `kB` line of `/proc/PID/status` (`VmRSS`, `VmHWM`), in kB.
pub fn status_kb(pid: &str, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// (steal, total) jiffies over all CPUs from `/proc/stat`.
pub fn steal_and_total() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(cpu) = stat.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guests are in user.
    let total: u64 = v.iter().take(8).sum();
    (v.get(7).copied().unwrap_or(0), total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Burns this thread's CPU for `d` of wall time.
    fn spin(d: std::time::Duration) {
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < d {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        // Several 10 ms ticks, so that the tick-counted total cannot read 0 (a fixed loop
        // took less than one tick in a release build).
        spin(std::time::Duration::from_millis(50));
        assert!(cpu_us(me) > 0.0);
        assert!(!CpuSample::of(me).threads_ns.is_empty());
        assert!(status_kb("self", "VmRSS").unwrap() > 0);
        assert!(status_kb("self", "VmHWM").unwrap() > 0);
    }

    /// The per-thread sample sees CPU time far below a tick (10 ms), and a thread started and
    /// ended between two samples neither takes time off the total nor breaks the reading.
    #[test]
    fn thread_samples_resolve_below_a_tick() {
        let me = std::process::id();
        let a = CpuSample::of(me);
        std::thread::spawn(|| spin(std::time::Duration::from_millis(3)))
            .join()
            .unwrap();
        spin(std::time::Duration::from_millis(3));
        let b = CpuSample::of(me);
        let us = b.us_since(&a);
        // This thread's 3 ms at least (the other thread's time left with it); a wall of 3 ms
        // can be less CPU if the thread was preempted, so allow for the VM.
        assert!(us > 1_500.0 && us < 1_000_000.0, "{us} µs");
        assert!(b.us_since(&b).abs() < f64::EPSILON);
    }
}
