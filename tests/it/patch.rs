//! Patch coverage: of the lines a diff adds, how many the run measured and covered. The diffs
//! are written by real git (see `impact.rs`); what ran is coverage.py's own merged report.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use covd::service::{PatchCoverage, RunParams};

use crate::attribution::{merged_executed, merged_measured};
use crate::cli::COVD;
use crate::impact::{Repo, covd_with_input, labels, toolz_repo, toolz_run};
use crate::support::*;

/// A block of 41 lines around the first line coverage.py measured but saw no test run, in a
/// file other than functoolz.py.
fn partly_covered() -> (&'static str, u32, u32) {
    let (path, missed) = merged_measured()
        .iter()
        .filter(|(p, _)| p.as_str() != "toolz/functoolz.py")
        .find_map(|(p, lines)| {
            let missed = lines.difference(&merged_executed()[p]).next()?;
            Some((p.as_str(), *missed))
        })
        .unwrap();
    (path, missed.saturating_sub(20).max(1), missed.max(21) + 20)
}

/// The head is the toolz checkout; the base lacks the lines of [`partly_covered`], all of
/// functoolz.py's lines past 100, and newmod.py (code the run does not measure), and has
/// another README. `git diff base head` adds them back.
fn change() -> (Repo, Vec<u8>) {
    let repo = toolz_repo();
    repo.write("toolz/newmod.py", "def f():\n    return 1\n");
    repo.commit("head");
    let (path, first, last) = partly_covered();
    for _ in first..=last {
        repo.remove(path, first);
    }
    let functoolz = repo.lines("toolz/functoolz.py");
    repo.set_lines("toolz/functoolz.py", &functoolz[..100]);
    repo.git(&["rm", "-q", "toolz/newmod.py"]);
    repo.replace("README.rst", 1, "Old title");
    repo.commit("base");
    let diff = repo.git(&["diff", "-M", "HEAD", "HEAD~1"]);
    (repo, diff)
}

/// What merged.json says of `lines` of `path`: (measured, executed).
fn expected(path: &str, lines: impl Iterator<Item = u32>) -> (Vec<u32>, Vec<u32>) {
    let lines: BTreeSet<u32> = lines.collect();
    let measured: Vec<u32> = merged_measured()[path]
        .intersection(&lines)
        .copied()
        .collect();
    let executed: Vec<u32> = merged_executed()[path]
        .intersection(&lines)
        .copied()
        .collect();
    (measured, executed)
}

fn files(answer: &PatchCoverage) -> Vec<(String, Vec<u32>, Vec<u32>)> {
    answer
        .files
        .iter()
        .map(|f| {
            (
                f.path.to_string(),
                f.changed.iter().collect(),
                f.covered.iter().collect(),
            )
        })
        .collect()
}

/// The changed lines are the added ones coverage.py measured, the covered ones those it saw
/// run; a new module the run does not measure is named, not counted; the README is not code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_lines_are_measured_and_covered_as_coverage_py_says() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    toolz_run(&mut client, "head").await;
    let (_repo, diff) = change();
    let answer = client.patch_coverage("head", diff, None).await.unwrap();

    let functoolz_last = *merged_measured()["toolz/functoolz.py"]
        .iter()
        .max()
        .unwrap();
    let (f_changed, f_covered) = expected("toolz/functoolz.py", 101..=functoolz_last + 3);
    let (path, first, last) = partly_covered();
    let (i_changed, i_covered) = expected(path, first..=last);
    assert!(i_covered.len() < i_changed.len() && !i_covered.is_empty());
    let mut want = [
        (
            "toolz/functoolz.py".to_owned(),
            f_changed.clone(),
            f_covered.clone(),
        ),
        (path.to_owned(), i_changed.clone(), i_covered.clone()),
    ];
    want.sort();
    assert_eq!(files(&answer), want);
    let i = want.iter().position(|f| f.0 == path).unwrap();
    assert_eq!(answer.unmeasured, ["toolz/newmod.py"]);
    assert!(answer.complete);
    let covered = (f_covered.len() + i_covered.len()) as u64;
    let changed = (f_changed.len() + i_changed.len()) as u64;
    assert_eq!(answer.totals(), (covered, changed));

    // The command: the figure, the bar, Markdown for a pull request, JSON.
    let percent = covered as f64 * 100.0 / changed as f64;
    let patch = |args: &[&str], diff: Vec<u8>| {
        let mut all = vec!["patch", "--run", "head", "--diff", "-"];
        all.extend(args);
        covd_with_input(&daemon.url, &all, diff)
    };
    let (_, diff) = change();
    let above = format!("{}", (percent - 1.0).floor());
    let below = format!("{}", (percent + 1.0).ceil());
    let (code, out, err) = patch(&["--fail-under", &above], diff.clone()).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with(&format!(
            "patch coverage: {covered}/{changed} ({percent:.1}%) changed lines, at or above {above}%\n"
        )),
        "{out}"
    );
    assert!(
        out.contains("  toolz/newmod.py  not measured by the run\n"),
        "{out}"
    );
    let (code, _, err) = patch(&["--fail-under", &below], diff.clone()).await;
    assert_eq!(code, Some(7), "{err}");
    assert!(err.contains(&format!("is below {below}%")), "{err}");

    let (code, out, _) = patch(
        &["--format", "markdown", "--fail-under", &below],
        diff.clone(),
    )
    .await;
    assert_eq!(code, Some(7));
    assert!(
        out.starts_with(&format!("### Patch coverage: {percent:.1}% ❌\n")),
        "{out}"
    );
    let row = format!(
        "| `{path}` | {} | {} | {:.1}% |",
        i_covered.len(),
        i_changed.len(),
        i_covered.len() as f64 * 100.0 / i_changed.len() as f64
    );
    assert!(out.contains(&row), "{out}");
    assert!(
        out.contains("not measure (not counted): `toolz/newmod.py`"),
        "{out}"
    );

    let (code, out, _) = patch(&["--format", "json"], diff).await;
    assert_eq!(code, Some(0));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (json["covered"].as_u64(), json["changed"].as_u64()),
        (Some(covered), Some(changed))
    );
    assert_eq!(json["files"][i]["covered"], serde_json::json!(i_covered));
}

/// A change of nothing the run measures has no figure and passes any bar; a diff that does
/// not read is refused with exit code 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_executable_change_passes_and_a_bad_diff_is_refused() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    toolz_run(&mut client, "head").await;
    let repo = toolz_repo();
    repo.replace("README.rst", 1, "Title");
    let diff = repo.diff();
    let answer = client
        .patch_coverage("head", diff.clone(), None)
        .await
        .unwrap();
    assert_eq!(answer.totals(), (0, 0));
    let args = [
        "patch",
        "--run",
        "head",
        "--diff",
        "-",
        "--fail-under",
        "100",
    ];
    let (code, out, _) = covd_with_input(&daemon.url, &args, diff).await;
    assert_eq!(code, Some(0));
    assert!(
        out.contains("no added line is one the run measures"),
        "{out}"
    );
    let (code, _, err) = covd_with_input(&daemon.url, &args, b"not a diff\n".to_vec()).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("the diff does not read"), "{err}");
}

/// `covd patch --watch` while the shards stream: it says the figure of the first two shards,
/// then rises as the last two arrive, and reports once the run is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_shows_patch_coverage_rising_while_shards_stream() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    let params = RunParams {
        expected_shards: ["1", "2", "3", "4"].map(String::from).to_vec(),
        ..RunParams::default()
    };
    client.open_run("live", params).await.unwrap();
    let shard = |i: u32| {
        crate::corpus::read_json(
            &format!("python-toolz/same-path/shard{i}.json.gz"),
            &Default::default(),
        )
    };
    for i in 1..=2 {
        push(&mut client, "live", &i.to_string(), 1, shard(i)).await;
    }
    // A file some of whose lines only the last two shards' tests ran.
    let path = merged_executed()
        .iter()
        .find(|(p, lines)| {
            lines.iter().any(|l| {
                let l = labels(p, *l);
                !l.is_empty()
                    && l.iter()
                        .all(|t| t.starts_with("shard3") || t.starts_with("shard4"))
            })
        })
        .map(|(p, _)| p.clone())
        .unwrap();
    let repo = toolz_repo();
    repo.set_lines(&path, &[]);
    repo.commit("base");
    let diff = repo.git(&["diff", "HEAD", "HEAD~1"]);

    let mut child = Command::new(COVD)
        .args([
            "patch", "--run", "live", "--diff", "-", "--watch", "--format", "json",
        ])
        .env("COVD_SERVER", &daemon.url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&diff).unwrap();
    let mut progress = BufReader::new(child.stderr.take().unwrap());
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        progress.read_line(&mut line).unwrap();
        (line, progress)
    });
    let (first, mut progress) = first.await.unwrap();
    assert!(
        first.contains("(2 shards finished; run waits for 2 shards)"),
        "{first}"
    );
    for i in 3..=4 {
        push(&mut client, "live", &i.to_string(), 1, shard(i)).await;
    }
    let out = tokio::task::spawn_blocking(move || {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut progress, &mut rest).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8(out.stdout).unwrap(),
            rest,
        )
    });
    let (code, out, rest) = out.await.unwrap();
    assert_eq!(code, Some(0), "{rest}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["complete"], true);
    let covered = json["covered"].as_u64().unwrap();
    assert_eq!(covered, merged_executed()[&path].len() as u64);
    let covered_at = |line: &str| -> u64 {
        line.trim_start_matches("patch ")
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let last = rest
        .lines()
        .last()
        .unwrap_or_else(|| panic!("{first}{rest}"));
    assert!(last.contains("run complete"), "{rest}");
    assert!(covered_at(&first) < covered_at(last), "{first}{rest}");
    assert_eq!(covered_at(last), covered);
}

/// A diff's path that ends two of the run's paths (`x.py` for `a/x.py` and `b/x.py`) is
/// matched to neither: patch coverage leaves it out and names it, test impact cannot tell.
#[tokio::test]
async fn a_path_that_ends_several_files_is_named_not_guessed() {
    use crate::attribution::{lines, push_tests};
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    let params = RunParams {
        expected_shards: vec!["1".into()],
        ..RunParams::default()
    };
    client.open_run("r", params).await.unwrap();
    let tests = vec![
        ("t::a", vec![("src/a/x.py", lines(&[1, 2], &[3]))]),
        ("t::b", vec![("src/b/x.py", lines(&[1], &[2]))]),
    ];
    push_tests(&mut client, "r", "1", tests).await.unwrap();
    let diff = b"diff --git a/x.py b/x.py\n--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-old\n+new\n";

    let patch = client
        .patch_coverage("r", diff.to_vec(), None)
        .await
        .unwrap();
    assert!(patch.files.is_empty(), "{patch:?}");
    let candidates = vec!["src/a/x.py".to_owned(), "src/b/x.py".to_owned()];
    assert_eq!(patch.ambiguous, [("x.py".to_owned(), candidates)]);
    let args = ["patch", "--run", "r", "--diff", "-"];
    let (code, out, err) = covd_with_input(&daemon.url, &args, diff.to_vec()).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(
            "x.py  not counted: it ends several of the run's paths (src/a/x.py, src/b/x.py)"
        ),
        "{out}"
    );

    let impact = client
        .test_impact("r", diff.to_vec(), None, None)
        .await
        .unwrap();
    assert_eq!(impact.state, covd::service::ImpactState::Unknown);
    assert!(
        impact.unknown[0]
            .contains("x.py matches several files of the run (src/a/x.py, src/b/x.py)"),
        "{:?}",
        impact.unknown
    );
    // The whole path is found as it is.
    let whole = b"diff --git a/src/a/x.py b/src/a/x.py\n--- a/src/a/x.py\n+++ b/src/a/x.py\n@@ -1 +1 @@\n-old\n+new\n";
    let impact = client
        .test_impact("r", whole.to_vec(), None, None)
        .await
        .unwrap();
    let names: Vec<&str> = impact.tests.iter().map(|t| &*t.name).collect();
    assert_eq!(names, ["t::a"]);
}
