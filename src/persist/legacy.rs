//! The records of the first release (format 1): a postcard body after the version byte.
//! postcard is positional, so these types are frozen exactly as that release defined them
//! (field order and types, the serde forms of `Duration` and of the test status enum) and
//! are only read, then turned into today's records. Never change them; a data directory
//! written by that release is checked in (`tests/fixtures/datadir-v1`) and must keep reading.

use std::borrow::Cow;
use std::time::Duration;

use serde::Deserialize;

use super::codec::CodecError;
use super::records::{
    BranchRecord, FileListRecord, FileRecord, FunctionRecord, RunRecord, ShardRecord,
    SummaryRecord, TelemetryRecord, TestCaseRecord, TestLinesRecord, TestStatus,
};

/// Reads a format-1 body as `T`.
pub(crate) fn read<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, CodecError> {
    postcard::from_bytes(body).map_err(|e| CodecError::Malformed(format!("format 1: {e}")))
}

/// A record the first release wrote, and today's record it becomes.
pub(crate) trait Legacy<'a>: Deserialize<'a> {
    type Current;
    fn upgrade(self) -> Self::Current;
}

#[derive(Deserialize)]
pub(crate) struct Run {
    run_id: String,
    project: String,
    commit: String,
    branch: String,
    flags: Vec<String>,
    expected_shards: Vec<String>,
    created_at_ms: u64,
    completed_at_ms: Option<u64>,
}

impl Legacy<'_> for Run {
    type Current = RunRecord;
    fn upgrade(self) -> RunRecord {
        RunRecord {
            run_id: self.run_id,
            project: self.project,
            commit: self.commit,
            branch: self.branch,
            flags: self.flags,
            expected_shards: self.expected_shards,
            created_at_ms: self.created_at_ms,
            completed_at_ms: self.completed_at_ms,
            // That release dropped a run's deltas when it compacted it.
            deltas_kept: false,
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct Shard {
    shard_id: String,
    expected: bool,
    attempt: u32,
    last_seq: u64,
    finished_at_ms: Option<u64>,
    telemetry: Option<Telemetry>,
}

impl Legacy<'_> for Shard {
    type Current = ShardRecord;
    fn upgrade(self) -> ShardRecord {
        ShardRecord {
            shard_id: self.shard_id,
            expected: self.expected,
            attempt: self.attempt,
            last_seq: self.last_seq,
            finished_at_ms: self.finished_at_ms,
            telemetry: self.telemetry.map(Telemetry::upgrade),
            writer_session: Vec::new(),
            stored_bytes: 0,
        }
    }
}

#[derive(Deserialize)]
struct Telemetry {
    passed: u64,
    failed: u64,
    skipped: u64,
    errored: u64,
    duration_ms: Option<u64>,
    peak_memory_bytes: u64,
    platform: String,
    tests: Vec<TestCase>,
}

impl Telemetry {
    fn upgrade(self) -> TelemetryRecord {
        TelemetryRecord {
            passed: self.passed,
            failed: self.failed,
            skipped: self.skipped,
            errored: self.errored,
            duration_ms: self.duration_ms,
            peak_memory_bytes: self.peak_memory_bytes,
            platform: self.platform,
            tests: self.tests.into_iter().map(TestCase::upgrade).collect(),
            tags: Default::default(),
            incomplete: 0,
            assertions: None,
        }
    }
}

#[derive(Deserialize)]
struct TestCase {
    suite: String,
    name: String,
    status: Status,
    duration: Duration,
}

/// postcard writes the variant's index: the order is the format.
#[derive(Deserialize)]
enum Status {
    Passed,
    Failed,
    Skipped,
    Errored,
}

impl TestCase {
    fn upgrade(self) -> TestCaseRecord {
        let status = match self.status {
            Status::Passed => TestStatus::Passed,
            Status::Failed => TestStatus::Failed,
            Status::Skipped => TestStatus::Skipped,
            Status::Errored => TestStatus::Errored,
        };
        TestCaseRecord {
            suite: self.suite,
            name: self.name,
            status: status as i32,
            duration_ns: u64::try_from(self.duration.as_nanos()).unwrap_or(u64::MAX),
            assertions: None,
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct Summary {
    run_id: String,
    project: String,
    commit: String,
    branch: String,
    created_at_ms: u64,
    completed_at_ms: Option<u64>,
    shards: u64,
    files: u64,
    lines: u64,
    lines_covered: u64,
    branches: u64,
    branches_taken: u64,
    functions: u64,
    functions_hit: u64,
}

impl Legacy<'_> for Summary {
    type Current = SummaryRecord;
    fn upgrade(self) -> SummaryRecord {
        SummaryRecord {
            run_id: self.run_id,
            project: self.project,
            commit: self.commit,
            branch: self.branch,
            created_at_ms: self.created_at_ms,
            completed_at_ms: self.completed_at_ms,
            shards: self.shards,
            files: self.files,
            lines: self.lines,
            lines_covered: self.lines_covered,
            branches: self.branches,
            branches_taken: self.branches_taken,
            functions: self.functions,
            functions_hit: self.functions_hit,
            ..SummaryRecord::default()
        }
    }
}

/// A run's repository files: a plain list of paths.
#[derive(Deserialize)]
#[serde(transparent)]
pub(crate) struct FileList(Vec<String>);

impl Legacy<'_> for FileList {
    type Current = FileListRecord;
    fn upgrade(self) -> FileListRecord {
        FileListRecord { paths: self.0 }
    }
}

/// Files with coverage (merged parts, and deltas that were not in wire form).
#[derive(Deserialize)]
#[serde(transparent)]
pub(crate) struct Files<'a>(#[serde(borrow)] Vec<File<'a>>);

impl<'a> Legacy<'a> for Files<'a> {
    type Current = Vec<FileRecord>;
    fn upgrade(self) -> Vec<FileRecord> {
        self.0.into_iter().map(File::upgrade).collect()
    }
}

#[derive(Deserialize)]
struct File<'a> {
    #[serde(borrow)]
    path: Cow<'a, str>,
    lines: Vec<u8>,
    hits: Vec<u64>,
    #[serde(borrow)]
    branches: Vec<Branch<'a>>,
    #[serde(borrow)]
    functions: Vec<Function<'a>>,
    #[serde(borrow)]
    tests: Vec<(Cow<'a, str>, Vec<u8>)>,
}

#[derive(Deserialize)]
struct Branch<'a> {
    line: u32,
    block: u32,
    index: u32,
    #[serde(borrow)]
    label: Option<Cow<'a, str>>,
    taken: Option<u64>,
}

#[derive(Deserialize)]
struct Function<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    start_line: u32,
    end_line: u32,
    hits: u64,
}

impl File<'_> {
    fn upgrade(self) -> FileRecord {
        FileRecord {
            path: self.path.into_owned(),
            lines: self.lines,
            hits: self.hits,
            branches: self
                .branches
                .into_iter()
                .map(|b| BranchRecord {
                    line: b.line,
                    block: b.block,
                    index: b.index,
                    label: b.label.map(Cow::into_owned),
                    taken: b.taken,
                })
                .collect(),
            functions: self
                .functions
                .into_iter()
                .map(|f| FunctionRecord {
                    name: f.name.into_owned(),
                    start_line: f.start_line,
                    end_line: f.end_line,
                    hits: f.hits,
                })
                .collect(),
            tests: self
                .tests
                .into_iter()
                .map(|(test, lines)| TestLinesRecord {
                    test: test.into_owned(),
                    lines,
                })
                .collect(),
        }
    }
}
