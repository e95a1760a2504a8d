//! Shard streams: the header that starts (or resumes, or replaces) an attempt, the deltas with
//! their sequence numbers, and the finish.
//!
//! Every step is committed to the storage before it is answered: a delta is committed (in a
//! group with whatever else arrived meanwhile), then merged in memory, then acknowledged. A
//! crash between commit and merge loses nothing: recovery merges what the store holds.

use std::sync::Arc;
use std::time::SystemTime;

use super::durable::shard_record;
use super::run::{RECENT_DIGESTS, Run, RunState, Shard, check_expected};
use super::types::MAX_SESSION_BYTES;
use super::{
    Applied, CoverageService, Delta, Error, MAX_UNKNOWN_REPORTED, Result, RunStatus, ShardHeader,
    TestTelemetry, check_run_id, check_shard_id, normalize_params,
};
use crate::aggregate::Aggregate;
use crate::model::FileBatch;
use crate::model::path::{RepoFiles, Resolution};
use crate::persist::{AttemptRecord, Write, codec};

/// How long after a run completes its compaction starts (see `finish`).
const COMPACTION_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// One open stream of one shard attempt. Dropping it marks the stream closed; a shard whose
/// streams all closed without a finish shows as interrupted.
#[derive(Debug)]
pub struct ShardSession {
    run: Arc<Run>,
    shard_id: String,
    attempt: u32,
    last_seq: u64,
    finished: bool,
}

impl ShardSession {
    pub fn run_id(&self) -> &str {
        &self.run.id
    }

    pub fn shard_id(&self) -> &str {
        &self.shard_id
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The last sequence number acknowledged when the stream started.
    pub fn resume_from(&self) -> u64 {
        self.last_seq
    }

    /// Whether the attempt had already finished when the stream started.
    pub fn already_finished(&self) -> bool {
        self.finished
    }
}

impl Drop for ShardSession {
    fn drop(&mut self) {
        if let Some(shard) = self.run.state().shards.get_mut(&self.shard_id) {
            shard.streams = shard.streams.saturating_sub(1);
        }
        self.run.notify();
    }
}

/// Releases a shard's busy mark when dropped, whatever path the operation took.
struct Busy<'a> {
    run: &'a Run,
    shard_id: &'a str,
    attempt: u32,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut state = self.run.state();
        // Unwinding from a panic in the work it guarded: a merge may be partial, so the
        // aggregate is rebuilt at the next stream start.
        if std::thread::panicking() {
            state.stale = true;
        }
        if let Some(s) = state.shards.get_mut(self.shard_id)
            && s.busy == Some(self.attempt)
        {
            s.busy = None;
        }
    }
}

/// Marks the shard busy for `attempt`, or says why it cannot be. The caller then holds a
/// [`Busy`] guard for it (possibly on another thread) to release it.
fn mark_busy(state: &mut RunState, shard_id: &str, attempt: u32) -> Result<()> {
    let shard = state
        .shards
        .get_mut(shard_id)
        .ok_or_else(|| Error::FailedPrecondition(format!("shard `{shard_id}` vanished")))?;
    if shard.busy.is_some() {
        return Err(Error::Aborted(format!(
            "another stream of shard `{shard_id}` is writing; reconnect and resume"
        )));
    }
    shard.busy = Some(attempt);
    Ok(())
}

impl CoverageService {
    /// Starts a stream for a shard attempt: opens the run if needed, replaces an older attempt,
    /// and says where to resume.
    pub async fn begin_shard(&self, header: ShardHeader) -> Result<ShardSession> {
        self.begin_shard_as(header, &super::anyone).await
    }

    /// [`CoverageService::begin_shard`] for a caller that may write only some projects: see
    /// [`CoverageService::open_run_as`].
    pub async fn begin_shard_as(
        &self,
        header: ShardHeader,
        owner: super::Owner<'_>,
    ) -> Result<ShardSession> {
        if header.session.len() > MAX_SESSION_BYTES {
            return Err(Error::invalid(
                "header.session_id",
                format!(
                    "is {} bytes long; the limit is {MAX_SESSION_BYTES}",
                    header.session.len()
                ),
            ));
        }
        let limits = self.limits();
        check_run_id(limits, "header.run_id", &header.run_id)?;
        check_shard_id(limits, "header.shard_id", &header.shard_id)?;
        let mut params = normalize_params(limits, header.params)?;
        params.expected_shards.clear(); // only OpenRun declares expectations
        self.make_room(&header.run_id).await?;
        self.refreshed(&header.run_id).await?;
        let (_, run) = self.get_or_create(&header.run_id, &params, owner)?;
        // Not only when this stream created the run: the stream that did may have failed
        // before its write, and another shard's deltas must not be acknowledged meanwhile.
        if !run.stored.load(std::sync::atomic::Ordering::Acquire) {
            self.persist_run(&run).await?;
        }
        let attempt = header.attempt.max(1);
        let shard_id = header.shard_id;
        let session_id = header.session;
        let retries_complete_run = {
            let state = run.state();
            state.is_complete()
                && state
                    .shards
                    .get(&shard_id)
                    .is_some_and(|s| attempt > s.attempt)
        };
        {
            // Room for the stream: deltas kept for retries go first.
            let service = self.clone();
            let relieved = tokio::task::spawn_blocking(move || service.relieve_storage()).await;
            if let Ok(Err(e)) = relieved {
                tracing::warn!("dropping deltas kept for retries failed: {e}");
            }
        }
        let reopened = if retries_complete_run {
            let (service, run) = (self.clone(), run.clone());
            tokio::task::spawn_blocking(move || service.reopen(&run))
                .await
                .map_err(|e| Error::Unavailable(format!("reopening the run failed: {e}")))??
        } else {
            None
        };
        let started = self
            .start_attempt(run.clone(), shard_id, attempt, session_id)
            .await;
        if let (Err(_), Some(was)) = (&started, reopened) {
            let service = self.clone();
            let _ = tokio::task::spawn_blocking(move || service.undo_reopen(&run, was)).await;
        }
        started
    }

    /// [`CoverageService::begin_shard`] once the run is found (and reopened, for a retry of a
    /// complete one).
    async fn start_attempt(
        &self,
        run: Arc<Run>,
        shard_id: String,
        attempt: u32,
        session_id: Vec<u8>,
    ) -> Result<ShardSession> {
        let limits = self.limits();
        // Bookkeeping first, under the lock; the store and the rebuild after it.
        let (start, replaced, previous, reopened, before) = {
            let mut state = run.state();
            state.check_live(&run.id)?;
            let stale = state.stale;
            let state_complete = state.is_complete();
            if state.is_complete() {
                let finished_again = state
                    .shards
                    .get(&shard_id)
                    .is_some_and(|s| s.attempt == attempt && s.finished_at.is_some());
                // A client that lost the answer to its finish may reconnect to confirm it.
                if !finished_again {
                    return Err(Error::FailedPrecondition(format!(
                        "run `{}` is complete (every expected shard finished); it accepts no \
                         more coverage",
                        run.id
                    )));
                }
            }
            check_expected(&state, &run.id, &shard_id)?;
            let known = state.shards.len();
            if !state.shards.contains_key(&shard_id) && known >= limits.max_shards_per_run {
                return Err(limits.exceeded(
                    format!(
                        "a new shard `{shard_id}` of run `{}`, which has {known}",
                        run.id
                    ),
                    "max-shards-per-run",
                    limits.max_shards_per_run,
                ));
            }
            let shard = state.shards.entry(shard_id.clone()).or_default();
            if attempt < shard.attempt {
                return Err(Error::FailedPrecondition(format!(
                    "attempt {attempt} of shard `{shard_id}` was superseded by attempt {}",
                    shard.attempt
                )));
            }
            let start = attempt > shard.attempt;
            if start && shard.busy.is_some() {
                // A delta of the earlier attempt is being stored; its record must not land
                // after the new attempt's.
                return Err(Error::Aborted(format!(
                    "shard `{shard_id}` is still storing a delta of attempt {}; retry",
                    shard.attempt
                )));
            }
            if !start && *shard.writer != *session_id {
                // Nothing of it acknowledged, or written by a client without sessions (or a
                // release before them), and nobody streams it: this push may take it over.
                // Re-sent deltas are still checked against what was acknowledged.
                let untouched = shard.streams == 0
                    && (shard.writer.is_empty()
                        || (shard.last_seq == 0 && shard.finished_at.is_none()));
                if !untouched {
                    return Err(Error::AlreadyExists(format!(
                        "attempt {attempt} of shard `{shard_id}` {} by another push ({} deltas \
                         acknowledged); two pushes of one attempt would mix or lose coverage: \
                         push with a higher --attempt to replace it",
                        if shard.finished_at.is_some() {
                            "was finished"
                        } else {
                            "is being written"
                        },
                        shard.last_seq
                    )));
                }
                // Stored with its next delta.
                shard.writer = session_id.clone().into();
            }
            // A complete run never needs one here: a new attempt reopened it above, and it is
            // complete now only for a client confirming its finish.
            let replaced = !state_complete
                && (stale || (start && (shard.last_seq > 0 || shard.finished_at.is_some())));
            // The attempt this one replaces, kept (for flaky tests) if it had begun.
            let previous =
                (start && shard.attempt > 0 && (shard.last_seq > 0 || shard.finished_at.is_some()))
                    .then(|| AttemptRecord {
                        shard_id: shard_id.clone(),
                        attempt: shard.attempt,
                        last_seq: shard.last_seq,
                        finished_at_ms: shard.finished_at.map(super::durable::to_ms),
                        telemetry: shard
                            .telemetry
                            .as_ref()
                            .map(super::durable::telemetry_record),
                        lines: Vec::new(),
                    });
            // What the shard was, to go back to if the new attempt cannot be stored.
            let before = start.then(|| shard_record(&shard_id, shard));
            if start {
                shard.attempt = attempt;
                shard.last_seq = 0;
                shard.finished_at = None;
                shard.telemetry = None;
                shard.busy = Some(attempt);
                shard.writer = session_id.into();
                shard.recent.clear();
            }
            shard.streams += 1;
            let record = start.then(|| shard_record(&shard_id, shard));
            if replaced {
                state.stale = true;
            }
            let reopened = if start {
                self.take_reopening(&run, &mut state)
            } else {
                Vec::new()
            };
            (record, replaced, previous, reopened, before)
        };
        // The session exists from here on, so an error below still closes the stream count.
        let mut session = ShardSession {
            run: run.clone(),
            shard_id,
            attempt,
            last_seq: 0,
            finished: false,
        };
        if let Some(record) = start {
            let _busy = Busy {
                run: &run,
                shard_id: &session.shard_id,
                attempt,
            };
            let replaced = match previous {
                Some(mut kept) if kept.last_seq > 0 => {
                    // Its deltas are still in the log until the write below drops them.
                    let (service, run) = (self.clone(), run.clone());
                    let attempt = (kept.shard_id.clone(), kept.attempt, kept.last_seq);
                    let read =
                        tokio::task::spawn_blocking(move || service.shard_lines(&run, &attempt))
                            .await;
                    // The new attempt goes on whatever happens here: the old one's lines only
                    // serve to compare the two.
                    match read {
                        Ok(Ok(lines)) => {
                            kept.lines =
                                codec::encode_shard_lines(lines.iter().map(|(p, l)| (&**p, l)));
                        }
                        Ok(Err(e)) => tracing::warn!(
                            shard = %kept.shard_id,
                            "the replaced attempt's lines do not read ({e}); its results are kept without them"
                        ),
                        Err(e) => tracing::warn!(
                            shard = %kept.shard_id,
                            "reading the replaced attempt's lines failed ({e}); its results are kept without them"
                        ),
                    }
                    Some(kept)
                }
                kept => kept,
            };
            let mut writes = reopened;
            writes.push(Write::StartAttempt {
                run_id: run.id.clone(),
                shard: record,
                replaced,
            });
            if let Err(e) = self.shared.storage.write(writes).await {
                // Nothing of the new attempt is stored: the shard goes back to what it was,
                // so that a retry starts the attempt again (in a cluster, a failed write is
                // not the end of the store).
                if let Some(before) = &before {
                    let mut state = run.state();
                    if let Some(shard) = state.shards.get_mut(&session.shard_id)
                        && shard.attempt == attempt
                        && shard.last_seq == 0
                    {
                        super::shared::take(shard, before);
                    }
                }
                return Err(e.into());
            }
        }
        if replaced {
            let service = self.clone();
            let rebuilt = run.clone();
            tokio::task::spawn_blocking(move || {
                rebuilt.rebuild(&service.shared.interner, &*service.shared.storage)
            })
            .await
            .map_err(|e| Error::Unavailable(format!("rebuilding the aggregate failed: {e}")))??;
            run.state().stale = false;
        }
        {
            let state = run.state();
            if let Some(shard) = state.shards.get(&session.shard_id) {
                session.last_seq = shard.last_seq;
                session.finished = shard.finished_at.is_some() && shard.attempt == attempt;
            }
        }
        run.notify();
        Ok(session)
    }

    /// Applies one delta of the session's attempt, whole or not at all.
    pub async fn apply(&self, session: &ShardSession, delta: Delta) -> Result<Applied> {
        self.apply_with(session, move || Ok(delta)).await
    }

    /// [`CoverageService::apply`] for a delta that `decode` reads, on the blocking thread that
    /// then stores and merges it: one hand-off between threads per delta instead of two.
    pub async fn apply_with(
        &self,
        session: &ShardSession,
        decode: impl FnOnce() -> Result<Delta> + Send + 'static,
    ) -> Result<Applied> {
        let service = self.clone();
        let run = session.run.clone();
        let (shard_id, attempt) = (session.shard_id.clone(), session.attempt);
        let task = tokio::task::spawn_blocking(move || {
            let delta = decode()?;
            // What a re-send of this delta must match (deltas that came as wire bytes).
            let digest = delta.wire.as_deref().map(crc32fast::hash);
            if let Some(duplicate) = service.admit(&run, &shard_id, attempt, &delta, digest)? {
                return Ok(duplicate);
            }
            let _busy = Busy {
                run: &run,
                shard_id: &shard_id,
                attempt,
            };
            service.store_and_merge(&run, &shard_id, attempt, delta, digest)
        });
        match task.await {
            Ok(result) => result,
            // A panic (once the shard was marked busy, its guard released it and marked the
            // aggregate for a rebuild while unwinding), or the runtime shutting down before
            // the task ran.
            Err(e) => Err(Error::Unavailable(format!(
                "applying the delta failed: {e}"
            ))),
        }
    }

    /// Checks a delta against the shard's progress. Returns the answer for a delta applied
    /// before, or `None` with the shard marked busy for the caller (who holds a [`Busy`]).
    fn admit(
        &self,
        run: &Run,
        shard_id: &str,
        attempt: u32,
        delta: &Delta,
        digest: Option<u32>,
    ) -> Result<Option<Applied>> {
        let limits = self.limits();
        if delta.files.len() > limits.max_files_per_delta {
            return Err(limits.exceeded(
                format!(
                    "a delta of {} files (send smaller deltas)",
                    delta.files.len()
                ),
                "max-files-per-delta",
                limits.max_files_per_delta,
            ));
        }
        if delta.seq == 0 {
            return Err(Error::invalid("delta.seq", "sequence numbers start at 1"));
        }
        let mut state = run.state();
        state.check_live(&run.id)?;
        let shard = current_shard(&mut state, shard_id, attempt)?;
        if shard.finished_at.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "shard `{shard_id}` (attempt {attempt}) has finished; start a new attempt to send more"
            )));
        }
        if delta.seq <= shard.last_seq {
            if let Some(digest) = digest
                && let Some(&(_, stored)) = shard.recent.iter().find(|(s, _)| *s == delta.seq)
                && stored != digest
            {
                return Err(Error::AlreadyExists(format!(
                    "delta {seq} of attempt {attempt} of shard `{shard_id}` differs from the \
                     delta {seq} already acknowledged (CRC-32 {digest:08x}, acknowledged \
                     {stored:08x}): another push is writing this attempt; nothing of this delta \
                     was applied; push with a higher --attempt to replace the attempt",
                    seq = delta.seq
                )));
            }
            return Ok(Some(Applied {
                seq: delta.seq,
                duplicate: true,
                unknown_paths: Vec::new(),
            }));
        }
        if delta.seq != shard.last_seq + 1 {
            return Err(Error::invalid(
                "delta.seq",
                format!(
                    "expected sequence number {}, got {} (deltas must be consecutive)",
                    shard.last_seq + 1,
                    delta.seq
                ),
            ));
        }
        mark_busy(&mut state, shard_id, attempt)?;
        Ok(None)
    }

    /// Refused if `files` would take the run beyond its lines, the branch arms of a line, or
    /// the memory of one run or of all: checked before anything of the delta is stored. The
    /// memory is estimated from counts (see [`crate::aggregate::estimated_bytes`]), the
    /// delta's as if all it holds were new; the lines are counted exactly near their limit.
    /// Returns the delta's memory estimate, for [`CoverageService::take_memory`] once every
    /// other check has passed.
    fn check_growth(&self, run: &Run, aggregate: &Aggregate, files: &FileBatch) -> Result<usize> {
        let limits = self.limits();
        let (n_files, lines, arms, functions) = files.counts();
        let held = aggregate.totals().lines;
        if held + lines > limits.max_lines_per_run {
            let new = aggregate.count_new_lines(files);
            if new > 0 && held + new > limits.max_lines_per_run {
                return Err(limits.exceeded(
                    format!("run `{}` would hold {} lines", run.id, held + new),
                    "max-lines-per-run",
                    limits.max_lines_per_run,
                ));
            }
        }
        // A line with that many arms needs a file with as many.
        for part in files.files() {
            if part.arm_count() > limits.max_branches_per_line {
                let most = part.most_arms_on_a_line();
                if most > limits.max_branches_per_line {
                    return Err(limits.exceeded(
                        format!(
                            "file `{}` of the delta gives one line {most} branch arms",
                            part.path()
                        ),
                        "max-branches-per-line",
                        limits.max_branches_per_line,
                    ));
                }
            }
        }
        let adding = crate::aggregate::estimated_bytes(n_files, lines, arms, functions);
        let run_bytes = aggregate.estimated_bytes().saturating_add(adding);
        if run_bytes > limits.max_run_memory_bytes {
            return Err(limits.exceeded(
                format!(
                    "run `{}` would hold about {} MiB of coverage in memory",
                    run.id,
                    run_bytes >> 20
                ),
                "max-run-memory",
                limits.max_run_memory_bytes,
            ));
        }
        Ok(adding)
    }

    /// Blocking part of `apply`: store, then merge into the aggregate, under the shared gate
    /// (so a rebuild or snapshot sees the delta in both places or in neither).
    fn store_and_merge(
        &self,
        run: &Run,
        shard_id: &str,
        attempt: u32,
        delta: Delta,
        digest: Option<u32>,
    ) -> Result<Applied> {
        let limits = self.limits();
        let known = run.state().known_files.clone();
        // Paths a tool wrote elsewhere are put back among the repository's files before the
        // delta is stored, so that a replay reads them resolved.
        let (delta, unknown_paths) = match &known {
            Some(known) => resolve_paths(delta, known),
            None => (delta, Vec::new()),
        };
        let _gate = run.gate_shared();
        // Taken under the gate: a rebuild replaces the aggregate under it exclusively.
        let aggregate = run.live()?;
        // Concurrent deltas may each pass this check and overshoot by at most one delta's
        // files; the limit guards memory, not an exact count. Far from the limit, the paths
        // need no lookup.
        let near_limit = aggregate.len() + delta.files.len() > limits.max_files_per_run;
        let new_files = if near_limit {
            aggregate.count_new(delta.files.paths())
        } else {
            0
        };
        if new_files > 0 && aggregate.len() + new_files > limits.max_files_per_run {
            return Err(limits.exceeded(
                format!(
                    "run `{}` would hold {} files",
                    run.id,
                    aggregate.len() + new_files
                ),
                "max-files-per-run",
                limits.max_files_per_run,
            ));
        }
        // Tests likewise, for a delta that names any.
        if delta.files.has_tests() {
            let names = delta.files.test_names();
            let held = aggregate.test_count();
            if held + names.len() > limits.max_tests_per_run {
                let new = aggregate.count_new_tests(names.iter().copied());
                if new > 0 && held + new > limits.max_tests_per_run {
                    return Err(limits.exceeded(
                        format!("run `{}` would name {} tests", run.id, held + new),
                        "max-tests-per-run",
                        limits.max_tests_per_run,
                    ));
                }
            }
        }
        let adding = self.check_growth(run, &aggregate, &delta.files)?;
        let body = match &delta.wire {
            Some(wire) => codec::wire_record(wire),
            None => {
                let files = delta.files.to_files();
                vec![codec::encode_files(files.iter().map(|(p, f)| (p.as_str(), f))).into()]
            }
        };
        let size: u64 = body.iter().map(|b| b.len() as u64).sum();
        let shard = {
            let state = run.state();
            // Concurrent deltas of other shards may each pass and overshoot by a delta.
            let stored: u64 = state.shards.values().map(|s| s.stored_bytes).sum();
            if stored + size > limits.max_run_bytes {
                return Err(limits.exceeded(
                    format!(
                        "run `{}` would have taken {} bytes of deltas",
                        run.id,
                        stored + size
                    ),
                    "max-run-bytes",
                    limits.max_run_bytes,
                ));
            }
            let s = state
                .shards
                .get(shard_id)
                .ok_or_else(|| vanished(shard_id))?;
            let mut record = ShardRecordAt::new(shard_id, s, delta.seq);
            record.0.stored_bytes = s.stored_bytes + size;
            record
        };
        self.take_memory(adding)?;
        let stored = self.shared.storage.write_blocking(vec![Write::AppendDelta {
            run_id: run.id.clone(),
            shard: shard.0,
            body,
        }]);
        if let Err(e) = stored {
            self.release_memory(adding);
            return Err(e.into());
        }
        let interner = &self.shared.interner;
        let files = delta.files;
        aggregate.merge_batch(interner, &files);
        files.recycle();
        let mut state = run.state();
        let shard = state
            .shards
            .get_mut(shard_id)
            .ok_or_else(|| vanished(shard_id))?;
        // The busy mark kept other attempts from starting, so the attempt is still current.
        debug_assert_eq!(shard.attempt, attempt);
        shard.last_seq = delta.seq;
        shard.stored_bytes += size;
        match digest {
            Some(d) => {
                if shard.recent.len() == RECENT_DIGESTS {
                    shard.recent.pop_front();
                }
                shard.recent.push_back((delta.seq, d));
            }
            // A delta of the library API: no bytes to compare re-sends with.
            None => shard.recent.clear(),
        }
        drop(state);
        run.notify();
        Ok(Applied {
            seq: delta.seq,
            duplicate: false,
            unknown_paths,
        })
    }

    /// Ends the session's attempt. `final_seq` must equal the last acknowledged sequence.
    pub async fn finish(
        &self,
        session: &ShardSession,
        final_seq: u64,
        telemetry: Option<TestTelemetry>,
    ) -> Result<RunStatus> {
        let run = &session.run;
        let (record, _busy) = {
            let mut state = run.state();
            // A run deleted or expired while the shard streamed: the finish would be dropped
            // with it, so it is not answered as if it were stored.
            state.check_live(&run.id)?;
            let shard = shard_of(&mut state, session)?;
            if shard.last_seq != final_seq {
                return Err(Error::FailedPrecondition(format!(
                    "finish says the last delta of shard `{}` is {final_seq}, but {} were \
                     acknowledged; send the missing deltas first",
                    session.shard_id, shard.last_seq
                )));
            }
            if shard.finished_at.is_some() {
                drop(state);
                return Ok(run.status());
            }
            let mut finished = Shard {
                finished_at: Some(SystemTime::now()),
                telemetry: telemetry.clone(),
                ..Shard::default()
            };
            finished.expected = shard.expected;
            finished.attempt = shard.attempt;
            finished.last_seq = shard.last_seq;
            finished.writer = shard.writer.clone();
            finished.stored_bytes = shard.stored_bytes;
            let record = shard_record(&session.shard_id, &finished);
            mark_busy(&mut state, &session.shard_id, session.attempt)?;
            let busy = Busy {
                run,
                shard_id: &session.shard_id,
                attempt: session.attempt,
            };
            (record, busy)
        };
        self.shared
            .storage
            .write(vec![Write::PutShard {
                run_id: run.id.clone(),
                shard: record.clone(),
            }])
            .await?;
        let completed = {
            let mut state = run.state();
            state.check_live(&run.id)?;
            let shard = shard_of(&mut state, session)?;
            shard.finished_at = record.finished_at_ms.map(super::durable::from_ms);
            shard.telemetry = telemetry;
            let was = state.is_complete();
            state.update_completion();
            !was && state.is_complete()
        };
        run.notify();
        if completed {
            // Compaction is an optimisation (recovery redoes it), so the finish does not
            // wait for it, and it waits a moment itself: right now the CI step waiting for
            // the merged result needs the CPU for its export (at 35,000 files the two
            // together took twice as long as the export alone). While it waits it holds no
            // handle to the service, so a shutdown meanwhile is not delayed.
            let service = Arc::downgrade(&self.shared);
            let run = Arc::downgrade(run);
            tokio::spawn(async move {
                tokio::time::sleep(COMPACTION_DELAY).await;
                let (Some(shared), Some(run)) = (service.upgrade(), run.upgrade()) else {
                    return;
                };
                let service = CoverageService { shared };
                let _ = tokio::task::spawn_blocking(move || {
                    if let Err(e) = service.compact(&run) {
                        tracing::warn!(run = %run.id, "compacting the complete run failed: {e}");
                    }
                    // The run now keeps its deltas for retries: room for them, or not.
                    if let Err(e) = service.relieve_storage() {
                        tracing::warn!("dropping deltas kept for retries failed: {e}");
                    }
                })
                .await;
            });
        }
        Ok(run.status())
    }
}

/// The delta with its paths resolved among the repository's files ([`RepoFiles::resolve`]), and
/// the paths that stayed outside them (at most [`MAX_UNKNOWN_REPORTED`]; an ambiguous one names
/// its candidates). A path whose file the delta already names, or that another of its paths
/// resolved to, stays as it was: two records of one delta must not become one file. A delta
/// with a resolved path is re-encoded: its wire bytes name the paths as the tool wrote them.
fn resolve_paths(delta: Delta, known: &RepoFiles) -> (Delta, Vec<String>) {
    if delta.files.paths().all(|p| known.contains(p)) {
        return (delta, Vec::new());
    }
    let mut unknown = Vec::new();
    let mut report = |what: String| {
        if unknown.len() < MAX_UNKNOWN_REPORTED {
            unknown.push(what);
        }
    };
    let mut taken: std::collections::HashSet<String> = delta
        .files
        .paths()
        .filter(|p| known.contains(p))
        .map(str::to_owned)
        .collect();
    let renames: Vec<Option<String>> = delta
        .files
        .paths()
        .map(|path| match known.resolve(path) {
            Resolution::Known => None,
            Resolution::Resolved(to) if taken.insert(to.clone()) => Some(to),
            Resolution::Resolved(to) => {
                report(format!("{path} (its file {to} is already in this delta)"));
                None
            }
            Resolution::Ambiguous(candidates) => {
                report(format!("{path} (matches {})", candidates.join(", ")));
                None
            }
            Resolution::Unknown => {
                report(path.to_owned());
                None
            }
        })
        .collect();
    if renames.iter().all(Option::is_none) {
        return (delta, unknown);
    }
    let mut files = delta.files.to_files();
    for ((path, _), to) in files.iter_mut().zip(renames) {
        if let Some(to) = to {
            *path = to;
        }
    }
    let delta = Delta {
        seq: delta.seq,
        files: FileBatch::of_files(&files),
        wire: None,
    };
    (delta, unknown)
}

/// A shard's stored record as it will be once the delta `seq` is stored.
struct ShardRecordAt(crate::persist::ShardRecord);

impl ShardRecordAt {
    fn new(id: &str, s: &Shard, seq: u64) -> ShardRecordAt {
        let mut record = shard_record(id, s);
        record.last_seq = seq;
        ShardRecordAt(record)
    }
}

fn vanished(shard_id: &str) -> Error {
    Error::FailedPrecondition(format!("shard `{shard_id}` vanished"))
}

fn shard_of<'a>(state: &'a mut RunState, session: &ShardSession) -> Result<&'a mut Shard> {
    current_shard(state, &session.shard_id, session.attempt)
}

/// The shard, if `attempt` is still its current attempt.
fn current_shard<'a>(
    state: &'a mut RunState,
    shard_id: &str,
    attempt: u32,
) -> Result<&'a mut Shard> {
    let shard = state
        .shards
        .get_mut(shard_id)
        .ok_or_else(|| vanished(shard_id))?;
    if shard.attempt != attempt {
        return Err(Error::FailedPrecondition(format!(
            "attempt {attempt} of shard `{shard_id}` was superseded by attempt {}",
            shard.attempt
        )));
    }
    Ok(shard)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FileBuilder;

    fn delta(paths: &[&str]) -> Delta {
        let files: Vec<(String, crate::model::FileCoverage)> = paths
            .iter()
            .map(|p| {
                let mut b = FileBuilder::new();
                b.line(1, 1);
                (p.to_string(), b.build())
            })
            .collect();
        Delta {
            seq: 1,
            files: FileBatch::of_files(&files),
            wire: Some(bytes::Bytes::from_static(b"as sent")),
        }
    }

    #[test]
    fn two_paths_of_a_delta_never_become_one_file() {
        let repo = RepoFiles::new(["toolz/x.py", "toolz/y.py"].map(String::from));
        // All known: the delta goes as it came, wire bytes and all.
        let (same, unknown) = resolve_paths(delta(&["toolz/x.py"]), &repo);
        assert!(same.wire.is_some() && unknown.is_empty());
        let (resolved, unknown) = resolve_paths(
            delta(&[
                "toolz/x.py",
                "/ci/toolz/x.py",
                "/ci/toolz/y.py",
                "/other/toolz/y.py",
                "/ci/z.py",
            ]),
            &repo,
        );
        let paths: Vec<&str> = resolved.files.paths().collect();
        assert_eq!(
            paths,
            [
                "toolz/x.py",
                "/ci/toolz/x.py",
                "toolz/y.py",
                "/other/toolz/y.py",
                "/ci/z.py"
            ]
        );
        assert!(
            resolved.wire.is_none(),
            "re-encoded with the resolved paths"
        );
        assert_eq!(
            unknown,
            [
                "/ci/toolz/x.py (its file toolz/x.py is already in this delta)",
                "/other/toolz/y.py (its file toolz/y.py is already in this delta)",
                "/ci/z.py"
            ]
        );
    }
}
