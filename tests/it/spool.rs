//! `covd push --spool DIR` keeps a push the daemon could not take, and `covd push
//! --flush-spool DIR` sends it later exactly once: flushed twice, and by two processes at once,
//! the coverage counts once.

use std::process::{Command, Output};

use crate::cli::COVD;
use crate::support::*;

fn covd(url: &str, args: &[&str]) -> Output {
    Command::new(COVD)
        .args(args)
        .env("COVD_SERVER", url)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    err
}

fn spooled(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    covd::spool::entries(dir).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_push_is_sent_later_exactly_once() {
    let spool = tempfile::tempdir().unwrap();
    let dir = spool.path().to_str().unwrap().to_owned();
    let files = [
        fixture("gcc-lcov/shard1.info"),
        fixture("gcc-lcov/shard2.info"),
    ];
    // Nothing listens on port 1: both shards are kept, and the pushes exit 0.
    for (shard, file) in ["0", "1"].iter().zip(&files) {
        let out = covd(
            "http://127.0.0.1:1",
            &[
                "push",
                "--run",
                "later",
                "--shard",
                shard,
                "--retries",
                "0",
                "--spool",
                &dir,
                file.to_str().unwrap(),
            ],
        );
        let err = ok(&out);
        assert!(err.contains("coverage not sent"), "{err}");
        assert!(err.contains("--flush-spool"), "{err}");
    }
    assert_eq!(spooled(spool.path()).len(), 2);

    // While the daemon is still away, a flush fails and keeps the files.
    let out = covd("http://127.0.0.1:1", &["push", "--flush-spool", &dir]);
    assert!(!out.status.success());
    assert_eq!(spooled(spool.path()).len(), 2);

    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    // The same two shards pushed directly, for what the run must hold.
    for (shard, file) in ["0", "1"].iter().zip(&files) {
        let out = covd(
            &daemon.url,
            &[
                "push",
                "--run",
                "direct",
                "--shard",
                shard,
                file.to_str().unwrap(),
            ],
        );
        ok(&out);
    }
    // A copy of the spool: flushed twice at once, then once more.
    let copy = tempfile::tempdir().unwrap();
    for f in spooled(spool.path()) {
        std::fs::copy(&f, copy.path().join(f.file_name().unwrap())).unwrap();
    }
    let url = daemon.url.clone();
    let flushes: Vec<_> = [dir.clone(), dir.clone()]
        .into_iter()
        .map(|d| {
            let url = url.clone();
            tokio::task::spawn_blocking(move || covd(&url, &["push", "--flush-spool", &d]))
        })
        .collect();
    for f in flushes {
        ok(&f.await.unwrap());
    }
    assert!(spooled(spool.path()).is_empty());
    // The copy's files are the same pushes: the daemon has them, and says so.
    let copy_dir = copy.path().to_str().unwrap();
    let err = ok(&covd(&daemon.url, &["push", "--flush-spool", copy_dir]));
    assert!(err.contains("had it already"), "{err}");
    assert!(err.contains("2 spooled pushes sent"), "{err}");

    let later = client.status("later").await.unwrap();
    let direct = client.status("direct").await.unwrap();
    assert_eq!(later.totals, direct.totals);
    assert_eq!(later.shards.len(), 2);
    assert!(
        later.shards.iter().all(|s| s.last_seq == 1),
        "{:?}",
        later.shards
    );
    let (a, b) = (
        client
            .file("later", "/builds/shard-1/src/calc.c")
            .await
            .unwrap(),
        client
            .file("direct", "/builds/shard-1/src/calc.c")
            .await
            .unwrap(),
    );
    assert_eq!(a, b, "hit counts counted once");

    // A damaged spool file is named, not sent.
    let bad = tempfile::tempdir().unwrap();
    std::fs::write(bad.path().join("x.covd-spool"), b"not a spool").unwrap();
    let out = covd(
        &daemon.url,
        &["push", "--flush-spool", bad.path().to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a covd spool file"));
}
