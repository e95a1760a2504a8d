//! History: what is kept of every run per project and branch after its raw data expires (its
//! summary), the trends over calendar buckets, and the down-sampling of old runs into months.
//!
//! A run's summary holds its totals (coverage counts, tests by status, durations, memory).
//! Summaries are kept in full for `--history-full-for` (90 days by default); after that the
//! runs of each whole calendar month are folded into one [`MonthRecord`] per project and
//! branch, which keeps, for every [metric](METRICS), the number of runs that had it, its
//! least, greatest and mean value, and the latest run's value. Folding is associative, so a
//! month folded in several passes (or a trend bucket made of a month record and raw runs)
//! gives the same figures as one pass.
//!
//! Buckets are calendar days, ISO weeks (from Monday) and months, in UTC.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

use crate::persist::{MonthRecord, StatRecord, SummaryRecord};

/// A trend's bucket width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Day,
    Week,
    Month,
}

impl Bucket {
    /// The first millisecond of the bucket that holds `ms`.
    pub fn start_of(self, ms: u64) -> u64 {
        let date = date_of(ms);
        let start = match self {
            Bucket::Day => date,
            Bucket::Week => {
                let back = i64::from(date.weekday().to_monday_zero_offset());
                date.checked_sub(back.days()).unwrap_or(date)
            }
            Bucket::Month => date.first_of_month(),
        };
        ms_of(start)
    }

    /// The first millisecond after the bucket that starts at `start`.
    pub fn end_of(self, start: u64) -> u64 {
        let date = date_of(start);
        let next = match self {
            Bucket::Day => date.checked_add(1.day()),
            Bucket::Week => date.checked_add(1.week()),
            Bucket::Month => date.checked_add(1.month()),
        };
        next.map_or(u64::MAX, ms_of)
    }
}

fn date_of(ms: u64) -> Date {
    let ts = i64::try_from(ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .unwrap_or(Timestamp::MAX);
    ts.to_zoned(TimeZone::UTC).date()
}

fn ms_of(date: Date) -> u64 {
    date.to_zoned(TimeZone::UTC)
        .map(|z| z.timestamp().as_millisecond())
        .map_or(u64::MAX, |ms| u64::try_from(ms).unwrap_or(0))
}

/// `YYYY-MM-DD` of a bucket's start.
pub fn day_label(ms: u64) -> String {
    date_of(ms).to_string()
}

/// Runs created before this are folded into months: the start of the month that holds
/// `now - full_for`, so that only whole months are down-sampled and a month is never part
/// raw, part folded.
pub fn fold_before(now_ms: u64, full_for: Duration) -> u64 {
    let age = u64::try_from(full_for.as_millis()).unwrap_or(u64::MAX);
    Bucket::Month.start_of(now_ms.saturating_sub(age))
}

/// The metrics of a run's summary that history keeps and trends show, with how each is read
/// from a summary (`None`: the run did not have it, e.g. no branches, no test results).
/// Rates are percentages of the run's own counts: a month's mean rate is the mean of its
/// runs' rates, not a rate of summed counts.
pub const METRICS: &[(&str, Reader)] = &[
    ("line_rate", |s| rate(s.lines_covered, s.lines)),
    ("branch_rate", |s| rate(s.branches_taken, s.branches)),
    ("function_rate", |s| rate(s.functions_hit, s.functions)),
    ("files", |s| Some(s.files as f64)),
    ("lines", |s| Some(s.lines as f64)),
    ("lines_covered", |s| Some(s.lines_covered as f64)),
    ("branches", |s| Some(s.branches as f64)),
    ("branches_taken", |s| Some(s.branches_taken as f64)),
    ("functions", |s| Some(s.functions as f64)),
    ("functions_hit", |s| Some(s.functions_hit as f64)),
    ("shards", |s| Some(s.shards as f64)),
    ("tests_passed", |s| tests(s, s.tests_passed)),
    ("tests_failed", |s| tests(s, s.tests_failed)),
    ("tests_skipped", |s| tests(s, s.tests_skipped)),
    ("tests_errored", |s| tests(s, s.tests_errored)),
    ("tests_incomplete", |s| tests(s, s.tests_incomplete)),
    ("assertions", |s| s.assertions.map(|n| n as f64)),
    ("test_seconds", |s| {
        s.test_duration_ms.map(|ms| ms as f64 / 1e3)
    }),
    ("slowest_shard_seconds", |s| {
        s.slowest_shard_ms.map(|ms| ms as f64 / 1e3)
    }),
    ("peak_memory_bytes", |s| {
        s.peak_memory_bytes.map(|b| b as f64)
    }),
];

/// How a metric is read from a run's summary.
pub type Reader = fn(&SummaryRecord) -> Option<f64>;

fn rate(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 * 100.0 / whole as f64)
}

fn tests(s: &SummaryRecord, n: u64) -> Option<f64> {
    s.tests_reported.then_some(n as f64)
}

/// A metric over runs: how many had it, its least, greatest and summed value, and the value
/// of the latest run (by creation time) with that run's time.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Stat {
    pub n: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub last: f64,
    pub last_at_ms: u64,
}

impl Stat {
    fn of(value: f64, at_ms: u64) -> Stat {
        Stat {
            n: 1,
            min: value,
            max: value,
            sum: value,
            last: value,
            last_at_ms: at_ms,
        }
    }

    pub fn mean(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.sum / self.n as f64
        }
    }

    /// Folds `other` in: counts and sums add, extremes widen, the later `last` wins (on a
    /// tie, the greater value, so that the order of folding never matters).
    pub fn merge(&mut self, other: &Stat) {
        if other.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = *other;
            return;
        }
        self.n += other.n;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum += other.sum;
        if (other.last_at_ms, other.last) > (self.last_at_ms, self.last) {
            self.last = other.last;
            self.last_at_ms = other.last_at_ms;
        }
    }
}

impl From<&StatRecord> for Stat {
    fn from(r: &StatRecord) -> Stat {
        Stat {
            n: r.n,
            min: r.min,
            max: r.max,
            sum: r.sum,
            last: r.last,
            last_at_ms: r.last_at_ms,
        }
    }
}

impl From<Stat> for StatRecord {
    fn from(s: Stat) -> StatRecord {
        StatRecord {
            n: s.n,
            min: s.min,
            max: s.max,
            sum: s.sum,
            last: s.last,
            last_at_ms: s.last_at_ms,
        }
    }
}

/// Folds one run's summary into its bucket's figures.
fn fold_run(runs: &mut u64, incomplete: &mut u64, metrics: &mut Metrics, s: &SummaryRecord) {
    if s.completed_at_ms.is_none() {
        *incomplete += 1;
        return;
    }
    *runs += 1;
    for (name, read) in METRICS {
        if let Some(v) = read(s) {
            metrics
                .entry((*name).to_owned())
                .or_default()
                .merge(&Stat::of(v, s.created_at_ms));
        }
    }
}

type Metrics = BTreeMap<String, Stat>;

/// Folds summaries into the month records `existing` gives (an absent month starts empty).
/// Returns the months changed.
pub fn fold_into_months(
    summaries: &[SummaryRecord],
    mut existing: impl FnMut(&str, &str, u64) -> Option<MonthRecord>,
) -> Vec<MonthRecord> {
    let mut months: BTreeMap<(String, String, u64), MonthRecord> = BTreeMap::new();
    for s in summaries {
        let start = Bucket::Month.start_of(s.created_at_ms);
        let key = (s.project.clone(), s.branch.clone(), start);
        let month = months.entry(key).or_insert_with(|| {
            existing(&s.project, &s.branch, start).unwrap_or_else(|| MonthRecord {
                project: s.project.clone(),
                branch: s.branch.clone(),
                month_start_ms: start,
                ..MonthRecord::default()
            })
        });
        let mut metrics: Metrics = month
            .metrics
            .iter()
            .map(|(k, v)| (k.clone(), v.into()))
            .collect();
        fold_run(&mut month.runs, &mut month.incomplete_runs, &mut metrics, s);
        month.metrics = metrics.into_iter().map(|(k, v)| (k, v.into())).collect();
    }
    months.into_values().collect()
}

/// One bucket of a trend.
#[derive(Debug, Clone, PartialEq)]
pub struct TrendBucket {
    pub start_ms: u64,
    pub end_ms: u64,
    /// Complete runs in the bucket; the metrics are theirs.
    pub runs: u64,
    /// Runs that never completed (left out of the metrics).
    pub incomplete_runs: u64,
    /// A down-sampled month: it stands for every finer bucket of its month.
    pub down_sampled: bool,
    pub metrics: BTreeMap<String, Stat>,
}

/// The trend of `runs` (summaries kept in full) and `months` (down-sampled), in buckets of
/// `bucket`, oldest first. A down-sampled month is one bucket whatever the width asked: its
/// runs cannot be split finer. Months of several branches (a query over a project) fold
/// together.
pub fn trend(bucket: Bucket, runs: &[SummaryRecord], months: &[MonthRecord]) -> Vec<TrendBucket> {
    let mut out: BTreeMap<(u64, bool), TrendBucket> = BTreeMap::new();
    for m in months {
        let b = out
            .entry((m.month_start_ms, true))
            .or_insert_with(|| TrendBucket {
                start_ms: m.month_start_ms,
                end_ms: Bucket::Month.end_of(m.month_start_ms),
                runs: 0,
                incomplete_runs: 0,
                down_sampled: true,
                metrics: BTreeMap::new(),
            });
        b.runs += m.runs;
        b.incomplete_runs += m.incomplete_runs;
        for (name, stat) in &m.metrics {
            b.metrics
                .entry(name.clone())
                .or_default()
                .merge(&stat.into());
        }
    }
    for s in runs {
        let start = bucket.start_of(s.created_at_ms);
        let b = out.entry((start, false)).or_insert_with(|| TrendBucket {
            start_ms: start,
            end_ms: bucket.end_of(start),
            runs: 0,
            incomplete_runs: 0,
            down_sampled: false,
            metrics: BTreeMap::new(),
        });
        fold_run(&mut b.runs, &mut b.incomplete_runs, &mut b.metrics, s);
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-03-04T05:06:07Z (a Wednesday).
    const WED: u64 = 1_772_600_767_000;

    #[test]
    fn buckets_are_utc_days_iso_weeks_and_months() {
        assert_eq!(day_label(Bucket::Day.start_of(WED)), "2026-03-04");
        assert_eq!(day_label(Bucket::Week.start_of(WED)), "2026-03-02");
        assert_eq!(day_label(Bucket::Month.start_of(WED)), "2026-03-01");
        let week = Bucket::Week.start_of(WED);
        assert_eq!(Bucket::Week.end_of(week) - week, 7 * 86_400_000);
        assert_eq!(
            day_label(Bucket::Month.end_of(Bucket::Month.start_of(WED))),
            "2026-04-01"
        );
        // A Monday starts its own week; a Sunday belongs to the week before.
        let monday = Bucket::Day.start_of(WED) - 2 * 86_400_000;
        assert_eq!(Bucket::Week.start_of(monday), monday);
        assert_eq!(Bucket::Week.start_of(monday - 1), monday - 7 * 86_400_000);
        // 90 days before 2026-06-10 is in March: runs from before March are folded.
        let june = WED + 98 * 86_400_000;
        assert_eq!(
            day_label(fold_before(june, Duration::from_secs(90 * 86_400))),
            "2026-03-01"
        );
    }

    fn run(at: u64, covered: u64, failed: Option<u64>) -> SummaryRecord {
        SummaryRecord {
            run_id: format!("r{at}"),
            project: "acme/shop".into(),
            branch: "main".into(),
            created_at_ms: at,
            completed_at_ms: Some(at + 1),
            lines: 200,
            lines_covered: covered,
            tests_reported: failed.is_some(),
            tests_failed: failed.unwrap_or(0),
            ..SummaryRecord::default()
        }
    }

    #[test]
    fn months_keep_counts_extremes_means_and_the_last_value() {
        let day = 86_400_000;
        let runs = [
            run(WED, 100, Some(2)),
            run(WED + day, 150, None),
            run(WED + 2 * day, 120, Some(0)),
            SummaryRecord {
                completed_at_ms: None,
                ..run(WED + 3 * day, 10, Some(9))
            },
        ];
        let months = fold_into_months(&runs, |_, _, _| None);
        assert_eq!(months.len(), 1);
        let m = &months[0];
        assert_eq!((m.runs, m.incomplete_runs), (3, 1));
        let rate = Stat::from(&m.metrics["line_rate"]);
        assert_eq!((rate.n, rate.min, rate.max), (3, 50.0, 75.0));
        assert_eq!(rate.mean(), 61.666_666_666_666_664);
        assert_eq!((rate.last, rate.last_at_ms), (60.0, WED + 2 * day));
        // Only the runs that reported tests count for test metrics.
        let failed = Stat::from(&m.metrics["tests_failed"]);
        assert_eq!((failed.n, failed.max, failed.last), (2, 2.0, 0.0));
        assert!(!m.metrics.contains_key("assertions"));

        // Folding in two passes, in either order, gives the same month.
        for (first, second) in [(&runs[..2], &runs[2..]), (&runs[2..], &runs[..2])] {
            let part = fold_into_months(first, |_, _, _| None);
            let whole = fold_into_months(second, |_, _, _| Some(part[0].clone()));
            assert_eq!(whole, months);
        }
    }

    #[test]
    fn a_trend_puts_down_sampled_months_before_finer_buckets() {
        let day = 86_400_000;
        let old = fold_into_months(&[run(WED - 40 * day, 20, None)], |_, _, _| None);
        let runs = [
            run(WED, 100, None),
            run(WED + day, 120, None),
            run(WED + 7 * day, 140, None),
        ];
        let weeks = trend(Bucket::Week, &runs, &old);
        let got: Vec<_> = weeks
            .iter()
            .map(|b| {
                (
                    day_label(b.start_ms),
                    b.runs,
                    b.down_sampled,
                    b.metrics["lines_covered"].last,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("2026-01-01".to_owned(), 1, true, 20.0),
                ("2026-03-02".to_owned(), 2, false, 120.0),
                ("2026-03-09".to_owned(), 1, false, 140.0),
            ]
        );
        let months = trend(Bucket::Month, &runs, &[]);
        assert_eq!(months.len(), 1);
        assert_eq!(months[0].metrics["lines_covered"].sum, 360.0);
    }
}
