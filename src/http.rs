//! The daemon's HTTP port, beside the gRPC one (`covd serve --http-listen`, loopback by
//! default): Prometheus metrics at `/metrics`, and the dashboard (see [`crate::dashboard`]).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::tls::{Port, Stream, Tls};

use crate::auth::{Auth, Denied};
use crate::service::CoverageService;

/// Serves until `stopping` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    service: CoverageService,
    privacy: Arc<crate::privacy::Privacy>,
    auth: Arc<Auth>,
    mut stopping: watch::Receiver<bool>,
) {
    let dashboard = crate::dashboard::routes(crate::dashboard::Api {
        service: service.clone(),
        privacy: privacy.clone(),
        stopping: stopping.clone(),
    });
    let guard = (auth, privacy);
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(service)
        .merge(dashboard)
        .route(
            "/api/session",
            post(sign_in).delete(sign_out).with_state(guard.clone()),
        )
        .layer(axum::middleware::from_fn_with_state(guard, require_token));
    let stop = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    let served = match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        }
        Some(tls) => {
            axum::serve(Secured::new(listener, tls), app)
                .with_graceful_shutdown(stop)
                .await
        }
    };
    if let Err(e) = served {
        tracing::error!("the HTTP port failed: {e}");
    }
}

/// The HTTP port's connections through their TLS handshakes, each in a task of its own.
struct Secured {
    local: std::io::Result<SocketAddr>,
    handshaken: mpsc::Receiver<(Stream, SocketAddr)>,
}

impl Secured {
    fn new(listener: TcpListener, tls: Arc<Tls>) -> Secured {
        let local = listener.local_addr();
        let (tx, handshaken) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut accepting = crate::admission::Accepting::new(listener);
            loop {
                let tcp = tokio::select! {
                    tcp = accepting.next() => tcp,
                    () = tx.closed() => return,
                };
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    let Ok(peer) = tcp.peer_addr() else { return };
                    match tls.accept(Port::Http, tcp).await {
                        Ok(stream) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Err(e) => tracing::debug!("a TLS handshake on the HTTP port failed: {e}"),
                    }
                });
            }
        });
        Secured { local, handshaken }
    }
}

impl axum::serve::Listener for Secured {
    type Io = Stream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Stream, SocketAddr) {
        match self.handshaken.recv().await {
            Some(accepted) => accepted,
            // The accepting task only ends when this is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.local {
            Ok(a) => Ok(*a),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    }
}

type Guard = (Arc<Auth>, Arc<crate::privacy::Privacy>);

/// The dashboard's session cookie: the token a browser signed in with (`HttpOnly`, so no
/// script reads it; `SameSite=Strict`, so no other site's page sends it).
const SESSION: &str = "covd_session";

/// Paths any client may fetch: the dashboard's page and assets (no data; the page asks for a
/// token when the API wants one) and signing in.
fn open_path(path: &str) -> bool {
    matches!(path, "/" | "/app.js" | "/style.css" | "/api/session")
}

/// The token a request presents: `Authorization: Bearer covd_…` (as Prometheus'
/// `authorization` setting sends it), or the dashboard's session cookie.
fn presented(request: &Request) -> Option<String> {
    let headers = request.headers();
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        return Some(v.to_str().unwrap_or("(not text)").to_owned());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(SESSION)?.strip_prefix('='))
        .map(|t| format!("Bearer {t}"))
}

/// With tokens, every request of the HTTP port but [`open_path`]s needs one that reads every
/// project: the dashboard and the metrics span all projects.
async fn require_token(
    State((auth, privacy)): State<Guard>,
    request: Request,
    next: Next,
) -> Response {
    if open_path(request.uri().path()) {
        return next.run(request).await;
    }
    let token = presented(&request);
    match refusal(&auth, &privacy, token.as_deref()) {
        None => next.run(request).await,
        Some(refused) => refused,
    }
}

/// The answer to a request whose `authorization` may not read the HTTP port; `None` if it
/// may.
fn refusal(
    auth: &Auth,
    privacy: &crate::privacy::Privacy,
    authorization: Option<&str>,
) -> Option<Response> {
    let (status, message) = match auth.authenticate(authorization, |p| privacy.query(p)) {
        Ok(who) if who.reaches_all_projects() => return None,
        Ok(who) => (
            StatusCode::FORBIDDEN,
            format!(
                "token {} reaches some projects only; the HTTP port needs one of every project",
                who.id.as_deref().unwrap_or("")
            ),
        ),
        Err(Denied::Unauthenticated(m)) => (StatusCode::UNAUTHORIZED, m),
        Err(Denied::PermissionDenied(m)) => (StatusCode::FORBIDDEN, m),
    };
    let mut response = (status, Json(serde_json::json!({ "error": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    Some(response)
}

#[derive(Debug, serde::Deserialize)]
struct SignIn {
    token: String,
}

/// `POST /api/session {"token": "covd_…"}`: checks the token, and gives the browser it as a
/// session cookie (12 hours).
async fn sign_in(State((auth, privacy)): State<Guard>, Json(body): Json<SignIn>) -> Response {
    let token = body.token.trim();
    // Only the shape of a token goes into the cookie (nothing that could add attributes).
    let shaped = token.strip_prefix("covd_").is_some_and(|rest| {
        rest.split('_').count() == 2 && rest.chars().all(|c| c == '_' || c.is_ascii_hexdigit())
    });
    if !auth.required() || !shaped {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": "not a covd token, or no token is needed" })),
        )
            .into_response();
    }
    if let Some(refused) = refusal(&auth, &privacy, Some(&format!("Bearer {token}"))) {
        return refused;
    }
    let Ok(cookie) = HeaderValue::from_str(&format!(
        "{SESSION}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age=43200"
    )) else {
        return (StatusCode::BAD_REQUEST, "not a covd token").into_response();
    };
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    response
}

/// `DELETE /api/session`: forgets the browser's session.
async fn sign_out() -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("covd_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    response
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
