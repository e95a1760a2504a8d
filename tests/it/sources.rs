//! Source texts pushed with a run (`covd push --sources`): each text sent once whatever the
//! number of runs naming it, read back as pushed, kept across a restart, and gone with the
//! last run naming it; bad requests are refused whole, saying why.

use covd::rpc::proto;
use tonic::Code;

use crate::cli::Served;
use crate::ingest::raw;
use crate::support::fixture;

/// `covd push --sources` of the gcc fixture's first shard into run `run`, the build prefix
/// stripped so that the run's paths are found under the fixture's directory; its stderr.
fn push(served: &Served, run: &str, shard: &str) -> String {
    let out = served
        .covd(&[
            "push",
            "--fail-on-error",
            "--run",
            run,
            "--shard",
            shard,
            "--strip-prefix",
            "/builds/shard-1/",
            "--sources",
            "--source-root",
        ])
        .arg(fixture("gcc-lcov"))
        .arg(fixture("gcc-lcov/shard1.info"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_are_sent_once_and_read_back_as_pushed() {
    let mut served = Served::start();
    let calc = std::fs::read(fixture("gcc-lcov/src/calc.c")).unwrap();
    let said = tokio::task::block_in_place(|| push(&served, "r1", "0"));
    assert!(
        said.contains("sources: 2 files named, 2 new texts sent"),
        "{said}"
    );
    // Another shard, another run: the same texts, none sent again.
    let said = tokio::task::block_in_place(|| push(&served, "r1", "1"));
    assert!(
        said.contains("sources: 2 files named, 0 new texts sent"),
        "{said}"
    );
    let said = tokio::task::block_in_place(|| push(&served, "r2", "0"));
    assert!(
        said.contains("sources: 2 files named, 0 new texts sent"),
        "{said}"
    );

    let mut client = covd::client::Client::connect(&served.url).unwrap();
    assert_eq!(client.source("r1", "src/calc.c").await.unwrap(), calc);
    let none = client.source("r1", "src/calc.h").await.unwrap_err();
    assert!(
        none.to_string().contains("no source of `src/calc.h`"),
        "{none}"
    );

    // The dashboard's file page has the text, line by line.
    let (status, _, body) = crate::metrics::get(&format!(
        "{}/api/runs/r1/file?path=src/calc.c",
        served.metrics.trim_end_matches("/metrics")
    ));
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    let first = String::from_utf8_lossy(&calc)
        .lines()
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(page["source"][0], first.as_str());

    // Kept across a restart; gone with the last run naming it.
    tokio::task::block_in_place(|| served.terminate());
    let data = std::mem::replace(&mut served.data, tempfile::tempdir().unwrap());
    let served = Served::on(data, "127.0.0.1:0");
    let mut client = covd::client::Client::connect(&served.url).unwrap();
    assert_eq!(client.source("r2", "src/calc.c").await.unwrap(), calc);
    let mut c = raw(&served.url).await;
    let digest = covd::service::digest_of(&calc).to_vec();
    let missing = |c: &mut proto::coverage_client::CoverageClient<_>| {
        let digest = digest.clone();
        let mut c = c.clone();
        async move {
            c.missing_sources(proto::MissingSourcesRequest {
                sha256: vec![digest],
            })
            .await
            .unwrap()
            .into_inner()
            .missing
        }
    };
    assert!(missing(&mut c).await.is_empty());
    client.delete_run("r1").await.unwrap();
    assert!(missing(&mut c).await.is_empty(), "r2 still names it");
    client.delete_run("r2").await.unwrap();
    assert_eq!(missing(&mut c).await, [0]);
}

/// A push reads sources under its source root only: a coverage file naming a file elsewhere,
/// or a link out of the root, sends nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_files_under_the_source_root_are_sent() {
    let served = Served::start();
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.txt");
    std::fs::write(&secret, "API_KEY=hunter2\n").unwrap();
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("ok.c"), "int main(void) { return 0; }\n").unwrap();
    std::os::unix::fs::symlink(&secret, root.path().join("link.c")).unwrap();
    let info = root.path().join("cov.info");
    std::fs::write(
        &info,
        format!(
            "SF:{}\nDA:1,1\nend_of_record\nSF:link.c\nDA:1,1\nend_of_record\n\
             SF:ok.c\nDA:1,1\nend_of_record\n",
            secret.display()
        ),
    )
    .unwrap();
    let out = served
        .covd(&[
            "push",
            "--fail-on-error",
            "--run",
            "r",
            "--shard",
            "0",
            "--sources",
        ])
        .arg(&info)
        .current_dir(root.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("sources: 1 files named, 1 new texts sent; left out: 2 outside"),
        "{said}"
    );
    let mut client = covd::client::Client::connect(&served.url).unwrap();
    assert!(client.source("r", "ok.c").await.is_ok());
    for path in [secret.to_str().unwrap(), "link.c"] {
        let e = client.source("r", path).await.unwrap_err();
        assert!(e.to_string().contains("no source of"), "{path}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_source_requests_are_refused_whole() {
    let served = Served::start();
    tokio::task::block_in_place(|| push(&served, "r", "0"));
    let mut c = raw(&served.url).await;
    let text = b"fn main() {}\n".to_vec();
    let good = proto::SourceFile {
        path: "src/new.rs".into(),
        sha256: covd::service::digest_of(&text).to_vec(),
        text: Some(text.clone()),
    };
    let put = |files: Vec<proto::SourceFile>| proto::PutSourcesRequest {
        run_id: "r".into(),
        files,
    };
    let refused = async |c: &mut proto::coverage_client::CoverageClient<_>, files| {
        c.put_sources(put(files)).await.unwrap_err()
    };
    let calc = std::fs::read(fixture("gcc-lcov/src/calc.c")).unwrap();
    for (bad, code, says) in [
        (
            good.clone(),
            Code::InvalidArgument,
            "comes twice in one request",
        ),
        (
            proto::SourceFile {
                sha256: vec![1; 31],
                ..good.clone()
            },
            Code::InvalidArgument,
            "a SHA-256 digest is 32",
        ),
        (
            proto::SourceFile {
                text: Some(b"fn main() { evil() }\n".to_vec()),
                ..good.clone()
            },
            Code::InvalidArgument,
            "does not hash to its sha256",
        ),
        (
            proto::SourceFile {
                path: "src/other.rs".into(),
                sha256: vec![7; 32],
                text: None,
            },
            Code::FailedPrecondition,
            "send the text",
        ),
        (
            proto::SourceFile {
                path: "src/calc.c".into(),
                sha256: good.sha256.clone(),
                text: Some(text.clone()),
            },
            Code::FailedPrecondition,
            "already has another source text for src/calc.c",
        ),
        (
            proto::SourceFile {
                path: "../etc/passwd".into(),
                ..good.clone()
            },
            Code::InvalidArgument,
            "files[1].path",
        ),
        (
            {
                let big = vec![b'x'; (4 << 20) + 1];
                proto::SourceFile {
                    path: "big.txt".into(),
                    sha256: covd::service::digest_of(&big).to_vec(),
                    text: Some(big),
                }
            },
            Code::ResourceExhausted,
            "--max-source-bytes",
        ),
    ] {
        // A good file first: nothing of the request is kept.
        let mut bad = bad;
        if bad.path == good.path && !says.contains("twice") {
            bad.path = "src/bad.rs".into();
        }
        let e = refused(&mut c, vec![good.clone(), bad]).await;
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(e.message().contains(says), "{}", e.message());
        let missing = c
            .missing_sources(proto::MissingSourcesRequest {
                sha256: vec![good.sha256.clone()],
            })
            .await
            .unwrap()
            .into_inner()
            .missing;
        assert_eq!(
            missing,
            [0],
            "the good file of a refused request was stored"
        );
    }
    // The run's own text is as pushed; an unknown run is NOT_FOUND.
    let mut client = covd::client::Client::connect(&served.url).unwrap();
    assert_eq!(client.source("r", "src/calc.c").await.unwrap(), calc);
    let e = c
        .put_sources(proto::PutSourcesRequest {
            run_id: "nope".into(),
            files: vec![good],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}
