//! Flaky and broken tests through the daemon: a test that fails in one attempt of a shard and
//! passes in the retry is flaky, and the retried shard shows what each attempt covered that
//! the other did not; one that fails and passes across runs of one commit is flaky too; one
//! that fails every time is broken, never flaky; an attempt that failed most of its tests at
//! once is an infrastructure failure and counts for nothing.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::cli::Served;

/// A JUnit report of suite `t` with these (name, passed) cases.
fn junit(dir: &Path, name: &str, cases: &[(&str, bool)]) -> PathBuf {
    let mut xml = String::from("<testsuite name=\"t\">");
    for (case, passed) in cases {
        xml.push_str(&format!(
            "<testcase classname=\"t\" name=\"{case}\" time=\"0.1\">"
        ));
        if !passed {
            xml.push_str("<failure message=\"boom\"/>");
        }
        xml.push_str("</testcase>");
    }
    xml.push_str("</testsuite>");
    let path = dir.join(name);
    std::fs::write(&path, xml).unwrap();
    path
}

/// An LCOV report of `a.c` with these lines, covered or not.
fn lcov(dir: &Path, name: &str, lines: &[(u32, u32)]) -> PathBuf {
    let mut info = String::from("SF:a.c\n");
    for (line, hits) in lines {
        info.push_str(&format!("DA:{line},{hits}\n"));
    }
    info.push_str("end_of_record\n");
    let path = dir.join(name);
    std::fs::write(&path, info).unwrap();
    path
}

/// Opens a run of shards 0 and 1; the tests retry shard 0 while shard 1 runs.
fn open(served: &Served, run: &str, commit: &str) {
    served.ok(&[
        "open",
        "--run",
        run,
        "--shards",
        "2",
        "--project",
        "acme/shop",
        "--branch",
        "main",
        "--commit",
        commit,
    ]);
}

fn push(served: &Served, run: &str, attempt: u32, files: &[&Path]) {
    push_shard(served, run, "0", attempt, files);
}

/// Shard 1, with no tests: its finish completes the run.
fn complete(served: &Served, run: &str, cov: &Path) {
    push_shard(served, run, "1", 1, &[cov]);
}

fn push_shard(served: &Served, run: &str, shard: &str, attempt: u32, files: &[&Path]) {
    let attempt = attempt.to_string();
    let mut args = vec![
        "push",
        "--fail-on-error",
        "--run",
        run,
        "--shard",
        shard,
        "--attempt",
        &attempt,
    ];
    args.extend(files.iter().map(|p| p.to_str().unwrap()));
    served.ok(&args);
}

fn json(served: &Served, args: &[&str]) -> Value {
    serde_json::from_str(&served.ok(&[args, &["--format", "json"]].concat())).unwrap()
}

fn standing<'a>(tests: &'a Value, test: &str) -> &'a Value {
    tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["test"] == test)
        .unwrap_or_else(|| panic!("{test} not in {tests}"))
}

#[test]
fn flaky_broken_and_infrastructure_failures_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut served = Served::start();

    // Run 1, commit c1: `x` fails in attempt 1 and passes in attempt 2, which covers other
    // lines.
    open(&served, "r1", "c1");
    let first = [
        lcov(d, "a1.info", &[(1, 1), (2, 1), (3, 1), (5, 0)]),
        junit(d, "a1.xml", &[("x", false), ("y", true), ("z", true)]),
    ];
    push(&served, "r1", 1, &[&first[0], &first[1]]);
    let second = [
        lcov(d, "a2.info", &[(1, 1), (2, 1), (3, 0), (5, 1)]),
        junit(d, "a2.xml", &[("x", true), ("y", true), ("z", true)]),
    ];
    push(&served, "r1", 2, &[&second[0], &second[1]]);
    let cov = lcov(d, "c.info", &[(1, 1)]);
    complete(&served, "r1", &cov);

    let attempts = json(&served, &["flaky", "--run", "r1"]);
    let shard = &attempts["shards"][0];
    assert_eq!(shard["shard"], "0");
    let numbers: Vec<_> = shard["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["attempt"].as_u64(),
                a["current"].as_bool(),
                a["tests"]["failed"].as_u64(),
            )
        })
        .collect();
    assert_eq!(
        numbers,
        [
            (Some(1), Some(false), Some(1)),
            (Some(2), Some(true), Some(0))
        ]
    );
    assert_eq!(
        shard["flipped"],
        serde_json::json!([{"test": "t::x", "failed_in": [1], "passed_in": [2]}])
    );
    let diff = &shard["differences"][0];
    assert_eq!(
        (diff["attempt"].as_u64(), diff["against"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(
        diff["only_in_attempt"],
        serde_json::json!([{"path": "a.c", "lines": [3]}])
    );
    assert_eq!(
        diff["only_in_against"],
        serde_json::json!([{"path": "a.c", "lines": [5]}])
    );
    let text = served.ok(&["flaky", "--run", "r1"]);
    assert!(
        text.contains("flipped: t::x (failed in attempt 1, passed in 2)"),
        "{text}"
    );
    assert!(
        text.contains("attempt 1 covered, attempt 2 did not: 1 lines"),
        "{text}"
    );
    assert!(text.contains("    a.c: 3\n"), "{text}");

    // Runs 2 and 3, both of commit c2: `y` fails in both (broken); `z` fails in one and
    // passes in the other (flaky across runs).
    open(&served, "r2", "c2");
    let r2 = junit(d, "r2.xml", &[("x", true), ("y", false), ("z", false)]);
    push(&served, "r2", 1, &[&cov, &r2]);
    complete(&served, "r2", &cov);
    open(&served, "r3", "c2");
    let r3 = junit(d, "r3.xml", &[("x", true), ("y", false), ("z", true)]);
    push(&served, "r3", 1, &[&cov, &r3]);
    complete(&served, "r3", &cov);

    // Run 4, commit c3: its first attempt fails 6 of 7 tests at once (a lost database, say);
    // the retry passes. Nothing of it is flakiness.
    open(&served, "r4", "c3");
    let names = ["x", "y", "z", "u", "v", "w", "s"];
    let infra: Vec<_> = names.iter().map(|n| (*n, *n == "s")).collect();
    push(&served, "r4", 1, &[&cov, &junit(d, "r4a.xml", &infra)]);
    let retry: Vec<_> = names.iter().map(|n| (*n, *n != "y")).collect();
    push(&served, "r4", 2, &[&cov, &junit(d, "r4b.xml", &retry)]);
    complete(&served, "r4", &cov);
    let r4 = json(&served, &["flaky", "--run", "r4"]);
    assert_eq!(
        r4["shards"][0]["attempts"][0]["infrastructure_failure"],
        true
    );
    assert_eq!(r4["shards"][0]["flipped"], serde_json::json!([]));

    let tests = json(
        &served,
        &["flaky", "--project", "acme/shop", "--branch", "main"],
    );
    let x = standing(&tests, "t::x");
    assert_eq!(
        (
            x["class"].as_str(),
            x["failed"].as_u64(),
            x["runs"].as_u64()
        ),
        (Some("flaky"), Some(1), Some(4))
    );
    // y: failed on c2 twice and in the counted attempt of c3: broken, though it passed on c1.
    let y = standing(&tests, "t::y");
    assert_eq!(
        (
            y["class"].as_str(),
            y["failed"].as_u64(),
            y["runs"].as_u64()
        ),
        (Some("broken"), Some(3), Some(4))
    );
    let z = standing(&tests, "t::z");
    assert_eq!(
        (
            z["class"].as_str(),
            z["failed"].as_u64(),
            z["flaky_commits"].as_u64()
        ),
        (Some("flaky"), Some(1), Some(1))
    );
    // The infrastructure failure made nobody flaky: u, v, w, s never failed elsewhere.
    let listed: Vec<_> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["test"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, ["t::y", "t::x", "t::z"]);

    // Kept across a restart: the replaced attempts and the histories.
    served.terminate();
    let data = std::mem::replace(&mut served.data, tempfile::tempdir().unwrap());
    let served = Served::on(data, "127.0.0.1:0");
    assert_eq!(json(&served, &["flaky", "--run", "r1"]), attempts);
    assert_eq!(
        json(
            &served,
            &["flaky", "--project", "acme/shop", "--branch", "main"]
        ),
        tests
    );
    let text = served.ok(&["flaky", "--project", "acme/shop", "--branch", "main"]);
    assert!(
        text.starts_with("broken  failed 3 of the last 4 runs"),
        "{text}"
    );
}

/// GitHub's "Re-run failed jobs" once the workflow has ended: the same `GITHUB_RUN_ID`, a
/// higher `GITHUB_RUN_ATTEMPT`, only the failed job, and no flag given to covd. The retry
/// reopens the complete run and completes it again: its coverage replaces the failed
/// attempt's, and the test that failed there and passes now is flaky. Under
/// `--reopen-window 0` the same retry is refused, and the run stays as it was.
#[test]
fn a_failed_job_rerun_after_the_workflow_ended_reopens_its_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let github = |served: &Served, job: &str, attempt: u32, args: &[&str]| {
        let out = std::process::Command::new(crate::cli::COVD)
            .env_clear()
            .envs(crate::ci::environment("github-actions"))
            .env("COVD_SERVER", &served.url)
            .env("GITHUB_JOB", job)
            .env("GITHUB_RUN_ATTEMPT", attempt.to_string())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let run = "github/acme/widgets/1658821493";
    let failed = [
        lcov(d, "a1.info", &[(1, 1), (2, 1), (3, 1), (5, 0)]),
        junit(d, "a1.xml", &[("x", false), ("y", true)]),
    ];
    let passed = [
        lcov(d, "a2.info", &[(1, 1), (2, 1), (3, 0), (5, 1)]),
        junit(d, "a2.xml", &[("x", true), ("y", true)]),
    ];
    let other = lcov(d, "e2e.info", &[(1, 1)]);
    let path = |p: &PathBuf| p.to_str().unwrap().to_owned();
    let workflow = |served: &Served| {
        let (code, err) = github(served, "setup", 1, &["open", "--shard-ids", "unit,e2e"]);
        assert_eq!(code, Some(0), "{err}");
        let push = [
            "push",
            "--fail-on-error",
            &path(&failed[0]),
            &path(&failed[1]),
        ];
        assert_eq!(github(served, "unit", 1, &push).0, Some(0));
        let push = ["push", "--fail-on-error", &path(&other)];
        assert_eq!(github(served, "e2e", 1, &push).0, Some(0));
    };
    let fetch = |served: &Served| served.ok(&["fetch", "--run", run, "--wait", "--timeout", "10s"]);

    let served = Served::start();
    workflow(&served);
    let before = fetch(&served);
    assert!(
        before.contains("DA:3,1\n") && before.contains("DA:5,0\n"),
        "{before}"
    );
    let rerun = [
        "push",
        "--fail-on-error",
        &path(&passed[0]),
        &path(&passed[1]),
    ];
    let (code, err) = github(&served, "unit", 2, &rerun);
    assert_eq!(code, Some(0), "{err}");
    let after = fetch(&served);
    assert!(
        after.contains("DA:1,2\n") && after.contains("DA:3,0\n") && after.contains("DA:5,1\n"),
        "the retry's coverage replaced the failed attempt's: {after}"
    );
    let attempts = json(&served, &["flaky", "--run", run]);
    let shard = &attempts["shards"][0];
    assert_eq!(shard["shard"], "unit");
    assert_eq!(
        shard["flipped"],
        serde_json::json!([{"test": "t::x", "failed_in": [1], "passed_in": [2]}])
    );
    assert_eq!(
        shard["differences"][0]["only_in_attempt"],
        serde_json::json!([{"path": "a.c", "lines": [3]}])
    );
    let tests = json(
        &served,
        &[
            "flaky",
            "--project",
            "acme/widgets",
            "--branch",
            "feature-branch-1",
        ],
    );
    let x = standing(&tests, "t::x");
    assert_eq!(
        (
            x["class"].as_str(),
            x["failed"].as_u64(),
            x["runs"].as_u64()
        ),
        (Some("flaky"), Some(1), Some(1))
    );

    let strict = Served::with(
        tempfile::tempdir().unwrap(),
        "127.0.0.1:0",
        &["--reopen-window", "0"],
    );
    workflow(&strict);
    let (code, err) = github(&strict, "unit", 2, &rerun);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("accepts no more coverage") && err.contains("--reopen-window 0"),
        "{err}"
    );
    assert_eq!(fetch(&strict), before);
}
