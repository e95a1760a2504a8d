//! The embedded store: runs, shard progress and deltas in a SQLite database in the data
//! directory, so that an acknowledgement means "on disk" and a restarted daemon resumes where
//! it was.
//!
//! - One writer thread owns the write connection and commits in groups: it takes every write
//!   that queued up while the previous commit was syncing, commits them in one transaction
//!   (WAL, `synchronous=FULL`: one fsync per group, not per delta), then answers them all.
//! - After a failed write or commit the store refuses every later write (redb's discipline): it
//!   never retries an fsync and carries on as if the data were safe.
//! - A lock file keeps a second daemon off the same data directory.
//! - Records are versioned blobs (`codec`); reads check them.
//! - Deltas are appended to a log file per run (`log`), fsynced before the transaction that
//!   refers to them commits; the database keeps a reference per delta.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use roaring::RoaringBitmap;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::codec::{self, CodecError, FORMAT_VERSION, WireDecoder};
use super::records::{
    self, AttemptRecord, MonthRecord, RunRecord, ShardRecord, SummaryRecord, TestHistoryRecord,
};
use super::{CommitStats, Digest, HistoryQuery, LoadedRun, Storage, StoreError, Write, log};
use crate::model::{FileBatch, FileCoverage};

/// The database file inside the data directory.
pub const DB_FILE: &str = "covd.sqlite3";
const LOCK_FILE: &str = "LOCK";
/// Writes gathered into one transaction at most; bounds a commit's latency and memory.
const MAX_GROUP: usize = 512;
/// Writes waiting for the writer at most; further writers wait (backpressure).
const QUEUE: usize = 1024;

struct Job {
    writes: Vec<Write>,
    done: oneshot::Sender<Result<(), String>>,
}

/// The embedded store of one data directory.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    /// Taken on drop, which ends the writer thread.
    queue: Option<mpsc::Sender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
    failure: Arc<Mutex<Option<String>>>,
    reader: Mutex<Connection>,
    /// Where the delta log files are.
    log_dir: PathBuf,
    /// `--max-db-bytes`.
    max_bytes: Option<u64>,
    stats: Arc<CommitStats>,
    /// Reads deltas kept in wire form (see [`codec::WIRE_DELTA_FORMAT`]).
    wire: Option<WireDecoder>,
    // Held for the store's life: the lock is released when the file closes.
    _lock: File,
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `dir`. Refuses a directory another daemon
    /// holds, and a damaged database.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(dir, None)
    }

    /// [`SqliteStore::open`] with a cap on the size of the database and the delta logs together: a
    /// write that would grow them beyond `max_bytes` fails, and the store then refuses writes
    /// like after any write failure.
    pub fn open_with(dir: &Path, max_bytes: Option<u64>) -> Result<SqliteStore, StoreError> {
        let io = |source| StoreError::Directory {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked(dir.to_owned()));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let path = dir.join(DB_FILE);
        let corrupt = |e: rusqlite::Error| StoreError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        };
        let writer = Connection::open(&path).map_err(corrupt)?;
        configure(&writer).map_err(corrupt)?;
        check(&writer, &path)?;
        migrate(&writer, &path)?;
        let reader = Connection::open(&path).map_err(corrupt)?;
        reader.busy_timeout(std::time::Duration::from_secs(30))?;
        let log_dir = dir.join(log::DIR);
        let logs = LogWriter::open(&writer, &log_dir, max_bytes)?;

        let (queue, jobs) = mpsc::channel(QUEUE);
        let failure = Arc::new(Mutex::new(None));
        let stats = Arc::new(CommitStats::default());
        let writer = {
            let failure = failure.clone();
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("covd-writer".into())
                .spawn(move || writer_loop(writer, logs, jobs, &failure, &stats))
                .map_err(io)?
        };
        Ok(SqliteStore {
            path,
            queue: Some(queue),
            writer: Some(writer),
            failure,
            reader: Mutex::new(reader),
            log_dir,
            max_bytes,
            stats,
            wire: None,
            _lock: lock,
        })
    }

    /// Gives the store the protocol's decoder for deltas kept in wire form. The server does
    /// this at start; without it, such deltas cannot be replayed.
    pub fn with_wire_decoder(mut self, decode: WireDecoder) -> SqliteStore {
        self.wire = Some(decode);
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn queue(&self) -> Result<&mpsc::Sender<Job>, StoreError> {
        self.queue
            .as_ref()
            .ok_or_else(|| StoreError::Failed("the store is closed".into()))
    }

    fn reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Storage for SqliteStore {
    fn is_durable(&self) -> bool {
        true
    }

    fn stats(&self) -> &CommitStats {
        &self.stats
    }

    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn write(&self, writes: Vec<Write>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            if let Some(f) = self.failure() {
                return Err(StoreError::Failed(f));
            }
            let (done, result) = oneshot::channel();
            self.queue()?
                .send(Job { writes, done })
                .await
                .map_err(|_| StoreError::Failed("the writer thread stopped".into()))?;
            result
                .await
                .map_err(|_| StoreError::Failed("the writer thread stopped".into()))?
                .map_err(StoreError::Failed)
        })
    }

    fn write_blocking(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        if let Some(f) = self.failure() {
            return Err(StoreError::Failed(f));
        }
        let (done, result) = oneshot::channel();
        self.queue()?
            .blocking_send(Job { writes, done })
            .map_err(|_| StoreError::Failed("the writer thread stopped".into()))?;
        result
            .blocking_recv()
            .map_err(|_| StoreError::Failed("the writer thread stopped".into()))?
            .map_err(StoreError::Failed)
    }

    fn load_runs(&self) -> Result<Vec<LoadedRun>, StoreError> {
        let conn = self.reader();
        let mut runs = Vec::new();
        let mut stmt = conn.prepare("SELECT record FROM runs ORDER BY run_id")?;
        let records = stmt
            .query_map([], |r| r.get::<_, Vec<u8>>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut shards_stmt =
            conn.prepare("SELECT record FROM shards WHERE run_id = ?1 ORDER BY shard_id")?;
        let mut merged_stmt = conn.prepare("SELECT 1 FROM merged WHERE run_id = ?1 LIMIT 1")?;
        let mut files_stmt = conn.prepare("SELECT body FROM run_files WHERE run_id = ?1")?;
        let mut summary_stmt = conn.prepare("SELECT record FROM summaries WHERE run_id = ?1")?;
        for bytes in records {
            let run: RunRecord = codec::decode(&bytes)?;
            let shards = shards_stmt
                .query_map([&run.run_id], |r| r.get::<_, Vec<u8>>(0))?
                .map(|b| Ok(codec::decode::<ShardRecord>(&b?)?))
                .collect::<Result<Vec<_>, StoreError>>()?;
            let compacted = merged_stmt
                .query_row([&run.run_id], |_| Ok(()))
                .optional()?
                .is_some();
            let files = files_stmt
                .query_row([&run.run_id], |r| r.get::<_, Vec<u8>>(0))
                .optional()?
                .map(|b| codec::decode::<records::FileListRecord>(&b).map(|l| l.paths))
                .transpose()?;
            let summary = summary_stmt
                .query_row([&run.run_id], |r| r.get::<_, Vec<u8>>(0))
                .optional()?
                .map(|b| codec::decode::<SummaryRecord>(&b))
                .transpose()?;
            runs.push(LoadedRun {
                run,
                shards,
                compacted,
                files,
                summary,
            });
        }
        Ok(runs)
    }

    fn for_each_delta(
        &self,
        run_id: &str,
        attempts: &[(String, u32, u64)],
        f: &mut dyn FnMut(&str, FileBatch),
    ) -> Result<(), StoreError> {
        let conn = self.reader();
        let mut log = log::LogReader::new(&self.log_dir);
        // Bounded by the acknowledged sequence: a row beyond it was never acknowledged.
        let mut stmt = conn.prepare(
            "SELECT body FROM deltas WHERE run_id = ?1 AND shard_id = ?2 AND attempt = ?3
             AND seq <= ?4 ORDER BY seq",
        )?;
        for (shard, attempt, last_seq) in attempts {
            let mut rows = stmt.query(params![run_id, shard, attempt, *last_seq as i64])?;
            while let Some(row) = rows.next()? {
                let body: Vec<u8> = row.get(0)?;
                let body = match body.first() {
                    Some(&log::LOG_REF_FORMAT) => log.read(&log::LogRef::decode(&body)?)?,
                    _ => body,
                };
                f(shard, codec::decode_delta(&body, self.wire)?);
            }
        }
        Ok(())
    }

    fn for_each_merged(
        &self,
        run_id: &str,
        f: &mut dyn FnMut(Vec<(Arc<str>, FileCoverage)>),
    ) -> Result<(), StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare("SELECT body FROM merged WHERE run_id = ?1 ORDER BY part")?;
        let mut rows = stmt.query([run_id])?;
        while let Some(row) = rows.next()? {
            let body: Vec<u8> = row.get(0)?;
            f(codec::decode_files(&body)?);
        }
        Ok(())
    }

    fn for_each_shard_lines(
        &self,
        run_id: &str,
        shard_id: &str,
        f: &mut dyn FnMut(Vec<(Arc<str>, RoaringBitmap)>),
    ) -> Result<bool, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare(
            "SELECT body FROM shard_lines WHERE run_id = ?1 AND shard_id = ?2 ORDER BY part",
        )?;
        let mut rows = stmt.query([run_id, shard_id])?;
        let mut any = false;
        while let Some(row) = rows.next()? {
            let body: Vec<u8> = row.get(0)?;
            f(codec::decode_shard_lines(&body)?);
            any = true;
        }
        Ok(any)
    }

    fn summaries(&self, q: &HistoryQuery) -> Result<Vec<SummaryRecord>, StoreError> {
        summaries_in(&self.reader(), q)
    }

    fn attempts(&self, run_id: &str) -> Result<Vec<AttemptRecord>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT record FROM attempts WHERE run_id = ?1 ORDER BY shard_id, attempt",
        )?;
        let rows = stmt.query_map([run_id], |r| r.get::<_, Vec<u8>>(0))?;
        rows.map(|b| Ok(codec::decode_later::<AttemptRecord>(&b?)?))
            .collect()
    }

    fn test_histories(
        &self,
        project: &str,
        branch: &str,
    ) -> Result<Vec<(String, TestHistoryRecord)>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT test, record FROM test_history WHERE project = ?1 AND branch = ?2
             ORDER BY test",
        )?;
        let rows = stmt.query_map([project, branch], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        rows.map(|row| {
            let (test, b) = row?;
            Ok((test, codec::decode_later::<TestHistoryRecord>(&b)?))
        })
        .collect()
    }

    fn usage(&self) -> Result<Option<(u64, u64)>, StoreError> {
        let Some(max) = self.max_bytes else {
            return Ok(None);
        };
        let db: i64 = self.reader().query_row(
            "SELECT page_count * page_size FROM pragma_page_count, pragma_page_size",
            [],
            |r| r.get(0),
        )?;
        let logs: u64 = std::fs::read_dir(&self.log_dir)
            .map_err(StoreError::Log)?
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        Ok(Some((db.max(0) as u64 + logs, max)))
    }

    fn missing_sources(&self, digests: &[Digest]) -> Result<Vec<bool>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached("SELECT 1 FROM sources WHERE digest = ?1")?;
        digests
            .iter()
            .map(|d| Ok(!stmt.exists([&d[..]])?))
            .collect()
    }

    fn source_digests(
        &self,
        run_id: &str,
        paths: &[String],
    ) -> Result<Vec<Option<Digest>>, StoreError> {
        let conn = self.reader();
        let mut stmt =
            conn.prepare_cached("SELECT digest FROM run_sources WHERE run_id = ?1 AND path = ?2")?;
        paths
            .iter()
            .map(|p| {
                let found: Option<Vec<u8>> = stmt
                    .query_row(params![run_id, p], |r| r.get(0))
                    .optional()?;
                Ok(found.and_then(|d| d.try_into().ok()))
            })
            .collect()
    }

    fn source(&self, run_id: &str, path: &str) -> Result<Option<(Digest, Vec<u8>)>, StoreError> {
        let conn = self.reader();
        let found: Option<(Vec<u8>, Vec<u8>)> = conn
            .prepare_cached(
                "SELECT s.digest, s.body FROM run_sources r JOIN sources s ON s.digest = r.digest
                 WHERE r.run_id = ?1 AND r.path = ?2",
            )?
            .query_row(params![run_id, path], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((digest, body)) = found else {
            return Ok(None);
        };
        let digest = Digest::try_from(&digest[..])
            .map_err(|_| CodecError::Malformed("a source digest is not 32 bytes".into()))?;
        Ok(Some((digest, codec::decode_source(&body)?)))
    }

    fn history(
        &self,
        q: &HistoryQuery,
    ) -> Result<(Vec<SummaryRecord>, Vec<MonthRecord>), StoreError> {
        let conn = self.reader();
        // One read transaction: one snapshot of both tables.
        let tx = conn.unchecked_transaction()?;
        let runs = summaries_in(&tx, q)?;
        let months = months_in(&tx, q)?;
        tx.finish()?;
        Ok((runs, months))
    }
}

fn summaries_in(conn: &Connection, q: &HistoryQuery) -> Result<Vec<SummaryRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT record FROM summaries
         WHERE (?1 IS NULL OR project = ?1) AND (?2 IS NULL OR branch = ?2)
           AND created_at_ms >= ?3 AND (?4 IS NULL OR created_at_ms < ?4)
         ORDER BY created_at_ms DESC, run_id LIMIT ?5",
    )?;
    let rows = stmt.query_map(
        params![
            q.project,
            q.branch,
            clamp(q.since_ms),
            q.until_ms.map(clamp),
            clamp(q.limit as u64)
        ],
        |r| r.get::<_, Vec<u8>>(0),
    )?;
    rows.map(|b| Ok(codec::decode::<SummaryRecord>(&b?)?))
        .collect()
}

fn months_in(conn: &Connection, q: &HistoryQuery) -> Result<Vec<MonthRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT record FROM history_months
         WHERE (?1 IS NULL OR project = ?1) AND (?2 IS NULL OR branch = ?2)
         ORDER BY month_start_ms, project, branch",
    )?;
    let rows = stmt.query_map(params![q.project, q.branch], |r| r.get::<_, Vec<u8>>(0))?;
    let mut out = Vec::new();
    for b in rows {
        let m = codec::decode_later::<MonthRecord>(&b?)?;
        if q.selects_month(&m) {
            out.push(m);
        }
    }
    Ok(out)
}

impl Drop for SqliteStore {
    /// Lets the writer finish what is queued and close its connection, which checkpoints the
    /// WAL into the database file.
    fn drop(&mut self) {
        self.queue.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // WAL: readers never block the writer. synchronous=FULL: a commit returns after the WAL
    // is fsynced, which is what an acknowledgement promises.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    Ok(())
}

fn check(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let verdict: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| StoreError::Corrupt {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if verdict != "ok" {
        return Err(StoreError::Corrupt {
            path: path.to_owned(),
            detail: verdict,
        });
    }
    Ok(())
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let corrupt = |e: rusqlite::Error| StoreError::Corrupt {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, record BLOB NOT NULL);
         CREATE TABLE IF NOT EXISTS shards (
             run_id TEXT NOT NULL, shard_id TEXT NOT NULL, record BLOB NOT NULL,
             PRIMARY KEY (run_id, shard_id));
         CREATE TABLE IF NOT EXISTS deltas (
             run_id TEXT NOT NULL, shard_id TEXT NOT NULL, attempt INTEGER NOT NULL,
             seq INTEGER NOT NULL, body BLOB NOT NULL,
             PRIMARY KEY (run_id, shard_id, attempt, seq));
         CREATE TABLE IF NOT EXISTS merged (
             run_id TEXT NOT NULL, part INTEGER NOT NULL, body BLOB NOT NULL,
             PRIMARY KEY (run_id, part));
         CREATE TABLE IF NOT EXISTS shard_lines (
             run_id TEXT NOT NULL, shard_id TEXT NOT NULL, part INTEGER NOT NULL,
             body BLOB NOT NULL, PRIMARY KEY (run_id, shard_id, part));
         CREATE TABLE IF NOT EXISTS summaries (run_id TEXT PRIMARY KEY, record BLOB NOT NULL);
         CREATE TABLE IF NOT EXISTS attempts (
             run_id TEXT NOT NULL, shard_id TEXT NOT NULL, attempt INTEGER NOT NULL,
             record BLOB NOT NULL, PRIMARY KEY (run_id, shard_id, attempt));
         CREATE TABLE IF NOT EXISTS test_history (
             project TEXT NOT NULL, branch TEXT NOT NULL, test TEXT NOT NULL,
             last_seen_ms INTEGER NOT NULL, record BLOB NOT NULL,
             PRIMARY KEY (project, branch, test));
         CREATE TABLE IF NOT EXISTS history_months (
             project TEXT NOT NULL, branch TEXT NOT NULL, month_start_ms INTEGER NOT NULL,
             record BLOB NOT NULL, PRIMARY KEY (project, branch, month_start_ms));
         CREATE TABLE IF NOT EXISTS run_files (run_id TEXT PRIMARY KEY, body BLOB NOT NULL);
         CREATE TABLE IF NOT EXISTS logs (run_id TEXT PRIMARY KEY, file INTEGER NOT NULL UNIQUE);
         CREATE TABLE IF NOT EXISTS sources (digest BLOB PRIMARY KEY, body BLOB NOT NULL);
         CREATE TABLE IF NOT EXISTS run_sources (
             run_id TEXT NOT NULL, path TEXT NOT NULL, digest BLOB NOT NULL,
             PRIMARY KEY (run_id, path));
         CREATE INDEX IF NOT EXISTS run_sources_by_digest ON run_sources (digest);",
    )
    .map_err(corrupt)?;
    let found: Option<i64> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'format_version'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(corrupt)?;
    let versioned = match found {
        Some(v) if v > i64::from(FORMAT_VERSION) => Err(StoreError::NewerFormat {
            path: path.to_owned(),
            found: v,
        }),
        Some(v) if v == i64::from(FORMAT_VERSION) => Ok(()),
        Some(_) => {
            // An older directory: its records still read, and from now on it may also hold
            // records of this format, which older builds must refuse at start.
            conn.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'format_version'",
                [i64::from(FORMAT_VERSION)],
            )
            .map_err(corrupt)?;
            Ok(())
        }
        None => {
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('format_version', ?1)",
                [i64::from(FORMAT_VERSION)],
            )
            .map_err(corrupt)?;
            Ok(())
        }
    };
    versioned?;
    // One transaction: a crash part way leaves the table as it was.
    let tx = conn.unchecked_transaction().map_err(corrupt)?;
    index_summaries(&tx).map_err(|e| match e {
        StoreError::Sqlite(e) => corrupt(e),
        e => e,
    })?;
    tx.commit().map_err(corrupt)?;
    Ok(())
}

/// Gives the summaries table the columns history selects by (project, branch, creation
/// time), filled from the records: directories from before history have only the records,
/// and an earlier release writing into this one leaves the columns empty, so rows without
/// them are filled at every start.
fn index_summaries(conn: &Connection) -> Result<(), StoreError> {
    for (column, kind) in [
        ("project", "TEXT"),
        ("branch", "TEXT"),
        ("created_at_ms", "INTEGER"),
    ] {
        let present = conn
            .prepare("SELECT 1 FROM pragma_table_info('summaries') WHERE name = ?1")?
            .exists([column])?;
        if !present {
            conn.execute_batch(&format!("ALTER TABLE summaries ADD COLUMN {column} {kind}"))?;
        }
    }
    let unfilled: Vec<(String, Vec<u8>)> = conn
        .prepare("SELECT run_id, record FROM summaries WHERE created_at_ms IS NULL")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (run_id, record) in unfilled {
        // A summary that does not read stays out of history, not the directory out of use.
        let Some(s) = readable(codec::decode::<SummaryRecord>(&record), "a run's summary") else {
            continue;
        };
        conn.execute(
            "UPDATE summaries SET project = ?2, branch = ?3, created_at_ms = ?4 WHERE run_id = ?1",
            params![run_id, s.project, s.branch, clamp(s.created_at_ms)],
        )?;
    }
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS summaries_by_time
             ON summaries (project, branch, created_at_ms);
         CREATE INDEX IF NOT EXISTS summaries_by_age ON summaries (created_at_ms);",
    )?;
    Ok(())
}

/// A time or count as SQLite's signed integer.
fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn writer_loop(
    mut conn: Connection,
    mut logs: LogWriter,
    mut jobs: mpsc::Receiver<Job>,
    failure: &Mutex<Option<String>>,
    stats: &CommitStats,
) {
    while let Some(first) = jobs.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let failed = failure.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let result = match failed {
            Some(f) => Err(f),
            None => commit(&mut conn, &mut logs, &group).map_err(|e| {
                // SQLite's "full" under the page limit the cap set is the cap, not the disk.
                let e = match (e, logs.cap) {
                    (StoreError::Sqlite(e), Some((max, _)))
                        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) =>
                    {
                        StoreError::Full(format!(
                            "the database cannot grow within --max-db-bytes {max} ({e})"
                        ))
                    }
                    (e, _) => e,
                };
                let message = format!(
                    "a write to the database failed ({e}); restart covd once the cause is fixed"
                );
                tracing::error!("{message}");
                *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(message.clone());
                message
            }),
        };
        if result.is_ok() {
            stats.commits.fetch_add(1, Ordering::Relaxed);
            stats.writes.fetch_add(
                group.iter().map(|j| j.writes.len() as u64).sum(),
                Ordering::Relaxed,
            );
        }
        for job in group {
            let _ = job.done.send(result.clone());
        }
    }
}

/// The writer's delta log: the files, which run has which, and the cap on the store's size.
struct LogWriter {
    appender: log::Appender,
    /// Each run's log file, as the `logs` table says (runs that have one).
    files: HashMap<String, u64>,
    next: u64,
    /// Log files whose run was compacted or deleted in the group being committed.
    dropped: Vec<u64>,
    /// `--max-db-bytes`, and the database's page size.
    cap: Option<(u64, u64)>,
}

impl LogWriter {
    fn open(
        conn: &Connection,
        dir: &Path,
        max_bytes: Option<u64>,
    ) -> Result<LogWriter, StoreError> {
        let files: HashMap<String, u64> = conn
            .prepare("SELECT run_id, file FROM logs")?
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })?
            .collect::<Result<_, _>>()?;
        let live: HashSet<u64> = files.values().copied().collect();
        let appender = log::Appender::open(dir, &live).map_err(|source| StoreError::Directory {
            path: dir.to_owned(),
            source,
        })?;
        let cap = match max_bytes {
            Some(max) => {
                let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
                Some((max, page.max(1) as u64))
            }
            None => None,
        };
        Ok(LogWriter {
            appender,
            next: live.iter().max().map_or(1, |m| m + 1),
            files,
            dropped: Vec::new(),
            cap,
        })
    }

    /// Lets the database grow into what the delta logs leave of the cap (SQLite keeps it at
    /// least at its current size). Called before each group.
    fn limit_database(&self, conn: &Connection) -> rusqlite::Result<()> {
        if let Some((max, page)) = self.cap {
            let pages = max.saturating_sub(self.appender.bytes()) / page;
            conn.pragma_update(
                None,
                "max_page_count",
                pages.clamp(1, i64::MAX as u64) as i64,
            )?;
        }
        Ok(())
    }

    /// Appends a delta to its run's log file (giving the run one first).
    fn append(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        run_id: &str,
        body: &[bytes::Bytes],
    ) -> Result<log::LogRef, StoreError> {
        if let Some((max, page)) = self.cap {
            let size: u64 = body.iter().map(|b| b.len() as u64).sum();
            let pages: i64 = tx.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            let db = (pages.max(0) as u64).saturating_mul(page);
            let total = db + self.appender.bytes() + size;
            if total > max {
                return Err(StoreError::Full(format!(
                    "the data directory would hold {total} bytes, beyond --max-db-bytes {max}"
                )));
            }
        }
        let file = match self.files.get(run_id) {
            Some(file) => *file,
            None => {
                let file = self.next;
                tx.prepare_cached("INSERT INTO logs (run_id, file) VALUES (?1, ?2)")?
                    .execute(params![run_id, file as i64])?;
                self.next += 1;
                self.files.insert(run_id.to_owned(), file);
                file
            }
        };
        self.appender.append(file, body).map_err(StoreError::Log)
    }

    /// Drops the run's log file from the database; the file goes once the group commits.
    fn drop_run(&mut self, tx: &rusqlite::Transaction<'_>, run_id: &str) -> Result<(), StoreError> {
        tx.prepare_cached("DELETE FROM logs WHERE run_id = ?1")?
            .execute([run_id])?;
        if let Some(file) = self.files.remove(run_id) {
            self.dropped.push(file);
        }
        Ok(())
    }
}

/// Fault injection for the crash tests: with `COVD_FAULT_ABORT_IN_COMMIT=N`, the process
/// dies (exit code 134) inside its N-th group commit, after the group's writes and before the commit, the
/// way a power cut would find it. Unset in production.
const ABORT_IN_COMMIT: &str = "COVD_FAULT_ABORT_IN_COMMIT";

fn commit(conn: &mut Connection, logs: &mut LogWriter, group: &[Job]) -> Result<(), StoreError> {
    static COMMITS: AtomicU64 = AtomicU64::new(0);
    logs.dropped.clear();
    logs.limit_database(conn)?;
    let tx = conn.transaction()?;
    for job in group {
        for w in &job.writes {
            apply(&tx, logs, w)?;
        }
    }
    // The deltas are durable before anything refers to them.
    logs.appender.sync().map_err(StoreError::Log)?;
    if let Some(n) = std::env::var_os(ABORT_IN_COMMIT).and_then(|v| v.to_str()?.parse::<u64>().ok())
        && COMMITS.fetch_add(1, Ordering::Relaxed) + 1 == n
    {
        // Not `abort()`: the same for the database, but no core dump.
        std::process::exit(134);
    }
    tx.commit()?;
    for file in std::mem::take(&mut logs.dropped) {
        // Only space is at stake: a file left here is deleted at the next start.
        if let Err(e) = logs.appender.remove(file) {
            tracing::warn!("deleting delta log file {file} failed: {e}");
        }
    }
    Ok(())
}

/// Whether the run has a record: writes for a run deleted (or expired) meanwhile are dropped,
/// so no orphan rows outlive it.
fn run_exists(tx: &rusqlite::Transaction<'_>, run_id: &str) -> rusqlite::Result<bool> {
    tx.prepare_cached("SELECT 1 FROM runs WHERE run_id = ?1")?
        .query_row([run_id], |_| Ok(()))
        .optional()
        .map(|found| found.is_some())
}

/// Drops a run's deltas: their references, and its log file once the group commits.
fn drop_deltas(
    tx: &rusqlite::Transaction<'_>,
    logs: &mut LogWriter,
    run_id: &str,
) -> Result<(), StoreError> {
    tx.prepare_cached("DELETE FROM deltas WHERE run_id = ?1")?
        .execute([run_id])?;
    logs.drop_run(tx, run_id)
}

fn apply(
    tx: &rusqlite::Transaction<'_>,
    logs: &mut LogWriter,
    w: &Write,
) -> Result<(), StoreError> {
    match w {
        Write::PutRun(run) => {
            // Its completion and kept deltas are the compaction's to say (`UpdateRun`, under
            // the run's compaction lock): a copy of the record read before one must not undo
            // it.
            let stored: Option<Vec<u8>> = tx
                .prepare_cached("SELECT record FROM runs WHERE run_id = ?1")?
                .query_row([&run.run_id], |r| r.get(0))
                .optional()?;
            let mut run = run.clone();
            if let Some(old) =
                stored.and_then(|b| readable(codec::decode::<RunRecord>(&b), "a run"))
            {
                run.completed_at_ms = old.completed_at_ms;
                run.deltas_kept = old.deltas_kept;
            }
            tx.prepare_cached("INSERT OR REPLACE INTO runs (run_id, record) VALUES (?1, ?2)")?
                .execute(params![run.run_id, codec::encode(&run)])?;
        }
        Write::UpdateRun(run) => {
            tx.prepare_cached("UPDATE runs SET record = ?2 WHERE run_id = ?1")?
                .execute(params![run.run_id, codec::encode(run)])?;
        }
        Write::PutShard { run_id, .. }
        | Write::RecordTests { run_id, .. }
        | Write::AppendDelta { run_id, .. }
        | Write::StartAttempt { run_id, .. }
        | Write::PutShardLines { run_id, .. }
        | Write::Compact { run_id, .. }
        | Write::DropDeltas { run_id }
        | Write::Reopen { run_id }
        | Write::PutSources { run_id, .. }
        | Write::PutFiles { run_id, .. }
            if !run_exists(tx, run_id)? => {}
        Write::PutShard { run_id, shard } => put_shard(tx, run_id, shard)?,
        Write::AppendDelta {
            run_id,
            shard,
            body,
        } => {
            let at = logs.append(tx, run_id, body)?;
            tx.prepare_cached(
                "INSERT OR REPLACE INTO deltas (run_id, shard_id, attempt, seq, body)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                run_id,
                shard.shard_id,
                shard.attempt,
                shard.last_seq as i64,
                at.encode()
            ])?;
            put_shard(tx, run_id, shard)?;
        }
        Write::StartAttempt {
            run_id,
            shard,
            replaced,
        } => {
            tx.prepare_cached(
                "DELETE FROM deltas WHERE run_id = ?1 AND shard_id = ?2 AND attempt < ?3",
            )?
            .execute(params![run_id, shard.shard_id, shard.attempt])?;
            put_shard(tx, run_id, shard)?;
            if let Some(a) = replaced {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO attempts (run_id, shard_id, attempt, record)
                     VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![
                    run_id,
                    a.shard_id,
                    a.attempt,
                    codec::encode(a)
                ])?;
            }
        }
        Write::PutShardLines {
            run_id,
            shard_id,
            parts,
        } => {
            tx.prepare_cached("DELETE FROM shard_lines WHERE run_id = ?1 AND shard_id = ?2")?
                .execute([run_id, shard_id])?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO shard_lines (run_id, shard_id, part, body) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (i, part) in parts.iter().enumerate() {
                insert.execute(params![run_id, shard_id, i as i64, part])?;
            }
        }
        Write::Compact {
            run_id,
            parts,
            summary,
            keep_deltas,
        } => {
            tx.prepare_cached("DELETE FROM merged WHERE run_id = ?1")?
                .execute([run_id])?;
            let mut insert =
                tx.prepare_cached("INSERT INTO merged (run_id, part, body) VALUES (?1, ?2, ?3)")?;
            parts.for_each(|i, part| {
                insert.execute(params![run_id, i as i64, part])?;
                Ok::<(), StoreError>(())
            })?;
            if !keep_deltas {
                drop_deltas(tx, logs, run_id)?;
            }
            put_summary(tx, summary)?;
        }
        Write::DropDeltas { run_id } => drop_deltas(tx, logs, run_id)?,
        Write::PutSources {
            run_id,
            texts,
            names,
        } => {
            let mut text =
                tx.prepare_cached("INSERT OR IGNORE INTO sources (digest, body) VALUES (?1, ?2)")?;
            for (digest, body) in texts {
                text.execute(params![&digest[..], body])?;
            }
            // A name whose text is not here (the last run naming it went after the push asked)
            // is left out: the file has no source rather than a dangling one.
            let mut name = tx.prepare_cached(
                "INSERT OR REPLACE INTO run_sources (run_id, path, digest)
                 SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM sources WHERE digest = ?3)",
            )?;
            for (path, digest) in names {
                name.execute(params![run_id, path, &digest[..]])?;
            }
        }
        Write::Reopen { run_id } => {
            tx.prepare_cached("DELETE FROM merged WHERE run_id = ?1")?
                .execute([run_id])?;
        }
        Write::PutFiles { run_id, files } => {
            tx.prepare_cached("INSERT OR REPLACE INTO run_files (run_id, body) VALUES (?1, ?2)")?
                .execute(params![
                    run_id,
                    codec::encode(&records::FileListRecord {
                        paths: files.clone()
                    })
                ])?;
        }
        Write::DeleteRun { run_id, summary } => {
            if summary.is_none() {
                forget_tests_of(tx, run_id)?;
            }
            let named: Vec<Vec<u8>> = tx
                .prepare_cached("SELECT DISTINCT digest FROM run_sources WHERE run_id = ?1")?
                .query_map([run_id], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for table in [
                "runs",
                "shards",
                "deltas",
                "merged",
                "shard_lines",
                "run_files",
                "attempts",
                "run_sources",
            ] {
                tx.prepare_cached(&format!("DELETE FROM {table} WHERE run_id = ?1"))?
                    .execute([run_id])?;
            }
            // The texts it named that no other run names.
            let mut orphan = tx.prepare_cached(
                "DELETE FROM sources WHERE digest = ?1
                 AND NOT EXISTS (SELECT 1 FROM run_sources WHERE digest = ?1)",
            )?;
            for digest in named {
                orphan.execute([digest])?;
            }
            logs.drop_run(tx, run_id)?;
            match summary {
                Some(s) => put_summary(tx, s)?,
                None => {
                    tx.prepare_cached("DELETE FROM summaries WHERE run_id = ?1")?
                        .execute([run_id])?;
                }
            }
        }
        Write::DownSample {
            before_ms,
            tests_before_ms,
        } => {
            down_sample(tx, *before_ms)?;
            tx.prepare_cached("DELETE FROM test_history WHERE last_seen_ms < ?1")?
                .execute([clamp(*tests_before_ms)])?;
        }
        Write::RecordTests {
            project,
            branch,
            outcomes,
            ..
        } => {
            let mut get = tx.prepare_cached(
                "SELECT record FROM test_history WHERE project = ?1 AND branch = ?2 AND test = ?3",
            )?;
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO test_history (project, branch, test, last_seen_ms, record)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for (test, outcome) in outcomes {
                let old = get
                    .query_row(params![project, branch, test], |r| r.get::<_, Vec<u8>>(0))
                    .optional()?
                    .and_then(|b| readable(codec::decode_later(&b), "a test's history"));
                let new = crate::flaky::record(old, *outcome);
                put.execute(params![
                    project,
                    branch,
                    test,
                    clamp(new.last_seen_ms),
                    codec::encode(&new)
                ])?;
            }
        }
    }
    Ok(())
}

/// A record read for history, or `None` (with a warning) when it does not read: history is
/// derived data, and one damaged record must not stop every write of the store.
fn readable<T>(decoded: Result<T, codec::CodecError>, what: &str) -> Option<T> {
    decoded
        .map_err(|e| tracing::warn!("{what} does not read ({e}); left as it is"))
        .ok()
}

/// Takes a deleted run's outcomes out of the test histories of its branch.
fn forget_tests_of(tx: &rusqlite::Transaction<'_>, run_id: &str) -> Result<(), StoreError> {
    let Some(run) = tx
        .prepare_cached("SELECT record FROM runs WHERE run_id = ?1")?
        .query_row([run_id], |r| r.get::<_, Vec<u8>>(0))
        .optional()?
        .and_then(|b| readable(codec::decode::<RunRecord>(&b), "a deleted run"))
    else {
        return Ok(());
    };
    let run_key = crc32fast::hash(run_id.as_bytes());
    let rows: Vec<(String, Vec<u8>)> = tx
        .prepare_cached("SELECT test, record FROM test_history WHERE project = ?1 AND branch = ?2")?
        .query_map([&run.project, &run.branch], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (test, bytes) in rows {
        let Some(mut h) = readable(
            codec::decode_later::<TestHistoryRecord>(&bytes),
            "a test's history",
        ) else {
            continue;
        };
        let before = h.recent.len();
        h.recent.retain(|r| r.run_key != run_key);
        if h.recent.len() != before {
            tx.prepare_cached(
                "UPDATE test_history SET record = ?4 WHERE project = ?1 AND branch = ?2 AND test = ?3",
            )?
            .execute(params![run.project, run.branch, test, codec::encode(&h)])?;
        }
    }
    Ok(())
}

fn down_sample(tx: &rusqlite::Transaction<'_>, before_ms: u64) -> Result<(), StoreError> {
    // A run still held keeps its summary: it answers for itself until it expires.
    let rows: Vec<(String, Vec<u8>)> = tx
        .prepare_cached(
            "SELECT run_id, record FROM summaries WHERE created_at_ms < ?1
             AND run_id NOT IN (SELECT run_id FROM runs)",
        )?
        .query_map([clamp(before_ms)], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut old: Vec<(String, SummaryRecord)> = rows
        .into_iter()
        .filter_map(|(id, b)| Some((id, readable(codec::decode(&b), "a run's summary")?)))
        .collect();
    if old.is_empty() {
        return Ok(());
    }
    // The months they fold into; a month whose record does not read keeps its runs raw.
    let keys: std::collections::BTreeSet<(String, String, u64)> =
        old.iter().map(|(_, s)| month_key(s)).collect();
    let mut months = std::collections::BTreeMap::new();
    let mut unreadable = std::collections::BTreeSet::new();
    for key in keys {
        let found = tx
            .prepare_cached(
                "SELECT record FROM history_months
                 WHERE project = ?1 AND branch = ?2 AND month_start_ms = ?3",
            )?
            .query_row(params![key.0, key.1, clamp(key.2)], |r| {
                r.get::<_, Vec<u8>>(0)
            })
            .optional()?;
        match found.map(|b| readable(codec::decode_later::<MonthRecord>(&b), "a month's history")) {
            Some(Some(m)) => {
                months.insert(key, m);
            }
            Some(None) => {
                unreadable.insert(key);
            }
            None => {}
        }
    }
    old.retain(|(_, s)| !unreadable.contains(&month_key(s)));
    let summaries: Vec<SummaryRecord> = old.iter().map(|(_, s)| s.clone()).collect();
    let folded = crate::history::fold_into_months(&summaries, |project, branch, start| {
        months.remove(&(project.to_owned(), branch.to_owned(), start))
    });
    let mut put = tx.prepare_cached(
        "INSERT OR REPLACE INTO history_months (project, branch, month_start_ms, record)
         VALUES (?1, ?2, ?3, ?4)",
    )?;
    for m in &folded {
        put.execute(params![
            m.project,
            m.branch,
            clamp(m.month_start_ms),
            codec::encode(m)
        ])?;
    }
    let mut drop = tx.prepare_cached("DELETE FROM summaries WHERE run_id = ?1")?;
    for (run_id, _) in &old {
        drop.execute([run_id])?;
    }
    Ok(())
}

fn month_key(s: &SummaryRecord) -> (String, String, u64) {
    (
        s.project.clone(),
        s.branch.clone(),
        crate::history::Bucket::Month.start_of(s.created_at_ms),
    )
}

fn put_shard(
    tx: &rusqlite::Transaction<'_>,
    run_id: &str,
    shard: &ShardRecord,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO shards (run_id, shard_id, record) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![run_id, shard.shard_id, codec::encode(shard)])?;
    Ok(())
}

fn put_summary(tx: &rusqlite::Transaction<'_>, s: &SummaryRecord) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO summaries (run_id, record, project, branch, created_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        s.run_id,
        codec::encode(s),
        s.project,
        s.branch,
        clamp(s.created_at_ms)
    ])?;
    Ok(())
}
