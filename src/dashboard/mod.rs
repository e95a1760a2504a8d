//! The dashboard, served by the daemon on its HTTP port: a page of runs that updates live
//! while they stream (server-sent events), a run's directory tree with coverage, a file's line
//! states, trends per project and branch, and the flaky tests. Its assets (one page, its
//! script and its style sheet, written for covd, no framework) are compiled into the binary:
//! nothing to build or install, nothing fetched at run time.

pub(crate) mod api;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

pub(crate) use api::Api;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");

/// The dashboard's routes: the page at `/`, its assets, and the API under `/api/`.
pub(crate) fn routes(api: Api) -> Router {
    Router::new()
        .route("/", get(|| asset(INDEX, "text/html; charset=utf-8")))
        .route(
            "/app.js",
            get(|| asset(SCRIPT, "text/javascript; charset=utf-8")),
        )
        .route(
            "/style.css",
            get(|| asset(STYLE, "text/css; charset=utf-8")),
        )
        .route("/api/runs", get(api::runs))
        .route("/api/runs/{id}", get(api::run))
        .route("/api/runs/{id}/dir", get(api::directory))
        .route("/api/runs/{id}/file", get(api::file))
        .route("/api/history", get(api::history))
        .route("/api/flaky", get(api::flaky))
        .route("/api/events", get(api::events))
        .with_state(api)
}

async fn asset(body: &'static str, kind: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}
