//! The daemon's Prometheus metrics, served at `/metrics` on the HTTP port (see `http`).
//!
//! One set per process: the counters are bumped where the work happens (the ingest stream, the
//! store's commit, the gRPC edge's refusals), and the gauges that describe state (runs open,
//! memory) are read from the service when a scrape asks. Labels take only bounded values (a
//! status code, a limit's flag): never a run id, a commit, a path or a test name.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::service::CoverageService;

/// The labels of a refusal: the gRPC status code's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Refusal {
    pub code: String,
}

/// The process's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub streams_open: Gauge,
    pub deltas: Counter,
    pub delta_bytes: Counter,
    pub commit_seconds: Histogram,
    pub refusals: Family<Refusal, Counter>,
    pub connections_open: Gauge,
    pub connections_closed: Counter,
    pub connections_idle_closed: Counter,
    pub receiving_bytes: Gauge,
    runs_evicted: Counter,
    /// What `runs_evicted` has been brought up to.
    evictions_shown: AtomicU64,
    runs: Gauge,
    runs_open: Gauge,
    resident_bytes: Gauge,
    aggregate_bytes: Gauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("covd");
        let m = Metrics {
            streams_open: Gauge::default(),
            deltas: Counter::default(),
            delta_bytes: Counter::default(),
            // 0.25 ms to about 8 s: a group commit is an fsync pair.
            commit_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
            refusals: Family::default(),
            connections_open: Gauge::default(),
            connections_closed: Counter::default(),
            connections_idle_closed: Counter::default(),
            receiving_bytes: Gauge::default(),
            runs_evicted: Counter::default(),
            evictions_shown: AtomicU64::new(0),
            runs: Gauge::default(),
            runs_open: Gauge::default(),
            resident_bytes: Gauge::default(),
            aggregate_bytes: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "streams_open",
            "Ingest streams (shard pushes) open now",
            m.streams_open.clone(),
        );
        registry.register(
            "deltas",
            "Deltas acknowledged (durable, merged); a re-sent duplicate is not counted",
            m.deltas.clone(),
        );
        registry.register(
            "delta_bytes",
            "Bytes of the deltas acknowledged, as they came over the wire",
            m.delta_bytes.clone(),
        );
        registry.register(
            "commit_seconds",
            "Time from a delta's turn (its slot among the deltas in flight) to its \
             acknowledgement: decode, merge and the store's group commit",
            m.commit_seconds.clone(),
        );
        registry.register(
            "refusals",
            "Requests and messages answered with an error status, by gRPC status code",
            m.refusals.clone(),
        );
        registry.register(
            "connections_open",
            "gRPC connections open now",
            m.connections_open.clone(),
        );
        registry.register(
            "connections_closed",
            "gRPC connections closed as they came: past twice --max-connections or \
             --max-connections-per-client",
            m.connections_closed.clone(),
        );
        registry.register(
            "connections_idle_closed",
            "gRPC connections closed after --connection-idle-timeout with no call",
            m.connections_idle_closed.clone(),
        );
        registry.register(
            "receiving_bytes",
            "Bytes of messages being received, as the receive budget counts them \
             (--max-receiving-bytes)",
            m.receiving_bytes.clone(),
        );
        registry.register(
            "runs_evicted",
            "Settled runs that gave up their raw data early (their summary stays) for a new \
             run at --max-runs",
            m.runs_evicted.clone(),
        );
        registry.register("runs", "Runs the daemon holds", m.runs.clone());
        registry.register(
            "runs_open",
            "Runs not complete yet (shards missing or streaming)",
            m.runs_open.clone(),
        );
        registry.register(
            "resident_bytes",
            "The process's resident memory",
            m.resident_bytes.clone(),
        );
        registry.register(
            "aggregate_bytes",
            "Estimated bytes of the complete runs' coverage held in memory (the memory budget \
             counts these)",
            m.aggregate_bytes.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts an ingest stream open until the guard is dropped.
    pub fn stream_opened(&'static self) -> StreamOpen {
        self.streams_open.inc();
        StreamOpen(self)
    }

    /// Counts a refusal with the gRPC code `code`.
    pub fn refused(&self, code: tonic::Code) {
        let code = format!("{code:?}");
        self.refusals.get_or_create(&Refusal { code }).inc();
    }

    /// Records a delta's commit latency.
    pub fn committed(&self, took: Duration) {
        self.commit_seconds.observe(took.as_secs_f64());
    }

    /// The metrics in the OpenMetrics text format, the gauges of `service` read now.
    pub fn render(&self, service: &CoverageService) -> String {
        let (runs, open) = service.run_counts();
        self.runs.set(runs as i64);
        self.runs_open.set(open as i64);
        // The service counts; the counter catches up (one service per process), by what no
        // other scrape has added yet.
        let evicted = service.runs_evicted();
        let shown = self.evictions_shown.fetch_max(evicted, Ordering::Relaxed);
        if evicted > shown {
            self.runs_evicted.inc_by(evicted - shown);
        }
        self.resident_bytes
            .set(resident_bytes().unwrap_or(0) as i64);
        self.aggregate_bytes
            .set(service.cached_bytes().0.min(i64::MAX as usize) as i64);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// An ingest stream counted open (see [`Metrics::stream_opened`]).
#[derive(Debug)]
pub struct StreamOpen(&'static Metrics);

impl Drop for StreamOpen {
    fn drop(&mut self) {
        self.0.streams_open.dec();
    }
}

/// The process's resident set, from `/proc/self/status` (Linux); `None` elsewhere.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
