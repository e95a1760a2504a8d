//! Which complete runs keep their aggregate in memory. Open runs always do (shards merge into
//! them); a complete run whose merged files are stored counts against
//! [`Limits::memory_budget_bytes`](super::Limits), and the least recently used leave memory
//! when the budget is exceeded. A reader of a run that left reads it back from storage
//! (`Run::load`), and it counts again. So a daemon that keeps months of runs holds in memory
//! its open runs and the complete runs people are looking at, not its history.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::run::Run;

#[derive(Debug)]
pub(super) struct Cache {
    budget: usize,
    /// Ticks on every use of an aggregate; a run's `last_used` holds the tick of its last use.
    clock: AtomicU64,
    /// A std mutex: held while counting or dropping entries, never across an await.
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Bytes of the complete runs' aggregates in memory.
    used: usize,
    /// The complete runs whose aggregate is in memory, with what it weighs.
    runs: HashMap<String, (Arc<Run>, usize)>,
}

impl Cache {
    pub(super) fn new(budget: usize) -> Cache {
        Cache {
            budget,
            clock: AtomicU64::new(0),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes that a reader used the run's aggregate now.
    pub(super) fn touch(&self, run: &Run) {
        let now = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
        run.last_used.store(now, Ordering::Relaxed);
    }

    /// Counts a compacted run whose aggregate is in memory (`weight` bytes), then lets the
    /// least recently used runs leave memory until the budget holds. The run itself may leave
    /// at once if it alone is beyond the budget; a reader holding its aggregate keeps it.
    pub(super) fn admit(&self, run: &Arc<Run>, weight: usize) {
        self.touch(run);
        let mut state = self.state();
        if let Some((_, old)) = state.runs.insert(run.id.clone(), (run.clone(), weight)) {
            state.used -= old;
        }
        state.used += weight;
        if state.used <= self.budget {
            return;
        }
        let mut by_age: Vec<(u64, String)> = state
            .runs
            .iter()
            .map(|(id, (r, _))| (r.last_used.load(Ordering::Relaxed), id.clone()))
            .collect();
        by_age.sort_unstable();
        for (_, id) in by_age {
            if state.used <= self.budget {
                break;
            }
            if let Some((r, w)) = state.runs.remove(&id) {
                state.used -= w;
                r.evict();
                tracing::debug!(run = %id, bytes = w, "a complete run left memory");
            }
        }
    }

    /// Forgets a run that was deleted or expired.
    pub(super) fn forget(&self, run_id: &str) {
        let mut state = self.state();
        if let Some((_, w)) = state.runs.remove(run_id) {
            state.used -= w;
        }
    }

    /// Bytes counted now, and how many runs.
    pub(super) fn usage(&self) -> (usize, usize) {
        let state = self.state();
        (state.used, state.runs.len())
    }
}
