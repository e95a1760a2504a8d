//! `covd push`: read coverage files, turn them into deltas, stream them as one shard attempt.
//! With `--watch DIR -- CMD`, run the test command and send each coverage file the moment it
//! is complete, so the daemon merges while the tests still run.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow};
use covd::client::{Batcher, PushInput, PushOptions, PushTarget};
use covd::formats::{self, Format, junit};
use covd::model::path::{PathFilter, PathRules};
use covd::model::{TestCase, TestStatus};
use covd::service::TestTelemetry;
use tokio::sync::mpsc;

use super::{Failure, PushArgs, bad_input, client, completeness};

/// How often `--watch` looks at its directory. Polling, not inotify: it is simple, works on
/// every file system CI uses (including network mounts), and a few hundred milliseconds are
/// nothing next to a test run.
const SCAN_EVERY: Duration = Duration::from_millis(200);

/// Turns files into deltas on the producer side of a push.
struct Sender {
    rules: PathRules,
    filter: PathFilter,
    forced: Option<Format>,
    batcher: Batcher,
    tx: mpsc::Sender<PushInput>,
    records: u64,
    progress: indicatif::ProgressBar,
    /// Test cases read from JUnit XML files, sent with the finish.
    tests: Vec<TestCase>,
    junit_files: u64,
}

/// Why sending stopped.
enum Stop {
    /// The push ended (its own error is reported).
    Closed,
    Failed(anyhow::Error),
}

impl Sender {
    /// Parses one file and sends its records.
    fn send_file(&mut self, path: &Path, file: File) -> Result<(), Stop> {
        let mut input = BufReader::with_capacity(
            256 * 1024,
            Counting {
                inner: file,
                progress: self.progress.clone(),
            },
        );
        let head = input
            .fill_buf()
            .with_context(|| format!("cannot read {}", path.display()))
            .map_err(Stop::Failed)?;
        let head = &head[..head.len().min(4096)];
        if self.forced.is_none() && junit::detect(head) {
            return self.read_tests(path, input);
        }
        let format = match self.forced {
            Some(format) => format,
            None => Format::detect(head).ok_or_else(|| {
                Stop::Failed(anyhow!(
                    "{}: not a coverage format covd recognises ({}); name it with --format",
                    path.display(),
                    Format::NAMES.join(", ")
                ))
            })?,
        };
        // Records go out as they are read, so a file of any size streams in bounded memory.
        // Several records for one path (gcov writes one per object file) are summed by the
        // daemon like any two deltas.
        let mut failure = None;
        let mut closed = false;
        formats::read(format, input, |record| {
            let source = self.rules.apply(&record.path);
            if !self.filter.keeps(&source) {
                return true;
            }
            if let Err(e) = covd::model::path::check(&source) {
                failure = Some(anyhow!(
                    "source path `{source}` (from `{}`): {e}",
                    record.path
                ));
                return false;
            }
            self.records += 1;
            if let Some(delta) = self.batcher.push(source, record.file)
                && self.tx.blocking_send(PushInput::Delta(delta)).is_err()
            {
                closed = true;
                return false;
            }
            true
        })
        .map_err(|e| Stop::Failed(anyhow::Error::new(e).context(path.display().to_string())))?;
        if let Some(e) = failure {
            return Err(Stop::Failed(e.context(path.display().to_string())));
        }
        // A file's coverage goes out once the file is read, not when the batch fills: with
        // --watch, the daemon merges each file while the tests still run.
        if !closed
            && let Some(delta) = std::mem::take(&mut self.batcher).finish()
            && self.tx.blocking_send(PushInput::Delta(delta)).is_err()
        {
            closed = true;
        }
        if closed {
            return Err(Stop::Closed);
        }
        Ok(())
    }

    /// Reads a JUnit XML file's test cases, for the finish.
    fn read_tests(&mut self, path: &Path, input: impl BufRead) -> Result<(), Stop> {
        let tests = &mut self.tests;
        junit::read(input, |mut case| {
            // Parametrized test ids can hold newlines; the protocol wants single lines.
            for s in [&mut case.name, &mut case.suite] {
                if s.bytes().any(|b| b.is_ascii_control()) {
                    *s = s.replace(|c: char| c.is_control(), " ");
                }
                s.truncate(s.floor_char_boundary(4096));
            }
            tests.push(case);
        })
        .map_err(|e| Stop::Failed(anyhow::Error::new(e).context(path.display().to_string())))?;
        self.junit_files += 1;
        Ok(())
    }

    /// Sends the last delta and the end marker, with the test results read.
    fn finish(mut self) -> u64 {
        if let Some(delta) = std::mem::take(&mut self.batcher).finish() {
            let _ = self.tx.blocking_send(PushInput::Delta(delta));
        }
        let telemetry = (self.junit_files > 0).then(|| telemetry(std::mem::take(&mut self.tests)));
        let _ = self.tx.blocking_send(PushInput::Done(telemetry));
        self.records
    }
}

pub(super) async fn run(a: PushArgs) -> Result<ExitCode, Failure> {
    let filter = PathFilter::new(&a.filter.include, &a.filter.exclude)
        .map_err(|e| bad_input(anyhow!("--include/--exclude: {e}")))?;
    let forced = a.format.as_deref().and_then(Format::from_name);
    let (tx, rx) = mpsc::channel(4);
    let mut inputs = Vec::new();
    let mut total_bytes = 0;
    if a.watch.is_none() {
        // Every file must open before anything is sent.
        for path in &a.files {
            let f = File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))
                .map_err(bad_input)?;
            total_bytes += f.metadata().map(|m| m.len()).unwrap_or(0);
            inputs.push((path.clone(), f));
        }
    }
    let progress = if a.watch.is_some() {
        indicatif::ProgressBar::hidden()
    } else {
        progress_bar(total_bytes)
    };
    let sender = Sender {
        rules: PathRules {
            strip: a.strip_prefix.clone(),
            map: a.map_prefix.clone(),
            root: a.root.clone(),
        },
        filter,
        forced,
        batcher: Batcher::default(),
        tx,
        records: 0,
        progress: progress.clone(),
        tests: Vec::new(),
        junit_files: 0,
    };

    let mut command = None;
    // Parsing is CPU work: it runs on a blocking thread and hands deltas over a bounded channel.
    let producer = match &a.watch {
        None => tokio::task::spawn_blocking(move || send_files(sender, inputs)),
        Some(dir) => {
            let test = start_command(&a.command)?;
            let exited = test.exited.clone();
            command = Some(test);
            let (dir, settle) = (dir.clone(), a.settle);
            tokio::task::spawn_blocking(move || watch(sender, &dir, settle, &exited))
        }
    };
    let target = PushTarget {
        run_id: a.run.run.clone(),
        shard_id: a.shard.clone(),
        attempt: a.attempt,
        params: a.meta.params(Vec::new()),
        telemetry: None,
    };
    let options = PushOptions {
        retries: a.retries,
        ..PushOptions::default()
    };
    let pushed = client(&a.run.server)?.push(&target, rx, &options).await;
    let produced = producer
        .await
        .map_err(|e| anyhow!("the reader failed: {e}"))?;
    progress.finish_and_clear();
    // With --watch, the test command's verdict is the exit code, whatever happened to coverage.
    let test_code = match command {
        Some(test) => Some(test.wait().await?),
        None => None,
    };
    let outcome = report(&a, pushed, produced);
    match (test_code, outcome) {
        (Some(code), Ok(_)) => Ok(code),
        (Some(code), Err(f)) => {
            eprintln!("covd: {:#}", f.error);
            // A coverage failure only changes a passing run's code, and only when asked.
            if a.fail_on_error && code == ExitCode::SUCCESS {
                Ok(ExitCode::from(f.code))
            } else {
                Ok(code)
            }
        }
        (None, outcome) => outcome,
    }
}

fn report(
    a: &PushArgs,
    pushed: Result<covd::client::PushReport, covd::client::ClientError>,
    produced: anyhow::Result<u64>,
) -> Result<ExitCode, Failure> {
    // A malformed file is the root cause even if the push then failed for lack of input.
    let records = produced.map_err(bad_input)?;
    match pushed {
        Ok(report) => {
            if !report.unknown_paths.is_empty() {
                eprintln!(
                    "covd: warning: {}{} paths of this shard are not among the run's files, e.g.:",
                    report.unknown_paths.len(),
                    if report.unknown_paths.len() >= 100 {
                        "+"
                    } else {
                        ""
                    }
                );
                for p in report.unknown_paths.iter().take(5) {
                    eprintln!("  {p}");
                }
            }
            let run = report.run.as_ref();
            eprintln!(
                "shard {} of run {}: {records} file records in {} deltas{}{}",
                a.shard,
                a.run.run,
                report.deltas,
                if report.reconnects > 0 {
                    format!(", {} reconnects", report.reconnects)
                } else {
                    String::new()
                },
                run.map(|r| format!("; run {}", completeness(r)))
                    .unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) if e.is_unavailable() && !a.fail_on_error => {
            eprintln!("covd: warning: coverage not sent: {e} (use --fail-on-error to fail)");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e.into()),
    }
}

/// Counts and total time of test cases.
fn telemetry(tests: Vec<TestCase>) -> TestTelemetry {
    let count = |s: TestStatus| tests.iter().filter(|t| t.status == s).count() as u64;
    TestTelemetry {
        passed: count(TestStatus::Passed),
        failed: count(TestStatus::Failed),
        skipped: count(TestStatus::Skipped),
        errored: count(TestStatus::Errored),
        duration: Some(tests.iter().map(|t| t.duration).sum()),
        peak_memory_bytes: 0,
        platform: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
        tests,
    }
}

fn send_files(mut sender: Sender, inputs: Vec<(PathBuf, File)>) -> anyhow::Result<u64> {
    for (path, f) in inputs {
        match sender.send_file(&path, f) {
            Ok(()) => {}
            Err(Stop::Closed) => return Ok(sender.records),
            Err(Stop::Failed(e)) => return Err(e),
        }
    }
    Ok(sender.finish())
}

/// What a file looked like at the last scan.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Seen {
    len: u64,
    modified: Option<SystemTime>,
}

/// Sends each file of `dir` once it has stopped changing for `settle`, and everything left
/// once the command has exited.
fn watch(
    mut sender: Sender,
    dir: &Path,
    settle: Duration,
    exited: &AtomicBool,
) -> anyhow::Result<u64> {
    // file -> (how it looked, since when it has looked so)
    let mut pending: HashMap<PathBuf, (Seen, std::time::Instant)> = HashMap::new();
    let mut sent: HashMap<PathBuf, Seen> = HashMap::new();
    loop {
        // Read the flag before scanning: a file written just before the exit is then seen.
        let done = exited.load(Ordering::Acquire);
        for (path, seen) in scan(dir) {
            if let Some(before) = sent.get(&path) {
                if *before != seen {
                    eprintln!(
                        "covd: warning: {} changed after it was sent; the change is not sent",
                        path.display()
                    );
                    sent.insert(path, seen);
                }
                continue;
            }
            let now = std::time::Instant::now();
            let since = match pending.get(&path) {
                Some((was, since)) if *was == seen => *since,
                _ => now,
            };
            pending.insert(path.clone(), (seen, since));
            if done || now.duration_since(since) >= settle {
                pending.remove(&path);
                let Ok(file) = File::open(&path) else {
                    continue;
                };
                match sender.send_file(&path, file) {
                    Ok(()) => {}
                    Err(Stop::Closed) => return Ok(sender.records),
                    Err(Stop::Failed(e)) => return Err(e),
                }
                sent.insert(path, seen);
            }
        }
        if done {
            return Ok(sender.finish());
        }
        std::thread::sleep(SCAN_EVERY);
    }
}

/// Regular files directly in `dir` (a directory that does not exist yet holds none).
fn scan(dir: &Path) -> Vec<(PathBuf, Seen)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            meta.is_file().then(|| {
                let seen = Seen {
                    len: meta.len(),
                    modified: meta.modified().ok(),
                };
                (e.path(), seen)
            })
        })
        // An empty file is still being created.
        .filter(|(_, seen)| seen.len > 0)
        .collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files
}

/// The test command, running.
struct TestCommand {
    exited: Arc<AtomicBool>,
    status: Arc<Mutex<Option<io::Result<std::process::ExitStatus>>>>,
    waiter: tokio::task::JoinHandle<()>,
}

fn start_command(argv: &[String]) -> Result<TestCommand, Failure> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| bad_input(anyhow!("--watch needs a command after `--`")))?;
    let mut child = std::process::Command::new(program)
        .args(args)
        .spawn()
        .with_context(|| format!("cannot run `{program}`"))
        .map_err(bad_input)?;
    let exited = Arc::new(AtomicBool::new(false));
    let status = Arc::new(Mutex::new(None));
    let waiter = {
        let (exited, status) = (exited.clone(), status.clone());
        tokio::task::spawn_blocking(move || {
            let result = child.wait();
            *status.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
            exited.store(true, Ordering::Release);
        })
    };
    Ok(TestCommand {
        exited,
        status,
        waiter,
    })
}

impl TestCommand {
    /// The command's exit code (128 + signal when a signal ended it).
    async fn wait(self) -> Result<ExitCode, Failure> {
        let _ = self.waiter.await;
        let status = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| anyhow!("the test command's status was lost"))?
            .context("waiting for the test command")?;
        use std::os::unix::process::ExitStatusExt;
        let code = status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(1);
        Ok(ExitCode::from(code.clamp(0, 255) as u8))
    }
}

/// A progress bar over the input bytes on a terminal; nothing otherwise.
fn progress_bar(total: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} pushing [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Counts what is read from a file into the progress bar.
struct Counting<R> {
    inner: R,
    progress: indicatif::ProgressBar,
}

impl<R: io::Read> io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.inc(n as u64);
        Ok(n)
    }
}
