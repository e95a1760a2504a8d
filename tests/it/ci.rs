//! Zero-configuration CI use: `covd push FILE` with no flags, in the environment of each CI
//! provider (`tests/fixtures/ci/`, the variables as each provider documents them), finds the
//! run, shard, attempt, project, commit and branch; flags and `COVD_*` still win.

use std::process::Command;

use covd::ci::{Ci, Provider, detect};

use crate::cli::COVD;
use crate::support::*;

pub(crate) fn environment(name: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(fixture(&format!("ci/{name}.env")))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn detected(name: &str) -> Option<Ci> {
    let env = environment(name);
    detect(|var| env.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone()))
}

struct Want {
    provider: Provider,
    run: &'static str,
    shard: &'static str,
    attempt: Option<u32>,
    project: &'static str,
    commit: &'static str,
    branch: &'static str,
}

fn expected() -> Vec<(&'static str, Want)> {
    vec![
        (
            "github-actions",
            Want {
                provider: Provider::GitHubActions,
                run: "github/acme/widgets/1658821493",
                shard: "test",
                attempt: Some(2),
                project: "acme/widgets",
                commit: "ffac537e6cbbf934b08745a378932722df287a53",
                // Not `1234/merge`: the pull request's source branch.
                branch: "feature-branch-1",
            },
        ),
        (
            "gitlab",
            Want {
                provider: Provider::GitLab,
                run: "gitlab/gitlab.example.com/1450283746",
                shard: "rspec-2",
                attempt: Some(2),
                project: "acme/platform/widgets",
                commit: "3f1c2a9d8b7e6f5a4c3b2a1908f7e6d5c4b3a291",
                branch: "feature/login-form",
            },
        ),
        (
            "gitlab-16-branch",
            Want {
                provider: Provider::GitLab,
                run: "gitlab/gitlab.example.com/1450290001",
                shard: "unit_tests",
                // 2026-11-30T09:31:44Z
                attempt: Some(1_796_031_104),
                project: "acme/platform/widgets",
                commit: "3f1c2a9d8b7e6f5a4c3b2a1908f7e6d5c4b3a291",
                branch: "main",
            },
        ),
        (
            "jenkins-multibranch",
            Want {
                provider: Provider::Jenkins,
                run: "jenkins/acme/widgets/PR-24/57",
                shard: "Unit_tests",
                attempt: None,
                project: "acme/widgets",
                commit: "9b2e4c71d0a3f5e8b6c4d2a0f1e3c5b7a9d8e6f4",
                branch: "feature/login-form",
            },
        ),
        (
            "jenkins-freestyle",
            Want {
                provider: Provider::Jenkins,
                run: "jenkins/widgets-unit/1337",
                shard: "widgets-unit",
                attempt: None,
                project: "project/widgets",
                commit: "11cc783de14cf438a41a60af7cd148a43da74ccd",
                branch: "main",
            },
        ),
        (
            "circleci",
            Want {
                provider: Provider::CircleCi,
                run: "circleci/9a956048-86ba-436a-aac0-9cd461ae266a",
                shard: "test-1",
                attempt: Some(4312),
                project: "acme/widgets",
                commit: "fad3f7bdbf3515d1e9285b8aa80feeff74507bdd",
                branch: "feature/login-form",
            },
        ),
        (
            "buildkite",
            Want {
                provider: Provider::Buildkite,
                run: "buildkite/4735ba57-80d0-46e2-8fa0-b28223a86586",
                shard: "rspec-1",
                attempt: Some(2),
                project: "acme-inc/widgets",
                commit: "83a20ec058e2fb00e7fa4558c4c6e81e2dcf253d",
                branch: "feature/login-form",
            },
        ),
        (
            "azure-pipelines",
            Want {
                provider: Provider::AzurePipelines,
                run: "azure/2e131413-79df-4e40-91c0-9e590bd31772/1764",
                shard: "Test.Job2",
                attempt: Some(2),
                project: "acme/widgets",
                commit: "f44ad676029757f70d7fc848d4bdf13b771c279b",
                branch: "feature/login-form",
            },
        ),
    ]
}

#[test]
fn each_providers_variables_give_the_job() {
    for (name, want) in expected() {
        let ci = detected(name).unwrap_or_else(|| panic!("{name}: no CI detected"));
        assert_eq!(ci.provider, want.provider, "{name}");
        assert_eq!(ci.run, want.run, "{name}");
        assert_eq!(ci.shard, want.shard, "{name}");
        assert_eq!(ci.attempt, want.attempt, "{name}");
        assert_eq!(ci.project.as_deref(), Some(want.project), "{name}");
        assert_eq!(ci.commit.as_deref(), Some(want.commit), "{name}");
        assert_eq!(ci.branch.as_deref(), Some(want.branch), "{name}");
    }
    // No provider's marker: no CI.
    assert_eq!(detect(|var| (var == "CI").then(|| "true".to_owned())), None);
    // An empty marker is no marker.
    assert_eq!(
        detect(|var| (var == "GITHUB_ACTIONS").then(String::new)),
        None
    );
}

/// Parallel jobs of one split job are distinct shards of one run; a job that is not split
/// keeps its name alone.
#[test]
fn split_jobs_are_shards_of_one_run() {
    let mut env = environment("buildkite");
    let mut shards = Vec::new();
    for index in ["0", "3"] {
        for (k, v) in env.iter_mut() {
            if k == "BUILDKITE_PARALLEL_JOB" {
                *v = index.to_owned();
            }
        }
        let ci = detect(|var| env.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone()));
        shards.push(ci.unwrap());
    }
    assert_eq!(shards[0].run, shards[1].run);
    assert_eq!(
        (&*shards[0].shard, &*shards[1].shard),
        ("rspec-0", "rspec-3")
    );
    env.retain(|(k, _)| !k.starts_with("BUILDKITE_PARALLEL"));
    let ci = detect(|var| env.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone()));
    assert_eq!(ci.unwrap().shard, "rspec");
}

/// `covd push FILE` with nothing but the provider's environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_takes_the_run_shard_and_attempt_from_ci() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    let file = fixture("gcc-lcov/shard1.info");
    let push = |name: &str, extra: &[&str]| {
        let mut command = Command::new(COVD);
        command
            .env_clear()
            .envs(environment(name))
            .env("COVD_SERVER", &daemon.url)
            .arg("push")
            .args(extra)
            .arg(&file);
        command
    };
    for (name, want) in expected() {
        let out = push(name, &[]).output().unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status = client.status(want.run).await.unwrap();
        let shard = status
            .shards
            .iter()
            .find(|s| s.shard_id == want.shard)
            .unwrap_or_else(|| panic!("{name}: {:?}", status.shards));
        assert_eq!(shard.attempt, want.attempt.unwrap_or(1), "{name}");
        assert_eq!(status.params.project, want.project, "{name}");
        assert_eq!(status.params.commit, want.commit, "{name}");
        assert_eq!(status.params.branch, want.branch, "{name}");
        assert!(status.totals.lines > 0, "{name}");
    }

    // Flags and COVD_* variables win.
    let out = push(
        "gitlab",
        &["--run", "mine", "--shard", "s", "--attempt", "7"],
    )
    .env("COVD_BRANCH", "other")
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = client.status("mine").await.unwrap();
    assert_eq!(
        (&*status.shards[0].shard_id, status.shards[0].attempt),
        ("s", 7)
    );
    assert_eq!(status.params.branch, "other");

    // An empty COVD_* variable is as if not set: the CI job's values stand.
    let out = push("github-actions", &[])
        .env("GITHUB_RUN_ID", "777")
        .env("COVD_RUN", "")
        .env("COVD_COMMIT", "")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = client.status("github/acme/widgets/777").await.unwrap();
    assert_eq!(
        status.params.commit,
        "ffac537e6cbbf934b08745a378932722df287a53"
    );

    // Outside CI, the run must be given.
    let out = Command::new(COVD)
        .env_clear()
        .env("COVD_SERVER", &daemon.url)
        .arg("push")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("give --run or COVD_RUN"), "{err}");
}

/// `--tag` and the environment's tags (`os`, `arch`, `ci`) go with the shard's results, are
/// kept by a durable daemon, and a tag of the same key replaces the environment's.
#[test]
fn tags_go_with_the_shards_results() {
    use crate::cli::Served;
    let served = Served::start();
    let coverage = fixture("gcc-lcov/shard1.info");
    let junit = fixture("junit/pytest-junit.xml");
    let out = Command::new(COVD)
        .env_clear()
        .envs(environment("gitlab"))
        .env("COVD_SERVER", &served.url)
        .args(["push", "--run", "tagged", "--shard", "s"])
        .args(["--tag", "python=3.11.2", "--tag", "arch=riscv64"])
        .arg(&coverage)
        .arg(&junit)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = |served: &Served| {
        let out = served
            .covd(&["status", "--run", "tagged"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let want = format!(
        "tags arch=riscv64,ci=gitlab,os={},python=3.11.2",
        std::env::consts::OS
    );
    let first = status(&served);
    assert!(first.contains(&want), "{first}");
    assert!(first.contains("passed"), "{first}");

    let mut served = served;
    served.terminate();
    let data = std::mem::replace(&mut served.data, tempfile::tempdir().unwrap());
    let again = Served::on(data, "127.0.0.1:0");
    assert_eq!(status(&again), first);

    // A malformed tag is refused before anything is sent.
    let out = again
        .covd(&["push", "--run", "t2", "--shard", "s", "--tag", "no value"])
        .arg(&coverage)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// The daemon refuses more than 64 tags, an empty key, and a control character, naming the
/// field; the shard is left unfinished.
#[tokio::test]
async fn bad_tags_are_refused_by_name() {
    use covd::client::{ClientError, PushInput, PushOptions, PushTarget};
    use covd::service::TestTelemetry;
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    let many: std::collections::BTreeMap<String, String> =
        (0..65).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let cases = [
        (many, "65 tags; at most 64"),
        (
            [(String::new(), "v".to_owned())].into(),
            "a tag without a key",
        ),
        (
            [("k".to_owned(), "two\nlines".to_owned())].into(),
            "control characters",
        ),
    ];
    for (i, (tags, says)) in cases.into_iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(PushInput::Done(None)).await.unwrap();
        let target = PushTarget {
            run_id: format!("tags{i}"),
            shard_id: "s".into(),
            attempt: 1,
            telemetry: Some(TestTelemetry {
                tags,
                ..TestTelemetry::default()
            }),
            ..PushTarget::default()
        };
        let options = PushOptions {
            retries: 0,
            ..PushOptions::default()
        };
        match client.push(&target, rx, &options).await.unwrap_err() {
            ClientError::Status(s) => {
                assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
                assert!(
                    s.message().contains("finish.telemetry.tags"),
                    "{}",
                    s.message()
                );
                assert!(s.message().contains(says), "{}", s.message());
            }
            other => panic!("{other}"),
        }
        let status = client.status(&format!("tags{i}")).await.unwrap();
        assert!(!status.complete && status.shards[0].finished_at.is_none());
    }
}

/// `push --watch -- CMD` sends how the command ran: its wall time and the peak memory of its
/// largest process, with the tags, even without test results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sends_the_commands_duration_and_peak_memory() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    let dir = tempfile::tempdir().unwrap();
    let coverage = fixture("gcc-lcov/shard1.info");
    // 64 MiB written (so resident), then the coverage file.
    let script = format!(
        "python3 -c 'import time; b = bytearray(b\"x\") * (64 << 20); time.sleep(0.3)' && cp {} {}/shard.info",
        coverage.display(),
        dir.path().display()
    );
    let url = daemon.url.clone();
    let watch = dir.path().to_str().unwrap().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(COVD)
            .env("COVD_SERVER", url)
            .args(["push", "--run", "ran", "--shard", "s", "--watch", &watch])
            .args(["--", "sh", "-c", &script])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = client.status("ran").await.unwrap();
    let t = status.shards[0].telemetry.as_ref().expect("telemetry");
    assert!(
        t.duration.unwrap() >= std::time::Duration::from_millis(300),
        "{t:?}"
    );
    assert!(t.peak_memory_bytes >= 64 << 20, "{}", t.peak_memory_bytes);
    assert!(t.peak_memory_bytes < 1 << 30, "{}", t.peak_memory_bytes);
    assert_eq!(t.tags["os"], std::env::consts::OS);
    assert!(status.totals.lines > 0);
}

/// The coverage.py version a JSON report names is a tag of the shard's test run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coverage_py_report_names_its_version() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("coverage.json");
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(
            std::fs::File::open(corpus("python-toolz/same-path/shard1.json.gz")).unwrap(),
        ),
        &mut text,
    )
    .unwrap();
    std::fs::write(&report, text).unwrap();
    let url = daemon.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(COVD)
            .env("COVD_SERVER", url)
            .args(["push", "--run", "py", "--shard", "1"])
            .arg(&report)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = client.status("py").await.unwrap();
    let t = status.shards[0].telemetry.as_ref().expect("telemetry");
    assert_eq!(t.tags["coverage.py"], "7.17.3");
    // No test results: none are claimed.
    assert_eq!((t.passed, t.failed, t.duration), (0, 0, None));
}
