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

fn shard_file(i: u32) -> covd::model::Coverage {
    crate::corpus::read_json(
        &format!("python-toolz/same-path/shard{i}.json.gz"),
        &Default::default(),
    )
}

/// Per file, the lines shard `of` ran and none of `others` did.
fn only_in(of: u32, others: &[u32]) -> Lines {
    let others: Vec<_> = others.iter().map(|i| shard_executed(*i)).collect();
    let mine = shard_executed(of);
    expect(|p| {
        let mut lines = mine.get(p).cloned().unwrap_or_default();
        for other in &others {
            lines.retain(|l| !other.get(p).is_some_and(|o| o.contains(l)));
        }
        lines
    })
}

/// "Lines covered only by shard 2": read from the delta log while the run is open, from the
/// lines compaction stored once it is complete, after a restart too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_are_operands_before_and_after_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let settings = || covd::Settings {
        data_dir: Some(dir.path().to_owned()),
        ..covd::Settings::default()
    };
    let daemon = Daemon::with(settings()).await;
    let mut client = daemon.client();
    let params = RunParams {
        expected_shards: ["1", "2", "3", "4"].map(String::from).to_vec(),
        ..RunParams::default()
    };
    client.open_run("all", params).await.unwrap();
    for i in 1..=3u32 {
        push(&mut client, "all", &i.to_string(), 1, shard_file(i)).await;
    }
    let shard = |s: &str| {
        Box::new(LineSet::Shard {
            run: "all".into(),
            shard: s.into(),
        })
    };
    let others = LineSet::Union(Box::new(LineSet::Union(shard("1"), shard("3"))), shard("4"));
    let only_2 = LineSet::Difference(shard("2"), Box::new(others));
    // Shard 4 has sent nothing yet: it covered nothing.
    let got = as_map(client.lines(&only_2, "").await.unwrap());
    assert_eq!(got, only_in(2, &[1, 3]));
    assert!(!got.is_empty());

    push(&mut client, "all", "4", 1, shard_file(4)).await;
    assert!(client.status("all").await.unwrap().complete);
    let want = only_in(2, &[1, 3, 4]);
    assert_ne!(want, only_in(2, &[1, 3]));
    assert_eq!(as_map(client.lines(&only_2, "").await.unwrap()), want);
    daemon.stop().await.unwrap();

    // After a restart the run is compacted: no delta log, the stored shard lines.
    let daemon = Daemon::with(settings()).await;
    let mut client = daemon.client();
    assert_eq!(as_map(client.lines(&only_2, "").await.unwrap()), want);
    let every = LineSet::Union(
        Box::new(LineSet::Union(shard("1"), shard("2"))),
        Box::new(LineSet::Union(shard("3"), shard("4"))),
    );
    assert_eq!(
        as_map(client.lines(&every, "").await.unwrap()),
        expect(|p| merged_executed()[p].clone())
    );

    // The command, and an unknown shard.
    let expr = "shard:2 - (shard:1 | shard:3 | shard:4)";
    let args = ["lines", "--run", "all", expr, "--format", "json"];
    let (code, out, err) = covd_with_input(&daemon.url, &args, Vec::new()).await;
    assert_eq!(code, Some(0), "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let total: usize = want.values().map(Vec::len).sum();
    assert_eq!(json["lines"].as_u64(), Some(total as u64));
    match client.lines(&shard("9"), "").await.unwrap_err() {
        ClientError::Status(s) => {
            assert_eq!(s.code(), Code::NotFound);
            assert!(s.message().contains("no shard `9`"), "{}", s.message());
        }
        other => panic!("{other}"),
    }
}

/// "Covered by the integration runs of a commit but not by its unit runs": the runs of the
/// commit that carry each flag, together; another commit's runs do not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_gather_the_runs_of_a_commit() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    for (run, commit, flag, shards) in [
        ("unit-a", "c1", "unit", &[1][..]),
        ("unit-b", "c1", "unit", &[2][..]),
        ("integration", "c1", "integration", &[3, 4][..]),
        ("later", "c2", "unit", &[3][..]),
    ] {
        let params = RunParams {
            project: "toolz".into(),
            commit: commit.into(),
            flags: [flag.to_owned()].into(),
            ..RunParams::default()
        };
        client.open_run(run, params).await.unwrap();
        for i in shards {
            push(&mut client, run, &i.to_string(), 1, shard_file(*i)).await;
        }
    }
    let flag = |name: &str, commit: &str| {
        Box::new(LineSet::Flag {
            project: String::new(),
            commit: commit.into(),
            flag: name.into(),
        })
    };
    let got = as_map(
        client
            .lines(
                &LineSet::Difference(flag("integration", "c1"), flag("unit", "c1")),
                "",
            )
            .await
            .unwrap(),
    );
    let (one, two, three, four) = (
        shard_executed(1),
        shard_executed(2),
        shard_executed(3),
        shard_executed(4),
    );
    let want = expect(|p| {
        let get = |s: &BTreeMap<String, BTreeSet<u32>>| s.get(p).cloned().unwrap_or_default();
        let unit: BTreeSet<u32> = get(one).union(&get(two)).copied().collect();
        get(three)
            .union(&get(four))
            .filter(|l| !unit.contains(l))
            .copied()
            .collect()
    });
    assert!(!want.is_empty());
    assert_eq!(got, want);

    // Through the command: --commit, --project.
    let args = [
        "lines",
        "--commit",
        "c1",
        "--project",
        "toolz",
        "flag:integration - flag:unit",
        "--format",
        "json",
    ];
    let (code, out, err) = covd_with_input(&daemon.url, &args, Vec::new()).await;
    assert_eq!(code, Some(0), "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let total: usize = want.values().map(Vec::len).sum();
    assert_eq!(json["lines"].as_u64(), Some(total as u64));

    // A flag no run of the commit carries, and a project that has none.
    for (project, commit, name) in [("", "c2", "integration"), ("other", "c1", "unit")] {
        let set = LineSet::Flag {
            project: project.into(),
            commit: commit.into(),
            flag: name.into(),
        };
        match client.lines(&set, "").await.unwrap_err() {
            ClientError::Status(s) => {
                assert_eq!(s.code(), Code::NotFound);
                assert!(s.message().contains("carries flag"), "{}", s.message());
            }
            other => panic!("{other}"),
        }
    }
}
