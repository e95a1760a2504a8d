//! Streams used wrongly and requests beyond each limit: a precise status, and the run and the
//! daemon carry on. (Malformed deltas themselves are in `bad_input.rs`.)

use std::time::{Duration, SystemTime};

use covd::model::FileBatch;
use covd::rpc::proto;
use covd::rpc::proto::ingest_request::Msg as In;
use covd::rpc::proto::ingest_response::Msg as Out;
use covd::server::Settings;
use covd::service::{CoverageService, Delta, Error, Limits, RunParams, ShardHeader};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::ingest::{Stream, file, raw};
use crate::support::*;

fn header(run: &str, shard: &str) -> proto::IngestRequest {
    proto::IngestRequest {
        msg: Some(In::Header(proto::ShardHeader {
            run_id: run.into(),
            shard_id: shard.into(),
            attempt: 1,
            params: None,
            session_id: Vec::new(),
        })),
    }
}

fn delta(seq: u64, files: Vec<proto::FileDelta>) -> proto::IngestRequest {
    let bytes = prost::Message::encode_to_vec(&proto::Delta {
        seq,
        files,
        test: None,
    });
    proto::IngestRequest {
        msg: Some(In::Delta(bytes.into())),
    }
}

const EMPTY: proto::IngestRequest = proto::IngestRequest { msg: None };

/// Sends `messages` on one stream, closes it, and returns what the daemon answered: its
/// messages, then how it ended (`None` for a clean end).
async fn answers(
    url: &str,
    messages: Vec<proto::IngestRequest>,
) -> (Vec<Out>, Option<tonic::Status>) {
    let mut c = raw(url).await;
    let (tx, rx) = tokio::sync::mpsc::channel(messages.len().max(1));
    for m in messages {
        tx.send(m).await.unwrap();
    }
    drop(tx);
    let mut inbound = match c.ingest(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => return (Vec::new(), Some(status)),
    };
    let mut got = Vec::new();
    loop {
        match inbound.message().await {
            Ok(Some(m)) => got.push(m.msg.expect("an answer")),
            Ok(None) => return (got, None),
            Err(status) => return (got, Some(status)),
        }
    }
}

fn refused(ended: Option<tonic::Status>, code: Code, message: &str) {
    let status = ended.expect("the stream must end with a refusal");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(message), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_must_open_with_one_header_and_carry_no_empty_message() {
    let daemon = Daemon::start().await;
    let url = &daemon.url;
    let first = "the first message of a stream must be a header";

    let (got, ended) = answers(url, vec![delta(1, vec![file("a.c", &[(1, 1)])])]).await;
    assert!(got.is_empty(), "{got:?}");
    refused(ended, Code::InvalidArgument, first);

    // No header at all, or an empty first message: refused too, never a clean end.
    let before = "the stream ended or sent an empty message before its header";
    for messages in [Vec::new(), vec![EMPTY], vec![EMPTY, header("r", "s")]] {
        let (got, ended) = answers(url, messages).await;
        assert!(got.is_empty(), "{got:?}");
        refused(ended, Code::InvalidArgument, before);
    }

    // A second header, or an empty message after the header.
    let (got, ended) = answers(url, vec![header("r", "s"), header("r", "t")]).await;
    assert!(matches!(got[..], [Out::Resume(_)]), "{got:?}");
    refused(
        ended,
        Code::InvalidArgument,
        "a stream carries one header, first",
    );
    let (got, ended) = answers(url, vec![header("r", "s"), EMPTY]).await;
    assert!(matches!(got[..], [Out::Resume(_)]), "{got:?}");
    refused(ended, Code::InvalidArgument, "msg: an empty message");

    // None of it touched the run: its shard resumes from nothing and takes a delta.
    let mut c = raw(url).await;
    let (mut s, resume) = Stream::open(&mut c, "r", "s", 1).await.unwrap();
    assert_eq!((resume.last_seq, resume.finished), (0, false));
    s.delta(1, vec![file("a.c", &[(1, 1)])]).await.unwrap();
    let listed = daemon.client().list_runs(0).await.unwrap();
    assert_eq!(
        listed.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(),
        ["r"]
    );
}

fn limited(limits: Limits) -> Settings {
    Settings {
        limits,
        ..Settings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_and_runs_beyond_their_limits_are_resource_exhausted() {
    let daemon = Daemon::with(limited(Limits {
        max_shards_per_run: 2,
        max_runs: 2,
        ..Limits::default()
    }))
    .await;
    let mut client = daemon.client();
    let three = RunParams {
        expected_shards: vec!["a".into(), "b".into(), "c".into()],
        ..RunParams::default()
    };
    let e = client.open_run("declared", three).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("3 expected shards: beyond the limit --max-shards-per-run (2)"),
        "{e}"
    );
    // A run that declares none meets the limit at its third shard; the first two go on.
    let mut c = raw(&daemon.url).await;
    let (mut a, _) = Stream::open(&mut c, "open", "a", 1).await.unwrap();
    let (_b, _) = Stream::open(&mut c, "open", "b", 1).await.unwrap();
    let Err(e) = Stream::open(&mut c, "open", "c", 1).await else {
        panic!("a third shard was accepted");
    };
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(
        e.message().contains(
            "a new shard `c` of run `open`, which has 2: beyond the limit --max-shards-per-run (2)"
        ),
        "{e}"
    );
    a.delta(1, vec![file("a.c", &[(1, 1)])]).await.unwrap();
    // A known shard reconnecting is not a new one.
    let (_a_again, resume) = Stream::open(&mut c, "open", "a", 1).await.unwrap();
    assert_eq!(resume.last_seq, 1);

    // Runs: "open" is one; a second fits, a third does not (neither has settled, so neither
    // makes room; see admission.rs), until one is deleted.
    client
        .open_run("second", RunParams::default())
        .await
        .unwrap();
    let e = client
        .open_run("third", RunParams::default())
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains(
            "a new run `third` while the daemon holds 2, none of them settled: beyond the limit --max-runs (2)"
        ),
        "{e}"
    );
    let Err(e) = Stream::open(&mut c, "third", "a", 1).await else {
        panic!("a push opened a run beyond the limit");
    };
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    client.delete_run("second").await.unwrap();
    client
        .open_run("third", RunParams::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_beyond_their_limits_are_resource_exhausted_and_the_shard_goes_on() {
    let daemon = Daemon::with(limited(Limits {
        max_files_per_delta: 2,
        max_name_bytes: 6,
        max_line: 100,
        ..Limits::default()
    }))
    .await;
    let mut c = raw(&daemon.url).await;
    let (mut s, _) = Stream::open(&mut c, "r", "s", 1).await.unwrap();
    let three: Vec<_> = ["a.c", "b.c", "c.c"]
        .iter()
        .map(|p| file(p, &[(1, 1)]))
        .collect();
    let e = s.delta(1, three).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(
        e.message().contains(
            "a delta of 3 files (send smaller deltas): beyond the limit --max-files-per-delta (2)"
        ),
        "{e}"
    );

    let (mut s, _) = Stream::open(&mut c, "r", "s", 1).await.unwrap();
    let e = s
        .delta(1, vec![file("a.c", &[(100, 1), (101, 1)])])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(
        e.message()
            .contains("line 101 is beyond the limit --max-line (100)"),
        "{e}"
    );

    let (mut s, _) = Stream::open(&mut c, "r", "s", 1).await.unwrap();
    let labelled = proto::FileDelta {
        branches: vec![proto::Branch {
            line: 1,
            label: "jump to line 7".into(),
            taken: Some(1),
            ..Default::default()
        }],
        ..file("a.c", &[(1, 1)])
    };
    let e = s.delta(1, vec![labelled]).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(
        e.message().contains("label") && e.message().contains("--max-name-bytes (6)"),
        "{e}"
    );

    let (mut s, _) = Stream::open(&mut c, "r", "s", 1).await.unwrap();
    let mut by_test = proto::Delta {
        seq: 1,
        files: vec![file("a.c", &[(1, 1)])],
        test: Some(proto::TestRef {
            name: "test_a_long_name".into(),
        }),
    };
    let bytes = prost::Message::encode_to_vec(&by_test);
    let e = s.send(In::Delta(bytes.into())).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(
        e.message().starts_with("delta.test.name") && e.message().contains("--max-name-bytes (6)"),
        "{e}"
    );

    // Within every limit, the shard takes its first delta: nothing before was applied.
    let (mut s, resume) = Stream::open(&mut c, "r", "s", 1).await.unwrap();
    assert_eq!(resume.last_seq, 0);
    by_test.test = None;
    by_test.files = vec![file("a.c", &[(100, 2)]), file("b.c", &[(1, 1)])];
    let bytes = prost::Message::encode_to_vec(&by_test);
    assert!(matches!(
        s.send(In::Delta(bytes.into())).await.unwrap(),
        Out::Ack(_)
    ));
    s.finish(1).await.unwrap();
    let merged = daemon.client().file("r", "a.c").await.unwrap();
    assert_eq!(merged.line_hits().collect::<Vec<_>>(), [(100, 2)]);
}

/// A limit of one delta in flight makes concurrent shards wait their turn, not fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_delta_in_flight_serialises_shards_without_refusing_any() {
    let daemon = Daemon::with(limited(Limits {
        max_deltas_in_flight: 1,
        ..Limits::default()
    }))
    .await;
    let mut expected = covd::model::Coverage::default();
    let mut pushes = Vec::new();
    for i in 1..=3 {
        let rules = covd::model::path::PathRules {
            strip: vec![format!("/builds/shard-{i}/")],
            ..Default::default()
        };
        let coverage = read_lcov(&fixture(&format!("gcc-lcov/shard{i}.info")), &rules);
        expected.merge(&coverage);
        let mut client = daemon.client();
        pushes.push(tokio::spawn(async move {
            push(&mut client, "r", &i.to_string(), 1, coverage).await
        }));
    }
    for p in pushes {
        p.await.unwrap();
    }
    let (_, merged) = fetch(&mut daemon.client(), "r").await;
    assert_eq!(merged, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_compressed_stream_merges_like_a_plain_one() {
    let daemon = Daemon::start().await;
    let files = || {
        vec![
            file("a.c", &[(1, 3), (2, 0), (9, 1)]),
            file("b.c", &[(4, 2)]),
        ]
    };
    let mut plain = raw(&daemon.url).await;
    let mut zipped = raw(&daemon.url)
        .await
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    for (c, run) in [(&mut plain, "plain"), (&mut zipped, "gzip")] {
        let (mut s, _) = Stream::open(c, run, "s", 1).await.unwrap();
        let ack = s.delta(1, files()).await.unwrap();
        assert_eq!(ack.seq, 1);
        s.finish(1).await.unwrap();
    }
    let mut client = daemon.client();
    let (_, a) = fetch(&mut client, "plain").await;
    let (_, b) = fetch(&mut client, "gzip").await;
    assert_eq!(a, b);
    assert_eq!(a.files["a.c"].hits_of(1), Some(3));

    // Inflating beyond the message limit is refused, whatever the compressed size.
    let huge = proto::FileDelta {
        path: "big.c".into(),
        line_gaps: vec![1; 9_000_000],
        hits: vec![1; 9_000_000],
        ..Default::default()
    };
    let (mut s, _) = Stream::open(&mut zipped, "gzip-big", "s", 1).await.unwrap();
    let e = s.delta(1, vec![huge]).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_deleted_while_a_shard_streams_refuses_its_next_delta_and_finish() {
    let daemon = Daemon::start().await;
    let mut c = raw(&daemon.url).await;
    let (mut s, _) = Stream::open(&mut c, "r", "s", 1).await.unwrap();
    s.delta(1, vec![file("a.c", &[(1, 1)])]).await.unwrap();
    let (mut t, _) = Stream::open(&mut c, "r", "t", 1).await.unwrap();
    t.delta(1, vec![file("a.c", &[(2, 1)])]).await.unwrap();
    daemon.client().delete_run("r").await.unwrap();
    let e = s.delta(2, vec![file("a.c", &[(3, 1)])]).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert!(e.message().contains("run `r` does not exist"), "{e}");
    let e = t.finish(1).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert!(daemon.client().list_runs(0).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_run_expired_while_a_shard_streams_refuses_its_next_delta_and_finish() {
    let service = CoverageService::new(Limits::default());
    let session = service
        .begin_shard(ShardHeader {
            run_id: "r".into(),
            shard_id: "s".into(),
            attempt: 1,
            params: RunParams::default(),
            session: Vec::new(),
        })
        .await
        .unwrap();
    let one = |seq| Delta {
        seq,
        files: FileBatch::of_files(&[("a.c", {
            let mut b = covd::model::FileBuilder::new();
            b.line(1, 1);
            b.build()
        })]),
        ..Delta::default()
    };
    service.apply(&session, one(1)).await.unwrap();
    let expired = service
        .expire_runs(SystemTime::now() + Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(expired, 1);
    let e = service.apply(&session, one(2)).await.unwrap_err();
    assert!(matches!(&e, Error::RunNotFound(r) if r == "r"), "{e:?}");
    let e = service.finish(&session, 1, None).await.unwrap_err();
    assert!(matches!(&e, Error::RunNotFound(r) if r == "r"), "{e:?}");
}

/// Stored deltas are read back with the model's bound on lines: a daemon may not accept lines
/// beyond it, or a restart could not read what it acknowledged.
#[tokio::test]
async fn a_line_limit_beyond_what_covd_stores_is_refused_at_start() {
    let max = covd::model::MAX_LINE;
    let daemon = Daemon::with(limited(Limits {
        max_line: max + 1,
        ..Limits::default()
    }))
    .await;
    let e = daemon.stop().await.unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("max_line {} is beyond {max}", max + 1)),
        "{e}"
    );
    // The CLI refuses it before serving (a daemon that started would be killed, and fail).
    let mut child = std::process::Command::new(crate::cli::COVD)
        .args([
            "serve",
            "--in-memory",
            "--listen",
            "127.0.0.1:0",
            "--no-http",
            "--max-line",
        ])
        .arg((max + 1).to_string())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let r = child.wait_with_output().unwrap();
    assert_eq!(r.status.code(), Some(2), "{r:?}");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("--max-line") && err.contains("1..=10000000"),
        "{err}"
    );
}

/// A limit is the most allowed, not the first refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_may_expect_as_many_shards_as_the_limit() {
    let daemon = Daemon::with(limited(Limits {
        max_shards_per_run: 2,
        ..Limits::default()
    }))
    .await;
    let two = RunParams {
        expected_shards: vec!["a".into(), "b".into()],
        ..RunParams::default()
    };
    let (created, status) = daemon.client().open_run("r", two).await.unwrap();
    assert!(created);
    assert_eq!(status.missing_shards, ["a", "b"]);
}

/// More connections than the daemon has file descriptors (its limit at 128, as `ulimit -n`
/// sets it): it neither spins on `accept` (its CPU over a second of that stays low) nor stops
/// (its standard error, read up to its first line, is a closed pipe when it warns); once those
/// connections go, health answers within 100 ms and a push goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_connections_than_descriptors_neither_spin_nor_stop_the_daemon() {
    use std::process::{Command, Stdio};
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 128 && exec '{}' serve --listen 127.0.0.1:0 --no-http --data-dir '{}'",
            crate::cli::COVD,
            data.path().display()
        ))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (url, _) = crate::cli::addresses(&mut child);
    let pid = child.id();
    let addr = url.strip_prefix("http://").unwrap().to_owned();
    // Ticks of CPU (user and system) the daemon has used.
    let cpu = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let idle: Vec<std::net::TcpStream> = (0..300)
        .filter_map(|_| std::net::TcpStream::connect(&addr).ok())
        .collect();
    assert!(idle.len() > 128, "{} connections", idle.len());
    let before = cpu();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spent = cpu() - before;
    // Clock ticks are 1/100 s on Linux: at most 0.3 s of a core, where a spinning accept
    // loop takes nearly all of it.
    assert!(
        spent <= 30,
        "the daemon used {spent} ticks in a second of it"
    );
    drop(idle);
    let mut answered = None;
    for _ in 0..100 {
        let started = std::time::Instant::now();
        let check = async {
            let channel = tonic::transport::Endpoint::from_shared(url.clone())
                .unwrap()
                .connect()
                .await
                .ok()?;
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            health
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .ok()
        };
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(1), check).await {
            answered = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = answered.expect("health never answered once the connections went");
    assert!(took < Duration::from_millis(100), "health took {took:?}");
    let mut client = covd::client::Client::connect(&url).unwrap();
    let coverage = read_lcov(
        &fixture("gcc-lcov/shard1.info"),
        &covd::model::path::PathRules::default(),
    );
    push(&mut client, "after", "0", 1, coverage).await;
    assert!(!client.status("after").await.unwrap().shards.is_empty());
    let _ = child.kill();
    let _ = child.wait();
}
