//! The real tools' own merges as the oracle: coverage.py's `combine` of 4 pytest shards.

use std::collections::BTreeSet;

use covd::model::path::PathRules;
use covd::service::RunParams;

use crate::support::*;

async fn merge_four_shards(folder: &str, rules: impl Fn(usize) -> PathRules) {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    let run = format!("toolz-{folder}");
    client
        .open_run(
            &run,
            RunParams {
                expected_shards: (1..=4).map(|i| i.to_string()).collect(),
                ..RunParams::default()
            },
        )
        .await
        .unwrap();
    let pushes = (1..=4).map(|i| {
        let coverage = read_lcov(
            &corpus(&format!("python-toolz/{folder}/shard{i}.lcov")),
            &rules(i),
        );
        let mut client = daemon.client();
        let run = run.clone();
        tokio::spawn(async move { push(&mut client, &run, &i.to_string(), 1, coverage).await })
    });
    for p in pushes.collect::<Vec<_>>() {
        p.await.unwrap();
    }
    let (header, merged) = fetch(&mut client, &run).await;
    assert!(header.complete, "{header:?}");
    assert!(header.missing_shards.is_empty());

    let oracle = read_lcov(
        &corpus(&format!("python-toolz/{folder}/merged.lcov")),
        &PathRules::default(),
    );
    assert_same_shapes(&merged, &oracle);
    assert_eq!(merged.totals(), oracle.totals());
    // coverage.py records 0/1, so our sums may exceed its 1s but never fall below.
    for (path, theirs) in &oracle.files {
        for (line, hits) in theirs.line_hits() {
            let ours = merged.files[path].hits_of(line).unwrap();
            assert!(ours >= hits, "{path}:{line}: {ours} < {hits}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_path_shards_merge_like_coverage_combine() {
    merge_four_shards("same-path", |_| PathRules::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixed_shards_merge_with_path_rules() {
    merge_four_shards("prefixed-paths", |i| PathRules {
        strip: vec![format!("/srv/ci/shard{i}/toolz-1.2.0/")],
        ..PathRules::default()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixed_shards_merge_with_a_root_rule() {
    merge_four_shards("prefixed-paths", |i| PathRules {
        root: Some(format!("/srv/ci/shard{i}/toolz-1.2.0")),
        ..PathRules::default()
    })
    .await;
}

#[tokio::test]
async fn prefixed_shards_without_rules_do_not_merge() {
    // The failure path rules exist for: each shard's files stay apart.
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    for i in 1..=2 {
        let coverage = read_lcov(
            &corpus(&format!("python-toolz/prefixed-paths/shard{i}.lcov")),
            &PathRules::default(),
        );
        push(&mut client, "raw", &i.to_string(), 1, coverage).await;
    }
    let status = client.status("raw").await.unwrap();
    let one = read_lcov(
        &corpus("python-toolz/prefixed-paths/shard1.lcov"),
        &PathRules::default(),
    );
    assert_eq!(status.totals.files, 2 * one.files.len() as u64);
    assert!(!status.expectations_declared);
}

/// A coverage.py JSON report of the corpus, read through covd's reader.
pub(crate) fn read_json(rel: &str, rules: &PathRules) -> covd::model::Coverage {
    let gz = std::fs::File::open(corpus(rel)).unwrap();
    let input = std::io::BufReader::new(flate2::read::GzDecoder::new(gz));
    let mut coverage = covd::model::Coverage::default();
    covd::formats::read(covd::formats::Format::CoveragePyJson, input, |r| {
        coverage.add(&rules.apply(&r.path), &r.file);
        true
    })
    .unwrap();
    coverage
}

#[test]
fn coverage_py_json_reads_as_the_same_coverage_as_its_lcov() {
    for i in 1..=4 {
        let json = read_json(
            &format!("python-toolz/same-path/shard{i}.json.gz"),
            &PathRules::default(),
        );
        let lcov = read_lcov(
            &corpus(&format!("python-toolz/same-path/shard{i}.lcov")),
            &PathRules::default(),
        );
        // Lines, counts, branch labels and outcomes, functions: identical (the JSON has no
        // function end lines).
        assert_same_lines(&json, &lcov);
        for (path, l) in &lcov.files {
            let j = &json.files[path];
            assert_eq!(j.branches(), l.branches(), "shard {i} {path}");
            let key = |f: &covd::model::Function| (f.name.clone(), f.start_line, f.hits);
            assert_eq!(
                j.functions().iter().map(key).collect::<Vec<_>>(),
                l.functions().iter().map(key).collect::<Vec<_>>(),
                "shard {i} {path}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coverage_py_json_shards_merge_like_coverage_combine() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    for i in 1..=4 {
        let rules = PathRules {
            strip: vec![format!("/srv/ci/shard{i}/toolz-1.2.0/")],
            ..PathRules::default()
        };
        let c = read_json(
            &format!("python-toolz/prefixed-paths/shard{i}.json.gz"),
            &rules,
        );
        push(&mut client, "json", &i.to_string(), 1, c).await;
    }
    let (_, merged) = fetch(&mut client, "json").await;
    let oracle = read_lcov(
        &corpus("python-toolz/prefixed-paths/merged.lcov"),
        &PathRules::default(),
    );
    assert_same_shapes(&merged, &oracle);
}

/// A run that knows the repository's files puts a shard's paths back among them (the shard
/// here has no path rules: every path is under `/srv/ci/shard1/toolz-1.2.0/`), after a restart
/// too, and reports the paths that match no file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shards_paths_resolve_to_the_repository_files_and_the_rest_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let settings = covd::server::Settings {
        data_dir: Some(dir.path().to_owned()),
        ..covd::server::Settings::default()
    };
    let daemon = Daemon::with(settings.clone()).await;
    let mut client = daemon.client();
    let repo = read_lcov(
        &corpus("python-toolz/same-path/merged.lcov"),
        &PathRules::default(),
    );
    let files: Vec<String> = repo.files.keys().cloned().collect();
    let two = RunParams {
        expected_shards: vec!["1".into(), "2".into()],
        ..RunParams::default()
    };
    client
        .open_run_with_files("r", two, files.clone())
        .await
        .unwrap();
    let raw = read_lcov(
        &corpus("python-toolz/prefixed-paths/shard1.lcov"),
        &PathRules::default(),
    );
    assert!(raw.files.keys().all(|p| p.starts_with("/srv/ci/shard1/")));
    let report = push(&mut client, "r", "1", 1, raw).await;
    assert!(
        report.unknown_paths.is_empty(),
        "{:?}",
        report.unknown_paths
    );
    daemon.stop().await.unwrap();

    // Stored resolved: after a restart the run holds the repository's paths, and the second
    // shard (its own prefix) merges into them.
    let daemon = Daemon::with(settings).await;
    let mut client = daemon.client();
    let mut raw = read_lcov(
        &corpus("python-toolz/prefixed-paths/shard2.lcov"),
        &PathRules::default(),
    );
    let stray = raw.files.values().next().unwrap().clone();
    raw.add("/srv/ci/shard2/toolz-1.2.0/generated/stray.py", &stray);
    let report = push(&mut client, "r", "2", 1, raw).await;
    assert_eq!(
        report.unknown_paths,
        ["/srv/ci/shard2/toolz-1.2.0/generated/stray.py"]
    );
    let (header, merged) = fetch(&mut client, "r").await;
    assert!(header.complete);
    let mut paths: Vec<&String> = merged.files.keys().collect();
    paths.retain(|p| !p.ends_with("stray.py"));
    let known: Vec<&String> = repo.files.keys().collect();
    assert_eq!(paths, known);
    // Shards 1 and 2 merged, as coverage.py's combine of the two would: the oracle's lines.
    let oracle = read_lcov(
        &corpus("python-toolz/prefixed-paths/merged.lcov"),
        &PathRules::default(),
    );
    let path = "toolz/itertoolz.py";
    assert!(merged.files[path].lines() == oracle.files[path].lines());
    daemon.stop().await.unwrap();
}

fn read_format(
    format: covd::formats::Format,
    path: &std::path::Path,
    rules: &PathRules,
) -> covd::model::Coverage {
    let input = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let mut coverage = covd::model::Coverage::default();
    covd::formats::read(format, input, |r| {
        coverage.add(&rules.apply(&r.path), &r.file);
        true
    })
    .unwrap();
    coverage
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_profiles_of_two_shards_merge_like_one_run_of_all_tests() {
    use covd::formats::Format;
    let rules = PathRules {
        map: vec![("covd.example/gofx/".into(), "".into())],
        ..PathRules::default()
    };
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    // count, then set and atomic modes for the same shards.
    for (run, files) in [
        ("count", ["shard1.out", "shard2.out"]),
        ("modes", ["shard1.set.out", "shard2.atomic.out"]),
    ] {
        for (i, f) in files.iter().enumerate() {
            let c = read_format(Format::GoCover, &fixture(&format!("go/{f}")), &rules);
            push(&mut client, run, &i.to_string(), 1, c).await;
        }
    }
    let full = read_format(Format::GoCover, &fixture("go/full.out"), &rules);
    for run in ["count", "modes"] {
        let (_, merged) = fetch(&mut client, run).await;
        assert_eq!(
            merged.files.keys().collect::<Vec<_>>(),
            vec!["calc.go", "grade.go"]
        );
        for (path, f) in &full.files {
            assert_eq!(merged.files[path].lines(), f.lines(), "{run} {path}");
            assert_eq!(merged.files[path].covered(), f.covered(), "{run} {path}");
        }
    }
    // Counts, exactly, against the profiles read by hand: `cross_format.rs`.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcovr_json_shards_merge_to_exactly_gcovr_add_tracefile() {
    use covd::formats::Format;
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    for i in 1..=2 {
        let c = read_format(
            Format::GcovrJson,
            &fixture(&format!("gcovr/shard{i}.json")),
            &PathRules::default(),
        );
        push(&mut client, "gcovr", &i.to_string(), 1, c).await;
    }
    let (_, merged) = fetch(&mut client, "gcovr").await;
    let oracle = read_format(
        Format::GcovrJson,
        &fixture("gcovr/merged.json"),
        &PathRules::default(),
    );
    // Line counts, branch counts and function counts: all sums, all exact.
    assert_eq!(merged, oracle);
    assert_eq!(
        merged.files["src/calc.c"]
            .functions()
            .iter()
            .find(|f| &*f.name == "apply")
            .unwrap()
            .hits,
        9
    );
    let detected =
        covd::formats::Format::detect(&std::fs::read(fixture("gcovr/shard1.json")).unwrap()[..200]);
    assert_eq!(detected, Some(Format::GcovrJson));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istanbul_shards_merge_like_nyc_merge() {
    use covd::formats::Format;
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    for tool in ["nyc", "c8"] {
        for i in 1..=2 {
            let rules = PathRules {
                strip: vec![format!("/builds/shard-{i}/")],
                ..PathRules::default()
            };
            let c = read_format(
                Format::Istanbul,
                &fixture(&format!("istanbul/{tool}-shard{i}.json")),
                &rules,
            );
            push(&mut client, tool, &i.to_string(), 1, c).await;
        }
    }
    // nyc instruments the same branches every time: everything merges exactly.
    let (_, nyc) = fetch(&mut client, "nyc").await;
    let oracle = read_format(
        Format::Istanbul,
        &fixture("istanbul/nyc-merged.json"),
        &PathRules::default(),
    );
    assert_eq!(nyc, oracle);
    let area = nyc.files["src/shapes.js"]
        .functions()
        .iter()
        .find(|f| &*f.name == "area")
        .unwrap();
    assert_eq!(area.hits, 8, "4 + 4");

    // c8: lines and functions exact (the placeholders of unloaded files add no function);
    // branch counts against nyc's LCOV in `cross_format.rs`.
    let (_, c8) = fetch(&mut client, "c8").await;
    let oracle = read_format(
        Format::Istanbul,
        &fixture("istanbul/c8-merged.json"),
        &PathRules::default(),
    );
    assert_same_lines(&c8, &oracle);
    for (path, theirs) in &oracle.files {
        assert_eq!(c8.files[path].functions(), theirs.functions(), "{path}");
    }
    assert_eq!(
        c8.files["src/legacy.js"].totals().lines,
        11,
        "an unloaded file counts as uncovered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llvm_cov_exports_read_like_llvm_cov_lcov_and_merge_like_llvm_profdata() {
    use covd::formats::Format;
    // The reader's line rule is llvm-cov's own: the merged export reads as llvm-cov's LCOV.
    let merged_json = read_format(
        Format::LlvmCov,
        &fixture("llvm-cov/merged.json"),
        &PathRules::default(),
    );
    let merged_lcov = read_lcov(&fixture("llvm-cov/merged.info"), &PathRules::default());
    assert_same_lines(&merged_json, &merged_lcov);
    for (path, theirs) in &merged_lcov.files {
        let ours = &merged_json.files[path];
        assert_eq!(shape(ours), shape(theirs), "{path}");
    }
    // Shards merged by covd equal the export of llvm-profdata's merged profile.
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    for i in 1..=2 {
        let rules = PathRules {
            strip: vec![format!("/builds/shard-{i}/")],
            ..PathRules::default()
        };
        let c = read_format(
            Format::LlvmCov,
            &fixture(&format!("llvm-cov/shard{i}.json")),
            &rules,
        );
        push(&mut client, "llvm", &i.to_string(), 1, c).await;
    }
    let (_, merged) = fetch(&mut client, "llvm").await;
    assert_eq!(merged, merged_json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coverage_py_contexts_become_per_test_attribution_like_the_merged_report() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    for i in 1..=4 {
        let rules = PathRules {
            strip: vec![format!("/srv/ci/shard{i}/toolz-1.2.0/")],
            ..PathRules::default()
        };
        let c = read_json(
            &format!("python-toolz/prefixed-paths/shard{i}.json.gz"),
            &rules,
        );
        push(&mut client, "ctx", &i.to_string(), 1, c).await;
    }
    let oracle = read_json(
        "python-toolz/prefixed-paths/merged.json.gz",
        &PathRules::default(),
    );
    let mut checked = 0;
    for (path, theirs) in &oracle.files {
        let ours = client.file("ctx", path).await.unwrap();
        for line in theirs.lines() {
            let want: BTreeSet<&str> = theirs.tests_of(line).map(|t| &**t).collect();
            let got: BTreeSet<&str> = ours.tests_of(line).map(|t| &**t).collect();
            assert_eq!(got, want, "{path}:{line}");
            checked += want.len();
        }
    }
    assert!(checked > 1000, "{checked} (line, test) pairs compared");
    // A line run by one test names it: the query a test-selection tool asks.
    let curry = client.file("ctx", "toolz/functoolz.py").await.unwrap();
    assert!(
        curry
            .tests()
            .iter()
            .any(|(name, _)| name.ends_with("test_functoolz.test_curry_kwargs"))
    );
}

/// Pushes shard files of one format and returns the merge and the oracle read the same way.
async fn merge_fixture(
    format: covd::formats::Format,
    shards: &[&str],
    oracle: &str,
    rules: impl Fn(usize) -> PathRules,
) -> (covd::model::Coverage, covd::model::Coverage) {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    for (i, s) in shards.iter().enumerate() {
        let c = read_format(format, &fixture(s), &rules(i + 1));
        push(&mut client, "fx", &i.to_string(), 1, c).await;
    }
    let (_, merged) = fetch(&mut client, "fx").await;
    (
        merged,
        read_format(format, &fixture(oracle), &PathRules::default()),
    )
}

/// Lines, counts and functions exactly; branches per line: as many, taken at most as many.
fn assert_exact_lines_and_branch_lower_bound(
    merged: &covd::model::Coverage,
    oracle: &covd::model::Coverage,
) {
    assert_same_lines(merged, oracle);
    for (path, theirs) in &oracle.files {
        let ours = &merged.files[path];
        assert_eq!(ours.functions(), theirs.functions(), "{path}");
        let (s_ours, s_theirs) = (shape(ours), shape(theirs));
        for (line, (n, _, taken)) in &s_theirs.branches_per_line {
            let (our_n, _, our_taken) = s_ours.branches_per_line[line];
            assert_eq!(our_n, *n, "{path}:{line}");
            assert!(our_taken <= *taken, "{path}:{line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jacoco_shards_merge_like_jacoco_merge() {
    use covd::formats::Format;
    let (merged, oracle) = merge_fixture(
        Format::JaCoCo,
        &["jacoco/shard1.xml", "jacoco/shard2.xml"],
        "jacoco/merged.xml",
        |_| PathRules::default(),
    )
    .await;
    // JaCoCo records ran / did not run: the merge's lines are 0/1 sums, the oracle's 0/1.
    for (path, theirs) in &oracle.files {
        assert_eq!(merged.files[path].lines(), theirs.lines(), "{path}");
        assert_eq!(merged.files[path].covered(), theirs.covered(), "{path}");
        let hit = |c: &covd::model::FileCoverage| {
            c.functions()
                .iter()
                .map(|f| (f.name.clone(), f.hits > 0))
                .collect::<Vec<_>>()
        };
        assert_eq!(hit(&merged.files[path]), hit(theirs), "{path}");
    }
    let t = merged.totals();
    assert_eq!(
        (t.lines_covered, t.lines, t.functions_hit, t.functions),
        (23, 29, 5, 6)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clover_shards_merge_like_one_phpunit_run_and_like_nyc_merge() {
    use covd::formats::Format;
    let strip = |i: usize| PathRules {
        strip: vec![format!("/builds/shard-{i}/")],
        ..PathRules::default()
    };
    // PHPUnit cannot merge Clover; one run of both test files is the oracle.
    let (merged, oracle) = merge_fixture(
        Format::Clover,
        &["clover/shard1.xml", "clover/shard2.xml"],
        "clover/full.xml",
        strip,
    )
    .await;
    assert_exact_lines_and_branch_lower_bound(&merged, &oracle);
    let t = merged.totals();
    assert_eq!((t.lines_covered, t.lines), (22, 27));
    // nyc's Clover shards: against nyc's LCOV of the same runs in `cross_format.rs`.
}

/// c8 `--all` writes a placeholder record for each file a shard's processes never loaded.
/// Merged as istanbul merges them (`nyc merge`, the oracle), a placeholder gives way to the
/// real record of another shard, and a file no shard loaded is one placeholder; in LCOV and in
/// `coverage-final.json` alike. (Every count, c.js's branches included, is compared in
/// `cross_format.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c8_placeholders_give_way_like_nyc_merge() {
    use covd::formats::Format;
    let oracle = read_lcov(
        &fixture("c8-placeholders/merged.info"),
        &PathRules::default(),
    );
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    for (run, format, ext) in [
        ("lcov", Format::Lcov, "info"),
        ("json", Format::Istanbul, "json"),
    ] {
        for shard in 1..=2 {
            let rules = PathRules {
                strip: vec![format!("/builds/shard-{shard}/")],
                ..PathRules::default()
            };
            let path = fixture(&format!("c8-placeholders/shard{shard}.{ext}"));
            let c = read_format(format, &path, &rules);
            assert!(c.files["src/never.js"].is_placeholder(), "{run}");
            push(&mut client, run, &shard.to_string(), 1, c).await;
        }
        let (_, merged) = fetch(&mut client, run).await;
        assert_eq!(
            merged.files.keys().collect::<Vec<_>>(),
            oracle.files.keys().collect::<Vec<_>>()
        );
        for path in ["src/a.js", "src/b.js", "src/never.js", "src/empty.js"] {
            let (ours, theirs) = (&merged.files[path], &oracle.files[path]);
            assert_eq!(shape(ours), shape(theirs), "{run}: {path}");
            assert_eq!(
                ours.line_hits().collect::<Vec<_>>(),
                theirs.line_hits().collect::<Vec<_>>(),
                "{run}: {path}"
            );
        }
        let c = &merged.files["src/c.js"];
        assert_eq!(c.lines(), oracle.files["src/c.js"].lines(), "{run}");
        assert!(!c.is_placeholder());
        // Totals without the placeholders of loaded files: istanbul's 30/52 lines.
        let status = client.status(run).await.unwrap();
        assert_eq!(
            (status.totals.lines_covered, status.totals.lines),
            (30, 52),
            "{run}"
        );
    }
}
