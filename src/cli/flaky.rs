//! `covd flaky`: the flaky and broken tests of a branch, or, with `--run`, the shards of a run
//! that were retried: what flipped between their attempts and what each attempt covered that
//! the other did not.

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, ValueEnum};
use covd::flaky::Class;
use covd::service::{ShardAttempts, TestStanding};
use roaring::RoaringBitmap;
use serde_json::json;

use super::attribution::ranges_of;
use super::{Failure, ServerArg, client, from_ci, or_ci};

#[derive(Debug, Args)]
pub(super) struct FlakyArgs {
    #[command(flatten)]
    server: ServerArg,
    /// The project (in CI, by default, the repository).
    #[arg(long, env = "COVD_PROJECT", default_value_t = from_ci(|c| c.project.clone()),
          hide_default_value = true, value_parser = or_ci(|c| c.project.clone()))]
    project: String,
    /// The branch (in CI, by default, the provider's).
    #[arg(long, env = "COVD_BRANCH", default_value_t = from_ci(|c| c.branch.clone()),
          hide_default_value = true, value_parser = or_ci(|c| c.branch.clone()))]
    branch: String,
    /// Also the tests that only failed now and then (regressions fixed on a later commit).
    #[arg(long)]
    all: bool,
    /// Instead: the shards of this run that had several attempts.
    #[arg(long, conflicts_with = "all")]
    run: Option<String>,
    /// `text` or `json`.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    format: Output,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

pub(super) async fn flaky(a: FlakyArgs) -> Result<ExitCode, Failure> {
    let mut c = client(&a.server)?;
    let mut out = io::stdout().lock();
    if let Some(run) = &a.run {
        let shards = c.attempts(run).await?;
        match a.format {
            Output::Text => {
                let _ = out.write_all(attempts_text(&shards).as_bytes());
                if shards.is_empty() {
                    eprintln!("no shard of run {run} was retried");
                }
            }
            Output::Json => {
                let _ = writeln!(out, "{}", attempts_json(&shards));
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let tests = c.flaky_tests(&a.project, &a.branch, a.all).await?;
    match a.format {
        Output::Text => {
            let _ = out.write_all(standings_text(&tests).as_bytes());
            let count = |c: Class| tests.iter().filter(|t| t.health.class == c).count();
            eprintln!(
                "{} broken, {} flaky tests on {} {} (each from its latest {} runs)",
                count(Class::Broken),
                count(Class::Flaky),
                if a.project.is_empty() {
                    "(no project)"
                } else {
                    &a.project
                },
                if a.branch.is_empty() {
                    "(no branch)"
                } else {
                    &a.branch
                },
                covd::flaky::WINDOW
            );
        }
        Output::Json => {
            let _ = writeln!(out, "{}", standings_json(&tests));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn class_name(c: Class) -> &'static str {
    match c {
        Class::Broken => "broken",
        Class::Flaky => "flaky",
        Class::Healthy => "healthy",
    }
}

fn day(ms: u64) -> String {
    covd::history::day_label(ms)
}

fn time(ms: u64) -> String {
    humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn standings_text(tests: &[TestStanding]) -> String {
    let mut out = String::new();
    for t in tests {
        let h = &t.health;
        out.push_str(&format!(
            "{:<7} failed {} of the last {} runs{}  first seen {}  last flip {}  {}\n",
            class_name(h.class),
            h.failed,
            h.runs,
            if h.flaky_commits > 0 {
                format!(" (failed and passed on {} commits)", h.flaky_commits)
            } else {
                String::new()
            },
            day(h.first_seen_ms),
            h.last_flip_ms.map_or_else(|| "never".to_owned(), day),
            t.test
        ));
    }
    out
}

fn standings_json(tests: &[TestStanding]) -> serde_json::Value {
    let tests: Vec<_> = tests
        .iter()
        .map(|t| {
            let h = &t.health;
            json!({
                "test": t.test,
                "class": class_name(h.class),
                "failed": h.failed,
                "runs": h.runs,
                "flaky_commits": h.flaky_commits,
                "first_seen": time(h.first_seen_ms),
                "last_seen": time(h.last_seen_ms),
                "last_flip": h.last_flip_ms.map(time),
            })
        })
        .collect();
    json!({ "tests": tests })
}

fn attempts_text(shards: &[ShardAttempts]) -> String {
    let mut out = String::new();
    for s in shards {
        let attempts: Vec<String> = s
            .attempts
            .iter()
            .map(|a| {
                let results = match a.tests {
                    Some([p, f, sk, e]) => format!(
                        " ({p} passed, {f} failed, {sk} skipped, {e} errored{})",
                        if a.infrastructure_failure {
                            "; most failed at once: infrastructure, not counted"
                        } else {
                            ""
                        }
                    ),
                    None => String::new(),
                };
                format!(
                    "attempt {}{}{results}",
                    a.attempt,
                    if a.current { ", current" } else { "" }
                )
            })
            .collect();
        out.push_str(&format!(
            "shard {}: {}\n",
            s.shard_id,
            attempts.join(" -> ")
        ));
        for f in &s.flipped {
            out.push_str(&format!(
                "  flipped: {} (failed in attempt {}, passed in {})\n",
                f.test,
                join(&f.failed_in),
                join(&f.passed_in)
            ));
        }
        for d in &s.differences {
            for (label, files) in [
                (
                    format!(
                        "attempt {} covered, attempt {} did not",
                        d.attempt, d.against
                    ),
                    &d.only_in_attempt,
                ),
                (
                    format!(
                        "attempt {} covered, attempt {} did not",
                        d.against, d.attempt
                    ),
                    &d.only_in_against,
                ),
            ] {
                let lines: u64 = files.iter().map(|(_, l)| l.len()).sum();
                out.push_str(&format!("  {label}: {lines} lines\n"));
                for (path, l) in files.iter() {
                    out.push_str(&format!("    {path}: {}\n", ranges_of(l)));
                }
            }
        }
    }
    out
}

fn join(attempts: &[u32]) -> String {
    attempts
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn attempts_json(shards: &[ShardAttempts]) -> serde_json::Value {
    let files = |files: &[(std::sync::Arc<str>, RoaringBitmap)]| -> Vec<serde_json::Value> {
        files
            .iter()
            .map(|(p, l)| json!({"path": p.as_ref(), "lines": l.iter().collect::<Vec<u32>>()}))
            .collect()
    };
    let shards: Vec<_> = shards
        .iter()
        .map(|s| {
            let attempts: Vec<_> = s
                .attempts
                .iter()
                .map(|a| {
                    json!({
                        "attempt": a.attempt,
                        "current": a.current,
                        "finished": a.finished,
                        "deltas": a.deltas,
                        "tests": a.tests.map(|[p, f, sk, e]| json!({
                            "passed": p, "failed": f, "skipped": sk, "errored": e,
                        })),
                        "infrastructure_failure": a.infrastructure_failure,
                    })
                })
                .collect();
            let flipped: Vec<_> = s
                .flipped
                .iter()
                .map(
                    |f| json!({"test": f.test, "failed_in": f.failed_in, "passed_in": f.passed_in}),
                )
                .collect();
            let differences: Vec<_> = s
                .differences
                .iter()
                .map(|d| {
                    json!({
                        "attempt": d.attempt,
                        "against": d.against,
                        "only_in_attempt": files(&d.only_in_attempt),
                        "only_in_against": files(&d.only_in_against),
                    })
                })
                .collect();
            json!({
                "shard": s.shard_id,
                "attempts": attempts,
                "flipped": flipped,
                "differences": differences,
            })
        })
        .collect();
    json!({ "shards": shards })
}
