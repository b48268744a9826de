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
//! A measured duration is a [`Span`], in the clock's own unit (counter ticks, or nanoseconds on
//! the OS clock): the time of a node is one subtraction, and recording it compares it with
//! bucket bounds converted to ticks once, when a histogram is made. Only scrapes, logs and
//! callers that ask for a [`Duration`] convert ticks to time.
//!
//! Deadlines (timeouts) stay on `tokio::time::Instant`: a `Mark` only measures.

use std::ops::{Add, AddAssign};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

enum Source {
    /// The time-stamp counter, which the kernel's own clock uses, and its ticks per
    /// nanosecond (for durations given in time, never on the hot path).
    Tsc {
        clock: quanta::Clock,
        ticks_per_ns: f64,
    },
    /// Nanoseconds since this instant (the OS monotonic clock): a tick is a nanosecond.
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
            let clock = quanta::Clock::new();
            // quanta's own scale, read back over 2^40 ticks (minutes of time): exact to far
            // better than a part per million.
            const PROBE: u64 = 1 << 40;
            let ns = clock.delta_as_nanos(0, PROBE).max(1);
            Source::Tsc {
                clock,
                ticks_per_ns: PROBE as f64 / ns as f64,
            }
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
    matches!(source(), Source::Tsc { .. })
}

/// Ticks -> nanoseconds (quanta's scale: a multiplication and a shift).
pub(crate) fn ticks_to_nanos(ticks: u64) -> u64 {
    match source() {
        Source::Tsc { clock, .. } => clock.delta_as_nanos(0, ticks),
        Source::Os(_) => ticks,
    }
}

/// Nanoseconds -> ticks, rounded to the nearest (saturating).
pub(crate) fn nanos_to_ticks(ns: u64) -> u64 {
    match source() {
        // `as` saturates a float too large for `u64`.
        Source::Tsc { ticks_per_ns, .. } => (ns as f64 * ticks_per_ns).round() as u64,
        Source::Os(_) => ns,
    }
}

/// A point in time, only for measuring durations (never compared with other clocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark(u64);

impl Mark {
    #[inline]
    pub fn now() -> Mark {
        match source() {
            Source::Tsc { clock, .. } => Mark(clock.raw()),
            Source::Os(base) => Mark(u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)),
        }
    }

    /// The time from this mark to `later` (zero if `later` is not later).
    #[inline]
    pub fn until(self, later: Mark) -> Span {
        Span(later.0.saturating_sub(self.0))
    }

    /// The time since this mark.
    #[inline]
    pub fn elapsed(self) -> Span {
        self.until(Mark::now())
    }
}

/// A measured duration, in the clock's ticks (see the module's documentation). Recording APIs
/// take `impl Into<Span>`, so a [`Duration`] does too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span(u64);

impl Span {
    pub const ZERO: Span = Span(0);

    /// The ticks themselves, for comparison with bounds converted by [`nanos_to_ticks`].
    #[inline]
    pub(crate) fn ticks(self) -> u64 {
        self.0
    }

    #[cfg(test)]
    pub(crate) fn from_ticks(ticks: u64) -> Span {
        Span(ticks)
    }

    pub fn as_nanos(self) -> u64 {
        ticks_to_nanos(self.0)
    }

    pub fn as_duration(self) -> Duration {
        Duration::from_nanos(self.as_nanos())
    }
}

impl From<Duration> for Span {
    fn from(d: Duration) -> Span {
        Span(nanos_to_ticks(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
        ))
    }
}

impl Add for Span {
    type Output = Span;

    /// Saturating: a sum of spans never wraps to a short one.
    #[inline]
    fn add(self, other: Span) -> Span {
        Span(self.0.saturating_add(other.0))
    }
}

impl AddAssign for Span {
    #[inline]
    fn add_assign(&mut self, other: Span) {
        *self = *self + other;
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
        let measured = start.until(end).as_duration();
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
            Span::ZERO,
            "a mark before is zero, not negative"
        );
    }

    #[test]
    fn durations_and_spans_convert_both_ways() {
        for ns in [0u64, 1_000, 500_000, 1_000_000_000, 3_600_000_000_000] {
            let span = Span::from(Duration::from_nanos(ns));
            let back = span.as_nanos();
            // Within a tick (well under a nanosecond on a GHz counter) plus the scale's
            // rounding, a few parts per billion.
            assert!(back.abs_diff(ns) <= 1 + ns / 100_000_000, "{ns} -> {back}");
        }
        // Order is kept: a duration past a bound is not a span at or below it.
        let bound = Span::from(Duration::from_millis(1));
        assert!(Span::from(Duration::from_nanos(1_000_001)) > bound);
        assert_eq!(Span::from(Duration::MAX), Span(u64::MAX), "saturates");
        assert_eq!(Span(u64::MAX) + Span(5), Span(u64::MAX), "saturates");
    }

    #[test]
    fn the_counter_is_used_only_where_the_kernel_uses_it() {
        assert_eq!(
            uses_tsc(),
            cfg!(target_arch = "x86_64") && kernel_keeps_time_with_tsc()
        );
    }
}
