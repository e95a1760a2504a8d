//! Shard streams: the header that starts (or resumes, or replaces) an attempt, the deltas with
//! their sequence numbers, and the finish.

use std::sync::Arc;
use std::time::SystemTime;

use super::run::{LoggedDelta, Run, check_expected};
use super::{
    Applied, CoverageService, Delta, Error, Result, RunStatus, ShardHeader, TestTelemetry,
    check_name, normalize_params,
};

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

impl CoverageService {
    /// Starts a stream for a shard attempt: opens the run if needed, replaces an older attempt,
    /// and says where to resume.
    pub async fn begin_shard(&self, header: ShardHeader) -> Result<ShardSession> {
        check_name("header.run_id", &header.run_id, 256)?;
        check_name("header.shard_id", &header.shard_id, 128)?;
        let mut params = normalize_params(header.params)?;
        params.expected_shards.clear(); // only OpenRun declares expectations
        let (_, run) = self.get_or_create(&header.run_id, &params)?;
        let attempt = header.attempt.max(1);
        let shard_id = header.shard_id;

        let replaced = {
            let mut state = run.state();
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
            if !state.shards.contains_key(&shard_id) && known >= self.limits().max_shards_per_run {
                return Err(Error::ResourceExhausted(format!(
                    "run `{}` has {known} shards, its limit",
                    run.id
                )));
            }
            let shard = state.shards.entry(shard_id.clone()).or_default();
            if attempt < shard.attempt {
                return Err(Error::FailedPrecondition(format!(
                    "attempt {attempt} of shard `{shard_id}` was superseded by attempt {}",
                    shard.attempt
                )));
            }
            let replaced =
                attempt > shard.attempt && (shard.last_seq > 0 || shard.finished_at.is_some());
            if attempt > shard.attempt {
                shard.attempt = attempt;
                shard.last_seq = 0;
                shard.finished_at = None;
                shard.log = Vec::new();
                shard.telemetry = None;
            }
            shard.streams += 1;
            replaced
        };
        // The session exists from here on, so an error below still closes the stream count.
        let mut session = ShardSession {
            run: run.clone(),
            shard_id,
            attempt,
            last_seq: 0,
            finished: false,
        };
        if replaced {
            let service = self.clone();
            let run = run.clone();
            tokio::task::spawn_blocking(move || run.rebuild(&service.shared.interner))
                .await
                .map_err(|e| Error::Unavailable(format!("rebuilding the aggregate failed: {e}")))?;
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
        let limits = self.limits();
        if delta.files.len() > limits.max_files_per_delta {
            return Err(Error::ResourceExhausted(format!(
                "a delta of {} files exceeds the limit of {}; send smaller deltas",
                delta.files.len(),
                limits.max_files_per_delta
            )));
        }
        {
            let mut state = session.run.state();
            let shard = shard_of(&mut state, session)?;
            if shard.finished_at.is_some() {
                return Err(Error::FailedPrecondition(format!(
                    "shard `{}` (attempt {}) has finished; start a new attempt to send more",
                    session.shard_id, session.attempt
                )));
            }
            if delta.seq == 0 {
                return Err(Error::invalid("delta.seq", "sequence numbers start at 1"));
            }
            if delta.seq <= shard.last_seq {
                return Ok(Applied {
                    seq: delta.seq,
                    duplicate: true,
                });
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
            if shard.applying.is_some() {
                return Err(Error::Aborted(format!(
                    "another stream of shard `{}` is applying a delta; reconnect and resume",
                    session.shard_id
                )));
            }
            shard.applying = Some(session.attempt);
        }

        let service = self.clone();
        let run = session.run.clone();
        let (shard_id, attempt) = (session.shard_id.clone(), session.attempt);
        let outcome = tokio::task::spawn_blocking(move || {
            service.merge_delta(&run, &shard_id, attempt, delta)
        })
        .await;
        match outcome {
            Ok(result) => result,
            Err(e) => {
                // The merge panicked: release the shard so the client can retry.
                let mut state = session.run.state();
                if let Some(shard) = state.shards.get_mut(&session.shard_id) {
                    shard.applying = None;
                }
                Err(Error::Unavailable(format!(
                    "applying the delta failed: {e}"
                )))
            }
        }
    }

    /// Blocking part of `apply`: merge into the aggregate and log, under the shared gate.
    fn merge_delta(
        &self,
        run: &Run,
        shard_id: &str,
        attempt: u32,
        delta: Delta,
    ) -> Result<Applied> {
        let limits = self.limits();
        let _gate = run.gate_shared();
        let release = |run: &Run| {
            if let Some(s) = run.state().shards.get_mut(shard_id) {
                if s.applying == Some(attempt) {
                    s.applying = None;
                }
            }
        };
        // Concurrent deltas may each pass this check and overshoot by at most one delta's
        // files; the limit guards memory, not an exact count.
        let new_files = run
            .aggregate
            .count_new(delta.files.iter().map(|(p, _)| p.as_str()));
        if new_files > 0 && run.aggregate.len() + new_files > limits.max_files_per_run {
            release(run);
            return Err(Error::ResourceExhausted(format!(
                "run `{}` would hold {} files, beyond the limit of {}",
                run.id,
                run.aggregate.len() + new_files,
                limits.max_files_per_run
            )));
        }
        let interner = &self.shared.interner;
        let logged: LoggedDelta = delta
            .files
            .into_iter()
            .map(|(path, file)| {
                run.aggregate.merge_file(interner, &path, &file);
                (interner.intern(&path), file)
            })
            .collect();
        let mut state = run.state();
        let shard = state
            .shards
            .get_mut(shard_id)
            .ok_or_else(|| Error::FailedPrecondition(format!("shard `{shard_id}` vanished")))?;
        if shard.applying == Some(attempt) {
            shard.applying = None;
        }
        if shard.attempt != attempt {
            // Replaced while merging: the rebuild that follows (it waits for this gate) drops
            // what was merged here, because it is not in the log.
            return Err(superseded(shard_id, attempt, shard.attempt));
        }
        shard.log.push(logged);
        shard.last_seq = delta.seq;
        drop(state);
        run.notify();
        Ok(Applied {
            seq: delta.seq,
            duplicate: false,
        })
    }

    /// Ends the session's attempt. `final_seq` must equal the last acknowledged sequence.
    pub fn finish(
        &self,
        session: &ShardSession,
        final_seq: u64,
        telemetry: Option<TestTelemetry>,
    ) -> Result<RunStatus> {
        {
            let mut state = session.run.state();
            let shard = shard_of(&mut state, session)?;
            if shard.last_seq != final_seq {
                return Err(Error::FailedPrecondition(format!(
                    "finish says the last delta of shard `{}` is {final_seq}, but {} were \
                     acknowledged; send the missing deltas first",
                    session.shard_id, shard.last_seq
                )));
            }
            if shard.finished_at.is_none() {
                shard.finished_at = Some(SystemTime::now());
                shard.telemetry = telemetry;
                state.update_completion();
            }
        }
        session.run.notify();
        Ok(session.run.status())
    }
}

fn shard_of<'a>(
    state: &'a mut super::run::RunState,
    session: &ShardSession,
) -> Result<&'a mut super::run::Shard> {
    let shard = state.shards.get_mut(&session.shard_id).ok_or_else(|| {
        Error::FailedPrecondition(format!("shard `{}` vanished", session.shard_id))
    })?;
    if shard.attempt != session.attempt {
        return Err(superseded(
            &session.shard_id,
            session.attempt,
            shard.attempt,
        ));
    }
    Ok(shard)
}

fn superseded(shard: &str, attempt: u32, current: u32) -> Error {
    Error::FailedPrecondition(format!(
        "attempt {attempt} of shard `{shard}` was superseded by attempt {current}"
    ))
}
