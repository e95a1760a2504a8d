//! History: the trend of a project's runs over calendar buckets, and the down-sampling of
//! runs older than the full-resolution age into months (see [`crate::history`]).

use crate::history::{Bucket, TrendBucket};
use crate::persist::{HistoryQuery, SummaryRecord, Write};

use super::{CoverageService, Error, Result};

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
                ..query.clone()
            };
            let mut runs = service.shared.storage.summaries(&all)?;
            // A run that just completed may not be compacted yet (that writes its summary):
            // its live summary stands for it.
            let mut live = service.complete_summaries(&all);
            runs.retain(|s| !live.iter().any(|l| l.run_id == s.run_id));
            runs.append(&mut live);
            let months = service.shared.storage.months(&query)?;
            Ok(crate::history::trend(bucket, &runs, &months))
        })
        .await
        .map_err(|e| Error::Unavailable(format!("reading history failed: {e}")))?
    }

    /// The summaries of the complete runs the daemon holds that `query` selects.
    fn complete_summaries(&self, query: &HistoryQuery) -> Vec<SummaryRecord> {
        let runs: Vec<_> = self.shared.runs.iter().map(|e| e.value().clone()).collect();
        runs.into_iter()
            .filter(|r| {
                let state = r.state();
                let at = super::durable::to_ms(r.created_at);
                state.is_complete()
                    && query.selects(&state.params.project, &state.params.branch, at)
            })
            .map(|r| super::durable::summary(&r.status()))
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

    /// Folds the summaries of runs created before `before_ms` into their months.
    pub async fn down_sample(&self, before_ms: u64) -> Result<()> {
        Ok(self
            .shared
            .storage
            .write(vec![Write::DownSample { before_ms }])
            .await?)
    }
}
