//! Bad input gets a precise status, nothing half-applied, and the daemon and other runs carry on.

use covd::rpc::proto;
use covd::server::Settings;
use covd::service::RunParams;
use tonic::Code;

use crate::ingest::{Stream, file, raw};
use crate::support::*;

/// A file of line 5 with branch arms in columns, as given (the columns may disagree).
fn arms(line_gaps: &[u32], blocks: &[u32], numbers: &[u32], taken: &[u64]) -> proto::FileDelta {
    proto::FileDelta {
        arm_line_gaps: line_gaps.to_vec(),
        arm_blocks: blocks.to_vec(),
        arm_numbers: numbers.to_vec(),
        arm_taken: taken.to_vec(),
        ..file("a.c", &[(5, 1)])
    }
}

/// Sends one delta on a fresh stream of run `bad` and returns the refusal.
async fn refuse(daemon: &Daemon, files: Vec<proto::FileDelta>) -> tonic::Status {
    let mut c = raw(&daemon.url).await;
    let (mut s, _) = Stream::open(&mut c, "bad", "s", 1).await.unwrap();
    s.delta(1, files)
        .await
        .expect_err("the delta must be refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_deltas_are_refused_by_field_and_nothing_else_is_touched() {
    let daemon = Daemon::start().await;
    let mut c = raw(&daemon.url).await;
    // A healthy run first: it must come through everything below unchanged.
    let (mut good, _) = Stream::open(&mut c, "good", "s", 1).await.unwrap();
    good.delta(1, vec![file("ok.c", &[(1, 3), (2, 0)])])
        .await
        .unwrap();
    good.finish(1).await.unwrap();
    let mut client = daemon.client();
    let before = fetch(&mut client, "good").await.1;

    let cases: Vec<(Vec<proto::FileDelta>, &str, &str)> = vec![
        (
            vec![file("a.c", &[(0, 1)])],
            "delta.files[0].line_gaps[0]",
            "line 0",
        ),
        (
            vec![file("a.c", &[(u32::MAX - 1, 1)])],
            "delta.files[0].line_gaps[0]",
            "beyond the limit --max-line (10000000)",
        ),
        (
            vec![proto::FileDelta {
                line_gaps: vec![u32::MAX, u32::MAX],
                hits: vec![1, 1],
                ..file("a.c", &[])
            }],
            "delta.files[0].line_gaps[0]",
            "beyond",
        ),
        (
            vec![proto::FileDelta {
                line_gaps: vec![3, 0],
                hits: vec![1, 1],
                ..file("a.c", &[])
            }],
            "delta.files[0].line_gaps[1]",
            "ascending and distinct",
        ),
        (vec![file("", &[(1, 1)])], "delta.files[0].path", "empty"),
        (
            vec![
                file("ok.c", &[(1, 1)]),
                file("src/../../etc/passwd", &[(1, 1)]),
            ],
            "delta.files[1].path",
            "`..`",
        ),
        (
            vec![file("a\0b", &[(1, 1)])],
            "delta.files[0].path",
            "control character",
        ),
        (
            vec![file(&"d".repeat(10_000), &[(1, 1)])],
            "delta.files[0].path",
            "10000 bytes long; the limit is 4096",
        ),
        (
            vec![proto::FileDelta {
                hits: vec![1],
                ..file("a.c", &[(1, 1), (2, 1)])
            }],
            "delta.files[0].hits",
            "one per line",
        ),
        (
            vec![proto::FileDelta {
                branches: vec![proto::Branch {
                    line: 0,
                    ..Default::default()
                }],
                ..file("a.c", &[(1, 1)])
            }],
            "delta.files[0].branches[0].line",
            "line 0",
        ),
        (
            vec![arms(&[0], &[0], &[0], &[0])],
            "delta.files[0].arm_line_gaps[0]",
            "line 0",
        ),
        (
            vec![arms(&[5, u32::MAX], &[0, 0], &[0, 1], &[1, 1])],
            "delta.files[0].arm_line_gaps[1]",
            "beyond",
        ),
        (
            vec![arms(&[5], &[0, 0], &[0, 1], &[1, 1])],
            "delta.files[0].arm_line_gaps",
            "another arm column has 2",
        ),
        (
            vec![arms(&[5, 0], &[0, 0], &[0], &[1, 1])],
            "delta.files[0].arm_numbers",
            "has 1 values where another arm column has 2",
        ),
        (
            vec![proto::FileDelta {
                functions: vec![proto::Function {
                    name: String::new(),
                    ..Default::default()
                }],
                ..file("a.c", &[(1, 1)])
            }],
            "delta.files[0].functions[0].name",
            "empty",
        ),
    ];
    for (files, field, needle) in cases {
        let e = refuse(&daemon, files).await;
        // A line beyond --max-line is within the protocol but beyond a limit.
        let code = if needle.starts_with("beyond") {
            Code::ResourceExhausted
        } else {
            Code::InvalidArgument
        };
        assert_eq!(e.code(), code, "{field}: {}", e.message());
        assert!(
            e.message().starts_with(field),
            "expected {field}: {}",
            e.message()
        );
        assert!(
            e.message().contains(needle),
            "expected {needle}: {}",
            e.message()
        );
    }

    // A path that is not UTF-8 (a protobuf string must be): the delta does not read.
    let mut bytes = prost::Message::encode_to_vec(&proto::Delta {
        seq: 1,
        files: vec![file("aXc", &[(1, 1)])],
        test: None,
    });
    let at = bytes.windows(3).position(|w| w == b"aXc").unwrap();
    bytes[at + 1] = 0xff;
    let (mut s, _) = Stream::open(&mut c, "bad", "s", 1).await.unwrap();
    let e = s
        .send(proto::ingest_request::Msg::Delta(bytes.into()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("not UTF-8"), "{}", e.message());

    // Nothing of the refused deltas was applied: not even the valid file beside a bad one.
    let (_, resume) = Stream::open(&mut c, "bad", "s", 1).await.unwrap();
    assert_eq!(resume.last_seq, 0);
    assert_eq!(client.status("bad").await.unwrap().totals.files, 0);
    assert_eq!(fetch(&mut client, "good").await.1, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_resource_exhausted() {
    let daemon = Daemon::start().await;
    let mut c = raw(&daemon.url).await;
    let (mut s, _) = Stream::open(&mut c, "big", "s", 1).await.unwrap();
    // 64 MB of path: four times the default message limit.
    let e = s
        .delta(1, vec![file(&"p".repeat(64 << 20), &[(1, 1)])])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("too large"), "{}", e.message());
    // The daemon is still up and the shard resumable.
    let (mut s, resume) = Stream::open(&mut c, "big", "s", 1).await.unwrap();
    assert_eq!(resume.last_seq, 0);
    s.delta(1, vec![file("a.c", &[(1, 1)])]).await.unwrap();
}

#[tokio::test]
async fn invalid_protobuf_is_refused() {
    use tonic::codegen::http::uri::PathAndQuery;

    // Field 2 of IngestRequest is the `delta` message; sending a varint there is not protobuf
    // that any IngestRequest decodes from.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Bogus {
        #[prost(uint64, tag = "2")]
        delta: u64,
    }
    let daemon = Daemon::start().await;
    let channel = tonic::transport::Endpoint::from_shared(daemon.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<Bogus, proto::IngestResponse>::default();
    let path = PathAndQuery::from_static("/covd.v1.Coverage/Ingest");
    let request = tonic::Request::new(tokio_stream::once(Bogus { delta: 7 }));
    let result = match grpc.streaming(request, path, codec).await {
        Ok(response) => response.into_inner().message().await.map(|_| ()),
        Err(e) => Err(e),
    };
    let e = result.expect_err("garbage must be refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("decode"), "{}", e.message());
    // Still serving.
    daemon.client().list_runs(10).await.unwrap();
}

#[tokio::test]
async fn the_file_limit_of_a_run_is_resource_exhausted() {
    let mut settings = Settings::default();
    settings.limits.max_files_per_run = 3;
    let daemon = Daemon::with(settings).await;
    let mut c = raw(&daemon.url).await;
    let (mut s, _) = Stream::open(&mut c, "r", "s", 1).await.unwrap();
    s.delta(1, vec![file("a", &[(1, 1)]), file("b", &[(1, 1)])])
        .await
        .unwrap();
    let e = s
        .delta(2, vec![file("c", &[(1, 1)]), file("d", &[(1, 1)])])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message()
            .contains("beyond the limit --max-files-per-run (3)"),
        "{}",
        e.message()
    );
    let (mut s, resume) = Stream::open(&mut c, "r", "s", 1).await.unwrap();
    assert_eq!(resume.last_seq, 1);
    // Files already present do not count again.
    s.delta(2, vec![file("a", &[(2, 1)]), file("c", &[(1, 1)])])
        .await
        .unwrap();

    // The repository's files given with a run count against the same limit: as many as it
    // allows, not one more.
    let mut client = daemon.client();
    let files = |n: usize| (0..n).map(|i| format!("src/{i}.c")).collect::<Vec<_>>();
    client
        .open_run_with_files("listed", RunParams::default(), files(3))
        .await
        .unwrap();
    let e = client
        .open_run_with_files("too-many", RunParams::default(), files(4))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("4 known files: beyond the limit --max-files-per-run (3)"),
        "{e}"
    );
}

#[tokio::test]
async fn bad_names_are_refused() {
    let daemon = Daemon::start().await;
    let mut c = raw(&daemon.url).await;
    for (run, shard, field) in [
        ("", "s", "header.run_id"),
        ("has space", "s", "header.run_id"),
        ("r", "", "header.shard_id"),
        ("r", "s\n", "header.shard_id"),
    ] {
        let e = Stream::open(&mut c, run, shard, 1).await.err().unwrap();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with(field), "{}", e.message());
    }
    let missing = daemon.client().status("nope").await.unwrap_err();
    assert!(
        missing.to_string().contains("run `nope` does not exist"),
        "{missing}"
    );
}

#[tokio::test]
async fn a_delta_that_does_not_decode_is_invalid_argument_and_the_shard_resumes() {
    use covd::rpc::proto::ingest_request::Msg as In;
    let daemon = Daemon::start().await;
    let mut c = raw(&daemon.url).await;
    let (mut s, _) = Stream::open(&mut c, "cut", "s", 1).await.unwrap();
    // A length-delimited field whose length runs past the end: a delta cut short.
    let e = s
        .send(In::Delta(vec![0x12, 0x40, 0x0a].into()))
        .await
        .expect_err("a cut delta must be refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("covd.v1.Delta"), "{}", e.message());
    // Nothing was applied: the shard resumes from 0 and its first delta is accepted.
    let (mut s, resume) = Stream::open(&mut c, "cut", "s", 1).await.unwrap();
    assert_eq!(resume.last_seq, 0);
    s.delta(1, vec![file("a.c", &[(1, 1)])]).await.unwrap();
}

/// A raw client's path spellings are the CLI's: `./a.c`, `a//b.c` and `a.c`, `a/b.c` are two
/// files, not four. Invisible characters that would make a report show another path than the
/// one stored are refused.
#[tokio::test]
async fn paths_are_spelled_one_way_and_invisible_characters_are_refused() {
    let daemon = Daemon::start().await;
    let mut c = raw(&daemon.url).await;
    let (mut s, _) = Stream::open(&mut c, "r", "s", 1).await.unwrap();
    s.delta(
        1,
        vec![file("./a.c", &[(1, 1)]), file("src//b.c/", &[(1, 2)])],
    )
    .await
    .unwrap();
    s.delta(
        2,
        vec![file("a.c", &[(1, 1)]), file("src/./b.c", &[(2, 1)])],
    )
    .await
    .unwrap();
    s.finish(2).await.unwrap();
    let mut client = daemon.client();
    let (_, merged) = fetch(&mut client, "r").await;
    let paths: Vec<&str> = merged.files.keys().map(String::as_str).collect();
    assert_eq!(paths, ["a.c", "src/b.c"]);
    assert_eq!(merged.files["a.c"].hits_of(1), Some(2));
    for bad in [
        "src/\u{202e}cod.exe",
        "a\u{85}b.c",
        "a\u{2066}.c",
        "x\u{2028}y.c",
    ] {
        let e = refuse(&daemon, vec![file(bad, &[(1, 1)])]).await;
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {}", e.message());
        assert!(
            e.message().starts_with("delta.files[0].path") && e.message().contains("invisible"),
            "{bad:?}: {}",
            e.message()
        );
    }
}

/// Every limit names its setting in the refusal.
#[tokio::test]
async fn limits_are_resource_exhausted_naming_the_setting() {
    let limits = covd::service::Limits {
        max_run_id_bytes: 8,
        max_shard_id_bytes: 4,
        max_run_field_bytes: 5,
        max_name_bytes: 6,
        ..covd::service::Limits::default()
    };
    let daemon = Daemon::with(covd::server::Settings {
        limits,
        ..covd::server::Settings::default()
    })
    .await;
    let mut client = daemon.client();
    let e = client
        .open_run("a-long-run-id", RunParams::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("--max-run-id-bytes (8)"), "{e}");
    // As long as the limit is allowed.
    client
        .open_run("exactly8", RunParams::default())
        .await
        .unwrap();
    let params = RunParams {
        project: "acme/too-long".into(),
        ..RunParams::default()
    };
    let e = client.open_run("r", params).await.unwrap_err();
    assert!(e.to_string().contains("--max-run-field-bytes (5)"), "{e}");
    let params = RunParams {
        project: "acme/".into(),
        ..RunParams::default()
    };
    client.open_run("five", params).await.unwrap();
    let mut c = raw(&daemon.url).await;
    let Err(e) = Stream::open(&mut c, "r", "shard-1", 1).await else {
        panic!("a shard id beyond the limit was accepted");
    };
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("--max-shard-id-bytes (4)"), "{e}");
    let (mut s, _) = Stream::open(&mut c, "r", "s1", 1).await.unwrap();
    let named = proto::FileDelta {
        functions: vec![proto::Function {
            name: "a_long_name".into(),
            start_line: 1,
            ..Default::default()
        }],
        ..file("a.c", &[(1, 1)])
    };
    let e = s.delta(1, vec![named]).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(
        e.message().starts_with("delta.files[0].functions[0].name")
            && e.message().contains("--max-name-bytes (6)"),
        "{e}"
    );
}

/// Per-test attribution names at most --max-tests-per-run tests in a run: exactly that many
/// are taken, the next new one is refused (not dropped), and tests already named still are.
#[tokio::test]
async fn the_test_limit_of_a_run_is_resource_exhausted() {
    let mut settings = Settings::default();
    settings.limits.max_tests_per_run = 3;
    let daemon = Daemon::with(settings).await;
    let mut client = daemon.client();
    let push = |shard: &'static str, tests: &[&'static str]| {
        let mut client = daemon.client();
        let tests = tests
            .iter()
            .map(|t| (*t, vec![("a.c", crate::attribution::lines(&[1], &[]))]))
            .collect();
        async move { crate::attribution::push_tests(&mut client, "r", shard, tests).await }
    };
    push("1", &["t1", "t2", "t3"]).await.unwrap();
    let e = push("2", &["t2", "t4"]).await.unwrap_err();
    let e = match e {
        covd::client::ClientError::Status(s) => s,
        other => panic!("{other}"),
    };
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message()
            .contains("run `r` would name 4 tests: beyond the limit --max-tests-per-run (3)"),
        "{}",
        e.message()
    );
    push("3", &["t1", "t3"]).await.unwrap();
    assert_eq!(client.tests("r").await.unwrap(), ["t1", "t2", "t3"]);
}

/// What a run may grow to: its lines, the branch arms of a line, its memory and the memory of
/// all runs, each refused before anything of the delta is stored, naming its setting; what was
/// acknowledged stays, and within the limits the same stream goes on.
#[tokio::test]
async fn the_growth_of_runs_is_bounded_by_lines_arms_and_memory() {
    use covd::aggregate::estimated_bytes;
    let serve = |limits: covd::service::Limits| {
        Daemon::with(Settings {
            limits,
            ..Settings::default()
        })
    };
    let lines = |path: &str, n: u32| file(path, &(1..=n).map(|l| (l, 1)).collect::<Vec<_>>());

    // Lines: 3, then 3 more is 6 > 5; sent again, lines already held do not count.
    let daemon = serve(covd::service::Limits {
        max_lines_per_run: 5,
        ..Default::default()
    })
    .await;
    let mut c = raw(&daemon.url).await;
    let (mut s, _) = Stream::open(&mut c, "r", "s", 1).await.unwrap();
    s.delta(1, vec![lines("a.c", 3)]).await.unwrap();
    let e = s.delta(2, vec![lines("b.c", 3)]).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(
        e.message().contains("would hold 6 lines")
            && e.message().contains("--max-lines-per-run (5)"),
        "{e}"
    );
    let (mut s, resume) = Stream::open(&mut c, "r", "s", 1).await.unwrap();
    assert_eq!(resume.last_seq, 1);
    s.delta(2, vec![lines("a.c", 3), lines("b.c", 2)])
        .await
        .unwrap();
    let status = daemon.client().status("r").await.unwrap();
    assert_eq!(status.totals.lines, 5);

    // Arms of one line: 4 on line 5 is beyond 3; 3 on it, and 3 on each of two lines, are not.
    let daemon = serve(covd::service::Limits {
        max_branches_per_line: 3,
        ..Default::default()
    })
    .await;
    let e = refuse(
        &daemon,
        vec![arms(&[5, 0, 0, 0], &[0; 4], &[0, 1, 2, 3], &[1; 4])],
    )
    .await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(
        e.message()
            .contains("`a.c` of the delta gives one line 4 branch arms")
            && e.message().contains("--max-branches-per-line (3)"),
        "{e}"
    );
    let mut c = raw(&daemon.url).await;
    let (mut s, _) = Stream::open(&mut c, "ok", "s", 1).await.unwrap();
    s.delta(
        1,
        vec![arms(
            &[5, 0, 0, 1, 0, 0],
            &[0; 6],
            &[0, 1, 2, 0, 1, 2],
            &[1; 6],
        )],
    )
    .await
    .unwrap();

    // One run's memory: room for two files of 3 lines, not for a third.
    let daemon = serve(covd::service::Limits {
        max_run_memory_bytes: estimated_bytes(2, 6, 0, 0),
        ..Default::default()
    })
    .await;
    let mut c = raw(&daemon.url).await;
    let (mut s, _) = Stream::open(&mut c, "r", "s", 1).await.unwrap();
    s.delta(1, vec![lines("a.c", 3), lines("b.c", 3)])
        .await
        .unwrap();
    let e = s.delta(2, vec![lines("c.c", 3)]).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("--max-run-memory"), "{e}");
    // Another run has memory of its own.
    let (mut s, _) = Stream::open(&mut c, "r2", "s", 1).await.unwrap();
    s.delta(1, vec![lines("c.c", 3)]).await.unwrap();

    // The memory of all runs: two runs of one file each fill it, a third run is refused.
    let daemon = serve(covd::service::Limits {
        max_memory_bytes: estimated_bytes(2, 6, 0, 0),
        ..Default::default()
    })
    .await;
    let mut c = raw(&daemon.url).await;
    for run in ["a", "b"] {
        let (mut s, _) = Stream::open(&mut c, run, "s", 1).await.unwrap();
        s.delta(1, vec![lines("a.c", 3)]).await.unwrap();
    }
    let (mut s, _) = Stream::open(&mut c, "c", "s", 1).await.unwrap();
    let e = s.delta(1, vec![lines("a.c", 1)]).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("--max-memory"), "{e}");
    // Nothing of it was kept: the run holds no line.
    let status = daemon.client().status("c").await.unwrap();
    assert_eq!(status.totals.lines, 0);
}

/// The memory limits' estimate, from counts alone, stays within a factor of two of the bytes
/// the aggregate measures itself for real tools' coverage (with branches and functions).
#[test]
fn the_memory_estimate_follows_what_an_aggregate_holds() {
    use covd::aggregate::{Aggregate, PathInterner};
    for name in ["gcc-lcov/merged.info", "llvm-cov/merged.info"] {
        let coverage = read_lcov(&fixture(name), &covd::model::path::PathRules::default());
        let (interner, aggregate) = (PathInterner::default(), Aggregate::new());
        for (path, file) in &coverage.files {
            aggregate.merge_file(&interner, path, file.clone());
        }
        let (estimated, measured) = (aggregate.estimated_bytes(), aggregate.heap_bytes());
        assert!(
            aggregate.totals().branches > 0,
            "{name}: a fixture with branches"
        );
        assert!(
            estimated >= measured / 2 && estimated <= measured * 2,
            "{name}: estimated {estimated} bytes, measured {measured}"
        );
    }
}

/// The bytes of deltas a run takes in are bounded over its shards, and the count is kept with
/// each shard: a restart does not give a run a fresh budget.
#[tokio::test]
async fn the_bytes_a_run_takes_in_are_bounded_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let settings = || Settings {
        data_dir: Some(dir.path().to_owned()),
        limits: covd::service::Limits {
            max_run_bytes: 400,
            ..Default::default()
        },
        ..Settings::default()
    };
    let lines = |path: &str, n: u32| file(path, &(1..=n).map(|l| (l, 1)).collect::<Vec<_>>());
    let daemon = Daemon::with(settings()).await;
    let mut c = raw(&daemon.url).await;
    let (mut s, _) = Stream::open(&mut c, "r", "s1", 1).await.unwrap();
    // About 110 bytes each (50 one-byte gaps and counts, the path): three fit, a fourth does not.
    for seq in 1..=3 {
        s.delta(seq, vec![lines(&format!("f{seq}.c"), 50)])
            .await
            .unwrap();
    }
    let e = s.delta(4, vec![lines("f4.c", 50)]).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("--max-run-bytes (400)"), "{e}");
    // Another shard of the run counts against the same budget.
    let (mut s2, _) = Stream::open(&mut c, "r", "s2", 1).await.unwrap();
    let e = s2.delta(1, vec![lines("g.c", 50)]).await.unwrap_err();
    assert!(e.message().contains("--max-run-bytes (400)"), "{e}");
    drop((s, s2));
    daemon.stop().await.unwrap();

    let daemon = Daemon::with(settings()).await;
    let mut c = raw(&daemon.url).await;
    let (mut s, resume) = Stream::open(&mut c, "r", "s1", 1).await.unwrap();
    assert_eq!(resume.last_seq, 3);
    let e = s.delta(4, vec![lines("f4.c", 50)]).await.unwrap_err();
    assert!(e.message().contains("--max-run-bytes (400)"), "{e}");
    // A small delta still fits, and what was taken is all there.
    let (mut s, _) = Stream::open(&mut c, "r", "s1", 1).await.unwrap();
    s.delta(4, vec![lines("f1.c", 2)]).await.unwrap();
    let status = daemon.client().status("r").await.unwrap();
    assert_eq!(status.totals.lines, 150);
}
