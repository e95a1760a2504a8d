//! `covd history`: the trend of a project's runs over days, weeks or months.

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::anyhow;
use clap::{Args, ValueEnum};
use covd::history::{Bucket, TrendBucket, day_label};
use covd::persist::HistoryQuery;
use serde_json::json;

use super::{Failure, ServerArg, bad_input, client};

#[derive(Debug, Args)]
pub(super) struct HistoryArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Runs of this project (every project when not given).
    #[arg(long, env = "COVD_PROJECT")]
    project: Option<String>,
    /// Runs of this branch (every branch when not given).
    #[arg(long, env = "COVD_BRANCH")]
    branch: Option<String>,
    /// The width of a bucket, in UTC (weeks start on Monday).
    #[arg(long, value_enum, default_value_t = By::Week)]
    by: By,
    /// Runs created since: a date (`2026-01-31`) or an age (`90days`). Default: all.
    #[arg(long, value_parser = parse_since)]
    since: Option<SystemTime>,
    /// Runs created before: a date or an age, as --since. Default: up to now.
    #[arg(long, value_parser = parse_since)]
    until: Option<SystemTime>,
    /// `text` (a table of the main metrics) or `json` (every metric of every bucket).
    #[arg(long, value_enum, default_value_t = Output::Text)]
    format: Output,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum By {
    Day,
    Week,
    Month,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn parse_since(v: &str) -> Result<SystemTime, String> {
    if let Ok(date) = v.parse::<jiff::civil::Date>() {
        let ts = date
            .to_zoned(jiff::tz::TimeZone::UTC)
            .map_err(|e| e.to_string())?
            .timestamp();
        return Ok(SystemTime::from(ts));
    }
    let age = humantime::parse_duration(v)
        .map_err(|_| format!("`{v}` is neither a date (2026-01-31) nor an age (90days)"))?;
    SystemTime::now()
        .checked_sub(age)
        .ok_or_else(|| format!("`{v}` reaches before 1970"))
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(super) async fn history(a: HistoryArgs) -> Result<ExitCode, Failure> {
    let width = match a.by {
        By::Day => Bucket::Day,
        By::Week => Bucket::Week,
        By::Month => Bucket::Month,
    };
    if let (Some(since), Some(until)) = (a.since, a.until)
        && until <= since
    {
        return Err(bad_input(anyhow!("--until must be later than --since")));
    }
    let query = HistoryQuery {
        project: a.project.clone(),
        branch: a.branch.clone(),
        since_ms: a.since.map_or(0, ms),
        until_ms: a.until.map(ms),
        limit: usize::MAX,
    };
    let buckets = client(&a.server)?.history(&query, width).await?;
    let mut out = io::stdout().lock();
    match a.format {
        Output::Text => {
            let _ = out.write_all(table(&buckets, width).as_bytes());
            let runs: u64 = buckets.iter().map(|b| b.runs).sum();
            let incomplete: u64 = buckets.iter().map(|b| b.incomplete_runs).sum();
            eprintln!(
                "{runs} complete runs in {} buckets{}",
                buckets.len(),
                if incomplete > 0 {
                    format!(" ({incomplete} incomplete runs left out of the figures)")
                } else {
                    String::new()
                }
            );
        }
        Output::Json => {
            let _ = writeln!(out, "{}", to_json(&buckets));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A bucket's name: its first day, or its month for months (`2026-01 (month)` for a month
/// that was down-sampled in a finer trend).
fn label(b: &TrendBucket, width: Bucket) -> String {
    let day = day_label(b.start_ms);
    match (width, b.down_sampled) {
        (Bucket::Month, _) => day[..7].to_owned(),
        (_, true) => format!("{} (month)", &day[..7]),
        _ => day,
    }
}

fn table(buckets: &[TrendBucket], width: Bucket) -> String {
    let mut rows = vec![[
        "bucket".to_owned(),
        "runs".to_owned(),
        "lines %".to_owned(),
        "min-max".to_owned(),
        "branches %".to_owned(),
        "tests".to_owned(),
        "failed".to_owned(),
        "test time".to_owned(),
        "peak memory".to_owned(),
    ]];
    for b in buckets {
        let mean = |name: &str, f: &dyn Fn(f64) -> String| {
            b.metrics
                .get(name)
                .map_or_else(|| "-".to_owned(), |s| f(s.mean()))
        };
        let pct = |v: f64| format!("{v:.1}");
        let count = |v: f64| format!("{v:.0}");
        let tests = [
            "tests_passed",
            "tests_failed",
            "tests_skipped",
            "tests_errored",
        ]
        .iter()
        .filter_map(|m| b.metrics.get(*m).map(|s| s.mean()))
        .reduce(|a, b| a + b);
        rows.push([
            label(b, width),
            b.runs.to_string(),
            mean("line_rate", &pct),
            b.metrics
                .get("line_rate")
                .map_or_else(|| "-".to_owned(), |s| format!("{:.1}-{:.1}", s.min, s.max)),
            mean("branch_rate", &pct),
            tests.map_or_else(|| "-".to_owned(), count),
            mean("tests_failed", &count),
            mean("test_seconds", &|s| {
                humantime::format_duration(Duration::from_secs(s.round() as u64)).to_string()
            }),
            b.metrics.get("peak_memory_bytes").map_or_else(
                || "-".to_owned(),
                |s| format!("{} MiB", (s.max / f64::from(1 << 20)).ceil()),
            ),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 0 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn to_json(buckets: &[TrendBucket]) -> serde_json::Value {
    let time = |ms: u64| {
        humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
            .to_string()
    };
    let buckets: Vec<_> = buckets
        .iter()
        .map(|b| {
            let metrics: serde_json::Map<String, serde_json::Value> = b
                .metrics
                .iter()
                .map(|(name, s)| {
                    let stat = json!({
                        "runs": s.n, "min": s.min, "mean": s.mean(), "max": s.max,
                        "last": s.last, "last_at": time(s.last_at_ms),
                    });
                    (name.clone(), stat)
                })
                .collect();
            json!({
                "start": time(b.start_ms),
                "end": time(b.end_ms),
                "runs": b.runs,
                "incomplete_runs": b.incomplete_runs,
                "down_sampled": b.down_sampled,
                "metrics": metrics,
            })
        })
        .collect();
    json!({ "buckets": buckets })
}
