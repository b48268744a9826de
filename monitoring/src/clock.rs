//! The clock of recorded durations: node times, service contexts, composites.
//!
//! A chain of synchronous nodes takes tens of nanoseconds per node, and every node's time is
//! recorded, so the clock read is a cost of its own: `std::time::Instant::now()` and the
//! subtraction of two take about 20 ns on the reference VM (the vDSO's `clock_gettime`, then
//! `Timespec` arithmetic with its checks). [`Mark`] reads the CPU's time-stamp counter through
//! `quanta` where the CPU declares it invariant, and the OS monotonic clock otherwise: about
//! 10 ns per read and difference. The counter is calibrated against the OS clock once per
//! process ([`calibrate`]; well under a millisecond).
//!
//! Deadlines (timeouts) stay on `tokio::time::Instant`: a `Mark` only measures.

use std::sync::OnceLock;
use std::time::Duration;

fn clock() -> &'static quanta::Clock {
    static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new)
}

/// Calibrates the clock now rather than on the first request that reads it.
pub fn calibrate() {
    clock();
}

/// A point in time, only for measuring durations (never compared with other clocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark(u64);

impl Mark {
    #[inline]
    pub fn now() -> Mark {
        Mark(clock().raw())
    }

    /// The time from this mark to `later` (zero if `later` is not later).
    #[inline]
    pub fn until(self, later: Mark) -> Duration {
        Duration::from_nanos(clock().delta_as_nanos(self.0, later.0))
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
        let os = std::time::Instant::now();
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
}
