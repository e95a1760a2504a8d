//! The storage contract (`covd::persist::Storage`), written once and run against every backend:
//! the embedded SQLite store and the in-memory store (and, when it exists, the cluster's
//! PostgreSQL + object storage). A "restart" opens the backend again as a new daemon would
//! find it: the SQLite store reopened from its directory, the in-memory store as the same
//! instance (what it promises lasts as long as the process).
//!
//! The first half drives the trait directly (what is committed reads back, and nothing else);
//! the second drives a real daemon over the backend (restarts, attempts, compaction, expiry,
//! a failed write, shutdown). The kill -9 rounds (`durability.rs`) need a backend that
//! outlives the process, so they run against `covd serve --data-dir` only.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use covd::model::{FileBuilder, FileCoverage};
use covd::persist::codec::{encode_files, encode_shard_lines};
use covd::persist::{
    AttemptRecord, HistoryQuery, MemoryStore, Parts, RunRecord, ShardRecord, SqliteStore, Storage,
    SummaryRecord, Write,
};
use covd::rpc::proto;
use covd::server::Settings;
use covd::service::{CoverageService, Delta, Limits, RunParams, ShardHeader};
use roaring::RoaringBitmap;
use tonic::Code;

use crate::ingest::{Stream, raw};
use crate::support::*;

/// A storage backend under test.
pub(crate) enum Backend {
    Sqlite {
        dir: tempfile::TempDir,
        max_bytes: Option<u64>,
    },
    Memory(Arc<MemoryStore>),
    /// The cluster's stores: a PostgreSQL and an S3 server of the test's own.
    #[cfg(feature = "cluster")]
    Cluster {
        postgres: crate::services::Postgres,
        s3: crate::services::S3,
    },
}

impl Backend {
    fn sqlite(max_bytes: Option<u64>) -> Backend {
        Backend::Sqlite {
            dir: tempfile::tempdir().unwrap(),
            max_bytes,
        }
    }

    fn memory(max_bytes: Option<u64>) -> Backend {
        Backend::Memory(Arc::new(
            MemoryStore::new(max_bytes).with_wire_decoder(covd::rpc::convert::wire_delta_files),
        ))
    }

    #[cfg(feature = "cluster")]
    fn cluster(max_bytes: Option<u64>) -> Backend {
        assert!(max_bytes.is_none(), "the cluster's stores have no cap");
        Backend::Cluster {
            postgres: crate::services::Postgres::start(),
            s3: crate::services::S3::start(),
        }
    }

    /// The storage as a daemon starting now finds it. The previous one must be closed.
    fn open(&self) -> Arc<dyn Storage> {
        match self {
            Backend::Sqlite { dir, max_bytes } => Arc::new(
                SqliteStore::open_with(dir.path(), *max_bytes)
                    .unwrap()
                    .with_wire_decoder(covd::rpc::convert::wire_delta_files),
            ),
            Backend::Memory(store) => store.clone(),
            #[cfg(feature = "cluster")]
            Backend::Cluster { postgres, s3 } => tokio::task::block_in_place(|| {
                let segments =
                    covd::cluster::Segments::connect("s3://covd/suite", s3.options()).unwrap();
                let store = tokio::runtime::Handle::current()
                    .block_on(covd::cluster::ClusterStore::connect(
                        "suite",
                        &postgres.url,
                        segments,
                    ))
                    .unwrap();
                Arc::new(store.with_wire_decoder(covd::rpc::convert::wire_delta_files))
            }),
        }
    }

    async fn daemon(&self) -> Daemon {
        Daemon::on(Settings::default(), self.open()).await
    }

    fn service(&self) -> (CoverageService, covd::service::Recovery) {
        self.service_with(Limits::default())
    }

    /// Opening recovers, which is blocking work (as the daemon does it, off the async threads).
    fn service_with(&self, limits: Limits) -> (CoverageService, covd::service::Recovery) {
        tokio::task::block_in_place(|| CoverageService::open(limits, self.open()).unwrap())
    }
}

type Make = fn(Option<u64>) -> Backend;

/// Runs each case against each backend, as a test of its own (`storage::sqlite::case`); the
/// cases after `capped:` check `--max-db-bytes`, which the cluster's stores do not have (their
/// quotas are their operators').
macro_rules! every_backend {
    ($($case:ident),* $(,)?; capped: $($capped:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Backend::sqlite).await
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $capped() {
                    super::$capped(super::Backend::sqlite).await
                }
            )*
        }
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Backend::memory).await
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $capped() {
                    super::$capped(super::Backend::memory).await
                }
            )*
        }
        #[cfg(feature = "cluster")]
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Backend::cluster).await
                }
            )*
        }
    };
}

every_backend!(
    committed_writes_read_back_after_a_restart,
    writes_for_a_run_that_is_not_stored_are_dropped,
    a_new_attempt_drops_the_deltas_of_earlier_ones,
    compaction_keeps_merged_files_shard_lines_and_a_summary,
    a_compaction_may_keep_the_deltas_for_a_reopening,
    source_texts_are_shared_and_go_with_their_last_run,
    deleting_a_run_keeps_or_drops_its_summary,
    a_restarted_daemon_answers_for_complete_and_open_runs,
    a_higher_attempt_replaces_the_earlier_one_across_a_restart,
    expired_runs_keep_their_summary,
    history_selects_and_folds_old_runs_into_months,
    test_histories_follow_their_runs,
    complete_runs_leave_memory_and_still_answer,
    a_push_keeps_its_attempt_across_a_restart,
    shutdown_ends_open_streams_so_clients_resume;
    capped:
    a_write_beyond_the_cap_commits_nothing,
    a_daemon_refuses_a_delta_beyond_the_cap,
);

fn run(id: &str) -> RunRecord {
    RunRecord {
        run_id: id.into(),
        project: "acme/shop".into(),
        flags: vec!["unit".into()],
        expected_shards: vec!["0".into(), "1".into()],
        created_at_ms: 1_700_000_000_000,
        ..RunRecord::default()
    }
}

fn shard(id: &str, attempt: u32, last_seq: u64) -> ShardRecord {
    ShardRecord {
        shard_id: id.into(),
        expected: true,
        attempt,
        last_seq,
        ..ShardRecord::default()
    }
}

/// A delta of one file whose only line is `line`, hit `hits` times.
fn body(path: &str, line: u32, hits: u64) -> Vec<Bytes> {
    vec![encode_files([(path, &one_line(line, hits))]).into()]
}

fn one_line(line: u32, hits: u64) -> FileCoverage {
    let mut b = FileBuilder::new();
    b.line(line, hits);
    b.build()
}

fn append(run_id: &str, shard_id: &str, attempt: u32, seq: u64, line: u32) -> Write {
    Write::AppendDelta {
        run_id: run_id.into(),
        shard: shard(shard_id, attempt, seq),
        body: body("a.c", line, 1),
    }
}

/// The deltas stored for the attempts, as (shard, the line each one covers).
fn deltas(
    storage: &dyn Storage,
    run_id: &str,
    attempts: &[(&str, u32, u64)],
) -> Vec<(String, u32)> {
    let attempts: Vec<(String, u32, u64)> = attempts
        .iter()
        .map(|(s, a, q)| (s.to_string(), *a, *q))
        .collect();
    let mut out = Vec::new();
    storage
        .for_each_delta(run_id, &attempts, &mut |shard, batch| {
            for (_, file) in batch.to_files() {
                out.extend(file.lines().iter().map(|l| (shard.to_owned(), l)));
            }
        })
        .unwrap();
    out
}

async fn write(storage: &dyn Storage, writes: Vec<Write>) {
    storage.write(writes).await.unwrap();
}

async fn committed_writes_read_back_after_a_restart(make: Make) {
    let backend = make(None);
    {
        let storage = backend.open();
        assert!(storage.failure().is_none());
        write(&*storage, vec![Write::PutRun(run("r"))]).await;
        storage
            .write(vec![
                Write::PutShard {
                    run_id: "r".into(),
                    shard: shard("1", 1, 0),
                },
                Write::PutFiles {
                    run_id: "r".into(),
                    files: vec!["a.c".into(), "b.c".into()],
                },
            ])
            .await
            .unwrap();
        // From a blocking thread too, as the ingest path commits deltas.
        let blocking = storage.clone();
        tokio::task::spawn_blocking(move || {
            for seq in 1..=3 {
                blocking
                    .write_blocking(vec![append("r", "0", 1, seq, 10 + seq as u32)])
                    .unwrap();
            }
        })
        .await
        .unwrap();
        let mut done = run("r");
        done.completed_at_ms = Some(1_700_000_000_500);
        write(&*storage, vec![Write::UpdateRun(done)]).await;
    }
    let storage = backend.open();
    let runs = storage.load_runs().unwrap();
    assert_eq!(runs.len(), 1);
    let loaded = &runs[0];
    let mut want = run("r");
    want.completed_at_ms = Some(1_700_000_000_500);
    assert_eq!(loaded.run, want);
    assert_eq!(loaded.shards, [shard("0", 1, 3), shard("1", 1, 0)]);
    assert!(!loaded.compacted);
    assert_eq!(
        loaded.files.as_deref(),
        Some(&["a.c".to_owned(), "b.c".to_owned()][..])
    );
    // In order, and none beyond the sequence asked for (what was acknowledged).
    assert_eq!(
        deltas(&*storage, "r", &[("0", 1, 3)]),
        [("0".into(), 11), ("0".into(), 12), ("0".into(), 13)]
    );
    assert_eq!(
        deltas(&*storage, "r", &[("0", 1, 2), ("1", 1, 0)]),
        [("0".into(), 11), ("0".into(), 12)]
    );
    assert!(deltas(&*storage, "r", &[("0", 2, 3)]).is_empty());
}

async fn writes_for_a_run_that_is_not_stored_are_dropped(make: Make) {
    let backend = make(None);
    let storage = backend.open();
    write(
        &*storage,
        vec![
            append("nowhere", "0", 1, 1, 1),
            Write::UpdateRun(run("nowhere")),
            Write::PutShard {
                run_id: "nowhere".into(),
                shard: shard("0", 1, 1),
            },
            Write::PutShardLines {
                run_id: "nowhere".into(),
                shard_id: "0".into(),
                parts: vec![encode_shard_lines([])],
            },
        ],
    )
    .await;
    assert!(storage.load_runs().unwrap().is_empty());
    assert!(deltas(&*storage, "nowhere", &[("0", 1, 1)]).is_empty());
    let stored = storage.for_each_shard_lines("nowhere", "0", &mut |_| {});
    assert!(!stored.unwrap());
    // A run deleted while a write for it was on its way: the write does not bring it back.
    write(&*storage, vec![Write::PutRun(run("gone"))]).await;
    write(
        &*storage,
        vec![Write::DeleteRun {
            run_id: "gone".into(),
            summary: None,
        }],
    )
    .await;
    write(&*storage, vec![append("gone", "0", 1, 1, 1)]).await;
    assert!(storage.load_runs().unwrap().is_empty());
    assert!(deltas(&*storage, "gone", &[("0", 1, 1)]).is_empty());
}

async fn a_new_attempt_drops_the_deltas_of_earlier_ones(make: Make) {
    let backend = make(None);
    {
        let storage = backend.open();
        write(&*storage, vec![Write::PutRun(run("r"))]).await;
        write(&*storage, vec![append("r", "0", 1, 1, 1)]).await;
        write(&*storage, vec![append("r", "0", 1, 2, 2)]).await;
        write(&*storage, vec![append("r", "1", 1, 1, 7)]).await;
        write(
            &*storage,
            vec![Write::StartAttempt {
                run_id: "r".into(),
                shard: shard("0", 2, 0),
                replaced: Some(AttemptRecord {
                    shard_id: "0".into(),
                    attempt: 1,
                    last_seq: 2,
                    lines: encode_shard_lines([("a.c", &RoaringBitmap::from([1, 2]))]),
                    ..AttemptRecord::default()
                }),
            }],
        )
        .await;
        write(&*storage, vec![append("r", "0", 2, 1, 5)]).await;
    }
    let storage = backend.open();
    assert!(deltas(&*storage, "r", &[("0", 1, 2)]).is_empty());
    assert_eq!(
        deltas(&*storage, "r", &[("0", 2, 1), ("1", 1, 1)]),
        [("0".into(), 5), ("1".into(), 7)]
    );
    let loaded = storage.load_runs().unwrap();
    assert_eq!(loaded[0].shards, [shard("0", 2, 1), shard("1", 1, 1)]);
    // What is kept of the replaced attempt, until the run goes.
    let kept = storage.attempts("r").unwrap();
    assert_eq!(
        kept.iter()
            .map(|a| (a.attempt, a.last_seq))
            .collect::<Vec<_>>(),
        [(1, 2)]
    );
    assert_eq!(
        covd::persist::codec::decode_shard_lines(&kept[0].lines).unwrap(),
        [(Arc::from("a.c"), RoaringBitmap::from([1, 2]))]
    );
    write(
        &*storage,
        vec![Write::DeleteRun {
            run_id: "r".into(),
            summary: None,
        }],
    )
    .await;
    assert!(storage.attempts("r").unwrap().is_empty());
}

fn summary(run_id: &str, files: u64) -> SummaryRecord {
    SummaryRecord {
        run_id: run_id.into(),
        project: "acme/shop".into(),
        created_at_ms: 1_700_000_000_000 + files,
        files,
        lines: 10 * files,
        ..SummaryRecord::default()
    }
}

fn merged_first() -> (&'static str, FileCoverage) {
    ("a.c", one_line(3, 9))
}

async fn compaction_keeps_merged_files_shard_lines_and_a_summary(make: Make) {
    let backend = make(None);
    let merged = [("a.c", one_line(3, 9)), ("b.c", one_line(4, 0))];
    let lines = |l: &[u32]| -> RoaringBitmap { l.iter().copied().collect() };
    let (a, b) = (lines(&[3, 5]), lines(&[1]));
    {
        let storage = backend.open();
        write(&*storage, vec![Write::PutRun(run("r"))]).await;
        write(&*storage, vec![append("r", "0", 1, 1, 1)]).await;
        // A compaction whose encoder stopped before its last part stores nothing of it.
        let (tx, cut) = Parts::channel(1);
        let encoder = std::thread::spawn(move || {
            tx.send(encode_files([(merged_first().0, &merged_first().1)]));
        });
        let failed = storage
            .write(vec![Write::Compact {
                run_id: "r".into(),
                parts: cut,
                summary: summary("r", 1),
                keep_deltas: false,
            }])
            .await;
        encoder.join().unwrap();
        assert!(failed.is_err());
    }
    {
        let storage = backend.open();
        assert!(!storage.load_runs().unwrap()[0].compacted);
        assert_eq!(deltas(&*storage, "r", &[("0", 1, 1)]).len(), 1);
        assert!(
            storage
                .summaries(&HistoryQuery::latest(10))
                .unwrap()
                .is_empty()
        );
        // Shard lines, a shard per write; a second write for a shard replaces its lines.
        let put = |shard: &str, parts: Vec<Vec<u8>>| Write::PutShardLines {
            run_id: "r".into(),
            shard_id: shard.into(),
            parts,
        };
        write(
            &*storage,
            vec![put("0", vec![encode_shard_lines([("c.c", &b)])])],
        )
        .await;
        let zero = vec![
            encode_shard_lines([("a.c", &a)]),
            encode_shard_lines([("b.c", &b)]),
        ];
        write(&*storage, vec![put("0", zero)]).await;
        write(&*storage, vec![put("1", vec![encode_shard_lines([])])]).await;
        write(
            &*storage,
            vec![Write::Compact {
                run_id: "r".into(),
                parts: Parts::of(vec![
                    encode_files([(merged[0].0, &merged[0].1)]),
                    encode_files([(merged[1].0, &merged[1].1)]),
                ]),
                summary: summary("r", 2),
                keep_deltas: false,
            }],
        )
        .await;
    }
    let storage = backend.open();
    let loaded = storage.load_runs().unwrap();
    assert!(loaded[0].compacted);
    assert!(deltas(&*storage, "r", &[("0", 1, 1)]).is_empty());
    let mut parts = Vec::new();
    storage
        .for_each_merged("r", &mut |files| parts.push(files))
        .unwrap();
    assert_eq!(parts.len(), 2);
    for (part, (path, file)) in parts.iter().zip(&merged) {
        assert_eq!(part.len(), 1);
        assert_eq!((&*part[0].0, &part[0].1), (*path, file));
    }
    assert_eq!(
        storage.summaries(&HistoryQuery::latest(10)).unwrap(),
        [summary("r", 2)]
    );
    // Each shard's lines, in its parts' order; a shard stored empty is told from one never
    // stored.
    let shard = |id: &str| {
        let mut files = Vec::new();
        let stored = storage
            .for_each_shard_lines("r", id, &mut |part| files.extend(part))
            .unwrap();
        (stored, files)
    };
    assert_eq!(
        shard("0"),
        (true, vec![("a.c".into(), a), ("b.c".into(), b)])
    );
    assert_eq!(shard("1"), (true, Vec::new()));
    assert_eq!(shard("2"), (false, Vec::new()));
    write(
        &*storage,
        vec![Write::DeleteRun {
            run_id: "r".into(),
            summary: None,
        }],
    )
    .await;
    assert_eq!(shard("0"), (false, Vec::new()));
}

/// A compaction may keep the run's deltas (for a retry that reopens it): then both its merged
/// files and its deltas read back, until `DropDeltas` drops the deltas or `Reopen` the merged
/// files.
async fn a_compaction_may_keep_the_deltas_for_a_reopening(make: Make) {
    let backend = make(None);
    let compact = |files: u64| Write::Compact {
        run_id: "r".into(),
        parts: Parts::of(vec![encode_files([(merged_first().0, &merged_first().1)])]),
        summary: summary("r", files),
        keep_deltas: true,
    };
    {
        let storage = backend.open();
        write(&*storage, vec![Write::PutRun(run("r"))]).await;
        write(&*storage, vec![append("r", "0", 1, 1, 1)]).await;
        let complete = RunRecord {
            completed_at_ms: Some(1_700_000_000_000),
            deltas_kept: true,
            ..run("r")
        };
        write(&*storage, vec![Write::UpdateRun(complete), compact(1)]).await;
        // A copy of the record from before (an `open` of the run at the same time) does not
        // undo its completion or its kept deltas.
        write(&*storage, vec![Write::PutRun(run("r"))]).await;
    }
    {
        let storage = backend.open();
        let loaded = &storage.load_runs().unwrap()[0];
        assert!(loaded.compacted);
        assert_eq!(
            (loaded.run.completed_at_ms, loaded.run.deltas_kept),
            (Some(1_700_000_000_000), true)
        );
        assert_eq!(deltas(&*storage, "r", &[("0", 1, 1)]).len(), 1, "kept");
        // Reopened: no merged files, the deltas as they were, and new ones after them.
        write(&*storage, vec![Write::Reopen { run_id: "r".into() }]).await;
        write(&*storage, vec![append("r", "0", 1, 2, 2)]).await;
    }
    {
        let storage = backend.open();
        assert!(!storage.load_runs().unwrap()[0].compacted);
        let mut merged = 0;
        storage.for_each_merged("r", &mut |_| merged += 1).unwrap();
        assert_eq!(merged, 0);
        assert_eq!(deltas(&*storage, "r", &[("0", 1, 2)]).len(), 2);
        write(&*storage, vec![compact(2)]).await;
        write(&*storage, vec![Write::DropDeltas { run_id: "r".into() }]).await;
    }
    let storage = backend.open();
    let loaded = storage.load_runs().unwrap();
    assert!(loaded[0].compacted);
    assert!(deltas(&*storage, "r", &[("0", 1, 2)]).is_empty(), "dropped");
    let mut merged = Vec::new();
    storage
        .for_each_merged("r", &mut |files| merged.extend(files))
        .unwrap();
    assert_eq!(merged.len(), 1);
    assert_eq!(
        storage.summaries(&HistoryQuery::latest(10)).unwrap(),
        [summary("r", 2)]
    );
}

/// Source texts are kept once, under their digest, while some run names them.
async fn source_texts_are_shared_and_go_with_their_last_run(make: Make) {
    let backend = make(None);
    let (a, b) = (b"int main() {}\n".to_vec(), b"x = 1\n".to_vec());
    let (da, db) = (covd::service::digest_of(&a), covd::service::digest_of(&b));
    let put = |run: &str, texts: Vec<([u8; 32], Vec<u8>)>, names: &[(&str, [u8; 32])]| {
        Write::PutSources {
            run_id: run.into(),
            texts: texts
                .into_iter()
                .map(|(d, t)| (d, covd::persist::codec::encode_source(&t)))
                .collect(),
            names: names.iter().map(|(p, d)| (p.to_string(), *d)).collect(),
        }
    };
    {
        let storage = backend.open();
        assert_eq!(storage.missing_sources(&[da, db]).unwrap(), [true, true]);
        for id in ["r1", "r2"] {
            write(&*storage, vec![Write::PutRun(run(id))]).await;
        }
        write(
            &*storage,
            vec![put("r1", vec![(da, a.clone())], &[("m.c", da)])],
        )
        .await;
        // The second run names the same text and sends only the new one.
        write(
            &*storage,
            vec![put(
                "r2",
                vec![(db, b.clone())],
                &[("m.c", da), ("x.py", db)],
            )],
        )
        .await;
        // A run that is not stored names nothing.
        write(&*storage, vec![put("gone", vec![], &[("m.c", da)])]).await;
    }
    let storage = backend.open();
    assert_eq!(storage.missing_sources(&[da, db]).unwrap(), [false, false]);
    assert_eq!(storage.source("r1", "m.c").unwrap(), Some((da, a.clone())));
    assert_eq!(storage.source("r2", "x.py").unwrap(), Some((db, b.clone())));
    assert_eq!(storage.source("r1", "x.py").unwrap(), None);
    assert_eq!(storage.source("gone", "m.c").unwrap(), None);
    let paths = ["m.c".to_owned(), "x.py".to_owned()];
    assert_eq!(
        storage.source_digests("r1", &paths).unwrap(),
        [Some(da), None]
    );
    let delete = |run: &str| Write::DeleteRun {
        run_id: run.into(),
        summary: None,
    };
    write(&*storage, vec![delete("r2")]).await;
    assert_eq!(
        storage.missing_sources(&[da, db]).unwrap(),
        [false, true],
        "r1 still names m.c's text; nobody names x.py's"
    );
    write(&*storage, vec![delete("r1")]).await;
    assert_eq!(storage.missing_sources(&[da]).unwrap(), [true]);
}

async fn deleting_a_run_keeps_or_drops_its_summary(make: Make) {
    let backend = make(None);
    {
        let storage = backend.open();
        for id in ["kept", "dropped", "live"] {
            write(&*storage, vec![Write::PutRun(run(id))]).await;
        }
        // "dropped" has a summary before it is deleted without one.
        write(
            &*storage,
            vec![Write::Compact {
                run_id: "dropped".into(),
                parts: Parts::of(Vec::new()),
                summary: summary("dropped", 3),
                keep_deltas: false,
            }],
        )
        .await;
        write(
            &*storage,
            vec![
                Write::DeleteRun {
                    run_id: "kept".into(),
                    summary: Some(summary("kept", 1)),
                },
                Write::DeleteRun {
                    run_id: "dropped".into(),
                    summary: None,
                },
            ],
        )
        .await;
    }
    let storage = backend.open();
    let ids: Vec<String> = storage
        .load_runs()
        .unwrap()
        .into_iter()
        .map(|r| r.run.run_id)
        .collect();
    assert_eq!(ids, ["live"]);
    assert_eq!(
        storage.summaries(&HistoryQuery::latest(10)).unwrap(),
        [summary("kept", 1)]
    );
    // Newest first, and no more than asked for.
    write(
        &*storage,
        vec![Write::DeleteRun {
            run_id: "live".into(),
            summary: Some(summary("live", 5)),
        }],
    )
    .await;
    assert_eq!(
        storage.summaries(&HistoryQuery::latest(1)).unwrap(),
        [summary("live", 5)]
    );
}

/// A durable backend latches after a failed write (it never retries an fsync and carries on);
/// the in-memory store, which has no fsync to distrust, refuses only the write beyond its cap.
async fn a_write_beyond_the_cap_commits_nothing(make: Make) {
    let backend = make(Some(160 * 1024));
    let storage = backend.open();
    write(&*storage, vec![Write::PutRun(run("r"))]).await;
    write(&*storage, vec![append("r", "0", 1, 1, 1)]).await;
    let big: Vec<(String, FileCoverage)> = (0..10_000)
        .map(|i| (format!("f{i}.c"), one_line(1 + i, 1)))
        .collect();
    storage
        .write(vec![Write::AppendDelta {
            run_id: "r".into(),
            shard: shard("0", 1, 2),
            body: vec![encode_files(big.iter().map(|(p, f)| (p.as_str(), f))).into()],
        }])
        .await
        .unwrap_err();
    // What was committed before is intact; the refused delta is not there.
    assert_eq!(deltas(&*storage, "r", &[("0", 1, 2)]), [("0".into(), 1)]);
    let runs = storage.load_runs().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].shards, [shard("0", 1, 1)]);
    let later = storage.write(vec![Write::PutRun(run("other"))]).await;
    if storage.is_durable() {
        assert!(storage.failure().is_some());
        // However small, and whatever it is: nothing more is committed.
        let e = later.unwrap_err();
        assert!(e.to_string().contains("the store failed"), "{e}");
        assert_eq!(storage.load_runs().unwrap().len(), 1);
    } else {
        assert!(storage.failure().is_none());
        later.unwrap();
        assert_eq!(storage.load_runs().unwrap().len(), 2);
    }
}

async fn a_restarted_daemon_answers_for_complete_and_open_runs(make: Make) {
    let backend = make(None);
    let daemon = backend.daemon().await;
    let mut client = daemon.client();
    let two = RunParams {
        expected_shards: vec!["1".into(), "2".into()],
        ..RunParams::default()
    };
    client.open_run("done", two.clone()).await.unwrap();
    client.open_run("open", two).await.unwrap();
    for (run, shard) in [("done", 1), ("done", 2), ("open", 1)] {
        let c = read_lcov(
            &fixture(&format!("gcc-lcov/shard{shard}.info")),
            &Default::default(),
        );
        push(&mut client, run, &shard.to_string(), 1, c).await;
    }
    let (_, done_before) = fetch(&mut client, "done").await;
    let open_before = client.status("open").await.unwrap();
    client.open_run("gone", RunParams::default()).await.unwrap();
    client.delete_run("gone").await.unwrap();
    daemon.stop().await.unwrap();

    let daemon = backend.daemon().await;
    let mut client = daemon.client();
    let (header, done_after) = fetch(&mut client, "done").await;
    assert!(header.complete);
    assert_eq!(done_after, done_before);
    let path = done_before.files.keys().next().unwrap();
    assert_eq!(
        &client.file("done", path).await.unwrap(),
        &done_before.files[path]
    );
    let open_after = client.status("open").await.unwrap();
    assert_eq!(open_after.totals, open_before.totals);
    assert_eq!(open_after.missing_shards, vec!["2"]);
    assert!(
        client.status("gone").await.is_err(),
        "a deleted run stays deleted"
    );
    // The open run resumes: its last shard completes it.
    let c = read_lcov(&fixture("gcc-lcov/shard2.info"), &Default::default());
    push(&mut client, "open", "2", 1, c).await;
    assert_eq!(fetch(&mut client, "open").await.1, done_before);
    daemon.stop().await.unwrap();

    // After another restart (the runs compacted, at the latest by the restart's recovery) the
    // complete runs start in storage, not in memory, and answer the same when read.
    let daemon = backend.daemon().await;
    let mut client = daemon.client();
    assert_eq!(fetch(&mut client, "open").await.1, done_before);
    assert_eq!(fetch(&mut client, "done").await.1, done_before);
    daemon.stop().await.unwrap();
}

async fn a_higher_attempt_replaces_the_earlier_one_across_a_restart(make: Make) {
    let backend = make(None);
    let daemon = backend.daemon().await;
    let mut client = daemon.client();
    let two = RunParams {
        expected_shards: vec!["1".into(), "2".into()],
        ..RunParams::default()
    };
    client.open_run("r", two).await.unwrap();
    let shard = |n: u32| {
        read_lcov(
            &fixture(&format!("gcc-lcov/shard{n}.info")),
            &Default::default(),
        )
    };
    push(&mut client, "r", "1", 1, shard(3)).await;
    daemon.stop().await.unwrap();

    let daemon = backend.daemon().await;
    let mut client = daemon.client();
    // Attempt 2 of shard 1 sends shard1.info instead: nothing of attempt 1 stays.
    push(&mut client, "r", "1", 2, shard(1)).await;
    push(&mut client, "r", "2", 1, shard(2)).await;
    let (header, merged) = fetch(&mut client, "r").await;
    assert!(header.complete);
    let mut want = shard(1);
    want.merge(&shard(2));
    assert_eq!(merged, want);
    daemon.stop().await.unwrap();

    let daemon = backend.daemon().await;
    assert_eq!(fetch(&mut daemon.client(), "r").await.1, want);
    daemon.stop().await.unwrap();
}

async fn a_daemon_refuses_a_delta_beyond_the_cap(make: Make) {
    let backend = make(Some(160 * 1024));
    let durable = backend.open().is_durable();
    let daemon = backend.daemon().await;
    let mut c = raw(&daemon.url).await;
    let (mut s, _) = Stream::open(&mut c, "r", "s", 1).await.unwrap();
    s.delta(1, vec![crate::ingest::file("small.c", &[(1, 1)])])
        .await
        .unwrap();
    // Far more than the cap: the commit fails.
    let big: Vec<proto::FileDelta> = (0..400)
        .map(|i| {
            crate::ingest::file(
                &format!("f{i}.c"),
                &(1..200).map(|l| (l, 1)).collect::<Vec<_>>(),
            )
        })
        .collect();
    let e = s.delta(2, big).await.unwrap_err();
    let later = daemon
        .client()
        .open_run("other", RunParams::default())
        .await;
    if durable {
        assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
        // From now on nothing is acknowledged, however small: no retry of a failed write.
        let e = later.unwrap_err();
        assert!(e.to_string().contains("the store failed"), "{e}");
    } else {
        assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
        assert!(e.message().contains("--max-db-bytes"), "{}", e.message());
        later.unwrap();
    }
    // Nothing of the refused delta reached memory either.
    let status = daemon.client().status("r").await.unwrap();
    assert_eq!(status.totals.files, 1);
}

async fn expired_runs_keep_their_summary(make: Make) {
    let backend = make(None);
    let (service, _) = backend.service();
    service
        .open_run(
            "old",
            RunParams {
                project: "shop".into(),
                ..RunParams::default()
            },
        )
        .await
        .unwrap();
    let session = service
        .begin_shard(ShardHeader {
            run_id: "old".into(),
            shard_id: "0".into(),
            attempt: 1,
            params: RunParams::default(),
            session: Vec::new(),
        })
        .await
        .unwrap();
    let files: Vec<(String, FileCoverage)> = ["a.c", "b.c", "c.c"]
        .iter()
        .map(|p| (p.to_string(), one_line(1, 1)))
        .collect();
    service
        .apply(
            &session,
            Delta {
                seq: 1,
                files: covd::model::FileBatch::of_files(&files),
                ..Delta::default()
            },
        )
        .await
        .unwrap();
    service.finish(&session, 1, None).await.unwrap();
    drop(session);
    let expired = service
        .expire_runs(SystemTime::now() + Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(expired, 1);
    assert!(service.run_status("old").is_err());
    let summaries = service.summaries(HistoryQuery::latest(10)).await.unwrap();
    assert_eq!(summaries.len(), 1);
    assert_eq!(
        (summaries[0].run_id.as_str(), summaries[0].project.as_str()),
        ("old", "shop")
    );
    assert_eq!(summaries[0].files, 3);
    drop(service);

    // After a restart the run stays gone and its summary stays.
    let (service, recovery) = backend.service();
    assert_eq!(recovery.runs, 0);
    assert_eq!(
        service
            .summaries(HistoryQuery::latest(10))
            .await
            .unwrap()
            .len(),
        1
    );
}

/// 2026-01-15T00:00:00Z.
const JAN_15: u64 = 1_768_435_200_000;
const DAY: u64 = 86_400_000;

fn dated(run_id: &str, branch: &str, at: u64, covered: u64) -> SummaryRecord {
    SummaryRecord {
        run_id: run_id.into(),
        project: "acme/shop".into(),
        branch: branch.into(),
        created_at_ms: at,
        completed_at_ms: Some(at + 60_000),
        lines: 100,
        lines_covered: covered,
        ..SummaryRecord::default()
    }
}

fn down_sample(before_ms: u64) -> Write {
    Write::DownSample {
        before_ms,
        tests_before_ms: 0,
    }
}

/// Summaries are selected by project, branch and time; down-sampling folds those before the
/// cutoff into their months and drops them, in one write, and a second pass changes nothing.
async fn history_selects_and_folds_old_runs_into_months(make: Make) {
    let backend = make(None);
    let runs = [
        dated("jan-a", "main", JAN_15, 50),
        dated("jan-b", "main", JAN_15 + DAY, 70),
        dated("jan-dev", "dev", JAN_15 + 2 * DAY, 10),
        dated("feb-a", "main", JAN_15 + 20 * DAY, 90),
        SummaryRecord {
            project: "other".into(),
            ..dated("jan-other", "main", JAN_15, 1)
        },
    ];
    let feb_1 = JAN_15 + 17 * DAY;
    {
        let storage = backend.open();
        let writes = runs
            .iter()
            .map(|s| Write::DeleteRun {
                run_id: s.run_id.clone(),
                summary: Some(s.clone()),
            })
            .collect();
        write(&*storage, writes).await;
        // A run still held (its retention is longer than full history) keeps its summary.
        let held = dated("jan-held", "main", JAN_15 + 3 * DAY, 30);
        write(
            &*storage,
            vec![
                Write::DeleteRun {
                    run_id: "jan-held".into(),
                    summary: Some(held),
                },
                Write::PutRun(run("jan-held")),
            ],
        )
        .await;
        let main = HistoryQuery {
            project: Some("acme/shop".into()),
            branch: Some("main".into()),
            limit: 10,
            ..HistoryQuery::default()
        };
        let ids = |q: &HistoryQuery| -> Vec<String> {
            storage
                .summaries(q)
                .unwrap()
                .into_iter()
                .map(|s| s.run_id)
                .collect()
        };
        assert_eq!(ids(&main), ["feb-a", "jan-held", "jan-b", "jan-a"]);
        let january = HistoryQuery {
            since_ms: JAN_15 + 1,
            until_ms: Some(feb_1),
            ..main.clone()
        };
        assert_eq!(ids(&january), ["jan-held", "jan-b"]);
        let every_branch = HistoryQuery {
            branch: None,
            ..main.clone()
        };
        assert_eq!(
            ids(&every_branch),
            ["feb-a", "jan-held", "jan-dev", "jan-b", "jan-a"]
        );

        write(&*storage, vec![down_sample(feb_1)]).await;
        assert_eq!(ids(&every_branch), ["feb-a", "jan-held"]);
        assert_eq!(ids(&HistoryQuery::latest(10)), ["feb-a", "jan-held"]);
    }
    // Kept across a restart; a second pass over the same cutoff changes nothing.
    let storage = backend.open();
    write(&*storage, vec![down_sample(feb_1)]).await;
    let months = storage.history(&HistoryQuery::latest(10)).unwrap().1;
    let got: Vec<_> = months
        .iter()
        .map(|m| (m.project.as_str(), m.branch.as_str(), m.runs))
        .collect();
    assert_eq!(
        got,
        [
            ("acme/shop", "dev", 1),
            ("acme/shop", "main", 2),
            ("other", "main", 1)
        ]
    );
    let main = &months[1];
    assert_eq!(main.month_start_ms, JAN_15 - 14 * DAY);
    let rate = &main.metrics["line_rate"];
    assert_eq!(
        (rate.n, rate.min, rate.max, rate.sum),
        (2, 50.0, 70.0, 120.0)
    );
    assert_eq!((rate.last, rate.last_at_ms), (70.0, JAN_15 + DAY));
    // A month is selected when it overlaps the span asked for.
    let late_january = HistoryQuery {
        project: Some("acme/shop".into()),
        branch: Some("main".into()),
        since_ms: JAN_15 + 10 * DAY,
        until_ms: Some(feb_1 + DAY),
        limit: 10,
    };
    assert_eq!(
        storage.history(&late_january).unwrap().1,
        std::slice::from_ref(main)
    );
    let march = HistoryQuery {
        since_ms: feb_1 + 40 * DAY,
        ..late_january
    };
    assert!(storage.history(&march).unwrap().1.is_empty());
}

/// A run's test outcomes join the histories only while the run is stored, and leave them
/// when it is deleted; down-sampling forgets tests last seen before its cutoff.
async fn test_histories_follow_their_runs(make: Make) {
    use covd::persist::{TestOutcome, TestRunOutcome};
    let backend = make(None);
    let storage = backend.open();
    let outcome = |run: &str, at: u64, o: TestOutcome| TestRunOutcome {
        run_key: crc32fast::hash(run.as_bytes()),
        commit_key: 1,
        at_ms: at,
        outcome: o as i32,
    };
    let record = |run: &str, tests: &[(&str, u64, TestOutcome)]| Write::RecordTests {
        run_id: run.into(),
        project: "acme/shop".into(),
        branch: "main".into(),
        outcomes: tests
            .iter()
            .map(|(t, at, o)| (t.to_string(), outcome(run, *at, *o)))
            .collect(),
    };
    let on_main = |id: &str| RunRecord {
        branch: "main".into(),
        ..run(id)
    };
    write(
        &*storage,
        vec![Write::PutRun(on_main("r1")), Write::PutRun(on_main("r2"))],
    )
    .await;
    write(
        &*storage,
        vec![
            record(
                "r1",
                &[
                    ("t::a", 100, TestOutcome::Failed),
                    ("t::old", 50, TestOutcome::Passed),
                ],
            ),
            record("r2", &[("t::a", 200, TestOutcome::Passed)]),
            // A run that is not stored (deleted meanwhile): dropped.
            record("gone", &[("t::a", 300, TestOutcome::Failed)]),
        ],
    )
    .await;
    let a = |storage: &dyn Storage| -> Vec<i32> {
        let histories = storage.test_histories("acme/shop", "main").unwrap();
        let (_, h) = histories.iter().find(|(t, _)| t == "t::a").unwrap();
        h.recent.iter().map(|r| r.outcome).collect()
    };
    assert_eq!(
        a(&*storage),
        [TestOutcome::Failed as i32, TestOutcome::Passed as i32]
    );
    write(
        &*storage,
        vec![Write::DeleteRun {
            run_id: "r1".into(),
            summary: None,
        }],
    )
    .await;
    assert_eq!(a(&*storage), [TestOutcome::Passed as i32]);
    write(
        &*storage,
        vec![Write::DownSample {
            before_ms: 0,
            tests_before_ms: 60,
        }],
    )
    .await;
    let tests: Vec<String> = storage
        .test_histories("acme/shop", "main")
        .unwrap()
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(tests, ["t::a"]);
}

async fn shutdown_ends_open_streams_so_clients_resume(make: Make) {
    let backend = make(None);
    let daemon = backend.daemon().await;
    let mut c = raw(&daemon.url).await;
    let (mut s, _) = Stream::open(&mut c, "r", "s", 1).await.unwrap();
    s.delta(1, vec![crate::ingest::file("a.c", &[(1, 1)])])
        .await
        .unwrap();
    let stopped = tokio::spawn(daemon.stop());
    // The daemon ends the open stream itself, telling the client to come back.
    let e = s.ended().await.expect("the stream ends with a status");
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("reconnect and resume"), "{e}");
    tokio::time::timeout(Duration::from_secs(30), stopped)
        .await
        .expect("the daemon stops within its grace period")
        .unwrap()
        .unwrap();
    // The acknowledged delta is there after a restart.
    let daemon = backend.daemon().await;
    let mut c = raw(&daemon.url).await;
    let (_, resume) = Stream::open(&mut c, "r", "s", 1).await.unwrap();
    assert_eq!(resume.last_seq, 1);
}

/// Pushes `files` (path, line) as one shard of a new run expecting only it, and finishes it.
async fn complete_run(service: &CoverageService, run_id: &str, files: &[(String, FileCoverage)]) {
    let one = RunParams {
        expected_shards: vec!["0".into()],
        ..RunParams::default()
    };
    service.open_run(run_id, one).await.unwrap();
    let session = service
        .begin_shard(ShardHeader {
            run_id: run_id.into(),
            shard_id: "0".into(),
            attempt: 1,
            params: RunParams::default(),
            session: Vec::new(),
        })
        .await
        .unwrap();
    service
        .apply(
            &session,
            Delta {
                seq: 1,
                files: covd::model::FileBatch::of_files(files),
                ..Delta::default()
            },
        )
        .await
        .unwrap();
    assert!(service.finish(&session, 1, None).await.unwrap().complete);
}

async fn export_lcov(service: &CoverageService, run_id: &str) -> Vec<u8> {
    let mut export = service
        .export(
            run_id,
            covd::service::ExportFormat::Lcov,
            None,
            Default::default(),
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = export.chunks.recv().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

/// A complete run's aggregate is read from storage when asked for, counts against the memory
/// budget, and leaves memory beyond it; a restart loads only open runs.
async fn complete_runs_leave_memory_and_still_answer(make: Make) {
    let backend = make(None);
    let files = |run: u32| -> Vec<(String, FileCoverage)> {
        (0..50)
            .map(|i| (format!("src/f{i}.c"), one_line(1 + i + run, u64::from(run))))
            .collect()
    };
    let mut answers = Vec::new();
    {
        let (service, _) = backend.service();
        for run in 1..=3 {
            let id = format!("r{run}");
            complete_run(&service, &id, &files(run)).await;
            answers.push((
                service.run_status(&id).unwrap().totals,
                service.file(&id, "src/f7.c").await.unwrap(),
                export_lcov(&service, &id).await,
            ));
        }
        service
            .open_run("open", RunParams::default())
            .await
            .unwrap();
    }
    // A budget that holds one of these runs, not two.
    let (probe, recovery) = backend.service();
    assert_eq!((recovery.runs, recovery.complete_runs), (4, 3));
    assert_eq!(recovery.resident_files, 0, "complete runs start in storage");
    assert_eq!(recovery.files, 150);
    assert_eq!(probe.cached_bytes(), (0, 0));
    probe.file("r1", "src/f7.c").await.unwrap();
    let (one_run, runs) = probe.cached_bytes();
    assert_eq!(runs, 1);
    assert!(one_run > 50 * 8, "{one_run} bytes for 50 files");
    drop(probe);

    let limits = Limits {
        memory_budget_bytes: one_run + one_run / 2,
        ..Limits::default()
    };
    let (service, _) = backend.service_with(limits);
    for (i, (totals, file, lcov)) in answers.iter().enumerate() {
        let id = format!("r{}", i + 1);
        // Status and lists come from the summary, without reading the run.
        assert_eq!(&service.run_status(&id).unwrap().totals, totals);
        assert_eq!(&service.file(&id, "src/f7.c").await.unwrap(), file);
        assert_eq!(&export_lcov(&service, &id).await, lcov);
        // Only the run read last stays.
        assert_eq!(service.cached_bytes().1, 1);
    }
    assert_eq!(service.list_runs(10, None).len(), 4);
}

/// The push (session) that writes an attempt is stored with it: after a restart that push
/// resumes, and another one is still refused.
async fn a_push_keeps_its_attempt_across_a_restart(make: Make) {
    let backend = make(None);
    let daemon = backend.daemon().await;
    let mut c = raw(&daemon.url).await;
    let (mut a, _) = Stream::open_as(&mut c, "r", "s", 1, b"push-a")
        .await
        .unwrap();
    a.delta(1, vec![crate::ingest::file("a.c", &[(1, 1)])])
        .await
        .unwrap();
    a.delta(2, vec![crate::ingest::file("a.c", &[(2, 1)])])
        .await
        .unwrap();
    drop(a);
    daemon.stop().await.unwrap();

    let daemon = backend.daemon().await;
    let mut c = raw(&daemon.url).await;
    let Err(e) = Stream::open_as(&mut c, "r", "s", 1, b"push-b").await else {
        panic!("another push took the attempt after a restart");
    };
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");
    let (_, resume) = Stream::open_as(&mut c, "r", "s", 1, b"push-a")
        .await
        .unwrap();
    assert_eq!(resume.last_seq, 2);
    daemon.stop().await.unwrap();
}

/// A directory from before history has a summaries table without the columns history selects
/// by (or, opened by this release and then written by an earlier one, rows with them empty):
/// opening fills them from the records, and history finds those runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summaries_from_before_history_are_found_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("covd.sqlite3");
    let main = HistoryQuery {
        project: Some("acme/shop".into()),
        branch: Some("main".into()),
        limit: 10,
        ..HistoryQuery::default()
    };
    let ids = |storage: &SqliteStore| -> Vec<String> {
        storage
            .summaries(&main)
            .unwrap()
            .into_iter()
            .map(|s| s.run_id)
            .collect()
    };
    {
        let storage = SqliteStore::open(dir.path()).unwrap();
        let writes = ["old", "older"]
            .iter()
            .enumerate()
            .map(|(i, id)| Write::DeleteRun {
                run_id: id.to_string(),
                summary: Some(dated(id, "main", JAN_15 - i as u64 * DAY, 10)),
            })
            .collect();
        write(&storage, writes).await;
        assert_eq!(ids(&storage), ["old", "older"]);
    }
    for damage in [
        // Two of the three columns missing, as in no release, but possible mid-way.
        "DROP INDEX summaries_by_time; DROP INDEX summaries_by_age;
         ALTER TABLE summaries DROP COLUMN branch;
         ALTER TABLE summaries DROP COLUMN created_at_ms;",
        // The columns there, one row written without them.
        "UPDATE summaries SET project = NULL, branch = NULL, created_at_ms = NULL
         WHERE run_id = 'older';",
    ] {
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute_batch(damage)
            .unwrap();
        let storage = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(ids(&storage), ["old", "older"], "after {damage}");
    }
}
