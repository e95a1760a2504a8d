//! One run: its shards' progress, its aggregate, and the locking that keeps them consistent.
//!
//! Locks, always taken in this order and never across an `.await`:
//! 1. `gate` (std `RwLock`): appliers hold it shared while they merge a delta and record it;
//!    a rebuild or a consistent snapshot holds it exclusively. So a reader that holds it
//!    exclusively sees every delta whole or not at all.
//! 2. `state` (std `Mutex`): shard bookkeeping, held for microseconds, never while merging.
//! 3. the aggregate's own per-file locks (dashmap), taken inside `Aggregate` calls only.
//!
//! A complete run whose merged files are stored may leave memory (see `cache`): its aggregate
//! is then dropped, and read back from storage when a reader needs it. Readers hold an
//! `Arc<Aggregate>`, so a run leaving memory never takes data from under one.
//!
//! std locks rather than tokio's: they are held briefly, from blocking threads or without
//! awaiting, and std's are cheaper.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::SystemTime;

use tokio::sync::watch;

use crate::aggregate::{Aggregate, PathInterner};
use crate::model::Totals;
use crate::model::path::RepoFiles;
use crate::persist::{Storage, StoreError};

use super::{Error, Result, RunParams, RunStatus, ShardState, ShardStatus, TestTelemetry};

#[derive(Debug, Default)]
pub(super) struct Shard {
    pub(super) expected: bool,
    /// 0 until a stream starts the first attempt.
    pub(super) attempt: u32,
    pub(super) last_seq: u64,
    pub(super) finished_at: Option<SystemTime>,
    /// Open streams for this shard.
    pub(super) streams: u32,
    /// The attempt whose delta or finish is being stored and merged right now, if any. One at
    /// a time per shard keeps sequence numbers meaningful when a stale stream and its
    /// replacement overlap, and keeps the shard's stored record from being overwritten by a
    /// superseded attempt.
    pub(super) busy: Option<u32>,
    /// The push that writes the current attempt (its session id); empty for clients without
    /// sessions. Another push's stream for the attempt is refused.
    pub(super) writer: Box<[u8]>,
    /// (sequence, CRC-32 of the delta's bytes) of the last deltas acknowledged, newest last: a
    /// re-sent delta whose bytes differ from what was acknowledged under its number was not
    /// sent by the same push, and is refused rather than answered "duplicate".
    pub(super) recent: VecDeque<(u64, u32)>,
    pub(super) telemetry: Option<TestTelemetry>,
    /// Bytes of deltas stored for this shard, over all its attempts (for `--max-run-bytes`);
    /// 0 in records from before it was kept.
    pub(super) stored_bytes: u64,
}

impl Shard {
    fn state(&self) -> ShardState {
        if self.finished_at.is_some() {
            ShardState::Finished
        } else if self.streams > 0 {
            ShardState::Streaming
        } else if self.attempt > 0 {
            ShardState::Interrupted
        } else {
            ShardState::Pending
        }
    }
}

#[derive(Debug)]
pub(super) struct RunState {
    pub(super) params: RunParams,
    pub(super) shards: BTreeMap<String, Shard>,
    pub(super) completed_at: Option<SystemTime>,
    /// The run was deleted: sessions still holding it must stop.
    pub(super) deleted: bool,
    /// The aggregate may hold data of a replaced attempt (a rebuild failed or a merge
    /// panicked); the next stream start rebuilds it.
    pub(super) stale: bool,
    /// The repository's files, when the run was given them: delta paths outside it are
    /// reported back to the shard.
    pub(super) known_files: Option<Arc<RepoFiles>>,
    /// A retried shard reopened the complete run in memory; the write that starts its attempt
    /// also tells the store (see [`crate::persist::Write::Reopen`]).
    pub(super) reopening: bool,
}

impl RunState {
    pub(super) fn declared(&self) -> bool {
        !self.params.expected_shards.is_empty()
    }

    pub(super) fn missing(&self) -> Vec<String> {
        self.params
            .expected_shards
            .iter()
            .filter(|id| self.shards.get(*id).is_none_or(|s| s.finished_at.is_none()))
            .cloned()
            .collect()
    }

    pub(super) fn is_complete(&self) -> bool {
        self.completed_at.is_some()
    }

    /// Refuses work on a run deleted while a session held it.
    pub(super) fn check_live(&self, run: &str) -> Result<()> {
        if self.deleted {
            return Err(Error::RunNotFound(run.to_owned()));
        }
        Ok(())
    }

    /// Whether a waiting export may stop waiting: the run is complete, or it declared nothing
    /// and every shard seen so far has finished.
    pub(super) fn settled(&self) -> bool {
        self.is_complete()
            || (!self.declared()
                && !self.shards.is_empty()
                && self.shards.values().all(|s| s.finished_at.is_some()))
    }

    /// Marks the run complete if every expected shard has finished.
    pub(super) fn update_completion(&mut self) {
        if self.completed_at.is_none() && self.declared() && self.missing().is_empty() {
            self.completed_at = Some(SystemTime::now());
        }
    }
}

#[derive(Debug)]
pub(super) struct Run {
    pub(super) id: String,
    pub(super) created_at: SystemTime,
    gate: RwLock<()>,
    state: Mutex<RunState>,
    /// The merged coverage, in memory or left in storage.
    held: RwLock<Held>,
    /// Serializes reading a stored aggregate back, so two readers do not both read it.
    loading: Mutex<()>,
    /// Serializes bringing the run up to date from a shared store (see `shared`).
    pub(super) syncing: Mutex<()>,
    /// When a reader last used the aggregate (the service's clock), for the cache's order.
    pub(super) last_used: AtomicU64,
    /// Whether the run's merged files are stored (it was compacted): only then may its
    /// aggregate leave memory.
    pub(super) compacted: AtomicBool,
    /// Held while the run is compacted (its delta log replaced by merged files and per-shard
    /// lines) and while a shard's lines are read, so that a reader sees the log or what
    /// replaced it, never neither.
    pub(super) compacting: Mutex<()>,
    /// Whether the compacted run still has its deltas in storage, so that a retried shard
    /// may reopen it (within the reopen window).
    pub(super) deltas_kept: AtomicBool,
    /// Bumped on every change; watchers and waiting exports subscribe.
    changed: watch::Sender<u64>,
    /// Serializes writes of the run's stored record, so a stale copy never lands last. A tokio
    /// mutex: it is held across the store's commit.
    pub(super) record_lock: tokio::sync::Mutex<()>,
    /// Whether the run's record is in the store; until it is, every stream start writes it,
    /// so no delta is ever acknowledged for a run the store does not know.
    pub(super) stored: std::sync::atomic::AtomicBool,
}

impl Run {
    pub(super) fn new(id: String, params: RunParams) -> Run {
        Run::restore(id, SystemTime::now(), params, BTreeMap::new())
    }

    /// A run as recovered from the store (its aggregate still empty); also a new run, with
    /// no shards yet.
    pub(super) fn restore(
        id: String,
        created_at: SystemTime,
        params: RunParams,
        shards: BTreeMap<String, Shard>,
    ) -> Run {
        let mut shards = shards;
        for id in &params.expected_shards {
            shards.entry(id.clone()).or_default().expected = true;
        }
        let mut state = RunState {
            params,
            shards,
            completed_at: None,
            deleted: false,
            stale: false,
            known_files: None,
            reopening: false,
        };
        state.update_completion();
        Run {
            id,
            created_at,
            gate: RwLock::new(()),
            state: Mutex::new(state),
            held: RwLock::new(Held::Resident(Arc::new(Aggregate::new()))),
            loading: Mutex::new(()),
            syncing: Mutex::new(()),
            last_used: AtomicU64::new(0),
            compacted: AtomicBool::new(false),
            compacting: Mutex::new(()),
            deltas_kept: AtomicBool::new(false),
            changed: watch::Sender::new(0),
            record_lock: tokio::sync::Mutex::new(()),
            stored: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Each shard's current attempt and last acknowledged sequence (shards that started one).
    pub(super) fn current_attempts(&self) -> Vec<(String, u32, u64)> {
        self.state()
            .shards
            .iter()
            .filter(|(_, s)| s.attempt > 0)
            .map(|(id, s)| (id.clone(), s.attempt, s.last_seq))
            .collect()
    }

    // A panic while a lock was held cannot leave these structures half-updated in a way later
    // readers misinterpret (every update is a plain field write), so poisoning is ignored.
    pub(super) fn state(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn gate_shared(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn gate_exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Whether anyone waits on the run's changes (a watch, an export waiting for it).
    pub(super) fn watched(&self) -> bool {
        self.changed.receiver_count() > 0
    }

    pub(super) fn status(&self) -> RunStatus {
        let totals = self.totals();
        let state = self.state();
        RunStatus {
            run_id: self.id.clone(),
            params: state.params.clone(),
            shards: state
                .shards
                .iter()
                .map(|(id, s)| ShardStatus {
                    shard_id: id.clone(),
                    state: s.state(),
                    attempt: s.attempt,
                    last_seq: s.last_seq,
                    expected: s.expected,
                    finished_at: s.finished_at,
                    telemetry: s.telemetry.clone(),
                })
                .collect(),
            complete: state.is_complete(),
            missing_shards: state.missing(),
            expectations_declared: state.declared(),
            totals,
            created_at: self.created_at,
            completed_at: state.completed_at,
        }
    }

    /// Recomputes the aggregate from the current attempts' stored deltas. Blocking: call from
    /// a blocking thread.
    pub(super) fn rebuild(
        &self,
        interner: &PathInterner,
        storage: &dyn Storage,
    ) -> Result<(), StoreError> {
        let _gate = self.gate_exclusive();
        let aggregate = Arc::new(Aggregate::new());
        *self.held_mut() = Held::Resident(aggregate.clone());
        storage.for_each_delta(&self.id, &self.current_attempts(), &mut |_, files| {
            aggregate.merge_batch(interner, &files);
        })
    }

    fn held(&self) -> RwLockReadGuard<'_, Held> {
        self.held.read().unwrap_or_else(|e| e.into_inner())
    }

    fn held_mut(&self) -> RwLockWriteGuard<'_, Held> {
        self.held.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The aggregate, if it is in memory. Open runs always have theirs in memory.
    pub(super) fn aggregate(&self) -> Option<Arc<Aggregate>> {
        match &*self.held() {
            Held::Resident(a) => Some(a.clone()),
            Held::Stored { .. } => None,
        }
    }

    /// The aggregate of a run that is still being written (always in memory).
    pub(super) fn live(&self) -> Result<Arc<Aggregate>> {
        self.aggregate().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "run `{}` is complete; its coverage changes no more",
                self.id
            ))
        })
    }

    /// The totals, whether or not the aggregate is in memory.
    pub(super) fn totals(&self) -> Totals {
        match &*self.held() {
            Held::Resident(a) => a.totals(),
            Held::Stored { totals, .. } => *totals,
        }
    }

    /// How many files the run holds, whether or not the aggregate is in memory.
    pub(super) fn files(&self) -> usize {
        match &*self.held() {
            Held::Resident(a) => a.len(),
            Held::Stored { totals, .. } => totals.files as usize,
        }
    }

    /// Leaves the aggregate in storage (the run must be compacted), keeping its totals.
    /// Returns whether it was in memory.
    pub(super) fn evict(&self) -> bool {
        if !self.compacted.load(Ordering::Acquire) {
            return false;
        }
        let mut held = self.held_mut();
        let Held::Resident(a) = &*held else {
            return false;
        };
        let totals = a.totals();
        *held = Held::Stored { totals };
        true
    }

    /// Marks a compacted run's aggregate as left in storage from the start, with `totals`.
    pub(super) fn set_stored(&self, totals: Totals) {
        self.compacted.store(true, Ordering::Release);
        *self.held_mut() = Held::Stored { totals };
    }

    /// The aggregate, read back from the run's stored merged files if it was left there.
    /// Returns it and whether it had to be read. Blocking.
    pub(super) fn load(
        &self,
        interner: &PathInterner,
        storage: &dyn Storage,
    ) -> std::result::Result<(Arc<Aggregate>, bool), StoreError> {
        if let Some(a) = self.aggregate() {
            return Ok((a, false));
        }
        let _one = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = self.aggregate() {
            return Ok((a, false));
        }
        let aggregate = Arc::new(Aggregate::new());
        storage.for_each_merged(&self.id, &mut |files| {
            for (path, file) in files {
                aggregate.merge_file(interner, &path, file);
            }
        })?;
        *self.held_mut() = Held::Resident(aggregate.clone());
        Ok((aggregate, true))
    }
}

/// Deltas whose digest a shard keeps: a client re-sends at most the deltas it had in flight (16
/// for covd's own), so four times that catches every re-send of a push, and a second push's
/// deltas while the two overlap.
pub(super) const RECENT_DIGESTS: usize = 64;

/// Where a run's merged coverage is.
#[derive(Debug)]
enum Held {
    Resident(Arc<Aggregate>),
    /// In storage only (a complete, compacted run); its totals are kept for status and lists.
    Stored {
        totals: Totals,
    },
}

/// Refuses a shard id the run does not expect.
pub(super) fn check_expected(state: &RunState, run: &str, shard: &str) -> Result<()> {
    if state.declared() && !state.params.expected_shards.iter().any(|s| s == shard) {
        return Err(Error::FailedPrecondition(format!(
            "shard `{shard}` is not among the expected shards of run `{run}` ({})",
            abbreviate(&state.params.expected_shards)
        )));
    }
    Ok(())
}

/// A list of names for an error message, shortened when long.
pub(super) fn abbreviate(names: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = names
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", … {} more", names.len() - SHOWN));
    }
    s
}
