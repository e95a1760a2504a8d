//! What an acknowledgement promises, seen in the daemon's system calls: run under strace, it
//! has fsynced the delta log and SQLite's write-ahead log before it acknowledges a delta or a
//! finish. Without either sync (the log's `sync_data`, SQLite's `synchronous=FULL`) this test
//! fails; the power-cut test (`power_cut.rs`) covers what the `Storage` trait promises above
//! them. strace writes each call's line before the calling thread goes on, so a sync that
//! came before the acknowledgement is in the trace when the acknowledgement arrives.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::cli::{COVD, address};
use crate::consumers::tools;
use crate::ingest::{Stream, file, raw};

/// The files of the fsync and fdatasync calls in the trace so far, in order (`-y` names them:
/// `fdatasync(7</path/0000000000000001.log>) = 0`, or split in an `<unfinished ...>` line
/// when threads interleave).
fn synced(trace: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(trace).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("fsync(") || l.contains("fdatasync("))
        .filter_map(|l| {
            let start = l.find('<')? + 1;
            let end = start + l[start..].find('>')?;
            Some(l[start..end].to_owned())
        })
        .collect()
}

/// The daemon under strace. Dropped, whether the test passed or failed, it stops the daemon
/// itself (killing strace would leave it running, detached): the trace's lines start with the
/// id of a thread of it, and SIGKILL to any thread ends the process.
struct Traced {
    strace: Child,
    trace: PathBuf,
}

impl Drop for Traced {
    fn drop(&mut self) {
        let text = std::fs::read_to_string(&self.trace).unwrap_or_default();
        if let Some(tid) = text.split_whitespace().next() {
            let _ = Command::new("kill").args(["-9", tid]).status();
        }
        let _ = self.strace.kill();
        let _ = self.strace.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledgement_follows_the_fsync_of_log_and_database() {
    tools(); // installs strace when it is missing, or fails saying how
    let data = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let trace = scratch.path().join("trace");
    let mut strace = Command::new("strace")
        .args(["-f", "-qq", "-y", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(&trace)
        .arg(COVD)
        .args(crate::cli::SERVE_ANY_PORT)
        .arg(data.path())
        .stderr(Stdio::piped())
        .spawn()
        .expect("strace runs");
    let url = address(&mut strace);
    let _daemon = Traced {
        strace,
        trace: trace.clone(),
    };
    let dir = data.path().canonicalize().unwrap();
    let dir = dir.to_str().unwrap();
    let log = |p: &String| p.starts_with(dir) && p.ends_with(".log");
    let wal = |p: &String| p.starts_with(dir) && p.ends_with("-wal");

    let mut c = raw(&url).await;
    let (mut s, _) = Stream::open(&mut c, "r", "s", 1).await.unwrap();
    for seq in 1..=5u64 {
        let before = synced(&trace).len();
        let lines = [(1, seq), (2 + seq as u32, 1)];
        s.delta(seq, vec![file(&format!("src/f{seq}.c"), &lines)])
            .await
            .unwrap();
        let since = synced(&trace).split_off(before);
        assert!(
            since.iter().any(log),
            "delta {seq} acknowledged before its log was synced: {since:?}"
        );
        assert!(
            since.iter().any(wal),
            "delta {seq} acknowledged before SQLite synced: {since:?}"
        );
    }
    let before = synced(&trace).len();
    s.finish(5).await.unwrap();
    let since = synced(&trace).split_off(before);
    assert!(
        since.iter().any(wal),
        "finish answered before SQLite synced: {since:?}"
    );
}
