//! gcovr's JSON report (`gcovr --json`, format versions 0.x) in, streamed file by file.
//!
//! Per file: each entry of `lines` is an executable line with its `count`; its `branches`
//! become branches keyed by (line, `source_block_id`, `branchno`), never reached when the line
//! never ran (gcovr has no marker of its own for that); `functions` give name, `lineno` and
//! `execution_count`. gcovr's own merge (`--add-tracefile`) sums all of these, as covd does.

use std::fmt;
use std::io::Read;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{ParseError, Record};
use crate::model::{BranchArm, BranchKey, FileBuilder, FileCoverage, MAX_LINE};

#[derive(Deserialize)]
struct FileReport {
    file: String,
    #[serde(default)]
    lines: Vec<LineReport>,
    #[serde(default)]
    functions: Vec<FunctionReport>,
}

#[derive(Deserialize)]
struct LineReport {
    line_number: u64,
    count: u64,
    #[serde(default)]
    branches: Vec<BranchReport>,
    /// Excluded by a gcovr filter or marker: not executable.
    #[serde(default, rename = "gcovr/excluded")]
    excluded: bool,
    /// gcovr 5: a line without code.
    #[serde(default, rename = "gcovr/noncode")]
    noncode: bool,
}

/// gcovr 8.4+ writes `branchno`, 7.x `blockno`, 8.0-8.3 only `source_block_id`; without a
/// number, a branch's position on its line identifies it.
#[derive(Deserialize)]
struct BranchReport {
    #[serde(default)]
    branchno: Option<u32>,
    count: u64,
    #[serde(default)]
    source_block_id: Option<u32>,
    #[serde(default)]
    blockno: Option<u32>,
}

#[derive(Deserialize)]
struct FunctionReport {
    /// gcovr 8 leaves the name out when it is unknown.
    #[serde(default)]
    name: Option<String>,
    lineno: u64,
    execution_count: u64,
}

/// Reads a report, calling `on_record` for each file as it is read; `false` stops early.
pub fn read(input: impl Read, mut on_record: impl FnMut(Record) -> bool) -> Result<(), ParseError> {
    let mut de = serde_json::Deserializer::from_reader(input);
    de.deserialize_map(Document {
        on_record: &mut on_record,
    })
    .and_then(|()| de.end())
    .map_err(|e| ParseError::at(e.line() as u64, format!("gcovr JSON: {e}")))
}

struct Document<'a, F> {
    on_record: &'a mut F,
}

impl<'de, F: FnMut(Record) -> bool> Visitor<'de> for Document<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a gcovr JSON report (an object with `gcovr/format_version` and `files`)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut saw_files = false;
        while let Some(key) = map.next_key::<String>()? {
            if key == "files" {
                saw_files = true;
                map.next_value_seed(Files {
                    on_record: &mut *self.on_record,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        if !saw_files {
            return Err(serde::de::Error::missing_field("files"));
        }
        Ok(())
    }
}

struct Files<'a, F> {
    on_record: &'a mut F,
}

impl<'de, F: FnMut(Record) -> bool> DeserializeSeed<'de> for Files<'_, F> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(Record) -> bool> Visitor<'de> for Files<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of files")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut stopped = false;
        while let Some(report) = seq.next_element::<FileReport>()? {
            if stopped {
                continue;
            }
            let path = report.file.clone();
            let file = convert(report).map_err(serde::de::Error::custom)?;
            stopped = !(self.on_record)(Record {
                test_name: String::new(),
                path,
                file,
            });
        }
        Ok(())
    }
}

fn line(path: &str, n: u64) -> Result<u32, String> {
    if n == 0 || n > u64::from(MAX_LINE) {
        return Err(format!("{path}: line number {n} is out of range"));
    }
    Ok(n as u32)
}

fn convert(r: FileReport) -> Result<FileCoverage, String> {
    if r.file.is_empty() {
        return Err("a file entry with an empty `file`".into());
    }
    let mut b = FileBuilder::new();
    for l in r.lines.iter().filter(|l| !l.excluded && !l.noncode) {
        let n = line(&r.file, l.line_number)?;
        b.line(n, l.count);
        for (position, br) in l.branches.iter().enumerate() {
            let block = br.source_block_id.or(br.blockno).unwrap_or(0);
            let block = crate::model::block_number(u64::from(block), "branch block")
                .map_err(|m| format!("{}: line {n}: {m}", r.file))?;
            let key = BranchKey {
                line: n,
                block,
                arm: BranchArm::Index(br.branchno.unwrap_or(position as u32)),
            };
            b.branch(key, (l.count > 0).then_some(br.count));
        }
    }
    for f in &r.functions {
        let Some(name) = f.name.as_deref().filter(|n| !n.is_empty()) else {
            continue;
        };
        b.function(name, line(&r.file, f.lineno)?, 0, f.execution_count);
    }
    Ok(b.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(text: &str) -> Result<Vec<Record>, ParseError> {
        let mut out = Vec::new();
        read(text.as_bytes(), |r| {
            out.push(r);
            true
        })?;
        Ok(out)
    }

    #[test]
    fn reads_lines_branches_and_functions() {
        let recs = read_all(
            r#"{"gcovr/format_version":"0.15","files":[{"file":"src/a.c","lines":[
              {"line_number":3,"function_name":"f","count":2,"branches":[
                {"branchno":0,"count":2,"fallthrough":true,"throw":false,"source_block_id":1},
                {"branchno":1,"count":0,"fallthrough":false,"throw":false,"source_block_id":1}]},
              {"line_number":9,"count":0,"branches":[{"branchno":0,"count":0}]}],
              "functions":[{"name":"f","lineno":2,"execution_count":2,"blocks_percent":50.0}]}]}"#,
        )
        .unwrap();
        let f = &recs[0].file;
        assert_eq!(recs[0].path, "src/a.c");
        assert_eq!(f.line_hits().collect::<Vec<_>>(), vec![(3, 2), (9, 0)]);
        let b: Vec<_> = f
            .branches()
            .iter()
            .map(|(k, t)| (k.line, k.block, *t))
            .collect();
        assert_eq!(b, vec![(3, 1, Some(2)), (3, 1, Some(0)), (9, 0, None)]);
        assert_eq!((f.functions()[0].start_line, f.functions()[0].hits), (2, 2));
    }

    #[test]
    fn older_gcovr_fields_and_exclusions() {
        // gcovr 7 (`blockno`, no `branchno`, sorted keys), an excluded line, a nameless function.
        let text = r#"{"files":[{"file":"a.c","functions":[{"lineno":1,"execution_count":1}],
            "lines":[{"branches":[{"blockno":2,"count":1},{"blockno":2,"count":0}],"count":1,"line_number":2},
                     {"count":0,"gcovr/excluded":true,"line_number":3}]}],"gcovr/format_version":"0.6"}"#;
        assert_eq!(
            super::super::Format::detect(text.as_bytes()),
            Some(super::super::Format::GcovrJson)
        );
        let recs = read_all(text).unwrap();
        let f = &recs[0].file;
        assert_eq!(f.line_hits().collect::<Vec<_>>(), vec![(2, 1)]);
        let b: Vec<_> = f
            .branches()
            .iter()
            .map(|(k, t)| (k.block, k.arm.to_string(), *t))
            .collect();
        assert_eq!(b, vec![(2, "0".into(), Some(1)), (2, "1".into(), Some(0))]);
        assert!(f.functions().is_empty());
    }

    #[test]
    fn malformed_reports_are_errors() {
        for (text, needle) in [
            (
                r#"{"files":[{"file":"a","lines":[{"line_number":0,"count":1}]}]}"#,
                "out of range",
            ),
            (
                r#"{"files":[{"file":"a","lines":[{"line_number":1}]}]}"#,
                "missing field `count`",
            ),
            (r#"{"files":[{"file":"","lines":[]}]}"#, "empty `file`"),
            (
                r#"{"gcovr/format_version":"0.15"}"#,
                "missing field `files`",
            ),
            (
                r#"{"files":[{"file":"a","lines":[{"line_number":1,"count":-1}]}]}"#,
                "invalid value",
            ),
            (r#"{"files":["#, "EOF"),
        ] {
            let e = read_all(text).expect_err(text);
            assert!(e.to_string().contains(needle), "{text}: {e}");
        }
    }
}
