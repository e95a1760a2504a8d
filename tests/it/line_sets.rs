//! Set algebra over covered lines, checked against coverage.py's own reports (the merged one,
//! its contexts, and the shards'), read with serde.

use std::collections::{BTreeMap, BTreeSet};

use covd::client::ClientError;
use covd::service::{LineSet, RunParams};
use tonic::Code;

use crate::attribution::{merged_contexts, merged_executed, merged_measured};
use crate::differential::shard_executed;
use crate::impact::{covd_with_input, toolz_run};
use crate::support::*;

type Lines = BTreeMap<String, Vec<u32>>;

fn as_map(files: Vec<(String, roaring::RoaringBitmap)>) -> Lines {
    files
        .into_iter()
        .map(|(p, l)| (p, l.iter().collect()))
        .collect()
}

/// Per file, `f(path)`'s lines, files with none left out.
fn expect(f: impl Fn(&str) -> BTreeSet<u32>) -> Lines {
    merged_measured()
        .keys()
        .filter_map(|p| {
            let lines: Vec<u32> = f(p).into_iter().collect();
            (!lines.is_empty()).then(|| (p.clone(), lines))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unions_intersections_and_differences_of_runs_and_tests() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    toolz_run(&mut client, "all").await;
    let params = RunParams {
        expected_shards: vec!["1".into(), "2".into()],
        ..RunParams::default()
    };
    client.open_run("half", params).await.unwrap();
    for i in 1..=2u32 {
        let shard = crate::corpus::read_json(
            &format!("python-toolz/same-path/shard{i}.json.gz"),
            &Default::default(),
        );
        push(&mut client, "half", &i.to_string(), 1, shard).await;
    }
    let covered = |r: &str| Box::new(LineSet::Covered(r.into()));
    let (one, two) = (shard_executed(1), shard_executed(2));

    // Covered by the whole suite but not by the first two shards.
    let only_later = LineSet::Difference(covered("all"), covered("half"));
    let got = as_map(client.lines(&only_later, "").await.unwrap());
    let want = expect(|p| {
        let early: BTreeSet<u32> = one[p].union(&two[p]).copied().collect();
        merged_executed()[p].difference(&early).copied().collect()
    });
    assert!(!want.is_empty());
    assert_eq!(got, want);

    // Measured but not covered: the missed lines; under one directory only.
    let missed = LineSet::Difference(Box::new(LineSet::Measured("all".into())), covered("all"));
    let got = as_map(client.lines(&missed, "toolz/sandbox").await.unwrap());
    let want: Lines = expect(|p| {
        merged_measured()[p]
            .difference(&merged_executed()[p])
            .copied()
            .collect()
    })
    .into_iter()
    .filter(|(p, _)| p.starts_with("toolz/sandbox/"))
    .collect();
    assert_eq!(got, want);

    // Union and intersection of the first two shards' runs as two operands of one run each.
    let both = LineSet::Intersection(covered("half"), covered("all"));
    let got = as_map(client.lines(&both, "").await.unwrap());
    assert_eq!(got, expect(|p| one[p].union(&two[p]).copied().collect()));

    // The lines only one test covers, for the test that ran the most lines.
    let mut by_test: BTreeMap<&str, usize> = BTreeMap::new();
    for lines in merged_contexts().values() {
        for labels in lines.values() {
            for l in labels.iter().filter(|l| l.contains('|')) {
                *by_test.entry(l).or_default() += 1;
            }
        }
    }
    let test = by_test
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(t, _)| *t)
        .unwrap();
    let only = LineSet::Difference(
        Box::new(LineSet::Test {
            run: "all".into(),
            test: test.into(),
        }),
        Box::new(LineSet::TestsExcept {
            run: "all".into(),
            test: test.into(),
        }),
    );
    let got = as_map(client.lines(&only, "").await.unwrap());
    let want = expect(|p| {
        merged_contexts()[p]
            .iter()
            .filter(|(_, labels)| labels.len() == 1 && labels.contains(test))
            .map(|(l, _)| *l)
            .collect()
    });
    assert!(!want.is_empty(), "{test} runs some lines alone");
    assert_eq!(got, want);

    // The command, with its default run and a quoted test name.
    let expr = format!(r#"test:"{test}" - tests-except:"{test}""#);
    let args = ["lines", "--run", "all", &expr, "--format", "json"];
    let (code, out, err) = covd_with_input(&daemon.url, &args, Vec::new()).await;
    assert_eq!(code, Some(0), "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let total: usize = want.values().map(Vec::len).sum();
    assert_eq!(json["lines"].as_u64(), Some(total as u64));
    let args = ["lines", "covered:all - ", "--format", "json"];
    let (code, _, err) = covd_with_input(&daemon.url, &args, Vec::new()).await;
    assert_eq!(code, Some(2), "{err}");

    // Unknown tests and runs are named.
    let refused = |e: ClientError| match e {
        ClientError::Status(s) => (s.code(), s.message().to_owned()),
        other => panic!("{other}"),
    };
    let no_test = LineSet::Test {
        run: "all".into(),
        test: "nope".into(),
    };
    let (code, message) = refused(client.lines(&no_test, "").await.unwrap_err());
    assert_eq!(code, Code::NotFound);
    assert!(message.contains("no test `nope`"), "{message}");
    let (code, _) = refused(
        client
            .lines(&LineSet::Covered("gone".into()), "")
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::NotFound);
}
