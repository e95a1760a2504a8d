//! covd merges code coverage from many parallel CI shards while they run, and serves the merged
//! result the moment the last shard finishes.
//!
//! Shards stream coverage deltas over gRPC (`covd.v1`); the daemon merges them incrementally
//! into roaring bitmaps per file; `covd fetch --wait` writes the merged LCOV; tools query one
//! file or one directory at any time. See `PRODUCT.md` in the design folder for the concepts
//! (runs, shards, attempts, deltas) and the merge semantics.
//!
//! # Layout
//!
//! Dependencies point one way: `server`/`client` → `rpc` → `service` → `aggregate`/`persist` →
//! `model`, and `formats` → `model`; `service` also reads diffs with `diff`.
//!
//! - [`model`]: pure domain types and the merge (no I/O, no async).
//! - [`formats`]: coverage file formats: streaming readers (LCOV, coverage.py JSON, Cobertura,
//!   Istanbul, gcovr, Go, llvm-cov, JaCoCo, Clover, JUnit) and writers (LCOV, Cobertura, JSON, Markdown, HTML).
//! - [`diff`]: unified diffs (`git diff`) as changed lines per file, for test impact.
//! - [`flaky`]: flaky and broken tests, from a run's attempts and each test's bounded history.
//! - [`history`]: trends of runs per project and branch over days, weeks and months, and the
//!   down-sampling of old runs into months.
//! - [`aggregate`]: the in-memory aggregate of a run (dashmap + roaring) and path interning.
//! - [`persist`]: durable storage behind one trait ([`persist::Storage`]): the embedded SQLite
//!   store with a delta log file per run (group commit, versioned records, recovery reads), and
//!   the in-memory store of `--in-memory`.
//! - [`service`]: the domain service: runs, shard ingest with attempts and resume, export,
//!   queries. No gRPC types.
//! - [`rpc`]: the gRPC edge: generated code, the one-pass reader of incoming deltas
//!   (`rpc/delta.rs`), the message codec, conversions with validation, error → status.
//! - [`privacy`]: project names kept plain, as keyed pseudonyms, or not at all.
//! - [`auth`]: access tokens (their store, scopes, projects) and who a call comes from.
//! - `dashboard`: the web dashboard on the HTTP port (its JSON API and compiled-in assets).
//! - [`admission`]: what clients may hold: connections, concurrent streams, the bytes of
//!   messages being received (budgeted before a body is read), idle and read time limits.
//! - [`tls`]: TLS on the daemon's ports (rustls), reloaded on SIGHUP.
//! - [`server`]: wiring, limits, health and reflection, shutdown.
//! - [`client`]: the typed client the CLI and tests use.
//!
//! The `covd` binary (`src/main.rs`, `src/cli/`) is a thin command line over these.

pub mod admission;
pub mod aggregate;
pub mod auth;
pub mod ci;
pub mod client;
#[cfg(feature = "cluster")]
pub mod cluster;
mod dashboard;
pub mod diff;
pub mod flaky;
pub mod formats;
pub mod history;
mod http;
pub mod metrics;
pub mod model;
pub mod persist;
pub mod privacy;
pub mod rpc;
pub mod server;
pub mod service;
pub mod spool;
pub mod tls;

pub use client::Client;
pub use model::{Coverage, FileCoverage};
pub use server::Settings;
pub use service::CoverageService;
