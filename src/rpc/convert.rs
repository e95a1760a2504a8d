//! Conversions between wire messages and domain types, and the checks every value from the
//! wire passes (incoming deltas are read by `delta`, with these checks). A refusal names the
//! field (`delta.files[3].line_gaps[17]`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use roaring::RoaringBitmap;

use super::proto;
use crate::diff::ChangeKind;
use crate::model::{
    self, BranchArm, BranchKey, FileBatch, FileCoverage, MAX_LINE, TestCase, TestStatus, Totals,
};
use crate::service::{
    self, Delta, DirectorySummary, Error, ExportHeader, Limits, RunParams, RunStatus, ShardState,
    TestTelemetry,
};

pub(crate) fn params_from_proto(p: Option<proto::RunParams>) -> RunParams {
    let p = p.unwrap_or_default();
    RunParams {
        project_as: project_as(p.project_as),
        project: p.project,
        commit: p.commit,
        branch: p.branch,
        flags: p.flags.into_iter().collect(),
        expected_shards: p.expected_shards,
    }
}

/// How the client asked for the project's name to be kept.
fn project_as(value: i32) -> crate::privacy::ProjectNames {
    use crate::privacy::ProjectNames;
    match proto::ProjectNames::try_from(value) {
        Ok(proto::ProjectNames::Unspecified | proto::ProjectNames::Plain) => ProjectNames::Plain,
        Ok(proto::ProjectNames::Pseudonym) => ProjectNames::Pseudonym,
        // A value this release does not know asks for more than it can tell: the strictest.
        Ok(proto::ProjectNames::Anonymous) | Err(_) => ProjectNames::Anonymous,
    }
}

pub(crate) fn project_as_to_proto(names: crate::privacy::ProjectNames) -> i32 {
    use crate::privacy::ProjectNames;
    let names = match names {
        ProjectNames::Plain => proto::ProjectNames::Unspecified,
        ProjectNames::Pseudonym => proto::ProjectNames::Pseudonym,
        ProjectNames::Anonymous => proto::ProjectNames::Anonymous,
    };
    names as i32
}

pub(crate) fn params_to_proto(p: RunParams) -> proto::RunParams {
    proto::RunParams {
        project: p.project,
        commit: p.commit,
        branch: p.branch,
        flags: p.flags.into_iter().collect(),
        expected_shards: p.expected_shards,
        project_as: project_as_to_proto(p.project_as),
    }
}

pub(crate) fn totals_to_proto(t: Totals) -> proto::Totals {
    proto::Totals {
        files: t.files,
        lines: t.lines,
        lines_covered: t.lines_covered,
        branches: t.branches,
        branches_taken: t.branches_taken,
        functions: t.functions,
        functions_hit: t.functions_hit,
    }
}

pub(crate) fn totals_from_proto(t: Option<proto::Totals>) -> Totals {
    let t = t.unwrap_or_default();
    Totals {
        files: t.files,
        lines: t.lines,
        lines_covered: t.lines_covered,
        branches: t.branches,
        branches_taken: t.branches_taken,
        functions: t.functions,
        functions_hit: t.functions_hit,
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

pub(crate) fn status_to_proto(s: RunStatus) -> proto::RunStatus {
    proto::RunStatus {
        run_id: s.run_id,
        params: Some(params_to_proto(s.params)),
        shards: s
            .shards
            .into_iter()
            .map(|sh| proto::ShardStatus {
                shard_id: sh.shard_id,
                state: match sh.state {
                    ShardState::Pending => proto::ShardState::Pending,
                    ShardState::Streaming => proto::ShardState::Streaming,
                    ShardState::Interrupted => proto::ShardState::Interrupted,
                    ShardState::Finished => proto::ShardState::Finished,
                } as i32,
                attempt: sh.attempt,
                last_seq: sh.last_seq,
                expected: sh.expected,
                finished_at: sh.finished_at.map(timestamp),
                telemetry: sh.telemetry.map(telemetry_to_proto),
            })
            .collect(),
        complete: s.complete,
        missing_shards: s.missing_shards,
        expectations_declared: s.expectations_declared,
        totals: Some(totals_to_proto(s.totals)),
        created_at: Some(timestamp(s.created_at)),
        completed_at: s.completed_at.map(timestamp),
    }
}

/// A shard's test results; `limits` checks them as a finish from a client (the client reads
/// the daemon's answers with `None`).
pub(crate) fn telemetry_from_proto(
    t: proto::TestTelemetry,
    limits: Option<&Limits>,
) -> Result<TestTelemetry, Error> {
    let duration = match t.duration {
        None => None,
        Some(d) => Some(Duration::try_from(d).map_err(|e| {
            Error::invalid(
                "finish.telemetry.duration",
                format!("not a valid duration: {e}"),
            )
        })?),
    };
    // The daemon checks a client's finish against its limits; the client reads the daemon's
    // answers as they are.
    let field_bytes = |field: &str, value: &str| {
        let Some(limits) = limits else {
            return Ok(());
        };
        if value.len() > limits.max_test_field_bytes {
            return Err(limits.exceeded(
                format!("{field} is {} bytes long", value.len()),
                "max-test-field-bytes",
                limits.max_test_field_bytes,
            ));
        }
        if value.bytes().any(|b| b.is_ascii_control()) {
            return Err(Error::invalid(field, "must not contain control characters"));
        }
        Ok(())
    };
    field_bytes("finish.telemetry.platform", &t.platform)?;
    if t.tags.len() > crate::service::MAX_TAGS {
        return Err(Error::invalid(
            "finish.telemetry.tags",
            format!(
                "{} tags; at most {}",
                t.tags.len(),
                crate::service::MAX_TAGS
            ),
        ));
    }
    for (key, value) in &t.tags {
        if key.is_empty() {
            return Err(Error::invalid(
                "finish.telemetry.tags",
                "a tag without a key",
            ));
        }
        field_bytes(&format!("finish.telemetry.tags[{key}]"), key)?;
        field_bytes(&format!("finish.telemetry.tags[{key}]"), value)?;
    }
    if let Some(limits) = limits
        && t.tests.len() > limits.max_tests_per_shard
    {
        return Err(limits.exceeded(
            format!("finish.telemetry.tests: {} test cases", t.tests.len()),
            "max-tests-per-shard",
            limits.max_tests_per_shard,
        ));
    }
    let tests = t
        .tests
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            for (field, value) in [("name", &c.name), ("suite", &c.suite)] {
                field_bytes(&format!("finish.telemetry.tests[{i}].{field}"), value)?;
            }
            let status = match proto::TestStatus::try_from(c.status) {
                Ok(proto::TestStatus::Passed) => TestStatus::Passed,
                Ok(proto::TestStatus::Failed) => TestStatus::Failed,
                Ok(proto::TestStatus::Skipped) => TestStatus::Skipped,
                Ok(proto::TestStatus::Errored) => TestStatus::Errored,
                Ok(proto::TestStatus::Incomplete) => TestStatus::Incomplete,
                _ => {
                    return Err(Error::invalid(
                        format!("finish.telemetry.tests[{i}].status"),
                        "must be passed, failed, skipped, errored or incomplete",
                    ));
                }
            };
            let duration = c
                .duration
                .map(Duration::try_from)
                .transpose()
                .map_err(|e| {
                    Error::invalid(
                        format!("finish.telemetry.tests[{i}].duration"),
                        e.to_string(),
                    )
                })?
                .unwrap_or_default();
            Ok(TestCase {
                suite: c.suite,
                name: c.name,
                status,
                duration,
                assertions: c.assertions,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(TestTelemetry {
        passed: t.passed,
        failed: t.failed,
        skipped: t.skipped,
        errored: t.errored,
        incomplete: t.incomplete,
        assertions: t.assertions,
        duration,
        peak_memory_bytes: t.peak_memory_bytes,
        platform: t.platform,
        tests,
        tags: t.tags.into_iter().collect(),
    })
}

pub(crate) fn telemetry_to_proto(t: TestTelemetry) -> proto::TestTelemetry {
    proto::TestTelemetry {
        passed: t.passed,
        failed: t.failed,
        skipped: t.skipped,
        errored: t.errored,
        incomplete: t.incomplete,
        assertions: t.assertions,
        duration: t
            .duration
            .and_then(|d| prost_types::Duration::try_from(d).ok()),
        peak_memory_bytes: t.peak_memory_bytes,
        platform: t.platform,
        tests: t
            .tests
            .into_iter()
            .map(|c| proto::TestCase {
                suite: c.suite,
                name: c.name,
                status: match c.status {
                    TestStatus::Passed => proto::TestStatus::Passed,
                    TestStatus::Failed => proto::TestStatus::Failed,
                    TestStatus::Skipped => proto::TestStatus::Skipped,
                    TestStatus::Errored => proto::TestStatus::Errored,
                    TestStatus::Incomplete => proto::TestStatus::Incomplete,
                } as i32,
                duration: prost_types::Duration::try_from(c.duration).ok(),
                assertions: c.assertions,
            })
            .collect(),
        tags: t.tags.into_iter().collect(),
    }
}

/// A delta as it came over the wire: decoded and validated whole (nothing of it reaches the
/// aggregate unless all of it is valid), its bytes kept for the store.
pub(crate) fn delta_from_wire(wire: bytes::Bytes, limits: &Limits) -> Result<Delta, Error> {
    let mut delta = super::delta::read(&wire, limits)?;
    delta.wire = Some(wire);
    Ok(delta)
}

/// The store's [`crate::persist::WireDecoder`]: the files of a delta kept in wire form. Its
/// delta passed validation when it arrived, so only the hard bounds apply here: a limit
/// lowered since then must not make acknowledged data unreadable.
pub fn wire_delta_files(wire: &[u8]) -> Result<FileBatch, String> {
    let limits = Limits {
        max_line: model::MAX_LINE,
        max_name_bytes: usize::MAX,
        ..Limits::default()
    };
    let delta =
        super::delta::read_stored(wire, &limits).map_err(|e| format!("stored delta: {e}"))?;
    Ok(delta.files)
}

pub(crate) fn gaps_of(lines: impl Iterator<Item = u32>) -> Vec<u32> {
    let mut previous = 0;
    lines
        .map(|l| {
            let gap = l - previous;
            previous = l;
            gap
        })
        .collect()
}

fn tests_to_proto(file: &FileCoverage) -> Vec<proto::TestLines> {
    file.tests()
        .iter()
        .map(|(name, lines)| proto::TestLines {
            test: name.to_string(),
            line_gaps: gaps_of(lines.iter()),
        })
        .collect()
}

/// How a file's branch arms go on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArmForm {
    /// Numbered arms in `FileDelta`'s packed columns, labelled ones as `Branch` messages:
    /// for daemons whose `Resume` says `branch_columns`.
    Columns,
    /// Every arm a `Branch` message: what every daemon reads.
    Messages,
}

/// Encodes one file for the wire (what `delta::read` reads).
pub fn file_to_proto(path: String, file: &FileCoverage, arms: ArmForm) -> proto::FileDelta {
    let mut line_gaps = Vec::with_capacity(file.lines().len() as usize);
    let mut hits = Vec::with_capacity(line_gaps.capacity());
    let mut previous = 0;
    for (line, h) in file.line_hits() {
        line_gaps.push(line - previous);
        hits.push(h);
        previous = line;
    }
    let mut delta = proto::FileDelta {
        path,
        line_gaps,
        hits,
        functions: functions_to_proto(file),
        tests: tests_to_proto(file),
        ..Default::default()
    };
    match arms {
        ArmForm::Messages => delta.branches = branches_to_proto(file),
        ArmForm::Columns => {
            // Arms are kept in key order, so lines ascend and the gaps are >= 0.
            let mut previous = 0;
            for (k, taken) in file.branches() {
                match (&k.arm, taken.map_or(Some(0), |t| t.checked_add(1))) {
                    (BranchArm::Index(number), Some(taken)) => {
                        delta.arm_line_gaps.push(k.line - previous);
                        delta.arm_blocks.push(k.block);
                        delta.arm_numbers.push(*number);
                        delta.arm_taken.push(taken);
                        previous = k.line;
                    }
                    // Labelled arms, and a count the column cannot hold plus one.
                    _ => delta.branches.push(branch_to_proto(k, *taken)),
                }
            }
        }
    }
    delta
}

fn branch_to_proto(k: &BranchKey, taken: Option<u64>) -> proto::Branch {
    let (branch, label) = match &k.arm {
        BranchArm::Index(i) => (*i, String::new()),
        BranchArm::Label(l) => (0, l.to_string()),
    };
    proto::Branch {
        line: k.line,
        block: k.block,
        branch,
        label,
        taken,
    }
}

fn branches_to_proto(file: &FileCoverage) -> Vec<proto::Branch> {
    file.branches()
        .iter()
        .map(|(k, taken)| branch_to_proto(k, *taken))
        .collect()
}

fn functions_to_proto(file: &FileCoverage) -> Vec<proto::Function> {
    file.functions()
        .iter()
        .map(|f| proto::Function {
            name: f.name.to_string(),
            start_line: f.start_line,
            end_line: f.end_line,
            hits: f.hits,
        })
        .collect()
}

/// One page of a file for a query answer: its executable lines from `first_line` on, at most
/// `max_lines` of them, with what lies on them (see `GetFileRequest.max_lines`).
pub(crate) fn file_page_to_proto(
    path: String,
    file: &FileCoverage,
    first_line: u32,
    max_lines: usize,
) -> proto::FileCoverage {
    let mut lines = file.line_hits().skip_while(|(line, _)| *line < first_line);
    let page: Vec<proto::LineCoverage> = lines
        .by_ref()
        .take(max_lines)
        .map(|(line, hits)| proto::LineCoverage { line, hits })
        .collect();
    let next_line = lines.next().map_or(0, |(line, _)| line);
    let end = if next_line == 0 { u32::MAX } else { next_line };
    let on_page = |line: u32| (first_line..end).contains(&line);
    proto::FileCoverage {
        path,
        lines: page,
        branches: file
            .branches()
            .iter()
            .filter(|(k, _)| on_page(k.line))
            .map(|(k, taken)| branch_to_proto(k, *taken))
            .collect(),
        functions: functions_to_proto(file)
            .into_iter()
            .filter(|f| on_page(f.start_line))
            .collect(),
        totals: Some(totals_to_proto(file.totals())),
        tests: file
            .tests()
            .iter()
            .filter_map(|(name, lines)| {
                let gaps = gaps_of(lines.iter().filter(|l| on_page(*l)));
                (!gaps.is_empty()).then(|| proto::TestLines {
                    test: name.to_string(),
                    line_gaps: gaps,
                })
            })
            .collect(),
        next_line,
    }
}

/// Rebuilds a file, or one page of it, from a query answer (the client side of
/// `file_page_to_proto`).
pub fn file_coverage_from_proto(f: proto::FileCoverage) -> Result<FileCoverage, Error> {
    let mut builder = model::FileBuilder::new();
    for l in f.lines {
        builder.line(l.line, l.hits);
    }
    for b in f.branches {
        let arm = if b.label.is_empty() {
            BranchArm::Index(b.branch)
        } else {
            BranchArm::Label(b.label.into())
        };
        builder.branch(
            BranchKey {
                line: b.line,
                block: b.block,
                arm,
            },
            b.taken,
        );
    }
    for func in f.functions {
        builder.function(&func.name, func.start_line, func.end_line, func.hits);
    }
    for t in f.tests {
        let name: std::sync::Arc<str> = t.test.into();
        let mut line = 0u32;
        for gap in t.line_gaps {
            line = line.saturating_add(gap);
            builder.test_line(&name, line);
        }
    }
    Ok(builder.build())
}

pub(crate) fn export_header_to_proto(h: ExportHeader) -> proto::ExportHeader {
    proto::ExportHeader {
        complete: h.complete,
        missing_shards: h.missing_shards,
        expectations_declared: h.expectations_declared,
        timed_out: h.timed_out,
        totals: Some(totals_to_proto(h.totals)),
        content_type: h.content_type.to_owned(),
    }
}

pub(crate) fn export_format_from_proto(f: i32) -> Result<service::ExportFormat, Error> {
    match proto::ExportFormat::try_from(f) {
        Ok(proto::ExportFormat::Unspecified | proto::ExportFormat::Lcov) => {
            Ok(service::ExportFormat::Lcov)
        }
        Ok(proto::ExportFormat::Cobertura) => Ok(service::ExportFormat::Cobertura),
        Ok(proto::ExportFormat::Json) => Ok(service::ExportFormat::Json),
        Ok(proto::ExportFormat::Markdown) => Ok(service::ExportFormat::Markdown),
        Ok(proto::ExportFormat::Lcov1) => Ok(service::ExportFormat::Lcov1),
        Err(_) => Err(Error::invalid(
            "format",
            format!("unknown export format {f}"),
        )),
    }
}

pub(crate) fn directory_to_proto(d: DirectorySummary) -> proto::DirectorySummary {
    proto::DirectorySummary {
        path: d.path,
        totals: Some(totals_to_proto(d.totals)),
        entries: d
            .entries
            .into_iter()
            .map(|e| proto::DirectoryEntry {
                path: e.path.to_string(),
                is_directory: e.is_directory,
                totals: Some(totals_to_proto(e.totals)),
            })
            .collect(),
    }
}

// The client's direction: answers from the daemon into domain types.

pub(crate) fn status_from_proto(s: proto::RunStatus) -> RunStatus {
    let time = |t: Option<prost_types::Timestamp>| t.and_then(|t| SystemTime::try_from(t).ok());
    RunStatus {
        run_id: s.run_id,
        params: params_from_proto(s.params),
        shards: s
            .shards
            .into_iter()
            .map(|sh| service::ShardStatus {
                state: match proto::ShardState::try_from(sh.state) {
                    Ok(proto::ShardState::Streaming) => ShardState::Streaming,
                    Ok(proto::ShardState::Interrupted) => ShardState::Interrupted,
                    Ok(proto::ShardState::Finished) => ShardState::Finished,
                    _ => ShardState::Pending,
                },
                shard_id: sh.shard_id,
                attempt: sh.attempt,
                last_seq: sh.last_seq,
                expected: sh.expected,
                finished_at: time(sh.finished_at),
                telemetry: sh
                    .telemetry
                    .and_then(|t| telemetry_from_proto(t, None).ok()),
            })
            .collect(),
        complete: s.complete,
        missing_shards: s.missing_shards,
        expectations_declared: s.expectations_declared,
        totals: totals_from_proto(s.totals),
        created_at: time(s.created_at).unwrap_or(SystemTime::UNIX_EPOCH),
        completed_at: time(s.completed_at),
    }
}

pub(crate) fn export_header_from_proto(h: proto::ExportHeader) -> ExportHeader {
    ExportHeader {
        complete: h.complete,
        missing_shards: h.missing_shards,
        expectations_declared: h.expectations_declared,
        timed_out: h.timed_out,
        totals: totals_from_proto(h.totals),
        // The daemon's own string is not kept: the client knows which format it asked for.
        content_type: "",
    }
}

pub(crate) fn directory_from_proto(d: proto::DirectorySummary) -> DirectorySummary {
    DirectorySummary {
        path: d.path,
        totals: totals_from_proto(d.totals),
        entries: d
            .entries
            .into_iter()
            .map(|e| service::DirectoryEntry {
                path: e.path.into(),
                is_directory: e.is_directory,
                totals: totals_from_proto(e.totals),
            })
            .collect(),
    }
}

pub(crate) fn export_format_to_proto(f: service::ExportFormat) -> proto::ExportFormat {
    match f {
        service::ExportFormat::Lcov => proto::ExportFormat::Lcov,
        service::ExportFormat::Cobertura => proto::ExportFormat::Cobertura,
        service::ExportFormat::Json => proto::ExportFormat::Json,
        service::ExportFormat::Markdown => proto::ExportFormat::Markdown,
        service::ExportFormat::Lcov1 => proto::ExportFormat::Lcov1,
    }
}

/// The files and lines of a GetTestsForLines request: each range checked (1-based, first at
/// most last, within the lines a file may have); a file without ranges stands for every line.
pub(crate) fn file_lines_from_proto(
    files: Vec<proto::FileLines>,
) -> Result<Vec<(String, Option<RoaringBitmap>)>, Error> {
    files
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            if f.ranges.is_empty() {
                return Ok((f.path, None));
            }
            let mut lines = RoaringBitmap::new();
            for (j, r) in f.ranges.iter().enumerate() {
                let last = if r.last == 0 { r.first } else { r.last };
                let field = || format!("files[{i}].ranges[{j}]");
                if r.first == 0 {
                    return Err(Error::invalid(field(), "lines are numbered from 1"));
                }
                if last < r.first {
                    return Err(Error::invalid(
                        field(),
                        format!("the range {}-{last} ends before it starts", r.first),
                    ));
                }
                if last > MAX_LINE {
                    return Err(Error::invalid(
                        field(),
                        format!("line {last} is beyond the last line a file may have ({MAX_LINE})"),
                    ));
                }
                lines.insert_range(r.first..=last);
            }
            Ok((f.path, Some(lines)))
        })
        .collect()
}

/// Lines sent as gaps (see `FileDelta.line_gaps`), as a daemon's answer gives them.
pub fn lines_from_gaps(gaps: &[u32]) -> Result<RoaringBitmap, Error> {
    let mut line = 0u32;
    let mut lines = Vec::with_capacity(gaps.len());
    for (i, gap) in gaps.iter().enumerate() {
        line = match line.checked_add(*gap) {
            Some(next) if *gap > 0 => next,
            _ => {
                return Err(Error::invalid(
                    format!("line_gaps[{i}]"),
                    "lines must ascend within 32 bits",
                ));
            }
        };
        lines.push(line);
    }
    Ok(RoaringBitmap::from_sorted_iter(lines).expect("ascending by construction"))
}

/// A test impact answer in chunks: the first carries the state, the reasons and the files.
pub(crate) fn impact_to_proto(
    answer: service::TestImpact,
) -> impl Iterator<Item = proto::TestImpactChunk> {
    use proto::test_impact_chunk::State;
    let state = match answer.state {
        service::ImpactState::Selected => State::Selected,
        service::ImpactState::Empty => State::Empty,
        service::ImpactState::Unknown => State::Unknown,
    };
    let mut first = Some(proto::TestImpactChunk {
        state: state as i32,
        unknown: answer.unknown,
        files: answer
            .files
            .into_iter()
            .map(|f| proto::ImpactFile {
                path: f.path.to_string(),
                new_path: f.new_path.unwrap_or_default(),
                change: f.change.as_str().to_owned(),
                line_gaps: gaps_of(f.lines.iter()),
                uncovered_gaps: gaps_of(f.uncovered.iter()),
                tests: u32::try_from(f.tests).unwrap_or(u32::MAX),
            })
            .collect(),
        ignored: answer.ignored,
        gone: answer.gone.iter().map(|t| t.to_string()).collect(),
        tests: Vec::new(),
    });
    let size = |t: &service::SelectedTest| {
        t.name.len()
            + t.lines
                .iter()
                .map(|(p, l)| p.len() + 4 * l.len() as usize)
                .sum::<usize>()
    };
    super::in_chunks(answer.tests, size).map(move |tests| {
        let mut chunk = first.take().unwrap_or_default();
        chunk.tests = tests
            .into_iter()
            .map(|t| proto::SelectedTest {
                name: t.name.to_string(),
                new: t.new,
                files: file_lines_to_proto(&t.lines),
            })
            .collect();
        chunk
    })
}

/// Gathers the chunks of a test impact answer.
pub(crate) fn impact_from_proto(
    chunks: Vec<proto::TestImpactChunk>,
) -> Result<service::TestImpact, Error> {
    use proto::test_impact_chunk::State;
    let mut chunks = chunks.into_iter();
    let first = chunks
        .next()
        .ok_or_else(|| Error::invalid("answer", "the test impact answer is empty"))?;
    let state = match State::try_from(first.state) {
        Ok(State::Selected) => service::ImpactState::Selected,
        Ok(State::Empty) => service::ImpactState::Empty,
        Ok(State::Unknown) => service::ImpactState::Unknown,
        _ => {
            return Err(Error::invalid(
                "state",
                format!("unknown state {}", first.state),
            ));
        }
    };
    let change = |c: &str| match c {
        "modified" => Ok(ChangeKind::Modified),
        "added" => Ok(ChangeKind::Added),
        "deleted" => Ok(ChangeKind::Deleted),
        "renamed" => Ok(ChangeKind::Renamed),
        "copied" => Ok(ChangeKind::Copied),
        other => Err(Error::invalid(
            "change",
            format!("unknown change `{other}`"),
        )),
    };
    let files = first
        .files
        .iter()
        .map(|f| {
            Ok(service::ImpactFile {
                path: f.path.as_str().into(),
                new_path: (!f.new_path.is_empty()).then(|| f.new_path.clone()),
                change: change(&f.change)?,
                lines: lines_from_gaps(&f.line_gaps)?,
                uncovered: lines_from_gaps(&f.uncovered_gaps)?,
                tests: f.tests as usize,
            })
        })
        .collect::<Result<_, Error>>()?;
    let mut tests = Vec::new();
    for chunk in std::iter::once(first.tests).chain(chunks.map(|c| c.tests)) {
        for t in chunk {
            let lines = t
                .files
                .iter()
                .map(|f| Ok((f.path.as_str().into(), lines_from_gaps(&f.line_gaps)?)))
                .collect::<Result<_, Error>>()?;
            tests.push(service::SelectedTest {
                name: t.name.into(),
                new: t.new,
                lines,
            });
        }
    }
    Ok(service::TestImpact {
        state,
        tests,
        unknown: first.unknown,
        files,
        ignored: first.ignored,
        gone: first.gone.into_iter().map(Into::into).collect(),
    })
}

pub(crate) fn patch_to_proto(p: service::PatchCoverage) -> proto::PatchCoverage {
    proto::PatchCoverage {
        files: p
            .files
            .iter()
            .map(|f| proto::PatchFile {
                path: f.path.to_string(),
                changed_gaps: gaps_of(f.changed.iter()),
                covered_gaps: gaps_of(f.covered.iter()),
            })
            .collect(),
        unmeasured: p.unmeasured,
        complete: p.complete,
        ambiguous: p
            .ambiguous
            .into_iter()
            .map(|(path, candidates)| proto::AmbiguousPath { path, candidates })
            .collect(),
    }
}

pub(crate) fn patch_from_proto(p: proto::PatchCoverage) -> Result<service::PatchCoverage, Error> {
    let files = p
        .files
        .into_iter()
        .map(|f| {
            Ok(service::PatchFile {
                path: f.path.into(),
                changed: lines_from_gaps(&f.changed_gaps)?,
                covered: lines_from_gaps(&f.covered_gaps)?,
            })
        })
        .collect::<Result<_, Error>>()?;
    Ok(service::PatchCoverage {
        files,
        unmeasured: p.unmeasured,
        ambiguous: p
            .ambiguous
            .into_iter()
            .map(|a| (a.path, a.candidates))
            .collect(),
        complete: p.complete,
    })
}

/// A differential answer in chunks of files.
pub(crate) fn differential_to_proto(
    d: service::Differential,
) -> impl Iterator<Item = proto::DifferentialChunk> {
    let size = |f: &service::DifferentialFile| {
        f.path.len()
            + f.lines
                .iter()
                .map(|(_, l)| 8 + 4 * l.len() as usize)
                .sum::<usize>()
    };
    let (complete, base_complete) = (d.complete, d.base_complete);
    super::in_chunks(d.files, size)
        .enumerate()
        .map(move |(i, files)| proto::DifferentialChunk {
            complete: i == 0 && complete,
            base_complete: i == 0 && base_complete,
            files: files
                .into_iter()
                .map(|f| proto::DifferentialFile {
                    path: f.path.to_string(),
                    base_path: f.base_path.map(|p| p.to_string()).unwrap_or_default(),
                    categories: f
                        .lines
                        .iter()
                        .map(|(c, l)| proto::CategoryLines {
                            category: c.code().to_owned(),
                            line_gaps: gaps_of(l.iter()),
                        })
                        .collect(),
                })
                .collect(),
        })
}

/// Gathers the chunks of a differential answer.
pub(crate) fn differential_from_proto(
    chunks: Vec<proto::DifferentialChunk>,
) -> Result<service::Differential, Error> {
    let mut d = service::Differential {
        complete: chunks.first().is_some_and(|c| c.complete),
        base_complete: chunks.first().is_some_and(|c| c.base_complete),
        files: Vec::new(),
    };
    for f in chunks.into_iter().flat_map(|c| c.files) {
        let lines = f
            .categories
            .iter()
            .map(|c| {
                let category = service::Category::from_code(&c.category).ok_or_else(|| {
                    Error::invalid("category", format!("unknown category `{}`", c.category))
                })?;
                Ok((category, lines_from_gaps(&c.line_gaps)?))
            })
            .collect::<Result<_, Error>>()?;
        d.files.push(service::DifferentialFile {
            path: f.path.into(),
            base_path: (!f.base_path.is_empty()).then(|| f.base_path.into()),
            lines,
        });
    }
    Ok(d)
}

/// A line-set expression from the wire (prost bounds its nesting when decoding).
pub(crate) fn line_set_from_proto(
    e: Option<proto::LineSetExpr>,
) -> Result<service::LineSet, Error> {
    use proto::line_set_expr::Node;
    use service::LineSet;
    let node = e
        .and_then(|e| e.node)
        .ok_or_else(|| Error::invalid("expr", "an empty expression"))?;
    let pair = |p: Box<proto::LineSetPair>| -> Result<(Box<LineSet>, Box<LineSet>), Error> {
        let p = *p;
        Ok((
            Box::new(line_set_from_proto(p.left.map(|e| *e))?),
            Box::new(line_set_from_proto(p.right.map(|e| *e))?),
        ))
    };
    Ok(match node {
        Node::Covered(run) => LineSet::Covered(run),
        Node::Measured(run) => LineSet::Measured(run),
        Node::Tests(run) => LineSet::Tests(run),
        Node::Test(t) => LineSet::Test {
            run: t.run_id,
            test: t.test,
        },
        Node::TestsExcept(t) => LineSet::TestsExcept {
            run: t.run_id,
            test: t.test,
        },
        Node::Shard(s) => LineSet::Shard {
            run: s.run_id,
            shard: s.shard_id,
        },
        Node::Flag(f) => LineSet::Flag {
            project: f.project,
            commit: f.commit,
            flag: f.flag,
        },
        Node::Union(p) => {
            let (a, b) = pair(p)?;
            LineSet::Union(a, b)
        }
        Node::Intersection(p) => {
            let (a, b) = pair(p)?;
            LineSet::Intersection(a, b)
        }
        Node::Difference(p) => {
            let (a, b) = pair(p)?;
            LineSet::Difference(a, b)
        }
    })
}

pub(crate) fn line_set_to_proto(e: &service::LineSet) -> proto::LineSetExpr {
    use proto::line_set_expr::Node;
    use service::LineSet;
    let pair = |a: &LineSet, b: &LineSet| proto::LineSetPair {
        left: Some(Box::new(line_set_to_proto(a))),
        right: Some(Box::new(line_set_to_proto(b))),
    };
    let test = |run: &str, test: &str| proto::TestOperand {
        run_id: run.to_owned(),
        test: test.to_owned(),
    };
    let node = match e {
        LineSet::Covered(run) => Node::Covered(run.clone()),
        LineSet::Measured(run) => Node::Measured(run.clone()),
        LineSet::Tests(run) => Node::Tests(run.clone()),
        LineSet::Test { run, test: t } => Node::Test(test(run, t)),
        LineSet::TestsExcept { run, test: t } => Node::TestsExcept(test(run, t)),
        LineSet::Shard { run, shard } => Node::Shard(proto::ShardOperand {
            run_id: run.clone(),
            shard_id: shard.clone(),
        }),
        LineSet::Flag {
            project,
            commit,
            flag,
        } => Node::Flag(proto::FlagOperand {
            project: project.clone(),
            commit: commit.clone(),
            flag: flag.clone(),
        }),
        LineSet::Union(a, b) => Node::Union(Box::new(pair(a, b))),
        LineSet::Intersection(a, b) => Node::Intersection(Box::new(pair(a, b))),
        LineSet::Difference(a, b) => Node::Difference(Box::new(pair(a, b))),
    };
    proto::LineSetExpr { node: Some(node) }
}

/// Some lines of files, as the answers that list them carry them.
pub(crate) fn file_lines_to_proto(files: &[(Arc<str>, RoaringBitmap)]) -> Vec<proto::FileLineGaps> {
    files
        .iter()
        .map(|(path, lines)| proto::FileLineGaps {
            path: path.to_string(),
            line_gaps: gaps_of(lines.iter()),
        })
        .collect()
}

/// About how many bytes one file's lines take in an answer (see `in_chunks`).
pub(crate) fn file_lines_size((path, lines): &(Arc<str>, RoaringBitmap)) -> usize {
    path.len() + 4 * lines.len() as usize
}

/// The files and lines of an answer's chunks, checked.
pub(crate) fn file_line_gaps_from_proto(
    files: Vec<proto::FileLineGaps>,
) -> Result<Vec<(String, RoaringBitmap)>, Error> {
    files
        .into_iter()
        .map(|f| {
            let lines = lines_from_gaps(&f.line_gaps)
                .map_err(|e| Error::invalid(f.path.clone(), e.to_string()))?;
            Ok((f.path, lines))
        })
        .collect()
}

/// A history request: what it selects and the bucket width.
pub(crate) fn history_query_from_proto(
    r: proto::GetHistoryRequest,
) -> Result<(crate::persist::HistoryQuery, crate::history::Bucket), Error> {
    use crate::history::Bucket;
    let ms = |field: &str, t: Option<prost_types::Timestamp>| -> Result<Option<u64>, Error> {
        t.map(|t| {
            SystemTime::try_from(t)
                .ok()
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .ok_or_else(|| Error::invalid(field, "not a time since 1970"))
        })
        .transpose()
    };
    let width = match proto::HistoryBucketWidth::try_from(r.width) {
        Ok(proto::HistoryBucketWidth::Day) => Bucket::Day,
        Ok(proto::HistoryBucketWidth::Week | proto::HistoryBucketWidth::Unspecified) => {
            Bucket::Week
        }
        Ok(proto::HistoryBucketWidth::Month) => Bucket::Month,
        Err(_) => return Err(Error::invalid("width", "must be day, week or month")),
    };
    let query = crate::persist::HistoryQuery {
        project: r.project,
        branch: r.branch,
        since_ms: ms("since", r.since)?.unwrap_or(0),
        until_ms: ms("until", r.until)?,
        limit: usize::MAX,
    };
    Ok((query, width))
}

fn ms_timestamp(ms: u64) -> prost_types::Timestamp {
    timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

fn timestamp_ms(t: Option<prost_types::Timestamp>) -> u64 {
    t.and_then(|t| SystemTime::try_from(t).ok())
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn history_to_proto(buckets: Vec<crate::history::TrendBucket>) -> proto::History {
    proto::History {
        buckets: buckets
            .into_iter()
            .map(|b| proto::HistoryBucket {
                start: Some(ms_timestamp(b.start_ms)),
                end: Some(ms_timestamp(b.end_ms)),
                runs: b.runs,
                incomplete_runs: b.incomplete_runs,
                down_sampled: b.down_sampled,
                metrics: b
                    .metrics
                    .into_iter()
                    .map(|(name, s)| {
                        let stat = proto::MetricStat {
                            runs: s.n,
                            min: s.min,
                            mean: s.mean(),
                            max: s.max,
                            last: s.last,
                            last_at: Some(ms_timestamp(s.last_at_ms)),
                        };
                        (name, stat)
                    })
                    .collect(),
            })
            .collect(),
    }
}

pub(crate) fn history_from_proto(h: proto::History) -> Vec<crate::history::TrendBucket> {
    h.buckets
        .into_iter()
        .map(|b| crate::history::TrendBucket {
            start_ms: timestamp_ms(b.start),
            end_ms: timestamp_ms(b.end),
            runs: b.runs,
            incomplete_runs: b.incomplete_runs,
            down_sampled: b.down_sampled,
            metrics: b
                .metrics
                .into_iter()
                .map(|(name, s)| {
                    let stat = crate::history::Stat {
                        n: s.runs,
                        min: s.min,
                        max: s.max,
                        sum: s.mean * s.runs as f64,
                        last: s.last,
                        last_at_ms: timestamp_ms(s.last_at),
                    };
                    (name, stat)
                })
                .collect(),
        })
        .collect()
}

pub(crate) fn standing_to_proto(s: service::TestStanding) -> proto::TestStanding {
    use crate::flaky::Class;
    let h = s.health;
    proto::TestStanding {
        test: s.test,
        class: match h.class {
            Class::Broken => proto::TestClass::Broken,
            Class::Flaky => proto::TestClass::Flaky,
            Class::Healthy => proto::TestClass::Healthy,
        } as i32,
        failed: h.failed,
        runs: h.runs,
        flaky_commits: h.flaky_commits,
        first_seen: Some(ms_timestamp(h.first_seen_ms)),
        last_seen: Some(ms_timestamp(h.last_seen_ms)),
        last_flip: h.last_flip_ms.map(ms_timestamp),
    }
}

pub(crate) fn standing_from_proto(s: proto::TestStanding) -> Result<service::TestStanding, Error> {
    use crate::flaky::{Class, Health};
    let class = match proto::TestClass::try_from(s.class) {
        Ok(proto::TestClass::Broken) => Class::Broken,
        Ok(proto::TestClass::Flaky) => Class::Flaky,
        Ok(proto::TestClass::Healthy) => Class::Healthy,
        _ => return Err(Error::invalid("tests.class", "unknown")),
    };
    Ok(service::TestStanding {
        test: s.test,
        health: Health {
            class,
            failed: s.failed,
            runs: s.runs,
            flaky_commits: s.flaky_commits,
            first_seen_ms: timestamp_ms(s.first_seen),
            last_seen_ms: timestamp_ms(s.last_seen),
            last_flip_ms: s.last_flip.map(|t| timestamp_ms(Some(t))),
        },
    })
}

pub(crate) fn shard_attempts_to_proto(s: service::ShardAttempts) -> proto::ShardAttempts {
    proto::ShardAttempts {
        shard_id: s.shard_id,
        attempts: s
            .attempts
            .into_iter()
            .map(|a| {
                let [passed, failed, skipped, errored] = a.tests.unwrap_or_default();
                proto::AttemptSummary {
                    attempt: a.attempt,
                    current: a.current,
                    finished: a.finished,
                    deltas: a.deltas,
                    tests_reported: a.tests.is_some(),
                    passed,
                    failed,
                    skipped,
                    errored,
                    infrastructure_failure: a.infrastructure_failure,
                }
            })
            .collect(),
        flipped: s
            .flipped
            .into_iter()
            .map(|f| proto::FlippedTest {
                test: f.test,
                failed_in: f.failed_in,
                passed_in: f.passed_in,
            })
            .collect(),
        differences: s
            .differences
            .into_iter()
            .map(|d| proto::CoverageDifference {
                attempt: d.attempt,
                against: d.against,
                only_in_attempt: file_lines_to_proto(&d.only_in_attempt),
                only_in_against: file_lines_to_proto(&d.only_in_against),
            })
            .collect(),
    }
}

pub(crate) fn shard_attempts_from_proto(
    s: proto::ShardAttempts,
) -> Result<service::ShardAttempts, Error> {
    let lines = |files: Vec<proto::FileLineGaps>| -> Result<Vec<(Arc<str>, RoaringBitmap)>, Error> {
        Ok(file_line_gaps_from_proto(files)?
            .into_iter()
            .map(|(p, l)| (Arc::from(p), l))
            .collect())
    };
    Ok(service::ShardAttempts {
        shard_id: s.shard_id,
        attempts: s
            .attempts
            .into_iter()
            .map(|a| service::AttemptSummary {
                attempt: a.attempt,
                current: a.current,
                finished: a.finished,
                deltas: a.deltas,
                tests: a
                    .tests_reported
                    .then_some([a.passed, a.failed, a.skipped, a.errored]),
                infrastructure_failure: a.infrastructure_failure,
            })
            .collect(),
        flipped: s
            .flipped
            .into_iter()
            .map(|f| service::FlippedTest {
                test: f.test,
                failed_in: f.failed_in,
                passed_in: f.passed_in,
            })
            .collect(),
        differences: s
            .differences
            .into_iter()
            .map(|d| {
                Ok(service::CoverageDifference {
                    attempt: d.attempt,
                    against: d.against,
                    only_in_attempt: lines(d.only_in_attempt)?,
                    only_in_against: lines(d.only_in_against)?,
                })
            })
            .collect::<Result<_, Error>>()?,
    })
}
