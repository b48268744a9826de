//! A duration histogram family tuned for the hot path, optionally exported a second time as a
//! request counter.
//!
//! Why not `prometheus::HistogramVec` + `IntCounterVec`: recording one request there costs a
//! counter increment plus a histogram observation (shard swap, bucket, CAS loop on the `f64`
//! sum, count), about 75 ns on the reference machine. Here a series is a row of per-bucket
//! counters and an integer nanosecond sum, and `<name>_total` is derived from the bucket counts
//! at scrape time, so it always equals the histogram's `_count`. The price: a scrape racing an
//! observation may see its bucket without its sum (off by one observation for one scrape),
//! which Prometheus tolerates.
//!
//! Durations arrive as [`Span`]s, in the clock's ticks: the bucket bounds are converted to ticks
//! once per family, and the sum is kept in ticks and converted to seconds at scrape time. An
//! observation converts nothing.
//!
//! Each series keeps one such row per recording thread ([`Shard`]): the first threads that
//! record (the runtime's workers) each get a row of their own, which only they write, so an
//! observation is two plain additions instead of two locked read-modify-writes (`lock xadd`,
//! about 4 ns each here, and each one drains the core's store buffer). Threads beyond those
//! share one last row and add to it atomically. A scrape sums the rows.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, RwLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto;

use crate::clock::{self, Span};

/// Counts a series keeps: the buckets of the longest bound list in use (the store's 16) and
/// `+Inf`.
const MAX_COUNTS: usize = 17;

/// Threads that get a row of their own in every series, at most: the machine's parallelism up
/// to this bound (a worker per core is the runtime's default).
const MAX_OWN_ROWS: usize = 8;

/// Rows per series: one per thread that owns one, then the shared one.
fn rows_per_cell() -> usize {
    static ROWS: OnceLock<usize> = OnceLock::new();
    *ROWS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_OWN_ROWS)
            + 1
    })
}

/// This thread's row: its index if it owns one (below [`rows_per_cell`] − 1), otherwise
/// anything at or past it. Numbers are handed out once per thread and never reused, so a row
/// has one writer for the life of the process.
#[inline]
fn thread_row() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static ROW: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
    }
    ROW.with(|row| {
        let mut n = row.get();
        if n == usize::MAX {
            n = NEXT.fetch_add(1, Relaxed);
            row.set(n);
        }
        n
    })
}

/// One row of a series: per-bucket counts (not cumulative; `+Inf` right after the last bound)
/// and the sum (in clock ticks). Aligned apart so that two threads' rows never share a cache
/// line (nor the line pair the CPU fetches together).
#[repr(align(128))]
struct Shard {
    sum_ticks: AtomicU64,
    counts: [AtomicU64; MAX_COUNTS],
}

/// One labelled series (see the module's documentation for its rows).
pub(crate) struct Cell {
    /// The family's bounds in clock ticks, shared by its series.
    bounds_ticks: Arc<[u64]>,
    shards: Box<[Shard]>,
}

impl Cell {
    /// `bounds_ticks` has fewer than [`MAX_COUNTS`] entries ([`TimedFamily::new`] checks).
    fn new(bounds_ticks: Arc<[u64]>) -> Self {
        Cell {
            bounds_ticks,
            shards: (0..rows_per_cell())
                .map(|_| Shard {
                    sum_ticks: AtomicU64::new(0),
                    counts: std::array::from_fn(|_| AtomicU64::new(0)),
                })
                .collect(),
        }
    }

    #[inline]
    pub(crate) fn observe(&self, elapsed: Span) {
        let ticks = elapsed.ticks();
        // The `le` bucket: the first bound >= ticks (`+Inf` past the end). Scanned from the
        // bottom: the bounds start at 10 µs (store) and 500 µs (requests, nodes) and most
        // observations fall in the first bucket or two, so the scan ends after a compare that
        // the CPU predicts, where a binary search pays four dependent steps every time.
        let i = self
            .bounds_ticks
            .iter()
            .position(|&b| ticks <= b)
            .unwrap_or(self.bounds_ticks.len());
        self.observe_in_row(thread_row(), i, ticks);
    }

    /// Adds one observation of `ticks` in bucket `i` to `row` ([`thread_row`]'s number).
    #[inline]
    fn observe_in_row(&self, row: usize, i: usize, ticks: u64) {
        self.add_in_row(row, i, 1, Some(ticks));
    }

    /// Adds `n` (wrapping: `u64::MAX` takes one away) to count `i` in this thread's row, with
    /// no duration: a [`RowMetric`]'s counts.
    #[inline]
    fn add(&self, i: usize, n: u64) {
        self.add_in_row(thread_row(), i, n, None);
    }

    #[inline]
    fn add_in_row(&self, row: usize, i: usize, n: u64, ticks: Option<u64>) {
        let shared = self.shards.len() - 1;
        if row < shared {
            // This thread is the row's only writer: a load and a store, no locked instruction.
            let own = &self.shards[row];
            let add = |a: &AtomicU64, v: u64| a.store(a.load(Relaxed).wrapping_add(v), Relaxed);
            add(&own.counts[i], n);
            if let Some(t) = ticks {
                add(&own.sum_ticks, t);
            }
        } else {
            let all = &self.shards[shared];
            all.counts[i].fetch_add(n, Relaxed);
            if let Some(t) = ticks {
                all.sum_ticks.fetch_add(t, Relaxed);
            }
        }
    }

    /// Bucket `i`'s count (not cumulative) over every row.
    fn count(&self, i: usize) -> u64 {
        self.shards
            .iter()
            .map(|s| s.counts[i].load(Relaxed))
            .fold(0, u64::wrapping_add)
    }

    fn sum_ns(&self) -> u64 {
        clock::ticks_to_nanos(
            self.shards
                .iter()
                .map(|s| s.sum_ticks.load(Relaxed))
                .fold(0, u64::wrapping_add),
        )
    }
}

struct Series {
    labels: Vec<proto::LabelPair>,
    cell: Arc<Cell>,
}

struct Inner {
    counter: Option<Desc>,
    histogram: Desc,
    label_names: &'static [&'static str],
    bounds_ns: &'static [u64],
    /// `bounds_ns` in clock ticks, for the series' observations.
    bounds_ticks: Arc<[u64]>,
    series: RwLock<Table>,
}

#[derive(Default)]
struct Table {
    by_values: HashMap<Box<[Box<str>]>, Arc<Cell>>,
    rows: Vec<Series>,
}

/// A registered family; clones share the series.
#[derive(Clone)]
pub(crate) struct TimedFamily(Arc<Inner>);

pub(crate) struct FamilyDef {
    /// `Some((name, help))` to also export the count as a counter.
    pub counter: Option<(&'static str, &'static str)>,
    pub histogram: (&'static str, &'static str),
    pub label_names: &'static [&'static str],
    pub bounds_ns: &'static [u64],
}

impl TimedFamily {
    pub(crate) fn new(def: FamilyDef) -> prometheus::Result<Self> {
        // Checked when the family is defined (at start-up), not when its first series is made.
        assert!(
            def.bounds_ns.len() < MAX_COUNTS,
            "a histogram has at most {} bounds",
            MAX_COUNTS - 1
        );
        let labels: Vec<String> = def.label_names.iter().map(|l| l.to_string()).collect();
        let desc = |(name, help): (&str, &str)| {
            Desc::new(name.into(), help.into(), labels.clone(), HashMap::new())
        };
        Ok(TimedFamily(Arc::new(Inner {
            counter: def.counter.map(desc).transpose()?,
            histogram: desc(def.histogram)?,
            label_names: def.label_names,
            bounds_ns: def.bounds_ns,
            bounds_ticks: def
                .bounds_ns
                .iter()
                .map(|&b| clock::nanos_to_ticks(b))
                .collect(),
            series: RwLock::new(Table::default()),
        })))
    }

    /// The series for `values` (one per label name, in order), created on first use. Cold path:
    /// call it at build time and keep the cell.
    pub(crate) fn cell(&self, values: &[&str]) -> Arc<Cell> {
        debug_assert_eq!(values.len(), self.0.label_names.len());
        let key: Box<[Box<str>]> = values.iter().map(|v| Box::from(*v)).collect();
        if let Some(c) = self.read().by_values.get(&key) {
            return c.clone();
        }
        let mut table = self.0.series.write().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = table.by_values.get(&key) {
            return c.clone();
        }
        let cell = Arc::new(Cell::new(self.0.bounds_ticks.clone()));
        let mut labels: Vec<proto::LabelPair> = self
            .0
            .label_names
            .iter()
            .zip(values)
            .map(|(name, value)| label_pair(name, value))
            .collect();
        labels.sort_by(|a, b| a.name().cmp(b.name()));
        table.by_values.insert(key, cell.clone());
        table.rows.push(Series {
            labels,
            cell: cell.clone(),
        });
        cell
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.0.series.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl Collector for TimedFamily {
    fn desc(&self) -> Vec<&Desc> {
        self.0.counter.iter().chain([&self.0.histogram]).collect()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let table = self.read();
        if table.rows.is_empty() {
            return Vec::new();
        }
        let bounds_s: Vec<f64> = self.0.bounds_ns.iter().map(|&b| b as f64 / 1e9).collect();
        let mut counters = Vec::with_capacity(table.rows.len());
        let mut histograms = Vec::with_capacity(table.rows.len());
        for row in &table.rows {
            let mut buckets = Vec::with_capacity(bounds_s.len());
            let mut cumulative = 0u64;
            for (i, upper) in bounds_s.iter().enumerate() {
                cumulative += row.cell.count(i);
                let mut b = proto::Bucket::default();
                b.set_upper_bound(*upper);
                b.set_cumulative_count(cumulative);
                buckets.push(b);
            }
            let count = cumulative + row.cell.count(bounds_s.len());
            let mut h = proto::Histogram::default();
            h.set_bucket(buckets);
            h.set_sample_count(count);
            h.set_sample_sum(row.cell.sum_ns() as f64 / 1e9);
            let mut m = proto::Metric::from_label(row.labels.clone());
            m.set_histogram(h);
            histograms.push(m);
            if self.0.counter.is_some() {
                let mut c = proto::Counter::default();
                c.set_value(count as f64);
                let mut m = proto::Metric::from_label(row.labels.clone());
                m.set_counter(c);
                counters.push(m);
            }
        }
        let mut out = vec![family(
            &self.0.histogram,
            proto::MetricType::HISTOGRAM,
            histograms,
        )];
        if let Some(desc) = &self.0.counter {
            out.push(family(desc, proto::MetricType::COUNTER, counters));
        }
        out
    }
}

/// A counter family over a closed list of label values, or a gauge, counted in per-thread rows
/// as a [`Cell`] counts its buckets: a change is a load and a store in the recording thread's
/// own row, where a `prometheus` counter or gauge is one atomic that every worker writes (on
/// the refresh grant, three such lines passed between the two vCPUs on every request: the
/// outcome, the tokens issued and the requests in flight). A scrape sums the rows.
#[derive(Clone)]
pub(crate) struct RowMetric(Arc<RowInner>);

struct RowInner {
    desc: Desc,
    kind: proto::MetricType,
    /// The label and its values (one count each), or `None` for a single unlabelled value.
    label: Option<(&'static str, &'static [&'static str])>,
    cell: Cell,
}

impl RowMetric {
    /// `gateway_..._total{label}`, one count per value (at most [`MAX_COUNTS`]).
    pub(crate) fn counter(
        name: &str,
        help: &str,
        label: &'static str,
        values: &'static [&'static str],
    ) -> prometheus::Result<Self> {
        assert!(values.len() <= MAX_COUNTS, "at most {MAX_COUNTS} values");
        let desc = Desc::new(name.into(), help.into(), vec![label.into()], HashMap::new())?;
        Ok(Self::new(
            desc,
            proto::MetricType::COUNTER,
            Some((label, values)),
        ))
    }

    /// One unlabelled gauge, moved by [`RowMetric::add`] with index 0.
    pub(crate) fn gauge(name: &str, help: &str) -> prometheus::Result<Self> {
        let desc = Desc::new(name.into(), help.into(), Vec::new(), HashMap::new())?;
        Ok(Self::new(desc, proto::MetricType::GAUGE, None))
    }

    fn new(
        desc: Desc,
        kind: proto::MetricType,
        label: Option<(&'static str, &'static [&'static str])>,
    ) -> Self {
        RowMetric(Arc::new(RowInner {
            desc,
            kind,
            label,
            cell: Cell::new(Arc::new([])),
        }))
    }

    /// Adds `n` to the count of value `i` (a gauge: index 0, `n` may be negative).
    #[inline]
    pub(crate) fn add(&self, i: usize, n: i64) {
        self.0.cell.add(i, n as u64);
    }

    /// The count of value `i`, over every row.
    pub(crate) fn get(&self, i: usize) -> i64 {
        self.0.cell.count(i) as i64
    }
}

impl Collector for RowMetric {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.0.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let metric = |i: usize, labels: Vec<proto::LabelPair>| {
            let mut m = proto::Metric::from_label(labels);
            let value = self.get(i) as f64;
            if self.0.kind == proto::MetricType::GAUGE {
                let mut g = proto::Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            } else {
                let mut c = proto::Counter::default();
                c.set_value(value);
                m.set_counter(c);
            }
            m
        };
        let metrics = match self.0.label {
            None => vec![metric(0, Vec::new())],
            Some((name, values)) => values
                .iter()
                .enumerate()
                .map(|(i, value)| metric(i, vec![label_pair(name, value)]))
                .collect(),
        };
        vec![family(&self.0.desc, self.0.kind, metrics)]
    }
}

/// One exported label.
fn label_pair(name: &str, value: &str) -> proto::LabelPair {
    let mut pair = proto::LabelPair::default();
    pair.set_name(name.to_owned());
    pair.set_value(value.to_owned());
    pair
}

/// One exported family: `desc`'s name and help over `metrics` of `kind`.
fn family(
    desc: &Desc,
    kind: proto::MetricType,
    metrics: Vec<proto::Metric>,
) -> proto::MetricFamily {
    let mut mf = proto::MetricFamily::default();
    mf.set_name(desc.fq_name.clone());
    mf.set_help(desc.help.clone());
    mf.set_field_type(kind);
    mf.set_metric(metrics);
    mf
}

/// Seconds -> nanoseconds for bucket bounds written in seconds.
pub(crate) const fn ns(seconds: f64) -> u64 {
    (seconds * 1e9) as u64
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    static BOUNDS: [u64; 3] = [ns(0.001), ns(0.01), ns(0.1)];

    /// A family over [`BOUNDS`] with one label, exported as a histogram and a counter.
    fn counted(total: &'static str, seconds: &'static str) -> TimedFamily {
        TimedFamily::new(FamilyDef {
            counter: Some((total, "help")),
            histogram: (seconds, "help"),
            label_names: &["a"],
            bounds_ns: &BOUNDS,
        })
        .unwrap()
    }

    #[test]
    fn buckets_are_le_and_cumulative() {
        let f = counted("t_total", "t_seconds");
        let cell = f.cell(&["x"]);
        cell.observe(Duration::from_millis(1).into()); // le=0.001 exactly
        cell.observe(Duration::from_nanos(1_000_001).into()); // just past it: le=0.01
        cell.observe(Duration::from_millis(5).into());
        cell.observe(Duration::from_secs(3).into()); // +Inf
        assert!(Arc::ptr_eq(&cell, &f.cell(&["x"])));
        let mfs = f.collect();
        let h = mfs[0].get_metric()[0].get_histogram();
        let counts: Vec<u64> = h
            .get_bucket()
            .iter()
            .map(|b| b.cumulative_count())
            .collect();
        assert_eq!(counts, [1, 3, 3]);
        assert_eq!(h.get_sample_count(), 4);
        // The sum is kept in clock ticks: each observation is rounded to a tick.
        assert!((h.get_sample_sum() - 3.007_000_001).abs() < 1e-8);
        assert_eq!(mfs[1].get_metric()[0].get_counter().get_value(), 4.0);
    }

    #[test]
    fn threads_with_rows_of_their_own_and_threads_sharing_one_lose_no_observation() {
        let f = counted("threads_total", "threads_seconds");
        let cell = f.cell(&["x"]);
        // More threads than rows, all recording at once: thread t writes row t, so the
        // threads past the owned rows share the last one, where a plain addition would lose
        // counts. (Which row a thread gets is the process's business, so the test names it.)
        let threads = rows_per_cell() * 3;
        let per_thread = 20_000u64;
        let five_ms = Span::from(Duration::from_millis(5)).ticks();
        std::thread::scope(|s| {
            for t in 0..threads {
                let cell = &cell;
                s.spawn(move || {
                    for k in 0..per_thread {
                        // One tick and 5 ms in turn: buckets 0 (le 1 ms) and 1 (le 10 ms).
                        if (k + t as u64).is_multiple_of(2) {
                            cell.observe_in_row(t, 0, 1);
                        } else {
                            cell.observe_in_row(t, 1, five_ms);
                        }
                    }
                });
            }
        });
        // And once through this thread's own number, alone: a spawned thread's number could
        // be one of the rows named above.
        cell.observe(Span::from_ticks(1));
        let total = threads as u64 * per_thread + 1;
        let mfs = f.collect();
        let h = mfs[0].get_metric()[0].get_histogram();
        assert_eq!(h.get_sample_count(), total);
        let small = threads as u64 * per_thread / 2 + 1;
        assert_eq!(h.get_bucket()[0].cumulative_count(), small);
        assert_eq!(h.get_bucket()[1].cumulative_count(), total);
        assert_eq!(h.get_bucket()[2].cumulative_count(), total);
        let want_ticks = small + (total - small) * five_ms;
        let want_sum = clock::ticks_to_nanos(want_ticks) as f64 / 1e9;
        assert!(
            (h.get_sample_sum() - want_sum).abs() < 1e-9,
            "{}",
            h.get_sample_sum()
        );
        assert_eq!(
            mfs[1].get_metric()[0].get_counter().get_value(),
            total as f64
        );
        // Every owned row holds its one thread's observations.
        for row in &cell.shards[..cell.shards.len() - 1] {
            let n: u64 = row.counts.iter().map(|c| c.load(Relaxed)).sum();
            assert!(n >= per_thread, "{n}");
        }
    }

    #[test]
    fn a_thread_keeps_its_row_number_and_no_two_threads_share_one() {
        let mine = thread_row();
        assert_eq!(thread_row(), mine);
        let others: Vec<usize> = (0..4)
            .map(|_| std::thread::spawn(thread_row).join().unwrap())
            .collect();
        let mut all = others.clone();
        all.push(mine);
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 5, "{others:?} and {mine}");
    }

    #[test]
    fn the_longest_bound_list_has_its_inf_bucket() {
        static LONG: [u64; MAX_COUNTS - 1] = {
            let mut out = [0; MAX_COUNTS - 1];
            let mut i = 0;
            while i < out.len() {
                out[i] = (i as u64 + 1) * 1000;
                i += 1;
            }
            out
        };
        let f = TimedFamily::new(FamilyDef {
            counter: None,
            histogram: ("long_seconds", "help"),
            label_names: &["a"],
            bounds_ns: &LONG,
        })
        .unwrap();
        let cell = f.cell(&["x"]);
        cell.observe(Duration::from_nanos(LONG[LONG.len() - 1] + 1).into()); // +Inf
        cell.observe(Duration::from_nanos(0).into());
        let mfs = f.collect();
        let h = mfs[0].get_metric()[0].get_histogram();
        let buckets = h.get_bucket();
        assert_eq!(buckets.len(), LONG.len());
        assert!(buckets.iter().all(|b| b.cumulative_count() == 1));
        assert_eq!(h.get_sample_count(), 2);
    }

    #[test]
    fn row_counters_and_gauges_sum_every_threads_row() {
        static VALUES: [&str; 3] = ["ok", "invalid_grant", "error"];
        let counter = RowMetric::counter("t_total", "help", "outcome", &VALUES).unwrap();
        let gauge = RowMetric::gauge("t_in_flight", "help").unwrap();
        // More threads than owned rows, so that some share the last row; each gauge unit is
        // taken up on one thread and put down on another, as a request that moved would.
        let threads = rows_per_cell() * 2;
        let per_thread = 10_000i64;
        std::thread::scope(|s| {
            for t in 0..threads {
                let (counter, gauge) = (&counter, &gauge);
                s.spawn(move || {
                    for k in 0..per_thread {
                        counter.add((t + k as usize) % 3, 1);
                        gauge.add(0, if t % 2 == 0 { 1 } else { -1 });
                    }
                });
            }
        });
        gauge.add(0, 2);
        let total: i64 = (0..3).map(|i| counter.get(i)).sum();
        assert_eq!(total, threads as i64 * per_thread);
        assert!((0..3).all(|i| counter.get(i) > 0));
        assert_eq!(gauge.get(0), 2, "ups and downs on different threads cancel");

        let mfs = counter.collect();
        assert_eq!(mfs[0].name(), "t_total");
        assert_eq!(mfs[0].get_field_type(), proto::MetricType::COUNTER);
        let metrics = mfs[0].get_metric();
        assert_eq!(metrics.len(), 3, "every value is exported, counted or not");
        assert_eq!(metrics[1].get_label()[0].name(), "outcome");
        assert_eq!(metrics[1].get_label()[0].value(), "invalid_grant");
        assert_eq!(metrics[1].get_counter().get_value(), counter.get(1) as f64);
        let g = gauge.collect();
        assert_eq!(g[0].get_field_type(), proto::MetricType::GAUGE);
        assert!(g[0].get_metric()[0].get_label().is_empty());
        assert_eq!(g[0].get_metric()[0].get_gauge().get_value(), 2.0);
    }
}
