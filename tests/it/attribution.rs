//! Per-test attribution through the daemon's queries: which tests covered some lines, which
//! lines a test covered, which tests a run has seen. The oracle is coverage.py's own merged
//! report, read here with serde_json (not with covd's reader, which reads the shards).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use covd::client::{Client, ClientError, PushInput, PushOptions, PushTarget};
use covd::model::{FileBuilder, FileCoverage};
use covd::server::Settings;
use covd::service::RunParams;
use tokio::sync::mpsc;
use tonic::Code;

use crate::corpus::read_json;
use crate::support::*;

/// What `merged.json`'s file-level `contexts` say: per file, per line, the labels that ran it.
pub(crate) type Contexts = BTreeMap<String, BTreeMap<u32, BTreeSet<String>>>;

/// What `merged.json` says coverage.py measured: per file, its executed and missing lines.
pub(crate) type Measured = BTreeMap<String, BTreeSet<u32>>;

pub(crate) fn merged_contexts() -> &'static Contexts {
    &merged_report().0
}

pub(crate) fn merged_measured() -> &'static Measured {
    &merged_report().1
}

/// Per file, the lines `merged.json` says ran.
pub(crate) fn merged_executed() -> &'static Measured {
    &merged_report().2
}

/// Read once for every test (a debug build parses the 9 MB report in seconds). Only the
/// file-level `contexts` and line lists are kept; the rest is skipped.
fn merged_report() -> &'static (Contexts, Measured, Measured) {
    #[derive(serde::Deserialize)]
    struct Report {
        files: BTreeMap<String, FileReport>,
    }
    #[derive(serde::Deserialize)]
    struct FileReport {
        contexts: BTreeMap<u32, BTreeSet<String>>,
        executed_lines: Vec<u32>,
        missing_lines: Vec<u32>,
    }
    static REPORT: OnceLock<(Contexts, Measured, Measured)> = OnceLock::new();
    REPORT.get_or_init(|| {
        let gz = std::fs::File::open(corpus("python-toolz/same-path/merged.json.gz")).unwrap();
        let input = std::io::BufReader::new(flate2::read::GzDecoder::new(gz));
        let report: Report = serde_json::from_reader(input).unwrap();
        let mut contexts = Contexts::new();
        let mut measured = Measured::new();
        let mut executed = Measured::new();
        for (path, file) in report.files {
            let lines = file.executed_lines.iter().chain(&file.missing_lines);
            measured.insert(path.clone(), lines.copied().collect());
            executed.insert(path.clone(), file.executed_lines.into_iter().collect());
            contexts.insert(path, file.contexts);
        }
        (contexts, measured, executed)
    })
}

/// Streams the four same-path shards of the toolz corpus into `run`.
pub(crate) async fn push_toolz(client: &mut Client, run: &str) {
    for i in 1..=4 {
        let shard = read_json(
            &format!("python-toolz/same-path/shard{i}.json.gz"),
            &Default::default(),
        );
        push(client, run, &i.to_string(), 1, shard).await;
    }
}

async fn tests_for(
    client: &mut Client,
    run: &str,
    path: &str,
    ranges: &[(u32, u32)],
) -> Vec<String> {
    let files = [(path.to_owned(), ranges.to_vec())];
    let answer = client.tests_for_lines(run, &files).await.unwrap();
    assert!(
        answer.unknown_files.is_empty(),
        "{:?}",
        answer.unknown_files
    );
    answer.tests.iter().map(|t| t.to_string()).collect()
}

/// Every line of every file names the tests coverage.py's merged contexts name, and every test
/// names the lines they say it ran; a range and a whole file name the union of their lines'
/// tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tests_of_lines_and_lines_of_tests_are_what_coverage_py_merged() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    push_toolz(&mut client, "ctx").await;
    let contexts = merged_contexts();

    let mut pairs = 0;
    for (path, lines) in contexts {
        let last = lines.keys().max().copied().unwrap_or(1);
        pairs += lines.values().map(BTreeSet::len).sum::<usize>();
        // Every line up to one past the last that ran: lines no test ran name none.
        for line in 1..=last + 1 {
            let want: Vec<String> = lines.get(&line).into_iter().flatten().cloned().collect();
            let got = tests_for(&mut client, "ctx", path, &[(line, line)]).await;
            assert_eq!(got, want, "{path}:{line}");
        }
        // The whole file, and its first half as one range.
        let all: BTreeSet<String> = lines.values().flatten().cloned().collect();
        let got = tests_for(&mut client, "ctx", path, &[]).await;
        assert_eq!(got, all.iter().cloned().collect::<Vec<_>>(), "{path}");
        let half = last / 2 + 1;
        let want: BTreeSet<String> = lines.range(1..=half).flat_map(|(_, t)| t.clone()).collect();
        let got = tests_for(&mut client, "ctx", path, &[(1, half)]).await;
        assert_eq!(got, want.into_iter().collect::<Vec<_>>(), "{path}:1-{half}");
    }
    assert_eq!(pairs, 10_924, "(line, test) pairs in merged.json");

    // The other way round: each test's lines, file by file.
    let mut by_test: BTreeMap<&str, BTreeMap<&str, Vec<u32>>> = BTreeMap::new();
    for (path, lines) in contexts {
        for (line, labels) in lines {
            for label in labels {
                let files = by_test.entry(label).or_default();
                files.entry(path).or_default().push(*line);
            }
        }
    }
    let tests = client.tests("ctx").await.unwrap();
    assert_eq!(
        tests,
        by_test.keys().map(|t| t.to_string()).collect::<Vec<_>>()
    );
    assert_eq!(tests.len(), 166);
    for (test, want) in &by_test {
        let got = client.test_lines("ctx", test).await.unwrap();
        let got: BTreeMap<&str, Vec<u32>> = got
            .iter()
            .map(|(path, lines)| (path.as_str(), lines.iter().collect()))
            .collect();
        assert_eq!(&got, want, "{test}");
    }
}

/// Several files in one question: the union of their tests; a file the run does not hold is
/// named, not silently answered with no tests; bad lines and unknown tests are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_name_unknown_files_and_refuse_bad_lines() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    push_toolz(&mut client, "ctx").await;
    let contexts = merged_contexts();

    let (a, b) = ("toolz/itertoolz.py", "toolz/dicttoolz.py");
    let files = [
        (a.to_owned(), vec![]),
        (b.to_owned(), vec![(1, 40)]),
        ("toolz/nothere.py".to_owned(), vec![]),
    ];
    let answer = client.tests_for_lines("ctx", &files).await.unwrap();
    assert_eq!(answer.unknown_files, ["toolz/nothere.py"]);
    let mut want: BTreeSet<String> = contexts[a].values().flatten().cloned().collect();
    want.extend(contexts[b].range(1..=40).flat_map(|(_, t)| t.clone()));
    let got: Vec<String> = answer.tests.iter().map(|t| t.to_string()).collect();
    assert_eq!(got, want.into_iter().collect::<Vec<_>>());

    let refused = |e: ClientError| match e {
        ClientError::Status(s) => (s.code(), s.message().to_owned()),
        other => panic!("{other}"),
    };
    for (ranges, says) in [
        (
            vec![(0, 3)],
            "files[0].ranges[0]: lines are numbered from 1",
        ),
        (
            vec![(1, 2), (9, 3)],
            "files[0].ranges[1]: the range 9-3 ends before it starts",
        ),
        (
            vec![(1, 4_000_000_000)],
            "files[0].ranges[0]: line 4000000000 is beyond",
        ),
    ] {
        let files = [(a.to_owned(), ranges)];
        let (code, message) = refused(client.tests_for_lines("ctx", &files).await.unwrap_err());
        assert_eq!(code, Code::InvalidArgument);
        assert!(message.starts_with(says), "{message}");
    }
    let (code, message) = refused(client.test_lines("ctx", "no_such_test").await.unwrap_err());
    assert_eq!(code, Code::NotFound);
    assert!(message.contains("no test `no_such_test`"), "{message}");
    let (code, _) = refused(client.tests("nothere").await.unwrap_err());
    assert_eq!(code, Code::NotFound);
}

/// A complete run is stored merged (compacted); read back from that record after a restart,
/// it answers the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attribution_outlives_compaction_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let settings = || Settings {
        data_dir: Some(dir.path().to_owned()),
        ..Settings::default()
    };
    let contexts = merged_contexts();
    let path = "toolz/functoolz.py";
    let lines = &contexts[path];
    let line = *lines.iter().max_by_key(|(_, t)| t.len()).unwrap().0;
    let want: Vec<String> = lines[&line].iter().cloned().collect();

    let daemon = Daemon::with(settings()).await;
    let mut client = daemon.client();
    let params = RunParams {
        expected_shards: ["1", "2", "3", "4"].map(String::from).to_vec(),
        ..RunParams::default()
    };
    client.open_run("ctx", params).await.unwrap();
    push_toolz(&mut client, "ctx").await;
    assert!(client.status("ctx").await.unwrap().complete);
    assert_eq!(
        tests_for(&mut client, "ctx", path, &[(line, line)]).await,
        want
    );
    daemon.stop().await.unwrap();

    let daemon = Daemon::with(settings()).await;
    let mut client = daemon.client();
    assert_eq!(
        tests_for(&mut client, "ctx", path, &[(line, line)]).await,
        want
    );
    assert_eq!(client.tests("ctx").await.unwrap().len(), 166);
    let test = &want[want.len() / 2];
    let got = client.test_lines("ctx", test).await.unwrap();
    assert!(
        got.iter().any(|(p, l)| p == path && l.contains(line)),
        "{test}"
    );
}

/// A test's name and what its delta holds.
pub(crate) type TestDelta = (&'static str, Vec<(&'static str, FileCoverage)>);

/// Pushes shard `shard` of `run` as a client that sends one delta per test
/// (`PushInput::TestDelta`): each test with its files.
pub(crate) async fn push_tests(
    client: &mut Client,
    run: &str,
    shard: &str,
    tests: Vec<TestDelta>,
) -> Result<covd::client::PushReport, ClientError> {
    let (tx, rx) = mpsc::channel(tests.len() + 1);
    for (test, files) in tests {
        let files = files.into_iter().map(|(p, f)| (p.to_owned(), f)).collect();
        let test = test.to_owned();
        tx.send(PushInput::TestDelta { test, files }).await.unwrap();
    }
    tx.send(PushInput::Done(None)).await.unwrap();
    let target = PushTarget {
        run_id: run.into(),
        shard_id: shard.into(),
        attempt: 1,
        ..PushTarget::default()
    };
    client.push(&target, rx, &PushOptions::default()).await
}

/// A file with `covered` lines run once and `missed` lines not run.
pub(crate) fn lines(covered: &[u32], missed: &[u32]) -> FileCoverage {
    let mut b = FileBuilder::new();
    for l in covered {
        b.line(*l, 1);
    }
    for l in missed {
        b.line(*l, 0);
    }
    b.build()
}

/// A client that sends one delta per test (`PushInput::TestDelta`): each test is credited
/// with the lines its delta covered, not those it listed unrun; tests of two shards add up.
#[tokio::test]
async fn a_delta_per_test_attributes_its_covered_lines() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    let shards: [(&str, Vec<TestDelta>); 2] = [
        (
            "1",
            vec![
                (
                    "t::a",
                    vec![("a.c", lines(&[1, 2], &[3])), ("b.c", lines(&[7], &[]))],
                ),
                ("t::b", vec![("a.c", lines(&[3], &[1, 2]))]),
            ],
        ),
        ("2", vec![("t::c", vec![("a.c", lines(&[2, 3], &[1]))])]),
    ];
    for (shard, tests) in shards {
        push_tests(&mut client, "r", shard, tests).await.unwrap();
    }
    assert_eq!(
        tests_for(&mut client, "r", "a.c", &[(1, 1)]).await,
        ["t::a"]
    );
    assert_eq!(
        tests_for(&mut client, "r", "a.c", &[(2, 2)]).await,
        ["t::a", "t::c"]
    );
    assert_eq!(
        tests_for(&mut client, "r", "a.c", &[(3, 3)]).await,
        ["t::b", "t::c"]
    );
    assert_eq!(tests_for(&mut client, "r", "b.c", &[]).await, ["t::a"]);
    let a: Vec<(String, Vec<u32>)> = client
        .test_lines("r", "t::a")
        .await
        .unwrap()
        .into_iter()
        .map(|(p, l)| (p, l.iter().collect()))
        .collect();
    assert_eq!(
        a,
        [("a.c".to_owned(), vec![1, 2]), ("b.c".to_owned(), vec![7])]
    );
    assert_eq!(client.tests("r").await.unwrap(), ["t::a", "t::b", "t::c"]);
    // The counts merge as without names: line 2 ran in two tests.
    let file = client.file("r", "a.c").await.unwrap();
    assert_eq!(
        file.line_hits().collect::<Vec<_>>(),
        [(1, 1), (2, 2), (3, 2)]
    );
}
