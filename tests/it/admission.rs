//! A hostile client against a real daemon: stalled messages, idle connections and streams,
//! too many connections, compressed messages that inflate. The attacker connects from
//! 127.0.0.2 and CI from 127.0.0.1 (both loopback), as two machines would: after each attack
//! the daemon answers health within 100 ms, and a run pushed meanwhile is complete and exact.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use covd::admission::AdmissionLimits;
use covd::server::Settings;
use tonic::Code;

use crate::support::*;

const ATTACKER: [u8; 4] = [127, 0, 0, 2];

fn attacker() -> IpAddr {
    IpAddr::from(ATTACKER)
}

fn socket_addr(url: &str) -> SocketAddr {
    url.strip_prefix("http://").unwrap().parse().unwrap()
}

/// A gRPC connection from the attacker's address.
async fn attacker_channel(url: &str) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .local_address(Some(attacker()))
        .connect()
        .await
}

/// A TCP connection to `daemon` from the attacker's address.
async fn attacker_tcp(daemon: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(attacker(), 0)).unwrap();
    socket.connect(daemon).await.unwrap()
}

/// Waits until the daemon has closed every one of `connections` (what it sends first, such as
/// its HTTP/2 settings, is read and dropped); fails past `within`.
async fn all_closed(connections: Vec<tokio::net::TcpStream>, within: Duration, what: &str) {
    use tokio::io::AsyncReadExt;
    let closed = futures_util::future::join_all(connections.into_iter().map(|mut c| async move {
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }));
    tokio::time::timeout(within, closed)
        .await
        .unwrap_or_else(|_| panic!("{what} still open {within:?} later"));
}

/// A raw HTTP/2 connection from the attacker's address.
async fn h2_connection(daemon: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = attacker_tcp(daemon).await;
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send
}

/// Opens an Ingest call on `send` and sends the 5-byte prefix of a `len`-byte message.
async fn ingest_with_prefix(
    send: h2::client::SendRequest<Bytes>,
    daemon: SocketAddr,
    len: u32,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{daemon}/covd.v1.Coverage/Ingest"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut send = send.ready().await.unwrap();
    let (answer, mut stream) = send.send_request(request, false).unwrap();
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&len.to_be_bytes());
    stream.send_data(Bytes::from(prefix), false).unwrap();
    (answer, stream)
}

/// How a raw call ended: the status in its trailers.
async fn trailers_status(answer: h2::client::ResponseFuture) -> tonic::Status {
    let answer = answer.await.unwrap();
    let mut body = answer.into_body();
    while let Some(data) = body.data().await {
        if data.is_err() {
            break;
        }
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    tonic::Status::from_header_map(&trailers).expect("a grpc-status")
}

/// Opens an Ingest call and sends the prefix of a `len`-byte message, then as much of its
/// body as the daemon lets through (HTTP/2 flow control) up to `len - 1` bytes, and stops
/// there, leaving the stream open. Returns how the call ended: its trailers' status.
async fn stalled_message(
    send: h2::client::SendRequest<Bytes>,
    daemon: SocketAddr,
    len: u32,
) -> tonic::Status {
    let (answer, mut stream) = ingest_with_prefix(send, daemon, len).await;
    let mut left = len as usize - 1;
    let chunk = Bytes::from(vec![0u8; 64 << 10]);
    while left > 0 {
        stream.reserve_capacity(chunk.len().min(left));
        let granted = tokio::time::timeout(
            Duration::from_millis(500),
            std::future::poll_fn(|cx| stream.poll_capacity(cx)),
        )
        .await;
        let Ok(Some(Ok(n))) = granted else { break };
        let n = n.min(left);
        if stream.send_data(chunk.slice(..n), false).is_err() {
            break;
        }
        left -= n;
    }
    let status = trailers_status(answer).await;
    drop(stream);
    status
}

/// The resident memory of process `pid`, in bytes.
fn resident(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Pushes the GCC fixture's first shard as CI would and checks the run holds exactly that
/// coverage.
async fn ci_run_is_exact(url: &str, run: &str) {
    let mut client = covd::client::Client::connect(url).unwrap();
    let coverage = read_lcov(
        &fixture("gcc-lcov/shard1.info"),
        &covd::model::path::PathRules::default(),
    );
    push(&mut client, run, "0", 1, coverage.clone()).await;
    let (_, merged) = fetch(&mut client, run).await;
    assert_eq!(merged, coverage);
}

/// 256 streams that each send most of a 16 MiB message and stop: the daemon holds no more
/// than its receive budget (before, it buffered every one: 4 GB, and aborted), the stalled
/// streams are refused naming the limit that ended them, and meanwhile health answers within
/// 100 ms and a CI run from another address completes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_messages_hold_no_more_than_the_receive_budget() {
    use std::process::Stdio;
    let mut child = crate::cli::serve_in_memory()
        .args([
            "--max-receiving-bytes",
            &(64u32 << 20).to_string(),
            "--max-receiving-bytes-per-client",
            &(32u32 << 20).to_string(),
            "--receive-wait",
            "2s",
            "--read-timeout",
            "4s",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (url, _) = crate::cli::addresses(&mut child);
    let pid = child.id();
    let daemon = socket_addr(&url);
    let before = resident(pid);

    // 64 connections of 4 streams: one connection's flow-control window would stall them all.
    let mut calls = Vec::new();
    for _ in 0..64 {
        let send = h2_connection(daemon).await;
        for _ in 0..4 {
            calls.push(tokio::spawn(stalled_message(
                send.clone(),
                daemon,
                16 << 20,
            )));
        }
    }
    // Let the attack take what it can.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = resident(pid).saturating_sub(before);
    eprintln!("the daemon grew by {} MiB under the attack", held >> 20);
    // The budget (64 MiB, of which this client may hold 32), every stream's 64 KiB window,
    // and room for the allocator and the CI run below.
    assert!(
        held < 160 << 20,
        "the daemon grew by {} MiB under the attack",
        held >> 20
    );
    let took = health_latency(&url).await;
    assert!(took < Duration::from_millis(100), "health took {took:?}");
    ci_run_is_exact(&url, "during-stalled-messages").await;

    let mut named = std::collections::BTreeMap::<&str, usize>::new();
    for call in calls {
        let status = tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .expect("every stalled stream is ended by a limit")
            .unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        let limit = [
            "--read-timeout",
            "--max-receiving-bytes-per-client",
            "--max-receiving-bytes ",
        ]
        .into_iter()
        .find(|l| status.message().contains(l))
        .unwrap_or_else(|| panic!("no limit named: {status:?}"));
        *named.entry(limit).or_default() += 1;
    }
    // Two messages of 16 MiB fit this client's 32 MiB: those ended by the read timeout, the
    // others by their wait for room.
    assert_eq!(named.get("--read-timeout"), Some(&2), "{named:?}");
    assert_eq!(
        named.get("--max-receiving-bytes-per-client"),
        Some(&254),
        "{named:?}"
    );
    let took = health_latency(&url).await;
    assert!(took < Duration::from_millis(100), "health took {took:?}");
    let _ = child.kill();
    let _ = child.wait();
}

fn settings(admission: AdmissionLimits) -> Settings {
    Settings {
        admission,
        ..Settings::default()
    }
}

/// 2,000 connections that never say a word are closed by the idle limit; 2,000 ingest
/// streams that send nothing are ended by theirs, or refused past the client's streams; CI
/// from another address goes on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_and_streams_are_closed() {
    covd::server::raise_descriptor_limit();
    let daemon = Daemon::with(settings(AdmissionLimits {
        max_connections_per_client: 4_000,
        max_streams_per_client: 1_500,
        connection_idle: Duration::from_secs(1),
        stream_idle: Duration::from_secs(1),
        ..AdmissionLimits::default()
    }))
    .await;
    let addr = socket_addr(&daemon.url);
    let mut silent = Vec::new();
    for _ in 0..2_000 {
        silent.push(attacker_tcp(addr).await);
    }
    let took = health_latency(&daemon.url).await;
    assert!(took < Duration::from_millis(100), "health took {took:?}");
    all_closed(
        silent,
        Duration::from_secs(10),
        "idle connections (the limit is 1 s)",
    )
    .await;

    // Two connections of 1,000 streams that send no message.
    let mut calls = Vec::new();
    for _ in 0..2 {
        let channel = attacker_channel(&daemon.url).await.unwrap();
        for _ in 0..1_000 {
            let mut c = covd::rpc::proto::coverage_client::CoverageClient::new(channel.clone());
            calls.push(tokio::spawn(async move {
                let silence = futures_util::stream::pending::<covd::rpc::proto::IngestRequest>();
                match c.ingest(silence).await {
                    Err(status) => status,
                    Ok(answer) => match answer.into_inner().message().await {
                        Err(status) => status,
                        Ok(m) => panic!("an idle stream was answered {m:?}"),
                    },
                }
            }));
        }
    }
    ci_run_is_exact(&daemon.url, "during-idle-streams").await;
    let (mut idle, mut refused) = (0, 0);
    for call in calls {
        let status = tokio::time::timeout(Duration::from_secs(20), call)
            .await
            .expect("an idle stream still open 20 s later (the limit is 1 s)")
            .unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        if status.message().contains("--stream-idle-timeout") {
            idle += 1;
        } else {
            assert!(
                status.message().contains("--max-streams-per-client (1500)"),
                "{status:?}"
            );
            refused += 1;
        }
    }
    assert!(
        idle >= 1_000 && refused >= 1,
        "{idle} idle, {refused} refused"
    );
    let took = health_latency(&daemon.url).await;
    assert!(took < Duration::from_millis(100), "health took {took:?}");
}

/// Past a client's connection limit its calls are refused naming the limit, past twice the
/// limit its connections are closed as they come; another address is served all along, and
/// the client is served again once its connections go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_a_clients_limit_are_refused() {
    let daemon = Daemon::with(settings(AdmissionLimits {
        max_connections_per_client: 4,
        ..AdmissionLimits::default()
    }))
    .await;
    let connect = || async {
        let channel = attacker_channel(&daemon.url).await;
        channel.map(covd::rpc::proto::coverage_client::CoverageClient::new)
    };
    let list = |mut c: covd::rpc::proto::coverage_client::CoverageClient<_>| async move {
        c.list_runs(covd::rpc::proto::ListRunsRequest::default())
            .await
            .map(|_| ())
    };
    let mut held = Vec::new();
    for _ in 0..4 {
        let c = connect().await.unwrap();
        list(c.clone()).await.unwrap();
        held.push(c);
    }
    let fifth = connect().await.unwrap();
    let e = list(fifth.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("--max-connections-per-client (4)"),
        "{e:?}"
    );
    let mut extra = vec![fifth];
    for _ in 0..3 {
        extra.push(connect().await.unwrap());
    }
    // The ninth is closed as it comes: no answer at all.
    match connect().await {
        Err(_) => {}
        Ok(ninth) => {
            let e = list(ninth).await.unwrap_err();
            assert_ne!(e.code(), Code::ResourceExhausted, "{e:?}");
        }
    }
    ci_run_is_exact(&daemon.url, "during-connections").await;
    drop(held);
    drop(extra);
    // Closed connections leave the count when the daemon sees them go.
    let mut served = false;
    for _ in 0..100 {
        if list(connect().await.unwrap()).await.is_ok() {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "the client is refused after its connections went");
}

/// A gzip bomb: 16 KB that inflate to 16 MB (a valid delta of 8 million lines) is refused by
/// the inflation limit, before the delta is decoded; a compressed delta within the ratio
/// merges, and the shard goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_bomb_is_refused_by_the_inflation_limit() {
    use covd::rpc::proto;
    let daemon = Daemon::start().await;
    let mut zipped = crate::ingest::raw(&daemon.url)
        .await
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    let bomb = proto::FileDelta {
        path: "bomb.c".into(),
        line_gaps: vec![1; 8_000_000],
        hits: vec![1; 8_000_000],
        ..Default::default()
    };
    let (mut s, _) = crate::ingest::Stream::open(&mut zipped, "bomb", "s", 1)
        .await
        .unwrap();
    let e = s.delta(1, vec![bomb]).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("--max-inflation (100)"), "{e}");
    let (mut s, _) = crate::ingest::Stream::open(&mut zipped, "bomb", "s", 1)
        .await
        .unwrap();
    let small = crate::ingest::file("a.c", &[(1, 3), (2, 0)]);
    assert_eq!(s.delta(1, vec![small]).await.unwrap().seq, 1);
    s.finish(1).await.unwrap();
    let (_, merged) = fetch(&mut daemon.client(), "bomb").await;
    assert_eq!(merged.files["a.c"].hits_of(1), Some(3));
    assert!(!merged.files.contains_key("bomb.c"));
}

/// `push --watch` while tests run: with nothing to send for longer than the client's idle
/// close, the stream is closed and opened again for the next delta, so a daemon's stream
/// idle limit never ends a push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_that_waits_for_its_tests_outlives_the_stream_idle_limit() {
    use covd::client::{Batcher, PushInput, PushOptions, PushTarget};
    let daemon = Daemon::with(settings(AdmissionLimits {
        stream_idle: Duration::from_secs(1),
        ..AdmissionLimits::default()
    }))
    .await;
    let coverage = read_lcov(
        &fixture("gcc-lcov/shard1.info"),
        &covd::model::path::PathRules::default(),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let files: Vec<_> = coverage.files.clone().into_iter().collect();
    let feeder = tokio::spawn(async move {
        let half = files.len() / 2;
        for (i, chunk) in [&files[..half], &files[half..]].into_iter().enumerate() {
            if i == 1 {
                // The tests run on: nothing to send for longer than the daemon's idle limit.
                tokio::time::sleep(Duration::from_millis(2500)).await;
            }
            let mut batcher = Batcher::default();
            for (path, file) in chunk.iter().cloned() {
                if let Some(d) = batcher.push(path, file) {
                    tx.send(PushInput::Delta(d)).await.unwrap();
                }
            }
            if let Some(d) = batcher.finish() {
                tx.send(PushInput::Delta(d)).await.unwrap();
            }
        }
        tx.send(PushInput::Done(None)).await.unwrap();
    });
    let target = PushTarget {
        run_id: "watching".into(),
        shard_id: "0".into(),
        attempt: 1,
        ..PushTarget::default()
    };
    let options = PushOptions {
        retries: 0,
        idle_close: Duration::from_millis(300),
        ..PushOptions::default()
    };
    let mut client = daemon.client();
    client.push(&target, rx, &options).await.unwrap();
    feeder.await.unwrap();
    let (_, merged) = fetch(&mut client, "watching").await;
    assert_eq!(merged, coverage);
}

/// Every client call has a deadline: against a daemon that accepts and never answers, a call
/// fails with DEADLINE_EXCEEDED at its deadline instead of hanging; a wait for a run longer
/// than the deadline (`fetch --wait`) still gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_calls_have_deadlines_and_waits_extend_them() {
    use covd::client::{Client, ClientError, Connect};
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", mute.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((c, _)) = mute.accept().await {
            open.push(c);
        }
    });
    let how = Connect {
        request_timeout: Some(Duration::from_millis(300)),
        ..Connect::default()
    };
    let started = Instant::now();
    let e = Client::connect_using(&url, &how)
        .unwrap()
        .list_runs(10)
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(&e, ClientError::Status(s) if s.code() == Code::DeadlineExceeded || s.code() == Code::Cancelled),
        "{e:?}"
    );
    assert!(took < Duration::from_secs(3), "the call took {took:?}");
    held.abort();

    // A wait of 2 s for a run that completes after 1 s, with a 300 ms deadline.
    let daemon = Daemon::start().await;
    let mut client = Client::connect_using(&daemon.url, &how).unwrap();
    let params = covd::service::RunParams {
        expected_shards: vec!["0".into()],
        ..Default::default()
    };
    client.open_run("waited", params).await.unwrap();
    let pusher = {
        let url = daemon.url.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut c = covd::client::Client::connect(&url).unwrap();
            let coverage = read_lcov(
                &fixture("gcc-lcov/shard1.info"),
                &covd::model::path::PathRules::default(),
            );
            push(&mut c, "waited", "0", 1, coverage).await;
        })
    };
    let mut out = Vec::new();
    let header = client
        .export("waited", Some(Duration::from_secs(2)), &mut out)
        .await
        .unwrap();
    assert!(header.complete, "{header:?}");
    assert!(!out.is_empty());
    pusher.await.unwrap();
}

/// 10,000 runs opened by one client: past its hourly quota it is refused, naming the limit,
/// while CI from another address opens and pushes its runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_opening_runs_without_end_does_not_lock_ci_out() {
    use covd::rpc::proto;
    let daemon = Daemon::with(Settings {
        limits: covd::service::Limits {
            max_runs: 200,
            max_runs_per_token_per_hour: 100,
            ..covd::service::Limits::default()
        },
        ..Settings::default()
    })
    .await;
    let channel = attacker_channel(&daemon.url).await.unwrap();
    let mut flood = proto::coverage_client::CoverageClient::new(channel);
    let open = |id: String| proto::OpenRunRequest {
        run_id: id,
        params: None,
        known_files: Vec::new(),
    };
    let (mut opened, mut refused) = (0, 0);
    for i in 0..10_000 {
        match flood.open_run(open(format!("squat-{i}"))).await {
            Ok(_) => opened += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(
                    e.message()
                        .contains("127.0.0.2 opened 100 runs within the hour: beyond the limit --max-runs-per-token-per-hour (100)"),
                    "{e:?}"
                );
                refused += 1;
            }
        }
    }
    assert_eq!((opened, refused), (100, 9_900));
    // An existing run opened again is no new run.
    flood.open_run(open("squat-0".into())).await.unwrap();
    ci_run_is_exact(&daemon.url, "ci-after-the-flood").await;
}

/// At `--max-runs`, the run settled longest ago gives up its raw data for a new run (its
/// summary stays); runs still open are never evicted, and when every run is open, a new one
/// is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_run_limit_the_run_settled_longest_ago_makes_room() {
    use covd::service::RunParams;
    let daemon = Daemon::with(Settings {
        limits: covd::service::Limits {
            max_runs: 3,
            ..covd::service::Limits::default()
        },
        ..Settings::default()
    })
    .await;
    let mut client = daemon.client();
    let one_shard = || RunParams {
        expected_shards: vec!["0".into()],
        ..RunParams::default()
    };
    for run in ["oldest", "newer"] {
        client.open_run(run, one_shard()).await.unwrap();
        ci_run_is_exact(&daemon.url, run).await;
        assert!(client.status(run).await.unwrap().complete);
    }
    client.open_run("waiting", one_shard()).await.unwrap();
    client.open_run("fourth", one_shard()).await.unwrap();
    assert!(
        client.status("oldest").await.is_err(),
        "the oldest run stayed"
    );
    assert!(client.status("newer").await.is_ok());
    client.open_run("fifth", one_shard()).await.unwrap();
    assert!(
        client.status("newer").await.is_err(),
        "the newer run stayed"
    );
    for run in ["waiting", "fourth", "fifth"] {
        assert!(client.status(run).await.is_ok(), "{run} was evicted");
    }
    let e = client.open_run("sixth", one_shard()).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("none of them settled: beyond the limit --max-runs (3)"),
        "{e}"
    );
}

/// The HTTP port holds to the same counts: past a client's connections its requests are
/// refused naming the limit; a connection without a request is closed by the idle limit, but
/// the dashboard's events are not (their answer is a call for as long as it lasts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_port_counts_connections_and_closes_idle_ones() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let served = crate::cli::Served::with(
        tempfile::tempdir().unwrap(),
        "127.0.0.1:0",
        &[
            "--connection-idle-timeout",
            "1s",
            "--max-connections-per-client",
            "3",
        ],
    );
    let host = served.http_host();
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut events = tokio::net::TcpStream::connect(&host).await.unwrap();
    events
        .write_all(get("/api/events").as_bytes())
        .await
        .unwrap();
    read_until(&mut events, &mut Vec::new(), "event: runs").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = tokio::net::TcpStream::connect(&host).await.unwrap();
        c.write_all(get("/metrics").as_bytes()).await.unwrap();
        assert!(
            read_until(&mut c, &mut Vec::new(), "\r\n")
                .await
                .starts_with("HTTP/1.1 200")
        );
        held.push(c);
    }
    let mut fourth = tokio::net::TcpStream::connect(&host).await.unwrap();
    fourth.write_all(get("/metrics").as_bytes()).await.unwrap();
    let refused = read_until(&mut fourth, &mut Vec::new(), "}").await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(
        refused.contains("--max-connections-per-client (3)"),
        "{refused}"
    );
    drop(fourth);

    // The held connections, their answers sent, are idle: closed within seconds.
    for mut c in held {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest))
            .await
            .expect("an idle HTTP connection still open 10 s later (the limit is 1 s)")
            .ok();
    }
    // The events, open all along, are not: nothing ends them in the next 2 s.
    let mut buf = [0; 1024];
    match tokio::time::timeout(Duration::from_secs(2), events.read(&mut buf)).await {
        Err(_) => {}
        Ok(Ok(n)) => assert!(n > 0, "the events' connection was closed"),
        Ok(Err(e)) => panic!("the events' connection failed: {e}"),
    }
    // Bytes that are no HTTP are answered 400 (or the connection closed), and the port goes on.
    let mut junk = tokio::net::TcpStream::connect(&host).await.unwrap();
    junk.write_all(b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), junk.read_to_end(&mut answer))
        .await
        .expect("bytes that are no HTTP: closed within 10 s")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    // And a client within its limit again is served.
    let mut again = tokio::net::TcpStream::connect(&host).await.unwrap();
    again.write_all(get("/metrics").as_bytes()).await.unwrap();
    assert!(
        read_until(&mut again, &mut Vec::new(), "\r\n")
            .await
            .starts_with("HTTP/1.1 200")
    );
}

/// Bytes that are no HTTP/2: garbage, a preface cut short, a frame that announces 16 KB and
/// sends 100 bytes. Each connection is closed (the garbage at once, the stalled ones by the
/// idle limit), and meanwhile health answers within 100 ms and a CI run completes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_garbage_and_truncated_frames_are_closed_and_ci_goes_on() {
    use tokio::io::AsyncWriteExt as _;
    let daemon = Daemon::with(settings(AdmissionLimits {
        connection_idle: Duration::from_secs(1),
        ..AdmissionLimits::default()
    }))
    .await;
    let addr = socket_addr(&daemon.url);
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    // An empty SETTINGS frame, then a HEADERS frame header for stream 1 announcing 16,384
    // bytes, and 100 of them.
    let mut truncated = PREFACE.to_vec();
    truncated.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    truncated.extend_from_slice(&[0, 0x40, 0, 1, 4, 0, 0, 0, 1]);
    truncated.extend_from_slice(&[0x82; 100]);
    // Not random, but no protocol's either: the same bytes every run.
    let garbage: Vec<u8> = (0..65_536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let attacks: Vec<Vec<u8>> = vec![garbage, PREFACE[..10].to_vec(), truncated];
    let mut open = Vec::new();
    for attack in &attacks {
        for _ in 0..50 {
            let mut c = attacker_tcp(addr).await;
            // The daemon may close before all of it is written.
            let _ = c.write_all(attack).await;
            open.push(c);
        }
    }
    let took = health_latency(&daemon.url).await;
    assert!(took < Duration::from_millis(100), "health took {took:?}");
    ci_run_is_exact(&daemon.url, "during-garbage").await;
    all_closed(
        open,
        Duration::from_secs(10),
        "connections of garbage (the idle limit is 1 s)",
    )
    .await;
    let took = health_latency(&daemon.url).await;
    assert!(took < Duration::from_millis(100), "health took {took:?}");
}

/// A message whose prefix says 1 GiB is refused from its prefix, naming the limit, with no
/// more of it read than the stream's window; the shard resumes where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_message_is_refused_from_its_prefix() {
    let daemon = Daemon::start().await;
    let mut c = crate::ingest::raw(&daemon.url).await;
    let (mut s, _) = crate::ingest::Stream::open(&mut c, "big", "s", 1)
        .await
        .unwrap();
    s.delta(1, vec![crate::ingest::file("a.c", &[(1, 1)])])
        .await
        .unwrap();
    drop(s);
    let addr = socket_addr(&daemon.url);
    let (answer, mut stream) = ingest_with_prefix(h2_connection(addr).await, addr, 1 << 30).await;
    // A first MiB of it, as far as the window lets it go.
    stream.reserve_capacity(1 << 20);
    let _ = stream.send_data(Bytes::from(vec![0u8; 1 << 20]), false);
    let status = tokio::time::timeout(Duration::from_secs(10), trailers_status(answer))
        .await
        .expect("an answer within 10 s");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-message-bytes"),
        "{status:?}"
    );
    let took = health_latency(&daemon.url).await;
    assert!(took < Duration::from_millis(100), "health took {took:?}");
    let (_, resume) = crate::ingest::Stream::open(&mut c, "big", "s", 1)
        .await
        .unwrap();
    assert_eq!(resume.last_seq, 1);
}

/// Ten million tiny files pushed into one run, in deltas of 100,000: the run takes what its
/// file limit allows and refuses every delta beyond it naming the limit (by the budget, not by
/// the machine); the daemon stays responsive and a CI run beside it completes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_million_tiny_files_meet_the_file_limit() {
    let mut settings = Settings::default();
    settings.limits.max_files_per_run = 200_000;
    let daemon = Daemon::with(settings).await;
    let mut c = crate::ingest::raw(&daemon.url).await;
    let tiny = |n: u32| covd::rpc::proto::FileDelta {
        path: format!("f{n}"),
        line_gaps: vec![1],
        hits: vec![1],
        ..Default::default()
    };
    let (mut accepted, mut refused, mut seq) = (0, 0, 0);
    let (mut s, _) = crate::ingest::Stream::open(&mut c, "tiny", "s", 1)
        .await
        .unwrap();
    for batch in 0..100u32 {
        let files = (0..100_000).map(|i| tiny(batch * 100_000 + i)).collect();
        match s.delta(seq + 1, files).await {
            Ok(_) => {
                accepted += 1;
                seq += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
                assert!(e.message().contains("--max-files-per-run (200000)"), "{e}");
                refused += 1;
                // A refusal ends the stream; the push goes on with a new one.
                s = crate::ingest::Stream::open(&mut c, "tiny", "s", 1)
                    .await
                    .unwrap()
                    .0;
            }
        }
        if batch == 50 {
            let took = health_latency(&daemon.url).await;
            assert!(took < Duration::from_millis(100), "health took {took:?}");
            ci_run_is_exact(&daemon.url, "beside-ten-million-files").await;
        }
    }
    assert_eq!((accepted, refused), (2, 98));
    let status = daemon.client().status("tiny").await.unwrap();
    assert_eq!(status.totals.files, 200_000);
}
