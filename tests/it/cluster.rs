//! Cluster mode's storage against a real PostgreSQL and a real S3 server on loopback (see
//! `services.rs`): a delta counts once however nodes race or die between staging and
//! publishing, a higher attempt stops the earlier one on every node, and a store that is down
//! is an error, never an acknowledgement.

use std::time::Duration;

use bytes::Bytes;
use covd::cluster::{Catalogue, ClusterError, Node, Outgoing, Segments};

use crate::services::{Postgres, S3};

async fn node(name: &str, pg: &Postgres, s3: &S3) -> Node {
    let catalogue = Catalogue::connect(&pg.url).await.unwrap();
    let segments = Segments::connect("s3://covd/test", s3.options()).unwrap();
    Node::new(name, catalogue, segments)
}

fn delta(shard: &str, attempt: u32, seq: u64, text: &str) -> Outgoing {
    Outgoing {
        run_id: "r".into(),
        shard_id: shard.into(),
        attempt,
        seq,
        body: vec![
            Bytes::from(format!("{shard}/{attempt}/{seq}: ")),
            Bytes::from(text.to_owned()),
        ],
    }
}

/// The run's deltas that count, as (shard, attempt, seq, record) from the node.
async fn counted(node: &Node) -> Vec<(String, u32, u64, String)> {
    node.read_run("r")
        .await
        .unwrap()
        .into_iter()
        .map(|(e, b)| {
            (
                e.shard_id,
                e.attempt,
                e.seq,
                String::from_utf8(b.to_vec()).unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_counts_once_across_nodes_that_race_or_die() {
    let (pg, s3) = (Postgres::start(), S3::start());
    let (a, b) = (node("a", &pg, &s3).await, node("b", &pg, &s3).await);
    assert_eq!(
        a.catalogue().start_attempt("r", "0", 1).await.unwrap(),
        (1, 0)
    );
    assert_eq!(
        a.catalogue().start_attempt("r", "1", 1).await.unwrap(),
        (1, 0)
    );

    // One segment with deltas of two shards: both count, and read back byte for byte from
    // the other node.
    let counts = a
        .commit(vec![
            delta("0", 1, 1, "x"),
            delta("1", 1, 1, "y"),
            delta("0", 1, 2, "z"),
        ])
        .await
        .unwrap();
    assert_eq!(counts, [true, true, true]);
    assert_eq!(
        counted(&b).await,
        [
            ("0".into(), 1, 1, "0/1/1: x".into()),
            ("0".into(), 1, 2, "0/1/2: z".into()),
            ("1".into(), 1, 1, "1/1/1: y".into()),
        ]
    );
    assert_eq!(b.catalogue().shard("r", "0").await.unwrap(), Some((1, 2)));

    // Two nodes took sequence 3 of shard 0 (its client reconnected elsewhere): one counts.
    let (won_a, won_b) = tokio::join!(
        a.commit(vec![delta("0", 1, 3, "from a")]),
        b.commit(vec![delta("0", 1, 3, "from b")]),
    );
    let (won_a, won_b) = (won_a.unwrap()[0], won_b.unwrap()[0]);
    assert!(
        won_a != won_b,
        "exactly one of the two counts: a {won_a}, b {won_b}"
    );
    let third: Vec<_> = counted(&a)
        .await
        .into_iter()
        .filter(|d| d.0 == "0" && d.2 == 3)
        .collect();
    let winner = if won_a { "from a" } else { "from b" };
    assert_eq!(third, [("0".into(), 1, 3, format!("0/1/3: {winner}"))]);

    // A node died between upload and publish: its segment is in the bucket, counted nowhere;
    // the sweep removes it (with the race's losing segment, which nothing refers to), and a
    // publish that comes after the sweep is refused.
    let (id, key, entries) = b.stage(vec![delta("1", 1, 2, "lost")]).await.unwrap();
    assert!(b.segments().exists(&key).await.unwrap());
    assert_eq!(a.catalogue().shard("r", "1").await.unwrap(), Some((1, 1)));
    assert!(counted(&a).await.iter().all(|d| !d.3.contains("lost")));
    assert_eq!(a.sweep(Duration::ZERO).await.unwrap(), 2);
    assert!(!b.segments().exists(&key).await.unwrap());
    assert_eq!(
        counted(&a).await.len(),
        4,
        "the sweep took nothing that counts"
    );
    match b.publish(id, &entries).await {
        Err(ClusterError::Swept(swept)) => assert_eq!(swept, id),
        other => panic!("a swept segment was published: {other:?}"),
    }
    // The client resends it; it counts once.
    assert_eq!(
        a.commit(vec![delta("1", 1, 2, "again")]).await.unwrap(),
        [true]
    );
    assert_eq!(
        a.commit(vec![delta("1", 1, 2, "again")]).await.unwrap(),
        [false]
    );

    // A higher attempt of shard 0 begins on node b: node a's delta of the earlier attempt no
    // longer counts, and the earlier attempt's deltas leave the run.
    assert_eq!(
        b.catalogue().start_attempt("r", "0", 2).await.unwrap(),
        (2, 0)
    );
    assert_eq!(
        a.catalogue().start_attempt("r", "0", 1).await.unwrap(),
        (2, 0)
    );
    assert_eq!(
        a.commit(vec![delta("0", 1, 4, "stale")]).await.unwrap(),
        [false]
    );
    assert_eq!(
        b.commit(vec![delta("0", 2, 1, "retry")]).await.unwrap(),
        [true]
    );
    assert_eq!(
        counted(&a).await,
        [
            ("0".into(), 2, 1, "0/2/1: retry".into()),
            ("1".into(), 1, 1, "1/1/1: y".into()),
            ("1".into(), 1, 2, "1/1/2: again".into()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_is_down_is_an_error_never_an_acknowledgement() {
    let (mut pg, s3) = (Postgres::start(), S3::start());
    let a = node("a", &pg, &s3).await;
    a.catalogue().start_attempt("r", "0", 1).await.unwrap();
    assert_eq!(a.commit(vec![delta("0", 1, 1, "x")]).await.unwrap(), [true]);
    pg.kill();
    let e = a.commit(vec![delta("0", 1, 2, "y")]).await.unwrap_err();
    assert!(matches!(e, ClusterError::Postgres(_)), "{e}");

    // Object storage down: the segment cannot be uploaded, so it is never published.
    let pg = Postgres::start();
    let a = node("a", &pg, &s3).await;
    a.catalogue().start_attempt("r", "0", 1).await.unwrap();
    drop(s3);
    let e = a.commit(vec![delta("0", 1, 1, "x")]).await.unwrap_err();
    assert!(matches!(e, ClusterError::ObjectStore(_)), "{e}");
    assert_eq!(a.catalogue().shard("r", "0").await.unwrap(), Some((1, 0)));
}

/// Two nodes' stores over the same catalogue, through the `Storage` trait the service uses.
mod store {
    use std::sync::Arc;

    use covd::cluster::{ClusterStore, Segments};
    use covd::model::FileBuilder;
    use covd::persist::codec::encode_files;
    use covd::persist::{RunRecord, ShardRecord, Storage, StoreError, Write};

    use crate::services::{Postgres, S3};

    async fn node(name: &str, pg: &Postgres, s3: &S3) -> Arc<ClusterStore> {
        let segments = Segments::connect("s3://covd/nodes", s3.options()).unwrap();
        Arc::new(
            ClusterStore::connect(name, &pg.url, segments)
                .await
                .unwrap(),
        )
    }

    /// Delta `seq` of shard `shard`'s first attempt: line `seq` of a.c, hit once.
    fn append(shard: &str, seq: u64) -> Vec<Write> {
        let mut b = FileBuilder::new();
        b.line(seq as u32, 1);
        vec![Write::AppendDelta {
            run_id: "r".into(),
            shard: ShardRecord {
                shard_id: shard.into(),
                attempt: 1,
                last_seq: seq,
                ..ShardRecord::default()
            },
            body: vec![encode_files([("a.c", &b.build())]).into()],
        }]
    }

    /// The lines the stored deltas of `shard` (up to `last_seq`) cover, in order.
    fn lines(store: &ClusterStore, shard: &str, last_seq: u64) -> Vec<u32> {
        let mut out = Vec::new();
        store
            .for_each_delta("r", &[(shard.into(), 1, last_seq)], &mut |_, batch| {
                for (_, f) in batch.to_files() {
                    out.extend(f.lines().iter());
                }
            })
            .unwrap();
        out
    }

    fn refused(result: Result<(), StoreError>) -> String {
        match result {
            Err(StoreError::Conflict(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_delta_counts_once_and_a_node_outlives_postgres_restarting() {
        let (mut pg, s3) = (Postgres::start(), S3::start());
        let (a, b) = (node("a", &pg, &s3).await, node("b", &pg, &s3).await);
        let run = RunRecord {
            run_id: "r".into(),
            project: "acme".into(),
            ..RunRecord::default()
        };
        a.write(vec![Write::PutRun(run)]).await.unwrap();
        a.write(append("0", 1)).await.unwrap();

        // Node b took delta 1 of the same attempt too (its client reconnected there): refused,
        // saying what the catalogue holds; it resumes from there.
        let why = refused(b.write(append("0", 1)).await);
        assert!(
            why.contains("another node") && why.contains("attempt 1 with 1 deltas acknowledged"),
            "{why}"
        );
        b.write(append("0", 2)).await.unwrap();
        // Two calls for one sequence at once on one node: one counts, and a call of another
        // shard in the same moment is not held back by the refused one.
        let (x, y, z) = tokio::join!(
            b.write(append("0", 3)),
            b.write(append("0", 3)),
            b.write(append("1", 1))
        );
        assert!(x.is_ok() != y.is_ok(), "exactly one counts: {x:?} {y:?}");
        z.unwrap();
        let loaded = a.load_runs().unwrap();
        let shards: Vec<(String, u64)> = loaded[0]
            .shards
            .iter()
            .map(|s| (s.shard_id.clone(), s.last_seq))
            .collect();
        assert_eq!(shards, [("0".into(), 3), ("1".into(), 1)]);
        assert_eq!(lines(&a, "0", 3), [1, 2, 3]);

        // PostgreSQL down: nothing is acknowledged; back: the node reconnects and goes on.
        pg.kill();
        let e = a.write(append("0", 4)).await.unwrap_err();
        assert!(matches!(e, StoreError::Shared(_)), "{e}");
        assert!(a.load_runs().is_err());
        pg.restart();
        a.write(append("0", 4)).await.unwrap();
        assert_eq!(lines(&a, "0", 4), [1, 2, 3, 4]);
        assert_eq!(lines(&b, "0", 4), [1, 2, 3, 4]);
    }
}

/// Three daemons over the same PostgreSQL and bucket, a run's shards spread across them.
mod nodes {
    use std::sync::Arc;
    use std::time::Duration;

    use covd::cluster::{ClusterStore, Segments};
    use covd::model::Coverage;
    use covd::server::Settings;
    use covd::service::RunParams;

    use crate::services::{Postgres, S3};
    use crate::support::*;

    async fn node(name: &str, pg: &Postgres, s3: &S3) -> Daemon {
        let segments = Segments::connect("s3://covd/nodes", s3.options()).unwrap();
        let store = ClusterStore::connect(name, &pg.url, segments)
            .await
            .unwrap()
            .with_wire_decoder(covd::rpc::convert::wire_delta_files);
        Daemon::on(Settings::default(), Arc::new(store)).await
    }

    /// Sixteen shards: each of the toolz corpus' four LCOV shards split by file in four.
    pub(crate) fn sixteen_shards() -> Vec<Coverage> {
        let rules = covd::model::path::PathRules::default();
        let mut out = Vec::new();
        for i in 1..=4 {
            let whole = read_lcov(
                &corpus(&format!("python-toolz/same-path/shard{i}.lcov")),
                &rules,
            );
            let mut parts: Vec<Coverage> = (0..4).map(|_| Coverage::default()).collect();
            for (n, (path, file)) in whole.files.into_iter().enumerate() {
                parts[n % 4].files.insert(path, file);
            }
            out.extend(parts);
        }
        out
    }

    pub(crate) fn params() -> RunParams {
        RunParams {
            project: "toolz".into(),
            expected_shards: (0..16).map(|i| i.to_string()).collect(),
            ..RunParams::default()
        }
    }

    /// A run of two expected shards (`first`, then `second`) through one daemon of its own:
    /// its parameters, and its merged LCOV.
    pub(crate) async fn two_shards_alone(
        first: &Coverage,
        second: &Coverage,
    ) -> (RunParams, Vec<u8>) {
        let two = RunParams {
            expected_shards: vec!["0".into(), "1".into()],
            ..params()
        };
        let single = Daemon::start().await;
        single.client().open_run("r", two.clone()).await.unwrap();
        push(&mut single.client(), "r", "0", 1, first.clone()).await;
        push(&mut single.client(), "r", "1", 1, second.clone()).await;
        (two, export(&single, true).await)
    }

    pub(crate) async fn export(daemon: &Daemon, wait: bool) -> Vec<u8> {
        let mut out = Vec::new();
        daemon
            .client()
            .export("r", wait.then_some(Duration::from_secs(60)), &mut out)
            .await
            .unwrap();
        out
    }

    /// A node that merged part of a run, then another completed and compacted it there (its
    /// deltas gone from the catalogue, with no reopen window): the first answers from the
    /// compacted run, exactly.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_compacted_on_another_node_answers_exactly() {
        let (pg, s3) = (Postgres::start(), S3::start());
        let mut settings = Settings::default();
        settings.limits.reopen_window = None;
        let on = |name: &'static str| {
            let (settings, pg, s3) = (settings.clone(), &pg, &s3);
            async move {
                let segments = Segments::connect("s3://covd/compacted", s3.options()).unwrap();
                let store = ClusterStore::connect(name, &pg.url, segments)
                    .await
                    .unwrap()
                    .with_wire_decoder(covd::rpc::convert::wire_delta_files);
                Daemon::on(settings, Arc::new(store)).await
            }
        };
        let (a, b) = (on("a").await, on("b").await);
        let shards = sixteen_shards();
        let (two, want) = two_shards_alone(&shards[0], &shards[5]).await;

        a.client().open_run("r", two).await.unwrap();
        push(&mut a.client(), "r", "0", 1, shards[0].clone()).await;
        // b takes the run in, with shard 0 merged.
        let status = b.client().status("r").await.unwrap();
        assert_eq!(status.shards.iter().filter(|s| s.last_seq > 0).count(), 1);
        push(&mut a.client(), "r", "1", 1, shards[5].clone()).await;
        let (catalogue, connection) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let compacted = async {
            loop {
                let merged: i64 = catalogue
                    .query_one("SELECT count(*) FROM covd_merged WHERE run_id = 'r'", &[])
                    .await
                    .unwrap()
                    .get(0);
                if merged > 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), compacted)
            .await
            .expect("node a compacts the complete run");
        let deltas: i64 = catalogue
            .query_one(
                "SELECT count(*) FROM covd_segment_deltas WHERE run_id = 'r'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            deltas, 0,
            "no reopen window: the compaction dropped the deltas"
        );
        assert!(export(&b, false).await == want, "node b's export differs");
        let status = b.client().status("r").await.unwrap();
        assert!(status.complete);
    }

    /// PostgreSQL down while a retried shard's new attempt starts: the start is refused and
    /// nothing changes; once PostgreSQL is back, the same retry goes through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_attempt_refused_while_postgres_is_down_starts_once_it_is_back() {
        let (mut pg, s3) = (Postgres::start(), S3::start());
        let a = node("a", &pg, &s3).await;
        let shards = sixteen_shards();
        let (two, want) = two_shards_alone(&shards[2], &shards[5]).await;

        a.client().open_run("r", two).await.unwrap();
        push(&mut a.client(), "r", "0", 1, shards[0].clone()).await;
        pg.kill();
        let refused = try_push(&mut a.client(), "r", "0", 2, shards[2].clone()).await;
        assert!(refused.is_err(), "no attempt starts without PostgreSQL");
        pg.restart();
        push(&mut a.client(), "r", "0", 2, shards[2].clone()).await;
        push(&mut a.client(), "r", "1", 1, shards[5].clone()).await;
        assert!(
            export(&a, true).await == want,
            "the retried attempt replaced the first"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn any_node_answers_exactly_for_a_run_spread_over_three() {
        let (pg, s3) = (Postgres::start(), S3::start());
        let nodes = [
            node("a", &pg, &s3).await,
            node("b", &pg, &s3).await,
            node("c", &pg, &s3).await,
        ];
        let shards = sixteen_shards();

        // The same input through one daemon of its own.
        let single = Daemon::start().await;
        single.client().open_run("r", params()).await.unwrap();
        for (i, shard) in shards.iter().enumerate() {
            push(&mut single.client(), "r", &i.to_string(), 1, shard.clone()).await;
        }
        let want = export(&single, true).await;

        // Opened on a; c waits for the merged result before any shard has come.
        nodes[0].client().open_run("r", params()).await.unwrap();
        let c = nodes[2].url.clone();
        let waiting = tokio::spawn(async move {
            let mut out = Vec::new();
            covd::client::Client::connect(&c)
                .unwrap()
                .export("r", Some(Duration::from_secs(60)), &mut out)
                .await
                .unwrap();
            out
        });
        // Shard 0's first attempt, with the wrong coverage, lands on a; its second attempt
        // replaces it from b.
        push(&mut nodes[0].client(), "r", "0", 1, shards[3].clone()).await;
        push(&mut nodes[1].client(), "r", "0", 2, shards[0].clone()).await;
        for (i, shard) in shards.iter().enumerate().skip(1) {
            push(
                &mut nodes[i % 3].client(),
                "r",
                &i.to_string(),
                1,
                shard.clone(),
            )
            .await;
        }

        let heard = tokio::time::timeout(Duration::from_secs(60), waiting)
            .await
            .expect("the waiting export ends once the last shard finished elsewhere")
            .unwrap();
        assert!(!want.is_empty());
        assert!(heard == want, "node c's export differs from one daemon's");
        for node in &nodes {
            assert!(export(node, false).await == want, "{}", node.url);
            let status = node.client().status("r").await.unwrap();
            assert!(status.complete, "{}", node.url);
            assert_eq!(status.shards.len(), 16);
            assert_eq!(status.shards[0].attempt, 2);
        }
    }
}

/// Three `covd serve --cluster` processes; one is killed with SIGKILL while shards stream to it.
mod killed {
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use covd::client::{Client, PushInput, PushOptions, PushTarget};
    use covd::model::{Coverage, FileBuilder};
    use tokio::sync::{mpsc, watch};

    use crate::cli::{COVD, address};
    use crate::services::{Postgres, S3};
    use crate::support::*;

    /// A node: its process (killed when the test ends) and address.
    struct Node {
        child: Child,
        url: String,
        _data: tempfile::TempDir,
    }

    impl Node {
        fn start(pg: &Postgres, s3: &S3) -> Node {
            let data = tempfile::tempdir().unwrap();
            let mut serve = Command::new(COVD);
            serve
                .args([
                    "serve",
                    "--listen",
                    "127.0.0.1:0",
                    "--no-http",
                    "--data-dir",
                ])
                .arg(data.path())
                .args(["--cluster", "--postgres", &pg.url])
                .args(["--object-store", "s3://covd/killed"]);
            for (key, value) in s3.options() {
                serve.args(["--object-store-option", &format!("{key}={value}")]);
            }
            let mut child = serve
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let url = address(&mut child);
            Node {
                child,
                url,
                _data: data,
            }
        }

        fn kill(&mut self) {
            self.child.kill().unwrap();
            self.child.wait().unwrap();
        }
    }

    impl Drop for Node {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Shard `s` of 16: 1,200 files of 30 lines, a third of them shared with other shards,
    /// with hit counts that differ by shard (so a delta counted twice or lost shows).
    fn shard(s: u64) -> Coverage {
        let mut c = Coverage::default();
        for f in 0..1200u64 {
            let n = if f % 3 == 0 { f } else { s * 10_000 + f };
            let mut b = FileBuilder::new();
            for line in 1..=30u32 {
                b.line(line, (s + f + line as u64) % 4);
            }
            c.files.insert(format!("src/m{n}.c"), b.build());
        }
        c
    }

    /// Pushes `coverage` as shard `id` through `client`, holding the second half of its
    /// deltas until `go` says so. The push's report.
    async fn push_held(
        mut client: Client,
        id: String,
        coverage: Coverage,
        mut go: watch::Receiver<bool>,
    ) -> covd::client::PushReport {
        let (tx, rx) = mpsc::channel(4);
        let deltas: Vec<Vec<(String, covd::model::FileCoverage)>> = coverage
            .files
            .into_iter()
            .collect::<Vec<_>>()
            .chunks(100)
            .map(<[_]>::to_vec)
            .collect();
        let half = deltas.len() / 2;
        let feeder = tokio::spawn(async move {
            for (i, d) in deltas.into_iter().enumerate() {
                if i == half {
                    go.wait_for(|go| *go).await.unwrap();
                }
                let _ = tx.send(PushInput::Delta(d)).await;
            }
            let _ = tx.send(PushInput::Done(None)).await;
        });
        let target = PushTarget {
            run_id: "r".into(),
            shard_id: id,
            attempt: 1,
            ..PushTarget::default()
        };
        let report = client
            .push(&target, rx, &PushOptions::default())
            .await
            .unwrap();
        feeder.await.unwrap();
        report
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_killed_mid_run_loses_nothing_and_its_shards_resume_elsewhere() {
        let (pg, s3) = (Postgres::start(), S3::start());
        let mut nodes: Vec<Node> = (0..3).map(|_| Node::start(&pg, &s3)).collect();
        let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
        let params = crate::cluster::nodes::params();
        let shards: Vec<Coverage> = (0..16).map(shard).collect();

        // The same input through one daemon of its own.
        let single = Daemon::start().await;
        single.client().open_run("r", params.clone()).await.unwrap();
        for (i, c) in shards.iter().enumerate() {
            push(&mut single.client(), "r", &i.to_string(), 1, c.clone()).await;
        }
        let want = crate::cluster::nodes::export(&single, true).await;

        Client::connect(&urls[0])
            .unwrap()
            .open_run("r", params)
            .await
            .unwrap();
        // Shard i goes to node i % 3 first, then to the others.
        let (go, held) = watch::channel(false);
        let mut pushes = Vec::new();
        for (i, c) in shards.iter().enumerate() {
            let list = (0..3)
                .map(|k| urls[(i + k) % 3].as_str())
                .collect::<Vec<_>>()
                .join(",");
            let client = Client::connect(&list).unwrap();
            pushes.push(tokio::spawn(push_held(
                client,
                i.to_string(),
                c.clone(),
                held.clone(),
            )));
        }
        // Once node 0 sees the first half of every shard acknowledged (those of node 1
        // through the catalogue), node 1 dies with its shards' streams open.
        let mut watcher = Client::connect(&urls[0]).unwrap();
        let watching = tokio::spawn(async move {
            watcher
                .watch("r", |status| {
                    if status.shards.len() == 16 && status.shards.iter().all(|s| s.last_seq >= 6) {
                        let _ = go.send(true);
                    }
                })
                .await
        });
        let mut halfway = held.clone();
        tokio::time::timeout(Duration::from_secs(60), halfway.wait_for(|go| *go))
            .await
            .expect("node 0 sees every shard halfway")
            .unwrap();
        watching.abort();
        nodes[1].kill();
        let mut resumed = 0;
        for p in pushes {
            let report = tokio::time::timeout(Duration::from_secs(120), p)
                .await
                .expect("every push ends")
                .unwrap();
            assert_eq!(report.deltas, 12);
            resumed += usize::from(report.reconnects > 0);
        }
        assert!(resumed >= 5, "node 1's shards resumed elsewhere: {resumed}");

        for url in [&urls[0], &urls[2]] {
            let mut out = Vec::new();
            Client::connect(url)
                .unwrap()
                .export("r", Some(Duration::from_secs(60)), &mut out)
                .await
                .unwrap();
            assert!(out == want, "{url}'s export differs from one daemon's");
        }
    }
}

/// A cluster node whose store refuses one write chosen by the test, as PostgreSQL going away
/// at that moment would.
mod faults {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use covd::cluster::{ClusterStore, Segments};
    use covd::model::{FileBatch, FileCoverage};
    use covd::persist::{
        AttemptRecord, CommitStats, Digest, HistoryQuery, LoadedRun, MonthRecord, Storage,
        StoreError, SummaryRecord, TestHistoryRecord, Write,
    };
    use covd::server::Settings;
    use futures_util::future::BoxFuture;
    use roaring::RoaringBitmap;

    use crate::cluster::nodes::{export, sixteen_shards, two_shards_alone};
    use crate::services::{Postgres, S3};
    use crate::support::*;

    /// A store that refuses the next write starting an attempt while `refuse_start` is set.
    #[derive(Debug)]
    struct Faulty {
        inner: ClusterStore,
        refuse_start: AtomicBool,
    }

    impl Faulty {
        fn refused(&self, writes: &[Write]) -> bool {
            writes
                .iter()
                .any(|w| matches!(w, Write::StartAttempt { .. }))
                && self.refuse_start.swap(false, Ordering::AcqRel)
        }
    }

    fn injected() -> StoreError {
        StoreError::Shared("PostgreSQL went away (injected by the test)".into())
    }

    impl Storage for Faulty {
        fn is_durable(&self) -> bool {
            self.inner.is_durable()
        }
        fn failure(&self) -> Option<String> {
            self.inner.failure()
        }
        fn write(&self, writes: Vec<Write>) -> BoxFuture<'_, Result<(), StoreError>> {
            if self.refused(&writes) {
                return Box::pin(async { Err(injected()) });
            }
            self.inner.write(writes)
        }
        fn write_blocking(&self, writes: Vec<Write>) -> Result<(), StoreError> {
            if self.refused(&writes) {
                return Err(injected());
            }
            self.inner.write_blocking(writes)
        }
        fn load_runs(&self) -> Result<Vec<LoadedRun>, StoreError> {
            self.inner.load_runs()
        }
        fn for_each_delta(
            &self,
            run_id: &str,
            attempts: &[(String, u32, u64)],
            f: &mut dyn FnMut(&str, FileBatch),
        ) -> Result<(), StoreError> {
            self.inner.for_each_delta(run_id, attempts, f)
        }
        fn for_each_merged(
            &self,
            run_id: &str,
            f: &mut dyn FnMut(Vec<(Arc<str>, FileCoverage)>),
        ) -> Result<(), StoreError> {
            self.inner.for_each_merged(run_id, f)
        }
        fn for_each_shard_lines(
            &self,
            run_id: &str,
            shard_id: &str,
            f: &mut dyn FnMut(Vec<(Arc<str>, RoaringBitmap)>),
        ) -> Result<bool, StoreError> {
            self.inner.for_each_shard_lines(run_id, shard_id, f)
        }
        fn summaries(&self, q: &HistoryQuery) -> Result<Vec<SummaryRecord>, StoreError> {
            self.inner.summaries(q)
        }
        fn history(
            &self,
            q: &HistoryQuery,
        ) -> Result<(Vec<SummaryRecord>, Vec<MonthRecord>), StoreError> {
            self.inner.history(q)
        }
        fn attempts(&self, run_id: &str) -> Result<Vec<AttemptRecord>, StoreError> {
            self.inner.attempts(run_id)
        }
        fn test_histories(
            &self,
            project: &str,
            branch: &str,
        ) -> Result<Vec<(String, TestHistoryRecord)>, StoreError> {
            self.inner.test_histories(project, branch)
        }
        fn usage(&self) -> Result<Option<(u64, u64)>, StoreError> {
            self.inner.usage()
        }
        fn missing_sources(&self, digests: &[Digest]) -> Result<Vec<bool>, StoreError> {
            self.inner.missing_sources(digests)
        }
        fn source_digests(
            &self,
            run_id: &str,
            paths: &[String],
        ) -> Result<Vec<Option<Digest>>, StoreError> {
            self.inner.source_digests(run_id, paths)
        }
        fn source(
            &self,
            run_id: &str,
            path: &str,
        ) -> Result<Option<(Digest, Vec<u8>)>, StoreError> {
            self.inner.source(run_id, path)
        }
        fn stats(&self) -> &CommitStats {
            self.inner.stats()
        }
        fn is_shared(&self) -> bool {
            self.inner.is_shared()
        }
        fn load_run(&self, run_id: &str) -> Result<Option<LoadedRun>, StoreError> {
            self.inner.load_run(run_id)
        }
        fn for_each_delta_after(
            &self,
            run_id: &str,
            ranges: &[(String, u32, u64, u64)],
            f: &mut dyn FnMut(&str, FileBatch),
        ) -> Result<(), StoreError> {
            self.inner.for_each_delta_after(run_id, ranges, f)
        }
        fn take_changes(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Option<String>>> {
            self.inner.take_changes()
        }
    }

    /// The write that starts a retried shard's new attempt fails: the shard stays at its
    /// earlier attempt, so the same retry, sent again, starts the new attempt and counts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_attempt_whose_start_failed_starts_when_retried() {
        let (pg, s3) = (Postgres::start(), S3::start());
        let segments = Segments::connect("s3://covd/faults", s3.options()).unwrap();
        let inner = ClusterStore::connect("a", &pg.url, segments)
            .await
            .unwrap()
            .with_wire_decoder(covd::rpc::convert::wire_delta_files);
        let store = Arc::new(Faulty {
            inner,
            refuse_start: AtomicBool::new(false),
        });
        let a = Daemon::on(Settings::default(), store.clone()).await;
        let shards = sixteen_shards();
        let (two, want) = two_shards_alone(&shards[2], &shards[5]).await;

        a.client().open_run("r", two).await.unwrap();
        push(&mut a.client(), "r", "0", 1, shards[0].clone()).await;
        store.refuse_start.store(true, Ordering::Release);
        // The push retries by itself: its first stream is refused, the next one starts.
        let report = push(&mut a.client(), "r", "0", 2, shards[2].clone()).await;
        assert!(report.reconnects > 0, "the injected failure was met");
        assert!(!store.refuse_start.load(Ordering::Acquire));
        push(&mut a.client(), "r", "1", 1, shards[5].clone()).await;
        assert!(
            export(&a, true).await == want,
            "the retried attempt replaced the first"
        );
    }
}
