//! The gRPC edge: the generated `covd.v1` code, the adapter from the `Coverage` service to the
//! domain [`CoverageService`], conversions with validation (`convert`), the one-pass reader of
//! incoming deltas (`delta`) and the request type that keeps them as bytes (`frame`), the
//! message codec (`codec`), and the one error→status table (`status`). Nothing below this
//! layer sees a tonic type.

mod codec;
pub mod convert;
mod delta;
mod frame;
mod lapse;
mod status;

pub use codec::ProtoCodec;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Auth, Denied, Principal, Scope};
use crate::diff::FileChange;
use crate::privacy::{Privacy, ProjectNames};
use crate::service::{CoverageService, Error, RunParams, ShardHeader};
use convert::*;

/// The generated protocol types, client and server.
#[allow(unreachable_pub, missing_debug_implementations, clippy::all)]
pub mod proto {
    tonic::include_proto!("covd.v1");

    pub use super::frame::{IngestRequest, ingest_request};

    /// The encoded descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/covd_descriptor.bin"));
}

use proto::coverage_server::Coverage;
use proto::ingest_request::Msg as In;
use proto::ingest_response::Msg as Out;

/// Default wait of an export that asks to wait without a timeout.
const DEFAULT_EXPORT_WAIT: Duration = Duration::from_secs(600);

/// The tonic service over the domain service.
#[derive(Debug, Clone)]
pub struct CoverageRpc {
    service: CoverageService,
    /// How project names are kept.
    privacy: Arc<Privacy>,
    /// Which tokens the daemon accepts.
    auth: Arc<Auth>,
    /// Turns true when the daemon shuts down: open ingest streams end (after the delta in
    /// hand) with UNAVAILABLE, so their clients reconnect and resume.
    stopping: watch::Receiver<bool>,
    /// New runs per token per hour.
    openings: Arc<crate::admission::Openings>,
}

impl CoverageRpc {
    pub fn new(
        service: CoverageService,
        stopping: watch::Receiver<bool>,
        privacy: Arc<Privacy>,
        auth: Arc<Auth>,
    ) -> CoverageRpc {
        let openings = Arc::new(crate::admission::Openings::new(
            service.limits().max_runs_per_token_per_hour,
        ));
        CoverageRpc {
            service,
            privacy,
            auth,
            stopping,
            openings,
        }
    }

    /// Who makes `request` (its `authorization` metadata), if the daemon accepts them.
    fn who<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        caller(&self.auth, &self.privacy, request.metadata())
    }

    /// The caller, if its token has `scope` (to `what`) and reaches run `run_id`. A run that
    /// does not exist is left to the call to refuse (NOT_FOUND), unless the token names
    /// another run.
    fn allow_run<T>(
        &self,
        request: &Request<T>,
        scope: Scope,
        what: &str,
        run_id: &str,
    ) -> Result<Principal, Status> {
        let who = self.who(request)?;
        who.needs(scope, what).map_err(denied)?;
        check_run(&self.service, &who, run_id)?;
        Ok(who)
    }

    /// The caller, if it may read the run `request` names (a read token that reaches it).
    fn reads<T: RunScoped>(&self, request: &Request<T>) -> Result<Principal, Status> {
        self.allow_run(
            request,
            Scope::Read,
            "read runs",
            request.get_ref().run_id(),
        )
    }

    /// The project a query names, as runs keep it, if the caller reaches it; a query of every
    /// project only for a token that reaches them all (a token of one project queries it).
    fn allow_project<T>(&self, request: &Request<T>, project: &str) -> Result<String, Status> {
        let who = self.who(request)?;
        who.needs(Scope::Read, "read").map_err(denied)?;
        if who.reaches_one_run() {
            return Err(Status::permission_denied(
                "this token reaches one run: it may not read its project's history",
            ));
        }
        if project.is_empty() {
            if who.reaches_all_projects() {
                return Ok(String::new());
            }
            return match who.own_project() {
                Some(own) => Ok(own.to_owned()),
                None => Err(Status::permission_denied(
                    "this token reaches some projects only: name one",
                )),
            };
        }
        let kept = project_queried(&self.privacy, project);
        who.check_project(&kept, project).map_err(denied)?;
        Ok(kept)
    }
}

/// A request about one run.
trait RunScoped {
    fn run_id(&self) -> &str;
}

macro_rules! run_scoped {
    ($($request:ident),* $(,)?) => {
        $(impl RunScoped for proto::$request {
            fn run_id(&self) -> &str {
                &self.run_id
            }
        })*
    };
}

run_scoped!(
    GetRunStatusRequest,
    WatchRunRequest,
    ExportRequest,
    GetFileRequest,
    GetDirectoryRequest,
    GetTestsForLinesRequest,
    GetTestLinesRequest,
    ListTestsRequest,
    GetTestImpactRequest,
    GetAttemptsRequest,
    GetSourceRequest,
    GetPatchCoverageRequest,
    GetDifferentialRequest,
);

/// Who sent `metadata`, if the daemon accepts them.
fn caller(
    auth: &Auth,
    privacy: &Privacy,
    metadata: &tonic::metadata::MetadataMap,
) -> Result<Principal, Status> {
    let header = metadata
        .get("authorization")
        .map(|v| v.to_str().unwrap_or("(not text)"));
    auth.authenticate(header, |p| project_queried(privacy, p))
        .map_err(denied)
}

/// Refused unless `who` reaches every run an expression reads, and the project of its `flag:`
/// operands (as kept; a flag of any project needs a token of every project).
fn allow_line_set(
    service: &CoverageService,
    who: &Principal,
    set: &crate::service::LineSet,
) -> Result<(), Status> {
    use crate::service::LineSet;
    match set {
        LineSet::Covered(run)
        | LineSet::Measured(run)
        | LineSet::Tests(run)
        | LineSet::Test { run, .. }
        | LineSet::Shard { run, .. }
        | LineSet::TestsExcept { run, .. } => check_run(service, who, run),
        LineSet::Flag { project, .. } if project.is_empty() => {
            if who.reaches_all_projects() {
                Ok(())
            } else {
                Err(Status::permission_denied(
                    "this token reaches some projects only: name the flag's project",
                ))
            }
        }
        LineSet::Flag { project, .. } => who.check_project(project, project).map_err(denied),
        LineSet::Union(a, b) | LineSet::Intersection(a, b) | LineSet::Difference(a, b) => {
            allow_line_set(service, who, a)?;
            allow_line_set(service, who, b)
        }
    }
}

/// Refused unless `who` reaches run `run_id` (see [`CoverageRpc::allow_run`]).
fn check_run(service: &CoverageService, who: &Principal, run_id: &str) -> Result<(), Status> {
    let project = match service.run_project(run_id) {
        Ok(project) => project,
        // Judged on the run id alone; the call then says the run does not exist.
        Err(_) => return who.check_run_id(run_id).map_err(denied),
    };
    who.check_run(run_id, &project).map_err(denied)
}

/// What lets a call through only with a token of the read scope (server reflection: the
/// protocol is no secret, but who asks about it should be a client of the daemon).
pub fn reading(
    auth: Arc<Auth>,
    privacy: Arc<Privacy>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        caller(&auth, &privacy, request.metadata())?
            .needs(Scope::Read, "use server reflection")
            .map_err(denied)?;
        Ok(request)
    }
}

/// A refusal as its status: UNAUTHENTICATED or PERMISSION_DENIED.
/// Why a check refused, if it did.
fn refusal(checked: Result<(), Denied>) -> Option<String> {
    match checked {
        Ok(()) => None,
        Err(Denied::Unauthenticated(why) | Denied::PermissionDenied(why)) => Some(why),
    }
}

pub(crate) fn denied(d: Denied) -> Status {
    match d {
        Denied::Unauthenticated(m) => Status::unauthenticated(m),
        Denied::PermissionDenied(m) => Status::permission_denied(m),
    }
}

/// A run's parameters from the wire, the project's name as it is to be kept.
fn params_kept(privacy: &Privacy, params: Option<proto::RunParams>) -> RunParams {
    let mut params = params_from_proto(params);
    params.project = privacy.project(params.project_as, &params.project);
    params.project_as = ProjectNames::Plain;
    params
}

/// The projects of an expression's `flag:` operands, as runs of them are kept.
fn flag_projects_queried(privacy: &Privacy, set: &mut crate::service::LineSet) {
    use crate::service::LineSet;
    match set {
        LineSet::Flag { project, .. } => *project = project_queried(privacy, project),
        LineSet::Union(a, b) | LineSet::Intersection(a, b) | LineSet::Difference(a, b) => {
            flag_projects_queried(privacy, a);
            flag_projects_queried(privacy, b);
        }
        _ => {}
    }
}

/// A query's project, as runs of it are kept.
fn project_queried(privacy: &Privacy, project: &str) -> String {
    if project.is_empty() {
        String::new()
    } else {
        privacy.query(project)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Coverage for CoverageRpc {
    async fn open_run(
        &self,
        request: Request<proto::OpenRunRequest>,
    ) -> Result<Response<proto::OpenRunResponse>, Status> {
        let who = self.who(&request)?;
        who.needs(Scope::Push, "open runs").map_err(denied)?;
        let opener = opener(&who, &request);
        let r = request.into_inner();
        let params = owned_params(
            &self.service,
            &who,
            (&self.openings, &opener),
            &r.run_id,
            params_kept(&self.privacy, r.params),
        )?;
        let owner = |project: &str| refusal(who.check_run(&r.run_id, project));
        let (created, status) = self
            .service
            .open_run_as(&r.run_id, params, r.known_files, &owner)
            .await?;
        Ok(Response::new(proto::OpenRunResponse {
            created,
            status: Some(status_to_proto(status)),
        }))
    }

    async fn get_run_status(
        &self,
        request: Request<proto::GetRunStatusRequest>,
    ) -> Result<Response<proto::RunStatus>, Status> {
        self.reads(&request)?;
        let status = self.service.run_status(&request.into_inner().run_id)?;
        Ok(Response::new(status_to_proto(status)))
    }

    type WatchRunStream = BoxStream<proto::RunStatus>;

    async fn watch_run(
        &self,
        request: Request<proto::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let who = self.reads(&request)?;
        let run_id = request.into_inner().run_id;
        let mut changes = self.service.watch_run(&run_id)?;
        let service = self.service.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                changes.borrow_and_update();
                let status = service.run_status(&run_id).map_err(Status::from);
                let done = status.as_ref().map_or(true, |s| s.complete);
                if tx.send(status.map(status_to_proto)).await.is_err() || done {
                    return;
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        // The lapse ends the answer itself, ahead of what waits in the channel, even for a
        // client that stopped reading.
        Ok(Response::new(Box::pin(lapse::Revocable::new(
            ReceiverStream::new(rx),
            Box::pin(self.auth.lapsed(&who)),
        ))))
    }

    async fn list_runs(
        &self,
        request: Request<proto::ListRunsRequest>,
    ) -> Result<Response<proto::ListRunsResponse>, Status> {
        let who = self.who(&request)?;
        who.needs(Scope::Read, "list runs").map_err(denied)?;
        let r = request.into_inner();
        let limit = r.limit as usize;
        let project = project_queried(&self.privacy, &r.project);
        // Only the runs the token reaches (a token of some projects lists those), chosen
        // before the limit counts them.
        let runs = self.service.list_runs_where(
            limit,
            (!r.project.is_empty()).then_some(project.as_str()),
            |id, project| who.reaches_run(id, project),
        );
        Ok(Response::new(proto::ListRunsResponse {
            runs: runs.into_iter().map(status_to_proto).collect(),
        }))
    }

    type IngestStream = BoxStream<proto::IngestResponse>;

    async fn ingest(
        &self,
        request: Request<Streaming<proto::IngestRequest>>,
    ) -> Result<Response<Self::IngestStream>, Status> {
        let who = self.who(&request)?;
        who.needs(Scope::Push, "write runs").map_err(denied)?;
        let opening = (self.openings.clone(), opener(&who, &request));
        // One lapse for both ends of the stream: the loop that takes deltas, and the answers.
        let lapsed =
            futures_util::FutureExt::shared(Box::pin(self.auth.lapsed(&who)) as lapse::Lapse);
        let answer_lapsed: lapse::Lapse = Box::pin(lapsed.clone());
        let mut inbound = request.into_inner();
        let service = self.service.clone();
        let privacy = self.privacy.clone();
        let mut stopping = self.stopping.clone();
        // What ends the stream before its finish: the daemon stopping, or its token lapsing
        // (what was acknowledged stays; nothing more is taken).
        let cut: Cut = Box::pin(async move {
            tokio::select! {
                _ = stopping.wait_for(|s| *s) => {
                    Status::unavailable("covd is shutting down; reconnect and resume")
                }
                why = lapsed => denied(why),
            }
        });
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let _open = crate::metrics::metrics().stream_opened();
            if let Err(status) =
                ingest(&service, &privacy, &who, &opening, &mut inbound, &tx, cut).await
            {
                let _ = tx.send(Err(status)).await;
            }
        });
        // The answers end at the lapse too: a client that stopped reading acknowledgements
        // is told, and its call ends.
        Ok(Response::new(Box::pin(lapse::Revocable::new(
            ReceiverStream::new(rx),
            answer_lapsed,
        ))))
    }

    type ExportStream = BoxStream<proto::ExportChunk>;

    async fn export(
        &self,
        request: Request<proto::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let who = self.reads(&request)?;
        let mut lapsed: lapse::Lapse = Box::pin(self.auth.lapsed(&who));
        let r = request.into_inner();
        let format = export_format_from_proto(r.format)?;
        let wait = if r.wait {
            Some(match r.timeout {
                Some(t) => Duration::try_from(t).map_err(|e| {
                    Status::invalid_argument(format!("timeout: not a valid duration: {e}"))
                })?,
                None => DEFAULT_EXPORT_WAIT,
            })
        } else {
            None
        };
        let filter = crate::model::path::PathFilter::new(&r.include, &r.exclude)
            .map_err(|e| Status::invalid_argument(format!("include/exclude: {e}")))?;
        let export = tokio::select! {
            export = self.service.export(&r.run_id, format, wait, filter) => export?,
            why = &mut lapsed => return Err(denied(why)),
        };
        let header = proto::ExportChunk {
            msg: Some(proto::export_chunk::Msg::Header(export_header_to_proto(
                export.header,
            ))),
        };
        let data = ReceiverStream::new(export.chunks).map(|chunk| {
            chunk
                .map(|bytes| proto::ExportChunk {
                    msg: Some(proto::export_chunk::Msg::Data(bytes.to_vec())),
                })
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(lapse::Revocable::new(
            tokio_stream::once(Ok(header)).chain(data),
            lapsed,
        ))))
    }

    async fn get_file(
        &self,
        request: Request<proto::GetFileRequest>,
    ) -> Result<Response<proto::FileCoverage>, Status> {
        self.reads(&request)?;
        let r = request.into_inner();
        let file = self.service.file(&r.run_id, &r.path).await?;
        let limits = self.service.limits();
        let page = limits.file_page_lines;
        let max_lines = match r.max_lines as usize {
            // The whole file, as clients from before pages ask for it.
            0 if file.lines().len() > page as u64 => {
                return Err(limits
                    .exceeded(
                        format!(
                            "file `{}` has {} lines, more than one answer holds: ask for it in \
                             pages (GetFileRequest.max_lines)",
                            r.path,
                            file.lines().len()
                        ),
                        "file-page-lines",
                        page,
                    )
                    .into());
            }
            0 => usize::MAX,
            n => n.min(page),
        };
        Ok(Response::new(file_page_to_proto(
            r.path,
            &file,
            r.first_line,
            max_lines,
        )))
    }

    async fn get_directory(
        &self,
        request: Request<proto::GetDirectoryRequest>,
    ) -> Result<Response<proto::DirectorySummary>, Status> {
        self.reads(&request)?;
        let r = request.into_inner();
        let summary = self.service.directory(&r.run_id, &r.path).await?;
        Ok(Response::new(directory_to_proto(summary)))
    }

    async fn delete_run(
        &self,
        request: Request<proto::DeleteRunRequest>,
    ) -> Result<Response<proto::DeleteRunResponse>, Status> {
        self.allow_run(
            &request,
            Scope::Admin,
            "delete runs",
            &request.get_ref().run_id,
        )?;
        self.service
            .delete_run(&request.into_inner().run_id)
            .await?;
        Ok(Response::new(proto::DeleteRunResponse {}))
    }

    type GetTestsForLinesStream = BoxStream<proto::TestsForLinesChunk>;

    async fn get_tests_for_lines(
        &self,
        request: Request<proto::GetTestsForLinesRequest>,
    ) -> Result<Response<Self::GetTestsForLinesStream>, Status> {
        self.reads(&request)?;
        let r = request.into_inner();
        let files = file_lines_from_proto(r.files)?;
        let answer = self.service.tests_for_lines(&r.run_id, files).await?;
        let count = answer.tests.len() as u32;
        let mut unknown_files = answer.unknown_files;
        let chunks = in_chunks(answer.tests, |t| t.len())
            .enumerate()
            .map(move |(i, tests)| {
                let first = i == 0;
                Ok(proto::TestsForLinesChunk {
                    tests: tests.iter().map(|t| t.to_string()).collect(),
                    unknown_files: if first {
                        std::mem::take(&mut unknown_files)
                    } else {
                        Vec::new()
                    },
                    test_count: if first { count } else { 0 },
                })
            });
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    type GetTestLinesStream = BoxStream<proto::TestLinesChunk>;

    async fn get_test_lines(
        &self,
        request: Request<proto::GetTestLinesRequest>,
    ) -> Result<Response<Self::GetTestLinesStream>, Status> {
        self.reads(&request)?;
        let r = request.into_inner();
        let files = self.service.test_lines(&r.run_id, &r.test).await?;
        let chunks = in_chunks(files, file_lines_size).map(|files| {
            Ok(proto::TestLinesChunk {
                files: file_lines_to_proto(&files),
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    type ListTestsStream = BoxStream<proto::TestNames>;

    async fn list_tests(
        &self,
        request: Request<proto::ListTestsRequest>,
    ) -> Result<Response<Self::ListTestsStream>, Status> {
        self.reads(&request)?;
        let tests = self.service.tests(&request.into_inner().run_id).await?;
        let chunks = in_chunks(tests, |t| t.len()).map(|tests| {
            Ok(proto::TestNames {
                tests: tests.iter().map(|t| t.to_string()).collect(),
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    type GetTestImpactStream = BoxStream<proto::TestImpactChunk>;

    async fn get_test_impact(
        &self,
        request: Request<proto::GetTestImpactRequest>,
    ) -> Result<Response<Self::GetTestImpactStream>, Status> {
        self.reads(&request)?;
        let r = request.into_inner();
        let diff = read_diff(r.diff, r.strip).await?;
        let collected = r.has_collected.then_some(r.collected);
        let answer = self.service.test_impact(&r.run_id, diff, collected).await?;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            impact_to_proto(answer).map(Ok),
        ))))
    }

    async fn get_history(
        &self,
        request: Request<proto::GetHistoryRequest>,
    ) -> Result<Response<proto::History>, Status> {
        let asked = request.get_ref().project.clone().unwrap_or_default();
        let kept = self.allow_project(&request, &asked)?;
        let (mut query, width) = history_query_from_proto(request.into_inner())?;
        query.project = (!kept.is_empty()).then_some(kept);
        let buckets = self.service.history(query, width).await?;
        Ok(Response::new(history_to_proto(buckets)))
    }

    async fn get_flaky_tests(
        &self,
        request: Request<proto::GetFlakyTestsRequest>,
    ) -> Result<Response<proto::FlakyTests>, Status> {
        let kept = self.allow_project(&request, &request.get_ref().project)?;
        let r = request.into_inner();
        let tests = self.service.flaky_tests(&kept, &r.branch, r.all).await?;
        Ok(Response::new(proto::FlakyTests {
            tests: tests.into_iter().map(standing_to_proto).collect(),
        }))
    }

    async fn get_attempts(
        &self,
        request: Request<proto::GetAttemptsRequest>,
    ) -> Result<Response<proto::RunAttempts>, Status> {
        self.reads(&request)?;
        let shards = self.service.attempts(&request.into_inner().run_id).await?;
        Ok(Response::new(proto::RunAttempts {
            shards: shards.into_iter().map(shard_attempts_to_proto).collect(),
        }))
    }

    async fn missing_sources(
        &self,
        request: Request<proto::MissingSourcesRequest>,
    ) -> Result<Response<proto::MissingSourcesResponse>, Status> {
        let who = self.who(&request)?;
        who.needs(Scope::Push, "send sources").map_err(denied)?;
        let digests = request.into_inner().sha256;
        // Texts are kept once for every project: a token of some projects is told it lacks
        // them all (and sends each), so it learns nothing of other projects' files.
        let missing = if who.reaches_all_projects() {
            self.service.missing_sources(digests).await?
        } else {
            (0..digests.len() as u32).collect()
        };
        Ok(Response::new(proto::MissingSourcesResponse {
            missing,
            max_source_bytes: self.service.limits().max_source_bytes as u64,
        }))
    }

    async fn put_sources(
        &self,
        request: Request<proto::PutSourcesRequest>,
    ) -> Result<Response<proto::PutSourcesResponse>, Status> {
        self.allow_run(
            &request,
            Scope::Push,
            "send sources",
            &request.get_ref().run_id,
        )?;
        let who = self.who(&request)?;
        let r = request.into_inner();
        if !who.reaches_all_projects()
            && let Some(f) = r.files.iter().find(|f| f.text.is_none())
        {
            // Naming a text by its digest alone would give this token another project's file.
            return Err(Status::failed_precondition(format!(
                "{}: this token reaches some projects only, so it sends every text",
                f.path
            )));
        }
        let files = r
            .files
            .into_iter()
            .map(|f| crate::service::SourceFile {
                path: f.path,
                digest: f.sha256,
                text: f.text,
            })
            .collect();
        let new_texts = self.service.put_sources(&r.run_id, files).await?;
        Ok(Response::new(proto::PutSourcesResponse { new_texts }))
    }

    async fn get_source(
        &self,
        request: Request<proto::GetSourceRequest>,
    ) -> Result<Response<proto::Source>, Status> {
        self.reads(&request)?;
        let r = request.into_inner();
        let (digest, text) = self.service.source(&r.run_id, &r.path).await?;
        Ok(Response::new(proto::Source {
            sha256: digest.to_vec(),
            text,
        }))
    }

    async fn get_patch_coverage(
        &self,
        request: Request<proto::GetPatchCoverageRequest>,
    ) -> Result<Response<proto::PatchCoverage>, Status> {
        self.reads(&request)?;
        let r = request.into_inner();
        let diff = read_diff(r.diff, r.strip).await?;
        let answer = self.service.patch_coverage(&r.run_id, diff).await?;
        Ok(Response::new(patch_to_proto(answer)))
    }

    type GetDifferentialStream = BoxStream<proto::DifferentialChunk>;

    async fn get_differential(
        &self,
        request: Request<proto::GetDifferentialRequest>,
    ) -> Result<Response<Self::GetDifferentialStream>, Status> {
        self.reads(&request)?;
        self.allow_run(
            &request,
            Scope::Read,
            "read runs",
            &request.get_ref().base_run_id,
        )?;
        let r = request.into_inner();
        let diff = match r.has_diff {
            true => Some(read_diff(r.diff, r.strip).await?),
            false => None,
        };
        let answer = self
            .service
            .differential(&r.run_id, &r.base_run_id, diff)
            .await?;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            differential_to_proto(answer).map(Ok),
        ))))
    }

    type GetLinesStream = BoxStream<proto::LinesChunk>;

    async fn get_lines(
        &self,
        request: Request<proto::GetLinesRequest>,
    ) -> Result<Response<Self::GetLinesStream>, Status> {
        let who = self.who(&request)?;
        who.needs(Scope::Read, "read runs").map_err(denied)?;
        let r = request.into_inner();
        let mut set = line_set_from_proto(r.expr)?;
        flag_projects_queried(&self.privacy, &mut set);
        allow_line_set(&self.service, &who, &set)?;
        let files = self.service.line_set(set, &r.path).await?;
        let chunks = in_chunks(files, file_lines_size).map(|files| {
            Ok(proto::LinesChunk {
                files: file_lines_to_proto(&files),
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}

/// Reads a unified diff off the async threads (it may be as large as a message).
async fn read_diff(diff: Vec<u8>, strip: Option<u32>) -> Result<Vec<FileChange>, Status> {
    let strip = strip.map(|s| s as usize);
    let changes = tokio::task::spawn_blocking(move || crate::diff::parse(&diff, strip))
        .await
        .map_err(|e| Status::internal(format!("reading the diff failed: {e}")))?
        .map_err(|e| Error::invalid("diff", e.to_string()))?;
    Ok(changes)
}

/// Bytes of an answer's chunk, about: well under the 4 MB a gRPC client accepts by default.
const CHUNK_BYTES: usize = 1 << 20;

/// `items` cut into chunks of about [`CHUNK_BYTES`] (`size` tells an item's bytes); one empty
/// chunk when there are none, so that an answer always has a first chunk.
fn in_chunks<T>(items: Vec<T>, size: impl Fn(&T) -> usize) -> impl Iterator<Item = Vec<T>> {
    let mut chunks = vec![Vec::new()];
    let mut bytes = 0;
    for item in items {
        let n = size(&item) + 8;
        if bytes + n > CHUNK_BYTES && !chunks.last().is_none_or(Vec::is_empty) {
            chunks.push(Vec::new());
            bytes = 0;
        }
        bytes += n;
        chunks.last_mut().expect("never empty").push(item);
    }
    chunks.into_iter()
}

/// Resolves with the status an ingest stream ends with before its finish.
type Cut = Pin<Box<dyn Future<Output = Status> + Send>>;

/// One ingest stream: header, deltas, finish. Messages are pulled one at a time, so HTTP/2
/// flow control slows a sender that outpaces the merge.
async fn ingest(
    service: &CoverageService,
    privacy: &Privacy,
    who: &Principal,
    (openings, opener): &(Arc<crate::admission::Openings>, String),
    inbound: &mut Streaming<proto::IngestRequest>,
    tx: &mpsc::Sender<Result<proto::IngestResponse, Status>>,
    mut cut: Cut,
) -> Result<(), Status> {
    let reply = |msg: Out| proto::IngestResponse { msg: Some(msg) };
    let first = inbound.message().await.map_err(status::inbound)?;
    let header = match first.and_then(|m| m.msg) {
        Some(In::Header(h)) => h,
        Some(_) => {
            return Err(
                Error::invalid("header", "the first message of a stream must be a header").into(),
            );
        }
        // A client that opened a stream and sent nothing, or an empty first message: no shard
        // to answer for, but never a clean end that could read as success.
        None => {
            return Err(Error::invalid(
                "header",
                "the stream ended or sent an empty message before its header",
            )
            .into());
        }
    };
    let params = owned_params(
        service,
        who,
        (openings, opener),
        &header.run_id,
        params_kept(privacy, header.params),
    )?;
    let run_id = header.run_id.clone();
    let owner = |project: &str| refusal(who.check_run(&run_id, project));
    let session = service
        .begin_shard_as(
            ShardHeader {
                run_id: header.run_id,
                shard_id: header.shard_id,
                attempt: header.attempt,
                params,
                session: header.session_id,
            },
            &owner,
        )
        .await?;
    let resume = proto::Resume {
        attempt: session.attempt(),
        last_seq: session.resume_from(),
        finished: session.already_finished(),
        branch_columns: true,
        sessions: true,
    };
    if tx.send(Ok(reply(Out::Resume(resume)))).await.is_err() {
        return Ok(());
    }
    loop {
        let message = tokio::select! {
            m = inbound.message() => m.map_err(status::inbound)?,
            status = &mut cut => return Err(status),
        };
        let Some(message) = message else {
            // Closed without a finish: the shard stays unfinished and resumable.
            return Ok(());
        };
        match message.msg {
            Some(In::Delta(wire)) => {
                let slot = service.delta_slot().await;
                let (turn, bytes) = (std::time::Instant::now(), wire.len() as u64);
                // Decoding a delta of thousands of files is CPU work: off the async threads,
                // on the thread that applies it.
                let limits = service.limits().clone();
                let applied = service
                    .apply_with(&session, move || delta_from_wire(wire, &limits))
                    .await?;
                drop(slot);
                if !applied.duplicate {
                    let metrics = crate::metrics::metrics();
                    metrics.committed(turn.elapsed());
                    metrics.deltas.inc();
                    metrics.delta_bytes.inc_by(bytes);
                }
                let ack = proto::Ack {
                    seq: applied.seq,
                    duplicate: applied.duplicate,
                    durable: service.is_durable(),
                    unknown_paths: applied.unknown_paths,
                };
                if tx.send(Ok(reply(Out::Ack(ack)))).await.is_err() {
                    return Ok(());
                }
            }
            Some(In::Finish(finish)) => {
                let telemetry = finish
                    .telemetry
                    .map(|t| telemetry_from_proto(t, Some(service.limits())))
                    .transpose()?;
                let run = service
                    .finish(&session, finish.final_seq, telemetry)
                    .await?;
                let finished = proto::Finished {
                    final_seq: finish.final_seq,
                    run: Some(status_to_proto(run)),
                };
                let _ = tx.send(Ok(reply(Out::Finished(finished)))).await;
                return Ok(());
            }
            Some(In::Header(_)) => {
                return Err(Error::invalid("header", "a stream carries one header, first").into());
            }
            None => return Err(Error::invalid("msg", "an empty message").into()),
        }
    }
}

/// A push's run parameters, checked against its token: an existing run must be of a project
/// the token reaches; a new one belongs to the token's project (the one it names, or the
/// token's own when it names none), and is taken from the opener's hourly quota.
fn owned_params(
    service: &CoverageService,
    who: &Principal,
    (openings, opener): (&crate::admission::Openings, &str),
    run_id: &str,
    mut params: RunParams,
) -> Result<RunParams, Status> {
    if let Ok(project) = service.run_project(run_id) {
        who.check_run(run_id, &project).map_err(denied)?;
        return Ok(params);
    }
    if params.project.is_empty()
        && let Some(own) = who.own_project()
    {
        params.project = own.to_owned();
    }
    who.check_run(run_id, &params.project).map_err(denied)?;
    openings.take(opener).map_err(|why| {
        crate::metrics::metrics().refused(tonic::Code::ResourceExhausted);
        Status::resource_exhausted(why)
    })?;
    Ok(params)
}

/// Whose quota of new runs a call takes from: its token, or on a daemon without tokens, its
/// client's address.
fn opener<T>(who: &Principal, request: &Request<T>) -> String {
    match &who.id {
        Some(id) => format!("token {id}"),
        None => request
            .extensions()
            .get::<crate::admission::ConnInfo>()
            .and_then(|c| c.remote())
            .map_or_else(|| "a client".to_owned(), |a| a.ip().to_string()),
    }
}
