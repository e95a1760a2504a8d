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
use covd::client::{Batcher, PushInput, PushOptions, PushTarget, Pushed};
use covd::formats::{self, Format, junit, phpunit, testdox};
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
    /// Test cases read from PHPUnit's testdox XML, which win over the JUnit log's (see
    /// [`test_cases`]).
    testdox: Vec<TestCase>,
    /// Test result files read (JUnit or testdox).
    test_reports: u64,
    /// The user's `--tag`s: with them, the finish carries the shard's telemetry even without
    /// test results.
    tags: std::collections::BTreeMap<String, String>,
    /// With --watch, how the test command ran.
    ran: Option<Ran>,
    /// The tools the inputs name, with their versions (coverage.py, JUnit properties).
    tools: std::collections::BTreeMap<String, String>,
    phpunit: PhpunitReports,
    /// With --sources: each file's path in the run, and where its source is here.
    sources: Option<Arc<Mutex<std::collections::BTreeMap<String, PathBuf>>>>,
}

/// Why sending stopped.
enum Stop {
    /// The push ended (its own error is reported).
    Closed,
    Failed(anyhow::Error),
}

/// What a file holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tests(Report),
    Coverage(Format),
}

/// A test results format.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Report {
    JUnit,
    /// PHPUnit 9's `--testdox-xml`.
    Testdox,
}

impl Sender {
    /// Opens a file for reading, counting into the progress bar.
    fn open(&self, file: File) -> BufReader<Counting<File>> {
        BufReader::with_capacity(
            256 * 1024,
            Counting {
                inner: file,
                progress: self.progress.clone(),
            },
        )
    }

    /// What `input` holds, from its first bytes; `None` when covd does not know the format.
    fn kind(&self, path: &Path, input: &mut impl BufRead) -> Result<Option<Kind>, Stop> {
        let head = input
            .fill_buf()
            .with_context(|| format!("cannot read {}", path.display()))
            .map_err(Stop::Failed)?;
        let head = &head[..head.len().min(4096)];
        if phpunit::detect(head) {
            return Err(Stop::Failed(anyhow!(
                "{} is a file of PHPUnit's XML coverage report: push the report's directory \
                 (the one holding index.xml) with the Clover report of the same run",
                path.display()
            )));
        }
        if self.forced.is_none() && junit::detect(head) {
            return Ok(Some(Kind::Tests(Report::JUnit)));
        }
        if self.forced.is_none() && testdox::detect(head) {
            return Ok(Some(Kind::Tests(Report::Testdox)));
        }
        Ok(self
            .forced
            .or_else(|| Format::detect(head))
            .map(Kind::Coverage))
    }

    /// Parses one file and sends its records as they are read, so a file of any size
    /// streams in bounded memory.
    fn send_file(&mut self, path: &Path, file: File) -> Result<(), Stop> {
        let mut input = self.open(file);
        let format = match self.kind(path, &mut input)? {
            Some(Kind::Tests(report)) => return self.read_tests(path, report, input),
            Some(Kind::Coverage(format)) => format,
            None => return Err(Stop::Failed(unknown(path))),
        };
        // Several records for one path (gcov writes one per object file) are summed by the
        // daemon like any two deltas.
        let mut failure = None;
        let mut closed = false;
        let tools = formats::read(format, input, |record| match self.accept(record) {
            Ok(None) => true,
            Ok(Some((source, file))) => {
                if let Some(delta) = self.batcher.push(source, file)
                    && self.tx.blocking_send(PushInput::Delta(delta)).is_err()
                {
                    closed = true;
                    return false;
                }
                true
            }
            Err(e) => {
                failure = Some(e);
                false
            }
        })
        .map_err(|e| Stop::Failed(anyhow::Error::new(e).context(path.display().to_string())))?;
        self.tools.extend(tools);
        if let Some(e) = failure {
            return Err(Stop::Failed(e.context(path.display().to_string())));
        }
        if closed {
            return Err(Stop::Closed);
        }
        self.flush()
    }

    /// Parses a whole coverage file first, then sends it: with --watch, a file that does
    /// not parse yet (still being written) is retried later without having sent half of it.
    fn send_whole_file(
        &mut self,
        path: &Path,
        input: impl BufRead,
        format: Format,
    ) -> Result<(), Stop> {
        let mut accepted = Vec::new();
        let mut failure = None;
        let tools = formats::read(format, input, |record| match self.accept(record) {
            Ok(Some(file)) => {
                accepted.push(file);
                true
            }
            Ok(None) => true,
            Err(e) => {
                failure = Some(e);
                false
            }
        })
        .map_err(|e| Stop::Failed(anyhow::Error::new(e).context(path.display().to_string())))?;
        self.tools.extend(tools);
        if let Some(e) = failure {
            return Err(Stop::Failed(e.context(path.display().to_string())));
        }
        for (source, file) in accepted {
            if let Some(delta) = self.batcher.push(source, file)
                && self.tx.blocking_send(PushInput::Delta(delta)).is_err()
            {
                return Err(Stop::Closed);
            }
        }
        self.flush()
    }

    /// Applies path rules and filters to a record, and puts on it the tests PHPUnit's XML
    /// report gives its lines: `None` when it is filtered out.
    fn accept(
        &mut self,
        mut record: formats::Record,
    ) -> anyhow::Result<Option<(String, covd::model::FileCoverage)>> {
        self.phpunit.attach(&mut record)?;
        let source = self.rules.apply(&record.path);
        if !self.filter.keeps(&source) {
            return Ok(None);
        }
        covd::model::path::check(&source)
            .map_err(|e| anyhow!("source path `{source}` (from `{}`): {e}", record.path))?;
        if let Some(sources) = &self.sources {
            let mut sources = sources.lock().unwrap_or_else(|e| e.into_inner());
            sources
                .entry(source.clone())
                .or_insert_with(|| PathBuf::from(&record.path));
        }
        self.records += 1;
        Ok(Some((source, record.file)))
    }

    /// Sends what is batched: a file's coverage goes out once the file is read, not when the
    /// batch fills, so with --watch the daemon merges each file while the tests still run.
    fn flush(&mut self) -> Result<(), Stop> {
        if let Some(delta) = std::mem::take(&mut self.batcher).finish()
            && self.tx.blocking_send(PushInput::Delta(delta)).is_err()
        {
            return Err(Stop::Closed);
        }
        Ok(())
    }

    /// Reads a test results file's test cases, for the finish.
    fn read_tests(&mut self, path: &Path, report: Report, input: impl BufRead) -> Result<(), Stop> {
        let tests = match report {
            Report::JUnit => &mut self.tests,
            Report::Testdox => &mut self.testdox,
        };
        let on_case = |mut case: TestCase| {
            // Parametrized test ids can hold newlines; the protocol wants single lines.
            for s in [&mut case.name, &mut case.suite] {
                if s.bytes().any(|b| b.is_ascii_control()) {
                    *s = s.replace(|c: char| c.is_control(), " ");
                }
                s.truncate(s.floor_char_boundary(4096));
            }
            tests.push(case);
        };
        let failed = |e| Stop::Failed(anyhow::Error::new(e).context(path.display().to_string()));
        match report {
            Report::JUnit => self
                .tools
                .extend(junit::read(input, on_case).map_err(failed)?),
            Report::Testdox => testdox::read(input, on_case).map_err(failed)?,
        }
        self.test_reports += 1;
        Ok(())
    }

    /// Sends the last delta and the end marker, with the test results read.
    fn finish(mut self) -> u64 {
        if let Some(delta) = std::mem::take(&mut self.batcher).finish() {
            let _ = self.tx.blocking_send(PushInput::Delta(delta));
        }
        // The tools the inputs name, then the user's tags, which win.
        let mut tags = std::mem::take(&mut self.phpunit.tools);
        tags.extend(std::mem::take(&mut self.tools));
        tags.extend(std::mem::take(&mut self.tags));
        let telemetry =
            (self.test_reports > 0 || !tags.is_empty() || self.ran.is_some()).then(|| {
                telemetry(
                    test_cases(
                        std::mem::take(&mut self.tests),
                        std::mem::take(&mut self.testdox),
                    ),
                    self.test_reports > 0,
                    tags,
                    self.ran,
                )
            });
        let _ = self.tx.blocking_send(PushInput::Done(telemetry));
        self.records
    }
}

pub(super) async fn run(a: PushArgs) -> Result<ExitCode, Failure> {
    if let Some(dir) = &a.flush_spool {
        return flush(&a, dir).await;
    }
    for (value, what) in [
        (&a.run.run, "--run or COVD_RUN"),
        (&a.shard, "--shard or COVD_SHARD"),
    ] {
        if value.is_empty() {
            return Err(bad_input(anyhow!(
                "give {what}: covd found no CI job in the environment to take it from"
            )));
        }
    }
    let filter = PathFilter::new(&a.filter.include, &a.filter.exclude)
        .map_err(|e| bad_input(anyhow!("--include/--exclude: {e}")))?;
    let forced = a.format.as_deref().and_then(Format::from_name);
    let (tx, rx) = mpsc::channel(4);
    let mut inputs = Vec::new();
    let mut total_bytes = 0;
    let mut phpunit = PhpunitReports::default();
    if a.watch.is_none() {
        // Every file must open before anything is sent.
        for path in &a.files {
            if path.is_dir() {
                if !path.join("index.xml").is_file() {
                    return Err(bad_input(anyhow!(
                        "{} is a directory: covd push takes coverage files (and the \
                         directories of PHPUnit XML coverage reports, which hold index.xml)",
                        path.display()
                    )));
                }
                phpunit.add(path).map_err(bad_input)?;
                continue;
            }
            let f = File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))
                .map_err(bad_input)?;
            total_bytes += f.metadata().map(|m| m.len()).unwrap_or(0);
            inputs.push((path.clone(), f));
        }
        if !phpunit.dirs.is_empty() && inputs.is_empty() {
            return Err(bad_input(anyhow!(
                "PHPUnit's XML coverage report lists only the lines that ran, not those that \
                 did not: push it with the Clover report of the same run (`phpunit \
                 --coverage-clover FILE`), e.g. `covd push clover.xml {}`",
                phpunit.dirs[0].display()
            )));
        }
    }
    let progress = if a.watch.is_some() {
        indicatif::ProgressBar::hidden()
    } else {
        progress_bar(total_bytes)
    };
    let sources = a.sources.then(Default::default);
    let sender = Sender {
        rules: PathRules {
            strip: a.strip_prefix.clone(),
            map: a.map_prefix.clone(),
            // Without rules, paths under the CI workspace are made relative to it.
            root: a.root.clone().or_else(|| {
                (a.strip_prefix.is_empty() && a.map_prefix.is_empty())
                    .then(workspace)
                    .flatten()
            }),
        },
        filter,
        forced,
        batcher: Batcher::default(),
        tx,
        records: 0,
        progress: progress.clone(),
        tests: Vec::new(),
        testdox: Vec::new(),
        test_reports: 0,
        tags: a.tags.iter().cloned().collect(),
        ran: None,
        tools: std::collections::BTreeMap::new(),
        phpunit,
        sources: sources.clone(),
    };

    // Everything that can fail before the test command runs is done before it starts, so an
    // error here is covd's, and never leaves a test command running unwatched.
    let mut connection = client(&a.run.server)?;
    let mut command = None;
    // Parsing is CPU work: it runs on a blocking thread and hands deltas over a bounded channel.
    let producer = match &a.watch {
        None => tokio::task::spawn_blocking(move || send_files(sender, inputs)),
        Some(dir) => {
            let test = start_command(&a.command)?;
            let (exited, ran) = (test.exited.clone(), test.ran.clone());
            command = Some(test);
            let (dir, settle) = (dir.clone(), a.settle);
            tokio::task::spawn_blocking(move || watch(sender, &dir, settle, &exited, &ran))
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
    let mut spooled = None;
    let pushed = match &a.spool {
        None => connection.push(&target, rx, &options).await,
        Some(dir) => match connection.push_or_spool(&target, rx, &options, dir).await {
            Ok(Pushed::Sent(report)) => Ok(*report),
            Ok(Pushed::Spooled { path, error }) => {
                spooled = Some(path);
                Err(error)
            }
            Err(e) => Err(e),
        },
    };
    let produced = match producer.await {
        Ok(produced) => produced,
        Err(e) => Err(anyhow!("the reader failed: {e}")),
    };
    progress.finish_and_clear();
    let mut sources_failed = None;
    if let (Ok(_), Some(sources)) = (&pushed, sources) {
        let root = a.source_root.as_deref().unwrap_or(Path::new("."));
        let files: Vec<(String, Vec<PathBuf>)> =
            std::mem::take(&mut *sources.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .map(|(path, named)| {
                    let in_run = root.join(&path);
                    (path, vec![named, in_run])
                })
                .collect();
        match connection.send_sources(&a.run.run, files, root).await {
            Ok(sent) => {
                eprintln!(
                    "sources: {} files named, {} new texts sent{}",
                    sent.files,
                    sent.new_texts,
                    match (sent.outside_root, sent.unreadable, sent.too_large) {
                        (0, 0, 0) => String::new(),
                        (o, u, t) => format!(
                            "; left out: {o} outside {}, {u} not readable here, {t} larger than \
                             the daemon takes",
                            root.display()
                        ),
                    }
                );
            }
            Err(e) if a.fail_on_error => sources_failed = Some(Failure::from(e)),
            Err(e) => eprintln!("covd: warning: sources not sent: {e}"),
        }
    }
    // With --watch, the test command's verdict is the exit code, whatever happened to coverage.
    let test_code = match command {
        Some(test) => Some(test.wait().await?),
        None => None,
    };
    let outcome = match (spooled, pushed) {
        (Some(path), Err(error)) => {
            let records = produced.map_err(bad_input)?;
            let dir = a.spool.as_deref().unwrap_or(Path::new("."));
            eprintln!(
                "covd: warning: coverage not sent: {error}; kept it ({records} file records) in \
                 {}: send it with `covd push --flush-spool {}`",
                path.display(),
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        (_, pushed) => match (report(&a, pushed, produced), sources_failed) {
            (Ok(_), Some(failed)) => Err(failed),
            (outcome, _) => outcome,
        },
    };
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

fn unknown(path: &Path) -> anyhow::Error {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        return anyhow!(
            "{} is empty: the tool that writes it stopped before it wrote anything (PHPUnit 9 \
             leaves its JUnit and testdox logs empty when a data provider throws, is empty or \
             skips)",
            path.display()
        );
    }
    anyhow!(
        "{}: not a coverage format covd recognises ({}); name it with --format",
        path.display(),
        Format::NAMES.join(", ")
    )
}

/// The shard's test cases: those of its JUnit files, where PHPUnit's testdox XML names the same
/// test (suite and name, as PHPUnit's own JUnit log of the run names it) the testdox status
/// with the JUnit log's assertions, so a push of both reports counts each test once and keeps
/// an incomplete test apart from a skipped one.
fn test_cases(junit: Vec<TestCase>, mut testdox: Vec<TestCase>) -> Vec<TestCase> {
    if testdox.is_empty() {
        return junit;
    }
    let index: HashMap<(String, String), usize> = testdox
        .iter()
        .enumerate()
        .map(|(i, t)| ((t.suite.clone(), t.name.clone()), i))
        .collect();
    let mut rest = Vec::new();
    for case in junit {
        match index.get(&(case.suite.clone(), case.name.clone())) {
            Some(&i) => testdox[i].assertions = case.assertions,
            None => rest.push(case),
        }
    }
    testdox.extend(rest);
    testdox
}

/// Counts of test cases (`junit`: some were read), the run's duration (the test command's
/// when `--watch` ran it, else the test cases' sum) and peak memory (the command's), with the
/// environment's tags: `os`, `arch`, `ci` (the provider), and the user's, which replace those
/// of the same key.
fn telemetry(
    tests: Vec<TestCase>,
    junit: bool,
    user: std::collections::BTreeMap<String, String>,
    ran: Option<Ran>,
) -> TestTelemetry {
    let count = |s: TestStatus| tests.iter().filter(|t| t.status == s).count() as u64;
    let mut tags = std::collections::BTreeMap::from([
        ("os".to_owned(), std::env::consts::OS.to_owned()),
        ("arch".to_owned(), std::env::consts::ARCH.to_owned()),
    ]);
    if let Some(ci) = covd::ci::from_env() {
        tags.insert("ci".to_owned(), ci.provider.name().to_owned());
    }
    tags.extend(user);
    TestTelemetry {
        passed: count(TestStatus::Passed),
        failed: count(TestStatus::Failed),
        skipped: count(TestStatus::Skipped),
        errored: count(TestStatus::Errored),
        incomplete: count(TestStatus::Incomplete),
        assertions: tests
            .iter()
            .filter_map(|t| t.assertions)
            .reduce(u64::saturating_add),
        duration: match ran {
            Some(ran) => Some(ran.took),
            None => junit.then(|| tests.iter().map(|t| t.duration).sum()),
        },
        peak_memory_bytes: ran.map_or(0, |r| r.peak_bytes),
        platform: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
        tests,
        tags,
    }
}

/// `covd push --flush-spool DIR`: sends each spooled push as the push it was, and removes it
/// once the daemon has it. A file another flush is sending (it holds the file's lock) is left
/// to that one.
async fn flush(a: &PushArgs, dir: &Path) -> Result<ExitCode, Failure> {
    let files = covd::spool::entries(dir)
        .with_context(|| format!("cannot read the spool {}", dir.display()))
        .map_err(bad_input)?;
    let mut connection = client(&a.run.server)?;
    let (mut sent, mut busy) = (0, 0);
    for path in files {
        let file = match File::open(&path) {
            Ok(f) => f,
            // Sent and removed by another flush meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(anyhow!("cannot open {}: {e}", path.display()).into()),
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                busy += 1;
                continue;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(anyhow!("cannot lock {}: {e}", path.display()).into());
            }
        }
        // Sent by a flush that held the lock until it removed the file.
        if !path.exists() {
            continue;
        }
        let spooled =
            covd::spool::read(&path).map_err(|e| bad_input(anyhow!("{}: {e}", path.display())))?;
        let what = format!(
            "shard {} of run {} (attempt {})",
            spooled.header.shard_id, spooled.header.run_id, spooled.header.attempt
        );
        let run = connection.flush_spooled(spooled).await?;
        std::fs::remove_file(&path)
            .with_context(|| format!("sent, but cannot remove {}", path.display()))?;
        let state = match run {
            Some(run) => format!("; run {}", completeness(&run)),
            None => " (the daemon had it already)".to_owned(),
        };
        eprintln!("sent {what}{state}");
        sent += 1;
    }
    eprintln!(
        "{sent} spooled pushes sent from {}{}",
        dir.display(),
        if busy > 0 {
            format!("; {busy} being sent by another flush")
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn send_files(mut sender: Sender, inputs: Vec<(PathBuf, File)>) -> anyhow::Result<u64> {
    for (path, f) in inputs {
        match sender.send_file(&path, f) {
            Ok(()) => {}
            Err(Stop::Closed) => return Ok(sender.records),
            Err(Stop::Failed(e)) => return Err(e),
        }
    }
    sender.phpunit.check_all_taken()?;
    Ok(sender.finish())
}

/// PHPUnit XML coverage reports (`phpunit --coverage-xml DIR`) pushed with coverage files:
/// they name the tests of each line that ran, but not the lines that did not, so their tests
/// go on the records of the same run's Clover report, matched by path as the run named it
/// (before path rules).
#[derive(Default)]
struct PhpunitReports {
    /// Per source path: its file report, the report's source directory, and whether a record
    /// took it.
    files: HashMap<String, (PathBuf, Arc<str>, bool)>,
    /// The report directories, for messages.
    dirs: Vec<PathBuf>,
    /// The tools the reports name, with their versions: tags of the shard's test run.
    tools: std::collections::BTreeMap<String, String>,
}

impl PhpunitReports {
    /// Reads the index of the report in `dir`.
    fn add(&mut self, dir: &Path) -> anyhow::Result<()> {
        let index_path = dir.join("index.xml");
        let file = File::open(&index_path)
            .with_context(|| format!("cannot open {}", index_path.display()))?;
        let index = phpunit::read_index(BufReader::new(file))
            .with_context(|| index_path.display().to_string())?;
        self.tools.extend(index.tools);
        let source: Arc<str> = index.source.into();
        for (path, href) in index.files {
            let report = (dir.join(&href), source.clone(), false);
            if self.files.insert(path.clone(), report).is_some() {
                return Err(anyhow!(
                    "{}: {path} is in two PHPUnit XML reports pushed together",
                    index_path.display()
                ));
            }
        }
        self.dirs.push(dir.to_owned());
        Ok(())
    }

    /// Puts the tests of `record`'s file on it, when a report has the file.
    fn attach(&mut self, record: &mut formats::Record) -> anyhow::Result<()> {
        let Some((report, source, taken)) = self.files.get_mut(&record.path) else {
            return Ok(());
        };
        if std::mem::replace(taken, true) {
            return Err(anyhow!(
                "{} is in two coverage records pushed with its PHPUnit XML report; push each \
                 run's Clover report once",
                record.path
            ));
        }
        let file =
            File::open(&*report).with_context(|| format!("cannot open {}", report.display()))?;
        let tests = phpunit::read_file(BufReader::new(file), source)
            .with_context(|| report.display().to_string())?;
        if tests.path != record.path {
            return Err(anyhow!(
                "{}: the report is of {}, its index.xml says {}",
                report.display(),
                tests.path,
                record.path
            ));
        }
        phpunit::attach(&mut record.file, tests).map_err(|e| anyhow!(e))
    }

    /// Every file of the reports found its record.
    fn check_all_taken(&self) -> anyhow::Result<()> {
        let mut missing: Vec<&str> = self
            .files
            .iter()
            .filter(|(_, (_, _, taken))| !taken)
            .map(|(path, _)| path.as_str())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        missing.sort_unstable();
        let dirs: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
        Err(anyhow!(
            "{} files of PHPUnit's XML report ({}) are in no coverage file pushed with it, \
             e.g. {}: PHPUnit's XML report lists only the lines that ran, so push it with the \
             Clover report of the same run (`phpunit --coverage-clover FILE`)",
            missing.len(),
            dirs.join(", "),
            missing[..missing.len().min(3)].join(", ")
        ))
    }
}

/// The CI checkout (or, outside CI, the current directory): absolute paths under it are made
/// relative to it, as the repository names its files, unless `--root` says otherwise. The
/// variables are those the providers set to the checkout.
const WORKSPACE_VARIABLES: &[&str] = &[
    "GITHUB_WORKSPACE",
    "CI_PROJECT_DIR",
    "CIRCLE_WORKING_DIRECTORY",
    "BUILDKITE_BUILD_CHECKOUT_PATH",
    "BUILD_SOURCESDIRECTORY",
    "WORKSPACE",
];

fn workspace() -> Option<String> {
    // CircleCI's is `~/project`.
    let home = |dir: String| match dir.strip_prefix("~/") {
        Some(rest) => std::env::var("HOME")
            .map(|h| format!("{}/{rest}", h.trim_end_matches('/')))
            .unwrap_or(dir),
        None => dir,
    };
    // The root directory would make every absolute path relative.
    let usable = |dir: String| {
        let dir = dir.trim_end_matches('/').to_owned();
        (dir.starts_with('/') && dir.len() > 1).then_some(dir)
    };
    WORKSPACE_VARIABLES
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find_map(|dir| usable(home(dir)))
        .or_else(|| usable(std::env::current_dir().ok()?.to_str()?.to_owned()))
}

/// What a file looked like at the last scan.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Seen {
    len: u64,
    modified: Option<SystemTime>,
}

/// Sends each file of `dir` once it has stopped changing for `settle`, and everything left
/// once the command has exited. Files covd does not recognise are skipped with a warning, and
/// so are coverage files in a second format: test tools often write the same coverage in
/// several (jest: `lcov.info`, `coverage-final.json`, `clover.xml`), and sending them all would
/// count it several times. `--format` picks the one to send.
fn watch(
    mut sender: Sender,
    dir: &Path,
    settle: Duration,
    exited: &AtomicBool,
    ran: &Mutex<Option<Ran>>,
) -> anyhow::Result<u64> {
    // file -> (how it looked, since when it has looked so)
    let mut pending: HashMap<PathBuf, (Seen, std::time::Instant)> = HashMap::new();
    // Files sent or skipped, as they looked then.
    let mut done_with: HashMap<PathBuf, Seen> = HashMap::new();
    // Files that did not parse, as they looked then: retried when they change.
    let mut unparsed: HashMap<PathBuf, (Seen, anyhow::Error)> = HashMap::new();
    let mut format_sent: Option<Format> = None;
    let mut changed_after_send: Vec<PathBuf> = Vec::new();
    loop {
        // Read the flag before scanning: a file written just before the exit is then seen.
        let done = exited.load(Ordering::Acquire);
        for (path, seen) in scan(dir) {
            if let Some(before) = done_with.get(&path) {
                if *before != seen && !changed_after_send.contains(&path) {
                    changed_after_send.push(path.clone());
                }
                continue;
            }
            if unparsed.get(&path).is_some_and(|(was, _)| *was == seen) {
                continue;
            }
            let now = std::time::Instant::now();
            let since = match pending.get(&path) {
                Some((was, since)) if *was == seen => *since,
                _ => now,
            };
            pending.insert(path.clone(), (seen, since));
            if !done && now.duration_since(since) < settle {
                continue;
            }
            pending.remove(&path);
            unparsed.remove(&path);
            let Ok(file) = File::open(&path) else {
                continue;
            };
            let mut input = sender.open(file);
            let outcome = match sender.kind(&path, &mut input) {
                Err(stop) => Err(stop),
                Ok(None) => {
                    eprintln!("covd: warning: {}", unknown(&path));
                    Ok(())
                }
                Ok(Some(Kind::Tests(report))) => sender.read_tests(&path, report, input),
                Ok(Some(Kind::Coverage(format))) => match format_sent {
                    Some(first) if first != format => {
                        eprintln!(
                            "covd: warning: {} is {format:?} coverage, but this shard sends {first:?}; skipped                              (the same coverage in two formats would count twice; --format chooses)",
                            path.display()
                        );
                        Ok(())
                    }
                    _ => {
                        format_sent = Some(format);
                        sender.send_whole_file(&path, input, format)
                    }
                },
            };
            match outcome {
                Ok(()) => {
                    done_with.insert(path, seen);
                }
                Err(Stop::Closed) => return Ok(sender.records),
                // Still being written, perhaps: try again when it changes (or at the end).
                Err(Stop::Failed(e)) if !done => {
                    unparsed.insert(path, (seen, e));
                }
                Err(Stop::Failed(e)) => return Err(e),
            }
        }
        if done {
            if let Some((_, e)) = unparsed.into_values().next() {
                return Err(e);
            }
            sender.ran = *ran.lock().unwrap_or_else(|e| e.into_inner());
            let records = sender.finish();
            if !changed_after_send.is_empty() {
                // What was sent is merged; what came later is not: say so, as a failure.
                return Err(anyhow!(
                    "{} changed after it was sent; the shard's coverage is missing the change",
                    changed_after_send
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            return Ok(records);
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

/// How the test command ran: its wall time, and the peak resident memory of its largest
/// process (the kernel's `ru_maxrss` of the waited-for children).
#[derive(Debug, Clone, Copy)]
struct Ran {
    took: Duration,
    peak_bytes: u64,
}

/// The test command, running.
struct TestCommand {
    exited: Arc<AtomicBool>,
    /// Set before `exited`.
    ran: Arc<Mutex<Option<Ran>>>,
    status: Arc<Mutex<Option<io::Result<std::process::ExitStatus>>>>,
    waiter: tokio::task::JoinHandle<()>,
}

fn start_command(argv: &[String]) -> Result<TestCommand, Failure> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| bad_input(anyhow!("--watch needs a command after `--`")))?;
    let started = std::time::Instant::now();
    let mut child = std::process::Command::new(program)
        .args(args)
        // The tests run the project's code (a pull request's, say): covd's token is not theirs.
        .env_remove("COVD_TOKEN")
        .spawn()
        .with_context(|| format!("cannot run `{program}`"))
        .map_err(bad_input)?;
    let exited = Arc::new(AtomicBool::new(false));
    let status = Arc::new(Mutex::new(None));
    let ran = Arc::new(Mutex::new(None));
    let waiter = {
        let (exited, status, ran) = (exited.clone(), status.clone(), ran.clone());
        tokio::task::spawn_blocking(move || {
            let result = child.wait();
            let took = started.elapsed();
            // The only child covd waits for: ru_maxrss (KiB on Linux) is the command's
            // largest process.
            let peak_bytes =
                nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
                    .map_or(0, |u| u64::try_from(u.max_rss()).unwrap_or(0) * 1024);
            *ran.lock().unwrap_or_else(|e| e.into_inner()) = Some(Ran { took, peak_bytes });
            *status.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
            exited.store(true, Ordering::Release);
        })
    };
    Ok(TestCommand {
        exited,
        ran,
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
