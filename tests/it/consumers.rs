//! covd's exports read by the tools that consume them, installed from the registries by
//! `.ci/tools`: lcov 1.16 and lcov 2.3.1 (`lcov --summary` and `genhtml`) on the LCOV exports,
//! pycobertura on the Cobertura export. What each reports of covd's merge must equal what it
//! reports of the real tools' own merge of the same shards (`lcov -a` for gcc, coverage.py's
//! `combine` for toolz), and the figures are also stated, so that two empty reports cannot agree.

use std::path::{Path, PathBuf};
use std::process::Command;

use covd::model::path::PathRules;
use covd::service::{ExportFormat, RunParams};

use crate::support::*;

pub(crate) use crate::services::tools;

#[derive(Debug, Clone, Copy)]
enum Lcov {
    /// Debian 12's lcov 1.16.
    V1,
    /// Debian 13's lcov 2.3.1.
    V2,
}

impl Lcov {
    /// `lcov` or `genhtml` of this version, with branch coverage on.
    fn command(self, program: &str) -> Command {
        match self {
            Lcov::V1 => {
                let mut c = Command::new(program);
                c.args(["--rc", "lcov_branch_coverage=1"]);
                c
            }
            Lcov::V2 => {
                let root = tools().join("lcov-2.3.1");
                let mut c = Command::new("perl");
                c.arg("-I")
                    .arg(root.join("usr/lib/lcov"))
                    .arg(root.join("usr/bin").join(program))
                    .arg("--config-file")
                    .arg(root.join("etc/lcovrc"))
                    // lcov 2 warns that Debian 12's gcc is too old to find function ends,
                    // though it reads tracefiles only.
                    .args(["--branch-coverage", "--ignore-errors", "unsupported"]);
                c
            }
        }
    }
}

/// Covered and total lines, functions and branches, as lcov or genhtml prints them.
#[derive(Debug, PartialEq, Eq)]
struct Summary {
    lines: Option<(u64, u64)>,
    functions: Option<(u64, u64)>,
    branches: Option<(u64, u64)>,
}

fn run(mut command: Command) -> String {
    tools();
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{command:?} failed:\n{text}");
    text
}

/// Reads `  lines......: 84.9% (62 of 73 lines)` and its siblings; `no data found` is `None`.
fn summary(text: &str) -> Summary {
    let figure = |what: &str| {
        let line = text
            .lines()
            .map(str::trim_start)
            .find(|l| l.starts_with(what) && l[what.len()..].starts_with('.'))
            .unwrap_or_else(|| panic!("no {what} in:\n{text}"));
        let (_, inner) = line.split_once('(')?;
        let (hit, rest) = inner.split_once(" of ")?;
        let total = rest.split_whitespace().next()?;
        Some((hit.parse().unwrap(), total.parse().unwrap()))
    };
    Summary {
        lines: figure("lines"),
        functions: figure("functions"),
        branches: figure("branches"),
    }
}

fn lcov_summary(lcov: Lcov, tracefile: &Path, extra: &[&str]) -> Summary {
    let mut c = lcov.command("lcov");
    c.args(extra).arg("--summary").arg(tracefile);
    summary(&run(c))
}

/// genhtml's overall rates, and the report's index page.
fn genhtml(lcov: Lcov, tracefile: &Path, out: &Path, extra: &[&str]) -> (Summary, String) {
    let mut c = lcov.command("genhtml");
    if let Lcov::V2 = lcov {
        // genhtml 2 opens the sources even with --no-source; these are not on this machine.
        c.arg("--synthesize-missing");
    }
    // Relative paths are read against the working directory: not the project's own sources.
    c.current_dir(out.parent().unwrap());
    c.args(extra)
        .args(["--no-source", "--output-directory"])
        .arg(out)
        .arg(tracefile);
    let text = run(c);
    let index = std::fs::read_to_string(out.join("index.html")).unwrap();
    (summary(&text), index)
}

async fn export_to(
    client: &mut covd::client::Client,
    run_id: &str,
    format: ExportFormat,
    path: &Path,
) -> PathBuf {
    let mut out = Vec::new();
    client
        .export_as(run_id, format, None, &mut out)
        .await
        .unwrap();
    std::fs::write(path, out).unwrap();
    path.to_owned()
}

async fn gcc_run(daemon: &Daemon) -> covd::client::Client {
    let mut client = daemon.client();
    let params = RunParams {
        expected_shards: (1..=3).map(|i| i.to_string()).collect(),
        ..RunParams::default()
    };
    client.open_run("gcc", params).await.unwrap();
    for i in 1..=3 {
        let rules = PathRules {
            strip: vec![format!("/builds/shard-{i}/")],
            ..PathRules::default()
        };
        let coverage = read_lcov(&fixture(&format!("gcc-lcov/shard{i}.info")), &rules);
        push(&mut client, "gcc", &i.to_string(), 1, coverage).await;
    }
    client
}

async fn toolz_run(daemon: &Daemon) -> covd::client::Client {
    let mut client = daemon.client();
    let params = RunParams {
        expected_shards: (1..=4).map(|i| i.to_string()).collect(),
        ..RunParams::default()
    };
    client.open_run("toolz", params).await.unwrap();
    for i in 1..=4 {
        let shard = corpus(&format!("python-toolz/same-path/shard{i}.lcov"));
        let coverage = read_lcov(&shard, &PathRules::default());
        push(&mut client, "toolz", &i.to_string(), 1, coverage).await;
    }
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lcov_1_and_2_read_the_gcc_exports_as_they_read_lcov_a() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start().await;
    let mut client = gcc_run(&daemon).await;
    let lcov2 = export_to(
        &mut client,
        "gcc",
        ExportFormat::Lcov,
        &dir.path().join("a.info"),
    )
    .await;
    let lcov1 = export_to(
        &mut client,
        "gcc",
        ExportFormat::Lcov1,
        &dir.path().join("b.info"),
    )
    .await;
    let oracle = fixture("gcc-lcov/merged.info");
    let expected = Summary {
        lines: Some((62, 73)),
        functions: Some((7, 8)),
        branches: Some((37, 44)),
    };
    for (lcov, ours) in [(Lcov::V1, &lcov1), (Lcov::V2, &lcov2), (Lcov::V2, &lcov1)] {
        assert_eq!(
            lcov_summary(lcov, &oracle, &[]),
            expected,
            "{lcov:?} on lcov -a"
        );
        assert_eq!(
            lcov_summary(lcov, ours, &[]),
            expected,
            "{lcov:?} on {ours:?}"
        );
        let (theirs, _) = genhtml(lcov, &oracle, &dir.path().join("oracle"), &[]);
        let html = dir.path().join(format!("{lcov:?}"));
        let (rates, index) = genhtml(lcov, ours, &html, &[]);
        assert_eq!(theirs, expected, "genhtml {lcov:?} on lcov -a");
        assert_eq!(rates, expected, "genhtml {lcov:?} on {ours:?}");
        assert!(
            index.contains("href=\"src/index.html\""),
            "{lcov:?}: the report links src/"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lcov_1_and_2_read_the_python_exports_as_lcov_2_reads_coverage_py_combine() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start().await;
    let mut client = toolz_run(&daemon).await;
    let lcov2 = export_to(
        &mut client,
        "toolz",
        ExportFormat::Lcov,
        &dir.path().join("a.info"),
    )
    .await;
    let lcov1 = export_to(
        &mut client,
        "toolz",
        ExportFormat::Lcov1,
        &dir.path().join("b.info"),
    )
    .await;
    // coverage.py marks a function not hit whose first line ran (a decorated function, a
    // lambda): lcov 2 calls that inconsistent, and when told to go on counts such a function
    // hit. covd keeps what coverage.py measured, so both tracefiles need the same leave.
    let lenient = ["--ignore-errors", "inconsistent"];
    let merged = corpus("python-toolz/same-path/merged.lcov");
    let oracle = lcov_summary(Lcov::V2, &merged, &lenient);
    assert_eq!(
        oracle,
        Summary {
            lines: Some((3037, 3157)),
            functions: Some((451, 454)),
            branches: Some((469, 516)),
        }
    );
    assert_eq!(lcov_summary(Lcov::V2, &lcov2, &lenient), oracle, "lcov 2");
    let (rates, _) = genhtml(Lcov::V2, &lcov2, &dir.path().join("v2"), &lenient);
    assert_eq!(rates, oracle, "genhtml 2");

    // lcov 1.x reads neither 3-field FN nor named arms: the 1.x form gives it everything. It
    // counts functions as FNDA says, as coverage.py's own FNH does.
    let fnh: u64 = std::fs::read_to_string(&merged)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("FNH:"))
        .map(|n| n.parse::<u64>().unwrap())
        .sum();
    assert_eq!(fnh, 418);
    let as_written = Summary {
        functions: Some((fnh, 454)),
        ..oracle
    };
    assert_eq!(lcov_summary(Lcov::V1, &lcov1, &[]), as_written, "lcov 1.16");
    // Without end lines, lcov 2 has nothing to call inconsistent either.
    assert_eq!(
        lcov_summary(Lcov::V2, &lcov1, &[]),
        as_written,
        "lcov 2, 1.x form"
    );
    let (rates, index) = genhtml(Lcov::V1, &lcov1, &dir.path().join("v1"), &[]);
    assert_eq!(rates, as_written, "genhtml 1.16");
    assert!(
        index.contains("href=\"toolz/index.html\""),
        "the report links toolz/"
    );
}

/// A file as pycobertura shows it: name, statements, misses, and the missing lines (`~` marks a
/// line that ran with a branch not taken).
type ShownFile = (String, u64, u64, String);

/// pycobertura's `show --format json`: per file and in total (statements, misses), where a
/// line is missed when it did not run or one of its branches was not taken.
fn pycobertura(xml: &Path) -> (Vec<ShownFile>, (u64, u64)) {
    let mut c = Command::new(tools().join("venv/bin/pycobertura"));
    c.args(["show", "--format", "json"]).arg(xml);
    let out = run(c);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let files = json["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["Filename"].as_str().unwrap().to_owned(),
                f["Stmts"].as_u64().unwrap(),
                f["Miss"].as_u64().unwrap(),
                f["Missing"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let total = (
        json["total"]["Stmts"].as_u64().unwrap(),
        json["total"]["Miss"].as_u64().unwrap(),
    );
    (files, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pycobertura_reads_the_cobertura_export_as_coverage_py_combine() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start().await;
    let mut client = toolz_run(&daemon).await;
    let ours = export_to(
        &mut client,
        "toolz",
        ExportFormat::Cobertura,
        &dir.path().join("ours.xml"),
    )
    .await;
    let oracle = dir.path().join("oracle.xml");
    let mut xml = Vec::new();
    std::io::copy(
        &mut flate2::read::GzDecoder::new(
            std::fs::File::open(corpus("python-toolz/same-path/merged.cobertura.xml.gz")).unwrap(),
        ),
        &mut xml,
    )
    .unwrap();
    std::fs::write(&oracle, xml).unwrap();

    let (our_files, our_total) = pycobertura(&ours);
    let (mut their_files, their_total) = pycobertura(&oracle);
    // coverage.py names files relative to its <source>, the package directory.
    for f in &mut their_files {
        f.0.insert_str(0, "toolz/");
    }
    their_files.sort();
    let mut our_files = our_files;
    our_files.sort();
    assert_eq!(their_total, (3157, 145));
    assert_eq!(our_total, their_total);
    assert_eq!(our_files.len(), 30);
    assert_eq!(our_files, their_files);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pycobertura_reads_the_gcc_cobertura_export_as_lcov_a_counts() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start().await;
    let mut client = gcc_run(&daemon).await;
    let ours = export_to(
        &mut client,
        "gcc",
        ExportFormat::Cobertura,
        &dir.path().join("ours.xml"),
    )
    .await;
    let (files, total) = pycobertura(&ours);
    // From lcov -a's tracefile, read by hand: statements are DA lines; a line is missed when
    // its count is 0 or a BRDA of it was not taken (`-` or 0).
    let oracle = std::fs::read_to_string(fixture("gcc-lcov/merged.info")).unwrap();
    let mut expected = Vec::new();
    for record in oracle.split("end_of_record").filter(|r| r.contains("SF:")) {
        let mut name = String::new();
        let mut lines = std::collections::BTreeMap::<u32, bool>::new();
        let mut partial = std::collections::BTreeSet::new();
        for l in record.lines() {
            if let Some(sf) = l.strip_prefix("SF:") {
                name = sf.to_owned();
            } else if let Some(da) = l.strip_prefix("DA:") {
                let (n, hits) = da.split_once(',').unwrap();
                lines.insert(n.parse().unwrap(), hits != "0");
            } else if let Some(brda) = l.strip_prefix("BRDA:") {
                let fields: Vec<&str> = brda.split(',').collect();
                if matches!(fields[3], "-" | "0") {
                    partial.insert(fields[0].parse::<u32>().unwrap());
                }
            }
        }
        let missed = lines
            .iter()
            .filter(|(n, hit)| !**hit || partial.contains(*n))
            .count();
        expected.push((name, lines.len() as u64, missed as u64));
    }
    let got: Vec<_> = files.iter().map(|f| (f.0.clone(), f.1, f.2)).collect();
    assert_eq!(got, expected);
    assert_eq!(total, (73, 13));
    assert_eq!(files[1].3, "~14, 21, 37-38, ~44, 45-46", "src/main.c");
}
