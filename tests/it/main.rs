//! Integration tests: a real daemon on 127.0.0.1:0, real clients, real coverage files.

mod attribution;
mod bad_input;
mod bad_streams;
mod cli;
mod cobertura_dtd;
mod consumers;
mod corpus;
mod cross_format;
mod differential;
mod durability;
mod export;
mod fsync;
mod gcc;
mod hostile_files;
mod impact;
mod ingest;
mod line_sets;
mod merge_laws;
mod old_daemon;
mod patch;
mod phpunit;
mod power_cut;
mod query_laws;
mod storage;
mod stored_data;
mod support;
