//! The `covd` binary as a user runs it: serve, open, push in parallel, fetch.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use covd::model::Coverage;
use covd::model::path::PathRules;

use crate::support::*;

pub(crate) const COVD: &str = env!("CARGO_BIN_EXE_covd");

/// `covd serve` on ports the OS chooses (gRPC and HTTP), before the data directory's path.
pub(crate) const SERVE_ANY_PORT: [&str; 6] = [
    "serve",
    "--listen",
    "127.0.0.1:0",
    "--http-listen",
    "127.0.0.1:0",
    "--data-dir",
];

/// The address a `covd serve` child (with its standard error piped) says it listens on, in
/// the first line it writes once ready.
pub(crate) fn address(child: &mut Child) -> String {
    addresses(child).0
}

/// The gRPC address and the metrics URL (when it has an HTTP port) of a `covd serve` child, from
/// the first line it writes once ready.
pub(crate) fn addresses(child: &mut Child) -> (String, Option<String>) {
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let mut urls = line.split_whitespace().filter(|w| w.starts_with("http://"));
    let grpc = urls
        .next()
        .unwrap_or_else(|| panic!("covd did not start: {line:?}"))
        .to_owned();
    (grpc, urls.next().map(str::to_owned))
}

/// `covd serve` on a loopback port the OS chooses, in memory, without an HTTP port: add flags,
/// then run it.
pub(crate) fn serve_in_memory() -> Command {
    let mut serve = Command::new(COVD);
    serve.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--no-http",
        "--in-memory",
    ]);
    serve
}

/// `covd serve` on port 0; the address is read from its first line of output, no sleeping.
pub(crate) struct Served {
    child: Child,
    pub(crate) url: String,
    /// `http://…/metrics` on its HTTP port.
    pub(crate) metrics: String,
    pub(crate) data: tempfile::TempDir,
}

impl Served {
    pub(crate) fn start() -> Served {
        Served::on(tempfile::tempdir().unwrap(), "127.0.0.1:0")
    }

    /// Serves `data` on `listen`, waiting for the line that says it is ready.
    pub(crate) fn on(data: tempfile::TempDir, listen: &str) -> Served {
        Served::with(data, listen, &[])
    }

    /// [`Served::on`] with more `covd serve` arguments.
    pub(crate) fn with(data: tempfile::TempDir, listen: &str, args: &[&str]) -> Served {
        let mut child = Command::new(COVD)
            .args([
                "serve",
                "--listen",
                listen,
                "--http-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data.path())
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (url, metrics) = addresses(&mut child);
        let metrics = metrics.expect("an HTTP port");
        Served {
            child,
            url,
            metrics,
            data,
        }
    }

    /// Stops the daemon gracefully (SIGTERM) and waits for it.
    pub(crate) fn terminate(&mut self) {
        Command::new("kill")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        self.child.wait().unwrap();
    }

    /// Runs `covd ARGS` against this daemon; it must succeed. Its standard output.
    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let out = self.covd(args).output().unwrap();
        assert!(
            out.status.success(),
            "covd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `host:port` of its HTTP port.
    pub(crate) fn http_host(&self) -> String {
        let rest = self.metrics.strip_prefix("http://").unwrap();
        rest.split('/').next().unwrap().to_owned()
    }

    pub(crate) fn covd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(COVD);
        c.args(args).env("COVD_SERVER", &self.url);
        c
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn quickstart_open_push_in_parallel_fetch() {
    let served = Served::start();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged.info");
    let ok = served
        .covd(&["open", "--run", "q", "--shards", "2"])
        .status()
        .unwrap();
    assert!(ok.success());
    let pushes: Vec<_> = [
        ("0", "gcc-lcov/shard1.info", "/builds/shard-1/"),
        ("1", "gcc-lcov/shard2.info", "/builds/shard-2/"),
    ]
    .into_iter()
    .map(|(shard, file, prefix)| {
        served
            .covd(&[
                "push",
                "--run",
                "q",
                "--shard",
                shard,
                "--strip-prefix",
                prefix,
            ])
            .arg(fixture(file))
            .spawn()
            .unwrap()
    })
    .collect();
    for mut p in pushes {
        assert!(p.wait().unwrap().success());
    }
    let fetched = served
        .covd(&[
            "fetch",
            "--run",
            "q",
            "--wait",
            "--timeout",
            "30s",
            "--output",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        fetched.status.success(),
        "{}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    assert!(String::from_utf8_lossy(&fetched.stderr).contains("complete"));

    let mut expected = read_lcov(
        &fixture("gcc-lcov/shard1.info"),
        &PathRules {
            strip: vec!["/builds/shard-1/".into()],
            ..Default::default()
        },
    );
    expected.merge(&read_lcov(
        &fixture("gcc-lcov/shard2.info"),
        &PathRules {
            strip: vec!["/builds/shard-2/".into()],
            ..Default::default()
        },
    ));
    assert_eq!(read_lcov(&out, &PathRules::default()), expected);

    let file = served
        .covd(&["file", "--run", "q", "src/calc.c"])
        .output()
        .unwrap();
    assert!(file.status.success());
    let text = String::from_utf8_lossy(&file.stdout);
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["57", "0", "uncovered"]),
        "{text}"
    );
}

#[test]
fn a_truncated_file_is_exit_2_naming_the_line_and_sends_nothing() {
    let served = Served::start();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.info");
    let full = std::fs::read_to_string(fixture("gcc-lcov/shard1.info")).unwrap();
    let lines: Vec<&str> = full.lines().collect();
    std::fs::write(&cut, lines[..40].join("\n")).unwrap();
    let r = served
        .covd(&["push", "--run", "t", "--shard", "0"])
        .arg(&cut)
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("line 40") && err.contains("truncated"),
        "{err}"
    );
    // The shard did not finish: a truncated file never passes for a complete shard.
    let s = served.covd(&["status", "--run", "t"]).output().unwrap();
    let text = String::from_utf8_lossy(&s.stdout);
    assert!(!text.contains("finished"), "{text}");
}

#[test]
fn fetch_wait_that_times_out_is_exit_4_and_names_the_missing_shards() {
    let served = Served::start();
    assert!(
        served
            .covd(&["open", "--run", "w", "--shard-ids", "a,b"])
            .status()
            .unwrap()
            .success()
    );
    let r = served
        .covd(&["push", "--run", "w", "--shard", "a"])
        .arg(fixture("gcc-lcov/shard1.info"))
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let r = served
        .covd(&["fetch", "--run", "w", "--wait", "--timeout", "300ms"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&r.stderr).contains("INCOMPLETE: missing shards b"));
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("end_of_record"),
        "the partial merge is written"
    );
}

#[test]
fn push_without_a_daemon_warns_unless_asked_to_fail() {
    // A port nobody listens on, and none a test daemon can get: below the range the OS
    // chooses ports from for 127.0.0.1:0, and privileged.
    let url = "http://127.0.0.1:1".to_owned();
    let push = |extra: &[&str]| {
        Command::new(COVD)
            .args([
                "push",
                "--run",
                "x",
                "--shard",
                "0",
                "--retries",
                "0",
                "--server",
                &url,
            ])
            .args(extra)
            .arg(fixture("gcc-lcov/shard1.info"))
            .output()
            .unwrap()
    };
    let r = push(&[]);
    assert_eq!(r.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&r.stderr).contains("coverage not sent"));
    let r = push(&["--fail-on-error"]);
    assert_eq!(
        r.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}

#[test]
fn push_detects_coverage_py_json_and_refuses_unknown_formats() {
    use std::io::Read;
    let served = Served::start();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("coverage.json");
    let mut text = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(corpus("python-toolz/same-path/shard2.json.gz")).unwrap(),
    )
    .read_to_string(&mut text)
    .unwrap();
    std::fs::write(&json, text).unwrap();
    let r = served
        .covd(&["push", "--run", "j", "--shard", "0"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let lcov = read_lcov(
        &corpus("python-toolz/same-path/shard2.lcov"),
        &PathRules::default(),
    );
    let s = served.covd(&["status", "--run", "j"]).output().unwrap();
    let lines = lcov.totals();
    assert!(
        String::from_utf8_lossy(&s.stdout)
            .contains(&format!("lines {}/{}", lines.lines_covered, lines.lines)),
        "{}",
        String::from_utf8_lossy(&s.stdout)
    );

    let odd = dir.path().join("odd.txt");
    std::fs::write(&odd, "hello\n").unwrap();
    let r = served
        .covd(&["push", "--run", "j2", "--shard", "0"])
        .arg(&odd)
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("not a coverage format covd recognises"));
}

#[test]
fn push_watch_streams_files_while_the_command_runs_and_exits_with_its_code() {
    let served = Served::start();
    let dir = tempfile::tempdir().unwrap();
    let cov = dir.path().join("cov");
    // What the run holds with the first file alone: its totals line.
    let alone = served
        .covd(&["push", "--run", "ref", "--shard", "0"])
        .args(["--strip-prefix", "/builds/shard-1/"])
        .arg(fixture("gcc-lcov/shard1.info"))
        .status()
        .unwrap();
    assert!(alone.success());
    let status = served.covd(&["status", "--run", "ref"]).output().unwrap();
    let first_file = String::from_utf8_lossy(&status.stdout)
        .lines()
        .find(|l| l.trim_start().starts_with("files "))
        .unwrap()
        .trim()
        .to_owned();
    assert!(first_file.contains("lines 35/73"), "{first_file}");
    // The "test command": writes one coverage file, waits until the daemon has merged it (for
    // a minute at most), shows the run's status, writes another, and fails.
    let script = format!(
        "mkdir -p {cov}; cp {a} {cov}/a.info; \
         for i in $(seq 300); do {covd} status --run w | grep -q 'files 2' && break; sleep 0.2; done; \
         {covd} status --run w | sed 's/^/during: /'; \
         cp {b} {cov}/b.info; exit 3",
        cov = cov.display(),
        a = fixture("gcc-lcov/shard1.info").display(),
        b = fixture("gcc-lcov/shard2.info").display(),
        covd = COVD,
    );
    let r = served
        .covd(&[
            "push",
            "--run",
            "w",
            "--shard",
            "0",
            "--settle",
            "100ms",
            "--strip-prefix",
            "/builds/shard-1/",
            "--strip-prefix",
            "/builds/shard-2/",
            "--watch",
        ])
        .arg(&cov)
        .args(["--", "sh", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert_eq!(
        r.status.code(),
        Some(3),
        "the test command's own exit code; {}",
        String::from_utf8_lossy(&r.stderr)
    );
    // While the command ran, the run held the first file's coverage, from a shard still
    // streaming: sent then, not at the command's exit.
    let during: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("during: "))
        .collect();
    assert!(
        during.iter().any(|l| l.trim() == first_file),
        "the run did not hold {first_file:?} while the command ran: {stdout}"
    );
    assert!(during.iter().any(|l| l.contains("streaming")), "{stdout}");

    let out = dir.path().join("merged.info");
    let f = served
        .covd(&["fetch", "--run", "w", "--output"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(f.status.success());
    let mut expected = read_lcov(
        &fixture("gcc-lcov/shard1.info"),
        &PathRules {
            strip: vec!["/builds/shard-1/".into()],
            ..Default::default()
        },
    );
    expected.merge(&read_lcov(
        &fixture("gcc-lcov/shard2.info"),
        &PathRules {
            strip: vec!["/builds/shard-2/".into()],
            ..Default::default()
        },
    ));
    assert_eq!(read_lcov(&out, &PathRules::default()), expected);
    let s = served.covd(&["status", "--run", "w"]).output().unwrap();
    assert!(String::from_utf8_lossy(&s.stdout).contains("finished"));
}

#[test]
fn fetch_html_writes_a_report_with_marked_sources() {
    let served = Served::start();
    for (shard, prefix) in [("1", "/builds/shard-1/"), ("2", "/builds/shard-2/")] {
        let r = served
            .covd(&[
                "push",
                "--run",
                "h",
                "--shard",
                shard,
                "--strip-prefix",
                prefix,
            ])
            .arg(fixture(&format!("gcc-lcov/shard{shard}.info")))
            .output()
            .unwrap();
        assert!(r.status.success());
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let r = served
        .covd(&["fetch", "--run", "h", "--format", "html", "--output"])
        .arg(&out)
        .arg("--source-root")
        .arg(fixture("gcc-lcov"))
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let index = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(index.contains("src/"), "{index}");
    assert!(index.contains("Completeness unknown"));
    // The directory page links both files; each file page shows its source, marked.
    let pages = report_pages(&out);
    let calc = pages
        .iter()
        .find(|p| p.contains("src/calc.c"))
        .expect("a page for calc.c");
    // `clamp` (line 57) ran in no shard: marked as missed, with its source text.
    let clamp = calc
        .split("<tr")
        .find(|r| r.contains(r#"<td class="num">57</td>"#))
        .unwrap();
    assert!(clamp.starts_with(r#" class="miss""#), "{clamp}");
    assert!(clamp.contains("clamp"), "{clamp}");
    assert!(calc.contains(r#"<tr class="hit">"#));
    assert!(calc.contains(r#"<tr class="partial">"#));
    // Nothing outside the report directory.
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("report")]);

    let r = served
        .covd(&["fetch", "--run", "h", "--format", "html"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2), "html needs --output");
}

#[test]
fn junit_results_pushed_with_coverage_are_stored_with_the_shard() {
    let mut served = Served::start();
    let r = served
        .covd(&["push", "--run", "t", "--shard", "0"])
        .arg(fixture("gcc-lcov/shard1.info"))
        .arg(fixture("junit/pytest-junit.xml"))
        .arg(fixture("junit/mocha-xunit.xml"))
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let expect = "tests 8 passed, 5 failed, 5 skipped, 2 errored";
    let s = served.covd(&["status", "--run", "t"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&s.stdout).contains(expect),
        "{}",
        String::from_utf8_lossy(&s.stdout)
    );
    // Stored: a restarted daemon still has every test case.
    served.terminate();
    let served = Served::on(
        std::mem::replace(&mut served.data, tempfile::tempdir().unwrap()),
        "127.0.0.1:0",
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let status = runtime.block_on(async {
        covd::client::Client::connect(&served.url)
            .unwrap()
            .status("t")
            .await
            .unwrap()
    });
    let telemetry = status.shards[0].telemetry.as_ref().unwrap();
    assert_eq!(telemetry.tests.len(), 20);
    let fail = telemetry
        .tests
        .iter()
        .find(|t| t.name == "test_fail")
        .unwrap();
    assert_eq!(fail.status, covd::model::TestStatus::Failed);
}

#[test]
fn push_watch_skips_unknown_files_and_second_formats_instead_of_counting_twice() {
    let served = Served::start();
    let dir = tempfile::tempdir().unwrap();
    let cov = dir.path().join("cov");
    std::fs::create_dir_all(&cov).unwrap();
    // What jest does: the same coverage in several formats, plus stray files.
    std::fs::copy(fixture("gcc-lcov/shard1.info"), cov.join("a.info")).unwrap();
    std::fs::copy(fixture("gcovr/shard1.json"), cov.join("z.json")).unwrap();
    std::fs::write(cov.join("notes.txt"), "not coverage\n").unwrap();
    let r = served
        .covd(&[
            "push",
            "--run",
            "j",
            "--shard",
            "0",
            "--strip-prefix",
            "/builds/shard-1/",
            "--watch",
        ])
        .arg(&cov)
        .args(["--", "true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(0), "{err}");
    assert!(err.contains("notes.txt: not a coverage format"), "{err}");
    assert!(
        err.contains("z.json is GcovrJson coverage, but this shard sends Lcov; skipped"),
        "{err}"
    );
    let out = dir.path().join("m.info");
    assert!(
        served
            .covd(&["fetch", "--run", "j", "--output"])
            .arg(&out)
            .status()
            .unwrap()
            .success()
    );
    let lcov = read_lcov(
        &fixture("gcc-lcov/shard1.info"),
        &PathRules {
            strip: vec!["/builds/shard-1/".into()],
            ..Default::default()
        },
    );
    assert_eq!(read_lcov(&out, &PathRules::default()), lcov, "counted once");
}

/// Two `covd push` of one shard and attempt at once (a CI job retried without a new attempt
/// number): one wins, the other exits 2 saying another push holds the attempt, and the run
/// holds exactly the winner's coverage; never both "succeeded" with coverage missing.
#[test]
fn two_pushes_of_one_attempt_at_once_never_lose_coverage_silently() {
    let served = Served::start();
    let dir = tempfile::tempdir().unwrap();
    // Six deltas each (100 files a delta), so that the pushes interleave.
    let input = |name: &str| {
        let path = dir.path().join(format!("{name}.info"));
        let mut text = String::new();
        for i in 0..600 {
            text.push_str(&format!(
                "SF:{name}/f{i}.c\nDA:1,1\nDA:2,{}\nend_of_record\n",
                i % 3
            ));
        }
        std::fs::write(&path, text).unwrap();
        path
    };
    let inputs = [input("a"), input("b")];
    let expected: Vec<Coverage> = inputs
        .iter()
        .map(|p| read_lcov(p, &PathRules::default()))
        .collect();
    for round in 0..12 {
        let run = format!("race-{round}");
        let ok = served
            .covd(&["open", "--run", &run, "--shards", "1"])
            .output()
            .unwrap();
        assert!(ok.status.success());
        let pushes: Vec<std::process::Child> = inputs
            .iter()
            .map(|input| {
                served
                    .covd(&["push", "--run", &run, "--shard", "0", "--fail-on-error"])
                    .arg(input)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outcomes: Vec<(Option<i32>, String)> = pushes
            .into_iter()
            .map(|p| {
                let out = p.wait_with_output().unwrap();
                (
                    out.status.code(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                )
            })
            .collect();
        let winners: Vec<usize> = (0..2).filter(|&i| outcomes[i].0 == Some(0)).collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        let (code, stderr) = &outcomes[1 - winners[0]];
        assert_eq!(*code, Some(2), "round {round}: {stderr}");
        assert!(
            stderr.contains("another push") && stderr.contains("--attempt"),
            "round {round}: {stderr}"
        );
        let fetched = served
            .covd(&["fetch", "--run", &run, "--wait", "--timeout", "30s"])
            .output()
            .unwrap();
        assert!(fetched.status.success(), "round {round}");
        let merged = parse_lcov_bytes(&fetched.stdout);
        assert_eq!(
            merged, expected[winners[0]],
            "round {round}: the run holds exactly the winner's coverage"
        );
    }
}

/// `--format` names every format covd reads (the README tells jest users to pick one).
#[test]
fn push_format_names_every_reader() {
    let served = Served::start();
    for (format, file) in [
        ("llvm-cov", "llvm-cov/shard1.json"),
        ("jacoco", "jacoco/shard1.xml"),
        ("clover", "clover/shard1.xml"),
        ("istanbul", "istanbul/nyc-shard1.json"),
        ("gcovr-json", "gcovr/shard1.json"),
    ] {
        let out = served
            .covd(&["push", "--run", format, "--shard", "0", "--fail-on-error"])
            .args(["--format", format])
            .arg(fixture(file))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{format}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status = served.covd(&["status", "--run", format]).output().unwrap();
        let status = String::from_utf8(status.stdout).unwrap();
        assert!(!status.contains("files 0 "), "{format}: {status}");
    }
    let help = served.covd(&["push", "--help"]).output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for name in covd::formats::Format::NAMES {
        assert!(help.contains(name), "push --help does not list {name}");
    }
}

/// The quickstart's HTML report shows the demo's own sources (shipped beside its coverage),
/// not whatever `src/lib.rs` the current directory holds.
#[test]
fn the_quickstart_report_shows_the_demo_sources() {
    let served = Served::start();
    let quickstart = fixture("../../examples/quickstart");
    for (shard, file) in [("0", "shard-a.info"), ("1", "shard-b.info")] {
        let r = served
            .covd(&["push", "--run", "q", "--shard", shard])
            .arg(quickstart.join(file))
            .output()
            .unwrap();
        assert!(r.status.success());
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let r = served
        .covd(&["fetch", "--run", "q", "--format", "html", "--output"])
        .arg(&out)
        .arg("--source-root")
        .arg(&quickstart)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let pages = report_pages(&out);
    let lib = pages
        .iter()
        .find(|p| p.contains("src/lib.rs"))
        .expect("a page for src/lib.rs");
    // Line 12 ran in both shards; the demo's own line, not covd's.
    let line = lib
        .split("<tr")
        .find(|r| r.contains(r#"<td class="num">12</td>"#))
        .unwrap();
    assert!(line.contains("let quotient = a / b;"), "{line}");
    assert!(
        !lib.contains("pub mod client"),
        "covd's own src/lib.rs was shown"
    );
}

/// coverage.py's Cobertura names files relative to an absolute `<source>` on the CI machine
/// (`/srv/ci/workspace/toolz-1.2.0/toolz`), where its LCOV and JSON write `toolz/…`. Mixed in one
/// run, the two must be one entry per file, without path rules: through the run's repository
/// files (`--files-from`), or, without them, the CI workspace the push runs in.
#[test]
fn coverage_py_cobertura_and_lcov_shards_name_files_alike() {
    use std::io::Read;
    let served = Served::start();
    let dir = tempfile::tempdir().unwrap();
    let same = corpus("python-toolz/same-path");
    let lcov = same.join("full-run.lcov");
    let xml = dir.path().join("coverage.xml");
    let mut text = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(same.join("merged.cobertura.xml.gz")).unwrap(),
    )
    .read_to_string(&mut text)
    .unwrap();
    std::fs::write(&xml, text).unwrap();
    let oracle = read_lcov(&lcov, &PathRules::default());
    let files = dir.path().join("files.txt");
    let listed: String = oracle.files.keys().map(|p| format!("{p}\n")).collect();
    std::fs::write(&files, listed).unwrap();

    let push = |run: &str, shard: &str, input: &std::path::Path, workspace: Option<&str>| {
        let mut c = served.covd(&["push", "--run", run, "--shard", shard, "--fail-on-error"]);
        c.arg(input).current_dir(dir.path());
        for v in ["GITHUB_WORKSPACE", "CI_PROJECT_DIR", "WORKSPACE"] {
            c.env_remove(v);
        }
        if let Some(w) = workspace {
            c.env("GITHUB_WORKSPACE", w);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let merged_paths = |run: &str| {
        let out = served.covd(&["fetch", "--run", run]).output().unwrap();
        assert!(out.status.success());
        parse_lcov_bytes(&out.stdout)
            .files
            .into_keys()
            .collect::<Vec<_>>()
    };
    let want: Vec<String> = oracle.files.keys().cloned().collect();

    // The run knows the repository's files: the Cobertura paths resolve to them.
    let out = served
        .covd(&["open", "--run", "listed", "--shards", "2", "--files-from"])
        .arg(&files)
        .output()
        .unwrap();
    assert!(out.status.success());
    push("listed", "0", &lcov, None);
    let said = push("listed", "1", &xml, None);
    assert!(
        !said.contains("not among the run's files"),
        "nothing stays unknown: {said}"
    );
    assert_eq!(merged_paths("listed"), want);

    // No file list: the push makes paths under its CI workspace relative to it.
    push("ws", "0", &lcov, None);
    push("ws", "1", &xml, Some("/srv/ci/workspace/toolz-1.2.0"));
    assert_eq!(merged_paths("ws"), want);
    // The merge of the two is exact: coverage.py's Cobertura lines are its LCOV's.
    let out = served.covd(&["fetch", "--run", "listed"]).output().unwrap();
    let merged = parse_lcov_bytes(&out.stdout);
    for (path, file) in &oracle.files {
        assert_eq!(merged.files[path].lines(), file.lines(), "{path}");
    }
}

/// The file pages of an HTML report.
fn report_pages(report: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(report.join("f"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect()
}
