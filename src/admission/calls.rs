//! The layer around every gRPC call: refuses the calls of a connection past a connection limit
//! and the calls past a client's concurrent streams, budgets the request body, and counts the
//! call open until its answer has ended (a stream's answer ends with its trailers).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;

use super::ConnInfo;
use super::receive::Receiving;

/// Puts [`Admit`] around a service (`Server::layer`).
#[derive(Debug, Clone, Default)]
pub struct AdmitLayer;

impl<S> tower_layer::Layer<S> for AdmitLayer {
    type Service = Admit<S>;

    fn layer(&self, inner: S) -> Admit<S> {
        Admit { inner }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Admit<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower_service::Service<http::Request<Body>> for Admit<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let Some(conn) = request.extensions().get::<ConnInfo>().cloned() else {
            // A connection that did not come through `Admission::admit` (none in the daemon).
            return Box::pin(self.inner.call(request));
        };
        // Health is never refused for the client's streams: a load balancer checking a busy
        // client's address must still hear that the daemon is up.
        let counted = !request.uri().path().starts_with("/grpc.health.v1.Health/");
        let call = match conn.open_call(counted) {
            Ok(call) => call,
            Err(why) => return refuse(why),
        };
        let state = conn.0;
        let admission = state.admission.clone();
        let client = state.client.receiving.clone();
        let compressed = request.headers().contains_key("grpc-encoding");
        let request =
            request.map(|body| Body::new(Receiving::new(body, admission, client, compressed)));
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await?;
            Ok(answer.map(|body| Body::new(call.holding(body))))
        })
    }
}

fn refuse<E: Send + 'static>(why: String) -> BoxFuture<Result<http::Response<Body>, E>> {
    crate::metrics::metrics().refused(tonic::Code::ResourceExhausted);
    let answer = tonic::Status::resource_exhausted(why).into_http::<Body>();
    Box::pin(std::future::ready(Ok(answer)))
}

impl ConnInfo {
    /// Opens a call on this connection, or says why it is refused: every call of a connection
    /// past a connection limit is, and a call past its client's concurrent streams when it is
    /// `counted` among them.
    pub(crate) fn open_call(&self, counted: bool) -> Result<Call, String> {
        let state = &self.0;
        if let Some(why) = &state.refusal {
            return Err(why.clone());
        }
        if counted {
            let limit = state.admission.limits.max_streams_per_client;
            let open = state.client.streams.fetch_add(1, Ordering::AcqRel) + 1;
            if open > limit {
                state.client.streams.fetch_sub(1, Ordering::AcqRel);
                let from = state
                    .remote
                    .map_or_else(String::new, |a| format!(" from {}", a.ip()));
                return Err(format!(
                    "{open} streams open{from}: beyond the limit --max-streams-per-client ({limit})"
                ));
            }
        }
        state.call_started();
        Ok(Call {
            state: state.clone(),
            counted,
        })
    }
}

/// An open call: counted on its connection (for the idle clock) and, if it is counted, among
/// its client's streams, until this is dropped.
#[derive(Debug)]
pub(crate) struct Call {
    state: Arc<super::ConnState>,
    counted: bool,
}

impl Call {
    /// `body`, holding this call open until it is dropped.
    pub(crate) fn holding<B>(self, body: B) -> Ending<B> {
        Ending { body, _call: self }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.counted && self.state.client.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.state.admission.forget_if_idle(self.state.ip);
        }
        self.state.call_ended();
    }
}

/// An answer's body, which holds its call open until it is dropped: once it has ended, or the
/// client went away.
pub(crate) struct Ending<B> {
    body: B,
    _call: Call,
}

impl<B: HttpBody + Unpin> HttpBody for Ending<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
