//! Starting a daemon in-process and feeding it files.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use covd::client::{Batcher, Client, PushInput, PushOptions, PushReport, PushTarget};
use covd::formats::lcov;
use covd::model::path::PathRules;
use covd::model::{Coverage, FileCoverage};
use covd::persist::Storage;
use covd::server::{self, Settings};
use tokio::sync::{mpsc, oneshot};

/// A daemon serving on a loopback port chosen by the OS; stops when dropped.
pub(crate) struct Daemon {
    pub(crate) url: String,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<Result<(), server::ServerError>>>,
}

impl Daemon {
    pub(crate) async fn start() -> Daemon {
        Daemon::with(Settings::default()).await
    }

    pub(crate) async fn with(settings: Settings) -> Daemon {
        Daemon::serving(|listener, stopped| {
            tokio::spawn(async move {
                server::run(listener, settings, async {
                    let _ = stopped.await;
                })
                .await
            })
        })
        .await
    }

    /// A daemon over storage the test opened (see `storage.rs`).
    pub(crate) async fn on(settings: Settings, storage: Arc<dyn Storage>) -> Daemon {
        Daemon::serving(|listener, stopped| {
            tokio::spawn(async move {
                let stop = async {
                    let _ = stopped.await;
                };
                server::run_on(listener, settings, storage, stop, oneshot::channel().0).await
            })
        })
        .await
    }

    async fn serving(
        serve: impl FnOnce(
            tokio::net::TcpListener,
            oneshot::Receiver<()>,
        ) -> tokio::task::JoinHandle<Result<(), server::ServerError>>,
    ) -> Daemon {
        // Bound before the server task starts: connections queue in the backlog, no sleep.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let served = serve(listener, stopped);
        Daemon {
            url,
            stop: Some(stop),
            served: Some(served),
        }
    }

    /// Shuts down gracefully and waits until the daemon has stopped (and released its
    /// data directory).
    pub(crate) async fn stop(mut self) -> Result<(), server::ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.served.take() {
            Some(served) => served.await.unwrap(),
            None => Ok(()),
        }
    }

    pub(crate) fn client(&self) -> Client {
        Client::connect(&self.url).unwrap()
    }
}

pub(crate) fn corpus(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/corpus")
        .join(rel)
}

pub(crate) fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// Reads an LCOV file into coverage by path, with path rules applied.
pub(crate) fn read_lcov(path: &Path, rules: &PathRules) -> Coverage {
    let mut reader = lcov::Reader::new(BufReader::new(File::open(path).unwrap()));
    let mut coverage = Coverage::default();
    while let Some(r) = reader.next_record().unwrap() {
        coverage.add(&rules.apply(&r.path), &r.file);
    }
    coverage
}

pub(crate) fn parse_lcov_bytes(bytes: &[u8]) -> Coverage {
    let mut reader = lcov::Reader::new(bytes);
    let mut coverage = Coverage::default();
    while let Some(r) = reader.next_record().unwrap() {
        coverage.add(&r.path, &r.file);
    }
    coverage
}

/// Pushes one coverage set as a shard, through the real client.
pub(crate) async fn push(
    client: &mut Client,
    run: &str,
    shard: &str,
    attempt: u32,
    coverage: Coverage,
) -> PushReport {
    try_push(client, run, shard, attempt, coverage)
        .await
        .unwrap()
}

pub(crate) async fn try_push(
    client: &mut Client,
    run: &str,
    shard: &str,
    attempt: u32,
    coverage: Coverage,
) -> Result<PushReport, covd::client::ClientError> {
    let (tx, rx) = mpsc::channel(4);
    let feeder = tokio::spawn(async move {
        let mut batcher = Batcher::default();
        for (path, file) in coverage.files {
            if let Some(d) = batcher.push(path, file) {
                let _ = tx.send(PushInput::Delta(d)).await;
            }
        }
        if let Some(d) = batcher.finish() {
            let _ = tx.send(PushInput::Delta(d)).await;
        }
        let _ = tx.send(PushInput::Done(None)).await;
    });
    let target = PushTarget {
        run_id: run.into(),
        shard_id: shard.into(),
        attempt,
        ..PushTarget::default()
    };
    let result = client.push(&target, rx, &PushOptions::default()).await;
    feeder.await.unwrap();
    result
}

pub(crate) async fn fetch(
    client: &mut Client,
    run: &str,
) -> (covd::service::ExportHeader, Coverage) {
    let mut out = Vec::new();
    let header = client
        .export(run, Some(std::time::Duration::from_secs(30)), &mut out)
        .await
        .unwrap();
    (header, parse_lcov_bytes(&out))
}

/// What a user compares between two merges of the same files: per file, the executable and
/// covered lines, the functions hit, and per line the number of branches and of branches taken.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    pub(crate) lines: Vec<u32>,
    pub(crate) covered: Vec<u32>,
    pub(crate) functions_hit: BTreeSet<String>,
    pub(crate) functions: BTreeSet<String>,
    /// line -> (branches, branches whose block ran, branches taken)
    pub(crate) branches_per_line: BTreeMap<u32, (usize, usize, usize)>,
}

pub(crate) fn shape(f: &FileCoverage) -> Shape {
    let mut branches_per_line: BTreeMap<u32, (usize, usize, usize)> = BTreeMap::new();
    for (k, taken) in f.branches() {
        let e = branches_per_line.entry(k.line).or_default();
        e.0 += 1;
        if taken.is_some() {
            e.1 += 1;
        }
        if taken.is_some_and(|t| t > 0) {
            e.2 += 1;
        }
    }
    Shape {
        lines: f.lines().iter().collect(),
        covered: f.covered().iter().collect(),
        functions_hit: f
            .functions()
            .iter()
            .filter(|x| x.hits > 0)
            .map(|x| x.name.to_string())
            .collect(),
        functions: f.functions().iter().map(|x| x.name.to_string()).collect(),
        branches_per_line,
    }
}

/// Asserts two merges agree file by file (as sets; counts are compared by the caller).
pub(crate) fn assert_same_shapes(ours: &Coverage, oracle: &Coverage) {
    let our_paths: Vec<_> = ours.files.keys().collect();
    let oracle_paths: Vec<_> = oracle.files.keys().collect();
    assert_eq!(our_paths, oracle_paths, "the merged files differ");
    for (path, theirs) in &oracle.files {
        assert_eq!(shape(&ours.files[path]), shape(theirs), "file {path}");
    }
}

/// Asserts two merges hold the same files, each with the same lines and counts.
pub(crate) fn assert_same_lines(ours: &Coverage, theirs: &Coverage) {
    assert_eq!(
        ours.files.keys().collect::<Vec<_>>(),
        theirs.files.keys().collect::<Vec<_>>(),
        "the files differ"
    );
    for (path, t) in &theirs.files {
        assert_eq!(
            ours.files[path].line_hits().collect::<Vec<_>>(),
            t.line_hits().collect::<Vec<_>>(),
            "{path}"
        );
    }
}

/// How long health takes to answer a fresh connection from 127.0.0.1 (health checking needs no token).
pub(crate) async fn health_latency(url: &str) -> std::time::Duration {
    let started = std::time::Instant::now();
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    started.elapsed()
}

/// Reads from `c` into `got` until it holds `what` (within 10 s, and before the connection
/// closes); everything read so far, as text.
pub(crate) async fn read_until(
    c: &mut tokio::net::TcpStream,
    got: &mut Vec<u8>,
    what: &str,
) -> String {
    use tokio::io::AsyncReadExt as _;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !String::from_utf8_lossy(got).contains(what) {
        let mut buf = [0; 4096];
        let n = tokio::time::timeout_at(deadline, c.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what:?} within 10 s: {}", String::from_utf8_lossy(got)))
            .unwrap();
        assert!(
            n > 0,
            "closed before {what:?}: {}",
            String::from_utf8_lossy(got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(got).into_owned()
}
