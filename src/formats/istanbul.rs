//! Istanbul's `coverage-final.json` (nyc, c8, jest, vitest) in, streamed file by file.
//!
//! - Lines: a statement counts on the line it starts on; a line's hits are the largest count
//!   of the statements starting there (as istanbul's own LCOV report does).
//! - Functions: name and the line of its declaration, with its count.
//! - Branches: istanbul identifies a branch by where it is in the source, so a branch is keyed
//!   by its line, the column it starts at (as the block) and the location's index.
//! - c8's placeholders (`"all": true`, written for files no test loaded) are read whole, as c8
//!   writes them to LCOV too: every line 0, the `(empty-report)` function that marks them
//!   ([`crate::model::PLACEHOLDER_FUNCTION`]), one untaken branch. The merge then treats them
//!   as istanbul's does: a placeholder gives way to a real record of the file.
//!
//! A limit: c8 branches are V8 block ranges, and V8 leaves out a range whose count equals its
//! parent's, so two c8 shards may list different branches; istanbul's merge then adds the
//! enclosing range's count. covd sums by location, so c8 branch counts merge to a lower bound
//! (lines and functions are exact). nyc's instrumentation lists the same branches every time.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};

use super::{ParseError, Record};
use crate::model::{BranchArm, BranchKey, FileBuilder, FileCoverage, MAX_LINE};

/// Lines and columns are signed: v8-to-istanbul writes column -1 for some ranges.
#[derive(Deserialize, Default, Clone, Copy)]
struct Position {
    #[serde(default)]
    line: Option<i64>,
    #[serde(default)]
    column: Option<i64>,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct Range {
    #[serde(default)]
    start: Position,
}

#[derive(Deserialize)]
struct FunctionEntry {
    name: String,
    #[serde(default)]
    decl: Option<Range>,
    #[serde(default)]
    loc: Option<Range>,
    #[serde(default)]
    line: Option<i64>,
}

#[derive(Deserialize)]
struct BranchEntry {
    #[serde(default)]
    loc: Option<Range>,
    #[serde(default)]
    locations: Vec<Range>,
    #[serde(default)]
    line: Option<i64>,
}

#[derive(Deserialize)]
struct FileEntry {
    #[serde(default)]
    path: Option<String>,
    #[serde(default, rename = "statementMap")]
    statement_map: HashMap<String, Range>,
    #[serde(default)]
    s: HashMap<String, u64>,
    #[serde(default, rename = "fnMap")]
    fn_map: HashMap<String, FunctionEntry>,
    #[serde(default)]
    f: HashMap<String, u64>,
    #[serde(default, rename = "branchMap")]
    branch_map: HashMap<String, BranchEntry>,
    #[serde(default)]
    b: HashMap<String, Vec<u64>>,
    /// c8: a placeholder for a file no test loaded.
    #[serde(default)]
    all: bool,
}

/// Reads a report, calling `on_record` for each file as it is read; `false` stops early.
pub fn read(input: impl Read, mut on_record: impl FnMut(Record) -> bool) -> Result<(), ParseError> {
    let mut de = serde_json::Deserializer::from_reader(input);
    de.deserialize_map(Files {
        on_record: &mut on_record,
    })
    .and_then(|()| de.end())
    .map_err(|e| ParseError::at(e.line() as u64, format!("Istanbul JSON: {e}")))
}

struct Files<'a, F> {
    on_record: &'a mut F,
}

impl<'de, F: FnMut(Record) -> bool> DeserializeSeed<'de> for Files<'_, F> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: FnMut(Record) -> bool> Visitor<'de> for Files<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an Istanbul coverage map (an object of files)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut stopped = false;
        while let Some(key) = map.next_key::<String>()? {
            let entry: FileEntry = map.next_value()?;
            if stopped {
                continue;
            }
            let path = entry.path.clone().unwrap_or(key);
            let file = convert(&path, entry).map_err(serde::de::Error::custom)?;
            stopped = !(self.on_record)(Record {
                test_name: String::new(),
                path,
                file,
            });
        }
        Ok(())
    }
}

fn line(path: &str, n: Option<i64>) -> Result<Option<u32>, String> {
    match n {
        None => Ok(None),
        Some(n) if n >= 1 && n <= i64::from(MAX_LINE) => Ok(Some(n as u32)),
        Some(n) => Err(format!("{path}: line number {n} is out of range")),
    }
}

fn convert(path: &str, e: FileEntry) -> Result<FileCoverage, String> {
    let mut b = FileBuilder::new();
    let mut lines: HashMap<u32, u64> = HashMap::new();
    for (id, range) in &e.statement_map {
        let Some(n) = line(path, range.start.line)? else {
            continue;
        };
        let hits = e.s.get(id).copied().unwrap_or(0);
        let slot = lines.entry(n).or_default();
        *slot = (*slot).max(hits);
    }
    for (n, hits) in lines {
        b.line(n, hits);
    }
    for (id, func) in &e.fn_map {
        let start = func
            .decl
            .and_then(|r| r.start.line)
            .or(func.line)
            .or(func.loc.and_then(|r| r.start.line));
        let Some(start) = line(path, start)? else {
            continue;
        };
        if func.name.is_empty() {
            continue;
        }
        b.function(&func.name, start, 0, e.f.get(id).copied().unwrap_or(0));
    }
    for (id, branch) in &e.branch_map {
        let first = branch
            .locations
            .first()
            .copied()
            .or(branch.loc)
            .unwrap_or_default();
        let Some(n) = line(path, branch.line.or(first.start.line))? else {
            continue;
        };
        // c8 can give -1 (a V8 range that starts on the newline before the line).
        let column = crate::model::block_number(
            first.start.column.unwrap_or(0).max(0) as u64,
            "branch column",
        )
        .map_err(|m| format!("{path}: line {n}: {m}"))?;
        let counts = e.b.get(id).map(Vec::as_slice).unwrap_or(&[]);
        for i in 0..branch.locations.len().max(counts.len()) {
            let key = BranchKey {
                line: n,
                block: column,
                arm: BranchArm::Index(i as u32),
            };
            b.branch(key, Some(counts.get(i).copied().unwrap_or(0)));
        }
    }
    let mut file = b.build();
    if e.all && !file.is_placeholder() {
        // Marked by its flag only (not as c8 writes it): the mark is what the merge reads.
        let mut b = FileBuilder::new();
        for (line, hits) in file.line_hits() {
            b.line(line, hits);
        }
        b.function(crate::model::PLACEHOLDER_FUNCTION, 1, 0, 0);
        file = b.build();
    }
    Ok(file)
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
    fn statements_functions_branches_and_c8_placeholders() {
        let recs = read_all(
            r#"{"/a.js":{"path":"/a.js",
               "statementMap":{"0":{"start":{"line":1,"column":0},"end":{"line":1,"column":9}},
                               "1":{"start":{"line":1,"column":10},"end":{"line":1,"column":20}},
                               "2":{"start":{"line":3,"column":2},"end":{"line":3,"column":9}}},
               "s":{"0":2,"1":5,"2":0},
               "fnMap":{"0":{"name":"f","decl":{"start":{"line":1,"column":9}},"loc":{"start":{"line":1,"column":12}},"line":1}},
               "f":{"0":2},
               "branchMap":{"0":{"loc":{"start":{"line":3,"column":2}},"type":"if",
                  "locations":[{"start":{"line":3,"column":2}},{"start":{},"end":{}}],"line":3}},
               "b":{"0":[0,2]}},
             "/b.js":{"path":"/b.js","all":true,
               "statementMap":{"0":{"start":{"line":1,"column":0}},"1":{"start":{"line":2,"column":0}}},
               "s":{"0":0,"1":0},
               "fnMap":{"0":{"name":"(empty-report)","decl":{"start":{"line":1,"column":0}}}},"f":{"0":0},
               "branchMap":{"0":{"type":"branch","locations":[{"start":{"line":1,"column":0}}],"line":1}},"b":{"0":[0]}}}"#,
        )
        .unwrap();
        let a = &recs[0].file;
        assert_eq!(a.line_hits().collect::<Vec<_>>(), vec![(1, 5), (3, 0)]);
        assert_eq!((&*a.functions()[0].name, a.functions()[0].hits), ("f", 2));
        let b: Vec<_> = a
            .branches()
            .iter()
            .map(|(k, t)| (k.line, k.block, *t))
            .collect();
        assert_eq!(b, vec![(3, 2, Some(0)), (3, 2, Some(2))]);
        let placeholder = &recs[1].file;
        assert_eq!(placeholder.totals().lines, 2);
        assert!(placeholder.is_placeholder());
        assert_eq!(placeholder.branches().len(), 1);
    }

    #[test]
    fn malformed_maps_are_errors() {
        for (text, needle) in [
            (
                r#"{"a":{"statementMap":{"0":{"start":{"line":0}}},"s":{"0":1}}}"#,
                "out of range",
            ),
            (r#"{"a":{"s":{"0":-1}}}"#, "invalid value"),
            (r#"[]"#, "invalid type"),
            (
                r#"{"a":{"fnMap":{"0":{"decl":{}}}}}"#,
                "missing field `name`",
            ),
            (r#"{"a":"#, "EOF"),
        ] {
            let e = read_all(text).expect_err(text);
            assert!(e.to_string().contains(needle), "{text}: {e}");
        }
    }
}
