//! The dashboard's JSON API, on the HTTP port under `/api/`: what the pages show, read from the
//! service as the gRPC queries read it, and a stream of server-sent events that says when the
//! runs changed.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Denied;
use crate::history::Bucket;
use crate::model::Totals;
use crate::persist::HistoryQuery;
use crate::privacy::Privacy;
use crate::service::{CoverageService, Error, RunStatus, ShardState, TestTelemetry};

/// What the API's handlers share.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    pub(crate) service: CoverageService,
    pub(crate) privacy: Arc<Privacy>,
    /// Turns true when the daemon shuts down: event streams end.
    pub(crate) stopping: tokio::sync::watch::Receiver<bool>,
}

/// An error as the API answers it: a status and `{"error": "…"}`.
pub(crate) struct Failure(StatusCode, String);

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let code = match &e {
            Error::RunNotFound(_)
            | Error::FileNotFound { .. }
            | Error::TestNotFound { .. }
            | Error::ShardNotFound { .. }
            | Error::FlagNotFound { .. }
            | Error::SourceNotFound { .. } => StatusCode::NOT_FOUND,
            Error::InvalidArgument { .. } => StatusCode::BAD_REQUEST,
            Error::PermissionDenied(_) => StatusCode::FORBIDDEN,
            Error::AlreadyExists(_) | Error::FailedPrecondition(_) | Error::Aborted(_) => {
                StatusCode::CONFLICT
            }
            Error::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Failure(code, e.to_string())
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type Answer = Result<Json<Value>, Failure>;

fn time(t: SystemTime) -> Value {
    json!(humantime::format_rfc3339_millis(t).to_string())
}

fn ms_time(ms: u64) -> Value {
    time(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

fn totals(t: &Totals) -> Value {
    json!({
        "files": t.files,
        "lines": t.lines,
        "lines_covered": t.lines_covered,
        "branches": t.branches,
        "branches_taken": t.branches_taken,
        "functions": t.functions,
        "functions_hit": t.functions_hit,
    })
}

fn shard_state(s: ShardState) -> &'static str {
    match s {
        ShardState::Pending => "missing",
        ShardState::Streaming => "streaming",
        ShardState::Interrupted => "interrupted",
        ShardState::Finished => "finished",
    }
}

fn telemetry(t: &TestTelemetry) -> Value {
    json!({
        "passed": t.passed,
        "failed": t.failed,
        "skipped": t.skipped,
        "errored": t.errored,
        "incomplete": t.incomplete,
        "assertions": t.assertions,
        "duration_seconds": t.duration.map(|d| d.as_secs_f64()),
        "peak_memory_bytes": (t.peak_memory_bytes > 0).then_some(t.peak_memory_bytes),
        "tags": t.tags,
        "tests": t.tests.len(),
    })
}

/// A run as the runs list shows it: what it is, its completeness, its totals.
fn run_summary(s: &RunStatus) -> Value {
    let count = |state: ShardState| s.shards.iter().filter(|sh| sh.state == state).count();
    json!({
        "run_id": s.run_id,
        "project": s.params.project,
        "branch": s.params.branch,
        "commit": s.params.commit,
        "flags": s.params.flags,
        "created_at": time(s.created_at),
        "completed_at": s.completed_at.map(time),
        "complete": s.complete,
        "expectations_declared": s.expectations_declared,
        "shards": {
            "expected": s.shards.iter().filter(|sh| sh.expected).count(),
            "streaming": count(ShardState::Streaming),
            "finished": count(ShardState::Finished),
            "interrupted": count(ShardState::Interrupted),
            "missing": s.missing_shards.len(),
        },
        "totals": totals(&s.totals),
    })
}

#[derive(Debug, Deserialize)]
pub(crate) struct RunsQuery {
    project: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/runs[?project=P&limit=N]`: the runs the daemon holds, newest first.
pub(crate) async fn runs(State(api): State<Api>, Query(q): Query<RunsQuery>) -> Answer {
    let project = q
        .project
        .filter(|p| !p.is_empty())
        .map(|p| api.privacy.query(&p));
    let runs = api
        .service
        .list_runs(q.limit.unwrap_or(0), project.as_deref());
    Ok(Json(json!({
        "runs": runs.iter().map(run_summary).collect::<Vec<_>>(),
    })))
}

/// `GET /api/runs/{id}`: a run with each shard and its telemetry.
pub(crate) async fn run(State(api): State<Api>, Path(id): Path<String>) -> Answer {
    let s = api.service.run_status(&id)?;
    let mut out = run_summary(&s);
    out["missing_shards"] = json!(s.missing_shards);
    out["shard_list"] = s
        .shards
        .iter()
        .map(|sh| {
            json!({
                "shard_id": sh.shard_id,
                "state": shard_state(sh.state),
                "attempt": sh.attempt,
                "deltas": sh.last_seq,
                "expected": sh.expected,
                "finished_at": sh.finished_at.map(time),
                "telemetry": sh.telemetry.as_ref().map(telemetry),
            })
        })
        .collect();
    Ok(Json(out))
}

#[derive(Debug, Deserialize)]
pub(crate) struct PathQuery {
    #[serde(default)]
    path: String,
}

/// `GET /api/runs/{id}/dir?path=DIR`: a directory's totals and its children's.
pub(crate) async fn directory(
    State(api): State<Api>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Answer {
    let d = api.service.directory(&id, &q.path).await?;
    Ok(Json(json!({
        "path": d.path,
        "totals": totals(&d.totals),
        "entries": d.entries.iter().map(|e| json!({
            "path": &*e.path,
            "directory": e.is_directory,
            "totals": totals(&e.totals),
        })).collect::<Vec<_>>(),
    })))
}

/// `GET /api/runs/{id}/file?path=FILE`: each executable line with its count (`null` when the
/// tool gave none) and whether it ran, and per line with branches how many were taken.
pub(crate) async fn file(
    State(api): State<Api>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Answer {
    let f = api.service.file(&id, &q.path).await?;
    // Its lines, when the run's pushes sent its source (`covd push --sources`), and it is
    // not longer than a page of lines (a 4 MiB file of empty lines would be 4 M rows).
    let source = match api.service.source(&id, &q.path).await {
        Ok((_, text)) => Some(
            String::from_utf8_lossy(&text)
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        )
        .filter(|lines| lines.len() <= api.service.limits().file_page_lines),
        Err(Error::SourceNotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let covered = f.covered();
    let lines: Vec<Value> = f
        .lines()
        .iter()
        .map(|l| json!([l, f.hits_of(l), covered.contains(l)]))
        .collect();
    let mut branches: std::collections::BTreeMap<u32, (u32, u32)> = Default::default();
    for (key, taken) in f.branches() {
        let e = branches.entry(key.line).or_default();
        e.1 += 1;
        if taken.is_some_and(|n| n > 0) {
            e.0 += 1;
        }
    }
    Ok(Json(json!({
        "path": q.path,
        "totals": totals(&f.totals()),
        "lines": lines,
        "source": source,
        "branches": branches.iter().map(|(l, (t, n))| json!([l, t, n])).collect::<Vec<_>>(),
        "functions": f.functions().iter().map(|func| json!({
            "name": &*func.name, "line": func.start_line, "hits": func.hits,
        })).collect::<Vec<_>>(),
    })))
}

#[derive(Debug, Deserialize)]
pub(crate) struct TrendQuery {
    project: Option<String>,
    branch: Option<String>,
    by: Option<String>,
}

/// `GET /api/history?project=P&branch=B&by=day|week|month`: the trend of a project's runs.
pub(crate) async fn history(State(api): State<Api>, Query(q): Query<TrendQuery>) -> Answer {
    let width = match q.by.as_deref() {
        None | Some("week") => Bucket::Week,
        Some("day") => Bucket::Day,
        Some("month") => Bucket::Month,
        Some(other) => {
            return Err(
                Error::invalid("by", format!("`{other}` is not day, week or month")).into(),
            );
        }
    };
    let query = HistoryQuery {
        project: q
            .project
            .filter(|p| !p.is_empty())
            .map(|p| api.privacy.query(&p)),
        branch: q.branch.filter(|b| !b.is_empty()),
        limit: usize::MAX,
        ..HistoryQuery::default()
    };
    let buckets = api.service.history(query, width).await?;
    let buckets: Vec<Value> = buckets
        .iter()
        .map(|b| {
            json!({
                "start": ms_time(b.start_ms),
                "end": ms_time(b.end_ms),
                "runs": b.runs,
                "incomplete_runs": b.incomplete_runs,
                "down_sampled": b.down_sampled,
                "metrics": b.metrics.iter().map(|(k, s)| (k.clone(), json!({
                    "runs": s.n, "min": s.min, "mean": s.mean(), "max": s.max, "last": s.last,
                }))).collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    Ok(Json(json!({ "buckets": buckets })))
}

#[derive(Debug, Deserialize)]
pub(crate) struct FlakyQuery {
    #[serde(default)]
    project: String,
    #[serde(default)]
    branch: String,
}

/// `GET /api/flaky?project=P&branch=B`: the branch's broken and flaky tests.
pub(crate) async fn flaky(State(api): State<Api>, Query(q): Query<FlakyQuery>) -> Answer {
    let project = if q.project.is_empty() {
        String::new()
    } else {
        api.privacy.query(&q.project)
    };
    let tests = api.service.flaky_tests(&project, &q.branch, false).await?;
    Ok(Json(json!({
        "tests": tests.iter().map(|t| {
            let h = &t.health;
            json!({
                "test": t.test,
                "class": match h.class {
                    crate::flaky::Class::Broken => "broken",
                    crate::flaky::Class::Flaky => "flaky",
                    crate::flaky::Class::Healthy => "healthy",
                },
                "failed": h.failed,
                "runs": h.runs,
                "flaky_commits": h.flaky_commits,
                "first_seen": ms_time(h.first_seen_ms),
                "last_flip": h.last_flip_ms.map(ms_time),
            })
        }).collect::<Vec<_>>(),
    })))
}

/// How often the event stream looks for changes.
const EVENTS_EVERY: Duration = Duration::from_millis(200);

/// `GET /api/events`: a server-sent event `runs` whenever a run is opened, changes (a delta,
/// a shard finishing, completion) or goes; the pages then read what they show again. When the
/// token the page signed in with is revoked or expires, a last event `denied` says so and the
/// stream ends.
pub(crate) async fn events(
    State(api): State<Api>,
    admitted: Option<axum::Extension<crate::http::Admitted>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (service, stopping) = (api.service, api.stopping);
    let lapsed: Lapse = match admitted {
        Some(axum::Extension(a)) => Box::pin(a.lapsed()),
        None => Box::pin(std::future::pending()),
    };
    let stream = futures_util::stream::unfold(
        Some((None, lapsed)),
        move |state: Option<(Option<u64>, Lapse)>| {
            let service = service.clone();
            let mut stopping = stopping.clone();
            async move {
                let (last, mut lapsed) = state?;
                loop {
                    if *stopping.borrow() {
                        return None;
                    }
                    // Looked at before each event, not only while nothing changes: under
                    // steady ingest there is always an event to send.
                    if let Some(denied) = futures_util::FutureExt::now_or_never(&mut lapsed) {
                        return Some((Ok(denied_event(denied)), None));
                    }
                    let now = service.runs_fingerprint();
                    if last != Some(now) {
                        let event = Event::default().event("runs").data(now.to_string());
                        return Some((Ok(event), Some((Some(now), lapsed))));
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(EVENTS_EVERY) => {}
                        _ = stopping.changed() => {}
                        denied = &mut lapsed => return Some((Ok(denied_event(denied)), None)),
                    }
                }
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// The last event of a stream whose token lapsed: why.
fn denied_event(denied: Denied) -> Event {
    let why = match denied {
        Denied::Unauthenticated(m) | Denied::PermissionDenied(m) => m,
    };
    Event::default().event("denied").data(why)
}

/// Resolves when the caller's token lapses (see [`crate::auth::Auth::lapsed`]).
type Lapse = std::pin::Pin<Box<dyn Future<Output = Denied> + Send>>;
