//! The real tools' own merges as the oracle: coverage.py's `combine` of 4 pytest shards.

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
