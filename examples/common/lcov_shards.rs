//! The benchmarks' LCOV shards: counting their records, the yardstick of the machine's speed
//! read from them, and feeding one to a push as the client's deltas.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use covd::client::{Batcher, PushInput};
use covd::formats::lcov;
use covd::model::Coverage;
use tokio::sync::mpsc;

/// The LCOV shards (`*.info`) in `dir`, in order.
pub(crate) fn list(dir: &Path) -> Vec<PathBuf> {
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("data directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "info"))
        .collect();
    shards.sort();
    shards
}

/// The file records (`SF:` lines) of an LCOV file.
pub(crate) fn count_records(path: &Path) -> u64 {
    BufReader::new(File::open(path).unwrap())
        .split(b'\n')
        .filter(|l| l.as_ref().is_ok_and(|l| l.starts_with(b"SF:")))
        .count() as u64
}

/// Shards the yardstick reads: enough to merge, few enough to take seconds.
pub(crate) const YARDSTICK_SHARDS: usize = 2;

/// The machine's speed in this run, in seconds of one thread per file record: shards read and
/// merged with covd's own LCOV reader and merge (issue 5's "plain single-threaded
/// parse-and-union"). This machine's speed varies by ±20% from day to day; the daemon's CPU as
/// a ratio to the yardstick is meant to compare across runs and days where its seconds do not.
pub(crate) fn parse_and_union(shards: &[PathBuf]) -> f64 {
    let start = Instant::now();
    let mut union = Coverage::default();
    let mut records = 0;
    for path in shards {
        let mut r = lcov::Reader::new(BufReader::with_capacity(1 << 20, File::open(path).unwrap()));
        while let Some(rec) = r.next_record().unwrap() {
            union.add(&rec.path, &rec.file);
            records += 1;
        }
    }
    let took = start.elapsed().as_secs_f64();
    assert!(!union.files.is_empty(), "the shards hold coverage");
    took / records as f64
}

/// Reads the LCOV shard at `path` and sends it to `tx` as a push's deltas, then its end, as
/// `covd push` does. Blocking.
pub(crate) fn feed(path: &Path, tx: mpsc::Sender<PushInput>) {
    let mut r = lcov::Reader::new(BufReader::with_capacity(1 << 20, File::open(path).unwrap()));
    let mut batcher = Batcher::default();
    let mut pending = Coverage::default();
    while let Some(rec) = r.next_record().unwrap() {
        pending.add(&rec.path, &rec.file);
    }
    for (p, f) in pending.files {
        if let Some(d) = batcher.push(p, f) {
            tx.blocking_send(PushInput::Delta(d)).unwrap();
        }
    }
    if let Some(d) = batcher.finish() {
        tx.blocking_send(PushInput::Delta(d)).unwrap();
    }
    tx.blocking_send(PushInput::Done(None)).unwrap();
}
