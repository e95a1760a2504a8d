//! A complete run reopened by a retried shard.
//!
//! CI systems re-run a failed job after the whole pipeline ended, under the same run id and
//! a higher attempt (GitHub's "re-run failed jobs", GitLab's retry). By then the run is
//! complete and compacted. For [`Limits::reopen_window`] after it completed, the run keeps its
//! deltas in storage, so such a retry can replace the failed attempt exactly: the run leaves
//! "complete", its coverage is rebuilt from the current attempts' deltas, and it completes
//! again when the retry finishes. The replaced attempt's results stay with the run, so a test
//! that failed there and passed in the retry is flaky. Past the window the deltas are dropped
//! and a retry is refused, as it always was with `--reopen-window 0`. Nor may kept deltas
//! crowd out new coverage: past half of `--max-db-bytes`, the runs complete the longest give
//! theirs up first (checked when a shard's stream starts and after each compaction, so that
//! ingest keeps at least the other half).
//!
//! [`Limits::reopen_window`]: super::Limits::reopen_window

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use crate::persist::{StoreError, Write};

use super::durable::run_record;
use super::run::{Run, RunState};
use super::{CoverageService, Error, Result};

/// How a reopened run was before, to put it back if its retry does not start.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reopened {
    completed_at: SystemTime,
    compacted: bool,
    deltas_kept: bool,
}

impl CoverageService {
    /// Why a retry may not reopen `run`, which is complete; `None` if it may.
    fn reopen_refusal(&self, run: &Run, state: &RunState, now: SystemTime) -> Option<String> {
        let refused = format!(
            "run `{}` is complete (every expected shard finished); it accepts no more coverage",
            run.id
        );
        let Some(window) = self.shared.limits.reopen_window else {
            return Some(format!(
                "{refused} (the daemon runs with --reopen-window 0)"
            ));
        };
        let completed = state.completed_at?;
        if now.duration_since(completed).is_ok_and(|age| age >= window) {
            return Some(format!(
                "{refused}: it completed {} ago, and a retry reopens a run only within \
                 --reopen-window {}; push the retry as a run of its own",
                humantime::format_duration(round_to_seconds(
                    now.duration_since(completed).unwrap_or_default()
                )),
                humantime::format_duration(window)
            ));
        }
        if run.compacted.load(Ordering::Acquire) && !run.deltas_kept.load(Ordering::Acquire) {
            return Some(format!(
                "{refused}: its deltas are no longer kept (dropped when its reopen window \
                 closed, or when it was stored under --reopen-window 0 or by an earlier \
                 release of covd), so a retry cannot replace its attempt"
            ));
        }
        None
    }

    /// Reopens the complete `run` for a retry of one of its shards: its coverage comes back
    /// into memory, and it is neither compacted nor complete any more. The retry's start then
    /// replaces its attempt and tells the store ([`Write::Reopen`]). Nothing changes if another
    /// retry reopened it first. Returns what [`CoverageService::undo_reopen`] needs if this
    /// call reopened it. Blocking.
    pub(super) fn reopen(&self, run: &Arc<Run>) -> Result<Option<Reopened>> {
        // Not while a compaction stores the run, or the sweep drops its deltas.
        let _compacting = run.compacting.lock().unwrap_or_else(|e| e.into_inner());
        let completed_at = {
            let state = run.state();
            state.check_live(&run.id)?;
            let Some(completed_at) = state.completed_at else {
                return Ok(None);
            };
            if let Some(why) = self.reopen_refusal(run, &state, SystemTime::now()) {
                return Err(Error::FailedPrecondition(why));
            }
            completed_at
        };
        // Not compacted first: the cache then never lets it leave memory again, and a reader
        // never reads it back from merged files the retry's start drops.
        let compacted = run.compacted.swap(false, Ordering::AcqRel);
        self.shared.cache.forget(&run.id);
        // Readers see the coverage they saw until the retry's start rebuilds it.
        if let Err(e) = run.load(&self.shared.interner, &*self.shared.storage) {
            run.compacted.store(compacted, Ordering::Release);
            return Err(e.into());
        }
        let deltas_kept = run.deltas_kept.swap(false, Ordering::AcqRel);
        {
            let mut state = run.state();
            state.completed_at = None;
            state.reopening = true;
        }
        run.notify();
        tracing::info!(run = %run.id, "a retried shard reopens the complete run");
        Ok(Some(Reopened {
            completed_at,
            compacted,
            deltas_kept,
        }))
    }

    /// Puts back a run whose retry reopened it but failed to start before the store heard of
    /// it: complete again, as it was. Blocking.
    pub(super) fn undo_reopen(&self, run: &Arc<Run>, was: Reopened) {
        {
            let _compacting = run.compacting.lock().unwrap_or_else(|e| e.into_inner());
            let mut state = run.state();
            // Only while nothing of the retry happened: the store not told, every shard done.
            if !state.reopening || !state.missing().is_empty() {
                return;
            }
            state.reopening = false;
            state.completed_at = Some(was.completed_at);
            drop(state);
            run.deltas_kept.store(was.deltas_kept, Ordering::Release);
            run.compacted.store(was.compacted, Ordering::Release);
            if was.compacted
                && let Some(aggregate) = run.aggregate()
            {
                self.shared.cache.admit(run, aggregate.heap_bytes());
            }
        }
        run.notify();
        if !was.compacted {
            // Its compaction may have come and gone while it was open.
            if let Err(e) = self.compact(run) {
                tracing::warn!(run = %run.id, "compacting the complete run failed: {e}");
            }
        }
    }

    /// The writes that tell the store a run was reopened, if it was and the store does not
    /// know yet: its record, no longer complete, and its merged files dropped. Taken by the
    /// start of the retry's attempt, which commits them with it.
    pub(super) fn take_reopening(&self, run: &Run, state: &mut RunState) -> Vec<Write> {
        if !std::mem::take(&mut state.reopening) {
            return Vec::new();
        }
        vec![
            Write::UpdateRun(run_record(run, state)),
            Write::Reopen {
                run_id: run.id.clone(),
            },
        ]
    }

    /// Drops the deltas that compacted runs kept for retries once their reopen window has
    /// passed (all of them when the daemon has none), and more if the store is short of room
    /// ([`CoverageService::relieve_storage`]). Returns how many runs dropped theirs.
    pub async fn close_reopen_windows(&self, now: SystemTime) -> std::result::Result<usize, Error> {
        let service = self.clone();
        tokio::task::spawn_blocking(move || -> std::result::Result<usize, Error> {
            let mut closed = 0;
            for run in service.kept_deltas() {
                closed += usize::from(service.drop_kept_deltas(&run, Some(now))?);
            }
            Ok(closed + service.relieve_storage()?)
        })
        .await
        .map_err(|e| Error::Unavailable(format!("dropping kept deltas failed: {e}")))?
    }

    /// While the store holds more than half of `--max-db-bytes`, drops the deltas
    /// complete runs keep for retries, the run complete the longest first. Returns how many
    /// runs dropped theirs. Blocking.
    pub(super) fn relieve_storage(&self) -> std::result::Result<usize, StoreError> {
        let mut relieved = 0;
        let kept = self.kept_deltas();
        if kept.is_empty() {
            return Ok(0);
        }
        for run in kept {
            let Some((used, cap)) = self.shared.storage.usage()? else {
                break;
            };
            if used.saturating_mul(2) <= cap {
                break;
            }
            if self.drop_kept_deltas(&run, None)? {
                tracing::info!(
                    run = %run.id,
                    "the store holds {used} of --max-db-bytes {cap}: the run's deltas kept for \
                     retries are dropped early"
                );
                relieved += 1;
            }
        }
        Ok(relieved)
    }

    /// The runs that keep deltas for retries, complete the longest first.
    fn kept_deltas(&self) -> Vec<Arc<Run>> {
        let mut kept: Vec<(Option<SystemTime>, Arc<Run>)> = self
            .shared
            .runs
            .iter()
            .filter(|r| r.deltas_kept.load(Ordering::Acquire))
            .map(|r| (r.state().completed_at, r.value().clone()))
            .collect();
        kept.sort_by_key(|(completed, _)| *completed);
        kept.into_iter().map(|(_, run)| run).collect()
    }

    fn window_closed(&self, run: &Run, now: SystemTime) -> bool {
        let state = run.state();
        let Some(completed) = state.completed_at else {
            return false;
        };
        self.shared
            .limits
            .reopen_window
            .is_none_or(|window| now.duration_since(completed).is_ok_and(|age| age >= window))
    }

    /// Drops the deltas `run` kept: once its window has closed at `now`, or at once without
    /// a time. Blocking.
    fn drop_kept_deltas(
        &self,
        run: &Run,
        now: Option<SystemTime>,
    ) -> std::result::Result<bool, StoreError> {
        let _compacting = run.compacting.lock().unwrap_or_else(|e| e.into_inner());
        if !run.deltas_kept.load(Ordering::Acquire)
            || !run.compacted.load(Ordering::Acquire)
            || now.is_some_and(|now| !self.window_closed(run, now))
        {
            return Ok(false);
        }
        run.deltas_kept.store(false, Ordering::Release);
        let record = run_record(run, &run.state());
        let written = self.shared.storage.write_blocking(vec![
            Write::UpdateRun(record),
            Write::DropDeltas {
                run_id: run.id.clone(),
            },
        ]);
        if written.is_err() {
            run.deltas_kept.store(true, Ordering::Release);
        }
        written.map(|()| true)
    }
}

fn round_to_seconds(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_secs(d.as_secs())
}
