//! A request body whose messages each take their share of the receive budget before the daemon
//! reads them.
//!
//! gRPC frames a message as a flag byte (compressed or not), a 4-byte length and the body.
//! tonic reserves the whole length as soon as it reads the prefix and then buffers the body
//! however slowly it comes; 256 streams that each sent most of a 16 MiB message and stopped
//! made the daemon abort. Here the prefix is held back until the message's share is taken from
//! the client's budget and the total one (waiting at most `--receive-wait`; meanwhile HTTP/2
//! flow control stops the sender), and the body must then arrive within `--read-timeout` of
//! waiting for the client. The share is given back when the next message's prefix arrives
//! or the stream ends, so it also covers the message while the call works on it.
//!
//! A compressed message is gathered whole and inflated here rather than by tonic, so that both
//! its decompressed size and its inflation ratio are bounded before it is held: its share is
//! its own length and what it may inflate to, the lesser of `--max-inflation` times its length
//! and `--max-message-bytes`. It goes on to tonic uncompressed.

use std::collections::VecDeque;
use std::future::Future;
use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::Status;
use tonic::body::Body;

use super::Admission;

const PREFIX: usize = 5;

/// See the module docs.
pub(super) struct Receiving {
    body: Body,
    admission: Arc<Admission>,
    client: Arc<Semaphore>,
    /// The call said its messages may be gzip-compressed.
    gzip: bool,
    /// What came from the client and is not handed on yet.
    input: Bytes,
    /// What is ready to hand on to tonic.
    out: VecDeque<Frame<Bytes>>,
    state: State,
    /// The budget of the message handed on last (or being received).
    held: Option<Share>,
    /// The client's body has ended.
    ended: bool,
    clock: Clock,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

enum State {
    /// Reading a message's prefix; `n` bytes of it so far.
    Prefix { bytes: [u8; PREFIX], n: usize },
    /// Waiting for room in the budget.
    Admitting {
        prefix: [u8; PREFIX],
        len: usize,
        acquire: BoxFuture<Result<Share, Status>>,
    },
    /// Handing on the `remaining` bytes of an uncompressed message as they come.
    Body { remaining: usize },
    /// Gathering a compressed message of `len` bytes, to inflate it whole.
    Compressed { len: usize, gathered: BytesMut },
    /// Handing everything on untouched: tonic refuses this stream itself (a message beyond
    /// `--max-message-bytes`, a compression flag it does not know).
    Through,
    /// Refused; nothing more is read.
    Failed,
}

/// A message's share of both budgets.
struct Share {
    bytes: u32,
    _client: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
}

impl Drop for Share {
    fn drop(&mut self) {
        crate::metrics::metrics()
            .receiving_bytes
            .dec_by(i64::from(self.bytes));
    }
}

/// The time spent waiting for the client: between messages (against `--stream-idle-timeout`)
/// or, summed over the waits, within one (against `--read-timeout`).
struct Clock {
    sleep: Option<Pin<Box<Sleep>>>,
    /// Since when this wait has lasted.
    since: Option<Instant>,
    /// The earlier waits within the current message.
    waited: Duration,
}

impl Receiving {
    pub(super) fn new(
        body: Body,
        admission: Arc<Admission>,
        client: Arc<Semaphore>,
        gzip: bool,
    ) -> Receiving {
        Receiving {
            body,
            admission,
            client,
            gzip,
            input: Bytes::new(),
            out: VecDeque::new(),
            state: State::Prefix {
                bytes: [0; PREFIX],
                n: 0,
            },
            held: None,
            ended: false,
            clock: Clock {
                sleep: None,
                since: None,
                waited: Duration::ZERO,
            },
        }
    }

    /// Moves what it can of `input` on.
    fn consume(&mut self) -> Result<(), Status> {
        match &mut self.state {
            State::Prefix { bytes, n } => {
                if *n == 0 {
                    // The first byte of a message: the wait between messages is over.
                    self.clock.message_started();
                }
                let take = (PREFIX - *n).min(self.input.len());
                bytes[*n..*n + take].copy_from_slice(&self.input[..take]);
                self.input.advance(take);
                *n += take;
                if *n == PREFIX {
                    let prefix = *bytes;
                    self.prefix(prefix)?;
                }
            }
            State::Body { remaining } => {
                let take = (*remaining).min(self.input.len());
                self.out.push_back(Frame::data(self.input.split_to(take)));
                *remaining -= take;
                if *remaining == 0 {
                    self.message_done();
                }
            }
            State::Compressed { len, gathered } => {
                let take = (*len - gathered.len()).min(self.input.len());
                gathered.extend_from_slice(&self.input.split_to(take));
                if gathered.len() == *len {
                    let inflated = self.inflate()?;
                    let mut prefix = BytesMut::with_capacity(PREFIX);
                    prefix.extend_from_slice(&[0]);
                    prefix.extend_from_slice(&(inflated.len() as u32).to_be_bytes());
                    self.out.push_back(Frame::data(prefix.freeze()));
                    self.out.push_back(Frame::data(inflated));
                    self.message_done();
                }
            }
            State::Through => {
                let all = std::mem::take(&mut self.input);
                self.out.push_back(Frame::data(all));
            }
            State::Admitting { .. } | State::Failed => self.input.clear(),
        }
        Ok(())
    }

    /// A message's prefix is in: what it may cost, and the wait for it.
    fn prefix(&mut self, prefix: [u8; PREFIX]) -> Result<(), Status> {
        let limits = &self.admission.limits;
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        let compressed = match prefix[0] {
            0 => false,
            1 if self.gzip => true,
            _ => {
                self.through(prefix);
                return Ok(());
            }
        };
        if len > limits.max_message_bytes {
            self.through(prefix);
            return Ok(());
        }
        // The message handed on before has been read whole: its share goes back first, so
        // that a stream never waits for itself.
        self.held = None;
        self.clock.message_started();
        let charge = if compressed {
            len + len
                .saturating_mul(limits.max_inflation as usize)
                .min(limits.max_message_bytes)
        } else {
            len
        };
        if charge > limits.receiving_bytes_per_client {
            return Err(exhausted(format!(
                "a message of {len} bytes needs {charge} bytes of the receive budget: beyond the \
                 limit --max-receiving-bytes-per-client ({})",
                limits.receiving_bytes_per_client
            )));
        }
        self.state = State::Admitting {
            prefix,
            len,
            acquire: Box::pin(take_share(
                self.admission.clone(),
                self.client.clone(),
                charge as u32,
            )),
        };
        Ok(())
    }

    /// The message whose prefix is `prefix` has its share.
    fn admitted(&mut self, prefix: [u8; PREFIX], len: usize, share: Share) {
        self.held = Some(share);
        if prefix[0] == 1 {
            self.state = State::Compressed {
                len,
                gathered: BytesMut::with_capacity(len),
            };
            return;
        }
        self.out
            .push_back(Frame::data(Bytes::copy_from_slice(&prefix)));
        if len == 0 {
            self.message_done();
        } else {
            self.state = State::Body { remaining: len };
        }
    }

    fn through(&mut self, prefix: [u8; PREFIX]) {
        self.out
            .push_back(Frame::data(Bytes::copy_from_slice(&prefix)));
        self.state = State::Through;
    }

    fn message_done(&mut self) {
        self.state = State::Prefix {
            bytes: [0; PREFIX],
            n: 0,
        };
        self.clock.message_started();
    }

    /// The gathered compressed message, inflated: at most `--max-message-bytes`, and at most
    /// `--max-inflation` times its compressed size.
    fn inflate(&mut self) -> Result<Bytes, Status> {
        let State::Compressed { gathered, .. } = &self.state else {
            unreachable!("inflate is called on a gathered message")
        };
        let limits = &self.admission.limits;
        let by_ratio = gathered.len().saturating_mul(limits.max_inflation as usize);
        let cap = by_ratio.min(limits.max_message_bytes);
        let mut inflated = Vec::with_capacity(cap.min(gathered.len().saturating_mul(4)));
        flate2::read::GzDecoder::new(&gathered[..])
            .take(cap as u64 + 1)
            .read_to_end(&mut inflated)
            .map_err(|e| {
                Status::invalid_argument(format!("a message does not decompress as gzip: {e}"))
            })?;
        if inflated.len() > cap {
            let why = if by_ratio < limits.max_message_bytes {
                format!(
                    "a message of {} compressed bytes inflates beyond {cap} bytes: beyond the \
                     limit --max-inflation ({})",
                    gathered.len(),
                    limits.max_inflation
                )
            } else {
                format!(
                    "a message of {} compressed bytes inflates beyond {cap} bytes: beyond the \
                     limit --max-message-bytes ({})",
                    gathered.len(),
                    limits.max_message_bytes
                )
            };
            return Err(exhausted(why));
        }
        Ok(inflated.into())
    }

    /// The clock's verdict while the client sends nothing: a refusal once a wait is too long.
    fn waiting(&mut self, cx: &mut Context<'_>) -> Option<Status> {
        let limits = &self.admission.limits;
        let (limit, between) = match &self.state {
            State::Prefix { n: 0, .. } => (limits.stream_idle, true),
            State::Prefix { .. } | State::Body { .. } | State::Compressed { .. } => {
                (limits.read_timeout, false)
            }
            State::Admitting { .. } | State::Through | State::Failed => return None,
        };
        let clock = &mut self.clock;
        let since = *clock.since.get_or_insert_with(Instant::now);
        let deadline = since + limit.saturating_sub(clock.waited);
        let sleep = clock
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        if sleep.as_mut().poll(cx).is_pending() {
            return None;
        }
        let shown = humantime::format_duration(limit);
        Some(exhausted(if between {
            format!(
                "the stream sent no message for {shown}: beyond the limit --stream-idle-timeout \
                 ({shown})"
            )
        } else {
            format!(
                "a message's bytes did not arrive within {shown} of waiting: beyond the limit \
                 --read-timeout ({shown})"
            )
        }))
    }

    fn fail(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.state = State::Failed;
        self.held = None;
        self.input.clear();
        self.out.clear();
        Poll::Ready(Some(Err(status)))
    }
}

impl Clock {
    fn message_started(&mut self) {
        self.waited = Duration::ZERO;
        self.since = None;
    }

    /// Bytes came: the wait is over.
    fn arrived(&mut self) {
        if let Some(since) = self.since.take() {
            self.waited += since.elapsed();
        }
    }
}

fn exhausted(why: String) -> Status {
    crate::metrics::metrics().refused(tonic::Code::ResourceExhausted);
    Status::resource_exhausted(why)
}

/// `bytes` of the client's budget and of the total one, waiting at most `--receive-wait`.
async fn take_share(
    admission: Arc<Admission>,
    client: Arc<Semaphore>,
    bytes: u32,
) -> Result<Share, Status> {
    let limits = &admission.limits;
    let deadline = Instant::now() + limits.receive_wait;
    let waited = |setting: &str, limit: usize| {
        exhausted(format!(
            "a message of {bytes} bytes waited {} for room in the receive budget: beyond the \
             limit --{setting} ({limit})",
            humantime::format_duration(limits.receive_wait)
        ))
    };
    let gone = |_| Status::unavailable("covd is shutting down");
    let own = tokio::time::timeout_at(deadline, client.acquire_many_owned(bytes))
        .await
        .map_err(|_| {
            waited(
                "max-receiving-bytes-per-client",
                limits.receiving_bytes_per_client,
            )
        })?
        .map_err(gone)?;
    let total = tokio::time::timeout_at(
        deadline,
        admission.receiving.clone().acquire_many_owned(bytes),
    )
    .await
    .map_err(|_| waited("max-receiving-bytes", limits.receiving_bytes))?
    .map_err(gone)?;
    crate::metrics::metrics()
        .receiving_bytes
        .inc_by(i64::from(bytes));
    Ok(Share {
        bytes,
        _client: own,
        _total: total,
    })
}

impl HttpBody for Receiving {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            if let Some(frame) = this.out.pop_front() {
                return Poll::Ready(Some(Ok(frame)));
            }
            if let State::Admitting {
                prefix,
                len,
                acquire,
            } = &mut this.state
            {
                match acquire.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(refused)) => return this.fail(refused),
                    Poll::Ready(Ok(share)) => {
                        let (prefix, len) = (*prefix, *len);
                        this.admitted(prefix, len, share);
                    }
                }
                continue;
            }
            if matches!(this.state, State::Failed) {
                return Poll::Ready(None);
            }
            if !this.input.is_empty() {
                if let Err(refused) = this.consume() {
                    return this.fail(refused);
                }
                continue;
            }
            if this.ended {
                return match &this.state {
                    State::Prefix { n: 0, .. } | State::Through => Poll::Ready(None),
                    _ => this.fail(Status::invalid_argument(
                        "the stream ended in the middle of a message",
                    )),
                };
            }
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    this.clock.arrived();
                    match frame.into_data() {
                        Ok(data) => this.input = data,
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    this.clock.arrived();
                    this.ended = true;
                }
                Poll::Pending => {
                    return match this.waiting(cx) {
                        Some(refused) => this.fail(refused),
                        None => Poll::Pending,
                    };
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.input.is_empty() && self.out.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use http_body_util::BodyExt;

    use super::*;
    use crate::admission::AdmissionLimits;

    fn framed(flag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![flag];
        m.extend_from_slice(&(body.len() as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(bytes).unwrap();
        z.finish().unwrap()
    }

    /// `wire` as a body that comes `cut` bytes at a time.
    fn chunked(wire: &[u8], cut: usize) -> Body {
        let chunks: Vec<Result<Frame<Bytes>, Status>> = wire
            .chunks(cut)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            chunks,
        )))
    }

    fn receiving(admission: &Arc<Admission>, body: Body, gzip: bool) -> Receiving {
        let client = Arc::new(Semaphore::new(admission.limits.receiving_bytes_per_client));
        Receiving::new(body, admission.clone(), client, gzip)
    }

    #[tokio::test]
    async fn messages_go_on_whole_however_their_bytes_are_cut() {
        let admission = Admission::new(AdmissionLimits::default());
        let wire = [
            framed(0, b"first"),
            framed(0, &[7; 100_000]),
            framed(0, b""),
            framed(0, b"last"),
        ]
        .concat();
        for cut in [1, 2, 5, 7, 4096, wire.len()] {
            let body = receiving(&admission, chunked(&wire, cut), false);
            let got = body.collect().await.unwrap().to_bytes();
            assert_eq!(got, wire, "cut every {cut} bytes");
            assert_eq!(admission.receiving_bytes(), 0);
        }
    }

    /// A message's share is taken at its prefix and held until the next one's.
    #[tokio::test]
    async fn a_share_is_held_until_the_next_message() {
        let admission = Admission::new(AdmissionLimits::default());
        let wire = [framed(0, &[1; 1000]), framed(0, &[2; 10])].concat();
        let mut body = receiving(&admission, chunked(&wire, 1003), false);
        let mut got = Vec::new();
        while got.len() < 1005 {
            let frame = body.frame().await.unwrap().unwrap();
            got.extend_from_slice(frame.data_ref().unwrap());
        }
        assert_eq!(admission.receiving_bytes(), 1000);
        while let Some(frame) = body.frame().await {
            got.extend_from_slice(frame.unwrap().data_ref().unwrap());
        }
        assert_eq!(got, wire);
        assert_eq!(admission.receiving_bytes(), 10);
        drop(body);
        assert_eq!(admission.receiving_bytes(), 0);
    }

    #[tokio::test]
    async fn a_compressed_message_goes_on_inflated() {
        let admission = Admission::new(AdmissionLimits::default());
        let text: Vec<u8> = (0..2000u32)
            .flat_map(|n| n.to_string().into_bytes())
            .collect();
        let wire = [framed(1, &gzip(&text)), framed(0, b"plain")].concat();
        let body = receiving(&admission, chunked(&wire, 100), true);
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(got, [framed(0, &text), framed(0, b"plain")].concat());

        // Without grpc-encoding, tonic refuses the flag itself: handed on as it came.
        let body = receiving(&admission, chunked(&wire, 100), false);
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(got, wire);
    }

    type Feed = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, Status>>;

    /// A body the test feeds frame by frame, as the client sends them.
    fn fed(admission: &Arc<Admission>) -> (Feed, Receiving) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let body = Body::new(http_body_util::StreamBody::new(stream));
        (tx, receiving(admission, body, false))
    }

    async fn refusal(admission: &Arc<Admission>, wire: &[u8], gzip: bool) -> Status {
        let mut body = receiving(admission, chunked(wire, 4096), gzip);
        loop {
            match body.frame().await {
                Some(Ok(_)) => {}
                Some(Err(status)) => return status,
                None => panic!("no refusal"),
            }
        }
    }

    #[tokio::test]
    async fn refusals_name_their_limit() {
        let admission = Admission::new(AdmissionLimits {
            receiving_bytes_per_client: 1000,
            max_inflation: 10,
            ..AdmissionLimits::default()
        });
        let status = refusal(&admission, &framed(0, &[0; 1001]), false).await;
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status
                .message()
                .contains("--max-receiving-bytes-per-client (1000)"),
            "{status:?}"
        );

        let bomb = gzip(&[0; 2000]);
        assert!(bomb.len() * 10 < 2000 && bomb.len() * 11 < 1000);
        let status = refusal(&admission, &framed(1, &bomb), true).await;
        assert!(
            status.message().contains("--max-inflation (10)"),
            "{status:?}"
        );

        let status = refusal(&admission, &framed(1, b"not gzip"), true).await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

        let cut = &framed(0, b"whole")[..7];
        let status = refusal(&admission, cut, false).await;
        assert!(
            status.message().contains("in the middle of a message"),
            "{status:?}"
        );
        assert_eq!(admission.receiving_bytes(), 0);
    }

    /// A message's body that stops coming is refused after the read timeout, counting only
    /// the time spent waiting for it; a stream that sends nothing between messages, after
    /// the idle limit.
    #[tokio::test(start_paused = true)]
    async fn waits_for_the_client_are_bounded() {
        let admission = Admission::new(AdmissionLimits {
            read_timeout: Duration::from_secs(5),
            stream_idle: Duration::from_secs(60),
            ..AdmissionLimits::default()
        });
        let (tx, mut body) = fed(&admission);
        let message = framed(0, &[9; 100]);
        tx.send(Ok(Frame::data(Bytes::copy_from_slice(&message[..50]))))
            .await
            .unwrap();
        let started = Instant::now();
        assert!(body.frame().await.unwrap().is_ok());
        assert!(body.frame().await.unwrap().is_ok());
        // Three seconds of waiting, then some bytes, then the rest never comes.
        let feeder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            tx.send(Ok(Frame::data(Bytes::copy_from_slice(&message[50..60]))))
                .await
                .unwrap();
            tx
        });
        let mut refused = None;
        while let Some(frame) = body.frame().await {
            if let Err(status) = frame {
                refused = Some(status);
                break;
            }
        }
        let status = refused.expect("refused");
        assert!(
            status.message().contains("--read-timeout (5s)"),
            "{status:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        drop(feeder);

        let (tx, mut body) = fed(&admission);
        tx.send(Ok(Frame::data(Bytes::from(framed(0, b"one")))))
            .await
            .unwrap();
        let started = Instant::now();
        let mut frames = 0;
        let status = loop {
            match body.frame().await.unwrap() {
                Ok(_) => frames += 1,
                Err(status) => break status,
            }
        };
        assert_eq!(frames, 2);
        assert!(
            status.message().contains("--stream-idle-timeout (1m)"),
            "{status:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(60));
        drop(tx);
    }
}
