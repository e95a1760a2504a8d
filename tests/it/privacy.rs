//! Project names kept plain, as keyed pseudonyms, or not at all: the daemon's policy and the
//! client's request, the stricter applying before anything is stored; queries may name the
//! project plainly; the key stays with the data directory.

use serde_json::Value;

use crate::cli::Served;
use crate::support::fixture;

/// Opens and completes a one-shard run of `project`.
fn run(served: &Served, run: &str, project: &str, extra: &[&str]) {
    let info = fixture("gcc-lcov/shard1.info");
    served.ok(&[
        &[
            "open",
            "--run",
            run,
            "--shards",
            "1",
            "--project",
            project,
            "--branch",
            "main",
        ],
        extra,
    ]
    .concat());
    served.ok(&[
        &[
            "push",
            "--run",
            run,
            "--shard",
            "0",
            "--project",
            project,
            "--branch",
            "main",
        ],
        extra,
        &[info.to_str().unwrap()],
    ]
    .concat());
}

/// The project line of `covd status`.
fn project_of(served: &Served, run: &str) -> String {
    let status = served.ok(&["status", "--run", run]);
    let line = status
        .lines()
        .find(|l| l.trim_start().starts_with("project"))
        .unwrap_or_else(|| panic!("no project in {status}"));
    line.split_whitespace().nth(1).unwrap().to_owned()
}

fn history_runs(served: &Served, project: &str) -> u64 {
    let out = served.ok(&["history", "--project", project, "--format", "json"]);
    let h: Value = serde_json::from_str(&out).unwrap();
    h["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["runs"].as_u64().unwrap())
        .sum()
}

#[test]
fn a_daemon_that_keeps_pseudonyms_never_stores_the_name() {
    let mut served = Served::with(
        tempfile::tempdir().unwrap(),
        "127.0.0.1:0",
        &["--project-names", "pseudonym"],
    );
    run(&served, "r1", "acme/secret-shop", &[]);
    run(&served, "r2", "acme/secret-shop", &[]);
    let kept = project_of(&served, "r1");
    assert!(kept.starts_with("acme/") && kept.len() == 25, "{kept}");
    assert_eq!(project_of(&served, "r2"), kept);
    // Queries may name it plainly, or by its pseudonym.
    assert_eq!(history_runs(&served, "acme/secret-shop"), 2);
    assert_eq!(history_runs(&served, &kept), 2);
    let listed = served.ok(&["runs"]);
    assert!(!listed.contains("secret-shop"), "{listed}");

    // Nothing in the data directory holds the name.
    served.terminate();
    let data = std::mem::replace(&mut served.data, tempfile::tempdir().unwrap());
    for entry in walk(data.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(11).any(|w| w == b"secret-shop"),
            "{} holds the project's name",
            entry.display()
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = data.path().join("pseudonym.key");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // The key stays with the data: the same pseudonym after a restart; another daemon's key
    // gives another.
    let served = Served::with(data, "127.0.0.1:0", &["--project-names", "pseudonym"]);
    run(&served, "r3", "acme/secret-shop", &[]);
    assert_eq!(project_of(&served, "r3"), kept);
    let other = Served::with(
        tempfile::tempdir().unwrap(),
        "127.0.0.1:0",
        &["--project-names", "pseudonym"],
    );
    run(&other, "r1", "acme/secret-shop", &[]);
    assert_ne!(project_of(&other, "r1"), kept);
}

#[test]
fn a_client_may_ask_for_stricter_never_for_less() {
    let served = Served::start();
    run(&served, "plain", "acme/shop", &[]);
    assert_eq!(project_of(&served, "plain"), "acme/shop");
    run(
        &served,
        "hidden",
        "acme/shop",
        &["--project-as", "pseudonym"],
    );
    let kept = project_of(&served, "hidden");
    assert!(kept.starts_with("acme/") && kept != "acme/shop", "{kept}");
    run(&served, "none", "acme/shop", &["--project-as", "anonymous"]);
    let status = served.ok(&["status", "--run", "none"]);
    assert!(!status.contains("acme"), "{status}");

    // A daemon that keeps no names keeps none, whatever the client asks.
    let anonymous = Served::with(
        tempfile::tempdir().unwrap(),
        "127.0.0.1:0",
        &["--project-names", "anonymous"],
    );
    run(&anonymous, "r", "acme/shop", &["--project-as", "plain"]);
    let status = anonymous.ok(&["status", "--run", "r"]);
    assert!(!status.contains("acme"), "{status}");
    // A key file too short is refused at start, naming the file.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("short.key");
    std::fs::write(&key, "tiny").unwrap();
    let out = crate::cli::serve_in_memory()
        .arg("--pseudonym-key-file")
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("short.key") && err.contains("at least 16"),
        "{err}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
