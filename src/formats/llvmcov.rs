//! `llvm-cov export` JSON (format 2.x) in: files are streamed as they are read.
//!
//! - Lines come from the file's segments, the way `llvm-cov` itself decides them: a line is
//!   executable when a counted region starts on it or a counted region wraps into it (and it
//!   does not start a skipped region); its count is the largest of the wrapped region's and of
//!   the regions starting on it.
//! - Branches: each branch region gives two branches (true, false), keyed by its line and
//!   start column; both 0 is "never reached" (LCOV's `-`), as `llvm-cov export -format=lcov`
//!   writes it.
//! - Functions (listed after all files) are sent as records of their own once read, keyed by
//!   name and first line; static functions keep llvm's `file.c:name`.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::{ParseError, Record};
use crate::model::{BranchArm, BranchKey, FileBuilder, FileCoverage, MAX_LINE};

#[derive(Deserialize)]
struct FileEntry {
    filename: String,
    #[serde(default)]
    segments: Vec<Vec<Value>>,
    #[serde(default)]
    branches: Vec<Vec<Value>>,
}

#[derive(Deserialize)]
struct FunctionEntry {
    name: String,
    count: u64,
    #[serde(default)]
    regions: Vec<Vec<Value>>,
    #[serde(default)]
    filenames: Vec<String>,
}

/// Reads an export, calling `on_record` per file and then per file's functions.
pub fn read(input: impl Read, mut on_record: impl FnMut(Record) -> bool) -> Result<(), ParseError> {
    let mut de = serde_json::Deserializer::from_reader(input);
    let mut state = State {
        on_record: &mut on_record,
        stopped: false,
        functions: BTreeMap::new(),
    };
    let result = de
        .deserialize_map(Top { state: &mut state })
        .and_then(|()| de.end());
    result.map_err(|e| ParseError::at(e.line() as u64, format!("llvm-cov JSON: {e}")))
}

struct State<'a, F> {
    on_record: &'a mut F,
    stopped: bool,
    /// file -> functions, sent at the end of each export object.
    functions: BTreeMap<String, FileBuilder>,
}

impl<F: FnMut(Record) -> bool> State<'_, F> {
    fn emit(&mut self, path: String, file: FileCoverage) {
        if !self.stopped {
            self.stopped = !(self.on_record)(Record {
                test_name: String::new(),
                path,
                file,
            });
        }
    }
}

struct Top<'s, 'a, F> {
    state: &'s mut State<'a, F>,
}

impl<'de, F: FnMut(Record) -> bool> Visitor<'de> for Top<'_, '_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an llvm-cov export (an object with `data`)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut saw_data = false;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "data" => {
                    saw_data = true;
                    map.next_value_seed(Exports {
                        state: &mut *self.state,
                    })?;
                }
                "type" => {
                    let t: String = map.next_value()?;
                    if t != "llvm.coverage.json.export" {
                        return Err(serde::de::Error::custom(format!(
                            "unknown export type `{t}`"
                        )));
                    }
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if !saw_data {
            return Err(serde::de::Error::missing_field("data"));
        }
        Ok(())
    }
}

struct Exports<'s, 'a, F> {
    state: &'s mut State<'a, F>,
}

impl<'de, F: FnMut(Record) -> bool> DeserializeSeed<'de> for Exports<'_, '_, F> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(Record) -> bool> Visitor<'de> for Exports<'_, '_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of exports")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Export {
                state: &mut *self.state,
            })?
            .is_some()
        {
            let functions = std::mem::take(&mut self.state.functions);
            for (path, builder) in functions {
                self.state.emit(path, builder.build());
            }
        }
        Ok(())
    }
}

struct Export<'s, 'a, F> {
    state: &'s mut State<'a, F>,
}

impl<'de, F: FnMut(Record) -> bool> DeserializeSeed<'de> for Export<'_, '_, F> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: FnMut(Record) -> bool> Visitor<'de> for Export<'_, '_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an export object with `files` and `functions`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "files" => map.next_value_seed(FilesSeed {
                    state: &mut *self.state,
                })?,
                "functions" => {
                    let functions: Vec<FunctionEntry> = map.next_value()?;
                    for f in functions {
                        let (Some(path), Some(first)) = (f.filenames.first(), f.regions.first())
                        else {
                            continue;
                        };
                        let line = first.first().and_then(Value::as_u64).ok_or_else(|| {
                            serde::de::Error::custom(format!("function {}: no region line", f.name))
                        })?;
                        let line = checked(line).map_err(serde::de::Error::custom)?;
                        self.state
                            .functions
                            .entry(path.clone())
                            .or_default()
                            .function(&f.name, line, 0, f.count);
                    }
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

struct FilesSeed<'s, 'a, F> {
    state: &'s mut State<'a, F>,
}

impl<'de, F: FnMut(Record) -> bool> DeserializeSeed<'de> for FilesSeed<'_, '_, F> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(Record) -> bool> Visitor<'de> for FilesSeed<'_, '_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of files")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(entry) = seq.next_element::<FileEntry>()? {
            let path = entry.filename.clone();
            let file = convert(entry).map_err(serde::de::Error::custom)?;
            self.state.emit(path, file);
        }
        Ok(())
    }
}

/// The most lines one file's segments may span; real sources stay far below it.
const MAX_SPAN: u32 = 1_000_000;

fn checked(line: u64) -> Result<u32, String> {
    if line == 0 || line > u64::from(MAX_LINE) {
        return Err(format!("line number {line} is out of range"));
    }
    Ok(line as u32)
}

/// A segment: where it starts and what it says.
struct Segment {
    line: u32,
    count: u64,
    has_count: bool,
    region_entry: bool,
    gap: bool,
}

fn segment(v: &[Value]) -> Result<Segment, String> {
    let n = |i: usize| v.get(i).and_then(Value::as_u64);
    let b = |i: usize| v.get(i).and_then(Value::as_bool);
    match (n(0), n(2), b(3), b(4)) {
        (Some(line), Some(count), Some(has_count), Some(region_entry)) => Ok(Segment {
            line: checked(line)?,
            count,
            has_count,
            region_entry,
            gap: b(5).unwrap_or(false),
        }),
        _ => Err(format!(
            "segment {v:?} is not [line, col, count, hasCount, isRegionEntry, isGap]"
        )),
    }
}

fn convert(e: FileEntry) -> Result<FileCoverage, String> {
    let segments = e
        .segments
        .iter()
        .map(|s| segment(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|m| format!("{}: {m}", e.filename))?;
    let mut b = FileBuilder::new();
    // Walk the lines from the first segment to the last, carrying the region that wraps into
    // each line (llvm's LineCoverageIterator).
    let mut wrapped: Option<&Segment> = None;
    let mut i = 0;
    let (Some(first), Some(last)) = (segments.first(), segments.last()) else {
        return branches_only(b, &e);
    };
    if segments.windows(2).any(|w| w[1].line < w[0].line) {
        return Err(format!("{}: segments are not in line order", e.filename));
    }
    if last.line - first.line > MAX_SPAN {
        // A few bytes of input must not make millions of lines.
        return Err(format!(
            "{}: segments span {} lines (more than {MAX_SPAN})",
            e.filename,
            last.line - first.line + 1
        ));
    }
    for line in first.line..=last.line {
        let start = i;
        while i < segments.len() && segments[i].line == line {
            i += 1;
        }
        let on_line = &segments[start..i];
        let starts = |s: &&Segment| !s.gap && s.has_count && s.region_entry;
        let region_starts = on_line.iter().filter(starts).count();
        let skipped = on_line
            .first()
            .is_some_and(|s| !s.has_count && s.region_entry);
        let mapped = !skipped && (wrapped.is_some_and(|w| w.has_count) || region_starts > 0);
        if mapped {
            let mut count = wrapped.map_or(0, |w| w.count);
            if region_starts > 0 {
                for s in on_line.iter().filter(starts) {
                    count = count.max(s.count);
                }
            }
            b.line(line, count);
        }
        if let Some(s) = on_line.last() {
            wrapped = Some(s);
        }
    }
    branches_only(b, &e)
}

fn branches_only(mut b: FileBuilder, e: &FileEntry) -> Result<FileCoverage, String> {
    for br in &e.branches {
        let n = |i: usize| br.get(i).and_then(Value::as_u64);
        let (Some(line), Some(column), Some(taken), Some(not_taken)) = (n(0), n(1), n(4), n(5))
        else {
            return Err(format!(
                "{}: branch {br:?} is not [line, col, …, true, false, …]",
                e.filename
            ));
        };
        let line = checked(line).map_err(|m| format!("{}: {m}", e.filename))?;
        let block = crate::model::block_number(column, "branch column")
            .map_err(|m| format!("{}: line {line}: {m}", e.filename))?;
        let reached = taken > 0 || not_taken > 0;
        for (i, count) in [taken, not_taken].into_iter().enumerate() {
            let key = BranchKey {
                line,
                block,
                arm: BranchArm::Index(i as u32),
            };
            b.branch(key, reached.then_some(count));
        }
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
    fn lines_from_segments_branches_and_functions() {
        let recs = read_all(
            r#"{"data":[{"files":[{"filename":"a.c","segments":[
                [1,1,3,true,true,false],[2,5,1,true,true,false],[2,9,3,true,false,false],
                [4,1,0,false,true,false],[5,1,3,true,false,false],[6,2,0,false,false,false]],
                "branches":[[2,5,2,9,1,2,0,0,4],[5,3,5,7,0,0,0,0,4]]}],
              "functions":[{"name":"f","count":3,"regions":[[1,1,6,2,3,0,0,0]],"filenames":["a.c"]}],
              "totals":{}}],"type":"llvm.coverage.json.export","version":"2.0.1"}"#,
        )
        .unwrap();
        assert_eq!(recs.len(), 2);
        let f = &recs[0].file;
        // Line 4 starts a skipped region; line 5 is wrapped by it and starts no counted
        // region, so it is not executable either; line 6 is wrapped by line 5's count.
        assert_eq!(
            f.line_hits().collect::<Vec<_>>(),
            vec![(1, 3), (2, 3), (3, 3), (6, 3)]
        );
        let b: Vec<_> = f.branches().iter().map(|(k, t)| (k.line, *t)).collect();
        assert_eq!(b, vec![(2, Some(1)), (2, Some(2)), (5, None), (5, None)]);
        assert_eq!(
            (
                &*recs[1].file.functions()[0].name,
                recs[1].file.functions()[0].hits
            ),
            ("f", 3)
        );
    }

    #[test]
    fn malformed_exports_are_errors() {
        for (text, needle) in [
            (r#"{"type":"other","data":[]}"#, "unknown export type"),
            (
                r#"{"data":[{"files":[{"filename":"a","segments":[[0,1,1,true,true]]}]}]}"#,
                "out of range",
            ),
            (
                r#"{"data":[{"files":[{"filename":"a","segments":[[1,1]]}]}]}"#,
                "is not [line",
            ),
            (
                r#"{"data":[{"files":[{"filename":"a","branches":[[1]]}]}]}"#,
                "branch",
            ),
            (
                r#"{"data":[{"files":[{"filename":"a","segments":[[1,1,1,true,true],[9000000,1,0,false,false]]}]}]}"#,
                "segments span",
            ),
            (
                r#"{"type":"llvm.coverage.json.export"}"#,
                "missing field `data`",
            ),
            (r#"{"data":[{"files":["#, "EOF"),
        ] {
            let e = read_all(text).expect_err(text);
            assert!(e.to_string().contains(needle), "{text}: {e}");
        }
    }
}
