//! History: the trend of a project's runs over calendar buckets, and the down-sampling of
//! runs older than the full-resolution age into months (see [`crate::history`]).

use crate::history::{Bucket, TrendBucket};
use crate::persist::{HistoryQuery, SummaryRecord, Write};

use std::sync::Arc;

use super::{CoverageService, Error, Result, Run};

impl CoverageService {
    /// The trend of the runs `query` selects, in buckets of `bucket`, oldest first: the
    /// summaries of runs still kept in full, and the months older runs were folded into. A
    /// run enters history when it completes (or expires incomplete); runs still open are not
    /// in it yet.
    pub async fn history(&self, query: HistoryQuery, bucket: Bucket) -> Result<Vec<TrendBucket>> {
        let service = self.clone();
        tokio::task::spawn_blocking(move || {
            let all = HistoryQuery {
                limit: usize::MAX,
                ..query
            };
            // A run that just completed may not be compacted yet (that stores its summary):
            // its live summary stands for it. Read first: a run compacted meanwhile is then
            // in both, and counted once.
            let mut live = service.uncompacted_summaries(&all);
            let (mut runs, months) = service.shared.storage.history(&all)?;
            let ids: std::collections::HashSet<&str> =
                live.iter().map(|s| s.run_id.as_str()).collect();
            runs.retain(|s| !ids.contains(s.run_id.as_str()));
            runs.append(&mut live);
            Ok(crate::history::trend(bucket, &runs, &months))
        })
        .await
        .map_err(|e| Error::Unavailable(format!("reading history failed: {e}")))?
    }

    /// The summaries of the complete runs the daemon holds that `query` selects and that are
    /// not compacted yet (compaction stores the summary).
    fn uncompacted_summaries(&self, query: &HistoryQuery) -> Vec<SummaryRecord> {
        self.uncompacted_complete_runs(query)
            .iter()
            .map(|r| super::durable::summary(&r.status()))
            .collect()
    }

    /// The complete runs the daemon holds that `query` selects and that are not compacted yet:
    /// what compaction stores of them (summary, test outcomes) is not in the store yet.
    pub(super) fn uncompacted_complete_runs(&self, query: &HistoryQuery) -> Vec<Arc<Run>> {
        let runs: Vec<_> = self.shared.runs.iter().map(|e| e.value().clone()).collect();
        runs.into_iter()
            .filter(|r| {
                let state = r.state();
                let at = super::durable::to_ms(r.created_at);
                state.is_complete()
                    && !r.compacted.load(std::sync::atomic::Ordering::Acquire)
                    && query.selects(&state.params.project, &state.params.branch, at)
            })
            .collect()
    }

    /// The summaries of runs `query` selects, newest first (runs folded into months are no
    /// longer listed one by one).
    pub async fn summaries(&self, query: HistoryQuery) -> Result<Vec<SummaryRecord>> {
        let storage = self.shared.storage.clone();
        tokio::task::spawn_blocking(move || Ok(storage.summaries(&query)?))
            .await
            .map_err(|e| Error::Unavailable(format!("reading history failed: {e}")))?
    }

    /// Folds the summaries of runs created before `before_ms` (whose raw data is gone) into
    /// their months, and forgets tests last seen before `tests_before_ms`.
    pub async fn down_sample(&self, before_ms: u64, tests_before_ms: u64) -> Result<()> {
        Ok(self
            .shared
            .storage
            .write(vec![Write::DownSample {
                before_ms,
                tests_before_ms,
            }])
            .await?)
    }
}
