//! Micro-benchmarks of the ingest hot paths: LCOV parsing; reading a delta as the daemon
//! receives it (the wire bytes to validated files); applying it (merging into an aggregate that
//! knows the files, and the union into an empty one); LCOV and Cobertura export; encoding
//! files for the wire. Data: a synthetic tracefile of 1,000 files × 100 executable lines with
//! functions and two-way branches, made in memory; each group reports its throughput.
//!
//! `cargo bench --bench ingest`; CI builds it (`cargo bench --no-run`) so it cannot rot.

use std::hint::black_box;

use covd::aggregate::{Aggregate, PathInterner};
use covd::formats::{cobertura, lcov};
use covd::model::Coverage;
use covd::rpc::convert::{ArmForm, file_to_proto, wire_delta_files};
use covd::rpc::proto;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;

const FILES: usize = 1000;
const LINES: u32 = 100;

/// A tracefile where shard `seed` covers a different part of each file.
fn tracefile(seed: u32) -> String {
    let mut s = String::new();
    for f in 0..FILES {
        s.push_str(&format!("SF:src/module{}/file{f}.c\n", f % 20));
        for func in 0..LINES / 10 {
            s.push_str(&format!(
                "FN:{},{},fn_{f}_{func}\n",
                func * 10 + 1,
                func * 10 + 9
            ));
        }
        for func in 0..LINES / 10 {
            s.push_str(&format!("FNDA:{},fn_{f}_{func}\n", (func + seed) % 3));
        }
        for line in (1..=LINES).step_by(5) {
            let taken = (line + seed) % 4;
            s.push_str(&format!("BRDA:{line},0,0,{taken}\nBRDA:{line},0,1,-\n"));
        }
        for line in 1..=LINES {
            s.push_str(&format!("DA:{line},{}\n", (line * 7 + seed) % 5));
        }
        s.push_str("end_of_record\n");
    }
    s
}

fn parse(text: &str) -> Coverage {
    let mut reader = lcov::Reader::new(text.as_bytes());
    let mut c = Coverage::default();
    while let Some(r) = reader.next_record().unwrap() {
        c.add(&r.path, &r.file);
    }
    c
}

fn benches(c: &mut Criterion) {
    let text = tracefile(1);
    let shard = parse(&text);
    let other = parse(&tracefile(2));

    let mut g = c.benchmark_group("lcov");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("parse", |b| b.iter(|| parse(black_box(&text))));
    g.bench_function("write", |b| {
        let mut out = Vec::with_capacity(text.len());
        b.iter(|| {
            out.clear();
            for (p, f) in &shard.files {
                lcov::write_record(&mut out, p, f).unwrap();
            }
            black_box(out.len())
        })
    });
    g.finish();

    let mut g = c.benchmark_group("cobertura");
    g.throughput(Throughput::Elements(FILES as u64));
    g.bench_function("write", |b| {
        let totals = shard.totals();
        let packages =
            cobertura::package_totals(shard.files.iter().map(|(p, f)| (p.as_str(), f.totals())));
        let mut out = Vec::new();
        b.iter(|| {
            out.clear();
            let mut w = cobertura::Writer::begin(&mut out, totals, packages.clone(), 0).unwrap();
            for (p, f) in &shard.files {
                w.file(p, f).unwrap();
            }
            w.finish().unwrap();
            black_box(out.len())
        })
    });
    g.finish();

    // A delta as the daemon receives it: the bytes a client sent.
    let wire = proto::Delta {
        seq: 1,
        files: other
            .files
            .iter()
            .map(|(p, f)| file_to_proto(p.clone(), f, ArmForm::Columns))
            .collect(),
        test: None,
    }
    .encode_to_vec();
    let mut g = c.benchmark_group("delta");
    g.throughput(Throughput::Elements(FILES as u64));
    g.bench_function("read_from_wire", |b| {
        b.iter(|| wire_delta_files(black_box(&wire)).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("merge");
    g.throughput(Throughput::Elements(FILES as u64));
    // The common case: the aggregate already knows every executable line.
    g.bench_function("same_lines_into_aggregate", |b| {
        let mut aggregate = shard.clone();
        b.iter(|| aggregate.merge(black_box(&other)))
    });
    // What the daemon does with a delta: the batch read from the wire, merged file by file
    // into an aggregate that knows every file.
    let batch = wire_delta_files(&wire).unwrap();
    g.bench_function("batch_into_aggregate", |b| {
        let aggregate = Aggregate::new();
        let interner = PathInterner::default();
        aggregate.merge_batch(&interner, &batch);
        b.iter(|| aggregate.merge_batch(&interner, black_box(&batch)))
    });
    // The union of two shards that cover different lines.
    g.bench_function("union_of_two_shards", |b| {
        b.iter(|| {
            let mut aggregate = shard.clone();
            aggregate.merge(black_box(&other));
            aggregate
        })
    });
    // The first shard into an empty aggregate.
    g.bench_function("into_empty", |b| {
        b.iter(|| {
            let mut aggregate = Coverage::default();
            aggregate.merge(black_box(&other));
            aggregate
        })
    });
    g.finish();

    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Elements(FILES as u64));
    g.bench_function("encode_files", |b| {
        b.iter(|| {
            shard
                .files
                .iter()
                .map(|(p, f)| file_to_proto(p.clone(), f, ArmForm::Columns))
                .collect::<Vec<_>>()
        })
    });
    g.finish();
}

criterion_group!(ingest, benches);
criterion_main!(ingest);
