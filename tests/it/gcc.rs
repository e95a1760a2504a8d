//! gcc + lcov shards, where `lcov -a` sums hit counts: our merge must equal it exactly.

use covd::model::path::PathRules;
use covd::model::{BranchArm, BranchKey};
use covd::service::RunParams;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcc_shards_merge_to_exactly_what_lcov_a_writes() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    client
        .open_run(
            "gcc",
            RunParams {
                expected_shards: vec!["1".into(), "2".into(), "3".into()],
                ..RunParams::default()
            },
        )
        .await
        .unwrap();
    let mut pushes = Vec::new();
    for i in 1..=3 {
        let rules = PathRules {
            strip: vec![format!("/builds/shard-{i}/")],
            ..PathRules::default()
        };
        let coverage = read_lcov(&fixture(&format!("gcc-lcov/shard{i}.info")), &rules);
        let mut client = daemon.client();
        pushes.push(tokio::spawn(async move {
            push(&mut client, "gcc", &i.to_string(), 1, coverage).await
        }));
    }
    for p in pushes {
        p.await.unwrap();
    }
    let (header, merged) = fetch(&mut client, "gcc").await;
    assert!(header.complete);
    let oracle = read_lcov(&fixture("gcc-lcov/merged.info"), &PathRules::default());
    // Counts, branches (with `-` distinct from 0) and functions, all exactly.
    assert_eq!(merged, oracle);

    let calc = &merged.files["src/calc.c"];
    assert_eq!(calc.hits_of(20), Some(11), "3 + 4 + 4");
    assert_eq!(
        merged.files["src/main.c"].hits_of(12),
        Some(17),
        "5 + 6 + 6"
    );
    let apply = calc
        .functions()
        .iter()
        .find(|f| &*f.name == "apply")
        .unwrap();
    assert_eq!(apply.hits, 11);
    let never = BranchKey {
        line: 59,
        block: 0,
        arm: BranchArm::Index(0),
    };
    let taken = calc.branches().iter().find(|(k, _)| *k == never).unwrap().1;
    assert_eq!(taken, None, "a block no shard ran stays `-`");
    let t = calc.totals();
    assert_eq!(
        (
            t.lines,
            t.lines_covered,
            t.functions,
            t.functions_hit,
            t.branches,
            t.branches_taken
        ),
        (41, 35, 6, 5, 23, 19)
    );

    // The per-file query agrees with the export.
    let file = client.file("gcc", "src/calc.c").await.unwrap();
    assert_eq!(&file, calc);
}

/// `lcov -a` of captures named with `lcov --test-name` keeps a `TN:` section per test: each
/// test is credited with the lines its own capture covered. The oracle is the per-test
/// captures, read here line by line (`SF:`, `DA:line,count`), not by covd's reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lcov_test_names_attribute_lines_to_tests() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    let merged = read_lcov(
        &fixture("gcc-lcov/per-test/merged.info"),
        &PathRules::default(),
    );
    push(&mut client, "tn", "1", 1, merged).await;

    let names = [
        "test_add",
        "test_classify",
        "test_divide",
        "test_factorial",
        "test_primes",
    ];
    // (path, line) -> the tests whose capture ran it.
    let mut want: std::collections::BTreeMap<(String, u32), Vec<String>> = Default::default();
    let mut every_line: std::collections::BTreeSet<(String, u32)> = Default::default();
    for name in names {
        let text =
            std::fs::read_to_string(fixture(&format!("gcc-lcov/per-test/{name}.info"))).unwrap();
        let mut path = String::new();
        for line in text.lines() {
            if let Some(p) = line.strip_prefix("SF:") {
                path = p.to_owned();
            } else if let Some(da) = line.strip_prefix("DA:") {
                let mut fields = da.split(',');
                let n: u32 = fields.next().unwrap().parse().unwrap();
                let count: u64 = fields.next().unwrap().parse().unwrap();
                every_line.insert((path.clone(), n));
                if count > 0 {
                    want.entry((path.clone(), n))
                        .or_default()
                        .push(name.to_owned());
                }
            }
        }
    }
    assert_eq!(client.tests("tn").await.unwrap(), names);
    for (path, line) in &every_line {
        let files = [(path.clone(), vec![(*line, *line)])];
        let answer = client.tests_for_lines("tn", &files).await.unwrap();
        let got: Vec<String> = answer.tests.iter().map(|t| t.to_string()).collect();
        let expected = want
            .get(&(path.clone(), *line))
            .cloned()
            .unwrap_or_default();
        assert_eq!(got, expected, "{path}:{line}");
    }
    assert!(want.values().any(|t| t.len() > 1) && want.values().any(|t| t.len() == 1));
}
