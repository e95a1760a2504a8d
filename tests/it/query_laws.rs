//! Laws of the per-test answers, on random runs pushed through the service: set algebra equals
//! a model of plain sets and obeys the laws of sets, and test impact over a real diff equals
//! the union of the per-line answers for the lines it looked at.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use covd::diff;
use covd::model::{FileBatch, FileBuilder, FileCoverage};
use covd::service::{CoverageService, Delta, ImpactState, Limits, LineSet, RunParams, ShardHeader};
use proptest::prelude::*;
use roaring::RoaringBitmap;

const RUNS: usize = 3;
const TESTS: usize = 4;
const PATHS: [&str; 2] = ["a.py", "b.py"];
const LINES: u32 = 20;

/// One test of a run: per file, the lines it ran (1) and the lines it listed unrun (0).
type TestCoverage = BTreeMap<&'static str, BTreeMap<u32, u64>>;

/// A run: its tests, `t0` to `t3`, each pushed as a delta of its own.
type Run = Vec<TestCoverage>;

fn run_strategy() -> impl Strategy<Value = Run> {
    let file = prop::collection::btree_map(1..=LINES, 0u64..2, 0..8);
    let test = prop::collection::btree_map(prop::sample::select(PATHS.to_vec()), file, 0..3);
    prop::collection::vec(test, TESTS)
}

fn test_name(t: usize) -> String {
    format!("t{t}")
}

type Lines = BTreeMap<String, BTreeSet<u32>>;

fn add(into: &mut Lines, path: &str, lines: impl IntoIterator<Item = u32>) {
    into.entry(path.to_owned()).or_default().extend(lines);
}

/// What each leaf holds, read off the generated runs.
struct Model {
    runs: Vec<Run>,
}

impl Model {
    fn leaf(&self, leaf: &LineSet) -> Lines {
        let run = |r: &str| &self.runs[r[1..].parse::<usize>().unwrap()];
        let test_lines = |test: &TestCoverage, out: &mut Lines, all: bool| {
            for (path, lines) in test {
                add(
                    out,
                    path,
                    lines
                        .iter()
                        .filter(|(_, h)| all || **h > 0)
                        .map(|(l, _)| *l),
                );
            }
        };
        let mut out = Lines::new();
        match leaf {
            LineSet::Covered(r) | LineSet::Tests(r) => {
                for test in run(r) {
                    test_lines(test, &mut out, false);
                }
            }
            LineSet::Measured(r) => {
                for test in run(r) {
                    test_lines(test, &mut out, true);
                }
            }
            LineSet::Test { run: r, test } => {
                test_lines(
                    &run(r)[test[1..].parse::<usize>().unwrap()],
                    &mut out,
                    false,
                );
            }
            LineSet::TestsExcept { run: r, test } => {
                for (t, coverage) in run(r).iter().enumerate() {
                    if test_name(t) != *test {
                        test_lines(coverage, &mut out, false);
                    }
                }
            }
            _ => unreachable!("a leaf"),
        }
        out.retain(|_, l| !l.is_empty());
        out
    }

    fn eval(&self, set: &LineSet) -> Lines {
        let (a, b) = match set {
            LineSet::Union(a, b) | LineSet::Intersection(a, b) | LineSet::Difference(a, b) => {
                (self.eval(a), self.eval(b))
            }
            leaf => return self.leaf(leaf),
        };
        let mut out = Lines::new();
        for path in PATHS {
            let none = BTreeSet::new();
            let (x, y) = (a.get(path).unwrap_or(&none), b.get(path).unwrap_or(&none));
            let lines: BTreeSet<u32> = match set {
                LineSet::Union(..) => x.union(y).copied().collect(),
                LineSet::Intersection(..) => x.intersection(y).copied().collect(),
                _ => x.difference(y).copied().collect(),
            };
            if !lines.is_empty() {
                out.insert(path.to_owned(), lines);
            }
        }
        out
    }
}

fn leaf_strategy() -> impl Strategy<Value = LineSet> {
    let run = (0..RUNS).prop_map(|r| format!("r{r}"));
    let test = (0..TESTS).prop_map(test_name);
    prop_oneof![
        run.clone().prop_map(LineSet::Covered),
        run.clone().prop_map(LineSet::Measured),
        run.clone().prop_map(LineSet::Tests),
        (run.clone(), test.clone()).prop_map(|(run, test)| LineSet::Test { run, test }),
        (run, test).prop_map(|(run, test)| LineSet::TestsExcept { run, test }),
    ]
}

fn set_strategy() -> impl Strategy<Value = LineSet> {
    leaf_strategy().prop_recursive(3, 12, 2, |inner| {
        (0..3u8, inner.clone(), inner).prop_map(|(op, a, b)| {
            let (a, b) = (Box::new(a), Box::new(b));
            match op {
                0 => LineSet::Union(a, b),
                1 => LineSet::Intersection(a, b),
                _ => LineSet::Difference(a, b),
            }
        })
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn file_of(lines: &BTreeMap<u32, u64>) -> FileCoverage {
    let mut b = FileBuilder::new();
    for (l, h) in lines {
        b.line(*l, *h);
    }
    b.build()
}

/// Pushes `run` as run `id`, one shard that declares itself, a delta per test.
async fn push(service: &CoverageService, id: &str, run: &Run) {
    let params = RunParams {
        expected_shards: vec!["1".into()],
        ..RunParams::default()
    };
    service.open_run(id, params.clone()).await.unwrap();
    let session = service
        .begin_shard(ShardHeader {
            run_id: id.into(),
            shard_id: "1".into(),
            attempt: 1,
            params,
            session: Vec::new(),
        })
        .await
        .unwrap();
    for (t, test) in run.iter().enumerate() {
        let files: Vec<(String, FileCoverage)> = test
            .iter()
            .map(|(path, lines)| ((*path).to_owned(), file_of(lines)))
            .collect();
        let mut batch = FileBatch::of_files(&files);
        batch.set_test(Arc::from(test_name(t).as_str()));
        let delta = Delta {
            seq: t as u64 + 1,
            files: batch,
            ..Delta::default()
        };
        service.apply(&session, delta).await.unwrap();
    }
    let status = service
        .finish(&session, run.len() as u64, None)
        .await
        .unwrap();
    assert!(status.complete);
}

async fn lines_of(service: &CoverageService, set: &LineSet) -> Lines {
    service
        .line_set(set.clone(), "")
        .await
        .unwrap()
        .into_iter()
        .map(|(p, l)| (p.to_string(), l.iter().collect()))
        .collect()
}

fn union(a: &LineSet, b: &LineSet) -> LineSet {
    LineSet::Union(Box::new(a.clone()), Box::new(b.clone()))
}

fn intersection(a: &LineSet, b: &LineSet) -> LineSet {
    LineSet::Intersection(Box::new(a.clone()), Box::new(b.clone()))
}

fn difference(a: &LineSet, b: &LineSet) -> LineSet {
    LineSet::Difference(Box::new(a.clone()), Box::new(b.clone()))
}

fn set_algebra_equals_sets(runs: Vec<Run>, x: LineSet, y: LineSet, z: LineSet) {
    runtime().block_on(async {
        let service = CoverageService::new(Limits::default());
        for (r, run) in runs.iter().enumerate() {
            push(&service, &format!("r{r}"), run).await;
        }
        let model = Model { runs };
        for set in [&x, &y, &z] {
            assert_eq!(lines_of(&service, set).await, model.eval(set), "{set:?}");
        }
        // The laws, each side asked of covd.
        let laws = [
            (union(&x, &y), union(&y, &x)),
            (intersection(&x, &y), intersection(&y, &x)),
            (union(&union(&x, &y), &z), union(&x, &union(&y, &z))),
            (
                intersection(&x, &union(&y, &z)),
                union(&intersection(&x, &y), &intersection(&x, &z)),
            ),
            (
                difference(&x, &union(&y, &z)),
                difference(&difference(&x, &y), &z),
            ),
            (union(&difference(&x, &y), &intersection(&x, &y)), x.clone()),
            (intersection(&difference(&x, &y), &y), difference(&x, &x)),
            (union(&x, &x), intersection(&x, &x)),
        ];
        for (left, right) in laws {
            assert_eq!(
                lines_of(&service, &left).await,
                lines_of(&service, &right).await,
                "{left:?} against {right:?}"
            );
        }
        assert!(lines_of(&service, &difference(&x, &x)).await.is_empty());
    });
}

/// A file's text: `LINES` lines, each its own.
fn source(path: &str) -> String {
    (1..=LINES).map(|l| format!("{path} line {l}\n")).collect()
}

/// An edit of one file: at old line `at`, remove `remove` lines and insert `insert` new ones.
type Edit = (u32, u32, u32);

/// The old text with `edits` made (later edits first, so that each `at` is an old line; an
/// edit that reaches into a later one is cut short).
fn edited(path: &str, edits: &[Edit]) -> String {
    let mut lines: Vec<String> = (1..=LINES).map(|l| format!("{path} line {l}")).collect();
    let mut edits = edits.to_vec();
    edits.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
    // The first old line a later edit touched.
    let mut end = LINES + 1;
    for (at, remove, insert) in edits {
        if at > end {
            continue;
        }
        let start = (at - 1) as usize;
        let stop = start + remove.min(end - at) as usize;
        lines.splice(
            start..stop,
            (0..insert).map(|i| format!("{path} new {at}.{i}")),
        );
        end = at;
    }
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// A git diff of `path` from its old text to `new` (`None`: the file is deleted).
fn git_diff(path: &str, new: Option<&str>) -> String {
    let old = source(path);
    let patch = diffy::create_patch(&old, new.unwrap_or("")).to_string();
    let hunks: String = patch.lines().skip(2).map(|l| format!("{l}\n")).collect();
    if hunks.is_empty() {
        return String::new();
    }
    match new {
        Some(_) => format!("diff --git a/{path} b/{path}\n--- a/{path}\n+++ b/{path}\n{hunks}"),
        None => format!(
            "diff --git a/{path} b/{path}\ndeleted file mode 100644\n--- a/{path}\n+++ /dev/null\n{hunks}"
        ),
    }
}

fn impact_is_the_union_of_per_line_answers(run: Run, edits: Vec<Edit>, delete_b: bool) {
    let text = git_diff("a.py", Some(&edited("a.py", &edits)))
        + &git_diff(
            "b.py",
            (!delete_b).then(|| edited("b.py", &edits[..1])).as_deref(),
        );
    let changes = diff::parse(text.as_bytes(), None).unwrap();
    runtime().block_on(async {
        let service = CoverageService::new(Limits::default());
        push(&service, "r0", &run).await;
        let answer = service
            .test_impact("r0", changes.clone(), None)
            .await
            .unwrap();
        // A changed code file the run does not hold makes the answer unknown, and only that
        // (code: a file with the extension of one the run holds).
        let held = |path: &str| run.iter().any(|t| t.contains_key(path));
        let all_held = !PATHS.iter().any(|p| held(p))
            || changes.iter().all(|c| held(c.old_path.as_deref().unwrap()));
        assert_eq!(answer.unknown.is_empty(), all_held, "{:?}", answer.unknown);

        // Ask for each looked-at line alone; the union must be the selection, and each
        // test's reasons the looked-at lines whose answer names it.
        let mut want = crate::impact::Reasons::new();
        for file in &answer.files {
            for line in &file.lines {
                let one: RoaringBitmap = std::iter::once(line).collect();
                let asked = vec![(file.path.to_string(), Some(one))];
                for test in service.tests_for_lines("r0", asked).await.unwrap().tests {
                    want.entry(test.to_string())
                        .or_default()
                        .entry(file.path.to_string())
                        .or_default()
                        .insert(line);
                }
            }
        }
        let got = crate::impact::reasons(&answer);
        assert_eq!(got, want, "diff:\n{text}");
        let state = if !all_held {
            ImpactState::Unknown
        } else if want.is_empty() {
            ImpactState::Empty
        } else {
            ImpactState::Selected
        };
        assert_eq!(answer.state, state);

        // The lines the diff removes or replaces are always looked at; a deleted file's
        // measured lines all are.
        let measured = |path: &str| -> RoaringBitmap {
            run.iter()
                .filter_map(|t| t.get(path))
                .flat_map(|lines| lines.keys().copied())
                .collect()
        };
        for change in &changes {
            let path = change.old_path.as_deref().unwrap();
            let Some(file) = answer.files.iter().find(|f| &*f.path == path) else {
                assert!(!held(path), "{path} is held but not looked at");
                continue;
            };
            if change.new_path.is_none() {
                assert_eq!(file.lines, measured(path));
            } else {
                assert!(change.removed.is_subset(&file.lines), "{path}: {text}");
            }
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Set expressions over runs, tests and all but one test equal the same expression over
    /// plain sets, and obey the laws of sets.
    #[test]
    fn set_algebra_equals_plain_sets_and_obeys_their_laws(
        runs in prop::collection::vec(run_strategy(), RUNS),
        x in set_strategy(),
        y in set_strategy(),
        z in set_strategy(),
    ) {
        set_algebra_equals_sets(runs, x, y, z);
    }

    /// `tests-for` over a diff (edits anywhere, at a file's start and end, a deleted file)
    /// selects exactly the union of the tests of each line it looked at, with those lines as
    /// each test's reasons.
    #[test]
    fn test_impact_is_the_union_of_per_line_answers(
        run in run_strategy(),
        edits in prop::collection::vec((1..=LINES + 1, 0u32..4, 0u32..3), 1..4),
        delete_b in any::<bool>(),
    ) {
        impact_is_the_union_of_per_line_answers(run, edits, delete_b);
    }
}
