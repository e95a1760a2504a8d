//! The daemon's HTTP port, beside the gRPC one (`covd serve --http-listen`, loopback by
//! default): Prometheus metrics at `/metrics`, and the dashboard (see [`crate::dashboard`]).

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::service::CoverageService;

/// Serves until `stopping` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    service: CoverageService,
    privacy: std::sync::Arc<crate::privacy::Privacy>,
    mut stopping: watch::Receiver<bool>,
) {
    let dashboard = crate::dashboard::routes(crate::dashboard::Api {
        service: service.clone(),
        privacy,
        stopping: stopping.clone(),
    });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(service)
        .merge(dashboard);
    let stop = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!("the HTTP port failed: {e}");
    }
}

async fn metrics(State(service): State<CoverageService>) -> impl IntoResponse {
    let body = crate::metrics::metrics().render(&service);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}
