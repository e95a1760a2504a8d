//! The service's request and answer types: plain data, free of wire types.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

use crate::model::{FileBatch, Totals};

/// Limits on what one client can make the daemon hold. Each is a named setting of `serve`
/// (`--max-run-id-bytes` for `max_run_id_bytes`, …), and a request beyond one is refused with
/// RESOURCE_EXHAUSTED naming it ([`Limits::exceeded`]).
#[derive(Debug, Clone)]
pub struct Limits {
    /// The largest line number accepted.
    pub max_line: u32,
    /// Distinct files in one run.
    pub max_files_per_run: usize,
    /// Files in one delta.
    pub max_files_per_delta: usize,
    /// Distinct executable lines in one run, over its files.
    pub max_lines_per_run: u64,
    /// Bytes of deltas one run takes in, over its shards and their attempts (what its delta
    /// log may grow to).
    pub max_run_bytes: u64,
    /// Branch arms of one line, in one file of a delta.
    pub max_branches_per_line: usize,
    /// Estimated bytes of one run's coverage in memory (see
    /// [`crate::aggregate::estimated_bytes`]), checked before each delta is applied.
    pub max_run_memory_bytes: usize,
    /// Estimated bytes of every open run's coverage and the complete runs held in memory,
    /// checked before each delta is applied.
    pub max_memory_bytes: usize,
    /// Distinct tests a run's per-test attribution names (at most `u32::MAX`, the ids).
    pub max_tests_per_run: usize,
    /// Shards in one run.
    pub max_shards_per_run: usize,
    /// Runs held at once; at the limit, the run settled longest ago gives up its raw data.
    pub max_runs: usize,
    /// New runs one token (or, without tokens, one client address) may open per hour; 0: no
    /// limit.
    pub max_runs_per_token_per_hour: u32,
    /// Bytes of a function name, branch label or test name in a delta.
    pub max_name_bytes: usize,
    /// Bytes of a run id.
    pub max_run_id_bytes: usize,
    /// Bytes of a shard id.
    pub max_shard_id_bytes: usize,
    /// Bytes of a run's project, commit, branch or flag.
    pub max_run_field_bytes: usize,
    /// Test cases one shard reports with its finish.
    pub max_tests_per_shard: usize,
    /// Bytes of a test case's name or suite, or of a shard's platform, in its finish.
    pub max_test_field_bytes: usize,
    /// Runs a list answers with when the request names no number (and the most it answers).
    pub runs_listed: usize,
    /// Lines of a file one query answer holds; larger files are read in pages.
    pub file_page_lines: usize,
    /// Deltas decoded and applied at once, over all streams. A decoded delta takes several
    /// times its wire size, so this bounds the daemon's memory for in-flight work. A delta
    /// holds its slot while it waits for its group commit's fsync, so the default is twice
    /// the cores (and 2): the cores stay busy meanwhile, and groups grow (on the ingest
    /// benchmark, kernel CPU 1.85 → 1.55 s against cores + 1, the same peak memory).
    pub max_deltas_in_flight: usize,
    /// Bytes of memory for the aggregates of complete runs; beyond it the least recently used
    /// leave memory and are read back from storage when asked for. Open runs do not count.
    pub memory_budget_bytes: usize,
    /// How long after a run completes a higher attempt of one of its shards may reopen it (CI
    /// "re-run failed jobs" keeps the run id): the run keeps its deltas on disk that long.
    /// `None`: a complete run refuses every new attempt, and drops its deltas when compacted.
    pub reopen_window: Option<std::time::Duration>,
    /// Bytes of one source text pushed with a run (`covd push --sources`).
    pub max_source_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_line: crate::model::MAX_LINE,
            max_files_per_run: 1_000_000,
            max_files_per_delta: 100_000,
            max_tests_per_run: 1_000_000,
            max_lines_per_run: 200_000_000,
            max_branches_per_line: 10_000,
            max_run_bytes: 4 << 30,
            max_run_memory_bytes: 4 << 30,
            max_memory_bytes: default_max_memory(),
            max_shards_per_run: 10_000,
            max_runs: 10_000,
            max_runs_per_token_per_hour: 1_000,
            max_name_bytes: 4096,
            max_run_id_bytes: 256,
            max_shard_id_bytes: 128,
            max_run_field_bytes: 1024,
            max_tests_per_shard: 1_000_000,
            max_test_field_bytes: 4096,
            runs_listed: 100,
            file_page_lines: 200_000,
            max_deltas_in_flight: std::thread::available_parallelism()
                .map_or(2, |n| 2 * n.get() + 2),
            memory_budget_bytes: 512 << 20,
            reopen_window: Some(std::time::Duration::from_secs(24 * 3600)),
            max_source_bytes: 4 << 20,
        }
    }
}

/// Three quarters of the machine's memory (`MemTotal`), or 16 GiB where that cannot be read.
fn default_max_memory() -> usize {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let kb = info
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<usize>()
                .ok()?;
            Some(kb.saturating_mul(1024))
        });
    total.map_or(16 << 30, |bytes| bytes / 4 * 3)
}

impl Limits {
    /// The refusal of `what`, which goes beyond the limit whose `serve` flag is `setting`.
    pub fn exceeded(
        &self,
        what: impl std::fmt::Display,
        setting: &str,
        limit: impl std::fmt::Display,
    ) -> crate::service::Error {
        crate::service::Error::ResourceExhausted(format!(
            "{what}: beyond the limit --{setting} ({limit})"
        ))
    }
}

/// What a run is about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunParams {
    pub project: String,
    pub commit: String,
    pub branch: String,
    pub flags: BTreeSet<String>,
    /// Empty: no expectations declared.
    pub expected_shards: Vec<String>,
    /// How the client asks for the project's name to be kept; the gRPC edge applies it (see
    /// [`crate::privacy`]), so the service only ever sees the name as kept.
    pub project_as: crate::privacy::ProjectNames,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardState {
    Pending,
    Streaming,
    Interrupted,
    Finished,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStatus {
    pub shard_id: String,
    pub state: ShardState,
    pub attempt: u32,
    pub last_seq: u64,
    pub expected: bool,
    pub finished_at: Option<SystemTime>,
    /// What the shard's finish reported about its tests.
    pub telemetry: Option<TestTelemetry>,
}

/// A shard's test results, as its finish message reported them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestTelemetry {
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
    pub errored: u64,
    pub incomplete: u64,
    /// Assertions made, when the test tool counts them.
    pub assertions: Option<u64>,
    pub duration: Option<std::time::Duration>,
    pub peak_memory_bytes: u64,
    pub platform: String,
    /// Each test case, when the shard reported them.
    pub tests: Vec<crate::model::TestCase>,
    /// The environment: `os`, `arch`, `ci`, and the user's own tags.
    pub tags: std::collections::BTreeMap<String, String>,
}

/// Most environment tags a shard's finish may carry.
pub const MAX_TAGS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStatus {
    pub run_id: String,
    pub params: RunParams,
    pub shards: Vec<ShardStatus>,
    pub complete: bool,
    pub missing_shards: Vec<String>,
    pub expectations_declared: bool,
    pub totals: Totals,
    pub created_at: SystemTime,
    pub completed_at: Option<SystemTime>,
}

/// The first message of an ingest stream.
#[derive(Debug, Clone)]
pub struct ShardHeader {
    pub run_id: String,
    pub shard_id: String,
    /// 0 is read as 1.
    pub attempt: u32,
    /// Used when the push opens the run implicitly; `expected_shards` is ignored.
    pub params: RunParams,
    /// Names one push across its reconnects (`ShardHeader.session_id` in covd.proto): an
    /// attempt belongs to the push that started it. Empty for clients without sessions.
    pub session: Vec<u8>,
}

/// The longest session id accepted, in bytes.
pub(super) const MAX_SESSION_BYTES: usize = 64;

/// A validated delta: files with their coverage, applied whole or not at all.
#[derive(Debug, Clone, Default)]
pub struct Delta {
    pub seq: u64,
    pub files: FileBatch,
    /// The delta as its client encoded it, when it came over the wire (a `covd.v1.Delta`): the
    /// durable store keeps these bytes instead of encoding `files` again, and reads them back
    /// with the decoder the server gives it ([`crate::persist::WireDecoder`]).
    pub wire: Option<bytes::Bytes>,
}

/// What became of a delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub seq: u64,
    /// Applied before; nothing changed.
    pub duplicate: bool,
    /// Paths of the delta that are not among the run's known files (at most
    /// [`MAX_UNKNOWN_REPORTED`]); empty when the run has no file list.
    pub unknown_paths: Vec<String>,
}

/// Unknown paths reported per acknowledgement at most; enough to show a wrong path rule.
pub const MAX_UNKNOWN_REPORTED: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Lcov,
    /// LCOV for lcov 1.x readers (2-field `FN`).
    Lcov1,
    Cobertura,
    Json,
    Markdown,
}

impl ExportFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            ExportFormat::Lcov | ExportFormat::Lcov1 => "text/x-lcov",
            ExportFormat::Cobertura => "application/xml",
            ExportFormat::Json => "application/json",
            ExportFormat::Markdown => "text/markdown",
        }
    }
}

/// What an export says about itself before its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportHeader {
    pub complete: bool,
    pub missing_shards: Vec<String>,
    pub expectations_declared: bool,
    pub timed_out: bool,
    pub totals: Totals,
    pub content_type: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryEntry {
    pub path: Arc<str>,
    pub is_directory: bool,
    pub totals: Totals,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectorySummary {
    pub path: String,
    pub totals: Totals,
    pub entries: Vec<DirectoryEntry>,
}

/// Which tests covered some lines (see `CoverageService::tests_for_lines`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestsForLines {
    /// Sorted.
    pub tests: Vec<Arc<str>>,
    /// Asked-for paths the run does not hold.
    pub unknown_files: Vec<String>,
}
