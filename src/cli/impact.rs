//! `covd tests-for`: the tests a change affects, ready for a test runner, with an exit code
//! for each state of the answer so that CI never mistakes "nothing to run" or "cannot tell"
//! for a green run.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use covd::service::{ImpactState, TestImpact};
use roaring::RoaringBitmap;
use serde_json::json;

use super::attribution::ranges_of;
use super::{Failure, RunArg, bad_input, client, read_diff};

/// `tests-for`: no test covers the change.
pub(super) const EXIT_EMPTY: u8 = 5;
/// `tests-for`: covd cannot tell; run every test.
pub(super) const EXIT_UNKNOWN: u8 = 6;

#[derive(Debug, Args)]
pub(super) struct TestsForArgs {
    /// The base run: coverage of the commit the diff starts from, with per-test attribution.
    #[command(flatten)]
    run: RunArg,
    /// The unified diff (`git diff BASE...HEAD`), or `-` for standard input.
    #[arg(long, value_name = "FILE|-")]
    diff: PathBuf,
    /// The tests the head commit has, one per line (a test runner's collection): tests the base
    /// run never saw are selected, selected tests not in it are left out.
    #[arg(long, value_name = "FILE")]
    collected: Option<PathBuf>,
    /// Leading path components to drop from the diff's paths (like `patch -p`); by default
    /// git's `a/` and `b/`.
    #[arg(long, short = 'p', value_name = "N")]
    strip: Option<u32>,
    /// `text`: one test per line on standard output, the rest on standard error; `json`: the
    /// whole answer, with the changed lines each test covers.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    format: Output,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

pub(super) async fn tests_for(a: TestsForArgs) -> Result<ExitCode, Failure> {
    let diff = read_diff(&a.diff)?;
    let collected = match &a.collected {
        None => None,
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))
                .map_err(bad_input)?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect(),
        ),
    };
    let mut client = client(&a.run.server)?;
    let answer = client
        .test_impact(&a.run.run, diff, a.strip, collected)
        .await?;
    let mut out = io::stdout().lock();
    match a.format {
        Output::Json => {
            let _ = writeln!(out, "{}", to_json(&answer));
        }
        Output::Text => text(&answer, &mut out),
    }
    Ok(ExitCode::from(match answer.state {
        ImpactState::Selected => 0,
        ImpactState::Empty => EXIT_EMPTY,
        ImpactState::Unknown => EXIT_UNKNOWN,
    }))
}

/// The tests on `out` (none when the answer is unknown: run everything), what covd saw on
/// standard error.
fn text(answer: &TestImpact, out: &mut impl Write) {
    for file in &answer.files {
        if !file.uncovered.is_empty() {
            eprintln!(
                "{}: changed lines {} ran in no test",
                file.path,
                ranges_of(&file.uncovered)
            );
        }
    }
    match answer.state {
        ImpactState::Unknown => {
            eprintln!("unknown: run every test");
            for why in &answer.unknown {
                eprintln!("  {why}");
            }
        }
        ImpactState::Empty => eprintln!(
            "no test covers the change ({} changed files the run measures, {} not code): \
             nothing to run",
            answer.files.len(),
            answer.ignored.len()
        ),
        ImpactState::Selected => {
            for test in &answer.tests {
                let _ = writeln!(out, "{}", test.name);
            }
            let new = answer.tests.iter().filter(|t| t.new).count();
            eprintln!(
                "{} tests cover the change ({new} new), in {} changed files the run measures",
                answer.tests.len(),
                answer.files.len()
            );
        }
    }
    if !answer.gone.is_empty() {
        eprintln!(
            "left out, not collected at the head commit: {}",
            answer
                .gone
                .iter()
                .map(|t| &**t)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

fn to_json(answer: &TestImpact) -> serde_json::Value {
    let lines = |b: &RoaringBitmap| b.iter().collect::<Vec<u32>>();
    json!({
        "state": match answer.state {
            ImpactState::Selected => "selected",
            ImpactState::Empty => "empty",
            ImpactState::Unknown => "unknown",
        },
        "unknown": answer.unknown,
        "tests": answer.tests.iter().map(|t| json!({
            "name": &*t.name,
            "new": t.new,
            "covers": t.lines.iter().map(|(path, l)| json!({
                "path": &**path,
                "lines": lines(l),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "files": answer.files.iter().map(|f| json!({
            "path": &*f.path,
            "new_path": f.new_path,
            "change": f.change.as_str(),
            "lines": lines(&f.lines),
            "uncovered": lines(&f.uncovered),
            "tests": f.tests,
        })).collect::<Vec<_>>(),
        "ignored": answer.ignored,
        "gone": answer.gone.iter().map(|t| &**t).collect::<Vec<_>>(),
    })
}
