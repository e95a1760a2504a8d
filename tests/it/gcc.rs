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
