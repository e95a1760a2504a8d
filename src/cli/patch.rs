//! `covd patch`: the coverage of the lines a change adds, for a pull request's check and its
//! comment; with `--watch`, rising live while the run's shards stream.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use covd::client::Client;
use covd::service::{PatchCoverage, RunStatus};
use serde_json::json;
use tokio::sync::mpsc;

use super::attribution::ranges_of;
use super::{Failure, RunArg, client, completeness, read_diff};

/// `patch --fail-under`: the changed lines' coverage is below the bar.
const EXIT_BELOW: u8 = 7;
/// `patch --watch`: the deadline passed before the run was complete (as `fetch --wait`).
const EXIT_TIMEOUT: u8 = 4;

#[derive(Debug, Args)]
pub(super) struct PatchArgs {
    /// The run: coverage of the commit the diff ends at.
    #[command(flatten)]
    run: RunArg,
    /// The unified diff (`git diff BASE...HEAD`), or `-` for standard input.
    #[arg(long, value_name = "FILE|-")]
    diff: PathBuf,
    /// Leading path components to drop from the diff's paths (like `patch -p`); by default
    /// git's `a/` and `b/`.
    #[arg(long, short = 'p', value_name = "N")]
    strip: Option<u32>,
    /// Exit with code 7 when the changed lines' coverage is below this percentage.
    #[arg(long, value_name = "PERCENT", value_parser = percent)]
    fail_under: Option<f64>,
    /// `text`, `markdown` (a pull-request comment) or `json`.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    format: Output,
    /// Follow the run while it streams, one line on standard error each time the figure
    /// changes, and report when it is complete.
    #[arg(long)]
    watch: bool,
    /// How long --watch waits at most for the run to complete (then: exit code 4, with the
    /// report of what the run holds).
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Markdown,
    Json,
}

fn percent(s: &str) -> Result<f64, String> {
    let p: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    if (0.0..=100.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!("{p} is not a percentage from 0 to 100"))
    }
}

pub(super) async fn patch(a: PatchArgs) -> Result<ExitCode, Failure> {
    let diff = read_diff(&a.diff)?;
    let mut c = client(&a.run.server)?;
    let run = a.run.run.as_str();
    let mut timed_out = false;
    let answer = if a.watch {
        match tokio::time::timeout(a.timeout, follow(&mut c, run, &diff, a.strip)).await {
            Ok(answer) => answer?,
            Err(_) => {
                timed_out = true;
                c.patch_coverage(run, diff, a.strip).await?
            }
        }
    } else {
        c.patch_coverage(run, diff, a.strip).await?
    };
    let mut out = io::stdout().lock();
    let report = match a.format {
        Output::Text => text(&answer, a.fail_under),
        Output::Markdown => markdown(run, &answer, a.fail_under),
        Output::Json => to_json(&answer, a.fail_under).to_string() + "\n",
    };
    let _ = out.write_all(report.as_bytes());
    if timed_out {
        eprintln!("run {run} was not complete after {:?}", a.timeout);
        return Ok(ExitCode::from(EXIT_TIMEOUT));
    }
    Ok(match (a.fail_under, percentage(&answer)) {
        (Some(bar), Some(p)) if p < bar => {
            eprintln!("patch coverage {p:.1}% is below {bar}%");
            ExitCode::from(EXIT_BELOW)
        }
        _ => ExitCode::SUCCESS,
    })
}

/// Asks again each time the run changes, says the figure when it moved, and returns the last
/// answer once the run is complete.
async fn follow(
    c: &mut Client,
    run: &str,
    diff: &[u8],
    strip: Option<u32>,
) -> Result<PatchCoverage, Failure> {
    let (tx, mut changes) = mpsc::unbounded_channel::<RunStatus>();
    let mut watcher = c.clone();
    let watched = run.to_owned();
    let watching = tokio::spawn(async move {
        watcher
            .watch(&watched, |s| {
                let _ = tx.send(s.clone());
            })
            .await
    });
    let mut last = None;
    while let Some(mut status) = changes.recv().await {
        // Only the latest state matters.
        while let Ok(newer) = changes.try_recv() {
            status = newer;
        }
        let answer = c.patch_coverage(run, diff.to_vec(), strip).await?;
        let finished = status
            .shards
            .iter()
            .filter(|s| s.state == covd::service::ShardState::Finished)
            .count();
        let figure = (answer.totals(), finished, status.complete);
        if last != Some(figure) {
            let (covered, changed) = answer.totals();
            eprintln!(
                "patch {}  ({finished} shards finished; run {})",
                super::ratio(covered, changed),
                completeness(&status)
            );
            last = Some(figure);
        }
        if status.complete {
            return Ok(answer);
        }
    }
    watching.await.map_err(|e| anyhow::anyhow!(e))??;
    // The watch ended without a complete status (the run was deleted): what is there.
    Ok(c.patch_coverage(run, diff.to_vec(), strip).await?)
}

fn percentage(answer: &PatchCoverage) -> Option<f64> {
    let (covered, changed) = answer.totals();
    (changed > 0).then(|| covered as f64 * 100.0 / changed as f64)
}

fn verdict(answer: &PatchCoverage, bar: Option<f64>) -> Option<bool> {
    Some(percentage(answer)? >= bar?)
}

fn text(answer: &PatchCoverage, bar: Option<f64>) -> String {
    let (covered, changed) = answer.totals();
    let mut s = format!(
        "patch coverage: {} changed lines{}{}\n",
        super::ratio(covered, changed),
        if answer.complete {
            ""
        } else {
            " (run not complete)"
        },
        match verdict(answer, bar) {
            Some(true) => format!(", at or above {}%", bar.unwrap_or_default()),
            Some(false) => format!(", below {}%", bar.unwrap_or_default()),
            None => String::new(),
        }
    );
    if changed == 0 {
        s.push_str("  no added line is one the run measures\n");
    }
    for f in &answer.files {
        let missed = &f.changed - &f.covered;
        s.push_str(&format!(
            "  {}  {}{}\n",
            f.path,
            super::ratio(f.covered.len(), f.changed.len()),
            if missed.is_empty() {
                String::new()
            } else {
                format!("  missed {}", ranges_of(&missed))
            }
        ));
    }
    for path in &answer.unmeasured {
        s.push_str(&format!("  {path}  not measured by the run\n"));
    }
    for (path, candidates) in &answer.ambiguous {
        s.push_str(&format!(
            "  {path}  not counted: it ends several of the run's paths ({})\n",
            candidates.join(", ")
        ));
    }
    s
}

fn markdown(run: &str, answer: &PatchCoverage, bar: Option<f64>) -> String {
    let (covered, changed) = answer.totals();
    let mark = match verdict(answer, bar) {
        Some(true) => " ✅",
        Some(false) => " ❌",
        None => "",
    };
    let figure = match percentage(answer) {
        Some(p) => format!("{p:.1}%"),
        None => "no executable line changed".to_owned(),
    };
    let mut s = format!("### Patch coverage: {figure}{mark}\n\n");
    s.push_str(&format!(
        "{covered} of {changed} changed executable lines covered in run `{run}`{}{}.\n",
        match bar {
            Some(b) => format!(" (required: {b}%)"),
            None => String::new(),
        },
        if answer.complete {
            ""
        } else {
            ", **which is not complete yet**"
        }
    ));
    if !answer.files.is_empty() {
        s.push_str("\n| File | Covered | Changed | Patch coverage | Missed lines |\n");
        s.push_str("|---|---:|---:|---:|---|\n");
        for f in &answer.files {
            let missed = &f.changed - &f.covered;
            s.push_str(&format!(
                "| `{}` | {} | {} | {:.1}% | {} |\n",
                f.path,
                f.covered.len(),
                f.changed.len(),
                f.covered.len() as f64 * 100.0 / f.changed.len() as f64,
                ranges_of(&missed)
            ));
        }
    }
    if !answer.unmeasured.is_empty() {
        s.push_str("\nChanged code the run does not measure (not counted): ");
        let paths: Vec<String> = answer.unmeasured.iter().map(|p| format!("`{p}`")).collect();
        s.push_str(&paths.join(", "));
        s.push('\n');
    }
    if !answer.ambiguous.is_empty() {
        s.push_str("\nChanged files that end several of the run's paths (not counted): ");
        let paths: Vec<String> = answer
            .ambiguous
            .iter()
            .map(|(p, c)| format!("`{p}` ({})", c.join(", ")))
            .collect();
        s.push_str(&paths.join(", "));
        s.push('\n');
    }
    s
}

fn to_json(answer: &PatchCoverage, bar: Option<f64>) -> serde_json::Value {
    let (covered, changed) = answer.totals();
    json!({
        "complete": answer.complete,
        "covered": covered,
        "changed": changed,
        "percent": percentage(answer),
        "fail_under": bar,
        "passed": verdict(answer, bar),
        "files": answer.files.iter().map(|f| json!({
            "path": &*f.path,
            "changed": f.changed.iter().collect::<Vec<u32>>(),
            "covered": f.covered.iter().collect::<Vec<u32>>(),
        })).collect::<Vec<_>>(),
        "unmeasured": answer.unmeasured,
        "ambiguous": answer.ambiguous.iter().map(|(p, c)| json!({
            "path": p,
            "candidates": c,
        })).collect::<Vec<_>>(),
    })
}
