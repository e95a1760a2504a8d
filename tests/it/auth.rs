//! Access tokens against a real daemon: made by `covd token`, required on every call but
//! health once one exists, checked for scope, project, run, expiry and revocation (revoking
//! needs no restart), mapped by the CLI to exit codes 8 and 9; the HTTP port wants one too;
//! and a daemon without tokens refuses to listen beyond loopback.

use std::path::Path;
use std::process::Command;

use covd::rpc::proto::{self, coverage_client::CoverageClient};
use tonic::Code;
use tonic::transport::Channel;

use crate::cli::{COVD, Served};
use crate::support::{fixture, health_latency, read_until};

/// `covd token SUBCOMMAND --data-dir D ARGS`, which must succeed: what it printed.
fn token_command(subcommand: &str, data: &Path, args: &[&str]) -> String {
    let out = Command::new(COVD)
        .args(["token", subcommand, "--data-dir"])
        .arg(data)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `covd token create --data-dir D ARGS`: the token, which must be all it printed.
fn create(data: &Path, args: &[&str]) -> String {
    let stdout = token_command("create", data, args);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "the token alone: {stdout:?}");
    assert!(lines[0].starts_with("covd_"), "{stdout}");
    lines[0].to_owned()
}

/// The RPCs of [`every_rpc`] that name its run.
const NAMING_THE_RUN: [&str; 15] = [
    "OpenRun",
    "GetRunStatus",
    "WatchRun",
    "Export",
    "GetFile",
    "GetDirectory",
    "GetTestsForLines",
    "GetTestLines",
    "ListTests",
    "GetTestImpact",
    "GetPatchCoverage",
    "GetDifferential",
    "GetAttempts",
    "PutSources",
    "GetSource",
];

/// The RPCs of [`every_rpc`] that write.
const WRITING: [&str; 4] = ["OpenRun", "Ingest", "DeleteRun", "PutSources"];

/// A read token of acme/*.
fn read_one_project(data: &Path) -> String {
    create(data, &["--project", "acme/*", "--scope", "read"])
}

/// `covd ARGS` with `token` (none: no COVD_TOKEN at all): exit code and stderr.
fn covd(served: &Served, token: Option<&str>, args: &[&str]) -> (Option<i32>, String) {
    let mut c = served.covd(args);
    c.env_remove("COVD_TOKEN");
    if let Some(t) = token {
        c.env("COVD_TOKEN", t);
    }
    let out = c.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    request
}

/// The status code each RPC answers with `token`, on run `run` (errors of the request itself
/// come after the token's: an accepted token gives anything but UNAUTHENTICATED).
async fn every_rpc(
    c: &mut CoverageClient<Channel>,
    token: Option<&str>,
    run: &str,
) -> Vec<(&'static str, Code)> {
    fn code<T>(r: Result<T, tonic::Status>) -> Code {
        r.map_or_else(|s| s.code(), |_| Code::Ok)
    }
    let run = || run.to_owned();
    vec![
        (
            "OpenRun",
            code(
                c.open_run(with_token(
                    proto::OpenRunRequest {
                        run_id: run(),
                        ..Default::default()
                    },
                    token,
                ))
                .await,
            ),
        ),
        (
            "GetRunStatus",
            code(
                c.get_run_status(with_token(
                    proto::GetRunStatusRequest { run_id: run() },
                    token,
                ))
                .await,
            ),
        ),
        (
            "WatchRun",
            code(
                c.watch_run(with_token(proto::WatchRunRequest { run_id: run() }, token))
                    .await,
            ),
        ),
        (
            "ListRuns",
            code(
                c.list_runs(with_token(proto::ListRunsRequest::default(), token))
                    .await,
            ),
        ),
        (
            "Ingest",
            code(
                c.ingest(with_token(
                    tokio_stream::iter(Vec::<proto::IngestRequest>::new()),
                    token,
                ))
                .await,
            ),
        ),
        (
            "Export",
            code(
                c.export(with_token(
                    proto::ExportRequest {
                        run_id: run(),
                        ..Default::default()
                    },
                    token,
                ))
                .await,
            ),
        ),
        (
            "GetFile",
            code(
                c.get_file(with_token(
                    proto::GetFileRequest {
                        run_id: run(),
                        ..Default::default()
                    },
                    token,
                ))
                .await,
            ),
        ),
        (
            "GetDirectory",
            code(
                c.get_directory(with_token(
                    proto::GetDirectoryRequest {
                        run_id: run(),
                        ..Default::default()
                    },
                    token,
                ))
                .await,
            ),
        ),
        (
            "DeleteRun",
            code(
                c.delete_run(with_token(
                    proto::DeleteRunRequest {
                        run_id: "nope".into(),
                    },
                    token,
                ))
                .await,
            ),
        ),
        (
            "GetTestsForLines",
            code(
                c.get_tests_for_lines(with_token(
                    proto::GetTestsForLinesRequest {
                        run_id: run(),
                        ..Default::default()
                    },
                    token,
                ))
                .await,
            ),
        ),
        (
            "GetTestLines",
            code(
                c.get_test_lines(with_token(
                    proto::GetTestLinesRequest {
                        run_id: run(),
                        ..Default::default()
                    },
                    token,
                ))
                .await,
            ),
        ),
        (
            "ListTests",
            code(
                c.list_tests(with_token(proto::ListTestsRequest { run_id: run() }, token))
                    .await,
            ),
        ),
        (
            "GetTestImpact",
            code(
                c.get_test_impact(with_token(
                    proto::GetTestImpactRequest {
                        run_id: run(),
                        ..Default::default()
                    },
                    token,
                ))
                .await,
            ),
        ),
        (
            "GetPatchCoverage",
            code(
                c.get_patch_coverage(with_token(
                    proto::GetPatchCoverageRequest {
                        run_id: run(),
                        ..Default::default()
                    },
                    token,
                ))
                .await,
            ),
        ),
        (
            "GetDifferential",
            code(
                c.get_differential(with_token(
                    proto::GetDifferentialRequest {
                        run_id: run(),
                        base_run_id: run(),
                        ..Default::default()
                    },
                    token,
                ))
                .await,
            ),
        ),
        (
            "GetLines",
            code(
                c.get_lines(with_token(proto::GetLinesRequest::default(), token))
                    .await,
            ),
        ),
        (
            "GetHistory",
            code(
                c.get_history(with_token(proto::GetHistoryRequest::default(), token))
                    .await,
            ),
        ),
        (
            "GetFlakyTests",
            code(
                c.get_flaky_tests(with_token(proto::GetFlakyTestsRequest::default(), token))
                    .await,
            ),
        ),
        (
            "GetAttempts",
            code(
                c.get_attempts(with_token(
                    proto::GetAttemptsRequest { run_id: run() },
                    token,
                ))
                .await,
            ),
        ),
        (
            "MissingSources",
            code(
                c.missing_sources(with_token(proto::MissingSourcesRequest::default(), token))
                    .await,
            ),
        ),
        (
            "PutSources",
            code(
                c.put_sources(with_token(
                    proto::PutSourcesRequest {
                        run_id: run(),
                        ..Default::default()
                    },
                    token,
                ))
                .await,
            ),
        ),
        (
            "GetSource",
            code(
                c.get_source(with_token(
                    proto::GetSourceRequest {
                        run_id: run(),
                        ..Default::default()
                    },
                    token,
                ))
                .await,
            ),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_decide_who_may_do_what() {
    let served = Served::start();
    let data = served.data.path().to_owned();
    let info = fixture("gcc-lcov/shard1.info");
    let info = info.to_str().unwrap();
    // Before any token, anybody on loopback may push.
    let (code, err) = tokio::task::block_in_place(|| {
        covd(
            &served,
            None,
            &[
                "push",
                "--run",
                "before",
                "--shard",
                "0",
                "--project",
                "acme/shop",
                info,
            ],
        )
    });
    assert_eq!(code, Some(0), "{err}");

    let admin = create(&data, &["--project", "*", "--scope", "admin"]);
    let push = create(&data, &["--project", "acme/*", "--scope", "push"]);
    let read_other = create(&data, &["--project", "globex/web", "--scope", "read"]);
    let expired = create(
        &data,
        &["--project", "*", "--scope", "admin", "--expires", "1ms"],
    );
    // The store keeps no token, and `list` shows none.
    let listed = token_command("list", &data, &[]);
    assert_eq!(listed.lines().count(), 4, "{listed}");
    let stored = std::fs::read(data.join(covd::auth::TOKENS_FILE)).unwrap();
    for t in [&admin, &push, &read_other] {
        let secret = t.rsplit('_').next().unwrap();
        assert!(!listed.contains(secret));
        assert!(!stored.windows(secret.len()).any(|w| w == secret.as_bytes()));
    }

    // Every RPC now wants a token: none, a wrong one and an expired one are UNAUTHENTICATED.
    let mut c = CoverageClient::connect(served.url.clone()).await.unwrap();
    // The admin token with its last hex digit changed (to 0, or to 1 when it is 0).
    let last = if admin.ends_with('0') { '1' } else { '0' };
    let wrong = format!("{}{last}", &admin[..admin.len() - 1]);
    for token in [
        None,
        Some(wrong.as_str()),
        Some(expired.as_str()),
        Some("covd_nope"),
    ] {
        for (rpc, code) in every_rpc(&mut c, token, "r").await {
            assert_eq!(code, Code::Unauthenticated, "{rpc} with {token:?}");
        }
    }
    // Refusals never echo the token.
    let e = c
        .list_runs(with_token(proto::ListRunsRequest::default(), Some(&wrong)))
        .await
        .unwrap_err();
    assert!(
        !e.message().contains(wrong.rsplit('_').next().unwrap()),
        "{}",
        e.message()
    );
    // An admin token is accepted on every one (what follows is the request's own answer).
    for (rpc, code) in every_rpc(&mut c, Some(&admin), "r").await {
        assert!(
            !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
            "{rpc}: {code:?}"
        );
    }
    // Health stays open.
    health_latency(&served.url).await;

    tokio::task::block_in_place(|| {
        // The CLI: 8 without a token, 9 for a token that may not.
        let (code, err) = covd(&served, None, &["runs"]);
        assert_eq!(code, Some(8), "{err}");
        assert!(err.contains("requires a token"), "{err}");
        let push_to = |token: &str, run: &str, project: &str| {
            covd(
                &served,
                Some(token),
                &[
                    "push",
                    "--run",
                    run,
                    "--shard",
                    "0",
                    "--project",
                    project,
                    info,
                ],
            )
        };
        let (code, err) = push_to(&read_other, "g1", "globex/web");
        assert_eq!(code, Some(9), "a read token pushes: {err}");
        assert!(err.contains("needs a push token"), "{err}");
        let (code, err) = push_to(&push, "g2", "globex/web");
        assert_eq!(code, Some(9), "another project: {err}");
        let (code, err) = push_to(&push, "a1", "acme/shop");
        assert_eq!(code, Some(0), "{err}");
        // A shard of a run of another project cannot be written, whatever project the push
        // names, nor its runs read.
        let (code, err) = push_to(&admin, "g3", "globex/web");
        assert_eq!(code, Some(0), "{err}");
        let (code, err) = covd(
            &served,
            Some(&push),
            &[
                "push",
                "--run",
                "g3",
                "--shard",
                "1",
                "--project",
                "acme/shop",
                info,
            ],
        );
        assert_eq!(code, Some(9), "{err}");
        assert!(err.contains("does not reach run `g3`"), "{err}");
        let (code, err) = covd(&served, Some(&read_other), &["status", "--run", "a1"]);
        assert_eq!(code, Some(9), "{err}");
        // Only admin deletes.
        let (code, err) = covd(&served, Some(&push), &["delete", "--run", "a1"]);
        assert_eq!(code, Some(9), "{err}");
        assert!(err.contains("needs an admin token"), "{err}");
        let (code, err) = covd(&served, Some(&admin), &["delete", "--run", "before"]);
        assert_eq!(code, Some(0), "{err}");
    });
    // A token of some projects lists their runs only.
    let ids = |runs: Vec<covd::service::RunStatus>| -> Vec<String> {
        runs.into_iter().map(|r| r.run_id).collect()
    };
    let mut client = covd::client::Client::connect_with(&served.url, Some(&read_other)).unwrap();
    assert_eq!(ids(client.list_runs(100).await.unwrap()), ["g3"]);
    let mut client = covd::client::Client::connect_with(&served.url, Some(&push)).unwrap();
    let runs: Vec<String> = client
        .list_runs(100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.run_id)
        .collect();
    assert_eq!(runs, ["a1"]);

    // On every RPC: a token of another project is refused each call that names a run of this
    // one, a read token each call that writes, and neither anything else.
    for (rpc, code) in every_rpc(&mut c, Some(&read_other), "a1").await {
        if NAMING_THE_RUN.contains(&rpc) || WRITING.contains(&rpc) {
            assert_eq!(code, Code::PermissionDenied, "{rpc}");
        } else {
            assert_ne!(code, Code::Unauthenticated, "{rpc}");
        }
    }
    let read_acme = tokio::task::block_in_place(|| read_one_project(&data));
    for (rpc, code) in every_rpc(&mut c, Some(&read_acme), "a1").await {
        if WRITING.contains(&rpc) {
            assert_eq!(code, Code::PermissionDenied, "{rpc}");
        } else if NAMING_THE_RUN.contains(&rpc) {
            assert!(
                !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                "{rpc}: {code:?}"
            );
        }
    }

    // Revoked: refused from the next call on, without a restart.
    tokio::task::block_in_place(|| revoke(&data, &push));
    let e = client.list_runs(100).await.unwrap_err();
    assert_eq!(e.auth_refusal(), Some(Code::Unauthenticated), "{e}");
    assert!(e.to_string().contains("was revoked"), "{e}");
    for (rpc, code) in every_rpc(&mut c, Some(&push), "a1").await {
        assert_eq!(code, Code::Unauthenticated, "{rpc} with a revoked token");
    }

    // A token of one run reads that run, not its project's history; GetDifferential's base
    // and a listing's limit are the token's reach too.
    let one_run = create(
        &data,
        &["--project", "acme/shop", "--scope", "read", "--run", "a1"],
    );
    let mut c1 = CoverageClient::connect(served.url.clone()).await.unwrap();
    let history = c1
        .get_history(with_token(
            proto::GetHistoryRequest::default(),
            Some(&one_run),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        history.code(),
        Code::PermissionDenied,
        "{}",
        history.message()
    );
    let flaky = c1
        .get_flaky_tests(with_token(
            proto::GetFlakyTestsRequest {
                project: "acme/shop".into(),
                ..Default::default()
            },
            Some(&one_run),
        ))
        .await
        .unwrap_err();
    assert_eq!(flaky.code(), Code::PermissionDenied);
    let differential = c1
        .get_differential(with_token(
            proto::GetDifferentialRequest {
                run_id: "a1".into(),
                base_run_id: "g3".into(),
                ..Default::default()
            },
            Some(&read_one_project(&data)),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        differential.code(),
        Code::PermissionDenied,
        "{}",
        differential.message()
    );
    let mut newest_first =
        covd::client::Client::connect_with(&served.url, Some(&read_other)).unwrap();
    assert_eq!(ids(newest_first.list_runs(1).await.unwrap()), ["g3"]);
    // A token of some projects sends every text itself: it learns nothing of other projects'.
    let missing = c1
        .missing_sources(with_token(
            proto::MissingSourcesRequest {
                sha256: vec![vec![0; 32], vec![1; 32]],
            },
            Some(&create(&data, &["--project", "acme/*", "--scope", "push"])),
        ))
        .await
        .unwrap()
        .into_inner()
        .missing;
    assert_eq!(missing, [0, 1]);

    // The HTTP port: no token 401, a token of some projects 403, one of every project 200.
    let get = |token: Option<&str>| {
        let host = served.http_host();
        let mut stream = std::net::TcpStream::connect(&host).unwrap();
        use std::io::{Read, Write};
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u16>()
            .unwrap()
    };
    let read_one = create(&data, &["--project", "acme/shop", "--scope", "read"]);
    tokio::task::block_in_place(|| {
        assert_eq!(get(None), 401);
        assert_eq!(get(Some(&read_one)), 403);
        assert_eq!(get(Some(&admin)), 200);
    });
}

/// Without tokens the daemon serves loopback only: an address beyond it is refused before
/// anything binds, saying how to go on.
#[test]
fn without_tokens_only_loopback_is_served() {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(COVD)
        .args(["serve", "--listen", "0.0.0.0:0", "--no-http", "--data-dir"])
        .arg(data.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("beyond loopback")
            && err.contains("covd token create")
            && err.contains("--insecure-no-auth"),
        "{err}"
    );
}

/// The project of an existing run is checked when the run is found for the write, not only
/// before: a push or an open that finds the run another project's (opened in between) is
/// refused, and leaves no attempt in it.
#[tokio::test]
async fn a_run_found_at_the_write_must_be_of_the_callers_project() {
    use covd::service::{CoverageService, Error, Limits, RunParams, ShardHeader};
    let service = CoverageService::new(Limits::default());
    let theirs = RunParams {
        project: "theirs/app".into(),
        ..RunParams::default()
    };
    service.open_run("contested", theirs).await.unwrap();
    let only_ours = |project: &str| {
        (project != "ours/app").then(|| format!("run `contested` is of project `{project}`"))
    };
    let header = ShardHeader {
        run_id: "contested".into(),
        shard_id: "0".into(),
        attempt: 7,
        params: RunParams {
            project: "ours/app".into(),
            ..RunParams::default()
        },
        session: Vec::new(),
    };
    let Err(e) = service.begin_shard_as(header.clone(), &only_ours).await else {
        panic!("a shard was written into another project's run");
    };
    assert!(
        matches!(&e, Error::PermissionDenied(m) if m.contains("theirs/app")),
        "{e:?}"
    );
    assert!(service.run_status("contested").unwrap().shards.is_empty());
    let e = service
        .open_run_as("contested", RunParams::default(), Vec::new(), &only_ours)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PermissionDenied(_)), "{e:?}");
    // Its own project's caller goes on.
    let theirs_only = |project: &str| (project != "theirs/app").then(String::new);
    service.begin_shard_as(header, &theirs_only).await.unwrap();
}

/// `covd token revoke --data-dir D TOKEN`.
fn revoke(data: &Path, token: &str) {
    token_command("revoke", data, &[token]);
}

/// The next answer of a stream, which must come within 10 s (a bound, not a wait).
async fn next_within<T>(stream: &mut tonic::Streaming<T>) -> Result<Option<T>, tonic::Status> {
    tokio::time::timeout(std::time::Duration::from_secs(10), stream.message())
        .await
        .expect("an answer within 10 s")
}

/// A token revoked or expired while its calls last ends them: an ingest stream, a watch, a
/// waiting export and the dashboard's events, each told why; what the ingest had acknowledged
/// stays, and a stream of another token carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_token_ends_the_calls_it_holds_open() {
    use proto::ingest_request::Msg as In;
    use proto::ingest_response::Msg as Out;
    let served = Served::start();
    let data = served.data.path().to_owned();
    // Before any token, a watch needs none; once the daemon requires one, it ends too.
    let mut early_client = CoverageClient::connect(served.url.clone()).await.unwrap();
    early_client
        .open_run(proto::OpenRunRequest {
            run_id: "early".into(),
            params: Some(proto::RunParams {
                expected_shards: vec!["0".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut early = early_client
        .watch_run(proto::WatchRunRequest {
            run_id: "early".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!next_within(&mut early).await.unwrap().unwrap().complete);
    let (push, read, dashboard, other) = tokio::task::block_in_place(|| {
        (
            create(&data, &["--project", "acme/*", "--scope", "push"]),
            create(&data, &["--project", "acme/*", "--scope", "read"]),
            create(&data, &["--project", "*", "--scope", "read"]),
            create(&data, &["--project", "acme/*", "--scope", "push"]),
        )
    });
    let mut c = CoverageClient::connect(served.url.clone()).await.unwrap();
    let params = proto::RunParams {
        project: "acme/shop".into(),
        expected_shards: vec!["0".into(), "1".into()],
        ..Default::default()
    };
    let header = |shard: &str| proto::IngestRequest {
        msg: Some(In::Header(proto::ShardHeader {
            run_id: "r".into(),
            shard_id: shard.into(),
            attempt: 1,
            params: Some(params.clone()),
            session_id: Vec::new(),
        })),
    };
    let delta = |seq: u64, line: u32| proto::IngestRequest {
        msg: Some(In::Delta(
            prost::Message::encode_to_vec(&proto::Delta {
                seq,
                files: vec![proto::FileDelta {
                    path: "src/a.rs".into(),
                    line_gaps: vec![line],
                    hits: vec![1],
                    ..Default::default()
                }],
                test: None,
            })
            .into(),
        )),
    };
    // Shard 0 under `push`, shard 1 under `other`: both streams stay open.
    let (tx0, rx0) = tokio::sync::mpsc::channel(4);
    tx0.send(header("0")).await.unwrap();
    tx0.send(delta(1, 1)).await.unwrap();
    let mut shard0 = c
        .ingest(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx0),
            Some(&push),
        ))
        .await
        .unwrap()
        .into_inner();
    let (tx1, rx1) = tokio::sync::mpsc::channel(4);
    tx1.send(header("1")).await.unwrap();
    let mut shard1 = c
        .ingest(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx1),
            Some(&other),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next_within(&mut shard0).await.unwrap().unwrap().msg,
        Some(Out::Resume(_))
    ));
    assert!(matches!(
        next_within(&mut shard0).await.unwrap().unwrap().msg,
        Some(Out::Ack(_))
    ));
    assert!(matches!(
        next_within(&mut shard1).await.unwrap().unwrap().msg,
        Some(Out::Resume(_))
    ));

    let mut watch = c
        .watch_run(with_token(
            proto::WatchRunRequest { run_id: "r".into() },
            Some(&read),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!next_within(&mut watch).await.unwrap().unwrap().complete);
    let mut waiting = c.clone();
    let read_for_export = read.clone();
    let export = tokio::spawn(async move {
        waiting
            .export(with_token(
                proto::ExportRequest {
                    run_id: "r".into(),
                    wait: true,
                    timeout: Some(prost_types::Duration {
                        seconds: 60,
                        nanos: 0,
                    }),
                    ..Default::default()
                },
                Some(&read_for_export),
            ))
            .await
    });
    // The dashboard's events, signed in with a token of every project.
    let host = served.http_host();
    let mut events = tokio::net::TcpStream::connect(&host).await.unwrap();
    {
        use tokio::io::AsyncWriteExt as _;
        events
            .write_all(
                format!(
                    "GET /api/events HTTP/1.1\r\nHost: {host}\r\n\
                     Authorization: Bearer {dashboard}\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
    }
    let mut said = Vec::new();
    let first = read_until(&mut events, &mut said, "event: runs").await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");

    tokio::task::block_in_place(|| {
        revoke(&data, &push);
        revoke(&data, &read);
        revoke(&data, &dashboard);
    });
    let cut = next_within(&mut early).await.unwrap_err();
    assert_eq!(cut.code(), Code::Unauthenticated, "{cut}");
    assert!(cut.message().contains("now requires a token"), "{cut}");
    // Each ends within seconds, saying why, with no call of its own to notice it.
    let cut = next_within(&mut shard0).await.unwrap_err();
    assert_eq!(cut.code(), Code::Unauthenticated, "{cut}");
    assert!(cut.message().contains("was revoked"), "{cut}");
    let cut = next_within(&mut watch).await.unwrap_err();
    assert_eq!(cut.code(), Code::Unauthenticated, "{cut}");
    assert!(cut.message().contains("was revoked"), "{cut}");
    let cut = tokio::time::timeout(std::time::Duration::from_secs(10), export)
        .await
        .expect("the export ends within 10 s")
        .unwrap()
        .unwrap_err();
    assert_eq!(cut.code(), Code::Unauthenticated, "{cut}");
    assert!(cut.message().contains("was revoked"), "{cut}");
    let last = read_until(&mut events, &mut said, "event: denied").await;
    assert!(last.contains("was revoked"), "{last}");

    // The other token's shard goes on and finishes; what shard 0 had acknowledged stays.
    tx1.send(delta(1, 2)).await.unwrap();
    assert!(matches!(
        next_within(&mut shard1).await.unwrap().unwrap().msg,
        Some(Out::Ack(_))
    ));
    tx1.send(proto::IngestRequest {
        msg: Some(In::Finish(proto::Finish {
            final_seq: 1,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    assert!(matches!(
        next_within(&mut shard1).await.unwrap().unwrap().msg,
        Some(Out::Finished(_))
    ));
    let file = c
        .get_file(with_token(
            proto::GetFileRequest {
                run_id: "r".into(),
                path: "src/a.rs".into(),
                ..Default::default()
            },
            Some(&other),
        ))
        .await
        .unwrap()
        .into_inner();
    let lines: Vec<u32> = file.lines.iter().map(|l| l.line).collect();
    assert_eq!(lines, [1, 2], "{file:?}");

    // Expiry ends a watch the same way, with no store change to wake it.
    let brief = tokio::task::block_in_place(|| {
        create(
            &data,
            &["--project", "acme/*", "--scope", "read", "--expires", "3s"],
        )
    });
    let mut watch = c
        .watch_run(with_token(
            proto::WatchRunRequest { run_id: "r".into() },
            Some(&brief),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!next_within(&mut watch).await.unwrap().unwrap().complete);
    let cut = next_within(&mut watch).await.unwrap_err();
    assert_eq!(cut.code(), Code::Unauthenticated, "{cut}");
    assert!(cut.message().contains("has expired"), "{cut}");
    assert!(health_latency(&served.url).await < std::time::Duration::from_millis(100));
}
