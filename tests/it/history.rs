//! History through the daemon: every run's totals per project and branch as a trend over
//! days, weeks or months, with old months down-sampled (at start, before the daemon serves)
//! to exactly what the README says is kept: per metric the runs that had it, the least, mean
//! and greatest value, and the latest run's value.

use std::time::SystemTime;

use covd::history::{Bucket, day_label};
use covd::persist::{SqliteStore, Storage, SummaryRecord, Write};
use serde_json::Value;

use crate::cli::Served;
use crate::support::*;

const DAY: u64 = 86_400_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn old(run_id: &str, branch: &str, at: u64, covered: u64, failed: u64) -> SummaryRecord {
    SummaryRecord {
        run_id: run_id.into(),
        project: "acme/shop".into(),
        branch: branch.into(),
        created_at_ms: at,
        completed_at_ms: Some(at + 60_000),
        shards: 2,
        files: 10,
        lines: 200,
        lines_covered: covered,
        tests_reported: true,
        tests_passed: 40 - failed,
        tests_failed: failed,
        test_duration_ms: Some(90_000),
        slowest_shard_ms: Some(50_000),
        peak_memory_bytes: Some(300 << 20),
        ..SummaryRecord::default()
    }
}

fn history(served: &Served, args: &[&str]) -> Value {
    serde_json::from_str(&served.ok(&[&["history", "--format", "json"], args].concat())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_become_trends_and_old_months_are_down_sampled() {
    // Runs of a month that ended long before the default 90 days of full history, as an
    // earlier daemon kept them (one never completed), and one of another branch.
    let month = Bucket::Month.start_of(now_ms() - 200 * DAY);
    let data = tempfile::tempdir().unwrap();
    {
        let storage = SqliteStore::open(data.path()).unwrap();
        let runs = [
            old("m1", "main", month + 2 * DAY, 100, 4),
            old("m2", "main", month + 9 * DAY, 150, 0),
            old("m3", "main", month + 5 * DAY, 160, 1),
            SummaryRecord {
                completed_at_ms: None,
                ..old("m4", "main", month + 10 * DAY, 10, 30)
            },
            old("d1", "dev", month + 3 * DAY, 20, 20),
        ];
        let writes = runs
            .into_iter()
            .map(|s| Write::DeleteRun {
                run_id: s.run_id.clone(),
                summary: Some(s),
            })
            .collect();
        storage.write(writes).await.unwrap();
    }
    let served = tokio::task::block_in_place(|| Served::on(data, "127.0.0.1:0"));

    // Two runs of this week, pushed with their test results.
    for run in ["now-1", "now-2"] {
        served.ok(&[
            "open",
            "--run",
            run,
            "--shards",
            "1",
            "--project",
            "acme/shop",
            "--branch",
            "main",
        ]);
        let (info, junit) = (
            fixture("gcc-lcov/shard1.info"),
            fixture("junit/pytest-junit.xml"),
        );
        served.ok(&[
            "push",
            "--fail-on-error",
            "--run",
            run,
            "--shard",
            "0",
            info.to_str().unwrap(),
            junit.to_str().unwrap(),
        ]);
    }

    let weeks = history(
        &served,
        &["--project", "acme/shop", "--branch", "main", "--by", "week"],
    );
    let buckets = weeks["buckets"].as_array().unwrap();
    // The old month, then this week (two weeks if the pushes straddled Monday 00:00 UTC).
    assert!((2..=3).contains(&buckets.len()), "{weeks}");
    let recent: u64 = buckets[1..]
        .iter()
        .map(|b| b["runs"].as_u64().unwrap())
        .sum();
    assert_eq!(recent, 2, "{weeks}");

    // The old month: one bucket, down-sampled, whatever the width asked.
    let m = &buckets[0];
    assert_eq!(m["down_sampled"], true);
    assert_eq!(m["start"].as_str().unwrap()[..10], day_label(month));
    assert_eq!(
        (m["runs"].as_u64(), m["incomplete_runs"].as_u64()),
        (Some(3), Some(1))
    );
    let rate = &m["metrics"]["line_rate"];
    assert_eq!(rate["runs"], 3);
    assert_eq!(
        (rate["min"].as_f64(), rate["max"].as_f64()),
        (Some(50.0), Some(80.0))
    );
    assert_eq!(rate["mean"].as_f64(), Some((50.0 + 75.0 + 80.0) / 3.0));
    // The latest run of the month (m2, day 9), not the last one folded or the largest.
    assert_eq!(rate["last"].as_f64(), Some(75.0));
    let failed = &m["metrics"]["tests_failed"];
    assert_eq!(
        (
            failed["min"].as_f64(),
            failed["max"].as_f64(),
            failed["last"].as_f64()
        ),
        (Some(0.0), Some(4.0), Some(0.0))
    );
    assert_eq!(
        m["metrics"]["peak_memory_bytes"]["max"].as_f64(),
        Some(300.0 * 1048576.0)
    );
    assert_eq!(m["metrics"]["test_seconds"]["mean"].as_f64(), Some(90.0));

    // This week: the two pushed runs, with the pytest fixture's 13 test cases each.
    let w = buckets.last().unwrap();
    assert_eq!(w["down_sampled"], false);
    let passed = &w["metrics"]["tests_passed"];
    let failed = &w["metrics"]["tests_failed"];
    assert_eq!(
        (passed["runs"].as_u64(), passed["last"].as_f64()),
        (w["runs"].as_u64(), Some(6.0))
    );
    assert_eq!(failed["last"].as_f64(), Some(2.0));
    assert!(w["metrics"]["line_rate"]["last"].as_f64().unwrap() > 0.0);

    // The other branch was folded apart; over every branch, its month joins main's.
    let every = history(&served, &["--project", "acme/shop", "--by", "month"]);
    let first = &every["buckets"][0];
    assert_eq!(
        (first["runs"].as_u64(), first["incomplete_runs"].as_u64()),
        (Some(4), Some(1))
    );
    assert_eq!(first["metrics"]["line_rate"]["min"].as_f64(), Some(10.0));
    let dev = history(&served, &["--project", "acme/shop", "--branch", "dev"]);
    assert_eq!(dev["buckets"].as_array().unwrap().len(), 1);

    // --since leaves the old month out; the text table names it as a month.
    let recent = history(&served, &["--project", "acme/shop", "--since", "30days"]);
    let recent = recent["buckets"].as_array().unwrap();
    assert!(
        !recent.is_empty() && recent.iter().all(|b| b["down_sampled"] == false),
        "{recent:?}"
    );
    let out = served
        .covd(&["history", "--project", "acme/shop", "--branch", "main"])
        .output()
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains(&format!("{} (month)", &day_label(month)[..7])),
        "{table}"
    );
    assert!(
        table.lines().next().unwrap().starts_with("bucket"),
        "{table}"
    );
}

#[test]
fn a_malformed_span_is_refused() {
    let served = Served::start();
    for (args, needle) in [
        (&["--since", "yesterday-ish"][..], "neither a date"),
        (
            &["--since", "2026-02-01", "--until", "2026-01-01"][..],
            "later than --since",
        ),
    ] {
        let out = served
            .covd(&[&["history"], args].concat())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
