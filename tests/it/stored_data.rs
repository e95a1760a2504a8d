//! Stored data outlives releases: data directories written by earlier releases
//! (`tests/fixtures/datadir-v1`, postcard records; `datadir-v2`, protobuf records; made by
//! `datadir-v1/make.sh`) open with this build and answer status, file and directory queries and
//! exports exactly as those releases answered them. Every change to stored records must keep
//! these tests green.

use std::path::Path;

use crate::cli::Served;
use crate::support::fixture;

/// Copies the checked-in directory, so the test never writes into the fixture.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Each CLI command `make.sh` recorded, with the file its answer was written to.
fn recorded() -> Vec<(Vec<&'static str>, String)> {
    let mut out = vec![
        (vec!["runs"], "runs.txt".to_owned()),
        (
            vec!["file", "--run", "complete", "src/parse.rs"],
            "file-complete-src_parse.rs.txt".to_owned(),
        ),
        (
            vec!["file", "--run", "open", "src/calc.c"],
            "file-open-src_calc.c.txt".to_owned(),
        ),
        (
            vec!["file", "--run", "tests", "--tests", "toolz/utils.py"],
            "file-tests-toolz_utils.py.txt".to_owned(),
        ),
        (
            vec!["dir", "--run", "complete"],
            "dir-complete.txt".to_owned(),
        ),
    ];
    for run in ["complete", "open", "tests", "interrupted"] {
        out.push((vec!["status", "--run", run], format!("status-{run}.txt")));
        for (format, ext) in [("lcov", "info"), ("json", "json")] {
            out.push((
                vec!["fetch", "--run", run, "--format", format],
                format!("fetch-{run}.{ext}"),
            ));
        }
    }
    out
}

fn check_answers(served: &Served, expected: &Path) {
    for (args, file) in recorded() {
        let out = served.covd(&args).output().unwrap();
        assert!(
            out.status.success(),
            "covd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut got = String::from_utf8(out.stdout).unwrap();
        if args[0] == "runs" {
            // make.sh sorted them (the daemon lists runs newest first).
            let mut lines: Vec<&str> = got.lines().collect();
            lines.sort_unstable();
            got = lines.iter().map(|l| format!("{l}\n")).collect();
        }
        let want = std::fs::read_to_string(expected.join(&file)).unwrap();
        assert_eq!(got, want, "covd {args:?} answers differently from {file}");
    }
}

#[test]
fn a_data_directory_of_the_first_release_answers_as_it_did() {
    answers_as_it_did("datadir-v1");
}

#[test]
fn a_data_directory_with_protobuf_records_answers_as_it_did() {
    answers_as_it_did("datadir-v2");
}

fn answers_as_it_did(name: &str) {
    let fixture = fixture(name);
    let expected = fixture.join("expected");
    let data = tempfile::tempdir().unwrap();
    copy_dir(&fixture.join("data"), data.path());

    let mut served = Served::on(data, "127.0.0.1:0");
    check_answers(&served, &expected);
    // Once this build has opened (and possibly migrated) it, it answers the same again.
    served.terminate();
    let data = std::mem::replace(&mut served.data, tempfile::tempdir().unwrap());
    let served = Served::on(data, "127.0.0.1:0");
    check_answers(&served, &expected);

    // The old runs go on: a second attempt replaces the interrupted shard's acknowledged delta,
    // and the open run completes when its missing shard arrives.
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart");
    // A command that must succeed, and what it printed.
    let covd = |args: &[&str], file: Option<&str>| {
        let mut c = served.covd(args);
        if let Some(f) = file {
            c.arg(quickstart.join(f));
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "covd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // History reads the summaries an earlier release kept (its table had no columns to
    // select them by; opening fills them): the complete runs, with their line coverage.
    let history: serde_json::Value = serde_json::from_str(&covd(
        &[
            "history",
            "--project",
            "acme/demo",
            "--by",
            "month",
            "--format",
            "json",
        ],
        None,
    ))
    .unwrap();
    let buckets = history["buckets"].as_array().unwrap();
    let runs: u64 = buckets.iter().map(|b| b["runs"].as_u64().unwrap()).sum();
    assert_eq!((buckets.len(), runs), (1, 1), "{history}");
    let rate = &buckets.last().unwrap()["metrics"]["line_rate"];
    assert_eq!(
        format!("{:.1}", rate["max"].as_f64().unwrap()),
        "94.1",
        "{history}"
    );

    // Set algebra over shards: an open run reads its delta log; a run compacted by an earlier
    // release, which kept no per-shard lines, says so.
    let lines = |run: &str, expr: &str| covd(&["lines", "--run", run, expr], None);
    assert_eq!(lines("open", "shard:0 | shard:1"), lines("open", "covered"));
    assert_ne!(lines("open", "shard:1"), lines("open", "covered"));
    let out = served
        .covd(&["lines", "--run", "complete", "shard:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("stored by an earlier release"), "{err}");
    // Nor did it keep the deltas a retry needs to reopen it: a retry is refused, saying why.
    let before = covd(&["file", "--run", "complete", "src/lib.rs"], None);
    let out = served
        .covd(&[
            "push",
            "--fail-on-error",
            "--run",
            "complete",
            "--shard",
            "0",
            "--attempt",
            "9",
        ])
        .arg(quickstart.join("shard-b.info"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("accepts no more coverage"), "{err}");
    assert_eq!(
        covd(&["file", "--run", "complete", "src/lib.rs"], None),
        before
    );

    let push = ["push", "--fail-on-error", "--run"];
    covd(
        &[
            &push[..],
            &["interrupted", "--shard", "0", "--attempt", "2"],
        ]
        .concat(),
        Some("shard-b.info"),
    );
    let status = covd(&["status", "--run", "interrupted"], None);
    assert!(
        status.contains("finished") && status.contains("attempt 2 deltas 1"),
        "{status}"
    );
    // What attempt 1 sent is gone: the run holds shard-b.info alone, like a new run of it.
    covd(
        &[&push[..], &["b-only", "--shard", "0"]].concat(),
        Some("shard-b.info"),
    );
    assert_eq!(
        covd(&["file", "--run", "interrupted", "src/lib.rs"], None),
        covd(&["file", "--run", "b-only", "src/lib.rs"], None)
    );

    covd(
        &[&push[..], &["open", "--shard", "2"]].concat(),
        Some("shard-a.info"),
    );
    let status = covd(&["status", "--run", "open"], None);
    assert!(status.starts_with("run open: complete"), "{status}");
    // Compacted by this release, it keeps each shard's lines.
    assert_eq!(
        lines("open", "shard:0 | shard:1 | shard:2"),
        lines("open", "covered")
    );
}
