//! Flaky and broken tests.
//!
//! A run's outcome of a test comes from every attempt of the shards that ran it: **flaky** when
//! it failed (or errored) in one attempt and passed in another, **failed** when it failed in
//! every attempt that ran it. An attempt whose tests mostly failed at once — more than half of
//! those with a verdict, and at least [`INFRA_MIN_FAILED`] — is taken for an infrastructure
//! failure (a lost database, a killed runner): its outcomes are left out.
//!
//! Per project and branch each test keeps a bounded history ([`TestHistoryRecord`]): its
//! outcome in the latest [`WINDOW`] runs, first and last seen, last flip. From it a test is
//! **broken** when, on the latest commit it ran on, it failed in every run and attempt; else
//! **flaky** when on some commit of the window it both failed and passed (within a run's
//! attempts, or across runs of that commit). Broken wins, so the two are never mixed: a test
//! that fails every time is not reported as flaky, however it behaved before.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{TestCase, TestStatus};
use crate::persist::{TestHistoryRecord, TestOutcome, TestRunOutcome};

/// Runs of a branch each test's history keeps.
pub const WINDOW: usize = 30;

/// Fewest failures in one attempt that can make it an infrastructure failure.
pub const INFRA_MIN_FAILED: usize = 5;

/// A test's name in history: `suite::name`, or the name alone without a suite.
pub fn key(case: &TestCase) -> String {
    if case.suite.is_empty() {
        case.name.clone()
    } else {
        format!("{}::{}", case.suite, case.name)
    }
}

fn failed(s: TestStatus) -> bool {
    matches!(s, TestStatus::Failed | TestStatus::Errored)
}

/// Whether an attempt's results look like an infrastructure failure rather than tests'
/// own: most of its tests with a verdict failed, and at least [`INFRA_MIN_FAILED`] of them.
pub fn infrastructure_failure(tests: &[TestCase]) -> bool {
    let bad = tests.iter().filter(|t| failed(t.status)).count();
    let judged = bad
        + tests
            .iter()
            .filter(|t| t.status == TestStatus::Passed)
            .count();
    bad >= INFRA_MIN_FAILED && bad * 2 > judged
}

/// Each test's outcome in a run, from the test cases of every attempt of every shard, given
/// as (shard, cases). Within a shard: flaky if it failed in one attempt and passed in another,
/// failed if it failed in every attempt that ran it (attempts that were infrastructure
/// failures leave their cases out; a test seen only there is `Excluded`). Across shards (a
/// test may run in several, on several platforms say) the worst: flaky, failed, passed,
/// skipped, excluded; a test failing on one platform and passing on another is failed there,
/// not flaky.
pub fn run_outcomes<'a>(
    attempts: impl IntoIterator<Item = (&'a str, &'a [TestCase])>,
) -> BTreeMap<String, TestOutcome> {
    #[derive(Default)]
    struct Seen {
        passed: bool,
        failed: bool,
        other: bool,
        excluded: bool,
    }
    let mut seen: BTreeMap<(&str, String), Seen> = BTreeMap::new();
    for (shard, tests) in attempts {
        let excluded = infrastructure_failure(tests);
        for t in tests {
            let s = seen.entry((shard, key(t))).or_default();
            if excluded {
                s.excluded = true;
            } else if failed(t.status) {
                s.failed = true;
            } else if t.status == TestStatus::Passed {
                s.passed = true;
            } else {
                s.other = true;
            }
        }
    }
    let rank = |o: TestOutcome| match o {
        TestOutcome::Flaky => 4,
        TestOutcome::Failed => 3,
        TestOutcome::Passed => 2,
        TestOutcome::Skipped => 1,
        _ => 0,
    };
    let mut out: BTreeMap<String, TestOutcome> = BTreeMap::new();
    for ((_, test), s) in seen {
        let outcome = match (s.passed, s.failed) {
            (true, true) => TestOutcome::Flaky,
            (false, true) => TestOutcome::Failed,
            (true, false) => TestOutcome::Passed,
            (false, false) if s.other => TestOutcome::Skipped,
            (false, false) => TestOutcome::Excluded,
        };
        let e = out.entry(test).or_insert(outcome);
        if rank(outcome) > rank(*e) {
            *e = outcome;
        }
    }
    out
}

/// Counts for (`Passed`) or against (`Failed`, `Flaky`) a test; `None` for the rest.
fn verdict(o: TestOutcome) -> Option<bool> {
    match o {
        TestOutcome::Passed => Some(true),
        TestOutcome::Failed | TestOutcome::Flaky => Some(false),
        _ => None,
    }
}

fn outcome_of(r: &TestRunOutcome) -> TestOutcome {
    TestOutcome::try_from(r.outcome).unwrap_or(TestOutcome::Unspecified)
}

/// A test's history with one run's outcome added (or replaced: a run recorded again, when it
/// completes a second time, counts once). Runs may come in any order (runs complete, and are
/// recorded, in another order than they were created): the result is the same.
pub fn record(history: Option<TestHistoryRecord>, run: TestRunOutcome) -> TestHistoryRecord {
    let mut h = history.unwrap_or(TestHistoryRecord {
        first_seen_ms: run.at_ms,
        last_seen_ms: run.at_ms,
        ..TestHistoryRecord::default()
    });
    h.first_seen_ms = h.first_seen_ms.min(run.at_ms);
    h.last_seen_ms = h.last_seen_ms.max(run.at_ms);
    h.recent.retain(|r| r.run_key != run.run_key);
    h.recent.push(run);
    h.recent.sort_by_key(|r| (r.at_ms, r.run_key));
    if h.recent.len() > WINDOW {
        // Flips at the runs that leave, or against a verdict that leaves, are remembered.
        let extra = h.recent.len() - WINDOW;
        for (at, flip_at, before) in flips(&h.recent) {
            if at < extra || before.is_some_and(|b| b < extra) {
                h.flip_before_window_ms = h.flip_before_window_ms.max(Some(flip_at));
            }
        }
        h.recent.drain(..extra);
    }
    h
}

/// The flips of a sequence of runs: (index of the run, its time, index of the previous run
/// with a verdict). A flaky run is a flip of its own, and ends passing.
fn flips(recent: &[TestRunOutcome]) -> Vec<(usize, u64, Option<usize>)> {
    let mut out = Vec::new();
    let mut previous: Option<(usize, bool)> = None;
    for (i, r) in recent.iter().enumerate() {
        let o = outcome_of(r);
        let Some(passed) = verdict(o) else { continue };
        let flaky = o == TestOutcome::Flaky;
        if flaky || previous.is_some_and(|(_, p)| p != passed) {
            out.push((i, r.at_ms, previous.map(|(j, _)| j)));
        }
        // A flaky run ended passing (its retry passed).
        previous = Some((i, passed || flaky));
    }
    out
}

/// What a test's history says of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Failed in every run and attempt on the latest commit it ran on.
    Broken,
    /// Failed and passed on one commit (and is not broken now).
    Flaky,
    /// Neither.
    Healthy,
}

/// A test's standing on a branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub class: Class,
    /// Runs of the window it failed in (flaky runs included).
    pub failed: u32,
    /// Runs of the window with a verdict for it (skipped and excluded ones left out).
    pub runs: u32,
    /// Commits of the window on which it both failed and passed.
    pub flaky_commits: u32,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub last_flip_ms: Option<u64>,
}

pub fn health(h: &TestHistoryRecord) -> Health {
    let judged: Vec<(u32, TestOutcome)> = h
        .recent
        .iter()
        .map(|r| (r.commit_key, outcome_of(r)))
        .filter(|(_, o)| verdict(*o).is_some())
        .collect();
    let failed = judged
        .iter()
        .filter(|(_, o)| verdict(*o) == Some(false))
        .count();
    let mut flaky = BTreeSet::new();
    let mut by_commit: BTreeMap<u32, (bool, bool)> = BTreeMap::new();
    for (commit, o) in &judged {
        let e = by_commit.entry(*commit).or_default();
        match o {
            TestOutcome::Flaky => {
                flaky.insert(*commit);
            }
            TestOutcome::Passed => e.0 = true,
            _ => e.1 = true,
        }
    }
    flaky.extend(
        by_commit
            .iter()
            .filter(|(_, (passed, failed))| *passed && *failed)
            .map(|(c, _)| *c),
    );
    let broken = judged.last().is_some_and(|(commit, _)| {
        judged
            .iter()
            .filter(|(c, _)| c == commit)
            .all(|(_, o)| *o == TestOutcome::Failed)
    });
    Health {
        class: if broken {
            Class::Broken
        } else if !flaky.is_empty() {
            Class::Flaky
        } else {
            Class::Healthy
        },
        failed: failed as u32,
        runs: judged.len() as u32,
        flaky_commits: flaky.len() as u32,
        first_seen_ms: h.first_seen_ms,
        last_seen_ms: h.last_seen_ms,
        last_flip_ms: flips(&h.recent)
            .last()
            .map(|(_, at, _)| *at)
            .max(h.flip_before_window_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn case(name: &str, status: TestStatus) -> TestCase {
        TestCase {
            suite: "s".into(),
            name: name.into(),
            status,
            duration: Duration::ZERO,
            assertions: None,
        }
    }

    #[test]
    fn attempts_make_flaky_failed_and_excluded_outcomes() {
        use TestStatus::*;
        let first = [
            case("a", Failed),
            case("b", Failed),
            case("c", Passed),
            case("d", Skipped),
        ];
        let second = [
            case("a", Passed),
            case("b", Errored),
            case("c", Passed),
            case("d", Skipped),
        ];
        let got = run_outcomes([("0", &first[..]), ("0", &second[..])]);
        assert_eq!(got["s::a"], TestOutcome::Flaky);
        assert_eq!(got["s::b"], TestOutcome::Failed);
        assert_eq!(got["s::c"], TestOutcome::Passed);
        assert_eq!(got["s::d"], TestOutcome::Skipped);

        // An attempt that failed 5 of 6 at once is an infrastructure failure: its failures do
        // not make the tests that pass in the retry flaky.
        let infra: Vec<_> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|n| case(n, Failed))
            .chain([case("f", Passed), case("g", Failed)])
            .collect();
        assert!(infrastructure_failure(&infra));
        let retry: Vec<_> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|n| case(n, Passed))
            .collect();
        let got = run_outcomes([("0", &infra[..]), ("0", &retry[..])]);
        assert!(got.values().filter(|o| **o == TestOutcome::Passed).count() == 6);
        assert_eq!(got["s::g"], TestOutcome::Excluded);
        // Four failures are not enough, nor are five among many passes.
        assert!(!infrastructure_failure(&infra[..4]));
        let mostly_passing: Vec<_> = infra
            .iter()
            .cloned()
            .chain((0..10).map(|i| case(&format!("p{i}"), Passed)))
            .collect();
        assert!(!infrastructure_failure(&mostly_passing));

        // One test in two shards (two platforms): failing on one, passing on the other, it
        // failed; flaky on one, it is flaky.
        let linux = [case("a", Failed), case("b", Failed)];
        let mac = [case("a", Passed), case("b", Passed)];
        let mac_retry = [case("b", Failed)];
        let got = run_outcomes([
            ("linux", &linux[..]),
            ("mac", &mac[..]),
            ("mac", &mac_retry[..]),
        ]);
        assert_eq!(got["s::a"], TestOutcome::Failed);
        assert_eq!(got["s::b"], TestOutcome::Flaky);
    }

    fn run(key: u32, commit: u32, at: u64, outcome: TestOutcome) -> TestRunOutcome {
        TestRunOutcome {
            run_key: key,
            commit_key: commit,
            at_ms: at,
            outcome: outcome as i32,
        }
    }

    fn history(runs: &[(u32, TestOutcome)]) -> TestHistoryRecord {
        let mut h = None;
        for (i, (commit, o)) in runs.iter().enumerate() {
            h = Some(record(h, run(i as u32, *commit, 100 * i as u64, *o)));
        }
        h.unwrap()
    }

    #[test]
    fn flaky_and_broken_are_never_mixed() {
        use crate::persist::TestOutcome::*;
        // Failed and passed on commit 1: flaky, though it passes now.
        let h = health(&history(&[
            (1, Passed),
            (1, Failed),
            (2, Passed),
            (3, Passed),
        ]));
        assert_eq!(
            (h.class, h.failed, h.runs, h.flaky_commits),
            (Class::Flaky, 1, 4, 1)
        );
        assert_eq!(h.last_flip_ms, Some(200));
        // A retry that passed is flaky on its own.
        let h = health(&history(&[(1, Passed), (2, Flaky), (3, Passed)]));
        assert_eq!((h.class, h.failed), (Class::Flaky, 1));
        // Flaky before, failing every time on the latest commit: broken, not flaky.
        let h = health(&history(&[
            (1, Passed),
            (1, Failed),
            (2, Failed),
            (2, Failed),
        ]));
        assert_eq!((h.class, h.failed, h.flaky_commits), (Class::Broken, 3, 1));
        // A regression fixed on the next commit is neither.
        let h = health(&history(&[(1, Passed), (2, Failed), (3, Passed)]));
        assert_eq!(
            (h.class, h.failed, h.last_flip_ms),
            (Class::Healthy, 1, Some(200))
        );
        // Skipped and excluded runs count for nothing.
        let h = health(&history(&[
            (1, Passed),
            (2, Skipped),
            (3, Excluded),
            (3, Passed),
        ]));
        assert_eq!((h.class, h.failed, h.runs), (Class::Healthy, 0, 2));
    }

    #[test]
    fn the_order_runs_are_recorded_in_does_not_matter() {
        use crate::persist::TestOutcome::*;
        let runs: Vec<_> = [Passed, Failed, Failed, Passed, Flaky, Skipped, Failed]
            .iter()
            .enumerate()
            .map(|(i, o)| run(i as u32, i as u32 / 2, 10 * i as u64, *o))
            .collect();
        let in_order = runs.iter().fold(None, |h, r| Some(record(h, *r))).unwrap();
        for rotation in 1..runs.len() {
            let mut shuffled = runs.clone();
            shuffled.rotate_left(rotation);
            shuffled.swap(0, runs.len() - 1);
            let h = shuffled
                .iter()
                .fold(None, |h, r| Some(record(h, *r)))
                .unwrap();
            assert_eq!(h, in_order, "rotation {rotation}");
            assert_eq!(health(&h), health(&in_order));
        }
        assert_eq!(health(&in_order).last_flip_ms, Some(60));
    }

    #[test]
    fn history_is_bounded_and_counts_a_run_once() {
        use crate::persist::TestOutcome::*;
        let mut h = None;
        for i in 0..(WINDOW as u64 + 10) {
            let o = if i == 0 { Failed } else { Passed };
            h = Some(record(h, run(i as u32, i as u32, 1000 + i, o)));
        }
        let h = h.unwrap();
        assert_eq!(h.recent.len(), WINDOW);
        assert_eq!(
            (h.first_seen_ms, h.last_seen_ms),
            (1000, 1000 + WINDOW as u64 + 9)
        );
        // The flip from the failure that left the window is remembered.
        assert_eq!(h.flip_before_window_ms, Some(1001));
        assert_eq!(health(&h).last_flip_ms, Some(1001));
        let again = record(
            Some(h.clone()),
            run(WINDOW as u32 + 9, 0, 1000 + WINDOW as u64 + 9, Failed),
        );
        assert_eq!(again.recent.len(), WINDOW);
        assert_eq!(health(&again).failed, 1);
        assert_eq!(health(&again).class, Class::Broken);
    }
}
