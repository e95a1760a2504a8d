//! Per-test attribution from the command line: `covd tests` asks a run which tests covered
//! some lines, which lines a test covered, or which tests it has seen.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::Args;
use roaring::RoaringBitmap;

use super::{Failure, RunArg, client};

#[derive(Debug, Args)]
pub(super) struct TestsArgs {
    #[command(flatten)]
    run: RunArg,
    /// Print the tests that covered any of these lines: `PATH` (the whole file), `PATH:LINE`
    /// or `PATH:FIRST-LAST`. Repeatable.
    #[arg(long = "lines", value_name = "PATH[:LINE[-LAST]]", value_parser = parse_file_lines)]
    lines: Vec<(String, Option<(u32, u32)>)>,
    /// Print the lines this test covered, per file (`path: 1-4,9`).
    #[arg(long, conflicts_with = "lines")]
    test: Option<String>,
}

pub(super) async fn tests(a: TestsArgs) -> Result<ExitCode, Failure> {
    let mut client = client(&a.run.server)?;
    let run = &a.run.run;
    let mut out = io::stdout().lock();
    if let Some(test) = &a.test {
        for (path, lines) in client.test_lines(run, test).await? {
            let _ = writeln!(out, "{path}: {}", ranges_of(&lines));
        }
        return Ok(ExitCode::SUCCESS);
    }
    if a.lines.is_empty() {
        for test in client.tests(run).await? {
            let _ = writeln!(out, "{test}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Ranges of one path go together; a whole file (no ranges) takes in any range of it.
    let mut files: Vec<(String, Vec<(u32, u32)>)> = Vec::new();
    let mut whole = Vec::new();
    for (path, range) in a.lines {
        if range.is_none() {
            whole.push(path.clone());
        }
        match files.iter_mut().find(|(p, _)| *p == path) {
            Some((_, ranges)) => ranges.extend(range),
            None => files.push((path, range.into_iter().collect())),
        }
    }
    for (path, ranges) in &mut files {
        if whole.contains(path) {
            ranges.clear();
        }
    }
    let answer = client.tests_for_lines(run, &files).await?;
    for path in &answer.unknown_files {
        eprintln!("run {run} has no file {path}");
    }
    if answer.tests.is_empty() {
        eprintln!("no test of run {run} covered these lines");
    }
    for test in &answer.tests {
        let _ = writeln!(out, "{test}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Lines as ranges: `1-4,9`.
pub(super) fn ranges_of(lines: &RoaringBitmap) -> String {
    let mut out = String::new();
    let mut lines = lines.iter().peekable();
    while let Some(first) = lines.next() {
        let mut last = first;
        while lines.next_if(|l| *l == last + 1).is_some() {
            last += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if last == first {
            out.push_str(&first.to_string());
        } else {
            out.push_str(&format!("{first}-{last}"));
        }
    }
    out
}

/// `PATH`, `PATH:LINE` or `PATH:FIRST-LAST` (a path may itself hold `:`: only a suffix that
/// reads as lines is taken as lines).
fn parse_file_lines(s: &str) -> Result<(String, Option<(u32, u32)>), String> {
    let lines = |spec: &str| -> Option<(u32, u32)> {
        let (first, last) = spec.split_once('-').unwrap_or((spec, spec));
        let (first, last) = (first.parse().ok()?, last.parse().ok()?);
        Some((first, last))
    };
    match s
        .rsplit_once(':')
        .and_then(|(p, spec)| Some((p, lines(spec)?)))
    {
        Some((_, (0, _))) => Err(format!("`{s}`: lines are numbered from 1")),
        Some((_, (first, last))) if last < first => {
            Err(format!("`{s}`: the range ends before it starts"))
        }
        Some((path, range)) => Ok((path.to_owned(), Some(range))),
        None => Ok((s.to_owned(), None)),
    }
}
