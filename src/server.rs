//! Wiring: the durable store and recovery, the domain service behind the gRPC edge, health
//! checking, reflection (v1 and v1alpha), limits, retention, and shutdown with a deadline.
//! Tests pass a listener bound to `127.0.0.1:0` and a future that resolves to stop, so nothing
//! waits for a port.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::codec::CompressionEncoding;
use tonic::transport::Server;

use crate::admission::{Admission, AdmissionLimits, AdmitLayer};
use crate::auth::Auth;
use crate::persist::{MemoryStore, SqliteStore, Storage, StoreError};
use crate::privacy::{Privacy, ProjectNames};
use crate::rpc::proto::coverage_server::CoverageServer;
use crate::rpc::{CoverageRpc, proto};
use crate::service::{CoverageService, Limits};
use crate::tls::{Tls, TlsFiles};
use tonic::service::interceptor::InterceptedService;

/// Everything `covd serve` can be told.
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: Limits,
    /// Where runs are stored; `None` keeps everything in memory (lost on restart).
    pub data_dir: Option<PathBuf>,
    /// A run's raw data is dropped this long after the run was opened; its summary stays.
    /// `None` keeps runs until deleted.
    pub retention: Option<Duration>,
    /// History keeps every run's summary this long, then folds whole months into one
    /// record per project and branch. `None` never folds.
    pub history_full_for: Option<Duration>,
    /// A cap on the stored data (the data directory's database and delta logs, or with no
    /// data directory the deltas and merged files held in memory), in bytes; past it the store
    /// fails and refuses writes.
    pub max_db_bytes: Option<u64>,
    /// How long a shutdown waits for open calls before it stops anyway.
    pub shutdown_grace: Duration,
    /// The largest gRPC message accepted, in bytes. Larger ones are refused with
    /// RESOURCE_EXHAUSTED before they are decoded; clients split their deltas below it.
    pub max_message_bytes: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 flow-control window of one stream: how much of a shard's data the daemon
    /// buffers before it reads it. Every open ingest stream may hold this much while it waits
    /// its turn; hyper's 1 MiB default made memory grow with the number of shards. 64 KiB
    /// (with a connection per shard, 64 shards × 35,000 files: peak 170 → 161 MB) costs no
    /// throughput on loopback or a LAN.
    pub stream_window_bytes: u32,
    /// Where the HTTP port (Prometheus metrics at `/metrics`) listens; `None`: no HTTP port.
    pub http_listen: Option<std::net::SocketAddr>,
    /// How project names are kept at the least (a client may ask for stricter).
    pub project_names: ProjectNames,
    /// The key of project pseudonyms; `None`: `pseudonym.key` in the data directory (made at
    /// first start), or with no data directory a key of the process's own.
    pub pseudonym_key_file: Option<PathBuf>,
    /// The token store (`covd token`); `None`: `tokens.sqlite3` in the data directory, or with
    /// no data directory none (no tokens, so loopback only).
    pub tokens: Option<PathBuf>,
    /// Serve a non-loopback address without tokens (anybody there may do anything).
    pub insecure_no_auth: bool,
    /// What one client, and all of them, may hold: connections, streams, bytes being received,
    /// idle time. Its `max_message_bytes` is taken from the field above.
    pub admission: AdmissionLimits,
    /// TLS on both ports (certificate, key and optionally the CA of client certificates);
    /// `None`: plain text.
    pub tls: Option<TlsFiles>,
    /// How often an HTTP/2 ping checks that a connection's peer is still there (closed when
    /// no answer comes within 20 s); `None`: never.
    pub keepalive_interval: Option<Duration>,
    /// Cluster mode: runs are stored in these shared stores instead of `data_dir` (which then
    /// holds only the node's tokens and pseudonym key). Needs a build with the `cluster`
    /// feature.
    pub cluster: Option<ClusterSettings>,
}

/// Where a cluster node's shared stores are (see `docs/cluster.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// The catalogue: `postgres://user:password@host:port/database`.
    pub postgres: String,
    /// The segments: `s3://bucket/prefix`.
    pub object_store: String,
    /// Options of the object store client (`aws_endpoint`, `aws_allow_http`, …), after the
    /// usual `AWS_*` environment variables.
    pub object_store_options: Vec<(String, String)>,
}

/// What a started daemon tells the one that started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// The HTTP port's address, when it has one.
    pub http: Option<std::net::SocketAddr>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            limits: Limits::default(),
            data_dir: None,
            retention: Some(Duration::from_secs(30 * 24 * 3600)),
            history_full_for: Some(Duration::from_secs(90 * 24 * 3600)),
            max_db_bytes: None,
            shutdown_grace: Duration::from_secs(10),
            max_message_bytes: 16 * 1024 * 1024,
            max_concurrent_streams: 1024,
            stream_window_bytes: 64 * 1024,
            http_listen: None,
            project_names: ProjectNames::Plain,
            pseudonym_key_file: None,
            tokens: None,
            insecure_no_auth: false,
            admission: AdmissionLimits::default(),
            tls: None,
            keepalive_interval: Some(Duration::from_secs(60)),
            cluster: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("serving gRPC failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("building the reflection service failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("opening the store was interrupted: {0}")]
    Startup(String),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// Opens the store (when configured) and recovers every run; then serves until `shutdown`
/// resolves; then ends open ingest streams, waits up to the grace period for calls in flight,
/// and returns.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    run_with_ready(
        listener,
        settings,
        shutdown,
        tokio::sync::oneshot::channel().0,
    )
    .await
}

/// [`run`], telling `ready` once the store is recovered and calls are served.
pub async fn run_with_ready(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
    ready: tokio::sync::oneshot::Sender<Ready>,
) -> Result<(), ServerError> {
    let storage = open_storage(&settings).await?;
    run_on(listener, settings, storage, shutdown, ready).await
}

/// [`run_with_ready`] over storage the caller opened (`settings.data_dir` and
/// `max_db_bytes` are then not used): tests run one suite against every backend this way.
pub async fn run_on(
    listener: TcpListener,
    settings: Settings,
    storage: Arc<dyn Storage>,
    shutdown: impl Future<Output = ()> + Send,
    ready: tokio::sync::oneshot::Sender<Ready>,
) -> Result<(), ServerError> {
    let service = open_service(&settings, storage).await?;
    let privacy = Arc::new(privacy(&settings)?);
    tracing::info!("project names are kept {:?}", privacy.policy());
    let auth = Arc::new(auth(&settings, &listener)?);
    // A revoked token ends the streams it holds open within this long.
    tokio::spawn(Auth::keep_fresh(Arc::downgrade(&auth), TOKEN_RECHECK));
    let (stop, stopping) = watch::channel(false);
    let tls = settings.tls.clone().map(Tls::load).transpose()?;
    if let Some(tls) = &tls {
        tokio::spawn(crate::tls::reload_on_hangup(tls.clone(), stopping.clone()));
    }
    // One count of connections and calls for both ports: they share the process' descriptors.
    let admission = Admission::new(AdmissionLimits {
        max_message_bytes: settings.max_message_bytes,
        ..settings.admission.clone()
    });
    let (http, http_task) = match settings.http_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await.map_err(|e| {
                ServerError::Startup(format!("cannot listen on {addr} for HTTP: {e}"))
            })?;
            exposed(&listener, &auth, settings.insecure_no_auth, "--http-listen")?;
            let bound = listener.local_addr().ok();
            let task = tokio::spawn(crate::http::serve(
                listener,
                admission.clone(),
                tls.clone(),
                service.clone(),
                privacy.clone(),
                auth.clone(),
                stopping.clone(),
            ));
            (bound, Some(AbortOnDrop(task)))
        }
        None => (None, None),
    };
    let coverage = CoverageServer::new(CoverageRpc::new(
        service.clone(),
        stopping.clone(),
        privacy.clone(),
        auth.clone(),
    ))
    .max_decoding_message_size(settings.max_message_bytes)
    .max_encoding_message_size(settings.max_message_bytes)
    // Clients may compress what they send. Answers go uncompressed: on the loopback and
    // LAN links covd serves, gzip cost more time than it saved (it was 5% of the daemon's
    // CPU in the ingest benchmark, and delayed the merged export).
    .accept_compressed(CompressionEncoding::Gzip);

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CoverageServer<CoverageRpc>>()
        .await;
    tokio::spawn(report_store_failure(
        service.clone(),
        health_reporter.clone(),
        stopping.clone(),
    ));
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    if let Some(retention) = settings.retention {
        tokio::spawn(expire_periodically(
            service.clone(),
            retention,
            stopping.clone(),
        ));
    }
    if let Some(full_for) = settings.history_full_for {
        // Before serving, so that history reads the same from the first call.
        down_sample(&service, full_for).await;
        tokio::spawn(down_sample_periodically(
            service.clone(),
            full_for,
            stopping.clone(),
        ));
    }

    // Before serving too: a retry must not find deltas kept past a window that was shortened.
    close_reopen_windows(&service).await;
    tokio::spawn(close_reopen_windows_periodically(
        service.clone(),
        stopping.clone(),
    ));

    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections; ending open streams");
        let _ = stop.send(true);
    };
    let serve = Server::builder()
        .max_concurrent_streams(settings.max_concurrent_streams)
        .initial_stream_window_size(settings.stream_window_bytes)
        .http2_keepalive_interval(settings.keepalive_interval)
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(AdmitLayer)
        .add_service(health)
        .add_service(InterceptedService::new(
            reflection_v1,
            crate::rpc::reading(auth.clone(), privacy.clone()),
        ))
        .add_service(InterceptedService::new(
            reflection_v1alpha,
            crate::rpc::reading(auth.clone(), privacy.clone()),
        ))
        .add_service(coverage)
        .serve_with_incoming_shutdown(
            crate::admission::incoming(
                listener,
                admission,
                tls.clone().map(|t| (t, crate::tls::Port::Grpc)),
                stopping.clone(),
            ),
            signal,
        );
    let _ = ready.send(Ready { http });
    let mut stopping = stopping;
    let grace = settings.shutdown_grace;
    let deadline = async {
        let _ = stopping.wait_for(|s| *s).await;
        tokio::time::sleep(grace).await;
    };
    tokio::pin!(deadline);
    tokio::select! {
        served = serve => served?,
        () = &mut deadline => {
            tracing::warn!("calls still open after {grace:?}; stopping anyway");
            return Ok(());
        }
    }
    // The HTTP port stops with the gRPC one: a request still open there (a client that never
    // finishes its headers) must not keep the service, and so the store, alive.
    drop(http_task);
    // Let background work (stream tasks winding down, a compaction) drop its handles, so the
    // store closes (WAL checkpointed, lock released) before this returns.
    tokio::select! {
        () = async {
            while service.handles() > 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        } => {}
        () = &mut deadline => tracing::warn!("background work still running after {grace:?}"),
    }
    Ok(())
}

/// A task aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Raises the process's soft limit of open files to its hard limit: every connection and
/// open delta log takes one, and the usual soft limit (1024) is far below what a daemon
/// serving many CI shards needs. Returns (before, after).
pub fn raise_descriptor_limit() -> Option<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft >= hard {
        return Some((soft, soft));
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).ok()?;
    Some((soft, hard))
}

/// How often the daemon reads its token store when no call makes it (see
/// [`Auth::keep_fresh`]).
const TOKEN_RECHECK: Duration = Duration::from_secs(1);

/// The tokens the daemon accepts (see [`crate::auth`]); refuses to serve `listener` beyond
/// loopback without them, unless told to.
fn auth(settings: &Settings, listener: &TcpListener) -> Result<Auth, ServerError> {
    let path = settings.tokens.clone().or_else(|| {
        settings
            .data_dir
            .as_ref()
            .map(|d| d.join(crate::auth::TOKENS_FILE))
    });
    let auth = match &path {
        Some(path) => Auth::open(path).map_err(|e| ServerError::Startup(e.to_string()))?,
        None => Auth::none(),
    };
    exposed(listener, &auth, settings.insecure_no_auth, "--listen")?;
    if auth.required() {
        tracing::info!("every call but health needs a token");
    } else if settings.insecure_no_auth {
        tracing::warn!(
            "no tokens and --insecure-no-auth: anybody who reaches the daemon may read, write \
             and delete every run"
        );
    } else {
        tracing::info!(
            "no tokens (`covd token create` makes one): serving loopback only, where every \
             client may do anything"
        );
    }
    Ok(auth)
}

/// Refuses a listener beyond loopback while the daemon has no tokens, unless
/// `--insecure-no-auth`.
fn exposed(
    listener: &TcpListener,
    auth: &Auth,
    insecure: bool,
    flag: &str,
) -> Result<(), ServerError> {
    let addr = listener
        .local_addr()
        .map_err(|e| ServerError::Startup(format!("the listener's address: {e}")))?;
    if addr.ip().is_loopback() || auth.required() || insecure {
        return Ok(());
    }
    Err(ServerError::Startup(format!(
        "{flag} {addr} is beyond loopback and the daemon has no tokens, so anybody there could \
         read, write and delete every run: create one (`covd token create --data-dir DIR \
         --project P --scope admin`), or pass --insecure-no-auth"
    )))
}

/// The storage `settings` name: the cluster's shared stores, the data directory's SQLite
/// store, or memory.
async fn open_storage(settings: &Settings) -> Result<Arc<dyn Storage>, ServerError> {
    let decoder = crate::rpc::convert::wire_delta_files;
    if let Some(cluster) = &settings.cluster {
        return open_cluster(cluster, decoder).await;
    }
    let max_bytes = settings.max_db_bytes;
    Ok(match settings.data_dir.clone() {
        // Opening checks the database: blocking work.
        Some(dir) => tokio::task::spawn_blocking(move || {
            SqliteStore::open_with(&dir, max_bytes).map(|s| s.with_wire_decoder(decoder))
        })
        .await
        .map_err(|e| ServerError::Startup(e.to_string()))?
        .map(|s| Arc::new(s) as Arc<dyn Storage>)?,
        None => Arc::new(MemoryStore::new(max_bytes).with_wire_decoder(decoder)),
    })
}

#[cfg(feature = "cluster")]
async fn open_cluster(
    c: &ClusterSettings,
    decoder: crate::persist::WireDecoder,
) -> Result<Arc<dyn Storage>, ServerError> {
    let options = c
        .object_store_options
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()));
    let segments = crate::cluster::Segments::connect(&c.object_store, options)
        .map_err(|e| ServerError::Startup(e.to_string()))?;
    let name = crate::cluster::node_name();
    let store = crate::cluster::ClusterStore::connect(&name, &c.postgres, segments)
        .await
        .map_err(|e| ServerError::Startup(format!("joining the cluster: {e}")))?;
    tracing::info!(node = %name, "a node of the cluster over {}", c.object_store);
    Ok(Arc::new(store.with_wire_decoder(decoder)))
}

#[cfg(not(feature = "cluster"))]
async fn open_cluster(
    _: &ClusterSettings,
    _: crate::persist::WireDecoder,
) -> Result<Arc<dyn Storage>, ServerError> {
    Err(ServerError::Startup(
        "this covd was built without cluster mode: build it with `cargo build --release \
         --features cluster`"
            .into(),
    ))
}

async fn open_service(
    settings: &Settings,
    storage: Arc<dyn Storage>,
) -> Result<CoverageService, ServerError> {
    let limits = settings.limits.clone();
    // Stored deltas are read back (after a restart, or when an attempt is replaced) with the
    // model's own bound: a larger limit would acknowledge lines that a restart cannot read.
    if limits.max_line > crate::model::MAX_LINE {
        return Err(ServerError::Startup(format!(
            "max_line {} is beyond {}, the largest line covd stores",
            limits.max_line,
            crate::model::MAX_LINE
        )));
    }
    let started = Instant::now();
    // Recovery reads and merges everything stored: blocking work.
    let (service, recovery) =
        tokio::task::spawn_blocking(move || CoverageService::open(limits, storage))
            .await
            .map_err(|e| ServerError::Startup(e.to_string()))??;
    tracing::info!(
        runs = recovery.runs,
        complete = recovery.complete_runs,
        files = recovery.files,
        "recovered in {:?}",
        started.elapsed()
    );
    Ok(service)
}

/// How often the health check looks at the store's failure latch.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

/// Turns the health check to NOT_SERVING (both covd.v1.Coverage and the server as a whole)
/// once the store refuses writes, and logs why: a load balancer then stops sending shards to a
/// daemon that can acknowledge nothing, while reads still work.
async fn report_store_failure(
    service: CoverageService,
    health: tonic_health::server::HealthReporter,
    mut stopping: watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(HEALTH_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        if let Some(why) = service.store_failure() {
            tracing::error!("health: NOT_SERVING, the store refuses writes: {why}");
            health
                .set_not_serving::<CoverageServer<CoverageRpc>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            return;
        }
    }
}

/// The policy for project names, with its key.
fn privacy(settings: &Settings) -> Result<Privacy, ServerError> {
    let key = match (&settings.pseudonym_key_file, &settings.data_dir) {
        (Some(file), _) => crate::privacy::load_key(file, false),
        (None, Some(dir)) => crate::privacy::load_key(&dir.join("pseudonym.key"), true),
        (None, None) => {
            return Ok(Privacy::new(
                settings.project_names,
                crate::privacy::random_key(),
            ));
        }
    }
    .map_err(ServerError::Startup)?;
    Ok(Privacy::new(settings.project_names, key))
}

/// Drops expired runs now and then, until shutdown.
async fn expire_periodically(
    service: CoverageService,
    retention: Duration,
    mut stopping: watch::Receiver<bool>,
) {
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    loop {
        if let Some(cutoff) = SystemTime::now().checked_sub(retention) {
            match service.expire_runs(cutoff).await {
                Ok(0) => {}
                Ok(n) => tracing::info!("{n} runs expired; their summaries are kept"),
                Err(e) => tracing::warn!("expiring runs failed: {e}"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}

/// Folds history older than `full_for` into months every hour, until shutdown.
async fn down_sample_periodically(
    service: CoverageService,
    full_for: Duration,
    mut stopping: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        down_sample(&service, full_for).await;
    }
}

/// Drops the deltas complete runs kept for retries once their reopen window passed, every
/// tenth of the window (at least every second, at most every ten minutes), until shutdown.
async fn close_reopen_windows_periodically(
    service: CoverageService,
    mut stopping: watch::Receiver<bool>,
) {
    let every = service
        .limits()
        .reopen_window
        .map_or(Duration::from_secs(600), |w| {
            (w / 10).clamp(Duration::from_secs(1), Duration::from_secs(600))
        });
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        close_reopen_windows(&service).await;
    }
}

async fn close_reopen_windows(service: &CoverageService) {
    match service.close_reopen_windows(SystemTime::now()).await {
        Ok(0) => {}
        Ok(n) => tracing::info!("{n} complete runs dropped the deltas kept for retries"),
        Err(e) => tracing::warn!("dropping the deltas kept for retries failed: {e}"),
    }
}

async fn down_sample(service: &CoverageService, full_for: Duration) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let before = crate::history::fold_before(now, full_for);
    let age = u64::try_from(full_for.as_millis()).unwrap_or(u64::MAX);
    if let Err(e) = service.down_sample(before, now.saturating_sub(age)).await {
        tracing::warn!("down-sampling history failed: {e}");
    }
}
