//! What the daemon admits from its clients, counted per client address and in total, before
//! any of it is read: connections (and how long one may stay without a call), concurrent calls,
//! and the bytes of messages being received (each message's share of the budget is taken from
//! its 5-byte length prefix, before its body is read; see [`receive`]).
//!
//! A client is an IP address: CI runners behind one NAT share it, so the per-client defaults
//! are generous; they stop one misbehaving machine from taking what every other client needs.
//! Each limit is a `serve` setting; a call refused by one is RESOURCE_EXHAUSTED naming it.
//!
//! The pieces: [`Admission::admit`] counts a new connection and wraps it ([`Conn`]: it closes
//! itself once idle); [`AdmitLayer`] goes around every gRPC call (a refusal of the connection,
//! the client's concurrent calls, the budgeted request body, the call's end when its answer
//! ends). The HTTP port's connections are admitted and counted the same way, and its requests
//! are calls ([`ConnInfo::open_call`]): the dashboard's event stream is one as long as it
//! lasts, so an open page keeps its connection.

mod accept;
mod calls;
mod openings;
mod receive;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::{Port, Stream, Tls};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};

pub use accept::{Accepting, incoming};
pub use calls::AdmitLayer;
pub use openings::Openings;

/// The limits on what clients may hold, each a `serve` flag of the same name.
#[derive(Debug, Clone)]
pub struct AdmissionLimits {
    /// Connections open at once, over all clients (`--max-connections`).
    pub max_connections: usize,
    /// Connections open at once from one address (`--max-connections-per-client`).
    pub max_connections_per_client: usize,
    /// A connection with no call open this long is closed (`--connection-idle-timeout`).
    pub connection_idle: Duration,
    /// Calls (HTTP/2 streams) open at once from one address (`--max-streams-per-client`);
    /// health checks are not counted.
    pub max_streams_per_client: usize,
    /// Bytes of messages being received at once, over all clients (`--max-receiving-bytes`).
    pub receiving_bytes: usize,
    /// Bytes of messages being received at once from one address
    /// (`--max-receiving-bytes-per-client`).
    pub receiving_bytes_per_client: usize,
    /// How long a message may wait for room in those budgets before it is refused
    /// (`--receive-wait`).
    pub receive_wait: Duration,
    /// How long a message's body may take to arrive once its length came, counting only the
    /// time spent waiting for the client (`--read-timeout`).
    pub read_timeout: Duration,
    /// How long a client stream may send nothing between messages (`--stream-idle-timeout`).
    pub stream_idle: Duration,
    /// The most a compressed message may grow when decompressed, as a ratio
    /// (`--max-inflation`).
    pub max_inflation: u32,
    /// The largest message, decompressed (`--max-message-bytes`).
    pub max_message_bytes: usize,
}

impl Default for AdmissionLimits {
    fn default() -> AdmissionLimits {
        AdmissionLimits {
            max_connections: 4096,
            max_connections_per_client: 512,
            connection_idle: Duration::from_secs(300),
            max_streams_per_client: 1024,
            receiving_bytes: 256 << 20,
            receiving_bytes_per_client: 128 << 20,
            receive_wait: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            stream_idle: Duration::from_secs(600),
            // Deltas compress 4–5× with gzip (the corpus' LCOV, the benchmark's shards, as
            // covd encodes them); a gzip bomb, a thousand times.
            max_inflation: 100,
            max_message_bytes: 16 << 20,
        }
    }
}

/// The counts behind the limits, shared by every connection and call.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    connections: AtomicUsize,
    clients: DashMap<IpAddr, Arc<Client>>,
    receiving: Arc<Semaphore>,
}

/// What one address holds.
#[derive(Debug)]
struct Client {
    connections: AtomicUsize,
    streams: AtomicUsize,
    receiving: Arc<Semaphore>,
}

impl Admission {
    pub fn new(mut limits: AdmissionLimits) -> Arc<Admission> {
        // Semaphores count in u32 per acquisition and at most usize::MAX >> 3 in all.
        limits.receiving_bytes = limits.receiving_bytes.clamp(1, u32::MAX as usize);
        limits.receiving_bytes_per_client = limits
            .receiving_bytes_per_client
            .clamp(1, limits.receiving_bytes);
        Arc::new(Admission {
            receiving: Arc::new(Semaphore::new(limits.receiving_bytes)),
            limits,
            connections: AtomicUsize::new(0),
            clients: DashMap::new(),
        })
    }

    /// Forgets the client at `ip` once it holds neither a connection nor a call (a call may
    /// outlive its connection: an answer's body is dropped after it).
    fn forget_if_idle(&self, ip: IpAddr) {
        self.clients.remove_if(&ip, |_, c| {
            c.connections.load(Ordering::Relaxed) == 0 && c.streams.load(Ordering::Relaxed) == 0
        });
    }

    /// Bytes of messages being received now, over all clients.
    pub fn receiving_bytes(&self) -> usize {
        self.limits.receiving_bytes - self.receiving.available_permits()
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Counts a new connection. Past a connection limit the connection is still served, but
    /// only to refuse each of its calls naming the limit, and it closes after a second without
    /// a call; past twice the limit it is closed at once (`None`): the refusal costs a
    /// descriptor too.
    pub fn admit(self: &Arc<Admission>, stream: TcpStream) -> Option<Conn> {
        let remote = stream.peer_addr().ok();
        let ip = remote.map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip().to_canonical());
        let total = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        crate::metrics::metrics().connections_open.inc();
        let client = {
            let entry = self.clients.entry(ip).or_insert_with(|| {
                Arc::new(Client {
                    connections: AtomicUsize::new(0),
                    streams: AtomicUsize::new(0),
                    receiving: Arc::new(Semaphore::new(self.limits.receiving_bytes_per_client)),
                })
            });
            entry.connections.fetch_add(1, Ordering::Relaxed);
            entry.clone()
        };
        let slot = Slot {
            admission: self.clone(),
            ip,
            client: client.clone(),
        };
        let from_client = client.connections.load(Ordering::Relaxed);
        let limits = &self.limits;
        let over = if total > limits.max_connections {
            Some((
                total,
                limits.max_connections,
                format!(
                    "{total} connections open: beyond the limit --max-connections ({})",
                    limits.max_connections
                ),
            ))
        } else if from_client > limits.max_connections_per_client {
            Some((
                from_client,
                limits.max_connections_per_client,
                format!(
                    "{from_client} connections open from {ip}: beyond the limit \
                     --max-connections-per-client ({})",
                    limits.max_connections_per_client
                ),
            ))
        } else {
            None
        };
        let refusal = match over {
            Some((count, limit, _)) if count > 2 * limit => {
                crate::metrics::metrics().connections_closed.inc();
                return None;
            }
            Some((_, _, why)) => {
                crate::metrics::metrics().refused(tonic::Code::ResourceExhausted);
                Some(why)
            }
            None => None,
        };
        let idle = if refusal.is_some() {
            Duration::from_secs(1).min(limits.connection_idle)
        } else {
            limits.connection_idle
        };
        let state = Arc::new(ConnState {
            admission: self.clone(),
            client,
            ip,
            remote,
            refusal,
            calls: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            waker: AtomicWaker::new(),
        });
        Some(Conn {
            deadline: Box::pin(tokio::time::sleep(idle)),
            idle,
            io: Stream::Plain(stream),
            state,
            _slot: slot,
        })
    }
}

/// A connection's place in the counts, given back when the connection closes.
#[derive(Debug)]
struct Slot {
    admission: Arc<Admission>,
    ip: IpAddr,
    client: Arc<Client>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission.connections.fetch_sub(1, Ordering::Relaxed);
        crate::metrics::metrics().connections_open.dec();
        if self.client.connections.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.admission.forget_if_idle(self.ip);
        }
    }
}

/// What the calls of one connection share with it (as tonic's connection info, so every
/// request carries it).
#[derive(Debug)]
struct ConnState {
    admission: Arc<Admission>,
    client: Arc<Client>,
    /// The client's key in the counts.
    ip: IpAddr,
    remote: Option<SocketAddr>,
    /// Why every call of this connection is refused (a connection limit), if it is.
    refusal: Option<String>,
    calls: AtomicUsize,
    /// When the last call ended (or the connection opened).
    idle_since: Mutex<Instant>,
    /// The connection's reader, woken when its last call ends to start the idle clock.
    waker: AtomicWaker,
}

impl ConnState {
    fn call_started(&self) {
        self.calls.fetch_add(1, Ordering::AcqRel);
    }

    fn call_ended(&self) {
        if self.calls.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
            self.waker.wake();
        }
    }
}

/// The connection information every request of an admitted connection carries.
#[derive(Debug, Clone)]
pub struct ConnInfo(Arc<ConnState>);

impl ConnInfo {
    /// The client's address.
    pub fn remote(&self) -> Option<SocketAddr> {
        self.0.remote
    }
}

/// An admitted connection: a TCP stream that ends itself (a read error, so hyper closes it)
/// once it has had no call open for the idle limit. Keepalive pings do not count as use, so a
/// pooled connection nobody calls on is closed too; a connection that never says a word is.
#[derive(Debug)]
pub struct Conn {
    io: Stream,
    state: Arc<ConnState>,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    _slot: Slot,
}

impl Conn {
    /// The connection information its calls carry.
    pub fn info(&self) -> ConnInfo {
        ConnInfo(self.state.clone())
    }

    /// The TCP stream underneath.
    pub fn tcp(&self) -> &TcpStream {
        self.io.tcp()
    }

    /// The connection after its TLS handshake for `port` (see [`Tls::accept`]).
    pub async fn secure(self, tls: &Tls, port: Port) -> io::Result<Conn> {
        let Conn {
            io,
            state,
            idle,
            deadline,
            _slot,
        } = self;
        let io = match io {
            Stream::Plain(tcp) => tls.accept(port, tcp).await?,
            secured @ Stream::Tls(_) => secured,
        };
        Ok(Conn {
            io,
            state,
            idle,
            deadline,
            _slot,
        })
    }

    /// Whether the idle limit has passed; arms the clock (and registers the reader) otherwise.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.state.waker.register(cx.waker());
        if self.state.calls.load(Ordering::Acquire) > 0 {
            return false;
        }
        let since = *self
            .state
            .idle_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let deadline = since + self.idle;
        if self.deadline.deadline() != deadline {
            self.deadline.as_mut().reset(deadline);
        }
        self.deadline.as_mut().poll(cx).is_ready() && self.state.calls.load(Ordering::Acquire) == 0
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo(self.state.clone())
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Pending if this.idle_expired(cx) => {
                crate::metrics::metrics().connections_idle_closed.inc();
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no call for --connection-idle-timeout",
                )))
            }
            other => other,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
