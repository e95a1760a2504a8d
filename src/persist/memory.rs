//! The in-memory store of `--in-memory`: the [`Storage`] contract with nothing on disk, so the
//! service has one code path whether or not it is durable. A write is "committed" once it is
//! in the map; everything is gone when the process ends.
//!
//! Records are kept as the blobs `codec` makes, exactly as a durable backend keeps them, and
//! deltas as the bytes they came in (copied out of the receive buffer, which would otherwise
//! stay allocated whole): they are only read again when an attempt is replaced or a run that
//! left memory is read back (`service/cache.rs`).
//!
//! Nothing here can fail the way a disk does, so there is no failure latch: a delta that
//! would take the store beyond its cap (`--max-db-bytes`) is refused alone, with `Full`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use roaring::RoaringBitmap;

use super::codec::{self, WireDecoder};
use super::records::{
    AttemptRecord, FileListRecord, MonthRecord, RunRecord, ShardRecord, SummaryRecord,
    TestHistoryRecord,
};
use super::{CommitStats, Digest, HistoryQuery, LoadedRun, Storage, StoreError, Write};
use crate::model::{FileBatch, FileCoverage};

/// Runs, shards, deltas and summaries in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    stats: CommitStats,
    wire: Option<WireDecoder>,
    /// A cap on the bytes of deltas and merged files held (`--max-db-bytes`).
    max_bytes: Option<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    runs: BTreeMap<String, StoredRun>,
    summaries: HashMap<String, Vec<u8>>,
    /// Down-sampled months by project, branch and month start.
    months: BTreeMap<(String, String, u64), Vec<u8>>,
    /// Test histories by project, branch and test, with when each was last seen.
    tests: BTreeMap<(String, String, String), (u64, Vec<u8>)>,
    /// Source texts by digest (encoded), kept while a run names them.
    sources: HashMap<Digest, Vec<u8>>,
    /// Bytes of deltas, merged files and source texts held, for the cap.
    bytes: u64,
}

#[derive(Debug, Default)]
struct StoredRun {
    record: Vec<u8>,
    shards: BTreeMap<String, Vec<u8>>,
    /// By shard, attempt and sequence number.
    deltas: BTreeMap<(String, u32, u64), Bytes>,
    merged: Vec<Vec<u8>>,
    /// Per shard, the parts of its covered lines (a compacted run).
    shard_lines: BTreeMap<String, Vec<Vec<u8>>>,
    files: Option<Vec<u8>>,
    /// Replaced attempts, by shard and attempt.
    attempts: BTreeMap<(String, u32), Vec<u8>>,
    /// The digests of its files' source texts, by path.
    sources: BTreeMap<String, Digest>,
    /// Bytes of `deltas`, `merged`, `shard_lines` and `attempts`.
    bytes: u64,
}

/// Bytes the deltas and source texts of a group add.
fn delta_bytes(writes: &[Write]) -> u64 {
    writes
        .iter()
        .map(|w| match w {
            Write::AppendDelta { body, .. } => body.iter().map(|b| b.len() as u64).sum(),
            Write::PutSources { texts, .. } => texts.iter().map(|(_, t)| t.len() as u64).sum(),
            _ => 0,
        })
        .sum()
}

impl MemoryStore {
    /// An empty store; `max_bytes` caps the bytes of deltas and merged files it holds: a
    /// delta beyond it is refused.
    pub fn new(max_bytes: Option<u64>) -> MemoryStore {
        MemoryStore {
            max_bytes,
            ..MemoryStore::default()
        }
    }

    /// Gives the store the protocol's decoder for deltas kept in wire form (see
    /// [`super::SqliteStore::with_wire_decoder`]).
    pub fn with_wire_decoder(mut self, decode: WireDecoder) -> MemoryStore {
        self.wire = Some(decode);
        self
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Every update below is whole or checked before it starts, so a panic elsewhere
        // leaves nothing half-written.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        // A compaction's parts are taken before anything is applied: a producer that stops
        // early fails the whole write.
        let mut merged = Vec::new();
        for w in &writes {
            if let Write::Compact { parts, .. } = w {
                let mut all = Vec::new();
                parts.for_each(|_, part| {
                    all.push(part);
                    Ok::<(), StoreError>(())
                })?;
                merged.push(all);
            }
        }
        let mut merged = merged.into_iter();
        let mut inner = self.inner();
        // Only what clients send (deltas, source texts) counts against the cap: a compaction
        // replaces a run's deltas by fewer bytes, and refusing it would help nobody.
        if let Some(max) = self.max_bytes {
            let total = inner.bytes + delta_bytes(&writes);
            if total > max {
                return Err(StoreError::Full(format!(
                    "the in-memory store would hold {total} bytes of coverage, beyond \
                     --max-db-bytes {max}; finished runs leave it when they expire or are deleted"
                )));
            }
        }
        let n = writes.len() as u64;
        for w in writes {
            let parts = match &w {
                Write::Compact { .. } => merged.next().unwrap_or_default(),
                _ => Vec::new(),
            };
            apply(&mut inner, w, parts);
        }
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.stats.writes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

/// One write, as the SQLite store applies it: writes for a run that is not stored (deleted
/// meanwhile) are dropped.
fn apply(inner: &mut Inner, w: Write, merged: Vec<Vec<u8>>) {
    let run_id = match &w {
        Write::DownSample {
            before_ms,
            tests_before_ms,
        } => {
            down_sample(inner, *before_ms);
            let before = *tests_before_ms;
            inner.tests.retain(|_, (last_seen, _)| *last_seen >= before);
            return;
        }
        Write::RecordTests {
            run_id,
            project,
            branch,
            outcomes,
        } => {
            if !inner.runs.contains_key(run_id) {
                return;
            }
            for (test, outcome) in outcomes {
                let key = (project.clone(), branch.clone(), test.clone());
                let old = inner.tests.get(&key).map(|(_, b)| {
                    codec::decode_later::<TestHistoryRecord>(b)
                        .expect("a record this store encoded")
                });
                let new = crate::flaky::record(old, *outcome);
                inner
                    .tests
                    .insert(key, (new.last_seen_ms, codec::encode(&new)));
            }
            return;
        }
        Write::PutSources {
            run_id,
            texts,
            names,
        } => {
            if !inner.runs.contains_key(run_id) {
                return;
            }
            for (digest, body) in texts {
                if !inner.sources.contains_key(digest) {
                    inner.bytes += body.len() as u64;
                    inner.sources.insert(*digest, body.clone());
                }
            }
            // A name whose text is not here is left out, as the SQLite store does.
            let kept: Vec<(String, Digest)> = names
                .iter()
                .filter(|(_, d)| inner.sources.contains_key(d))
                .cloned()
                .collect();
            if let Some(run) = inner.runs.get_mut(run_id) {
                run.sources.extend(kept);
            }
            return;
        }
        Write::PutRun(run) => {
            let stored = inner.runs.entry(run.run_id.clone()).or_default();
            // Completion and kept deltas are `UpdateRun`'s to say, as in the SQLite store.
            let mut run = run.clone();
            if let Ok(old) = codec::decode::<RunRecord>(&stored.record) {
                run.completed_at_ms = old.completed_at_ms;
                run.deltas_kept = old.deltas_kept;
            }
            stored.record = codec::encode(&run);
            return;
        }
        Write::UpdateRun(run) => &run.run_id,
        Write::PutShard { run_id, .. }
        | Write::AppendDelta { run_id, .. }
        | Write::StartAttempt { run_id, .. }
        | Write::PutShardLines { run_id, .. }
        | Write::Compact { run_id, .. }
        | Write::DropDeltas { run_id }
        | Write::Reopen { run_id }
        | Write::PutFiles { run_id, .. }
        | Write::DeleteRun { run_id, .. } => run_id,
    };
    let run_id = run_id.clone();
    if let Write::DeleteRun { summary, .. } = w {
        if let Some(run) = inner.runs.remove(&run_id) {
            inner.bytes -= run.bytes;
            if summary.is_none() {
                forget_tests_of(inner, &run_id, &run.record);
            }
            // The texts it named that no other run names.
            for digest in run.sources.values() {
                if !inner
                    .runs
                    .values()
                    .any(|r| r.sources.values().any(|d| d == digest))
                    && let Some(body) = inner.sources.remove(digest)
                {
                    inner.bytes -= body.len() as u64;
                }
            }
        }
        match summary {
            Some(s) => {
                inner.summaries.insert(s.run_id.clone(), codec::encode(&s));
            }
            None => {
                inner.summaries.remove(&run_id);
            }
        }
        return;
    }
    let Some(run) = inner.runs.get_mut(&run_id) else {
        return;
    };
    let before = run.bytes;
    let mut summary = None;
    match w {
        Write::UpdateRun(record) => run.record = codec::encode(&record),
        Write::PutShard { shard, .. } => put_shard(run, &shard),
        Write::AppendDelta { shard, body, .. } => {
            let body = Bytes::from(body.concat());
            run.bytes += body.len() as u64;
            let key = (shard.shard_id.clone(), shard.attempt, shard.last_seq);
            if let Some(replaced) = run.deltas.insert(key, body) {
                run.bytes -= replaced.len() as u64;
            }
            put_shard(run, &shard);
        }
        Write::StartAttempt {
            shard, replaced, ..
        } => {
            if let Some(a) = replaced {
                let bytes = codec::encode(&a);
                run.bytes += bytes.len() as u64;
                if let Some(old) = run.attempts.insert((a.shard_id.clone(), a.attempt), bytes) {
                    run.bytes -= old.len() as u64;
                }
            }
            let mut dropped = 0;
            run.deltas.retain(|(id, attempt, _), body| {
                let keep = *id != shard.shard_id || *attempt >= shard.attempt;
                if !keep {
                    dropped += body.len() as u64;
                }
                keep
            });
            run.bytes -= dropped;
            put_shard(run, &shard);
        }
        Write::PutShardLines {
            shard_id, parts, ..
        } => {
            let added: u64 = parts.iter().map(|p| p.len() as u64).sum();
            let replaced = run.shard_lines.insert(shard_id, parts).unwrap_or_default();
            run.bytes = run.bytes + added - replaced.iter().map(|p| p.len() as u64).sum::<u64>();
        }
        Write::Compact {
            summary: s,
            keep_deltas,
            ..
        } => {
            run.merged = merged;
            if !keep_deltas {
                run.deltas.clear();
            }
            run.bytes = held_bytes(run);
            summary = Some(s);
        }
        Write::DropDeltas { .. } => {
            run.deltas.clear();
            run.bytes = held_bytes(run);
        }
        Write::Reopen { .. } => {
            run.merged.clear();
            run.bytes = held_bytes(run);
        }
        Write::PutFiles { files, .. } => {
            run.files = Some(codec::encode(&FileListRecord { paths: files }));
        }
        Write::PutRun(_)
        | Write::PutSources { .. }
        | Write::DeleteRun { .. }
        | Write::DownSample { .. }
        | Write::RecordTests { .. } => {
            unreachable!("handled above")
        }
    }
    let after = run.bytes;
    inner.bytes = inner.bytes - before + after;
    if let Some(s) = summary {
        inner.summaries.insert(s.run_id.clone(), codec::encode(&s));
    }
}

/// The bytes `run` holds (see [`StoredRun::bytes`]).
fn held_bytes(run: &StoredRun) -> u64 {
    let parts = |p: &Vec<u8>| p.len() as u64;
    run.deltas.values().map(|d| d.len() as u64).sum::<u64>()
        + run.merged.iter().map(parts).sum::<u64>()
        + run.shard_lines.values().flatten().map(parts).sum::<u64>()
        + run.attempts.values().map(parts).sum::<u64>()
}

/// Takes a deleted run's outcomes out of the test histories of its branch.
fn forget_tests_of(inner: &mut Inner, run_id: &str, record: &[u8]) {
    let run = codec::decode::<RunRecord>(record).expect("a run this store encoded");
    let run_key = crc32fast::hash(run_id.as_bytes());
    for ((project, branch, _), (_, bytes)) in inner.tests.iter_mut() {
        if *project != run.project || *branch != run.branch {
            continue;
        }
        let mut h =
            codec::decode_later::<TestHistoryRecord>(bytes).expect("a record this store encoded");
        let before = h.recent.len();
        h.recent.retain(|r| r.run_key != run_key);
        if h.recent.len() != before {
            *bytes = codec::encode(&h);
        }
    }
}

fn down_sample(inner: &mut Inner, before_ms: u64) {
    let mut old = Vec::new();
    let runs = &inner.runs;
    inner.summaries.retain(|run_id, s| {
        // Only this process wrote them, from records it had.
        let s = codec::decode::<SummaryRecord>(s).expect("a summary this store encoded");
        // A run still held keeps its summary: it answers for itself until it expires.
        let keep = s.created_at_ms >= before_ms || runs.contains_key(run_id);
        if !keep {
            old.push(s);
        }
        keep
    });
    let months = &mut inner.months;
    let folded = crate::history::fold_into_months(&old, |project, branch, start| {
        months
            .get(&(project.to_owned(), branch.to_owned(), start))
            .map(|m| codec::decode_later::<MonthRecord>(m).expect("a month this store encoded"))
    });
    for m in folded {
        let key = (m.project.clone(), m.branch.clone(), m.month_start_ms);
        months.insert(key, codec::encode(&m));
    }
}

fn put_shard(run: &mut StoredRun, shard: &ShardRecord) {
    run.shards
        .insert(shard.shard_id.clone(), codec::encode(shard));
}

impl Storage for MemoryStore {
    fn is_durable(&self) -> bool {
        false
    }

    fn failure(&self) -> Option<String> {
        None
    }

    fn write(&self, writes: Vec<Write>) -> BoxFuture<'_, Result<(), StoreError>> {
        // A map insert under a lock held for microseconds: no thread hand-off needed.
        let result = self.commit(writes);
        Box::pin(async move { result })
    }

    fn write_blocking(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.commit(writes)
    }

    fn load_runs(&self) -> Result<Vec<LoadedRun>, StoreError> {
        let inner = self.inner();
        inner
            .runs
            .iter()
            .map(|(id, stored)| {
                Ok(LoadedRun {
                    summary: inner
                        .summaries
                        .get(id)
                        .map(|s| codec::decode::<SummaryRecord>(s))
                        .transpose()?,
                    run: codec::decode::<RunRecord>(&stored.record)?,
                    shards: stored
                        .shards
                        .values()
                        .map(|s| codec::decode::<ShardRecord>(s))
                        .collect::<Result<_, _>>()?,
                    compacted: !stored.merged.is_empty(),
                    files: stored
                        .files
                        .as_ref()
                        .map(|f| codec::decode::<FileListRecord>(f).map(|l| l.paths))
                        .transpose()?,
                })
            })
            .collect()
    }

    fn for_each_delta(
        &self,
        run_id: &str,
        attempts: &[(String, u32, u64)],
        f: &mut dyn FnMut(&str, FileBatch),
    ) -> Result<(), StoreError> {
        // Copied out first: `f` merges, and must not run under the store's lock.
        let deltas: Vec<(String, Bytes)> = {
            let inner = self.inner();
            let Some(run) = inner.runs.get(run_id) else {
                return Ok(());
            };
            attempts
                .iter()
                .filter(|(_, _, last_seq)| *last_seq > 0)
                .flat_map(|(shard, attempt, last_seq)| {
                    run.deltas
                        .range((shard.clone(), *attempt, 1)..=(shard.clone(), *attempt, *last_seq))
                        .map(|(_, body)| (shard.clone(), body.clone()))
                })
                .collect()
        };
        for (shard, body) in deltas {
            f(&shard, codec::decode_delta(&body, self.wire)?);
        }
        Ok(())
    }

    fn for_each_merged(
        &self,
        run_id: &str,
        f: &mut dyn FnMut(Vec<(Arc<str>, FileCoverage)>),
    ) -> Result<(), StoreError> {
        let parts = match self.inner().runs.get(run_id) {
            Some(run) => run.merged.clone(),
            None => return Ok(()),
        };
        for part in parts {
            f(codec::decode_files(&part)?);
        }
        Ok(())
    }

    fn for_each_shard_lines(
        &self,
        run_id: &str,
        shard_id: &str,
        f: &mut dyn FnMut(Vec<(Arc<str>, RoaringBitmap)>),
    ) -> Result<bool, StoreError> {
        let parts = match self.inner().runs.get(run_id) {
            Some(run) => run.shard_lines.get(shard_id).cloned().unwrap_or_default(),
            None => return Ok(false),
        };
        for part in &parts {
            f(codec::decode_shard_lines(part)?);
        }
        Ok(!parts.is_empty())
    }

    fn summaries(&self, q: &HistoryQuery) -> Result<Vec<SummaryRecord>, StoreError> {
        let mut out = Vec::new();
        for s in self.inner().summaries.values() {
            let s = codec::decode::<SummaryRecord>(s)?;
            if q.selects(&s.project, &s.branch, s.created_at_ms) {
                out.push(s);
            }
        }
        super::newest_first(&mut out);
        out.truncate(q.limit);
        Ok(out)
    }

    fn attempts(&self, run_id: &str) -> Result<Vec<AttemptRecord>, StoreError> {
        let inner = self.inner();
        let Some(run) = inner.runs.get(run_id) else {
            return Ok(Vec::new());
        };
        run.attempts
            .values()
            .map(|b| Ok(codec::decode_later::<AttemptRecord>(b)?))
            .collect()
    }

    fn usage(&self) -> Result<Option<(u64, u64)>, StoreError> {
        Ok(self.max_bytes.map(|max| (self.inner().bytes, max)))
    }

    fn missing_sources(&self, digests: &[Digest]) -> Result<Vec<bool>, StoreError> {
        let inner = self.inner();
        Ok(digests
            .iter()
            .map(|d| !inner.sources.contains_key(d))
            .collect())
    }

    fn source_digests(
        &self,
        run_id: &str,
        paths: &[String],
    ) -> Result<Vec<Option<Digest>>, StoreError> {
        let inner = self.inner();
        let run = inner.runs.get(run_id);
        Ok(paths
            .iter()
            .map(|p| run.and_then(|r| r.sources.get(p).copied()))
            .collect())
    }

    fn source(&self, run_id: &str, path: &str) -> Result<Option<(Digest, Vec<u8>)>, StoreError> {
        let inner = self.inner();
        let Some(digest) = inner.runs.get(run_id).and_then(|r| r.sources.get(path)) else {
            return Ok(None);
        };
        let Some(body) = inner.sources.get(digest) else {
            return Ok(None);
        };
        Ok(Some((*digest, codec::decode_source(body)?)))
    }

    fn test_histories(
        &self,
        project: &str,
        branch: &str,
    ) -> Result<Vec<(String, TestHistoryRecord)>, StoreError> {
        let inner = self.inner();
        let from = (project.to_owned(), branch.to_owned(), String::new());
        inner
            .tests
            .range(from..)
            .take_while(|((p, b, _), _)| p == project && b == branch)
            .map(|((_, _, test), (_, bytes))| {
                Ok((
                    test.clone(),
                    codec::decode_later::<TestHistoryRecord>(bytes)?,
                ))
            })
            .collect()
    }

    fn history(
        &self,
        q: &HistoryQuery,
    ) -> Result<(Vec<SummaryRecord>, Vec<MonthRecord>), StoreError> {
        let inner = self.inner();
        let mut runs = Vec::new();
        for s in inner.summaries.values() {
            let s = codec::decode::<SummaryRecord>(s)?;
            if q.selects(&s.project, &s.branch, s.created_at_ms) {
                runs.push(s);
            }
        }
        super::newest_first(&mut runs);
        runs.truncate(q.limit);
        let mut out = Vec::new();
        for m in inner.months.values() {
            let m = codec::decode_later::<MonthRecord>(m)?;
            if q.selects_month(&m) {
                out.push(m);
            }
        }
        crate::persist::oldest_month_first(&mut out);
        Ok((runs, out))
    }

    fn stats(&self) -> &CommitStats {
        &self.stats
    }
}
