//! Flaky and broken tests (see [`crate::flaky`]): each test's standing on a branch, and
//! within a run the attempts of each shard: which tests flipped between them, and what a
//! replaced attempt covered that the current one did not (and the reverse).

use std::collections::BTreeMap;
use std::sync::Arc;

use roaring::RoaringBitmap;

use super::durable::telemetry_from_record;
use super::{CoverageService, Error, Result, TestTelemetry};
use crate::flaky::{Class, Health};
use crate::persist::{HistoryQuery, TestHistoryRecord, Write, codec};

/// One test's standing on a branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestStanding {
    /// `suite::name`.
    pub test: String,
    pub health: Health,
}

/// A shard's attempts in a run, when it had more than one.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ShardAttempts {
    pub shard_id: String,
    /// Oldest first; the last is the current one.
    pub attempts: Vec<AttemptSummary>,
    /// Tests that failed (or errored) in one attempt and passed in another.
    pub flipped: Vec<FlippedTest>,
    /// For each replaced attempt that sent coverage, against the current one (when it sent
    /// coverage too): the lines each covered that the other did not.
    pub differences: Vec<CoverageDifference>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AttemptSummary {
    pub attempt: u32,
    pub current: bool,
    pub finished: bool,
    /// Deltas it had acknowledged.
    pub deltas: u64,
    /// Its test results; `None` when it reported none.
    pub tests: Option<[u64; 4]>,
    /// Most of its tests failed at once: left out of flakiness.
    pub infrastructure_failure: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlippedTest {
    pub test: String,
    pub failed_in: Vec<u32>,
    pub passed_in: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CoverageDifference {
    pub attempt: u32,
    pub against: u32,
    pub only_in_attempt: Vec<(Arc<str>, RoaringBitmap)>,
    pub only_in_against: Vec<(Arc<str>, RoaringBitmap)>,
}

impl CoverageService {
    /// The tests of a project's branch that are flaky or broken (with `all`, also those that
    /// only failed now and then), broken first, then by failures.
    pub async fn flaky_tests(
        &self,
        project: &str,
        branch: &str,
        all: bool,
    ) -> Result<Vec<TestStanding>> {
        let service = self.clone();
        let (project, branch) = (project.to_owned(), branch.to_owned());
        let histories = tokio::task::spawn_blocking(move || {
            // Complete runs not compacted yet (compaction records their tests) count already.
            // They are read before the store: a run compacted in between is in both, and a
            // run recorded twice counts once.
            let branch_runs = HistoryQuery {
                project: Some(project.clone()),
                branch: Some(branch.clone()),
                ..HistoryQuery::default()
            };
            let mut pending = Vec::new();
            for run in service.uncompacted_complete_runs(&branch_runs) {
                if let Some(Write::RecordTests { outcomes, .. }) = service.record_tests(&run)? {
                    pending.extend(outcomes);
                }
            }
            let mut histories: BTreeMap<String, TestHistoryRecord> = service
                .shared
                .storage
                .test_histories(&project, &branch)?
                .into_iter()
                .collect();
            for (test, outcome) in pending {
                let old = histories.remove(&test);
                histories.insert(test, crate::flaky::record(old, outcome));
            }
            Ok::<_, Error>(histories)
        })
        .await
        .map_err(|e| Error::Unavailable(format!("reading test history failed: {e}")))??;
        let mut out: Vec<TestStanding> = histories
            .iter()
            .map(|(test, h)| TestStanding {
                test: test.clone(),
                health: crate::flaky::health(h),
            })
            .filter(|s| s.health.class != Class::Healthy || (all && s.health.failed > 0))
            .collect();
        let rank = |c: Class| match c {
            Class::Broken => 0,
            Class::Flaky => 1,
            Class::Healthy => 2,
        };
        out.sort_by(|a, b| {
            (
                rank(a.health.class),
                std::cmp::Reverse(a.health.failed),
                &a.test,
            )
                .cmp(&(
                    rank(b.health.class),
                    std::cmp::Reverse(b.health.failed),
                    &b.test,
                ))
        });
        Ok(out)
    }

    /// The shards of a run that had more than one attempt, by shard id.
    pub async fn attempts(&self, run_id: &str) -> Result<Vec<ShardAttempts>> {
        let run = self.run(run_id)?;
        let service = self.clone();
        tokio::task::spawn_blocking(move || {
            let replaced = service.shared.storage.attempts(&run.id)?;
            let mut by_shard: BTreeMap<String, Vec<_>> = BTreeMap::new();
            for a in replaced {
                by_shard.entry(a.shard_id.clone()).or_default().push(a);
            }
            let mut out = Vec::new();
            for (shard_id, replaced) in by_shard {
                let current = run.state().shards.get(&shard_id).map(|s| {
                    (
                        s.attempt,
                        s.finished_at.is_some(),
                        s.last_seq,
                        s.telemetry.clone(),
                    )
                });
                let mut attempts: Vec<(AttemptSummary, Option<TestTelemetry>)> = replaced
                    .iter()
                    .map(|a| {
                        let t = a.telemetry.clone().map(telemetry_from_record);
                        (
                            summary(a.attempt, false, a.finished_at_ms.is_some(), a.last_seq, &t),
                            t,
                        )
                    })
                    .collect();
                if let Some((attempt, finished, deltas, t)) = &current {
                    attempts.push((summary(*attempt, true, *finished, *deltas, t), t.clone()));
                }
                let flipped = flipped(&attempts);
                let current_lines = match &current {
                    Some((_, _, deltas, _)) if *deltas > 0 => {
                        match service.lines_of_shard(&run, &shard_id) {
                            Ok(lines) => Some(lines),
                            // A run compacted by a release that kept no per-shard lines.
                            Err(Error::FailedPrecondition(_)) => None,
                            Err(e) => return Err(e),
                        }
                    }
                    _ => None,
                };
                let mut differences = Vec::new();
                if let (Some(against), Some(current_lines)) = (&current, &current_lines) {
                    for a in replaced.iter().filter(|a| !a.lines.is_empty()) {
                        let lines = codec::decode_shard_lines(&a.lines)
                            .map_err(|e| Error::Unavailable(format!("a stored attempt: {e}")))?;
                        differences.push(CoverageDifference {
                            attempt: a.attempt,
                            against: against.0,
                            only_in_attempt: minus(&lines, current_lines),
                            only_in_against: minus(current_lines, &lines),
                        });
                    }
                }
                out.push(ShardAttempts {
                    shard_id,
                    attempts: attempts.into_iter().map(|(s, _)| s).collect(),
                    flipped,
                    differences,
                });
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::Unavailable(format!("reading attempts failed: {e}")))?
    }
}

fn summary(
    attempt: u32,
    current: bool,
    finished: bool,
    deltas: u64,
    t: &Option<TestTelemetry>,
) -> AttemptSummary {
    let reported = t.as_ref().filter(|t| {
        !t.tests.is_empty() || t.passed + t.failed + t.skipped + t.errored + t.incomplete > 0
    });
    AttemptSummary {
        attempt,
        current,
        finished,
        deltas,
        tests: reported.map(|t| [t.passed, t.failed, t.skipped, t.errored]),
        infrastructure_failure: reported
            .is_some_and(|t| crate::flaky::infrastructure_failure(&t.tests)),
    }
}

/// Tests that failed in one attempt and passed in another (infrastructure failures aside).
fn flipped(attempts: &[(AttemptSummary, Option<TestTelemetry>)]) -> Vec<FlippedTest> {
    use crate::model::TestStatus;
    let mut by_test: BTreeMap<String, (Vec<u32>, Vec<u32>)> = BTreeMap::new();
    for (s, t) in attempts {
        let Some(t) = t else { continue };
        if s.infrastructure_failure {
            continue;
        }
        for case in &t.tests {
            let e = by_test.entry(crate::flaky::key(case)).or_default();
            match case.status {
                TestStatus::Failed | TestStatus::Errored => e.0.push(s.attempt),
                TestStatus::Passed => e.1.push(s.attempt),
                _ => {}
            }
        }
    }
    by_test
        .into_iter()
        .filter(|(_, (f, p))| !f.is_empty() && !p.is_empty())
        .map(|(test, (failed_in, passed_in))| FlippedTest {
            test,
            failed_in,
            passed_in,
        })
        .collect()
}

/// The lines of `a` not in `b`, per file (both sorted by path).
fn minus(
    a: &[(Arc<str>, RoaringBitmap)],
    b: &[(Arc<str>, RoaringBitmap)],
) -> Vec<(Arc<str>, RoaringBitmap)> {
    let b: BTreeMap<&str, &RoaringBitmap> = b.iter().map(|(p, l)| (&**p, l)).collect();
    a.iter()
        .filter_map(|(path, lines)| {
            let only = match b.get(&**path) {
                Some(other) => lines - *other,
                None => lines.clone(),
            };
            (!only.is_empty()).then(|| (path.clone(), only))
        })
        .collect()
}
