//! The HTTP port's Prometheus metrics, scraped from a real `covd serve` while it ingests, and
//! its JSON logs.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use crate::cli::{COVD, Served};
use crate::support::fixture;

/// `GET url` over HTTP/1.1: the status, the content type, the body.
pub(crate) fn get(url: &str) -> (u16, String, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = TcpStream::connect(host).unwrap();
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// Each sample of an OpenMetrics text, by its name and labels as written.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (name.to_owned(), value.parse().unwrap())
        })
        .collect()
}

#[test]
fn metrics_count_streams_deltas_commits_and_refusals() {
    let served = Served::start();
    let run = "metrics-run-7f3a";
    let ok = |args: &[&str]| {
        let out = served.covd(args).output().unwrap();
        assert!(
            out.status.success(),
            "covd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (project, commit, branch) = ("acme/metrics-7c1", "commit-9d04e", "branch-5e2b");
    ok(&[
        "open",
        "--run",
        run,
        "--shards",
        "3",
        "--project",
        project,
        "--commit",
        commit,
        "--branch",
        branch,
    ]);
    let junit = fixture("junit/pytest-junit.xml");
    for (shard, file) in [("0", "shard1.info"), ("1", "shard2.info")] {
        let path = fixture(&format!("gcc-lcov/{file}"));
        ok(&[
            "push",
            "--run",
            run,
            "--shard",
            shard,
            path.to_str().unwrap(),
            junit.to_str().unwrap(),
        ]);
    }
    // A refusal the daemon answers: a run that does not exist.
    let missing = served
        .covd(&["status", "--run", "no-such-run"])
        .output()
        .unwrap();
    assert!(!missing.status.success());

    let (status, content_type, text) = get(&served.metrics);
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    let m = samples(&text);
    let get = |name: &str| {
        *m.get(name)
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    let deltas = get("covd_deltas_total");
    assert!(deltas >= 2.0, "{deltas}");
    assert!(get("covd_delta_bytes_total") > 100.0);
    assert_eq!(get("covd_commit_seconds_count"), deltas);
    assert!(get("covd_commit_seconds_sum") > 0.0);
    assert_eq!(get("covd_streams_open"), 0.0);
    assert_eq!(get("covd_runs"), 1.0);
    // Shard 2 has not come: the run is open.
    assert_eq!(get("covd_runs_open"), 1.0);
    assert_eq!(get("covd_refusals_total{code=\"NotFound\"}"), 1.0);
    assert!(get("covd_resident_bytes") > 1e6);
    // Unbounded values are never labels: run ids, projects, commits, branches, paths, tests.
    for value in [
        run,
        "no-such-run",
        "src/",
        ".c",
        "metrics-7c1",
        commit,
        branch,
        "test_square_nonneg",
        "test_sample",
    ] {
        assert!(!text.contains(value), "{value} in\n{text}");
    }

    let path = fixture("gcc-lcov/shard1.info");
    ok(&["push", "--run", run, "--shard", "2", path.to_str().unwrap()]);
    let m = samples(&get_text(&served.metrics));
    assert_eq!(m["covd_runs_open"], 0.0);
    assert!(m["covd_deltas_total"] > deltas);

    let (status, _, _) = crate::metrics::get(&served.metrics.replace("/metrics", "/nothing"));
    assert_eq!(status, 404);
}

fn get_text(url: &str) -> String {
    get(url).2
}

/// `--log-format json` writes each log line as one JSON object; `--no-http` opens no HTTP port.
#[test]
fn logs_are_json_on_request() {
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(COVD)
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-http",
        ])
        .arg("--data-dir")
        .arg(data.path())
        .env("COVD_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut logged = Vec::new();
    let listening = loop {
        let line = lines.next().expect("covd writes a line").unwrap();
        if line.starts_with("covd listening") {
            break line;
        }
        logged.push(line);
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(!listening.contains("metrics"), "{listening}");
    let recovered = logged
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("recovered"))
        })
        .unwrap_or_else(|| panic!("no recovery line in {logged:?}"));
    assert_eq!(recovered["level"], "INFO");
    assert_eq!(recovered["fields"]["runs"], 0);
}
