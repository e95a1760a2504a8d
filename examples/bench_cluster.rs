//! Cluster mode's benchmark: the same run through one node and through three, in one run.
//!
//! ```text
//! cargo run --release --features cluster --example bench_cluster -- --shards 16 --files 35000
//! cargo run --release --features cluster --example bench_cluster -- --data DIR
//! ```
//!
//! Each round starts a PostgreSQL and an S3 server (moto) of its own on loopback, as the cluster
//! tests do (`tests/it/services.rs`), then N nodes (`covd serve --cluster` as child processes of
//! this executable). The run's shards are pushed concurrently, shard i to node i mod N (with the
//! others after it), while the final CI step's export already waits on node 0. Per round it
//! prints the ingest's wall time; the time from the last shard's finish to the merged LCOV on
//! disk (what CI waits for); the nodes' CPU per file record, all nodes together, and its ratio
//! to the yardstick (covd's own single-threaded LCOV parse and merge, measured in this run); the
//! nodes' peak RSS; PostgreSQL's committed transactions (all, and the publishes among them) and
//! their rate during the ingest; moto's CPU. Then whether the rounds' merged LCOV are identical.
//!
//! On a machine of few cores, the nodes, PostgreSQL, moto and the pushing clients share them:
//! the figures say what the cluster costs and what it waits for, not how far it scales.

#[allow(dead_code)]
#[path = "common/bench_data.rs"]
mod bench_data;
#[allow(dead_code)]
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/lcov_shards.rs"]
mod lcov_shards;
#[allow(dead_code)]
#[path = "../tests/it/services.rs"]
mod services;

use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use covd::client::{Client, PushOptions, PushTarget};
use covd::server::ClusterSettings;
use covd::service::RunParams;
use tokio::sync::mpsc;

use services::{Postgres, S3};

struct Args {
    shards: usize,
    files: usize,
    data: Option<PathBuf>,
    nodes: Vec<usize>,
}

fn args() -> Args {
    let mut a = Args {
        shards: 16,
        files: 5000,
        data: None,
        nodes: vec![1, 3],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--shards" => a.shards = it.next().and_then(|v| v.parse().ok()).expect("--shards N"),
            "--files" => a.files = it.next().and_then(|v| v.parse().ok()).expect("--files N"),
            "--data" => a.data = it.next().map(PathBuf::from),
            "--nodes" => {
                a.nodes = it
                    .next()
                    .expect("--nodes N,M,…")
                    .split(',')
                    .map(|n| n.parse().expect("--nodes N,M,…"))
                    .collect()
            }
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// Where the node children find the round's stores.
const ENV_POSTGRES: &str = "COVD_BENCH_POSTGRES";
const ENV_S3: &str = "COVD_BENCH_S3";

fn main() {
    if daemon::serve_if_asked(|_| covd::Settings {
        cluster: Some(ClusterSettings {
            postgres: std::env::var(ENV_POSTGRES).expect("the round's PostgreSQL"),
            object_store: "s3://covd/bench".into(),
            object_store_options: vec![
                (
                    "aws_endpoint".into(),
                    std::env::var(ENV_S3).expect("the round's S3"),
                ),
                ("aws_allow_http".into(), "true".into()),
                ("aws_access_key_id".into(), "bench".into()),
                ("aws_secret_access_key".into(), "bench".into()),
                ("aws_region".into(), "us-east-1".into()),
            ],
        }),
        ..covd::Settings::default()
    }) {
        return;
    }
    let a = args();
    let dir = a
        .data
        .clone()
        .unwrap_or_else(|| bench_data::generate(a.shards, a.files));
    let shards = lcov_shards::list(&dir);
    let bytes: u64 = shards.iter().map(|p| p.metadata().unwrap().len()).sum();
    let records: u64 = shards.iter().map(|p| lcov_shards::count_records(p)).sum();
    let yardstick =
        lcov_shards::parse_and_union(&shards[..shards.len().min(lcov_shards::YARDSTICK_SHARDS)]);
    println!(
        "data: {} shards in {}, {:.1} MB of LCOV, {records} file records",
        shards.len(),
        dir.display(),
        bytes as f64 / 1e6,
    );
    println!(
        "yardstick: {:.2} µs per file record (covd's LCOV parse + merge, one thread)",
        yardstick * 1e6
    );
    let scratch = std::env::temp_dir().join(format!("covd-bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let mut merged = Vec::new();
    println!(
        "\n{:>5}  {:>9}  {:>11}  {:>12}  {:>7}  {:>12}  {:>22}  {:>9}",
        "nodes",
        "ingest s",
        "last→LCOV s",
        "CPU/record",
        "ratio",
        "peak RSS MB",
        "PG commits (publishes)",
        "moto CPU"
    );
    for &n in &a.nodes {
        let out = scratch.join(format!("merged-{n}.info"));
        let r = round(n, &shards, &out);
        let cpu_per_record = r.cpu / records as f64;
        println!(
            "{n:>5}  {:>9.2}  {:>11.2}  {:>9.2} µs  {:>6.2}x  {:>12}  {:>8} ({:>5}), {:>4.0}/s  {:>7.1} s",
            r.ingest.as_secs_f64(),
            r.wait.as_secs_f64(),
            cpu_per_record * 1e6,
            cpu_per_record / yardstick,
            r.peak_mb
                .iter()
                .map(|m| format!("{m:.0}"))
                .collect::<Vec<_>>()
                .join("/"),
            r.commits,
            r.publishes,
            r.commits as f64 / r.ingest.as_secs_f64(),
            r.moto_cpu,
        );
        merged.push((n, out, r.totals));
    }
    if let Some((first, first_path, totals)) = merged.first() {
        let want = std::fs::read(first_path).unwrap();
        for (n, path, t) in &merged[1..] {
            let same = std::fs::read(path).unwrap() == want;
            println!(
                "merged LCOV of {n} nodes identical to {first} node(s)': {}",
                if same { "yes" } else { "NO" }
            );
            assert!(same && t == totals, "the rounds' merged coverage differs");
        }
        println!(
            "merged: {} files, {} of {} lines covered",
            totals.files, totals.lines_covered, totals.lines
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

struct Round {
    ingest: Duration,
    wait: Duration,
    /// CPU seconds of every node, from the first push to the merged LCOV on disk.
    cpu: f64,
    peak_mb: Vec<f64>,
    commits: i64,
    publishes: i64,
    moto_cpu: f64,
    totals: covd::model::Totals,
}

/// Kills the nodes when the round ends, however it ends.
struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn round(n: usize, shards: &[PathBuf], out: &std::path::Path) -> Round {
    let (pg, s3) = (Postgres::start(), S3::start());
    let env = [
        (ENV_POSTGRES, pg.url.as_str()),
        (ENV_S3, s3.endpoint.as_str()),
    ];
    let mut urls = Vec::new();
    let mut nodes = Nodes(Vec::new());
    for _ in 0..n {
        let (child, url, _) = daemon::spawn_with(None, &env);
        nodes.0.push(child);
        urls.push(url);
    }
    let pids: Vec<u32> = nodes.0.iter().map(Child::id).collect();
    let cpu = || pids.iter().map(|p| daemon::cpu_seconds(*p)).sum::<f64>();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (catalogue, connection) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let commits = async || -> i64 {
            // An idle backend reports its counts within 10 s (PostgreSQL 15's
            // PGSTAT_IDLE_INTERVAL).
            tokio::time::sleep(Duration::from_secs(11)).await;
            catalogue
                .query_one(
                    "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
                    &[],
                )
                .await
                .unwrap()
                .get(0)
        };
        let ids: Vec<String> = (0..shards.len()).map(|i| i.to_string()).collect();
        let mut client = Client::connect(&urls[0]).unwrap();
        client
            .open_run(
                "bench",
                RunParams {
                    expected_shards: ids.clone(),
                    ..RunParams::default()
                },
            )
            .await
            .unwrap();
        let commits_before = commits().await;
        let moto_before = daemon::cpu_seconds(s3.pid());
        let fetch = {
            let out = out.to_owned();
            tokio::spawn(async move {
                let mut file = BufWriter::new(File::create(&out).unwrap());
                let header = client
                    .export("bench", Some(Duration::from_secs(3600)), &mut file)
                    .await
                    .unwrap();
                file.into_inner().unwrap().sync_all().unwrap();
                (Instant::now(), header)
            })
        };
        let cpu_before = cpu();
        let start = Instant::now();
        let last_finish = Arc::new(Mutex::new(start));
        let pushes: Vec<_> = shards
            .iter()
            .zip(ids)
            .enumerate()
            .map(|(i, (path, id))| {
                let list = (0..n)
                    .map(|k| urls[(i + k) % n].as_str())
                    .collect::<Vec<_>>()
                    .join(",");
                let mut client = Client::connect(&list).unwrap();
                let (path, last_finish) = (path.clone(), last_finish.clone());
                tokio::spawn(async move {
                    let (tx, rx) = mpsc::channel(4);
                    let reader = tokio::task::spawn_blocking(move || lcov_shards::feed(&path, tx));
                    let target = PushTarget {
                        run_id: "bench".into(),
                        shard_id: id,
                        attempt: 1,
                        ..PushTarget::default()
                    };
                    client
                        .push(&target, rx, &PushOptions::default())
                        .await
                        .unwrap();
                    let now = Instant::now();
                    {
                        let mut last = last_finish.lock().unwrap();
                        *last = (*last).max(now);
                    }
                    reader.await.unwrap();
                })
            })
            .collect();
        for p in pushes {
            p.await.unwrap();
        }
        let (written, header) = fetch.await.unwrap();
        let cpu_used = cpu() - cpu_before;
        let moto_cpu = daemon::cpu_seconds(s3.pid()) - moto_before;
        let last = *last_finish.lock().unwrap();
        assert!(header.complete, "the export waited for the complete run");
        let peak_mb = pids
            .iter()
            .map(|p| daemon::peak_rss_kb(*p) as f64 / 1024.0)
            .collect();
        let commits_after = commits().await;
        let publishes: i64 = catalogue
            .query_one(
                "SELECT count(*) FROM covd_segments WHERE state = 'published'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        Round {
            ingest: last - start,
            wait: written.saturating_duration_since(last),
            cpu: cpu_used,
            peak_mb,
            commits: commits_after - commits_before,
            publishes,
            moto_cpu,
            totals: header.totals,
        }
    })
}
