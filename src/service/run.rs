//! One run: its shards' progress, its aggregate, and the locking that keeps them consistent.
//!
//! Locks, always taken in this order and never across an `.await`:
//! 1. `gate` (std `RwLock`): appliers hold it shared while they merge a delta and record it;
//!    a rebuild or a consistent snapshot holds it exclusively. So a reader that holds it
//!    exclusively sees every delta whole or not at all.
//! 2. `state` (std `Mutex`): shard bookkeeping, held for microseconds, never while merging.
//! 3. the aggregate's own per-file locks (dashmap), taken inside `Aggregate` calls only.
//!
//! std locks rather than tokio's: they are held briefly, from blocking threads or without
//! awaiting, and std's are cheaper.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::SystemTime;

use tokio::sync::watch;

use crate::model::FileCoverage;
use crate::store::{Aggregate, PathInterner};

use super::{Error, Result, RunParams, RunStatus, ShardState, ShardStatus, TestTelemetry};

/// The deltas of one shard's current attempt, kept until the run completes so that a higher
/// attempt can replace them (the aggregate is rebuilt from the remaining logs).
pub(super) type LoggedDelta = Arc<[(Arc<str>, FileCoverage)]>;

#[derive(Debug, Default)]
pub(super) struct Shard {
    pub(super) expected: bool,
    /// 0 until a stream starts the first attempt.
    pub(super) attempt: u32,
    pub(super) last_seq: u64,
    pub(super) finished_at: Option<SystemTime>,
    /// Open streams for this shard.
    pub(super) streams: u32,
    /// The attempt of a delta being merged right now, if any: one at a time per shard keeps
    /// sequence numbers meaningful when a stale stream and its replacement overlap.
    pub(super) applying: Option<u32>,
    pub(super) log: Vec<LoggedDelta>,
    pub(super) telemetry: Option<TestTelemetry>,
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

    /// Whether a waiting export may stop waiting: the run is complete, or it declared nothing
    /// and every shard seen so far has finished.
    pub(super) fn settled(&self) -> bool {
        self.is_complete()
            || (!self.declared()
                && !self.shards.is_empty()
                && self.shards.values().all(|s| s.finished_at.is_some()))
    }

    /// Marks the run complete if every expected shard has finished; drops the delta logs then,
    /// since a complete run accepts no further attempt that could need them.
    pub(super) fn update_completion(&mut self) {
        if self.completed_at.is_none() && self.declared() && self.missing().is_empty() {
            self.completed_at = Some(SystemTime::now());
            for shard in self.shards.values_mut() {
                shard.log = Vec::new();
            }
        }
    }
}

#[derive(Debug)]
pub(super) struct Run {
    pub(super) id: String,
    pub(super) created_at: SystemTime,
    gate: RwLock<()>,
    state: Mutex<RunState>,
    pub(super) aggregate: Aggregate,
    /// Bumped on every change; watchers and waiting exports subscribe.
    changed: watch::Sender<u64>,
}

impl Run {
    pub(super) fn new(id: String, params: RunParams) -> Run {
        let mut shards = BTreeMap::new();
        for s in &params.expected_shards {
            shards.insert(
                s.clone(),
                Shard {
                    expected: true,
                    ..Shard::default()
                },
            );
        }
        Run {
            id,
            created_at: SystemTime::now(),
            gate: RwLock::new(()),
            state: Mutex::new(RunState {
                params,
                shards,
                completed_at: None,
            }),
            aggregate: Aggregate::new(),
            changed: watch::Sender::new(0),
        }
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

    pub(super) fn status(&self) -> RunStatus {
        let totals = self.aggregate.totals();
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

    /// Recomputes the aggregate from the delta logs (after an attempt was replaced).
    /// Blocking: call from a blocking thread.
    pub(super) fn rebuild(&self, interner: &PathInterner) {
        let _gate = self.gate_exclusive();
        let logs: Vec<LoggedDelta> = self
            .state()
            .shards
            .values()
            .flat_map(|s| s.log.iter().cloned())
            .collect();
        self.aggregate.clear();
        for delta in logs {
            for (path, file) in delta.iter() {
                self.aggregate.merge_file(interner, path, file);
            }
        }
    }
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
