//! The benchmarks' data: synthetic LCOV shards from `../shared/bench/gen_lcov.py`, made once
//! into `target/bench-data/` and shared by `bench_ingest`, `bench_parse` and `bench_runs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The directory of `shards` shards × `files` files (100 lines each), generated if missing.
pub(crate) fn generate(shards: usize, files: usize) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join(format!("target/bench-data/s{shards}_f{files}"));
    if dir.join("manifest.json").exists() {
        return dir;
    }
    eprintln!(
        "generating {shards} shards × {files} files into {} …",
        dir.display()
    );
    let status = Command::new("python3")
        .arg(root.join("../shared/bench/gen_lcov.py"))
        .args(["--out", dir.to_str().unwrap()])
        .args([
            "-S",
            &shards.to_string(),
            "-F",
            &files.to_string(),
            "-L",
            "100",
        ])
        .stdout(Stdio::null())
        .status()
        .expect("python3");
    assert!(status.success(), "gen_lcov.py failed");
    dir
}
