//! Every call about a run names it in the `x-covd-run` header, so that a load balancer in front
//! of a cluster's nodes can send a run's calls to one node (see `docs/cluster.md`), and a
//! client given several nodes moves on to the next when its node is gone.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use covd::client::{Client, PushInput, PushOptions, PushTarget, RUN_HEADER};
use tokio::sync::mpsc;

/// Each request a recorder saw: its path and its run header.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// An HTTP/2 server on loopback that records each request's path and run header, and answers
/// every call UNAVAILABLE (so a push tries the next daemon it was given).
async fn recorder() -> (String, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    let run = request
                        .headers()
                        .get(RUN_HEADER)
                        .map(|v| v.to_str().unwrap().to_owned());
                    record
                        .lock()
                        .unwrap()
                        .push((request.uri().path().to_owned(), run));
                    let answer = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", "14")
                        .header("grpc-message", "recorded")
                        .body(())
                        .unwrap();
                    let _ = respond.send_response(answer, true);
                }
            });
        }
    });
    (url, seen)
}

#[tokio::test]
async fn calls_about_a_run_name_it_for_a_load_balancer() {
    let (url, seen) = recorder().await;
    let mut client = Client::connect(&url).unwrap();
    assert!(client.status("run-42").await.is_err());
    assert!(
        client
            .export("run-42", None, &mut Vec::new())
            .await
            .is_err()
    );
    assert!(client.delete_run("run-42").await.is_err());
    assert!(client.list_runs(10).await.is_err());
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            (
                "/covd.v1.Coverage/GetRunStatus".to_owned(),
                Some("run-42".to_owned())
            ),
            (
                "/covd.v1.Coverage/Export".to_owned(),
                Some("run-42".to_owned())
            ),
            (
                "/covd.v1.Coverage/DeleteRun".to_owned(),
                Some("run-42".to_owned())
            ),
            // About no one run: nothing to route by.
            ("/covd.v1.Coverage/ListRuns".to_owned(), None),
        ]
    );
}

#[tokio::test]
async fn a_push_moves_on_to_the_next_node_it_was_given() {
    let (first, seen_first) = recorder().await;
    let (second, seen_second) = recorder().await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(PushInput::Done(None)).await.unwrap();
    let target = PushTarget {
        run_id: "run-7".into(),
        shard_id: "0".into(),
        attempt: 1,
        ..PushTarget::default()
    };
    let options = PushOptions {
        retries: 3,
        initial_backoff: Duration::from_millis(1),
        ..PushOptions::default()
    };
    let pushed = Client::connect(&format!("{first},{second}"))
        .unwrap()
        .push(&target, rx, &options)
        .await;
    assert!(pushed.is_err(), "both answer UNAVAILABLE");
    let ingest = (
        "/covd.v1.Coverage/Ingest".to_owned(),
        Some("run-7".to_owned()),
    );
    // Four tries, alternating: first, second, first, second.
    assert_eq!(
        *seen_first.lock().unwrap(),
        [ingest.clone(), ingest.clone()]
    );
    assert_eq!(*seen_second.lock().unwrap(), [ingest.clone(), ingest]);
}
