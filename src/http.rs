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

use axum::extract::ConnectInfo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;

use crate::admission::{Admission, Conn, ConnInfo};
use crate::tls::{Port, Tls};

use crate::auth::{Auth, Denied, Principal};
use crate::service::CoverageService;

/// Serves until `stopping` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    admission: Arc<Admission>,
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
    let accept_stopping = stopping.clone();
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
    let app = app
        .layer(axum::middleware::from_fn(count_call))
        .into_make_service_with_connect_info::<ConnInfo>();
    let connections = Connections::new(listener, admission, tls, accept_stopping);
    let served = axum::serve(connections, app)
        .with_graceful_shutdown(stop)
        .await;
    if let Err(e) = served {
        tracing::error!("the HTTP port failed: {e}");
    }
}

/// The HTTP port's connections, admitted and counted with the gRPC port's (see
/// [`crate::admission`]), through their TLS handshakes when the port has TLS.
struct Connections {
    local: std::io::Result<SocketAddr>,
    incoming: ReceiverStream<std::io::Result<Conn>>,
}

impl Connections {
    fn new(
        listener: TcpListener,
        admission: Arc<Admission>,
        tls: Option<Arc<Tls>>,
        stopping: watch::Receiver<bool>,
    ) -> Connections {
        Connections {
            local: listener.local_addr(),
            incoming: crate::admission::incoming(
                listener,
                admission,
                tls.map(|t| (t, Port::Http)),
                stopping,
            ),
        }
    }
}

impl axum::serve::Listener for Connections {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        loop {
            match self.incoming.next().await {
                Some(Ok(conn)) => {
                    let peer = conn.info().remote();
                    return (conn, peer.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))));
                }
                Some(Err(_)) => {}
                // Accepting ended: the daemon is stopping, and axum's shutdown follows.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.local {
            Ok(a) => Ok(*a),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    }
}

/// Each request knows its connection as gRPC calls do (axum's connect info).
impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Connections>>
    for ConnInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, Connections>) -> ConnInfo {
        stream.io().info()
    }
}

/// Every request is a call on its connection (see [`ConnInfo::open_call`]): refused on a
/// connection past a connection limit or past its client's concurrent calls, and counted open
/// until its answer's body is dropped, so the idle clock never closes a connection with an
/// answer still streaming (the dashboard's events).
async fn count_call(request: Request, next: Next) -> Response {
    let Some(ConnectInfo(conn)) = request.extensions().get::<ConnectInfo<ConnInfo>>().cloned()
    else {
        return next.run(request).await;
    };
    match conn.open_call(true) {
        Ok(call) => next
            .run(request)
            .await
            .map(|body| axum::body::Body::new(call.holding(body))),
        Err(why) => {
            crate::metrics::metrics().refused(tonic::Code::ResourceExhausted);
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({ "error": why })),
            )
                .into_response()
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
    match admitted(&auth, &privacy, token.as_deref()) {
        Ok(who) => {
            let mut request = request;
            request.extensions_mut().insert(Admitted { auth, who });
            next.run(request).await
        }
        Err(refusal) => refused(refusal),
    }
}

/// The caller a request was let in as, for the handlers that last (the dashboard's events end
/// when its token lapses).
#[derive(Clone)]
pub(crate) struct Admitted {
    auth: Arc<Auth>,
    who: Principal,
}

impl Admitted {
    /// See [`Auth::lapsed`].
    pub(crate) fn lapsed(&self) -> impl Future<Output = Denied> + Send + use<> {
        self.auth.lapsed(&self.who)
    }
}

/// Who a request's `authorization` is, if it may read the HTTP port; otherwise the status and
/// the words of its refusal (see [`refused`]).
fn admitted(
    auth: &Auth,
    privacy: &crate::privacy::Privacy,
    authorization: Option<&str>,
) -> Result<Principal, (StatusCode, String)> {
    match auth.authenticate(authorization, |p| privacy.query(p)) {
        Ok(who) if who.reaches_all_projects() => Ok(who),
        Ok(who) => Err((
            StatusCode::FORBIDDEN,
            format!(
                "token {} reaches some projects only; the HTTP port needs one of every project",
                who.id.as_deref().unwrap_or("")
            ),
        )),
        Err(Denied::Unauthenticated(m)) => Err((StatusCode::UNAUTHORIZED, m)),
        Err(Denied::PermissionDenied(m)) => Err((StatusCode::FORBIDDEN, m)),
    }
}

/// The answer to a request [`admitted`] refused.
fn refused((status, message): (StatusCode, String)) -> Response {
    let mut response = (status, Json(serde_json::json!({ "error": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
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
    if let Err(refusal) = admitted(&auth, &privacy, Some(&format!("Bearer {token}"))) {
        return refused(refusal);
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
