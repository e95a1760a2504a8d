//! The ingest protocol as PRODUCT.md defines it: resume, replays, attempts, completeness.

use std::time::Duration;

use covd::rpc::proto::coverage_client::CoverageClient;
use covd::rpc::proto::{self, ingest_request::Msg as In, ingest_response::Msg as Out};
use covd::service::{RunParams, ShardState};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::support::*;

/// One raw ingest stream, driven message by message.
pub(crate) struct Stream {
    tx: mpsc::Sender<proto::IngestRequest>,
    rx: Streaming<proto::IngestResponse>,
}

pub(crate) async fn raw(url: &str) -> CoverageClient<Channel> {
    CoverageClient::connect(url.to_owned()).await.unwrap()
}

impl Stream {
    /// Opens a stream and sends the header; returns the stream and the resume answer.
    pub(crate) async fn open(
        client: &mut CoverageClient<Channel>,
        run: &str,
        shard: &str,
        attempt: u32,
    ) -> Result<(Stream, proto::Resume), tonic::Status> {
        Stream::open_as(client, run, shard, attempt, b"").await
    }

    /// [`Stream::open`] as the push `session` (its `session_id`; empty for none).
    pub(crate) async fn open_as(
        client: &mut CoverageClient<Channel>,
        run: &str,
        shard: &str,
        attempt: u32,
        session: &[u8],
    ) -> Result<(Stream, proto::Resume), tonic::Status> {
        let (tx, rx) = mpsc::channel(8);
        tx.send(msg(In::Header(proto::ShardHeader {
            run_id: run.into(),
            shard_id: shard.into(),
            attempt,
            params: None,
            session_id: session.to_vec(),
        })))
        .await
        .unwrap();
        let mut rx = client.ingest(ReceiverStream::new(rx)).await?.into_inner();
        match rx.message().await?.and_then(|m| m.msg) {
            Some(Out::Resume(r)) => Ok((Stream { tx, rx }, r)),
            other => panic!("expected a resume, got {other:?}"),
        }
    }

    /// Waits until the daemon ends the stream without being asked anything: the status it
    /// ended with, or `None` for a clean end.
    pub(crate) async fn ended(&mut self) -> Option<tonic::Status> {
        match self.rx.message().await {
            Ok(Some(m)) => panic!("expected the end of the stream, got {m:?}"),
            Ok(None) => None,
            Err(status) => Some(status),
        }
    }

    pub(crate) async fn send(&mut self, m: In) -> Result<Out, tonic::Status> {
        // A closed request stream means the connection died: the response says why.
        if self.tx.send(msg(m)).await.is_err() {
            self.rx.message().await?;
            return Err(tonic::Status::unavailable("the stream closed"));
        }
        Ok(self
            .rx
            .message()
            .await?
            .and_then(|m| m.msg)
            .expect("an answer"))
    }

    pub(crate) async fn delta(
        &mut self,
        seq: u64,
        files: Vec<proto::FileDelta>,
    ) -> Result<proto::Ack, tonic::Status> {
        match self
            .send(In::Delta(
                prost::Message::encode_to_vec(&proto::Delta {
                    seq,
                    files,
                    test: None,
                })
                .into(),
            ))
            .await?
        {
            Out::Ack(a) => Ok(a),
            other => panic!("expected an ack, got {other:?}"),
        }
    }

    pub(crate) async fn finish(
        &mut self,
        final_seq: u64,
    ) -> Result<proto::Finished, tonic::Status> {
        match self
            .send(In::Finish(proto::Finish {
                final_seq,
                telemetry: None,
            }))
            .await?
        {
            Out::Finished(f) => Ok(f),
            other => panic!("expected finished, got {other:?}"),
        }
    }
}

fn msg(m: In) -> proto::IngestRequest {
    proto::IngestRequest { msg: Some(m) }
}

/// A file delta with the given (line, hits).
pub(crate) fn file(path: &str, lines: &[(u32, u64)]) -> proto::FileDelta {
    let mut prev = 0;
    proto::FileDelta {
        path: path.into(),
        line_gaps: lines
            .iter()
            .map(|(l, _)| {
                let g = l - prev;
                prev = *l;
                g
            })
            .collect(),
        hits: lines.iter().map(|(_, h)| *h).collect(),
        ..Default::default()
    }
}

async fn open(daemon: &Daemon, run: &str, shards: &[&str]) {
    daemon
        .client()
        .open_run(
            run,
            RunParams {
                expected_shards: shards.iter().map(|s| s.to_string()).collect(),
                ..RunParams::default()
            },
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_reconnecting_shard_resumes_and_a_resent_delta_counts_once() {
    let daemon = Daemon::start().await;
    open(&daemon, "r", &["a", "b"]).await;
    let mut c = raw(&daemon.url).await;
    let (mut s, resume) = Stream::open(&mut c, "r", "a", 1).await.unwrap();
    assert_eq!((resume.last_seq, resume.finished), (0, false));
    s.delta(1, vec![file("x.c", &[(1, 1), (2, 0)])])
        .await
        .unwrap();
    s.delta(2, vec![file("x.c", &[(2, 10)])]).await.unwrap();
    drop(s); // the connection drops without a finish

    let mut client = daemon.client();
    let shard = wait_for_state(&mut client, "r", "a", ShardState::Interrupted).await;
    assert_eq!(shard.last_seq, 2);

    let (mut s, resume) = Stream::open(&mut c, "r", "a", 1).await.unwrap();
    assert_eq!(resume.last_seq, 2);
    let again = s.delta(2, vec![file("x.c", &[(2, 10)])]).await.unwrap();
    assert!(
        again.duplicate,
        "a re-sent delta is recognised by its sequence number"
    );
    let ack = s.delta(3, vec![file("x.c", &[(3, 7)])]).await.unwrap();
    assert!(!ack.duplicate);
    let finished = s.finish(3).await.unwrap();
    assert!(!finished.run.unwrap().complete, "shard b is still missing");

    let f = client.file("r", "x.c").await.unwrap();
    assert_eq!(
        f.line_hits().collect::<Vec<_>>(),
        vec![(1, 1), (2, 10), (3, 7)]
    );
}

/// A re-sent delta is a duplicate only if its bytes are those acknowledged under its number:
/// a second writer of the attempt (here two clients without sessions) is refused, not told
/// "duplicate" for coverage the run never got.
#[tokio::test]
async fn a_resent_delta_that_differs_is_refused() {
    let daemon = Daemon::start().await;
    let mut c = raw(&daemon.url).await;
    let (mut first, _) = Stream::open(&mut c, "r", "a", 1).await.unwrap();
    first.delta(1, vec![file("x.c", &[(1, 1)])]).await.unwrap();
    drop(first);
    let mut client = daemon.client();
    wait_for_state(&mut client, "r", "a", ShardState::Interrupted).await;
    let (mut second, resume) = Stream::open(&mut c, "r", "a", 1).await.unwrap();
    assert_eq!(resume.last_seq, 1);
    assert!(resume.sessions);
    let e = second
        .delta(1, vec![file("y.c", &[(1, 1)])])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");
    assert!(
        e.message()
            .contains("differs from the delta 1 already acknowledged")
            && e.message().contains("--attempt"),
        "{e}"
    );
    let (mut third, _) = Stream::open(&mut c, "r", "a", 1).await.unwrap();
    let same = third.delta(1, vec![file("x.c", &[(1, 1)])]).await.unwrap();
    assert!(same.duplicate);
    let f = client.file("r", "x.c").await.unwrap();
    assert_eq!(f.line_hits().collect::<Vec<_>>(), [(1, 1)]);
    assert!(client.file("r", "y.c").await.is_err());
}

/// An attempt belongs to the push (session) that started it: a reconnect of that push resumes,
/// another push is refused while the attempt has data or an open stream, and takes over an
/// attempt that has neither.
#[tokio::test]
async fn a_second_push_of_an_attempt_is_refused() {
    let daemon = Daemon::start().await;
    let mut c = raw(&daemon.url).await;
    let (mut a, _) = Stream::open_as(&mut c, "r", "s", 1, b"push-a")
        .await
        .unwrap();
    a.delta(1, vec![file("x.c", &[(1, 1)])]).await.unwrap();
    let refused = |e: tonic::Status, how: &str| {
        assert_eq!(e.code(), Code::AlreadyExists, "{e}");
        assert!(
            e.message().contains(how) && e.message().contains("another push"),
            "{e}"
        );
    };
    let Err(e) = Stream::open_as(&mut c, "r", "s", 1, b"push-b").await else {
        panic!("a second push of the attempt was let in");
    };
    refused(e, "is being written");
    // A push without a session is another push too.
    let Err(e) = Stream::open(&mut c, "r", "s", 1).await else {
        panic!("a push without a session was let in");
    };
    refused(e, "is being written");
    drop(a);
    let (mut a, resume) = Stream::open_as(&mut c, "r", "s", 1, b"push-a")
        .await
        .unwrap();
    assert_eq!(resume.last_seq, 1);
    a.finish(1).await.unwrap();
    let Err(e) = Stream::open_as(&mut c, "r", "s", 1, b"push-b").await else {
        panic!("a second push of a finished attempt was let in");
    };
    refused(e, "was finished");
    // A higher attempt replaces it, whoever sends it.
    Stream::open_as(&mut c, "r", "s", 2, b"push-b")
        .await
        .unwrap();

    // Nothing acknowledged and no stream open: the next push takes the attempt over.
    let (idle, _) = Stream::open_as(&mut c, "r", "t", 1, b"push-c")
        .await
        .unwrap();
    drop(idle);
    let mut client = daemon.client();
    wait_for_state(&mut client, "r", "t", ShardState::Interrupted).await;
    let (mut d, resume) = Stream::open_as(&mut c, "r", "t", 1, b"push-d")
        .await
        .unwrap();
    assert_eq!(resume.last_seq, 0);
    d.delta(1, vec![file("t.c", &[(1, 1)])]).await.unwrap();
    let Err(e) = Stream::open_as(&mut c, "r", "t", 1, b"push-c").await else {
        panic!("the push that took the attempt over lost it");
    };
    refused(e, "is being written");
}

async fn wait_for_state(
    client: &mut covd::client::Client,
    run: &str,
    shard: &str,
    state: ShardState,
) -> covd::service::ShardStatus {
    // The server notices the closed stream asynchronously: asked until it has (10 s at most).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = client.status(run).await.unwrap();
        if let Some(found) = status
            .shards
            .iter()
            .find(|x| x.shard_id == shard && x.state == state)
        {
            return found.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "shard {shard} never reached {state:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_higher_attempt_replaces_the_earlier_one() {
    let daemon = Daemon::start().await;
    open(&daemon, "r", &["a", "b"]).await;
    let mut c = raw(&daemon.url).await;
    let (mut s, _) = Stream::open(&mut c, "r", "a", 1).await.unwrap();
    s.delta(1, vec![file("x.c", &[(1, 5)])]).await.unwrap();
    s.finish(1).await.unwrap();
    let (mut b, _) = Stream::open(&mut c, "r", "b", 1).await.unwrap();
    b.delta(1, vec![file("x.c", &[(1, 1), (9, 1)])])
        .await
        .unwrap();

    let (mut s2, resume) = Stream::open(&mut c, "r", "a", 2).await.unwrap();
    assert_eq!((resume.attempt, resume.last_seq), (2, 0));
    s2.delta(1, vec![file("x.c", &[(2, 3)])]).await.unwrap();
    s2.finish(1).await.unwrap();

    let mut client = daemon.client();
    let f = client.file("r", "x.c").await.unwrap();
    assert_eq!(
        f.line_hits().collect::<Vec<_>>(),
        vec![(1, 1), (2, 3), (9, 1)],
        "attempt 1's five hits on line 1 are gone; shard b's stay"
    );
    let stale = Stream::open(&mut c, "r", "a", 1).await.err().unwrap();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert!(
        stale.message().contains("superseded by attempt 2"),
        "{}",
        stale.message()
    );
    // A delta still in flight on shard b is unaffected.
    b.delta(2, vec![file("y.c", &[(1, 1)])]).await.unwrap();
    b.finish(2).await.unwrap();
    assert!(client.status("r").await.unwrap().complete);
}

#[tokio::test]
async fn a_complete_run_refuses_more_coverage() {
    // Without a reopen window (see the next test for a retry within one).
    let daemon = Daemon::with(covd::server::Settings {
        limits: covd::service::Limits {
            reopen_window: None,
            ..covd::service::Limits::default()
        },
        ..covd::server::Settings::default()
    })
    .await;
    open(&daemon, "r", &["only"]).await;
    let mut c = raw(&daemon.url).await;
    let (mut s, _) = Stream::open(&mut c, "r", "only", 1).await.unwrap();
    s.delta(1, vec![file("x.c", &[(1, 1)])]).await.unwrap();
    let done = s.finish(1).await.unwrap();
    assert!(done.run.unwrap().complete);

    for attempt in [1, 2] {
        let (mut again, resume) = match Stream::open(&mut c, "r", "only", attempt).await {
            Ok(x) => x,
            Err(e) => {
                assert_eq!(e.code(), Code::FailedPrecondition, "attempt {attempt}");
                assert!(e.message().contains("is complete"), "{}", e.message());
                continue;
            }
        };
        // The same attempt may reconnect to confirm its finish, but not to add deltas.
        assert_eq!(attempt, 1);
        assert!(resume.finished);
        let e = again
            .delta(2, vec![file("x.c", &[(2, 1)])])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
    }
    let (mut other, _) = match Stream::open(&mut c, "r", "late", 1).await {
        Ok(x) => x,
        Err(e) => {
            assert_eq!(e.code(), Code::FailedPrecondition);
            return;
        }
    };
    panic!(
        "a stream for an unexpected shard of a complete run was accepted: {:?}",
        other.finish(0).await
    );
}

/// CI's "re-run failed jobs" after the pipeline ended: the same run, a higher attempt of one
/// shard. Within the reopen window it reopens the complete run: the run waits for that shard
/// again, the failed attempt's coverage goes, and the retry's finish completes it anew. An
/// older attempt, or a shard the run does not expect, is still refused.
#[tokio::test]
async fn a_retry_reopens_a_complete_run() {
    let daemon = Daemon::start().await;
    open(&daemon, "r", &["a", "b"]).await;
    let mut c = raw(&daemon.url).await;
    let (mut a, _) = Stream::open(&mut c, "r", "a", 1).await.unwrap();
    a.delta(1, vec![file("x.c", &[(1, 5), (3, 1)])])
        .await
        .unwrap();
    a.finish(1).await.unwrap();
    let (mut b, _) = Stream::open(&mut c, "r", "b", 1).await.unwrap();
    b.delta(1, vec![file("x.c", &[(1, 1), (9, 1)])])
        .await
        .unwrap();
    assert!(b.finish(1).await.unwrap().run.unwrap().complete);
    let mut client = daemon.client();

    let (mut retry, resume) = Stream::open(&mut c, "r", "a", 2).await.unwrap();
    assert_eq!((resume.attempt, resume.last_seq), (2, 0));
    let status = client.status("r").await.unwrap();
    assert!(!status.complete, "reopened");
    assert_eq!(status.missing_shards, ["a"]);
    let f = client.file("r", "x.c").await.unwrap();
    assert_eq!(
        f.line_hits().collect::<Vec<_>>(),
        vec![(1, 1), (9, 1)],
        "attempt 1's lines are gone until the retry sends its own"
    );
    retry
        .delta(1, vec![file("x.c", &[(1, 2), (5, 1)])])
        .await
        .unwrap();
    assert!(retry.finish(1).await.unwrap().run.unwrap().complete);
    let f = client.file("r", "x.c").await.unwrap();
    assert_eq!(
        f.line_hits().collect::<Vec<_>>(),
        vec![(1, 3), (5, 1), (9, 1)]
    );

    let stale = Stream::open(&mut c, "r", "a", 1).await.err().unwrap();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let late = Stream::open(&mut c, "r", "c", 1).await.err().unwrap();
    assert_eq!(late.code(), Code::FailedPrecondition);
    assert!(client.status("r").await.unwrap().complete);
}

#[tokio::test]
async fn shards_the_run_does_not_expect_are_refused() {
    let daemon = Daemon::start().await;
    open(&daemon, "r", &["0", "1"]).await;
    let mut c = raw(&daemon.url).await;
    let e = Stream::open(&mut c, "r", "2", 1).await.err().unwrap();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("not among the expected shards"),
        "{}",
        e.message()
    );
}

#[tokio::test]
async fn sequence_gaps_and_short_finishes_are_refused() {
    let daemon = Daemon::start().await;
    let mut c = raw(&daemon.url).await;
    let (mut s, _) = Stream::open(&mut c, "r", "a", 1).await.unwrap();
    s.delta(1, vec![file("x.c", &[(1, 1)])]).await.unwrap();
    let e = s.delta(3, vec![file("x.c", &[(1, 1)])]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("expected sequence number 2"),
        "{}",
        e.message()
    );

    let (mut s, resume) = Stream::open(&mut c, "r", "a", 1).await.unwrap();
    assert_eq!(resume.last_seq, 1, "the refused delta left nothing behind");
    let e = s.finish(5).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("but 1 were acknowledged"),
        "{}",
        e.message()
    );
}

#[tokio::test]
async fn opening_is_idempotent_and_conflicts_are_refused() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    let params = RunParams {
        project: "shop".into(),
        expected_shards: vec!["0".into(), "1".into()],
        ..RunParams::default()
    };
    let (created, _) = client.open_run("r", params.clone()).await.unwrap();
    assert!(created);
    let (created, status) = client.open_run("r", params.clone()).await.unwrap();
    assert!(!created);
    assert_eq!(status.missing_shards, vec!["0", "1"]);

    let conflicting = RunParams {
        expected_shards: vec!["0".into(), "1".into(), "2".into()],
        ..params.clone()
    };
    let e = client.open_run("r", conflicting).await.unwrap_err();
    assert!(e.to_string().contains("expecting shards"), "{e}");
    let other_project = RunParams {
        project: "elsewhere".into(),
        ..params
    };
    let e = client.open_run("r", other_project).await.unwrap_err();
    assert!(e.to_string().contains("project `shop`"), "{e}");
}

/// A second open may leave out what the first said (an empty field agrees with anything) and
/// may add what the first left out; flags, once given, must be the same.
#[tokio::test]
async fn a_second_open_may_say_less_but_not_otherwise() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    let first = RunParams {
        branch: "main".into(),
        flags: flags(&["unit"]),
        expected_shards: vec!["0".into(), "1".into()],
        ..RunParams::default()
    };
    client.open_run("r", first.clone()).await.unwrap();
    // Saying nothing agrees; saying the same agrees.
    let (created, status) = client.open_run("r", RunParams::default()).await.unwrap();
    assert!(!created);
    assert_eq!(status.params, first);
    client.open_run("r", first.clone()).await.unwrap();
    // A field the first open left empty is taken from the second.
    let more = RunParams {
        project: "shop".into(),
        ..RunParams::default()
    };
    let (_, status) = client.open_run("r", more).await.unwrap();
    assert_eq!(status.params.project, "shop");
    assert_eq!(status.params.flags, flags(&["unit"]));
    let other_flags = RunParams {
        flags: flags(&["integration"]),
        ..RunParams::default()
    };
    let e = client.open_run("r", other_flags).await.unwrap_err();
    assert!(e.to_string().contains("different flags"), "{e}");
    let other_branch = RunParams {
        branch: "dev".into(),
        ..RunParams::default()
    };
    let e = client.open_run("r", other_branch).await.unwrap_err();
    assert!(e.to_string().contains("branch `main`, not `dev`"), "{e}");
    // Flags given to a run opened without any are taken.
    client
        .open_run("plain", RunParams::default())
        .await
        .unwrap();
    let (_, status) = client
        .open_run(
            "plain",
            RunParams {
                flags: flags(&["unit"]),
                ..RunParams::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(status.params.flags, flags(&["unit"]));
    // A run a push opened, opened again without expected shards: nothing to check the
    // received shards against.
    push(
        &mut client,
        "pushed",
        "0",
        1,
        covd::model::Coverage::default(),
    )
    .await;
    let (created, status) = client
        .open_run(
            "pushed",
            RunParams {
                project: "shop".into(),
                ..RunParams::default()
            },
        )
        .await
        .unwrap();
    assert!(!created);
    assert!(status.params.expected_shards.is_empty());
}

fn flags(names: &[&str]) -> std::collections::BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[tokio::test]
async fn a_push_before_the_open_is_given_its_expectations_later() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    let cov = read_lcov(
        &fixture("../../examples/quickstart/shard-a.info"),
        &Default::default(),
    );
    push(&mut client, "r", "1", 1, cov).await;
    let status = client.status("r").await.unwrap();
    assert!(!status.expectations_declared && !status.complete);
    let (created, status) = client
        .open_run(
            "r",
            RunParams {
                expected_shards: vec!["1".into(), "2".into()],
                ..RunParams::default()
            },
        )
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(status.missing_shards, vec!["2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_wait_returns_when_the_last_shard_finishes_or_says_what_is_missing() {
    let daemon = Daemon::start().await;
    open(&daemon, "r", &["a", "b"]).await;
    let mut c = raw(&daemon.url).await;
    let (mut a, _) = Stream::open(&mut c, "r", "a", 1).await.unwrap();
    a.delta(1, vec![file("x.c", &[(1, 1)])]).await.unwrap();
    a.finish(1).await.unwrap();

    let mut client = daemon.client();
    let mut out = Vec::new();
    let header = client
        .export("r", Some(Duration::from_millis(200)), &mut out)
        .await
        .unwrap();
    assert!(header.timed_out && !header.complete);
    assert_eq!(header.missing_shards, vec!["b"]);
    assert_eq!(
        parse_lcov_bytes(&out).files.len(),
        1,
        "the partial result is still exported"
    );

    let waiting = {
        let mut client = daemon.client();
        tokio::spawn(async move {
            let mut out = Vec::new();
            let h = client
                .export("r", Some(Duration::from_secs(60)), &mut out)
                .await
                .unwrap();
            (h, out)
        })
    };
    let (mut b, _) = Stream::open(&mut c, "r", "b", 1).await.unwrap();
    b.delta(1, vec![file("y.c", &[(4, 2)])]).await.unwrap();
    assert!(!waiting.is_finished());
    b.finish(1).await.unwrap();
    let (header, out) = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the waiting export returns once the last shard finished")
        .unwrap();
    assert!(header.complete && !header.timed_out);
    assert_eq!(parse_lcov_bytes(&out).files.len(), 2);
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let daemon = Daemon::start().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&daemon).await);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "covd.v1.Coverage".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1 as refl;
    let mut client =
        refl::server_reflection_client::ServerReflectionClient::new(channel(&daemon).await);
    let request = refl::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            refl::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(refl::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer.message_response
    else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"covd.v1.Coverage"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    use tonic_reflection::pb::v1alpha as alpha;
    let mut client =
        alpha::server_reflection_client::ServerReflectionClient::new(channel(&daemon).await);
    let request = alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "covd.v1.Coverage".into(),
            ),
        ),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    assert!(matches!(
        answer.message_response,
        Some(alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f))
            if !f.file_descriptor_proto.is_empty()
    ));
}

async fn channel(daemon: &Daemon) -> Channel {
    tonic::transport::Endpoint::from_shared(daemon.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A file larger than one answer is read in pages that add up to the whole file (lines,
/// branches, functions and tests on page boundaries included); a client that asks for the
/// whole of it at once is told to page, naming the limit.
#[tokio::test]
async fn a_large_file_is_read_in_pages() {
    let limits = covd::service::Limits {
        file_page_lines: 1000,
        ..covd::service::Limits::default()
    };
    let daemon = Daemon::with(covd::server::Settings {
        limits,
        ..covd::server::Settings::default()
    })
    .await;
    let mut b = covd::model::FileBuilder::new();
    let test: std::sync::Arc<str> = "t".into();
    for line in (1..=9000u32).step_by(2) {
        b.line(line, u64::from(line % 7));
        if line % 10 == 1 {
            b.branch(
                covd::model::BranchKey {
                    line,
                    block: 0,
                    arm: covd::model::BranchArm::Index(0),
                },
                Some(1),
            );
            b.function(&format!("f{line}"), line, line + 1, 1);
            b.test_line(&test, line);
        }
    }
    let big = b.build();
    let mut client = daemon.client();
    let mut c = covd::model::Coverage::default();
    c.add("big.c", &big);
    push(&mut client, "r", "s", 1, c).await;
    assert_eq!(client.file("r", "big.c").await.unwrap(), big);

    let mut c = raw(&daemon.url).await;
    let e = c
        .get_file(proto::GetFileRequest {
            run_id: "r".into(),
            path: "big.c".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("--file-page-lines (1000)"), "{e}");
    let page = c
        .get_file(proto::GetFileRequest {
            run_id: "r".into(),
            path: "big.c".into(),
            first_line: 0,
            max_lines: 5000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        page.lines.len(),
        1000,
        "the daemon caps a page at its limit"
    );
    assert_eq!(page.next_line, 2001);
    assert_eq!(page.totals.unwrap().lines, 4500);

    // A client from before pages asks for a file of a page or less whole, and gets it.
    let mut small = covd::model::Coverage::default();
    let mut b = covd::model::FileBuilder::new();
    for line in 1..=1000 {
        b.line(line, u64::from(line % 3));
    }
    small.add("small.c", &b.build());
    push(&mut client, "r2", "s", 1, small).await;
    let whole = c
        .get_file(proto::GetFileRequest {
            run_id: "r2".into(),
            path: "small.c".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(whole.lines.len(), 1000);
    assert_eq!(whole.next_line, 0, "nothing more to ask for");
}

/// A watch follows the run and ends when the run completes, with the complete status last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_when_the_run_completes() {
    let daemon = Daemon::start().await;
    open(&daemon, "r", &["a", "b"]).await;
    let mut watcher = daemon.client();
    let watching = tokio::spawn(async move {
        let mut seen = Vec::new();
        watcher
            .watch("r", |s| seen.push((s.complete, s.missing_shards.clone())))
            .await
            .unwrap();
        seen
    });
    let mut client = daemon.client();
    for shard in ["a", "b"] {
        let mut c = covd::model::Coverage::default();
        c.add("x.c", &{
            let mut b = covd::model::FileBuilder::new();
            b.line(1, 1);
            b.build()
        });
        push(&mut client, "r", shard, 1, c).await;
    }
    let seen = tokio::time::timeout(Duration::from_secs(30), watching)
        .await
        .expect("the watch ends once the run is complete")
        .unwrap();
    assert_eq!(seen.last(), Some(&(true, Vec::new())), "{seen:?}");
    assert!(
        seen[..seen.len() - 1].iter().all(|(complete, _)| !complete),
        "{seen:?}"
    );
}

/// An in-memory daemon's acknowledgements say they are not durable (a data directory's say
/// they are: `durability.rs`).
#[tokio::test]
async fn an_in_memory_daemon_says_its_acknowledgements_are_not_durable() {
    let daemon = Daemon::start().await;
    let mut c = raw(&daemon.url).await;
    let (mut s, _) = Stream::open(&mut c, "r", "s", 1).await.unwrap();
    let ack = s.delta(1, vec![file("a.c", &[(1, 1)])]).await.unwrap();
    assert_eq!(ack.seq, 1);
    assert!(!ack.durable);
}

/// Runs are listed newest first: as many as asked for, or all up to `--runs-listed` when the
/// request names no number.
#[tokio::test]
async fn runs_are_listed_newest_first_up_to_the_number_asked() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    for run in ["first", "second", "third"] {
        client.open_run(run, RunParams::default()).await.unwrap();
        // Creation times are kept to the millisecond: one apart, the order is by time.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let ids = |runs: Vec<covd::service::RunStatus>| {
        runs.into_iter().map(|r| r.run_id).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(client.list_runs(0).await.unwrap()),
        ["third", "second", "first"]
    );
    assert_eq!(ids(client.list_runs(2).await.unwrap()), ["third", "second"]);
    assert_eq!(ids(client.list_runs(1).await.unwrap()), ["third"]);
}

/// A project's runs are listed without the other projects' runs.
#[tokio::test]
async fn runs_are_listed_per_project() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    for (run, project) in [("a1", "acme"), ("b1", "bolt"), ("a2", "acme")] {
        let params = RunParams {
            project: project.to_owned(),
            ..RunParams::default()
        };
        client.open_run(run, params).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut c = raw(&daemon.url).await;
    let mut listed = async |project: &str| {
        let request = proto::ListRunsRequest {
            limit: 0,
            project: project.to_owned(),
        };
        let runs = c.list_runs(request).await.unwrap().into_inner().runs;
        runs.into_iter().map(|r| r.run_id).collect::<Vec<_>>()
    };
    assert_eq!(listed("acme").await, ["a2", "a1"]);
    assert_eq!(listed("bolt").await, ["b1"]);
    assert!(listed("none").await.is_empty());
    assert_eq!(listed("").await, ["a2", "b1", "a1"]);
}

/// Shards are listed as people count them: `2` before `10`.
#[tokio::test]
async fn expected_shards_are_listed_in_counting_order() {
    let daemon = Daemon::start().await;
    let params = RunParams {
        expected_shards: ["10", "2", "1", "b", "a"].map(String::from).to_vec(),
        ..RunParams::default()
    };
    let (_, status) = daemon.client().open_run("r", params).await.unwrap();
    assert_eq!(status.missing_shards, ["1", "2", "10", "a", "b"]);
}
