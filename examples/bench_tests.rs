//! Per-test attribution at the seed's scale: shards stream one delta per test through the real
//! gRPC client into a durable daemon (a child process), then tools ask which tests covered
//! some lines.
//!
//! ```text
//! cargo run --release --example bench_tests -- --files 35000 --tests 30000 --shards 16
//! ```
//!
//! The coverage is generated as it is sent (deterministic): each test runs a long-tailed
//! number of files near one another (1 to about 200, a few dozen on average) plus ten files
//! every test runs (a framework's bootstrap), one to three slices of each. The same deltas go
//! to a second daemon without the test names, the reference. Prints, for both: the daemon's
//! CPU per (test, file) record and the ratio of the two; the daemon's peak RSS, the run's compaction included. For the named
//! run: the time from the last shard's finish to the first answer, and the latency (through
//! gRPC, one client, one question at a time) of "tests for file:line", of "tests for a
//! 50-file diff", and of the test impact and the patch coverage of the same change written as
//! a `git diff`.

#[path = "common/daemon.rs"]
mod daemon;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use covd::client::{Client, PushInput, PushOptions, PushTarget};
use covd::model::{FileBuilder, FileCoverage};
use covd::service::RunParams;
use tokio::sync::mpsc;

/// Files every test runs.
const HOT_FILES: u32 = 10;

struct Args {
    files: u32,
    tests: u32,
    shards: u32,
    line_queries: usize,
    diff_queries: usize,
}

fn args() -> Args {
    let mut a = Args {
        files: 35_000,
        tests: 30_000,
        shards: 16,
        line_queries: 2_000,
        diff_queries: 200,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut number = || it.next().and_then(|v| v.parse().ok());
        match arg.as_str() {
            "--files" => a.files = number().expect("--files N"),
            "--tests" => a.tests = number().expect("--tests N"),
            "--shards" => a.shards = number().expect("--shards N"),
            "--line-queries" => a.line_queries = number().expect("--line-queries N") as usize,
            "--diff-queries" => a.diff_queries = number().expect("--diff-queries N") as usize,
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(a.files > HOT_FILES && a.tests > 0 && a.shards > 0);
    a
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n.max(1))) as u32
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn path(file: u32) -> String {
    format!("src/module{:03}/file{file:05}.php", file / 100)
}

/// Lines in a file: 20 to 400.
fn file_len(file: u32) -> u32 {
    20 + Rng::new(u64::from(file) + 1_000_003).below(381)
}

/// What test `t` ran: per file, the covered lines.
fn test_coverage(t: u32, files: u32) -> Vec<(u32, Vec<u32>)> {
    let mut r = Rng::new(u64::from(t) + 7);
    let k = 1 + (200.0 * r.unit().powi(4)) as u32;
    let center = r.below(files);
    let mut chosen: Vec<u32> = (0..HOT_FILES).collect();
    for _ in 0..k {
        chosen.push(HOT_FILES + (center + r.below(4 * k)) % (files - HOT_FILES));
    }
    chosen.sort_unstable();
    chosen.dedup();
    chosen
        .into_iter()
        .map(|f| {
            let len = file_len(f);
            let mut lines = Vec::new();
            if f < HOT_FILES {
                lines.extend(1..=len.min(30));
            } else {
                for _ in 0..1 + r.below(3) {
                    let start = 1 + r.below(len);
                    lines.extend(start..(start + 5 + r.below(40)).min(len + 1));
                }
                lines.sort_unstable();
                lines.dedup();
            }
            (f, lines)
        })
        .collect()
}

fn delta(t: u32, files: u32) -> Vec<(String, FileCoverage)> {
    test_coverage(t, files)
        .into_iter()
        .map(|(f, lines)| {
            let mut b = FileBuilder::new();
            for l in lines {
                b.line(l, 1);
            }
            (path(f), b.build())
        })
        .collect()
}

struct Figures {
    records: u64,
    cpu: f64,
    wall: Duration,
    /// At the last finish, before questions and compaction.
    ingest_peak_kb: u64,
    peak_kb: u64,
    first_answer: Option<Duration>,
    line_latency: Vec<Duration>,
    diff_latency: Vec<Duration>,
    impact_latency: Vec<Duration>,
    patch_latency: Vec<Duration>,
}

async fn round(a: &Args, named: bool, dir: &Path) -> Figures {
    let (mut child, url, _) = daemon::spawn(Some(dir));
    let pid = child.id();
    let mut client = Client::connect(&url).unwrap();
    let ids: Vec<String> = (0..a.shards).map(|i| i.to_string()).collect();
    let params = RunParams {
        expected_shards: ids.clone(),
        ..RunParams::default()
    };
    client.open_run("tests", params).await.unwrap();
    let started = Instant::now();
    let cpu_before = daemon::cpu_seconds(pid);
    let pushes: Vec<_> = ids
        .into_iter()
        .enumerate()
        .map(|(shard, id)| {
            let mut client = Client::connect(&url).unwrap();
            let (tests, files, shards) = (a.tests, a.files, a.shards);
            tokio::spawn(async move {
                let (tx, rx) = mpsc::channel(32);
                let feeder = tokio::spawn(async move {
                    let mut records = 0u64;
                    for t in (shard as u32..tests).step_by(shards as usize) {
                        let files = delta(t, files);
                        records += files.len() as u64;
                        let input = if named {
                            let test = format!("Tests\\Module{}\\CaseTest::test{t}", t / 50);
                            PushInput::TestDelta { test, files }
                        } else {
                            PushInput::Delta(files)
                        };
                        if tx.send(input).await.is_err() {
                            break;
                        }
                    }
                    let _ = tx.send(PushInput::Done(None)).await;
                    records
                });
                let target = PushTarget {
                    run_id: "tests".into(),
                    shard_id: id,
                    attempt: 1,
                    ..PushTarget::default()
                };
                client
                    .push(&target, rx, &PushOptions::default())
                    .await
                    .unwrap();
                feeder.await.unwrap()
            })
        })
        .collect();
    let mut records = 0;
    for p in pushes {
        records += p.await.unwrap();
    }
    let wall = started.elapsed();
    let cpu = daemon::cpu_seconds(pid) - cpu_before;
    let last_finish = Instant::now();
    let ingest_peak_kb = daemon::peak_rss_kb(pid);

    let mut figures = Figures {
        records,
        cpu,
        wall,
        ingest_peak_kb,
        peak_kb: 0,
        first_answer: None,
        line_latency: Vec::new(),
        diff_latency: Vec::new(),
        impact_latency: Vec::new(),
        patch_latency: Vec::new(),
    };
    if named {
        let first = [(path(0), vec![(1, 1)])];
        let answer = client.tests_for_lines("tests", &first).await.unwrap();
        figures.first_answer = Some(last_finish.elapsed());
        assert_eq!(
            answer.tests.len() as u32,
            a.tests,
            "every test runs the hot files"
        );

        let mut r = Rng::new(42);
        for _ in 0..a.line_queries {
            let f = r.below(a.files);
            let line = 1 + r.below(file_len(f));
            let files = [(path(f), vec![(line, line)])];
            let asked = Instant::now();
            client.tests_for_lines("tests", &files).await.unwrap();
            figures.line_latency.push(asked.elapsed());
        }
        for _ in 0..a.diff_queries {
            let mut chosen: Vec<u32> = (0..50)
                .map(|_| HOT_FILES + r.below(a.files - HOT_FILES))
                .collect();
            chosen.sort_unstable();
            chosen.dedup();
            let files: Vec<(String, Vec<(u32, u32)>)> = chosen
                .into_iter()
                .map(|f| {
                    let len = file_len(f);
                    let hunks = (0..1 + r.below(3))
                        .map(|_| {
                            let first = 1 + r.below(len);
                            (first, (first + r.below(15)).min(len))
                        })
                        .collect();
                    (path(f), hunks)
                })
                .collect();
            let asked = Instant::now();
            let tests = client.tests_for_lines("tests", &files).await.unwrap();
            figures.diff_latency.push(asked.elapsed());

            // The same change as `git diff` text: test impact and patch coverage.
            let diff = unified_diff(&files);
            let asked = Instant::now();
            let impact = client
                .test_impact("tests", diff.clone(), None, None)
                .await
                .unwrap();
            figures.impact_latency.push(asked.elapsed());
            // Impact also looks at the measured lines around each replaced block.
            let selected: std::collections::HashSet<&str> =
                impact.tests.iter().map(|t| &*t.name).collect();
            assert!(tests.tests.iter().all(|t| selected.contains(&**t)));
            let asked = Instant::now();
            let patch = client.patch_coverage("tests", diff, None).await.unwrap();
            figures.patch_latency.push(asked.elapsed());
            assert!(patch.totals().1 > 0, "the changed lines are measured");
        }
        // The answers agree with the generator: a test's own line names it.
        let (f, lines) = test_coverage(a.tests / 2, a.files).pop().unwrap();
        let files = [(path(f), vec![(lines[0], lines[0])])];
        let answer = client.tests_for_lines("tests", &files).await.unwrap();
        let name = format!(
            "Tests\\Module{}\\CaseTest::test{}",
            a.tests / 2 / 50,
            a.tests / 2
        );
        assert!(
            answer.tests.iter().any(|t| **t == *name),
            "{name} covers {f}:{}",
            lines[0]
        );
    }
    // The run is compacted a moment after it completes (its merged files and each shard's
    // lines written to SQLite): the peak includes it once the daemon is idle again.
    let idle_from = Instant::now();
    loop {
        let before = daemon::cpu_seconds(pid);
        std::thread::sleep(Duration::from_millis(500));
        if daemon::cpu_seconds(pid) - before < 0.02 || idle_from.elapsed() > Duration::from_secs(60)
        {
            break;
        }
    }
    figures.peak_kb = daemon::peak_rss_kb(pid);
    let _ = child.kill();
    let _ = child.wait();
    figures
}

/// `files`' line ranges as a unified diff that replaces each range by as many new lines.
fn unified_diff(files: &[(String, Vec<(u32, u32)>)]) -> Vec<u8> {
    let mut out = String::new();
    for (path, hunks) in files {
        let mut hunks = hunks.clone();
        hunks.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::new();
        for (first, last) in hunks {
            match merged.last_mut() {
                Some(prev) if first <= prev.1 + 1 => prev.1 = prev.1.max(last),
                _ => merged.push((first, last)),
            }
        }
        out.push_str(&format!(
            "diff --git a/{path} b/{path}\n--- a/{path}\n+++ b/{path}\n"
        ));
        for (first, last) in merged {
            let n = last - first + 1;
            out.push_str(&format!("@@ -{first},{n} +{first},{n} @@\n"));
            out.extend((first..=last).map(|l| format!("-old {l}\n")));
            out.extend((first..=last).map(|l| format!("+new {l}\n")));
        }
    }
    out.into_bytes()
}

fn percentile(latencies: &[Duration], p: f64) -> Duration {
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    if daemon::serve_if_asked(|data_dir| {
        let mut settings = covd::Settings {
            data_dir,
            ..covd::Settings::default()
        };
        // The whole per-test aggregate stays in memory: what is measured.
        settings.limits.memory_budget_bytes = 8 << 30;
        settings
    }) {
        return;
    }
    tokio::runtime::Runtime::new().unwrap().block_on(bench());
}

async fn bench() {
    let a = args();
    let scratch: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-tests");
    println!(
        "data: {} files, {} tests ({} run every one of {HOT_FILES} files), {} shards, one delta \
         per test, durable daemon (SQLite in {})",
        a.files,
        a.tests,
        a.tests,
        a.shards,
        scratch.display()
    );
    let mut results = Vec::new();
    for named in [false, true] {
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).unwrap();
        results.push(round(&a, named, &scratch).await);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let (plain, named) = (&results[0], &results[1]);
    assert_eq!(plain.records, named.records);
    let per_record = |f: &Figures| f.cpu * 1e6 / f.records as f64;
    println!("(test, file) records: {}", named.records);
    for (label, f) in [("without names", plain), ("with names", named)] {
        println!(
            "{label:>14}: ingest {:.2} s wall, daemon CPU {:.2} s = {:.2} µs per record, peak RSS \
             {} MB at the last finish, {} MB once compacted",
            f.wall.as_secs_f64(),
            f.cpu,
            per_record(f),
            f.ingest_peak_kb / 1024,
            f.peak_kb / 1024
        );
    }
    println!(
        "attribution costs {:.2}× the CPU per record (target ≤ 2×); peak RSS with names, its \
         compaction included, {} MB \
         (target ≤ 1024)",
        per_record(named) / per_record(plain),
        named.peak_kb / 1024
    );
    if let Some(first) = named.first_answer {
        println!(
            "last shard finished → first tests-for answer: {}",
            ms(first)
        );
    }
    for (label, latencies, target) in [
        ("tests for file:line", &named.line_latency, "1 ms"),
        ("tests for a 50-file diff", &named.diff_latency, "20 ms"),
        (
            "test impact of a 50-file git diff",
            &named.impact_latency,
            "20 ms",
        ),
        (
            "patch coverage of a 50-file git diff",
            &named.patch_latency,
            "20 ms",
        ),
    ] {
        if latencies.is_empty() {
            continue;
        }
        println!(
            "{label} ({} questions): p50 {}, p99 {} (target ≤ {target}), max {}",
            latencies.len(),
            ms(percentile(latencies, 0.5)),
            ms(percentile(latencies, 0.99)),
            ms(*latencies.iter().max().unwrap()),
        );
    }
}
