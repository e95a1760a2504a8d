//! Wiring: the domain service behind the gRPC edge, health checking, reflection (v1 and
//! v1alpha), limits, and shutdown. Tests pass a listener bound to `127.0.0.1:0` and a future
//! that resolves to stop, so nothing waits for a port.

use std::future::Future;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codec::CompressionEncoding;
use tonic::transport::Server;

use crate::rpc::proto::coverage_server::CoverageServer;
use crate::rpc::{CoverageRpc, proto};
use crate::service::{CoverageService, Limits};

/// Everything `covd serve` can be told.
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: Limits,
    /// The largest gRPC message accepted, in bytes. Larger ones are refused with
    /// RESOURCE_EXHAUSTED before they are decoded; clients split their deltas below it.
    pub max_message_bytes: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            limits: Limits::default(),
            max_message_bytes: 16 * 1024 * 1024,
            max_concurrent_streams: 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("serving gRPC failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("building the reflection service failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Serves until `shutdown` resolves, then lets open calls end and returns.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let service = CoverageService::new(settings.limits.clone());
    let coverage = CoverageServer::new(CoverageRpc::new(service))
        .max_decoding_message_size(settings.max_message_bytes)
        .max_encoding_message_size(settings.max_message_bytes)
        // Clients may compress what they send. Answers go uncompressed: on the loopback and LAN
        // links covd serves, gzip cost more time than it saved (it was 5% of the daemon's CPU
        // in the ingest benchmark, and delayed the merged export).
        .accept_compressed(CompressionEncoding::Gzip);

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CoverageServer<CoverageRpc>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    Server::builder()
        .max_concurrent_streams(settings.max_concurrent_streams)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(coverage)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
