//! The typed client the CLI and the tests use. It speaks domain types; the wire stays here and
//! in `rpc`.
//!
//! [`Client::push`] is the shard side of ingest: it numbers deltas, keeps the unacknowledged
//! ones, and after a dropped connection reconnects, learns the last acknowledged sequence and
//! re-sends only what is missing.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use roaring::RoaringBitmap;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::model::FileCoverage;
use crate::rpc::convert::{self, ArmForm, file_to_proto};
use crate::rpc::proto::coverage_client::CoverageClient;
use crate::rpc::proto::{self, ingest_request, ingest_response};
use crate::service::{
    Differential, DirectorySummary, ExportFormat, ExportHeader, LineSet, PatchCoverage, RunParams,
    RunStatus, TestImpact, TestTelemetry, TestsForLines,
};

/// Deltas sent but not yet acknowledged, at most.
const WINDOW: usize = 16;
/// A delta is closed once it holds this many lines or files (about 80 KB on the wire). The
/// daemon holds every stream's delta in hand while it waits its turn, so the size is its
/// memory per stream: at 16 shards × 35,000 files, 2,000-file deltas peaked the daemon at
/// 261 MB and 250-file ones at 176 MB, with no more CPU per file; at 64 shards × 5,000
/// files, 250-file deltas still grew the peak by 48% over 16 shards.
const DELTA_LINES: usize = 20_000;
const DELTA_FILES: usize = 100;
/// Lines of a file asked for in one query answer: about 2 MB of lines, within any daemon's
/// message limit even with branches on every line.
pub const FILE_PAGE_LINES: u32 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server address `{0}`")]
    Address(String),
    #[error("TLS: {0}")]
    Tls(String),
    /// The daemon answered with an error, or could not be reached.
    #[error("{}", describe(.0))]
    Status(#[from] Status),
    #[error("the daemon broke the protocol: {0}")]
    Protocol(String),
    #[error(
        "the daemon no longer has deltas it acknowledged (up to {acked}; it says {resume}); was it restarted without a data directory?"
    )]
    LostAcknowledged { acked: u64, resume: u64 },
    #[error(
        "attempt {attempt} of shard `{shard}` already holds {last_seq} deltas from another push; push with a higher --attempt to replace it"
    )]
    AttemptTaken {
        shard: String,
        attempt: u32,
        last_seq: u64,
    },
    #[error("the input ended early (a file could not be read); the shard was left unfinished")]
    InputAborted,
    #[error("writing the export failed: {0}")]
    Output(#[from] std::io::Error),
    #[error("the spool file {path}: {error}")]
    Spool { path: String, error: std::io::Error },
}

fn describe(s: &Status) -> String {
    match s.code() {
        Code::Unavailable => format!("the daemon is unavailable: {}", s.message()),
        code => format!("{}: {}", code.description(), s.message()),
    }
}

impl ClientError {
    /// Whether the daemon was unreachable, down, or lost its state (as opposed to refusing
    /// the request): what a push forgives unless told to fail.
    pub fn is_unavailable(&self) -> bool {
        match self {
            ClientError::Status(s) => retryable_code(s.code()),
            ClientError::LostAcknowledged { .. } => true,
            _ => false,
        }
    }

    /// Whether the daemon refused the call's token: `Unauthenticated` (none, unknown, expired,
    /// revoked) or `PermissionDenied` (its scope or projects do not reach).
    pub fn auth_refusal(&self) -> Option<Code> {
        match self {
            ClientError::Status(s)
                if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied) =>
            {
                Some(s.code())
            }
            _ => None,
        }
    }

    /// Whether the daemon refused the request's content (including a push of an attempt
    /// that another push holds).
    pub fn is_invalid_input(&self) -> bool {
        match self {
            ClientError::Status(s) => matches!(
                s.code(),
                Code::InvalidArgument
                    | Code::FailedPrecondition
                    | Code::ResourceExhausted
                    | Code::AlreadyExists
                    | Code::NotFound
                    | Code::Unimplemented
            ),
            ClientError::AttemptTaken { .. } => true,
            _ => false,
        }
    }
}

/// Which shard attempt a push feeds.
#[derive(Debug, Clone, Default)]
pub struct PushTarget {
    pub run_id: String,
    pub shard_id: String,
    pub attempt: u32,
    /// Used if the push opens the run.
    pub params: RunParams,
    pub telemetry: Option<TestTelemetry>,
}

/// How hard a push tries.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Reconnects after a dropped connection or an unavailable daemon.
    pub retries: u32,
    pub initial_backoff: Duration,
    /// With every delta acknowledged and nothing to send for this long (`push --watch` while
    /// tests run), the stream is closed, and opened again for the next delta: the daemon ends
    /// streams idle beyond its `--stream-idle-timeout` (10 minutes by default).
    pub idle_close: Duration,
}

impl Default for PushOptions {
    fn default() -> PushOptions {
        PushOptions {
            retries: 5,
            initial_backoff: Duration::from_millis(200),
            idle_close: Duration::from_secs(60),
        }
    }
}

/// What a push achieved.
#[derive(Debug, Clone)]
pub struct PushReport {
    pub deltas: u64,
    pub reconnects: u32,
    pub run: Option<RunStatus>,
    /// Paths the daemon reported as not among the run's known files (the first ones).
    pub unknown_paths: Vec<String>,
}

/// Unknown paths a push keeps for its report at most.
const UNKNOWN_KEPT: usize = 100;

/// What a push reads from its producer. The producer ends with `Done`; a channel that closes
/// without it means the input failed (a malformed file), and the shard is then left
/// unfinished rather than finished with part of its coverage.
#[derive(Debug)]
pub enum PushInput {
    Delta(Vec<(String, FileCoverage)>),
    /// What one test covered: every covered line of these files is attributed to `test`.
    TestDelta {
        test: String,
        files: Vec<(String, FileCoverage)>,
    },
    /// The end; with the shard's test results, when it read any (they replace
    /// `PushTarget::telemetry`).
    Done(Option<TestTelemetry>),
}

/// Groups files into deltas of a sensible size.
#[derive(Debug, Default)]
pub struct Batcher {
    files: Vec<(String, FileCoverage)>,
    lines: usize,
}

impl Batcher {
    /// Adds a file; returns a full delta when this one closed it.
    pub fn push(
        &mut self,
        path: String,
        file: FileCoverage,
    ) -> Option<Vec<(String, FileCoverage)>> {
        self.lines += file.lines().len() as usize + file.branches().len() + file.functions().len();
        self.files.push((path, file));
        (self.lines >= DELTA_LINES || self.files.len() >= DELTA_FILES).then(|| self.take())
    }

    /// The last, partial delta.
    pub fn finish(mut self) -> Option<Vec<(String, FileCoverage)>> {
        (!self.files.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> Vec<(String, FileCoverage)> {
        self.lines = 0;
        std::mem::take(&mut self.files)
    }
}

/// A connection to a covd daemon (or to one of several nodes of a cluster: see
/// [`Client::connect_using`]).
#[derive(Debug, Clone)]
pub struct Client {
    inner: Rpc,
    /// Every daemon the client was given, in order; `inner` is one of them.
    daemons: Arc<Vec<Rpc>>,
    /// Which of `daemons` is `inner`.
    current: usize,
    deadline: Option<Duration>,
}

type Rpc = CoverageClient<InterceptedService<Channel, Bearer>>;

/// Sends the client's token, if it has one, with every call (`authorization: Bearer …`), and
/// gives every call that has none the client's deadline (`grpc-timeout`, which both ends
/// enforce; for a stream it bounds the wait for the stream to begin).
#[derive(Debug, Clone)]
pub struct Bearer {
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    deadline: Option<Duration>,
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        if let Some(deadline) = self.deadline
            && !request.metadata().contains_key("grpc-timeout")
        {
            request.set_timeout(deadline);
        }
        Ok(request)
    }
}

/// Source files a request names at most.
const SOURCES_PER_REQUEST: usize = 2000;

/// Bytes of source text read ahead at most: a batch ends there.
const SOURCE_BYTES_READ_AHEAD: usize = 32 << 20;

/// Bytes of source text a request carries at most (one larger text goes alone).
const SOURCE_BYTES_PER_REQUEST: usize = 8 << 20;

/// What [`Client::send_sources`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SourcesSent {
    /// Files whose text the run now names.
    pub files: u64,
    /// Texts the daemon did not have.
    pub new_texts: u64,
    /// Files left out: not under the source root, not readable here, or beyond the daemon's
    /// size limit.
    pub outside_root: u64,
    pub unreadable: u64,
    pub too_large: u64,
}

/// A batch of source files read and hashed, texts beside them.
struct ReadSources {
    files: Vec<proto::SourceFile>,
    texts: Vec<Vec<u8>>,
    outside_root: u64,
    unreadable: u64,
    too_large: u64,
    /// Entries of the list this batch took.
    consumed: usize,
}

/// Reads the next batch of `files`: at most [`SOURCES_PER_REQUEST`] of them, ending once
/// [`SOURCE_BYTES_READ_AHEAD`] bytes are read.
fn read_sources(
    files: &[(String, Vec<std::path::PathBuf>)],
    root: &std::path::Path,
    max_bytes: usize,
) -> ReadSources {
    let mut read = ReadSources {
        files: Vec::new(),
        texts: Vec::new(),
        outside_root: 0,
        unreadable: 0,
        too_large: 0,
        consumed: 0,
    };
    let mut bytes = 0;
    for (path, places) in files.iter().take(SOURCES_PER_REQUEST) {
        if bytes >= SOURCE_BYTES_READ_AHEAD {
            break;
        }
        read.consumed += 1;
        let found: Vec<std::path::PathBuf> = places
            .iter()
            .filter_map(|p| std::fs::canonicalize(p).ok())
            .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file()))
            .collect();
        let Some(local) = found.iter().find(|p| p.starts_with(root)) else {
            if found.is_empty() {
                read.unreadable += 1;
            } else {
                read.outside_root += 1;
            }
            continue;
        };
        let size = std::fs::metadata(local).map_or(0, |m| m.len());
        if size > max_bytes as u64 {
            read.too_large += 1;
            continue;
        }
        match std::fs::read(local) {
            Ok(text) if text.len() > max_bytes => read.too_large += 1,
            Ok(text) => {
                bytes += text.len();
                read.files.push(proto::SourceFile {
                    path: path.clone(),
                    sha256: crate::service::digest_of(&text).to_vec(),
                    text: None,
                });
                read.texts.push(text);
            }
            Err(_) => read.unreadable += 1,
        }
    }
    read
}

/// How a client connects (see [`Client::connect_using`]).
#[derive(Debug, Clone)]
pub struct Connect {
    /// The token sent with every call (`covd_…`).
    pub token: Option<String>,
    /// For `https://`: the CA (PEM) the daemon's certificate must chain to, instead of the
    /// system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// For `https://`: a client certificate chain and its key (PEM), for a daemon that
    /// requires them.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// How long a call may take to be answered (for a stream: to begin); `None`: no deadline.
    pub request_timeout: Option<Duration>,
}

impl Default for Connect {
    fn default() -> Connect {
        Connect {
            token: None,
            ca_pem: None,
            identity: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Some(Duration::from_secs(300)),
        }
    }
}

impl Connect {
    fn tls_config(&self) -> tonic::transport::ClientTlsConfig {
        let mut tls = tonic::transport::ClientTlsConfig::new();
        tls = match &self.ca_pem {
            Some(ca) => tls.ca_certificate(tonic::transport::Certificate::from_pem(ca)),
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        tls
    }
}

impl Client {
    /// Connects lazily: the first call fails with UNAVAILABLE if nobody listens, and later
    /// calls reconnect by themselves.
    pub fn connect(url: &str) -> Result<Client, ClientError> {
        Client::connect_with(url, None)
    }

    /// [`Client::connect`], sending `token` (`covd_…`) with every call.
    pub fn connect_with(url: &str, token: Option<&str>) -> Result<Client, ClientError> {
        Client::connect_using(
            url,
            &Connect {
                token: token.map(str::to_owned),
                ..Connect::default()
            },
        )
    }

    /// [`Client::connect`], as `how` says. `url` may list several daemons, comma-separated
    /// (the nodes of one cluster, any of which answers for any run): calls go to the first,
    /// and a push whose daemon becomes unreachable resumes on the next.
    pub fn connect_using(url: &str, how: &Connect) -> Result<Client, ClientError> {
        let daemons = url
            .split(',')
            .map(|u| Client::one(u.trim(), how))
            .collect::<Result<Vec<Rpc>, ClientError>>()?;
        Ok(Client {
            inner: daemons[0].clone(),
            daemons: Arc::new(daemons),
            current: 0,
            deadline: how.request_timeout,
        })
    }

    /// Goes on with the next daemon the client was given, if it has several.
    fn fail_over(&mut self) {
        if self.daemons.len() > 1 {
            self.current = (self.current + 1) % self.daemons.len();
            self.inner = self.daemons[self.current].clone();
        }
    }

    fn one(url: &str, how: &Connect) -> Result<Rpc, ClientError> {
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|_| ClientError::Address(url.to_owned()))?
            .connect_timeout(how.connect_timeout)
            .tcp_nodelay(true);
        if url.starts_with("https://") {
            endpoint = endpoint
                .tls_config(how.tls_config())
                .map_err(|e| ClientError::Tls(e.to_string()))?;
        } else if how.ca_pem.is_some() || how.identity.is_some() {
            return Err(ClientError::Tls(format!(
                "a CA or client certificate is given, but `{url}` is not https://"
            )));
        }
        let token = how.token.as_deref();
        let bearer = match token.filter(|t| !t.is_empty()) {
            Some(t) => {
                let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                    format!("Bearer {t}").parse().map_err(|_| {
                        ClientError::Protocol(
                            "the token is not a covd token (it holds characters a header cannot)"
                                .into(),
                        )
                    })?;
                // Never indexed by HTTP/2's header compression.
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let interceptor = Bearer {
            token: bearer,
            deadline: how.request_timeout,
        };
        Ok(
            CoverageClient::with_interceptor(endpoint.connect_lazy(), interceptor)
                .max_decoding_message_size(64 * 1024 * 1024)
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
        )
    }

    pub async fn open_run(
        &mut self,
        run_id: &str,
        params: RunParams,
    ) -> Result<(bool, RunStatus), ClientError> {
        self.open_run_with_files(run_id, params, Vec::new()).await
    }

    /// Opens a run and gives it the repository's files (`git ls-files`): pushes then learn
    /// which of their paths match none.
    pub async fn open_run_with_files(
        &mut self,
        run_id: &str,
        params: RunParams,
        known_files: Vec<String>,
    ) -> Result<(bool, RunStatus), ClientError> {
        let r = self
            .inner
            .open_run(about(
                run_id,
                proto::OpenRunRequest {
                    run_id: run_id.to_owned(),
                    params: Some(convert::params_to_proto(params)),
                    known_files,
                },
            ))
            .await?
            .into_inner();
        let status = r
            .status
            .ok_or_else(|| ClientError::Protocol("OpenRun answered without a status".into()))?;
        Ok((r.created, convert::status_from_proto(status)))
    }

    pub async fn status(&mut self, run_id: &str) -> Result<RunStatus, ClientError> {
        let s = self
            .inner
            .get_run_status(about(
                run_id,
                proto::GetRunStatusRequest {
                    run_id: run_id.to_owned(),
                },
            ))
            .await?
            .into_inner();
        Ok(convert::status_from_proto(s))
    }

    /// Calls `on_status` with the run's status now and on every change until it completes.
    pub async fn watch(
        &mut self,
        run_id: &str,
        mut on_status: impl FnMut(&RunStatus),
    ) -> Result<(), ClientError> {
        let mut stream = self
            .inner
            .watch_run(about(
                run_id,
                proto::WatchRunRequest {
                    run_id: run_id.to_owned(),
                },
            ))
            .await?
            .into_inner();
        while let Some(s) = stream.message().await? {
            on_status(&convert::status_from_proto(s));
        }
        Ok(())
    }

    pub async fn list_runs(&mut self, limit: u32) -> Result<Vec<RunStatus>, ClientError> {
        let r = self
            .inner
            .list_runs(proto::ListRunsRequest {
                limit,
                project: String::new(),
            })
            .await?
            .into_inner();
        Ok(r.runs.into_iter().map(convert::status_from_proto).collect())
    }

    /// Sends the source text of `files` (the path in the run, and where the file may be
    /// here, the first that reads) with run `run_id`, each text only if the daemon lacks it.
    /// Only files under `root` are read (symbolic links resolved): a coverage file naming
    /// `/proc/self/environ` or `../../.ssh/id_rsa` sends nothing of it. A file outside, one
    /// that cannot be read, or one larger than the daemon takes is left out and counted.
    /// Reads files on a blocking thread, a batch at a time.
    pub async fn send_sources(
        &mut self,
        run_id: &str,
        files: Vec<(String, Vec<std::path::PathBuf>)>,
        root: &std::path::Path,
    ) -> Result<SourcesSent, ClientError> {
        let mut sent = SourcesSent::default();
        let root = std::fs::canonicalize(root).map_err(|e| {
            ClientError::Protocol(format!("the source root {}: {e}", root.display()))
        })?;
        // The daemon's limit, from an empty question.
        let max_bytes = self
            .inner
            .missing_sources(proto::MissingSourcesRequest { sha256: Vec::new() })
            .await?
            .into_inner()
            .max_source_bytes;
        let max_bytes = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        let files = std::sync::Arc::new(files);
        let root = std::sync::Arc::new(root);
        let mut next = 0;
        while next < files.len() {
            let (all, from, under) = (files.clone(), next, root.clone());
            let read =
                tokio::task::spawn_blocking(move || read_sources(&all[from..], &under, max_bytes))
                    .await
                    .map_err(|e| ClientError::Protocol(format!("reading sources failed: {e}")))?;
            sent.outside_root += read.outside_root;
            next += read.consumed;
            sent.unreadable += read.unreadable;
            sent.too_large += read.too_large;
            let digests: Vec<Vec<u8>> = read.files.iter().map(|f| f.sha256.clone()).collect();
            let missing = self
                .inner
                .missing_sources(proto::MissingSourcesRequest { sha256: digests })
                .await?
                .into_inner()
                .missing;
            let mut files = read.files;
            for i in missing {
                if let Some((f, text)) = files.get_mut(i as usize).zip(read.texts.get(i as usize)) {
                    f.text = Some(text.clone());
                }
            }
            // A request stays well below the daemon's message size, whatever the texts.
            let mut start = 0;
            while start < files.len() {
                let mut bytes = 0;
                let mut end = start;
                while end < files.len()
                    && (end == start
                        || bytes + files[end].text.as_ref().map_or(0, Vec::len)
                            <= SOURCE_BYTES_PER_REQUEST)
                {
                    bytes += files[end].text.as_ref().map_or(0, Vec::len);
                    end += 1;
                }
                let part = files[start..end].to_vec();
                sent.files += part.len() as u64;
                sent.new_texts += u64::from(
                    self.inner
                        .put_sources(about(
                            run_id,
                            proto::PutSourcesRequest {
                                run_id: run_id.to_owned(),
                                files: part,
                            },
                        ))
                        .await?
                        .into_inner()
                        .new_texts,
                );
                start = end;
            }
        }
        Ok(sent)
    }

    /// A file's source text as pushed with a run.
    pub async fn source(&mut self, run_id: &str, path: &str) -> Result<Vec<u8>, ClientError> {
        Ok(self
            .inner
            .get_source(about(
                run_id,
                proto::GetSourceRequest {
                    run_id: run_id.to_owned(),
                    path: path.to_owned(),
                },
            ))
            .await?
            .into_inner()
            .text)
    }

    pub async fn delete_run(&mut self, run_id: &str) -> Result<(), ClientError> {
        self.inner
            .delete_run(about(
                run_id,
                proto::DeleteRunRequest {
                    run_id: run_id.to_owned(),
                },
            ))
            .await?;
        Ok(())
    }

    /// One file's merged coverage, read in pages of at most [`FILE_PAGE_LINES`] lines (the
    /// daemon may answer smaller ones).
    pub async fn file(&mut self, run_id: &str, path: &str) -> Result<FileCoverage, ClientError> {
        let mut whole = FileCoverage::default();
        let mut first_line = 0;
        loop {
            let page = self
                .inner
                .get_file(about(
                    run_id,
                    proto::GetFileRequest {
                        run_id: run_id.to_owned(),
                        path: path.to_owned(),
                        first_line,
                        max_lines: FILE_PAGE_LINES,
                    },
                ))
                .await?
                .into_inner();
            let next = page.next_line;
            let page = convert::file_coverage_from_proto(page)
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            // Pages hold disjoint lines: merging them is their union.
            whole.merge(&page);
            if next == 0 {
                return Ok(whole);
            }
            if next <= first_line {
                return Err(ClientError::Protocol(format!(
                    "a page of `{path}` after line {first_line} says the next starts at {next}"
                )));
            }
            first_line = next;
        }
    }

    /// The tests that covered any of the given lines: `(path, ranges)`, each range inclusive,
    /// no ranges meaning the whole file.
    pub async fn tests_for_lines(
        &mut self,
        run_id: &str,
        files: &[(String, Vec<(u32, u32)>)],
    ) -> Result<TestsForLines, ClientError> {
        let request = proto::GetTestsForLinesRequest {
            run_id: run_id.to_owned(),
            files: files
                .iter()
                .map(|(path, ranges)| proto::FileLines {
                    path: path.clone(),
                    ranges: ranges
                        .iter()
                        .map(|(first, last)| proto::LineRange {
                            first: *first,
                            last: *last,
                        })
                        .collect(),
                })
                .collect(),
        };
        let mut chunks = self
            .inner
            .get_tests_for_lines(about(run_id, request))
            .await?
            .into_inner();
        let mut answer = TestsForLines::default();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            answer.unknown_files.extend(chunk.unknown_files);
            answer.tests.extend(chunk.tests.into_iter().map(Into::into));
        }
        Ok(answer)
    }

    /// The lines one test covered, per file, sorted by path.
    pub async fn test_lines(
        &mut self,
        run_id: &str,
        test: &str,
    ) -> Result<Vec<(String, RoaringBitmap)>, ClientError> {
        let request = proto::GetTestLinesRequest {
            run_id: run_id.to_owned(),
            test: test.to_owned(),
        };
        let chunks = all(self
            .inner
            .get_test_lines(about(run_id, request))
            .await?
            .into_inner())
        .await?;
        let files = chunks.into_iter().flat_map(|c| c.files).collect();
        convert::file_line_gaps_from_proto(files).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Test impact: the tests of base run `run_id` that `diff` (a unified diff) affects.
    /// `strip`: leading path components to drop (`None`: git's `a/` and `b/`); `collected`:
    /// the head commit's tests, when known.
    pub async fn test_impact(
        &mut self,
        run_id: &str,
        diff: Vec<u8>,
        strip: Option<u32>,
        collected: Option<Vec<String>>,
    ) -> Result<TestImpact, ClientError> {
        let request = proto::GetTestImpactRequest {
            run_id: run_id.to_owned(),
            diff,
            strip,
            has_collected: collected.is_some(),
            collected: collected.unwrap_or_default(),
        };
        let chunks = all(self
            .inner
            .get_test_impact(about(run_id, request))
            .await?
            .into_inner())
        .await?;
        convert::impact_from_proto(chunks).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// The trend of the runs `query` selects (its `limit` is ignored), in buckets of `width`.
    pub async fn history(
        &mut self,
        query: &crate::persist::HistoryQuery,
        width: crate::history::Bucket,
    ) -> Result<Vec<crate::history::TrendBucket>, ClientError> {
        use crate::history::Bucket;
        let at = |ms: u64| {
            prost_types::Timestamp::from(
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
        };
        let request = proto::GetHistoryRequest {
            project: query.project.clone(),
            branch: query.branch.clone(),
            since: (query.since_ms > 0).then(|| at(query.since_ms)),
            until: query.until_ms.map(at),
            width: match width {
                Bucket::Day => proto::HistoryBucketWidth::Day,
                Bucket::Week => proto::HistoryBucketWidth::Week,
                Bucket::Month => proto::HistoryBucketWidth::Month,
            } as i32,
        };
        let answer = self.inner.get_history(request).await?.into_inner();
        Ok(convert::history_from_proto(answer))
    }

    /// The flaky and broken tests of a project's branch (with `all`, also those that only
    /// failed now and then).
    pub async fn flaky_tests(
        &mut self,
        project: &str,
        branch: &str,
        all: bool,
    ) -> Result<Vec<crate::service::TestStanding>, ClientError> {
        let request = proto::GetFlakyTestsRequest {
            project: project.to_owned(),
            branch: branch.to_owned(),
            all,
        };
        let answer = self.inner.get_flaky_tests(request).await?.into_inner();
        answer
            .tests
            .into_iter()
            .map(|t| {
                convert::standing_from_proto(t).map_err(|e| ClientError::Protocol(e.to_string()))
            })
            .collect()
    }

    /// The shards of a run that had more than one attempt.
    pub async fn attempts(
        &mut self,
        run_id: &str,
    ) -> Result<Vec<crate::service::ShardAttempts>, ClientError> {
        let request = proto::GetAttemptsRequest {
            run_id: run_id.to_owned(),
        };
        let answer = self
            .inner
            .get_attempts(about(run_id, request))
            .await?
            .into_inner();
        answer
            .shards
            .into_iter()
            .map(|s| {
                convert::shard_attempts_from_proto(s)
                    .map_err(|e| ClientError::Protocol(e.to_string()))
            })
            .collect()
    }

    /// Patch coverage: of the lines `diff` (a unified diff ending at the run's commit) adds,
    /// those the run measured and covered. `strip` as for [`Client::test_impact`].
    pub async fn patch_coverage(
        &mut self,
        run_id: &str,
        diff: Vec<u8>,
        strip: Option<u32>,
    ) -> Result<PatchCoverage, ClientError> {
        let request = proto::GetPatchCoverageRequest {
            run_id: run_id.to_owned(),
            diff,
            strip,
        };
        let answer = self
            .inner
            .get_patch_coverage(about(run_id, request))
            .await?
            .into_inner();
        convert::patch_from_proto(answer).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Differential coverage of run `run_id` against `base_id`; `diff` goes from the base's
    /// commit to the run's (`None`: the same source). `strip` as for [`Client::test_impact`].
    pub async fn differential(
        &mut self,
        run_id: &str,
        base_id: &str,
        diff: Option<Vec<u8>>,
        strip: Option<u32>,
    ) -> Result<Differential, ClientError> {
        let request = proto::GetDifferentialRequest {
            run_id: run_id.to_owned(),
            base_run_id: base_id.to_owned(),
            has_diff: diff.is_some(),
            diff: diff.unwrap_or_default(),
            strip,
        };
        let chunks = all(self
            .inner
            .get_differential(about(run_id, request))
            .await?
            .into_inner())
        .await?;
        convert::differential_from_proto(chunks).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// The lines of a set expression, per file under `path` (empty: every file), sorted.
    pub async fn lines(
        &mut self,
        set: &LineSet,
        path: &str,
    ) -> Result<Vec<(String, RoaringBitmap)>, ClientError> {
        let request = proto::GetLinesRequest {
            expr: Some(convert::line_set_to_proto(set)),
            path: path.to_owned(),
        };
        let chunks = all(self.inner.get_lines(request).await?.into_inner()).await?;
        let files = chunks.into_iter().flat_map(|c| c.files).collect();
        convert::file_line_gaps_from_proto(files).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Every test the run has named, sorted.
    pub async fn tests(&mut self, run_id: &str) -> Result<Vec<String>, ClientError> {
        let request = proto::ListTestsRequest {
            run_id: run_id.to_owned(),
        };
        let mut chunks = self
            .inner
            .list_tests(about(run_id, request))
            .await?
            .into_inner();
        let mut tests = Vec::new();
        while let Some(chunk) = chunks.next().await {
            tests.extend(chunk?.tests);
        }
        Ok(tests)
    }

    pub async fn directory(
        &mut self,
        run_id: &str,
        path: &str,
    ) -> Result<DirectorySummary, ClientError> {
        let d = self
            .inner
            .get_directory(about(
                run_id,
                proto::GetDirectoryRequest {
                    run_id: run_id.to_owned(),
                    path: path.to_owned(),
                },
            ))
            .await?
            .into_inner();
        Ok(convert::directory_from_proto(d))
    }

    /// Exports the run as LCOV into `out`; with `wait`, waits up to that long for completeness.
    pub async fn export(
        &mut self,
        run_id: &str,
        wait: Option<Duration>,
        out: &mut impl Write,
    ) -> Result<ExportHeader, ClientError> {
        self.export_as(run_id, ExportFormat::Lcov, wait, out).await
    }

    /// Exports the run in `format` into `out`.
    pub async fn export_as(
        &mut self,
        run_id: &str,
        format: ExportFormat,
        wait: Option<Duration>,
        out: &mut impl Write,
    ) -> Result<ExportHeader, ClientError> {
        self.export_filtered(run_id, format, wait, &[], &[], out)
            .await
    }

    /// Exports the files matching `include` (all when empty) and no `exclude` glob.
    pub async fn export_filtered(
        &mut self,
        run_id: &str,
        format: ExportFormat,
        wait: Option<Duration>,
        include: &[String],
        exclude: &[String],
        out: &mut impl Write,
    ) -> Result<ExportHeader, ClientError> {
        let mut request = tonic::Request::new(proto::ExportRequest {
            run_id: run_id.to_owned(),
            format: convert::export_format_to_proto(format) as i32,
            wait: wait.is_some(),
            timeout: wait.and_then(|w| prost_types::Duration::try_from(w).ok()),
            include: include.to_vec(),
            exclude: exclude.to_vec(),
        });
        routed(&mut request, run_id);
        // The daemon answers once the run is complete or the wait is over.
        if let (Some(wait), Some(deadline)) = (wait, self.deadline) {
            request.set_timeout(wait.saturating_add(deadline));
        }
        let mut stream = self.inner.export(request).await?.into_inner();
        let header = match stream.message().await?.and_then(|c| c.msg) {
            Some(proto::export_chunk::Msg::Header(h)) => convert::export_header_from_proto(h),
            _ => {
                return Err(ClientError::Protocol(
                    "export did not start with a header".into(),
                ));
            }
        };
        while let Some(chunk) = stream.message().await? {
            if let Some(proto::export_chunk::Msg::Data(data)) = chunk.msg {
                out.write_all(&data)?;
            }
        }
        out.flush()?;
        Ok(header)
    }

    /// Streams the deltas received on `deltas` as one shard attempt, then finishes it.
    /// Reconnects and resumes after transient failures, up to `options.retries` times in a row.
    pub async fn push(
        &mut self,
        target: &PushTarget,
        mut deltas: mpsc::Receiver<PushInput>,
        options: &PushOptions,
    ) -> Result<PushReport, ClientError> {
        let mut state = PushState::new(target);
        self.push_with(target, &mut deltas, options, &mut state)
            .await
    }

    /// [`Client::push`]; when the daemon stays unreachable, what was not acknowledged is kept
    /// in `spool` (see [`crate::spool`]) to be sent later by [`Client::flush_spooled`].
    pub async fn push_or_spool(
        &mut self,
        target: &PushTarget,
        mut deltas: mpsc::Receiver<PushInput>,
        options: &PushOptions,
        spool: &std::path::Path,
    ) -> Result<Pushed, ClientError> {
        let mut state = PushState::new(target);
        match self
            .push_with(target, &mut deltas, options, &mut state)
            .await
        {
            Ok(report) => Ok(Pushed::Sent(Box::new(report))),
            Err(error) if error.is_unavailable() => {
                let requests = spooled_requests(target, &mut deltas, &mut state).await?;
                let path =
                    crate::spool::write(spool, &requests).map_err(|e| ClientError::Spool {
                        path: spool.display().to_string(),
                        error: e,
                    })?;
                Ok(Pushed::Spooled { path, error })
            }
            Err(error) => Err(error),
        }
    }

    /// Sends a spooled push as the push that spooled it: the daemon resumes it where it
    /// stands, so a push flushed twice is counted once. `None` when it had been delivered.
    pub async fn flush_spooled(
        &mut self,
        spooled: crate::spool::Spooled,
    ) -> Result<Option<RunStatus>, ClientError> {
        let crate::spool::Spooled {
            header,
            deltas,
            finish,
        } = spooled;
        let shard = header.shard_id.clone();
        let run_id = header.run_id.clone();
        let (tx, rx) = mpsc::channel::<proto::IngestRequest>(WINDOW + 2);
        let request = |msg| proto::IngestRequest { msg: Some(msg) };
        let _ = tx.send(request(ingest_request::Msg::Header(header))).await;
        let mut responses = self
            .inner
            .ingest(about(&run_id, ReceiverStream::new(rx)))
            .await?
            .into_inner();
        let resume = match responses.next().await {
            Some(Ok(proto::IngestResponse {
                msg: Some(ingest_response::Msg::Resume(r)),
            })) => r,
            Some(Err(s)) => return Err(s.into()),
            _ => return Err(ClientError::Protocol("expected a resume first".into())),
        };
        if resume.finished && resume.last_seq == finish.final_seq {
            return Ok(None);
        }
        let first = deltas.first().map_or(finish.final_seq + 1, |(seq, _)| *seq);
        if resume.last_seq + 1 < first {
            return Err(ClientError::LostAcknowledged {
                acked: first - 1,
                resume: resume.last_seq,
            });
        }
        if resume.last_seq > finish.final_seq || resume.finished {
            return Err(ClientError::AttemptTaken {
                shard,
                attempt: resume.attempt,
                last_seq: resume.last_seq,
            });
        }
        let rest: Vec<proto::IngestRequest> = deltas
            .into_iter()
            .filter(|(seq, _)| *seq > resume.last_seq)
            .map(|(_, r)| r)
            .chain(std::iter::once(request(ingest_request::Msg::Finish(
                finish,
            ))))
            .collect();
        tokio::spawn(async move {
            for r in rest {
                if tx.send(r).await.is_err() {
                    break;
                }
            }
        });
        while let Some(response) = responses.next().await {
            match response?.msg {
                Some(ingest_response::Msg::Finished(f)) => {
                    return Ok(f.run.map(convert::status_from_proto));
                }
                Some(ingest_response::Msg::Ack(_)) => {}
                _ => {
                    return Err(ClientError::Protocol(
                        "unexpected message on the ingest stream".into(),
                    ));
                }
            }
        }
        Err(Status::unavailable("the daemon closed the stream before the finish").into())
    }

    async fn push_with(
        &mut self,
        target: &PushTarget,
        deltas: &mut mpsc::Receiver<PushInput>,
        options: &PushOptions,
        state: &mut PushState,
    ) -> Result<PushReport, ClientError> {
        let mut reconnects = 0u32;
        let mut failures = 0u32;
        loop {
            let attempt = self
                .push_once(target, deltas, state, options.idle_close)
                .await;
            match attempt {
                Ok(StreamEnd::Idle) => {
                    // The stream is closed; the next input opens another.
                    match deltas.recv().await {
                        Some(input) => state.pending = Some(input),
                        None => return Err(ClientError::InputAborted),
                    }
                }
                Ok(StreamEnd::Done(run)) => {
                    return Ok(PushReport {
                        deltas: state.next_seq - 1,
                        reconnects,
                        run: run.map(|r| *r),
                        unknown_paths: std::mem::take(&mut state.unknown),
                    });
                }
                Err(PushFailure { error, progressed }) => {
                    if progressed {
                        failures = 0;
                    }
                    if !retryable(&error) || failures >= options.retries {
                        return Err(error);
                    }
                    let backoff = options.initial_backoff * 2u32.saturating_pow(failures.min(5));
                    failures += 1;
                    reconnects += 1;
                    // Unreachable, or unable to store: another node of a cluster may be able.
                    if matches!(&error, ClientError::Status(s) if s.code() == Code::Unavailable) {
                        self.fail_over();
                    }
                    tokio::time::sleep(backoff.min(Duration::from_secs(10))).await;
                }
            }
        }
    }

    /// One connection's worth of a push.
    async fn push_once(
        &mut self,
        target: &PushTarget,
        deltas: &mut mpsc::Receiver<PushInput>,
        state: &mut PushState,
        idle_close: Duration,
    ) -> Result<StreamEnd, PushFailure> {
        let PushState {
            unacked,
            next_seq,
            input_done,
            unknown,
            telemetry,
            session,
            pending,
        } = state;
        let fail = |error: ClientError| PushFailure {
            error,
            progressed: false,
        };
        let (tx, rx) = mpsc::channel::<proto::IngestRequest>(WINDOW + 2);
        let request = |msg| proto::IngestRequest { msg: Some(msg) };
        let header = proto::ShardHeader {
            run_id: target.run_id.clone(),
            shard_id: target.shard_id.clone(),
            attempt: target.attempt,
            params: Some(convert::params_to_proto(target.params.clone())),
            session_id: session.clone(),
        };
        // The channel has room: these sends cannot wait.
        let _ = tx.send(request(ingest_request::Msg::Header(header))).await;
        let mut responses = self
            .inner
            .ingest(about(&target.run_id, ReceiverStream::new(rx)))
            .await
            .map_err(|s| fail(s.into()))?
            .into_inner();
        let resume = match responses.next().await {
            Some(Ok(proto::IngestResponse {
                msg: Some(ingest_response::Msg::Resume(r)),
            })) => r,
            Some(Err(s)) => return Err(fail(s.into())),
            None => {
                return Err(fail(
                    Status::unavailable("the daemon closed the stream").into(),
                ));
            }
            Some(Ok(_)) => {
                return Err(fail(ClientError::Protocol(
                    "expected a resume first".into(),
                )));
            }
        };
        let acked_before = *next_seq - 1 - unacked.len() as u64;
        if resume.last_seq < acked_before {
            return Err(fail(ClientError::LostAcknowledged {
                acked: acked_before,
                resume: resume.last_seq,
            }));
        }
        let sent = *next_seq - 1;
        if resume.last_seq > sent || (resume.finished && (!*input_done || !unacked.is_empty())) {
            // Another client fed this attempt: sending ours would mix or lose data.
            return Err(fail(ClientError::AttemptTaken {
                shard: target.shard_id.clone(),
                attempt: resume.attempt,
                last_seq: resume.last_seq,
            }));
        }
        unacked.retain(|(seq, _)| *seq > resume.last_seq);
        let arm_form = if resume.branch_columns {
            ArmForm::Columns
        } else {
            ArmForm::Messages
        };
        if arm_form == ArmForm::Messages && unacked.iter().any(|(_, sent)| sent.needs_columns) {
            return Err(fail(ClientError::Protocol(
                "the daemon no longer reads branch arm columns, which deltas it has not yet acknowledged use (was it downgraded during the push?); push the shard again with a higher --attempt".into(),
            )));
        }
        let mut progressed = false;
        let mut finish_sent = resume.finished;
        if resume.finished {
            let _ = tx
                .send(request(ingest_request::Msg::Finish(proto::Finish {
                    final_seq: resume.last_seq,
                    telemetry: None,
                })))
                .await;
        }
        for (_, sent) in unacked.iter() {
            if tx.send(sent.request.clone()).await.is_err() {
                break;
            }
        }
        loop {
            if !finish_sent && *input_done && unacked.is_empty() {
                let finish = proto::Finish {
                    final_seq: *next_seq - 1,
                    telemetry: telemetry.clone().map(convert::telemetry_to_proto),
                };
                let _ = tx.send(request(ingest_request::Msg::Finish(finish))).await;
                finish_sent = true;
            }
            let can_send = !*input_done && unacked.len() < WINDOW;
            let idle = can_send && unacked.is_empty();
            tokio::select! {
                batch = async { match pending.take() {
                    Some(input) => Some(input),
                    None => deltas.recv().await,
                } }, if can_send => {
                    let (files, test) = match batch {
                        Some(PushInput::Delta(files)) => (files, None),
                        Some(PushInput::TestDelta { test, files }) => {
                            (files, Some(proto::TestRef { name: test }))
                        }
                        Some(PushInput::Done(tests)) => {
                            *input_done = true;
                            if tests.is_some() {
                                *telemetry = tests;
                            }
                            continue;
                        }
                        None => {
                            return Err(PushFailure { error: ClientError::InputAborted, progressed });
                        }
                    };
                    let delta = proto::Delta {
                        seq: *next_seq,
                        files: files.into_iter().map(|(p, f)| file_to_proto(p, &f, arm_form)).collect(),
                        test,
                    };
                    let needs_columns = delta.files.iter().any(|f| !f.arm_line_gaps.is_empty());
                    let request = proto::IngestRequest::delta(&delta);
                    unacked.push_back((*next_seq, Sent { request: request.clone(), needs_columns }));
                    *next_seq += 1;
                    let _ = tx.send(request).await;
                }
                response = responses.next() => match response {
                    Some(Ok(proto::IngestResponse { msg: Some(ingest_response::Msg::Ack(ack)) })) => {
                        while unacked.front().is_some_and(|(seq, _)| *seq <= ack.seq) {
                            unacked.pop_front();
                            progressed = true;
                        }
                        if !ack.unknown_paths.is_empty() && unknown.is_empty() {
                            // Said once, while the shard still runs: a wrong path rule shows
                            // on the first delta, not after the pipeline.
                            tracing::warn!(
                                "the run does not know some of this shard's paths (e.g. `{}`); check the path rules",
                                ack.unknown_paths[0]
                            );
                        }
                        for p in ack.unknown_paths {
                            if unknown.len() < UNKNOWN_KEPT && !unknown.contains(&p) {
                                unknown.push(p);
                            }
                        }
                    }
                    Some(Ok(proto::IngestResponse { msg: Some(ingest_response::Msg::Finished(f)) })) => {
                        return Ok(StreamEnd::Done(f.run.map(|r| Box::new(convert::status_from_proto(r)))));
                    }
                    Some(Ok(_)) => {
                        return Err(PushFailure {
                            error: ClientError::Protocol("unexpected message on the ingest stream".into()),
                            progressed,
                        });
                    }
                    Some(Err(s)) => return Err(PushFailure { error: s.into(), progressed }),
                    None => {
                        return Err(PushFailure {
                            error: Status::unavailable("the daemon closed the stream before the finish").into(),
                            progressed,
                        });
                    }
                },
                () = tokio::time::sleep(idle_close), if idle => {
                    // Ending the request stream leaves the shard unfinished and resumable.
                    return Ok(StreamEnd::Idle);
                }
            }
        }
    }
}

/// What a push carries from one connection to the next.
struct PushState {
    /// Sent, not yet acknowledged: (sequence number, the encoded request), re-sent as is
    /// after a reconnect.
    unacked: VecDeque<(u64, Sent)>,
    next_seq: u64,
    input_done: bool,
    unknown: Vec<String>,
    telemetry: Option<TestTelemetry>,
    /// This push's session id, the same on every stream of it.
    session: Vec<u8>,
    /// An input taken while no stream was open (after one closed idle), sent first on the next.
    pending: Option<PushInput>,
}

impl PushState {
    fn new(target: &PushTarget) -> PushState {
        PushState {
            unacked: VecDeque::new(),
            next_seq: 1,
            input_done: false,
            unknown: Vec::new(),
            telemetry: target.telemetry.clone(),
            session: new_session_id(),
            pending: None,
        }
    }
}

/// What became of a push that may spool.
#[derive(Debug)]
pub enum Pushed {
    Sent(Box<PushReport>),
    /// The daemon stayed unreachable (`error`); the push is in the spool file `path`.
    Spooled {
        path: std::path::PathBuf,
        error: ClientError,
    },
}

/// The stream a push would still send: its header, the deltas not acknowledged, the rest of
/// its input (read to its end), its finish.
async fn spooled_requests(
    target: &PushTarget,
    deltas: &mut mpsc::Receiver<PushInput>,
    state: &mut PushState,
) -> Result<Vec<proto::IngestRequest>, ClientError> {
    let request = |msg| proto::IngestRequest { msg: Some(msg) };
    let mut out = vec![request(ingest_request::Msg::Header(proto::ShardHeader {
        run_id: target.run_id.clone(),
        shard_id: target.shard_id.clone(),
        attempt: target.attempt,
        params: Some(convert::params_to_proto(target.params.clone())),
        session_id: state.session.clone(),
    }))];
    out.extend(state.unacked.iter().map(|(_, sent)| sent.request.clone()));
    while !state.input_done {
        let (files, test) = match deltas.recv().await {
            Some(PushInput::Delta(files)) => (files, None),
            Some(PushInput::TestDelta { test, files }) => {
                (files, Some(proto::TestRef { name: test }))
            }
            Some(PushInput::Done(tests)) => {
                state.input_done = true;
                if tests.is_some() {
                    state.telemetry = tests;
                }
                continue;
            }
            None => return Err(ClientError::InputAborted),
        };
        let delta = proto::Delta {
            seq: state.next_seq,
            files: files
                .into_iter()
                .map(|(p, f)| file_to_proto(p, &f, ArmForm::Columns))
                .collect(),
            test,
        };
        state.next_seq += 1;
        out.push(proto::IngestRequest::delta(&delta));
    }
    out.push(request(ingest_request::Msg::Finish(proto::Finish {
        final_seq: state.next_seq - 1,
        telemetry: state.telemetry.clone().map(convert::telemetry_to_proto),
    })));
    Ok(out)
}

/// A session id for one push: 16 bytes that no other push has. std's `RandomState` keys are
/// random per process and differ per instance; the process id and the time make two
/// processes' ids differ even if their keys met.
fn new_session_id() -> Vec<u8> {
    use std::hash::BuildHasher;
    let a = std::collections::hash_map::RandomState::new()
        .hash_one((std::process::id(), std::time::SystemTime::now()));
    let b = std::collections::hash_map::RandomState::new().hash_one(a);
    [a.to_le_bytes(), b.to_le_bytes()].concat()
}

/// A delta as sent.
struct Sent {
    request: proto::IngestRequest,
    /// Some of its branch arms are in columns: only a daemon that reads them may get it.
    needs_columns: bool,
}

/// How one stream of a push ended well.
enum StreamEnd {
    /// The shard is finished; the run as the daemon answered.
    Done(Option<Box<RunStatus>>),
    /// Closed for want of anything to send.
    Idle,
}

struct PushFailure {
    error: ClientError,
    /// Whether this connection got any delta acknowledged (resets the retry count).
    progressed: bool,
}

fn retryable(e: &ClientError) -> bool {
    matches!(e, ClientError::Status(s) if retryable_code(s.code()))
}

/// Codes a reconnect may cure.
fn retryable_code(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Aborted
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
    )
}

/// The header that names the run a call is about, for a load balancer in front of a
/// cluster's nodes to route by (see `docs/cluster.md`): a run's calls then go to one node,
/// which merges each of its deltas once.
pub const RUN_HEADER: &str = "x-covd-run";

/// `message` as a request about run `run_id` ([`RUN_HEADER`]).
fn about<T>(run_id: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    routed(&mut request, run_id);
    request
}

/// Names the run `request` is about ([`RUN_HEADER`]), when its id can be a header's value
/// (anything else is refused by the daemon anyway, with a better message than a header's).
fn routed<T>(request: &mut tonic::Request<T>, run_id: &str) {
    if let Ok(value) = run_id.parse() {
        request.metadata_mut().insert(RUN_HEADER, value);
    }
}

/// Every message of an answer's stream.
async fn all<T>(mut stream: tonic::Streaming<T>) -> Result<Vec<T>, ClientError> {
    let mut messages = Vec::new();
    while let Some(message) = stream.next().await {
        messages.push(message?);
    }
    Ok(messages)
}
