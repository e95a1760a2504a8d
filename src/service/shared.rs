//! Runs held by several daemons over one shared store (cluster mode). What a daemon holds of a
//! run is then a cache of the store: it is brought up to date before the daemon answers for
//! the run, and when the store says another daemon changed it. Merges are unions and sums of
//! deltas each counted once, so catching up merges just the deltas this daemon lacks, in any
//! order; only a replaced attempt whose deltas this daemon had merged needs a rebuild.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::durable::{from_ms, telemetry_from_record, totals_of};
use super::run::{Run, Shard};
use super::{CoverageService, Error, Result};
use crate::persist::{LoadedRun, ShardRecord};

impl CoverageService {
    /// Brings what this daemon holds of `run_id` up to date with a shared store: a run
    /// another daemon made is taken in, one it deleted is let go, and one both hold takes the
    /// deltas and progress it lacks. Nothing for a store of its own. Blocking (on a
    /// multi-threaded runtime's thread, it steps aside for the wait).
    pub(super) fn refresh(&self, run_id: &str) -> Result<()> {
        if !self.shared.storage.is_shared() {
            return Ok(());
        }
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.refresh_now(run_id))
            }
            _ => self.refresh_now(run_id),
        }
    }

    /// [`CoverageService::refresh`] from async code, on a blocking thread.
    pub(super) async fn refreshed(&self, run_id: &str) -> Result<()> {
        if !self.shared.storage.is_shared() {
            return Ok(());
        }
        let (service, id) = (self.clone(), run_id.to_owned());
        tokio::task::spawn_blocking(move || service.refresh_now(&id))
            .await
            .map_err(|e| {
                Error::Unavailable(format!("reading the run from the cluster failed: {e}"))
            })?
    }

    fn refresh_now(&self, run_id: &str) -> Result<()> {
        let store = &*self.shared.storage;
        let held = self.shared.runs.get(run_id).map(|r| r.value().clone());
        // Read before the store: a run whose record this daemon is storing right now is not
        // in what the store answers, and is not gone.
        let was_stored = held
            .as_ref()
            .is_some_and(|r| r.stored.load(Ordering::Acquire));
        match (held, store.load_run(run_id)?) {
            (None, None) => {}
            (Some(_), None) => {
                // Deleted by another daemon.
                if was_stored {
                    self.let_go(run_id);
                }
            }
            (None, Some(loaded)) => {
                let run = self.restore(loaded)?;
                self.shared.runs.entry(run_id.to_owned()).or_insert(run);
            }
            (Some(run), Some(loaded)) => self.catch_up(&run, loaded)?,
        }
        Ok(())
    }

    /// Forgets a run another daemon deleted.
    fn let_go(&self, run_id: &str) {
        if let Some((_, run)) = self.shared.runs.remove(run_id) {
            run.state().deleted = true;
            run.notify();
        }
        self.shared.cache.forget(run_id);
        self.shared.interner.prune();
    }

    /// Takes in what the store holds of `run` beyond what this daemon has: each shard's later
    /// deltas, later attempts, finishes, and the run's declared shards and files.
    fn catch_up(&self, run: &Arc<Run>, loaded: LoadedRun) -> Result<()> {
        let _one = run.syncing.lock().unwrap_or_else(|e| e.into_inner());
        let store = &*self.shared.storage;
        let interner = &self.shared.interner;
        if loaded.compacted != run.compacted.load(Ordering::Acquire) {
            // Serialized with this daemon's own compaction and reopening of the run.
            let _compacting = run.compacting.lock().unwrap_or_else(|e| e.into_inner());
            if loaded.compacted && !run.compacted.load(Ordering::Acquire) {
                return self.take_compacted(run, loaded);
            }
        }
        // Reopened elsewhere (a retried shard): its coverage is its deltas' again.
        let reopened = !loaded.compacted && run.compacted.swap(false, Ordering::AcqRel);
        // Shards whose later deltas are merged here: (shard, attempt, merged, last), and the
        // records they take once merged. They are marked busy meanwhile, so that no stream
        // of this daemon writes them.
        let mut behind = Vec::new();
        let mut records = Vec::new();
        let mut rebuild;
        let mut changed = false;
        {
            let mut state = run.state();
            if state.deleted {
                return Ok(());
            }
            rebuild = state.stale || reopened;
            if state.params.expected_shards.is_empty() && !loaded.run.expected_shards.is_empty() {
                for id in &loaded.run.expected_shards {
                    state.shards.entry(id.clone()).or_default().expected = true;
                }
                state.params.expected_shards = loaded.run.expected_shards.clone();
                changed = true;
            }
            if state.known_files.is_none()
                && let Some(files) = loaded.files
            {
                state.known_files = Some(Arc::new(crate::model::path::RepoFiles::new(files)));
            }
            for record in loaded.shards {
                let shard = state.shards.entry(record.shard_id.clone()).or_default();
                // A shard this daemon is writing right now is its own to record.
                if shard.busy.is_some() || record.attempt < shard.attempt {
                    continue;
                }
                if record.attempt > shard.attempt {
                    // Replaced elsewhere: what this daemon merged of the earlier attempt goes.
                    rebuild |= shard.last_seq > 0;
                    let last = record.last_seq;
                    take(shard, &record);
                    if !rebuild && last > 0 {
                        shard.last_seq = 0;
                        shard.busy = Some(record.attempt);
                        behind.push((record.shard_id.clone(), record.attempt, 0, last));
                        records.push(record);
                    }
                    changed = true;
                } else if record.last_seq > shard.last_seq {
                    shard.busy = Some(record.attempt);
                    behind.push((
                        record.shard_id.clone(),
                        record.attempt,
                        shard.last_seq,
                        record.last_seq,
                    ));
                    records.push(record);
                } else if record.last_seq == shard.last_seq
                    && record.finished_at_ms.is_some()
                    && shard.finished_at.is_none()
                {
                    // Finished elsewhere (a record read before this daemon's own finish
                    // never takes it back).
                    take(shard, &record);
                    changed = true;
                }
            }
        }
        let released = Release {
            run,
            shards: behind.iter().map(|b| (b.0.clone(), b.1)).collect(),
        };
        if rebuild {
            // Every shard at what the store holds, then the aggregate from their deltas; stale
            // until that is done, so that a rebuild that fails is done again.
            {
                let mut state = run.state();
                for record in &records {
                    if let Some(shard) = state.shards.get_mut(&record.shard_id) {
                        take(shard, record);
                    }
                }
                state.stale = true;
            }
            drop(released);
            run.rebuild(interner, store)?;
            run.state().stale = false;
        } else if !behind.is_empty() {
            // A complete run left in storage changes no more: nothing to merge into.
            // The gate first: a rebuild replaces the aggregate under it.
            let _gate = run.gate_shared();
            if let Some(aggregate) = run.aggregate() {
                let merged = store.for_each_delta_after(&run.id, &behind, &mut |_, files| {
                    aggregate.merge_batch(interner, &files);
                });
                if let Err(e) = merged {
                    // Some of them may be merged: the next look rebuilds.
                    run.state().stale = true;
                    return Err(e.into());
                }
            }
            let mut state = run.state();
            for record in &records {
                if let Some(shard) = state.shards.get_mut(&record.shard_id) {
                    take(shard, record);
                }
            }
            drop(state);
            drop(released);
        }
        {
            let mut state = run.state();
            let was = state.is_complete();
            if let Some(ms) = loaded.run.completed_at_ms
                && state.is_complete()
                && state.completed_at.is_none()
            {
                state.completed_at = Some(from_ms(ms));
            }
            state.update_completion();
            changed |= was != state.is_complete();
        }
        run.deltas_kept
            .store(loaded.run.deltas_kept, Ordering::Release);
        if changed || rebuild || !behind.is_empty() {
            run.notify();
        }
        Ok(())
    }

    /// Takes in a run another daemon completed and compacted: its shards as stored, and its
    /// coverage left in storage (its merged files), whatever this daemon had merged of it.
    fn take_compacted(&self, run: &Arc<Run>, loaded: LoadedRun) -> Result<()> {
        {
            let mut state = run.state();
            for record in &loaded.shards {
                let shard = state.shards.entry(record.shard_id.clone()).or_default();
                take(shard, record);
            }
            if let Some(ms) = loaded.run.completed_at_ms {
                state.completed_at = Some(from_ms(ms));
            }
            state.update_completion();
            state.stale = false;
        }
        {
            let _gate = run.gate_exclusive();
            match &loaded.summary {
                Some(summary) => run.set_stored(totals_of(summary)),
                None => run.set_stored(crate::model::Totals::default()),
            }
        }
        if loaded.summary.is_none() {
            // No summary to take the totals from: read it.
            let (aggregate, _) = run.load(&self.shared.interner, &*self.shared.storage)?;
            self.shared.cache.admit(run, aggregate.heap_bytes());
        }
        run.deltas_kept
            .store(loaded.run.deltas_kept, Ordering::Release);
        run.notify();
        Ok(())
    }

    /// Follows what other daemons change in a shared store, for as long as the service lives.
    /// A run this daemon does not hold is taken in (so that its lists show it); one it holds
    /// is brought up to date only while someone here waits on it (a watch, an export waiting
    /// for it), since every call about a run brings it up to date first anyway: a daemon that
    /// nobody asks about a run does not merge its deltas. After the store's connection was
    /// lost, every run held and waited on. Needs a runtime.
    pub(super) fn follow_changes(&self) {
        let Some(mut changes) = self.shared.storage.take_changes() else {
            return;
        };
        let service = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            while let Some(first) = changes.recv().await {
                let mut heard = vec![first];
                while let Ok(more) = changes.try_recv() {
                    heard.push(more);
                }
                let Some(shared) = service.upgrade() else {
                    return;
                };
                let service = CoverageService { shared };
                let runs: BTreeSet<String> = if heard.iter().any(Option::is_none) {
                    service
                        .shared
                        .runs
                        .iter()
                        .map(|r| r.key().clone())
                        .collect()
                } else {
                    heard.into_iter().flatten().collect()
                };
                let _ = tokio::task::spawn_blocking(move || {
                    for id in runs {
                        let held = service.shared.runs.get(&id).map(|r| r.value().clone());
                        if held.is_some_and(|run| !run.watched()) {
                            continue;
                        }
                        if let Err(e) = service.refresh_now(&id) {
                            tracing::warn!(run = %id, "catching up with another node failed: {e}");
                        }
                    }
                })
                .await;
            }
        });
    }
}

/// Takes a shard's progress from its stored record (what another daemon stored, or what it
/// was before a start that could not be stored).
pub(super) fn take(shard: &mut Shard, r: &ShardRecord) {
    shard.attempt = r.attempt;
    shard.last_seq = r.last_seq;
    shard.finished_at = r.finished_at_ms.map(from_ms);
    shard.writer = r.writer_session.clone().into_boxed_slice();
    shard.telemetry = r.telemetry.clone().map(telemetry_from_record);
    shard.stored_bytes = r.stored_bytes;
    shard.recent.clear();
}

/// Releases the shards a catch-up marked busy, however it ends.
struct Release<'a> {
    run: &'a Run,
    shards: Vec<(String, u32)>,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        let mut state = self.run.state();
        // Unwinding from a panic in a merge: the aggregate may hold part of it.
        if std::thread::panicking() {
            state.stale = true;
        }
        for (id, attempt) in &self.shards {
            if let Some(s) = state.shards.get_mut(id)
                && s.busy == Some(*attempt)
            {
                s.busy = None;
            }
        }
    }
}
