//! Durability of the embedded store (`covd serve --data-dir`): kill -9 loses nothing
//! acknowledged; a second daemon, a damaged database and a damaged delta log are met with clear
//! refusals. What every backend promises (restarts, attempts, compaction, expiry, a failed
//! write) is checked once for all of them in `storage.rs`.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use covd::model::{BranchArm, BranchKey, Coverage, FileBuilder, FileCoverage};
use covd::persist::SqliteStore;
use covd::rpc::convert::{ArmForm, file_to_proto};
use covd::service::{CoverageService, Delta, Limits, RunParams, ShardHeader};
use tokio::sync::watch;

use crate::cli::{COVD, Served, address};
use crate::ingest::Stream;
use crate::support::*;

pub(crate) const SHARDS: usize = 4;
pub(crate) const DELTAS: u64 = 200;

/// The deterministic delta `seq` of shard `s`: a few files with lines, counts, a branch and a
/// function, overlapping between shards.
pub(crate) fn delta(s: usize, seq: u64) -> Vec<(String, FileCoverage)> {
    (0..3)
        .map(|k| {
            let file = (s as u64 * 7 + seq * 3 + k) % 12;
            let mut b = FileBuilder::new();
            for line in 1..=(10 + file as u32) {
                b.line(line, (s as u64 + seq + u64::from(line)) % 4);
            }
            let taken = (!seq.is_multiple_of(3)).then_some(seq % 2);
            b.branch(
                BranchKey {
                    line: 2,
                    block: 0,
                    arm: BranchArm::Index(k as u32),
                },
                taken,
            );
            b.function("main", 1, 0, seq % 2);
            (format!("src/f{file}.c"), b.build())
        })
        .collect()
}

pub(crate) fn expected() -> Coverage {
    let mut c = Coverage::default();
    for s in 0..SHARDS {
        for seq in 1..=DELTAS {
            for (p, f) in delta(s, seq) {
                c.add(&p, &f);
            }
        }
    }
    c
}

/// A daemon child process, killed if the test ends early.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `covd serve` on a port of its own choosing and a data directory, ready when it says so:
/// the daemon and its address. With `abort_in_commit`, it aborts inside that group commit (see
/// `persist`).
fn serve(dir: &std::path::Path, abort_in_commit: Option<u32>) -> (Killed, String) {
    let mut command = Command::new(COVD);
    command
        .args(crate::cli::SERVE_ANY_PORT)
        .arg(dir)
        .stderr(Stdio::piped());
    if let Some(n) = abort_in_commit {
        command.env("COVD_FAULT_ABORT_IN_COMMIT", n.to_string());
    }
    let mut child = command.spawn().unwrap();
    let url = address(&mut child);
    (Killed(child), url)
}

/// What the shards share with the test that kills their daemon: its address (each restart
/// gets a new port), and how many deltas have been acknowledged in all.
#[derive(Clone)]
pub(crate) struct Crashes {
    pub(crate) url: watch::Receiver<String>,
    pub(crate) acked: watch::Sender<u64>,
}

/// Streams every delta of shard `s`, reconnecting to the next daemon whenever the connection
/// breaks, and finishes the shard. Each resume point must be at or past every sequence the
/// shard saw acknowledged. Returns how many times it resumed.
pub(crate) async fn shard_client(s: usize, mut crashes: Crashes) -> u32 {
    let mut resumes = 0;
    let mut acked = 0;
    loop {
        let url = crashes.url.borrow_and_update().clone();
        match stream_shard(&url, s, &mut acked, &crashes.acked).await {
            Ok(()) => return resumes,
            Err(e) => {
                // Only a broken connection (the daemon died) is retried. A status the daemon
                // sent, internal and unknown ones included, is a failure.
                assert!(
                    std::error::Error::source(&e).is_some(),
                    "shard {s}: the daemon answered {e:?}"
                );
                resumes += 1;
                // The next daemon, unless one is already up (its address changed meanwhile).
                if *crashes.url.borrow() == url {
                    crashes.url.changed().await.unwrap();
                }
            }
        }
    }
}

/// The next of a xorshift sequence: crash points that are arbitrary but the same every run.
pub(crate) fn xorshift(rng: &mut u64) -> u64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    *rng
}

/// Returns once `more` deltas beyond those acknowledged now have been acknowledged.
pub(crate) async fn acknowledged(progress: &mut watch::Receiver<u64>, more: u64) {
    let target = *progress.borrow() + more;
    tokio::time::timeout(
        Duration::from_secs(120),
        progress.wait_for(|n| *n >= target),
    )
    .await
    .expect("the shards make progress")
    .unwrap();
}

/// Waits for every shard client to finish; returns how many times they resumed in all.
pub(crate) async fn finished(clients: Vec<tokio::task::JoinHandle<u32>>) -> u32 {
    let mut resumes = 0;
    for c in clients {
        resumes += tokio::time::timeout(Duration::from_secs(120), c)
            .await
            .expect("every shard finishes")
            .unwrap();
    }
    resumes
}

async fn stream_shard(
    url: &str,
    s: usize,
    acked: &mut u64,
    total: &watch::Sender<u64>,
) -> Result<(), tonic::Status> {
    let mut c = covd::rpc::proto::coverage_client::CoverageClient::connect(url.to_owned())
        .await
        .map_err(|e| tonic::Status::from_error(Box::new(e)))?;
    let (mut stream, resume) = Stream::open(&mut c, "crash", &s.to_string(), 1).await?;
    assert!(
        resume.last_seq >= *acked,
        "shard {s}: delta {} was acknowledged, the daemon resumes after {}",
        *acked,
        resume.last_seq
    );
    if resume.finished {
        return Ok(());
    }
    for seq in resume.last_seq + 1..=DELTAS {
        let files = delta(s, seq)
            .into_iter()
            .map(|(p, f)| file_to_proto(p, &f, ArmForm::Columns))
            .collect();
        let ack = stream.delta(seq, files).await?;
        assert_eq!(ack.seq, seq);
        assert!(ack.durable);
        *acked = seq;
        total.send_modify(|n| *n += 1);
    }
    stream.finish(DELTAS).await?;
    Ok(())
}

/// The daemon dies eight times while four shards stream 200 deltas each: four times by
/// SIGKILL, four times by aborting inside a group commit (writes made, commit not). When it
/// dies is set by how many deltas were acknowledged, not by the clock, so a slow machine sees
/// the same crashes as a fast one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = serve(dir.path(), None);
    let mut client = covd::client::Client::connect(&url).unwrap();
    client
        .open_run(
            "crash",
            RunParams {
                expected_shards: (0..SHARDS).map(|s| s.to_string()).collect(),
                ..RunParams::default()
            },
        )
        .await
        .unwrap();

    let (restarted, url_rx) = watch::channel(url);
    let (acked, _) = watch::channel(0u64);
    let crashes = Crashes {
        url: url_rx,
        acked: acked.clone(),
    };
    let clients: Vec<_> = (0..SHARDS)
        .map(|s| tokio::spawn(shard_client(s, crashes.clone())))
        .collect();
    let mut progress = acked.subscribe();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut kills = 0;
    let mut aborts = 0;
    for round in 0..8u32 {
        let rng = xorshift(&mut rng);
        if round % 2 == 0 {
            // SIGKILL once 20 to 80 more deltas were acknowledged: at any point of a commit.
            acknowledged(&mut progress, 20 + rng % 61).await;
            drop(child);
            kills += 1;
        } else {
            // This daemon aborts itself inside its 5th to 20th group commit (at most 80
            // deltas): wait for it to.
            let status = tokio::task::spawn_blocking(move || {
                let status = child.0.wait().unwrap();
                drop(child);
                status
            });
            let status = tokio::time::timeout(Duration::from_secs(120), status)
                .await
                .expect("the daemon aborts inside a commit")
                .unwrap();
            assert_eq!(status.code(), Some(134), "{status}");
            aborts += 1;
        }
        let dir = dir.path().to_owned();
        // Every other daemon is set to die inside its 5th to 20th group commit.
        let abort = (round % 2 == 0).then_some(5 + (rng % 16) as u32);
        let url;
        (child, url) = tokio::task::spawn_blocking(move || serve(&dir, abort))
            .await
            .unwrap();
        restarted.send_replace(url);
    }
    let last_crash = *progress.borrow();
    let resumes = finished(clients).await;
    eprintln!("crash test: {kills} kills and {aborts} aborts in a commit, {resumes} resumes");
    assert!(
        last_crash < SHARDS as u64 * DELTAS,
        "the last crash came after {last_crash} acknowledgements, before the shards finished"
    );
    let mut client = covd::client::Client::connect(&restarted.borrow()).unwrap();
    let (header, merged) = fetch(&mut client, "crash").await;
    assert!(header.complete);
    // Identical to the same deltas merged without crashes: nothing acknowledged is missing,
    // nothing is counted twice.
    assert_eq!(
        merged,
        expected(),
        "after {kills} kills, {aborts} aborts and {resumes} resumes"
    );
    drop(child);
}

#[test]
fn a_second_daemon_on_the_same_directory_is_refused() {
    let served = Served::start();
    let r = Command::new(COVD)
        .args(crate::cli::SERVE_ANY_PORT)
        .arg(served.data.path())
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("in use by another covd"), "{err}");
    // The first daemon is unharmed.
    assert!(served.covd(&["runs"]).status().unwrap().success());
}

#[test]
fn a_database_cut_in_half_is_reported_at_start() {
    let served = Served::start();
    for shard in 1..=3 {
        let r = served
            .covd(&["push", "--run", "big", "--shard", &shard.to_string()])
            .arg(fixture(&format!("gcc-lcov/shard{shard}.info")))
            .output()
            .unwrap();
        assert!(r.status.success());
    }
    let dir = tempfile::tempdir().unwrap();
    // A graceful stop checkpoints the WAL into the database file.
    let mut served = served;
    served.terminate();
    let db = served.data.path().join(covd::persist::DB_FILE);
    let bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 8192, "the database holds data");
    std::fs::write(
        dir.path().join(covd::persist::DB_FILE),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let r = Command::new(COVD)
        .args(crate::cli::SERVE_ANY_PORT)
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("is damaged or not a covd database"), "{err}");
}

/// Deltas live in a log file per run until the run is compacted; a damaged log is reported at
/// start, not read as coverage.
#[tokio::test]
async fn delta_logs_go_with_their_run_and_damage_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let log_files = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir.path().join("deltas"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    };
    let files = delta(0, 1);
    {
        let (service, _) = open_service(dir.path(), no_reopen_window());
        for (run, expected) in [("done", 1), ("open", 2)] {
            let params = RunParams {
                expected_shards: (0..expected).map(|i: i32| i.to_string()).collect(),
                ..RunParams::default()
            };
            service.open_run(run, params).await.unwrap();
            let session = service
                .begin_shard(ShardHeader {
                    run_id: run.into(),
                    shard_id: "0".into(),
                    attempt: 1,
                    params: RunParams::default(),
                    session: Vec::new(),
                })
                .await
                .unwrap();
            let delta = Delta {
                seq: 1,
                files: covd::model::FileBatch::of_files(&files),
                ..Delta::default()
            };
            service.apply(&session, delta).await.unwrap();
            service.finish(&session, 1, None).await.unwrap();
        }
        assert_eq!(log_files().len(), 2);
        // Dropped before the complete run's compaction (which waits a moment) ran.
    }
    // Recovery compacts (blocking work, as in the daemon).
    let path = dir.path().to_owned();
    let (service, recovery) =
        tokio::task::spawn_blocking(move || open_service(&path, no_reopen_window()))
            .await
            .unwrap();
    assert_eq!(recovery.runs, 2);
    assert_eq!(
        log_files().len(),
        1,
        "recovery compacted the complete run and deleted its log"
    );
    let mut pushed = Coverage::default();
    for (path, file) in &files {
        pushed.add(path, file);
    }
    for run in ["done", "open"] {
        assert_eq!(service.run_status(run).unwrap().totals, pushed.totals());
    }
    drop(service);

    let reopen = || {
        let store = SqliteStore::open(dir.path())
            .unwrap()
            .with_wire_decoder(covd::rpc::convert::wire_delta_files);
        CoverageService::open(Limits::default(), std::sync::Arc::new(store)).map(|_| ())
    };
    // Flip one bit in the open run's log: the daemon refuses to start and says which delta.
    let log = log_files().pop().unwrap();
    let bytes = std::fs::read(&log).unwrap();
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x20;
    std::fs::write(&log, &flipped).unwrap();
    let e = reopen().unwrap_err();
    assert!(
        e.to_string().contains("delta log") && e.to_string().contains("fails its checksum"),
        "{e}"
    );
    // The bit put back, it opens.
    std::fs::write(&log, &bytes).unwrap();
    reopen().unwrap();

    // Cut the open run's log in half: the daemon refuses to start and says why.
    let len = std::fs::metadata(&log).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let e = reopen().unwrap_err();
    assert!(
        e.to_string().contains("delta log") && e.to_string().contains("ends at byte"),
        "{e}"
    );
}

/// The service over the store in `dir`, as the daemon opens it (with the protocol's decoder
/// for the deltas it kept in wire form).
fn open_service(
    dir: &std::path::Path,
    limits: Limits,
) -> (CoverageService, covd::service::Recovery) {
    let store = SqliteStore::open(dir)
        .unwrap()
        .with_wire_decoder(covd::rpc::convert::wire_delta_files);
    CoverageService::open(limits, std::sync::Arc::new(store)).unwrap()
}

/// No reopen window: a complete run drops its deltas as soon as it is compacted.
fn no_reopen_window() -> Limits {
    Limits {
        reopen_window: None,
        ..Limits::default()
    }
}

/// A complete run keeps its deltas for the reopen window: a retried shard reopens it (also
/// after a restart, once it is compacted), its attempt replaces the failed one, and the run
/// completes again. Once the window has passed the deltas go, and a retry is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_reopens_a_complete_run_within_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let log_files = || {
        std::fs::read_dir(dir.path().join("deltas"))
            .unwrap()
            .count()
    };
    let coverage = |deltas: &[(usize, u64)]| {
        let mut c = Coverage::default();
        for (s, seq) in deltas {
            for (p, f) in delta(*s, *seq) {
                c.add(&p, &f);
            }
        }
        c
    };
    let header = |shard: &str, attempt| ShardHeader {
        run_id: "r".into(),
        shard_id: shard.into(),
        attempt,
        params: RunParams::default(),
        session: Vec::new(),
    };
    let send = async |service: &CoverageService, shard: usize, attempt, seq| {
        let session = service
            .begin_shard(header(&shard.to_string(), attempt))
            .await
            .unwrap();
        let files = delta(shard, seq);
        let delta = Delta {
            seq: 1,
            files: covd::model::FileBatch::of_files(&files),
            ..Delta::default()
        };
        service.apply(&session, delta).await.unwrap();
        service.finish(&session, 1, None).await.unwrap()
    };
    let open = |dir: &std::path::Path| {
        let dir = dir.to_owned();
        async move {
            tokio::task::spawn_blocking(move || open_service(&dir, Limits::default()).0)
                .await
                .unwrap()
        }
    };
    {
        let (service, _) = open_service(dir.path(), Limits::default());
        let params = RunParams {
            expected_shards: vec!["0".into(), "1".into()],
            ..RunParams::default()
        };
        service.open_run("r", params).await.unwrap();
        send(&service, 0, 1, 1).await;
        assert!(send(&service, 1, 1, 2).await.complete);
    }
    // Recovery compacts the run, and keeps its log for a retry.
    let service = open(dir.path()).await;
    assert_eq!(log_files(), 1, "the complete run keeps its deltas");
    let before = service.run_status("r").unwrap();
    assert!(before.complete);
    assert_eq!(before.totals, coverage(&[(0, 1), (1, 2)]).totals());

    // Attempt 2 of shard 0: the run waits for it again, without attempt 1's coverage.
    let session = service.begin_shard(header("0", 2)).await.unwrap();
    let reopened = service.run_status("r").unwrap();
    assert!(!reopened.complete);
    assert_eq!(reopened.missing_shards, ["0"]);
    assert_eq!(reopened.totals, coverage(&[(1, 2)]).totals());
    let files = delta(0, 3);
    let retry = Delta {
        seq: 1,
        files: covd::model::FileBatch::of_files(&files),
        ..Delta::default()
    };
    service.apply(&session, retry).await.unwrap();
    drop(session);
    drop(service);
    // Reopened in the store too: a restart has the retry's delta and still waits.
    let service = open(dir.path()).await;
    let status = service.run_status("r").unwrap();
    assert!(!status.complete);
    assert_eq!(status.totals, coverage(&[(1, 2), (0, 3)]).totals());
    let session = service.begin_shard(header("0", 2)).await.unwrap();
    let done = service.finish(&session, 1, None).await.unwrap();
    assert!(done.complete);
    drop(session);
    drop(service);

    let service = open(dir.path()).await;
    let after = service.run_status("r").unwrap();
    assert!(after.complete);
    assert_eq!(after.totals, coverage(&[(1, 2), (0, 3)]).totals());
    let now = std::time::SystemTime::now();
    assert_eq!(service.close_reopen_windows(now).await.unwrap(), 0);
    assert_eq!(log_files(), 1);
    let a_day_later = now + Duration::from_secs(25 * 3600);
    assert_eq!(service.close_reopen_windows(a_day_later).await.unwrap(), 1);
    assert_eq!(log_files(), 0, "the window closed: the deltas are gone");
    drop(service);
    let service = open(dir.path()).await;
    let e = service.begin_shard(header("0", 3)).await.unwrap_err();
    assert!(
        e.to_string().contains("its deltas are no longer kept"),
        "{e}"
    );
    let last = service.run_status("r").unwrap();
    assert!(last.complete);
    assert_eq!(last.totals, after.totals);
}

/// Deltas kept for retries never crowd out new coverage: once the store holds more than three
/// quarters of its cap, complete runs give them up at once, and a retry is then refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_deltas_go_first_when_the_store_runs_short() {
    use covd::persist::{MemoryStore, Storage};
    use std::sync::Arc;
    // One complete run, compacted (by a second service's recovery) with its deltas kept: what
    // does the store then hold?
    let complete = async |store: Arc<MemoryStore>| {
        let open = |store: Arc<MemoryStore>| {
            tokio::task::block_in_place(|| {
                CoverageService::open(Limits::default(), store as Arc<dyn Storage>)
                    .unwrap()
                    .0
            })
        };
        let service = open(store.clone());
        let params = RunParams {
            expected_shards: vec!["0".into()],
            ..RunParams::default()
        };
        service.open_run("r", params).await.unwrap();
        let header = |attempt| ShardHeader {
            run_id: "r".into(),
            shard_id: "0".into(),
            attempt,
            params: RunParams::default(),
            session: Vec::new(),
        };
        let session = service.begin_shard(header(1)).await.unwrap();
        for seq in 1..=20 {
            let files = delta(0, seq);
            let d = Delta {
                seq,
                files: covd::model::FileBatch::of_files(&files),
                ..Delta::default()
            };
            service.apply(&session, d).await.unwrap();
        }
        assert!(service.finish(&session, 20, None).await.unwrap().complete);
        drop(session);
        drop(service);
        (open(store.clone()), header)
    };
    let wire = covd::rpc::convert::wire_delta_files;
    let roomy = Arc::new(MemoryStore::new(Some(u64::MAX)).with_wire_decoder(wire));
    let (service, _) = complete(roomy.clone()).await;
    assert_eq!(
        service
            .close_reopen_windows(std::time::SystemTime::now())
            .await
            .unwrap(),
        0
    );
    let (held, _) = roomy.usage().unwrap().unwrap();

    // The same in a store whose cap that is 80% of: the kept deltas go.
    let cap = held * 5 / 4;
    let short = Arc::new(MemoryStore::new(Some(cap)).with_wire_decoder(wire));
    let (service, header) = complete(short.clone()).await;
    assert_eq!(
        service
            .close_reopen_windows(std::time::SystemTime::now())
            .await
            .unwrap(),
        1
    );
    let (now_held, _) = short.usage().unwrap().unwrap();
    assert!(now_held < held, "{now_held} of {held}");
    let e = service.begin_shard(header(2)).await.unwrap_err();
    assert!(e.to_string().contains("no longer kept"), "{e}");
}

/// A data directory at its `--max-db-bytes` still starts and serves what it holds: a start
/// that must compact a complete run and cannot (the cap) leaves the run in its delta log,
/// refuses writes, and says so in the health check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_directory_starts_and_serves_reads() {
    const CAP: u64 = 256 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let open = |cap| {
        let store = SqliteStore::open_with(dir.path(), cap)
            .unwrap()
            .with_wire_decoder(covd::rpc::convert::wire_delta_files);
        tokio::task::block_in_place(|| {
            CoverageService::open(Limits::default(), std::sync::Arc::new(store))
        })
    };
    let header = |run: &str| ShardHeader {
        run_id: run.into(),
        shard_id: "0".into(),
        attempt: 1,
        params: RunParams::default(),
        session: Vec::new(),
    };
    let file_of = delta(0, 1).remove(0);
    // Large enough that its compacted form cannot fit in what the filler leaves.
    let done_files: Vec<(String, FileCoverage)> = (0..400)
        .map(|i| (format!("done/{i}.c"), delta(0, 1 + i).remove(0).1))
        .chain([file_of.clone()])
        .collect();
    {
        let (service, _) = open(Some(CAP)).unwrap();
        let one = RunParams {
            expected_shards: vec!["0".into()],
            ..RunParams::default()
        };
        service.open_run("done", one).await.unwrap();
        let session = service.begin_shard(header("done")).await.unwrap();
        let files = covd::model::FileBatch::of_files(&done_files);
        service
            .apply(
                &session,
                Delta {
                    seq: 1,
                    files,
                    ..Delta::default()
                },
            )
            .await
            .unwrap();
        assert!(service.finish(&session, 1, None).await.unwrap().complete);
        // Dropped before its compaction (2 s after the finish) runs: a start must do it.
        // Fill the directory up to its cap with another run.
        let session = service.begin_shard(header("filler")).await.unwrap();
        let mut seq = 0;
        let refused = loop {
            seq += 1;
            let files: Vec<(String, FileCoverage)> = (0..20)
                .map(|i| (format!("fill/{seq}/{i}.c"), delta(1, seq).remove(0).1))
                .collect();
            let files = covd::model::FileBatch::of_files(&files);
            match service
                .apply(
                    &session,
                    Delta {
                        seq,
                        files,
                        ..Delta::default()
                    },
                )
                .await
            {
                Ok(_) => assert!(seq < 10_000, "the cap never refused a delta"),
                Err(e) => break e,
            }
        };
        assert!(refused.to_string().contains("max-db-bytes"), "{refused}");
    }
    // It starts, holding both runs, and refuses writes since compacting "done" failed.
    let (service, recovery) = open(Some(CAP)).expect("a full directory starts");
    assert_eq!(recovery.runs, 2);
    let why = service
        .store_failure()
        .expect("the failed compaction latched");
    assert!(why.contains("max-db-bytes"), "{why}");
    assert!(service.run_status("done").unwrap().complete);
    assert_eq!(service.file("done", &file_of.0).await.unwrap(), file_of.1);
    assert!(service.open_run("new", RunParams::default()).await.is_err());
    drop(service);

    // The daemon on it serves reads and says NOT_SERVING.
    let settings = covd::server::Settings {
        data_dir: Some(dir.path().to_owned()),
        max_db_bytes: Some(CAP),
        ..covd::server::Settings::default()
    };
    let daemon = Daemon::with(settings).await;
    let mut client = daemon.client();
    assert_eq!(client.file("done", &file_of.0).await.unwrap(), file_of.1);
    let channel = tonic::transport::Endpoint::from_shared(daemon.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut statuses = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: "covd.v1.Coverage".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(s) = statuses.message().await.unwrap() {
            if s.status == not_serving {
                return;
            }
        }
        panic!("the health stream ended");
    })
    .await
    .expect("NOT_SERVING once the store refuses writes");
    daemon.stop().await.unwrap();
}

/// A daemon that stopped has closed its store: its directory opens at once, even when the
/// run it just completed had its compaction still to come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_daemon_has_released_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let settings = covd::server::Settings {
        data_dir: Some(dir.path().to_owned()),
        ..covd::server::Settings::default()
    };
    let daemon = Daemon::with(settings).await;
    let mut client = daemon.client();
    let mut c = Coverage::default();
    for (p, f) in delta(0, 1) {
        c.add(&p, &f);
    }
    let one = RunParams {
        expected_shards: vec!["0".into()],
        ..RunParams::default()
    };
    client.open_run("r", one).await.unwrap();
    push(&mut client, "r", "0", 1, c.clone()).await;
    daemon.stop().await.unwrap();
    let store = SqliteStore::open(dir.path()).expect("the directory is free");
    let (service, _) = tokio::task::block_in_place(|| {
        CoverageService::open(
            Limits::default(),
            std::sync::Arc::new(store.with_wire_decoder(covd::rpc::convert::wire_delta_files)),
        )
    })
    .unwrap();
    assert_eq!(service.run_status("r").unwrap().totals, c.totals());
}
