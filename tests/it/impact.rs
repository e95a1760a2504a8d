//! Test impact: the tests a diff affects. The diffs are written by real git in a scratch
//! repository whose files have the toolz corpus's paths and lengths; the tests each line ran
//! come from coverage.py's own merged contexts (`merged.json`), read with serde.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};

use covd::client::{Client, ClientError};
use covd::diff::ChangeKind;
use covd::service::{ImpactState, RunParams, TestImpact};
use tonic::Code;

use crate::attribution::{lines, merged_contexts, merged_measured, push_tests, push_toolz};
use crate::cli::COVD;
use crate::support::*;

/// A git repository holding a file of numbered lines for each path, committed.
pub(crate) struct Repo {
    dir: tempfile::TempDir,
}

impl Repo {
    pub(crate) fn new(files: impl IntoIterator<Item = (String, u32)>) -> Repo {
        let repo = Repo {
            dir: tempfile::tempdir().unwrap(),
        };
        repo.git(&["init", "-q"]);
        for (path, n) in files {
            let text: String = (1..=n).map(|i| format!("{path} line {i}\n")).collect();
            repo.write(&path, &text);
        }
        repo.git(&["add", "-A"]);
        repo.git(&["commit", "-qm", "base"]);
        repo
    }

    pub(crate) fn git(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new("git")
            .args(["-c", "user.name=covd", "-c", "user.email=covd@localhost"])
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("git runs");
        assert!(out.status.success(), "git {args:?}: {out:?}");
        out.stdout
    }

    pub(crate) fn write(&self, path: &str, text: &str) {
        let full = self.dir.path().join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, text).unwrap();
    }

    pub(crate) fn lines(&self, path: &str) -> Vec<String> {
        let text = std::fs::read_to_string(self.dir.path().join(path)).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    pub(crate) fn set_lines(&self, path: &str, lines: &[String]) {
        self.write(path, &(lines.join("\n") + "\n"));
    }

    /// Replaces line `n` of `path`.
    pub(crate) fn replace(&self, path: &str, n: u32, with: &str) {
        let mut l = self.lines(path);
        l[n as usize - 1] = with.to_owned();
        self.set_lines(path, &l);
    }

    /// Inserts a line after line `n` of `path`.
    pub(crate) fn insert_after(&self, path: &str, n: u32, text: &str) {
        let mut l = self.lines(path);
        l.insert(n as usize, text.to_owned());
        self.set_lines(path, &l);
    }

    pub(crate) fn remove(&self, path: &str, n: u32) {
        let mut l = self.lines(path);
        l.remove(n as usize - 1);
        self.set_lines(path, &l);
    }

    /// `git diff -M` of everything changed since the commit, and back to the commit.
    pub(crate) fn diff(&self) -> Vec<u8> {
        self.git(&["add", "-A"]);
        let diff = self.git(&["diff", "--cached", "-M", "HEAD"]);
        self.git(&["reset", "-q", "--hard"]);
        self.git(&["clean", "-qfd"]);
        diff
    }

    /// Commits everything as it is now.
    pub(crate) fn commit(&self, message: &str) {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-qm", message]);
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// The toolz files as they were (same paths, as many lines), and a README.
pub(crate) fn toolz_repo() -> Repo {
    let files = merged_measured().iter().map(|(path, lines)| {
        let last = lines.iter().max().copied().unwrap_or(0);
        (path.clone(), last + 3)
    });
    let repo = Repo::new(files.chain([("README.rst".to_owned(), 5)]));
    assert!(repo.path().join("toolz/itertoolz.py").exists());
    repo
}

/// The toolz run, with its four shards declared so that it can be complete.
pub(crate) async fn toolz_run(client: &mut Client, run: &str) {
    let params = RunParams {
        expected_shards: ["1", "2", "3", "4"].map(String::from).to_vec(),
        ..RunParams::default()
    };
    client.open_run(run, params).await.unwrap();
    push_toolz(client, run).await;
}

/// Labels coverage.py wrote for a line: `shard1|mod.test_x` is a test; `shard1` alone ran
/// outside any test.
pub(crate) fn labels(path: &str, line: u32) -> BTreeSet<String> {
    merged_contexts()[path]
        .get(&line)
        .cloned()
        .unwrap_or_default()
}

fn only_tests(path: &str, line: u32) -> bool {
    let l = labels(path, line);
    !l.is_empty() && l.iter().all(|t| t.contains('|'))
}

/// The measured line before `line`.
fn measured_before(path: &str, line: u32) -> Option<u32> {
    merged_measured()[path].range(..line).next_back().copied()
}

fn measured_after(path: &str, line: u32) -> Option<u32> {
    merged_measured()[path].range(line + 1..).next().copied()
}

/// The first line of `path` for which `pick` holds.
fn first_line(path: &str, pick: impl Fn(u32) -> bool) -> u32 {
    let last = *merged_measured()[path].iter().max().unwrap();
    (1..=last)
        .find(|l| pick(*l))
        .unwrap_or_else(|| panic!("no such line in {path}"))
}

pub(crate) type Reasons = BTreeMap<String, BTreeMap<String, BTreeSet<u32>>>;

/// Per test, per file, the lines it is selected for.
pub(crate) fn reasons(answer: &TestImpact) -> Reasons {
    answer
        .tests
        .iter()
        .map(|t| {
            let files = t
                .lines
                .iter()
                .map(|(p, l)| (p.to_string(), l.iter().collect()))
                .collect();
            (t.name.to_string(), files)
        })
        .collect()
}

/// What the contexts say each test ran among `lines` of `path`, added to `want`.
fn expect(want: &mut Reasons, path: &str, lines: &[u32]) {
    for &line in lines {
        for test in labels(path, line) {
            let files = want.entry(test).or_default();
            files.entry(path.to_owned()).or_default().insert(line);
        }
    }
}

/// A replaced line and an inserted one select the tests coverage.py saw run the replaced
/// line and the measured lines around each change, with those lines as reasons; a README
/// changed beside them is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_lines_select_the_tests_that_ran_them() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    toolz_run(&mut client, "base").await;
    let repo = toolz_repo();

    // A body line run by tests only, whose measured line before is too, with other tests.
    let a = "toolz/itertoolz.py";
    let replaced = first_line(a, |l| {
        only_tests(a, l)
            && measured_before(a, l)
                .is_some_and(|b| only_tests(a, b) && labels(a, b) != labels(a, l))
            && measured_after(a, l).is_some_and(|n| only_tests(a, n))
    });
    let before_replaced = measured_before(a, replaced).unwrap();
    let after_replaced = measured_after(a, replaced).unwrap();
    // A line inserted after a line run by tests, the next measured line run by tests.
    let b = "toolz/functoolz.py";
    let after = first_line(b, |l| {
        only_tests(b, l) && measured_after(b, l).is_some_and(|n| only_tests(b, n))
    });
    let next = measured_after(b, after).unwrap();
    repo.replace(a, replaced, "    return changed(seq)");
    repo.insert_after(b, after, "    log(args)");
    repo.replace("README.rst", 2, "Better docs.");
    let answer = client
        .test_impact("base", repo.diff(), None, None)
        .await
        .unwrap();

    let mut want = Reasons::new();
    expect(&mut want, a, &[before_replaced, replaced, after_replaced]);
    expect(&mut want, b, &[after, next]);
    assert!(want.len() >= 2, "{want:?}");
    assert_eq!(answer.state, ImpactState::Selected, "{:?}", answer.unknown);
    assert_eq!(reasons(&answer), want);
    assert!(answer.tests.iter().all(|t| !t.new));
    assert_eq!(answer.ignored, ["README.rst"]);
    let files: Vec<(&str, ChangeKind, Vec<u32>)> = answer
        .files
        .iter()
        .map(|f| (&*f.path, f.change, f.lines.iter().collect()))
        .collect();
    assert_eq!(
        files,
        [
            (b, ChangeKind::Modified, vec![after, next]),
            (
                a,
                ChangeKind::Modified,
                vec![before_replaced, replaced, after_replaced]
            ),
        ]
    );
    assert!(answer.files.iter().all(|f| f.uncovered.is_empty()));
}

/// Nothing any test ran: a removed line coverage.py did not measure (a comment, a blank), a
/// removed line no test ran (reported as uncovered), a README. Empty, not a selection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_no_test_ran_is_an_empty_answer() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    toolz_run(&mut client, "base").await;
    let repo = toolz_repo();

    // A line no test ran, between measured lines no test ran either: one coverage.py did not
    // measure (in file `a`), and one it measured (in file `b`).
    let quiet = |p: &str, l: u32| labels(p, l).is_empty();
    let between_quiet = |p: &str, l: u32| {
        measured_before(p, l).is_some_and(|b| quiet(p, b))
            && measured_after(p, l).is_some_and(|n| quiet(p, n))
    };
    let find = |measured: bool| {
        merged_measured()
            .iter()
            .find_map(|(p, lines)| {
                let last = *lines.iter().max()?;
                (2..last)
                    .find(|l| lines.contains(l) == measured && quiet(p, *l) && between_quiet(p, *l))
                    .map(|l| (p.as_str(), l))
            })
            .unwrap()
    };
    let (a, unmeasured) = find(false);
    let (b, missed) = find(true);
    repo.remove(a, unmeasured);
    repo.remove(b, missed);
    repo.replace("README.rst", 1, "Title");
    let answer = client
        .test_impact("base", repo.diff(), None, None)
        .await
        .unwrap();
    assert_eq!(answer.state, ImpactState::Empty, "{answer:?}");
    assert!(answer.tests.is_empty() && answer.unknown.is_empty());
    let uncovered: Vec<(&str, Vec<u32>)> = answer
        .files
        .iter()
        .map(|f| (&*f.path, f.uncovered.iter().collect()))
        .collect();
    let mut want = vec![
        (
            a,
            vec![
                measured_before(a, unmeasured).unwrap(),
                measured_after(a, unmeasured).unwrap(),
            ],
        ),
        (
            b,
            vec![
                measured_before(b, missed).unwrap(),
                missed,
                measured_after(b, missed).unwrap(),
            ],
        ),
    ];
    if a == b {
        // One file: its two changes in one entry.
        let mut lines: Vec<u32> = want.iter().flat_map(|(_, l)| l.clone()).collect();
        lines.sort_unstable();
        lines.dedup();
        want = vec![(a, lines)];
    }
    assert_eq!(uncovered, want);
}

/// covd says it cannot tell, and why: a line that ran only at import (coverage.py's static
/// context alone), a new module, a module the run does not measure, a base run that is not
/// complete or names no tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_covd_cannot_know_makes_the_answer_unknown() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    toolz_run(&mut client, "base").await;
    let repo = toolz_repo();

    let a = "toolz/dicttoolz.py";
    let import_time = first_line(a, |l| {
        let l = labels(a, l);
        !l.is_empty() && l.iter().all(|t| !t.contains('|'))
    });
    repo.replace(a, import_time, "import sys");
    let answer = client
        .test_impact("base", repo.diff(), None, None)
        .await
        .unwrap();
    assert_eq!(answer.state, ImpactState::Unknown);
    assert_eq!(answer.unknown.len(), 1, "{:?}", answer.unknown);
    let why = &answer.unknown[0];
    assert!(
        why.starts_with(&format!("{a}:{import_time} ran outside any test"))
            && why.contains("shard1"),
        "{why}"
    );

    repo.write("toolz/newmod.py", "def f():\n    return 1\n");
    let answer = client
        .test_impact("base", repo.diff(), None, None)
        .await
        .unwrap();
    assert_eq!(answer.state, ImpactState::Unknown);
    assert_eq!(
        answer.unknown,
        ["toolz/newmod.py (added) is code the run does not measure: no test is known to cover it"]
    );

    // compatibility.py is omitted from measurement: its change could affect anything.
    repo.write("toolz/compatibility.py", "X = 1\n");
    repo.git(&["add", "-A"]);
    repo.git(&["commit", "-qm", "omitted module"]);
    repo.write("toolz/compatibility.py", "X = 2\n");
    let answer = client
        .test_impact("base", repo.diff(), None, None)
        .await
        .unwrap();
    assert_eq!(answer.state, ImpactState::Unknown);
    assert!(answer.unknown[0].starts_with("toolz/compatibility.py (modified)"));

    // Two of four declared shards: not every test has reported.
    let params = RunParams {
        expected_shards: ["1", "2", "3", "4"].map(String::from).to_vec(),
        ..RunParams::default()
    };
    client.open_run("half", params).await.unwrap();
    for i in 1..=2 {
        let shard = crate::corpus::read_json(
            &format!("python-toolz/same-path/shard{i}.json.gz"),
            &Default::default(),
        );
        push(&mut client, "half", &i.to_string(), 1, shard).await;
    }
    repo.replace("README.rst", 1, "Title");
    let answer = client
        .test_impact("half", repo.diff(), None, None)
        .await
        .unwrap();
    assert_eq!(answer.state, ImpactState::Unknown);
    assert_eq!(
        answer.unknown,
        ["run half is not complete (missing shards: 3, 4): not every test may have reported"]
    );

    // Coverage without test names cannot select anything.
    let mut plain = covd::model::Coverage::default();
    plain.add("toolz/itertoolz.py", &lines(&[1, 2], &[3]));
    client
        .open_run(
            "plain",
            RunParams {
                expected_shards: vec!["1".into()],
                ..RunParams::default()
            },
        )
        .await
        .unwrap();
    push(&mut client, "plain", "1", 1, plain).await;
    repo.replace("toolz/itertoolz.py", 2, "x = 2");
    let answer = client
        .test_impact("plain", repo.diff(), None, None)
        .await
        .unwrap();
    assert_eq!(answer.state, ImpactState::Unknown);
    assert!(
        answer.unknown[0].starts_with("the run names no tests"),
        "{:?}",
        answer.unknown
    );
}

/// One delta per test (no import-time labels): a renamed file and a deleted one take every
/// test that ran any of their lines; a binary image is not code. With the head commit's
/// collected tests, a new test is selected and a vanished one left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_and_deleted_files_take_all_their_tests() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    let params = RunParams {
        expected_shards: vec!["1".into()],
        ..RunParams::default()
    };
    client.open_run("base", params).await.unwrap();
    let tests = vec![
        ("t1", vec![("src/a.py", lines(&[1, 2, 3], &[4]))]),
        ("t2", vec![("src/a.py", lines(&[5, 6], &[4]))]),
        ("t3", vec![("src/b.py", lines(&[1, 2], &[]))]),
        ("t4", vec![("src/c.py", lines(&[1], &[]))]),
    ];
    push_tests(&mut client, "base", "1", tests).await.unwrap();

    let repo = Repo::new([
        ("src/a.py".to_owned(), 12),
        ("src/b.py".to_owned(), 4),
        ("src/c.py".to_owned(), 4),
    ]);
    repo.write("logo.png", "\u{0}\u{1}");
    repo.git(&["add", "-A"]);
    repo.git(&["commit", "-qm", "logo"]);
    repo.git(&["mv", "src/a.py", "src/renamed.py"]);
    repo.git(&["rm", "-q", "src/b.py"]);
    repo.write("logo.png", "\u{0}\u{2}");
    let diff = repo.diff();
    let answer = client
        .test_impact("base", diff.clone(), None, None)
        .await
        .unwrap();
    assert_eq!(answer.state, ImpactState::Selected, "{:?}", answer.unknown);
    let mut want = Reasons::new();
    for (test, path, lines) in [
        ("t1", "src/a.py", vec![1, 2, 3]),
        ("t2", "src/a.py", vec![5, 6]),
        ("t3", "src/b.py", vec![1, 2]),
    ] {
        let files = want.entry(test.to_owned()).or_default();
        files.insert(path.to_owned(), lines.into_iter().collect());
    }
    assert_eq!(reasons(&answer), want);
    assert_eq!(answer.ignored, ["logo.png"]);
    let files: Vec<(&str, Option<&str>, ChangeKind)> = answer
        .files
        .iter()
        .map(|f| (&*f.path, f.new_path.as_deref(), f.change))
        .collect();
    assert_eq!(
        files,
        [
            ("src/b.py", None, ChangeKind::Deleted),
            ("src/a.py", Some("src/renamed.py"), ChangeKind::Renamed),
        ]
    );

    let collected = ["t1", "t3", "t9"].map(String::from).to_vec();
    let answer = client
        .test_impact("base", diff, None, Some(collected))
        .await
        .unwrap();
    let tests: Vec<(&str, bool)> = answer.tests.iter().map(|t| (&*t.name, t.new)).collect();
    assert_eq!(tests, [("t1", false), ("t3", false), ("t9", true)]);
    assert_eq!(answer.gone, [std::sync::Arc::from("t2")]);

    // A shard that named no tests covered src/b.py's line 4: what ran it cannot be known.
    let params = RunParams {
        expected_shards: vec!["1".into(), "2".into()],
        ..RunParams::default()
    };
    client.open_run("mixed", params).await.unwrap();
    let tests = vec![("t3", vec![("src/b.py", lines(&[1, 2], &[]))])];
    push_tests(&mut client, "mixed", "1", tests).await.unwrap();
    let mut plain = covd::model::Coverage::default();
    plain.add("src/b.py", &lines(&[4], &[]));
    push(&mut client, "mixed", "2", 1, plain).await;
    repo.replace("src/b.py", 4, "changed");
    let answer = client
        .test_impact("mixed", repo.diff(), None, None)
        .await
        .unwrap();
    assert_eq!(answer.state, ImpactState::Unknown);
    assert_eq!(
        answer.unknown,
        [
            "src/b.py:4 was covered by coverage that names no test (a shard pushed without \
          per-test attribution)"
        ]
    );
}

/// A diff that does not read is refused and names the problem; an unknown run is NOT_FOUND.
#[tokio::test]
async fn a_bad_diff_or_run_is_refused() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    client.open_run("r", RunParams::default()).await.unwrap();
    let refused = |e: ClientError| match e {
        ClientError::Status(s) => (s.code(), s.message().to_owned()),
        other => panic!("{other}"),
    };
    let bad = b"--- a/x.py\n+++ b/x.py\n@@ -1,2 +1,2 @@\n-a\n+b\n".to_vec();
    let (code, message) = refused(client.test_impact("r", bad, None, None).await.unwrap_err());
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        message.contains("diff: the diff does not read"),
        "{message}"
    );
    let prose = b"Just some words, no diff at all.\n".to_vec();
    let (code, _) = refused(
        client
            .test_impact("r", prose, None, None)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::InvalidArgument);
    let (code, _) = refused(
        client
            .test_impact("nothere", Vec::new(), None, None)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::NotFound);
}

/// `covd tests-for` as CI runs it: the tests on standard output and exit code 0; exit 5 and
/// nothing on standard output when no test covers the change; exit 6 and nothing when covd
/// cannot tell; `--format json` with the reasons.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_has_an_exit_code_per_state() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    toolz_run(&mut client, "base").await;
    let repo = toolz_repo();
    let a = "toolz/itertoolz.py";
    let line = first_line(a, |l| {
        only_tests(a, l)
            && measured_before(a, l).is_some_and(|b| only_tests(a, b))
            && measured_after(a, l).is_some_and(|n| only_tests(a, n))
    });
    repo.replace(a, line, "    pass");
    let selected = repo.diff();
    repo.replace("README.rst", 1, "Title");
    let empty = repo.diff();
    repo.write("toolz/newmod.py", "X = 1\n");
    let unknown = repo.diff();

    let run = |diff: Vec<u8>, args: &[&str]| {
        let mut all = vec!["tests-for", "--run", "base", "--diff", "-"];
        all.extend(args);
        covd_with_input(&daemon.url, &all, diff)
    };

    let mut want: BTreeSet<String> = labels(a, line);
    want.extend(labels(a, measured_before(a, line).unwrap()));
    want.extend(labels(a, measured_after(a, line).unwrap()));
    let (code, out, err) = run(selected.clone(), &[]).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().map(String::from).collect::<BTreeSet<_>>(), want);
    assert_eq!(out.lines().count(), want.len());

    let (code, out, err) = run(empty, &[]).await;
    assert_eq!((code, out.as_str()), (Some(5), ""), "{err}");
    assert!(err.contains("no test covers the change"), "{err}");

    let (code, out, err) = run(unknown, &[]).await;
    assert_eq!((code, out.as_str()), (Some(6), ""), "{err}");
    assert!(err.starts_with("unknown: run every test"), "{err}");
    assert!(err.contains("toolz/newmod.py (added)"), "{err}");

    let (code, out, err) = run(selected, &["--format", "json"]).await;
    assert_eq!(code, Some(0), "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["state"], "selected");
    let names: BTreeSet<String> = json["tests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, want);
    let first = &json["tests"][0];
    let name = first["name"].as_str().unwrap();
    let covers = &first["covers"][0];
    assert_eq!(covers["path"], a);
    for l in covers["lines"].as_array().unwrap() {
        let l = l.as_u64().unwrap() as u32;
        assert!(labels(a, l).contains(name), "{name} at {l}");
    }
}

/// Runs the `covd` binary against the daemon at `url` with `input` on its standard input:
/// its exit code, standard output and standard error.
pub(crate) fn covd_with_input(
    url: &str,
    args: &[&str],
    input: Vec<u8>,
) -> impl Future<Output = (Option<i32>, String, String)> + use<> {
    let url = url.to_owned();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let done = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(COVD)
            .args(&args)
            .env("COVD_SERVER", url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&input).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    });
    async { done.await.unwrap() }
}
