//! Accepting connections: with Nagle's algorithm off, counted ([`Admission::admit`]), through
//! their TLS handshake when the port has TLS, and without spinning when the process is out of
//! file descriptors.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::{Admission, Conn};
use crate::tls::{Port, Tls};

/// A port's connections, admitted, and secured when `tls` is set. Handshakes run each in
/// a task of their own: a client that never completes one holds up nobody else. Accepting ends
/// when `stopping` turns true: the listener closes, so a client that comes while the daemon
/// finishes its calls is refused at once rather than left waiting in a queue nobody reads.
pub fn incoming(
    listener: TcpListener,
    admission: Arc<Admission>,
    tls: Option<(Arc<Tls>, Port)>,
    mut stopping: watch::Receiver<bool>,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut accepting = Accepting::new(listener);
        loop {
            let stream = tokio::select! {
                s = accepting.next() => s,
                // The server stopped.
                () = tx.closed() => return,
                _ = stopping.wait_for(|s| *s) => return,
            };
            // Past twice a connection limit, closed as it came.
            let Some(conn) = admission.admit(stream) else {
                continue;
            };
            match &tls {
                None => {
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Some((tls, port)) => {
                    let (tls, port, tx) = (tls.clone(), *port, tx.clone());
                    tokio::spawn(async move {
                        match conn.secure(&tls, port).await {
                            Ok(conn) => {
                                let _ = tx.send(Ok(conn)).await;
                            }
                            Err(e) => tracing::debug!("a TLS handshake failed: {e}"),
                        }
                    });
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// A listener's connections, with Nagle's algorithm off. tonic sets `TCP_NODELAY` only on
/// connections it accepts itself; without it, an answer written in more than one segment
/// waited for the client's delayed ACK: 40 ms for every GetFile of a few hundred lines.
///
/// When the process is out of file descriptors, `accept` fails at once, as often as it is
/// called, while the connection waits in the queue: retried at once, that loop took 90% of a
/// core and starved the daemon. Here a spare descriptor is held for that moment: it is let go
/// to accept the waiting connections and close them at once (their clients see the close, not
/// a hang), then taken again, and `accept` is retried after a pause that doubles up to 100 ms.
#[derive(Debug)]
pub struct Accepting {
    listener: TcpListener,
    spare: Option<std::fs::File>,
    pause: Duration,
}

impl Accepting {
    pub fn new(listener: TcpListener) -> Accepting {
        Accepting {
            listener,
            spare: spare(),
            pause: Duration::ZERO,
        }
    }

    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection.
    pub async fn next(&mut self) -> TcpStream {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    self.pause = Duration::ZERO;
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::warn!("cannot turn Nagle's algorithm off on a connection: {e}");
                    }
                    return stream;
                }
                Err(e) if out_of_descriptors(&e) => {
                    if self.pause.is_zero() {
                        tracing::warn!(
                            "out of file descriptors ({e}): new connections are closed until \
                             some end"
                        );
                    }
                    if self.spare.take().is_some() {
                        // Our spare back to the system for the descriptor each waiting
                        // connection takes, one after the other, while the queue has any:
                        // their clients see a close rather than wait.
                        use futures_util::FutureExt as _;
                        for _ in 0..4096 {
                            match self.listener.accept().now_or_never() {
                                Some(Ok((refused, _))) => drop(refused),
                                _ => break,
                            }
                        }
                    }
                    self.spare = spare();
                    self.pause = (self.pause * 2)
                        .clamp(Duration::from_millis(10), Duration::from_millis(100));
                    tokio::time::sleep(self.pause).await;
                }
                // A connection that went before it was accepted, and the like: the next one.
                Err(_) => {}
            }
        }
    }
}

fn spare() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// Whether `accept` failed for want of descriptors or buffers (nothing to do but wait).
fn out_of_descriptors(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;
    use crate::admission::AdmissionLimits;

    /// Every accepted connection has Nagle's algorithm off, and is counted while it is open.
    #[tokio::test]
    async fn accepted_connections_do_not_delay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admission = Admission::new(AdmissionLimits::default());
        let (_stop, stopping) = watch::channel(false);
        let mut accepted = incoming(listener, admission.clone(), None, stopping);
        let _client = TcpStream::connect(addr).await.unwrap();
        let conn = accepted.next().await.unwrap().unwrap();
        assert!(conn.tcp().nodelay().unwrap());
        assert_eq!(admission.connections(), 1);
        drop(conn);
        assert_eq!(admission.connections(), 0);
    }

    /// Once the daemon stops, no connection waits in a queue nobody reads: the listener is
    /// closed, so a client is refused at once.
    #[tokio::test]
    async fn accepting_ends_when_the_daemon_stops() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admission = Admission::new(AdmissionLimits::default());
        let (stop, stopping) = watch::channel(false);
        let mut accepted = incoming(listener, admission, None, stopping);
        let _before = TcpStream::connect(addr).await.unwrap();
        assert!(accepted.next().await.unwrap().is_ok());
        stop.send(true).unwrap();
        assert!(accepted.next().await.is_none());
        let refused = TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(
            refused.kind(),
            io::ErrorKind::ConnectionRefused,
            "{refused}"
        );
    }
}
