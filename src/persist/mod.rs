//! Durable storage behind one trait, [`Storage`]: what the service commits (groups of
//! [`Write`]s, acknowledged only once durable), what it reads back (the runs to recover, a
//! run's deltas and merged files, summaries for history), and the failure latch (after a
//! failed write, refuse every later one rather than carry on as if data were safe).
//!
//! - [`SqliteStore`] (`sqlite`): the embedded default, SQLite plus a delta log file per run.
//! - [`MemoryStore`] (`memory`): `--in-memory`, the same contract with nothing on disk.
//!
//! Records are protobuf messages (`records`, `codec`); a backend stores them as the opaque
//! blobs `codec` makes, so every backend reads what any release wrote. The contract is checked
//! by one suite run against every backend (`tests/it/storage.rs`).

pub mod codec;
mod legacy;
pub mod log;
pub mod memory;
pub mod records;
pub mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use futures_util::future::BoxFuture;
use roaring::RoaringBitmap;

use crate::model::{FileBatch, FileCoverage};
pub use codec::{CodecError, FORMAT_VERSION, WireDecoder};
pub use memory::MemoryStore;
pub use records::{
    AttemptRecord, MonthRecord, RunRecord, ShardRecord, StatRecord, SummaryRecord, TelemetryRecord,
    TestHistoryRecord, TestOutcome, TestRunOutcome,
};
pub use sqlite::{DB_FILE, SqliteStore};

/// Files per stored part of a compacted run.
pub const FILES_PER_PART: usize = 1000;

/// Durable storage as the service uses it. Implementations commit each call's writes
/// atomically, may group concurrent calls into one commit, and answer a call only once its
/// writes are as durable as the backend makes anything.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Whether committed writes outlive the process (what an acknowledgement promises).
    fn is_durable(&self) -> bool;

    /// Why the store refuses writes, if it does: once a write or commit failed, every later
    /// one is refused with this reason.
    fn failure(&self) -> Option<String>;

    /// Commits `writes` atomically (with whatever else is pending) and resolves once they
    /// are durable.
    fn write(&self, writes: Vec<Write>) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Like [`Storage::write`], from a blocking thread.
    fn write_blocking(&self, writes: Vec<Write>) -> Result<(), StoreError>;

    /// Every stored run with its shards. Blocking.
    fn load_runs(&self) -> Result<Vec<LoadedRun>, StoreError>;

    /// Calls `f` with each stored delta of the given shard attempts (shard, attempt, last
    /// acknowledged sequence), in sequence order per shard, none beyond the acknowledged
    /// sequence. Blocking.
    fn for_each_delta(
        &self,
        run_id: &str,
        attempts: &[(String, u32, u64)],
        f: &mut dyn FnMut(&str, FileBatch),
    ) -> Result<(), StoreError>;

    /// Calls `f` with each part of a compacted run's merged files. Blocking.
    fn for_each_merged(
        &self,
        run_id: &str,
        f: &mut dyn FnMut(Vec<(Arc<str>, FileCoverage)>),
    ) -> Result<(), StoreError>;

    /// Calls `f` with each part of the lines one shard of a compacted run covered; returns
    /// whether any part was stored (none: the run was compacted by a release that kept no
    /// per-shard lines, or the shard never sent anything). Blocking.
    fn for_each_shard_lines(
        &self,
        run_id: &str,
        shard_id: &str,
        f: &mut dyn FnMut(Vec<(Arc<str>, RoaringBitmap)>),
    ) -> Result<bool, StoreError>;

    /// Summaries of runs that `query` selects, newest first. Blocking.
    fn summaries(&self, query: &HistoryQuery) -> Result<Vec<SummaryRecord>, StoreError>;

    /// What history holds for `query`, read at one instant (a fold in between would show
    /// runs twice, or not at all): the summaries it selects, newest first, at most
    /// `query.limit`, and the down-sampled months that overlap its span, oldest first.
    /// Blocking.
    fn history(
        &self,
        query: &HistoryQuery,
    ) -> Result<(Vec<SummaryRecord>, Vec<MonthRecord>), StoreError>;

    /// The attempts of a run's shards that later attempts replaced, by shard and attempt.
    /// Blocking.
    fn attempts(&self, run_id: &str) -> Result<Vec<AttemptRecord>, StoreError>;

    /// The histories of the tests of a project's branch, by test. Blocking.
    fn test_histories(
        &self,
        project: &str,
        branch: &str,
    ) -> Result<Vec<(String, TestHistoryRecord)>, StoreError>;

    /// With `--max-db-bytes`: the bytes the store holds now, and that cap. Blocking.
    fn usage(&self) -> Result<Option<(u64, u64)>, StoreError>;

    /// Which of these source texts (by SHA-256) the store lacks, in order. Blocking.
    fn missing_sources(&self, digests: &[Digest]) -> Result<Vec<bool>, StoreError>;

    /// The digests of the source texts `run_id` names for `paths`, in order. Blocking.
    fn source_digests(
        &self,
        run_id: &str,
        paths: &[String],
    ) -> Result<Vec<Option<Digest>>, StoreError>;

    /// The source text `run_id` names for `path`, with its digest. Blocking.
    fn source(&self, run_id: &str, path: &str) -> Result<Option<(Digest, Vec<u8>)>, StoreError>;

    /// Counters of the group commit.
    fn stats(&self) -> &CommitStats;

    /// Whether other daemons write to this store too (cluster mode): what one daemon holds of
    /// a run is then a cache of the store, brought up to date before it answers for the run
    /// ([`Storage::load_run`]) and when another daemon changed it ([`Storage::take_changes`]).
    fn is_shared(&self) -> bool {
        false
    }

    /// One stored run, as [`Storage::load_runs`] finds it. Blocking.
    fn load_run(&self, run_id: &str) -> Result<Option<LoadedRun>, StoreError> {
        Ok(self
            .load_runs()?
            .into_iter()
            .find(|r| r.run.run_id == run_id))
    }

    /// [`Storage::for_each_delta`] for the deltas after the first of each `(shard, attempt,
    /// after, last_seq)`: those a daemon that merged `after` of them lacks. In no particular
    /// order (what merges them does not depend on it). Blocking.
    fn for_each_delta_after(
        &self,
        run_id: &str,
        ranges: &[(String, u32, u64, u64)],
        f: &mut dyn FnMut(&str, FileBatch),
    ) -> Result<(), StoreError> {
        for (shard, attempt, after, last_seq) in ranges {
            let mut seen = 0u64;
            self.for_each_delta(
                run_id,
                &[(shard.clone(), *attempt, *last_seq)],
                &mut |shard, files| {
                    seen += 1;
                    if seen > *after {
                        f(shard, files);
                    }
                },
            )?;
        }
        Ok(())
    }

    /// The runs other daemons change, as they change them (a shared store's; taken once):
    /// a run's id, or `None` when some may have been missed (the store's connection was lost)
    /// and every run held should be brought up to date.
    fn take_changes(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Option<String>>> {
        None
    }
}

/// A SHA-256 digest: what names a source text.
pub type Digest = [u8; 32];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use data directory {path}: {source}")]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {0} is in use by another covd (its LOCK file is held)")]
    Locked(PathBuf),
    #[error("the database {path} is damaged or not a covd database: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "the database {path} was written by a newer covd (format {found}; this one reads up to {FORMAT_VERSION})"
    )]
    NewerFormat { path: PathBuf, found: i64 },
    #[error("the store failed and accepts no more writes: {0}")]
    Failed(String),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("a stored record is unreadable: {0}")]
    Record(#[from] CodecError),
    #[error("the delta log failed: {0}")]
    Log(std::io::Error),
    #[error("{0}")]
    Full(String),
    /// The cluster's PostgreSQL or object storage failed: nothing of the write committed.
    #[error("the cluster's stores: {0}")]
    Shared(String),
    /// Another node of the cluster changed what the write depends on first (a shard's
    /// progress): nothing of it committed.
    #[error("{0}")]
    Conflict(String),
}

/// One change to the database. A group of them commits atomically.
#[derive(Debug)]
pub enum Write {
    PutRun(RunRecord),
    /// Rewrites a run's record only if the run is still stored (not deleted meanwhile).
    UpdateRun(RunRecord),
    PutShard {
        run_id: String,
        shard: ShardRecord,
    },
    /// A delta and the shard progress that acknowledges it, together. The delta's record is
    /// the concatenation of `body` (a version byte, then the body: see `codec`).
    AppendDelta {
        run_id: String,
        shard: ShardRecord,
        body: Vec<bytes::Bytes>,
    },
    /// Deletes the shard's deltas of attempts below `shard.attempt`, and stores `shard`, with
    /// what is kept of the attempt it replaces (if that one had begun).
    StartAttempt {
        run_id: String,
        shard: ShardRecord,
        replaced: Option<AttemptRecord>,
    },
    /// Replaces the lines one shard of a run covered (`codec::encode_shard_lines` parts),
    /// kept for when the run's delta log is gone: a compaction writes them first, a shard at
    /// a time.
    PutShardLines {
        run_id: String,
        shard_id: String,
        parts: Vec<Vec<u8>>,
    },
    /// Stores a complete run's merged files and summary, and drops its delta log unless
    /// `keep_deltas` (kept so that a retried shard can reopen the run: see `DropDeltas`).
    Compact {
        run_id: String,
        parts: Parts,
        summary: SummaryRecord,
        keep_deltas: bool,
    },
    /// Drops the delta log a compacted run kept: it can no longer be reopened.
    DropDeltas {
        run_id: String,
    },
    /// Drops a compacted run's merged files: a retried shard reopened it, and its coverage is
    /// its deltas' again until it completes anew. Written with the run's record, which no
    /// longer says complete, and the retry's `StartAttempt`.
    Reopen {
        run_id: String,
    },
    /// The repository's files for a run (`git ls-files`), replacing any earlier list.
    PutFiles {
        run_id: String,
        files: Vec<String>,
    },
    /// Drops a run's raw data; keeps `summary` (if given) for history.
    DeleteRun {
        run_id: String,
        summary: Option<SummaryRecord>,
    },
    /// Folds the summaries of runs created before `before_ms` whose raw data is gone (expired
    /// or deleted; a run still held keeps its summary) into their months
    /// ([`crate::history::fold_into_months`]) and drops them, in one transaction. Also
    /// forgets the test histories last seen before `tests_before_ms`.
    DownSample {
        before_ms: u64,
        tests_before_ms: u64,
    },
    /// Source texts a run names: `texts` the store may lack (each encoded by
    /// [`codec::encode_source`], under its digest; one it has already is left as it is) and
    /// the run's `names`, path to digest, each replacing the path's earlier one. Texts no run
    /// names any more go when the last run naming them is deleted.
    PutSources {
        run_id: String,
        texts: Vec<(Digest, Vec<u8>)>,
        names: Vec<(String, Digest)>,
    },
    /// Adds a run's outcome of each of its tests to their histories on the project's branch
    /// ([`crate::flaky::record`]).
    RecordTests {
        run_id: String,
        project: String,
        branch: String,
        outcomes: Vec<(String, TestRunOutcome)>,
    },
}

/// Which summaries or months a history read selects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    /// `None`: every project.
    pub project: Option<String>,
    /// `None`: every branch.
    pub branch: Option<String>,
    /// Created at or after (milliseconds since the epoch).
    pub since_ms: u64,
    /// Created before; `None`: no bound.
    pub until_ms: Option<u64>,
    /// Most summaries returned (the newest); months are not limited.
    pub limit: usize,
}

impl HistoryQuery {
    /// Every summary, newest first, at most `limit`.
    pub fn latest(limit: usize) -> HistoryQuery {
        HistoryQuery {
            limit,
            ..HistoryQuery::default()
        }
    }

    pub(crate) fn selects(&self, project: &str, branch: &str, at_ms: u64) -> bool {
        self.project.as_deref().is_none_or(|p| p == project)
            && self.branch.as_deref().is_none_or(|b| b == branch)
            && at_ms >= self.since_ms
            && self.until_ms.is_none_or(|u| at_ms < u)
    }

    /// Whether a month record is selected: its month overlaps the query's span.
    pub(crate) fn selects_month(&self, m: &MonthRecord) -> bool {
        let end = crate::history::Bucket::Month.end_of(m.month_start_ms);
        self.project.as_deref().is_none_or(|p| p == m.project)
            && self.branch.as_deref().is_none_or(|b| b == m.branch)
            && end > self.since_ms
            && self.until_ms.is_none_or(|u| m.month_start_ms < u)
    }
}

/// A compacted run's merged files, in parts (`codec::encode_files`), handed to the store as
/// they are encoded: a run with per-test attribution encodes to hundreds of megabytes, which
/// need not be in memory at once. The store takes them in order inside the write's one
/// transaction; a producer that stops before its last part fails the write.
pub struct Parts(
    std::sync::mpsc::Receiver<Vec<u8>>,
    Arc<std::sync::atomic::AtomicBool>,
);

/// The producer's end of [`Parts`].
#[derive(Debug)]
pub struct PartSender(
    std::sync::mpsc::SyncSender<Vec<u8>>,
    Arc<std::sync::atomic::AtomicBool>,
);

impl Parts {
    /// Parts a producer sends while the store writes, at most `ahead` of them waiting.
    pub fn channel(ahead: usize) -> (PartSender, Parts) {
        let (tx, rx) = std::sync::mpsc::sync_channel(ahead);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        (PartSender(tx, done.clone()), Parts(rx, done))
    }

    /// Parts already encoded.
    pub fn of(parts: Vec<Vec<u8>>) -> Parts {
        let (tx, rx) = Parts::channel(parts.len());
        for part in parts {
            tx.send(part);
        }
        tx.end();
        rx
    }

    /// Calls `f` with each part in order; fails when the producer stopped before the end.
    pub fn for_each<E: From<StoreError>>(
        &self,
        mut f: impl FnMut(usize, Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut i = 0;
        while let Ok(part) = self.0.recv() {
            f(i, part)?;
            i += 1;
        }
        if !self.1.load(std::sync::atomic::Ordering::Acquire) {
            return Err(
                StoreError::Failed("the compaction stopped before its last part".into()).into(),
            );
        }
        Ok(())
    }
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Parts")
    }
}

impl PartSender {
    /// Sends a part; false when the store no longer takes them (the write failed or was
    /// dropped).
    pub fn send(&self, part: Vec<u8>) -> bool {
        self.0.send(part).is_ok()
    }

    /// Marks the last part sent.
    pub fn end(self) {
        self.1.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// A run as found on disk at start.
#[derive(Debug)]
pub struct LoadedRun {
    pub run: RunRecord,
    pub shards: Vec<ShardRecord>,
    /// Whether merged files were stored (the run was compacted).
    pub compacted: bool,
    /// The repository's files, when the run was given them.
    pub files: Option<Vec<String>>,
    /// The run's summary, when one was stored (a compacted run has one): its totals let a
    /// complete run answer status without reading its files.
    pub summary: Option<SummaryRecord>,
}

/// Counters of the group commit, for benchmarks and logs.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub commits: AtomicU64,
    pub writes: AtomicU64,
}

/// Orders summaries newest first, and by run id among runs created in the same millisecond,
/// so that every backend lists them alike.
fn newest_first(summaries: &mut [SummaryRecord]) {
    summaries.sort_by(|a, b| {
        b.created_at_ms
            .cmp(&a.created_at_ms)
            .then_with(|| a.run_id.cmp(&b.run_id))
    });
}

/// Orders months oldest first, then by project and branch, so that every backend lists them
/// alike.
pub(crate) fn oldest_month_first(months: &mut [MonthRecord]) {
    months.sort_by(|a, b| {
        (a.month_start_ms, &a.project, &a.branch).cmp(&(b.month_start_ms, &b.project, &b.branch))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(parts: &Parts) -> Result<Vec<(usize, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        parts.for_each(|i, p| {
            out.push((i, p));
            Ok::<(), StoreError>(())
        })?;
        Ok(out)
    }

    /// Parts come in order while they are sent; a producer that stops before `end` fails the
    /// write rather than leave a run compacted without its last files.
    #[test]
    fn parts_are_taken_in_order_and_only_whole() {
        let (tx, parts) = Parts::channel(1);
        let producer = std::thread::spawn(move || {
            for i in 0..5u8 {
                assert!(tx.send(vec![i]));
            }
            tx.end();
        });
        let got = taken(&parts).unwrap();
        producer.join().unwrap();
        assert_eq!(got, (0..5).map(|i| (i, vec![i as u8])).collect::<Vec<_>>());
        assert_eq!(taken(&Parts::of(vec![vec![7]])).unwrap(), [(0, vec![7])]);

        let (tx, parts) = Parts::channel(4);
        assert!(tx.send(vec![1]));
        drop(tx);
        let e = taken(&parts).unwrap_err();
        assert!(
            e.to_string().contains("stopped before its last part"),
            "{e}"
        );

        // The store gave up: the producer hears it.
        let (tx, parts) = Parts::channel(1);
        drop(parts);
        assert!(!tx.send(vec![1]));
    }
}
