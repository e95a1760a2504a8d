//! Many-runs benchmark: what a daemon that keeps history holds in memory. Pushes `--runs`
//! complete runs (each `--shards` LCOV shards of `--files` files, made once by
//! `../shared/bench/gen_lcov.py` into `target/bench-data/`) into a real `covd serve` (a child
//! process with a data directory), then prints its RSS once they completed, its RSS and start
//! time after a restart, and the latency of the first status, file query and LCOV export of
//! the oldest run (cold: in storage only) and of the same again (warm).
//!
//! ```text
//! cargo run --release --example bench_runs -- --runs 200 [--covd PATH] [--reference PATH]
//! ```
//!
//! `--covd` is the binary measured (default: `target/release/covd`, built by `cargo build
//! --release`); `--reference PATH` runs another build on the same data first (say the last
//! release, which kept every run in memory) and prints the ratios side by side.
//! `--memory-budget BYTES` is passed to the measured binary (the reference may not know it).

#[path = "common/bench_data.rs"]
mod bench_data;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use covd::client::{Batcher, Client, PushInput, PushOptions, PushTarget};
use covd::formats::lcov;
use covd::model::Coverage;
use covd::service::RunParams;
use tokio::sync::mpsc;

struct Args {
    runs: usize,
    shards: usize,
    files: usize,
    covd: PathBuf,
    reference: Option<PathBuf>,
    budget: Option<String>,
}

fn args() -> Args {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut a = Args {
        runs: 200,
        shards: 4,
        files: 5000,
        covd: root.join("target/release/covd"),
        reference: None,
        budget: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--runs" => a.runs = value().parse().unwrap(),
            "--shards" => a.shards = value().parse().unwrap(),
            "--files" => a.files = value().parse().unwrap(),
            "--covd" => a.covd = value().into(),
            "--reference" => a.reference = Some(value().into()),
            "--memory-budget" => a.budget = Some(value()),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// What one binary measured.
struct Figures {
    ingest: Duration,
    rss_complete_kb: u64,
    restart: Duration,
    rss_restart_kb: u64,
    cold: [Duration; 3],
    warm: [Duration; 3],
    rss_after_reads_kb: u64,
}

/// `covd serve` on a free loopback port; the address is on its first line of output.
fn serve(covd: &Path, data: &Path, budget: Option<&str>) -> (Child, String) {
    let mut cmd = Command::new(covd);
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--data-dir",
    ])
    .arg(data)
    .stderr(Stdio::piped());
    if let Some(b) = budget {
        cmd.args(["--memory-budget", b]);
    }
    let mut child = cmd.spawn().expect("start covd");
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    (child, url)
}

fn stop(mut child: Child) {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Every shard's records, merged per file once, as the deltas a push sends: read once, and
/// cloned for each run, so that the benchmark's own parsing does not take the daemon's cores.
type Deltas = Vec<Vec<Vec<(String, covd::model::FileCoverage)>>>;

fn deltas(shards: &[PathBuf]) -> Deltas {
    shards
        .iter()
        .map(|path| {
            let mut r = lcov::Reader::new(BufReader::new(std::fs::File::open(path).unwrap()));
            let mut c = Coverage::default();
            while let Some(rec) = r.next_record().unwrap() {
                c.add(&rec.path, &rec.file);
            }
            let mut batcher = Batcher::default();
            let mut out = Vec::new();
            for (p, f) in c.files {
                if let Some(d) = batcher.push(p, f) {
                    out.push(d);
                }
            }
            out.extend(batcher.finish());
            out
        })
        .collect()
}

async fn push_run(url: &str, run_id: &str, shards: &Deltas) {
    let mut client = Client::connect(url).unwrap();
    let ids: Vec<String> = (0..shards.len()).map(|i| i.to_string()).collect();
    let params = RunParams {
        project: "acme/bench".into(),
        expected_shards: ids.clone(),
        ..RunParams::default()
    };
    client.open_run(run_id, params).await.unwrap();
    let pushes: Vec<_> = shards
        .iter()
        .cloned()
        .zip(ids)
        .map(|(inputs, id)| {
            let mut client = Client::connect(url).unwrap();
            let run_id = run_id.to_owned();
            tokio::spawn(async move {
                let (tx, rx) = mpsc::channel(inputs.len() + 1);
                for d in inputs {
                    tx.send(PushInput::Delta(d)).await.unwrap();
                }
                tx.send(PushInput::Done(None)).await.unwrap();
                let target = PushTarget {
                    run_id,
                    shard_id: id,
                    attempt: 1,
                    ..PushTarget::default()
                };
                client
                    .push(&target, rx, &PushOptions::default())
                    .await
                    .unwrap();
            })
        })
        .collect();
    for p in pushes {
        p.await.unwrap();
    }
}

/// Status, one file, and the LCOV export of `run_id`: the time of each.
async fn read_run(url: &str, run_id: &str, path: &str) -> [Duration; 3] {
    let mut client = Client::connect(url).unwrap();
    let t = Instant::now();
    let status = client.status(run_id).await.unwrap();
    assert!(status.complete);
    let status_took = t.elapsed();
    let t = Instant::now();
    client.file(run_id, path).await.unwrap();
    let file_took = t.elapsed();
    let t = Instant::now();
    let mut sink = std::io::sink();
    client.export(run_id, None, &mut sink).await.unwrap();
    [status_took, file_took, t.elapsed()]
}

async fn measure(
    covd: &Path,
    budget: Option<&str>,
    shards: &Deltas,
    a: &Args,
    path: &str,
) -> Figures {
    let data = tempfile::tempdir().unwrap();
    let (child, url) = serve(covd, data.path(), budget);
    let started = Instant::now();
    for run in 0..a.runs {
        push_run(&url, &format!("run-{run:04}"), shards).await;
        if run % 20 == 19 {
            eprint!(".");
        }
    }
    let ingest = started.elapsed();
    // Compaction starts 2 s after a run completes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_complete_kb = rss_kb(child.id());
    stop(child);

    let t = Instant::now();
    let (child, url) = serve(covd, data.path(), budget);
    let mut client = Client::connect(&url).unwrap();
    client.status("run-0000").await.unwrap();
    let restart = t.elapsed();
    let rss_restart_kb = rss_kb(child.id());
    let cold = read_run(&url, "run-0000", path).await;
    let warm = read_run(&url, "run-0000", path).await;
    let rss_after_reads_kb = rss_kb(child.id());
    stop(child);
    eprintln!();
    Figures {
        ingest,
        rss_complete_kb,
        restart,
        rss_restart_kb,
        cold,
        warm,
        rss_after_reads_kb,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn print(name: &str, f: &Figures) {
    let mb = |kb: u64| format!("{:.1} MB", kb as f64 / 1024.0);
    println!("{name}:");
    println!(
        "  ingest of every run       {:.1} s",
        f.ingest.as_secs_f64()
    );
    println!("  RSS, runs complete        {}", mb(f.rss_complete_kb));
    println!(
        "  restart until it answers  {:.2} s, RSS {}",
        f.restart.as_secs_f64(),
        mb(f.rss_restart_kb)
    );
    println!(
        "  oldest run, cold          status {}, file {}, export {}",
        ms(f.cold[0]),
        ms(f.cold[1]),
        ms(f.cold[2])
    );
    println!(
        "  oldest run, again         status {}, file {}, export {}",
        ms(f.warm[0]),
        ms(f.warm[1]),
        ms(f.warm[2])
    );
    println!("  RSS after those reads     {}", mb(f.rss_after_reads_kb));
}

#[tokio::main]
async fn main() {
    let a = args();
    let dir = bench_data::generate(a.shards, a.files);
    let mut shards: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "info"))
        .collect();
    shards.sort();
    let path = {
        let mut r = lcov::Reader::new(BufReader::new(std::fs::File::open(&shards[0]).unwrap()));
        r.next_record().unwrap().unwrap().path
    };
    println!(
        "data: {} runs × {} shards × {} files (LCOV from gen_lcov.py in {}), durable daemons",
        a.runs,
        a.shards,
        a.files,
        dir.display()
    );
    let shards = deltas(&shards);
    let reference = match &a.reference {
        Some(bin) => {
            let f = measure(bin, None, &shards, &a, &path).await;
            print(&format!("reference {}", bin.display()), &f);
            Some(f)
        }
        None => None,
    };
    let f = measure(&a.covd, a.budget.as_deref(), &shards, &a, &path).await;
    print(&format!("covd {}", a.covd.display()), &f);
    if let Some(r) = reference {
        let ratio = |x: u64, y: u64| x as f64 / y.max(1) as f64;
        println!(
            "covd / reference: RSS complete {:.3}, RSS after restart {:.3}, restart {:.2}, \
             cold export {:.2}",
            ratio(f.rss_complete_kb, r.rss_complete_kb),
            ratio(f.rss_restart_kb, r.rss_restart_kb),
            f.restart.as_secs_f64() / r.restart.as_secs_f64(),
            f.cold[2].as_secs_f64() / r.cold[2].as_secs_f64()
        );
    }
    let _ = std::io::stdout().flush();
}
