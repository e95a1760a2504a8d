//! End-to-end ingest benchmark: a real daemon (a child process), shards pushed concurrently
//! through the real gRPC client while the final CI step's fetch already waits, and — on the
//! same files, in the same run — `lcov -a`, `grcov` and `coverage combine` where installed
//! (`scripts/install-reference-tools.sh`).
//!
//! ```text
//! cargo run --release --example bench_ingest -- --shards 16 --files 35000
//! cargo run --release --example bench_ingest -- --data DIR     # shard_*.info already made
//! ```
//!
//! Without `--data`, the shards are generated with `../shared/bench/gen_lcov.py` into
//! `target/bench-data/` (once). Prints: input size and records; a yardstick of the machine's
//! speed in this run (a single-threaded parse-and-union of the first shards); ingest wall time and
//! throughput (MB/s of LCOV, file records/s); the daemon's CPU for the ingest, per file record,
//! as a ratio to the yardstick, and the part of it spent after the last shard finished; the
//! time from the last shard's finish to the merged LCOV on disk (what CI waits for); the
//! daemon's peak RSS; the recovery time after `kill -9`; the merged totals against the
//! generator's ground truth; then each reference tool's wall time, CPU, peak RSS, ratio to
//! covd's wait, and whether its merged lines and counts equal covd's.
//!
//! Options: `--stagger SECS` spreads the shards' starts evenly over SECS (shards arriving
//! while others run, as in CI); `--with-memory` also runs the `--in-memory` daemon;
//! `--no-lcov` skips `lcov -a` (minutes at the seed's scale); `--no-reference` skips all three.
//! `COVD_BENCH_WRAP` runs the daemon under a profiler (see `common/daemon.rs`).

mod reference;

#[path = "../common/bench_data.rs"]
mod bench_data;
#[path = "../common/browser.rs"]
mod browser;
#[path = "../common/daemon.rs"]
mod daemon;
#[path = "../common/lcov_shards.rs"]
mod lcov_shards;

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use covd::client::{Client, PushOptions, PushTarget};
use covd::service::RunParams;
use tokio::sync::mpsc;

struct Args {
    shards: usize,
    files: usize,
    data: Option<PathBuf>,
    stagger: Duration,
    with_memory: bool,
    lcov: bool,
    reference: bool,
}

fn args() -> Args {
    let mut a = Args {
        shards: 16,
        files: 5000,
        data: None,
        stagger: Duration::ZERO,
        with_memory: false,
        lcov: true,
        reference: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--shards" => a.shards = it.next().and_then(|v| v.parse().ok()).expect("--shards N"),
            "--files" => a.files = it.next().and_then(|v| v.parse().ok()).expect("--files N"),
            "--data" => a.data = it.next().map(PathBuf::from),
            "--stagger" => {
                a.stagger = Duration::from_secs_f64(
                    it.next()
                        .and_then(|v| v.parse().ok())
                        .expect("--stagger SECONDS"),
                )
            }
            "--with-memory" => a.with_memory = true,
            "--no-lcov" => a.lcov = false,
            "--no-reference" => a.reference = false,
            "--bench" => {} // passed by `cargo bench`-style runners; ignored
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn main() {
    // The same executable serves as the daemon, so that its memory and CPU are its own.
    if daemon::serve_if_asked(|data_dir| covd::Settings {
        data_dir,
        http_listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
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
    let measured = &shards[..shards.len().min(lcov_shards::YARDSTICK_SHARDS)];
    let yardstick = lcov_shards::parse_and_union(measured);
    println!(
        "data: {} shards in {}, {:.1} MB of LCOV, {} file records{}",
        shards.len(),
        dir.display(),
        bytes as f64 / 1e6,
        records,
        if a.stagger.is_zero() {
            String::new()
        } else {
            format!(", starts spread over {:.0} s", a.stagger.as_secs_f64())
        }
    );
    println!(
        "machine yardstick: covd's LCOV reader and merge on one thread, the first {} shards: {:.2} µs per file record",
        measured.len(),
        yardstick * 1e6
    );

    let scratch = scratch_dir();
    let memory = a
        .with_memory
        .then(|| round(&shards, None, a.stagger, &scratch));
    let store = scratch.join("store");
    let durable = round(&shards, Some(&store), a.stagger, &scratch);
    let _ = std::fs::remove_dir_all(&store);

    let mb = bytes as f64 / 1e6;
    let mut rounds = vec![("durable (SQLite, fsync per group)", &durable)];
    if let Some(m) = &memory {
        rounds.insert(0, ("in memory", m));
    }
    let build = if cfg!(debug_assertions) {
        "covd (debug build: no figure counts)"
    } else {
        "covd (release build)"
    };
    print!("\n{build:<42}");
    for (name, _) in &rounds {
        print!(" {name:<34}");
    }
    println!();
    let row = |name: &str, f: &dyn Fn(&Figures) -> String| {
        print!("  {name:<40}");
        for (_, r) in &rounds {
            print!(" {:<34}", f(r));
        }
        println!();
    };
    row("ingest wall time", &|f| {
        format!("{:.3} s", f.ingest.as_secs_f64())
    });
    row("ingest throughput, MB/s of LCOV", &|f| {
        format!("{:.0}", mb / f.ingest.as_secs_f64())
    });
    row("ingest throughput, file records/s", &|f| {
        format!("{:.0}", records as f64 / f.ingest.as_secs_f64())
    });
    row("daemon CPU for the ingest", &|f| {
        format!("{:.3} s ({:.3} s in the kernel)", f.cpu, f.cpu_system)
    });
    row("daemon CPU per file record", &|f| {
        format!("{:.2} µs", f.cpu * 1e6 / records as f64)
    });
    row("daemon CPU / yardstick", &|f| {
        format!("{:.2}× per record", f.cpu / records as f64 / yardstick)
    });
    row("daemon CPU after the last finish", &|f| {
        format!("{:.3} s", f.cpu_after_last)
    });
    row("last finish → merged LCOV on disk", &|f| {
        format!("{:.3} s", f.wait.as_secs_f64())
    });
    row("daemon peak RSS (RSS at the end)", &|f| {
        format!(
            "{:.1} MB ({:.1} MB)",
            f.peak_kb as f64 / 1024.0,
            f.end_kb as f64 / 1024.0
        )
    });
    row("/metrics scrape under ingest, p50 / p99", &|f| {
        let mut t = f.scrapes.clone();
        t.sort_unstable();
        match t.len() {
            0 => "none".to_owned(),
            n => format!(
                "{:.2} / {:.2} ms ({n} scrapes)",
                t[n / 2].as_secs_f64() * 1e3,
                t[(n - 1) * 99 / 100].as_secs_f64() * 1e3
            ),
        }
    });
    row("delta log kept for retries (database)", &|f| {
        f.disk.map_or("none: in memory".to_owned(), |(log, db)| {
            format!("{:.1} MB ({:.1} MB)", log as f64 / 1e6, db as f64 / 1e6)
        })
    });
    for (i, (page, _)) in durable.dashboard.iter().enumerate() {
        row(&format!("dashboard: {page}"), &|f| {
            f.dashboard.get(i).map_or("none".to_owned(), |(_, t)| {
                format!("{:.1} ms", t.as_secs_f64() * 1e3)
            })
        });
    }
    if let Some(m) = &memory {
        println!(
            "  durable / in-memory ingest throughput: {:.2}",
            m.ingest.as_secs_f64() / durable.ingest.as_secs_f64()
        );
    }
    if let Some(r) = durable.recovery {
        println!(
            "  recovery after kill -9 (a complete run + an open run of {} shards × {} files): {:.3} s",
            shards.len(),
            records / shards.len() as u64,
            r.as_secs_f64()
        );
    }
    check_truth(&dir, &durable.totals);
    if let Some(m) = &memory {
        assert_eq!(m.totals, durable.totals);
    }

    if a.reference {
        let ours = reference::read_lcov(&durable.merged);
        let wait = durable.wait.as_secs_f64();
        let mut tools = Vec::new();
        if a.lcov {
            tools.extend(reference::lcov_add(&shards, &scratch, &ours));
        }
        tools.extend(reference::grcov(&shards, &scratch, &ours));
        tools.extend(reference::coverage_combine(&shards, &scratch, &ours));
        if !tools.is_empty() {
            println!(
                "\nreference tools on the same files (CI waits for the whole merge after the last shard)"
            );
            println!(
                "  {:<18} {:>10} {:>10} {:>12} {:>16}  result vs covd's merge",
                "tool", "wall", "CPU", "peak RSS", "wall / covd wait"
            );
            println!(
                "  {:<18} {:>8.3} s {:>8.3} s {:>9.1} MB {:>16}  (last finish → merged LCOV on disk)",
                "covd",
                wait,
                durable.cpu_after_last,
                durable.peak_kb as f64 / 1024.0,
                "1×"
            );
            for t in &tools {
                println!(
                    "  {:<18} {:>8.3} s {:>8.3} s {:>9.1} MB {:>15.0}×  {}",
                    t.name,
                    t.wall,
                    t.cpu,
                    t.peak_kb as f64 / 1024.0,
                    t.wall / wait,
                    t.verdict
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

/// What one ingest round measured.
struct Figures {
    ingest: Duration,
    wait: Duration,
    cpu: f64,
    cpu_system: f64,
    cpu_after_last: f64,
    peak_kb: u64,
    /// RSS once the merged LCOV is written.
    end_kb: u64,
    totals: covd::model::Totals,
    recovery: Option<Duration>,
    /// The merged LCOV the waiting fetch wrote.
    merged: PathBuf,
    /// `/metrics` scrapes during the ingest: each one's time.
    scrapes: Vec<Duration>,
    /// The dashboard's pages of the complete run, as the browser reads them: each one's
    /// median time of 5 reads.
    dashboard: Vec<(&'static str, Duration)>,
    /// With a store: bytes of the complete run's delta log (kept for a retry within the reopen
    /// window) and of the database beside it.
    disk: Option<(u64, u64)>,
}

/// The dashboard's pages of the complete run `run`: the runs list, the run page (the run with
/// its shards, and its top directory), the directory of the first file of the merged LCOV, and
/// that file's page. Each is the median of 5 reads of its API answers, the daemon's server time
/// plus a loopback connection.
fn dashboard_times(run: &str, merged: &Path) -> Vec<(&'static str, Duration)> {
    let Some(metrics) = daemon::metrics_url() else {
        return Vec::new();
    };
    let base = metrics.trim_end_matches("/metrics").to_owned();
    let lcov = std::fs::read_to_string(merged).unwrap_or_default();
    let Some(file) = lcov.lines().find_map(|l| l.strip_prefix("SF:")) else {
        return Vec::new();
    };
    let dir = file.rsplit_once('/').map_or("", |(d, _)| d);
    let q = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let pages: [(&'static str, Vec<String>); 4] = [
        ("runs list", vec![format!("{base}/api/runs")]),
        (
            "run page (run + top directory)",
            vec![
                format!("{base}/api/runs/{run}"),
                format!("{base}/api/runs/{run}/dir?path="),
            ],
        ),
        (
            "a directory of files",
            vec![format!("{base}/api/runs/{run}/dir?path={}", q(dir))],
        ),
        (
            "a file page",
            vec![format!("{base}/api/runs/{run}/file?path={}", q(file))],
        ),
    ];
    pages
        .into_iter()
        .map(|(name, urls)| {
            let mut took: Vec<Duration> = (0..5)
                .map(|_| {
                    urls.iter()
                        .map(|u| daemon::time_get(u).unwrap_or_else(|| panic!("GET {u} failed")))
                        .sum()
                })
                .collect();
            took.sort_unstable();
            (name, took[2])
        })
        .collect()
}

/// The time from navigation to a usable page in headless Chromium (the run page once its
/// shards and top directory are shown; a file page once its lines are), from the page's own
/// clock (`performance.now()`), the median of 3 loads each. None without Chromium.
async fn browser_times(run: &str, merged: &Path) -> Vec<(&'static str, Duration)> {
    let Some(metrics) = daemon::metrics_url() else {
        return Vec::new();
    };
    if !browser::installed() {
        println!("  (no Chromium: the browser's times are not measured)");
        return Vec::new();
    }
    let base = metrics.trim_end_matches("/metrics").to_owned();
    let lcov = std::fs::read_to_string(merged).unwrap_or_default();
    let Some(file) = lcov.lines().find_map(|l| l.strip_prefix("SF:")) else {
        return Vec::new();
    };
    let file = file.replace('%', "%25").replace('/', "%2F");
    let driver = browser::Driver::start();
    let profile = tempfile::tempdir().unwrap();
    let c = driver.browser(profile.path()).await;
    let mut out = Vec::new();
    for (name, page, ready) in [
        (
            "run page, usable in Chromium",
            format!("{base}/#/run/{run}"),
            "#tree tbody tr",
        ),
        (
            "file page, usable in Chromium",
            format!("{base}/#/run/{run}/file/{file}"),
            "#lines .line",
        ),
    ] {
        let mut took = Vec::new();
        for _ in 0..3 {
            c.goto("about:blank").await.unwrap();
            c.goto(&page).await.unwrap();
            c.wait()
                .at_most(Duration::from_secs(30))
                .every(Duration::from_millis(5))
                .for_element(fantoccini::Locator::Css(ready))
                .await
                .unwrap_or_else(|e| panic!("{page}: {ready} never shown: {e}"));
            let ms = c
                .execute("return performance.now();", vec![])
                .await
                .unwrap()
                .as_f64()
                .unwrap_or(f64::NAN);
            took.push(Duration::from_secs_f64(ms / 1e3));
        }
        took.sort_unstable();
        out.push((name, took[1]));
    }
    let _ = c.close().await;
    out
}

/// What one push of every shard measured.
struct Pushed {
    ingest: Duration,
    wait: Duration,
    cpu: f64,
    cpu_system: f64,
    cpu_after_last: f64,
    totals: covd::model::Totals,
    scrapes: Vec<Duration>,
}

/// Pushes every shard into a fresh daemon (durable when `data_dir` is given) while a fetch
/// waits; with a store, then fills a second, never-complete run and measures a restart.
fn round(
    shards: &[PathBuf],
    data_dir: Option<&Path>,
    stagger: Duration,
    scratch: &Path,
) -> Figures {
    let (mut child, url, _) = daemon::spawn(data_dir);
    let pid = child.id();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let merged = scratch.join(if data_dir.is_some() {
        "covd-durable.info"
    } else {
        "covd-memory.info"
    });
    let pushed = runtime.block_on(run(
        &url,
        shards,
        pid,
        "bench",
        shards.len(),
        stagger,
        &merged,
    ));
    let peak_kb = daemon::peak_rss_kb(pid);
    let end_kb = daemon::status_kb(pid, "VmRSS:");
    let mut dashboard = dashboard_times("bench", &merged);
    dashboard.extend(runtime.block_on(browser_times("bench", &merged)));
    if std::env::var("COVD_BENCH_WRAP").is_ok_and(|w| w.contains("massif")) {
        // Likewise for massif: every snapshot so far, the peak's in detail.
        let _ = Command::new("vgdb")
            .args([
                &format!("--pid={pid}"),
                "all_snapshots",
                &format!("/tmp/massif.{pid}.ingest"),
            ])
            .stdout(Stdio::null())
            .status();
    }
    if std::env::var("COVD_BENCH_WRAP").is_ok_and(|w| w.contains("callgrind")) {
        // The daemon is killed, not stopped: have callgrind write the profile of the ingest.
        let _ = Command::new("callgrind_control")
            .args(["--dump", &pid.to_string()])
            .stdout(Stdio::null())
            .status();
    }
    let mut recovery = None;
    let disk = data_dir.map(|dir| {
        let bytes = |dir: &Path, prefix: &str| -> u64 {
            std::fs::read_dir(dir).map_or(0, |entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
        };
        (
            bytes(&dir.join(covd::persist::log::DIR), ""),
            bytes(dir, covd::persist::sqlite::DB_FILE),
        )
    });
    if let Some(dir) = data_dir {
        // A run expecting one shard more than it gets stays open, so a restart must replay
        // its whole delta log.
        let open = scratch.join("covd-open.info");
        runtime.block_on(run(
            &url,
            shards,
            pid,
            "open",
            shards.len() + 1,
            Duration::ZERO,
            &open,
        ));
        let _ = std::fs::remove_file(&open);
        let _ = child.kill(); // SIGKILL: no clean shutdown
        let _ = child.wait();
        let (again, url, took) = daemon::spawn(Some(dir));
        child = again;
        let status = runtime
            .block_on(async { Client::connect(&url).unwrap().status("open").await })
            .unwrap();
        assert_eq!(
            status.totals, pushed.totals,
            "the recovered open run equals what was pushed"
        );
        recovery = Some(took);
    }
    let _ = child.kill();
    let _ = child.wait();
    Figures {
        ingest: pushed.ingest,
        wait: pushed.wait,
        cpu: pushed.cpu,
        cpu_system: pushed.cpu_system,
        cpu_after_last: pushed.cpu_after_last,
        peak_kb,
        end_kb,
        totals: pushed.totals,
        scrapes: pushed.scrapes,
        dashboard,
        recovery,
        merged,
        disk,
    }
}

async fn run(
    url: &str,
    shards: &[PathBuf],
    pid: u32,
    run_id: &'static str,
    expect: usize,
    stagger: Duration,
    out_path: &Path,
) -> Pushed {
    let mut client = Client::connect(url).unwrap();
    let ids: Vec<String> = (0..expect).map(|i| i.to_string()).collect();
    client
        .open_run(
            run_id,
            RunParams {
                expected_shards: ids.clone(),
                ..RunParams::default()
            },
        )
        .await
        .unwrap();
    let ids_len = shards.len();
    // The final CI step: already waiting when the shards start (for an incomplete run, it
    // only exports once the pushes are done).
    let (pushed_tx, pushed_rx) = tokio::sync::oneshot::channel::<()>();
    let fetch = {
        let mut client = client.clone();
        let out_path = out_path.to_owned();
        let pushed = pushed_rx;
        tokio::spawn(async move {
            if expect != ids_len {
                let _ = pushed.await;
            }
            let mut out = BufWriter::new(File::create(&out_path).unwrap());
            let wait = (expect == ids_len).then_some(Duration::from_secs(3600));
            let header = client.export(run_id, wait, &mut out).await.unwrap();
            out.into_inner().unwrap().sync_all().unwrap();
            (Instant::now(), daemon::cpu_seconds(pid), header)
        })
    };
    let cpu_before = daemon::cpu_seconds(pid);
    let system_before = daemon::cpu_split(pid).1;
    // A Prometheus scrape every 250 ms while the shards stream (its own CPU is in the
    // daemon's; a few milliseconds in all).
    let scraping = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let scraper = daemon::metrics_url().map(|url| {
        let scraping = scraping.clone();
        std::thread::spawn(move || {
            let mut took = Vec::new();
            while scraping.load(std::sync::atomic::Ordering::Relaxed) {
                took.extend(daemon::time_get(&url));
                std::thread::sleep(Duration::from_millis(250));
            }
            took
        })
    });
    let start = Instant::now();
    // The latest finish so far, with the daemon's CPU seconds at that moment.
    let last_finish = Arc::new(std::sync::Mutex::new((start, cpu_before)));
    let n = shards.len() as u32;
    let pushes: Vec<_> = shards
        .iter()
        .zip(ids)
        .enumerate()
        .map(|(i, (path, id))| {
            // A connection per shard, as separate CI jobs have.
            let mut client = Client::connect(url).unwrap();
            let path = path.clone();
            let last_finish = last_finish.clone();
            let delay = stagger * i as u32 / n.max(1);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let (tx, rx) = mpsc::channel(4);
                let reader = tokio::task::spawn_blocking(move || lcov_shards::feed(&path, tx));
                let target = PushTarget {
                    run_id: run_id.into(),
                    shard_id: id,
                    attempt: 1,
                    ..PushTarget::default()
                };
                client
                    .push(&target, rx, &PushOptions::default())
                    .await
                    .unwrap();
                let now = Instant::now();
                let cpu = daemon::cpu_seconds(pid);
                {
                    let mut last = last_finish.lock().unwrap();
                    if now > last.0 {
                        *last = (now, cpu);
                    }
                }
                reader.await.unwrap();
            })
        })
        .collect();
    for p in pushes {
        p.await.unwrap();
    }
    scraping.store(false, std::sync::atomic::Ordering::Relaxed);
    let scrapes = scraper.map(|s| s.join().unwrap()).unwrap_or_default();
    let _ = pushed_tx.send(());
    let (written, cpu_written, header) = fetch.await.unwrap();
    let (last, cpu_at_last) = *last_finish.lock().unwrap();
    assert_eq!(header.complete, expect == ids_len);
    Pushed {
        ingest: last - start,
        wait: written.saturating_duration_since(last),
        cpu: cpu_written - cpu_before,
        cpu_system: daemon::cpu_split(pid).1 - system_before,
        cpu_after_last: (cpu_written - cpu_at_last).max(0.0),
        totals: header.totals,
        scrapes,
    }
}

/// The generator's ground truth against the merged totals.
fn check_truth(dir: &Path, t: &covd::model::Totals) {
    let Ok(text) = std::fs::read_to_string(dir.join("manifest.json")) else {
        println!("  merged totals vs ground truth  none: no manifest.json beside the shards");
        return;
    };
    let field = |name: &str| -> Option<u64> {
        let at = text.find(&format!("\"{name}\":"))?;
        let rest = &text[at + name.len() + 3..];
        rest.trim_start()
            .split([',', '\n', '}'])
            .next()?
            .trim()
            .parse()
            .ok()
    };
    let pairs = [
        ("LF", field("LF"), t.lines),
        ("LH", field("LH_union"), t.lines_covered),
        ("FNF", field("FNF"), t.functions),
        ("FNH", field("FNH_union"), t.functions_hit),
        ("BRF", field("BRF"), t.branches),
    ];
    let ok = pairs
        .iter()
        .all(|(_, want, got)| want.is_none_or(|w| w == *got));
    println!(
        "  merged totals vs ground truth  {}: {}",
        if ok { "equal" } else { "DIFFERENT" },
        pairs
            .iter()
            .map(|(n, w, g)| format!("{n} {g}/{}", w.map_or("?".into(), |w| w.to_string())))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // A benchmark of a wrong merge measures nothing: CI runs this at a tiny scale to check it.
    assert!(
        ok,
        "the merged totals differ from the generator's ground truth"
    );
}

fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("covd-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
