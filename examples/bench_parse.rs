//! Parse throughput of covd's readers, next to grcov on the same files.
//!
//! ```text
//! cargo run --release --example bench_parse -- --shards 16 --files 5000
//! cargo run --release --example bench_parse -- --data DIR      # shard_*.info already made
//! ```
//!
//! Reads every LCOV shard with covd's LCOV reader (one thread, records summed per file as a
//! push does), then the same data written as Cobertura XML with covd's Cobertura reader, and
//! prints MB/s for each; then, when grcov is installed (or `GRCOV=path`), grcov's wall time to
//! merge the same LCOV files into one, with the ratio.

#[path = "common/bench_data.rs"]
mod bench_data;

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use covd::formats::{self, Format, cobertura};
use covd::model::Coverage;

fn main() {
    let mut shards = 16;
    let mut files = 5000;
    let mut data: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--shards" => {
                shards = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--shards N")
            }
            "--files" => files = args.next().and_then(|v| v.parse().ok()).expect("--files N"),
            "--data" => data = args.next().map(PathBuf::from),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let dir = data.unwrap_or_else(|| bench_data::generate(shards, files));
    let mut lcov: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("data directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "info"))
        .collect();
    lcov.sort();
    let bytes = |paths: &[PathBuf]| {
        paths
            .iter()
            .map(|p| p.metadata().unwrap().len())
            .sum::<u64>()
    };

    let (lcov_secs, lcov_records) = parse_all(Format::Lcov, &lcov);
    let lcov_mb = bytes(&lcov) as f64 / 1e6;

    // The same shards as Cobertura, written by covd (not timed).
    let xml_dir = std::env::temp_dir().join(format!("covd-bench-parse-{}", std::process::id()));
    std::fs::create_dir_all(&xml_dir).unwrap();
    let xml: Vec<PathBuf> = lcov
        .iter()
        .map(|p| {
            let coverage = read(Format::Lcov, p);
            let out = xml_dir.join(p.with_extension("xml").file_name().unwrap());
            let packages = cobertura::package_totals(
                coverage.files.iter().map(|(p, f)| (p.as_str(), f.totals())),
            );
            let mut w = cobertura::Writer::begin(
                BufWriter::new(File::create(&out).unwrap()),
                coverage.totals(),
                packages,
                0,
            )
            .unwrap();
            for (path, f) in &coverage.files {
                w.file(path, f).unwrap();
            }
            w.finish().unwrap();
            out
        })
        .collect();
    let (xml_secs, xml_records) = parse_all(Format::Cobertura, &xml);
    let xml_mb = bytes(&xml) as f64 / 1e6;
    let _ = std::fs::remove_dir_all(&xml_dir);

    println!("data: {} shards from {}", lcov.len(), dir.display());
    println!(
        "covd LCOV reader:      {lcov_mb:>8.1} MB, {lcov_records} records in {lcov_secs:.3} s = {:.0} MB/s",
        lcov_mb / lcov_secs
    );
    println!(
        "covd Cobertura reader: {xml_mb:>8.1} MB, {xml_records} records in {xml_secs:.3} s = {:.0} MB/s",
        xml_mb / xml_secs
    );
    match grcov(&lcov) {
        Some(secs) => println!(
            "grcov (merge the same LCOV files into one): {secs:.3} s = {:.0} MB/s; covd's LCOV parse is {:.1}× grcov's whole merge",
            lcov_mb / secs,
            secs / lcov_secs
        ),
        None => println!("grcov: not installed (cargo install grcov; or GRCOV=path)"),
    }
}

fn read(format: Format, path: &Path) -> Coverage {
    let mut c = Coverage::default();
    formats::read(
        format,
        BufReader::with_capacity(1 << 20, File::open(path).unwrap()),
        |r| {
            c.add(&r.path, &r.file);
            true
        },
    )
    .unwrap();
    c
}

/// Parses every file in one thread, as one push would; returns seconds and records.
fn parse_all(format: Format, paths: &[PathBuf]) -> (f64, u64) {
    let start = Instant::now();
    let mut records = 0u64;
    for p in paths {
        let mut c = Coverage::default();
        formats::read(
            format,
            BufReader::with_capacity(1 << 20, File::open(p).unwrap()),
            |r| {
                records += 1;
                c.add(&r.path, &r.file);
                true
            },
        )
        .unwrap();
        std::hint::black_box(&c);
    }
    (start.elapsed().as_secs_f64(), records)
}

fn grcov(paths: &[PathBuf]) -> Option<f64> {
    let grcov = std::env::var("GRCOV").unwrap_or_else(|_| "grcov".into());
    Command::new(&grcov).arg("--version").output().ok()?;
    let out = std::env::temp_dir().join(format!("grcov-parse-{}.info", std::process::id()));
    let start = Instant::now();
    let status = Command::new(&grcov)
        .args(paths)
        .args(["-t", "lcov", "-o"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    let secs = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&out);
    status.success().then_some(secs)
}
