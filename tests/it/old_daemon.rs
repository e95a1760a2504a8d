//! The client against a daemon that does not read branch arm columns (`Resume.branch_columns`
//! false, as every daemon before them said by omission): a stand-in daemon on 127.0.0.1:0 that
//! answers the ingest protocol and keeps the deltas it was sent, decoded.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use covd::client::{Client, ClientError, PushInput, PushOptions, PushTarget};
use covd::rpc::proto::coverage_server::{Coverage, CoverageServer};
use covd::rpc::proto::{self, ingest_request::Msg as In, ingest_response::Msg as Out};
use covd::service::RunParams;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::support::parse_lcov_bytes;

/// One file with arms on two lines: taken, not taken, and `-` (never evaluated).
const LCOV: &[u8] =
    b"SF:src/a.c\nDA:1,1\nDA:2,0\nBRDA:1,0,0,3\nBRDA:1,0,1,-\nBRDA:2,0,0,0\nend_of_record\n";

/// What one ingest stream of the stand-in does.
#[derive(Clone, Copy)]
struct StreamPlan {
    /// Its `Resume.branch_columns`.
    columns: bool,
    /// Whether it acknowledges deltas; if not, it ends the stream UNAVAILABLE after the first
    /// (as a daemon stopped mid-push would).
    acks: bool,
}

#[derive(Clone)]
struct Stand {
    /// The plan of the n-th stream (the last one repeats).
    plans: Vec<StreamPlan>,
    streams: Arc<Mutex<usize>>,
    /// Every delta received, decoded, with the index of its stream.
    received: Arc<Mutex<Vec<(usize, proto::Delta)>>>,
}

type Answers = Pin<Box<dyn Stream<Item = Result<proto::IngestResponse, Status>> + Send>>;

fn unimplemented<T>() -> Result<T, Status> {
    Err(Status::unimplemented("the stand-in daemon only ingests"))
}

#[tonic::async_trait]
impl Coverage for Stand {
    async fn open_run(
        &self,
        _: Request<proto::OpenRunRequest>,
    ) -> Result<Response<proto::OpenRunResponse>, Status> {
        unimplemented()
    }

    async fn get_run_status(
        &self,
        _: Request<proto::GetRunStatusRequest>,
    ) -> Result<Response<proto::RunStatus>, Status> {
        unimplemented()
    }

    type WatchRunStream = ReceiverStream<Result<proto::RunStatus, Status>>;

    async fn watch_run(
        &self,
        _: Request<proto::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        unimplemented()
    }

    async fn list_runs(
        &self,
        _: Request<proto::ListRunsRequest>,
    ) -> Result<Response<proto::ListRunsResponse>, Status> {
        unimplemented()
    }

    type GetTestsForLinesStream = ReceiverStream<Result<proto::TestsForLinesChunk, Status>>;

    async fn get_tests_for_lines(
        &self,
        _: Request<proto::GetTestsForLinesRequest>,
    ) -> Result<Response<Self::GetTestsForLinesStream>, Status> {
        unimplemented()
    }

    type GetTestLinesStream = ReceiverStream<Result<proto::TestLinesChunk, Status>>;

    async fn get_test_lines(
        &self,
        _: Request<proto::GetTestLinesRequest>,
    ) -> Result<Response<Self::GetTestLinesStream>, Status> {
        unimplemented()
    }

    type ListTestsStream = ReceiverStream<Result<proto::TestNames, Status>>;

    async fn list_tests(
        &self,
        _: Request<proto::ListTestsRequest>,
    ) -> Result<Response<Self::ListTestsStream>, Status> {
        unimplemented()
    }

    type GetTestImpactStream = ReceiverStream<Result<proto::TestImpactChunk, Status>>;

    async fn get_test_impact(
        &self,
        _: Request<proto::GetTestImpactRequest>,
    ) -> Result<Response<Self::GetTestImpactStream>, Status> {
        unimplemented()
    }

    async fn get_patch_coverage(
        &self,
        _: Request<proto::GetPatchCoverageRequest>,
    ) -> Result<Response<proto::PatchCoverage>, Status> {
        unimplemented()
    }

    type GetDifferentialStream = ReceiverStream<Result<proto::DifferentialChunk, Status>>;

    async fn get_differential(
        &self,
        _: Request<proto::GetDifferentialRequest>,
    ) -> Result<Response<Self::GetDifferentialStream>, Status> {
        unimplemented()
    }

    type GetLinesStream = ReceiverStream<Result<proto::LinesChunk, Status>>;

    async fn get_lines(
        &self,
        _: Request<proto::GetLinesRequest>,
    ) -> Result<Response<Self::GetLinesStream>, Status> {
        unimplemented()
    }

    async fn get_history(
        &self,
        _: Request<proto::GetHistoryRequest>,
    ) -> Result<Response<proto::History>, Status> {
        unimplemented()
    }

    async fn get_flaky_tests(
        &self,
        _: Request<proto::GetFlakyTestsRequest>,
    ) -> Result<Response<proto::FlakyTests>, Status> {
        unimplemented()
    }

    async fn get_attempts(
        &self,
        _: Request<proto::GetAttemptsRequest>,
    ) -> Result<Response<proto::RunAttempts>, Status> {
        unimplemented()
    }

    async fn missing_sources(
        &self,
        _: Request<proto::MissingSourcesRequest>,
    ) -> Result<Response<proto::MissingSourcesResponse>, Status> {
        unimplemented()
    }

    async fn put_sources(
        &self,
        _: Request<proto::PutSourcesRequest>,
    ) -> Result<Response<proto::PutSourcesResponse>, Status> {
        unimplemented()
    }

    async fn get_source(
        &self,
        _: Request<proto::GetSourceRequest>,
    ) -> Result<Response<proto::Source>, Status> {
        unimplemented()
    }

    type IngestStream = Answers;

    async fn ingest(
        &self,
        request: Request<Streaming<proto::IngestRequest>>,
    ) -> Result<Response<Answers>, Status> {
        let index = {
            let mut n = self.streams.lock().unwrap();
            *n += 1;
            *n - 1
        };
        let plan = self.plans[index.min(self.plans.len() - 1)];
        let received = self.received.clone();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let reply = |msg| Ok(proto::IngestResponse { msg: Some(msg) });
            let Ok(Some(proto::IngestRequest {
                msg: Some(In::Header(header)),
            })) = inbound.message().await
            else {
                return;
            };
            let resume = proto::Resume {
                attempt: header.attempt.max(1),
                last_seq: 0,
                finished: false,
                branch_columns: plan.columns,
                // A daemon from before sessions.
                sessions: false,
            };
            let _ = tx.send(reply(Out::Resume(resume))).await;
            while let Ok(Some(message)) = inbound.message().await {
                match message.msg {
                    Some(In::Delta(bytes)) => {
                        let delta = proto::Delta::decode(bytes).unwrap();
                        let seq = delta.seq;
                        received.lock().unwrap().push((index, delta));
                        if !plan.acks {
                            let _ = tx.send(Err(Status::unavailable("stopping"))).await;
                            return;
                        }
                        let ack = proto::Ack {
                            seq,
                            durable: true,
                            ..proto::Ack::default()
                        };
                        let _ = tx.send(reply(Out::Ack(ack))).await;
                    }
                    Some(In::Finish(finish)) => {
                        let finished = proto::Finished {
                            final_seq: finish.final_seq,
                            run: None,
                        };
                        let _ = tx.send(reply(Out::Finished(finished))).await;
                        return;
                    }
                    _ => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ExportStream = ReceiverStream<Result<proto::ExportChunk, Status>>;

    async fn export(
        &self,
        _: Request<proto::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        unimplemented()
    }

    async fn get_file(
        &self,
        _: Request<proto::GetFileRequest>,
    ) -> Result<Response<proto::FileCoverage>, Status> {
        unimplemented()
    }

    async fn get_directory(
        &self,
        _: Request<proto::GetDirectoryRequest>,
    ) -> Result<Response<proto::DirectorySummary>, Status> {
        unimplemented()
    }

    async fn delete_run(
        &self,
        _: Request<proto::DeleteRunRequest>,
    ) -> Result<Response<proto::DeleteRunResponse>, Status> {
        unimplemented()
    }
}

impl Stand {
    /// Serves on a loopback port chosen by the OS; returns its URL.
    async fn serve(plans: Vec<StreamPlan>) -> (Stand, String) {
        let stand = Stand {
            plans,
            streams: Arc::default(),
            received: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let service = CoverageServer::new(stand.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        (stand, url)
    }

    fn received(&self) -> Vec<(usize, proto::Delta)> {
        self.received.lock().unwrap().clone()
    }
}

/// Pushes [`LCOV`] as one delta.
async fn push(url: &str) -> Result<(), ClientError> {
    let coverage = parse_lcov_bytes(LCOV);
    let (tx, rx) = mpsc::channel(4);
    tx.send(PushInput::Delta(coverage.files.into_iter().collect()))
        .await
        .unwrap();
    tx.send(PushInput::Done(None)).await.unwrap();
    let target = PushTarget {
        run_id: "r".into(),
        shard_id: "s".into(),
        attempt: 1,
        params: RunParams::default(),
        telemetry: None,
    };
    let options = PushOptions {
        retries: 3,
        initial_backoff: Duration::from_millis(10),
        ..PushOptions::default()
    };
    Client::connect(url)
        .unwrap()
        .push(&target, rx, &options)
        .await
        .map(|_| ())
}

/// A branch arm as (line, block, branch, taken).
type Arm = (u32, u32, u32, Option<u64>);

/// The arms of a delta's only file, whichever form carried them, and whether that form was
/// the columns.
fn arms(delta: &proto::Delta) -> (Vec<Arm>, bool) {
    let [file] = delta.files.as_slice() else {
        panic!("one file per delta, got {}", delta.files.len());
    };
    assert!(
        file.branches.is_empty() || file.arm_line_gaps.is_empty(),
        "the arms come in one form, not both"
    );
    if file.arm_line_gaps.is_empty() {
        let arms = file
            .branches
            .iter()
            .map(|b| (b.line, b.block, b.branch, b.taken))
            .collect();
        return (arms, false);
    }
    let mut line = 0;
    let arms = (0..file.arm_line_gaps.len())
        .map(|i| {
            line += file.arm_line_gaps[i];
            let taken = file.arm_taken[i].checked_sub(1);
            (line, file.arm_blocks[i], file.arm_numbers[i], taken)
        })
        .collect();
    (arms, true)
}

#[tokio::test]
async fn a_daemon_without_arm_columns_gets_branch_messages() {
    let expected = vec![(1, 0, 0, Some(3)), (1, 0, 1, None), (2, 0, 0, Some(0))];
    for columns in [false, true] {
        let (stand, url) = Stand::serve(vec![StreamPlan {
            columns,
            acks: true,
        }])
        .await;
        push(&url).await.unwrap();
        let received = stand.received();
        assert_eq!(received.len(), 1, "one delta (columns: {columns})");
        let (mut got, as_columns) = arms(&received[0].1);
        got.sort();
        assert_eq!(
            as_columns, columns,
            "the arms' form follows Resume.branch_columns"
        );
        assert_eq!(got, expected, "every arm arrives, whichever the form");
    }
}

#[tokio::test]
async fn a_downgrade_with_unacknowledged_column_deltas_stops_the_push() {
    // The first stream takes the delta in columns and stops before acknowledging it; the
    // daemon that answers the reconnect does not read columns.
    let (stand, url) = Stand::serve(vec![
        StreamPlan {
            columns: true,
            acks: false,
        },
        StreamPlan {
            columns: false,
            acks: true,
        },
    ])
    .await;
    let err = push(&url).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Protocol(m) if m.contains("higher --attempt")),
        "{err}"
    );
    let received = stand.received();
    assert_eq!(received.len(), 1, "nothing was re-sent to the older daemon");
    assert_eq!(received[0].0, 0);
    assert!(arms(&received[0].1).1, "the first daemon got columns");
}
