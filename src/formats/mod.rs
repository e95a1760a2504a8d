//! Coverage file formats: one module per format, each with a streaming reader over
//! `impl BufRead` and a writer over `impl Write`. Formats depend on the model only; they never
//! open paths themselves.

pub mod clover;
pub mod cobertura;
pub mod coveragepy;
pub mod gcovr;
pub mod gocover;
pub mod html;
pub mod istanbul;
pub mod jacoco;
pub mod json;
pub mod junit;
pub mod lcov;
pub mod llvmcov;
pub mod markdown;
pub mod phpunit;
pub mod testdox;

use std::io::BufRead;

use crate::model::{FileCoverage, MAX_LINE};

/// One source file's coverage as an input file reported it.
#[derive(Debug, Clone)]
pub struct Record {
    /// The test (LCOV's `TN:`) in force for this record; empty when none.
    pub test_name: String,
    /// The path exactly as the file gave it (path rules apply later).
    pub path: String,
    pub file: FileCoverage,
}

impl Record {
    /// A record for `path` from what a reader gathered (no test name).
    pub(crate) fn built(path: String, builder: crate::model::FileBuilder) -> Record {
        Record {
            test_name: String::new(),
            path,
            file: builder.build(),
        }
    }
}

/// The input formats `covd push` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Lcov,
    CoveragePyJson,
    Cobertura,
    GoCover,
    GcovrJson,
    Istanbul,
    LlvmCov,
    JaCoCo,
    Clover,
}

impl Format {
    pub const NAMES: &'static [&'static str] = &[
        "lcov",
        "coveragepy-json",
        "cobertura",
        "go",
        "gcovr-json",
        "istanbul",
        "llvm-cov",
        "jacoco",
        "clover",
    ];

    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "lcov" => Some(Format::Lcov),
            "coveragepy-json" | "coverage.py" => Some(Format::CoveragePyJson),
            "cobertura" => Some(Format::Cobertura),
            "go" | "gocover" => Some(Format::GoCover),
            "gcovr-json" | "gcovr" => Some(Format::GcovrJson),
            "istanbul" | "nyc" | "c8" => Some(Format::Istanbul),
            "llvm-cov" | "llvm-cov-json" => Some(Format::LlvmCov),
            "jacoco" => Some(Format::JaCoCo),
            "clover" => Some(Format::Clover),
            _ => None,
        }
    }

    /// Recognises a format from the start of a file.
    pub fn detect(head: &[u8]) -> Option<Format> {
        let text = String::from_utf8_lossy(head);
        let trimmed = text.trim_start_matches('\u{feff}').trim_start();
        if trimmed.starts_with('{') {
            // coverage.py writes `meta` first, with its `format` and `version`.
            if trimmed.contains("\"meta\"") && trimmed.contains("\"files\"")
                || trimmed.contains("\"show_contexts\"")
            {
                return Some(Format::CoveragePyJson);
            }
            // gcovr before 8 sorts its keys, so `gcovr/format_version` may come last; its
            // per-line keys (`gcovr/md5`, `gcovr/noncode`) or `line_number` show early.
            if trimmed.contains("\"gcovr/")
                || (trimmed.contains("\"line_number\"") && trimmed.contains("\"files\""))
            {
                return Some(Format::GcovrJson);
            }
            if trimmed.contains("\"statementMap\"") || trimmed.contains("\"fnMap\"") {
                return Some(Format::Istanbul);
            }
            // llvm-cov writes `type` last; its export starts with `data` and its files.
            let compact: String = trimmed
                .chars()
                .filter(|c| !c.is_whitespace())
                .take(64)
                .collect();
            if compact.starts_with("{\"data\":[{\"files\"")
                || trimmed.contains("\"llvm.coverage.json.export\"")
            {
                return Some(Format::LlvmCov);
            }
            return None;
        }
        if trimmed.starts_with('<') {
            if trimmed.contains("<coverage generated") {
                return Some(Format::Clover);
            }
            if trimmed.contains("<!DOCTYPE report") || trimmed.contains("<sessioninfo") {
                return Some(Format::JaCoCo);
            }
            return trimmed.contains("<coverage").then_some(Format::Cobertura);
        }
        let first = trimmed.lines().find(|l| !l.trim().is_empty())?;
        if first.starts_with("mode: ") {
            return Some(Format::GoCover);
        }
        ["TN:", "SF:", "VER:"]
            .iter()
            .any(|p| first.starts_with(p))
            .then_some(Format::Lcov)
    }
}

/// What a coverage file says of the tool that wrote it: `(tool, version)` pairs (coverage.py
/// says its version; most formats say nothing).
pub type Tools = Vec<(String, String)>;

/// Reads `input` in `format`, calling `on_record` for each file's record as it is read;
/// `on_record` returning `false` stops early. Returns the tools the input names.
pub fn read(
    format: Format,
    input: impl BufRead,
    on_record: impl FnMut(Record) -> bool,
) -> Result<Tools, ParseError> {
    if format == Format::CoveragePyJson {
        let version = coveragepy::read(input, on_record)?;
        return Ok(version
            .map(|v| vec![("coverage.py".to_owned(), v)])
            .unwrap_or_default());
    }
    read_records(format, input, on_record).map(|()| Tools::new())
}

fn read_records(
    format: Format,
    input: impl BufRead,
    mut on_record: impl FnMut(Record) -> bool,
) -> Result<(), ParseError> {
    match format {
        Format::Lcov => {
            let mut reader = lcov::Reader::new(input);
            while let Some(record) = reader.next_record()? {
                if !on_record(record) {
                    break;
                }
            }
            Ok(())
        }
        Format::CoveragePyJson => coveragepy::read(input, on_record).map(|_| ()),
        Format::Cobertura => cobertura::read(input, on_record),
        Format::GoCover => gocover::read(input, on_record),
        Format::GcovrJson => gcovr::read(input, on_record),
        Format::Istanbul => istanbul::read(input, on_record),
        Format::LlvmCov => llvmcov::read(input, on_record),
        Format::JaCoCo => jacoco::read(input, on_record),
        Format::Clover => clover::read(input, on_record),
    }
}

/// An XML attribute's value, unescaped; `None` when absent.
pub(crate) fn xml_attr(
    e: &quick_xml::events::BytesStart<'_>,
    name: &str,
) -> Result<Option<String>, String> {
    match e.try_get_attribute(name) {
        Ok(Some(a)) => a
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map(|v| Some(v.into_owned()))
            .map_err(|err| format!("attribute {name}: {err}")),
        Ok(None) => Ok(None),
        Err(err) => Err(format!("attribute {name}: {err}")),
    }
}

/// A line-number attribute (1 to `MAX_LINE`).
pub(crate) fn xml_line(e: &quick_xml::events::BytesStart<'_>, name: &str) -> Result<u32, String> {
    let v = xml_attr(e, name)?
        .ok_or_else(|| format!("<{}> without `{name}`", e.local_name().as_ref()))?;
    match v.trim().parse::<u64>() {
        Ok(n) if n >= 1 && n <= u64::from(MAX_LINE) => Ok(n as u32),
        _ => Err(format!("line number `{v}` is out of range")),
    }
}

/// A count attribute; floats are rounded, huge ones saturate.
pub(crate) fn xml_count(e: &quick_xml::events::BytesStart<'_>, name: &str) -> Result<u64, String> {
    let v = xml_attr(e, name)?
        .ok_or_else(|| format!("<{}> without `{name}`", e.local_name().as_ref()))?;
    let v = v.trim();
    if let Ok(n) = v.parse::<u64>() {
        return Ok(n);
    }
    // Some writers print counts as floats ("3.0"); a huge one saturates.
    match v.parse::<f64>() {
        Ok(f) if f >= 0.0 && f.is_finite() => Ok(f.round().min(u64::MAX as f64) as u64),
        _ => Err(format!("hit count `{v}` is not a count")),
    }
}

/// The most branch arms one line may claim in the formats that only count them.
const MAX_POSITIONAL_ARMS: u64 = 1000;

/// Branches of formats that count a line's arms without naming them (Cobertura, JaCoCo,
/// Clover): `total` arms keyed by position, the first `taken` of them taken, none reached
/// when the line did not run. Merged, such arms give a lower bound: which arm a shard took
/// is not known.
pub(crate) fn positional_branches(
    builder: &mut crate::model::FileBuilder,
    line: u32,
    taken: u64,
    total: u64,
    reached: bool,
) -> Result<(), String> {
    if total > MAX_POSITIONAL_ARMS {
        return Err(format!("line {line} claims {total} branches"));
    }
    for i in 0..total {
        let key = crate::model::BranchKey {
            line,
            block: 0,
            arm: crate::model::BranchArm::Index(i as u32),
        };
        builder.branch(key, reached.then_some(u64::from(i < taken)));
    }
    Ok(())
}

/// A malformed input: where, and what was wrong.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", if *.line > 0 { format!("line {}", .line) } else { format!("byte {}", .offset) })]
pub struct ParseError {
    /// 1-based line of the input where the problem was found; 0 when only the byte offset
    /// is known (XML).
    pub line: u64,
    /// Byte offset of the problem, when the reader knows it.
    pub offset: u64,
    pub message: String,
    #[source]
    pub source: Option<std::io::Error>,
}

impl ParseError {
    pub(crate) fn at(line: u64, message: impl Into<String>) -> ParseError {
        ParseError {
            line,
            offset: 0,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn at_byte(offset: u64, message: impl Into<String>) -> ParseError {
        ParseError {
            line: 0,
            offset,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn io(line: u64, e: std::io::Error) -> ParseError {
        ParseError {
            line,
            offset: 0,
            message: format!("read error: {e}"),
            source: Some(e),
        }
    }
}
