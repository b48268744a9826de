//! The clock of recorded durations: node times, service contexts, composites, store operations.
//!
//! A chain of synchronous nodes takes tens of nanoseconds per node, and every node's time is
//! recorded, so the clock read is a cost of its own: `std::time::Instant::now()` and the
//! subtraction of two take about 20 ns on the reference VM (the vDSO's `clock_gettime`, then
//! `Timespec` arithmetic with its checks). [`Mark`] reads the CPU's time-stamp counter through
//! `quanta` instead, about 10 ns per read and difference, but only where the kernel itself
//! keeps time with it (Linux's current clocksource is `tsc`): the kernel checked at boot that
//! the counter is invariant and in step across CPUs, and switches away from it (to the
//! fallback here, at the next start) when it is not. Anywhere else a mark is the OS monotonic
//! clock, as `Instant` is. quanta calibrates the counter against the OS clock once per
//! process ([`calibrate`]: 0.6 ms on the reference VM, at most 200 ms by quanta's own bound),
//! to a few parts per million.
//!
//! Deadlines (timeouts) stay on `tokio::time::Instant`: a `Mark` only measures.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

enum Source {
    /// The time-stamp counter, which the kernel's own clock uses.
    Tsc(quanta::Clock),
    /// Nanoseconds since this instant (the OS monotonic clock).
    Os(Instant),
}

fn kernel_keeps_time_with_tsc() -> bool {
    std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        .is_ok_and(|s| s.trim() == "tsc")
}

fn source() -> &'static Source {
    static SOURCE: OnceLock<Source> = OnceLock::new();
    SOURCE.get_or_init(|| {
        if cfg!(target_arch = "x86_64") && kernel_keeps_time_with_tsc() {
            Source::Tsc(quanta::Clock::new())
        } else {
            Source::Os(Instant::now())
        }
    })
}

/// Picks the clock (and calibrates the counter) now rather than on the first request that
/// reads it. Call it at start-up.
pub fn calibrate() {
    source();
}

/// Whether marks read the time-stamp counter (`false`: the OS monotonic clock).
pub fn uses_tsc() -> bool {
    matches!(source(), Source::Tsc(_))
}

/// A point in time, only for measuring durations (never compared with other clocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark(u64);

impl Mark {
    #[inline]
    pub fn now() -> Mark {
        match source() {
            Source::Tsc(clock) => Mark(clock.raw()),
            Source::Os(base) => Mark(u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)),
        }
    }

    /// The time from this mark to `later` (zero if `later` is not later).
    #[inline]
    pub fn until(self, later: Mark) -> Duration {
        Duration::from_nanos(match source() {
            Source::Tsc(clock) => clock.delta_as_nanos(self.0, later.0),
            Source::Os(_) => later.0.saturating_sub(self.0),
        })
    }

    /// The time since this mark.
    #[inline]
    pub fn elapsed(self) -> Duration {
        self.until(Mark::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_measure_what_the_os_clock_measures() {
        let os = Instant::now();
        let start = Mark::now();
        std::thread::sleep(Duration::from_millis(20));
        let end = Mark::now();
        let measured = start.until(end);
        let reference = os.elapsed();
        assert!(end >= start);
        // The marks lie inside the reference interval; allow for calibration error (quanta
        // promises far better than 5%).
        assert!(measured >= Duration::from_millis(19), "{measured:?}");
        assert!(
            measured <= reference + reference / 20,
            "{measured:?} > {reference:?}"
        );
        assert_eq!(
            end.until(start),
            Duration::ZERO,
            "a mark before is zero, not negative"
        );
    }

    #[test]
    fn the_counter_is_used_only_where_the_kernel_uses_it() {
        assert_eq!(
            uses_tsc(),
            cfg!(target_arch = "x86_64") && kernel_keeps_time_with_tsc()
        );
    }
}
