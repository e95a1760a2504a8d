//! Long calls end when the token that opened them lapses (see
//! [`crate::auth::Auth::lapsed`]): a stream of answers gets UNAUTHENTICATED as its last item.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_stream::Stream;
use tonic::Status;

use crate::auth::Denied;

/// Resolves when the caller's token lapses.
pub(super) type Lapse = Pin<Box<dyn Future<Output = Denied> + Send>>;

/// `inner`, cut off by `lapse`: once it resolves, the stream answers its refusal and ends.
pub(super) struct Revocable<S> {
    inner: S,
    /// `None` once the stream ended, either way.
    lapse: Option<Lapse>,
}

impl<S> Revocable<S> {
    pub(super) fn new(inner: S, lapse: Lapse) -> Revocable<S> {
        Revocable {
            inner,
            lapse: Some(lapse),
        }
    }
}

impl<S, T> Stream for Revocable<S>
where
    S: Stream<Item = Result<T, Status>> + Unpin,
{
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(lapse) = this.lapse.as_mut() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(denied) = lapse.as_mut().poll(cx) {
            this.lapse = None;
            return Poll::Ready(Some(Err(super::denied(denied))));
        }
        let next = Pin::new(&mut this.inner).poll_next(cx);
        if let Poll::Ready(None) = next {
            this.lapse = None;
        }
        next
    }
}
