//! coverage.py's JSON report (`coverage json`, format 3) in.
//!
//! Streamed: the document is walked with serde's visitor, and each entry of `files` is handed
//! over as soon as it is read, so a report of any size is never held whole. Per file:
//! `executed_lines` and `missing_lines` are the executable lines (hits 1 and 0: coverage.py
//! does not count); `executed_branches` and `missing_branches` are `[from, to]` arcs, which
//! become branches on line `from` labelled as coverage.py's own LCOV report labels them
//! ("jump to line 27", "return from function 'join'", "exit class 'Compose'", "exit the
//! module"), so JSON and LCOV from coverage.py merge into the same branches. A missing arc
//! whose line never ran is "never reached" (LCOV's `-`). The file-level `contexts` (written
//! with `--show-contexts`) become per-test attribution: each label (`shard3|mod.test_x`, or
//! a static context alone) is a test, with the lines it ran. Named functions become
//! functions, hit when any of their lines ran (functions without executable lines are left out, as
//! coverage.py's LCOV leaves them). The per-function `contexts` copies are skipped.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

use super::{ParseError, Record};
use crate::model::{BranchArm, BranchKey, FileBuilder, FileCoverage, MAX_LINE};

#[derive(Deserialize)]
struct FileReport {
    #[serde(default)]
    executed_lines: Vec<u32>,
    #[serde(default)]
    missing_lines: Vec<u32>,
    #[serde(default)]
    executed_branches: Vec<(i64, i64)>,
    #[serde(default)]
    missing_branches: Vec<(i64, i64)>,
    #[serde(default)]
    functions: HashMap<String, Region>,
    #[serde(default)]
    classes: HashMap<String, Region>,
    /// Line (as a string) -> the contexts that ran it (`--show-contexts`).
    #[serde(default)]
    contexts: HashMap<String, Vec<String>>,
}

#[derive(Deserialize)]
struct Region {
    #[serde(default)]
    executed_lines: Vec<u32>,
    #[serde(default)]
    missing_lines: Vec<u32>,
    #[serde(default)]
    start_line: Option<u32>,
}

/// Reads a report, calling `on_file` for each file in document order. `on_file` returning
/// `false` stops the reading early (the consumer went away). Returns the coverage.py version
/// that wrote it, when its `meta` says.
pub fn read(
    input: impl Read,
    mut on_file: impl FnMut(Record) -> bool,
) -> Result<Option<String>, ParseError> {
    let mut de = serde_json::Deserializer::from_reader(input);
    let mut version = None;
    let result = de
        .deserialize_map(Document {
            on_file: &mut on_file,
            version: &mut version,
        })
        .and_then(|()| de.end());
    result.map_err(|e| ParseError::at(e.line() as u64, format!("coverage.py JSON: {e}")))?;
    Ok(version)
}

struct Document<'a, F> {
    on_file: &'a mut F,
    version: &'a mut Option<String>,
}

impl<'de, F: FnMut(Record) -> bool> Visitor<'de> for Document<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a coverage.py JSON report (an object with `meta` and `files`)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut saw_files = false;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "meta" => {
                    let meta: Meta = map.next_value()?;
                    *self.version = meta.version;
                    if meta.format.is_some_and(|f| f > 3) {
                        return Err(serde::de::Error::custom(format!(
                            "report format {} is newer than this reader knows (3)",
                            meta.format.unwrap_or_default()
                        )));
                    }
                }
                "files" => {
                    saw_files = true;
                    map.next_value_seed(Files {
                        on_file: &mut *self.on_file,
                        names: HashMap::new(),
                    })?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if !saw_files {
            return Err(serde::de::Error::missing_field("files"));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct Meta {
    format: Option<u32>,
    #[serde(default)]
    version: Option<String>,
}

struct Files<'a, F> {
    on_file: &'a mut F,
    /// Context labels, shared between files.
    names: HashMap<String, Arc<str>>,
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
        f.write_str("an object of files")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let mut stopped = false;
        while let Some(path) = map.next_key::<String>()? {
            if stopped {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let report: FileReport = map.next_value()?;
            let file = convert(&path, report, &mut self.names).map_err(serde::de::Error::custom)?;
            stopped = !(self.on_file)(Record {
                test_name: String::new(),
                path,
                file,
            });
        }
        Ok(())
    }
}

fn check_line(path: &str, line: u32) -> Result<u32, String> {
    if line == 0 || line > MAX_LINE {
        return Err(format!("{path}: line number {line} is out of range"));
    }
    Ok(line)
}

fn convert(
    path: &str,
    r: FileReport,
    names: &mut HashMap<String, Arc<str>>,
) -> Result<FileCoverage, String> {
    let mut b = FileBuilder::new();
    for (line, labels) in &r.contexts {
        let line = line
            .parse::<u32>()
            .map_err(|_| format!("{path}: context line `{line}` is not a line number"))
            .and_then(|l| check_line(path, l))?;
        for label in labels.iter().filter(|l| !l.is_empty()) {
            let name = match names.get(label) {
                Some(n) => n.clone(),
                None => {
                    let n: Arc<str> = Arc::from(label.as_str());
                    names.insert(label.clone(), n.clone());
                    n
                }
            };
            b.test_line(&name, line);
        }
    }
    for &l in &r.executed_lines {
        b.line(check_line(path, l)?, 1);
    }
    for &l in &r.missing_lines {
        b.line(check_line(path, l)?, 0);
    }
    // Code objects by first line, to name the exits of negative arcs.
    let mut starts: HashMap<u32, (bool, &str)> = HashMap::new();
    for (name, f) in r.functions.iter().filter(|(n, _)| !n.is_empty()) {
        if let Some(s) = f.start_line {
            starts.entry(s).or_insert((true, name));
        }
    }
    for (name, c) in r.classes.iter().filter(|(n, _)| !n.is_empty()) {
        if let Some(s) = c.start_line {
            starts.entry(s).or_insert((false, name));
        }
    }
    let executed: std::collections::HashSet<u32> = r.executed_lines.iter().copied().collect();
    let arcs = r
        .executed_branches
        .iter()
        .map(|a| (a, true))
        .chain(r.missing_branches.iter().map(|a| (a, false)));
    for (&(from, to), taken) in arcs {
        let line = u32::try_from(from)
            .map_err(|_| format!("{path}: branch from line {from}"))
            .and_then(|l| check_line(path, l))?;
        let label = if to > 0 {
            format!("jump to line {to}")
        } else {
            let target = u32::try_from(to.unsigned_abs()).unwrap_or(u32::MAX);
            match starts.get(&target) {
                Some((true, name)) => format!("return from function '{}'", short(name)),
                Some((false, name)) => format!("exit class '{}'", short(name)),
                None => "exit the module".to_owned(),
            }
        };
        let outcome = if taken {
            Some(1)
        } else if executed.contains(&line) {
            Some(0)
        } else {
            None
        };
        b.branch(
            BranchKey {
                line,
                block: 0,
                arm: BranchArm::Label(label.into()),
            },
            outcome,
        );
    }
    for (name, f) in r.functions.iter().filter(|(n, _)| !n.is_empty()) {
        // A function whose lines are all excluded is not reported (nor by coverage.py's LCOV).
        let Some(start) = f.start_line else { continue };
        if f.executed_lines.is_empty() && f.missing_lines.is_empty() {
            continue;
        }
        let hit = u64::from(!f.executed_lines.is_empty());
        // The report has no end line (coverage.py's LCOV takes it from the source): unknown.
        b.function(name, check_line(path, start)?, 0, hit);
    }
    Ok(b.build())
}

/// `Class.method` → `method`: coverage.py labels exits with the code object's own name.
fn short(qualified: &str) -> &str {
    qualified.rsplit('.').next().unwrap_or(qualified)
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
    fn reads_lines_arcs_and_functions() {
        let recs = read_all(
            r#"{"meta":{"format":3},"files":{"a.py":{
                "executed_lines":[1,2,4],"missing_lines":[3,9],
                "executed_branches":[[2,4],[4,-5]],"missing_branches":[[2,3],[9,-1]],
                "functions":{"K.f":{"executed_lines":[4],"missing_lines":[],"start_line":5},
                             "":{"executed_lines":[1],"start_line":1}},
                "classes":{}, "contexts":{"1":["x"]}}},"totals":{}}"#,
        )
        .unwrap();
        let f = &recs[0].file;
        assert_eq!(
            f.line_hits().collect::<Vec<_>>(),
            vec![(1, 1), (2, 1), (3, 0), (4, 1), (9, 0)]
        );
        let b: Vec<_> = f
            .branches()
            .iter()
            .map(|(k, t)| (k.line, k.arm.to_string(), *t))
            .collect();
        assert_eq!(
            b,
            vec![
                (2, "jump to line 3".into(), Some(0)),
                (2, "jump to line 4".into(), Some(1)),
                (4, "return from function 'f'".into(), Some(1)),
                (9, "exit the module".into(), None),
            ]
        );
        assert_eq!(f.functions().len(), 1);
        assert_eq!((&*f.functions()[0].name, f.functions()[0].hits), ("K.f", 1));
    }

    #[test]
    fn malformed_reports_are_errors_with_a_line() {
        for (text, needle) in [
            (
                "{\"meta\":{},\n\"files\":{\"a\":{\"executed_lines\":[0]}}}",
                "out of range",
            ),
            ("{\"files\":{\"a\":{\"executed_lines\":[1,", "EOF"),
            ("{\"meta\":{\"format\":9},\"files\":{}}", "newer"),
            ("{\"meta\":{}}", "missing field `files`"),
            ("[1,2]", "invalid type"),
            (
                "{\"files\":{\"a\":{\"executed_branches\":[[-3,4]]}}}",
                "branch from line -3",
            ),
        ] {
            let e = read_all(text).expect_err(text);
            assert!(e.to_string().contains(needle), "{text}: {e}");
            assert!(e.line >= 1);
        }
    }
}
