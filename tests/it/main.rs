//! Integration tests: a real daemon on 127.0.0.1:0, real clients, real coverage files.

mod admission;
mod attribution;
mod auth;
mod bad_input;
mod bad_streams;
mod ci;
mod cli;
#[cfg(feature = "cluster")]
mod cluster;
mod cobertura_dtd;
mod consumers;
mod corpus;
mod cross_format;
mod dashboard;
mod differential;
mod durability;
mod export;
mod flaky;
mod fsync;
mod gcc;
mod history;
mod hostile_files;
mod impact;
mod ingest;
mod junit;
mod line_sets;
mod merge_laws;
mod metrics;
mod old_daemon;
mod patch;
mod phpunit;
mod power_cut;
mod privacy;
mod query_laws;
mod routing;
// Its PostgreSQL and S3 servers serve the cluster tests only.
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
mod services;
mod sources;
mod spool;
mod storage;
mod stored_data;
mod support;
mod tls;
