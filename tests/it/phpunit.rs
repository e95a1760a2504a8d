//! PHPUnit's XML coverage (`--coverage-xml`), pushed with the Clover report of the same run:
//! the tests of every line, merged over three shards, equal php-code-coverage's own merge
//! (`tests/fixtures/phpunit/merged/`, read here with quick-xml, not with covd's reader), and
//! the lines equal its merged Clover report.

use std::collections::{BTreeMap, BTreeSet};

use covd::service::{RunParams, ShardState};
use quick_xml::events::Event;

use crate::impact::covd_with_input;
use crate::support::*;

/// Per file (`src/NAME.php`), per line that ran, the tests that ran it.
type Attribution = BTreeMap<String, BTreeMap<u32, BTreeSet<String>>>;

fn attr(e: &quick_xml::events::BytesStart<'_>, name: &str) -> String {
    e.try_get_attribute(name)
        .unwrap()
        .unwrap_or_else(|| panic!("no {name}"))
        .normalized_value(quick_xml::XmlVersion::Implicit1_0)
        .unwrap()
        .into_owned()
}

/// The merged report's attribution, file by file.
fn merged_attribution() -> Attribution {
    let dir = fixture("phpunit/merged");
    let mut out = Attribution::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() == "index.xml" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut reader = quick_xml::Reader::from_str(&text);
        let (mut file, mut line) = (String::new(), 0);
        loop {
            match reader.read_event().unwrap() {
                Event::Eof => break,
                Event::Start(e) | Event::Empty(e) => match e.local_name().as_ref() {
                    "file" => file = format!("src/{}", attr(&e, "name")),
                    "line" if e.try_get_attribute("nr").unwrap().is_some() => {
                        line = attr(&e, "nr").parse().unwrap();
                    }
                    "covered" => {
                        out.entry(file.clone())
                            .or_default()
                            .entry(line)
                            .or_default()
                            .insert(attr(&e, "by"));
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    out
}

/// The merged Clover report's lines and covered lines (`<metrics statements
/// coveredstatements>` of the project).
fn merged_clover_lines() -> (u64, u64) {
    let text = std::fs::read_to_string(fixture("phpunit/merged.clover.xml")).unwrap();
    let mut reader = quick_xml::Reader::from_str(&text);
    let mut last = None;
    loop {
        match reader.read_event().unwrap() {
            Event::Eof => break,
            Event::Start(e) | Event::Empty(e) if e.local_name().as_ref() == "metrics" => {
                last = Some((
                    attr(&e, "statements").parse().unwrap(),
                    attr(&e, "coveredstatements").parse().unwrap(),
                ));
            }
            _ => {}
        }
    }
    // The project's metrics come last.
    last.unwrap()
}

fn push_args(run: &str, shard: u32, clover: u32, report: u32) -> Vec<String> {
    vec![
        "push".into(),
        "--run".into(),
        run.into(),
        "--shard".into(),
        shard.to_string(),
        "--map-prefix".into(),
        format!("/builds/shard-{clover}/src/=src/"),
        fixture(&format!("phpunit/shard{clover}.clover.xml"))
            .display()
            .to_string(),
        fixture(&format!("phpunit/shard{report}"))
            .display()
            .to_string(),
    ]
}

async fn covd(url: &str, args: &[String]) -> (Option<i32>, String) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = covd_with_input(url, &args, Vec::new()).await;
    (code, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_shards_give_every_lines_tests_as_phpunits_merge() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    let params = RunParams {
        expected_shards: vec!["1".into(), "2".into(), "3".into()],
        ..RunParams::default()
    };
    client.open_run("php", params).await.unwrap();
    for shard in 1..=3 {
        let (code, err) = covd(&daemon.url, &push_args("php", shard, shard, shard)).await;
        assert_eq!(code, Some(0), "{err}");
    }
    let status = client.status("php").await.unwrap();
    assert!(status.complete);
    // The report's tools are tags of each shard's test run.
    for shard in &status.shards {
        let tags = &shard.telemetry.as_ref().expect("telemetry").tags;
        for (tool, version) in [
            ("phpunit", "9.6.7"),
            ("php-code-coverage", "9.2.26"),
            ("php", "8.2.31"),
            ("pcov", "1.0.11"),
        ] {
            assert_eq!(
                tags.get(tool).map(String::as_str),
                Some(version),
                "{tags:?}"
            );
        }
    }
    let (lines, covered) = merged_clover_lines();
    assert_eq!(
        (status.totals.lines, status.totals.lines_covered),
        (lines, covered)
    );
    assert_eq!((lines, covered), (58, 53));

    let oracle = merged_attribution();
    assert_eq!(oracle.len(), 5);
    let mut pairs = 0;
    for (path, by_line) in &oracle {
        let file = client.file("php", path).await.unwrap();
        for (line, hits) in file.line_hits() {
            let got: BTreeSet<String> = client
                .tests_for_lines("php", &[(path.clone(), vec![(line, line)])])
                .await
                .unwrap()
                .tests
                .iter()
                .map(|t| t.to_string())
                .collect();
            let want = by_line.get(&line).cloned().unwrap_or_default();
            assert_eq!(got, want, "{path}:{line}");
            // PHPUnit's Clover counts the tests that ran a line.
            assert_eq!(hits, want.len() as u64, "{path}:{line}");
            pairs += want.len();
        }
    }
    // `Money` line 12 alone ran in 18 tests (the fixture's README).
    assert_eq!(oracle["src/Money.php"][&12].len(), 18);

    // Each test's lines, the other way round.
    let mut by_test: BTreeMap<String, BTreeMap<String, Vec<u32>>> = BTreeMap::new();
    for (path, by_line) in &oracle {
        for (line, tests) in by_line {
            for t in tests {
                let files = by_test.entry(t.clone()).or_default();
                files.entry(path.clone()).or_default().push(*line);
            }
        }
    }
    assert_eq!(
        client.tests("php").await.unwrap(),
        by_test.keys().cloned().collect::<Vec<_>>()
    );
    for (test, want) in &by_test {
        let got: BTreeMap<String, Vec<u32>> = client
            .test_lines("php", test)
            .await
            .unwrap()
            .into_iter()
            .map(|(p, l)| (p, l.iter().collect()))
            .collect();
        assert_eq!(&got, want, "{test}");
    }
    assert!(pairs > 150, "{pairs} (line, test) pairs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_without_its_clover_or_of_another_run_is_refused() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    let report = fixture("phpunit/shard1").display().to_string();

    // Alone: it cannot say which lines did not run.
    let alone: Vec<String> = ["push", "--run", "p1", "--shard", "1", &report]
        .map(String::from)
        .to_vec();
    let (code, err) = covd(&daemon.url, &alone).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("lists only the lines that ran"), "{err}");
    assert!(err.contains("--coverage-clover"), "{err}");

    // A file of the report, pushed as a coverage file.
    let part = fixture("phpunit/shard1/Cart.php.xml").display().to_string();
    let clover = fixture("phpunit/shard1.clover.xml").display().to_string();
    let one: Vec<String> = ["push", "--run", "p2", "--shard", "1", &clover, &part]
        .map(String::from)
        .to_vec();
    let (code, err) = covd(&daemon.url, &one).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("is a file of PHPUnit's XML coverage report"),
        "{err}"
    );

    // With the Clover report of another shard: the paths differ (shard-2's files), so no
    // record takes the report's files.
    let (code, err) = covd(&daemon.url, &push_args("p3", 1, 2, 1)).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("are in no coverage file pushed with it"),
        "{err}"
    );

    // With another run's Clover under the same paths: the lines that ran differ.
    let other = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixture("phpunit/shard2.clover.xml")).unwrap();
    let moved = other.path().join("shard1.clover.xml");
    std::fs::write(&moved, text.replace("/builds/shard-2/", "/builds/shard-1/")).unwrap();
    let mut args = push_args("p4", 1, 1, 1);
    args[7] = moved.display().to_string();
    let (code, err) = covd(&daemon.url, &args).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("are they reports of the same run?"), "{err}");

    // A directory that is not a report.
    let empty = tempfile::tempdir().unwrap();
    let mut args = alone.clone();
    args[5] = empty.path().display().to_string();
    let (code, err) = covd(&daemon.url, &args).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is a directory"), "{err}");

    // Like any push stopped by a bad file, the shard did not finish: what it sent before the
    // error stays an unfinished attempt, and a new attempt replaces it.
    let status = client.status("p4").await.unwrap();
    assert!(!status.complete);
    assert!(
        status
            .shards
            .iter()
            .all(|s| s.state != ShardState::Finished),
        "{status:?}"
    );
    let mut right = push_args("p4", 1, 1, 1);
    right.extend(["--attempt".into(), "2".into()]);
    let (code, err) = covd(&daemon.url, &right).await;
    assert_eq!(code, Some(0), "{err}");
    let status = client.status("p4").await.unwrap();
    assert_eq!((status.totals.lines, status.totals.lines_covered), (58, 41));
}
