//! The service's side of durability: the records it stores, recovery at start, compaction of
//! complete runs, and retention.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use roaring::RoaringBitmap;

use super::run::{Run, RunState, Shard};
use super::{CoverageService, Error, RunParams, RunStatus, TestTelemetry};
use crate::model::path::PathFilter;
use crate::persist::{
    self, RunRecord, ShardRecord, StoreError, SummaryRecord, TelemetryRecord, Write, codec,
};

pub(super) fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(super) fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        match e {
            StoreError::Full(why) => Error::ResourceExhausted(format!("not stored: {why}")),
            e => Error::Unavailable(format!("not stored: {e}")),
        }
    }
}

pub(super) fn run_record(run: &Run, state: &RunState) -> RunRecord {
    RunRecord {
        run_id: run.id.clone(),
        project: state.params.project.clone(),
        commit: state.params.commit.clone(),
        branch: state.params.branch.clone(),
        flags: state.params.flags.iter().cloned().collect(),
        expected_shards: state.params.expected_shards.clone(),
        created_at_ms: to_ms(run.created_at),
        completed_at_ms: state.completed_at.map(to_ms),
        deltas_kept: run.deltas_kept.load(std::sync::atomic::Ordering::Acquire),
    }
}

pub(super) fn shard_record(id: &str, s: &Shard) -> ShardRecord {
    ShardRecord {
        shard_id: id.to_owned(),
        expected: s.expected,
        attempt: s.attempt,
        last_seq: s.last_seq,
        finished_at_ms: s.finished_at.map(to_ms),
        writer_session: s.writer.to_vec(),
        telemetry: s.telemetry.as_ref().map(telemetry_record),
        stored_bytes: s.stored_bytes,
    }
}

pub(super) fn telemetry_record(t: &TestTelemetry) -> TelemetryRecord {
    TelemetryRecord {
        passed: t.passed,
        failed: t.failed,
        skipped: t.skipped,
        errored: t.errored,
        incomplete: t.incomplete,
        assertions: t.assertions,
        duration_ms: t.duration.map(|d| d.as_millis() as u64),
        peak_memory_bytes: t.peak_memory_bytes,
        platform: t.platform.clone(),
        tests: t.tests.iter().map(Into::into).collect(),
        tags: t.tags.clone().into_iter().collect(),
    }
}

pub(super) fn telemetry_from_record(t: TelemetryRecord) -> TestTelemetry {
    TestTelemetry {
        passed: t.passed,
        failed: t.failed,
        skipped: t.skipped,
        errored: t.errored,
        incomplete: t.incomplete,
        assertions: t.assertions,
        duration: t.duration_ms.map(Duration::from_millis),
        peak_memory_bytes: t.peak_memory_bytes,
        platform: t.platform,
        tests: t.tests.iter().map(|c| c.to_model()).collect(),
        tags: t.tags.into_iter().collect(),
    }
}

fn shard_from_record(r: ShardRecord) -> Shard {
    Shard {
        expected: r.expected,
        attempt: r.attempt,
        last_seq: r.last_seq,
        finished_at: r.finished_at_ms.map(from_ms),
        writer: r.writer_session.into_boxed_slice(),
        telemetry: r.telemetry.map(telemetry_from_record),
        stored_bytes: r.stored_bytes,
        ..Shard::default()
    }
}

pub(super) fn summary(status: &RunStatus) -> SummaryRecord {
    let t = status.totals;
    SummaryRecord {
        run_id: status.run_id.clone(),
        project: status.params.project.clone(),
        commit: status.params.commit.clone(),
        branch: status.params.branch.clone(),
        created_at_ms: to_ms(status.created_at),
        completed_at_ms: status.completed_at.map(to_ms),
        shards: status.shards.len() as u64,
        files: t.files,
        lines: t.lines,
        lines_covered: t.lines_covered,
        branches: t.branches,
        branches_taken: t.branches_taken,
        functions: t.functions,
        functions_hit: t.functions_hit,
        ..tests_summary(status)
    }
}

/// The test results of a run's shards, summed (the slowest shard's duration and the highest
/// peak memory besides), for its summary.
fn tests_summary(status: &RunStatus) -> SummaryRecord {
    let mut s = SummaryRecord::default();
    let add = |total: &mut Option<u64>, v: u64| *total = Some(total.unwrap_or(0) + v);
    for t in status.shards.iter().filter_map(|sh| sh.telemetry.as_ref()) {
        if !t.tests.is_empty() || t.passed + t.failed + t.skipped + t.errored + t.incomplete > 0 {
            s.tests_reported = true;
        }
        s.tests_passed += t.passed;
        s.tests_failed += t.failed;
        s.tests_skipped += t.skipped;
        s.tests_errored += t.errored;
        s.tests_incomplete += t.incomplete;
        if let Some(n) = t.assertions {
            add(&mut s.assertions, n);
        }
        if let Some(d) = t.duration {
            let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            add(&mut s.test_duration_ms, ms);
            s.slowest_shard_ms = s.slowest_shard_ms.max(Some(ms));
        }
        if t.peak_memory_bytes > 0 {
            s.peak_memory_bytes = s.peak_memory_bytes.max(Some(t.peak_memory_bytes));
        }
    }
    s
}

/// What recovery found.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recovery {
    pub runs: usize,
    pub complete_runs: usize,
    /// Files of every run.
    pub files: usize,
    /// Files loaded into memory (those of open runs; complete runs stay in storage).
    pub resident_files: usize,
}

pub(super) fn totals_of(s: &SummaryRecord) -> crate::model::Totals {
    crate::model::Totals {
        files: s.files,
        lines: s.lines,
        lines_covered: s.lines_covered,
        branches: s.branches,
        branches_taken: s.branches_taken,
        functions: s.functions,
        functions_hit: s.functions_hit,
    }
}

impl CoverageService {
    /// Rebuilds every run from the store: open runs from the delta logs of their shards'
    /// current attempts; complete runs are left in storage (their totals come from their
    /// summary) until read. Blocking.
    pub(super) fn recover(&self) -> Result<Recovery, StoreError> {
        let store = &*self.shared.storage;
        let mut report = Recovery::default();
        for loaded in store.load_runs()? {
            let run = self.restore(loaded)?;
            let complete = run.state().is_complete();
            if complete && !run.compacted.load(std::sync::atomic::Ordering::Acquire) {
                // The daemon stopped between the last finish and the compaction.
                // Compaction only saves space: if it cannot be stored (a full
                // directory), the run is served from its deltas, and the store's
                // failure (health NOT_SERVING) says that nothing can be written.
                match self.compact(&run) {
                    Ok(()) => {
                        self.shared.cache.forget(&run.id);
                        run.evict();
                    }
                    Err(e) => tracing::error!(
                        run = %run.id,
                        "compacting the complete run failed; it stays in its delta log: {e}"
                    ),
                }
            }
            report.runs += 1;
            report.complete_runs += usize::from(complete);
            report.files += run.files();
            report.resident_files += run.aggregate().map_or(0, |a| a.len());
            self.shared.runs.insert(run.id.clone(), run);
        }
        Ok(report)
    }

    /// A run as the store holds it: an open run with its deltas merged; a compacted one left
    /// in storage (its totals from its summary), or read back if it has no summary. Blocking.
    pub(super) fn restore(&self, loaded: persist::LoadedRun) -> Result<Arc<Run>, StoreError> {
        let store = &*self.shared.storage;
        let r = loaded.run;
        let params = RunParams {
            project: r.project,
            commit: r.commit,
            branch: r.branch,
            flags: r.flags.into_iter().collect(),
            expected_shards: r.expected_shards,
            project_as: Default::default(),
        };
        let run = Arc::new(Run::restore(
            r.run_id.clone(),
            from_ms(r.created_at_ms),
            params,
            loaded
                .shards
                .into_iter()
                .map(|s| (s.shard_id.clone(), shard_from_record(s)))
                .collect(),
        ));
        run.stored.store(true, std::sync::atomic::Ordering::Release);
        run.deltas_kept
            .store(r.deltas_kept, std::sync::atomic::Ordering::Release);
        if let Some(ms) = r.completed_at_ms {
            let mut state = run.state();
            if state.is_complete() {
                state.completed_at = Some(from_ms(ms));
            }
        }
        if let Some(files) = loaded.files {
            run.state().known_files = Some(Arc::new(crate::model::path::RepoFiles::new(files)));
        }
        let interner = &self.shared.interner;
        match (&loaded.summary, loaded.compacted) {
            // A complete run stays in storage until someone reads it.
            (Some(summary), true) => run.set_stored(totals_of(summary)),
            (None, true) => {
                // No summary to take the totals from: read it.
                run.set_stored(crate::model::Totals::default());
                let (aggregate, _) = run.load(interner, store)?;
                self.shared.cache.admit(&run, aggregate.heap_bytes());
            }
            (_, false) => {
                if let Some(aggregate) = run.aggregate() {
                    let attempts = run.current_attempts();
                    store.for_each_delta(&run.id, &attempts, &mut |_, files| {
                        aggregate.merge_batch(interner, &files);
                    })?;
                }
            }
        }
        Ok(run)
    }

    /// Stores a complete run's merged files and drops its delta log; the run then counts
    /// against the memory budget, and may leave memory. Blocking.
    pub(super) fn compact(&self, run: &Arc<Run>) -> Result<(), StoreError> {
        let _compacting = run.compacting.lock().unwrap_or_else(|e| e.into_inner());
        {
            let state = run.state();
            // Reopened by a retry meanwhile, or already compacted (a retry reopened and
            // completed it again before this compaction's turn came).
            if !state.is_complete() || run.compacted.load(std::sync::atomic::Ordering::Acquire) {
                return Ok(());
            }
            if state.stale {
                // The aggregate may hold a replaced attempt's data: keep the delta log instead.
                return Ok(());
            }
        }
        let Some(aggregate) = run.aggregate() else {
            // Already stored, and out of memory.
            return Ok(());
        };
        let keep_deltas = self.shared.limits.reopen_window.is_some();
        run.deltas_kept
            .store(keep_deltas, std::sync::atomic::Ordering::Release);
        let _gate = run.gate_shared();
        let start = std::time::Instant::now();
        // Each shard's lines first, while the delta log is there, a shard per write.
        self.store_shard_lines(run)?;
        let by_shard = start.elapsed();
        let record = run_record(run, &run.state());
        let summary = summary(&run.status());
        let tests = self.record_tests(run)?;
        // The store writes each part as it is encoded, in one transaction: a few parts in
        // memory rather than the whole run.
        let (sender, parts) = persist::Parts::channel(2);
        let (written, merged) = std::thread::scope(|scope| {
            let encoder = scope.spawn(|| {
                let mut chunk = Vec::new();
                let mut open = true;
                let _ = aggregate.for_each_sorted(&PathFilter::default(), |path, file| {
                    chunk.push((Arc::<str>::from(path), file.clone()));
                    if chunk.len() >= persist::FILES_PER_PART {
                        open =
                            sender.send(codec::encode_files(chunk.iter().map(|(p, f)| (&**p, f))));
                        chunk.clear();
                    }
                    if open { Ok(()) } else { Err(()) }
                });
                if open && !chunk.is_empty() {
                    open = sender.send(codec::encode_files(chunk.iter().map(|(p, f)| (&**p, f))));
                }
                if open {
                    sender.end();
                }
                start.elapsed() - by_shard
            });
            let mut writes = vec![
                Write::UpdateRun(record),
                Write::Compact {
                    run_id: run.id.clone(),
                    parts,
                    summary,
                    keep_deltas,
                },
            ];
            writes.extend(tests);
            let written = self.shared.storage.write_blocking(writes);
            let merged = encoder.join().unwrap_or_default();
            (written, merged)
        });
        if let Err(e) = written {
            run.deltas_kept
                .store(false, std::sync::atomic::Ordering::Release);
            return Err(e);
        }
        run.compacted
            .store(true, std::sync::atomic::Ordering::Release);
        tracing::info!(
            run = %run.id,
            files = aggregate.len(),
            "compacted in {} ms: merged files {} ms, each shard's lines {} ms",
            start.elapsed().as_millis(),
            merged.as_millis(),
            by_shard.as_millis()
        );
        self.shared.cache.admit(run, aggregate.heap_bytes());
        Ok(())
    }

    /// The write that adds a complete run's outcome of each test (from every attempt of its
    /// shards, replaced ones included) to the tests' histories on its branch; none when no
    /// shard reported tests. Blocking.
    pub(super) fn record_tests(&self, run: &Run) -> Result<Option<Write>, StoreError> {
        let replaced = self.shared.storage.attempts(&run.id)?;
        let replaced: Vec<(String, Vec<crate::model::TestCase>)> = replaced
            .into_iter()
            .filter_map(|a| {
                let t = a.telemetry?;
                Some((a.shard_id, t.tests.iter().map(|c| c.to_model()).collect()))
            })
            .collect();
        let state = run.state();
        let current = state
            .shards
            .iter()
            .filter_map(|(id, s)| Some((id.as_str(), &s.telemetry.as_ref()?.tests[..])));
        let outcomes = crate::flaky::run_outcomes(
            replaced
                .iter()
                .map(|(id, t)| (id.as_str(), &t[..]))
                .chain(current),
        );
        if outcomes.is_empty() {
            return Ok(None);
        }
        let (run_key, commit_key) = (
            crc32fast::hash(run.id.as_bytes()),
            crc32fast::hash(state.params.commit.as_bytes()),
        );
        let at_ms = to_ms(run.created_at);
        Ok(Some(Write::RecordTests {
            run_id: run.id.clone(),
            project: state.params.project.clone(),
            branch: state.params.branch.clone(),
            outcomes: outcomes
                .into_iter()
                .map(|(test, outcome)| {
                    let o = crate::persist::TestRunOutcome {
                        run_key,
                        commit_key,
                        at_ms,
                        outcome: outcome as i32,
                    };
                    (test, o)
                })
                .collect(),
        }))
    }

    /// Stores, per shard that sent anything, the lines its current attempt covered, read from
    /// the delta log, for set algebra once the log is gone. Blocking.
    fn store_shard_lines(&self, run: &Run) -> Result<(), StoreError> {
        for (shard_id, attempt, last_seq) in run.current_attempts() {
            let covered = self.shard_lines(run, &(shard_id.clone(), attempt, last_seq))?;
            let mut parts: Vec<Vec<u8>> = covered
                .chunks(persist::FILES_PER_PART)
                .map(|c| codec::encode_shard_lines(c.iter().map(|(p, l)| (&**p, l))))
                .collect();
            if parts.is_empty() {
                // Stored all the same: no part at all means a release that kept none.
                parts.push(codec::encode_shard_lines([]));
            }
            self.shared
                .storage
                .write_blocking(vec![Write::PutShardLines {
                    run_id: run.id.clone(),
                    shard_id,
                    parts,
                }])?;
        }
        Ok(())
    }

    /// The lines shard `shard` of `run` covered (its current attempt), per file, sorted by
    /// path: read from the delta log while the run has one, from what compaction stored after.
    /// Blocking.
    pub(super) fn lines_of_shard(
        &self,
        run: &Run,
        shard: &str,
    ) -> Result<Vec<(Arc<str>, RoaringBitmap)>, Error> {
        let attempt = match run.state().shards.get(shard) {
            None => {
                return Err(Error::ShardNotFound {
                    run: run.id.clone(),
                    shard: shard.to_owned(),
                });
            }
            Some(s) if s.attempt == 0 => return Ok(Vec::new()),
            Some(s) => (shard.to_owned(), s.attempt, s.last_seq),
        };
        let _compacting = run.compacting.lock().unwrap_or_else(|e| e.into_inner());
        if !run.compacted.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(self.shard_lines(run, &attempt)?);
        }
        let mut out = Vec::new();
        let stored = self
            .shared
            .storage
            .for_each_shard_lines(&run.id, shard, &mut |part| out.extend(part))?;
        if !stored {
            return Err(Error::FailedPrecondition(format!(
                "run `{}` was stored by an earlier release of covd, which kept no per-shard \
                 lines: shard `{shard}` alone cannot be told apart",
                run.id
            )));
        }
        Ok(out)
    }

    /// The lines a shard attempt's stored deltas covered, per file, sorted by path. Blocking.
    pub(super) fn shard_lines(
        &self,
        run: &Run,
        attempt: &(String, u32, u64),
    ) -> Result<Vec<(Arc<str>, RoaringBitmap)>, StoreError> {
        let mut covered: HashMap<Arc<str>, RoaringBitmap> = HashMap::new();
        self.shared.storage.for_each_delta(
            &run.id,
            std::slice::from_ref(attempt),
            &mut |_, batch| {
                for part in batch.files() {
                    let lines = part.covered();
                    if lines.is_empty() {
                        continue;
                    }
                    match covered.get_mut(part.path()) {
                        Some(all) => *all |= lines,
                        None => {
                            covered.insert(part.path().into(), lines);
                        }
                    }
                }
            },
        )?;
        let mut covered: Vec<_> = covered.into_iter().collect();
        covered.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(covered)
    }

    /// Drops the raw data of runs created before `cutoff`, keeping their summaries. Returns
    /// how many expired.
    pub async fn expire_runs(&self, cutoff: SystemTime) -> Result<usize, Error> {
        let old: Vec<Arc<Run>> = self
            .shared
            .runs
            .iter()
            .filter(|r| r.created_at < cutoff)
            .map(|r| r.value().clone())
            .collect();
        for run in &old {
            self.retire(run).await?;
        }
        if !old.is_empty() {
            self.shared.interner.prune();
        }
        Ok(old.len())
    }

    /// At `--max-runs`, before a new run opens: the run settled longest ago (complete, or with
    /// every shard finished when it declared none) gives up its raw data as retention would,
    /// its summary staying in history, so that CI is not refused because old runs were not
    /// deleted. Runs still open are never evicted: when every run is, the open is refused.
    pub(super) async fn make_room(&self, run_id: &str) -> Result<(), Error> {
        let max = self.shared.limits.max_runs;
        if self.shared.runs.len() < max || self.shared.runs.contains_key(run_id) {
            return Ok(());
        }
        let settled_at = |run: &Run| {
            let state = run.state();
            if !state.settled() || state.reopening {
                return None;
            }
            state
                .completed_at
                .or_else(|| state.shards.values().filter_map(|s| s.finished_at).max())
        };
        // Taken out of the map first: no run's lock is taken while the map's are held.
        let held: Vec<Arc<Run>> = self.shared.runs.iter().map(|r| r.value().clone()).collect();
        let oldest = held
            .into_iter()
            .filter_map(|r| settled_at(&r).map(|at| (at, r)))
            .min_by_key(|(at, _)| *at);
        if let Some((_, run)) = oldest {
            tracing::warn!(
                "at --max-runs ({max}): run `{}` gives up its raw data early (its summary stays) \
                 for a new run",
                run.id
            );
            self.shared
                .runs_evicted
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.retire(&run).await?;
            self.shared.interner.prune();
        }
        Ok(())
    }

    /// Drops one run's raw data, keeping its summary for history.
    async fn retire(&self, run: &Arc<Run>) -> Result<(), Error> {
        // In a cluster, the summary from what the store holds, not from a copy that nobody
        // asked about here; and none at all for a run another node deleted meanwhile (its
        // retention wrote the summary, or a user dropped it).
        self.refreshed(&run.id).await?;
        if run.state().deleted {
            return Ok(());
        }
        let summary = summary(&run.status());
        self.shared
            .storage
            .write(vec![Write::DeleteRun {
                run_id: run.id.clone(),
                summary: Some(summary),
            }])
            .await?;
        self.shared.runs.remove(&run.id);
        self.shared.cache.forget(&run.id);
        run.state().deleted = true;
        run.notify();
        Ok(())
    }
}
