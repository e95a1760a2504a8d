//! Test impact: given a base run with per-test coverage and a unified diff from the base's
//! commit, the tests that ran any line the diff changes or removes.
//!
//! It must be safe to use in CI, so it says when it cannot know (`ImpactState::Unknown`: run
//! everything) rather than guess:
//! - the base run names no tests, or is not complete;
//! - a changed file looks like code the run measures (its extension is one of the run's) but
//!   the run does not hold it: no test can be known to cover it (a new module, an omitted one);
//! - a changed line ran outside any test (coverage.py's static context alone: import time,
//!   collection): every test that imports the file may depend on it.
//!
//! Lines looked at in a file the run holds: the lines the diff removed or replaced, and for
//! each block of inserted lines the nearest measured line before and after it (the code the
//! new lines run between). A deleted, renamed or binary file takes every test that covered any
//! of its lines.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use roaring::RoaringBitmap;

use super::{CoverageService, Result};
use crate::aggregate::Aggregate;
use crate::diff::{ChangeKind, FileChange};
use crate::model::path::{Found, PathFilter};

/// What a test impact answer says as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImpactState {
    /// Run `tests`: they are every test the change can affect.
    Selected,
    /// No test covers the change: nothing needs to run (a change of comments, docs, data the
    /// run does not measure). Its own state, so that CI does not read it as a green run.
    Empty,
    /// covd cannot tell: run everything (`unknown` says why).
    Unknown,
}

/// A test the change affects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectedTest {
    pub name: Arc<str>,
    /// The base run never saw it: it is new in the head commit (from the collected tests).
    pub new: bool,
    /// Why: per file of the base run, the looked-at lines it covered.
    pub lines: Vec<(Arc<str>, RoaringBitmap)>,
}

/// One changed file, as the base run knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImpactFile {
    /// The path in the base run.
    pub path: Arc<str>,
    /// The path after the change (`None`: deleted).
    pub new_path: Option<String>,
    pub change: ChangeKind,
    /// The lines looked at (see the module's documentation).
    pub lines: RoaringBitmap,
    /// Of those, measured lines no test covered.
    pub uncovered: RoaringBitmap,
    /// How many tests cover `lines`.
    pub tests: usize,
}

/// The answer to "which tests must run for this diff".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestImpact {
    pub state: ImpactState,
    /// Sorted by name.
    pub tests: Vec<SelectedTest>,
    /// Why the answer is unknown (empty unless `state` is `Unknown`).
    pub unknown: Vec<String>,
    /// The changed files the base run holds.
    pub files: Vec<ImpactFile>,
    /// Changed files that are not code the run measures (docs, configuration, images).
    pub ignored: Vec<String>,
    /// Selected tests the head commit no longer has (with collected tests only): left out.
    pub gone: Vec<Arc<str>>,
}

impl CoverageService {
    /// The tests of `run_id` that the change `diff` affects. `collected`: the tests the head
    /// commit has (a test runner's collection), when known: new ones are selected, vanished
    /// ones left out.
    pub async fn test_impact(
        &self,
        run_id: &str,
        diff: Vec<FileChange>,
        collected: Option<Vec<String>>,
    ) -> Result<TestImpact> {
        let status = self.run_status(run_id)?;
        let mut answer = self
            .read(run_id, "tests", move |aggregate| impact(aggregate, &diff))
            .await?;
        if !status.complete {
            let why = if status.expectations_declared {
                format!("missing shards: {}", status.missing_shards.join(", "))
            } else {
                "it declared no shards (`covd open --shards N`)".to_owned()
            };
            answer.unknown.insert(
                0,
                format!("run {run_id} is not complete ({why}): not every test may have reported"),
            );
        }
        if let Some(collected) = collected {
            let known: HashSet<&str> = collected.iter().map(String::as_str).collect();
            let (kept, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut answer.tests)
                .into_iter()
                .partition(|t| known.contains(&*t.name));
            answer.tests = kept;
            answer.gone = gone.into_iter().map(|t| t.name).collect();
            let seen = self.tests(run_id).await?;
            let seen: HashSet<&str> = seen.iter().map(|t| &**t).collect();
            let new: BTreeSet<&str> = collected
                .iter()
                .map(String::as_str)
                .filter(|t| !seen.contains(t))
                .collect();
            answer
                .tests
                .extend(new.into_iter().map(|name| SelectedTest {
                    name: name.into(),
                    new: true,
                    lines: Vec::new(),
                }));
            answer.tests.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        }
        answer.state = if !answer.unknown.is_empty() {
            ImpactState::Unknown
        } else if answer.tests.is_empty() {
            ImpactState::Empty
        } else {
            ImpactState::Selected
        };
        Ok(answer)
    }
}

/// The impact of `diff` on the tests of `aggregate` (its state is set by the caller).
fn impact(aggregate: &Aggregate, diff: &[FileChange]) -> TestImpact {
    let mut answer = TestImpact {
        state: ImpactState::Unknown,
        tests: Vec::new(),
        unknown: Vec::new(),
        files: Vec::new(),
        ignored: Vec::new(),
        gone: Vec::new(),
    };
    if aggregate.test_count() == 0 {
        answer
            .unknown
            .push("the run names no tests: push per-test coverage (coverage.py contexts, LCOV TN:, or a delta per test)".into());
        return answer;
    }
    let code = std::cell::OnceCell::new();
    let code = || code.get_or_init(|| code_extensions(aggregate));
    let mut selected: BTreeMap<Arc<str>, Vec<(Arc<str>, RoaringBitmap)>> = BTreeMap::new();

    for change in diff {
        // A copy leaves its source as it was: only the copy is new.
        let old = match change.kind {
            ChangeKind::Added | ChangeKind::Copied => None,
            _ => change.old_path.as_deref(),
        };
        let found = old.map_or(Found::None, |p| aggregate.find_path(p));
        if let Found::Several(candidates) = &found {
            answer.unknown.push(format!(
                "{} matches several files of the run ({}): no test can be told to cover it; \
                 make the run's paths the repository's (`covd push --root`, path rules) or \
                 strip the diff's prefix with -p",
                change.path(),
                candidates.join(", ")
            ));
            continue;
        }
        let Found::One(path) = found else {
            let shown = change.path();
            if is_code(shown, code()) || old.is_some_and(|p| is_code(p, code())) {
                answer.unknown.push(format!(
                    "{shown} ({}) is code the run does not measure: no test is known to cover it",
                    change.kind.as_str()
                ));
            } else {
                answer.ignored.push(shown.to_owned());
            }
            continue;
        };
        let measured = aggregate.file_lines(&path).unwrap_or_default().0;
        let whole =
            change.binary || matches!(change.kind, ChangeKind::Deleted | ChangeKind::Renamed);
        let lines = if whole {
            measured.clone()
        } else {
            looked_at(change, &measured)
        };
        let tests = aggregate.attribution_of(&path, &lines);
        let mut covered = RoaringBitmap::new();
        let mut outside: Vec<Arc<str>> = Vec::new();
        let mut outside_lines = RoaringBitmap::new();
        let mut count = 0;
        for (name, test_lines) in tests {
            covered |= &test_lines;
            if aggregate.runs_outside_tests(&name) {
                outside_lines |= &test_lines;
                outside.push(name);
                continue;
            }
            count += 1;
            selected
                .entry(name)
                .or_default()
                .push((path.clone(), test_lines));
        }
        // Lines covered by a shard that named no tests: no selection can know what ran them.
        let ran = aggregate.file_lines(&path).unwrap_or_default().1;
        if let Some(line) = (&(&ran & &lines) - &covered).min() {
            answer.unknown.push(format!(
                "{path}:{line} was covered by coverage that names no test (a shard pushed \
                 without per-test attribution)"
            ));
        }
        if let Some(first) = outside_lines.min() {
            outside.sort_unstable();
            answer.unknown.push(format!(
                "{path}:{first} ran outside any test (at import or collection: {}): every test \
                 that uses the file may depend on it",
                outside.join(", ")
            ));
        }
        answer.files.push(ImpactFile {
            path: path.clone(),
            new_path: change.new_path.clone(),
            change: change.kind,
            uncovered: &(&lines & &measured) - &covered,
            lines,
            tests: count,
        });
    }
    answer.tests = selected
        .into_iter()
        .map(|(name, mut lines)| {
            lines.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            SelectedTest {
                name,
                new: false,
                lines,
            }
        })
        .collect();
    answer
}

/// The removed lines, and the nearest measured line on each side of every block of removed
/// lines and of every insertion: a change between measured lines (inside a statement that
/// spans lines, or between two statements) affects the code around it.
fn looked_at(change: &FileChange, measured: &RoaringBitmap) -> RoaringBitmap {
    let mut lines = change.removed.clone();
    // The nearest measured line at or before `line`, and the nearest after `after`.
    let around = |lines: &mut RoaringBitmap, line: u32, after: u32| {
        let rank = measured.rank(line);
        if rank > 0 {
            lines.extend(measured.select((rank - 1) as u32));
        }
        lines.extend(measured.select(measured.rank(after) as u32));
    };
    let mut removed = change.removed.iter().peekable();
    while let Some(first) = removed.next() {
        let mut last = first;
        while removed.next_if(|l| *l == last + 1).is_some() {
            last += 1;
        }
        around(&mut lines, first - 1, last);
    }
    for &before in &change.insertions {
        around(&mut lines, before, before);
    }
    lines
}

/// The extensions of the files the run measures (`py`, `rs`): a changed file with one of them
/// is code the run would measure. Asked for only when a changed file is not in the run: it
/// reads every path.
pub(super) fn code_extensions(aggregate: &Aggregate) -> HashSet<String> {
    aggregate
        .paths(&PathFilter::default())
        .iter()
        .filter_map(|p| extension(p))
        .collect()
}

pub(super) fn is_code(path: &str, code: &HashSet<String>) -> bool {
    extension(path).is_some_and(|e| code.contains(&e))
}

fn extension(path: &str) -> Option<String> {
    let name = path.rsplit('/').next()?;
    let (stem, ext) = name.rsplit_once('.')?;
    (!stem.is_empty() && !ext.is_empty()).then(|| ext.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insertions_look_at_the_measured_lines_around_them() {
        let measured: RoaringBitmap = [3, 4, 8, 12].into_iter().collect();
        let change = FileChange {
            kind: ChangeKind::Modified,
            old_path: Some("a.py".into()),
            new_path: Some("a.py".into()),
            binary: false,
            removed: [9].into_iter().collect(),
            added: RoaringBitmap::new(),
            // At the start, after line 4, after line 6 (between 4 and 8), past the end.
            insertions: vec![0, 4, 6, 20],
        };
        let got: Vec<u32> = looked_at(&change, &measured).iter().collect();
        assert_eq!(got, [3, 4, 8, 9, 12]);
        // Removed lines the run did not measure (the middle of a statement) look at the
        // measured lines around them; removed measured ones at their neighbours too.
        let change = FileChange {
            removed: [5, 6, 7].into_iter().collect(),
            insertions: vec![],
            ..change
        };
        let measured: RoaringBitmap = [3, 4, 8, 12].into_iter().collect();
        let got: Vec<u32> = looked_at(&change, &measured).iter().collect();
        assert_eq!(got, [4, 5, 6, 7, 8]);
    }

    #[test]
    fn code_is_known_by_its_extension() {
        let code: HashSet<String> = ["py".to_owned()].into();
        assert!(is_code("src/New.PY", &code));
        assert!(!is_code("README.md", &code));
        assert!(!is_code("Makefile", &code));
        assert!(!is_code(".py", &code));
    }
}
